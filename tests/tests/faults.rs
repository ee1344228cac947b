//! Faults while graphs run, end to end: four clients (two `farm build`, one
//! through Nix's build hook, one with the farm as its store) each build a
//! 20-derivation graph whose top waits for a gate, on three builders. While
//! they run, one builder's link is cut and restored, another builder is
//! `kill -9`ed with its builds and restarted, and — once every top runs — the
//! coordinator is `kill -9`ed and restarted on the same state and ports; then
//! the gate opens. What must hold is in `fault_support` (every `farm build`
//! finishes, following its submission again; the Nix clients fail with an
//! error and the same command again completes; no finished build runs again;
//! nothing published is lost; retries only where faults were met; nothing
//! left running).

mod fault_support;

use std::time::Duration;

use anyhow::ensure;
use farm_tests::fixture::*;
use farm_tests::{Actor, TestLogs, deadline};
use fault_support::*;

const CLIENTS: usize = 4;

#[test]
fn graphs_survive_a_cut_link_a_dead_builder_and_a_dead_coordinator() -> anyhow::Result<()> {
    let logs = TestLogs::new("faults")?;
    deadline(Duration::from_secs(600), &logs, |logs| run(&logs))
}

fn run(logs: &TestLogs) -> anyhow::Result<()> {
    // Push keys: the hook client's outputs are to be signed and shared (a
    // build key's hook build is its own claim build, see attack_hook.rs).
    let ssh = SshAccess::pushing(CLIENTS)?;
    let mut farm = start_farm(logs, &ssh)?;
    let clients: Vec<Actor> = (0..CLIENTS)
        .map(|i| Actor::with_logs(&format!("client{i}"), logs))
        .collect::<anyhow::Result<_>>()?;
    let scenario = Scenario {
        salt: String::new(),
        sleep: 0.5,
        warmup: 6,
        steps: vec![
            Step {
                fault: Fault::CutLink,
                after: Duration::ZERO,
                lasting: Duration::from_millis(2500),
            },
            Step {
                fault: Fault::KillBuilder,
                after: Duration::from_millis(500),
                lasting: Duration::from_millis(1500),
            },
            Step {
                fault: Fault::KillCoordinator,
                after: Duration::ZERO,
                lasting: Duration::from_millis(1000),
            },
        ],
        coordinator_at_gate: true,
    };
    let report = run_round(&mut farm, &ssh, &clients, &scenario)?;
    eprintln!("{report:#?}");
    let farm_builds = (0..CLIENTS)
        .filter(|i| ClientPath::of(*i) == ClientPath::FarmBuild)
        .count();
    ensure!(
        report.reconnects == farm_builds,
        "only {} of {farm_builds} farm build clients followed again",
        report.reconnects
    );
    ensure!(
        report.nix_errors.len() == CLIENTS - farm_builds,
        "Nix clients' errors: {:?}",
        report.nix_errors
    );
    Ok(())
}
