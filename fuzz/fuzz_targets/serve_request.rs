//! Fuzzes the serve protocol's server side with a client→server byte stream as
//! captured (`proto/nix/testdata/captures/serve-*.c2s`: handshake, then requests).
//!
//! 1. The request decoder (`ServeRequest::read`) at the client's version
//!    (clamped to 2.0 … 2.7, so every version gate is reached): every request it
//!    accepts must re-encode to bytes that decode to the same request, with no
//!    byte left over. The bulk data after `AddToStoreNar` (a NAR) and
//!    `ImportPaths` (an export stream) is skipped as the server would.
//! 2. The whole server loop (`run_server_with_config`) over an in-memory store,
//!    after a valid handshake at the (clamped) version: any outcome but a panic
//!    or a hang.
#![no_main]

use std::collections::{BTreeSet, HashMap};

use farm_nix::HashAlgo;
use farm_nix::derivation::BasicDerivation;
use farm_nix::nar::{NarLimits, copy_nar, nar_of_bytes};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::serve::{
    BuildOptions, MIN_SERVE_VERSION, SERVE_MAGIC_1, ServeConfig, ServeHandler, ServeRequest,
    copy_export_stream, run_server_with_config,
};
use farm_nix::store_path::StorePath;
use farm_nix::wire::{BuildResult, BuildStatus, HandlerError, Limits, ProtocolVersion};
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
    let version = ProtocolVersion::new(2, minor.min(7));
    let requests = &data[16..];
    rt.block_on(async {
        decode_all(requests, version, &TIGHT).await;
        decode_all(requests, version, &Limits::default()).await;
        serve(requests, version.max(MIN_SERVE_VERSION)).await;
    });
});

/// Decode requests one after another until the end or the first error.
async fn decode_all(mut input: &[u8], version: ProtocolVersion, limits: &Limits) {
    while let Ok(Some(req)) = ServeRequest::read(&mut input, version, limits).await {
        let mut bytes = Vec::new();
        req.write(&mut bytes, version).await.expect("encode");
        let mut again = &bytes[..];
        let back = ServeRequest::read(&mut again, version, limits)
            .await
            .expect("re-encoded request decodes");
        assert_eq!(back.as_ref(), Some(&req), "request changed in a round trip");
        assert!(
            again.is_empty(),
            "{} bytes left after a request",
            again.len()
        );
        let skipped = match req {
            ServeRequest::AddToStoreNar { info } => {
                let mut nar = (&mut input).take(info.nar_size);
                copy_nar(&mut nar, &mut tokio::io::sink(), &NarLimits::default())
                    .await
                    .is_ok()
            }
            ServeRequest::ImportPaths => copy_export_stream(
                &mut input,
                &mut tokio::io::sink(),
                limits,
                &NarLimits::default(),
            )
            .await
            .is_ok(),
            _ => true,
        };
        if !skipped {
            break;
        }
    }
}

/// Run the server loop on the requests after a valid handshake at `version`.
async fn serve(requests: &[u8], version: ProtocolVersion) {
    let mut input = SERVE_MAGIC_1.to_le_bytes().to_vec();
    input.extend_from_slice(&version.to_wire().to_le_bytes());
    input.extend_from_slice(requests);
    let config = ServeConfig {
        limits: TIGHT,
        ..ServeConfig::default()
    };
    let mut store = MemStore::default();
    let _ = run_server_with_config(&input[..], tokio::io::sink(), &mut store, &config).await;
}

/// An in-memory store that keeps what it is sent and builds by writing a file.
#[derive(Default)]
struct MemStore {
    paths: HashMap<StorePath, (ValidPathInfo, Vec<u8>)>,
}

impl ServeHandler for MemStore {
    async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        _lock: bool,
        _substitute: bool,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        Ok(paths
            .iter()
            .filter(|p| self.paths.contains_key(p))
            .cloned()
            .collect())
    }

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
            .ok_or_else(|| HandlerError::new(format!("{path} is not valid")))?;
        out.write_all(nar).await.map_err(HandlerError::new)
    }

    async fn add_to_store_nar(
        &mut self,
        info: ValidPathInfo,
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
        _options: &BuildOptions,
    ) -> Result<BuildResult, HandlerError> {
        let mut res = BuildResult::new(BuildStatus::Built, "");
        for (name, out) in &drv.outputs {
            let Some(path) = out.path.clone() else {
                return Ok(BuildResult::new(
                    BuildStatus::MiscFailure,
                    "output without a path",
                ));
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
        Ok(res)
    }

    async fn import_paths(
        &mut self,
        stream: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<(), HandlerError> {
        tokio::io::copy(stream, &mut tokio::io::sink())
            .await
            .map_err(HandlerError::new)?;
        Ok(())
    }

    async fn export_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<(), HandlerError> {
        for p in paths {
            self.nar_from_path(p, out).await?;
        }
        Ok(())
    }

    async fn build_paths(
        &mut self,
        paths: &[String],
        _options: &BuildOptions,
    ) -> Result<(), HandlerError> {
        match paths.first() {
            Some(p) => Err(HandlerError::new(format!("cannot build {p}"))),
            None => Ok(()),
        }
    }
}
