//! Worker protocol tests: codec round trips, captures of real Nix 2.8 decoded
//! and re-encoded byte for byte, the captures replayed against our server,
//! malformed input, every handshake version, and our client against our
//! server and against a real `nix-daemon --stdio`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::captures::{captures, check_captured_basic_derivation, instantiate_capture_drv};
use crate::hash::HashAlgo;
use crate::wire::test_support::*;
use crate::wire::{
    BuildStatus, FramedReader, FramedWriter, HandlerError, OutputsSpec, ProtocolVersion,
};
use farm_testkit::Actor;

/// Worker protocol version `1.minor`.
fn v1(minor: u8) -> ProtocolVersion {
    ProtocolVersion::new(1, minor)
}

/// Read a framed stream, returning (raw bytes including headers, payload).
async fn read_framed_raw(r: &mut &[u8]) -> (Vec<u8>, Vec<u8>) {
    let start = *r;
    let mut payload = Vec::new();
    let mut fr = FramedReader::new(&mut *r, u64::MAX);
    fr.read_to_end(&mut payload).await.unwrap();
    assert!(fr.is_done());
    let raw = start[..start.len() - r.len()].to_vec();
    (raw, payload)
}

struct Exchange {
    req: WorkerRequest,
    /// Raw framed data following the request (headers included).
    framed: Vec<u8>,
    payload: Vec<u8>,
    req_bytes: Vec<u8>,
    stderr: Vec<StderrMsg>,
    /// `Err` when the daemon answered `STDERR_ERROR`.
    reply: Result<WorkerReply, RemoteError>,
    reply_bytes: Vec<u8>,
}

struct Capture {
    name: String,
    handshake_c2s: Vec<u8>,
    handshake_s2c: Vec<u8>,
    client_version: ProtocolVersion,
    version: ProtocolVersion,
    nix_version: Option<String>,
    exchanges: Vec<Exchange>,
}

async fn read_response(
    s: &mut &[u8],
    req: Option<&WorkerRequest>,
    version: ProtocolVersion,
) -> (Vec<StderrMsg>, Result<WorkerReply, RemoteError>) {
    let lim = Limits::default();
    let mut msgs = Vec::new();
    loop {
        match StderrMsg::read(s, version, &lim).await.unwrap() {
            StderrMsg::Last => break,
            StderrMsg::Error(e) => return (msgs, Err(e)),
            m => msgs.push(m),
        }
    }
    let reply = match req {
        Some(req) => WorkerReply::read(s, req, version, &lim).await.unwrap(),
        None => WorkerReply::Nothing,
    };
    (msgs, Ok(reply))
}

async fn parse_capture(name: &str, c2s: &[u8], s2c: &[u8]) -> Capture {
    let lim = Limits::default();
    let (mut c, mut s) = (c2s, s2c);
    wire::expect_u64(&mut c, WORKER_MAGIC_1).await.unwrap();
    let client_version = ProtocolVersion::from_wire(read_u64(&mut c).await.unwrap());
    wire::expect_u64(&mut s, WORKER_MAGIC_2).await.unwrap();
    let server_version = ProtocolVersion::from_wire(read_u64(&mut s).await.unwrap());
    let version = client_version.min(server_version);
    assert!(
        !version.supports(feature::FEATURE_EXCHANGE),
        "feature exchange not expected from Nix 2.8"
    );
    if read_u64(&mut c).await.unwrap() != 0 {
        read_u64(&mut c).await.unwrap();
    }
    read_u64(&mut c).await.unwrap();
    let nix_version = if version.supports(feature::NIX_VERSION) {
        Some(wire::read_string(&mut s, 100).await.unwrap())
    } else {
        None
    };
    let (msgs, res) = read_response(&mut s, None, version).await;
    assert!(msgs.is_empty() && res.is_ok());
    let handshake_c2s = c2s[..c2s.len() - c.len()].to_vec();
    let handshake_s2c = s2c[..s2c.len() - s.len()].to_vec();
    let mut exchanges = Vec::new();
    loop {
        let (c0, s0) = (c.len(), s.len());
        let Some(req) = WorkerRequest::read(&mut c, version, &lim).await.unwrap() else {
            break;
        };
        let (framed, payload) = if req.has_framed_data() {
            read_framed_raw(&mut c).await
        } else {
            (Vec::new(), Vec::new())
        };
        let req_bytes = c2s[c2s.len() - c0..c2s.len() - c.len()].to_vec();
        let (stderr, reply) = read_response(&mut s, Some(&req), version).await;
        let reply_bytes = s2c[s2c.len() - s0..s2c.len() - s.len()].to_vec();
        exchanges.push(Exchange {
            req,
            framed,
            payload,
            req_bytes,
            stderr,
            reply,
            reply_bytes,
        });
    }
    assert!(s.is_empty(), "{name}: {} bytes of reply left over", s.len());
    Capture {
        name: name.to_owned(),
        handshake_c2s,
        handshake_s2c,
        client_version,
        version,
        nix_version,
        exchanges,
    }
}

/// The `BasicDerivation`s Nix 2.8's build hook sent over ssh-ng (captured
/// bytes) are what the `.drv` files of the same expression say (see
/// [`check_captured_basic_derivation`]).
#[test]
fn captured_basic_derivations_match_the_drv_files() {
    rt().block_on(async {
        let store = Actor::new("worker").expect("a private store");
        instantiate_capture_drv(&store, "worker-hook");
        let mut checked = 0;
        for cap in all_captures().await {
            if !cap.name.starts_with("worker-build-hook") {
                continue;
            }
            for ex in &cap.exchanges {
                let WorkerRequest::BuildDerivation { drv_path, drv, .. } = &ex.req else {
                    continue;
                };
                check_captured_basic_derivation(
                    &store,
                    WorkerOp::BuildDerivation as u64,
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

async fn all_captures() -> Vec<Capture> {
    let mut out = Vec::new();
    for (name, c2s, s2c) in captures("worker-") {
        out.push(parse_capture(&name, &c2s, &s2c).await);
    }
    out
}

/// Re-encode the body of an `AddMultipleToStore` stream after decoding it.
async fn reencode_multiple(payload: &[u8]) -> Vec<u8> {
    let lim = Limits::default();
    let mut r = payload;
    let n = wire::read_count(&mut r, &lim).await.unwrap();
    let mut out = Vec::new();
    write_u64(&mut out, n).await.unwrap();
    for _ in 0..n {
        let info = read_multiple_entry_info(&mut r, &lim).await.unwrap();
        let mut nar = Vec::new();
        let summary = copy_nar(&mut r, &mut nar, &NarLimits::default())
            .await
            .unwrap();
        assert_eq!(summary.nar_hash, info.nar_hash);
        assert_eq!(summary.nar_size, info.nar_size);
        wire::write_path_info(&mut out, &info).await.unwrap();
        out.extend_from_slice(&nar);
    }
    assert!(r.is_empty());
    out
}

#[test]
fn captures_decode_and_reencode_byte_identically() {
    rt().block_on(async {
        let mut seen = BTreeSet::new();
        for cap in all_captures().await {
            assert_eq!(
                cap.client_version,
                ProtocolVersion::new(1, 34),
                "{}: Nix 2.8 speaks 1.34",
                cap.name
            );
            assert_eq!(cap.nix_version.as_deref(), Some("2.8.0"));
            let v = cap.version;
            for ex in &cap.exchanges {
                let what = format!("{}: {:?}", cap.name, ex.req.op());
                seen.insert(format!("{:?}", ex.req.op()));
                let mut out = Vec::new();
                ex.req.write(&mut out, v).await.unwrap();
                out.extend_from_slice(&ex.framed);
                assert_eq!(out, ex.req_bytes, "{what}");
                if ex.req.has_framed_data() {
                    // Our framing matches Nix's.
                    let mut out = Vec::new();
                    let mut fw = FramedWriter::new(&mut out);
                    fw.write_all(&ex.payload).await.unwrap();
                    fw.finish().await.unwrap();
                    assert_eq!(out, ex.framed, "{what}: framing");
                }
                match &ex.req {
                    WorkerRequest::AddMultipleToStore { .. } => {
                        assert_eq!(reencode_multiple(&ex.payload).await, ex.payload, "{what}");
                    }
                    WorkerRequest::AddToStoreNar { info, .. } => {
                        assert_eq!(HashAlgo::Sha256.digest(&ex.payload), info.nar_hash);
                    }
                    _ => {}
                }
                let mut out = Vec::new();
                for m in &ex.stderr {
                    m.write(&mut out, v).await.unwrap();
                }
                match &ex.reply {
                    Ok(reply) => {
                        StderrMsg::Last.write(&mut out, v).await.unwrap();
                        reply.write(&mut out, v).await.unwrap();
                    }
                    Err(e) => StderrMsg::Error(e.clone())
                        .write(&mut out, v)
                        .await
                        .unwrap(),
                }
                assert_eq!(out, ex.reply_bytes, "{what}: reply");
            }
        }
        if std::env::var_os("PRINT_CAPTURE_OPS").is_some() {
            for cap in all_captures().await {
                let ops: Vec<String> = cap
                    .exchanges
                    .iter()
                    .map(|e| format!("{:?}", e.req.op()))
                    .collect();
                println!("{}: {}", cap.name, ops.join(", "));
            }
        }
        // What Nix 2.8's build hook, `nix copy`, `nix path-info` and
        // `nix build --store` send over ssh-ng://.
        for op in [
            "QueryValidPaths",
            "AddMultipleToStore",
            "BuildDerivation",
            "QueryPathInfo",
            "NarFromPath",
            "BuildPathsWithResults",
        ] {
            assert!(seen.contains(op), "no {op} in the captures: {seen:?}");
        }
    });
}

/// Whether the handler method for `op` gets a [`Logger`].
fn op_logs(op: WorkerOp) -> bool {
    matches!(
        op,
        WorkerOp::BuildDerivation | WorkerOp::BuildPaths | WorkerOp::BuildPathsWithResults
    )
}

type Script = (Vec<StderrMsg>, WorkerReply);

/// Answers like the real daemon did, log messages included.
#[derive(Clone, Default)]
struct Scripted {
    current: Arc<Mutex<Option<Script>>>,
    added: Arc<Mutex<Vec<ValidPathInfo>>>,
}

impl Scripted {
    fn reply(&self) -> WorkerReply {
        self.current.lock().unwrap().clone().unwrap().1
    }

    async fn replay_log(&self, log: &mut Logger<'_>) {
        let msgs = self.current.lock().unwrap().clone().unwrap().0;
        for m in &msgs {
            log.send(m).await.unwrap();
        }
    }
}

impl WorkerHandler for Scripted {
    async fn query_path_info(
        &mut self,
        _path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, HandlerError> {
        match self.reply() {
            WorkerReply::OptPathInfo(i) => Ok(i),
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn query_valid_paths(
        &mut self,
        _paths: &BTreeSet<StorePath>,
        _substitute: bool,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        match self.reply() {
            WorkerReply::Paths(p) => Ok(p),
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn nar_from_path(
        &mut self,
        _path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<(), HandlerError> {
        match self.reply() {
            WorkerReply::Nar(n) => out.write_all(&n).await.map_err(HandlerError::new),
            r => panic!("unexpected {r:?}"),
        }
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
        assert_eq!(HashAlgo::Sha256.digest(&data), info.nar_hash);
        self.added.lock().unwrap().push(info);
        Ok(())
    }

    async fn build_derivation(
        &mut self,
        _drv_path: &StorePath,
        _drv: BasicDerivation,
        _mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> Result<BuildResult, HandlerError> {
        self.replay_log(log).await;
        match self.reply() {
            WorkerReply::Build(b) => Ok(b),
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        _mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> Result<Vec<BuildResult>, HandlerError> {
        self.replay_log(log).await;
        match self.reply() {
            WorkerReply::BuildResults(v) => {
                assert_eq!(
                    v.iter().map(|(p, _)| p).collect::<Vec<_>>(),
                    paths.iter().collect::<Vec<_>>()
                );
                Ok(v.into_iter().map(|(_, r)| r).collect())
            }
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn query_missing(&mut self, _paths: &[DerivedPath]) -> Result<Missing, HandlerError> {
        match self.reply() {
            WorkerReply::Missing(m) => Ok(m),
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn query_realisation(
        &mut self,
        _drv_output: &str,
    ) -> Result<BTreeSet<String>, HandlerError> {
        match self.reply() {
            WorkerReply::Strings(s) => Ok(s),
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn query_derivation_output_map(
        &mut self,
        _drv_path: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>, HandlerError> {
        match self.reply() {
            WorkerReply::OutputMap(m) => Ok(m),
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
            let config = WorkerConfig {
                nix_version: cap.nix_version.clone().unwrap(),
                ..WorkerConfig::default()
            };
            let task =
                tokio::spawn(
                    async move { run_server_with_config(sr, sw, &mut handler, &config).await },
                );
            let (mut cr, mut cw) = tokio::io::split(client);
            cw.write_all(&cap.handshake_c2s).await.unwrap();
            let mut got = vec![0u8; cap.handshake_s2c.len()];
            cr.read_exact(&mut got).await.unwrap();
            // We announce 1.35 where Nix 2.8 announced 1.34; the rest is identical.
            assert_eq!(got[8..16], 0x123u64.to_le_bytes());
            assert_eq!(PROTOCOL_VERSION.to_wire(), 0x123);
            assert_eq!(
                got[16..],
                cap.handshake_s2c[16..],
                "{}: handshake",
                cap.name
            );
            for ex in &cap.exchanges {
                let Ok(reply) = &ex.reply else {
                    panic!("{}: the captures hold no daemon errors", cap.name)
                };
                let logs = op_logs(ex.req.op());
                *h2.current.lock().unwrap() = Some((ex.stderr.clone(), reply.clone()));
                if !logs {
                    // Only a builder's messages are replayed: the real daemon
                    // also reports activities for other operations.
                    assert!(ex.stderr.iter().all(|m| !matches!(m, StderrMsg::Error(_))));
                }
                let mut expected = Vec::new();
                if logs {
                    for m in &ex.stderr {
                        m.write(&mut expected, cap.version).await.unwrap();
                    }
                }
                StderrMsg::Last
                    .write(&mut expected, cap.version)
                    .await
                    .unwrap();
                reply.write(&mut expected, cap.version).await.unwrap();
                cw.write_all(&ex.req_bytes).await.unwrap();
                let mut got = vec![0u8; expected.len()];
                tokio::time::timeout(std::time::Duration::from_secs(10), cr.read_exact(&mut got))
                    .await
                    .unwrap_or_else(|_| panic!("{}: no full reply to {:?}", cap.name, ex.req.op()))
                    .unwrap();
                assert_eq!(got, expected, "{}: {:?}", cap.name, ex.req.op());
            }
            cw.shutdown().await.unwrap();
            task.await.unwrap().unwrap();
        }
    });
}

fn arb_derived_path() -> impl Strategy<Value = DerivedPath> {
    prop_oneof![
        arb_store_path().prop_map(DerivedPath::Opaque),
        (
            arb_store_path(),
            proptest::option::of(proptest::collection::btree_set("[a-z]{1,4}", 1..3))
        )
            .prop_map(|(drv_path, outs)| DerivedPath::Built {
                drv_path,
                outputs: outs.map_or(OutputsSpec::All, OutputsSpec::Names),
            }),
    ]
}

fn arb_mode() -> impl Strategy<Value = BuildMode> {
    (0u64..3).prop_map(|m| BuildMode::from_u64(m).unwrap())
}

fn arb_request() -> impl Strategy<Value = WorkerRequest> {
    use WorkerRequest as Q;
    let sp = arb_store_path;
    prop_oneof![
        sp().prop_map(Q::IsValidPath),
        sp().prop_map(Q::QueryReferrers),
        (
            "[a-z]{1,8}",
            "fixed:r:sha256|text:sha256",
            arb_paths(),
            any::<bool>()
        )
            .prop_map(|(name, cam, references, repair)| Q::AddToStore {
                name,
                cam,
                references,
                repair
            }),
        ("[a-z]{1,8}", ".{0,20}", arb_paths()).prop_map(|(name, text, references)| {
            Q::AddTextToStore {
                name,
                text,
                references,
            }
        }),
        (
            proptest::collection::vec(arb_derived_path(), 0..3),
            arb_mode()
        )
            .prop_map(|(paths, mode)| Q::BuildPaths { paths, mode }),
        sp().prop_map(Q::EnsurePath),
        sp().prop_map(Q::AddTempRoot),
        (
            proptest::collection::vec(any::<u64>(), 12),
            proptest::collection::vec(("[a-z-]{1,10}", ".{0,10}"), 0..3)
        )
            .prop_map(|(v, overrides)| Q::SetOptions(ClientSettings {
                keep_failed: v[0],
                keep_going: v[1],
                try_fallback: v[2],
                verbosity: v[3],
                max_build_jobs: v[4],
                max_silent_time: v[5],
                use_build_hook: v[6],
                verbose_build: v[7],
                log_type: v[8],
                print_build_trace: v[9],
                build_cores: v[10],
                use_substitutes: v[11],
                overrides,
            })),
        sp().prop_map(Q::QueryPathInfo),
        "[0-9a-z]{32}".prop_map(Q::QueryPathFromHashPart),
        (arb_paths(), any::<bool>())
            .prop_map(|(paths, substitute)| Q::QueryValidPaths { paths, substitute }),
        arb_paths().prop_map(Q::QuerySubstitutablePaths),
        (arb_basic_derivation(), arb_mode()).prop_map(|((drv_path, drv), mode)| {
            Q::BuildDerivation {
                drv_path,
                drv,
                mode,
            }
        }),
        (
            sp(),
            proptest::collection::btree_set("[a-z]+:[a-z]{4}", 0..3)
        )
            .prop_map(|(path, sigs)| Q::AddSignatures { path, sigs }),
        sp().prop_map(Q::NarFromPath),
        (arb_path_info(), any::<bool>(), any::<bool>()).prop_map(
            |(info, repair, dont_check_sigs)| Q::AddToStoreNar {
                info,
                repair,
                dont_check_sigs
            }
        ),
        proptest::collection::vec(arb_derived_path(), 0..3).prop_map(Q::QueryMissing),
        sp().prop_map(Q::QueryDerivationOutputMap),
        ".{0,30}".prop_map(Q::RegisterDrvOutput),
        ".{0,30}".prop_map(Q::QueryRealisation),
        (any::<bool>(), any::<bool>()).prop_map(|(repair, dont_check_sigs)| {
            Q::AddMultipleToStore {
                repair,
                dont_check_sigs,
            }
        }),
        (
            proptest::collection::vec(arb_derived_path(), 0..3),
            arb_mode()
        )
            .prop_map(|(paths, mode)| Q::BuildPathsWithResults { paths, mode }),
    ]
}

fn arb_stderr() -> impl Strategy<Value = StderrMsg> {
    let fields = proptest::collection::vec(
        prop_oneof![
            any::<u64>().prop_map(Field::Int),
            ".{0,10}".prop_map(Field::String)
        ],
        0..3,
    );
    prop_oneof![
        ".{0,20}".prop_map(StderrMsg::Next),
        Just(StderrMsg::Last),
        any::<u64>().prop_map(StderrMsg::Read),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(StderrMsg::Write),
        (
            any::<u64>(),
            ".{0,20}",
            proptest::collection::vec(".{0,10}", 0..2)
        )
            .prop_map(|(level, message, traces)| StderrMsg::Error(RemoteError {
                level,
                name: "Error".into(),
                message,
                traces,
                exit_status: 1
            })),
        (any::<(u64, u64, u64, u64)>(), ".{0,20}", fields.clone()).prop_map(
            |((id, level, activity_type, parent), text, fields)| StderrMsg::StartActivity {
                id,
                level,
                activity_type,
                text,
                fields,
                parent
            }
        ),
        any::<u64>().prop_map(StderrMsg::StopActivity),
        (any::<u64>(), any::<u64>(), fields).prop_map(|(id, result_type, fields)| {
            StderrMsg::Result {
                id,
                result_type,
                fields,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn request_roundtrip(req in arb_request(), v in prop_oneof![Just(v1(34)), Just(v1(35)), Just(v1(37)), Just(v1(38))]) {
        rt().block_on(async {
            let mut out = Vec::new();
            req.write(&mut out, v).await.unwrap();
            let mut r = &out[..];
            let back = WorkerRequest::read(&mut r, v, &Limits::default()).await.unwrap();
            prop_assert_eq!(back, Some(req));
            prop_assert!(r.is_empty());
            Ok(())
        })?;
    }

    #[test]
    fn stderr_roundtrip(msg in arb_stderr()) {
        rt().block_on(async {
            let mut out = Vec::new();
            msg.write(&mut out, PROTOCOL_VERSION).await.unwrap();
            let mut r = &out[..];
            prop_assert_eq!(StderrMsg::read(&mut r, PROTOCOL_VERSION, &Limits::default()).await.unwrap(), msg);
            prop_assert!(r.is_empty());
            Ok(())
        })?;
    }

    #[test]
    fn reply_roundtrip(
        v in prop_oneof![Just(v1(34)), Just(v1(35)), Just(v1(37)), Just(v1(38))],
        paths in arb_paths(),
        info in arb_path_info(),
        res in arb_build_result(BuildResultFields { timings: true, cpu: true, built_outputs: true }),
        dps in proptest::collection::vec(arb_derived_path(), 0..3),
        outmap in proptest::collection::btree_map("[a-z]{1,5}", proptest::option::of(arb_store_path()), 0..3),
        strings in proptest::collection::btree_set(".{0,10}", 0..3),
        text in ".{0,20}",
    ) {
        use WorkerRequest as Q;
        let mut res = res;
        let f = build_result_fields(v);
        if !f.cpu { res.cpu_user = None; res.cpu_system = None; }
        let p = info.path.clone();
        let cases = vec![
            (Q::SetOptions(ClientSettings::default()), WorkerReply::Nothing),
            (Q::EnsurePath(p.clone()), WorkerReply::Success),
            (Q::IsValidPath(p.clone()), WorkerReply::Bool(true)),
            (Q::QueryReferrers(p.clone()), WorkerReply::Paths(paths.clone())),
            (Q::AddToStore { name: "x".into(), cam: "text:sha256".into(), references: BTreeSet::new(), repair: false }, WorkerReply::PathInfo(info.clone())),
            (Q::QueryPathInfo(p.clone()), WorkerReply::OptPathInfo(Some(info.clone()))),
            (Q::QueryPathInfo(p.clone()), WorkerReply::OptPathInfo(None)),
            (Q::AddTextToStore { name: "x".into(), text: text.clone(), references: BTreeSet::new() }, WorkerReply::Path(p.clone())),
            (Q::QueryPathFromHashPart("x".into()), WorkerReply::OptPath(Some(p.clone()))),
            (Q::QueryPathFromHashPart("x".into()), WorkerReply::OptPath(None)),
            (Q::BuildDerivation { drv_path: p.clone(), drv: BasicDerivation::default(), mode: BuildMode::Normal }, WorkerReply::Build(res.clone())),
            (Q::NarFromPath(p.clone()), WorkerReply::Nar(nar_of_bytes(text.as_bytes()))),
            (Q::QueryMissing(vec![]), WorkerReply::Missing(Missing { will_build: paths.clone(), will_substitute: BTreeSet::new(), unknown: paths.clone(), download_size: 3, nar_size: 4 })),
            (Q::QueryDerivationOutputMap(p.clone()), WorkerReply::OutputMap(outmap)),
            (Q::QueryRealisation("x".into()), WorkerReply::Strings(strings)),
            (Q::BuildPathsWithResults { paths: dps.clone(), mode: BuildMode::Normal }, WorkerReply::BuildResults(dps.iter().cloned().map(|d| (d, res.clone())).collect())),
        ];
        rt().block_on(async {
            for (req, reply) in cases {
                let mut out = Vec::new();
                reply.write(&mut out, v).await.unwrap();
                let mut r = &out[..];
                prop_assert_eq!(WorkerReply::read(&mut r, &req, v, &Limits::default()).await.unwrap(), reply);
                prop_assert!(r.is_empty());
            }
            Ok(())
        })?;
    }
}

#[test]
fn version_gates() {
    rt().block_on(async {
        let req = WorkerRequest::QueryValidPaths {
            paths: BTreeSet::new(),
            substitute: true,
        };
        let mut old = Vec::new();
        req.write(&mut old, v1(26)).await.unwrap();
        let mut new = Vec::new();
        req.write(&mut new, v1(27)).await.unwrap();
        assert_eq!(new.len(), old.len() + 8, "substitute flag from 1.27");
        let e = StderrMsg::Error(RemoteError::new("boom"));
        let mut old = Vec::new();
        e.write(&mut old, v1(25)).await.unwrap();
        let back = StderrMsg::read(&mut &old[..], v1(25), &Limits::default())
            .await
            .unwrap();
        assert_eq!(back, e);
        let mut f = build_result_fields(v1(35));
        assert!(!f.cpu && f.timings && f.built_outputs);
        f = build_result_fields(v1(27));
        assert!(!f.timings && !f.built_outputs);
        assert!(build_result_fields(v1(37)).cpu);
    });
}

/// An in-memory store that builds by writing `$text` into each output.
#[derive(Default)]
struct MemStore {
    paths: MemPaths,
}

impl WorkerHandler for MemStore {
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
        _repair: bool,
        _dont_check_sigs: bool,
        nar: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<(), HandlerError> {
        self.paths.add(info, nar).await
    }

    async fn build_derivation(
        &mut self,
        _drv_path: &StorePath,
        drv: BasicDerivation,
        _mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> Result<BuildResult, HandlerError> {
        log.start_activity(1, 3, ACT_BUILD, "building", vec![], 0)
            .await
            .map_err(HandlerError::new)?;
        log.build_log_line(1, "a log line")
            .await
            .map_err(HandlerError::new)?;
        log.stop_activity(1).await.map_err(HandlerError::new)?;
        Ok(self.paths.build(&drv))
    }
}

type Duplex = tokio::io::DuplexStream;
type TestClient = WorkerClient<tokio::io::ReadHalf<Duplex>, tokio::io::WriteHalf<Duplex>>;

async fn mem_server(
    server_version: ProtocolVersion,
    client_version: ProtocolVersion,
) -> (
    TestClient,
    tokio::task::JoinHandle<Result<MemStore, WorkerError>>,
) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let (sr, sw) = tokio::io::split(server);
    let task = tokio::spawn(async move {
        let mut store = MemStore::default();
        let config = WorkerConfig {
            version: server_version,
            ..WorkerConfig::default()
        };
        run_server_with_config(sr, sw, &mut store, &config)
            .await
            .map(|()| store)
    });
    let (cr, cw) = tokio::io::split(client);
    let c = WorkerClient::connect_with_version(cr, cw, client_version)
        .await
        .unwrap();
    (c, task)
}

#[test]
fn handshake_at_every_supported_version() {
    rt().block_on(async {
        for (server, client, expect) in [
            (v1(35), v1(34), v1(34)),
            (v1(35), v1(35), v1(35)),
            (v1(35), v1(38), v1(35)),
            (v1(37), v1(37), v1(37)),
            (v1(38), v1(38), v1(38)),
            (v1(38), v1(34), v1(34)),
        ] {
            let (mut c, task) = mem_server(server, client).await;
            assert_eq!(c.version(), expect);
            assert!(c.daemon_nix_version().unwrap().starts_with("2.8.0"));
            assert_eq!(
                c.trusted(),
                expect.supports(feature::TRUST_STATUS).then_some(true)
            );
            // A build at this version: the result fields follow it.
            let src = test_path("src");
            let nar = nar_of_bytes(b"in");
            c.add_to_store_nar(&info_for_nar(&src, &nar), false, true, &mut &nar[..])
                .await
                .unwrap();
            let out = test_path("out");
            let (drv_path, drv) = test_drv(&src, &out, "t");
            let res = c
                .build_derivation(&drv_path, &drv, BuildMode::Normal)
                .await
                .unwrap();
            assert_eq!(res.output_paths().get("out"), Some(&out));
            drop(c);
            task.await.unwrap().unwrap();
        }
    });
}

#[test]
fn our_client_against_our_server() {
    rt().block_on(async {
        let (mut c, task) = mem_server(PROTOCOL_VERSION, PROTOCOL_VERSION).await;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        c.on_stderr(move |m| {
            if let Some(l) = m.build_log_line() {
                l2.lock().unwrap().push(l.to_owned());
            }
        });
        let a = test_path("a");
        let b = test_path("b");
        let nar_a = nar_of_bytes(b"a");
        let nar_b = nar_of_bytes(b"b");
        assert!(!c.is_valid_path(&a).await.unwrap());
        assert_eq!(c.query_path_info(&a).await.unwrap(), None);
        let ia = info_for_nar(&a, &nar_a);
        let mut ib = info_for_nar(&b, &nar_b);
        ib.references.insert(a.clone());
        let (mut ra, mut rb) = (&nar_a[..], &nar_b[..]);
        c.add_multiple_to_store(
            &mut [(ia.clone(), &mut ra), (ib.clone(), &mut rb)],
            false,
            true,
        )
        .await
        .unwrap();
        assert!(c.is_valid_path(&a).await.unwrap());
        assert_eq!(c.query_path_info(&b).await.unwrap(), Some(ib));
        let both = BTreeSet::from([a.clone(), b.clone()]);
        assert_eq!(c.query_valid_paths(&both, false).await.unwrap(), both);
        c.ensure_path(&a).await.unwrap();
        c.add_temp_root(&a).await.unwrap();
        c.set_options(&ClientSettings::default()).await.unwrap();

        let out = test_path("out");
        let (drv_path, drv) = test_drv(&a, &out, "hello");
        let res = c
            .build_derivation(&drv_path, &drv, BuildMode::Normal)
            .await
            .unwrap();
        assert_eq!(res.status, BuildStatus::Built);
        assert_eq!(*lines.lock().unwrap(), vec!["a log line".to_string()]);
        let mut got = Vec::new();
        c.nar_from_path(&out, &mut got).await.unwrap();
        assert_eq!(got, nar_of_bytes(b"hello"));

        // Handler errors are reported and the connection goes on.
        let missing = test_path("missing");
        let e = c
            .nar_from_path(&missing, &mut Vec::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, WorkerError::Remote(r) if r.message.contains("is not valid")),
            "{e}"
        );
        let e = c.ensure_path(&missing).await.unwrap_err();
        assert!(matches!(e, WorkerError::Remote(_)));
        let e = c.query_missing(&[]).await.unwrap_err();
        assert!(
            matches!(&e, WorkerError::Remote(r) if r.message.contains("not supported")),
            "{e}"
        );
        // A NAR that does not match its info is refused, cleanly.
        let mut bad = info_for_nar(&missing, &nar_a);
        bad.nar_hash = HashAlgo::Sha256.digest(b"no");
        let e = c
            .add_to_store_nar(&bad, false, true, &mut &nar_a[..])
            .await
            .unwrap_err();
        assert!(matches!(e, WorkerError::Remote(_)), "{e}");
        assert!(c.is_valid_path(&a).await.unwrap());
        drop(c);
        let store = task.await.unwrap().unwrap();
        assert_eq!(store.paths.len(), 3);
    });
}

/// Our server's answer to raw `input` after a 1.34 handshake: (bytes, result).
async fn serve_bytes(input: Vec<u8>) -> (Vec<u8>, Result<(), WorkerError>) {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let (sr, sw) = tokio::io::split(server);
    let task = tokio::spawn(async move {
        let mut store = MemStore::default();
        run_server(sr, sw, &mut store).await
    });
    client.write_all(&input).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = client.read_to_end(&mut out).await;
    (out, task.await.expect("server task must not panic"))
}

fn handshake() -> Vec<u8> {
    let mut v = Vec::new();
    for x in [WORKER_MAGIC_1, 0x122, 0, 0] {
        v.extend_from_slice(&u64::to_le_bytes(x));
    }
    v
}

async fn last_error(out: &[u8]) -> RemoteError {
    // Skip the handshake reply: magic, version, nix version, LAST.
    let mut r = &out[16..];
    wire::read_string(&mut r, 100).await.unwrap();
    assert_eq!(read_u64(&mut r).await.unwrap(), STDERR_LAST);
    match StderrMsg::read(&mut r, v1(34), &Limits::default())
        .await
        .unwrap()
    {
        StderrMsg::Error(e) => e,
        m => panic!("expected an error, got {m:?}"),
    }
}

#[test]
fn malformed_input_closes_the_connection_with_an_error() {
    rt().block_on(async {
        let (_, res) = serve_bytes(7u64.to_le_bytes().to_vec()).await;
        assert!(matches!(
            res,
            Err(WorkerError::Wire(WireError::BadMagic { .. }))
        ));
        // Too old a client (Nix 2.3 speaks 1.21).
        let mut v = handshake();
        v[8..16].copy_from_slice(&0x115u64.to_le_bytes());
        let (_, res) = serve_bytes(v).await;
        assert!(matches!(
            res,
            Err(WorkerError::Wire(WireError::UnsupportedVersion(0x115)))
        ));
        // Bits above the major number are not part of the version (Nix masks
        // them): 0x1_0100 is 1.0, too old, not a huge 1.x.
        let mut v = handshake();
        v[8..16].copy_from_slice(&0x1_0100u64.to_le_bytes());
        let (_, res) = serve_bytes(v).await;
        assert!(matches!(
            res,
            Err(WorkerError::Wire(WireError::UnsupportedVersion(0x1_0100)))
        ));
        // Unknown operation: an error message, then the connection closes.
        let mut v = handshake();
        v.extend_from_slice(&99u64.to_le_bytes());
        let (out, res) = serve_bytes(v).await;
        assert!(matches!(
            res,
            Err(WorkerError::Wire(WireError::UnknownOp { op: 99, .. }))
        ));
        assert!(
            last_error(&out)
                .await
                .message
                .contains("unknown worker operation 99")
        );
        // A string longer than any limit.
        let mut v = handshake();
        v.extend_from_slice(&1u64.to_le_bytes());
        v.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        let (out, res) = serve_bytes(v).await;
        assert!(matches!(
            res,
            Err(WorkerError::Wire(WireError::TooLong { .. }))
        ));
        assert!(last_error(&out).await.message.contains("exceeds the limit"));
        // A store path that is not one.
        let mut v = handshake();
        WorkerRequest::IsValidPath(test_path("x"))
            .write(&mut v, v1(34))
            .await
            .unwrap();
        let n = v.len();
        v[n - 16..n - 8].copy_from_slice(b"/tmp/xyz");
        let (_, res) = serve_bytes(v).await;
        assert!(matches!(
            res,
            Err(WorkerError::Wire(WireError::StorePath(_)))
        ));
        // AddToStoreNar whose framed data is not a NAR.
        let p = test_path("bad");
        let mut v = handshake();
        WorkerRequest::AddToStoreNar {
            info: info_for_nar(&p, b"whatever"),
            repair: false,
            dont_check_sigs: true,
        }
        .write(&mut v, v1(34))
        .await
        .unwrap();
        let mut fw = FramedWriter::new(&mut v);
        fw.write_all(&[1u8; 40]).await.unwrap();
        fw.finish().await.unwrap();
        let (out, res) = serve_bytes(v).await;
        assert!(matches!(res, Err(WorkerError::Nar(_))), "{res:?}");
        assert!(last_error(&out).await.message.contains("NAR"));
        // Truncated request: closed without a panic.
        let mut v = handshake();
        v.extend_from_slice(&26u64.to_le_bytes());
        v.extend_from_slice(&[5, 0, 0]);
        let (_, res) = serve_bytes(v).await;
        assert!(matches!(
            res,
            Err(WorkerError::Wire(WireError::UnexpectedEof))
        ));
        // Clean close after the handshake.
        let (_, res) = serve_bytes(handshake()).await;
        res.unwrap();
    });
}

/// Every data-free operation our client encodes is one a real `nix-daemon
/// --stdio` (Nix 2.8) understands, and its reply decodes to what the store
/// holds (the content-addressed `RegisterDrvOutput`/`QueryRealisation` need
/// the `ca-derivations` feature and are left out).
#[test]
fn every_data_free_op_against_real_nix_daemon() {
    rt().block_on(async {
        use WorkerRequest as Q;
        let store = Actor::new("worker").expect("a private store");
        let drv_path = StorePath::parse(
            store
                .run(
                    "nix-instantiate",
                    &[
                        "-E",
                        "derivation { name = \"farm-op\"; system = builtins.currentSystem; \
                 builder = \"/bin/sh\"; args = [\"-c\" \"echo op > $out\"]; }",
                    ],
                )
                .unwrap()
                .trim(),
        )
        .unwrap();
        let drv_out = StorePath::parse(
            store
                .run("nix-store", &["-q", "--outputs", &drv_path.to_string()])
                .unwrap()
                .trim(),
        )
        .unwrap();
        let mut child = store
            .tokio_command("nix-daemon")
            .args(["--stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut c = WorkerClient::connect(stdout, stdin).await.unwrap();
        let mut ask = async |req: Q| {
            c.request(&req)
                .await
                .unwrap_or_else(|e| panic!("{:?}: {e}", req.op()))
        };

        let settings = ClientSettings {
            max_build_jobs: 1,
            build_cores: 1,
            verbosity: 0,
            overrides: vec![("sandbox".into(), "false".into())],
            ..ClientSettings::default()
        };
        assert_eq!(ask(Q::SetOptions(settings)).await, WorkerReply::Nothing);

        let t1 = StorePath::make("text", &HashAlgo::Sha256.digest(b"one"), "farm-t1").unwrap();
        let req = Q::AddTextToStore {
            name: "farm-t1".into(),
            text: "one".into(),
            references: BTreeSet::new(),
        };
        assert_eq!(ask(req).await, WorkerReply::Path(t1.clone()));
        let text2 = format!("two {t1}");
        let t2 = StorePath::make(
            &format!("text:{t1}"),
            &HashAlgo::Sha256.digest(text2.as_bytes()),
            "farm-t2",
        )
        .unwrap();
        let req = Q::AddTextToStore {
            name: "farm-t2".into(),
            text: text2,
            references: BTreeSet::from([t1.clone()]),
        };
        assert_eq!(ask(req).await, WorkerReply::Path(t2.clone()));
        assert_eq!(
            ask(Q::IsValidPath(t2.clone())).await,
            WorkerReply::Bool(true)
        );
        let missing = test_path("farm-missing");
        assert_eq!(
            ask(Q::IsValidPath(missing.clone())).await,
            WorkerReply::Bool(false)
        );
        assert_eq!(
            ask(Q::QueryReferrers(t1.clone())).await,
            WorkerReply::Paths(BTreeSet::from([t2.clone()]))
        );
        assert_eq!(ask(Q::EnsurePath(t1.clone())).await, WorkerReply::Success);
        assert_eq!(ask(Q::AddTempRoot(t1.clone())).await, WorkerReply::Success);
        assert_eq!(
            ask(Q::QueryPathFromHashPart(t2.hash_part().into())).await,
            WorkerReply::OptPath(Some(t2.clone()))
        );
        assert_eq!(
            ask(Q::QueryPathFromHashPart(missing.hash_part().into())).await,
            WorkerReply::OptPath(None)
        );
        let both = BTreeSet::from([t1.clone(), missing.clone()]);
        let req = Q::QueryValidPaths {
            paths: both.clone(),
            substitute: false,
        };
        assert_eq!(
            ask(req).await,
            WorkerReply::Paths(BTreeSet::from([t1.clone()]))
        );
        assert_eq!(
            ask(Q::QuerySubstitutablePaths(both)).await,
            WorkerReply::Paths(BTreeSet::new())
        );
        let key = crate::signing::SigningKey::generate("farm-op-test").unwrap();
        let WorkerReply::OptPathInfo(Some(info)) = ask(Q::QueryPathInfo(t1.clone())).await else {
            panic!("no info for {t1}");
        };
        let sig = key.sign(&info.fingerprint());
        let req = Q::AddSignatures {
            path: t1.clone(),
            sigs: BTreeSet::from([sig.clone()]),
        };
        assert_eq!(ask(req).await, WorkerReply::Success);
        let WorkerReply::OptPathInfo(Some(info)) = ask(Q::QueryPathInfo(t1.clone())).await else {
            panic!("no info for {t1}");
        };
        assert_eq!(info.sigs, BTreeSet::from([sig]));

        assert_eq!(
            ask(Q::QueryDerivationOutputMap(drv_path.clone())).await,
            WorkerReply::OutputMap(BTreeMap::from([("out".into(), Some(drv_out.clone()))]))
        );
        let built = DerivedPath::Built {
            drv_path: drv_path.clone(),
            outputs: OutputsSpec::Names(BTreeSet::from(["out".to_string()])),
        };
        let WorkerReply::Missing(m) = ask(Q::QueryMissing(vec![built.clone()])).await else {
            panic!("QueryMissing");
        };
        assert_eq!(m.will_build, BTreeSet::from([drv_path.clone()]));
        let req = Q::BuildPaths {
            paths: vec![built.clone()],
            mode: BuildMode::Normal,
        };
        assert_eq!(ask(req).await, WorkerReply::Success);
        assert_eq!(
            ask(Q::IsValidPath(drv_out.clone())).await,
            WorkerReply::Bool(true)
        );
        let req = Q::BuildPathsWithResults {
            paths: vec![built.clone(), DerivedPath::Opaque(t1.clone())],
            mode: BuildMode::Normal,
        };
        let WorkerReply::BuildResults(results) = ask(req).await else {
            panic!("BuildPathsWithResults");
        };
        // Nix 2.8 answers in its own order (its goals'), not the request's.
        assert_eq!(results.len(), 2);
        let result = |p: &DerivedPath| &results.iter().find(|(q, _)| q == p).unwrap().1;
        assert_eq!(result(&built).status, BuildStatus::AlreadyValid);
        assert_eq!(
            result(&built).output_paths(),
            BTreeMap::from([("out".into(), drv_out)])
        );
        assert!(result(&DerivedPath::Opaque(t1.clone())).status.is_success());

        // An error from the daemon is an error; the connection goes on.
        assert!(c.request(&Q::EnsurePath(missing)).await.is_err());
        assert!(c.is_valid_path(&t1).await.unwrap());
        drop(c);
        let _ = child.wait().await.unwrap();
    });
}

/// Our client drives a real `nix-daemon --stdio` in a private store.
#[test]
fn our_client_against_real_nix_daemon() {
    rt().block_on(async {
        let store = Actor::new("worker").expect("a private store");
        let mut child = store
            .tokio_command("nix-daemon")
            .args(["--stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut c = WorkerClient::connect(stdout, stdin).await.unwrap();
        assert_eq!(c.version(), v1(34), "Nix 2.8 speaks 1.34");
        assert_eq!(c.daemon_nix_version(), Some("2.8.0"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        c.on_stderr(move |m| {
            if let Some(l) = m.build_log_line() {
                l2.lock().unwrap().push(l.to_owned());
            }
        });

        let src = test_path("farm-worker-src");
        let nar = nar_of_bytes(b"from the farm\n");
        let mut info = info_for_nar(&src, &nar);
        info.registration_time = 1_700_000_000;
        assert!(!c.is_valid_path(&src).await.unwrap());
        assert_eq!(c.query_path_info(&src).await.unwrap(), None);
        c.add_to_store_nar(&info, false, true, &mut &nar[..])
            .await
            .unwrap();
        assert!(c.is_valid_path(&src).await.unwrap());
        let back = c.query_path_info(&src).await.unwrap().unwrap();
        assert_eq!(back.nar_hash, info.nar_hash);
        assert_eq!(back.nar_size, info.nar_size);

        // Two more paths in one AddMultipleToStore, the second referring to the first.
        let d1 = test_path("farm-worker-d1");
        let d2 = test_path("farm-worker-d2");
        let n1 = nar_of_bytes(b"one");
        let n2 = nar_of_bytes(format!("two {d1}").as_bytes());
        let i1 = info_for_nar(&d1, &n1);
        let mut i2 = info_for_nar(&d2, &n2);
        i2.references.insert(d1.clone());
        let (mut r1, mut r2) = (&n1[..], &n2[..]);
        c.add_multiple_to_store(&mut [(i1, &mut r1), (i2, &mut r2)], false, true)
            .await
            .unwrap();
        let all = BTreeSet::from([src.clone(), d1.clone(), d2.clone()]);
        assert_eq!(c.query_valid_paths(&all, false).await.unwrap(), all);
        assert_eq!(
            c.query_path_info(&d2).await.unwrap().unwrap().references,
            BTreeSet::from([d1.clone()])
        );

        let out = test_path("farm-worker-out");
        let (drv_path, drv) = test_drv(&src, &out, "built");
        let res = c
            .build_derivation(&drv_path, &drv, BuildMode::Normal)
            .await
            .unwrap();
        assert_eq!(res.status, BuildStatus::Built, "{}", res.error_msg);
        assert!(
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l == "log line from the builder"),
            "build log: {:?}",
            lines.lock().unwrap()
        );
        let mut got = Vec::new();
        let summary = c.nar_from_path(&out, &mut got).await.unwrap();
        assert_eq!(
            got,
            nar_of_bytes(format!("built from the farm {src}\n").as_bytes())
        );
        let oi = c.query_path_info(&out).await.unwrap().unwrap();
        assert_eq!(oi.nar_hash, summary.nar_hash);
        assert_eq!(oi.references, BTreeSet::from([src.clone()]));

        // The daemon's errors come back as errors, and the connection goes on.
        let e = c
            .nar_from_path(&test_path("farm-missing"), &mut Vec::new())
            .await;
        assert!(e.is_err());
        drop(c);
        let _ = child.wait().await.unwrap();
    });
}

/// A request over the message budget is refused with a clear error and the
/// connection closes; the same server takes a request within it.
#[test]
fn oversized_messages_close_the_connection() {
    rt().block_on(async {
        let config = WorkerConfig {
            limits: Limits {
                max_message_bytes: 8 << 10,
                max_message_items: 64,
                ..Limits::default()
            },
            ..WorkerConfig::default()
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
                let mut out = Vec::new();
                let _ = client.read_to_end(&mut out).await;
                (out, task.await.expect("server task must not panic"))
            }
        };
        // A BasicDerivation whose env values are each small but together too big.
        let (drv_path, mut drv) = test_drv(&test_path("in"), &test_path("out"), "t");
        for i in 0..10 {
            drv.env
                .insert(format!("v{i}").into(), "y".repeat(1000).into());
        }
        let mut v = handshake();
        WorkerRequest::BuildDerivation {
            drv_path,
            drv,
            mode: BuildMode::Normal,
        }
        .write(&mut v, v1(34))
        .await
        .unwrap();
        let (out, res) = run(v).await;
        assert!(
            matches!(
                res,
                Err(WorkerError::Wire(WireError::MessageTooLarge { .. }))
            ),
            "{res:?}"
        );
        let e = last_error(&out).await;
        assert!(e.message.contains("protocol message too large"), "{e:?}");
        // A QueryValidPaths of more paths than the budget's elements.
        let paths: BTreeSet<StorePath> = (0..65).map(|i| test_path(&format!("q{i}"))).collect();
        let mut v = handshake();
        WorkerRequest::QueryValidPaths {
            paths: paths.clone(),
            substitute: false,
        }
        .write(&mut v, v1(34))
        .await
        .unwrap();
        let (out, res) = run(v).await;
        assert!(matches!(
            res,
            Err(WorkerError::Wire(WireError::MessageTooLarge { .. }))
        ));
        assert!(last_error(&out).await.message.contains("64 list elements"));
        // Two requests of 40 paths each: the budget is per message.
        let few: BTreeSet<StorePath> = paths.into_iter().take(40).collect();
        let mut v = handshake();
        for _ in 0..2 {
            WorkerRequest::QueryValidPaths {
                paths: few.clone(),
                substitute: false,
            }
            .write(&mut v, v1(34))
            .await
            .unwrap();
        }
        let (_, res) = run(v).await;
        res.unwrap();
    });
}
