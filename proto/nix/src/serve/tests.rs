//! Serve protocol tests: codec round trips, captures of real Nix 2.8 decoded
//! and re-encoded byte for byte, the captures replayed against our server,
//! malformed input, and our client against our server and a real `nix-store --serve`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::captures::{captures, check_captured_basic_derivation, instantiate_capture_drv};
use crate::derivation::BasicDerivation;
use crate::hash::HashAlgo;
use crate::wire::test_support::*;
use crate::wire::{BuildStatus, HandlerError, ProtocolVersion};
use farm_testkit::Actor;

/// Serve protocol version `2.minor`.
fn v2(minor: u8) -> ProtocolVersion {
    ProtocolVersion::new(2, minor)
}

/// One request of a capture with its reply, decoded, and the exact bytes of each.
struct Exchange {
    req: ServeRequest,
    /// The NAR or export stream following the request, if any.
    payload: Vec<u8>,
    req_bytes: Vec<u8>,
    reply: ServeReply,
    reply_bytes: Vec<u8>,
}

struct Capture {
    name: String,
    handshake_c2s: Vec<u8>,
    handshake_s2c: Vec<u8>,
    client_version: ProtocolVersion,
    server_version: ProtocolVersion,
    exchanges: Vec<Exchange>,
}

async fn parse_capture(name: &str, c2s: &[u8], s2c: &[u8]) -> Capture {
    let lim = Limits::default();
    let (mut c, mut s) = (c2s, s2c);
    wire::expect_u64(&mut c, SERVE_MAGIC_1).await.unwrap();
    let client_version = ProtocolVersion::from_wire(read_u64(&mut c).await.unwrap());
    wire::expect_u64(&mut s, SERVE_MAGIC_2).await.unwrap();
    let server_version = ProtocolVersion::from_wire(read_u64(&mut s).await.unwrap());
    let version = client_version.min(server_version);
    let mut exchanges = Vec::new();
    loop {
        let (c0, s0) = (c.len(), s.len());
        let Some(req) = ServeRequest::read(&mut c, version, &lim).await.unwrap() else {
            break;
        };
        let mut payload = Vec::new();
        match &req {
            ServeRequest::AddToStoreNar { info } => {
                let n = info.nar_size as usize;
                payload = c[..n].to_vec();
                c = &c[n..];
            }
            ServeRequest::ImportPaths => {
                copy_export_stream(&mut c, &mut payload, &lim, &NarLimits::default())
                    .await
                    .unwrap();
            }
            _ => {}
        }
        let req_bytes = c2s[c2s.len() - c0..c2s.len() - c.len()].to_vec();
        let reply = ServeReply::read(&mut s, &req, version, &lim)
            .await
            .unwrap_or_else(|e| panic!("{name}: reply to {:?}: {e}", req.command()));
        let reply_bytes = s2c[s2c.len() - s0..s2c.len() - s.len()].to_vec();
        exchanges.push(Exchange {
            req,
            payload,
            req_bytes,
            reply,
            reply_bytes,
        });
    }
    assert!(s.is_empty(), "{name}: {} bytes of reply left over", s.len());
    Capture {
        name: name.to_owned(),
        handshake_c2s: c2s[..16].to_vec(),
        handshake_s2c: s2c[..16].to_vec(),
        client_version,
        server_version,
        exchanges,
    }
}

async fn all_captures() -> Vec<Capture> {
    let mut out = Vec::new();
    for (name, c2s, s2c) in captures("serve-") {
        out.push(parse_capture(&name, &c2s, &s2c).await);
    }
    out
}

#[test]
fn captures_decode_and_reencode_byte_identically() {
    rt().block_on(async {
        let caps = all_captures().await;
        let mut seen = BTreeSet::new();
        for cap in &caps {
            assert_eq!(cap.client_version, v2(7), "{}", cap.name);
            assert_eq!(cap.server_version, v2(7), "{}", cap.name);
            let version = cap.client_version.min(cap.server_version);
            for ex in &cap.exchanges {
                seen.insert(format!("{:?}", ex.req.command()));
                let mut out = Vec::new();
                ex.req.write(&mut out, version).await.unwrap();
                out.extend_from_slice(&ex.payload);
                assert_eq!(out, ex.req_bytes, "{}: {:?}", cap.name, ex.req.command());
                let mut out = Vec::new();
                ex.reply.write(&mut out, version).await.unwrap();
                assert_eq!(
                    out,
                    ex.reply_bytes,
                    "{}: reply to {:?}",
                    cap.name,
                    ex.req.command()
                );
            }
        }
        if std::env::var_os("PRINT_CAPTURE_OPS").is_some() {
            for cap in &caps {
                let ops: Vec<String> = cap
                    .exchanges
                    .iter()
                    .map(|e| format!("{:?}", e.req.command()))
                    .collect();
                println!("{}: {}", cap.name, ops.join(", "));
            }
        }
        // What Nix 2.8's build hook, `nix copy` and `nix store ping` send over ssh://.
        for cmd in [
            "QueryValidPaths",
            "QueryPathInfos",
            "AddToStoreNar",
            "BuildDerivation",
            "DumpStorePath",
        ] {
            assert!(seen.contains(cmd), "no {cmd} in the captures: {seen:?}");
        }
    });
}

/// The `BasicDerivation`s Nix 2.8's build hook sent (captured bytes) are
/// the `.drv` files `nix-instantiate` writes for the same expression, as
/// `Derivation::to_basic` makes them, with the outputs of the input
/// derivations added to the input sources (what the hook sends); and they
/// encode back to the captured bytes.
#[test]
fn captured_basic_derivations_match_the_drv_files() {
    rt().block_on(async {
        let store = Actor::new("serve").expect("a private store");
        instantiate_capture_drv(&store, "serve-hook");
        let mut checked = 0;
        for cap in all_captures().await {
            for ex in &cap.exchanges {
                let ServeRequest::BuildDerivation { drv_path, drv, .. } = &ex.req else {
                    continue;
                };
                check_captured_basic_derivation(
                    &store,
                    ServeCommand::BuildDerivation as u64,
                    &ex.req_bytes,
                    drv_path,
                    drv,
                )
                .await;
                checked += 1;
            }
        }
        assert_eq!(checked, 2, "capdep and capture-test");
    });
}

type Added = (ValidPathInfo, Vec<u8>);

/// Answers each request with the reply the real `nix-store --serve` gave
/// (set through `current` before the request is sent).
#[derive(Clone, Default)]
struct Scripted {
    current: Arc<Mutex<Option<ServeReply>>>,
    added: Arc<Mutex<Vec<Added>>>,
}

impl Scripted {
    fn reply(&self) -> ServeReply {
        self.current
            .lock()
            .unwrap()
            .clone()
            .expect("a scripted reply")
    }
}

impl ServeHandler for Scripted {
    async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        _lock: bool,
        _substitute: bool,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        match self.reply() {
            ServeReply::Paths(p) => {
                assert!(p.is_subset(paths));
                Ok(p)
            }
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, HandlerError> {
        match self.reply() {
            ServeReply::PathInfos(infos) => Ok(infos.into_iter().find(|i| &i.path == path)),
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn nar_from_path(
        &mut self,
        _path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<(), HandlerError> {
        match self.reply() {
            ServeReply::Nar(nar) => out.write_all(&nar).await.map_err(HandlerError::new),
            r => panic!("unexpected {r:?}"),
        }
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
        self.added.lock().unwrap().push((info, data));
        Ok(())
    }

    async fn build_derivation(
        &mut self,
        _drv_path: &StorePath,
        _drv: BasicDerivation,
        _options: &BuildOptions,
    ) -> Result<BuildResult, HandlerError> {
        match self.reply() {
            ServeReply::Build(b) => Ok(b),
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn query_closure(
        &mut self,
        _paths: &BTreeSet<StorePath>,
        _include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        match self.reply() {
            ServeReply::Paths(p) => Ok(p),
            r => panic!("unexpected {r:?}"),
        }
    }
}

#[test]
fn captures_replayed_against_our_server_give_the_same_bytes() {
    rt().block_on(async {
        for cap in all_captures().await {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (sr, sw) = tokio::io::split(server);
            let mut handler = Scripted::default();
            let h2 = handler.clone();
            let task = tokio::spawn(async move { run_server(sr, sw, &mut handler).await });
            let (mut cr, mut cw) = tokio::io::split(client);
            cw.write_all(&cap.handshake_c2s).await.unwrap();
            let mut got = vec![0u8; 16];
            cr.read_exact(&mut got).await.unwrap();
            assert_eq!(got, cap.handshake_s2c, "{}: handshake", cap.name);
            for ex in &cap.exchanges {
                *h2.current.lock().unwrap() = Some(ex.reply.clone());
                cw.write_all(&ex.req_bytes).await.unwrap();
                let mut got = vec![0u8; ex.reply_bytes.len()];
                tokio::time::timeout(std::time::Duration::from_secs(10), cr.read_exact(&mut got))
                    .await
                    .unwrap_or_else(|_| panic!("{}: no full reply to {:?}", cap.name, ex.req))
                    .unwrap();
                assert_eq!(got, ex.reply_bytes, "{}: {:?}", cap.name, ex.req.command());
            }
            cw.shutdown().await.unwrap();
            task.await.unwrap().unwrap();
            // What the client uploaded reached the handler intact.
            for (info, nar) in h2.added.lock().unwrap().iter() {
                assert_eq!(HashAlgo::Sha256.digest(nar), info.nar_hash);
            }
        }
    });
}

fn arb_request() -> impl Strategy<Value = ServeRequest> {
    let opts =
        any::<(u64, u64, u64, u64, bool, bool)>().prop_map(|(a, b, c, d, e, f)| BuildOptions {
            max_silent_time: a,
            build_timeout: b,
            max_log_size: c,
            nr_repeats: d,
            enforce_determinism: e,
            keep_failed: f,
        });
    prop_oneof![
        (any::<bool>(), any::<bool>(), arb_paths()).prop_map(|(lock, substitute, paths)| {
            ServeRequest::QueryValidPaths {
                lock,
                substitute,
                paths,
            }
        }),
        arb_paths().prop_map(|paths| ServeRequest::QueryPathInfos { paths }),
        arb_store_path().prop_map(|path| ServeRequest::DumpStorePath { path }),
        Just(ServeRequest::ImportPaths),
        arb_paths().prop_map(|paths| ServeRequest::ExportPaths { paths }),
        (
            proptest::collection::vec("[a-z!,]{0,10}", 0..3),
            opts.clone()
        )
            .prop_map(|(paths, options)| ServeRequest::BuildPaths { paths, options }),
        (any::<bool>(), arb_paths()).prop_map(|(include_outputs, paths)| {
            ServeRequest::QueryClosure {
                include_outputs,
                paths,
            }
        }),
        (arb_basic_derivation(), opts).prop_map(|((drv_path, drv), options)| {
            ServeRequest::BuildDerivation {
                drv_path,
                drv,
                options,
            }
        }),
        arb_path_info().prop_map(|mut info| {
            info.nar_size = info.nar_size.max(1);
            ServeRequest::AddToStoreNar { info }
        }),
    ]
}

proptest! {
    #[test]
    fn request_roundtrip(req in arb_request(), v in (MIN_SERVE_VERSION.minor()..=SERVE_PROTOCOL_VERSION.minor()).prop_map(v2)) {
        // Before 2.7 `keepFailed` is not sent, so it reads back as false.
        let mut want = req.clone();
        if !v.supports(feature::KEEP_FAILED)
            && let ServeRequest::BuildPaths { options, .. }
            | ServeRequest::BuildDerivation { options, .. } = &mut want
        {
            options.keep_failed = false;
        }
        rt().block_on(async {
            let mut out = Vec::new();
            req.write(&mut out, v).await.unwrap();
            let mut r = &out[..];
            let back = ServeRequest::read(&mut r, v, &Limits::default()).await.unwrap();
            prop_assert_eq!(back, Some(want));
            prop_assert!(r.is_empty());
            Ok(())
        })?;
    }

    #[test]
    fn reply_roundtrip(
        paths in arb_paths(),
        infos in proptest::collection::vec(arb_path_info(), 0..3),
        res in arb_build_result(build_result_fields(SERVE_PROTOCOL_VERSION)),
        msg in ".{0,10}",
    ) {
        let v = SERVE_PROTOCOL_VERSION;
        // The serve protocol carries neither registration time nor `ultimate`.
        let infos: Vec<ValidPathInfo> = infos.into_iter().map(|mut i| { i.registration_time = 0; i.ultimate = false; i }).collect();
        let p0 = StorePath::parse("/nix/store/00000000000000000000000000000000-p0").unwrap();
        let cases = vec![
            (ServeRequest::QueryValidPaths { lock: false, substitute: false, paths: paths.clone() }, ServeReply::Paths(paths)),
            (ServeRequest::QueryPathInfos { paths: BTreeSet::new() }, ServeReply::PathInfos(infos)),
            (ServeRequest::DumpStorePath { path: p0 }, ServeReply::Nar(nar_of_bytes(msg.as_bytes()))),
            (ServeRequest::ImportPaths, ServeReply::Success),
            (ServeRequest::BuildPaths { paths: vec![], options: BuildOptions::default() }, ServeReply::BuildPaths { status: 0, message: String::new() }),
            (ServeRequest::BuildPaths { paths: vec![], options: BuildOptions::default() }, ServeReply::BuildPaths { status: 1, message: msg.clone() }),
            (ServeRequest::ExportPaths { paths: BTreeSet::new() }, ServeReply::Export(0u64.to_le_bytes().to_vec())),
        ];
        rt().block_on(async {
            for (req, reply) in cases.into_iter().chain([(ServeRequest::BuildDerivation { drv_path: StorePath::parse("/nix/store/00000000000000000000000000000000-x.drv").unwrap(), drv: BasicDerivation::default(), options: BuildOptions::default() }, ServeReply::Build(res))]) {
                let mut out = Vec::new();
                reply.write(&mut out, v).await.unwrap();
                let mut r = &out[..];
                prop_assert_eq!(ServeReply::read(&mut r, &req, v, &Limits::default()).await.unwrap(), reply);
                prop_assert!(r.is_empty());
            }
            Ok(())
        })?;
    }
}

#[test]
fn build_options_follow_the_version() {
    rt().block_on(async {
        let o = BuildOptions {
            max_silent_time: 1,
            build_timeout: 2,
            max_log_size: 3,
            nr_repeats: 4,
            enforce_determinism: true,
            keep_failed: true,
        };
        for (v, len) in [
            (v2(1), 16),
            (v2(2), 24),
            (v2(3), 40),
            (v2(6), 40),
            (v2(7), 48),
        ] {
            let mut out = Vec::new();
            o.write(&mut out, v).await.unwrap();
            assert_eq!(out.len(), len, "{v}");
            let back = BuildOptions::read(&mut &out[..], v).await.unwrap();
            assert_eq!(back.build_timeout, 2);
        }
    });
}

/// An in-memory store: what a handler for real looks like, and the other end
/// of the client tests.
#[derive(Default)]
struct MemStore {
    paths: MemPaths,
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
            .filter(|p| self.paths.contains(p))
            .cloned()
            .collect())
    }

    async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, HandlerError> {
        Ok(self.paths.info(path))
    }

    async fn nar_from_path(
        &mut self,
        path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<(), HandlerError> {
        self.paths.write_nar(path, out).await
    }

    async fn add_to_store_nar(
        &mut self,
        info: ValidPathInfo,
        nar: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<(), HandlerError> {
        self.paths.add(info, nar).await
    }

    async fn build_derivation(
        &mut self,
        _drv_path: &StorePath,
        drv: BasicDerivation,
        _options: &BuildOptions,
    ) -> Result<BuildResult, HandlerError> {
        Ok(self.paths.build(&drv))
    }
}

#[test]
fn our_client_against_our_server() {
    rt().block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let task = tokio::spawn(async move {
            let mut store = MemStore::default();
            run_server(sr, sw, &mut store).await.map(|()| store)
        });
        let (cr, cw) = tokio::io::split(client);
        let mut c = ServeClient::connect(cr, cw).await.unwrap();
        assert_eq!(c.version(), SERVE_PROTOCOL_VERSION);
        let src = test_path("src");
        let nar = nar_of_bytes(b"input\n");
        let info = info_for_nar(&src, &nar);
        let set = BTreeSet::from([src.clone()]);
        assert!(
            c.query_valid_paths(&set, false, false)
                .await
                .unwrap()
                .is_empty()
        );
        c.add_to_store_nar(&info, &mut &nar[..]).await.unwrap();
        assert_eq!(c.query_valid_paths(&set, true, false).await.unwrap(), set);
        assert_eq!(c.query_path_infos(&set).await.unwrap(), vec![info.clone()]);
        assert_eq!(c.query_closure(&set, false).await.unwrap(), set);
        let out = test_path("out");
        let (drv_path, drv) = test_drv(&src, &out, "hello");
        let res = c
            .build_derivation(&drv_path, &drv, &BuildOptions::default())
            .await
            .unwrap();
        assert_eq!(res.status, BuildStatus::Built);
        assert_eq!(res.output_paths().get("out"), Some(&out));
        let mut got = Vec::new();
        let summary = c.dump_store_path(&out, &mut got).await.unwrap();
        assert_eq!(got, nar_of_bytes(b"hello"));
        assert_eq!(summary.nar_size, got.len() as u64);
        drop(c);
        let store = task.await.unwrap().unwrap();
        assert_eq!(store.paths.len(), 2);
    });
}

/// Run our server on `input`, returning its result (never panicking).
async fn serve_bytes(input: Vec<u8>) -> Result<(), ServeError> {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let (sr, sw) = tokio::io::split(server);
    let task = tokio::spawn(async move {
        let mut store = MemStore::default();
        run_server(sr, sw, &mut store).await
    });
    client.write_all(&input).await.unwrap();
    client.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = client.read_to_end(&mut sink).await;
    task.await.expect("server task must not panic")
}

fn handshake() -> Vec<u8> {
    let mut v = SERVE_MAGIC_1.to_le_bytes().to_vec();
    v.extend_from_slice(&0x207u64.to_le_bytes());
    v
}

#[test]
fn malformed_input_closes_the_connection_with_an_error() {
    rt().block_on(async {
        // Wrong magic.
        let e = serve_bytes(42u64.to_le_bytes().to_vec()).await.unwrap_err();
        assert!(
            matches!(e, ServeError::Wire(WireError::BadMagic { .. })),
            "{e}"
        );
        // Too old a client.
        let mut v = SERVE_MAGIC_1.to_le_bytes().to_vec();
        v.extend_from_slice(&0x203u64.to_le_bytes());
        let e = serve_bytes(v).await.unwrap_err();
        assert!(
            matches!(e, ServeError::Wire(WireError::UnsupportedVersion(0x203))),
            "{e}"
        );
        // Unknown command.
        let mut v = handshake();
        v.extend_from_slice(&99u64.to_le_bytes());
        let e = serve_bytes(v).await.unwrap_err();
        assert!(
            matches!(e, ServeError::Wire(WireError::UnknownOp { op: 99, .. })),
            "{e}"
        );
        // A path set claiming 2^60 elements.
        let mut v = handshake();
        v.extend_from_slice(&2u64.to_le_bytes());
        v.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let e = serve_bytes(v).await.unwrap_err();
        assert!(
            matches!(e, ServeError::Wire(WireError::TooLong { .. })),
            "{e}"
        );
        // Truncated in the middle of a request.
        let mut v = handshake();
        v.extend_from_slice(&1u64.to_le_bytes());
        v.extend_from_slice(&[0, 0, 0]);
        let e = serve_bytes(v).await.unwrap_err();
        assert!(e.to_string().contains("end of stream"), "{e}");
        // AddToStoreNar whose bytes are not a NAR.
        let p = test_path("bad");
        let mut info = info_for_nar(&p, &[0u8; 64]);
        info.nar_size = 64;
        let mut v = handshake();
        ServeRequest::AddToStoreNar { info }
            .write(&mut v, SERVE_PROTOCOL_VERSION)
            .await
            .unwrap();
        v.extend_from_slice(&[7u8; 64]);
        let e = serve_bytes(v).await.unwrap_err();
        assert!(matches!(e, ServeError::Nar(_)), "{e}");
        // AddToStoreNar whose NAR does not match its hash.
        let nar = nar_of_bytes(b"x");
        let mut info = info_for_nar(&p, &nar);
        info.nar_hash = HashAlgo::Sha256.digest(b"other");
        let mut v = handshake();
        ServeRequest::AddToStoreNar { info }
            .write(&mut v, SERVE_PROTOCOL_VERSION)
            .await
            .unwrap();
        v.extend_from_slice(&nar);
        let e = serve_bytes(v).await.unwrap_err();
        assert!(
            matches!(e, ServeError::NarMismatch(_) | ServeError::Handler(_)),
            "{e}"
        );
        // A clean close right after the handshake is fine.
        serve_bytes(handshake()).await.unwrap();
    });
}

/// Our client drives a real `nix-store --serve --write` in a private store.
#[test]
fn our_client_against_real_nix_store_serve() {
    rt().block_on(async {
        let store = Actor::new("serve").expect("a private store");
        let mut child = store
            .tokio_command("nix-store")
            .args(["--serve", "--write"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut c = ServeClient::connect(stdout, stdin).await.unwrap();
        assert_eq!(c.version(), v2(7));

        let src = test_path("farm-serve-src");
        let nar = nar_of_bytes(b"from the farm\n");
        let mut info = info_for_nar(&src, &nar);
        info.registration_time = 1_700_000_000;
        let set = BTreeSet::from([src.clone()]);
        assert!(
            c.query_valid_paths(&set, false, false)
                .await
                .unwrap()
                .is_empty()
        );
        c.add_to_store_nar(&info, &mut &nar[..]).await.unwrap();
        assert_eq!(c.query_valid_paths(&set, false, false).await.unwrap(), set);
        let infos = c.query_path_infos(&set).await.unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].nar_hash, info.nar_hash);
        assert_eq!(infos[0].nar_size, info.nar_size);
        assert_eq!(c.query_closure(&set, false).await.unwrap(), set);

        let out = test_path("farm-serve-out");
        let (drv_path, drv) = test_drv(&src, &out, "built");
        let res = c
            .build_derivation(&drv_path, &drv, &BuildOptions::default())
            .await
            .unwrap();
        assert_eq!(res.status, BuildStatus::Built, "{}", res.error_msg);
        let mut got = Vec::new();
        let summary = c.dump_store_path(&out, &mut got).await.unwrap();
        assert_eq!(
            got,
            nar_of_bytes(format!("built from the farm {src}\n").as_bytes())
        );
        let infos = c
            .query_path_infos(&BTreeSet::from([out.clone()]))
            .await
            .unwrap();
        assert_eq!(infos[0].nar_hash, summary.nar_hash);
        assert_eq!(infos[0].references, set);
        drop(c);
        let status = child.wait().await.unwrap();
        assert!(status.success());
        // The real store registered what we sent, as we sent it.
        let hash = store
            .run("nix-store", &["-q", "--hash", &src.to_string()])
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(hash, info.nar_hash.to_nix32_prefixed());
    });
}

/// A request over the message budget ends the connection with a clear error.
#[test]
fn oversized_messages_close_the_connection() {
    rt().block_on(async {
        let config = ServeConfig {
            limits: Limits {
                max_message_bytes: 8 << 10,
                max_message_items: 64,
                ..Limits::default()
            },
            ..ServeConfig::default()
        };
        let run = |input: Vec<u8>| {
            let config = config.clone();
            async move {
                let (mut client, server) = tokio::io::duplex(1 << 20);
                let (sr, sw) = tokio::io::split(server);
                let task = tokio::spawn(async move {
                    let mut store = MemStore::default();
                    run_server_with_config(sr, sw, &mut store, &config).await
                });
                client.write_all(&input).await.unwrap();
                client.shutdown().await.unwrap();
                let mut sink = Vec::new();
                let _ = client.read_to_end(&mut sink).await;
                task.await.expect("server task must not panic")
            }
        };
        let (drv_path, mut drv) = test_drv(&test_path("in"), &test_path("out"), "t");
        for i in 0..10 {
            drv.args.push(format!("{i}{}", "z".repeat(1000)).into());
        }
        let mut v = handshake();
        ServeRequest::BuildDerivation {
            drv_path,
            drv,
            options: BuildOptions::default(),
        }
        .write(&mut v, SERVE_PROTOCOL_VERSION)
        .await
        .unwrap();
        let e = run(v).await.unwrap_err();
        assert!(
            matches!(e, ServeError::Wire(WireError::MessageTooLarge { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("protocol message too large"), "{e}");
        let paths: BTreeSet<StorePath> = (0..65).map(|i| test_path(&format!("q{i}"))).collect();
        let mut v = handshake();
        ServeRequest::QueryValidPaths {
            lock: false,
            substitute: false,
            paths,
        }
        .write(&mut v, SERVE_PROTOCOL_VERSION)
        .await
        .unwrap();
        let e = run(v).await.unwrap_err();
        assert!(
            matches!(e, ServeError::Wire(WireError::MessageTooLarge { .. })),
            "{e}"
        );
    });
}
