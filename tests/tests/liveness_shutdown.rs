//! The coordinator stops within its `--shutdown-grace` on SIGTERM with work in
//! flight: builds running on two builders, a submission's follower attached,
//! builder sessions open. It exits cleanly (status 0, "coordinator stopped"),
//! the state is flushed (after a restart on the same state the submission is
//! still there, unfinished, and finishes once its gate opens), and nothing
//! that ran is run twice.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use farm_tests::fixture::*;
use farm_tests::{TestLogs, deadline_async};

/// The grace the coordinator is given here.
const GRACE: Duration = Duration::from_secs(2);
/// What SIGTERM may take on top of the grace before the test calls it a hang
/// (a hang guard on a loaded 2-core machine, not a timing claim).
const MARGIN: Duration = Duration::from_secs(8);

#[test]
fn sigterm_with_builds_in_flight_stops_the_coordinator_within_its_grace() -> anyhow::Result<()> {
    let logs = TestLogs::new("liveness_shutdown")?;
    deadline_async(DEADLINE, &logs, run)
}

async fn run(logs: TestLogs) -> anyhow::Result<()> {
    let mut farm = Farm::start(
        &logs,
        &[
            BuilderSpec {
                name: "sh-a",
                max_jobs: 2,
                conf: &["system-features ="],
            },
            BuilderSpec {
                name: "sh-b",
                max_jobs: 2,
                conf: &["system-features ="],
            },
        ],
        &["--shutdown-grace", "2", "--builder-grace", "60"],
    )?;
    // Four builds behind one gate: all four slots busy when SIGTERM comes.
    let bindings: Vec<(&str, String)> = ["g1", "g2", "g3", "g4"]
        .iter()
        .map(|n| {
            (
                *n,
                format!("mk \"sh-{n}\" (gate \"hold\" + \"echo {n} > $out\") []"),
            )
        })
        .collect();
    let roots = ["g1", "g2", "g3", "g4"];
    let mut events = submit_graph(&farm, "shutdown.nix", &bindings, &roots).await?;
    wait_gate_starts(&farm, "hold", 4)?;

    let t0 = Instant::now();
    farm.coordinator.process.signal("TERM")?;
    let status = farm.coordinator.process.wait_exit(GRACE + MARGIN)?;
    let took = t0.elapsed();
    eprintln!("coordinator stopped {took:?} after SIGTERM (grace {GRACE:?})");
    ensure!(
        status.success(),
        "the coordinator's exit: {status}\n{}",
        farm.coordinator.process.output()
    );
    ensure!(
        farm.coordinator
            .process
            .output()
            .contains("coordinator stopped"),
        "no clean stop in the log:\n{}",
        farm.coordinator.process.output()
    );
    // The follower saw its stream end rather than hang.
    let ended = events
        .until(Duration::from_secs(10), |_| false)
        .await
        .expect_err("no event matches");
    ensure!(
        !format!("{ended:#}").contains("no matching event within"),
        "the submission's follower still waits after the coordinator stopped: {ended:#}"
    );
    let sid = events
        .submission_id()
        .context("the submission's id was announced")?;

    // Restart on the same state: the submission is still there, unfinished;
    // the builders come back; it finishes when the gate opens.
    farm.coordinator.restart(&logs)?;
    for i in 0..farm.builders.len() {
        farm.wait_builder_online(i)?;
    }
    std::fs::write(farm.witness_dir().join("hold"), "")?;
    let mut events = farm.watch(&sid).await?;
    let done = events.done(GRAPH_TIMEOUT).await?;
    ensure!(
        done.success,
        "the graph failed after the restart: {}",
        events.render()
    );
    let mut names: Vec<String> = farm.witness_lines()?.into_iter().map(|(n, _)| n).collect();
    names.sort();
    ensure!(
        names == ["sh-g1", "sh-g2", "sh-g3", "sh-g4"],
        "each gated build finished once: {names:?}"
    );
    Ok(())
}
