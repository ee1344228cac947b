//! The scheduler simulator (issue 13, item 2): a discrete-event farm that
//! drives a scheduling policy over a synthetic derivation graph, in simulated
//! milliseconds, and reports the makespan against the speed-weighted lower
//! bound. Three policies: the farm's own ([`farm::FarmPolicy`], the real
//! [`super::Scheduler`] with the simulated clock as its `now`), Nix 2.8's
//! `build-remote` ([`nix::NixPolicy`]) and Hydra's Rust queue runner
//! ([`hydra::HydraPolicy`]), each written from its source (cited there).
//!
//! The simulated farm (the truth the policies do not see):
//! - a job on builder `b` occupies one of its slots from its start to its end:
//!   first it fetches the outputs of its direct dependencies that `b` does not
//!   hold yet (bytes / `b`'s link speed), then builds (`work / speed`), then
//!   uploads its own output (bytes / link speed); `b` holds what it fetched and
//!   built from then on. With [`Policy::upload_lock`] (Nix) the fetches to one
//!   builder run one at a time, as `build-remote`'s per-machine upload lock makes them;
//! - a builder may die at a given time: its running jobs are lost, it takes
//!   nothing more, and the policy is told (each reacts as its source does);
//! - a derivation becomes runnable when all its dependencies are built; what a
//!   policy adds on top (polls, timers, retries) is the policy's.
//!
//! Everything is deterministic: graphs come from a seeded generator
//! ([`graphs`]), events at one time are handled in the order they were made.
//! [`report`] runs the scenarios and measures decisions per second.

pub mod farm;
pub mod graphs;
pub mod hydra;
pub mod nix;
pub mod report;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

/// One derivation of a simulated graph.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub system: String,
    /// Build time in milliseconds on a builder of speed factor 1.
    pub work_ms: u64,
    /// Size of its output (what dependents fetch, what it uploads).
    pub out_bytes: u64,
    /// Indices of the tasks it needs first (all lower than its own).
    pub deps: Vec<usize>,
}

/// A derivation graph in dependency order (a task after its dependencies).
#[derive(Debug, Clone)]
pub struct Graph {
    pub name: String,
    pub tasks: Vec<Task>,
}

impl Graph {
    /// For each task, the tasks that depend on it directly.
    pub fn dependents(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.tasks.len()];
        for (i, t) in self.tasks.iter().enumerate() {
            for &d in &t.deps {
                out[d].push(i);
            }
        }
        out
    }
}

/// One simulated builder.
#[derive(Debug, Clone)]
pub struct BuilderSpec {
    pub name: String,
    pub systems: Vec<String>,
    pub slots: u32,
    /// Relative speed: a task of `work_ms` builds in `work_ms / speed`.
    pub speed: f64,
    pub cores: u32,
    /// What Hydra's builder reports from `/proc/cpuinfo` (its machine score uses it).
    pub bogomips: f64,
    /// Link speed to the cache (or, for Nix, to the client), bytes per millisecond.
    pub bytes_per_ms: f64,
    /// When it dies (simulated ms), if it does.
    pub dies_at_ms: Option<i64>,
}

/// The builders of a scenario.
#[derive(Debug, Clone)]
pub struct Farm {
    pub name: String,
    pub builders: Vec<BuilderSpec>,
}

/// A scheduling policy as the simulator drives it. Builders and tasks are
/// indices into the [`Farm`] and [`Graph`] given to [`Policy::start`].
pub trait Policy {
    fn name(&self) -> &'static str;
    /// The graph is submitted and every builder is up, at `now`.
    fn start(&mut self, g: &Graph, farm: &Farm, now: i64);
    /// A job built successfully (its output is uploaded).
    fn job_done(&mut self, task: usize, builder: usize, now: i64);
    /// A builder died; `lost` were running there and did not finish.
    fn builder_died(&mut self, builder: usize, lost: &[usize], now: i64);
    /// The jobs to start now: (task, builder). Called after every batch of events.
    fn decide(&mut self, now: i64) -> Vec<(usize, usize)>;
    /// When the policy wants to run again with no event (a poll or a timer), after `now`.
    fn next_wake(&self, now: i64) -> Option<i64>;
    /// Whether fetches of inputs to one builder run one at a time.
    fn upload_lock(&self) -> bool {
        false
    }
}

/// What a simulation measured.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// When the last task finished (simulated ms), or when the run stopped.
    pub makespan_ms: i64,
    /// Whether every task was built.
    pub completed: bool,
    /// Starts of a task that had been started before (lost to a dying builder).
    pub reruns: u32,
    /// Jobs started.
    pub starts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A job ends: task, builder, the attempt it belongs to.
    Done(usize, usize, u32),
    /// A builder dies.
    Dies(usize),
}

/// Simulated time after which a run is given up (a policy that never finishes).
const HORIZON_MS: i64 = 30 * 24 * 3_600_000;

/// Run `policy` over `g` on `farm` from time 0 until every task is built (or
/// nothing can happen any more).
pub fn simulate(policy: &mut dyn Policy, g: &Graph, farm: &Farm) -> RunResult {
    let n = g.tasks.len();
    let nb = farm.builders.len();
    let mut heap: BinaryHeap<Reverse<(i64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<_>, t: i64, e: Ev| {
        seq += 1;
        heap.push(Reverse((t, seq, e)));
    };
    for (i, b) in farm.builders.iter().enumerate() {
        if let Some(t) = b.dies_at_ms {
            push(&mut heap, t, Ev::Dies(i));
        }
    }
    let mut alive = vec![true; nb];
    let mut running: Vec<Vec<usize>> = vec![Vec::new(); nb];
    let mut held: Vec<HashSet<usize>> = vec![HashSet::new(); nb];
    let mut upload_free = vec![0i64; nb];
    // Per task: the attempt running now (0 = none), attempts so far, done.
    let mut current = vec![0u32; n];
    let mut attempts = vec![0u32; n];
    let mut done = vec![false; n];
    let mut n_done = 0usize;
    let mut reruns = 0u32;
    let mut starts = 0u64;
    let mut now = 0i64;
    let mut last_end = 0i64;
    policy.start(g, farm, now);
    let lock = policy.upload_lock();
    loop {
        for (t, b) in policy.decide(now) {
            assert!(
                alive[b],
                "{} started a job on dead builder {b}",
                policy.name()
            );
            assert!(
                !done[t] && current[t] == 0,
                "{} started task {t} twice",
                policy.name()
            );
            assert!(
                g.tasks[t].deps.iter().all(|&d| done[d]),
                "{} started task {t} before its dependencies",
                policy.name()
            );
            let spec = &farm.builders[b];
            assert!(
                (running[b].len() as u32) < spec.slots,
                "{} overfilled builder {b}",
                policy.name()
            );
            let task = &g.tasks[t];
            let fetch: u64 = task
                .deps
                .iter()
                .filter(|d| !held[b].contains(d))
                .map(|&d| g.tasks[d].out_bytes)
                .sum();
            let fetch_ms = ms(fetch as f64 / spec.bytes_per_ms);
            let fetch_start = if lock { now.max(upload_free[b]) } else { now };
            if lock {
                upload_free[b] = fetch_start + fetch_ms;
            }
            let end = fetch_start
                + fetch_ms
                + ms(task.work_ms as f64 / spec.speed)
                + ms(task.out_bytes as f64 / spec.bytes_per_ms);
            attempts[t] += 1;
            if attempts[t] > 1 {
                reruns += 1;
            }
            starts += 1;
            current[t] = attempts[t];
            running[b].push(t);
            push(&mut heap, end, Ev::Done(t, b, attempts[t]));
        }
        if n_done == n {
            break;
        }
        let next_event = heap.peek().map(|Reverse((t, _, _))| *t);
        let wake = policy.next_wake(now).filter(|w| *w > now);
        let next = match (next_event, wake) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => break,
        };
        if next > HORIZON_MS {
            break;
        }
        now = next;
        while heap.peek().is_some_and(|Reverse((t, _, _))| *t == now) {
            let Some(Reverse((_, _, ev))) = heap.pop() else {
                break;
            };
            match ev {
                Ev::Done(t, b, attempt) => {
                    if current[t] != attempt || !alive[b] {
                        continue;
                    }
                    current[t] = 0;
                    done[t] = true;
                    n_done += 1;
                    last_end = now;
                    running[b].retain(|x| *x != t);
                    held[b].extend(g.tasks[t].deps.iter().copied());
                    held[b].insert(t);
                    policy.job_done(t, b, now);
                }
                Ev::Dies(b) => {
                    alive[b] = false;
                    let lost = std::mem::take(&mut running[b]);
                    for &t in &lost {
                        current[t] = 0;
                    }
                    policy.builder_died(b, &lost, now);
                }
            }
        }
    }
    RunResult {
        makespan_ms: if n_done == n { last_end } else { now },
        completed: n_done == n,
        reruns,
        starts,
    }
}

/// Milliseconds, rounded up (a job never ends before its exact time).
fn ms(x: f64) -> i64 {
    if x <= 0.0 { 0 } else { x.ceil() as i64 }
}

/// The makespan lower bound, in ms: the larger of the critical path (the
/// longest chain of work, each task at the fastest speed factor on the farm)
/// and the total work over the farm's capacity (slots × speed factor, summed).
/// Transfers count as free, so no policy can beat it.
pub fn lower_bound(g: &Graph, farm: &Farm) -> LowerBound {
    let fastest = farm
        .builders
        .iter()
        .map(|b| b.speed)
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let capacity: f64 = farm.builders.iter().map(|b| b.slots as f64 * b.speed).sum();
    let mut chain = vec![0.0f64; g.tasks.len()];
    for (i, t) in g.tasks.iter().enumerate() {
        let before = t.deps.iter().map(|&d| chain[d]).fold(0.0, f64::max);
        chain[i] = before + t.work_ms as f64 / fastest;
    }
    let critical = chain.iter().copied().fold(0.0, f64::max);
    let total: f64 = g.tasks.iter().map(|t| t.work_ms as f64).sum();
    LowerBound {
        critical_path_ms: critical,
        work_over_capacity_ms: total / capacity.max(f64::MIN_POSITIVE),
    }
}

/// The two terms of [`lower_bound`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowerBound {
    pub critical_path_ms: f64,
    pub work_over_capacity_ms: f64,
}

impl LowerBound {
    /// The bound: the larger term.
    pub fn ms(&self) -> f64 {
        self.critical_path_ms.max(self.work_over_capacity_ms)
    }
}
