//! One round of the fault scenario, shared by `faults.rs` (one fixed round)
//! and `soak.rs` (rounds with random timing for N minutes).
//!
//! A farm of three builders — `f-link` dials the coordinator through a
//! [`LinkProxy`](farm_tests::LinkProxy), `f-victim` gets `kill -9`ed,
//! `f-steady` is left alone — and clients on all three paths, each building
//! its own [`client_graph`] whose top waits for a gate file. While the graphs
//! run the round cuts and restores the link, kills and restarts the victim
//! (with every build it ran) and kills the coordinator with `kill -9` and
//! restarts it on the same state and ports, then opens the gate. The gate
//! keeps every graph unfinished until the last fault, so each fault lands
//! while all graphs run.
//!
//! Checked each round:
//! - every `farm build` finishes (it follows its submission again after
//!   losing the coordinator, which its stderr shows);
//! - a Nix client that failed did so with an error, while the coordinator was
//!   killed under it, and the same command again completes;
//! - no build runs again once its outputs are in the cache (snapshots of the
//!   cache taken before each fault and before each rerun, against the witness
//!   file the builds append to);
//! - nothing published is lost: what the cache held before the coordinator's
//!   death it holds after its restart, and at the end every output of every
//!   graph is substituted from the cache by a fresh Nix store;
//! - a build's retries (from the coordinator's logs) never exceed the faults
//!   it met (it ran on the faulted builder, or was dispatched to it while the
//!   fault lasted, or ran when the coordinator died), and a build that met
//!   none was never retried;
//! - nothing is left running or queued.

#![allow(dead_code)] // faults.rs and soak.rs use different parts

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use farm_nix::store_path::StorePath;
use farm_tests::{Actor, FarmProcess};

use farm_tests::fixture::*;

/// The builders, by index in [`Farm::builders`].
pub const LINK: usize = 0;
pub const VICTIM: usize = 1;
pub const STEADY: usize = 2;
/// The coordinator's `--builder-grace` (set by [`Farm::start`]) and a little:
/// how long after a fault its consequences (requeues) may still come.
const SETTLE: Duration = Duration::from_millis(1500);

/// The three builders.
pub fn builders() -> Vec<BuilderSpec<'static>> {
    ["f-link", "f-victim", "f-steady"]
        .into_iter()
        .map(|name| BuilderSpec {
            name,
            max_jobs: 2,
            conf: &["system-features ="],
        })
        .collect()
}

/// The farm: the builders, `f-link` behind a proxy, the clients' keys authorized.
pub fn start_farm(logs: &farm_tests::TestLogs, ssh: &SshAccess) -> anyhow::Result<Farm> {
    Farm::setup(logs)
        .builders(&builders())
        .args(&["--shutdown-grace", "5"])
        .access(ssh)
        .proxied("f-link")
        .start()
}

/// A fault the round injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Cut `f-link`'s link, restore it after a while.
    CutLink,
    /// `kill -9` `f-victim` and its builds, start it again after a while.
    KillBuilder,
    /// `kill -9` the coordinator, start it again on the same state and ports.
    KillCoordinator,
}

/// One fault, after a pause, lasting a while.
#[derive(Debug, Clone)]
pub struct Step {
    pub fault: Fault,
    pub after: Duration,
    pub lasting: Duration,
}

/// What a round does.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Prefix of every derivation name (unique per round).
    pub salt: String,
    /// Each build's sleep.
    pub sleep: f32,
    /// Builds finished (this round) before the first fault.
    pub warmup: usize,
    pub steps: Vec<Step>,
    /// Kill the coordinator only once every client's top runs (on the gate):
    /// every Nix client's session is open then, so each must fail.
    pub coordinator_at_gate: bool,
}

/// What a round saw.
#[derive(Debug, Default, Clone)]
pub struct RoundReport {
    pub graphs: usize,
    /// Distinct derivations that ran to their end.
    pub builds: usize,
    /// Runs started beyond the first per derivation (after faults).
    pub reruns: usize,
    /// Retries, summed over builds (the coordinator's counts).
    pub retries: u32,
    /// Builds whose faults did not cost a retry (met > retries).
    pub absorbed: usize,
    /// Longest a client took, reruns included.
    pub max_latency: Duration,
    /// `farm build` clients that followed their submission again.
    pub reconnects: usize,
    /// The Nix clients' first error lines when the coordinator died under them.
    pub nix_errors: Vec<String>,
    pub coordinator_rss_kib: u64,
    pub faults: Vec<String>,
}

/// One client of the round.
struct Client {
    path: ClientPath,
    started: Instant,
    process: FarmProcess,
}

/// The cache's content as far as this round goes, and where the witness was.
struct Snapshot {
    in_cache: BTreeSet<String>,
    runs_before: usize,
}

/// A time a fault lasted, in one coordinator instance's log (byte offsets).
struct Window {
    instance: usize,
    start: usize,
    end: usize,
    /// The builder it hit; `None`: all of them (the coordinator died).
    builder: Option<String>,
}

/// Runs one round with `clients` (one actor each; client `i` takes path
/// [`ClientPath::of`]`(i)` and key `i`); fails on any broken promise.
pub fn run_round(
    farm: &mut Farm,
    ssh: &SshAccess,
    clients: &[Actor],
    sc: &Scenario,
) -> anyhow::Result<RoundReport> {
    let logs = farm.logs.clone();
    let gate = format!("{}gate", sc.salt);
    let mut report = RoundReport {
        graphs: clients.len(),
        ..RoundReport::default()
    };

    // The graphs, and every derivation's outputs (from the client's own store).
    let mut outputs: BTreeMap<String, Vec<StorePath>> = BTreeMap::new();
    let mut files = Vec::new();
    for (i, actor) in clients.iter().enumerate() {
        let (nix, names) = client_graph(
            farm.witness_dir(),
            &sc.salt,
            i,
            clients.len(),
            sc.sleep,
            Some(&gate),
        );
        let file = actor.write_file(&format!("{}graph.nix", sc.salt), &nix)?;
        let top = actor
            .nix_instantiate(&file, &[] as &[&str])?
            .pop()
            .context("no top derivation")?;
        let drvs: Vec<StorePath> = actor
            .closure(&top)?
            .into_iter()
            .filter(|p| p.name().ends_with(".drv"))
            .collect();
        ensure!(drvs.len() == names.len(), "{drvs:?} vs {names:?}");
        for d in drvs {
            let outs = actor.run("nix-store", &["-q", "--outputs", &d.to_string()])?;
            let outs = outs
                .lines()
                .map(StorePath::parse)
                .collect::<Result<Vec<_>, _>>()?;
            outputs.insert(d.name().trim_end_matches(".drv").to_owned(), outs);
        }
        files.push(file);
    }
    let runs_base = farm.runs()?.len();

    let spawn = |farm: &Farm, i: usize, attempt: &str| -> anyhow::Result<Client> {
        let path = ClientPath::of(i);
        let cmd = client_command(farm, ssh, i, &clients[i], path, &files[i])?;
        let name = format!("{}client{i}/{path:?}{attempt}", sc.salt);
        Ok(Client {
            path,
            started: Instant::now(),
            process: FarmProcess::spawn_split_stdout(&logs, &name, cmd)?,
        })
    };
    let mut running: Vec<Client> = Vec::new();
    for i in 0..clients.len() {
        running.push(spawn(farm, i, "")?);
    }

    // Warm up: some builds done, nobody gone.
    let round_runs =
        |farm: &Farm| -> anyhow::Result<Vec<Run>> { Ok(farm.runs()?.split_off(runs_base)) };
    let deadline = Instant::now() + GRAPH_TIMEOUT;
    while round_runs(farm)?.iter().filter(|r| r.done).count() < sc.warmup {
        for (i, c) in running.iter_mut().enumerate() {
            if let Some(status) = c.process.try_wait()? {
                bail!(
                    "client {i} ({:?}) exited {status} before any fault:\n{}",
                    c.path,
                    c.process.output()
                );
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no progress within {GRAPH_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The faults.
    let mut snapshots: Vec<Snapshot> = Vec::new();
    let mut windows: Vec<Window> = Vec::new();
    let mut instances: Vec<String> = Vec::new();
    let mut coordinator_killed = false;
    for step in &sc.steps {
        std::thread::sleep(step.after);
        if step.fault == Fault::KillCoordinator && sc.coordinator_at_gate {
            wait_tops_running(farm, ssh, &sc.salt, clients.len())?;
        }
        snapshots.push(snapshot(farm, &outputs)?);
        let instance = instances.len();
        let start = farm.coordinator.process.log().len();
        match step.fault {
            Fault::CutLink => {
                farm.cut_link(LINK, step.lasting)?;
                std::thread::sleep(SETTLE);
                windows.push(Window {
                    instance,
                    start,
                    end: farm.coordinator.process.log().len(),
                    builder: Some(farm.builders[LINK].name.clone()),
                });
            }
            Fault::KillBuilder => {
                farm.kill_builder(VICTIM)?;
                std::thread::sleep(step.lasting);
                farm.restart_builder(VICTIM)?;
                std::thread::sleep(SETTLE);
                windows.push(Window {
                    instance,
                    start,
                    end: farm.coordinator.process.log().len(),
                    builder: Some(farm.builders[VICTIM].name.clone()),
                });
            }
            Fault::KillCoordinator => {
                farm.coordinator.process.kill()?;
                instances.push(farm.coordinator.process.log());
                std::thread::sleep(step.lasting);
                farm.coordinator.restart(&logs)?;
                coordinator_killed = true;
                // Nothing published is lost: what the cache had, it has.
                let had = &snapshots.last().context("a snapshot")?.in_cache;
                let now = snapshot(farm, &outputs)?;
                let lost: Vec<&String> = had.difference(&now.in_cache).collect();
                ensure!(
                    lost.is_empty(),
                    "the restarted coordinator lost published outputs of {lost:?}"
                );
                for i in 0..farm.builders.len() {
                    farm.wait_builder_online(i)?;
                }
                std::thread::sleep(SETTLE);
                // Builds it had running met the fault (counted from the old
                // log below); so did whatever it re-dispatched meanwhile.
                windows.push(Window {
                    instance: instance + 1,
                    start: 0,
                    end: farm.coordinator.process.log().len(),
                    builder: None,
                });
            }
        }
        report
            .faults
            .push(format!("{:?} for {:?}", step.fault, step.lasting));
    }
    std::fs::write(farm.witness_dir().join(&gate), "")?;

    // Every client finishes; a Nix client cut by the coordinator's death
    // fails with an error, and the same command again completes.
    let mut reruns: Vec<(usize, Client)> = Vec::new();
    for (i, c) in running.iter_mut().enumerate() {
        let status = c.process.wait_exit(GRAPH_TIMEOUT)?;
        let stderr = c.process.output();
        match c.path {
            ClientPath::FarmBuild => {
                ensure!(
                    status.success(),
                    "client {i}'s farm build exited {status}:\n{stderr}"
                );
                let followed_again =
                    stderr.contains("lost the coordinator") && stderr.contains("again");
                if coordinator_killed {
                    ensure!(
                        followed_again,
                        "client {i}'s farm build did not follow its submission again after the coordinator's death:\n{stderr}"
                    );
                }
                if followed_again {
                    report.reconnects += 1;
                }
                report.max_latency = report.max_latency.max(c.started.elapsed());
            }
            ClientPath::BuildHook | ClientPath::Store if !status.success() => {
                ensure!(
                    coordinator_killed,
                    "client {i} ({:?}) failed though the coordinator stayed up:\n{stderr}",
                    c.path
                );
                let error = stderr
                    .lines()
                    .find(|l| l.contains("error"))
                    .with_context(|| {
                        format!(
                            "client {i} ({:?}) failed without an error:\n{stderr}",
                            c.path
                        )
                    })?;
                report
                    .nix_errors
                    .push(format!("{:?}: {}", c.path, error.trim()));
                snapshots.push(snapshot(farm, &outputs)?);
                let mut again = spawn(farm, i, " (again)")?;
                again.started = c.started;
                reruns.push((i, again));
            }
            ClientPath::BuildHook | ClientPath::Store => {
                ensure!(
                    !sc.coordinator_at_gate,
                    "client {i} ({:?}) survived the coordinator's death in the middle of its session:\n{stderr}",
                    c.path
                );
                report.max_latency = report.max_latency.max(c.started.elapsed());
            }
        }
    }
    for (i, c) in &mut reruns {
        let status = c.process.wait_exit(GRAPH_TIMEOUT)?;
        ensure!(
            status.success(),
            "client {i} ({:?}) run again exited {status}:\n{}",
            c.path,
            c.process.output()
        );
        report.max_latency = report.max_latency.max(c.started.elapsed());
    }

    // No build ran again once the cache had its outputs.
    let runs = round_runs(farm)?;
    let mut again = Vec::new();
    for s in &snapshots {
        for r in runs.iter().skip(s.runs_before.saturating_sub(runs_base)) {
            if !r.done && s.in_cache.contains(&r.name) {
                again.push(format!("{} on {}", r.name, r.builder));
            }
        }
    }
    again.sort();
    again.dedup();
    ensure!(
        again.is_empty(),
        "finished builds ran again (their outputs were in the cache already): {again:?}"
    );
    let counts = run_counts(&runs);
    report.builds = counts.values().filter(|(_, done)| *done > 0).count();
    report.reruns = counts.values().map(|(s, _)| s.saturating_sub(1)).sum();
    let unknown: Vec<&String> = counts
        .keys()
        .filter(|n| !outputs.contains_key(*n))
        .collect();
    ensure!(
        unknown.is_empty(),
        "runs of derivations of no graph: {unknown:?}"
    );

    // Nothing published is lost: a fresh store substitutes every output.
    let all: Vec<String> = outputs.values().flatten().map(|p| p.to_string()).collect();
    let reader = Actor::with_logs(&format!("{}reader", sc.salt), &logs)?;
    let e = &farm.coordinator.endpoints;
    let mut args = vec![
        "--realise".to_owned(),
        "--option".into(),
        "substituters".into(),
        e.http_url(),
        "--option".into(),
        "trusted-public-keys".into(),
        e.cache_public_key.clone(),
    ];
    args.extend(all.iter().cloned());
    reader.run("nix-store", &args)?;
    for p in outputs.values().flatten() {
        ensure!(reader.is_valid_path(p)?, "{p} was not substituted");
    }

    // Retries only where faults were met.
    instances.push(farm.coordinator.process.log());
    let (retries, met) = retries_and_faults(&instances, &windows, &outputs);
    let mut unexplained = Vec::new();
    for (drv, r) in &retries {
        let m = met.get(drv).copied().unwrap_or(0);
        if *r > m {
            unexplained.push(format!("{drv}: {r} retries, {m} faults met"));
        }
        report.retries += r;
    }
    report.absorbed = met
        .iter()
        .filter(|(drv, m)| **m > retries.get(*drv).copied().unwrap_or(0))
        .count();
    ensure!(
        unexplained.is_empty(),
        "builds retried more often than they met faults:\n{}",
        unexplained.join("\n")
    );

    // Nothing is left running or queued.
    let s = farm.status(Some(&ssh.keys[0]))?;
    ensure!(
        s["running"].as_array().is_some_and(|r| r.is_empty()),
        "still running: {s}"
    );
    ensure!(s["queued_total"] == 0, "still queued: {s}");
    report.coordinator_rss_kib = rss_kib(farm.coordinator.process.pid())?;
    Ok(report)
}

/// Which of this round's derivations have every output in the cache, and
/// how long the witness was afterwards (in that order: a run logged after
/// the count started after the cache had the outputs).
fn snapshot(farm: &Farm, outputs: &BTreeMap<String, Vec<StorePath>>) -> anyhow::Result<Snapshot> {
    let mut in_cache = BTreeSet::new();
    for (name, outs) in outputs {
        let mut all = true;
        for o in outs {
            all &= farm.cache_has(o)?;
        }
        if all {
            in_cache.insert(name.clone());
        }
    }
    Ok(Snapshot {
        in_cache,
        runs_before: farm.runs()?.len(),
    })
}

/// Waits until every client's top runs on a builder (it waits on the gate).
fn wait_tops_running(
    farm: &Farm,
    ssh: &SshAccess,
    salt: &str,
    clients: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + GRAPH_TIMEOUT;
    loop {
        let s = farm.status(Some(&ssh.keys[0]))?;
        let running: BTreeSet<String> = s["running"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["drv_path"].as_str())
            .map(drv_name)
            .collect();
        if (0..clients).all(|i| running.contains(&format!("{salt}c{i}-top"))) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the tops never all ran: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A build's events in one coordinator log.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Running(String),
    Finished,
    Requeued(u32),
}

/// Per derivation name (of `outputs`): its retries (the coordinator's
/// count) and the faults it met, from the coordinator instances' logs in order.
fn retries_and_faults(
    instances: &[String],
    windows: &[Window],
    outputs: &BTreeMap<String, Vec<StorePath>>,
) -> (BTreeMap<String, u32>, BTreeMap<String, u32>) {
    let mut drv_of: BTreeMap<String, String> = BTreeMap::new();
    // (instance, offset, build, event)
    let mut events: Vec<(usize, usize, String, Event)> = Vec::new();
    for (k, text) in instances.iter().enumerate() {
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            let at = offset;
            offset += line.len();
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            let Some(build) = field("build") else {
                continue;
            };
            if let Some(drv) = field("drv") {
                drv_of.insert(build.clone(), drv_name(&drv));
            }
            let ev = if line.contains("build running") {
                field("builder").map(Event::Running)
            } else if line.contains("build finished") {
                Some(Event::Finished)
            } else if line.contains("build requeued") {
                field("retries")
                    .and_then(|r| r.parse().ok())
                    .map(Event::Requeued)
            } else {
                None
            };
            if let Some(ev) = ev {
                events.push((k, at, build, ev));
            }
        }
    }
    let mut retries: BTreeMap<String, u32> = BTreeMap::new();
    let mut met: BTreeMap<String, u32> = BTreeMap::new();
    let builds: BTreeSet<&String> = events.iter().map(|(_, _, b, _)| b).collect();
    for build in builds {
        let Some(name) = drv_of.get(build).filter(|n| outputs.contains_key(*n)) else {
            continue;
        };
        let mine: Vec<&(usize, usize, String, Event)> =
            events.iter().filter(|(_, _, b, _)| b == build).collect();
        let r = mine
            .iter()
            .filter_map(|(_, _, _, e)| match e {
                Event::Requeued(n) => Some(*n),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut m = 0;
        for w in windows {
            let hits = |b: &String| w.builder.as_ref().is_none_or(|x| x == b);
            let before = mine
                .iter()
                .rfind(|(k, at, _, _)| *k == w.instance && *at < w.start);
            let running_at_start = matches!(before, Some((_, _, _, Event::Running(b))) if hits(b));
            let dispatched_during = mine.iter().any(|(k, at, _, e)| {
                *k == w.instance
                    && (w.start..w.end).contains(at)
                    && matches!(e, Event::Running(b) if hits(b))
            });
            if running_at_start || dispatched_during {
                m += 1;
            }
        }
        // The instances that were killed: whatever ran at their end.
        for k in 0..instances.len().saturating_sub(1) {
            let last = mine.iter().rfind(|(i, _, _, _)| *i == k);
            if matches!(last, Some((_, _, _, Event::Running(_)))) {
                m += 1;
            }
        }
        if r > 0 {
            retries.insert(name.clone(), r);
        }
        if m > 0 {
            met.insert(name.clone(), m);
        }
    }
    (retries, met)
}

/// A process's resident set size, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// A small deterministic random source (xorshift64*), seeded by the caller.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A duration in `[lo, hi)`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis().max(1) as u64;
        lo + Duration::from_millis(self.next_u64() % span)
    }

    /// A number in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}
