//! The serve protocol server loop: handshake, then one request after another
//! until the client closes the connection, each answered by a [`ServeHandler`].

use std::collections::BTreeSet;
use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use super::{
    BuildOptions, MIN_SERVE_VERSION, SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION,
    ServeError, ServeRequest, build_result_fields, copy_export_stream, write_path_infos,
};
use crate::derivation::BasicDerivation;
use crate::nar::{NarLimits, copy_nar};
use crate::path_info::ValidPathInfo;
use crate::store_path::StorePath;
use crate::wire::{
    self, BuildResult, HandlerError, Limits, ProtocolVersion, WireError, pipe::pipe, read_u64,
    write_store_paths, write_string, write_u64,
};

/// What a serve protocol server asks of the store behind it. Every method runs
/// while the connection waits; an `Err` ends the connection (the serve
/// protocol has no error channel), and [`run_server`] returns it.
pub trait ServeHandler: Send {
    /// `QueryValidPaths`: which of `paths` the store has. `lock` asks to keep
    /// them alive for this connection, `substitute` to try substituting first.
    fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> impl Future<Output = Result<BTreeSet<StorePath>, HandlerError>> + Send;

    /// Metadata of a valid path, `None` if the store does not have it.
    fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> impl Future<Output = Result<Option<ValidPathInfo>, HandlerError>> + Send;

    /// `DumpStorePath`: write the NAR of `path` to `out` (the client checks it
    /// against the narHash and narSize it was told).
    fn nar_from_path(
        &mut self,
        path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// `AddToStoreNar`: store a path. `nar` yields exactly the NAR, already
    /// validated as NAR syntax; the server checks its size and sha256 against
    /// `info` as well, but only after this returns, so a handler that publishes
    /// must verify them itself. A handler may stop reading early (the rest is
    /// consumed for it).
    fn add_to_store_nar(
        &mut self,
        info: ValidPathInfo,
        nar: &mut (dyn AsyncRead + Unpin + Send),
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// `BuildDerivation`: build `drv` (whose inputs the client has copied
    /// first). A failed build is an `Ok` result with a failure status. The
    /// build log goes wherever the handler writes it (for `ssh://`, stderr).
    fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: BasicDerivation,
        options: &BuildOptions,
    ) -> impl Future<Output = Result<BuildResult, HandlerError>> + Send;

    /// `QueryClosure`. The default walks references with
    /// [`ServeHandler::query_path_info`] (and ignores `include_outputs`).
    fn query_closure(
        &mut self,
        paths: &BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> impl Future<Output = Result<BTreeSet<StorePath>, HandlerError>> + Send {
        let _ = include_outputs;
        async move {
            let mut closure = BTreeSet::new();
            let mut todo: Vec<StorePath> = paths.iter().cloned().collect();
            while let Some(p) = todo.pop() {
                if closure.contains(&p) {
                    continue;
                }
                if let Some(info) = self.query_path_info(&p).await? {
                    todo.extend(info.references.iter().cloned());
                    closure.insert(p);
                }
            }
            Ok(closure)
        }
    }

    /// `ImportPaths`: `stream` yields one export stream (already validated),
    /// ending at its final `u64 0`. Not supported by default.
    fn import_paths(
        &mut self,
        stream: &mut (dyn AsyncRead + Unpin + Send),
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = stream;
        async { Err(HandlerError::unsupported("ImportPaths")) }
    }

    /// `ExportPaths`: write an export stream of `paths`. Not supported by default.
    fn export_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (paths, out);
        async { Err(HandlerError::unsupported("ExportPaths")) }
    }

    /// `BuildPaths` (`path!outputs` strings). `Err` is reported to the client
    /// as a failed build. Not supported by default.
    fn build_paths(
        &mut self,
        paths: &[String],
        options: &BuildOptions,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (paths, options);
        async { Err(HandlerError::unsupported("BuildPaths")) }
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The version we announce (default [`SERVE_PROTOCOL_VERSION`]).
    pub version: ProtocolVersion,
    pub limits: Limits,
    pub nar_limits: NarLimits,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            version: SERVE_PROTOCOL_VERSION,
            limits: Limits::default(),
            nar_limits: NarLimits::default(),
        }
    }
}

/// Serve one connection with the default [`ServeConfig`]; returns when the
/// client closes it (`Ok`) or on the first error.
pub async fn run_server<R, W, H>(reader: R, writer: W, handler: &mut H) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: ServeHandler,
{
    run_server_with_config(reader, writer, handler, &ServeConfig::default()).await
}

/// Serve one connection.
pub async fn run_server_with_config<R, W, H>(
    reader: R,
    writer: W,
    handler: &mut H,
    config: &ServeConfig,
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: ServeHandler,
{
    let mut r = BufReader::new(reader);
    let mut w = BufWriter::new(writer);
    wire::expect_u64(&mut r, SERVE_MAGIC_1).await?;
    write_u64(&mut w, SERVE_MAGIC_2).await?;
    write_u64(&mut w, config.version.to_wire()).await?;
    w.flush().await.map_err(WireError::from)?;
    let client_wire = read_u64(&mut r).await?;
    let client_version = ProtocolVersion::from_wire(client_wire);
    if !client_version.supports(MIN_SERVE_VERSION) {
        return Err(WireError::UnsupportedVersion(client_wire).into());
    }
    let version = client_version.min(config.version);
    tracing::debug!(%version, "serve handshake done");

    // Each request within one message budget (a NAR that follows is not charged).
    while let Some(req) = wire::within_message(
        &config.limits,
        ServeRequest::read(&mut r, version, &config.limits),
    )
    .await?
    {
        tracing::debug!(command = ?req.command(), "serve request");
        handle(&mut r, &mut w, handler, req, version, config).await?;
        w.flush().await.map_err(WireError::from)?;
    }
    Ok(())
}

async fn handle<R, W, H>(
    r: &mut R,
    w: &mut W,
    handler: &mut H,
    req: ServeRequest,
    version: ProtocolVersion,
    config: &ServeConfig,
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: ServeHandler,
{
    match req {
        ServeRequest::QueryValidPaths {
            lock,
            substitute,
            paths,
        } => {
            let valid = handler.query_valid_paths(&paths, lock, substitute).await?;
            write_store_paths(w, &valid).await?;
        }
        ServeRequest::QueryPathInfos { paths } => {
            let mut infos = Vec::new();
            for p in &paths {
                if let Some(info) = handler.query_path_info(p).await? {
                    infos.push(info);
                }
            }
            write_path_infos(w, &infos, version).await?;
        }
        ServeRequest::DumpStorePath { path } => {
            handler.nar_from_path(&path, w).await?;
        }
        ServeRequest::ExportPaths { paths } => {
            handler.export_paths(&paths, w).await?;
        }
        ServeRequest::QueryClosure {
            include_outputs,
            paths,
        } => {
            let closure = handler.query_closure(&paths, include_outputs).await?;
            write_store_paths(w, &closure).await?;
        }
        ServeRequest::BuildPaths { paths, options } => {
            match handler.build_paths(&paths, &options).await {
                Ok(()) => write_u64(w, 0).await?,
                Err(e) => {
                    write_u64(w, 1).await?;
                    write_string(w, &e.message).await?;
                }
            }
        }
        ServeRequest::BuildDerivation {
            drv_path,
            drv,
            options,
        } => {
            let res = handler.build_derivation(&drv_path, drv, &options).await?;
            res.write(w, build_result_fields(version)).await?;
        }
        ServeRequest::AddToStoreNar { info } => {
            let (mut tx, mut rx) = pipe();
            let expected = info.clone();
            let nar_limits = &config.nar_limits;
            let produce = async move {
                let mut take = (&mut *r).take(expected.nar_size);
                let summary = copy_nar(&mut take, &mut tx, nar_limits).await?;
                if take.limit() != 0 {
                    return Err(ServeError::Protocol(format!(
                        "NAR of {} is shorter than its announced size {}",
                        expected.path, expected.nar_size
                    )));
                }
                drop(tx);
                wire::check_nar(&expected, &summary)?;
                Ok(())
            };
            let consume = async move {
                let res = handler.add_to_store_nar(info, &mut rx).await;
                drop(rx);
                res
            };
            let (p, c) = tokio::join!(produce, consume);
            p?;
            c?;
            write_u64(w, 1).await?;
        }
        ServeRequest::ImportPaths => {
            let (mut tx, mut rx) = pipe();
            let limits = &config.limits;
            let nar_limits = &config.nar_limits;
            let produce = async move {
                // The headers of the whole import (paths, references,
                // signatures) share one message budget; the NARs do not count.
                let copy = copy_export_stream(r, &mut tx, limits, nar_limits);
                let res = wire::within_message(limits, copy).await;
                drop(tx);
                res
            };
            let consume = async move {
                let res = handler.import_paths(&mut rx).await;
                drop(rx);
                res
            };
            let (p, c) = tokio::join!(produce, consume);
            p?;
            c?;
            write_u64(w, 1).await?;
        }
    }
    Ok(())
}
