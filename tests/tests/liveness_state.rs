//! The coordinator's state across a crash, end to end, with real processes:
//! a job id is never issued twice. The coordinator is killed with `kill -9`
//! right after its builder logs that it received a job (the job's attempt
//! number must be on disk by then: the coordinator flushes before sending), and
//! the builder dies with it, taking the job along. After both restart on the
//! same state, the job runs again under the next attempt's id, the build's
//! retry count is one (the one fault that cost it its run), what had finished
//! is not built again, and the graph completes.
//!
//! Every test here runs under the harness's deadline: on expiry it fails with
//! the logs of the coordinator, the builder and the client.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use farm_proto::v1::BuildOutcome;
use farm_tests::fixture::*;
use farm_tests::{TestLogs, deadline_async};

/// The job ids in `farm-builder` output lines `job received job=…`, in order.
fn received_jobs(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("job received"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("job="))
                .map(str::to_owned)
        })
        .collect()
}

/// The line of `log` where job `job` was received, with its drv.
fn received_line<'a>(log: &'a str, job: &str) -> Option<&'a str> {
    let needle = format!("job={job} ");
    log.lines()
        .find(|l| l.contains("job received") && l.contains(&needle))
}

/// Polls (often: the kill must come right after) until the builder's output
/// names a received job whose `.drv` contains `drv_part`; returns its id.
async fn wait_received(farm: &mut Farm, drv_part: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let b = farm.builders[0].process()?;
        let out = b.output();
        if let Some(job) = received_jobs(&out)
            .into_iter()
            .find(|j| received_line(&out, j).is_some_and(|l| l.contains(drv_part)))
        {
            return Ok(job);
        }
        b.ensure_running()?;
        ensure!(
            Instant::now() < deadline,
            "the builder received no job for {drv_part} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the gated build has started `n` times.
async fn wait_gate_starts(farm: &Farm, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let starts = std::fs::read_to_string(farm.witness_dir().join("go.started"))
            .unwrap_or_default()
            .lines()
            .count();
        if starts >= n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the gated build started {starts} times, not {n}, within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_job_id_is_never_issued_twice_across_a_coordinator_crash() -> anyhow::Result<()> {
    let logs = TestLogs::new("liveness_state_job_ids")?;
    deadline_async(DEADLINE, &logs, |logs| async move {
        job_ids_across_a_crash(&logs).await
    })
}

async fn job_ids_across_a_crash(logs: &TestLogs) -> anyhow::Result<()> {
    let mut farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "ls-a",
            max_jobs: 2,
            conf: &["system-features ="],
        }],
        &[],
    )?;
    // first → gate (waits for WITNESS/go) → top
    let nix = graph_nix(
        farm.witness_dir(),
        &[
            (
                "first".into(),
                "mk \"ls-first\" \"echo first > $out\" []".into(),
            ),
            (
                "gated".into(),
                "mk \"ls-gate\" (gate \"go\" + \"echo $deps > $out\") [ first ]".into(),
            ),
            (
                "top".into(),
                "mk \"ls-top\" \"echo $deps > $out\" [ gated ]".into(),
            ),
        ],
        &["top"],
    );
    let file = farm.client.write_file("job-ids.nix", &nix)?;
    let roots = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    farm.upload_closure(&roots).await?;
    let mut events = farm.submit(&roots).await?;
    events
        .until(WAIT, |e| {
            matches!(e, farm_proto::v1::build_event::Event::Submitted(_))
        })
        .await?;
    let sid = events.submission_id().context("no Submitted event")?;

    // The gated build's job reaches the builder: the coordinator dies at once,
    // and the builder with it (the whole machine), taking the job along.
    let gate_job = wait_received(&mut farm, "-ls-gate.drv").await?;
    farm.coordinator.process.kill()?;
    // The whole machine dies: the builder and every process under it (the
    // nix build runs in a process group of its own; left alive it would hold
    // the output's lock and the rerun would wait for it forever).
    let builder_log_1 = {
        let b = farm.builders[0].process()?;
        b.kill_tree()?;
        b.output()
    };
    // Should the build have started its script after all, it goes too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok(pid) = std::fs::read_to_string(farm.witness_dir().join("go.pid")) {
        let pid = pid.trim().to_owned();
        ensure!(pid.chars().all(|c| c.is_ascii_digit()), "bad pid {pid:?}");
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid])
            .status();
    }
    let coordinator_log_1 = farm.coordinator.process.output();
    // How often the gate ran before the crash: counted before anything
    // restarts, so the rerun cannot be taken for a first run.
    let first_started = std::fs::read_to_string(farm.witness_dir().join("go.started"))
        .unwrap_or_default()
        .lines()
        .count();

    // Both come back on the same state.
    farm.coordinator.kill_and_restart(logs)?;
    let url = farm.grpc_url();
    farm.builders[0].start(&url)?;
    farm.wait_builder_online(0)?;
    // The gate runs again (its first run, if it got that far, died with the
    // builder); release it.
    wait_gate_starts(&farm, first_started + 1).await?;
    std::fs::write(farm.witness_dir().join("go"), "")?;
    let mut watch = farm.watch(&sid).await?;
    let done = watch.done(GRAPH_TIMEOUT).await?;
    let rendered = watch.render();
    ensure!(
        done.success,
        "the graph failed after the crash:\n{rendered}"
    );
    let outcomes = watch.outcomes();
    for name in ["ls-first", "ls-gate", "ls-top"] {
        let f = outcomes
            .iter()
            .find(|(drv, _)| drv_name(drv) == name)
            .map(|(_, f)| *f)
            .with_context(|| format!("no outcome for {name}:\n{rendered}"))?;
        ensure!(
            outcome(f) == BuildOutcome::Built,
            "{name} ended {:?}:\n{rendered}",
            outcome(f)
        );
    }

    // No job id was issued twice, across both builder runs.
    let builder_log_2 = farm.builders[0].process()?.output();
    let mut all: Vec<String> = received_jobs(&builder_log_1);
    all.extend(received_jobs(&builder_log_2));
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for j in &all {
        *seen.entry(j.as_str()).or_default() += 1;
    }
    let twice: Vec<&&str> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(j, _)| j)
        .collect();
    ensure!(
        twice.is_empty(),
        "job ids issued more than once: {twice:?} (all: {all:?})"
    );
    // The gate's build ran as attempt 1, then (after the one fault) attempt 2.
    let (gate_build, attempt) = gate_job
        .strip_prefix('b')
        .and_then(|r| r.split_once('.'))
        .with_context(|| format!("job id {gate_job:?}"))?;
    ensure!(attempt == "1", "the gate's first job was {gate_job}");
    let gate_jobs: Vec<&String> = all
        .iter()
        .filter(|j| j.starts_with(&format!("b{gate_build}.")))
        .collect();
    ensure!(
        gate_jobs == [&format!("b{gate_build}.1"), &format!("b{gate_build}.2")],
        "the gate's jobs were {gate_jobs:?}, not attempt 1 then 2 (all: {all:?})"
    );
    // Its retry count is one: one requeue, after the restart, with retries=1.
    let coordinator_log_2 = farm.coordinator.process.output();
    let requeues: Vec<&str> = coordinator_log_1
        .lines()
        .chain(coordinator_log_2.lines())
        .filter(|l| l.contains("build requeued") && l.contains(&format!("build=b{gate_build} ")))
        .collect();
    ensure!(
        requeues.len() == 1 && requeues[0].contains("retries=1"),
        "the gate was requeued {} times: {requeues:?}",
        requeues.len()
    );
    // Every other build ran once, as attempt 1; what had finished was not
    // built again (the witness file counts the real runs).
    for j in &all {
        if !j.starts_with(&format!("b{gate_build}.")) {
            ensure!(
                j.ends_with(".1"),
                "{j} is not a first attempt (all: {all:?})"
            );
        }
    }
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for (name, _) in farm.witness_lines()? {
        *runs.entry(name).or_default() += 1;
    }
    ensure!(
        runs.get("ls-first") == Some(&1) && runs.get("ls-top") == Some(&1),
        "runs: {runs:?}"
    );
    ensure!(
        runs.get("ls-gate").is_some_and(|n| *n <= 2),
        "the gate ran more than once per attempt: {runs:?}"
    );
    Ok(())
}
