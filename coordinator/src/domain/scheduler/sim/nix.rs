//! Nix 2.8's own remote building as a simulated policy: a client with
//! `max-jobs = 0` whose every derivation goes through the build hook, as
//! written from Nix 2.8.1's sources (tag `2.8.1` of github:NixOS/nix; Debian's
//! nix-bin here is 2.8.0, same files):
//!
//! - `src/build-remote/build-remote.cc`, `main_build_remote`: one hook
//!   process per derivation ("one derivation at a time per hook"). Among the
//!   machines whose system types include the derivation's system (and whose
//!   features fit), a machine is free when one of its `maxJobs` slot lock
//!   files is not held; its load is the number of held slots (across every
//!   hook of this client). The best free machine has the lowest
//!   `load / speedFactor`, both integers (`uint64_t` over `unsigned int`,
//!   `src/libstore/machines.hh`), so the division truncates; on equal
//!   quotients the higher speed factor wins, then the lower load; otherwise
//!   the first in the machines file stays. With no free machine the hook
//!   answers `# postpone`. After accepting, the inputs are copied under the
//!   per-machine upload lock (`<uri>.upload-lock`): copies to one machine
//!   run one at a time ([`Policy::upload_lock`]).
//! - `src/libstore/build/derivation-goal.cc`, `tryToBuild`: on `rpPostpone`
//!   the goal calls `worker.waitForAWhile`.
//! - `src/libstore/build/worker.cc`, `waitForInput`: goals waiting "for a
//!   while" are woken only when `build-poll-interval` (default 5 s,
//!   `src/libstore/globals.hh`) has passed since `lastWokenUp`, which is set
//!   when the first goal starts waiting and again at each wake-up; a finished
//!   build does not wake them. Goals whose inputs just finished are woken at
//!   once (modelled in the order they became runnable; Nix keeps them in a
//!   set ordered by pointer).
//!
//! Speed factors are integers in Nix 2.8's machines file: a builder's is
//! rounded, at least 1. A builder that dies is not tried again and its lost
//! builds are retried at once (generous to Nix: a real 2.8 client fails the
//! build, or hangs on the dead SSH connection).

use std::collections::VecDeque;

use super::{Farm, Graph, Policy};

/// `build-poll-interval`'s default (seconds → ms).
pub const POLL_INTERVAL_MS: i64 = 5_000;

/// A machine as `build-remote` sees it when choosing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NixMachine {
    pub speed_factor: u32,
    pub max_jobs: u32,
    /// Held slot locks.
    pub load: u32,
    /// Whether its system types include the derivation's system (and enabled).
    pub right_type: bool,
}

/// `build-remote`'s choice among `machines` (in machines-file order): the
/// index of the best free machine, or `None` (postpone).
pub fn choose(machines: &[NixMachine]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, m) in machines.iter().enumerate() {
        if !m.right_type || m.load >= m.max_jobs {
            continue;
        }
        let sf = u64::from(m.speed_factor.max(1));
        let load = u64::from(m.load);
        let better = match best {
            None => true,
            Some(j) => {
                let b = &machines[j];
                let bsf = u64::from(b.speed_factor.max(1));
                let bload = u64::from(b.load);
                let (q, bq) = (load / sf, bload / bsf);
                q < bq || (q == bq && (sf > bsf || (sf == bsf && load < bload)))
            }
        };
        if better {
            best = Some(i);
        }
    }
    best
}

/// Nix 2.8's client with every build going to the hook.
pub struct NixPolicy {
    systems: Vec<Vec<String>>,
    speed: Vec<u32>,
    slots: Vec<u32>,
    alive: Vec<bool>,
    load: Vec<u32>,
    task_system: Vec<String>,
    deps_left: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    /// Goals woken now (their inputs are done), in order.
    awake: VecDeque<usize>,
    /// Goals that were postponed (`waitingForAWhile`).
    waiting: Vec<usize>,
    last_woken: Option<i64>,
}

impl NixPolicy {
    pub fn new() -> NixPolicy {
        NixPolicy {
            systems: Vec::new(),
            speed: Vec::new(),
            slots: Vec::new(),
            alive: Vec::new(),
            load: Vec::new(),
            task_system: Vec::new(),
            deps_left: Vec::new(),
            dependents: Vec::new(),
            awake: VecDeque::new(),
            waiting: Vec::new(),
            last_woken: None,
        }
    }

    /// One hook's try for `task`: the machine it accepts on, if any.
    fn try_hook(&self, task: usize) -> Option<usize> {
        let sys = &self.task_system[task];
        let view: Vec<NixMachine> = (0..self.systems.len())
            .map(|b| NixMachine {
                speed_factor: self.speed[b],
                max_jobs: self.slots[b],
                load: self.load[b],
                right_type: self.alive[b] && self.systems[b].iter().any(|s| s == sys),
            })
            .collect();
        choose(&view)
    }
}

impl Default for NixPolicy {
    fn default() -> NixPolicy {
        NixPolicy::new()
    }
}

impl Policy for NixPolicy {
    fn name(&self) -> &'static str {
        "nix"
    }

    fn upload_lock(&self) -> bool {
        true
    }

    fn start(&mut self, g: &Graph, farm: &Farm, _now: i64) {
        for b in &farm.builders {
            self.systems.push(b.systems.clone());
            self.speed.push((b.speed.round() as u32).max(1));
            self.slots.push(b.slots);
            self.alive.push(true);
            self.load.push(0);
        }
        self.task_system = g.tasks.iter().map(|t| t.system.clone()).collect();
        self.deps_left = g.tasks.iter().map(|t| t.deps.len()).collect();
        self.dependents = g.dependents();
        self.awake = (0..g.tasks.len())
            .filter(|&i| self.deps_left[i] == 0)
            .collect();
    }

    fn job_done(&mut self, task: usize, builder: usize, _now: i64) {
        self.load[builder] -= 1;
        for &d in &self.dependents[task] {
            self.deps_left[d] -= 1;
            if self.deps_left[d] == 0 {
                self.awake.push_back(d);
            }
        }
    }

    fn builder_died(&mut self, builder: usize, lost: &[usize], _now: i64) {
        self.alive[builder] = false;
        self.load[builder] = 0;
        self.awake.extend(lost.iter().copied());
    }

    fn decide(&mut self, now: i64) -> Vec<(usize, usize)> {
        if self.last_woken.is_some_and(|t| t + POLL_INTERVAL_MS <= now) && !self.waiting.is_empty()
        {
            self.last_woken = Some(now);
            let woken = std::mem::take(&mut self.waiting);
            self.awake.extend(woken);
        }
        let mut out = Vec::new();
        while let Some(t) = self.awake.pop_front() {
            match self.try_hook(t) {
                Some(b) => {
                    self.load[b] += 1;
                    out.push((t, b));
                }
                None => {
                    if self.waiting.is_empty() && self.last_woken.is_none() {
                        self.last_woken = Some(now);
                    }
                    self.waiting.push(t);
                }
            }
        }
        if self.waiting.is_empty() {
            self.last_woken = None;
        }
        out
    }

    fn next_wake(&self, _now: i64) -> Option<i64> {
        if self.waiting.is_empty() {
            None
        } else {
            self.last_woken.map(|t| t + POLL_INTERVAL_MS)
        }
    }
}
