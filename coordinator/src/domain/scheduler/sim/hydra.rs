//! Hydra's Rust queue runner as a simulated policy, written from
//! github:NixOS/hydra `src/queue-runner/` (read at commits 760db2d and
//! c18c413), with its default configuration:
//!
//! - `src/config.rs`: `MachineSortFn::BogomipsWithSpeedFactor`,
//!   `MachineFreeFn::Static`, `StepSortFn::WithRdeps` are the defaults;
//!   `max_retries` 5, `retry_interval` 60 s, `retry_backoff` 3;
//!   `dispatch_trigger_timer_in_s` 120.
//! - `src/state/machine.rs`: `Machine::score` = speed factor × bogomips
//!   (at least 1) × CPU count; `MachinesInner::sort` orders each system's
//!   machines by score, highest first, ties to fewer current jobs, and runs
//!   when a machine is inserted (not on every dispatch); `remove_machine`
//!   keeps the order. `get_machine_for_system` takes the first machine in
//!   that order that has capacity: `has_capacity` with `Static` is
//!   `current_jobs < max_jobs`, and before it a throttle: no more than 4 jobs
//!   submitted within 30 s while 4 or more run (`jobs_in_last_30s_*`,
//!   whole seconds).
//! - `src/state/step_info.rs`: `compare_with_rdeps` orders runnable steps by
//!   highest global priority, then lowest share used, then the count of
//!   direct reverse dependencies (`rdeps_len`, `src/state/step.rs`), then
//!   highest local priority, then lowest build id; all descending-first.
//! - `src/state/queue.rs`: one queue per system, re-sorted (a stable sort)
//!   whenever new runnable steps are inserted; `Queues::process` walks every
//!   queue in order and, for each step not already scheduled whose `after` has
//!   come, asks for a machine, skipping to the next step when none is free.
//! - `src/state/mod.rs`: `remove_machine` fails the machine's steps with
//!   `PreparingFailure`; a retryable failure sets `after` to now +
//!   `retry_interval × retry_backoff^(tries-1)`. A dispatch runs when a step
//!   finishes or a machine joins (`trigger_dispatch`), and on the 120 s timer.
//!
//! In the simulator every step has the same priorities, share and build id,
//! so the step order is the reverse-dependency count, then the order the
//! steps became runnable.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::{Farm, Graph, Policy};

const RETRY_INTERVAL_MS: i64 = 60_000;
const RETRY_BACKOFF: f64 = 3.0;
const MAX_RETRIES: u32 = 5;
const DISPATCH_TIMER_MS: i64 = 120_000;

/// What Hydra's machine order reads of a machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HydraMachine {
    pub speed_factor: f64,
    pub bogomips: f64,
    pub cpu_count: u32,
    pub current_jobs: u32,
}

impl HydraMachine {
    /// `BogomipsWithSpeedFactor`.
    pub fn score(&self) -> f64 {
        self.speed_factor * self.bogomips.max(1.0) * f64::from(self.cpu_count)
    }
}

/// The machine order: indices, highest score first, ties to fewer current jobs
/// (then the order given: the sort is stable).
pub fn machine_order(machines: &[HydraMachine]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..machines.len()).collect();
    idx.sort_by(|&a, &b| {
        let (ma, mb) = (&machines[a], &machines[b]);
        mb.score()
            .total_cmp(&ma.score())
            .then(ma.current_jobs.cmp(&mb.current_jobs))
    });
    idx
}

/// What Hydra's step order reads of a runnable step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HydraStep {
    pub global_priority: i32,
    pub lowest_share_used: f64,
    pub rdeps: u64,
    pub local_priority: i32,
    pub lowest_build_id: i64,
}

/// `compare_with_rdeps`: `Less` when `a` goes first.
pub fn step_cmp(a: &HydraStep, b: &HydraStep) -> Ordering {
    b.global_priority
        .cmp(&a.global_priority)
        .then(a.lowest_share_used.total_cmp(&b.lowest_share_used))
        .then(b.rdeps.cmp(&a.rdeps))
        .then(b.local_priority.cmp(&a.local_priority))
        .then(a.lowest_build_id.cmp(&b.lowest_build_id))
}

struct Machine {
    spec: HydraMachine,
    systems: Vec<String>,
    max_jobs: u32,
    alive: bool,
    /// `jobs_in_last_30s_start` (seconds) and `_count`.
    window_start: i64,
    window_count: u32,
}

impl Machine {
    fn has_capacity(&mut self, now_s: i64) -> bool {
        if now_s <= self.window_start + 30 && self.window_count >= 4 && self.spec.current_jobs >= 4
        {
            return false;
        } else if now_s > self.window_start + 30 {
            self.window_start = 0;
            self.window_count = 0;
        }
        self.spec.current_jobs < self.max_jobs
    }

    fn submitted(&mut self, now_s: i64) {
        if self.window_count == 0 {
            self.window_start = now_s;
        }
        self.spec.current_jobs += 1;
        self.window_count += 1;
    }

    fn removed(&mut self, now_s: i64) {
        self.spec.current_jobs -= 1;
        if now_s <= self.window_start + 30 {
            self.window_count = self.window_count.saturating_sub(1);
        }
    }
}

/// Hydra's queue runner.
pub struct HydraPolicy {
    machines: Vec<Machine>,
    /// Per system: machine indices in Hydra's order.
    by_system: BTreeMap<String, Vec<usize>>,
    /// Per system: runnable steps, sorted.
    queues: BTreeMap<String, Vec<usize>>,
    scheduled: Vec<bool>,
    after: Vec<i64>,
    tries: Vec<u32>,
    rdeps: Vec<u64>,
    task_system: Vec<String>,
    deps_left: Vec<usize>,
    dependents: Vec<Vec<usize>>,
}

impl HydraPolicy {
    pub fn new() -> HydraPolicy {
        HydraPolicy {
            machines: Vec::new(),
            by_system: BTreeMap::new(),
            queues: BTreeMap::new(),
            scheduled: Vec::new(),
            after: Vec::new(),
            tries: Vec::new(),
            rdeps: Vec::new(),
            task_system: Vec::new(),
            deps_left: Vec::new(),
            dependents: Vec::new(),
        }
    }

    fn insert_machine(&mut self, m: Machine) {
        let i = self.machines.len();
        for s in &m.systems {
            self.by_system.entry(s.clone()).or_default().push(i);
        }
        self.machines.push(m);
        // `MachinesInner::sort` on insert.
        for list in self.by_system.values_mut() {
            let view: Vec<HydraMachine> = list.iter().map(|&j| self.machines[j].spec).collect();
            let order = machine_order(&view);
            *list = order.into_iter().map(|k| list[k]).collect();
        }
    }

    /// New runnable steps into their system's queue, then the stable re-sort.
    fn insert_runnable(&mut self, steps: &[usize]) {
        let mut touched: Vec<String> = Vec::new();
        for &t in steps {
            let s = self.task_system[t].clone();
            self.queues.entry(s.clone()).or_default().push(t);
            if !touched.contains(&s) {
                touched.push(s);
            }
        }
        for s in touched {
            let rdeps = &self.rdeps;
            let key = |t: usize| HydraStep {
                global_priority: 0,
                lowest_share_used: 1e9,
                rdeps: rdeps[t],
                local_priority: 0,
                lowest_build_id: 1,
            };
            if let Some(q) = self.queues.get_mut(&s) {
                q.sort_by(|&a, &b| step_cmp(&key(a), &key(b)));
            }
        }
    }
}

impl Default for HydraPolicy {
    fn default() -> HydraPolicy {
        HydraPolicy::new()
    }
}

impl Policy for HydraPolicy {
    fn name(&self) -> &'static str {
        "hydra"
    }

    fn start(&mut self, g: &Graph, farm: &Farm, _now: i64) {
        for b in &farm.builders {
            self.insert_machine(Machine {
                spec: HydraMachine {
                    speed_factor: b.speed,
                    bogomips: b.bogomips,
                    cpu_count: b.cores,
                    current_jobs: 0,
                },
                systems: b.systems.clone(),
                max_jobs: b.slots,
                alive: true,
                window_start: 0,
                window_count: 0,
            });
        }
        let n = g.tasks.len();
        self.task_system = g.tasks.iter().map(|t| t.system.clone()).collect();
        self.deps_left = g.tasks.iter().map(|t| t.deps.len()).collect();
        self.dependents = g.dependents();
        self.rdeps = self.dependents.iter().map(|d| d.len() as u64).collect();
        self.scheduled = vec![false; n];
        self.after = vec![0; n];
        self.tries = vec![0; n];
        let ready: Vec<usize> = (0..n).filter(|&i| self.deps_left[i] == 0).collect();
        self.insert_runnable(&ready);
    }

    fn job_done(&mut self, task: usize, builder: usize, now: i64) {
        self.machines[builder].removed(now / 1000);
        let s = &self.task_system[task];
        if let Some(q) = self.queues.get_mut(s) {
            q.retain(|&t| t != task);
        }
        let mut ready = Vec::new();
        for &d in &self.dependents[task] {
            self.deps_left[d] -= 1;
            if self.deps_left[d] == 0 {
                ready.push(d);
            }
        }
        self.insert_runnable(&ready);
    }

    fn builder_died(&mut self, builder: usize, lost: &[usize], now: i64) {
        self.machines[builder].alive = false;
        for list in self.by_system.values_mut() {
            list.retain(|&m| m != builder);
        }
        for &t in lost {
            self.scheduled[t] = false;
            self.tries[t] += 1;
            assert!(self.tries[t] < MAX_RETRIES, "hydra gave up on a step");
            let delta = RETRY_INTERVAL_MS as f64 * RETRY_BACKOFF.powi(self.tries[t] as i32 - 1);
            self.after[t] = now + delta as i64;
        }
    }

    fn decide(&mut self, now: i64) -> Vec<(usize, usize)> {
        let now_s = now / 1000;
        let mut out = Vec::new();
        for (system, queue) in &self.queues {
            let Some(machines) = self.by_system.get(system) else {
                continue;
            };
            for &t in queue {
                if self.scheduled[t] || self.after[t] > now {
                    continue;
                }
                let found = machines.iter().copied().find(|&m| {
                    let m = &mut self.machines[m];
                    m.alive && m.has_capacity(now_s)
                });
                if let Some(m) = found {
                    self.machines[m].submitted(now_s);
                    self.scheduled[t] = true;
                    out.push((t, m));
                }
            }
        }
        out
    }

    fn next_wake(&self, now: i64) -> Option<i64> {
        // Steps waiting for their retry time are seen at the next dispatch:
        // an event, or the 120 s timer.
        let waiting = self
            .queues
            .values()
            .flatten()
            .any(|&t| !self.scheduled[t] && self.after[t] > now);
        waiting.then(|| (now / DISPATCH_TIMER_MS + 1) * DISPATCH_TIMER_MS)
    }
}
