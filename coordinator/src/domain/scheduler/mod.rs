//! The scheduler: the build graph, the runnable queue, the builder registry,
//! and the decisions between them. Pure and synchronous: it reads and writes
//! nothing outside itself. Every change that must outlive a restart comes
//! back as a [`Write`] (the caller applies them to the state, in order, before
//! it lets go of the scheduler; see `Coordinator::with_sched`), next to
//! [`Action`]s (jobs to send, closures to resolve, logs to store) and
//! [`Notice`]s (events for submissions). A start feeds it what the state read
//! ([`Scheduler::load`]).
//!
//! Model (design.md, "Scheduling model"):
//! - a build may run on a builder when the builder has its system, supports
//!   every required feature, and every mandatory feature of the builder is
//!   required ([`Capabilities::can_build`]);
//! - runnable builds wait in per-class queues (class = system + required
//!   features), each ordered by priority, then the longest chain of unfinished
//!   work waiting on the build, then age; a dispatch looks at each class's head
//!   and at the builders free now in the groups that can build it ([`free`]);
//! - among capable builders with a free slot the lowest [`select::score`] wins
//!   (ties to the lower name), found through the free-slot index's score
//!   orders and the index of which builders hold which paths ([`free::choose`]);
//! - a derivation is built once however many submissions ask for it,
//!   except a claim build ([`BuildRecord::claim`]: a client's unverified
//!   build-hook derivation), which is that client's alone and shares nothing;
//! - a builder that vanishes keeps its jobs for a grace period, then they are
//!   requeued (each time counts as a retry; past the limit the build fails);
//! - work no builder can take fails at once with a message naming what is
//!   missing, unless a matching builder was seen recently (then it waits, bounded).
//!
//! By concern: [`submissions`] (a graph in, shared builds, a submission's
//! end), [`dispatch`] (a build from runnable to running to ended, retries,
//! the periodic tick), [`builders`] (joining, leaving, draining, forgetting),
//! [`free`] (builder slots, the free-slot index, who holds which path),
//! [`jobs`] (a named job's run as its submission starts and ends),
//! [`queries`] (what handlers read), [`select`] (the builder score); `sim`
//! (with the `sim` feature, and in tests) simulates farms under this policy and
//! under Nix's and Hydra's.
//!
//! Lock discipline (the caller's mutex): queries hand out shared views
//! (`Arc<BuildView>`, `Arc<SubmissionRecord>`), never copies of whole records;
//! whatever is not in memory the caller reads from the store after letting go
//! of the lock. A big submission is planned under the lock
//! ([`Scheduler::share_plan`]), prepared outside it
//! ([`Scheduler::prepare_submission`]; the caller writes the new builds'
//! records ahead, see `domain::persist`) and only inserted under it
//! ([`Scheduler::insert_submission`]).
//!
//! Memory per build: the record and its view; a runnable build's input
//! closure only while it is queued (paths interned, shared with every other
//! build and builder that holds them), dropped when it is dispatched or ends.

mod builders;
mod dispatch;
mod free;
mod jobs;
mod queries;
pub(crate) mod select;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod submissions;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use farm_nix::store_path::StorePath;

use crate::domain::model::*;
use free::{BuilderEntry, Bx};

pub use builders::NameTaken;
pub use dispatch::JobEnd;
pub use queries::{BuilderView, FailureView, QueueClass, SubmissionProgress, SubmissionSnapshot};
pub use submissions::{
    GraphSubmission, Inserted, Leftovers, NewBuild, PlanQuery, PreparedSubmission, SharePlan,
};

/// Most paths remembered per builder for input locality.
const MAX_HELD_PATHS: usize = 200_000;
/// Recent failures kept for `farm status`.
const RECENT_FAILURES: usize = 50;

/// The scheduler's tunables (milliseconds).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How long a vanished builder's jobs wait for it.
    pub grace_ms: i64,
    /// Retries after transient failures or lost builders before a build fails.
    pub max_retries: u32,
    /// How long runnable work waits for a recently seen matching builder.
    pub unschedulable_wait_ms: i64,
    /// A builder seen within this window counts as "seen recently".
    pub recent_window_ms: i64,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            grace_ms: 60_000,
            max_retries: 3,
            unschedulable_wait_ms: 600_000,
            recent_window_ms: 86_400_000,
        }
    }
}

/// A runnable build's place in its class queue: best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ReadyKey {
    priority: Reverse<Priority>,
    chain: Reverse<u32>,
    created_ms: i64,
    id: BuildId,
}

/// Builds needing the same kind of builder.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Class {
    system: String,
    features: BTreeSet<String>,
}

struct Build {
    /// Changed copy-on-write through [`Build::rec_mut`]: the view and the
    /// pending write share it until the next change.
    rec: Arc<BuildRecord>,
    /// What queries hand out: `rec` as it was last written.
    view: Arc<BuildView>,
    dependents: BTreeSet<BuildId>,
    /// Unfinished dependencies.
    pending: BTreeSet<BuildId>,
    /// Length of the longest chain of unfinished builds starting here.
    chain: u32,
    /// The input closure with NAR sizes while the build is queued (resolved
    /// by `Prepare`; taken by the dispatch, dropped when it ends).
    inputs: Option<Closure>,
    /// When it last became runnable, until its builder reports the job
    /// started (the dispatch latency metric; not persisted).
    runnable_at: Option<std::time::Instant>,
}

/// An input closure with NAR sizes, dependencies first, paths interned.
type Closure = Box<[(Arc<StorePath>, u64)]>;

impl Build {
    fn new(rec: BuildRecord) -> Build {
        let rec = Arc::new(rec);
        Build {
            view: rec.clone(),
            rec,
            dependents: BTreeSet::new(),
            pending: BTreeSet::new(),
            chain: 1,
            inputs: None,
            runnable_at: None,
        }
    }

    /// The record, to change it (copied first if a view or a write holds it).
    fn rec_mut(&mut self) -> &mut BuildRecord {
        Arc::make_mut(&mut self.rec)
    }

    fn class(&self) -> Class {
        Class {
            system: self.rec.system.clone(),
            features: self.rec.required_features.clone(),
        }
    }
    fn key(&self) -> ReadyKey {
        ReadyKey {
            priority: Reverse(self.rec.priority),
            chain: Reverse(self.chain),
            created_ms: self.rec.created_ms,
            id: self.rec.id,
        }
    }
}

/// The scheduler state.
pub struct Scheduler {
    cfg: SchedulerConfig,
    builds: HashMap<BuildId, Build>,
    by_drv: HashMap<StorePath, BuildId>,
    submissions: HashMap<SubmissionId, Arc<SubmissionRecord>>,
    /// Every store path a queued build's closure or a builder's held set names, once.
    paths: HashSet<Arc<StorePath>>,
    /// `paths.len()` after the last sweep.
    paths_swept: usize,
    ready: BTreeMap<Class, BTreeSet<ReadyKey>>,
    /// Since when a class with runnable work has had no capable builder online.
    unmatched_since: HashMap<Class, i64>,
    /// Builders by slot ([`free::Bx`]); a forgotten one's slot is reused.
    builders: Vec<Option<BuilderEntry>>,
    by_name: HashMap<String, Bx>,
    spare_slots: Vec<Bx>,
    by_system: HashMap<String, BTreeSet<Bx>>,
    /// Builders by what they can build, with the free ones in score order.
    groups: Vec<free::Group>,
    /// Which builders hold each path (by the interned path's address).
    holders: free::AddrMap<Vec<Bx>>,
    /// Scratch for [`free::choose`].
    marks: free::Marks,
    /// Per unfinished submission, its first build that may still be
    /// unfinished (builds before it have ended: a submission's end is
    /// checked from there, not from its first build).
    open_from: HashMap<SubmissionId, BuildId>,
    next_conn: u64,
    /// Changed records not yet taken ([`Scheduler::take_writes`]).
    writes: Vec<Write>,
    actions: Vec<Action>,
    notices: Vec<Notice>,
    recent_failures: VecDeque<FailureView>,
    /// Builds put back in the queue so far (a metric).
    requeues: u64,
}

impl Scheduler {
    /// An empty scheduler (tests, or a fresh farm).
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        Scheduler {
            cfg,
            builds: HashMap::new(),
            by_drv: HashMap::new(),
            submissions: HashMap::new(),
            ready: BTreeMap::new(),
            unmatched_since: HashMap::new(),
            builders: Vec::new(),
            by_name: HashMap::new(),
            spare_slots: Vec::new(),
            by_system: HashMap::new(),
            groups: Vec::new(),
            holders: free::AddrMap::default(),
            marks: free::Marks::default(),
            open_from: HashMap::new(),
            next_conn: 1,
            paths: HashSet::new(),
            paths_swept: 0,
            writes: Vec::new(),
            actions: Vec::new(),
            notices: Vec::new(),
            recent_failures: VecDeque::new(),
            requeues: 0,
        }
    }

    /// Resume from what the state loaded: unfinished submissions and builds
    /// come back; running builds wait for their builder's grace period
    /// (counted from `now`); runnable builds have their input closures
    /// resolved again. What that changes is in [`Scheduler::take_writes`].
    pub fn load(cfg: SchedulerConfig, loaded: Loaded, now: i64) -> Scheduler {
        let mut s = Scheduler::new(cfg);
        for rec in loaded.builders {
            s.add_builder(BuilderEntry::new(rec, false, 0, Some(now)));
        }
        for rec in loaded.builds {
            // A claim build is nobody else's to share.
            if rec.claim.is_none() {
                s.by_drv.insert(rec.drv_path.clone(), rec.id);
            }
            s.builds.insert(rec.id, Build::new(rec));
        }
        for sub in loaded.submissions {
            s.submissions.insert(sub.id, Arc::new(sub));
        }
        // Links: a dependency that was not loaded finished successfully long ago.
        let ids: Vec<BuildId> = s.builds.keys().copied().collect();
        for id in &ids {
            let deps = s.builds[id].rec.deps.clone();
            for d in deps {
                let dep_done = match s.builds.get_mut(&d) {
                    None => true,
                    Some(dep) => {
                        dep.dependents.insert(*id);
                        dep.rec.state.is_terminal()
                    }
                };
                if !dep_done {
                    s.builds.get_mut(id).map(|b| b.pending.insert(d));
                }
            }
        }
        for id in &ids {
            let b = &s.builds[id];
            match b.rec.state.clone() {
                BuildState::Running { builder, .. } => {
                    if let Some(e) = s.entry_mut(&builder) {
                        e.running.insert(*id);
                    } else {
                        // Its builder is unknown: requeue it straight away.
                        s.requeue(*id, now, "its builder is unknown after a restart", false);
                    }
                }
                BuildState::Queued | BuildState::Waiting if b.pending.is_empty() => {
                    s.set_state(*id, BuildState::Waiting);
                    s.actions.push(Action::Prepare { build: *id });
                }
                _ => {}
            }
        }
        s.recompute_chains(ids);
        // Submissions that were complete but not yet marked.
        let subs: Vec<SubmissionId> = s.submissions.keys().copied().collect();
        for sid in subs {
            s.check_submission(sid, now);
        }
        s
    }

    /// Records to write to the state, in the order they changed (before the
    /// actions and notices taken with them are carried out).
    pub fn take_writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    /// Actions to carry out, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Events to deliver, in order.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// A build's record changed: refresh its view, and write it.
    fn persist_build(&mut self, id: BuildId) {
        if let Some(b) = self.builds.get_mut(&id) {
            b.view = b.rec.clone();
            self.writes.push(Write::Build(b.rec.clone()));
        }
    }

    /// A submission's record changed: write it (a reference count, not a copy).
    fn persist_submission(&mut self, id: SubmissionId) {
        if let Some(s) = self.submissions.get(&id) {
            self.writes.push(Write::Submission(s.clone()));
        }
    }

    /// A builder's record changed: write it.
    fn persist_builder(&mut self, name: &str) {
        if let Some(b) = self.entry(name) {
            self.writes.push(Write::Builder(Box::new(b.rec.clone())));
        }
    }

    fn notify(&mut self, id: BuildId, event: Event) {
        let submissions = self
            .builds
            .get(&id)
            .map(|b| b.rec.submissions.iter().copied().collect())
            .unwrap_or_default();
        self.notices.push(Notice { submissions, event });
    }

    fn set_state(&mut self, id: BuildId, state: BuildState) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        if b.rec.state == state {
            return;
        }
        let class = b.class();
        let key = b.key();
        if b.rec.state == BuildState::Queued
            && let Some(q) = self.ready.get_mut(&class)
        {
            q.remove(&key);
            if q.is_empty() {
                self.ready.remove(&class);
            }
        }
        let drv = b.rec.drv_path.clone();
        match &state {
            BuildState::Waiting => tracing::info!(build = %format!("b{id}"), %drv, "build waiting"),
            BuildState::Queued => tracing::info!(build = %format!("b{id}"), %drv, "build queued"),
            BuildState::Running {
                builder, job_id, ..
            } => {
                tracing::info!(build = %format!("b{id}"), %drv, %builder, job = %job_id, "build running")
            }
            BuildState::Done(outcome) => tracing::info!(
                build = %format!("b{id}"),
                %drv,
                outcome = ?outcome,
                error = b.rec.error.as_deref().unwrap_or(""),
                "build finished"
            ),
        }
        b.rec_mut().state = state;
        if b.rec.state == BuildState::Queued {
            b.runnable_at = Some(std::time::Instant::now());
            self.ready.entry(class).or_default().insert(key);
        }
        self.persist_build(id);
    }

    /// Chain lengths for `start` and everything they depend on, dependents first.
    fn recompute_chains(&mut self, start: Vec<BuildId>) {
        let mut affected: HashSet<BuildId> = HashSet::new();
        let mut stack = start;
        while let Some(id) = stack.pop() {
            if !affected.insert(id) {
                continue;
            }
            if let Some(b) = self.builds.get(&id) {
                stack.extend(b.pending.iter().copied());
            }
        }
        // Kahn's order over `affected`: a build after every affected dependent.
        let mut waiting_on: HashMap<BuildId, usize> = HashMap::new();
        for &id in &affected {
            let n = self.builds[&id]
                .dependents
                .iter()
                .filter(|d| affected.contains(d))
                .count();
            waiting_on.insert(id, n);
        }
        let mut queue: Vec<BuildId> = waiting_on
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| *id)
            .collect();
        while let Some(id) = queue.pop() {
            let chain = 1 + self.builds[&id]
                .dependents
                .iter()
                .filter_map(|d| self.builds.get(d))
                .filter(|d| !d.rec.state.is_terminal())
                .map(|d| d.chain)
                .max()
                .unwrap_or(0);
            let b = self.builds.get_mut(&id).expect("affected build exists");
            if b.chain != chain {
                if b.rec.state == BuildState::Queued {
                    let (class, key) = (b.class(), b.key());
                    b.chain = chain;
                    let new_key = b.key();
                    if let Some(q) = self.ready.get_mut(&class) {
                        q.remove(&key);
                        q.insert(new_key);
                    }
                } else {
                    b.chain = chain;
                }
            }
            let pending: Vec<BuildId> = b.pending.iter().copied().collect();
            for d in pending {
                if let Some(n) = waiting_on.get_mut(&d) {
                    *n -= 1;
                    if *n == 0 {
                        queue.push(d);
                    }
                }
            }
        }
    }

    /// The one shared copy of `p`.
    fn intern(&mut self, p: StorePath) -> Arc<StorePath> {
        if let Some(a) = self.paths.get(&p) {
            return a.clone();
        }
        let a = Arc::new(p);
        self.paths.insert(a.clone());
        a
    }

    /// Forget interned paths nothing holds any more, once the pool has
    /// doubled since the last sweep (amortised: a sweep per doubling).
    fn sweep_paths(&mut self) {
        if self.paths.len() > 2 * self.paths_swept.max(4096) {
            self.paths.retain(|p| Arc::strong_count(p) > 1);
            self.paths_swept = self.paths.len();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
