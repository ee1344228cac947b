//! The farm's own policy in the simulator: the real [`Scheduler`], driven as
//! `Coordinator::with_sched` drives it, with the simulated clock as `now`.
//! The graph goes in as one submission; every builder joins at the start
//! with its systems, slots, speed factor and cores; a `Prepare` is answered at
//! once with the task's input closure (the outputs of its direct
//! dependencies, with their sizes); a dispatch starts the job; a finished job
//! is reported `Built`; a dying builder's stream ends (`builder_disconnected`)
//! and the 1-second ticker (`Scheduler::tick`) requeues its jobs once the
//! grace period has passed. No load reports are sent (the score's load and
//! pressure terms stay 0; its busy and locality terms are live).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use farm_nix::hash::HashAlgo;
use farm_nix::store_path::StorePath;

use super::{Farm, Graph, Policy};
use crate::domain::model::{Action, BuildId, Capabilities};
use crate::domain::scheduler::{GraphSubmission, JobEnd, NewBuild, Scheduler, SchedulerConfig};

/// A store path named `name` with a hash made from it (simulated paths).
pub fn sim_path(name: &str) -> StorePath {
    let d = HashAlgo::Sha256.digest(name.as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&d.digest()[..20]);
    StorePath::from_digest(&digest, name).expect("simulated names are valid")
}

/// The ticker's period in the coordinator (`server.rs`: `ticker(1 s)`).
const TICK_MS: i64 = 1000;

/// The real scheduler as a simulated policy.
pub struct FarmPolicy {
    cfg: SchedulerConfig,
    sched: Scheduler,
    next_id: u64,
    names: Vec<String>,
    conns: Vec<u64>,
    by_build: HashMap<BuildId, usize>,
    /// Per task: its input closure (direct dependencies' outputs and sizes).
    inputs: Vec<Vec<(StorePath, u64)>>,
    /// Per task: the job running it (builder name, job id).
    jobs: Vec<Option<(usize, String)>>,
    by_name: HashMap<String, usize>,
    /// A tick is due at this time (a builder's grace period ends).
    tick_due: Vec<i64>,
}

impl FarmPolicy {
    /// With the coordinator's default configuration (grace 60 s, 3 retries).
    pub fn new() -> FarmPolicy {
        FarmPolicy::with_config(SchedulerConfig::default())
    }

    pub fn with_config(cfg: SchedulerConfig) -> FarmPolicy {
        FarmPolicy {
            sched: Scheduler::new(cfg.clone()),
            cfg,
            next_id: 1,
            names: Vec::new(),
            conns: Vec::new(),
            by_build: HashMap::new(),
            inputs: Vec::new(),
            jobs: Vec::new(),
            by_name: HashMap::new(),
            tick_due: Vec::new(),
        }
    }

    /// The scheduler inside (tests look at its decisions).
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Answer `Prepare`s and collect dispatches until nothing is left.
    fn settle(&mut self, now: i64, out: &mut Vec<(usize, usize)>) {
        loop {
            self.sched.dispatch(now);
            let actions = self.sched.take_actions();
            // What the caller would write and deliver: dropped here.
            drop(self.sched.take_writes());
            drop(self.sched.take_notices());
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    Action::Prepare { build } => {
                        if let Some(&t) = self.by_build.get(&build) {
                            let inputs = self.inputs[t].clone();
                            self.sched.set_ready(build, inputs);
                        }
                    }
                    Action::Dispatch(job) => {
                        let t = self.by_build[&job.build];
                        let b = self.by_name[&job.builder];
                        self.jobs[t] = Some((b, job.job_id));
                        out.push((t, b));
                    }
                    Action::Cancel { .. } | Action::Drain { .. } | Action::BuildEnded { .. } => {}
                }
            }
        }
    }
}

impl Default for FarmPolicy {
    fn default() -> FarmPolicy {
        FarmPolicy::new()
    }
}

impl Policy for FarmPolicy {
    fn name(&self) -> &'static str {
        "farm"
    }

    fn start(&mut self, g: &Graph, farm: &Farm, now: i64) {
        for (i, b) in farm.builders.iter().enumerate() {
            let caps = Capabilities {
                systems: b.systems.clone(),
                supported_features: BTreeSet::new(),
                mandatory_features: BTreeSet::new(),
                max_jobs: b.slots,
                speed_factor: b.speed,
                cores: b.cores,
                memory_bytes: 16 << 30,
                nix_version: "2.8".into(),
            };
            let (conn, _) = self.sched.builder_connected(
                &b.name,
                &format!("ssh-ed25519 sim-{i}"),
                caps,
                &[],
                now,
            );
            self.names.push(b.name.clone());
            self.conns.push(conn);
            self.by_name.insert(b.name.clone(), i);
        }
        let drvs: Vec<StorePath> = g
            .tasks
            .iter()
            .map(|t| sim_path(&format!("{}.drv", t.name)))
            .collect();
        let outs: Vec<StorePath> = g.tasks.iter().map(|t| sim_path(&t.name)).collect();
        let has_dependents: BTreeSet<usize> = g
            .tasks
            .iter()
            .flat_map(|t| t.deps.iter().copied())
            .collect();
        let builds = g
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| NewBuild {
                drv_path: drvs[i].clone(),
                drv_aterm: Arc::from(format!("Derive-{}", t.name).into_bytes()),
                system: t.system.clone(),
                required_features: BTreeSet::new(),
                outputs: BTreeMap::from([("out".to_string(), outs[i].clone())]),
                input_drvs: t.deps.iter().map(|&d| drvs[d].clone()).collect(),
                claim: None,
            })
            .collect();
        self.inputs = g
            .tasks
            .iter()
            .map(|t| {
                t.deps
                    .iter()
                    .map(|&d| (outs[d].clone(), g.tasks[d].out_bytes))
                    .collect()
            })
            .collect();
        self.jobs = vec![None; g.tasks.len()];
        let sub = GraphSubmission {
            roots: (0..g.tasks.len())
                .filter(|i| !has_dependents.contains(i))
                .map(|i| drvs[i].clone())
                .collect(),
            builds,
            ..Default::default()
        };
        let mut next = self.next_id;
        let r: Result<_, Infallible> = self.sched.submit(sub, now, || {
            next += 1;
            Ok(next)
        });
        let _ = r;
        self.next_id = next;
        for (i, d) in drvs.iter().enumerate() {
            if let Some(id) = self.sched.build_of_drv(d) {
                self.by_build.insert(id, i);
            }
        }
    }

    fn job_done(&mut self, task: usize, builder: usize, now: i64) {
        if let Some((b, job)) = self.jobs[task].take() {
            debug_assert_eq!(b, builder);
            self.sched
                .job_ended(&self.names[b], &job, JobEnd::Built, now);
        }
    }

    fn builder_died(&mut self, builder: usize, _lost: &[usize], now: i64) {
        self.sched
            .builder_disconnected(&self.names[builder], self.conns[builder], now);
        // The ticker runs every second; the first tick at or after the grace period requeues.
        let due = now + self.cfg.grace_ms;
        self.tick_due.push((due + TICK_MS - 1) / TICK_MS * TICK_MS);
    }

    fn decide(&mut self, now: i64) -> Vec<(usize, usize)> {
        if self.tick_due.iter().any(|t| *t <= now) {
            self.tick_due.retain(|t| *t > now);
            self.sched.tick(now);
        }
        let mut out = Vec::new();
        self.settle(now, &mut out);
        out
    }

    fn next_wake(&self, now: i64) -> Option<i64> {
        self.tick_due.iter().copied().filter(|t| *t > now).min()
    }
}
