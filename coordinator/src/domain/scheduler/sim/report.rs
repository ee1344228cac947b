//! The simulator's report: every scenario (graph × farm) under the three
//! policies, as a markdown table of makespan against the lower bound, and the
//! real scheduler's decisions per second with 100k queued builds and 1k
//! builders. Printed by `cargo run --release -p farm-coordinator --features
//! sim --example sim`.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use super::farm::{FarmPolicy, sim_path};
use super::graphs::{self, X86};
use super::hydra::HydraPolicy;
use super::nix::NixPolicy;
use super::{Farm, Graph, Policy, RunResult, lower_bound, simulate};
use crate::domain::model::{Action, Capabilities};
use crate::domain::scheduler::{GraphSubmission, JobEnd, NewBuild, Scheduler, SchedulerConfig};

/// A graph on a farm; `failures` when a builder dies in it.
pub struct Scenario {
    pub graph: Graph,
    pub farm: Farm,
    pub failures: bool,
    pub heterogeneous: bool,
}

/// The scenarios of the report.
pub fn scenarios() -> Vec<Scenario> {
    let nixpkgs = || graphs::nixpkgs_like(7, 1500, 2500, 30_000.0, 0.1);
    let mut out = vec![
        Scenario {
            graph: graphs::layered(4, 5, 300),
            farm: graphs::homogeneous(2, 2),
            failures: false,
            heterogeneous: false,
        },
        Scenario {
            graph: graphs::layered(40, 25, 25),
            farm: graphs::homogeneous(2, 2),
            failures: false,
            heterogeneous: false,
        },
        Scenario {
            graph: graphs::wide_shallow(1, 2000, 20, 20_000.0),
            farm: graphs::homogeneous(4, 8),
            failures: false,
            heterogeneous: false,
        },
        Scenario {
            graph: graphs::deep_chains(2, 16, 40, 10_000.0),
            farm: graphs::homogeneous(4, 4),
            failures: false,
            heterogeneous: false,
        },
        Scenario {
            graph: graphs::wide_shallow(1, 2000, 20, 20_000.0),
            farm: graphs::heterogeneous(),
            failures: false,
            heterogeneous: true,
        },
        Scenario {
            graph: graphs::deep_chains(2, 16, 40, 10_000.0),
            farm: graphs::heterogeneous(),
            failures: false,
            heterogeneous: true,
        },
        Scenario {
            graph: nixpkgs(),
            farm: graphs::heterogeneous(),
            failures: false,
            heterogeneous: true,
        },
        Scenario {
            graph: nixpkgs(),
            farm: graphs::slow_link(),
            failures: false,
            heterogeneous: true,
        },
    ];
    let g = nixpkgs();
    let at = (0.3 * lower_bound(&g, &graphs::heterogeneous()).ms()) as i64;
    out.push(Scenario {
        graph: g,
        farm: graphs::dying(at),
        failures: true,
        heterogeneous: true,
    });
    out
}

/// The three policies, fresh.
pub fn policies() -> Vec<Box<dyn Policy>> {
    vec![
        Box::new(FarmPolicy::new()),
        Box::new(NixPolicy::new()),
        Box::new(HydraPolicy::new()),
    ]
}

/// One row of the table.
pub struct Row {
    pub graph: String,
    pub farm: String,
    pub policy: &'static str,
    pub run: RunResult,
    pub critical_ms: f64,
    pub work_ms: f64,
    pub bound_ms: f64,
    /// This policy's makespan over the farm policy's on the same scenario.
    pub vs_farm: f64,
}

/// Run every scenario under every policy.
pub fn run_all() -> Vec<Row> {
    let mut rows = Vec::new();
    for s in scenarios() {
        let lb = lower_bound(&s.graph, &s.farm);
        let mut farm_ms = None;
        for mut p in policies() {
            let run = simulate(p.as_mut(), &s.graph, &s.farm);
            let f = *farm_ms.get_or_insert(run.makespan_ms);
            rows.push(Row {
                graph: s.graph.name.clone(),
                farm: s.farm.name.clone(),
                policy: p.name(),
                vs_farm: run.makespan_ms as f64 / f.max(1) as f64,
                run,
                critical_ms: lb.critical_path_ms,
                work_ms: lb.work_over_capacity_ms,
                bound_ms: lb.ms(),
            });
        }
    }
    rows
}

fn secs(ms: f64) -> String {
    if ms < 10_000.0 {
        format!("{:.2}", ms / 1000.0)
    } else {
        format!("{:.0}", ms / 1000.0)
    }
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| graph | farm | policy | makespan s | bound s (critical path / work÷capacity) | ratio to bound | vs farm | reruns |\n");
    s.push_str("|---|---|---|---:|---|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {}{} | {} ({} / {}) | {:.2} | {:.2} | {} |",
            r.graph,
            r.farm,
            r.policy,
            secs(r.run.makespan_ms as f64),
            if r.run.completed {
                ""
            } else {
                " (did not finish)"
            },
            secs(r.bound_ms),
            secs(r.critical_ms),
            secs(r.work_ms),
            r.run.makespan_ms as f64 / r.bound_ms.max(1.0),
            r.vs_farm,
            r.run.reruns
        );
    }
    s
}

/// Decisions per second of the real scheduler.
#[derive(Debug, Clone)]
pub struct DecisionRate {
    pub queued: usize,
    pub builders: usize,
    pub slots: u32,
    /// Every slot free at once: one `dispatch` fills them all.
    pub burst_decisions: u64,
    pub burst_secs: f64,
    /// One job ends, one `dispatch` makes one decision (the steady state).
    pub steady_decisions: u64,
    pub steady_dispatch_secs: f64,
    /// The same, with the `job_ended` before each dispatch counted too.
    pub steady_total_secs: f64,
}

impl DecisionRate {
    pub fn burst_per_sec(&self) -> f64 {
        self.burst_decisions as f64 / self.burst_secs.max(1e-9)
    }
    pub fn steady_per_sec(&self) -> f64 {
        self.steady_decisions as f64 / self.steady_dispatch_secs.max(1e-9)
    }
    pub fn steady_total_per_sec(&self) -> f64 {
        self.steady_decisions as f64 / self.steady_total_secs.max(1e-9)
    }
}

/// Fill a scheduler with `queued` runnable builds (each with 4 inputs out of
/// a pool of 1 000 paths) and `builders` online builders of `slots` slots,
/// then time its decisions: one burst filling every slot, then `steady`
/// rounds of one job ending and one dispatch.
pub fn decision_rate(queued: usize, builders: usize, slots: u32, steady: usize) -> DecisionRate {
    let mut s = Scheduler::new(SchedulerConfig::default());
    let now = 1_000_000;
    let mut names = Vec::new();
    for i in 0..builders {
        let name = format!("builder{i:04}");
        let caps = Capabilities {
            systems: vec![X86.to_string()],
            supported_features: BTreeSet::new(),
            mandatory_features: BTreeSet::new(),
            max_jobs: slots,
            speed_factor: 1.0 + (i % 4) as f64,
            cores: slots,
            memory_bytes: 16 << 30,
            nix_version: "2.8".into(),
        };
        s.builder_connected(&name, &format!("ssh-ed25519 k{i}"), caps, &[], now);
        names.push(name);
    }
    let pool: Vec<_> = (0..1000).map(|i| sim_path(&format!("input{i}"))).collect();
    let builds: Vec<NewBuild> = (0..queued)
        .map(|i| NewBuild {
            drv_path: sim_path(&format!("q{i}.drv")),
            drv_aterm: Arc::from(&b"Derive"[..]),
            system: X86.to_string(),
            required_features: BTreeSet::new(),
            outputs: BTreeMap::from([("out".to_string(), sim_path(&format!("q{i}")))]),
            input_drvs: Vec::new(),
            claim: None,
        })
        .collect();
    let mut next = 0u64;
    let r: Result<_, Infallible> = s.submit(
        GraphSubmission {
            roots: builds.iter().map(|b| b.drv_path.clone()).collect(),
            builds,
            ..Default::default()
        },
        now,
        || {
            next += 1;
            Ok(next)
        },
    );
    let _ = r;
    for a in s.take_actions() {
        if let Action::Prepare { build } = a {
            let b = build as usize;
            let inputs = (0..4)
                .map(|k| (pool[(b * 7 + k * 131) % pool.len()].clone(), 1 << 20))
                .collect();
            s.set_ready(build, inputs);
        }
    }
    drop(s.take_writes());
    drop(s.take_notices());
    let t = Instant::now();
    s.dispatch(now);
    let burst_secs = t.elapsed().as_secs_f64();
    let mut running: Vec<(String, String)> = Vec::new();
    for a in s.take_actions() {
        if let Action::Dispatch(j) = a {
            running.push((j.builder, j.job_id));
        }
    }
    drop(s.take_writes());
    drop(s.take_notices());
    let burst_decisions = running.len() as u64;
    let mut dispatch_secs = 0.0;
    let mut steady_decisions = 0u64;
    let total = Instant::now();
    // `running` grows by each round's dispatch, so rounds beyond the burst's
    // jobs end jobs the steady state itself started.
    let mut k = 0;
    while k < steady && k < running.len() {
        let (builder, job) = running[k].clone();
        s.job_ended(&builder, &job, JobEnd::Built, now + 1 + k as i64);
        let t = Instant::now();
        s.dispatch(now + 1 + k as i64);
        dispatch_secs += t.elapsed().as_secs_f64();
        for a in s.take_actions() {
            if let Action::Dispatch(j) = a {
                steady_decisions += 1;
                running.push((j.builder, j.job_id));
            }
        }
        drop(s.take_writes());
        drop(s.take_notices());
        k += 1;
    }
    DecisionRate {
        queued,
        builders,
        slots,
        burst_decisions,
        burst_secs,
        steady_decisions,
        steady_dispatch_secs: dispatch_secs,
        steady_total_secs: total.elapsed().as_secs_f64(),
    }
}
