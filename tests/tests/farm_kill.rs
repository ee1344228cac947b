//! Crashes, end to end, with `kill -9` at an exact moment: a gated derivation
//! (it waits for a file the test creates) is running when the kill happens.
//! - A builder dies mid-build (the whole machine: the daemon's process group
//!   and the build it was running): the build is run again on the other
//!   builder, completes there, and the graph finishes.
//! - The coordinator dies mid-graph and restarts on the same state dir and
//!   port: the builders reconnect, the graph finishes (followed with `Watch`),
//!   and nothing that had finished is built again.

use anyhow::Context as _;
use farm_proto::v1::BuildOutcome;
use farm_proto::v1::build_event::Event as Ev;
use farm_tests::fixture::*;
use farm_tests::{TestLogs, deadline_async};

/// `WIDTH` leaves, a gated node depending on all of them (so nothing else can
/// run while it does), then a short chain to the top.
const WIDTH: usize = 4;

fn gated_graph(witness: &std::path::Path, prefix: &str) -> (String, Vec<String>) {
    let mut b: Vec<(String, String)> = Vec::new();
    let mut names = Vec::new();
    let mut leaves = Vec::new();
    for i in 0..WIDTH {
        let name = format!("{prefix}-leaf-{i}");
        b.push((
            format!("leaf{i}"),
            format!("mk \"{name}\" \"echo {name} > $out\" []"),
        ));
        leaves.push(format!("leaf{i}"));
        names.push(name);
    }
    b.push((
        "gated".into(),
        format!(
            "mk \"{prefix}-gate\" (gate \"go\" + \"echo $deps > $out\") [ {} ]",
            leaves.join(" ")
        ),
    ));
    names.push(format!("{prefix}-gate"));
    for i in 0..3 {
        let dep = if i == 0 {
            "gated".to_string()
        } else {
            format!("after{}", i - 1)
        };
        let name = format!("{prefix}-after-{i}");
        b.push((
            format!("after{i}"),
            format!("mk \"{name}\" \"echo $deps > $out\" [ {dep} ]"),
        ));
        names.push(name);
    }
    (graph_nix(witness, &b, &["after2"]), names)
}

fn two_builders(a: &'static str, b: &'static str) -> Vec<BuilderSpec<'static>> {
    vec![
        BuilderSpec {
            name: a,
            max_jobs: 2,
            conf: &["system-features ="],
        },
        BuilderSpec {
            name: b,
            max_jobs: 2,
            conf: &["system-features ="],
        },
    ]
}

/// The lines of `WITNESS/go.started` (one per start of the gated build).
fn gate_starts(farm: &Farm) -> Vec<String> {
    std::fs::read_to_string(farm.witness_dir().join("go.started"))
        .unwrap_or_default()
        .lines()
        .map(|top| {
            farm.builder_of_build_top(top)
                .unwrap_or_else(|| top.to_owned())
        })
        .collect()
}

/// Waits until the gated build has started `n` times; returns where each ran.
fn wait_gate_starts(farm: &Farm, n: usize) -> anyhow::Result<Vec<String>> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let starts = gate_starts(farm);
        if starts.len() >= n {
            return Ok(starts);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the gated build started {} times, not {n}, within {WAIT:?}",
            starts.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_builder_killed_mid_build_loses_nothing() -> anyhow::Result<()> {
    let logs = TestLogs::new("farm_kill_builder")?;
    deadline_async(DEADLINE, &logs, |logs| async move {
        a_builder_killed_mid_build_loses_nothing_run(&logs).await
    })
}

async fn a_builder_killed_mid_build_loses_nothing_run(logs: &TestLogs) -> anyhow::Result<()> {
    let mut farm = Farm::start(logs, &two_builders("kb-a", "kb-b"), &[])?;
    let (nix, names) = gated_graph(farm.witness_dir(), "kb");
    let file = farm.client.write_file("kill-builder.nix", &nix)?;
    let roots = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    farm.upload_closure(&roots).await?;
    let mut events = farm.submit(&roots).await?;

    // The gated build is running somewhere.
    let first = wait_gate_starts(&farm, 1)?;
    let victim = first[0].clone();
    let survivor = if victim == "kb-a" { "kb-b" } else { "kb-a" };
    let pid: String = std::fs::read_to_string(farm.witness_dir().join("go.pid"))?
        .trim()
        .to_owned();
    anyhow::ensure!(pid.chars().all(|c| c.is_ascii_digit()), "bad pid {pid:?}");

    // The machine dies: the daemon's process group, then the build it ran
    // (Nix runs it in a process group of its own).
    farm.builder(&victim)?.process()?.kill()?;
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status();

    // The build starts again, on the survivor; only then may it finish.
    let second = wait_gate_starts(&farm, 2)?;
    assert_eq!(second[1], survivor, "{second:?}");
    std::fs::write(farm.witness_dir().join("go"), "")?;

    let done = events.done(GRAPH_TIMEOUT).await?;
    let log = events.render();
    assert!(done.success, "{log}");
    let outcomes = events.outcomes();
    for name in &names {
        let f = outcomes
            .iter()
            .find(|(d, _)| drv_name(d) == *name)
            .map(|(_, f)| *f)
            .with_context(|| format!("no outcome for {name}: {log}"))?;
        assert_eq!(outcome(f), BuildOutcome::Built, "{name}: {log}");
    }
    let gate = outcomes
        .iter()
        .find(|(d, _)| drv_name(d) == "kb-gate")
        .map(|(_, f)| *f)
        .context("gate outcome")?;
    assert_eq!(
        gate.builder, survivor,
        "the gated build completed on the survivor"
    );
    assert!(
        events
            .started()
            .iter()
            .any(|s| drv_name(&s.drv_path) == "kb-gate" && s.builder == victim),
        "the farm reported the first attempt on {victim}: {log}"
    );

    // Witness: the gate ran on the victim, then on the survivor; everything
    // else exactly once (nothing else could run while the gate did).
    let ran = runs(&farm)?;
    assert_eq!(ran["kb-gate"], [victim.clone(), survivor.to_owned()]);
    for name in names.iter().filter(|n| *n != "kb-gate") {
        assert_eq!(ran.get(name).map(Vec::len), Some(1), "{name}: {ran:?}");
    }
    for after in ["kb-after-0", "kb-after-1", "kb-after-2"] {
        assert_eq!(ran[after], [survivor], "{after} ran on the survivor");
    }
    Ok(())
}

#[test]
fn a_coordinator_killed_mid_graph_resumes_from_its_state() -> anyhow::Result<()> {
    let logs = TestLogs::new("farm_kill_coordinator")?;
    deadline_async(DEADLINE, &logs, |logs| async move {
        a_coordinator_killed_mid_graph_resumes_from_its_state_run(&logs).await
    })
}

async fn a_coordinator_killed_mid_graph_resumes_from_its_state_run(
    logs: &TestLogs,
) -> anyhow::Result<()> {
    let mut farm = Farm::start(logs, &two_builders("kc-a", "kc-b"), &[])?;
    let (nix, names) = gated_graph(farm.witness_dir(), "kc");
    let file = farm.client.write_file("kill-coordinator.nix", &nix)?;
    let roots = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    farm.upload_closure(&roots).await?;
    let mut events = farm.submit(&roots).await?;

    // Mid-graph: the leaves are built, the gated build runs, the rest waits.
    let first = wait_gate_starts(&farm, 1)?;
    events
        .until(
            WAIT,
            |e| matches!(e, Ev::Started(s) if drv_name(&s.drv_path) == "kc-gate"),
        )
        .await?;
    let submission = events.submission_id().context("no Submitted event")?;
    let finished_before: Vec<String> = events
        .finished()
        .iter()
        .filter(|f| outcome(f) == BuildOutcome::Built)
        .map(|f| drv_name(&f.drv_path))
        .collect();
    let mut leaves: Vec<String> = names
        .iter()
        .filter(|n| n.contains("-leaf-"))
        .cloned()
        .collect();
    leaves.sort();
    let mut sorted_before = finished_before.clone();
    sorted_before.sort();
    assert_eq!(sorted_before, leaves, "{}", events.render());
    drop(events);

    farm.coordinator.kill_and_restart(logs)?;
    for i in 0..farm.builders.len() {
        farm.wait_builder_online(i)?;
    }
    std::fs::write(farm.witness_dir().join("go"), "")?;

    let mut events = farm.watch(&submission).await?;
    let done = events.done(GRAPH_TIMEOUT).await?;
    let log = events.render();
    assert!(done.success, "{log}");
    let outcomes = events.outcomes();
    for name in &names {
        let f = outcomes
            .iter()
            .find(|(d, _)| drv_name(d) == *name)
            .map(|(_, f)| *f)
            .with_context(|| format!("no outcome for {name}: {log}"))?;
        assert_eq!(outcome(f), BuildOutcome::Built, "{name}: {log}");
    }

    // Witness: nothing that had finished ran again; neither did anything else.
    let ran = runs(&farm)?;
    for name in &names {
        assert_eq!(
            ran.get(name).map(Vec::len),
            Some(1),
            "{name} ran once: {ran:?}"
        );
    }
    assert_eq!(
        ran["kc-gate"], first,
        "the gated build ran where it started"
    );
    Ok(())
}
