//! Eight clients at once, each its own actor (own `/nix`) with its own
//! 20-derivation graph, through all three client paths at the same time —
//! `farm build`, `nix-build --max-jobs 0 --builders 'ssh-ng://…'` (Nix's build
//! hook) and `nix build --store ssh-ng://… --eval-store auto` — on three
//! builders. Four derivations are in every graph and each client shares two
//! more with a neighbour (on another path). Checked: every client succeeds,
//! every derivation — shared ones above all — was built exactly once (the
//! witness file the builds append to, independent of the farm's own word),
//! each client got its result, and nothing is left running or queued. The
//! clients' keys have the push right: hook builds are shared and fill the
//! cache only for such hosts (a build key's are its own claims, see
//! `attack_hook`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail, ensure};
use farm_nix::store_path::StorePath;
use farm_tests::fixture::*;
use farm_tests::{Actor, FarmProcess, TestLogs, deadline};

const CLIENTS: usize = 8;
/// Each build's own work (a hang-guard scale, not a benchmark).
const SLEEP: f32 = 0.2;

#[test]
fn eight_clients_on_three_paths_build_everything_once() -> anyhow::Result<()> {
    let logs = TestLogs::new("concurrency")?;
    deadline(std::time::Duration::from_secs(600), &logs, |logs| {
        run(&logs)
    })
}

fn builders() -> Vec<BuilderSpec<'static>> {
    ["c-b1", "c-b2", "c-b3"]
        .into_iter()
        .map(|name| BuilderSpec {
            name,
            max_jobs: 2,
            conf: &["system-features ="],
        })
        .collect()
}

fn run(logs: &TestLogs) -> anyhow::Result<()> {
    let ssh = SshAccess::pushing(CLIENTS)?;
    let farm = Farm::setup(logs)
        .builders(&builders())
        .access(&ssh)
        .start()?;

    // Every client's actor and graph first, then all of them at once.
    let mut clients = Vec::new();
    let mut all_names = BTreeMap::<String, usize>::new();
    for i in 0..CLIENTS {
        let actor = Actor::with_logs(&format!("client{i}"), logs)?;
        let (nix, names) = client_graph(farm.witness_dir(), "", i, CLIENTS, SLEEP, None);
        ensure!(names.len() == GRAPH_SIZE, "{names:?}");
        for n in names {
            *all_names.entry(n).or_default() += 1;
        }
        let file = actor.write_file("graph.nix", &nix)?;
        clients.push((actor, file));
    }
    let shared: BTreeSet<&String> = all_names
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(name, _)| name)
        .collect();
    ensure!(
        shared.len() == SHARED_BY_ALL + CLIENTS,
        "shared: {shared:?}"
    );
    let mut running: Vec<(ClientPath, FarmProcess)> = Vec::new();
    for (i, (actor, file)) in clients.iter().enumerate() {
        let path = ClientPath::of(i);
        let cmd = client_command(&farm, &ssh, i, actor, path, file)?;
        let name = format!("client{i}/{path:?}");
        running.push((path, FarmProcess::spawn_split_stdout(logs, &name, cmd)?));
    }

    // Every client finishes, with its result.
    for (i, (path, p)) in running.iter_mut().enumerate() {
        let status = p.wait_exit(GRAPH_TIMEOUT * 2)?;
        ensure!(
            status.success(),
            "client {i} ({path:?}) exited {status}:\n{}",
            p.output()
        );
        let top = top_output(*path, &p.stdout())
            .with_context(|| format!("client {i} ({path:?}) printed {:?}", p.stdout()))?;
        ensure!(top.name() == format!("c{i}-top"), "client {i} built {top}");
        match path {
            // The hook brings the outputs back; the others leave them on the farm.
            ClientPath::BuildHook => ensure!(
                clients[i].0.is_valid_path(&top)?,
                "client {i}'s store lacks {top}"
            ),
            ClientPath::FarmBuild | ClientPath::Store => {
                ensure!(farm.cache_has(&top)?, "the cache lacks {top}")
            }
        }
    }

    // Each derivation ran exactly once, shared or not, and ran to its end,
    // on a farm builder (never in a client's store).
    let runs = farm.runs()?;
    let counts = run_counts(&runs);
    let mut wrong = Vec::new();
    let builder_names: BTreeSet<String> = farm.builders.iter().map(|b| b.name.clone()).collect();
    for r in &runs {
        if !builder_names.contains(&r.builder) {
            wrong.push(format!("{} ran outside the farm, in {}", r.name, r.builder));
        }
    }
    let mut per_builder = BTreeMap::<&str, usize>::new();
    for r in runs.iter().filter(|r| r.done) {
        *per_builder.entry(&r.builder).or_default() += 1;
    }
    eprintln!("builds per builder: {per_builder:?}");
    for name in all_names.keys() {
        let c = counts.get(name).copied().unwrap_or_default();
        if c != (1, 1) {
            wrong.push(format!(
                "{name}{}: started {} times, finished {}",
                if shared.contains(name) {
                    " (shared)"
                } else {
                    ""
                },
                c.0,
                c.1
            ));
        }
    }
    for name in counts.keys().filter(|n| !all_names.contains_key(*n)) {
        wrong.push(format!("{name}: not in any graph"));
    }
    ensure!(wrong.is_empty(), "builds:\n{}", wrong.join("\n"));

    // Nothing is left running or queued.
    let s = farm.status(Some(&ssh.keys[0]))?;
    ensure!(
        s["running"].as_array().is_some_and(|r| r.is_empty()),
        "still running: {s}"
    );
    ensure!(s["queued_total"] == 0, "still queued: {s}");
    Ok(())
}

/// The top output a client printed: `farm build --json`'s requested
/// derivation, `nix build --json`'s output, `nix-build`'s path.
fn top_output(path: ClientPath, stdout: &str) -> anyhow::Result<StorePath> {
    let text = match path {
        ClientPath::BuildHook => stdout.trim().to_owned(),
        ClientPath::Store => {
            let v: serde_json::Value = serde_json::from_str(stdout)?;
            v[0]["outputs"]["out"]
                .as_str()
                .context("no outputs.out")?
                .to_owned()
        }
        ClientPath::FarmBuild => {
            let v: serde_json::Value = serde_json::from_str(stdout)?;
            let requested: Vec<&serde_json::Value> = v["derivations"]
                .as_array()
                .context("no derivations")?
                .iter()
                .filter(|d| d["requested"] == true)
                .collect();
            let [top] = requested.as_slice() else {
                bail!("{} requested derivations", requested.len());
            };
            ensure!(v["success"] == true, "{v}");
            top["outputs"]["out"]
                .as_str()
                .context("no outputs.out")?
                .to_owned()
        }
    };
    Ok(StorePath::parse(&text)?)
}
