//! The builder's session against a stand-in coordinator (real gRPC over loopback):
//! handshake and signature, capabilities in Hello, load reports, reconnect after
//! the coordinator drops the stream, refusal of an unenrolled key, and shutdown.

mod common;

use std::time::Duration;

use common::Fake;
use farm_builder::jobs::{Execute, JobContext};
use farm_builder::{BuilderConfig, BuilderKey};
use farm_proto::v1::{Capabilities, Job, JobResult, JobStatus};

/// Each test's hang-guard: past it the test fails instead of hanging.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// A backend that never builds (the session is what is under test).
struct NoBuild;

impl Execute for NoBuild {
    async fn execute(&self, job: Job, _ctx: JobContext) -> JobResult {
        farm_builder::jobs::failure(
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
    let logs = farm_tests::TestLogs::new("connects_proves_its_key_reports_load_and_reconnects")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
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
    let load = fake.with(|s| s.loads[0]);
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
        farm_tests::TestLogs::new("an_unenrolled_key_is_refused_and_retried_until_enrolled")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
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
    let logs = farm_tests::TestLogs::new(
        "keeps_retrying_while_the_coordinator_is_down_and_stops_promptly",
    )?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
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
    let logs = farm_tests::TestLogs::new(
        "https_with_the_pinned_certificate_connects_and_another_certificate_does_not",
    )?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
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
