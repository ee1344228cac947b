//! Faults under claim builds, end to end: three Nix clients log in with
//! BUILD keys (no push), so each hook build is that key's claim build, which
//! takes its builder's store alone and deletes what it brought in afterwards.
//! Each client builds a dependency and a top pinned (by a system feature) to
//! one of three builders; the top waits for a gate. While the tops run,
//! `f-link`'s link is cut and restored, `f-victim` is `kill -9`ed with its
//! builds and restarted, and — once every top runs again — the coordinator
//! is `kill -9`ed and restarted; then the gates open and each Nix client
//! that failed runs the same command again.
//!
//! What must hold: every client's build finishes with the right bytes in its
//! own store; no builder was ever tainted (the cleanup first kills the claim
//! job's Nix and its builds, then deletes), so each ends taking jobs (a
//! final claim build on each one works); no builder's store holds any of the
//! claim paths (`nix-store --check-validity` in its actor) nor a pending
//! `claim-paths` file; the cache serves no narinfo for any claim output.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use farm_nix::StorePath;
use farm_tests::fixture::*;
use farm_tests::{Actor, FarmProcess, TestLogs, deadline};

/// The hang-guard.
const DEADLINE: Duration = Duration::from_secs(600);
/// The builders: one per fault, each the only one with its feature.
const NAMES: [&str; 3] = ["f-link", "f-victim", "f-steady"];
const LINK: usize = 0;
const VICTIM: usize = 1;
/// What a builder's log says when its store is tainted.
const TAINTED: &str = "the builder's store is not safe to build in";

#[test]
fn claim_builds_survive_a_cut_link_a_dead_builder_and_a_dead_coordinator() -> anyhow::Result<()> {
    let logs = TestLogs::new("faults_claims")?;
    deadline(DEADLINE, &logs, |logs| run(&logs))
}

/// Client `i`'s graph: `dep` (anywhere) and `top` (on builder `i`, gated).
fn graph(witness: &std::path::Path, salt: &str, i: usize, name: &str, gated: bool) -> String {
    let w = witness.display();
    let wait = if gated {
        format!("while [ ! -e {w}/gate-c{i} ]; do /bin/sleep 0.1; done")
    } else {
        String::new()
    };
    format!(
        r#"let dep = derivation {{ name = "{name}-dep"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo dep c{i} {salt} > $out" ]; }};
in derivation {{ name = "{name}-top"; system = builtins.currentSystem; builder = "/bin/sh";
    requiredSystemFeatures = [ "on-{b}" ];
    args = [ "-c" ''
      echo "$NIX_BUILD_TOP" >> {w}/{name}.started
      {wait}
      /bin/cat ${{dep}} > $out
      echo top c{i} >> $out
    '' ]; }}
"#,
        b = NAMES[i]
    )
}

/// A hook client: its actor, expression, outputs (dep, top) and what top holds.
struct Client {
    actor: Actor,
    file: PathBuf,
    dep: StorePath,
    top: StorePath,
    want: String,
    scheme: &'static str,
}

impl Client {
    fn new(farm: &Farm, logs: &TestLogs, salt: &str, i: usize, name: &str) -> anyhow::Result<Self> {
        let actor = Actor::with_logs(&format!("{name}-client{i}"), logs)?;
        let file = actor.write_file(
            &format!("{name}.nix"),
            &graph(farm.witness_dir(), salt, i, name, name == "c"),
        )?;
        let top_drv = actor
            .nix_instantiate(&file, &[] as &[&str])?
            .pop()
            .context("no derivation")?;
        let out_of = |drv: &str| -> anyhow::Result<StorePath> {
            Ok(StorePath::parse(
                actor.run("nix-store", &["-q", "--outputs", drv])?.trim(),
            )?)
        };
        let top = out_of(&top_drv.to_string())?;
        let dep_drv = actor
            .closure(&top_drv)?
            .into_iter()
            .find(|p| p.name() == format!("{name}-dep.drv"))
            .context("no dep derivation")?;
        let dep = out_of(&dep_drv.to_string())?;
        Ok(Client {
            actor,
            file,
            dep,
            top,
            want: format!("dep c{i} {salt}\ntop c{i}\n"),
            scheme: if i == VICTIM { "ssh" } else { "ssh-ng" },
        })
    }

    /// `nix-build --max-jobs 0 --builders …` of the graph, logged in with key `i`.
    fn spawn(
        &self,
        farm: &Farm,
        ssh: &SshAccess,
        logs: &TestLogs,
        i: usize,
        attempt: &str,
    ) -> anyhow::Result<FarmProcess> {
        let mut cmd = self.actor.command("nix-build");
        cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
            .arg(format!(
                "{} x86_64-linux - 8 1 {} - -",
                farm.store_uri(self.scheme),
                NAMES.map(|n| format!("on-{n}")).join(",")
            ))
            .arg(&self.file)
            .env("NIX_SSHOPTS", ssh.nix_sshopts(farm, i)?);
        FarmProcess::spawn_split_stdout(logs, &format!("{}{attempt}", self.actor.name()), cmd)
    }

    /// The build is done and right: `top` in the client's store, its bytes.
    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.actor.is_valid_path(&self.top)?,
            "{} is not valid in {}'s store",
            self.top,
            self.actor.name()
        );
        let got = std::fs::read_to_string(self.actor.host_path_of(&self.top))?;
        ensure!(got == self.want, "{} holds {got:?}", self.top);
        Ok(())
    }
}

/// Waits until every client's top runs, per the coordinator (after `min`
/// starts each, so a rerun after a fault is counted).
fn wait_tops_running(farm: &Farm, ssh: &SshAccess, min: &[usize]) -> anyhow::Result<()> {
    let deadline = Instant::now() + GRAPH_TIMEOUT;
    loop {
        let s = farm.status(Some(&ssh.keys[0]))?;
        let running: Vec<(String, String)> = s["running"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                Some((
                    r["drv_path"].as_str()?.to_owned(),
                    r["builder"].as_str()?.to_owned(),
                ))
            })
            .collect();
        let starts = gate_starts(farm, "c");
        let all = (0..NAMES.len()).all(|i| {
            running
                .iter()
                .any(|(d, b)| d.ends_with("-c-top.drv") && b == NAMES[i])
                && starts.iter().filter(|b| **b == NAMES[i]).count() >= min[i]
        });
        if all {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the tops never all ran (starts {:?}): {s}",
            gate_starts(farm, "c")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run(logs: &TestLogs) -> anyhow::Result<()> {
    let ssh = SshAccess::new(NAMES.len())?;
    let specs = [
        BuilderSpec {
            name: NAMES[0],
            max_jobs: 2,
            conf: &["system-features = on-f-link"],
        },
        BuilderSpec {
            name: NAMES[1],
            max_jobs: 2,
            conf: &["system-features = on-f-victim"],
        },
        BuilderSpec {
            name: NAMES[2],
            max_jobs: 2,
            conf: &["system-features = on-f-steady"],
        },
    ];
    let mut farm = Farm::setup(logs)
        .builders(&specs)
        .args(&["--shutdown-grace", "5"])
        .access(&ssh)
        .proxied(NAMES[LINK])
        .start()?;
    let salt = farm.witness_dir().display().to_string();

    // Client i's top is pinned to builder i (its feature).
    let clients: Vec<Client> = (0..NAMES.len())
        .map(|i| Client::new(&farm, logs, &salt, i, "c"))
        .collect::<anyhow::Result<_>>()?;
    // Same name "c" per client, distinct derivations (the salt, `c{i}` in the
    // scripts, the feature); witness starts are told apart by builder.
    let mut running: Vec<FarmProcess> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| c.spawn(&farm, &ssh, logs, i, ""))
        .collect::<anyhow::Result<_>>()?;

    // Every top runs (a claim job mid-build on each builder).
    wait_tops_running(&farm, &ssh, &[1, 1, 1])?;

    // The link of f-link is cut mid-claim-job and restored.
    farm.cut_link(LINK, Duration::from_millis(2500))?;
    // f-victim is killed with its builds mid-claim-job, and restarted.
    farm.kill_builder(VICTIM)?;
    std::thread::sleep(Duration::from_millis(1500));
    farm.restart_builder(VICTIM)?;
    // Once every top runs again (f-victim's a second time), the coordinator
    // dies under them all and comes back.
    wait_tops_running(&farm, &ssh, &[1, 2, 1])?;
    farm.coordinator.process.kill()?;
    std::thread::sleep(Duration::from_millis(1000));
    farm.coordinator.restart(logs)?;
    for i in 0..NAMES.len() {
        farm.wait_builder_online(i)?;
    }
    for i in 0..NAMES.len() {
        std::fs::write(farm.witness_dir().join(format!("gate-c{i}")), "")?;
    }

    // Every client finishes: a Nix client cut by the coordinator's death
    // fails with an error, and the same command again completes.
    for (i, p) in running.iter_mut().enumerate() {
        let status = p.wait_exit(GRAPH_TIMEOUT)?;
        if status.success() {
            continue;
        }
        let stderr = p.output();
        ensure!(
            stderr.lines().any(|l| l.contains("error")),
            "client {i} failed without an error:\n{stderr}"
        );
        let mut again = clients[i].spawn(&farm, &ssh, logs, i, " (again)")?;
        let status = again.wait_exit(GRAPH_TIMEOUT)?;
        ensure!(
            status.success(),
            "client {i} run again exited {status}:\n{}",
            again.output()
        );
    }
    for c in &clients {
        c.check()?;
    }

    // Each builder ends taking jobs: a fresh claim build pinned to it works.
    let probes: Vec<Client> = (0..NAMES.len())
        .map(|i| Client::new(&farm, logs, &format!("{salt} probe"), i, "p"))
        .collect::<anyhow::Result<_>>()?;
    for (i, c) in probes.iter().enumerate() {
        let mut p = c.spawn(&farm, &ssh, logs, i, "")?;
        let status = p.wait_exit(GRAPH_TIMEOUT)?;
        ensure!(
            status.success(),
            "the probe build on {} exited {status}:\n{}",
            NAMES[i],
            p.output()
        );
        c.check()?;
        let starts = gate_starts(&farm, "p");
        ensure!(
            starts.iter().filter(|b| **b == NAMES[i]).count() == 1,
            "the probe of {} ran on {starts:?}",
            NAMES[i]
        );
    }

    // No builder was ever tainted; none holds a claim path or a pending
    // list of them; the cache serves none.
    let claims: Vec<&StorePath> = clients
        .iter()
        .chain(&probes)
        .flat_map(|c| [&c.dep, &c.top])
        .collect();
    for b in &farm.builders {
        let log = b.process.as_ref().map(|p| p.log()).unwrap_or_default();
        ensure!(
            !log.contains(TAINTED),
            "builder {} was tainted:\n{log}",
            b.name
        );
        ensure!(
            !b.state_dir.join("claim-paths").exists(),
            "builder {} still lists claim paths",
            b.name
        );
        for p in &claims {
            ensure!(
                !b.actor.is_valid_path(p)?,
                "builder {}'s store holds the claim {p}",
                b.name
            );
        }
    }
    for p in &claims {
        ensure!(!farm.cache_has(p)?, "the cache serves {p}");
    }
    // Nor was the killed builder's earlier instance (every log of the test).
    for entry in std::fs::read_dir(logs.dir())? {
        let path = entry?.path();
        if let Ok(text) = std::fs::read_to_string(&path) {
            ensure!(
                !text.contains(TAINTED),
                "tainted, says {}:\n{text}",
                path.display()
            );
        }
    }
    eprintln!(
        "top starts: {:?}; probe starts: {:?}",
        gate_starts(&farm, "c"),
        gate_starts(&farm, "p")
    );
    Ok(())
}
