//! Fuzzes the worker protocol's server side with a client→server byte stream
//! as captured (`proto/nix/testdata/captures/worker-*.c2s`: handshake, then
//! operations).
//!
//! 1. The request decoder (`WorkerRequest::read`) at the client's version
//!    (clamped to 1.34 … 1.38, so every version gate is reached), after the
//!    rest of the client handshake: every request it accepts must re-encode to
//!    bytes that decode to the same request, with no byte left over. The framed
//!    data after `AddToStore`, `AddToStoreNar` and `AddMultipleToStore` is
//!    skipped as the server would.
//! 2. The whole server loop (`run_server_with_config`, announcing 1.38) over an
//!    in-memory store, after a valid magic and the (clamped) version: any
//!    outcome but a panic or a hang.
#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use farm_nix::HashAlgo;
use farm_nix::derivation::BasicDerivation;
use farm_nix::nar::nar_of_bytes;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;
use farm_nix::wire::{
    BuildResult, BuildStatus, DerivedPath, FramedReader, HandlerError, Limits, ProtocolVersion,
    read_strings, read_u64,
};
use farm_nix::worker::{
    BuildMode, Logger, Missing, WORKER_MAGIC_1, WorkerConfig, WorkerHandler, WorkerRequest,
    feature, run_server_with_config,
};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

/// Limits small enough that the fuzzer reaches them.
const TIGHT: Limits = Limits {
    max_string: 4096,
    max_list: 64,
    max_frame: 4096,
    max_message_bytes: 16384,
    max_message_items: 256,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    });
    let client_version = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    let minor = ProtocolVersion::from_wire(client_version).minor();
    let version = ProtocolVersion::new(1, minor.clamp(34, 38));
    let rest = &data[16..];
    rt.block_on(async {
        decode_all(rest, version, &TIGHT).await;
        decode_all(rest, version, &Limits::default()).await;
        serve(rest, version).await;
    });
});

/// Read the rest of the client handshake, then decode requests one after
/// another until the end or the first error.
async fn decode_all(mut input: &[u8], version: ProtocolVersion, limits: &Limits) {
    if client_handshake(&mut input, version, limits)
        .await
        .is_none()
    {
        return;
    }
    while let Ok(Some(req)) = WorkerRequest::read(&mut input, version, limits).await {
        let mut bytes = Vec::new();
        req.write(&mut bytes, version).await.expect("encode");
        let mut again = &bytes[..];
        let back = WorkerRequest::read(&mut again, version, limits)
            .await
            .expect("re-encoded request decodes");
        assert_eq!(back.as_ref(), Some(&req), "request changed in a round trip");
        assert!(
            again.is_empty(),
            "{} bytes left after a request",
            again.len()
        );
        if req.has_framed_data() {
            let mut framed = FramedReader::new(&mut input, limits.max_frame);
            if framed.drain().await.is_err() {
                break;
            }
        }
    }
}

/// What the client sends after magic and version: (≥ 1.38) features,
/// (≥ 1.14) CPU affinity, (≥ 1.11) reserveSpace.
async fn client_handshake(
    input: &mut &[u8],
    version: ProtocolVersion,
    limits: &Limits,
) -> Option<()> {
    if version.supports(feature::FEATURE_EXCHANGE) {
        read_strings(input, limits).await.ok()?;
    }
    if read_u64(input).await.ok()? != 0 {
        read_u64(input).await.ok()?;
    }
    read_u64(input).await.ok()?;
    Some(())
}

/// Run the server loop after a valid magic and `version`.
async fn serve(rest: &[u8], version: ProtocolVersion) {
    let mut input = WORKER_MAGIC_1.to_le_bytes().to_vec();
    input.extend_from_slice(&version.to_wire().to_le_bytes());
    input.extend_from_slice(rest);
    let config = WorkerConfig {
        version: ProtocolVersion::new(1, 38),
        limits: TIGHT,
        ..WorkerConfig::default()
    };
    let mut store = MemStore::default();
    let _ = run_server_with_config(&input[..], tokio::io::sink(), &mut store, &config).await;
}

/// An in-memory store that keeps what it is sent and builds by writing a file.
#[derive(Default)]
struct MemStore {
    paths: HashMap<StorePath, (ValidPathInfo, Vec<u8>)>,
}

impl MemStore {
    async fn build(&mut self, drv: &BasicDerivation, log: &mut Logger<'_>) -> BuildResult {
        let _ = log.build_log_line(1, "building").await;
        let mut res = BuildResult::new(BuildStatus::Built, "");
        for (name, out) in &drv.outputs {
            let Some(path) = out.path.clone() else {
                return BuildResult::new(BuildStatus::MiscFailure, "output without a path");
            };
            let contents = drv
                .env
                .get(b"text".as_slice())
                .map(|v| v.as_bytes())
                .unwrap_or(b"");
            let nar = nar_of_bytes(contents);
            let mut info = ValidPathInfo::new(
                path.clone(),
                HashAlgo::Sha256.digest(&nar),
                nar.len() as u64,
            );
            info.references = drv.input_srcs.clone();
            self.paths.insert(path.clone(), (info, nar));
            res.add_built_output(name, &path);
        }
        res
    }
}

impl WorkerHandler for MemStore {
    async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, HandlerError> {
        Ok(self.paths.get(path).map(|(i, _)| i.clone()))
    }

    async fn nar_from_path(
        &mut self,
        path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<(), HandlerError> {
        let (_, nar) = self
            .paths
            .get(path)
            .ok_or_else(|| HandlerError::new(format!("path '{path}' is not valid")))?;
        out.write_all(nar).await.map_err(HandlerError::new)
    }

    async fn add_to_store_nar(
        &mut self,
        info: ValidPathInfo,
        _repair: bool,
        _dont_check_sigs: bool,
        nar: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<(), HandlerError> {
        let mut data = Vec::new();
        nar.read_to_end(&mut data)
            .await
            .map_err(HandlerError::new)?;
        if HashAlgo::Sha256.digest(&data) != info.nar_hash {
            return Err(HandlerError::new("hash mismatch"));
        }
        self.paths.insert(info.path.clone(), (info, data));
        Ok(())
    }

    async fn build_derivation(
        &mut self,
        _drv_path: &StorePath,
        drv: BasicDerivation,
        _mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> Result<BuildResult, HandlerError> {
        Ok(self.build(&drv, log).await)
    }

    async fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        _mode: BuildMode,
        _log: &mut Logger<'_>,
    ) -> Result<Vec<BuildResult>, HandlerError> {
        Ok(paths
            .iter()
            .map(|_| BuildResult::new(BuildStatus::MiscFailure, "cannot build here"))
            .collect())
    }

    async fn query_missing(&mut self, paths: &[DerivedPath]) -> Result<Missing, HandlerError> {
        let _ = paths;
        Ok(Missing::default())
    }

    async fn query_derivation_output_map(
        &mut self,
        drv_path: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>, HandlerError> {
        Ok(BTreeMap::from([(
            "out".to_string(),
            self.paths.contains_key(drv_path).then(|| drv_path.clone()),
        )]))
    }

    async fn query_referrers(
        &mut self,
        path: &StorePath,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        Ok(self
            .paths
            .values()
            .filter(|(i, _)| i.references.contains(path))
            .map(|(i, _)| i.path.clone())
            .collect())
    }

    async fn add_to_store(
        &mut self,
        name: &str,
        _cam: &str,
        references: &BTreeSet<StorePath>,
        _repair: bool,
        dump: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<ValidPathInfo, HandlerError> {
        let mut data = Vec::new();
        dump.take(1 << 16)
            .read_to_end(&mut data)
            .await
            .map_err(HandlerError::new)?;
        let hash = HashAlgo::Sha256.digest(&data);
        let path = StorePath::make("source", &hash, name).map_err(HandlerError::new)?;
        let mut info = ValidPathInfo::new(path, hash, data.len() as u64);
        info.references = references.clone();
        Ok(info)
    }

    async fn add_signatures(
        &mut self,
        path: &StorePath,
        sigs: &BTreeSet<String>,
    ) -> Result<(), HandlerError> {
        match self.paths.get_mut(path) {
            Some((info, _)) => {
                info.sigs.extend(sigs.iter().cloned());
                Ok(())
            }
            None => Err(HandlerError::new(format!("path '{path}' is not valid"))),
        }
    }
}
