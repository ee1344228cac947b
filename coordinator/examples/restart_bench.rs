//! Benchmark of the state's growth and the scheduler lock (prints figures,
//! asserts nothing): `cargo run --release -p farm-coordinator --example restart_bench`.
//!
//! 1. Start time with 10 000 finished submissions (3 builds each, 2 KiB
//!    `.drv` texts) in sled, before and after pruning to a retention of 1 000,
//!    next to what a start that parses every record (the previous release's
//!    `load`) costs on the same database.
//! 2. The scheduler lock hold of a 100 000-derivation submission: all of it
//!    under the lock (`persist::submit`, what the previous release did) vs.
//!    prepared outside and only inserted under it (what the coordinator does),
//!    with a "builder session" thread taking the lock every millisecond
//!    meanwhile and reporting its longest wait.
//! 3. A follower's snapshot of that submission under the lock: views shared
//!    by reference count vs. a copy of every record.
//!
//! `FARM_BENCH_SUBMISSIONS` and `FARM_BENCH_GRAPH` change the sizes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use farm_coordinator::domain::model::*;
use farm_coordinator::domain::persist;
use farm_coordinator::domain::scheduler::{
    GraphSubmission, JobEnd, NewBuild, PlanQuery, Scheduler, SchedulerConfig,
};
use farm_coordinator::domain::state::{KeepNothing, Retention, Store};
use farm_nix::hash::HashAlgo;
use farm_nix::store_path::StorePath;

fn sp(name: &str) -> StorePath {
    let d = HashAlgo::Sha256.digest(name.as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&d.digest()[..20]);
    StorePath::from_digest(&digest, name).unwrap()
}

fn aterm(name: &str) -> Arc<[u8]> {
    // About the size of a small real .drv.
    format!(
        "Derive([(\"out\",\"/nix/store/{}-{name}\",\"\",\"\")],[],[],\"x86_64-linux\",\"/bin/sh\",[\"-c\",\"{}\"],[])",
        "a".repeat(32),
        "echo build step; ".repeat(110)
    )
    .into_bytes()
    .into()
}

fn nb(name: &str, deps: &[String]) -> NewBuild {
    NewBuild {
        drv_path: sp(&format!("{name}.drv")),
        drv_aterm: aterm(name),
        system: "x86_64-linux".into(),
        required_features: BTreeSet::new(),
        outputs: BTreeMap::from([("out".to_string(), sp(name))]),
        input_drvs: deps.iter().map(|d| sp(&format!("{d}.drv"))).collect(),
        claim: None,
    }
}

fn caps() -> Capabilities {
    Capabilities {
        systems: vec!["x86_64-linux".into()],
        max_jobs: 64,
        speed_factor: 1.0,
        cores: 8,
        ..Capabilities::default()
    }
}

fn cfg() -> SchedulerConfig {
    SchedulerConfig::default()
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Submit and build a graph to the end (every Prepare resolves to nothing),
/// writing what the scheduler changes as the coordinator does.
fn run_to_end(s: &mut Scheduler, store: &Store, g: GraphSubmission, now: i64) {
    let sid = persist::submit(s, store, g, now).unwrap();
    loop {
        s.dispatch(now);
        store.apply_all(&s.take_writes()).unwrap();
        let actions = s.take_actions();
        s.take_notices();
        if actions.is_empty() {
            break;
        }
        for a in actions {
            match a {
                Action::Prepare { build } => s.set_ready(build, Vec::new()),
                Action::Dispatch(j) => s.job_ended("b", &j.job_id, JobEnd::Built, now),
                _ => {}
            }
        }
        store.apply_all(&s.take_writes()).unwrap();
    }
    assert!(s.submission_done(sid));
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A start's median times over `runs`: sled's open (its own recovery) and
/// the state's and the scheduler's load (and its writes); and how many
/// builds it loaded.
fn start_time(path: &std::path::Path, runs: usize) -> (Duration, Duration, usize) {
    let mut opens = Vec::new();
    let mut loads = Vec::new();
    let mut loaded = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let store = Store::open(path).unwrap();
        opens.push(t.elapsed());
        let t = Instant::now();
        let mut s = Scheduler::load(cfg(), store.load().unwrap(), 0);
        store.apply_all(&s.take_writes()).unwrap();
        loads.push(t.elapsed());
        loaded = s.memory_counts().0;
        drop(s);
    }
    opens.sort();
    loads.sort();
    (opens[runs / 2], loads[runs / 2], loaded)
}

fn full_parse_time(path: &std::path::Path) -> (Duration, usize, usize) {
    let store = Store::open(path).unwrap();
    let t = Instant::now();
    let (subs, builds) = store.parse_everything().unwrap();
    (t.elapsed(), subs, builds)
}

fn history() {
    let n = env("FARM_BENCH_SUBMISSIONS", 10_000);
    let retain = (n / 10).max(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sled");
    let t = Instant::now();
    {
        let store = Store::open(&path).unwrap();
        let mut s = Scheduler::new(cfg());
        s.builder_connected("b", "k", caps(), &[], 0);
        for i in 0..n {
            let (a, b, c) = (format!("s{i}-a"), format!("s{i}-b"), format!("s{i}-c"));
            let g = GraphSubmission {
                roots: vec![sp(&format!("{c}.drv"))],
                builds: vec![
                    nb(&a, &[]),
                    nb(&b, std::slice::from_ref(&a)),
                    nb(&c, &[a.clone(), b.clone()]),
                ],
                ..Default::default()
            };
            run_to_end(&mut s, &store, g, i as i64 + 1);
        }
        // One unfinished submission, as a farm usually has (never resolved).
        persist::submit(
            &mut s,
            &store,
            GraphSubmission {
                roots: vec![sp("pending.drv")],
                builds: vec![nb("pending", &[])],
                ..Default::default()
            },
            n as i64 + 1,
        )
        .unwrap();
        s.take_actions();
        store.apply_all(&s.take_writes()).unwrap();
        store.flush_blocking().unwrap();
    }
    println!(
        "history: {n} finished submissions (3 builds each) written in {}",
        ms(t.elapsed())
    );
    let size = |p: &std::path::Path| -> u64 { walk(p) };
    let (full, subs, builds) = full_parse_time(&path);
    let (open_before, before, loaded) = start_time(&path, 5);
    println!(
        "  before pruning: sled {:.1} MiB, {} submissions, {} builds",
        size(&path) as f64 / 1048576.0,
        subs,
        builds
    );
    println!(
        "    start, median of 5: sled open {} + load {} (loads {loaded} build(s))",
        ms(open_before),
        ms(before)
    );
    println!(
        "    baseline, parsing every record as the previous release's load did: {}",
        ms(full)
    );
    let store = Store::open(&path).unwrap();
    let retention = Retention {
        finished_submissions: retain,
        max_age_ms: None,
        builder_ms: i64::MAX,
    };
    let t = Instant::now();
    let mut batches = 0;
    let mut pruned = 0;
    let mut worst = Duration::ZERO;
    loop {
        let b = Instant::now();
        let p = store.prune(&retention, &KeepNothing, 0, 256).unwrap();
        worst = worst.max(b.elapsed());
        batches += 1;
        pruned += p.submissions;
        if !p.more {
            break;
        }
    }
    let prune_time = t.elapsed();
    let c = store.counts();
    store.flush_blocking().unwrap();
    drop(store);
    println!(
        "  pruning to {retain}: {pruned} submissions in {} ({batches} batches of 256, longest {}; no scheduler lock)",
        ms(prune_time),
        ms(worst)
    );
    let (full, subs, builds) = full_parse_time(&path);
    let (open_after, after, loaded) = start_time(&path, 5);
    println!(
        "  after pruning: {subs} submissions, {builds} builds, log index {}, active {}, finished {}",
        c.log_index, c.active, c.finished
    );
    println!(
        "    start, median of 5: sled open {} + load {} (loads {loaded} build(s)); parsing every record: {}",
        ms(open_after),
        ms(after),
        ms(full)
    );
    println!(
        "    (sled's files do not shrink at once: it reuses the space; {:.1} MiB on disk now)",
        size(&path) as f64 / 1048576.0
    );
}

fn walk(p: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::metadata(p) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum())
        .unwrap_or(0)
}

/// A layered graph of `n` derivations: each node needs two of the layer below.
fn big_graph(n: usize, tag: &str) -> GraphSubmission {
    let width = 1000usize;
    let mut builds = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{tag}-{i}");
        let deps: Vec<String> = if i < width {
            Vec::new()
        } else {
            let below = i - width;
            vec![
                format!("{tag}-{below}"),
                format!("{tag}-{}", (below / width) * width + (below + 7) % width),
            ]
        };
        builds.push(nb(&name, &deps));
    }
    let roots = builds[n - width.min(n)..]
        .iter()
        .map(|b| b.drv_path.clone())
        .collect();
    GraphSubmission {
        roots,
        builds,
        ..Default::default()
    }
}

/// A thread that takes the lock every millisecond (as builder sessions do
/// for load reports and logs) until `stop`; returns its longest wait.
fn session_probe(
    sched: Arc<Mutex<Scheduler>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Duration> {
    std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let g = sched.lock().unwrap();
            worst = worst.max(t.elapsed());
            drop(g);
            std::thread::sleep(Duration::from_millis(1));
        }
        worst
    })
}

fn fresh_sched() -> (tempfile::TempDir, Store, Arc<Mutex<Scheduler>>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let mut s = Scheduler::new(cfg());
    s.builder_connected("b", "k", caps(), &[], 0);
    store.apply_all(&s.take_writes()).unwrap();
    (dir, store, Arc::new(Mutex::new(s)))
}

fn big_submit() {
    let n = env("FARM_BENCH_GRAPH", 100_000);
    println!("submission of a {n}-derivation graph (2 KiB .drv texts, sled on disk):");

    // All of it under the lock.
    let (_d1, store, sched) = fresh_sched();
    let g = big_graph(n, "one");
    let stop = Arc::new(AtomicBool::new(false));
    let probe = session_probe(sched.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    {
        let mut s = sched.lock().unwrap();
        persist::submit(&mut s, &store, g, 1).unwrap();
        s.dispatch(1);
        store.apply_all(&s.take_writes()).unwrap();
    }
    let held = t.elapsed();
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let waited = probe.join().unwrap();
    println!(
        "  all under the lock (previous release): lock held {}; a session waited up to {}",
        ms(held),
        ms(waited)
    );

    // Planned under the lock, prepared outside, inserted under it.
    let (_d2, store, sched) = fresh_sched();
    let g = big_graph(n, "two");
    let stop = Arc::new(AtomicBool::new(false));
    let probe = session_probe(sched.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(20));
    let total = Instant::now();
    let t = Instant::now();
    let q = PlanQuery::new(&g);
    let mut outside = t.elapsed();
    let t = Instant::now();
    let plan = sched.lock().unwrap().share_plan(&q);
    let plan_held = t.elapsed();
    let t = Instant::now();
    drop(q);
    let (prepared, ahead) = persist::prepare_submission(&store, g, &plan, 1).unwrap();
    outside += t.elapsed();
    let t = Instant::now();
    let (ins, notices, actions, persisted, writes) = {
        let mut s = sched.lock().unwrap();
        let ins = s.insert_submission(prepared, 1);
        s.dispatch(1);
        let n = s.take_notices();
        let a = s.take_actions();
        let w = s.take_writes();
        let persisted = store.apply_all(&w);
        (ins, n, a, persisted, w)
    };
    let insert_held = t.elapsed();
    let t = Instant::now();
    let (notices, actions) = (notices.len(), actions.len());
    persisted.unwrap();
    ahead.discard(&store, &ins.discard).unwrap();
    let sid = ins.sid;
    drop((ins.leftovers, writes));
    outside += t.elapsed();
    let total = total.elapsed();
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let waited = probe.join().unwrap();
    println!(
        "  prepared outside the lock (this release): lock held {} (plan) + {} (insert); \
         outside it {}; total {}; a session waited up to {}",
        ms(plan_held),
        ms(insert_held),
        ms(outside),
        ms(total),
        ms(waited)
    );
    println!("    ({notices} events and {actions} actions queued)");

    // A follower's snapshot of it.
    let s = sched.lock().unwrap();
    let t = Instant::now();
    let runs = 10;
    for _ in 0..runs {
        let snap = s.submission_view(sid).unwrap();
        std::hint::black_box(&snap);
    }
    let views = t.elapsed() / runs;
    let ids: Vec<BuildId> = s
        .submission_view(sid)
        .unwrap()
        .0
        .0
        .builds
        .iter()
        .copied()
        .collect();
    let t = Instant::now();
    for _ in 0..runs {
        let copies: Vec<BuildRecord> = ids
            .iter()
            .filter_map(|id| s.build_record(*id).cloned())
            .collect();
        std::hint::black_box(&copies);
    }
    let copies = t.elapsed() / runs;
    println!(
        "  a follower's snapshot under the lock: {} with shared views; {} copying every record (previous release)",
        ms(views),
        ms(copies)
    );
}

fn main() {
    history();
    big_submit();
}
