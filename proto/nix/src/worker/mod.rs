//! The worker protocol (`nix-daemon --stdio`, what `ssh-ng://` store URIs
//! speak): handshake, the stderr channel, request and reply codecs, a server
//! loop generic over a [`WorkerHandler`], and a [`WorkerClient`].
//!
//! Handshake: client `u64 0x6e697863`, `u64 version`; server `u64 0x6478696f`,
//! `u64 version`; both then use `v = min(client, server)`. If v ≥ 1.38 the
//! client sends its feature list and the server answers with its own (we
//! send none). The client sends (v ≥ 1.14) `u64 cpuAffinity` [`u64 cpu` if
//! non-zero] and (v ≥ 1.11) `u64 reserveSpace`; the server sends (v ≥ 1.33)
//! its Nix version string and (v ≥ 1.35) `u64 trusted` (0 unknown, 1 trusted,
//! 2 not trusted), then the stderr messages of startup ending with `STDERR_LAST`.
//!
//! We accept clients from 1.34 (Nix 2.8 … 2.14) and announce **1.35**
//! ([`PROTOCOL_VERSION`]): that is what Lix requires (it refuses daemons below
//! 1.35) and what Nix 2.15–2.19 speak; Nix ≥ 2.20 clients negotiate down to it.
//! 1.36 would promise that we parse dynamic-derivation `.drv` files and 1.37
//! only adds CPU times to build results, so 1.35 is the smallest version that
//! serves every client the farm targets. The codecs follow every version gate
//! up to 1.38 nonetheless (our client and tests use them).
//!
//! After each operation the server sends stderr messages ([`StderrMsg`]) and
//! then either `STDERR_LAST` followed by the reply, or `STDERR_ERROR`.
//!
//! | op | name | request → reply |
//! |---|---|---|
//! | 1 | IsValidPath | path → bool |
//! | 6 | QueryReferrers | path → paths |
//! | 7 | AddToStore | name, ca method, refs, bool repair, framed dump → path + path info fields |
//! | 8 | AddTextToStore | name, text, refs → path |
//! | 9 | BuildPaths | derived paths, u64 mode → u64 1 |
//! | 10 | EnsurePath | path → u64 1 |
//! | 11 | AddTempRoot | path → u64 1 |
//! | 19 | SetOptions | 12 × u64, (≥ 12) overrides (count, name, value…) → nothing |
//! | 26 | QueryPathInfo | path → u64 valid, [path info fields](crate::wire::read_path_info_fields) |
//! | 29 | QueryPathFromHashPart | hash part → path or `""` |
//! | 31 | QueryValidPaths | paths, (≥ 27) bool substitute → paths |
//! | 32 | QuerySubstitutablePaths | paths → paths |
//! | 36 | BuildDerivation | drvPath, BasicDerivation, u64 mode → [`BuildResult`] |
//! | 37 | AddSignatures | path, sigs → u64 1 |
//! | 38 | NarFromPath | path → NAR (after `STDERR_LAST`) |
//! | 39 | AddToStoreNar | path + info fields, bool repair, bool dontCheckSigs, framed NAR → nothing |
//! | 40 | QueryMissing | derived paths → willBuild, willSubstitute, unknown, u64 downloadSize, u64 narSize |
//! | 41 | QueryDerivationOutputMap | path → map output name → path or `""` |
//! | 42 | RegisterDrvOutput | realisation JSON → nothing |
//! | 43 | QueryRealisation | DrvOutput id → set of realisation JSON (≥ 31) or paths |
//! | 44 | AddMultipleToStore | bool repair, bool dontCheckSigs, framed: u64 n, n × (path + info fields, NAR) → nothing |
//! | 46 | BuildPathsWithResults | derived paths, u64 mode → u64 n, n × (derived path, [`BuildResult`]) |

mod client;
mod server;

pub use client::WorkerClient;
pub use server::{Logger, WorkerConfig, WorkerHandler, run_server, run_server_with_config};

use std::collections::{BTreeMap, BTreeSet};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::derivation::BasicDerivation;
use crate::nar::{NarError, NarLimits, copy_nar};
use crate::path_info::ValidPathInfo;
use crate::store_path::StorePath;
use crate::wire::{
    self, BuildResult, BuildResultFields, DerivedPath, HandlerError, Limits, NarMismatch,
    ProtocolVersion, WireError, read_bool, read_bytes, read_count, read_opt_store_path,
    read_store_path, read_store_paths, read_string, read_string_set, read_strings, read_u64,
    read_u64_or_eof, write_bool, write_bytes, write_opt_store_path, write_store_path,
    write_store_paths, write_string, write_strings, write_u64,
};

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// The version we announce: 1.35 (see the module documentation).
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion::new(1, 35);
/// The oldest client version we accept: 1.34 (Nix 2.8).
pub const MIN_CLIENT_VERSION: ProtocolVersion = ProtocolVersion::new(1, 34);
/// The oldest daemon version our client talks to: 1.10.
pub const MIN_DAEMON_VERSION: ProtocolVersion = ProtocolVersion::new(1, 10);

/// The worker protocol versions that brought what the codecs gate on; ask
/// with [`ProtocolVersion::supports`].
pub mod feature {
    use crate::wire::ProtocolVersion as V;

    /// The client sends the obsolete `reserveSpace` flag.
    pub const RESERVE_SPACE: V = V::new(1, 11);
    /// `SetOptions` carries setting overrides.
    pub const SETTING_OVERRIDES: V = V::new(1, 12);
    /// The client sends a CPU affinity.
    pub const CPU_AFFINITY: V = V::new(1, 14);
    /// `AddToStoreNar` exists.
    pub const ADD_TO_STORE_NAR: V = V::new(1, 23);
    /// Errors are structured (type, level, name, message, traces).
    pub const STRUCTURED_ERRORS: V = V::new(1, 26);
    /// `QueryValidPaths` carries a `substitute` flag.
    pub const SUBSTITUTE_FLAG: V = V::new(1, 27);
    /// Build results list the built outputs.
    pub const BUILT_OUTPUTS: V = V::new(1, 28);
    /// Build results carry times, repeats and determinism.
    pub const BUILD_TIMINGS: V = V::new(1, 29);
    /// `AddMultipleToStore` exists.
    pub const ADD_MULTIPLE_TO_STORE: V = V::new(1, 32);
    /// The daemon sends its Nix version in the handshake.
    pub const NIX_VERSION: V = V::new(1, 33);
    /// The daemon tells whether it trusts the client.
    pub const TRUST_STATUS: V = V::new(1, 35);
    /// Build results carry CPU times.
    pub const BUILD_CPU_TIMES: V = V::new(1, 37);
    /// Client and daemon exchange feature lists in the handshake.
    pub const FEATURE_EXCHANGE: V = V::new(1, 38);
}

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Activity type of a build (`actBuild`).
pub const ACT_BUILD: u64 = 105;
/// Result type of a build log line (`resBuildLogLine`).
pub const RES_BUILD_LOG_LINE: u64 = 101;

/// [`BuildResult`] fields of a worker protocol version.
pub fn build_result_fields(version: ProtocolVersion) -> BuildResultFields {
    BuildResultFields {
        timings: version.supports(feature::BUILD_TIMINGS),
        cpu: version.supports(feature::BUILD_CPU_TIMES),
        built_outputs: version.supports(feature::BUILT_OUTPUTS),
    }
}

/// Everything that can end a worker connection, or an operation on the client side.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("invalid NAR: {0}")]
    Nar(#[from] NarError),
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// The daemon reported an error (client side).
    #[error("remote error: {}", .0.message)]
    Remote(RemoteError),
    #[error(transparent)]
    NarMismatch(#[from] NarMismatch),
    #[error("worker protocol error: {0}")]
    Protocol(String),
}

/// Worker protocol operation numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WorkerOp {
    IsValidPath = 1,
    QueryReferrers = 6,
    AddToStore = 7,
    AddTextToStore = 8,
    BuildPaths = 9,
    EnsurePath = 10,
    AddTempRoot = 11,
    SetOptions = 19,
    QueryPathInfo = 26,
    QueryPathFromHashPart = 29,
    QueryValidPaths = 31,
    QuerySubstitutablePaths = 32,
    BuildDerivation = 36,
    AddSignatures = 37,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    QueryDerivationOutputMap = 41,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
    AddMultipleToStore = 44,
    BuildPathsWithResults = 46,
}

impl WorkerOp {
    pub fn from_u64(op: u64) -> Result<WorkerOp, WireError> {
        use WorkerOp::*;
        Ok(match op {
            1 => IsValidPath,
            6 => QueryReferrers,
            7 => AddToStore,
            8 => AddTextToStore,
            9 => BuildPaths,
            10 => EnsurePath,
            11 => AddTempRoot,
            19 => SetOptions,
            26 => QueryPathInfo,
            29 => QueryPathFromHashPart,
            31 => QueryValidPaths,
            32 => QuerySubstitutablePaths,
            36 => BuildDerivation,
            37 => AddSignatures,
            38 => NarFromPath,
            39 => AddToStoreNar,
            40 => QueryMissing,
            41 => QueryDerivationOutputMap,
            42 => RegisterDrvOutput,
            43 => QueryRealisation,
            44 => AddMultipleToStore,
            46 => BuildPathsWithResults,
            op => {
                return Err(WireError::UnknownOp {
                    protocol: "worker",
                    op,
                });
            }
        })
    }
}

/// How to build: `0` normal, `1` repair, `2` check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuildMode {
    #[default]
    Normal = 0,
    Repair = 1,
    Check = 2,
}

impl BuildMode {
    pub fn from_u64(v: u64) -> Result<BuildMode, WireError> {
        match v {
            0 => Ok(BuildMode::Normal),
            1 => Ok(BuildMode::Repair),
            2 => Ok(BuildMode::Check),
            value => Err(WireError::InvalidEnum {
                what: "build mode",
                value,
            }),
        }
    }
}

/// The client's settings (`SetOptions`), as sent. Wire layout: the twelve
/// `u64` fields in declaration order, then (≥ 1.12) `u64 n` and `n` × (name, value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSettings {
    pub keep_failed: u64,
    pub keep_going: u64,
    pub try_fallback: u64,
    pub verbosity: u64,
    pub max_build_jobs: u64,
    pub max_silent_time: u64,
    pub use_build_hook: u64,
    pub verbose_build: u64,
    pub log_type: u64,
    pub print_build_trace: u64,
    pub build_cores: u64,
    pub use_substitutes: u64,
    /// In the order sent.
    pub overrides: Vec<(String, String)>,
}

impl ClientSettings {
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
        limits: &Limits,
    ) -> Result<ClientSettings, WireError> {
        let mut s = ClientSettings::default();
        for f in [
            &mut s.keep_failed,
            &mut s.keep_going,
            &mut s.try_fallback,
            &mut s.verbosity,
            &mut s.max_build_jobs,
            &mut s.max_silent_time,
            &mut s.use_build_hook,
            &mut s.verbose_build,
            &mut s.log_type,
            &mut s.print_build_trace,
            &mut s.build_cores,
            &mut s.use_substitutes,
        ] {
            *f = read_u64(r).await?;
        }
        if version.supports(feature::SETTING_OVERRIDES) {
            let n = read_count(r, limits).await?;
            for _ in 0..n {
                let k = read_string(r, limits.max_string).await?;
                let v = read_string(r, limits.max_string).await?;
                s.overrides.push((k, v));
            }
        }
        Ok(s)
    }

    pub async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        version: ProtocolVersion,
    ) -> Result<(), WireError> {
        for f in [
            self.keep_failed,
            self.keep_going,
            self.try_fallback,
            self.verbosity,
            self.max_build_jobs,
            self.max_silent_time,
            self.use_build_hook,
            self.verbose_build,
            self.log_type,
            self.print_build_trace,
            self.build_cores,
            self.use_substitutes,
        ] {
            write_u64(w, f).await?;
        }
        if version.supports(feature::SETTING_OVERRIDES) {
            write_u64(w, self.overrides.len() as u64).await?;
            for (k, v) in &self.overrides {
                write_string(w, k).await?;
                write_string(w, v).await?;
            }
        }
        Ok(())
    }
}

/// A worker protocol request (without the framed data that follows
/// `AddToStore`, `AddToStoreNar` and `AddMultipleToStore`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerRequest {
    IsValidPath(StorePath),
    QueryReferrers(StorePath),
    /// Followed by a framed dump (a NAR, or flat contents, per `cam`).
    AddToStore {
        name: String,
        /// Content-address method and algorithm, e.g. `fixed:r:sha256`, `text:sha256`.
        cam: String,
        references: BTreeSet<StorePath>,
        repair: bool,
    },
    AddTextToStore {
        name: String,
        text: String,
        references: BTreeSet<StorePath>,
    },
    BuildPaths {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
    EnsurePath(StorePath),
    AddTempRoot(StorePath),
    SetOptions(ClientSettings),
    QueryPathInfo(StorePath),
    QueryPathFromHashPart(String),
    QueryValidPaths {
        paths: BTreeSet<StorePath>,
        substitute: bool,
    },
    QuerySubstitutablePaths(BTreeSet<StorePath>),
    BuildDerivation {
        drv_path: StorePath,
        drv: BasicDerivation,
        mode: BuildMode,
    },
    AddSignatures {
        path: StorePath,
        sigs: BTreeSet<String>,
    },
    NarFromPath(StorePath),
    /// Followed by a framed NAR.
    AddToStoreNar {
        info: ValidPathInfo,
        repair: bool,
        dont_check_sigs: bool,
    },
    QueryMissing(Vec<DerivedPath>),
    QueryDerivationOutputMap(StorePath),
    RegisterDrvOutput(String),
    QueryRealisation(String),
    /// Followed by a framed stream: `u64 n`, `n` × (path + info fields, NAR).
    AddMultipleToStore {
        repair: bool,
        dont_check_sigs: bool,
    },
    BuildPathsWithResults {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
}

impl WorkerRequest {
    pub fn op(&self) -> WorkerOp {
        use WorkerRequest as R;
        match self {
            R::IsValidPath(_) => WorkerOp::IsValidPath,
            R::QueryReferrers(_) => WorkerOp::QueryReferrers,
            R::AddToStore { .. } => WorkerOp::AddToStore,
            R::AddTextToStore { .. } => WorkerOp::AddTextToStore,
            R::BuildPaths { .. } => WorkerOp::BuildPaths,
            R::EnsurePath(_) => WorkerOp::EnsurePath,
            R::AddTempRoot(_) => WorkerOp::AddTempRoot,
            R::SetOptions(_) => WorkerOp::SetOptions,
            R::QueryPathInfo(_) => WorkerOp::QueryPathInfo,
            R::QueryPathFromHashPart(_) => WorkerOp::QueryPathFromHashPart,
            R::QueryValidPaths { .. } => WorkerOp::QueryValidPaths,
            R::QuerySubstitutablePaths(_) => WorkerOp::QuerySubstitutablePaths,
            R::BuildDerivation { .. } => WorkerOp::BuildDerivation,
            R::AddSignatures { .. } => WorkerOp::AddSignatures,
            R::NarFromPath(_) => WorkerOp::NarFromPath,
            R::AddToStoreNar { .. } => WorkerOp::AddToStoreNar,
            R::QueryMissing(_) => WorkerOp::QueryMissing,
            R::QueryDerivationOutputMap(_) => WorkerOp::QueryDerivationOutputMap,
            R::RegisterDrvOutput(_) => WorkerOp::RegisterDrvOutput,
            R::QueryRealisation(_) => WorkerOp::QueryRealisation,
            R::AddMultipleToStore { .. } => WorkerOp::AddMultipleToStore,
            R::BuildPathsWithResults { .. } => WorkerOp::BuildPathsWithResults,
        }
    }

    /// Whether framed data follows the request.
    pub fn has_framed_data(&self) -> bool {
        matches!(
            self,
            WorkerRequest::AddToStore { .. }
                | WorkerRequest::AddToStoreNar { .. }
                | WorkerRequest::AddMultipleToStore { .. }
        )
    }

    /// Read the next request; `None` if the client closed the connection
    /// between requests.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
        limits: &Limits,
    ) -> Result<Option<WorkerRequest>, WireError> {
        use WorkerRequest as Q;
        let Some(op) = read_u64_or_eof(r).await? else {
            return Ok(None);
        };
        let max = limits.max_string;
        Ok(Some(match WorkerOp::from_u64(op)? {
            WorkerOp::IsValidPath => Q::IsValidPath(read_store_path(r).await?),
            WorkerOp::QueryReferrers => Q::QueryReferrers(read_store_path(r).await?),
            WorkerOp::AddToStore => Q::AddToStore {
                name: read_string(r, max).await?,
                cam: read_string(r, max).await?,
                references: read_store_paths(r, limits).await?,
                repair: read_bool(r).await?,
            },
            WorkerOp::AddTextToStore => Q::AddTextToStore {
                name: read_string(r, max).await?,
                text: read_string(r, max).await?,
                references: read_store_paths(r, limits).await?,
            },
            WorkerOp::BuildPaths => Q::BuildPaths {
                paths: DerivedPath::read_list(r, limits).await?,
                mode: BuildMode::from_u64(read_u64(r).await?)?,
            },
            WorkerOp::EnsurePath => Q::EnsurePath(read_store_path(r).await?),
            WorkerOp::AddTempRoot => Q::AddTempRoot(read_store_path(r).await?),
            WorkerOp::SetOptions => Q::SetOptions(ClientSettings::read(r, version, limits).await?),
            WorkerOp::QueryPathInfo => Q::QueryPathInfo(read_store_path(r).await?),
            WorkerOp::QueryPathFromHashPart => {
                Q::QueryPathFromHashPart(read_string(r, wire::MAX_STORE_PATH_LEN).await?)
            }
            WorkerOp::QueryValidPaths => Q::QueryValidPaths {
                paths: read_store_paths(r, limits).await?,
                substitute: if version.supports(feature::SUBSTITUTE_FLAG) {
                    read_bool(r).await?
                } else {
                    false
                },
            },
            WorkerOp::QuerySubstitutablePaths => {
                Q::QuerySubstitutablePaths(read_store_paths(r, limits).await?)
            }
            WorkerOp::BuildDerivation => {
                let drv_path = read_store_path(r).await?;
                let drv = wire::read_basic_derivation(r, &drv_path, limits).await?;
                Q::BuildDerivation {
                    drv_path,
                    drv,
                    mode: BuildMode::from_u64(read_u64(r).await?)?,
                }
            }
            WorkerOp::AddSignatures => Q::AddSignatures {
                path: read_store_path(r).await?,
                sigs: read_string_set(r, limits).await?,
            },
            WorkerOp::NarFromPath => Q::NarFromPath(read_store_path(r).await?),
            WorkerOp::AddToStoreNar => Q::AddToStoreNar {
                info: wire::read_path_info(r, limits).await?,
                repair: read_bool(r).await?,
                dont_check_sigs: read_bool(r).await?,
            },
            WorkerOp::QueryMissing => Q::QueryMissing(DerivedPath::read_list(r, limits).await?),
            WorkerOp::QueryDerivationOutputMap => {
                Q::QueryDerivationOutputMap(read_store_path(r).await?)
            }
            WorkerOp::RegisterDrvOutput => Q::RegisterDrvOutput(read_string(r, max).await?),
            WorkerOp::QueryRealisation => Q::QueryRealisation(read_string(r, max).await?),
            WorkerOp::AddMultipleToStore => Q::AddMultipleToStore {
                repair: read_bool(r).await?,
                dont_check_sigs: read_bool(r).await?,
            },
            WorkerOp::BuildPathsWithResults => Q::BuildPathsWithResults {
                paths: DerivedPath::read_list(r, limits).await?,
                mode: BuildMode::from_u64(read_u64(r).await?)?,
            },
        }))
    }

    pub async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        version: ProtocolVersion,
    ) -> Result<(), WireError> {
        use WorkerRequest as Q;
        write_u64(w, self.op() as u64).await?;
        match self {
            Q::IsValidPath(p)
            | Q::QueryReferrers(p)
            | Q::EnsurePath(p)
            | Q::AddTempRoot(p)
            | Q::QueryPathInfo(p)
            | Q::NarFromPath(p)
            | Q::QueryDerivationOutputMap(p) => write_store_path(w, p).await,
            Q::AddToStore {
                name,
                cam,
                references,
                repair,
            } => {
                write_string(w, name).await?;
                write_string(w, cam).await?;
                write_store_paths(w, references).await?;
                write_bool(w, *repair).await
            }
            Q::AddTextToStore {
                name,
                text,
                references,
            } => {
                write_string(w, name).await?;
                write_string(w, text).await?;
                write_store_paths(w, references).await
            }
            Q::BuildPaths { paths, mode } | Q::BuildPathsWithResults { paths, mode } => {
                DerivedPath::write_list(w, paths).await?;
                write_u64(w, *mode as u64).await
            }
            Q::SetOptions(s) => s.write(w, version).await,
            Q::QueryPathFromHashPart(s) | Q::RegisterDrvOutput(s) | Q::QueryRealisation(s) => {
                write_string(w, s).await
            }
            Q::QueryValidPaths { paths, substitute } => {
                write_store_paths(w, paths).await?;
                if version.supports(feature::SUBSTITUTE_FLAG) {
                    write_bool(w, *substitute).await?;
                }
                Ok(())
            }
            Q::QuerySubstitutablePaths(p) => write_store_paths(w, p).await,
            Q::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                write_store_path(w, drv_path).await?;
                wire::write_basic_derivation(w, drv).await?;
                write_u64(w, *mode as u64).await
            }
            Q::AddSignatures { path, sigs } => {
                write_store_path(w, path).await?;
                write_strings(w, sigs).await
            }
            Q::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            } => {
                wire::write_path_info(w, info).await?;
                write_bool(w, *repair).await?;
                write_bool(w, *dont_check_sigs).await
            }
            Q::QueryMissing(paths) => DerivedPath::write_list(w, paths).await,
            Q::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                write_bool(w, *repair).await?;
                write_bool(w, *dont_check_sigs).await
            }
        }
    }
}

/// What `QueryMissing` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    pub will_build: BTreeSet<StorePath>,
    pub will_substitute: BTreeSet<StorePath>,
    pub unknown: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

/// A worker protocol reply (after `STDERR_LAST`), held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerReply {
    /// SetOptions, AddToStoreNar, AddMultipleToStore, RegisterDrvOutput.
    Nothing,
    /// `u64 1`: BuildPaths, EnsurePath, AddTempRoot, AddSignatures.
    Success,
    Bool(bool),
    /// QueryReferrers, QueryValidPaths, QuerySubstitutablePaths.
    Paths(BTreeSet<StorePath>),
    /// AddToStore: path and info.
    PathInfo(ValidPathInfo),
    /// QueryPathInfo.
    OptPathInfo(Option<ValidPathInfo>),
    /// AddTextToStore.
    Path(StorePath),
    /// QueryPathFromHashPart.
    OptPath(Option<StorePath>),
    Build(BuildResult),
    /// NarFromPath.
    Nar(Vec<u8>),
    Missing(Missing),
    OutputMap(BTreeMap<String, Option<StorePath>>),
    /// QueryRealisation: realisation JSON (≥ 1.31) or output paths.
    Strings(BTreeSet<String>),
    BuildResults(Vec<(DerivedPath, BuildResult)>),
}

impl WorkerReply {
    /// Read the reply to `request`.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        request: &WorkerRequest,
        version: ProtocolVersion,
        limits: &Limits,
    ) -> Result<WorkerReply, WorkerError> {
        use WorkerRequest as Q;
        Ok(match request {
            Q::SetOptions(_)
            | Q::AddToStoreNar { .. }
            | Q::AddMultipleToStore { .. }
            | Q::RegisterDrvOutput(_) => WorkerReply::Nothing,
            Q::BuildPaths { .. }
            | Q::EnsurePath(_)
            | Q::AddTempRoot(_)
            | Q::AddSignatures { .. } => match read_u64(r).await? {
                1 => WorkerReply::Success,
                v => {
                    return Err(WorkerError::Protocol(format!(
                        "expected success (1), got {v}"
                    )));
                }
            },
            Q::IsValidPath(_) => WorkerReply::Bool(read_bool(r).await?),
            Q::QueryReferrers(_) | Q::QueryValidPaths { .. } | Q::QuerySubstitutablePaths(_) => {
                WorkerReply::Paths(read_store_paths(r, limits).await?)
            }
            Q::AddToStore { .. } => WorkerReply::PathInfo(wire::read_path_info(r, limits).await?),
            Q::QueryPathInfo(p) => WorkerReply::OptPathInfo(if read_bool(r).await? {
                Some(wire::read_path_info_fields(r, p.clone(), limits).await?)
            } else {
                None
            }),
            Q::AddTextToStore { .. } => WorkerReply::Path(read_store_path(r).await?),
            Q::QueryPathFromHashPart(_) => WorkerReply::OptPath(read_opt_store_path(r).await?),
            Q::BuildDerivation { .. } => WorkerReply::Build(
                BuildResult::read(r, build_result_fields(version), limits).await?,
            ),
            Q::NarFromPath(_) => {
                let mut nar = Vec::new();
                copy_nar(&mut &mut *r, &mut nar, &NarLimits::default()).await?;
                WorkerReply::Nar(nar)
            }
            Q::QueryMissing(_) => WorkerReply::Missing(Missing {
                will_build: read_store_paths(r, limits).await?,
                will_substitute: read_store_paths(r, limits).await?,
                unknown: read_store_paths(r, limits).await?,
                download_size: read_u64(r).await?,
                nar_size: read_u64(r).await?,
            }),
            Q::QueryDerivationOutputMap(_) => {
                let n = read_count(r, limits).await?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let k = read_string(r, limits.max_string).await?;
                    m.insert(k, read_opt_store_path(r).await?);
                }
                WorkerReply::OutputMap(m)
            }
            Q::QueryRealisation(_) => {
                WorkerReply::Strings(read_strings(r, limits).await?.into_iter().collect())
            }
            Q::BuildPathsWithResults { .. } => {
                let n = read_count(r, limits).await?;
                let mut v = Vec::new();
                for _ in 0..n {
                    let p = DerivedPath::parse(&read_string(r, limits.max_string).await?)?;
                    let res = BuildResult::read(r, build_result_fields(version), limits).await?;
                    v.push((p, res));
                }
                WorkerReply::BuildResults(v)
            }
        })
    }

    pub async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        version: ProtocolVersion,
    ) -> Result<(), WireError> {
        match self {
            WorkerReply::Nothing => Ok(()),
            WorkerReply::Success => write_u64(w, 1).await,
            WorkerReply::Bool(b) => write_bool(w, *b).await,
            WorkerReply::Paths(p) => write_store_paths(w, p).await,
            WorkerReply::PathInfo(info) => wire::write_path_info(w, info).await,
            WorkerReply::OptPathInfo(None) => write_u64(w, 0).await,
            WorkerReply::OptPathInfo(Some(info)) => {
                write_u64(w, 1).await?;
                wire::write_path_info_fields(w, info).await
            }
            WorkerReply::Path(p) => write_store_path(w, p).await,
            WorkerReply::OptPath(p) => write_opt_store_path(w, p.as_ref()).await,
            WorkerReply::Build(res) => res.write(w, build_result_fields(version)).await,
            WorkerReply::Nar(nar) => Ok(w.write_all(nar).await?),
            WorkerReply::Missing(m) => {
                write_store_paths(w, &m.will_build).await?;
                write_store_paths(w, &m.will_substitute).await?;
                write_store_paths(w, &m.unknown).await?;
                write_u64(w, m.download_size).await?;
                write_u64(w, m.nar_size).await
            }
            WorkerReply::OutputMap(m) => {
                write_u64(w, m.len() as u64).await?;
                for (k, v) in m {
                    write_string(w, k).await?;
                    write_opt_store_path(w, v.as_ref()).await?;
                }
                Ok(())
            }
            WorkerReply::Strings(s) => write_strings(w, s).await,
            WorkerReply::BuildResults(v) => {
                write_u64(w, v.len() as u64).await?;
                for (p, res) in v {
                    write_string(w, &p.to_string()).await?;
                    res.write(w, build_result_fields(version)).await?;
                }
                Ok(())
            }
        }
    }
}

/// A field of an activity or result: `u64 0`, `u64 value` or `u64 1`, string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(String),
}

async fn read_fields<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &Limits,
) -> Result<Vec<Field>, WireError> {
    let n = read_count(r, limits).await?;
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(match read_u64(r).await? {
            0 => Field::Int(read_u64(r).await?),
            1 => Field::String(read_string(r, limits.max_string).await?),
            value => {
                return Err(WireError::InvalidEnum {
                    what: "field type",
                    value,
                });
            }
        });
    }
    Ok(v)
}

async fn write_fields<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    fields: &[Field],
) -> Result<(), WireError> {
    write_u64(w, fields.len() as u64).await?;
    for f in fields {
        match f {
            Field::Int(i) => {
                write_u64(w, 0).await?;
                write_u64(w, *i).await?;
            }
            Field::String(s) => {
                write_u64(w, 1).await?;
                write_string(w, s).await?;
            }
        }
    }
    Ok(())
}

/// An error as the daemon reports it.
///
/// Wire layout (≥ 1.26): `"Error"`, `u64 level`, name (`"Error"`), message,
/// `u64 0` (no position), `u64 n`, `n` × (`u64 0`, trace message).
/// Before 1.26: message, `u64 exitStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub level: u64,
    pub name: String,
    pub message: String,
    pub traces: Vec<String>,
    /// Only carried before 1.26.
    pub exit_status: u64,
}

impl RemoteError {
    pub fn new(message: impl Into<String>) -> RemoteError {
        RemoteError {
            level: 0,
            name: "Error".into(),
            message: message.into(),
            traces: Vec::new(),
            exit_status: 1,
        }
    }

    async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
        limits: &Limits,
    ) -> Result<RemoteError, WireError> {
        if !version.supports(feature::STRUCTURED_ERRORS) {
            let message = read_string(r, limits.max_string).await?;
            let exit_status = read_u64(r).await?;
            return Ok(RemoteError {
                exit_status,
                ..RemoteError::new(message)
            });
        }
        let ty = read_string(r, 64).await?;
        if ty != "Error" {
            return Err(WireError::Invalid(format!("unknown error type {ty:?}")));
        }
        let level = read_u64(r).await?;
        let name = read_string(r, limits.max_string).await?;
        let message = read_string(r, limits.max_string).await?;
        if read_u64(r).await? != 0 {
            return Err(WireError::Invalid(
                "error positions are not supported".into(),
            ));
        }
        let n = read_count(r, limits).await?;
        let mut traces = Vec::new();
        for _ in 0..n {
            if read_u64(r).await? != 0 {
                return Err(WireError::Invalid(
                    "trace positions are not supported".into(),
                ));
            }
            traces.push(read_string(r, limits.max_string).await?);
        }
        Ok(RemoteError {
            level,
            name,
            message,
            traces,
            exit_status: 1,
        })
    }

    async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        version: ProtocolVersion,
    ) -> Result<(), WireError> {
        if !version.supports(feature::STRUCTURED_ERRORS) {
            write_string(w, &self.message).await?;
            return write_u64(w, self.exit_status).await;
        }
        write_string(w, "Error").await?;
        write_u64(w, self.level).await?;
        write_string(w, &self.name).await?;
        write_string(w, &self.message).await?;
        write_u64(w, 0).await?;
        write_u64(w, self.traces.len() as u64).await?;
        for t in &self.traces {
            write_u64(w, 0).await?;
            write_string(w, t).await?;
        }
        Ok(())
    }
}

/// A message on the stderr channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMsg {
    /// `STDERR_NEXT`, string: a log message.
    Next(String),
    /// `STDERR_READ`, `u64 len`: the daemon wants data (only before 1.23).
    Read(u64),
    /// `STDERR_WRITE`, bytes: data for the client.
    Write(Vec<u8>),
    /// `STDERR_LAST`: the reply follows.
    Last,
    /// `STDERR_ERROR`: the operation failed.
    Error(RemoteError),
    /// `STDERR_START_ACTIVITY`, `u64 id`, `u64 level`, `u64 type`, text, fields, `u64 parent`.
    StartActivity {
        id: u64,
        level: u64,
        activity_type: u64,
        text: String,
        fields: Vec<Field>,
        parent: u64,
    },
    /// `STDERR_STOP_ACTIVITY`, `u64 id`.
    StopActivity(u64),
    /// `STDERR_RESULT`, `u64 id`, `u64 type`, fields (type 101: a build log line).
    Result {
        id: u64,
        result_type: u64,
        fields: Vec<Field>,
    },
}

impl StderrMsg {
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
        limits: &Limits,
    ) -> Result<StderrMsg, WireError> {
        Ok(match read_u64(r).await? {
            STDERR_NEXT => StderrMsg::Next(read_string(r, limits.max_string).await?),
            STDERR_READ => StderrMsg::Read(read_u64(r).await?),
            STDERR_WRITE => StderrMsg::Write(read_bytes(r, limits.max_string).await?),
            STDERR_LAST => StderrMsg::Last,
            STDERR_ERROR => StderrMsg::Error(RemoteError::read(r, version, limits).await?),
            STDERR_START_ACTIVITY => StderrMsg::StartActivity {
                id: read_u64(r).await?,
                level: read_u64(r).await?,
                activity_type: read_u64(r).await?,
                text: read_string(r, limits.max_string).await?,
                fields: read_fields(r, limits).await?,
                parent: read_u64(r).await?,
            },
            STDERR_STOP_ACTIVITY => StderrMsg::StopActivity(read_u64(r).await?),
            STDERR_RESULT => StderrMsg::Result {
                id: read_u64(r).await?,
                result_type: read_u64(r).await?,
                fields: read_fields(r, limits).await?,
            },
            value => {
                return Err(WireError::InvalidEnum {
                    what: "stderr message",
                    value,
                });
            }
        })
    }

    pub async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        version: ProtocolVersion,
    ) -> Result<(), WireError> {
        match self {
            StderrMsg::Next(s) => {
                write_u64(w, STDERR_NEXT).await?;
                write_string(w, s).await
            }
            StderrMsg::Read(n) => {
                write_u64(w, STDERR_READ).await?;
                write_u64(w, *n).await
            }
            StderrMsg::Write(b) => {
                write_u64(w, STDERR_WRITE).await?;
                write_bytes(w, b).await
            }
            StderrMsg::Last => write_u64(w, STDERR_LAST).await,
            StderrMsg::Error(e) => {
                write_u64(w, STDERR_ERROR).await?;
                e.write(w, version).await
            }
            StderrMsg::StartActivity {
                id,
                level,
                activity_type,
                text,
                fields,
                parent,
            } => {
                write_u64(w, STDERR_START_ACTIVITY).await?;
                write_u64(w, *id).await?;
                write_u64(w, *level).await?;
                write_u64(w, *activity_type).await?;
                write_string(w, text).await?;
                write_fields(w, fields).await?;
                write_u64(w, *parent).await
            }
            StderrMsg::StopActivity(id) => {
                write_u64(w, STDERR_STOP_ACTIVITY).await?;
                write_u64(w, *id).await
            }
            StderrMsg::Result {
                id,
                result_type,
                fields,
            } => {
                write_u64(w, STDERR_RESULT).await?;
                write_u64(w, *id).await?;
                write_u64(w, *result_type).await?;
                write_fields(w, fields).await
            }
        }
    }

    /// The text of a build log line (`RESULT` of type 101), if this is one.
    pub fn build_log_line(&self) -> Option<&str> {
        match self {
            StderrMsg::Result {
                result_type: RES_BUILD_LOG_LINE,
                fields,
                ..
            } => match fields.first() {
                Some(Field::String(s)) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Read one entry of an `AddMultipleToStore` stream: path + info fields (the NAR follows).
pub async fn read_multiple_entry_info<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &Limits,
) -> Result<ValidPathInfo, WireError> {
    wire::read_path_info(r, limits).await
}

#[cfg(test)]
mod tests;
