//! The worker protocol server loop: handshake, then one operation after
//! another, each answered by a [`WorkerHandler`] through the stderr channel.
//! A handler error becomes `STDERR_ERROR` and the connection goes on; bad
//! input (an unknown operation, a malformed request, an invalid NAR) is
//! reported the same way when possible, and then the connection is closed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use super::{
    BuildMode, ClientSettings, Field, MIN_CLIENT_VERSION, Missing, PROTOCOL_VERSION, RemoteError,
    STDERR_LAST, StderrMsg, WORKER_MAGIC_1, WORKER_MAGIC_2, WorkerError, WorkerReply,
    WorkerRequest, feature,
};
use crate::derivation::BasicDerivation;
use crate::nar::{NarLimits, copy_nar};
use crate::path_info::ValidPathInfo;
use crate::store_path::StorePath;
use crate::wire::{
    self, BuildResult, DerivedPath, FramedReader, HandlerError, Limits, ProtocolVersion, WireError,
    pipe::pipe, read_strings, read_u64, write_strings, write_u64,
};

/// Sends stderr messages to the client while an operation runs (log lines,
/// activities). Each message is flushed at once.
pub struct Logger<'a> {
    w: &'a mut (dyn AsyncWrite + Unpin + Send),
    version: ProtocolVersion,
}

impl<'a> Logger<'a> {
    pub fn new(w: &'a mut (dyn AsyncWrite + Unpin + Send), version: ProtocolVersion) -> Logger<'a> {
        Logger { w, version }
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Send any message (not `Last` or `Error`: the server sends those).
    pub async fn send(&mut self, msg: &StderrMsg) -> Result<(), WireError> {
        msg.write(&mut *self.w, self.version).await?;
        self.w.flush().await?;
        Ok(())
    }

    /// `STDERR_NEXT`: a message the client prints.
    pub async fn next(&mut self, msg: &str) -> Result<(), WireError> {
        self.send(&StderrMsg::Next(msg.to_owned())).await
    }

    pub async fn start_activity(
        &mut self,
        id: u64,
        level: u64,
        activity_type: u64,
        text: &str,
        fields: Vec<Field>,
        parent: u64,
    ) -> Result<(), WireError> {
        self.send(&StderrMsg::StartActivity {
            id,
            level,
            activity_type,
            text: text.to_owned(),
            fields,
            parent,
        })
        .await
    }

    pub async fn stop_activity(&mut self, id: u64) -> Result<(), WireError> {
        self.send(&StderrMsg::StopActivity(id)).await
    }

    pub async fn result(
        &mut self,
        id: u64,
        result_type: u64,
        fields: Vec<Field>,
    ) -> Result<(), WireError> {
        self.send(&StderrMsg::Result {
            id,
            result_type,
            fields,
        })
        .await
    }

    /// A build log line of activity `id` (`RESULT` type 101; `nix log` keeps these).
    pub async fn build_log_line(&mut self, id: u64, line: &str) -> Result<(), WireError> {
        self.result(
            id,
            super::RES_BUILD_LOG_LINE,
            vec![Field::String(line.to_owned())],
        )
        .await
    }
}

/// What a worker protocol server asks of the store behind it. An `Err` is
/// sent to the client as `STDERR_ERROR` and the connection continues.
/// Operations with a default are optional; the default of an unsupported
/// operation reports it as such.
pub trait WorkerHandler: Send {
    /// `QueryPathInfo`: metadata of a valid path, `None` if the store lacks it.
    fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> impl Future<Output = Result<Option<ValidPathInfo>, HandlerError>> + Send;

    /// `NarFromPath`: write the NAR of `path` to `out`. If this fails before
    /// writing anything the client gets a clean error; after, the connection closes.
    fn nar_from_path(
        &mut self,
        path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// `AddToStoreNar`, and each path of `AddMultipleToStore`: store a path.
    /// `nar` yields exactly the NAR, validated as NAR syntax; the server checks
    /// size and sha256 against `info` too, but only after this returns, so a
    /// handler that publishes must verify them itself. It may stop reading early.
    fn add_to_store_nar(
        &mut self,
        info: ValidPathInfo,
        repair: bool,
        dont_check_sigs: bool,
        nar: &mut (dyn AsyncRead + Unpin + Send),
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// `IsValidPath`; by default through [`WorkerHandler::query_path_info`].
    fn is_valid_path(
        &mut self,
        path: &StorePath,
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send {
        async move { Ok(self.query_path_info(path).await?.is_some()) }
    }

    /// `QueryValidPaths`; by default through [`WorkerHandler::query_path_info`].
    fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> impl Future<Output = Result<BTreeSet<StorePath>, HandlerError>> + Send {
        let _ = substitute;
        async move {
            let mut valid = BTreeSet::new();
            for p in paths {
                if self.query_path_info(p).await?.is_some() {
                    valid.insert(p.clone());
                }
            }
            Ok(valid)
        }
    }

    /// `BuildDerivation`: build `drv` whose inputs are present. Log through
    /// `log`. A failed build is an `Ok` result with a failure status.
    fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: BasicDerivation,
        mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> impl Future<Output = Result<BuildResult, HandlerError>> + Send {
        let _ = (drv_path, drv, mode, log);
        async { Err(HandlerError::unsupported("BuildDerivation")) }
    }

    /// `BuildPathsWithResults`: one result per path, in order.
    fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> impl Future<Output = Result<Vec<BuildResult>, HandlerError>> + Send {
        let _ = (paths, mode, log);
        async { Err(HandlerError::unsupported("BuildPathsWithResults")) }
    }

    /// `BuildPaths`; by default through [`WorkerHandler::build_paths_with_results`],
    /// failing with the first failed build's message.
    fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            let results = self.build_paths_with_results(paths, mode, log).await?;
            for (p, r) in paths.iter().zip(&results) {
                if !r.status.is_success() {
                    return Err(HandlerError::new(format!(
                        "build of '{p}' failed: {}",
                        r.error_msg
                    )));
                }
            }
            Ok(())
        }
    }

    /// `QueryMissing`.
    fn query_missing(
        &mut self,
        paths: &[DerivedPath],
    ) -> impl Future<Output = Result<Missing, HandlerError>> + Send {
        let _ = paths;
        async { Err(HandlerError::unsupported("QueryMissing")) }
    }

    /// `EnsurePath`; by default: fails unless the path is valid.
    fn ensure_path(
        &mut self,
        path: &StorePath,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            match self.query_path_info(path).await? {
                Some(_) => Ok(()),
                None => Err(HandlerError::new(format!("path '{path}' is not valid"))),
            }
        }
    }

    /// `AddTempRoot`; accepted and ignored by default.
    fn add_temp_root(
        &mut self,
        path: &StorePath,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = path;
        async { Ok(()) }
    }

    /// `SetOptions`; accepted and ignored by default.
    fn set_options(
        &mut self,
        settings: &ClientSettings,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = settings;
        async { Ok(()) }
    }

    /// `QueryReferrers`.
    fn query_referrers(
        &mut self,
        path: &StorePath,
    ) -> impl Future<Output = Result<BTreeSet<StorePath>, HandlerError>> + Send {
        let _ = path;
        async { Err(HandlerError::unsupported("QueryReferrers")) }
    }

    /// `QueryPathFromHashPart`.
    fn query_path_from_hash_part(
        &mut self,
        hash_part: &str,
    ) -> impl Future<Output = Result<Option<StorePath>, HandlerError>> + Send {
        let _ = hash_part;
        async { Err(HandlerError::unsupported("QueryPathFromHashPart")) }
    }

    /// `QuerySubstitutablePaths`; none by default.
    fn query_substitutable_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> impl Future<Output = Result<BTreeSet<StorePath>, HandlerError>> + Send {
        let _ = paths;
        async { Ok(BTreeSet::new()) }
    }

    /// `QueryDerivationOutputMap`: output name → path (None if not known).
    fn query_derivation_output_map(
        &mut self,
        drv_path: &StorePath,
    ) -> impl Future<Output = Result<BTreeMap<String, Option<StorePath>>, HandlerError>> + Send
    {
        let _ = drv_path;
        async { Err(HandlerError::unsupported("QueryDerivationOutputMap")) }
    }

    /// `QueryRealisation` (content-addressed derivations); none by default.
    fn query_realisation(
        &mut self,
        drv_output: &str,
    ) -> impl Future<Output = Result<BTreeSet<String>, HandlerError>> + Send {
        let _ = drv_output;
        async { Ok(BTreeSet::new()) }
    }

    /// `RegisterDrvOutput`.
    fn register_drv_output(
        &mut self,
        realisation: &str,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = realisation;
        async { Err(HandlerError::unsupported("RegisterDrvOutput")) }
    }

    /// `AddSignatures`.
    fn add_signatures(
        &mut self,
        path: &StorePath,
        sigs: &BTreeSet<String>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (path, sigs);
        async { Err(HandlerError::unsupported("AddSignatures")) }
    }

    /// `AddToStore`: add `dump` (a NAR for `fixed:r:…`, flat contents
    /// otherwise) as a content-addressed path; returns its info.
    fn add_to_store(
        &mut self,
        name: &str,
        cam: &str,
        references: &BTreeSet<StorePath>,
        repair: bool,
        dump: &mut (dyn AsyncRead + Unpin + Send),
    ) -> impl Future<Output = Result<ValidPathInfo, HandlerError>> + Send {
        let _ = (name, cam, references, repair, dump);
        async { Err(HandlerError::unsupported("AddToStore")) }
    }

    /// `AddTextToStore`.
    fn add_text_to_store(
        &mut self,
        name: &str,
        text: &str,
        references: &BTreeSet<StorePath>,
    ) -> impl Future<Output = Result<StorePath, HandlerError>> + Send {
        let _ = (name, text, references);
        async { Err(HandlerError::unsupported("AddTextToStore")) }
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The version we announce (default [`PROTOCOL_VERSION`], 1.35).
    pub version: ProtocolVersion,
    /// The Nix version string sent to clients ≥ 1.33.
    pub nix_version: String,
    /// Trust sent to clients ≥ 1.35: `Some(true)` trusted, `Some(false)` not, `None` unknown.
    pub trusted: Option<bool>,
    pub limits: Limits,
    pub nar_limits: NarLimits,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            version: PROTOCOL_VERSION,
            nix_version: format!("2.8.0 (nix-farm {})", env!("CARGO_PKG_VERSION")),
            trusted: Some(true),
            limits: Limits::default(),
            nar_limits: NarLimits::default(),
        }
    }
}

/// Serve one connection with the default [`WorkerConfig`]; `Ok` when the
/// client closes it, `Err` when it had to be closed.
pub async fn run_server<R, W, H>(reader: R, writer: W, handler: &mut H) -> Result<(), WorkerError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: WorkerHandler,
{
    run_server_with_config(reader, writer, handler, &WorkerConfig::default()).await
}

/// Serve one connection.
pub async fn run_server_with_config<R, W, H>(
    reader: R,
    writer: W,
    handler: &mut H,
    config: &WorkerConfig,
) -> Result<(), WorkerError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: WorkerHandler,
{
    let mut r = BufReader::new(reader);
    let mut w = BufWriter::new(writer);
    let version = handshake(&mut r, &mut w, config).await?;
    loop {
        // One request (its arguments, not a NAR that follows) within one message budget.
        let read = WorkerRequest::read(&mut r, version, &config.limits);
        let req = match wire::within_message(&config.limits, read).await {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(e) => {
                if !e.is_eof() {
                    send_error(&mut w, version, &e.to_string()).await;
                }
                return Err(e.into());
            }
        };
        let op = req.op();
        tracing::debug!(?op, "worker request");
        match handle(&mut r, &mut w, handler, req, version, config).await {
            Ok(()) => {}
            Err(OpError::Handler(e)) => {
                tracing::debug!(?op, error = %e, "worker operation failed");
                send_error(&mut w, version, &e.message).await;
            }
            Err(OpError::Fatal { error, can_report }) => {
                if can_report {
                    send_error(&mut w, version, &error.to_string()).await;
                }
                return Err(error);
            }
        }
        w.flush().await.map_err(WireError::from)?;
    }
}

async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    config: &WorkerConfig,
) -> Result<ProtocolVersion, WorkerError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    wire::expect_u64(r, WORKER_MAGIC_1).await?;
    write_u64(w, WORKER_MAGIC_2).await?;
    write_u64(w, config.version.to_wire()).await?;
    w.flush().await.map_err(WireError::from)?;
    let client_wire = read_u64(r).await?;
    let client_version = ProtocolVersion::from_wire(client_wire);
    if !client_version.supports(MIN_CLIENT_VERSION) {
        return Err(WireError::UnsupportedVersion(client_wire).into());
    }
    let version = client_version.min(config.version);
    if version.supports(feature::FEATURE_EXCHANGE) {
        let _features =
            wire::within_message(&config.limits, read_strings(r, &config.limits)).await?;
        write_strings(w, Vec::<String>::new()).await?;
        w.flush().await.map_err(WireError::from)?;
    }
    if version.supports(feature::CPU_AFFINITY) && read_u64(r).await? != 0 {
        read_u64(r).await?; // obsolete CPU affinity
    }
    if version.supports(feature::RESERVE_SPACE) {
        read_u64(r).await?; // obsolete reserveSpace
    }
    if version.supports(feature::NIX_VERSION) {
        wire::write_string(w, &config.nix_version).await?;
    }
    if version.supports(feature::TRUST_STATUS) {
        write_u64(
            w,
            match config.trusted {
                None => 0,
                Some(true) => 1,
                Some(false) => 2,
            },
        )
        .await?;
    }
    write_u64(w, STDERR_LAST).await?;
    w.flush().await.map_err(WireError::from)?;
    tracing::debug!(%version, "worker handshake done");
    Ok(version)
}

/// Best effort: tell the client why (it may already be gone).
async fn send_error<W: AsyncWrite + Unpin + Send>(
    w: &mut W,
    version: ProtocolVersion,
    message: &str,
) {
    let msg = StderrMsg::Error(RemoteError::new(message));
    if msg.write(w, version).await.is_ok() {
        let _ = w.flush().await;
    }
}

enum OpError {
    /// The operation failed but the connection is in step.
    Handler(HandlerError),
    /// The connection must close; `can_report` if no reply has started.
    Fatal {
        error: WorkerError,
        can_report: bool,
    },
}

impl From<HandlerError> for OpError {
    fn from(e: HandlerError) -> Self {
        OpError::Handler(e)
    }
}

impl From<WireError> for OpError {
    fn from(e: WireError) -> Self {
        OpError::Fatal {
            error: e.into(),
            can_report: false,
        }
    }
}

/// Reply: `STDERR_LAST` then the value.
async fn reply<W: AsyncWrite + Unpin + Send>(
    w: &mut W,
    version: ProtocolVersion,
    value: WorkerReply,
) -> Result<(), OpError> {
    write_u64(w, STDERR_LAST).await?;
    value.write(w, version).await?;
    Ok(())
}

/// Feed one NAR from `src` to the handler's `add_to_store_nar`, validating it
/// and checking it against `info`. `Ok(Err(_))`: the handler failed or the NAR
/// did not match, but the NAR was consumed.
async fn add_one<S, H>(
    src: &mut S,
    handler: &mut H,
    info: ValidPathInfo,
    repair: bool,
    dont_check_sigs: bool,
    nar_limits: &NarLimits,
) -> Result<Result<(), HandlerError>, WorkerError>
where
    S: AsyncRead + Unpin + Send,
    H: WorkerHandler,
{
    let (mut tx, mut rx) = pipe();
    let produce = async move {
        let res = copy_nar(src, &mut tx, nar_limits).await;
        drop(tx);
        res
    };
    let expected = info.clone();
    let consume = async move {
        let res = handler
            .add_to_store_nar(info, repair, dont_check_sigs, &mut rx)
            .await;
        drop(rx);
        res
    };
    let (summary, handled) = tokio::join!(produce, consume);
    let summary = summary?;
    if let Err(e) = handled {
        return Ok(Err(e));
    }
    Ok(wire::check_nar(&expected, &summary).map_err(HandlerError::new))
}

async fn handle<R, W, H>(
    r: &mut R,
    w: &mut W,
    handler: &mut H,
    req: WorkerRequest,
    version: ProtocolVersion,
    config: &WorkerConfig,
) -> Result<(), OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: WorkerHandler,
{
    use WorkerRequest as Q;
    match req {
        Q::IsValidPath(p) => {
            let v = handler.is_valid_path(&p).await?;
            reply(w, version, WorkerReply::Bool(v)).await
        }
        Q::QueryReferrers(p) => {
            let v = handler.query_referrers(&p).await?;
            reply(w, version, WorkerReply::Paths(v)).await
        }
        Q::AddToStore {
            name,
            cam,
            references,
            repair,
        } => {
            let mut framed = FramedReader::new(&mut *r, config.limits.max_frame);
            let res = handler
                .add_to_store(&name, &cam, &references, repair, &mut framed)
                .await;
            // Whatever the handler left unread, so the stream stays in step.
            framed.drain().await.map_err(|e| OpError::Fatal {
                error: e.into(),
                can_report: true,
            })?;
            reply(w, version, WorkerReply::PathInfo(res?)).await
        }
        Q::AddTextToStore {
            name,
            text,
            references,
        } => {
            let p = handler.add_text_to_store(&name, &text, &references).await?;
            reply(w, version, WorkerReply::Path(p)).await
        }
        Q::BuildPaths { paths, mode } => {
            let mut log = Logger::new(w, version);
            handler.build_paths(&paths, mode, &mut log).await?;
            reply(w, version, WorkerReply::Success).await
        }
        Q::EnsurePath(p) => {
            handler.ensure_path(&p).await?;
            reply(w, version, WorkerReply::Success).await
        }
        Q::AddTempRoot(p) => {
            handler.add_temp_root(&p).await?;
            reply(w, version, WorkerReply::Success).await
        }
        Q::SetOptions(s) => {
            handler.set_options(&s).await?;
            reply(w, version, WorkerReply::Nothing).await
        }
        Q::QueryPathInfo(p) => {
            let info = handler.query_path_info(&p).await?;
            reply(w, version, WorkerReply::OptPathInfo(info)).await
        }
        Q::QueryPathFromHashPart(h) => {
            let p = handler.query_path_from_hash_part(&h).await?;
            reply(w, version, WorkerReply::OptPath(p)).await
        }
        Q::QueryValidPaths { paths, substitute } => {
            let v = handler.query_valid_paths(&paths, substitute).await?;
            reply(w, version, WorkerReply::Paths(v)).await
        }
        Q::QuerySubstitutablePaths(paths) => {
            let v = handler.query_substitutable_paths(&paths).await?;
            reply(w, version, WorkerReply::Paths(v)).await
        }
        Q::BuildDerivation {
            drv_path,
            drv,
            mode,
        } => {
            let mut log = Logger::new(w, version);
            let res = handler
                .build_derivation(&drv_path, drv, mode, &mut log)
                .await?;
            reply(w, version, WorkerReply::Build(res)).await
        }
        Q::AddSignatures { path, sigs } => {
            handler.add_signatures(&path, &sigs).await?;
            reply(w, version, WorkerReply::Success).await
        }
        Q::NarFromPath(p) => {
            let mut out = LastFirst::new(w);
            let res = handler.nar_from_path(&p, &mut out).await;
            let started = out.started();
            match res {
                Ok(()) => {
                    out.finish().await.map_err(WireError::from)?;
                    Ok(())
                }
                Err(e) if !started => Err(OpError::Handler(e)),
                Err(e) => Err(OpError::Fatal {
                    error: e.into(),
                    can_report: false,
                }),
            }
        }
        Q::AddToStoreNar {
            info,
            repair,
            dont_check_sigs,
        } => {
            let mut framed = FramedReader::new(&mut *r, config.limits.max_frame);
            let res = add_one(
                &mut framed,
                handler,
                info,
                repair,
                dont_check_sigs,
                &config.nar_limits,
            )
            .await;
            let extra = framed.drain().await;
            let res = res.map_err(|e| OpError::Fatal {
                error: e,
                can_report: true,
            })?;
            match extra {
                Ok(0) => {}
                Ok(n) => {
                    return Err(OpError::Fatal {
                        error: WorkerError::Protocol(format!("{n} bytes after the NAR")),
                        can_report: true,
                    });
                }
                Err(e) => {
                    return Err(OpError::Fatal {
                        error: e.into(),
                        can_report: true,
                    });
                }
            }
            res?;
            reply(w, version, WorkerReply::Nothing).await
        }
        Q::QueryMissing(paths) => {
            let m = handler.query_missing(&paths).await?;
            reply(w, version, WorkerReply::Missing(m)).await
        }
        Q::QueryDerivationOutputMap(p) => {
            let m = handler.query_derivation_output_map(&p).await?;
            reply(w, version, WorkerReply::OutputMap(m)).await
        }
        Q::RegisterDrvOutput(s) => {
            handler.register_drv_output(&s).await?;
            reply(w, version, WorkerReply::Nothing).await
        }
        Q::QueryRealisation(s) => {
            let v = handler.query_realisation(&s).await?;
            reply(w, version, WorkerReply::Strings(v)).await
        }
        Q::AddMultipleToStore {
            repair,
            dont_check_sigs,
        } => {
            let mut framed = FramedReader::new(&mut *r, config.limits.max_frame);
            let res = add_multiple(&mut framed, handler, repair, dont_check_sigs, config).await;
            let drained = framed.drain().await;
            let res = res.map_err(|e| OpError::Fatal {
                error: e,
                can_report: true,
            })?;
            if let Err(e) = drained {
                return Err(OpError::Fatal {
                    error: e.into(),
                    can_report: true,
                });
            }
            res?;
            reply(w, version, WorkerReply::Nothing).await
        }
        Q::BuildPathsWithResults { paths, mode } => {
            let mut log = Logger::new(w, version);
            let results = handler
                .build_paths_with_results(&paths, mode, &mut log)
                .await?;
            if results.len() != paths.len() {
                return Err(OpError::Handler(HandlerError::new(format!(
                    "handler returned {} results for {} paths",
                    results.len(),
                    paths.len()
                ))));
            }
            reply(
                w,
                version,
                WorkerReply::BuildResults(paths.into_iter().zip(results).collect()),
            )
            .await
        }
    }
}

/// The body of an `AddMultipleToStore` framed stream. `Ok(Err(_))`: a path was
/// refused (the remaining ones are skipped by draining the stream).
async fn add_multiple<S, H>(
    src: &mut S,
    handler: &mut H,
    repair: bool,
    dont_check_sigs: bool,
    config: &WorkerConfig,
) -> Result<Result<(), HandlerError>, WorkerError>
where
    S: AsyncRead + Unpin + Send,
    H: WorkerHandler,
{
    let n = wire::read_count(src, &config.limits).await?;
    for _ in 0..n {
        let info =
            wire::within_message(&config.limits, wire::read_path_info(src, &config.limits)).await?;
        if let Err(e) = add_one(
            src,
            handler,
            info,
            repair,
            dont_check_sigs,
            &config.nar_limits,
        )
        .await?
        {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

/// A writer that sends `STDERR_LAST` before the first byte of a NAR.
struct LastFirst<'a, W> {
    inner: &'a mut W,
    prefix: [u8; 8],
    prefix_pos: usize,
}

impl<'a, W: AsyncWrite + Unpin> LastFirst<'a, W> {
    fn new(inner: &'a mut W) -> Self {
        LastFirst {
            inner,
            prefix: STDERR_LAST.to_le_bytes(),
            prefix_pos: 0,
        }
    }

    fn started(&self) -> bool {
        self.prefix_pos > 0
    }

    fn poll_prefix(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.prefix_pos < 8 {
            let n =
                ready!(Pin::new(&mut *self.inner).poll_write(cx, &self.prefix[self.prefix_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.prefix_pos += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Make sure `STDERR_LAST` went out even if nothing was written.
    async fn finish(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_prefix(cx)).await
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for LastFirst<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.poll_prefix(cx))?;
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
}
