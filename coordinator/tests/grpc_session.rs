//! The coordinator in process on loopback ports, spoken to over real gRPC:
//! the builder handshake (enrolled key welcomed, unknown key and bad signature
//! refused and logged, data calls need the session token), a derivation graph
//! submitted by a CLI client and built by a protocol-level test builder
//! (jobs carry the .drv and the input closure; outputs uploaded as real NARs;
//! results verified against the cache; logs stored), dedup on resubmission,
//! a reconnect holding a finished job's result (kept, acknowledged, not
//! rebuilt), and a restart on the same state directory that finishes the graph
//! without rebuilding what finished.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ed25519_dalek::Signer;
use farm_coordinator::{CoordinatorConfig, RunningCoordinator};
use farm_nix::derivation::{Derivation, DerivationOutput};
use farm_nix::hash::HashAlgo;
use farm_nix::store_path::StorePath;
use farm_proto::v1;
use farm_proto::v1::build_event::Event as Ev;
use farm_proto::v1::builder_message::Msg as Up;
use farm_proto::v1::builder_service_client::BuilderServiceClient;
use farm_proto::v1::coordinator_message::Msg as Down;
use farm_proto::v1::farm_service_client::FarmServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Each test's hang-guard: past it the test fails instead of hanging.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

// ───────────────────────────── log capture ─────────────────────────────

#[derive(Clone)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Captured(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init();
        buf
    })
}

fn logged(needle: &[&str]) -> bool {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines().any(|l| needle.iter().all(|n| l.contains(n)))
}

// ───────────────────────────── helpers ─────────────────────────────

fn sp(name: &str) -> StorePath {
    let d = HashAlgo::Sha256.digest(name.as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&d.digest()[..20]);
    StorePath::from_digest(&digest, name).unwrap()
}

struct Key {
    sk: ed25519_dalek::SigningKey,
    line: String,
}

fn key(seed: u8) -> Key {
    let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let mut pk = ssh_key::PublicKey::from(ssh_key::public::KeyData::Ed25519(
        ssh_key::public::Ed25519PublicKey(sk.verifying_key().to_bytes()),
    ));
    pk.set_comment(format!("key{seed}"));
    Key {
        line: pk.to_openssh().unwrap(),
        sk,
    }
}

async fn start(dir: &Path, enrolled: &[&Key]) -> RunningCoordinator {
    logs();
    let keys = dir.join("builder_keys");
    let text: String = enrolled.iter().map(|k| format!("{}\n", k.line)).collect();
    std::fs::write(&keys, text).unwrap();
    let mut config = CoordinatorConfig::new(dir.join("state"));
    config.grpc = "127.0.0.1:0".into();
    config.http = "127.0.0.1:0".into();
    config.ssh = "127.0.0.1:0".into();
    config.cache_key_name = Some("farm-test".into());
    config.builder_keys = Some(keys);
    config.builder_grace = Duration::from_secs(2);
    authorize_operator(&mut config, dir);
    farm_coordinator::start(config).await.unwrap()
}

/// The operator key every test's FarmService calls sign with (an admin:
/// a coordinator without key files accepts nobody).
fn operator() -> farm_common::sign::CliSigner {
    let sk = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let line = farm_common::keys::public_key_line_ed25519(&sk.verifying_key().to_bytes());
    farm_common::sign::CliSigner::new(sk, line)
}

/// Authorizes [`operator`] as admin in `config` (its key file under `dir`).
fn authorize_operator(config: &mut CoordinatorConfig, dir: &Path) {
    let file = dir.join("admin_keys");
    std::fs::write(&file, format!("{} operator\n", operator().public_line())).unwrap();
    config.keys.admin = Some(file);
}

/// A FarmService client signing as [`operator`] for the coordinator it reached.
struct Farm {
    inner: FarmServiceClient<Channel>,
    signer: farm_common::sign::CliSigner,
    identity: String,
}

async fn farm(ch: Channel) -> Farm {
    let mut inner = FarmServiceClient::new(ch);
    let identity = farm_common::sign::learn_identity(&mut inner).await.unwrap();
    Farm {
        inner,
        signer: operator(),
        identity,
    }
}

impl Farm {
    fn signed<T: prost::Message>(&self, msg: T, method: &str) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        self.signer.sign(&mut req, method, &self.identity);
        req
    }

    async fn status(
        &mut self,
        m: v1::StatusRequest,
    ) -> Result<tonic::Response<v1::StatusResponse>, tonic::Status> {
        let r = self.signed(m, farm_proto::auth::methods::STATUS);
        self.inner.status(r).await
    }

    async fn submit(
        &mut self,
        m: v1::SubmitRequest,
    ) -> Result<tonic::Response<tonic::Streaming<v1::BuildEvent>>, tonic::Status> {
        let r = self.signed(m, farm_proto::auth::methods::SUBMIT);
        self.inner.submit(r).await
    }

    async fn logs(
        &mut self,
        m: v1::LogsRequest,
    ) -> Result<tonic::Response<tonic::Streaming<v1::LogChunk>>, tonic::Status> {
        let r = self.signed(m, farm_proto::auth::methods::LOGS);
        self.inner.logs(r).await
    }

    async fn watch(
        &mut self,
        m: v1::WatchRequest,
    ) -> Result<tonic::Response<tonic::Streaming<v1::BuildEvent>>, tonic::Status> {
        let r = self.signed(m, farm_proto::auth::methods::WATCH);
        self.inner.watch(r).await
    }

    async fn machines(
        &mut self,
        m: v1::MachinesRequest,
    ) -> Result<tonic::Response<v1::MachinesResponse>, tonic::Status> {
        let r = self.signed(m, farm_proto::auth::methods::MACHINES);
        self.inner.machines(r).await
    }

    async fn query_valid_paths(
        &mut self,
        m: v1::QueryValidPathsRequest,
    ) -> Result<tonic::Response<v1::QueryValidPathsResponse>, tonic::Status> {
        let r = self.signed(m, farm_proto::auth::methods::QUERY_VALID_PATHS);
        self.inner.query_valid_paths(r).await
    }

    async fn upload_nar(
        &mut self,
        msgs: Vec<v1::UploadNarRequest>,
    ) -> Result<tonic::Response<v1::UploadNarResponse>, tonic::Status> {
        let header = self.signed(msgs[0].clone(), farm_proto::auth::methods::UPLOAD_NAR);
        let (md, ext, _) = header.into_parts();
        self.inner
            .upload_nar(tonic::Request::from_parts(
                md,
                ext,
                tokio_stream::iter(msgs),
            ))
            .await
    }
}

async fn channel(c: &RunningCoordinator) -> Channel {
    Channel::from_shared(c.endpoints().grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

struct TestBuilder {
    tx: mpsc::Sender<v1::BuilderMessage>,
    rx: tonic::Streaming<v1::CoordinatorMessage>,
    token: String,
    client: BuilderServiceClient<Channel>,
    welcome: v1::Welcome,
}

fn up(m: Up) -> v1::BuilderMessage {
    v1::BuilderMessage { msg: Some(m) }
}

/// Connect and authenticate; `sign_as` signs the challenge (normally the same key).
async fn connect(
    ch: Channel,
    name: &str,
    key: &Key,
    sign_as: &Key,
    running: Vec<String>,
) -> Result<TestBuilder, tonic::Status> {
    connect_holding(ch, name, key, sign_as, running, vec![]).await
}

/// [`connect`], also listing jobs whose results the builder holds.
async fn connect_holding(
    ch: Channel,
    name: &str,
    key: &Key,
    sign_as: &Key,
    running: Vec<String>,
    finished: Vec<String>,
) -> Result<TestBuilder, tonic::Status> {
    let mut client = BuilderServiceClient::new(ch);
    let (tx, rx) = mpsc::channel(64);
    tx.send(up(Up::Hello(v1::Hello {
        name: name.into(),
        public_key: key.line.clone(),
        capabilities: Some(v1::Capabilities {
            systems: vec!["x86_64-linux".into()],
            supported_features: vec![],
            mandatory_features: vec![],
            max_jobs: 4,
            speed_factor: 1.0,
            cores: 2,
            memory_bytes: 1 << 30,
            nix_version: "2.8.1".into(),
        }),
        version: "test".into(),
        running_jobs: running,
        finished_jobs: finished,
    })))
    .await
    .unwrap();
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let nonce = match inbound.message().await?.and_then(|m| m.msg) {
        Some(Down::Challenge(c)) => c.nonce,
        other => panic!("expected a challenge, got {other:?}"),
    };
    assert_eq!(nonce.len(), 32);
    let sig = sign_as
        .sk
        .sign(&farm_proto::auth::builder_auth_message(&nonce, name));
    tx.send(up(Up::ChallengeResponse(v1::ChallengeResponse {
        signature: sig.to_bytes().to_vec(),
    })))
    .await
    .unwrap();
    let welcome = match inbound.message().await?.and_then(|m| m.msg) {
        Some(Down::Welcome(w)) => w,
        other => panic!("expected welcome, got {other:?}"),
    };
    Ok(TestBuilder {
        tx,
        rx: inbound,
        token: welcome.session_token.clone(),
        client,
        welcome,
    })
}

fn with_session<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(farm_proto::auth::SESSION_METADATA, token.parse().unwrap());
    r
}

/// A real NAR of a regular file with `contents`.
async fn nar_of(contents: &[u8]) -> (Vec<u8>, farm_nix::nar::NarSummary) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, contents).unwrap();
    let mut out = Vec::new();
    let summary = farm_nix::nar::dump_path(&f, &mut out).await.unwrap();
    (out, summary)
}

fn upload_requests(info: v1::PathInfo, nar: Vec<u8>) -> Vec<v1::UploadNarRequest> {
    let mut v = vec![v1::UploadNarRequest {
        msg: Some(v1::upload_nar_request::Msg::Info(info)),
    }];
    for c in nar.chunks(1000) {
        v.push(v1::UploadNarRequest {
            msg: Some(v1::upload_nar_request::Msg::Data(c.to_vec())),
        });
    }
    v
}

async fn path_info_for(
    path: &StorePath,
    contents: &[u8],
    refs: &[StorePath],
) -> (v1::PathInfo, Vec<u8>) {
    let (nar, summary) = nar_of(contents).await;
    let info = v1::PathInfo {
        store_path: path.to_string(),
        deriver: String::new(),
        nar_hash: summary.nar_hash.to_nix32_prefixed(),
        nar_size: summary.nar_size,
        references: refs.iter().map(|r| r.to_string()).collect(),
        sigs: vec![],
        ca: String::new(),
    };
    (info, nar)
}

/// Upload through FarmService (what `farm build` does for .drv files and sources).
async fn cli_upload(ch: Channel, path: &StorePath, contents: &[u8], refs: &[StorePath]) {
    let (info, nar) = path_info_for(path, contents, refs).await;
    let mut farm = farm(ch).await;
    farm.upload_nar(upload_requests(info, nar)).await.unwrap();
}

/// A test derivation: one output `out`, depending on `deps` (their `out`) and `srcs`.
struct TestDrv {
    modulo: farm_nix::Hash,
    drv_path: StorePath,
    out: StorePath,
    drv: Derivation,
}

/// Where Nix would put `drv`: a text path of its ATerm, referring to its inputs.
fn drv_path_of(name: &str, drv: &Derivation) -> StorePath {
    drv.drv_path(name).unwrap()
}

fn test_drv(name: &str, deps: &[&TestDrv], srcs: &[StorePath]) -> TestDrv {
    test_drv_for("x86_64-linux", name, deps, srcs)
}

/// A derivation whose output path is the one Nix would compute (the farm
/// checks it), for `system`.
fn test_drv_for(system: &str, name: &str, deps: &[&TestDrv], srcs: &[StorePath]) -> TestDrv {
    let mut env = BTreeMap::new();
    env.insert("out".into(), "".into());
    env.insert("name".into(), name.into());
    let mut drv = Derivation {
        outputs: BTreeMap::from([(
            "out".to_string(),
            DerivationOutput {
                path: Some(sp(name)),
                hash_algo: String::new(),
                hash: String::new(),
            },
        )]),
        input_drvs: deps
            .iter()
            .map(|d| (d.drv_path.clone(), BTreeSet::from(["out".to_string()])))
            .collect(),
        input_srcs: srcs.iter().cloned().collect(),
        platform: system.into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "echo".into()],
        env,
    };
    let modulo = |p: &StorePath| {
        deps.iter()
            .find(|d| &d.drv_path == p)
            .map(|d| d.modulo.clone())
    };
    let out = drv.computed_output_paths(name, &modulo).unwrap()["out"].clone();
    drv.outputs.get_mut("out").unwrap().path = Some(out.clone());
    drv.env.insert("out".into(), out.to_string().into());
    TestDrv {
        modulo: farm_nix::derivation::hash_derivation_modulo(&drv, &modulo).unwrap(),
        drv_path: drv_path_of(name, &drv),
        out,
        drv,
    }
}

async fn upload_drv(ch: Channel, d: &TestDrv) {
    let mut refs: Vec<StorePath> = d.drv.input_drvs.keys().cloned().collect();
    refs.extend(d.drv.input_srcs.iter().cloned());
    cli_upload(ch, &d.drv_path, &d.drv.to_aterm(), &refs).await;
}

/// Serve jobs until `stop` jobs have been built: check the job, send a log
/// line, upload the output, report BUILT. Returns the derivations built.
async fn serve_jobs(b: &mut TestBuilder, stop: usize) -> Vec<(String, Vec<String>)> {
    let mut built = Vec::new();
    while built.len() < stop {
        let msg = tokio::time::timeout(Duration::from_secs(30), b.rx.message())
            .await
            .expect("a job in time")
            .unwrap()
            .unwrap();
        let Some(Down::Job(job)) = msg.msg else {
            continue;
        };
        let drv = Derivation::parse_aterm(&job.drv_aterm).unwrap();
        // every input in the cache, dependencies first
        let mut q = b.client.clone();
        let infos = q
            .query_path_infos(with_session(
                v1::QueryPathInfosRequest {
                    store_paths: job.input_paths.clone(),
                },
                &b.token,
            ))
            .await
            .unwrap()
            .into_inner()
            .infos;
        assert_eq!(
            infos.len(),
            job.input_paths.len(),
            "inputs are in the cache"
        );
        for (i, p) in job.input_paths.iter().enumerate() {
            let info = infos.iter().find(|x| &x.store_path == p).unwrap();
            for r in &info.references {
                if r != p {
                    let j = job.input_paths.iter().position(|x| x == r).unwrap();
                    assert!(j < i, "{r} comes before {p}");
                }
            }
        }
        b.tx.send(up(Up::Started(v1::JobStarted {
            job_id: job.job_id.clone(),
        })))
        .await
        .unwrap();
        b.tx.send(up(Up::Log(v1::JobLog {
            job_id: job.job_id.clone(),
            data: format!("building {}\n", job.drv_path).into_bytes(),
        })))
        .await
        .unwrap();
        let out = drv.outputs["out"].path.clone().unwrap();
        let refs: Vec<StorePath> = job
            .input_paths
            .iter()
            .map(|p| StorePath::parse(p).unwrap())
            .collect();
        // The output names its inputs, as real outputs do (the cache checks
        // each reference occurs in the NAR).
        let names: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
        let (info, nar) = path_info_for(
            &out,
            format!("output of {} using {}", job.drv_path, names.join(" ")).as_bytes(),
            &refs,
        )
        .await;
        let mut client = b.client.clone();
        let mut req = tonic::Request::new(tokio_stream::iter(upload_requests(info, nar)));
        req.metadata_mut()
            .insert(farm_proto::auth::SESSION_METADATA, b.token.parse().unwrap());
        client.upload_nar(req).await.unwrap();
        b.tx.send(up(Up::Result(v1::JobResult {
            job_id: job.job_id.clone(),
            status: v1::JobStatus::Built as i32,
            error_message: String::new(),
            outputs: [("out".to_string(), out.to_string())].into(),
            start_time_unix: 0,
            stop_time_unix: 0,
            bytes_downloaded: 0,
            bytes_uploaded: 0,
        })))
        .await
        .unwrap();
        built.push((job.drv_path.clone(), job.input_paths.clone()));
    }
    built
}

async fn events_until_done(
    mut s: tonic::Streaming<v1::BuildEvent>,
) -> (Vec<v1::BuildEvent>, v1::SubmissionDone) {
    let mut all = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(60), s.message())
            .await
            .expect("events in time")
            .unwrap()
            .expect("stream ends after done");
        if let Some(Ev::Done(d)) = &e.event {
            let d = d.clone();
            all.push(e);
            return (all, d);
        }
        all.push(e);
    }
}

// ───────────────────────────── tests ─────────────────────────────

#[test]
fn builder_handshake_accepts_enrolled_refuses_others() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("builder_handshake_accepts_enrolled_refuses_others")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        builder_handshake_accepts_enrolled_refuses_others_body().await;
        Ok(())
    })
}

async fn builder_handshake_accepts_enrolled_refuses_others_body() {
    let dir = tempfile::tempdir().unwrap();
    let good = key(1);
    let stranger = key(2);
    let c = start(dir.path(), &[&good]).await;
    let ch = channel(&c).await;

    // enrolled key: welcomed with a session token and the cache key
    let b = connect(ch.clone(), "good-builder", &good, &good, vec![])
        .await
        .unwrap();
    assert_eq!(b.token.len(), 64);
    assert_eq!(b.welcome.cache_public_key, c.endpoints().cache_public_key);
    assert!(!b.welcome.draining);

    // data calls need the token
    let mut client = BuilderServiceClient::new(ch.clone());
    let err = client
        .query_path_infos(v1::QueryPathInfosRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client
        .query_path_infos(with_session(v1::QueryPathInfosRequest::default(), "nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    client
        .query_path_infos(with_session(v1::QueryPathInfosRequest::default(), &b.token))
        .await
        .unwrap();

    // a builder may not publish a path that is no output of a job it runs
    let (info, nar) = path_info_for(&sp("not-a-job-output"), b"planted", &[]).await;
    let err = client
        .upload_nar(with_session(
            tokio_stream::iter(upload_requests(info, nar)),
            &b.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not an output"), "{}", err.message());
    let farm_check = farm(ch.clone())
        .await
        .query_valid_paths(v1::QueryValidPathsRequest {
            store_paths: vec![sp("not-a-job-output").to_string()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(farm_check.valid.is_empty(), "nothing was published");

    // unknown key: refused before any challenge, and logged
    let err = connect(ch.clone(), "stranger-builder", &stranger, &stranger, vec![])
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("not enrolled"), "{}", err.message());
    assert!(logged(&[
        "refused builder",
        "stranger-builder",
        "not enrolled"
    ]));

    // enrolled key, signature by another key: refused after the challenge, logged
    let err = connect(ch.clone(), "forger-builder", &good, &stranger, vec![])
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(logged(&[
        "refused builder",
        "forger-builder",
        "bad challenge signature"
    ]));

    // the status shows the good builder online
    let mut farm = farm(ch.clone()).await;
    let st = farm
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = st.builders.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, vec!["good-builder"]);
    assert_eq!(st.builders[0].state, v1::BuilderState::Idle as i32);
    drop(b);
    c.shutdown().await.unwrap();
}

#[test]
fn a_builder_name_stays_bound_to_its_key() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("a_builder_name_stays_bound_to_its_key")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        a_builder_name_stays_bound_to_its_key_body().await;
        Ok(())
    })
}

async fn a_builder_name_stays_bound_to_its_key_body() {
    let dir = tempfile::tempdir().unwrap();
    let first = key(11);
    let second = key(12);
    let c = start(dir.path(), &[&first, &second]).await;
    let ch = channel(&c).await;
    let b = connect(ch.clone(), "named", &first, &first, vec![])
        .await
        .unwrap();
    drop(b);
    // wait until it is offline
    let mut farm = farm(ch.clone()).await;
    loop {
        let st = farm
            .status(v1::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.builders[0].state == v1::BuilderState::Offline as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // another enrolled key may not take the name, even with the first one offline
    let err = connect(ch.clone(), "named", &second, &second, vec![])
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("--builder-keys"),
        "{}",
        err.message()
    );
    // the first key still can
    let b = connect(ch.clone(), "named", &first, &first, vec![])
        .await
        .unwrap();
    drop(b);
    // once the old key is no longer enrolled, the name can be re-enrolled
    std::fs::write(
        dir.path().join("builder_keys"),
        format!("{}\n", second.line),
    )
    .unwrap();
    connect(ch.clone(), "named", &second, &second, vec![])
        .await
        .unwrap();
    c.shutdown().await.unwrap();
}

#[test]
fn a_job_that_ended_while_its_builder_was_away_is_kept_and_its_result_acknowledged()
-> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new(
        "a_job_that_ended_while_its_builder_was_away_is_kept_and_its_result_acknowledged",
    )?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        a_job_that_ended_while_its_builder_was_away_is_kept_and_its_result_acknowledged_body()
            .await;
        Ok(())
    })
}

async fn a_job_that_ended_while_its_builder_was_away_is_kept_and_its_result_acknowledged_body() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(9);
    let c = start(dir.path(), &[&k]).await;
    let ch = channel(&c).await;
    let mut b = connect(ch.clone(), "away", &k, &k, vec![]).await.unwrap();
    let d = test_drv("away-one", &[], &[]);
    upload_drv(ch.clone(), &d).await;
    let mut farm = farm(ch.clone()).await;
    let events = farm
        .submit(v1::SubmitRequest {
            drv_paths: vec![d.drv_path.to_string()],
            priority: v1::Priority::Interactive as i32,
            max_silent_time_secs: 0,
            build_timeout_secs: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let job = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), b.rx.message())
            .await
            .expect("a job in time")
            .unwrap()
            .unwrap();
        if let Some(Down::Job(job)) = msg.msg {
            break job;
        }
    };

    // The link drops; the job ends meanwhile; the builder is back (within the
    // grace) holding its result.
    drop(b);
    let mut b = connect_holding(ch.clone(), "away", &k, &k, vec![], vec![job.job_id.clone()])
        .await
        .unwrap();
    let (info, nar) = path_info_for(&d.out, b"output of away-one", &[]).await;
    let mut client = b.client.clone();
    let mut req = tonic::Request::new(tokio_stream::iter(upload_requests(info, nar)));
    req.metadata_mut()
        .insert(farm_proto::auth::SESSION_METADATA, b.token.parse().unwrap());
    client
        .upload_nar(req)
        .await
        .expect("still its job: the output is accepted");
    b.tx.send(up(Up::Result(v1::JobResult {
        job_id: job.job_id.clone(),
        status: v1::JobStatus::Built as i32,
        outputs: [("out".to_string(), d.out.to_string())].into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    // Acknowledged; neither cancelled nor sent again meanwhile.
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), b.rx.message())
            .await
            .expect("an acknowledgement in time")
            .unwrap()
            .unwrap();
        match msg.msg {
            Some(Down::ResultAck(a)) if a.job_id == job.job_id => break,
            Some(Down::Job(j)) => panic!("sent again: {j:?}"),
            Some(Down::Cancel(x)) => panic!("cancelled: {x:?}"),
            _ => {}
        }
    }
    // The one result sent is what finished it (a requeue would have sent the
    // job again and ignored that result).
    let (all, done) = events_until_done(events).await;
    assert!(done.success, "{all:?}");
    assert_eq!((done.built, done.failed), (1, 0), "{all:?}");
    // (a submit stream may repeat an event; distinct ones count)
    let mut starts: Vec<&v1::BuildStarted> = Vec::new();
    for e in &all {
        if let Some(Ev::Started(s)) = &e.event
            && !starts.contains(&s)
        {
            starts.push(s);
        }
    }
    assert_eq!(starts.len(), 1, "started once: {all:?}");
}

#[test]
fn submitted_graph_is_built_once_in_dependency_order() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("submitted_graph_is_built_once_in_dependency_order")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        submitted_graph_is_built_once_in_dependency_order_body().await;
        Ok(())
    })
}

async fn submitted_graph_is_built_once_in_dependency_order_body() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(3);
    let c = start(dir.path(), &[&k]).await;
    let ch = channel(&c).await;
    let mut b = connect(ch.clone(), "worker", &k, &k, vec![]).await.unwrap();

    // a source, and base <- mid <- top, plus side <- top
    let src = sp("source.txt");
    cli_upload(ch.clone(), &src, b"some source", &[]).await;
    let base = test_drv("base", &[], std::slice::from_ref(&src));
    let mid = test_drv("mid", &[&base], &[]);
    let side = test_drv("side", &[], &[]);
    let top = test_drv("top", &[&mid, &side], std::slice::from_ref(&src));
    for d in [&base, &mid, &side, &top] {
        upload_drv(ch.clone(), d).await;
    }

    let mut farm = farm(ch.clone()).await;
    let events = farm
        .submit(v1::SubmitRequest {
            drv_paths: vec![top.drv_path.to_string()],
            priority: v1::Priority::Interactive as i32,
            max_silent_time_secs: 0,
            build_timeout_secs: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (built, (all, done)) = tokio::join!(serve_jobs(&mut b, 4), events_until_done(events));
    assert!(done.success, "{all:?}");
    assert_eq!((done.built, done.cached, done.failed), (4, 0, 0));
    let order: Vec<&str> = built.iter().map(|(d, _)| d.as_str()).collect();
    let pos = |d: &TestDrv| {
        order
            .iter()
            .position(|x| *x == d.drv_path.to_string())
            .unwrap()
    };
    assert!(pos(&base) < pos(&mid) && pos(&mid) < pos(&top) && pos(&side) < pos(&top));
    // top's inputs: the source and the outputs of mid and side, closed under references
    let top_inputs = &built[pos(&top)].1;
    for p in [&src, &mid.out, &side.out, &base.out] {
        assert!(top_inputs.contains(&p.to_string()), "{p} in {top_inputs:?}");
    }
    let submitted = all
        .iter()
        .find_map(|e| match &e.event {
            Some(Ev::Submitted(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!((submitted.total, submitted.cached), (4, 0));
    let top_finished = all
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            Some(Ev::Finished(f)) if f.drv_path == top.drv_path.to_string() => Some(f.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(top_finished.outcome, v1::BuildOutcome::Built as i32);
    assert_eq!(top_finished.outputs["out"], top.out.to_string());
    assert_eq!(top_finished.builder, "worker");

    // its log, by build id and by .drv path (stored once the build ended)
    let mut text = String::new();
    for _ in 0..50 {
        if let Ok(r) = farm
            .logs(v1::LogsRequest {
                build_id: top.drv_path.to_string(),
                follow: false,
            })
            .await
        {
            let mut s = r.into_inner();
            while let Some(c) = s.message().await.unwrap() {
                text.push_str(&String::from_utf8_lossy(&c.data));
            }
            if !text.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(text, format!("building {}\n", top.drv_path));
    let mut s = farm
        .logs(v1::LogsRequest {
            build_id: top_finished.build_id.clone(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut again = Vec::new();
    while let Some(c) = s.message().await.unwrap() {
        again.extend(c.data);
    }
    assert_eq!(String::from_utf8(again).unwrap(), text);

    // the same graph again: nothing to build, the root is cached
    let events = farm
        .submit(v1::SubmitRequest {
            drv_paths: vec![top.drv_path.to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (all, done) = events_until_done(events).await;
    assert!(done.success);
    assert_eq!((done.built, done.cached), (0, 1));
    assert!(all.iter().any(|e| matches!(&e.event,
        Some(Ev::Finished(f)) if f.outcome == v1::BuildOutcome::Cached as i32 && f.outputs["out"] == top.out.to_string())));

    // a derivation the farm cannot build fails at once, naming what is missing
    let mac = test_drv_for("aarch64-darwin", "mac-only", &[], &[]);
    upload_drv(ch.clone(), &mac).await;
    let events = farm
        .submit(v1::SubmitRequest {
            drv_paths: vec![mac.drv_path.to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (all, done) = events_until_done(events).await;
    assert!(!done.success);
    let f = all
        .iter()
        .find_map(|e| match &e.event {
            Some(Ev::Finished(f)) => Some(f.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(f.outcome, v1::BuildOutcome::Unschedulable as i32);
    assert!(
        f.error_message.contains("aarch64-darwin"),
        "{}",
        f.error_message
    );
    assert!(
        f.error_message.contains("worker (systems x86_64-linux"),
        "{}",
        f.error_message
    );

    // a .drv the cache does not have is refused up front
    let err = farm
        .submit(v1::SubmitRequest {
            drv_paths: vec![sp("absent.drv").to_string()],
            ..Default::default()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("not in the farm's cache"),
        "{}",
        err.message()
    );

    // machines: the farm as one builder
    let m = farm
        .machines(v1::MachinesRequest::default())
        .await
        .unwrap()
        .into_inner();
    // the real host in the URI; its port (not 22 here) in the ssh_config
    let (ssh_host, ssh_port) = c.endpoints().ssh.rsplit_once(':').unwrap();
    assert!(
        m.machines_line
            .starts_with(&format!("ssh-ng://{ssh_host} x86_64-linux - 4 1 - - ")),
        "{}",
        m.machines_line
    );
    assert_eq!(
        m.ssh_config,
        format!("Host {ssh_host}\n  Port {ssh_port}\n  HostKeyAlias {ssh_host}\n")
    );
    assert!(
        m.nix_conf_lines
            .iter()
            .any(|l| l.contains(&c.endpoints().cache_public_key))
    );
    c.shutdown().await.unwrap();
}

#[test]
fn restart_finishes_the_graph_without_rebuilding() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("restart_finishes_the_graph_without_rebuilding")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        restart_finishes_the_graph_without_rebuilding_body().await;
        Ok(())
    })
}

async fn restart_finishes_the_graph_without_rebuilding_body() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(4);
    let first = test_drv("r-first", &[], &[]);
    let second = test_drv("r-second", &[&first], &[]);
    let third = test_drv("r-third", &[&second], &[]);
    let sid;
    {
        let c = start(dir.path(), &[&k]).await;
        let ch = channel(&c).await;
        let mut b = connect(ch.clone(), "rb", &k, &k, vec![]).await.unwrap();
        for d in [&first, &second, &third] {
            upload_drv(ch.clone(), d).await;
        }
        let mut farm = farm(ch.clone()).await;
        let mut events = farm
            .submit(v1::SubmitRequest {
                drv_paths: vec![third.drv_path.to_string()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        sid = match events.message().await.unwrap().unwrap().event {
            Some(Ev::Submitted(s)) => s.submission_id,
            other => panic!("{other:?}"),
        };
        let built = serve_jobs(&mut b, 1).await;
        assert_eq!(built[0].0, first.drv_path.to_string());
        // wait until the coordinator has taken the result
        loop {
            let st = farm
                .status(v1::StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if st
                .running
                .iter()
                .any(|r| r.drv_path == second.drv_path.to_string())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(b);
        c.shutdown().await.unwrap();
    }
    let c = start(dir.path(), &[&k]).await;
    let ch = channel(&c).await;
    let mut farm = farm(ch.clone()).await;
    let events = farm
        .watch(v1::WatchRequest {
            submission_id: sid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // the builder comes back without its job: it is sent again after the restart
    let mut b = connect(ch.clone(), "rb", &k, &k, vec![]).await.unwrap();
    let (built, (_, done)) = tokio::join!(serve_jobs(&mut b, 2), events_until_done(events));
    let order: Vec<String> = built.into_iter().map(|(d, _)| d).collect();
    assert_eq!(
        order,
        vec![second.drv_path.to_string(), third.drv_path.to_string()]
    );
    assert!(done.success);
    assert_eq!(done.built, 3);
    c.shutdown().await.unwrap();
}

#[test]
fn grpc_over_tls_with_the_pinned_certificate() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("grpc_over_tls_with_the_pinned_certificate")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        grpc_over_tls_with_the_pinned_certificate_body().await;
        Ok(())
    })
}

async fn grpc_over_tls_with_the_pinned_certificate_body() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoordinatorConfig::new(dir.path().join("state"));
    config.grpc = "127.0.0.1:0".into();
    config.http = "127.0.0.1:0".into();
    config.ssh = "127.0.0.1:0".into();
    config.tls = farm_coordinator::config::TlsMode::On;
    authorize_operator(&mut config, dir.path());
    let c = farm_coordinator::start(config).await.unwrap();
    let e = c.endpoints().clone();
    assert!(e.grpc_tls);
    let pem = std::fs::read(e.tls_cert.as_ref().unwrap()).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name("127.0.0.1");
    let ch = Channel::from_shared(e.grpc_url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut farm = farm(ch).await;
    farm.status(v1::StatusRequest {}).await.unwrap();
    // plaintext to the TLS port fails
    let plain = Channel::from_shared(format!("http://{}", e.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(
            FarmServiceClient::new(ch)
                .status(v1::StatusRequest {})
                .await
                .is_err()
        );
    }
    c.shutdown().await.unwrap();
}
