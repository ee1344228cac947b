//! The graph cases: a layered DAG of `/bin/sh` derivations (the tests'
//! [`layered_graph_nix_sleeping`]: `width` leaves, `depth` layers of `width`
//! nodes each needing two of the layer below, one top) built by a farm of 2
//! builders × 2 slots through its three client paths, against the same graph
//! built locally with 4 jobs, the makespan bound, and Nix's own remote
//! building to the same two builders as OpenSSH targets; then the graph again
//! all cached. And the dispatch case: a chain whose builds stamp their start
//! and end, so the gap from one's end to the next one's start is the farm's
//! (or Nix's) overhead between a derivation becoming runnable and its build
//! starting.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, ensure};
use farm_nix::store_path::StorePath;
use farm_tests::fixture::*;
use farm_tests::{Actor, TestLogs};

use crate::report::{CaseReport, Figure, percentile};
use crate::run::{log_time, nonce, require, timed};
use crate::sshd;

/// Builders of every graph case: 2, each 2 slots.
pub const BUILDERS: usize = 2;
pub const SLOTS: usize = 2;

/// A graph case's shape.
pub struct Shape {
    pub width: usize,
    pub depth: usize,
    pub sleep: f32,
    /// Also Nix's own remote building (minutes on the big graph: skipped there).
    pub nix_remote: bool,
    /// Also the graph again, all cached.
    pub cached: bool,
}

impl Shape {
    pub fn nodes(&self) -> usize {
        self.width * (self.depth + 1) + 1
    }
}

/// The farm of the graph cases: 2 builders × 2 slots, one client key (the
/// client's `~/.ssh/id_ed25519`) and one push key.
pub fn farm(logs: &TestLogs) -> anyhow::Result<Farm> {
    let specs: Vec<BuilderSpec<'static>> = ["b-1", "b-2"]
        .into_iter()
        .map(|name| BuilderSpec {
            name,
            max_jobs: SLOTS as u32,
            conf: &[],
        })
        .collect();
    Farm::setup(logs)
        .builders(&specs)
        .clients(1)
        .pushers(1)
        .start()
}

/// Writes the graph for `salt` into `actor` and returns its file and its
/// top output (instantiated, not built).
fn graph_file(
    actor: &Actor,
    shape: &Shape,
    salt: &str,
) -> anyhow::Result<(std::path::PathBuf, StorePath)> {
    let nix = layered_graph_nix_sleeping(salt, shape.width, shape.depth, shape.sleep);
    let file = actor.write_file(&format!("{salt}.nix"), &nix)?;
    let top = top_output(actor, &file)?;
    Ok((file, top))
}

fn top_output(actor: &Actor, file: &Path) -> anyhow::Result<StorePath> {
    let drvs = actor.nix_instantiate(file, &[] as &[&str])?;
    let outs = outputs_of(actor, &drvs)?;
    outs.into_iter().next().context("the graph has no output")
}

/// The machines line of the farm as Nix's build hook's one builder, with
/// the farm's total slots.
fn farm_machine() -> String {
    format!("{FARM_STORE} x86_64-linux - {} 1 - - -", BUILDERS * SLOTS)
}

pub fn run(case: &str, shape: &Shape, logs: &TestLogs) -> anyhow::Result<CaseReport> {
    require(&[
        ("nix-build", "nix-bin"),
        ("/usr/sbin/sshd", "openssh-server"),
        ("ssh", "openssh-client"),
    ])?;
    let mut report = CaseReport::new(
        case,
        format!(
            "{} derivations ({}×{}+1 layered DAG{}), farm of {BUILDERS} builders × {SLOTS} slots, each actor its own store",
            shape.nodes(),
            shape.width,
            shape.depth + 1,
            if shape.sleep > 0.0 {
                format!(", each sleeping {} s", shape.sleep)
            } else {
                ", trivial derivations".into()
            }
        ),
    );
    let n = nonce();
    let farm = farm(logs)?;
    let key = farm.client_key()?.to_owned();
    let opts = format!("{} -o Ciphers={}", farm.ssh_opts()?, sshd::CIPHER);
    let jobs = (BUILDERS * SLOTS).to_string();

    // Baseline: the same graph built locally with the same total job count.
    let local = Actor::with_logs("local", logs)?;
    let (file, top) = graph_file(&local, shape, &format!("{case}l{n}"))?;
    let mut cmd = local.command("nix-build");
    cmd.args(["--no-out-link", "--max-jobs", &jobs]).arg(&file);
    let t = timed(logs, "[local] nix-build --max-jobs 4", cmd)?;
    ensure!(local.is_valid_path(&top)?, "local build lacks {top}");
    let local_f = Figure::secs(format!("local nix-build, {jobs} jobs"), t.time);

    // The farm's three client paths.
    let (file, farm_top) = graph_file(&farm.client, shape, &format!("{case}f{n}"))?;
    let farm_file = file.clone();
    let cmd = farm.farm_command(
        &farm.client,
        Some(&key),
        &["build", "--json", file.to_str().context("path")?],
    )?;
    let t = timed(logs, "[client] farm build --json", cmd)?;
    ensure!(farm.cache_has(&farm_top)?, "the cache lacks {farm_top}");
    let farm_f = Figure::secs("farm build", t.time);

    let (file, store_top) = graph_file(&farm.client, shape, &format!("{case}s{n}"))?;
    let mut cmd = farm.client.command("nix");
    cmd.args(["build", "--no-link", "--json", "--store", FARM_STORE])
        .args(["--eval-store", "auto", "-f"])
        .arg(&file)
        .env("NIX_SSHOPTS", &opts);
    let t = timed(logs, "[client] nix build --store ssh-ng://farm", cmd)?;
    ensure!(farm.cache_has(&store_top)?, "the cache lacks {store_top}");
    let store_f = Figure::secs("nix build --store ssh-ng://", t.time);

    let (file, hook_top) = graph_file(&farm.client, shape, &format!("{case}h{n}"))?;
    let mut cmd = farm.client.command("nix-build");
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm_machine())
        .arg(&file)
        .env("NIX_SSHOPTS", &opts);
    let t = timed(logs, "[client] nix-build, the farm as build hook", cmd)?;
    ensure!(
        farm.client.is_valid_path(&hook_top)?,
        "the client lacks {hook_top}"
    );
    let hook_f = Figure::secs(
        format!("build hook, client key (claims; farm its one builder, {jobs} jobs)"),
        t.time,
    );

    // The hook again with the push key: the farm trusts a push client's
    // derivations as it trusts its uploads, so they are signed jobs, shared
    // and cached, not claims built in a builder's store alone.
    let push_key = farm
        .own_ssh()?
        .admin_keys
        .first()
        .context("no push key")?
        .clone();
    let push_opts = format!(
        "{} -o Ciphers={}",
        farm.ssh_opts_with_key(&push_key)?,
        sshd::CIPHER
    );
    let (file, push_top) = graph_file(&farm.client, shape, &format!("{case}p{n}"))?;
    let mut cmd = farm.client.command("nix-build");
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm_machine())
        .arg(&file)
        .env("NIX_SSHOPTS", &push_opts);
    let t = timed(
        logs,
        "[client] nix-build, the farm as build hook, push key",
        cmd,
    )?;
    ensure!(
        farm.client.is_valid_path(&push_top)?,
        "the client lacks {push_top}"
    );
    ensure!(farm.cache_has(&push_top)?, "the cache lacks {push_top}");
    let hook_push_f = Figure::secs(
        format!("build hook, push key (signed jobs, no claims; {jobs} jobs)"),
        t.time,
    );

    let paths = [&farm_f, &store_f, &hook_f, &hook_push_f];
    let goal_local = (shape.sleep == 0.0).then_some("≤ 1.5×");
    for f in paths {
        report.row(
            f,
            &local_f,
            if std::ptr::eq(f, &farm_f) {
                goal_local
            } else {
                None
            },
        );
    }

    // The makespan lower bound: critical path, total work over total slots
    // (every builder speed 1).
    if shape.sleep > 0.0 {
        let s = f64::from(shape.sleep);
        let critical = (shape.depth + 2) as f64 * s;
        let work = shape.nodes() as f64 * s / (BUILDERS * SLOTS) as f64;
        let bound = critical.max(work);
        let bound_f = Figure::secs(
            format!("lower bound (critical path {critical:.2} s, work/slots {work:.2} s)"),
            std::time::Duration::from_secs_f64(bound),
        );
        for f in paths {
            report.row(f, &bound_f, std::ptr::eq(f, &farm_f).then_some("≤ 1.1×"));
        }
    }

    // Nix's own remote building: the same two builders' stores as OpenSSH
    // targets (an sshd in each builder's actor), the client's nix-build
    // with both as --builders.
    if shape.nix_remote {
        let client_pub = std::fs::read_to_string(key.with_extension("pub"))?;
        let mut servers = Vec::new();
        for b in &farm.builders {
            servers.push(sshd::start(
                &b.actor,
                &format!("{}-ssh", b.name),
                &client_pub,
            )?);
        }
        let refs: Vec<&sshd::Sshd> = servers.iter().collect();
        let config = sshd::client_config(&farm.client.root().join("ssh-baseline"), &key, &refs)?;
        let machines: Vec<String> = servers
            .iter()
            .map(|s| format!("ssh-ng://{} x86_64-linux - {SLOTS} 1 - - -", s.alias))
            .collect();
        let (file, top) = graph_file(&farm.client, shape, &format!("{case}n{n}"))?;
        let mut cmd = farm.client.command("nix-build");
        cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
            .arg(machines.join(" ; "))
            .arg(&file)
            .env("NIX_SSHOPTS", format!("-F {}", config.display()));
        let t = timed(
            logs,
            "[client] nix-build, Nix remote building to 2 sshd",
            cmd,
        )?;
        ensure!(farm.client.is_valid_path(&top)?, "the client lacks {top}");
        let nix_f = Figure::secs(
            format!("Nix remote building, {BUILDERS} sshd builders × {SLOTS}"),
            t.time,
        );
        report.row(&farm_f, &nix_f, (shape.sleep == 0.0).then_some("≤ 1/40×"));
        report.row(&store_f, &nix_f, None);
        report.row(&hook_f, &nix_f, (shape.sleep == 0.0).then_some("≤ 1/6×"));
        report.row(
            &hook_push_f,
            &nix_f,
            (shape.sleep == 0.0).then_some("≤ 1/6×"),
        );
        report.note(format!(
            "Nix remote building vs local {jobs} jobs: {:.2}×",
            nix_f.value / local_f.value
        ));
    }

    // The farm build again: everything cached.
    if shape.cached {
        let cmd = farm.farm_command(
            &farm.client,
            Some(&key),
            &["build", "--json", farm_file.to_str().context("path")?],
        )?;
        let t = timed(logs, "[client] farm build --json (all cached)", cmd)?;
        let cached_f = Figure::secs("farm build, all cached", t.time);
        let mut cmd = farm.client.command("nix-instantiate");
        cmd.arg(&farm_file);
        let t = timed(logs, "[client] nix-instantiate", cmd)?;
        let eval_f = Figure::secs("nix-instantiate alone", t.time);
        report.row(&cached_f, &eval_f, Some("≤ 1.3×"));
    }
    Ok(report)
}

/// A chain of `n` trivial derivations, each stamping `start NAME NS` and
/// `end NAME NS` (`date +%s%N`) into `stamps`.
fn chain_nix(salt: &str, n: usize, stamps: &Path) -> String {
    let w = stamps.display();
    let mut s = format!(
        "let\n  mk = name: dep: derivation {{\n    inherit name;\n    system = \"x86_64-linux\";\n    builder = \"/bin/sh\";\n    args = [ \"-c\" ''\n      echo \"start ${{name}} $(/bin/date +%s%N)\" >> {w}\n      echo ${{name}} ${{dep}} > $out\n      echo \"end ${{name}} $(/bin/date +%s%N)\" >> {w}\n    '' ];\n  }};\n  c0 = mk \"{salt}-c0\" \"\";\n"
    );
    for i in 1..n {
        s.push_str(&format!("  c{i} = mk \"{salt}-c{i}\" c{};\n", i - 1));
    }
    s.push_str(&format!("in c{}\n", n - 1));
    s
}

/// The gaps (ms) from `end c(i-1)` to `start c(i)` in a stamps file.
fn chain_gaps(stamps: &Path, salt: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let text =
        std::fs::read_to_string(stamps).with_context(|| format!("reading {}", stamps.display()))?;
    let mut at: BTreeMap<(String, String), f64> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if let (Some(kind), Some(name), Some(ns)) = (w.next(), w.next(), w.next()) {
            at.insert((kind.to_owned(), name.to_owned()), ns.parse::<f64>()? / 1e6);
        }
    }
    let mut gaps = Vec::new();
    for i in 1..n {
        let end = at.get(&("end".into(), format!("{salt}-c{}", i - 1)));
        let start = at.get(&("start".into(), format!("{salt}-c{i}")));
        let (Some(end), Some(start)) = (end, start) else {
            anyhow::bail!(
                "{salt}-c{i} or its input has no stamp in {}",
                stamps.display()
            );
        };
        gaps.push(start - end);
    }
    Ok(gaps)
}

/// The dispatch case: a chain of `n` trivial derivations, farm vs local.
pub fn dispatch(logs: &TestLogs, n: usize) -> anyhow::Result<CaseReport> {
    let mut report = CaseReport::new(
        "dispatch",
        format!(
            "a chain of {n} trivial derivations (one runnable at a time, a free slot always), farm of {BUILDERS} builders × {SLOTS} slots; \
             gap = a build's start minus its input's end (the builds' own `date +%s%N` stamps)"
        ),
    );
    let nn = nonce();
    let farm = farm(logs)?;
    let key = farm.client_key()?.to_owned();
    let stamps = tempfile::Builder::new()
        .prefix("farm-bench-stamps-")
        .tempdir()?;

    let local = Actor::with_logs("local", logs)?;
    let salt = format!("dl{nn}");
    let file = local.write_file(
        "chain.nix",
        &chain_nix(&salt, n, &stamps.path().join("local")),
    )?;
    let mut cmd = local.command("nix-build");
    cmd.args(["--no-out-link", "--max-jobs", "4"]).arg(&file);
    timed(logs, "[local] nix-build chain", cmd)?;
    let local_gaps = chain_gaps(&stamps.path().join("local"), &salt, n)?;

    let fsalt = format!("df{nn}");
    let file = farm.client.write_file(
        "chain.nix",
        &chain_nix(&fsalt, n, &stamps.path().join("farm")),
    )?;
    let cmd = farm.farm_command(
        &farm.client,
        Some(&key),
        &["build", "--json", file.to_str().context("path")?],
    )?;
    timed(logs, "[client] farm build chain", cmd)?;
    let farm_gaps = chain_gaps(&stamps.path().join("farm"), &fsalt, n)?;

    for (p, goal) in [(50.0, None), (99.0, None)] {
        report.row(
            &Figure::millis(
                format!("farm: input end → build start p{p}"),
                percentile(&farm_gaps, p),
            ),
            &Figure::millis(format!("local nix-build p{p}"), percentile(&local_gaps, p)),
            goal,
        );
    }

    // Inside the farm: `build queued` (the coordinator: runnable) → `job
    // received` (the builder), from their logs' timestamps.
    let queued = log_stamps(&farm.coordinator.process.log(), "build queued");
    let mut received = BTreeMap::new();
    for b in &farm.builders {
        if let Some(p) = &b.process {
            received.extend(log_stamps(&p.log(), "job received"));
        }
    }
    let lat: Vec<f64> = queued
        .iter()
        .filter(|(drv, _)| drv.contains(&fsalt))
        .filter_map(|(drv, q)| received.get(drv).map(|r| (r - q) * 1000.0))
        .collect();
    ensure!(
        lat.len() + 1 >= n,
        "only {} of {n} builds have both a `build queued` and a `job received` line",
        lat.len()
    );
    report.note(format!(
        "coordinator `build queued` → builder `job received` over {} builds: p50 {:.2} ms, p99 {:.2} ms (goal p50 ≤ 2 ms, p99 ≤ 10 ms)",
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 99.0)
    ));
    Ok(report)
}

/// `drv → time` of log lines containing `message` (their leading tracing
/// timestamp and `drv=` field).
fn log_stamps(log: &str, message: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(message)) {
        let Some(t) = line.split_whitespace().next().and_then(log_time) else {
            continue;
        };
        let drv = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("drv="))
            .map(|v| v.trim_matches('"').to_owned());
        if let Some(drv) = drv {
            out.entry(drv).or_insert(t);
        }
    }
    out
}

/// The cached case: a `width` × (`depth`+1) + 1 graph built locally in the
/// client (`nix-build --max-jobs 2`, the machine's cores) and pushed, its
/// `.drv` files and outputs, into the farm's cache with the push key (`nix
/// copy --to ssh-ng://`, as the push case: the farm signs what a push key
/// uploads), on a farm without builders (a build that is not cached cannot
/// run and fails the case); then `farm build` of the same file, all cached,
/// against `nix-instantiate` of it alone.
pub fn cached(
    case: &str,
    width: usize,
    depth: usize,
    logs: &TestLogs,
) -> anyhow::Result<CaseReport> {
    require(&[("nix-build", "nix-bin"), ("ssh", "openssh-client")])?;
    let shape = Shape {
        width,
        depth,
        sleep: 0.0,
        nix_remote: false,
        cached: true,
    };
    let mut report = CaseReport::new(
        case,
        format!(
            "{} derivations ({width}×{}+1 layered DAG, trivial derivations) built in the client with nix-build --max-jobs 2, \
             their .drv files and outputs pushed with nix copy --to ssh-ng:// (push key); a farm without builders",
            shape.nodes(),
            depth + 1
        ),
    );
    let n = nonce();
    let mut farm = Farm::setup(logs).clients(1).pushers(1).start()?;
    let key = farm.client_key()?.to_owned();
    let nix = layered_graph_nix_sleeping(&format!("{case}c{n}"), width, depth, 0.0);
    let file = farm.client.write_file("cached.nix", &nix)?;
    let drvs = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    let top_drv = drvs.first().context("the graph has no derivation")?.clone();
    let top = outputs_of(&farm.client, &drvs)?
        .into_iter()
        .next()
        .context("the graph has no output")?;

    let mut cmd = farm.client.command("nix-build");
    cmd.args(["--no-out-link", "--max-jobs", "2"]).arg(&file);
    let t = timed(logs, "[client] nix-build --max-jobs 2 (filling)", cmd)?;
    let built = t.time;

    let push_key = farm
        .own_ssh()?
        .admin_keys
        .first()
        .context("no push key")?
        .clone();
    // Two copies: `nix copy X.drv` means X's outputs (Nix 2.8); the `.drv`
    // closure itself needs `--derivation`.
    let sshopts = format!(
        "{} -o Ciphers={}",
        farm.ssh_opts_with_key(&push_key)?,
        sshd::CIPHER
    );
    let mut pushed = std::time::Duration::ZERO;
    for (what, flag, path) in [
        (
            "the .drv closure",
            Some("--derivation"),
            top_drv.to_string(),
        ),
        ("the outputs", None, top.to_string()),
    ] {
        let mut cmd = farm.client.command("nix");
        cmd.args(["copy", "--to", &farm.store_uri("ssh-ng")])
            .args(flag)
            .arg(path)
            .env("NIX_SSHOPTS", &sshopts);
        let title = format!("[client] nix copy --to ssh-ng://farm of {what} (filling)");
        pushed += timed(logs, &title, cmd)?.time;
    }
    ensure!(farm.cache_has(&top)?, "the cache lacks {top}");
    ensure!(farm.cache_has(&top_drv)?, "the cache lacks {top_drv}");

    let cmd = farm.farm_command(
        &farm.client,
        Some(&key),
        &["build", "--json", file.to_str().context("path")?],
    )?;
    let t = timed(logs, "[client] farm build --json (all cached)", cmd)?;
    let cached_f = Figure::secs("farm build, all cached", t.time);
    let mut cmd = farm.client.command("nix-instantiate");
    cmd.arg(&file);
    let t = timed(logs, "[client] nix-instantiate", cmd)?;
    let eval_f = Figure::secs("nix-instantiate alone", t.time);
    report.row(&cached_f, &eval_f, Some("≤ 1.3×"));
    // The coordinator learns a `.drv`'s check when it is uploaded or first
    // submitted, in memory: after a restart the first submission reads and
    // checks the whole `.drv` closure again, the next one does not.
    farm.coordinator.kill_and_restart(logs)?;
    for (title, figure) in [
        (
            "[client] farm build --json (all cached, coordinator restarted)",
            "farm build, all cached, first after a coordinator restart",
        ),
        (
            "[client] farm build --json (all cached, again)",
            "farm build, all cached, again",
        ),
    ] {
        let cmd = farm.farm_command(
            &farm.client,
            Some(&key),
            &["build", "--json", file.to_str().context("path")?],
        )?;
        let t = timed(logs, title, cmd)?;
        report.row(&Figure::secs(figure, t.time), &eval_f, None);
    }
    // Once more with the CLI's phase log, for where the time goes.
    let mut cmd = farm.farm_command(
        &farm.client,
        Some(&key),
        &["build", "--json", file.to_str().context("path")?],
    )?;
    cmd.env("RUST_LOG", "farm=debug");
    let t = timed(
        logs,
        "[client] farm build --json (all cached, phases logged)",
        cmd,
    )?;
    report.note(format!(
        "a fourth farm build with its phases logged (RUST_LOG=farm=debug): {} of {:.0} ms in all",
        phases(&t.stderr),
        t.time.as_secs_f64() * 1e3
    ));
    report.note(format!(
        "filling the cache (not measured against anything): nix-build {:.1} s, nix copy of {} paths {:.1} s",
        built.as_secs_f64(),
        2 * shape.nodes(),
        pushed.as_secs_f64()
    ));
    Ok(report)
}

/// `farm build`'s debug lines `farm build phase phase="…" ms=N` (and its
/// `farm build total`) as `phase N ms, …`.
fn phases(stderr: &str) -> String {
    let field = |line: &str, name: &str| {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        let rest = &line[at..];
        if let Some(quoted) = rest.strip_prefix('"') {
            return quoted.split('"').next().map(str::to_owned);
        }
        let end = rest.find(' ').unwrap_or(rest.len());
        Some(rest[..end].to_owned())
    };
    let mut out = Vec::new();
    for line in stderr.lines() {
        if line.contains("farm build phase") {
            if let (Some(p), Some(ms)) = (field(line, "phase"), field(line, "ms")) {
                out.push(format!("{p} {ms} ms"));
            }
        } else if line.contains("farm build total")
            && let Some(ms) = field(line, "ms")
        {
            out.push(format!("inside farm build {ms} ms"));
        }
    }
    if out.is_empty() {
        "no phase lines".into()
    } else {
        out.join(", ")
    }
}
