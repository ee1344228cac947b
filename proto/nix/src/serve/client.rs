//! A serve protocol client, e.g. for a local `nix-store --serve --write`.

use std::collections::BTreeSet;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use super::{
    BuildOptions, MIN_SERVE_VERSION, SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION,
    ServeError, ServeReply, ServeRequest, build_result_fields, read_path_infos,
};
use crate::derivation::BasicDerivation;
use crate::nar::{NarLimits, NarSummary, copy_nar};
use crate::path_info::ValidPathInfo;
use crate::store_path::StorePath;
use crate::wire::{
    self, BuildResult, Limits, ProtocolVersion, WireError, read_store_paths, read_u64, write_u64,
};

/// One serve protocol connection, after the handshake.
pub struct ServeClient<R, W> {
    r: BufReader<R>,
    w: BufWriter<W>,
    version: ProtocolVersion,
    limits: Limits,
    nar_limits: NarLimits,
}

impl<R: AsyncRead + Unpin + Send, W: AsyncWrite + Unpin + Send> ServeClient<R, W> {
    /// Greet the server (`reader` is its stdout, `writer` its stdin).
    pub async fn connect(reader: R, writer: W) -> Result<Self, ServeError> {
        let mut r = BufReader::new(reader);
        let mut w = BufWriter::new(writer);
        write_u64(&mut w, SERVE_MAGIC_1).await?;
        write_u64(&mut w, SERVE_PROTOCOL_VERSION.to_wire()).await?;
        w.flush().await.map_err(WireError::from)?;
        wire::expect_u64(&mut r, SERVE_MAGIC_2).await?;
        let server_wire = read_u64(&mut r).await?;
        let server_version = ProtocolVersion::from_wire(server_wire);
        if !server_version.supports(MIN_SERVE_VERSION) {
            return Err(WireError::UnsupportedVersion(server_wire).into());
        }
        Ok(ServeClient {
            r,
            w,
            version: server_version.min(SERVE_PROTOCOL_VERSION),
            limits: Limits::default(),
            nar_limits: NarLimits::default(),
        })
    }

    /// The negotiated version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    async fn send(&mut self, req: &ServeRequest) -> Result<(), ServeError> {
        req.write(&mut self.w, self.version).await?;
        self.w.flush().await.map_err(WireError::from)?;
        Ok(())
    }

    async fn expect_success(&mut self) -> Result<(), ServeError> {
        match read_u64(&mut self.r).await? {
            1 => Ok(()),
            v => Err(ServeError::Protocol(format!(
                "expected success (1), got {v}"
            ))),
        }
    }

    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        self.send(&ServeRequest::QueryValidPaths {
            lock,
            substitute,
            paths: paths.clone(),
        })
        .await?;
        Ok(read_store_paths(&mut self.r, &self.limits).await?)
    }

    /// Infos of the valid ones among `paths` (registration time and
    /// `ultimate` are not carried by this protocol).
    pub async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<ValidPathInfo>, ServeError> {
        self.send(&ServeRequest::QueryPathInfos {
            paths: paths.clone(),
        })
        .await?;
        Ok(read_path_infos(&mut self.r, self.version, &self.limits).await?)
    }

    /// Stream the NAR of `path` into `out`.
    pub async fn dump_store_path<O: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        path: &StorePath,
        out: &mut O,
    ) -> Result<NarSummary, ServeError> {
        self.send(&ServeRequest::DumpStorePath { path: path.clone() })
            .await?;
        let mut out = out;
        Ok(copy_nar(&mut self.r, &mut out, &self.nar_limits).await?)
    }

    pub async fn query_closure(
        &mut self,
        paths: &BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        self.send(&ServeRequest::QueryClosure {
            include_outputs,
            paths: paths.clone(),
        })
        .await?;
        Ok(read_store_paths(&mut self.r, &self.limits).await?)
    }

    /// Add a path: `nar` must yield exactly `info.nar_size` bytes.
    pub async fn add_to_store_nar<N: AsyncRead + Unpin + ?Sized>(
        &mut self,
        info: &ValidPathInfo,
        nar: &mut N,
    ) -> Result<(), ServeError> {
        ServeRequest::AddToStoreNar { info: info.clone() }
            .write(&mut self.w, self.version)
            .await?;
        let mut take = nar.take(info.nar_size);
        let n = tokio::io::copy(&mut take, &mut self.w)
            .await
            .map_err(WireError::from)?;
        if n != info.nar_size {
            return Err(ServeError::Protocol(format!(
                "NAR of {} has {n} bytes, info says {}",
                info.path, info.nar_size
            )));
        }
        self.w.flush().await.map_err(WireError::from)?;
        self.expect_success().await
    }

    /// Import an export stream read from `stream`.
    pub async fn import_paths<S: AsyncRead + Unpin + ?Sized>(
        &mut self,
        stream: &mut S,
    ) -> Result<(), ServeError> {
        self.send(&ServeRequest::ImportPaths).await?;
        super::copy_export_stream(stream, &mut self.w, &self.limits, &self.nar_limits).await?;
        self.w.flush().await.map_err(WireError::from)?;
        self.expect_success().await
    }

    /// Build a derivation whose inputs the server already has.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, ServeError> {
        self.send(&ServeRequest::BuildDerivation {
            drv_path: drv_path.clone(),
            drv: drv.clone(),
            options: options.clone(),
        })
        .await?;
        Ok(BuildResult::read(&mut self.r, build_result_fields(self.version), &self.limits).await?)
    }

    /// Send any request and read its reply into memory (NAR and export replies included).
    pub async fn request(&mut self, req: &ServeRequest) -> Result<ServeReply, ServeError> {
        if matches!(
            req,
            ServeRequest::ImportPaths | ServeRequest::AddToStoreNar { .. }
        ) {
            return Err(ServeError::Protocol(
                "use import_paths / add_to_store_nar for requests carrying data".into(),
            ));
        }
        self.send(req).await?;
        ServeReply::read(&mut self.r, req, self.version, &self.limits).await
    }
}
