//! The builder's session against a stand-in coordinator (real gRPC over loopback):
//! handshake and signature, capabilities in Hello, load reports, reconnect after
//! the coordinator drops the stream, refusal of an unenrolled key, results kept
//! across sessions until acknowledged, and shutdown bounded by its grace.

mod common;

use std::time::Duration;

use common::Fake;
use std::sync::Arc;

use farm_builder::{BuilderConfig, BuilderKey};
use farm_builder::{Execute, JobContext};
use farm_proto::v1::coordinator_message::Msg as Down;
use farm_proto::v1::{CancelJob, Capabilities, Job, JobResult, JobResultAck, JobStatus};

/// Each test's hang-guard: past it the test fails instead of hanging.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// A backend that never builds (the session is what is under test).
struct NoBuild;

impl Execute for NoBuild {
    async fn execute(&self, job: Job, _ctx: JobContext) -> JobResult {
        farm_builder::failure(
            &job.job_id,
            JobStatus::MiscFailure,
            "no backend in this test",
        )
    }
}

fn caps() -> Capabilities {
    Capabilities {
        systems: vec!["x86_64-linux".into()],
        supported_features: vec!["kvm".into()],
        mandatory_features: vec![],
        max_jobs: 2,
        speed_factor: 1.5,
        cores: 2,
        memory_bytes: 1 << 30,
        nix_version: "2.8.0".into(),
    }
}

#[test]
fn connects_proves_its_key_reports_load_and_reconnects() -> anyhow::Result<()> {
    let logs = farm_testkit::TestLogs::new("connects_proves_its_key_reports_load_and_reconnects")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        connects_proves_its_key_reports_load_and_reconnects_body().await;
        Ok(())
    })
}

async fn connects_proves_its_key_reports_load_and_reconnects_body() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = BuilderConfig::new(fake.url(), dir.path());
    config.name = Some("b1".into());
    config.load_interval = Duration::from_millis(200);
    // Measured for free space: a directory that exists here.
    config.store_dir = dir.path().to_owned();
    let key = BuilderKey::generate(&config.key_path(), "b1").unwrap();
    // Only this key is enrolled.
    fake.with(|s| s.enrolled = Some(vec![key.verifying_key().to_bytes()]));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let builder = tokio::spawn(farm_builder::run_with(
        config,
        key.clone(),
        caps(),
        NoBuild,
        async {
            let _ = stop_rx.await;
        },
    ));

    fake.wait("first session", |s| s.sessions == 1).await;
    let hello = fake.with(|s| s.hellos[0].clone());
    assert_eq!(hello.name, "b1");
    assert_eq!(hello.public_key, key.public_line());
    assert_eq!(hello.capabilities, Some(caps()));
    assert!(hello.running_jobs.is_empty());

    fake.wait("load reports", |s| s.loads.len() >= 2).await;
    let load = fake.with(|s| s.loads[0].clone());
    assert_eq!(load.running_jobs, 0);
    assert!(load.disk_free_bytes > 0);

    // The coordinator drops the stream: the builder comes back on its own.
    fake.kick();
    fake.wait("second session", |s| s.sessions == 2).await;

    // A job goes through the session and its result comes back.
    fake.send(farm_proto::v1::coordinator_message::Msg::Job(Job {
        job_id: "j1".into(),
        drv_path: "/nix/store/00000000000000000000000000000000-x.drv".into(),
        ..Default::default()
    }))
    .await;
    let r = fake.wait_result("j1", Duration::from_secs(10)).await;
    assert_eq!(r.status, JobStatus::MiscFailure as i32);
    assert!(fake.with(|s| s.started.contains(&"j1".to_string())));

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), builder)
        .await
        .expect("builder stops on shutdown")
        .unwrap()
        .unwrap();
}

#[test]
fn an_unenrolled_key_is_refused_and_retried_until_enrolled() -> anyhow::Result<()> {
    let logs =
        farm_testkit::TestLogs::new("an_unenrolled_key_is_refused_and_retried_until_enrolled")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        an_unenrolled_key_is_refused_and_retried_until_enrolled_body().await;
        Ok(())
    })
}

async fn an_unenrolled_key_is_refused_and_retried_until_enrolled_body() {
    let fake = Fake::start().await;
    fake.with(|s| s.enrolled = Some(vec![]));
    let dir = tempfile::tempdir().unwrap();
    let mut config = BuilderConfig::new(fake.url(), dir.path());
    config.name = Some("b2".into());
    let key = BuilderKey::generate(&config.key_path(), "b2").unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let builder = tokio::spawn(farm_builder::run_with(
        config,
        key.clone(),
        caps(),
        NoBuild,
        async {
            let _ = stop_rx.await;
        },
    ));
    fake.wait("a refusal", |s| s.rejected >= 1).await;
    assert_eq!(fake.with(|s| s.sessions), 0);
    fake.with(|s| s.enrolled = Some(vec![key.verifying_key().to_bytes()]));
    fake.wait("a session once enrolled", |s| s.sessions == 1)
        .await;
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), builder)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[test]
fn keeps_retrying_while_the_coordinator_is_down_and_stops_promptly() -> anyhow::Result<()> {
    let logs = farm_testkit::TestLogs::new(
        "keeps_retrying_while_the_coordinator_is_down_and_stops_promptly",
    )?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        keeps_retrying_while_the_coordinator_is_down_and_stops_promptly_body().await;
        Ok(())
    })
}

async fn keeps_retrying_while_the_coordinator_is_down_and_stops_promptly_body() {
    // Nothing listens on this port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = BuilderConfig::new(format!("http://127.0.0.1:{port}"), dir.path());
    let key = BuilderKey::generate(&config.key_path(), "b3").unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let builder = tokio::spawn(farm_builder::run_with(
        config,
        key,
        caps(),
        NoBuild,
        async {
            let _ = stop_rx.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!builder.is_finished());
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), builder)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[test]
fn https_with_the_pinned_certificate_connects_and_another_certificate_does_not()
-> anyhow::Result<()> {
    let logs = farm_testkit::TestLogs::new(
        "https_with_the_pinned_certificate_connects_and_another_certificate_does_not",
    )?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        https_with_the_pinned_certificate_connects_and_another_certificate_does_not_body().await;
        Ok(())
    })
}

async fn https_with_the_pinned_certificate_connects_and_another_certificate_does_not_body() {
    // Like the coordinator's generated certificate: self-signed, for localhost and loopback IPs.
    let sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ck = rcgen::generate_simple_self_signed(sans.clone()).unwrap();
    let fake = Fake::start_tls(&ck.cert.pem(), &ck.key_pair.serialize_pem()).await;
    let dir = tempfile::tempdir().unwrap();
    let pinned = dir.path().join("coordinator.pem");
    std::fs::write(&pinned, ck.cert.pem()).unwrap();
    let other = rcgen::generate_simple_self_signed(sans).unwrap();
    let wrong = dir.path().join("other.pem");
    std::fs::write(&wrong, other.cert.pem()).unwrap();

    for (host, ca) in [
        ("127.0.0.1", &wrong),
        ("localhost", &pinned),
        ("127.0.0.1", &pinned),
    ] {
        let mut config =
            BuilderConfig::new(format!("https://{host}:{}", fake.addr.port()), dir.path());
        config.ca_cert = Some(ca.clone());
        config.name = Some("tls".into());
        let key = BuilderKey::load_or_generate(&config.key_path(), "tls")
            .unwrap()
            .0;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let before = fake.with(|s| s.sessions);
        let builder = tokio::spawn(farm_builder::run_with(
            config,
            key,
            caps(),
            NoBuild,
            async {
                let _ = stop_rx.await;
            },
        ));
        if ca == &wrong {
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(
                fake.with(|s| s.sessions),
                before,
                "connected despite a wrong pinned certificate"
            );
        } else {
            fake.wait("a TLS session", |s| s.sessions == before + 1)
                .await;
        }
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), builder)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// A backend whose jobs end (Built) when the test opens the gate, or stop
/// when cancelled; or, `stubborn`, never stop at all (a hung job).
#[derive(Clone)]
struct Gate {
    open: Arc<tokio::sync::Semaphore>,
    stubborn: bool,
}

impl Gate {
    fn new(stubborn: bool) -> Gate {
        Gate {
            open: Arc::new(tokio::sync::Semaphore::new(0)),
            stubborn,
        }
    }

    /// Let `n` jobs finish.
    fn release(&self, n: usize) {
        self.open.add_permits(n);
    }
}

impl Execute for Gate {
    async fn execute(&self, job: Job, ctx: JobContext) -> JobResult {
        if self.stubborn {
            std::future::pending::<()>().await;
        }
        tokio::select! {
            p = self.open.acquire() => {
                p.unwrap().forget();
                JobResult { job_id: job.job_id, status: JobStatus::Built as i32, ..Default::default() }
            }
            () = ctx.cancel.cancelled() => farm_builder::failure(&job.job_id, JobStatus::MiscFailure, "stopped"),
        }
    }
}

fn job(id: &str) -> Job {
    Job {
        job_id: id.into(),
        drv_path: "/nix/store/00000000000000000000000000000000-x.drv".into(),
        ..Default::default()
    }
}

struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), farm_builder::BuilderError>>,
}

fn start(fake: &Fake, dir: &std::path::Path, name: &str, exec: Gate, grace: Duration) -> Running {
    let mut config = BuilderConfig::new(fake.url(), dir);
    config.name = Some(name.into());
    config.shutdown_grace = grace;
    config.store_dir = dir.to_owned();
    let key = BuilderKey::generate(&config.key_path(), name).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(farm_builder::run_with(config, key, caps(), exec, async {
        let _ = stop_rx.await;
    }));
    Running {
        stop: Some(stop_tx),
        task,
    }
}

impl Running {
    /// Ask it to stop; how long it took to return (failing past `limit`).
    async fn stop_within(mut self, limit: Duration) -> Duration {
        let t0 = std::time::Instant::now();
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(limit, self.task)
            .await
            .expect("the builder returns within its grace")
            .unwrap()
            .unwrap();
        t0.elapsed()
    }
}

#[tokio::test]
async fn a_result_from_while_disconnected_is_reported_resent_and_kept_until_acknowledged() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new(false);
    let b = start(
        &fake,
        dir.path(),
        "kept",
        gate.clone(),
        Duration::from_secs(5),
    );
    fake.wait("first session", |s| s.sessions == 1).await;
    fake.send(Down::Job(job("j1"))).await;
    fake.send(Down::Job(job("j2"))).await;
    fake.wait("both started", |s| s.started.len() == 2).await;

    // The coordinator goes away; j1 ends meanwhile, j2 still runs.
    fake.with(|s| s.refuse = true);
    fake.kick();
    fake.wait("the builder let go", |s| s.ended == 1).await;
    gate.release(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fake.with(|s| s.results.is_empty()));

    // Back: the Hello says which job ended, its result follows the Welcome.
    fake.with(|s| s.refuse = false);
    fake.wait("second session", |s| s.sessions == 2).await;
    let hello = fake.with(|s| s.hellos[1].clone());
    let (ended, running) = if hello.finished_jobs == ["j1"] {
        ("j1", "j2")
    } else {
        ("j2", "j1")
    };
    assert_eq!(hello.finished_jobs, [ended], "{hello:?}");
    assert_eq!(hello.running_jobs, [running], "{hello:?}");
    let r = fake.wait_result(ended, Duration::from_secs(10)).await;
    assert_eq!(r.status, JobStatus::Built as i32);

    // Not acknowledged, and the session is lost again: the result is kept
    // and goes again.
    fake.kick();
    fake.wait("third session", |s| s.sessions == 3).await;
    let hello = fake.with(|s| s.hellos[2].clone());
    assert_eq!(hello.finished_jobs, [ended], "{hello:?}");
    fake.wait("the result sent again", |s| {
        s.results.iter().filter(|r| r.job_id == ended).count() == 2
    })
    .await;

    // Acknowledged: gone from the next Hello. The other one ends now, on a
    // live session; the coordinator no longer wants it (a cancel): gone too.
    fake.send(Down::ResultAck(JobResultAck {
        job_id: ended.into(),
    }))
    .await;
    gate.release(1);
    fake.wait("the second result", |s| {
        s.results.iter().any(|r| r.job_id == running)
    })
    .await;
    fake.send(Down::Cancel(CancelJob {
        job_id: running.into(),
    }))
    .await;
    // Both messages are handled in order before the stream's end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.kick();
    fake.wait("fourth session", |s| s.sessions == 4).await;
    let hello = fake.with(|s| s.hellos[3].clone());
    assert!(hello.finished_jobs.is_empty(), "{hello:?}");
    assert!(hello.running_jobs.is_empty(), "{hello:?}");
    b.stop_within(Duration::from_secs(20)).await;
}

#[tokio::test]
async fn stopping_reports_the_stopped_jobs_and_returns_once_they_are_acknowledged() {
    let fake = Fake::start().await;
    fake.with(|s| s.auto_ack = true);
    let dir = tempfile::tempdir().unwrap();
    // A long grace: returning early shows it waited for the acknowledgement only.
    let b = start(
        &fake,
        dir.path(),
        "polite",
        Gate::new(false),
        Duration::from_secs(60),
    );
    fake.wait("a session", |s| s.sessions == 1).await;
    fake.send(Down::Job(job("j1"))).await;
    fake.wait("started", |s| s.started.len() == 1).await;
    let took = b.stop_within(Duration::from_secs(20)).await;
    let r = fake.result("j1").expect("the stopped job was reported");
    assert_eq!(r.status, JobStatus::MiscFailure as i32);
    assert_eq!(r.error_message, "stopped");
    eprintln!("stopped in {took:?} (grace 60 s)");
}

#[tokio::test]
async fn stopping_is_bounded_by_the_grace_even_when_a_job_hangs_and_nothing_is_acknowledged() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_secs(2);
    let b = start(&fake, dir.path(), "stuck", Gate::new(true), grace);
    fake.wait("a session", |s| s.sessions == 1).await;
    fake.send(Down::Job(job("j1"))).await;
    fake.wait("started", |s| s.started.len() == 1).await;
    // A hang guard, not a timing assertion: the grace plus a generous margin.
    let took = b.stop_within(grace + Duration::from_secs(10)).await;
    eprintln!("stopped in {took:?} (grace {grace:?})");
}
