//! The hang reported in issue 10, as a regression test: a coordinator, three
//! builders (max-jobs 2, 1 and 2; the third also advertising `aarch64-darwin`
//! and `big-parallel`), and `farm build --json graph.nix` of a 30-derivation
//! graph — a 5×5 layered graph whose nodes sleep 0.3 s, a multi-output, a
//! fixed-output, a big-parallel and an aarch64-darwin derivation, and a top
//! over all of them. It used to hang (the coordinator logged the submission
//! done, `farm build` never printed `submitted` nor exited, and the
//! coordinator then ignored SIGTERM). Now `farm build` prints its JSON and
//! exits 0, every derivation ran exactly once, and the coordinator stops on
//! SIGTERM within its `--shutdown-grace`, cleanly.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use farm_nix::hash::HashAlgo;
use farm_tests::fixture::*;
use farm_tests::{FarmProcess, TestLogs, deadline};

/// The layered part: `LAYERS` layers of `WIDTH` nodes.
const LAYERS: usize = 5;
const WIDTH: usize = 5;
/// The coordinator's shutdown grace in this test, and what SIGTERM may take
/// beyond it (a hang-guard, not a timing claim).
const GRACE_SECS: u64 = 3;
const MARGIN: Duration = Duration::from_secs(5);

fn graph(witness: &std::path::Path) -> (String, Vec<String>) {
    let mut b: Vec<(String, String)> = Vec::new();
    let mut names = Vec::new();
    for l in 0..LAYERS {
        for i in 0..WIDTH {
            let name = format!("h-{l}-{i}");
            let deps = if l == 0 {
                String::new()
            } else {
                format!("n{}_{} n{}_{}", l - 1, i, l - 1, (i + 1) % WIDTH)
            };
            b.push((
                format!("n{l}_{i}"),
                format!(
                    "mk {} \"/bin/sleep 0.3; echo {name} $deps > $out\" [ {deps} ]",
                    lit(&name)
                ),
            ));
            names.push(name);
        }
    }
    b.push((
        "multi".into(),
        "mkWith { outputs = [ \"out\" \"lib\" \"dev\" ]; } \"h-multi\" \
         \"/bin/mkdir $lib $dev; echo lib $deps > $lib/lib; echo out $lib > $out; \
         echo dev > $dev/dev\" [ n0_0 ]"
            .into(),
    ));
    let word = format!("fixed-{}", witness.display()).replace('/', "-");
    let hash = HashAlgo::Sha256
        .digest(format!("{word}\n").as_bytes())
        .to_base16();
    b.push((
        "fixed".into(),
        format!(
            "mkWith {{ outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; \
             outputHash = \"{hash}\"; }} \"h-fixed\" \"echo {word} > $out\" []"
        ),
    ));
    b.push((
        "big".into(),
        "mkWith { requiredSystemFeatures = [ \"big-parallel\" ]; } \"h-big\" \
         \"echo big $deps > $out\" [ n1_1 ]"
            .into(),
    ));
    b.push((
        "darwin".into(),
        "mkWith { system = \"aarch64-darwin\"; } \"h-darwin\" \
         \"echo darwin $deps > $out\" [ n2_2 ]"
            .into(),
    ));
    let last: Vec<String> = (0..WIDTH).map(|i| format!("n{}_{i}", LAYERS - 1)).collect();
    b.push((
        "top".into(),
        format!(
            "mk \"h-top\" \"echo top $deps > $out\" [ {} multi.out multi.lib multi.dev fixed big darwin ]",
            last.join(" ")
        ),
    ));
    names.extend(["h-multi", "h-fixed", "h-big", "h-darwin", "h-top"].map(String::from));
    // `graph_nix` returns a list of the roots; `farm build graph.nix` takes it.
    (graph_nix(witness, &b, &["top"]), names)
}

#[test]
fn the_reported_graph_finishes_and_the_coordinator_stops_on_sigterm() -> anyhow::Result<()> {
    let logs = TestLogs::new("reported_hang")?;
    deadline(DEADLINE, &logs, |logs| run(&logs))
}

fn run(logs: &TestLogs) -> anyhow::Result<()> {
    let grace = GRACE_SECS.to_string();
    let mut farm = Farm::start(
        logs,
        &[
            BuilderSpec {
                name: "b1",
                max_jobs: 2,
                conf: &["system-features ="],
            },
            BuilderSpec {
                name: "b2",
                max_jobs: 1,
                conf: &["system-features ="],
            },
            BuilderSpec {
                name: "b3",
                max_jobs: 2,
                conf: &[
                    "extra-platforms = aarch64-darwin",
                    "system-features = big-parallel",
                ],
            },
        ],
        &["--shutdown-grace", &grace],
    )?;
    let (nix, names) = graph(farm.witness_dir());
    assert_eq!(names.len(), 30);
    let file = farm.client.write_file("graph.nix", &nix)?;
    let file = file.to_str().context("graph path")?;

    // As the user ran it.
    let cmd = farm.farm_command(&farm.client, None, &["build", "--json", file])?;
    let mut build = FarmProcess::spawn_split_stdout(logs, "client/farm build", cmd)?;
    let status = build.wait_exit(GRAPH_TIMEOUT)?;
    let stderr = build.output();
    ensure!(status.success(), "farm build exited {status}:\n{stderr}");
    ensure!(
        stderr.contains("submitted s"),
        "farm build never said `submitted`:\n{stderr}"
    );
    let doc: serde_json::Value = serde_json::from_str(&build.stdout())
        .with_context(|| format!("farm build printed {:?}", build.stdout()))?;
    ensure!(doc["success"] == true, "{doc}");
    let drvs = doc["derivations"].as_array().context("derivations")?;
    ensure!(drvs.len() == 30, "{} derivations: {doc}", drvs.len());
    for d in drvs {
        ensure!(d["outcome"] == "built", "{d}");
    }
    // The farm's word agrees with the builds' own: each ran exactly once.
    let mut ran: Vec<String> = farm
        .witness_lines()?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    ran.sort();
    let mut expected = names.clone();
    expected.sort();
    ensure!(ran == expected, "builds run: {ran:?}");

    // SIGTERM: the coordinator is gone within its grace, and cleanly (the
    // watchdog that ends an overrun exits 1).
    let process = &mut farm.coordinator.process;
    let asked = Instant::now();
    process.signal("TERM")?;
    let status = process.wait_exit(Duration::from_secs(GRACE_SECS) + MARGIN)?;
    let took = asked.elapsed();
    ensure!(
        status.success(),
        "the coordinator exited {status} {took:?} after SIGTERM:\n{}",
        process.output()
    );
    ensure!(
        process.output().contains("shutting down"),
        "no shutdown in the coordinator's log"
    );
    eprintln!("the coordinator stopped {took:?} after SIGTERM");
    Ok(())
}
