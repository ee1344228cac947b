//! The queue case: a real coordinator holding 100 000 queued derivations
//! while 1 000 builders are online, its memory against the 100 MB.
//!
//! The builders are simulated at the protocol level, from this process: each
//! one its own gRPC connection and `Session` stream (`Hello` → `Challenge` →
//! `ChallengeResponse` → `Welcome`, its key enrolled in `--builder-keys`), one
//! slot, a `LoadReport` once online, and any job it is sent held without an
//! answer: so 1 000 builds run and 99 000 stay queued. The 100 000 `.drv`
//! files are written here (ATerm text, output and `.drv` paths computed by
//! farm-nix as Nix computes them; `nix-instantiate` takes minutes at that
//! size) and uploaded as `farm build` uploads them (`FarmService.UploadNar`,
//! signed with a push-level key), then one `Submit` of all of them. The RSS
//! is read from `/proc/PID/status` (`VmRSS` now, `VmHWM` its peak).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use ed25519_dalek::Signer as _;
use farm_nix::derivation::{Derivation, DerivationOutput};
use farm_nix::hash::HashAlgo;
use farm_proto::v1;
use farm_proto::v1::build_event::Event as Ev;
use farm_proto::v1::builder_message::Msg as Up;
use farm_proto::v1::builder_service_client::BuilderServiceClient;
use farm_proto::v1::coordinator_message::Msg as Down;
use farm_tests::{ClientKey, Coordinator, SignedClient, SshAccess, TestLogs};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::report::{CaseReport, Figure};
use crate::run::nonce;

/// Derivations submitted (all runnable: none has an input).
pub const DRVS: usize = 100_000;
/// Simulated builders, one slot each.
pub const BUILDERS: usize = 1_000;
/// Concurrent `UploadNar` calls (each its own signed call, as `farm build`'s).
const UPLOADERS: usize = 32;
/// Builder handshakes in flight at once.
const HANDSHAKES: usize = 64;
/// How long the jobs may take to reach the builders after the submit.
const DISPATCH_WAIT: Duration = Duration::from_secs(300);

/// `VmRSS` and `VmHWM` of `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{line:?}"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// One generated derivation: its `.drv` path and the NAR of its ATerm.
struct Drv {
    path: String,
    nar: Vec<u8>,
    info: v1::PathInfo,
}

/// `n` trivial derivations without inputs, named `{salt}-{i}`, with the
/// paths Nix would give them.
fn derivations(salt: &str, n: usize) -> anyhow::Result<Vec<Drv>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{salt}-{i}");
        let mut env = BTreeMap::new();
        env.insert("builder".into(), "/bin/sh".into());
        env.insert("name".into(), name.clone().into());
        env.insert("out".into(), "".into());
        env.insert("system".into(), "x86_64-linux".into());
        let mut drv = Derivation {
            outputs: BTreeMap::from([(
                "out".to_string(),
                DerivationOutput {
                    // Any path: input-addressed paths are computed with the
                    // outputs masked; replaced below.
                    path: Some(farm_nix::store_path::StorePath::from_digest(
                        &[0; 20], &name,
                    )?),
                    hash_algo: String::new(),
                    hash: String::new(),
                },
            )]),
            input_drvs: BTreeMap::new(),
            input_srcs: BTreeSet::new(),
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), format!("echo {i} > $out").into()],
            env,
        };
        let no_inputs = |_: &farm_nix::store_path::StorePath| None;
        let outs = drv
            .computed_output_paths(&name, &no_inputs)
            .with_context(|| format!("output path of {name}"))?;
        let o = outs["out"].clone();
        drv.env.insert("out".into(), o.to_string().into());
        if let Some(d) = drv.outputs.get_mut("out") {
            d.path = Some(o);
        }
        drv.check_output_paths(&name, &no_inputs)?;
        let path = drv.drv_path(&name)?.to_string();
        let nar = farm_nix::nar::nar_of_bytes(&drv.to_aterm());
        let info = v1::PathInfo {
            store_path: path.clone(),
            deriver: String::new(),
            nar_hash: HashAlgo::Sha256.digest(&nar).to_nix32_prefixed(),
            nar_size: nar.len() as u64,
            references: vec![],
            sigs: vec![],
            ca: String::new(),
        };
        out.push(Drv { path, nar, info });
    }
    Ok(out)
}

/// A simulated builder's key: the signing half and its OpenSSH line.
struct BuilderKey {
    name: String,
    sk: ed25519_dalek::SigningKey,
    line: String,
}

fn builder_key(name: String) -> anyhow::Result<BuilderKey> {
    let sk = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let mut pk = ssh_key::PublicKey::from(ssh_key::public::KeyData::Ed25519(
        ssh_key::public::Ed25519PublicKey(sk.verifying_key().to_bytes()),
    ));
    pk.set_comment(format!("{name}@farm-bench"));
    Ok(BuilderKey {
        line: pk.to_openssh()?,
        name,
        sk,
    })
}

/// What the simulated builders saw, shared by their tasks.
#[derive(Default)]
struct Seen {
    online: AtomicUsize,
    jobs: AtomicUsize,
    ended: AtomicUsize,
}

/// One simulated builder: handshake, one load report, then hold every job
/// (never answer) until the coordinator ends the stream.
async fn builder(
    url: String,
    key: BuilderKey,
    seen: Arc<Seen>,
    gate: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let permit = gate.acquire_owned().await?;
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let mut client = BuilderServiceClient::new(channel);
    let up = |m: Up| v1::BuilderMessage { msg: Some(m) };
    let (tx, rx) = mpsc::channel(8);
    tx.send(up(Up::Hello(v1::Hello {
        name: key.name.clone(),
        public_key: key.line.clone(),
        capabilities: Some(v1::Capabilities {
            systems: vec!["x86_64-linux".into()],
            supported_features: vec![],
            mandatory_features: vec![],
            max_jobs: 1,
            speed_factor: 1.0,
            cores: 1,
            memory_bytes: 1 << 30,
            nix_version: "2.8.1".into(),
        }),
        version: "farm-bench".into(),
        running_jobs: vec![],
        finished_jobs: vec![],
    })))
    .await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let nonce = match inbound.message().await?.and_then(|m| m.msg) {
        Some(Down::Challenge(c)) => c.nonce,
        other => bail!("{}: expected a challenge, got {other:?}", key.name),
    };
    let sig = key
        .sk
        .sign(&farm_proto::auth::builder_auth_message(&nonce, &key.name));
    tx.send(up(Up::ChallengeResponse(v1::ChallengeResponse {
        signature: sig.to_bytes().to_vec(),
    })))
    .await?;
    match inbound.message().await?.and_then(|m| m.msg) {
        Some(Down::Welcome(_)) => {}
        other => bail!("{}: expected welcome, got {other:?}", key.name),
    }
    tx.send(up(Up::Load(v1::LoadReport {
        running_jobs: 0,
        load_avg_1: 0.0,
        load_avg_5: 0.0,
        memory_available_bytes: 1 << 30,
        disk_free_bytes: 10 << 30,
        cpu_pressure: -1.0,
        memory_pressure: -1.0,
        io_pressure: -1.0,
        store_problem: String::new(),
    })))
    .await?;
    seen.online.fetch_add(1, Ordering::SeqCst);
    drop(permit);
    // Hold: count jobs, answer none; `tx` stays alive so the session does.
    let mut held = Vec::new();
    loop {
        match inbound.message().await {
            Ok(Some(v1::CoordinatorMessage {
                msg: Some(Down::Job(j)),
            })) => {
                held.push(j.job_id);
                seen.jobs.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    seen.ended.fetch_add(1, Ordering::SeqCst);
    drop(tx);
    Ok(())
}

/// Polls `cond` every 100 ms until it holds or `limit` passes.
async fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            bail!("{what}: not within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub fn run(logs: &TestLogs) -> anyhow::Result<CaseReport> {
    let mut report = CaseReport::new(
        "queue100k",
        format!(
            "a real coordinator; {BUILDERS} simulated builders (one gRPC connection and Session each, 1 slot, jobs held unanswered); \
             {DRVS} trivial derivations without inputs, .drv files generated and uploaded with a push key ({UPLOADERS} concurrent UploadNar), \
             one Submit of all: {BUILDERS} run, {} stay queued; MB = 10^6 bytes",
            DRVS - BUILDERS
        ),
    );
    let salt = format!("q{}", nonce());
    let keys_dir = tempfile::Builder::new()
        .prefix("farm-bench-queue-keys-")
        .tempdir()?;
    let mut keys = Vec::with_capacity(BUILDERS);
    for i in 0..BUILDERS {
        keys.push(builder_key(format!("sim-{i:04}"))?);
    }
    let keys_file = keys_dir.path().join("builder_keys");
    let lines: String = keys.iter().map(|k| format!("{}\n", k.line)).collect();
    std::fs::write(&keys_file, lines)?;
    let access = SshAccess::named(&[], &["pusher"])?;
    let mut args = vec![
        "--builder-keys".to_owned(),
        keys_file.display().to_string(),
        "--cache-key-name".to_owned(),
        "farm-bench".to_owned(),
    ];
    args.extend(access.coordinator_args());
    let coordinator = Coordinator::start_signed(logs, &args, access.probe_key()?)?;
    let pid = coordinator.process.pid();
    let url = coordinator.grpc_url();
    let push_key = ClientKey::load(access.admin_keys.first().context("no push key")?)?;

    std::thread::sleep(Duration::from_secs(1));
    let (idle_rss, idle_hwm) = rss(pid)?;

    let t = Instant::now();
    let drvs = Arc::new(derivations(&salt, DRVS)?);
    let generated = t.elapsed();
    let drv_bytes: usize = drvs.iter().map(|d| d.nar.len()).sum();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async move {
        // 1. The builders come online.
        let seen = Arc::new(Seen::default());
        let gate = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for key in keys {
            tasks.spawn(builder(url.clone(), key, seen.clone(), gate.clone()));
        }
        let s = seen.clone();
        let online = tokio::select! {
            r = wait_for("every simulated builder online", Duration::from_secs(300), || {
                s.online.load(Ordering::SeqCst) == BUILDERS
            }) => r,
            Some(r) = tasks.join_next() => match r {
                Ok(Err(e)) => Err(e.context("a simulated builder failed")),
                Ok(Ok(())) => Err(anyhow::anyhow!("a simulated builder's session ended early")),
                Err(e) => Err(e.into()),
            },
        };
        online?;
        let online_took = t.elapsed();
        let (online_rss, _) = rss(pid)?;

        // 2. The .drv files, uploaded as `farm build` uploads them.
        let t = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let mut uploads = tokio::task::JoinSet::new();
        for _ in 0..UPLOADERS {
            let (drvs, next, url, key) = (drvs.clone(), next.clone(), url.clone(), push_key.clone());
            uploads.spawn(async move {
                let mut client = SignedClient::connect(&url, key).await?;
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(d) = drvs.get(i) else { break };
                    let msgs = vec![
                        v1::UploadNarRequest {
                            msg: Some(v1::upload_nar_request::Msg::Info(d.info.clone())),
                        },
                        v1::UploadNarRequest {
                            msg: Some(v1::upload_nar_request::Msg::Data(d.nar.clone())),
                        },
                    ];
                    client
                        .upload_nar(futures::stream::iter(msgs))
                        .await
                        .with_context(|| format!("uploading {}", d.path))?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = uploads.join_next().await {
            r??;
        }
        let uploaded = t.elapsed();
        let (uploaded_rss, _) = rss(pid)?;

        // 3. One Submit of all of them; the time is the call's until its
        // `Submitted` event.
        let mut client = SignedClient::connect(&url, push_key.clone()).await?;
        let request = v1::SubmitRequest {
            drv_paths: drvs.iter().map(|d| d.path.clone()).collect(),
            priority: v1::Priority::Ci as i32,
            max_silent_time_secs: 0,
            build_timeout_secs: 0,
            job: String::new(),
        };
        let t = Instant::now();
        let mut events = client.submit(request).await?.into_inner();
        let submitted = loop {
            match events.message().await? {
                Some(v1::BuildEvent {
                    event: Some(Ev::Submitted(s)),
                }) => break s,
                Some(_) => continue,
                None => bail!("the submission's events ended before `Submitted`"),
            }
        };
        let submit_took = t.elapsed();
        ensure!(
            submitted.total as usize == DRVS && submitted.cached == 0,
            "submitted {} derivations, {} cached; expected {DRVS}, none cached",
            submitted.total,
            submitted.cached
        );
        // Keep reading the events, as `farm build` does.
        let counted = Arc::new(AtomicUsize::new(0));
        let c = counted.clone();
        let follower = tokio::spawn(async move {
            while let Ok(Some(_)) = events.message().await {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        let s = seen.clone();
        wait_for(
            "a job for every simulated builder",
            DISPATCH_WAIT,
            || s.jobs.load(Ordering::SeqCst) >= BUILDERS,
        )
        .await?;
        let dispatched = t.elapsed();
        // Settle: let the event stream and any deferred work catch up.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let jobs = seen.jobs.load(Ordering::SeqCst);
        ensure!(
            jobs == BUILDERS,
            "{jobs} jobs reached {BUILDERS} one-slot builders"
        );
        let status = client.status(v1::StatusRequest {}).await?.into_inner();
        let queued: u64 = status.queue.iter().map(|q| u64::from(q.queued)).sum();
        let (rss_now, hwm) = rss(pid)?;

        let budget = Figure::megabytes("goal", 100e6);
        let rss_f = Figure::megabytes(
            format!("coordinator VmRSS, {DRVS} submitted, {BUILDERS} running, {queued} queued"),
            rss_now as f64,
        );
        let hwm_f = Figure::megabytes("coordinator VmHWM (peak, whole run)", hwm as f64);
        let idle_f = Figure::megabytes("idle coordinator VmRSS", idle_rss as f64);
        report.row(&rss_f, &budget, Some("≤ 1× (≤ 100 MB)"));
        report.row(&hwm_f, &budget, Some("≤ 1× (≤ 100 MB)"));
        report.row(&rss_f, &idle_f, None);
        report.note(format!(
            "submit ({DRVS} paths in one SubmitRequest → `Submitted` event): {:.2} s; \
             first {BUILDERS} jobs at their builders {:.2} s after the call",
            submit_took.as_secs_f64(),
            dispatched.as_secs_f64()
        ));
        report.note(format!(
            "RSS along the way: idle {} (VmHWM {}); {BUILDERS} builders online {} (handshakes took {:.1} s); \
             after the {DRVS} uploads {}",
            mb(idle_rss),
            mb(idle_hwm),
            mb(online_rss),
            online_took.as_secs_f64(),
            mb(uploaded_rss)
        ));
        report.note(format!(
            "{DRVS} .drv files ({:.1} MB of NAR) generated in {:.2} s, uploaded in {:.1} s ({:.0} uploads/s); \
             Status: {} builders, {} running, {queued} queued; {} events read",
            drv_bytes as f64 / 1e6,
            generated.as_secs_f64(),
            uploaded.as_secs_f64(),
            DRVS as f64 / uploaded.as_secs_f64(),
            status.builders.len(),
            status.running.len(),
            counted.load(Ordering::Relaxed)
        ));
        follower.abort();
        tasks.abort_all();
        anyhow::Ok(report)
    })?;
    drop(coordinator);
    Ok(report)
}
