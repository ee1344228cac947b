//! A minimal client for the serve protocol (`nix-store --serve --write`), the
//! builder's way to drive its local Nix: the same conversation Nix's own remote
//! builds use (check validity, add paths, BuildDerivation, query infos).
//!
//! Only the client side of the five commands the builder needs. The method names
//! and shapes follow `farm_nix::serve::ServeClient` (being written by the protocol
//! helper) so the builder can switch to it when it lands.
//!
//! Wire layout (all integers u64 little-endian; strings are length, bytes, zero
//! padding to 8):
//! - handshake: send `0x390c9deb`, our version; read `0x5452eecb`, server version.
//! - 1 QueryValidPaths: `lock`, `substitute`, paths → paths.
//! - 2 QueryPathInfos: paths → per valid path `path, deriver, refs, downloadSize,
//!   narSize, narHash, ca, sigs`, ended by an empty path.
//! - 3 DumpStorePath: path → the NAR.
//! - 8 BuildDerivation: `drvPath`, BasicDerivation (outputs `name, path, hashAlgo,
//!   hash`; inputSrcs; platform; builder; args; env pairs), options
//!   `maxSilentTime, buildTimeout, maxLogSize, nrRepeats, enforceDeterminism,
//!   keepFailed` → `status, errorMsg, timesBuilt, isNonDeterministic, startTime,
//!   stopTime, builtOutputs (map of strings)`.
//! - 9 AddToStoreNar: `path, deriver, narHash (base16), refs, registrationTime,
//!   narSize, ultimate, sigs, ca`, then exactly narSize NAR bytes → `1`.

use std::collections::BTreeSet;

use farm_nix::derivation::BasicDerivation;
use farm_nix::hash::Hash;
use farm_nix::nar::{NarLimits, NarSummary, copy_nar};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

const MAGIC_1: u64 = 0x390c_9deb;
const MAGIC_2: u64 = 0x5452_eecb;
/// Protocol 2.7, as Nix 2.8 … 2.34 speak it.
const VERSION: u64 = 0x207;
/// Longest string accepted from the server.
const MAX_STRING: u64 = 64 * 1024 * 1024;
/// Most elements accepted in a list.
const MAX_LIST: u64 = 1 << 20;

/// What went wrong talking to the local Nix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The pipe failed (usually: the process died).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something out of protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Build settings for `BuildDerivation`.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Seconds without output before Nix kills the build (0 = none).
    pub max_silent_time: u64,
    /// Seconds the build may take (0 = none).
    pub build_timeout: u64,
    /// Bytes of log before Nix kills the build (0 = none).
    pub max_log_size: u64,
}

/// The answer to `BuildDerivation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildResult {
    /// Nix's BuildResult status (0 Built … 12 NotDeterministic).
    pub status: u64,
    /// Nix's error message.
    pub error_msg: String,
    /// Unix seconds the build started (0 if unknown).
    pub start_time: u64,
    /// Unix seconds the build stopped (0 if unknown).
    pub stop_time: u64,
}

/// One serve protocol connection, after the handshake.
pub struct ServeClient<R, W> {
    r: BufReader<R>,
    w: BufWriter<W>,
    version: u64,
}

impl<R: AsyncRead + Unpin + Send, W: AsyncWrite + Unpin + Send> ServeClient<R, W> {
    /// Greet the server (`reader` is its stdout, `writer` its stdin).
    pub async fn connect(reader: R, writer: W) -> Result<Self, ServeError> {
        let mut c = ServeClient {
            r: BufReader::new(reader),
            w: BufWriter::new(writer),
            version: VERSION,
        };
        c.put_u64(MAGIC_1).await?;
        c.put_u64(VERSION).await?;
        c.w.flush().await?;
        let magic = c.get_u64().await?;
        if magic != MAGIC_2 {
            return Err(ServeError::Protocol(format!("bad server magic {magic:#x}")));
        }
        let server = c.get_u64().await?;
        if server & 0xff00 != 0x200 || (server & 0xff) < 6 {
            return Err(ServeError::Protocol(format!(
                "unsupported serve protocol version {server:#x}"
            )));
        }
        c.version = server.min(VERSION);
        Ok(c)
    }

    async fn put_u64(&mut self, v: u64) -> Result<(), ServeError> {
        self.w.write_all(&v.to_le_bytes()).await?;
        Ok(())
    }

    async fn put_str(&mut self, s: &str) -> Result<(), ServeError> {
        let len = s.len() as u64;
        self.put_u64(len).await?;
        self.w.write_all(s.as_bytes()).await?;
        let pad = (8 - s.len() % 8) % 8;
        self.w.write_all(&[0u8; 8][..pad]).await?;
        Ok(())
    }

    async fn put_strs<'a>(
        &mut self,
        items: impl ExactSizeIterator<Item = &'a str>,
    ) -> Result<(), ServeError> {
        self.put_u64(items.len() as u64).await?;
        for s in items {
            self.put_str(s).await?;
        }
        Ok(())
    }

    async fn put_paths(&mut self, paths: &BTreeSet<StorePath>) -> Result<(), ServeError> {
        let strings: Vec<String> = paths.iter().map(ToString::to_string).collect();
        self.put_strs(strings.iter().map(String::as_str)).await
    }

    async fn get_u64(&mut self) -> Result<u64, ServeError> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).await?;
        Ok(u64::from_le_bytes(b))
    }

    async fn get_str(&mut self) -> Result<String, ServeError> {
        let len = self.get_u64().await?;
        if len > MAX_STRING {
            return Err(ServeError::Protocol(format!("string of {len} bytes")));
        }
        let len =
            usize::try_from(len).map_err(|_| ServeError::Protocol("string too long".into()))?;
        let mut buf = vec![0u8; len];
        self.r.read_exact(&mut buf).await?;
        let mut pad = [0u8; 8];
        let pad = &mut pad[..(8 - len % 8) % 8];
        self.r.read_exact(pad).await?;
        if pad.iter().any(|&b| b != 0) {
            return Err(ServeError::Protocol("non-zero string padding".into()));
        }
        String::from_utf8(buf).map_err(|_| ServeError::Protocol("string is not UTF-8".into()))
    }

    async fn get_strs(&mut self) -> Result<Vec<String>, ServeError> {
        let n = self.get_u64().await?;
        if n > MAX_LIST {
            return Err(ServeError::Protocol(format!("list of {n} elements")));
        }
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.get_str().await?);
        }
        Ok(v)
    }

    async fn get_paths(&mut self) -> Result<BTreeSet<StorePath>, ServeError> {
        let v = self.get_strs().await?;
        v.iter()
            .map(|s| {
                StorePath::parse(s)
                    .map_err(|e| ServeError::Protocol(format!("store path {s:?}: {e}")))
            })
            .collect()
    }

    /// Which of `paths` the store holds.
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        self.put_u64(1).await?;
        self.put_u64(u64::from(lock)).await?;
        self.put_u64(u64::from(substitute)).await?;
        self.put_paths(paths).await?;
        self.w.flush().await?;
        self.get_paths().await
    }

    /// Infos of the valid ones among `paths` (registration time and `ultimate`
    /// are not carried by this protocol).
    pub async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<ValidPathInfo>, ServeError> {
        self.put_u64(2).await?;
        self.put_paths(paths).await?;
        self.w.flush().await?;
        let mut infos = Vec::new();
        loop {
            let path = self.get_str().await?;
            if path.is_empty() {
                return Ok(infos);
            }
            if infos.len() as u64 >= MAX_LIST {
                return Err(ServeError::Protocol("too many path infos".into()));
            }
            let path = StorePath::parse(&path)
                .map_err(|e| ServeError::Protocol(format!("store path {path:?}: {e}")))?;
            let deriver = self.get_str().await?;
            let deriver = if deriver.is_empty() {
                None
            } else {
                Some(
                    StorePath::parse(&deriver)
                        .map_err(|e| ServeError::Protocol(format!("deriver {deriver:?}: {e}")))?,
                )
            };
            let references = self.get_paths().await?;
            let _download_size = self.get_u64().await?;
            let nar_size = self.get_u64().await?;
            let hash = self.get_str().await?;
            let nar_hash = Hash::parse_any(&hash)
                .map_err(|e| ServeError::Protocol(format!("nar hash {hash:?}: {e}")))?;
            let ca = self.get_str().await?;
            let sigs = self.get_strs().await?;
            let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
            info.deriver = deriver;
            info.references = references;
            info.ca = (!ca.is_empty()).then_some(ca);
            info.sigs = sigs.into_iter().collect();
            infos.push(info);
        }
    }

    /// Add a path: `nar` must yield exactly `info.nar_size` bytes. Nix checks the
    /// NAR's hash and size against `info` before registering the path.
    pub async fn add_to_store_nar<N: AsyncRead + Unpin + ?Sized>(
        &mut self,
        info: &ValidPathInfo,
        nar: &mut N,
    ) -> Result<(), ServeError> {
        self.put_u64(9).await?;
        self.put_str(&info.path.to_string()).await?;
        let deriver = info
            .deriver
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        self.put_str(&deriver).await?;
        self.put_str(&info.nar_hash.to_base16()).await?;
        self.put_paths(&info.references).await?;
        self.put_u64(info.registration_time).await?;
        self.put_u64(info.nar_size).await?;
        self.put_u64(u64::from(info.ultimate)).await?;
        self.put_strs(info.sigs.iter().map(String::as_str)).await?;
        self.put_str(info.ca.as_deref().unwrap_or("")).await?;
        let mut take = nar.take(info.nar_size);
        let n = tokio::io::copy(&mut take, &mut self.w).await?;
        if n != info.nar_size {
            return Err(ServeError::Protocol(format!(
                "NAR of {} has {n} bytes, info says {}",
                info.path, info.nar_size
            )));
        }
        self.w.flush().await?;
        match self.get_u64().await? {
            1 => Ok(()),
            v => Err(ServeError::Protocol(format!(
                "expected success (1), got {v}"
            ))),
        }
    }

    /// Stream the NAR of `path` into `out` (validated while it passes: the end of
    /// a NAR is only found by parsing it).
    pub async fn dump_store_path<O: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        path: &StorePath,
        out: &mut O,
    ) -> Result<NarSummary, ServeError> {
        self.put_u64(3).await?;
        self.put_str(&path.to_string()).await?;
        self.w.flush().await?;
        let mut out = out;
        copy_nar(&mut self.r, &mut out, &NarLimits::default())
            .await
            .map_err(|e| ServeError::Protocol(format!("NAR of {path}: {e}")))
    }

    /// Build a derivation whose inputs (all of `drv.input_srcs`) the store holds.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, ServeError> {
        self.put_u64(8).await?;
        self.put_str(&drv_path.to_string()).await?;
        self.put_u64(drv.outputs.len() as u64).await?;
        for (name, out) in &drv.outputs {
            self.put_str(name).await?;
            let path = out
                .path
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            self.put_str(&path).await?;
            self.put_str(&out.hash_algo).await?;
            self.put_str(&out.hash).await?;
        }
        self.put_paths(&drv.input_srcs).await?;
        self.put_str(&drv.platform).await?;
        self.put_str(&drv.builder).await?;
        self.put_strs(drv.args.iter().map(String::as_str)).await?;
        self.put_u64(drv.env.len() as u64).await?;
        for (k, v) in &drv.env {
            self.put_str(k).await?;
            self.put_str(v).await?;
        }
        self.put_u64(options.max_silent_time).await?;
        self.put_u64(options.build_timeout).await?;
        self.put_u64(options.max_log_size).await?;
        self.put_u64(0).await?; // buildRepeat: extra rounds, 0 = build once
        self.put_u64(0).await?; // enforceDeterminism
        if self.version & 0xff >= 7 {
            self.put_u64(0).await?; // keepFailed
        }
        self.w.flush().await?;

        let status = self.get_u64().await?;
        let error_msg = self.get_str().await?;
        let _times_built = self.get_u64().await?;
        let _non_deterministic = self.get_u64().await?;
        let start_time = self.get_u64().await?;
        let stop_time = self.get_u64().await?;
        let n = self.get_u64().await?;
        if n > MAX_LIST {
            return Err(ServeError::Protocol(format!("{n} built outputs")));
        }
        for _ in 0..n {
            let _id = self.get_str().await?;
            let _realisation = self.get_str().await?;
        }
        Ok(BuildResult {
            status,
            error_msg,
            start_time,
            stop_time,
        })
    }
}
