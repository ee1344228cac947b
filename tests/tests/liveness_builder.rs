//! The builder under faults, end to end, on a real coordinator and real
//! `farm-builder`s building with their own Nix:
//! - its link is cut (a [`LinkProxy`] between it and the coordinator) while two
//!   gated builds run, and both end while it is cut off: one fails (its result
//!   waits in the builder), one succeeds (its upload waits for the link). Once
//!   the link is back the coordinator takes both results as they are: nothing is
//!   requeued, nothing runs twice (witness file), with `--max-retries 0` so a
//!   counted retry would have failed the build;
//! - SIGTERM stops a builder with a build in flight within `--shutdown-grace`:
//!   the build is stopped, the coordinator told; with the coordinator frozen
//!   (SIGSTOP) it still stops in time, and a second signal exits at once;
//! - a builder killed mid-build leaves its scratch `tmp/job-*`: the next start
//!   removes it (and nothing else there).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use farm_proto::v1::BuildOutcome;
use farm_tests::fixture::*;
use farm_tests::{FarmProcess, LinkProxy, TestLogs, deadline_async};

fn one_builder(name: &'static str, max_jobs: u32) -> Vec<BuilderSpec<'static>> {
    vec![BuilderSpec {
        name,
        max_jobs,
        conf: &["system-features ="],
    }]
}

/// The pid the gated build behind `gate` wrote (its builder script's shell).
fn gate_pid(farm: &Farm, gate: &str) -> anyhow::Result<String> {
    let pid = std::fs::read_to_string(farm.witness_dir().join(format!("{gate}.pid")))?
        .trim()
        .to_owned();
    ensure!(
        !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()),
        "bad pid {pid:?}"
    );
    Ok(pid)
}

fn alive(pid: &str) -> bool {
    std::process::Command::new("kill")
        .args(["-0", pid])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits (bounded) until process `pid` is gone.
fn wait_gone(pid: &str, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        ensure!(
            Instant::now() < deadline,
            "{what} (pid {pid}) still runs after its builder stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?
        .success();
    ensure!(ok, "kill -{sig} {pid} failed");
    Ok(())
}

/// Waits up to `limit` for `p` to exit on its own (it is not signalled here).
fn wait_exit(p: &mut FarmProcess, limit: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = p.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not exit within {limit:?}; its log:\n{}",
                p.name(),
                p.output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn builds_that_end_while_the_builder_is_cut_off_are_accepted_not_rebuilt() -> anyhow::Result<()> {
    let logs = TestLogs::new("liveness_builder_cut")?;
    deadline_async(
        DEADLINE,
        &logs,
        builds_that_end_while_the_builder_is_cut_off_are_accepted_not_rebuilt_body,
    )
}

async fn builds_that_end_while_the_builder_is_cut_off_are_accepted_not_rebuilt_body(
    logs: TestLogs,
) -> anyhow::Result<()> {
    // A builder away for less than its grace keeps its jobs; no retry is allowed.
    let mut farm = Farm::start_without_builders(
        &logs,
        &one_builder("lc", 2),
        &["--builder-grace", "60", "--max-retries", "0"],
    )?;
    let proxy = LinkProxy::start(farm.coordinator.endpoints.grpc.parse()?)?;
    farm.builders[0].start(&format!("http://{}", proxy.addr()))?;
    farm.wait_builder_online(0)?;

    let mut events = submit_graph(
        &farm,
        "cut.nix",
        &[
            (
                "ok",
                "mk \"lc-ok\" (gate \"go\" + \"echo ok > $out\") []".into(),
            ),
            (
                "bad",
                "mk \"lc-bad\" (gate \"go\" + \"echo lc-bad-fails; exit 3\") []".into(),
            ),
            (
                "after",
                "mk \"lc-after\" \"echo $deps > $out\" [ ok ]".into(),
            ),
        ],
        &["after", "bad"],
    )
    .await?;
    wait_gate_starts(&farm, "go", 2)?;

    // Cut off while both build; both end while cut off.
    proxy.cut();
    let cut_at = Instant::now();
    farm.builders[0]
        .process()?
        .wait_for_log("lost the coordinator", WAIT)?;
    farm.coordinator
        .process
        .wait_for_log("builder offline", WAIT)?;
    std::fs::write(farm.witness_dir().join("go"), "")?;
    let builder = farm.builders[0].process()?;
    builder.wait_for_log("waiting for the coordinator to upload the output", WAIT)?;
    builder.wait_for_log("status=Failed", WAIT)?;
    // Ended, and still cut off for a while.
    std::thread::sleep(Duration::from_secs(1));
    proxy.restore();
    let cut_for = cut_at.elapsed();

    let done = events.done(GRAPH_TIMEOUT).await?;
    let log = events.render();
    assert!(!done.success, "lc-bad fails: {log}");
    let outcomes = events.outcomes();
    let of = |name: &str| {
        outcomes
            .iter()
            .find(|(d, _)| drv_name(d) == name)
            .map(|(_, f)| *f)
            .with_context(|| format!("no outcome for {name}: {log}"))
    };
    assert_eq!(outcome(of("lc-ok")?), BuildOutcome::Built, "{log}");
    assert_eq!(outcome(of("lc-after")?), BuildOutcome::Built, "{log}");
    let bad = of("lc-bad")?;
    assert_eq!(outcome(bad), BuildOutcome::Failed, "{log}");
    // Its own failure, taken from the kept result: not a requeue that gave up.
    assert!(bad.error_message.contains("exit code 3"), "{log}");

    // Each ran once; the coordinator requeued nothing; the builder was sent
    // each job once; and it did report a result held from while cut off.
    let ran = runs(&farm)?;
    for name in ["lc-ok", "lc-bad", "lc-after"] {
        assert_eq!(ran.get(name).map(Vec::len), Some(1), "{name}: {ran:?}");
    }
    let coordinator_log = farm.coordinator.process.output();
    assert!(
        !coordinator_log.contains("build requeued"),
        "{coordinator_log}"
    );
    let builder_log = farm.builders[0].process()?.output();
    assert_eq!(
        builder_log.matches("job received").count(),
        3,
        "{builder_log}"
    );
    assert!(
        builder_log.lines().any(|l| l.contains("connected")
            && l.contains("running=1")
            && l.contains("finished=1")),
        "the reconnect reported one running and one finished job: {builder_log}"
    );
    eprintln!(
        "link cut for {cut_for:?}; {} connection attempts refused meanwhile",
        proxy.refused()
    );
    Ok(())
}

#[test]
fn sigterm_stops_a_busy_builder_within_its_grace_and_tells_the_coordinator() -> anyhow::Result<()> {
    let logs = TestLogs::new("liveness_builder_sigterm")?;
    deadline_async(
        DEADLINE,
        &logs,
        sigterm_stops_a_busy_builder_within_its_grace_and_tells_the_coordinator_body,
    )
}

async fn sigterm_stops_a_busy_builder_within_its_grace_and_tells_the_coordinator_body(
    logs: TestLogs,
) -> anyhow::Result<()> {
    let mut farm = Farm::start_without_builders(&logs, &one_builder("sd", 1), &[])?;
    let url = farm.grpc_url();
    let grace = Duration::from_secs(5);
    farm.builders[0].start_with(&url, &["--shutdown-grace", "5"])?;
    farm.wait_builder_online(0)?;
    let _events = submit_graph(
        &farm,
        "sigterm.nix",
        &[(
            "g",
            "mk \"sd-gate\" (gate \"go\" + \"echo > $out\") []".into(),
        )],
        &["g"],
    )
    .await?;
    wait_gate_starts(&farm, "go", 1)?;
    let build = gate_pid(&farm, "go")?;

    let t0 = Instant::now();
    // SIGTERM; the harness SIGKILLs only past the grace plus a generous margin.
    let status = farm.builders[0]
        .process()?
        .stop(grace + Duration::from_secs(10))?;
    let took = t0.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exited by itself, cleanly: {status} after {took:?}"
    );
    wait_gone(&build, "the build")?;
    // Told before it left: the stopped build's result is recorded (requeued).
    let coordinator_log = farm.coordinator.process.output();
    assert!(
        coordinator_log
            .lines()
            .any(|l| l.contains("build requeued") && l.contains("builder shut down")),
        "{coordinator_log}"
    );
    eprintln!("builder stopped {took:?} after SIGTERM (grace {grace:?})");
    Ok(())
}

#[test]
fn a_stuck_coordinator_does_not_hold_a_stopping_builder_and_a_second_signal_exits_at_once()
-> anyhow::Result<()> {
    let logs = TestLogs::new("liveness_builder_stuck")?;
    deadline_async(
        DEADLINE,
        &logs,
        a_stuck_coordinator_does_not_hold_a_stopping_builder_and_a_second_signal_exits_at_once_body,
    )
}

async fn a_stuck_coordinator_does_not_hold_a_stopping_builder_and_a_second_signal_exits_at_once_body(
    logs: TestLogs,
) -> anyhow::Result<()> {
    let mut farm = Farm::start_without_builders(
        &logs,
        &[
            BuilderSpec {
                name: "st-a",
                max_jobs: 1,
                conf: &["system-features ="],
            },
            BuilderSpec {
                name: "st-b",
                max_jobs: 1,
                conf: &["system-features ="],
            },
        ],
        &[],
    )?;
    let url = farm.grpc_url();
    let grace_a = Duration::from_secs(3);
    farm.builders[0].start_with(&url, &["--shutdown-grace", "3"])?;
    farm.builders[1].start_with(&url, &["--shutdown-grace", "300"])?;
    farm.wait_builder_online(0)?;
    farm.wait_builder_online(1)?;
    let _events = submit_graph(
        &farm,
        "stuck.nix",
        &[
            (
                "g1",
                "mk \"st-1\" (gate \"go-1\" + \"echo > $out\") []".into(),
            ),
            (
                "g2",
                "mk \"st-2\" (gate \"go-2\" + \"echo > $out\") []".into(),
            ),
        ],
        &["g1", "g2"],
    )
    .await?;
    let mut on = BTreeMap::new();
    for gate in ["go-1", "go-2"] {
        let b = wait_gate_starts(&farm, gate, 1)?.remove(0);
        on.insert(b, gate_pid(&farm, gate)?);
    }
    ensure!(on.len() == 2, "one build on each builder: {on:?}");

    // The coordinator freezes: nothing it should answer ever comes.
    let coordinator = farm.coordinator.process.pid();
    signal(coordinator, "STOP")?;
    let outcome = async {
        // st-a: within its grace (plus a margin) all the same.
        let a = farm.builders[0].process()?;
        let t0 = Instant::now();
        signal(a.pid(), "TERM")?;
        let status = wait_exit(a, grace_a + Duration::from_secs(10))?;
        let took_a = t0.elapsed();
        ensure!(status.code().is_some(), "st-a exited by itself: {status}");
        // st-b: its grace is long, so it is still waiting for the coordinator;
        // a second signal ends it at once.
        let b = farm.builders[1].process()?;
        signal(b.pid(), "TERM")?;
        b.wait_for_log("stopping: cancelling running jobs", WAIT)?;
        std::thread::sleep(Duration::from_millis(1500));
        b.ensure_running()?;
        let t1 = Instant::now();
        signal(b.pid(), "TERM")?;
        let status = wait_exit(b, Duration::from_secs(10))?;
        let took_b = t1.elapsed();
        ensure!(
            status.code() == Some(130),
            "st-b exited on the second signal: {status}"
        );
        anyhow::Ok((took_a, took_b))
    };
    let result = outcome.await;
    signal(coordinator, "CONT")?;
    let (took_a, took_b) = result?;
    // Their builds were stopped, not left behind.
    for (builder, pid) in &on {
        wait_gone(pid, &format!("the build on {builder}"))?;
    }
    eprintln!(
        "st-a stopped {took_a:?} after SIGTERM (grace {grace_a:?}, coordinator frozen); \
         st-b {took_b:?} after its second signal"
    );
    Ok(())
}

#[test]
fn a_restarted_builder_removes_the_scratch_a_killed_one_left() -> anyhow::Result<()> {
    let logs = TestLogs::new("liveness_builder_scratch")?;
    deadline_async(
        DEADLINE,
        &logs,
        a_restarted_builder_removes_the_scratch_a_killed_one_left_body,
    )
}

async fn a_restarted_builder_removes_the_scratch_a_killed_one_left_body(
    logs: TestLogs,
) -> anyhow::Result<()> {
    let mut farm = Farm::start(&logs, &one_builder("sc", 1), &[])?;
    let mut events = submit_graph(
        &farm,
        "scratch.nix",
        &[(
            "g",
            "mk \"sc-gate\" (gate \"go\" + \"echo > $out\") []".into(),
        )],
        &["g"],
    )
    .await?;
    wait_gate_starts(&farm, "go", 1)?;
    let tmp = farm.builders[0].state_dir.join("tmp");
    let scratch = |tmp: &Path| -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(tmp)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.starts_with("job-") {
                names.push(name);
            }
        }
        Ok(names)
    };
    let during = scratch(&tmp)?;
    ensure!(
        during.len() == 1,
        "one job's scratch while it runs: {during:?}"
    );

    // The machine dies mid-build: the daemon, then the build it ran.
    let build = gate_pid(&farm, "go")?;
    farm.builders[0].process()?.kill()?;
    let _ = std::process::Command::new("kill")
        .args(["-9", &build])
        .status();
    ensure!(
        scratch(&tmp)? == during,
        "a crash leaves the scratch behind"
    );
    std::fs::write(tmp.join("not-scratch"), "keep")?;

    let url = farm.grpc_url();
    farm.builders[0].start(&url)?;
    let builder = farm.builders[0].process()?;
    builder.wait_for_log("connected", WAIT)?;
    assert!(
        builder
            .output()
            .contains("removed scratch directories left by an earlier run"),
        "{}",
        builder.output()
    );
    let after: Vec<String> = scratch(&tmp)?
        .into_iter()
        .filter(|n| during.contains(n))
        .collect();
    assert!(after.is_empty(), "left over: {after:?}");
    assert!(
        tmp.join("not-scratch").exists(),
        "only job scratch is removed"
    );

    // And the restarted builder builds: the graph finishes.
    std::fs::write(farm.witness_dir().join("go"), "")?;
    let done = events.done(GRAPH_TIMEOUT).await?;
    assert!(done.success, "{}", events.render());
    Ok(())
}
