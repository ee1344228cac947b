//! The soak: rounds of the fault scenario (`fault_support`) with random
//! timing, one after another on the same farm, for `SOAK_MINUTES` minutes
//! (unset: one round, which is what `cargo test` runs). Each round takes 3 to
//! 6 clients on all three paths, a random build length, and one to four
//! faults (a cut link, a killed builder, a killed coordinator) in random
//! order at random moments, each lasting a random while. Every round must
//! keep every promise `fault_support` checks; the soak prints what each saw
//! and a summary: graphs, builds, retries, reruns, rebuilds of finished work
//! (none, or it fails), max client latency, the coordinator's RSS.
//! `SOAK_SEED` replays a run (the seed is printed). Run it with
//! `tests/soak.sh MINUTES`.

mod fault_support;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use farm_tests::fixture::*;
use farm_tests::{Actor, TestLogs, deadline};
use fault_support::*;

const MAX_CLIENTS: usize = 6;

#[test]
fn soak() -> anyhow::Result<()> {
    let minutes: f64 = match std::env::var("SOAK_MINUTES") {
        Ok(m) => m
            .parse()
            .with_context(|| format!("SOAK_MINUTES={m:?} is not a number"))?,
        Err(_) => 0.0,
    };
    let seed: u64 = match std::env::var("SOAK_SEED") {
        Ok(s) => s
            .parse()
            .with_context(|| format!("SOAK_SEED={s:?} is not a number"))?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    let length = Duration::from_secs_f64(minutes * 60.0);
    let logs = TestLogs::new("soak")?;
    // A round takes about a minute; a hang is a failure.
    deadline(length + Duration::from_secs(600), &logs, move |logs| {
        soak_for(&logs, length, seed)
    })
}

/// A random round.
fn scenario(rng: &mut Rng, round: usize) -> (usize, Scenario) {
    let clients = 3 + rng.below(MAX_CLIENTS - 2);
    let faults = [Fault::CutLink, Fault::KillBuilder, Fault::KillCoordinator];
    let steps = (0..1 + rng.below(4))
        .map(|_| {
            let fault = faults[rng.below(faults.len())];
            let lasting = match fault {
                Fault::CutLink => rng.between(Duration::from_millis(200), Duration::from_secs(4)),
                Fault::KillBuilder => {
                    rng.between(Duration::from_millis(200), Duration::from_secs(4))
                }
                Fault::KillCoordinator => {
                    rng.between(Duration::from_millis(100), Duration::from_secs(3))
                }
            };
            Step {
                fault,
                after: rng.between(Duration::ZERO, Duration::from_secs(3)),
                lasting,
            }
        })
        .collect();
    let sleep = 0.1 + rng.below(6) as f32 * 0.1;
    (
        clients,
        Scenario {
            salt: format!("r{round}-"),
            sleep,
            warmup: rng.below(20),
            steps,
            coordinator_at_gate: false,
        },
    )
}

fn soak_for(logs: &TestLogs, length: Duration, seed: u64) -> anyhow::Result<()> {
    println!(
        "soak: seed {seed}, {:.1} minutes",
        length.as_secs_f64() / 60.0
    );
    let mut rng = Rng::new(seed);
    let ssh = SshAccess::pushing(MAX_CLIENTS)?;
    let mut farm = start_farm(logs, &ssh)?;
    let actors: Vec<Actor> = (0..MAX_CLIENTS)
        .map(|i| Actor::with_logs(&format!("client{i}"), logs))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let mut total = RoundReport::default();
    let (mut rounds, mut faults, mut rss_first, mut rss_max) = (0, 0, 0, 0);
    let result = loop {
        let (clients, sc) = scenario(&mut rng, rounds);
        let at = Instant::now();
        let r = match run_round(&mut farm, &ssh, &actors[..clients], &sc) {
            Ok(r) => r,
            Err(e) => break Err(e.context(format!("round {} ({sc:?})", rounds + 1))),
        };
        rounds += 1;
        faults += r.faults.len();
        if rss_first == 0 {
            rss_first = r.coordinator_rss_kib;
        }
        rss_max = rss_max.max(r.coordinator_rss_kib);
        println!(
            "round {rounds}: {} graphs, {} builds, {} reruns, {} retries ({} absorbed), \
             {} reconnects, max latency {:.1} s, {:.1} s in all, coordinator RSS {} KiB; faults {:?}; nix errors {:?}",
            r.graphs,
            r.builds,
            r.reruns,
            r.retries,
            r.absorbed,
            r.reconnects,
            r.max_latency.as_secs_f64(),
            at.elapsed().as_secs_f64(),
            r.coordinator_rss_kib,
            r.faults,
            r.nix_errors
        );
        total.graphs += r.graphs;
        total.builds += r.builds;
        total.reruns += r.reruns;
        total.retries += r.retries;
        total.absorbed += r.absorbed;
        total.reconnects += r.reconnects;
        total.nix_errors.extend(r.nix_errors);
        total.max_latency = total.max_latency.max(r.max_latency);
        total.coordinator_rss_kib = r.coordinator_rss_kib;
        if started.elapsed() >= length {
            break Ok(());
        }
    };
    println!(
        "soak summary (seed {seed}): {rounds} rounds in {:.1} min, {} graphs, {} builds, \
         {faults} faults, {} retries ({} builds met faults without a retry), {} reruns after faults, \
         0 rebuilds of finished work, {} farm build reconnects, {} Nix clients cut by the coordinator's death, \
         max client latency {:.1} s, coordinator RSS {rss_first} KiB after the first round, {} KiB at the end, max {rss_max} KiB{}",
        started.elapsed().as_secs_f64() / 60.0,
        total.graphs,
        total.builds,
        total.retries,
        total.absorbed,
        total.reruns,
        total.reconnects,
        total.nix_errors.len(),
        total.max_latency.as_secs_f64(),
        total.coordinator_rss_kib,
        if result.is_err() {
            " — then a round FAILED"
        } else {
            ""
        }
    );
    result
}
