//! The builder building with a real Nix in a private store, against a stand-in
//! coordinator whose in-memory cache holds the inputs: it fetches what it lacks
//! (verified), builds, streams the log, uploads the outputs; timeouts, cancel and
//! failures come back with the right status.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Fake;
use farm_builder::BuilderConfig;
use farm_proto::v1::coordinator_message::Msg as Down;
use farm_proto::v1::{CancelJob, Drain, Job, JobStatus};
use farm_testkit::{Actor, NIX_PROGRAMS};

/// Each test's hang-guard: past it the test fails instead of hanging.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

const JOBS_NIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jobs.nix");

/// A client store that instantiates the test derivations and publishes inputs.
struct Client {
    env: Actor,
}

impl Client {
    fn new() -> Client {
        Client {
            env: Actor::new("client").unwrap(),
        }
    }

    fn instantiate(&self, attr: &str) -> String {
        self.env
            .run("nix-instantiate", &[JOBS_NIX, "-A", attr])
            .unwrap()
            .trim()
            .to_owned()
    }

    /// The job for `attr`: its ATerm and its input closure (outputs of input
    /// derivations built here and published, sources published).
    fn job(&self, fake: &Fake, id: &str, attr: &str) -> Job {
        let drv = self.instantiate(attr);
        let aterm = std::fs::read(self.env.host_path(&drv).unwrap()).unwrap();
        let mut roots = Vec::new();
        for r in self
            .env
            .run("nix-store", &["--query", "--references", &drv])
            .unwrap()
            .lines()
        {
            if r.ends_with(".drv") {
                let out = self.env.run("nix-store", &["--realise", r]).unwrap();
                roots.extend(out.lines().map(str::to_owned));
            } else {
                roots.push(r.to_owned());
            }
        }
        let mut inputs = Vec::new();
        if !roots.is_empty() {
            let mut args = vec!["--query", "--requisites"];
            args.extend(roots.iter().map(String::as_str));
            for p in self.env.run("nix-store", &args).unwrap().lines() {
                fake.publish(&self.env, p);
                inputs.push(p.to_owned());
            }
        }
        Job {
            job_id: id.into(),
            drv_path: drv,
            drv_aterm: aterm,
            input_paths: inputs,
            ..Default::default()
        }
    }

    fn output(&self, drv: &str, name: &str) -> String {
        let outs = self
            .env
            .run("nix-store", &["--query", "--outputs", drv])
            .unwrap();
        outs.lines()
            .find(|l| (name == "out" && !l.ends_with("-dev")) || l.ends_with(&format!("-{name}")))
            .unwrap()
            .to_owned()
    }
}

struct Running {
    fake: Fake,
    builder_store: Actor,
    _state: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), farm_builder::BuilderError>>,
}

async fn start_builder(max_jobs: u32) -> Running {
    let fake = Fake::start().await;
    let builder_store = Actor::new("builder").unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = BuilderConfig::new(fake.url(), state.path());
    config.name = Some("test-builder".into());
    config.nix_bin_dir = Some(builder_store.wrapper_bin_dir(NIX_PROGRAMS).unwrap());
    config.max_jobs = Some(max_jobs);
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(farm_builder::run(config, async {
        let _ = stop_rx.await;
    }));
    fake.wait("the builder's session", |s| s.sessions == 1)
        .await;
    Running {
        fake,
        builder_store,
        _state: state,
        stop: Some(stop),
        task,
    }
}

impl Running {
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("cargo") {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn fetches_inputs_builds_streams_the_log_and_uploads_outputs() -> anyhow::Result<()> {
    let logs =
        farm_testkit::TestLogs::new("fetches_inputs_builds_streams_the_log_and_uploads_outputs")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        fetches_inputs_builds_streams_the_log_and_uploads_outputs_body().await;
        Ok(())
    })
}

async fn fetches_inputs_builds_streams_the_log_and_uploads_outputs_body() {
    let b = start_builder(2).await;
    let client = Client::new();
    let job = client.job(&b.fake, "top-1", "top");
    let drv = job.drv_path.clone();
    let inputs = job.input_paths.clone();
    assert_eq!(inputs.len(), 2, "{inputs:?}");
    for p in &inputs {
        assert!(!b.builder_store.is_valid(p).unwrap());
    }
    b.fake.send(Down::Job(job.clone())).await;
    let r = b.fake.wait_result("top-1", Duration::from_secs(120)).await;
    assert_eq!(
        r.status,
        JobStatus::Built as i32,
        "{r:?}\nlog:\n{}",
        b.fake.log("top-1")
    );
    let out = client.output(&drv, "out");
    assert_eq!(r.outputs.get("out"), Some(&out));
    assert!(r.bytes_downloaded > 0 && r.bytes_uploaded > 0, "{r:?}");
    assert!(r.start_time_unix > 0 && r.stop_time_unix >= r.start_time_unix);
    assert!(
        b.fake.log("top-1").contains("building top"),
        "{}",
        b.fake.log("top-1")
    );
    // The inputs were fetched and are valid in the builder's store now.
    for p in &inputs {
        assert!(b.builder_store.is_valid(p).unwrap(), "{p} not imported");
    }
    assert_eq!(
        b.fake
            .with(|s| s.downloads.iter().cloned().collect::<BTreeSet<_>>()),
        inputs.iter().cloned().collect::<BTreeSet<_>>()
    );
    // What was uploaded is exactly what Nix builds for that derivation.
    let (info, nar) = b.fake.with(|s| s.cache.get(&out).cloned()).unwrap();
    assert_eq!(info.deriver, drv);
    client.env.run("nix-store", &["--realise", &drv]).unwrap();
    let expected = client
        .env
        .run_bytes("nix-store", &["--dump", &out])
        .unwrap();
    assert_eq!(nar, expected);
    assert!(String::from_utf8_lossy(&nar).contains("dep-content\nsource-content\n/nix/store/"));
    let mut refs = info.references.clone();
    refs.sort();
    let dep_out = inputs.iter().find(|p| p.ends_with("-dep")).unwrap();
    assert_eq!(refs, vec![dep_out.clone()]);

    // The same job again: the inputs are local now, so nothing is downloaded.
    let mut again = job;
    again.job_id = "top-2".into();
    b.fake.send(Down::Job(again)).await;
    let r = b.fake.wait_result("top-2", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::Built as i32, "{r:?}");
    assert_eq!(r.bytes_downloaded, 0);
    assert_eq!(b.fake.with(|s| s.downloads.len()), inputs.len());
    b.shutdown().await;
}

#[test]
fn uploads_every_output_of_a_multi_output_derivation() -> anyhow::Result<()> {
    let logs = farm_testkit::TestLogs::new("uploads_every_output_of_a_multi_output_derivation")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        uploads_every_output_of_a_multi_output_derivation_body().await;
        Ok(())
    })
}

async fn uploads_every_output_of_a_multi_output_derivation_body() {
    let b = start_builder(1).await;
    let client = Client::new();
    let job = client.job(&b.fake, "multi", "multi");
    let drv = job.drv_path.clone();
    b.fake.send(Down::Job(job)).await;
    let r = b.fake.wait_result("multi", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::Built as i32, "{r:?}");
    let out = client.output(&drv, "out");
    let dev = client.output(&drv, "dev");
    assert_eq!(r.outputs.get("out"), Some(&out));
    assert_eq!(r.outputs.get("dev"), Some(&dev));
    // `out` refers to `dev`, so `dev` went up first.
    assert_eq!(
        b.fake.with(|s| s.uploaded.clone()),
        vec![dev.clone(), out.clone()]
    );
    let (info, _) = b.fake.with(|s| s.cache.get(&out).cloned()).unwrap();
    assert_eq!(info.references, vec![dev]);
    b.shutdown().await;
}

#[test]
fn a_failing_build_reports_failed_with_its_log() -> anyhow::Result<()> {
    let logs = farm_testkit::TestLogs::new("a_failing_build_reports_failed_with_its_log")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        a_failing_build_reports_failed_with_its_log_body().await;
        Ok(())
    })
}

async fn a_failing_build_reports_failed_with_its_log_body() {
    let b = start_builder(1).await;
    let client = Client::new();
    let job = client.job(&b.fake, "fail", "failing");
    b.fake.send(Down::Job(job)).await;
    let r = b.fake.wait_result("fail", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::Failed as i32, "{r:?}");
    assert!(
        r.error_message.contains("exit code 3") || r.error_message.contains("failed"),
        "{r:?}"
    );
    assert!(b.fake.log("fail").contains("about to fail"));
    assert!(b.fake.with(|s| s.uploaded.is_empty()));
    b.shutdown().await;
}

#[test]
fn build_timeout_and_max_silent_time_stop_the_build() -> anyhow::Result<()> {
    let logs = farm_testkit::TestLogs::new("build_timeout_and_max_silent_time_stop_the_build")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        build_timeout_and_max_silent_time_stop_the_build_body().await;
        Ok(())
    })
}

async fn build_timeout_and_max_silent_time_stop_the_build_body() {
    let b = start_builder(2).await;
    let client = Client::new();
    let mut slow = client.job(&b.fake, "slow", "slow");
    slow.build_timeout_secs = 2;
    let mut quiet = client.job(&b.fake, "quiet", "quiet");
    quiet.max_silent_time_secs = 2;
    b.fake.send(Down::Job(slow)).await;
    b.fake.send(Down::Job(quiet)).await;
    let r = b.fake.wait_result("slow", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::TimedOut as i32, "{r:?}");
    let r = b.fake.wait_result("quiet", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::TimedOut as i32, "{r:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        processes_with("sleep 4321").is_empty(),
        "{:?}",
        processes_with("sleep 4321")
    );
    assert!(processes_with("sleep 4322").is_empty());
    b.shutdown().await;
}

#[test]
fn cancel_kills_the_build_and_its_processes() -> anyhow::Result<()> {
    let logs = farm_testkit::TestLogs::new("cancel_kills_the_build_and_its_processes")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        cancel_kills_the_build_and_its_processes_body().await;
        Ok(())
    })
}

async fn cancel_kills_the_build_and_its_processes_body() {
    let b = start_builder(1).await;
    let client = Client::new();
    let job = client.job(&b.fake, "c1", "cancelme");
    b.fake.send(Down::Job(job)).await;
    b.fake
        .wait_for("the build to start", Duration::from_secs(60), |s| {
            s.logs
                .get("c1")
                .is_some_and(|l| String::from_utf8_lossy(l).contains("started"))
        })
        .await;
    assert!(!processes_with("sleep 4323").is_empty());
    b.fake
        .send(Down::Cancel(CancelJob {
            job_id: "c1".into(),
        }))
        .await;
    let r = b.fake.wait_result("c1", Duration::from_secs(30)).await;
    assert_eq!(r.status, JobStatus::Cancelled as i32, "{r:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        processes_with("sleep 4323").is_empty(),
        "{:?}",
        processes_with("sleep 4323")
    );
    b.shutdown().await;
}

#[test]
fn missing_or_corrupt_inputs_are_input_errors() -> anyhow::Result<()> {
    let logs = farm_testkit::TestLogs::new("missing_or_corrupt_inputs_are_input_errors")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        missing_or_corrupt_inputs_are_input_errors_body().await;
        Ok(())
    })
}

async fn missing_or_corrupt_inputs_are_input_errors_body() {
    let b = start_builder(1).await;
    let client = Client::new();
    let job = client.job(&b.fake, "m1", "top");
    // Take one input out of the cache.
    let dep = job
        .input_paths
        .iter()
        .find(|p| p.ends_with("-dep"))
        .unwrap()
        .clone();
    let saved = b.fake.with(|s| s.cache.remove(&dep)).unwrap();
    b.fake.send(Down::Job(job.clone())).await;
    let r = b.fake.wait_result("m1", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::InputError as i32, "{r:?}");
    assert!(r.error_message.contains("not in the cache"), "{r:?}");

    // Put it back with its bytes altered (same length): the hash check catches it.
    let (info, mut nar) = saved;
    let at = nar.windows(11).position(|w| w == b"dep-content").unwrap();
    nar[at] = b'D';
    b.fake.with(|s| s.cache.insert(dep.clone(), (info, nar)));
    let mut again = job;
    again.job_id = "m2".into();
    b.fake.send(Down::Job(again)).await;
    let r = b.fake.wait_result("m2", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::InputError as i32, "{r:?}");
    assert!(r.error_message.contains("hash"), "{r:?}");
    assert!(!b.builder_store.is_valid(&dep).unwrap());
    b.shutdown().await;
}

#[test]
fn drain_lets_running_builds_finish_and_refuses_new_ones() -> anyhow::Result<()> {
    let logs =
        farm_testkit::TestLogs::new("drain_lets_running_builds_finish_and_refuses_new_ones")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        drain_lets_running_builds_finish_and_refuses_new_ones_body().await;
        Ok(())
    })
}

async fn drain_lets_running_builds_finish_and_refuses_new_ones_body() {
    let b = start_builder(2).await;
    let client = Client::new();
    let running = client.job(&b.fake, "d1", "pause");
    let later = client.job(&b.fake, "d2", "top");
    b.fake.send(Down::Job(running)).await;
    b.fake
        .wait_for("the build to start", Duration::from_secs(60), |s| {
            s.logs
                .get("d1")
                .is_some_and(|l| String::from_utf8_lossy(l).contains("started"))
        })
        .await;
    b.fake.send(Down::Drain(Drain { draining: true })).await;
    b.fake.send(Down::Job(later.clone())).await;
    let r = b.fake.wait_result("d2", Duration::from_secs(30)).await;
    assert_eq!(r.status, JobStatus::MiscFailure as i32, "{r:?}");
    assert!(r.error_message.contains("draining"), "{r:?}");
    assert!(
        b.fake.result("d1").is_none(),
        "the running build is not interrupted"
    );
    let r = b.fake.wait_result("d1", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::Built as i32, "{r:?}");
    // Undrained, it takes work again.
    b.fake.send(Down::Drain(Drain { draining: false })).await;
    let mut again = later;
    again.job_id = "d3".into();
    b.fake.send(Down::Job(again)).await;
    let r = b.fake.wait_result("d3", Duration::from_secs(60)).await;
    assert_eq!(r.status, JobStatus::Built as i32, "{r:?}");
    b.shutdown().await;
}

#[test]
fn shutdown_stops_running_builds_and_reports_them_as_transient() -> anyhow::Result<()> {
    let logs =
        farm_testkit::TestLogs::new("shutdown_stops_running_builds_and_reports_them_as_transient")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        shutdown_stops_running_builds_and_reports_them_as_transient_body().await;
        Ok(())
    })
}

async fn shutdown_stops_running_builds_and_reports_them_as_transient_body() {
    let b = start_builder(1).await;
    let client = Client::new();
    let job = client.job(&b.fake, "s1", "stopme");
    b.fake.send(Down::Job(job)).await;
    b.fake
        .wait_for("the build to start", Duration::from_secs(60), |s| {
            s.logs
                .get("s1")
                .is_some_and(|l| String::from_utf8_lossy(l).contains("started"))
        })
        .await;
    let fake = b.fake.clone();
    b.shutdown().await;
    let r = fake
        .result("s1")
        .expect("the result is delivered before the builder exits");
    assert_eq!(r.status, JobStatus::MiscFailure as i32, "{r:?}");
    assert!(processes_with("sleep 4324").is_empty());
}
