//! The farm as Prometheus sees it: what the scheduler decided, counted as it
//! is decided ([`count_decisions`], under the scheduler lock, a few atomic
//! adds), and the scheduler's state written at scrape time
//! ([`encode_state`]: one short look under the lock, the encoding after it).
//! Names and meanings: `docs/metrics.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;

use crate::cache::Cache;
use crate::domain::model::{Action, Event, Outcome};
use crate::domain::scheduler::{BuilderView, QueueClass, Scheduler};
use crate::domain::state::FlushStats;
use crate::metrics::{Gauges, Metrics};

/// An outcome as a label value.
pub(crate) fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Built => "built",
        Outcome::Cached => "cached",
        Outcome::Failed => "failed",
        Outcome::DependencyFailed => "dependency_failed",
        Outcome::Cancelled => "cancelled",
        Outcome::TimedOut => "timed_out",
        Outcome::Unschedulable => "unschedulable",
    }
}

/// Count one batch of decisions: builds that ended (with how long the ones
/// that ran to a result took) and jobs sent.
pub(crate) fn count_decisions(
    metrics: &Metrics,
    actions: &[Action],
    notices: &[crate::domain::model::Notice],
) {
    for n in notices {
        if let Event::Finished {
            outcome,
            builder,
            started_ms,
            finished_ms,
            ..
        } = &n.event
        {
            // Only an attempt that ran to its result on a builder has a duration.
            let ran = matches!(
                outcome,
                Outcome::Built | Outcome::Failed | Outcome::TimedOut
            ) && builder.is_some();
            let secs = match (ran, started_ms, finished_ms) {
                (true, Some(s), Some(f)) if f >= s => Some((f - s) as f64 / 1000.0),
                _ => None,
            };
            metrics.build_finished(outcome_label(*outcome), secs);
        }
    }
    let sent = actions
        .iter()
        .filter(|a| matches!(a, Action::Dispatch(_)))
        .count();
    if sent > 0 {
        metrics.jobs_dispatched(sent as u64);
    }
}

/// A required-features set as one label value: sorted, comma-separated.
fn features_label(f: &BTreeSet<String>) -> String {
    f.iter().cloned().collect::<Vec<_>>().join(",")
}

/// What a scrape reads of the scheduler, in one short look under its lock.
pub(crate) struct StateSnapshot {
    builders: Vec<BuilderView>,
    running_systems: Vec<String>,
    classes: BTreeMap<(String, BTreeSet<String>), QueueClass>,
    depths: BTreeMap<String, u32>,
    requeues: u64,
    active: usize,
}

impl StateSnapshot {
    pub(crate) fn of(s: &Scheduler) -> StateSnapshot {
        StateSnapshot {
            builders: s.builders(),
            running_systems: s.running().iter().map(|b| b.system.clone()).collect(),
            classes: s.queue_classes(),
            depths: s.queue_depths(),
            requeues: s.requeues(),
            active: s.memory_counts().1,
        }
    }
}

/// The scheduler's, the cache's and the state's gauges, now (encoded after
/// the scheduler lock is let go).
pub(crate) fn encode_state(
    snap: StateSnapshot,
    cache: &Cache,
    flush: FlushStats,
    enc: &mut DescriptorEncoder<'_>,
) -> fmt::Result {
    let StateSnapshot {
        builders,
        running_systems,
        classes,
        depths,
        requeues,
        active,
    } = snap;
    let mut g = Gauges::new(enc);

    // Builders by state, as `farm status` names them (every state, zeros too).
    let state_of = |b: &BuilderView| {
        if !b.online {
            "offline"
        } else if b.record.draining {
            "draining"
        } else if b.running > 0 {
            "busy"
        } else {
            "idle"
        }
    };
    let mut by_state: BTreeMap<&'static str, f64> = ["idle", "busy", "draining", "offline"]
        .into_iter()
        .map(|s| (s, 0.0))
        .collect();
    for b in &builders {
        *by_state.entry(state_of(b)).or_default() += 1.0;
    }
    g.family(
        "farm_builders",
        "Known builders by state (idle, busy, draining, offline), as farm status shows them",
        by_state.into_iter().map(|(s, n)| ([("state", s)], n)),
    )?;

    let per = |f: &dyn Fn(&BuilderView) -> Option<f64>| {
        builders
            .iter()
            .filter_map(|b| f(b).map(|v| ([("builder", b.record.name.clone())], v)))
            .collect::<Vec<_>>()
    };
    let online = |b: &BuilderView| b.online;
    g.family(
        "farm_builder_up",
        "Whether a builder is connected (1) or not (0)",
        per(&|b| Some(f64::from(u8::from(b.online)))),
    )?;
    g.family(
        "farm_builder_draining",
        "Whether a builder is drained: it takes no new jobs",
        per(&|b| Some(f64::from(u8::from(b.record.draining)))),
    )?;
    g.family(
        "farm_builder_running_jobs",
        "Jobs the coordinator has running on a builder",
        per(&|b| Some(b.running as f64)),
    )?;
    g.family(
        "farm_builder_slots",
        "A builder's job slots (its max-jobs)",
        per(&|b| Some(f64::from(b.record.capabilities.max_jobs.max(1)))),
    )?;
    g.family(
        "farm_builder_cores",
        "A builder's CPU cores, as it reported them",
        per(&|b| Some(f64::from(b.record.capabilities.cores))),
    )?;
    g.family(
        "farm_builder_memory_bytes",
        "A builder's memory, as it reported it",
        per(&|b| Some(b.record.capabilities.memory_bytes as f64)),
    )?;
    g.family(
        "farm_builder_last_seen_timestamp_seconds",
        "When a builder last connected, reported its load or disconnected (seconds since the epoch)",
        per(&|b| Some(b.record.last_seen_ms as f64 / 1000.0)),
    )?;
    // What a builder reports about itself, while it is connected.
    g.family(
        "farm_builder_load1",
        "A connected builder's 1-minute load average",
        per(&|b| online(b).then_some(b.load.load_avg_1)),
    )?;
    g.family(
        "farm_builder_load5",
        "A connected builder's 5-minute load average",
        per(&|b| online(b).then_some(b.load.load_avg_5)),
    )?;
    g.family(
        "farm_builder_memory_available_bytes",
        "A connected builder's available memory",
        per(&|b| online(b).then_some(b.load.memory_available_bytes as f64)),
    )?;
    g.family(
        "farm_builder_disk_free_bytes",
        "A connected builder's free disk space in its Nix store",
        per(&|b| online(b).then_some(b.load.disk_free_bytes as f64)),
    )?;
    let mut psi = Vec::new();
    for b in builders.iter().filter(|b| b.online) {
        for (resource, v) in [
            ("cpu", b.load.cpu_pressure),
            ("memory", b.load.memory_pressure),
            ("io", b.load.io_pressure),
        ] {
            // Negative: the builder's kernel reports no pressure (no PSI).
            if v.is_finite() && v >= 0.0 {
                psi.push((
                    [
                        ("builder", b.record.name.clone()),
                        ("resource", resource.to_string()),
                    ],
                    v / 100.0,
                ));
            }
        }
    }
    g.family(
        "farm_builder_pressure_some_avg10_ratio",
        "A connected builder's pressure stall information: share of the last 10 s some task waited on the resource (cpu, memory, io)",
        psi,
    )?;

    // Slots per system: what connected, undrained builders offer, and what runs.
    let mut slots: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for b in builders.iter().filter(|b| b.online && !b.record.draining) {
        for system in &b.record.capabilities.systems {
            slots.entry(system.clone()).or_default().0 +=
                f64::from(b.record.capabilities.max_jobs.max(1));
        }
    }
    for system in &running_systems {
        slots.entry(system.clone()).or_default().1 += 1.0;
    }
    g.family(
        "farm_slots",
        "Job slots of connected, undrained builders that build for a system (a builder of several systems counts under each)",
        slots.iter().map(|(s, (t, _))| ([("system", s.clone())], *t)),
    )?;
    g.family(
        "farm_slots_used",
        "Running builds per system (each holds one slot)",
        slots
            .iter()
            .map(|(s, (_, u))| ([("system", s.clone())], *u)),
    )?;

    // The queue by class (system + required features).
    let class = |(system, features): &(String, BTreeSet<String>)| {
        [
            ("system", system.clone()),
            ("features", features_label(features)),
        ]
    };
    g.family(
        "farm_queue_runnable",
        "Runnable builds waiting for a builder, per class (system, required features)",
        classes
            .iter()
            .map(|(k, c)| (class(k), f64::from(c.runnable))),
    )?;
    g.family(
        "farm_queue_waiting",
        "Builds waiting for their dependencies or for their inputs to be resolved, per class",
        classes
            .iter()
            .map(|(k, c)| (class(k), f64::from(c.waiting))),
    )?;
    g.family(
        "farm_queue_oldest_runnable_seconds",
        "How long the longest-waiting runnable build of a class has waited for a builder (0: none runnable)",
        classes
            .iter()
            .map(|(k, c)| (class(k), c.oldest_runnable_secs)),
    )?;
    g.family(
        "farm_queue_depth",
        "Unfinished builds not running (runnable or waiting), per system",
        depths
            .iter()
            .map(|(s, n)| ([("system", s.clone())], f64::from(*n))),
    )?;
    g.single(
        "farm_running_builds",
        "Builds running now",
        running_systems.len() as f64,
    )?;
    g.single(
        "farm_submissions_active",
        "Unfinished submissions",
        active as f64,
    )?;
    g.counter(
        "farm_build_requeues",
        "Builds put back in the queue (transient failure, lost builder, restart) since the coordinator started",
        requeues,
    )?;

    // The cache.
    let (nar_bytes, stored_bytes) = cache.sizes();
    g.single(
        "farm_cache_paths",
        "Store paths published (signed) in the binary cache",
        cache.len() as f64,
    )?;
    g.single(
        "farm_cache_claims",
        "Unsigned uploads kept as their uploaders' claims",
        cache.claims_len() as f64,
    )?;
    g.single(
        "farm_cache_nar_bytes",
        "NAR bytes of the published paths",
        nar_bytes as f64,
    )?;
    g.single(
        "farm_cache_stored_bytes",
        "Compressed bytes stored for the published paths",
        stored_bytes as f64,
    )?;

    // The state database's group commit.
    g.counter(
        "farm_state_flushes",
        "State database flushes (fsyncs) run",
        flush.flushes,
    )?;
    g.counter(
        "farm_state_flush_requests",
        "Flush requests answered (requests / flushes is the group-commit factor)",
        flush.requests,
    )
}
