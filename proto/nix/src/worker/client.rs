//! A worker protocol client, e.g. for a local `nix-daemon --stdio`.

use std::collections::{BTreeMap, BTreeSet};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use super::{
    BuildMode, ClientSettings, MIN_DAEMON_VERSION, Missing, PROTOCOL_VERSION, StderrMsg,
    WORKER_MAGIC_1, WORKER_MAGIC_2, WorkerError, WorkerReply, WorkerRequest, build_result_fields,
    feature,
};
use crate::derivation::BasicDerivation;
use crate::nar::{NarLimits, NarSummary, copy_nar};
use crate::path_info::ValidPathInfo;
use crate::store_path::StorePath;
use crate::wire::{
    self, BuildResult, DerivedPath, FramedWriter, Limits, ProtocolVersion, WireError, read_u64,
    write_u64,
};

/// Receives the stderr messages (log lines, activities) of each operation.
pub type StderrCallback = Box<dyn FnMut(&StderrMsg) + Send>;

/// One worker protocol connection, after the handshake.
pub struct WorkerClient<R, W> {
    r: BufReader<R>,
    w: BufWriter<W>,
    version: ProtocolVersion,
    daemon_nix_version: Option<String>,
    trusted: Option<bool>,
    limits: Limits,
    nar_limits: NarLimits,
    on_stderr: Option<StderrCallback>,
}

impl<R: AsyncRead + Unpin + Send, W: AsyncWrite + Unpin + Send> WorkerClient<R, W> {
    /// Greet the daemon (`reader` is its stdout, `writer` its stdin), announcing [`PROTOCOL_VERSION`].
    pub async fn connect(reader: R, writer: W) -> Result<Self, WorkerError> {
        Self::connect_with_version(reader, writer, PROTOCOL_VERSION).await
    }

    /// Greet the daemon announcing `our_version` (1.34 … 1.38).
    pub async fn connect_with_version(
        reader: R,
        writer: W,
        our_version: ProtocolVersion,
    ) -> Result<Self, WorkerError> {
        let mut r = BufReader::new(reader);
        let mut w = BufWriter::new(writer);
        write_u64(&mut w, WORKER_MAGIC_1).await?;
        write_u64(&mut w, our_version.to_wire()).await?;
        w.flush().await.map_err(WireError::from)?;
        wire::expect_u64(&mut r, WORKER_MAGIC_2).await?;
        let daemon_wire = read_u64(&mut r).await?;
        let daemon_version = ProtocolVersion::from_wire(daemon_wire);
        if !daemon_version.supports(MIN_DAEMON_VERSION) {
            return Err(WireError::UnsupportedVersion(daemon_wire).into());
        }
        let version = daemon_version.min(our_version);
        let limits = Limits::default();
        if version.supports(feature::FEATURE_EXCHANGE) {
            wire::write_strings(&mut w, Vec::<String>::new()).await?;
            w.flush().await.map_err(WireError::from)?;
            let _features = wire::read_strings(&mut r, &limits).await?;
        }
        if version.supports(feature::CPU_AFFINITY) {
            write_u64(&mut w, 0).await?; // no CPU affinity
        }
        if version.supports(feature::RESERVE_SPACE) {
            write_u64(&mut w, 0).await?; // reserveSpace
        }
        w.flush().await.map_err(WireError::from)?;
        let daemon_nix_version = if version.supports(feature::NIX_VERSION) {
            Some(wire::read_string(&mut r, 1024).await?)
        } else {
            None
        };
        let trusted = if version.supports(feature::TRUST_STATUS) {
            match read_u64(&mut r).await? {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            }
        } else {
            None
        };
        let mut c = WorkerClient {
            r,
            w,
            version,
            daemon_nix_version,
            trusted,
            limits,
            nar_limits: NarLimits::default(),
            on_stderr: None,
        };
        c.process_stderr().await?;
        Ok(c)
    }

    /// The negotiated version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The daemon's Nix version (≥ 1.33).
    pub fn daemon_nix_version(&self) -> Option<&str> {
        self.daemon_nix_version.as_deref()
    }

    /// Whether the daemon trusts us (≥ 1.35).
    pub fn trusted(&self) -> Option<bool> {
        self.trusted
    }

    /// Receive every stderr message (log lines arrive as `Result` type 101).
    pub fn on_stderr(&mut self, f: impl FnMut(&StderrMsg) + Send + 'static) {
        self.on_stderr = Some(Box::new(f));
    }

    /// Read stderr messages up to `STDERR_LAST`; `STDERR_ERROR` becomes [`WorkerError::Remote`].
    async fn process_stderr(&mut self) -> Result<(), WorkerError> {
        loop {
            let msg = StderrMsg::read(&mut self.r, self.version, &self.limits).await?;
            match msg {
                StderrMsg::Last => return Ok(()),
                StderrMsg::Error(e) => return Err(WorkerError::Remote(e)),
                StderrMsg::Read(_) | StderrMsg::Write(_) => {
                    return Err(WorkerError::Protocol(
                        "the daemon asked for a data tunnel this client does not use".into(),
                    ));
                }
                other => {
                    if let Some(line) = other.build_log_line() {
                        tracing::debug!(target: "nix_build_log", "{line}");
                    }
                    if let Some(f) = self.on_stderr.as_mut() {
                        f(&other);
                    }
                }
            }
        }
    }

    async fn send(&mut self, req: &WorkerRequest) -> Result<(), WorkerError> {
        req.write(&mut self.w, self.version).await?;
        self.w.flush().await.map_err(WireError::from)?;
        Ok(())
    }

    /// Send a request without data, wait for `STDERR_LAST` and read the reply.
    pub async fn request(&mut self, req: &WorkerRequest) -> Result<WorkerReply, WorkerError> {
        if req.has_framed_data() {
            return Err(WorkerError::Protocol(format!(
                "{:?} carries data: use its own method",
                req.op()
            )));
        }
        self.send(req).await?;
        self.process_stderr().await?;
        WorkerReply::read(&mut self.r, req, self.version, &self.limits).await
    }

    fn unexpected(reply: WorkerReply) -> WorkerError {
        WorkerError::Protocol(format!("unexpected reply {reply:?}"))
    }

    pub async fn is_valid_path(&mut self, path: &StorePath) -> Result<bool, WorkerError> {
        match self
            .request(&WorkerRequest::IsValidPath(path.clone()))
            .await?
        {
            WorkerReply::Bool(b) => Ok(b),
            r => Err(Self::unexpected(r)),
        }
    }

    pub async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, WorkerError> {
        match self
            .request(&WorkerRequest::QueryPathInfo(path.clone()))
            .await?
        {
            WorkerReply::OptPathInfo(i) => Ok(i),
            r => Err(Self::unexpected(r)),
        }
    }

    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, WorkerError> {
        let req = WorkerRequest::QueryValidPaths {
            paths: paths.clone(),
            substitute,
        };
        match self.request(&req).await? {
            WorkerReply::Paths(p) => Ok(p),
            r => Err(Self::unexpected(r)),
        }
    }

    pub async fn ensure_path(&mut self, path: &StorePath) -> Result<(), WorkerError> {
        self.request(&WorkerRequest::EnsurePath(path.clone()))
            .await
            .map(drop)
    }

    pub async fn add_temp_root(&mut self, path: &StorePath) -> Result<(), WorkerError> {
        self.request(&WorkerRequest::AddTempRoot(path.clone()))
            .await
            .map(drop)
    }

    pub async fn set_options(&mut self, settings: &ClientSettings) -> Result<(), WorkerError> {
        self.request(&WorkerRequest::SetOptions(settings.clone()))
            .await
            .map(drop)
    }

    pub async fn query_missing(&mut self, paths: &[DerivedPath]) -> Result<Missing, WorkerError> {
        match self
            .request(&WorkerRequest::QueryMissing(paths.to_vec()))
            .await?
        {
            WorkerReply::Missing(m) => Ok(m),
            r => Err(Self::unexpected(r)),
        }
    }

    pub async fn query_derivation_output_map(
        &mut self,
        drv_path: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>, WorkerError> {
        let req = WorkerRequest::QueryDerivationOutputMap(drv_path.clone());
        match self.request(&req).await? {
            WorkerReply::OutputMap(m) => Ok(m),
            r => Err(Self::unexpected(r)),
        }
    }

    /// Stream the NAR of `path` into `out`.
    pub async fn nar_from_path<O: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        path: &StorePath,
        out: &mut O,
    ) -> Result<NarSummary, WorkerError> {
        self.send(&WorkerRequest::NarFromPath(path.clone())).await?;
        self.process_stderr().await?;
        let mut out = out;
        Ok(copy_nar(&mut self.r, &mut out, &self.nar_limits).await?)
    }

    /// Add a path; `nar` must yield exactly `info.nar_size` bytes of NAR.
    pub async fn add_to_store_nar<N: AsyncRead + Unpin + ?Sized>(
        &mut self,
        info: &ValidPathInfo,
        repair: bool,
        dont_check_sigs: bool,
        nar: &mut N,
    ) -> Result<(), WorkerError> {
        if !self.version.supports(feature::ADD_TO_STORE_NAR) {
            return Err(WireError::UnsupportedVersion(self.version.to_wire()).into());
        }
        WorkerRequest::AddToStoreNar {
            info: info.clone(),
            repair,
            dont_check_sigs,
        }
        .write(&mut self.w, self.version)
        .await?;
        let mut framed = FramedWriter::new(&mut self.w);
        let n = tokio::io::copy(&mut nar.take(info.nar_size), &mut framed)
            .await
            .map_err(WireError::from)?;
        framed.finish().await?;
        if n != info.nar_size {
            return Err(WorkerError::Protocol(format!(
                "NAR of {} has {n} bytes, info says {}",
                info.path, info.nar_size
            )));
        }
        self.process_stderr().await
    }

    /// Add several paths in one operation (≥ 1.32), in the order given
    /// (dependencies first); each NAR reader yields exactly its `nar_size` bytes.
    pub async fn add_multiple_to_store(
        &mut self,
        items: &mut [(ValidPathInfo, &mut (dyn AsyncRead + Unpin + Send))],
        repair: bool,
        dont_check_sigs: bool,
    ) -> Result<(), WorkerError> {
        if !self.version.supports(feature::ADD_MULTIPLE_TO_STORE) {
            return Err(WireError::UnsupportedVersion(self.version.to_wire()).into());
        }
        WorkerRequest::AddMultipleToStore {
            repair,
            dont_check_sigs,
        }
        .write(&mut self.w, self.version)
        .await?;
        let mut framed = FramedWriter::new(&mut self.w);
        write_u64(&mut framed, items.len() as u64).await?;
        for (info, nar) in items.iter_mut() {
            wire::write_path_info(&mut framed, info).await?;
            let n = tokio::io::copy(&mut nar.take(info.nar_size), &mut framed)
                .await
                .map_err(WireError::from)?;
            if n != info.nar_size {
                return Err(WorkerError::Protocol(format!(
                    "NAR of {} has {n} bytes, info says {}",
                    info.path, info.nar_size
                )));
            }
        }
        framed.finish().await?;
        self.process_stderr().await
    }

    /// Build a derivation whose inputs the daemon already has.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        mode: BuildMode,
    ) -> Result<BuildResult, WorkerError> {
        let req = WorkerRequest::BuildDerivation {
            drv_path: drv_path.clone(),
            drv: drv.clone(),
            mode,
        };
        self.send(&req).await?;
        self.process_stderr().await?;
        Ok(BuildResult::read(&mut self.r, build_result_fields(self.version), &self.limits).await?)
    }

    /// Build paths (≥ 1.34), one result per path.
    pub async fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
    ) -> Result<Vec<(DerivedPath, BuildResult)>, WorkerError> {
        let req = WorkerRequest::BuildPathsWithResults {
            paths: paths.to_vec(),
            mode,
        };
        match self.request(&req).await? {
            WorkerReply::BuildResults(v) => Ok(v),
            r => Err(Self::unexpected(r)),
        }
    }
}
