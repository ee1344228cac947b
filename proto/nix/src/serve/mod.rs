//! The serve protocol (`nix-store --serve --write`, what `ssh://` store URIs
//! and the build hook speak): handshake, request and reply codecs for every
//! command, a server loop generic over a [`ServeHandler`], and a [`ServeClient`].
//!
//! Handshake: client `u64 0x390c9deb`, `u64 version`; server `u64 0x5452eecb`,
//! `u64 version`. Both use `min(client, server)`; we speak 2.7 (`0x207`) and
//! need at least 2.4 (NAR hashes in `QueryPathInfos` replies). There is no
//! error channel: a fatal error is a message on stderr and a closed connection.
//!
//! Commands (`u64` op, then its arguments; the reply follows):
//!
//! | op | command | request | reply |
//! |---|---|---|---|
//! | 1 | QueryValidPaths | `bool lock`, `bool substitute`, paths | paths |
//! | 2 | QueryPathInfos | paths | per valid path: path, deriver, refs, `u64 downloadSize`, `u64 narSize`, narHash (`sha256:nix32`), ca, sigs; then `""` |
//! | 3 | DumpStorePath | path | NAR |
//! | 4 | ImportPaths | export stream | `u64 1` |
//! | 5 | ExportPaths | `u64 0` (obsolete), paths | export stream |
//! | 6 | BuildPaths | list of `path!outputs`, [`BuildOptions`] | `u64 0`, or `u64 status`, message |
//! | 7 | QueryClosure | `bool includeOutputs`, paths | paths |
//! | 8 | BuildDerivation | drvPath, BasicDerivation, [`BuildOptions`] | [`BuildResult`] |
//! | 9 | AddToStoreNar | path, [path info fields](crate::wire::read_path_info_fields), then exactly narSize NAR bytes | `u64 1` |

mod client;
mod server;

pub use client::ServeClient;
pub use server::{ServeConfig, ServeHandler, run_server, run_server_with_config};

use std::collections::BTreeSet;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::derivation::BasicDerivation;
use crate::export::{self, ExportError, ExportReader, ExportedPath};
use crate::nar::{NarError, NarLimits, copy_nar};
use crate::path_info::ValidPathInfo;
use crate::store_path::StorePath;
use crate::wire::{
    self, BuildResult, BuildResultFields, HandlerError, Limits, NarMismatch, ProtocolVersion,
    WireError, read_bool, read_opt_store_path, read_store_path, read_store_paths, read_string,
    read_string_set, read_strings, read_u64, read_u64_or_eof, write_bool, write_opt_store_path,
    write_store_path, write_store_paths, write_string, write_strings, write_u64,
};

pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The version we speak: 2.7, as Nix 2.8 … 2.34 and Lix do.
pub const SERVE_PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion::new(2, 7);
/// The oldest version we accept (2.4: NAR hashes in path infos).
pub const MIN_SERVE_VERSION: ProtocolVersion = feature::PATH_INFO_NAR_HASH;

/// The serve protocol versions that brought what the codecs gate on; ask
/// with [`ProtocolVersion::supports`].
pub mod feature {
    use crate::wire::ProtocolVersion as V;

    /// Build options carry a maximum log size.
    pub const MAX_LOG_SIZE: V = V::new(2, 2);
    /// Build options carry repeats and determinism enforcement.
    pub const BUILD_REPEATS: V = V::new(2, 3);
    /// Build results carry times, repeats and determinism.
    pub const BUILD_TIMINGS: V = V::new(2, 3);
    /// `QueryPathInfos` replies carry NAR hashes, content addresses and signatures.
    pub const PATH_INFO_NAR_HASH: V = V::new(2, 4);
    /// Build results list the built outputs.
    pub const BUILT_OUTPUTS: V = V::new(2, 6);
    /// Build options carry `keepFailed`.
    pub const KEEP_FAILED: V = V::new(2, 7);
}
/// The magic before each path's metadata in an export stream.
pub use crate::export::EXPORT_MAGIC;

/// Everything that ends a serve connection with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("invalid NAR: {0}")]
    Nar(#[from] NarError),
    #[error("invalid export stream: {0}")]
    Export(#[from] ExportError),
    #[error(transparent)]
    Handler(#[from] HandlerError),
    #[error(transparent)]
    NarMismatch(#[from] NarMismatch),
    #[error("'nix-store --serve' protocol error: {0}")]
    Protocol(String),
}

/// Serve protocol command numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeCommand {
    QueryValidPaths = 1,
    QueryPathInfos = 2,
    DumpStorePath = 3,
    ImportPaths = 4,
    ExportPaths = 5,
    BuildPaths = 6,
    QueryClosure = 7,
    BuildDerivation = 8,
    AddToStoreNar = 9,
}

impl ServeCommand {
    pub fn from_u64(op: u64) -> Result<ServeCommand, WireError> {
        use ServeCommand::*;
        Ok(match op {
            1 => QueryValidPaths,
            2 => QueryPathInfos,
            3 => DumpStorePath,
            4 => ImportPaths,
            5 => ExportPaths,
            6 => BuildPaths,
            7 => QueryClosure,
            8 => BuildDerivation,
            9 => AddToStoreNar,
            op => {
                return Err(WireError::UnknownOp {
                    protocol: "serve",
                    op,
                });
            }
        })
    }
}

/// Build settings sent with `BuildPaths` and `BuildDerivation`.
///
/// Wire layout: `u64 maxSilentTime`, `u64 buildTimeout`, (≥ 2.2) `u64 maxLogSize`,
/// (≥ 2.3) `u64 nrRepeats`, `bool enforceDeterminism`, (≥ 2.7) `bool keepFailed`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildOptions {
    pub max_silent_time: u64,
    pub build_timeout: u64,
    pub max_log_size: u64,
    pub nr_repeats: u64,
    pub enforce_determinism: bool,
    pub keep_failed: bool,
}

impl BuildOptions {
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<BuildOptions, WireError> {
        let mut o = BuildOptions {
            max_silent_time: read_u64(r).await?,
            build_timeout: read_u64(r).await?,
            ..BuildOptions::default()
        };
        if version.supports(feature::MAX_LOG_SIZE) {
            o.max_log_size = read_u64(r).await?;
        }
        if version.supports(feature::BUILD_REPEATS) {
            o.nr_repeats = read_u64(r).await?;
            o.enforce_determinism = read_bool(r).await?;
        }
        if version.supports(feature::KEEP_FAILED) {
            o.keep_failed = read_bool(r).await?;
        }
        Ok(o)
    }

    pub async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        version: ProtocolVersion,
    ) -> Result<(), WireError> {
        write_u64(w, self.max_silent_time).await?;
        write_u64(w, self.build_timeout).await?;
        if version.supports(feature::MAX_LOG_SIZE) {
            write_u64(w, self.max_log_size).await?;
        }
        if version.supports(feature::BUILD_REPEATS) {
            write_u64(w, self.nr_repeats).await?;
            write_bool(w, self.enforce_determinism).await?;
        }
        if version.supports(feature::KEEP_FAILED) {
            write_bool(w, self.keep_failed).await?;
        }
        Ok(())
    }
}

/// [`BuildResult`] fields in the serve protocol: timings ≥ 2.3, built outputs ≥ 2.6.
///
/// (`nix-store --serve` of Nix 2.8 always sends built outputs, whatever the
/// client version, because of a misplaced parenthesis; every client it talks
/// to is ≥ 2.6 anyway.)
pub fn build_result_fields(version: ProtocolVersion) -> BuildResultFields {
    BuildResultFields {
        timings: version.supports(feature::BUILD_TIMINGS),
        cpu: false,
        built_outputs: version.supports(feature::BUILT_OUTPUTS),
    }
}

/// A serve protocol request (without the bulk data some commands carry after
/// it: a NAR after `AddToStoreNar`, an export stream after `ImportPaths`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeRequest {
    QueryValidPaths {
        lock: bool,
        substitute: bool,
        paths: BTreeSet<StorePath>,
    },
    QueryPathInfos {
        paths: BTreeSet<StorePath>,
    },
    DumpStorePath {
        path: StorePath,
    },
    /// Followed by an export stream.
    ImportPaths,
    ExportPaths {
        paths: BTreeSet<StorePath>,
    },
    BuildPaths {
        /// `path` or `drvPath!out1,out2`.
        paths: Vec<String>,
        options: BuildOptions,
    },
    QueryClosure {
        include_outputs: bool,
        paths: BTreeSet<StorePath>,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: BasicDerivation,
        options: BuildOptions,
    },
    /// Followed by exactly `info.nar_size` bytes of NAR.
    AddToStoreNar {
        info: ValidPathInfo,
    },
}

impl ServeRequest {
    pub fn command(&self) -> ServeCommand {
        match self {
            ServeRequest::QueryValidPaths { .. } => ServeCommand::QueryValidPaths,
            ServeRequest::QueryPathInfos { .. } => ServeCommand::QueryPathInfos,
            ServeRequest::DumpStorePath { .. } => ServeCommand::DumpStorePath,
            ServeRequest::ImportPaths => ServeCommand::ImportPaths,
            ServeRequest::ExportPaths { .. } => ServeCommand::ExportPaths,
            ServeRequest::BuildPaths { .. } => ServeCommand::BuildPaths,
            ServeRequest::QueryClosure { .. } => ServeCommand::QueryClosure,
            ServeRequest::BuildDerivation { .. } => ServeCommand::BuildDerivation,
            ServeRequest::AddToStoreNar { .. } => ServeCommand::AddToStoreNar,
        }
    }

    /// Read the next request; `None` when the client closed the connection
    /// between requests.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
        limits: &Limits,
    ) -> Result<Option<ServeRequest>, WireError> {
        let Some(op) = read_u64_or_eof(r).await? else {
            return Ok(None);
        };
        Ok(Some(match ServeCommand::from_u64(op)? {
            ServeCommand::QueryValidPaths => ServeRequest::QueryValidPaths {
                lock: read_bool(r).await?,
                substitute: read_bool(r).await?,
                paths: read_store_paths(r, limits).await?,
            },
            ServeCommand::QueryPathInfos => ServeRequest::QueryPathInfos {
                paths: read_store_paths(r, limits).await?,
            },
            ServeCommand::DumpStorePath => ServeRequest::DumpStorePath {
                path: read_store_path(r).await?,
            },
            ServeCommand::ImportPaths => ServeRequest::ImportPaths,
            ServeCommand::ExportPaths => {
                read_u64(r).await?; // obsolete
                ServeRequest::ExportPaths {
                    paths: read_store_paths(r, limits).await?,
                }
            }
            ServeCommand::BuildPaths => ServeRequest::BuildPaths {
                paths: read_strings(r, limits).await?,
                options: BuildOptions::read(r, version).await?,
            },
            ServeCommand::QueryClosure => ServeRequest::QueryClosure {
                include_outputs: read_bool(r).await?,
                paths: read_store_paths(r, limits).await?,
            },
            ServeCommand::BuildDerivation => {
                let drv_path = read_store_path(r).await?;
                let drv = wire::read_basic_derivation(r, &drv_path, limits).await?;
                ServeRequest::BuildDerivation {
                    drv_path,
                    drv,
                    options: BuildOptions::read(r, version).await?,
                }
            }
            ServeCommand::AddToStoreNar => {
                let info = wire::read_path_info(r, limits).await?;
                if info.nar_size == 0 {
                    return Err(WireError::Invalid(
                        "AddToStoreNar without a NAR size".into(),
                    ));
                }
                ServeRequest::AddToStoreNar { info }
            }
        }))
    }

    pub async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        version: ProtocolVersion,
    ) -> Result<(), WireError> {
        write_u64(w, self.command() as u64).await?;
        match self {
            ServeRequest::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                write_bool(w, *lock).await?;
                write_bool(w, *substitute).await?;
                write_store_paths(w, paths).await
            }
            ServeRequest::QueryPathInfos { paths } => write_store_paths(w, paths).await,
            ServeRequest::DumpStorePath { path } => write_store_path(w, path).await,
            ServeRequest::ImportPaths => Ok(()),
            ServeRequest::ExportPaths { paths } => {
                write_u64(w, 0).await?;
                write_store_paths(w, paths).await
            }
            ServeRequest::BuildPaths { paths, options } => {
                write_strings(w, paths).await?;
                options.write(w, version).await
            }
            ServeRequest::QueryClosure {
                include_outputs,
                paths,
            } => {
                write_bool(w, *include_outputs).await?;
                write_store_paths(w, paths).await
            }
            ServeRequest::BuildDerivation {
                drv_path,
                drv,
                options,
            } => {
                write_store_path(w, drv_path).await?;
                wire::write_basic_derivation(w, drv).await?;
                options.write(w, version).await
            }
            ServeRequest::AddToStoreNar { info } => wire::write_path_info(w, info).await,
        }
    }
}

/// Write a `QueryPathInfos` reply (layout in the module table; downloadSize = narSize, as Nix does).
pub async fn write_path_infos<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    infos: &[ValidPathInfo],
    version: ProtocolVersion,
) -> Result<(), WireError> {
    for info in infos {
        write_store_path(w, &info.path).await?;
        write_opt_store_path(w, info.deriver.as_ref()).await?;
        write_store_paths(w, &info.references).await?;
        write_u64(w, info.nar_size).await?;
        write_u64(w, info.nar_size).await?;
        if version.supports(feature::PATH_INFO_NAR_HASH) {
            write_string(w, &info.nar_hash.to_nix32_prefixed()).await?;
            write_string(w, info.ca.as_deref().unwrap_or("")).await?;
            write_strings(w, &info.sigs).await?;
        }
    }
    write_string(w, "").await
}

/// Read a `QueryPathInfos` reply (needs version ≥ 2.4 for the NAR hashes).
pub async fn read_path_infos<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    version: ProtocolVersion,
    limits: &Limits,
) -> Result<Vec<ValidPathInfo>, WireError> {
    if !version.supports(feature::PATH_INFO_NAR_HASH) {
        return Err(WireError::UnsupportedVersion(version.to_wire()));
    }
    let mut infos = Vec::new();
    loop {
        let p = read_string(r, wire::MAX_STORE_PATH_LEN).await?;
        if p.is_empty() {
            return Ok(infos);
        }
        if infos.len() as u64 >= limits.max_list {
            return Err(WireError::TooLong {
                what: "path info list",
                len: infos.len() as u64 + 1,
                max: limits.max_list,
            });
        }
        let path = StorePath::parse(&p)?;
        let deriver = read_opt_store_path(r).await?;
        let references = read_store_paths(r, limits).await?;
        let _download_size = read_u64(r).await?;
        let nar_size = read_u64(r).await?;
        let nar_hash = wire::parse_nar_hash(&read_string(r, 256).await?)?;
        let ca = read_string(r, limits.max_string).await?;
        let sigs = read_string_set(r, limits).await?;
        infos.push(ValidPathInfo {
            path,
            deriver,
            nar_hash,
            references,
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs,
            ca: (!ca.is_empty()).then_some(ca),
        });
    }
}

/// Validate an export stream from `r` while copying it byte for byte to `w`
/// (through [`ExportReader`], the one export stream parser); reads nothing
/// past its end. At most `limits.max_list` paths.
///
/// Layout: see [`crate::export`].
pub async fn copy_export_stream<R, W>(
    r: &mut R,
    w: &mut W,
    limits: &Limits,
    nar_limits: &NarLimits,
) -> Result<Vec<ExportedPath>, ServeError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut r = r;
    let mut w = w;
    let mut reader = ExportReader::with_limits(&mut r, limits, nar_limits);
    let mut out = Vec::new();
    while reader.has_next().await? {
        if out.len() as u64 >= limits.max_list {
            return Err(WireError::TooLong {
                what: "export stream",
                len: out.len() as u64 + 1,
                max: limits.max_list,
            }
            .into());
        }
        wire::charge_items(1)?;
        write_u64(&mut w, 1).await?;
        let (entry, signature) = reader.read_entry(&mut w).await?;
        export::write_trailer(
            &mut w,
            &entry.path,
            &entry.references,
            entry.deriver.as_ref(),
            signature.as_deref(),
        )
        .await?;
        out.push(entry);
    }
    export::finish(&mut w).await?;
    Ok(out)
}

/// A serve protocol reply, held in memory (for tests, captures and small data;
/// the client and server stream NARs instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeReply {
    /// QueryValidPaths, QueryClosure.
    Paths(BTreeSet<StorePath>),
    PathInfos(Vec<ValidPathInfo>),
    /// DumpStorePath: the NAR.
    Nar(Vec<u8>),
    /// ExportPaths: the export stream.
    Export(Vec<u8>),
    /// ImportPaths, AddToStoreNar: `u64 1`.
    Success,
    /// BuildPaths: `u64 0`, or a status and message.
    BuildPaths {
        status: u64,
        message: String,
    },
    Build(BuildResult),
}

impl ServeReply {
    /// Read the reply to `request`.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        request: &ServeRequest,
        version: ProtocolVersion,
        limits: &Limits,
    ) -> Result<ServeReply, ServeError> {
        Ok(match request {
            ServeRequest::QueryValidPaths { .. } | ServeRequest::QueryClosure { .. } => {
                ServeReply::Paths(read_store_paths(r, limits).await?)
            }
            ServeRequest::QueryPathInfos { .. } => {
                ServeReply::PathInfos(read_path_infos(r, version, limits).await?)
            }
            ServeRequest::DumpStorePath { .. } => {
                let mut nar = Vec::new();
                copy_nar(&mut &mut *r, &mut nar, &NarLimits::default()).await?;
                ServeReply::Nar(nar)
            }
            ServeRequest::ExportPaths { .. } => {
                let mut data = Vec::new();
                copy_export_stream(r, &mut data, limits, &NarLimits::default()).await?;
                ServeReply::Export(data)
            }
            ServeRequest::ImportPaths | ServeRequest::AddToStoreNar { .. } => {
                match read_u64(r).await? {
                    1 => ServeReply::Success,
                    v => {
                        return Err(ServeError::Protocol(format!(
                            "expected success (1), got {v}"
                        )));
                    }
                }
            }
            ServeRequest::BuildPaths { .. } => {
                let status = read_u64(r).await?;
                let message = if status == 0 {
                    String::new()
                } else {
                    read_string(r, limits.max_string).await?
                };
                ServeReply::BuildPaths { status, message }
            }
            ServeRequest::BuildDerivation { .. } => {
                ServeReply::Build(BuildResult::read(r, build_result_fields(version), limits).await?)
            }
        })
    }

    pub async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        version: ProtocolVersion,
    ) -> Result<(), WireError> {
        match self {
            ServeReply::Paths(p) => write_store_paths(w, p).await,
            ServeReply::PathInfos(infos) => write_path_infos(w, infos, version).await,
            ServeReply::Nar(b) | ServeReply::Export(b) => Ok(w.write_all(b).await?),
            ServeReply::Success => write_u64(w, 1).await,
            ServeReply::BuildPaths { status, message } => {
                write_u64(w, *status).await?;
                if *status != 0 {
                    write_string(w, message).await?;
                }
                Ok(())
            }
            ServeReply::Build(res) => res.write(w, build_result_fields(version)).await,
        }
    }
}

#[cfg(test)]
mod tests;
