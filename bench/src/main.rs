//! The benchmark harness (issue 13): real farms with real Nix actors, as the
//! end-to-end tests start them (farm-tests' fixture), and for each case the
//! farm's figure, the baseline measured in the same run, and the ratio.
//! Not a test: `cargo test` never runs it. Run it with
//!
//! ```sh
//! cargo run --release -p farm-bench -- [--json] [CASE...]
//! ```
//!
//! Every case runs under a deadline; a hang or a failure prints every
//! actor's and process's log and the harness exits non-zero.

mod cache;
mod graph;
mod push;
mod queue;
mod report;
mod run;
mod sshd;

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use farm_tests::TestLogs;

use report::CaseReport;

/// The cases, in the order they run by default.
const CASES: &[(&str, &str)] = &[
    (
        "graph65",
        "65 trivial derivations (8×8+1): farm build, nix build --store, build hook vs local 4 jobs and Nix remote building to 2 sshd",
    ),
    (
        "sleep21",
        "21 derivations sleeping 0.3 s (4×5+1): the same paths vs local, the makespan bound and Nix remote building",
    ),
    (
        "graph1001",
        "1001 trivial derivations (40×25+1): the same paths vs local 4 jobs; then farm build again, all cached, vs nix-instantiate",
    ),
    (
        "dispatch",
        "a chain of 41 trivial derivations: input end → build start p50/p99, farm vs local; queued → job received",
    ),
    (
        "push",
        "a ~485 MB mixed path: nix copy --to ssh-ng:// and the builder's UploadNar vs nix-store --dump | zstd -1, and through OpenSSH",
    ),
    (
        "cache-reads",
        "narinfo lookups p50 (keep-alive, 16 concurrent) and NAR download, farm vs nginx on the same files",
    ),
    (
        "cached10k",
        "10001 trivial derivations (100×100+1) built locally and pushed: farm build, all cached, vs nix-instantiate",
    ),
    (
        "cached1k",
        "cached10k's measurement on 1001 derivations (40×25+1), quicker to fill",
    ),
    (
        "queue100k",
        "coordinator RSS and submit time with 100 000 queued derivations and 1 000 simulated builders (goal ≤ 100 MB)",
    ),
];

#[derive(Parser)]
#[command(
    name = "farm-bench",
    about = "Benchmarks the farm against Nix's own remote building, local builds, zstd and OpenSSH",
    after_help = "Run as root (each actor mounts its own /nix), from the workspace:\n  \
        cargo run --release -p farm-bench -- [--json] [CASE...]\n\
        It builds the farm binaries (release) first. Needs Nix (nix-bin), util-linux, and for the \
        baselines: apt-get install -y nginx zstd openssh-server openssh-client\n\
        A missing tool fails its case with the package to install.\n\n\
        Cases (all by default):\n  \
        graph65    65 trivial derivations: farm build / nix build --store / build hook vs local 4 jobs, Nix remote building\n  \
        sleep21    21 derivations sleeping 0.3 s: the same vs the makespan bound and Nix remote building\n  \
        graph1001  1001 trivial derivations, then all cached vs nix-instantiate\n  \
        dispatch   a 41-derivation chain: input end → build start p50/p99 vs local\n  \
        push       a ~485 MB path: nix copy --to ssh-ng://, the builder's UploadNar vs nix-store --dump | zstd -1 (and | ssh)\n  \
        cache-reads  narinfo p50 (keep-alive, 16 concurrent), NAR download: farm vs nginx\n  \
        cached10k  10001 derivations built locally, pushed, then farm build all cached vs nix-instantiate\n  \
        cached1k   the same on 1001 derivations (quicker, for iterating)\n  \
        queue100k  coordinator RSS with 100 000 queued and 1 000 simulated gRPC builders, submit time"
)]
struct Args {
    /// Print one JSON document (every case's rows) instead of tables.
    #[arg(long)]
    json: bool,
    /// Each case's deadline, in seconds (a hang is a failure with every log).
    #[arg(long, default_value_t = 1200)]
    deadline: u64,
    /// Cases to run (all when none is given).
    cases: Vec<String>,
}

fn run_case(name: &str, logs: &TestLogs) -> anyhow::Result<CaseReport> {
    match name {
        "graph65" => graph::run(
            name,
            &graph::Shape {
                width: 8,
                depth: 7,
                sleep: 0.0,
                nix_remote: true,
                cached: false,
            },
            logs,
        ),
        "sleep21" => graph::run(
            name,
            &graph::Shape {
                width: 4,
                depth: 4,
                sleep: 0.3,
                nix_remote: true,
                cached: false,
            },
            logs,
        ),
        "graph1001" => graph::run(
            name,
            &graph::Shape {
                width: 40,
                depth: 24,
                sleep: 0.0,
                nix_remote: false,
                cached: true,
            },
            logs,
        ),
        "dispatch" => graph::dispatch(logs, 41),
        "push" => push::run(logs),
        "cache-reads" => cache::run(logs),
        "cached10k" => graph::cached(name, 100, 99, logs),
        "cached1k" => graph::cached(name, 40, 24, logs),
        "queue100k" => queue::run(logs),
        other => bail!("no case {other}"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let names: Vec<String> = if args.cases.is_empty() {
        CASES.iter().map(|(n, _)| n.to_string()).collect()
    } else {
        args.cases.clone()
    };
    for n in &names {
        if !CASES.iter().any(|(c, _)| c == n) {
            let known: Vec<&str> = CASES.iter().map(|(c, _)| *c).collect();
            bail!("no case {n:?}; the cases are {known:?}");
        }
    }
    // The farm binaries, built (release) before any clock runs.
    for bin in farm_tests::FARM_BINARIES {
        farm_tests::farm_bin(bin)?;
    }
    let limit = Duration::from_secs(args.deadline);
    let mut reports = Vec::new();
    let mut failed = 0;
    for name in names {
        eprintln!("farm-bench: running {name}…");
        let logs = TestLogs::new(&format!("bench-{name}"))?;
        let started = Instant::now();
        let case = name.clone();
        let result = farm_tests::deadline(limit, &logs, move |logs| run_case(&case, &logs));
        let mut report = match result {
            Ok(r) => r,
            Err(e) => {
                failed += 1;
                let text = format!("{e:#}");
                // An expired deadline's error holds every log already.
                if !text.contains("===== farm-tests logs") {
                    eprintln!("{}", logs.render());
                }
                eprintln!("farm-bench: {name} FAILED: {text}");
                let mut r = CaseReport::new(&name, "");
                r.error = Some(text.lines().next().unwrap_or_default().to_owned());
                r
            }
        };
        logs.quiet();
        report.seconds = started.elapsed().as_secs_f64();
        if !args.json {
            println!("{}", report.table());
        }
        reports.push(report);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "cases": reports }))?
        );
    }
    if failed > 0 {
        bail!("{failed} case(s) failed");
    }
    Ok(())
}
