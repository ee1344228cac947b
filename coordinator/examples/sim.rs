//! The scheduler simulator's report (prints figures, asserts nothing):
//! `cargo run --release -p farm-coordinator --features sim --example sim`.
//!
//! 1. Every scenario (synthetic graph × simulated farm) under the farm's
//!    policy (the real scheduler), Nix 2.8's `build-remote` and Hydra's Rust
//!    queue runner: makespan, the speed-weighted lower bound, their ratio,
//!    and each policy's makespan over the farm's.
//! 2. The real scheduler's decisions per second with 100 000 queued builds
//!    and 1 000 builders (`FARM_SIM_QUEUED`, `FARM_SIM_BUILDERS` change them;
//!    `FARM_SIM_STEADY` the steady rounds, 2 000; `FARM_SIM_DECISIONS_ONLY=1`
//!    skips part 1, e.g. to profile the decisions alone).

use std::time::Instant;

use farm_coordinator::domain::scheduler::sim::report;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::var_os("FARM_SIM_DECISIONS_ONLY").is_none() {
        let t = Instant::now();
        let rows = report::run_all();
        print!("{}", report::table(&rows));
        println!(
            "\n({} runs simulated in {:.1} s of wall time)\n",
            rows.len(),
            t.elapsed().as_secs_f64()
        );
    }

    let queued = env("FARM_SIM_QUEUED", 100_000);
    let builders = env("FARM_SIM_BUILDERS", 1000);
    let t = Instant::now();
    let steady = env("FARM_SIM_STEADY", 2000);
    let d = report::decision_rate(queued, builders, 2, steady);
    println!(
        "decisions with {} queued, {} builders x {} slots (set up in {:.1} s):",
        d.queued,
        d.builders,
        d.slots,
        t.elapsed().as_secs_f64() - d.burst_secs - d.steady_total_secs
    );
    println!(
        "| measure | decisions | time | decisions/s |\n|---|---:|---:|---:|\n\
         | burst: every slot free, one dispatch | {} | {:.1} ms | {:.0} |\n\
         | steady: one job ends, one dispatch (dispatch only) | {} | {:.1} ms | {:.0} |\n\
         | steady, with the job_ended before each dispatch | {} | {:.1} ms | {:.0} |",
        d.burst_decisions,
        d.burst_secs * 1e3,
        d.burst_per_sec(),
        d.steady_decisions,
        d.steady_dispatch_secs * 1e3,
        d.steady_per_sec(),
        d.steady_decisions,
        d.steady_total_secs * 1e3,
        d.steady_total_per_sec(),
    );
}
