//! The scheduler: the build graph, the runnable queue, the builder registry,
//! and the decisions between them. Pure and synchronous (callers hold it
//! behind a mutex and never across an await); it writes every change through
//! to the [`Store`] and hands back [`Action`]s (jobs to send, closures to
//! resolve, logs to store) and [`Notice`]s (events for submissions).
//!
//! Model (design.md, "Scheduling model"):
//! - a build may run on a builder when the builder has its system, supports
//!   every required feature, and every mandatory feature of the builder is
//!   required ([`Capabilities::can_build`]);
//! - runnable builds wait in per-class queues (class = system + required
//!   features), each ordered by priority, then the longest chain of unfinished
//!   work waiting on the build, then age; a dispatch looks at each class's head
//!   and at the builders indexed under its system only;
//! - among capable builders with a free slot the lowest [`select::score`] wins;
//! - a derivation is built once however many submissions ask for it;
//! - a builder that vanishes keeps its jobs for a grace period, then they are
//!   requeued (each time counts as a retry; past the limit the build fails);
//! - work no builder can take fails at once with a message naming what is
//!   missing, unless a matching builder was seen recently (then it waits, bounded).
//!
//! Lock discipline (the caller's mutex): nothing here reads sled, and queries
//! hand out shared views (`Arc<BuildView>`, `Arc<SubmissionRecord>`), never
//! copies of whole records; whatever is not in memory the caller reads from
//! the store after letting go of the lock. A big submission is prepared (ids,
//! records, their writes) outside the lock ([`Scheduler::share_plan`],
//! [`Scheduler::prepare_submission`]) and only inserted under it
//! ([`Scheduler::insert_submission`]).
//!
//! Memory per build: the record and its view; a runnable build's input
//! closure only while it is queued (paths interned, shared with every other
//! build and builder that holds them), dropped when it is dispatched or ends.

pub mod select;
pub mod types;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use farm_nix::store_path::StorePath;

use crate::domain::state::{StateError, Store, Written};
use types::*;

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

/// A derivation of a submitted graph that is not in the cache yet.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub drv_path: StorePath,
    pub drv_aterm: Arc<str>,
    pub system: String,
    pub required_features: BTreeSet<String>,
    pub outputs: BTreeMap<String, StorePath>,
    /// Input derivations that are not in the cache (each one is in the graph too,
    /// or already known to the scheduler).
    pub input_drvs: Vec<StorePath>,
}

/// A submitted derivation graph, cached parts already removed.
#[derive(Debug, Clone, Default)]
pub struct GraphSubmission {
    pub roots: Vec<StorePath>,
    pub builds: Vec<NewBuild>,
    /// Derivations of the graph whose outputs the cache has.
    pub cached: BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    pub priority: Priority,
    pub max_silent_time_secs: u64,
    pub build_timeout_secs: u64,
    /// Who asked (recorded on the submission and on each of its builds).
    pub client: Option<String>,
}

/// How a job ended, as the builder reported it (and, for `Built`, as verified
/// against the cache by the caller).
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    Built,
    /// The build itself failed: permanent.
    Failed(String),
    TimedOut(String),
    /// Inputs, uploads, the builder itself, or outputs missing from the cache: worth a retry.
    Transient(String),
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
    rec: BuildRecord,
    /// What queries hand out; refreshed whenever `rec` is written.
    view: Arc<BuildView>,
    dependents: BTreeSet<BuildId>,
    /// Unfinished dependencies.
    pending: BTreeSet<BuildId>,
    /// Length of the longest chain of unfinished builds starting here.
    chain: u32,
    /// The input closure with NAR sizes while the build is queued (resolved
    /// by `Prepare`; taken by the dispatch, dropped when it ends).
    inputs: Option<Closure>,
}

/// An input closure with NAR sizes, dependencies first, paths interned.
type Closure = Box<[(Arc<StorePath>, u64)]>;

impl Build {
    fn new(rec: BuildRecord) -> Build {
        Build {
            view: Arc::new(BuildView::from(&rec)),
            rec,
            dependents: BTreeSet::new(),
            pending: BTreeSet::new(),
            chain: 1,
            inputs: None,
        }
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

struct BuilderEntry {
    rec: BuilderRecord,
    load: Load,
    online: bool,
    conn: u64,
    disconnected_ms: Option<i64>,
    running: BTreeSet<BuildId>,
    held: HashSet<Arc<StorePath>>,
}

/// A builder as `farm status` shows it.
#[derive(Debug, Clone)]
pub struct BuilderView {
    pub record: BuilderRecord,
    pub load: Load,
    pub online: bool,
    pub running: usize,
}

/// A recent failure as `farm status` shows it.
#[derive(Debug, Clone)]
pub struct FailureView {
    pub build: BuildId,
    pub drv_path: StorePath,
    pub builder: Option<String>,
    pub error: String,
    pub finished_ms: i64,
}

/// A builder name is bound to another key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the builder name {name} belongs to another key")]
pub struct NameTaken {
    pub name: String,
}

/// The derivations of a graph the scheduler is to be asked about: the graph's
/// own, and inputs from outside it (made outside the lock: [`PlanQuery::new`]).
pub struct PlanQuery {
    members: Vec<StorePath>,
    outside: Vec<StorePath>,
}

impl PlanQuery {
    pub fn new(g: &GraphSubmission) -> PlanQuery {
        let members: HashSet<&StorePath> = g.builds.iter().map(|b| &b.drv_path).collect();
        let mut outside: HashSet<&StorePath> = HashSet::new();
        for nb in &g.builds {
            outside.extend(nb.input_drvs.iter().filter(|i| !members.contains(i)));
        }
        PlanQuery {
            members: g.builds.iter().map(|b| b.drv_path.clone()).collect(),
            outside: outside.into_iter().cloned().collect(),
        }
    }
}

/// Which derivations of a graph the scheduler shares with builds it has, as
/// seen at one moment under the lock ([`Scheduler::insert_submission`] checks
/// each again).
#[derive(Debug, Clone, Default)]
pub struct SharePlan {
    /// Graph members that an existing queued, running or built build covers.
    existing: HashMap<StorePath, BuildId>,
    /// Inputs outside the graph that the scheduler has a build of.
    outside: HashMap<StorePath, BuildId>,
}

/// One derivation of a prepared submission.
enum Member {
    /// Planned to share `planned`; `spare` is its id should it need a build of its own.
    Shared {
        nb: NewBuild,
        planned: BuildId,
        spare: BuildId,
    },
    /// A new build, its record written already, linked to the other new
    /// ones; `existing` are its dependencies among builds the scheduler had;
    /// `class` indexes the submission's distinct (system, features).
    Fresh {
        build: Box<Build>,
        inputs: Vec<StorePath>,
        existing: Vec<BuildId>,
        class: usize,
    },
}

impl Member {
    fn drv(&self) -> &StorePath {
        match self {
            Member::Shared { nb, .. } => &nb.drv_path,
            Member::Fresh { build, .. } => &build.rec.drv_path,
        }
    }
}

/// A submission made ready outside the lock: ids taken, new builds' records
/// written, their chains, events and classes worked out (see
/// [`Scheduler::prepare_submission`]).
pub struct PreparedSubmission {
    sid: SubmissionId,
    created_ms: i64,
    members: Vec<Member>,
    /// Derivation → id, as planned.
    ids: HashMap<StorePath, BuildId>,
    /// The new builds' derivations, for the scheduler's index.
    keys: Vec<(StorePath, BuildId)>,
    /// Inputs outside the graph → the build they were linked to.
    outside: Vec<(StorePath, BuildId)>,
    written: HashMap<BuildId, Written>,
    /// `Queued` for each new build, in order.
    notices: Vec<Notice>,
    /// Distinct (system, features) of the new builds.
    classes: Vec<(String, BTreeSet<String>)>,
    /// The submission's record as planned, encoded.
    record: Vec<u8>,
    roots: Vec<StorePath>,
    cached: BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    priority: Priority,
    max_silent_time_secs: u64,
    build_timeout_secs: u64,
    client: Option<String>,
}

impl PreparedSubmission {
    /// The submission's id.
    pub fn id(&self) -> SubmissionId {
        self.sid
    }
}

/// What an insert no longer needs: dropped by the caller after the lock.
pub struct Leftovers {
    _ids: HashMap<StorePath, BuildId>,
    _inputs: Vec<Vec<StorePath>>,
    _written: HashMap<BuildId, Written>,
    _record: Vec<u8>,
}

/// What [`Scheduler::insert_submission`] did.
pub struct Inserted {
    pub sid: SubmissionId,
    /// Records written ahead that a concurrent submission made unnecessary:
    /// for [`Store::discard_new_builds`], after the lock.
    pub discard: Vec<Written>,
    /// An error writing a record (the graph is in memory whole regardless).
    pub persisted: Result<(), StateError>,
    /// To drop after the lock.
    pub leftovers: Leftovers,
}

/// Writes past this size are flushed before the lock is taken to insert them.
const BIG_WRITE: usize = 4 << 20;

/// Link a submission's new builds among themselves (dependents, pending
/// dependencies, chains) and list each one's dependencies on builds the
/// scheduler had. Whatever depends on a new build is new too, so the chains
/// are whole.
fn link_fresh(members: &mut [Member]) {
    let index: HashMap<BuildId, usize> = members
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match m {
            Member::Fresh { build, .. } => Some((build.rec.id, i)),
            Member::Shared { .. } => None,
        })
        .collect();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); members.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); members.len()];
    for (i, m) in members.iter_mut().enumerate() {
        if let Member::Fresh {
            build, existing, ..
        } = m
        {
            for d in &build.rec.deps {
                match index.get(d) {
                    Some(&j) => {
                        deps[i].push(j);
                        dependents[j].push(i);
                        build.pending.insert(*d);
                    }
                    None => existing.push(*d),
                }
            }
        }
    }
    // Kahn's order: a build once every dependent has its chain.
    let mut left: Vec<usize> = dependents.iter().map(Vec::len).collect();
    let mut chain = vec![1u32; members.len()];
    let mut queue: Vec<usize> = index.values().copied().filter(|&i| left[i] == 0).collect();
    while let Some(i) = queue.pop() {
        chain[i] = 1 + dependents[i].iter().map(|&k| chain[k]).max().unwrap_or(0);
        for &j in &deps[i] {
            left[j] -= 1;
            if left[j] == 0 {
                queue.push(j);
            }
        }
    }
    let ids: Vec<Option<BuildId>> = members
        .iter()
        .map(|m| match m {
            Member::Fresh { build, .. } => Some(build.rec.id),
            Member::Shared { .. } => None,
        })
        .collect();
    for (i, m) in members.iter_mut().enumerate() {
        if let Member::Fresh { build, .. } = m {
            build.chain = chain[i];
            build
                .dependents
                .extend(dependents[i].iter().filter_map(|&k| ids[k]));
        }
    }
}

/// A submission as followers see it: its record and a view of each build.
pub type SubmissionSnapshot = (Arc<SubmissionRecord>, Vec<Arc<BuildView>>);

/// The scheduler state.
pub struct Scheduler {
    cfg: SchedulerConfig,
    store: Store,
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
    builders: HashMap<String, BuilderEntry>,
    by_system: HashMap<String, BTreeSet<String>>,
    next_conn: u64,
    actions: Vec<Action>,
    notices: Vec<Notice>,
    recent_failures: VecDeque<FailureView>,
}

impl Scheduler {
    /// An empty scheduler over `store` (tests, or a fresh farm).
    pub fn new(cfg: SchedulerConfig, store: Store) -> Scheduler {
        Scheduler {
            cfg,
            store,
            builds: HashMap::new(),
            by_drv: HashMap::new(),
            submissions: HashMap::new(),
            ready: BTreeMap::new(),
            unmatched_since: HashMap::new(),
            builders: HashMap::new(),
            by_system: HashMap::new(),
            next_conn: 1,
            paths: HashSet::new(),
            paths_swept: 0,
            actions: Vec::new(),
            notices: Vec::new(),
            recent_failures: VecDeque::new(),
        }
    }

    /// Resume from the store: unfinished submissions and builds come back;
    /// running builds wait for their builder's grace period (counted from `now`);
    /// runnable builds have their input closures resolved again.
    pub fn load(cfg: SchedulerConfig, store: Store, now: i64) -> Result<Scheduler, StateError> {
        let loaded = store.load()?;
        let mut s = Scheduler::new(cfg, store);
        for rec in loaded.builders {
            s.index_builder(&rec);
            s.builders.insert(
                rec.name.clone(),
                BuilderEntry {
                    rec,
                    load: Load::default(),
                    online: false,
                    conn: 0,
                    disconnected_ms: Some(now),
                    running: BTreeSet::new(),
                    held: HashSet::new(),
                },
            );
        }
        for rec in loaded.builds {
            s.by_drv.insert(rec.drv_path.clone(), rec.id);
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
                    if let Some(e) = s.builders.get_mut(&builder) {
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
        Ok(s)
    }

    /// The store this scheduler writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Actions to carry out, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Events to deliver, in order.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Write a build's record and refresh its view (errors are logged too,
    /// for callers that go on).
    fn persist_build(&mut self, id: BuildId) -> Result<(), StateError> {
        if let Some(b) = self.builds.get_mut(&id) {
            b.view = Arc::new(BuildView::from(&b.rec));
            self.store.put_build(&b.rec).inspect_err(|e| {
                tracing::error!(build = id, error = %e, "cannot persist build");
            })?;
        }
        Ok(())
    }

    /// Write a submission's record (errors are logged too).
    fn persist_submission(&self, id: SubmissionId) -> Result<(), StateError> {
        if let Some(s) = self.submissions.get(&id) {
            self.store.put_submission(s).inspect_err(|e| {
                tracing::error!(submission = id, error = %e, "cannot persist submission");
            })?;
        }
        Ok(())
    }

    /// Write a builder's record (errors are logged too).
    fn persist_builder(&self, name: &str) -> Result<(), StateError> {
        if let Some(b) = self.builders.get(name) {
            self.store.put_builder(&b.rec).inspect_err(|e| {
                tracing::error!(builder = name, error = %e, "cannot persist builder");
            })?;
        }
        Ok(())
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
        b.rec.state = state;
        if b.rec.state == BuildState::Queued {
            self.ready.entry(class).or_default().insert(key);
        }
        let _ = self.persist_build(id);
    }

    // ───────────────────────────── submissions ─────────────────────────────

    /// Add a derivation graph. Derivations already known and not failed are
    /// shared (built once); new ones a builder can never take fail at once.
    /// An error writing the records is returned (after the graph is added).
    ///
    /// All in one call, under the caller's lock: fine for small graphs and
    /// tests. The coordinator prepares big ones outside the lock instead
    /// ([`PlanQuery::new`], [`Scheduler::share_plan`],
    /// [`Scheduler::prepare_submission`], [`Scheduler::insert_submission`]),
    /// which this does in sequence.
    pub fn submit(&mut self, g: GraphSubmission, now: i64) -> Result<SubmissionId, StateError> {
        let plan = self.share_plan(&PlanQuery::new(&g));
        let prepared = Scheduler::prepare_submission(&self.store, g, &plan, now)?;
        let ins = self.insert_submission(prepared, now);
        self.store.discard_new_builds(&ins.discard)?;
        ins.persisted.map(|()| ins.sid)
    }

    /// A build the scheduler has of `drv` that a new submission may share
    /// (queued, running or built).
    fn shareable(&self, drv: &StorePath) -> Option<BuildId> {
        self.by_drv.get(drv).copied().filter(|id| {
            self.builds.get(id).is_some_and(|b| match b.rec.state {
                BuildState::Done(o) => o.is_success(),
                _ => true,
            })
        })
    }

    /// Which of the graph's derivations existing builds cover: one lookup
    /// per derivation.
    pub fn share_plan(&self, q: &PlanQuery) -> SharePlan {
        let mut plan = SharePlan::default();
        for d in &q.members {
            if let Some(id) = self.shareable(d) {
                plan.existing.insert(d.clone(), id);
            }
        }
        for d in &q.outside {
            if let Some(id) = self.by_drv.get(d) {
                plan.outside.insert(d.clone(), *id);
            }
        }
        plan
    }

    /// Make a submission ready without the scheduler: take its ids, build the
    /// records of the builds it brings and write them (unfinished builds no
    /// recorded submission lists are dropped at the next start, should the
    /// coordinator die before [`Scheduler::insert_submission`]), and work out
    /// their chains, events and classes. Blocking; the expensive part of a
    /// big submission.
    pub fn prepare_submission(
        store: &Store,
        g: GraphSubmission,
        plan: &SharePlan,
        now: i64,
    ) -> Result<PreparedSubmission, StateError> {
        let sid = store.next_id()?;
        let mut ids: HashMap<StorePath, BuildId> = HashMap::with_capacity(g.builds.len());
        let mut planned: Vec<(NewBuild, BuildId, Option<BuildId>)> = Vec::new();
        for nb in g.builds {
            if ids.contains_key(&nb.drv_path) {
                continue;
            }
            let spare = store.next_id()?;
            let existing = plan.existing.get(&nb.drv_path).copied();
            ids.insert(nb.drv_path.clone(), existing.unwrap_or(spare));
            planned.push((nb, spare, existing));
        }
        let mut outside: Vec<(StorePath, BuildId)> = Vec::new();
        let mut members = Vec::with_capacity(planned.len());
        let mut records = Vec::new();
        let mut classes: Vec<(String, BTreeSet<String>)> = Vec::new();
        let mut class_of: HashMap<(String, BTreeSet<String>), usize> = HashMap::new();
        for (nb, spare, existing) in planned {
            if let Some(planned) = existing {
                members.push(Member::Shared { nb, planned, spare });
                continue;
            }
            let mut deps = BTreeSet::new();
            for i in &nb.input_drvs {
                let dep = match ids.get(i) {
                    Some(d) => *d,
                    None => match plan.outside.get(i) {
                        Some(d) => {
                            outside.push((i.clone(), *d));
                            *d
                        }
                        None => continue,
                    },
                };
                if dep != spare {
                    deps.insert(dep);
                }
            }
            let class_key = (nb.system.clone(), nb.required_features.clone());
            let class = match class_of.get(&class_key) {
                Some(c) => *c,
                None => {
                    classes.push(class_key.clone());
                    class_of.insert(class_key, classes.len() - 1);
                    classes.len() - 1
                }
            };
            let rec = BuildRecord {
                id: spare,
                drv_path: nb.drv_path,
                drv_aterm: nb.drv_aterm,
                system: nb.system,
                required_features: nb.required_features,
                outputs: nb.outputs,
                deps,
                priority: g.priority,
                created_ms: now,
                submissions: BTreeSet::from([sid]),
                state: BuildState::Waiting,
                retries: 0,
                attempt: 0,
                max_silent_time_secs: g.max_silent_time_secs,
                build_timeout_secs: g.build_timeout_secs,
                error: None,
                builder: None,
                started_ms: None,
                finished_ms: None,
                requested_by: g.client.iter().cloned().collect(),
            };
            records.push((
                spare,
                rec.drv_path.base_name(),
                serde_json::to_vec(&rec).map_err(StateError::Encode)?,
            ));
            members.push(Member::Fresh {
                build: Box::new(Build::new(rec)),
                inputs: nb.input_drvs,
                existing: Vec::new(),
                class,
            });
        }
        link_fresh(&mut members);
        let keys: Vec<(StorePath, BuildId)> = members
            .iter()
            .filter_map(|m| match m {
                Member::Fresh { build, .. } => Some((build.rec.drv_path.clone(), build.rec.id)),
                Member::Shared { .. } => None,
            })
            .collect();
        let notices = members
            .iter()
            .filter_map(|m| match m {
                Member::Fresh { build, .. } => Some(Notice {
                    submissions: vec![sid],
                    event: Event::Queued {
                        build: build.rec.id,
                        drv_path: build.rec.drv_path.clone(),
                    },
                }),
                Member::Shared { .. } => None,
            })
            .collect();
        let record = SubmissionRecord {
            id: sid,
            roots: g.roots,
            builds: members
                .iter()
                .map(|m| match m {
                    Member::Shared { planned, .. } => *planned,
                    Member::Fresh { build, .. } => build.rec.id,
                })
                .collect(),
            cached: g.cached,
            priority: g.priority,
            created_ms: now,
            done: false,
            cancelled: false,
            client: g.client,
            finished_ms: None,
        };
        let encoded = serde_json::to_vec(&record).map_err(StateError::Encode)?;
        let bytes: usize = records.iter().map(|(_, _, b)| b.len()).sum();
        let written = store.put_new_builds(&records).inspect_err(|_| {
            let all: Vec<Written> = records
                .iter()
                .map(|(id, base, _)| Written {
                    id: *id,
                    drv_base_name: base.clone(),
                    previous_log_entry: None,
                })
                .collect();
            let _ = store.discard_new_builds(&all);
        })?;
        // Let sled write out a big batch now, so that the few writes made
        // under the lock do not wait behind it.
        if bytes > BIG_WRITE {
            store.flush_blocking()?;
        }
        let SubmissionRecord {
            roots,
            cached,
            client,
            ..
        } = record;
        Ok(PreparedSubmission {
            sid,
            created_ms: now,
            members,
            ids,
            keys,
            outside,
            written: written.into_iter().map(|w| (w.id, w)).collect(),
            notices,
            classes,
            record: encoded,
            roots,
            cached,
            priority: g.priority,
            max_silent_time_secs: g.max_silent_time_secs,
            build_timeout_secs: g.build_timeout_secs,
            client,
        })
    }

    /// Add a prepared submission: share what is shareable now (the plan is
    /// checked again: a build that failed meanwhile gets a new one, a
    /// derivation another submission added meanwhile is shared), link the new
    /// builds, and start what can start. When nothing changed since the plan
    /// (the usual case) only what was prepared is inserted; otherwise the
    /// links, chains and events are worked out again here.
    pub fn insert_submission(&mut self, p: PreparedSubmission, now: i64) -> Inserted {
        let sid = p.sid;
        let mut persisted: Result<(), StateError> = Ok(());
        // What each member shares now, and whether that is still the plan.
        let now_shared: Vec<Option<BuildId>> =
            p.members.iter().map(|m| self.shareable(m.drv())).collect();
        let mut drift = p.members.iter().zip(&now_shared).any(|(m, s)| match m {
            Member::Shared { planned, .. } => *s != Some(*planned),
            Member::Fresh { .. } => s.is_some(),
        });
        drift |= p
            .outside
            .iter()
            .any(|(d, id)| self.by_drv.get(d) != Some(id));
        let mut ids = p.ids;
        let mut written = p.written;
        let mut discard: Vec<Written> = Vec::new();
        let mut fresh: Vec<BuildId> = Vec::with_capacity(written.len());
        let mut fresh_inputs: Vec<Vec<StorePath>> = Vec::with_capacity(written.len());
        let mut fresh_class: Vec<Option<usize>> = Vec::with_capacity(written.len());
        let mut shared: Vec<BuildId> = Vec::new();
        let mut sub_builds: Vec<BuildId> = Vec::with_capacity(p.members.len());
        let mut rewrite: BTreeSet<BuildId> = BTreeSet::new();
        let mut fresh_existing: Vec<(BuildId, Vec<BuildId>)> = Vec::new();
        self.builds.reserve(written.len());
        self.by_drv.reserve(written.len());
        for (m, share) in p.members.into_iter().zip(now_shared) {
            let id = match (m, share) {
                (Member::Shared { nb, .. }, Some(id)) => {
                    ids.insert(nb.drv_path, id);
                    shared.push(id);
                    id
                }
                (Member::Shared { nb, spare, .. }, None) => {
                    // What it was to share failed or went meanwhile: a build of its own.
                    let rec = BuildRecord {
                        id: spare,
                        drv_path: nb.drv_path.clone(),
                        drv_aterm: nb.drv_aterm,
                        system: nb.system,
                        required_features: nb.required_features,
                        outputs: nb.outputs,
                        deps: BTreeSet::new(),
                        priority: p.priority,
                        created_ms: p.created_ms,
                        submissions: BTreeSet::from([sid]),
                        state: BuildState::Waiting,
                        retries: 0,
                        attempt: 0,
                        max_silent_time_secs: p.max_silent_time_secs,
                        build_timeout_secs: p.build_timeout_secs,
                        error: None,
                        builder: None,
                        started_ms: None,
                        finished_ms: None,
                        requested_by: p.client.iter().cloned().collect(),
                    };
                    self.by_drv.insert(nb.drv_path.clone(), spare);
                    self.builds.insert(spare, Build::new(rec));
                    ids.insert(nb.drv_path, spare);
                    fresh.push(spare);
                    fresh_inputs.push(nb.input_drvs);
                    fresh_class.push(None);
                    rewrite.insert(spare);
                    spare
                }
                (Member::Fresh { build, .. }, Some(id)) => {
                    // Another submission added it meanwhile.
                    discard.extend(written.remove(&build.rec.id));
                    ids.insert(build.rec.drv_path.clone(), id);
                    shared.push(id);
                    id
                }
                (
                    Member::Fresh {
                        build,
                        inputs,
                        existing,
                        class,
                    },
                    None,
                ) => {
                    let own = build.rec.id;
                    if drift {
                        self.by_drv.insert(build.rec.drv_path.clone(), own);
                    }
                    self.builds.insert(own, *build);
                    fresh.push(own);
                    fresh_inputs.push(inputs);
                    if !existing.is_empty() {
                        fresh_existing.push((own, existing));
                    }
                    fresh_class.push(Some(class));
                    own
                }
            };
            sub_builds.push(id);
        }
        if !drift {
            self.by_drv.extend(p.keys);
        }
        for &id in &shared {
            let Some(b) = self.builds.get_mut(&id) else {
                continue;
            };
            b.rec.submissions.insert(sid);
            b.rec.requested_by.extend(p.client.iter().cloned());
            if p.priority > b.rec.priority {
                let queued = b.rec.state == BuildState::Queued;
                if queued {
                    let (class, key) = (b.class(), b.key());
                    if let Some(q) = self.ready.get_mut(&class) {
                        q.remove(&key);
                    }
                    b.rec.priority = p.priority;
                    let key = b.key();
                    self.ready.entry(class).or_default().insert(key);
                } else {
                    b.rec.priority = p.priority;
                }
            }
            persisted = persisted.and(self.persist_build(id));
        }
        // Link the new builds to what they depend on. As prepared, they are
        // linked among themselves: only links to builds the scheduler had are
        // made here. After a change, every link is made again from the inputs.
        let mut existing_deps: BTreeSet<BuildId> = BTreeSet::new();
        if drift {
            for &id in &fresh {
                let b = self.builds.get_mut(&id).expect("fresh build exists");
                b.dependents.clear();
                b.pending.clear();
            }
            fresh_existing = fresh
                .iter()
                .zip(&fresh_inputs)
                .map(|(&id, inputs)| {
                    let deps: Vec<BuildId> = inputs
                        .iter()
                        .filter_map(|i| ids.get(i).or_else(|| self.by_drv.get(i)).copied())
                        .filter(|d| *d != id)
                        .collect();
                    (id, deps)
                })
                .collect();
        }
        for (id, deps) in &fresh_existing {
            let mut linked = BTreeSet::new();
            let mut pending = Vec::new();
            for &dep in deps {
                let Some(d) = self.builds.get_mut(&dep) else {
                    continue;
                };
                d.dependents.insert(*id);
                if !d.rec.state.is_terminal() {
                    pending.push(dep);
                }
                existing_deps.insert(dep);
                linked.insert(dep);
            }
            let b = self.builds.get_mut(id).expect("fresh build exists");
            b.pending.extend(pending);
            if drift {
                if b.rec.deps != linked {
                    b.rec.deps = linked;
                    rewrite.insert(*id);
                }
            } else if linked.len() != deps.len() {
                // A dependency went meanwhile (it counts as done).
                for d in deps {
                    if !linked.contains(d) {
                        b.rec.deps.remove(d);
                    }
                }
                rewrite.insert(*id);
            }
        }
        for id in rewrite {
            persisted = persisted.and(self.persist_build(id));
        }
        sub_builds.sort_unstable();
        let sub = SubmissionRecord {
            id: sid,
            roots: p.roots,
            builds: sub_builds.into_iter().collect(),
            cached: p.cached,
            priority: p.priority,
            created_ms: p.created_ms,
            done: false,
            cancelled: false,
            client: p.client,
            finished_ms: None,
        };
        let n_builds = sub.builds.len();
        let n_cached = sub.cached.len();
        self.submissions.insert(sid, Arc::new(sub));
        persisted = persisted.and(if drift {
            self.persist_submission(sid)
        } else {
            self.store.put_new_submission(sid, &p.record)
        });
        tracing::info!(
            submission = %format!("s{sid}"),
            builds = n_builds,
            new = fresh.len(),
            cached = n_cached,
            "submission accepted"
        );
        if drift {
            self.recompute_chains(fresh.clone());
            for &id in &fresh {
                self.notify(
                    id,
                    Event::Queued {
                        build: id,
                        drv_path: self.builds[&id].rec.drv_path.clone(),
                    },
                );
            }
        } else {
            // The new builds' chains were worked out ahead; what they depend
            // on outside this submission grows by them.
            if !existing_deps.is_empty() {
                self.recompute_chains(existing_deps.into_iter().collect());
            }
            self.notices.extend(p.notices);
        }
        // Builds no builder can take fail now (their dependents with them);
        // the verdict is the same for every build of a class.
        let verdicts: Vec<bool> = p
            .classes
            .iter()
            .map(|(system, features)| self.capable_builder_recently(system, features, now))
            .collect();
        for (&id, class) in fresh.iter().zip(&fresh_class) {
            if class.is_some_and(|c| verdicts[c]) {
                continue;
            }
            let Some(b) = self.builds.get(&id) else {
                continue;
            };
            if b.rec.state.is_terminal() {
                continue;
            }
            if let Err(msg) = self.schedulable(
                &b.rec.system,
                &b.rec.required_features,
                &b.rec.drv_path,
                now,
            ) {
                self.finish(id, Outcome::Unschedulable, Some(msg), now);
            }
        }
        for &id in &fresh {
            let Some(b) = self.builds.get(&id) else {
                continue;
            };
            if b.rec.state == BuildState::Waiting && b.pending.is_empty() {
                self.actions.push(Action::Prepare { build: id });
            }
        }
        self.check_submission(sid, now);
        Inserted {
            sid,
            discard,
            persisted,
            leftovers: Leftovers {
                _ids: ids,
                _inputs: fresh_inputs,
                _written: written,
                _record: p.record,
            },
        }
    }

    /// Whether some builder can take this kind of work now or soon; else why not.
    fn schedulable(
        &self,
        system: &str,
        required: &BTreeSet<String>,
        drv: &StorePath,
        now: i64,
    ) -> Result<(), String> {
        if self.capable_builder_recently(system, required, now) {
            return Ok(());
        }
        Err(self.unschedulable_message(drv, system, required, now))
    }

    /// Whether a builder that can take this kind of work is online or was seen recently.
    fn capable_builder_recently(
        &self,
        system: &str,
        required: &BTreeSet<String>,
        now: i64,
    ) -> bool {
        self.by_system.get(system).is_some_and(|names| {
            names.iter().any(|n| {
                let e = &self.builders[n];
                e.rec.capabilities.can_build(system, required)
                    && (e.online || e.rec.last_seen_ms >= now - self.cfg.recent_window_ms)
            })
        })
    }

    fn unschedulable_message(
        &self,
        drv: &StorePath,
        system: &str,
        required: &BTreeSet<String>,
        now: i64,
    ) -> String {
        let mut names: Vec<&String> = self
            .builders
            .iter()
            .filter(|(_, e)| e.online || e.rec.last_seen_ms >= now - self.cfg.recent_window_ms)
            .map(|(n, _)| n)
            .collect();
        names.sort();
        let known: Vec<select::Known<'_>> = names
            .iter()
            .map(|n| select::Known {
                name: n,
                caps: &self.builders[*n].rec.capabilities,
            })
            .collect();
        select::unschedulable_message(drv, system, required, &known)
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

    /// A build's input closure is resolved: it is runnable.
    pub fn set_ready(&mut self, id: BuildId, inputs: Vec<(StorePath, u64)>) {
        if !self
            .builds
            .get(&id)
            .is_some_and(|b| b.rec.state == BuildState::Waiting && b.pending.is_empty())
        {
            return;
        }
        let inputs: Closure = inputs
            .into_iter()
            .map(|(p, size)| (self.intern(p), size))
            .collect();
        if let Some(b) = self.builds.get_mut(&id) {
            b.inputs = Some(inputs);
        }
        self.set_state(id, BuildState::Queued);
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

    /// Its outputs are already in the cache: done without building.
    pub fn set_cached(&mut self, id: BuildId, now: i64) {
        if self
            .builds
            .get(&id)
            .is_some_and(|b| !b.rec.state.is_terminal())
        {
            self.finish(id, Outcome::Cached, None, now);
        }
    }

    /// Its inputs cannot be resolved (missing from the cache): it fails.
    pub fn prepare_failed(&mut self, id: BuildId, error: String, now: i64) {
        if self
            .builds
            .get(&id)
            .is_some_and(|b| !b.rec.state.is_terminal())
        {
            self.finish(id, Outcome::Failed, Some(error), now);
        }
    }

    /// End a build: record, notify, release or fail dependents, close submissions.
    fn finish(&mut self, id: BuildId, outcome: Outcome, error: Option<String>, now: i64) -> u32 {
        let mut ended = 0;
        let mut work = vec![(id, outcome, error)];
        let mut touched_subs: BTreeSet<SubmissionId> = BTreeSet::new();
        while let Some((id, outcome, error)) = work.pop() {
            let Some(b) = self.builds.get_mut(&id) else {
                continue;
            };
            if b.rec.state.is_terminal() {
                continue;
            }
            if let BuildState::Running { builder, .. } = &b.rec.state {
                let builder = builder.clone();
                if let Some(e) = self.builders.get_mut(&builder) {
                    e.running.remove(&id);
                }
            }
            ended += 1;
            b.rec.error = error.clone();
            b.rec.finished_ms = Some(now);
            b.inputs = None;
            touched_subs.extend(b.rec.submissions.iter().copied());
            self.set_state(id, BuildState::Done(outcome));
            self.actions.push(Action::BuildEnded { build: id });
            let b = &self.builds[&id];
            let event = Event::Finished {
                build: id,
                drv_path: b.rec.drv_path.clone(),
                outcome,
                error: error.clone(),
                outputs: if outcome.is_success() {
                    b.rec.outputs.clone()
                } else {
                    BTreeMap::new()
                },
                builder: b.rec.builder.clone(),
                started_ms: b.rec.started_ms,
                finished_ms: b.rec.finished_ms,
            };
            if !outcome.is_success() {
                self.recent_failures.push_front(FailureView {
                    build: id,
                    drv_path: b.rec.drv_path.clone(),
                    builder: b.rec.builder.clone(),
                    error: error.clone().unwrap_or_else(|| format!("{outcome:?}")),
                    finished_ms: now,
                });
                self.recent_failures.truncate(RECENT_FAILURES);
            }
            self.notify(id, event);
            let dependents: Vec<BuildId> = self.builds[&id].dependents.iter().copied().collect();
            let drv = self.builds[&id].rec.drv_path.clone();
            for d in dependents {
                let Some(db) = self.builds.get_mut(&d) else {
                    continue;
                };
                db.pending.remove(&id);
                if db.rec.state.is_terminal() {
                    continue;
                }
                if outcome.is_success() {
                    if db.pending.is_empty() && db.rec.state == BuildState::Waiting {
                        self.actions.push(Action::Prepare { build: d });
                    }
                } else {
                    work.push((
                        d,
                        Outcome::DependencyFailed,
                        Some(format!("dependency {drv} did not build")),
                    ));
                }
            }
        }
        for sid in touched_subs {
            self.check_submission(sid, now);
        }
        ended
    }

    fn check_submission(&mut self, sid: SubmissionId, now: i64) {
        let Some(sub) = self.submissions.get(&sid) else {
            return;
        };
        if sub.done {
            return;
        }
        let mut built = 0u32;
        let mut cached = sub.cached.len() as u32;
        let mut failed = 0u32;
        for id in &sub.builds {
            match self.builds.get(id).map(|b| &b.rec.state) {
                Some(BuildState::Done(Outcome::Built)) => built += 1,
                Some(BuildState::Done(Outcome::Cached)) => cached += 1,
                Some(BuildState::Done(_)) => failed += 1,
                Some(_) if !sub.cancelled => return,
                Some(_) => failed += 1,
                None => built += 1,
            }
        }
        let success = failed == 0 && !sub.cancelled;
        let sub = Arc::make_mut(self.submissions.get_mut(&sid).expect("checked above"));
        sub.done = true;
        sub.finished_ms = Some(now);
        tracing::info!(submission = %format!("s{sid}"), success, built, cached, failed, "submission done");
        let _ = self.persist_submission(sid);
        self.notices.push(Notice {
            submissions: vec![sid],
            event: Event::SubmissionDone {
                submission: sid,
                success,
                built,
                cached,
                failed,
            },
        });
        self.evict(sid);
    }

    /// Forget, in memory, finished builds no unfinished submission needs (the
    /// store keeps them for logs).
    fn evict(&mut self, sid: SubmissionId) {
        let Some(sub) = self.submissions.get(&sid) else {
            return;
        };
        let ids: Vec<BuildId> = sub.builds.iter().copied().collect();
        for id in ids {
            let keep = self.builds.get(&id).is_none_or(|b| {
                !b.rec.state.is_terminal()
                    || b.rec
                        .submissions
                        .iter()
                        .any(|s| self.submissions.get(s).is_some_and(|s| !s.done))
                    || b.dependents.iter().any(|d| {
                        self.builds
                            .get(d)
                            .is_some_and(|d| !d.rec.state.is_terminal())
                    })
            });
            if !keep && let Some(b) = self.builds.remove(&id) {
                if self.by_drv.get(&b.rec.drv_path) == Some(&id) {
                    self.by_drv.remove(&b.rec.drv_path);
                }
                for d in &b.rec.deps {
                    if let Some(db) = self.builds.get_mut(d) {
                        db.dependents.remove(&id);
                    }
                }
            }
        }
        self.submissions.remove(&sid);
    }

    // ───────────────────────────── builders ─────────────────────────────

    fn index_builder(&mut self, rec: &BuilderRecord) {
        for names in self.by_system.values_mut() {
            names.remove(&rec.name);
        }
        for s in &rec.capabilities.systems {
            self.by_system
                .entry(s.clone())
                .or_default()
                .insert(rec.name.clone());
        }
    }

    /// An authenticated builder joins under `name` if the name is free, is
    /// bound to `public_key` already, or is bound to `replaces` (a key the
    /// caller found no longer enrolled): the check and the binding are one
    /// step, so of two keys racing for a new name exactly one gets it.
    pub fn builder_join(
        &mut self,
        name: &str,
        public_key: &str,
        replaces: Option<&str>,
        caps: Capabilities,
        running_jobs: &[String],
        now: i64,
    ) -> Result<(u64, bool), NameTaken> {
        if let Some(e) = self.builders.get(name) {
            let bound = e.rec.public_key.as_str();
            if bound != public_key && Some(bound) != replaces {
                tracing::warn!(
                    builder = name,
                    "refused builder: name belongs to another key"
                );
                return Err(NameTaken {
                    name: name.to_owned(),
                });
            }
        }
        Ok(self.builder_connected(name, public_key, caps, running_jobs, now))
    }

    /// Forget builders not seen for `older_than_ms` (offline, nothing
    /// running): their records and their names' bindings. Returns their names.
    pub fn forget_builders(&mut self, now: i64, older_than_ms: i64) -> Vec<String> {
        let cutoff = now.saturating_sub(older_than_ms);
        let gone: Vec<String> = self
            .builders
            .iter()
            .filter(|(_, e)| !e.online && e.running.is_empty() && e.rec.last_seen_ms < cutoff)
            .map(|(n, _)| n.clone())
            .collect();
        for name in &gone {
            self.builders.remove(name);
            for names in self.by_system.values_mut() {
                names.remove(name);
            }
            self.by_system.retain(|_, names| !names.is_empty());
            if let Err(e) = self.store.delete_builder(name) {
                tracing::error!(builder = %name, error = %e, "cannot delete builder record");
            }
            tracing::info!(builder = %name, "builder record removed: not seen within the retention");
        }
        gone
    }

    /// An authenticated builder joined (or came back). `running_jobs` are the
    /// job ids it still holds: running, or ended with a result it kept while
    /// disconnected and sends next (`Hello.finished_jobs`). Those stay running
    /// there, without a retry, until their result comes; builds we had on it
    /// that it does not report are requeued; jobs it reports that are not ours
    /// to run there are cancelled (which also tells it to drop a kept result).
    /// Returns the connection number and whether it is drained.
    pub fn builder_connected(
        &mut self,
        name: &str,
        public_key: &str,
        caps: Capabilities,
        running_jobs: &[String],
        now: i64,
    ) -> (u64, bool) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let draining = self.builders.get(name).is_some_and(|e| e.rec.draining);
        let rec = BuilderRecord {
            name: name.to_owned(),
            public_key: public_key.to_owned(),
            capabilities: caps,
            last_seen_ms: now,
            draining,
        };
        self.index_builder(&rec);
        let entry = self
            .builders
            .entry(name.to_owned())
            .or_insert_with(|| BuilderEntry {
                rec: rec.clone(),
                load: Load::default(),
                online: true,
                conn,
                disconnected_ms: None,
                running: BTreeSet::new(),
                held: HashSet::new(),
            });
        entry.rec = rec;
        entry.online = true;
        entry.conn = conn;
        entry.disconnected_ms = None;
        let ours: Vec<BuildId> = entry.running.iter().copied().collect();
        let _ = self.persist_builder(name);
        tracing::info!(builder = name, conn, draining, "builder online");
        let reported: HashSet<&str> = running_jobs.iter().map(String::as_str).collect();
        for id in ours {
            let still = match &self.builds.get(&id).map(|b| &b.rec.state) {
                Some(BuildState::Running { job_id, .. }) => reported.contains(job_id.as_str()),
                _ => false,
            };
            if !still {
                self.requeue(id, now, "its builder reconnected without it", true);
            }
        }
        for job in running_jobs {
            let ok = parse_job_id(job).is_some_and(|(id, _)| {
                matches!(self.builds.get(&id).map(|b| &b.rec.state),
                    Some(BuildState::Running { builder, job_id, .. }) if builder == name && job_id == job)
            });
            if !ok {
                self.actions.push(Action::Cancel {
                    builder: name.to_owned(),
                    job_id: job.clone(),
                });
            }
        }
        (conn, draining)
    }

    /// A builder's stream ended. Its jobs wait `grace_ms` for it to come back.
    pub fn builder_disconnected(&mut self, name: &str, conn: u64, now: i64) {
        let Some(e) = self.builders.get_mut(name) else {
            return;
        };
        if e.conn != conn || !e.online {
            return;
        }
        e.online = false;
        e.disconnected_ms = Some(now);
        e.rec.last_seen_ms = now;
        tracing::info!(builder = name, running = e.running.len(), "builder offline");
        let _ = self.persist_builder(name);
    }

    /// A load report.
    pub fn builder_load(&mut self, name: &str, load: Load, now: i64) {
        if let Some(e) = self.builders.get_mut(name) {
            e.load = load;
            e.rec.last_seen_ms = now;
        }
    }

    /// Drain (or undrain) a builder; false when unknown.
    pub fn set_drain(&mut self, name: &str, draining: bool) -> bool {
        let Some(e) = self.builders.get_mut(name) else {
            return false;
        };
        e.rec.draining = draining;
        let online = e.online;
        tracing::info!(builder = name, draining, "builder drain changed");
        let _ = self.persist_builder(name);
        if online {
            self.actions.push(Action::Drain {
                builder: name.to_owned(),
                draining,
            });
        }
        true
    }

    /// Put a build back in the queue after losing its run; past the retry limit it fails.
    fn requeue(&mut self, id: BuildId, now: i64, why: &str, counts: bool) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        if b.rec.state.is_terminal() {
            return;
        }
        if let BuildState::Running { builder, .. } = &b.rec.state {
            let builder = builder.clone();
            if let Some(e) = self.builders.get_mut(&builder) {
                e.running.remove(&id);
            }
        }
        let b = self.builds.get_mut(&id).expect("checked above");
        if counts {
            b.rec.retries += 1;
        }
        if b.rec.retries > self.cfg.max_retries {
            let msg = format!("gave up after {} attempts; last: {why}", b.rec.retries);
            self.finish(id, Outcome::Failed, Some(msg), now);
            return;
        }
        tracing::info!(build = %format!("b{id}"), retries = b.rec.retries, why, "build requeued");
        if b.inputs.is_some() {
            self.set_state(id, BuildState::Queued);
        } else {
            self.set_state(id, BuildState::Waiting);
            self.actions.push(Action::Prepare { build: id });
        }
        self.notify(
            id,
            Event::Queued {
                build: id,
                drv_path: self.builds[&id].rec.drv_path.clone(),
            },
        );
    }

    /// Periodic work: requeue the jobs of builders gone past their grace period,
    /// and fail runnable work whose wait for a matching builder ran out.
    pub fn tick(&mut self, now: i64) {
        let expired: Vec<(String, Vec<BuildId>)> = self
            .builders
            .iter()
            .filter(|(_, e)| {
                !e.online
                    && !e.running.is_empty()
                    && e.disconnected_ms
                        .is_some_and(|t| now - t >= self.cfg.grace_ms)
            })
            .map(|(n, e)| (n.clone(), e.running.iter().copied().collect()))
            .collect();
        for (name, ids) in expired {
            for id in ids {
                self.requeue(id, now, &format!("builder {name} vanished"), true);
            }
        }
        let classes: Vec<Class> = self.ready.keys().cloned().collect();
        self.unmatched_since.retain(|c, _| classes.contains(c));
        for class in classes {
            let online_capable = self.by_system.get(&class.system).is_some_and(|names| {
                names.iter().any(|n| {
                    let e = &self.builders[n];
                    e.online && e.rec.capabilities.can_build(&class.system, &class.features)
                })
            });
            if online_capable {
                self.unmatched_since.remove(&class);
                continue;
            }
            let since = *self.unmatched_since.entry(class.clone()).or_insert(now);
            let ids: Vec<BuildId> = self.ready[&class].iter().map(|k| k.id).collect();
            let Some(first) = ids.first() else { continue };
            let drv = self.builds[first].rec.drv_path.clone();
            let verdict = self.schedulable(&class.system, &class.features, &drv, now);
            let expired = now - since >= self.cfg.unschedulable_wait_ms;
            let msg = match verdict {
                Err(msg) => msg,
                Ok(()) if expired => format!(
                    "{}; waited {}s for a matching builder to come back",
                    self.unschedulable_message(&drv, &class.system, &class.features, now),
                    (now - since) / 1000
                ),
                Ok(()) => continue,
            };
            for id in ids {
                self.finish(id, Outcome::Unschedulable, Some(msg.clone()), now);
            }
            self.unmatched_since.remove(&class);
        }
    }

    /// Match runnable builds to builders with free slots, best first.
    pub fn dispatch(&mut self, now: i64) {
        loop {
            // The best head among classes that some free, capable builder can take.
            let mut best: Option<(ReadyKey, Class, Vec<String>)> = None;
            for (class, queue) in &self.ready {
                let Some(head) = queue.first() else { continue };
                if best.as_ref().is_some_and(|(k, _, _)| k <= head) {
                    continue;
                }
                let Some(names) = self.by_system.get(&class.system) else {
                    continue;
                };
                let candidates: Vec<String> = names
                    .iter()
                    .filter(|n| {
                        let e = &self.builders[*n];
                        e.online
                            && !e.rec.draining
                            && (e.running.len() as u32) < e.rec.capabilities.max_jobs.max(1)
                            && e.rec.capabilities.can_build(&class.system, &class.features)
                    })
                    .cloned()
                    .collect();
                if !candidates.is_empty() {
                    best = Some((*head, class.clone(), candidates));
                }
            }
            let Some((key, _class, candidates)) = best else {
                break;
            };
            let id = key.id;
            let b = &self.builds[&id];
            let inputs = b.inputs.as_deref().unwrap_or(&[]);
            let chosen = candidates
                .iter()
                .map(|n| {
                    let e = &self.builders[n];
                    let s = select::score(
                        &e.rec.capabilities,
                        &e.load,
                        e.running.len(),
                        &e.held,
                        inputs,
                    );
                    (s, n)
                })
                .min_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)))
                .map(|(_, n)| n.clone())
                .expect("candidates is not empty");
            self.start(id, &chosen, now);
        }
    }

    fn start(&mut self, id: BuildId, builder: &str, now: i64) {
        let b = self.builds.get_mut(&id).expect("queued build exists");
        b.rec.attempt += 1;
        b.rec.builder = Some(builder.to_owned());
        b.rec.started_ms = Some(now);
        let job = job_id(id, b.rec.attempt);
        // The closure goes with the job; a requeue resolves it again.
        let inputs: Vec<Arc<StorePath>> = b
            .inputs
            .take()
            .map(|v| v.iter().map(|(p, _)| p.clone()).collect())
            .unwrap_or_default();
        let assignment = Assignment {
            builder: builder.to_owned(),
            build: id,
            job_id: job.clone(),
            drv_path: b.rec.drv_path.clone(),
            drv_aterm: b.rec.drv_aterm.clone(),
            input_paths: inputs.clone(),
            max_silent_time_secs: b.rec.max_silent_time_secs,
            build_timeout_secs: b.rec.build_timeout_secs,
        };
        let drv = b.rec.drv_path.clone();
        self.set_state(
            id,
            BuildState::Running {
                builder: builder.to_owned(),
                job_id: job,
                started_ms: now,
            },
        );
        let e = self
            .builders
            .get_mut(builder)
            .expect("candidate builder exists");
        e.running.insert(id);
        if e.held.len() + inputs.len() > MAX_HELD_PATHS {
            e.held.clear();
        }
        e.held.extend(inputs);
        self.actions.push(Action::Dispatch(assignment));
        self.notify(
            id,
            Event::Started {
                build: id,
                drv_path: drv,
                builder: builder.to_owned(),
            },
        );
    }

    /// The build of a job, if `builder` is running that exact job now.
    pub fn running_job(&self, builder: &str, job: &str) -> Option<BuildId> {
        let (id, _) = parse_job_id(job)?;
        match &self.builds.get(&id)?.rec.state {
            BuildState::Running {
                builder: b, job_id, ..
            } if b == builder && job_id == job => Some(id),
            _ => None,
        }
    }

    /// Whether `path` is an output of a build `builder` is running now: the only
    /// paths a builder may upload (anything else it could publish, signed by the
    /// farm, would later be taken as a cached build result).
    pub fn is_expected_output(&self, builder: &str, path: &StorePath) -> bool {
        let Some(e) = self.builders.get(builder) else {
            return false;
        };
        e.running.iter().any(|id| {
            self.builds.get(id).is_some_and(|b| {
                matches!(&b.rec.state, BuildState::Running { builder: on, .. } if on == builder)
                    && b.rec.outputs.values().any(|o| o == path)
            })
        })
    }

    /// A builder reported how a job ended (a `Built` already checked against the cache).
    pub fn job_ended(&mut self, builder: &str, job: &str, end: JobEnd, now: i64) {
        let Some(id) = self.running_job(builder, job) else {
            tracing::info!(
                builder,
                job,
                "result for a job that is not running there; ignored"
            );
            return;
        };
        match end {
            JobEnd::Built => {
                let outputs: Vec<Arc<StorePath>> = self.builds[&id]
                    .rec
                    .outputs
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|p| self.intern(p))
                    .collect();
                if let Some(e) = self.builders.get_mut(builder) {
                    e.held.extend(outputs);
                }
                self.sweep_paths();
                self.finish(id, Outcome::Built, None, now);
            }
            JobEnd::Failed(msg) => {
                self.finish(id, Outcome::Failed, Some(msg), now);
            }
            JobEnd::TimedOut(msg) => {
                self.finish(id, Outcome::TimedOut, Some(msg), now);
            }
            JobEnd::Transient(msg) => {
                if let Some(b) = self.builds.get_mut(&id) {
                    b.rec.error = Some(msg.clone());
                }
                self.requeue(id, now, &msg, true);
            }
        }
    }

    /// Cancel a build (and, with it, what depends on it). Returns how many builds ended.
    pub fn cancel_build(&mut self, id: BuildId, now: i64) -> u32 {
        let Some(b) = self.builds.get(&id) else {
            return 0;
        };
        if b.rec.state.is_terminal() {
            return 0;
        }
        if let BuildState::Running {
            builder, job_id, ..
        } = &b.rec.state
        {
            self.actions.push(Action::Cancel {
                builder: builder.clone(),
                job_id: job_id.clone(),
            });
        }
        self.finish(id, Outcome::Cancelled, Some("cancelled".into()), now)
    }

    /// Cancel a submission: builds only it needs are cancelled; shared builds go
    /// on for the others. Returns how many builds were cancelled.
    pub fn cancel_submission(&mut self, sid: SubmissionId, now: i64) -> u32 {
        let Some(sub) = self.submissions.get_mut(&sid) else {
            return 0;
        };
        if sub.done {
            return 0;
        }
        let sub = Arc::make_mut(sub);
        sub.cancelled = true;
        let ids: Vec<BuildId> = sub.builds.iter().copied().collect();
        let _ = self.persist_submission(sid);
        let mut n = 0;
        for id in ids {
            let Some(b) = self.builds.get_mut(&id) else {
                continue;
            };
            if b.rec.state.is_terminal() {
                continue;
            }
            let others = b
                .rec
                .submissions
                .iter()
                .any(|s| *s != sid && self.submissions.get(s).is_some_and(|s| !s.done));
            if !others {
                n += self.cancel_build(id, now);
            }
        }
        self.check_submission(sid, now);
        n
    }

    // ───────────────────────────── queries ─────────────────────────────
    //
    // In memory only (no sled read under the caller's lock): the coordinator
    // falls back to the store, outside the lock, for what is not here.

    /// A build's record, if it is in memory.
    pub fn build_record(&self, id: BuildId) -> Option<&BuildRecord> {
        self.builds.get(&id).map(|b| &b.rec)
    }

    /// A build's view, if it is in memory (a reference count, not a copy).
    pub fn build_view(&self, id: BuildId) -> Option<Arc<BuildView>> {
        self.builds.get(&id).map(|b| b.view.clone())
    }

    /// The in-memory build of a derivation that is queued, running or built
    /// (what a new submission shares).
    pub fn known_build(&self, drv: &StorePath) -> Option<Arc<BuildView>> {
        self.shareable(drv).and_then(|id| self.build_view(id))
    }

    /// The latest in-memory build of a derivation.
    pub fn build_of_drv(&self, drv: &StorePath) -> Option<BuildId> {
        self.by_drv.get(drv).copied()
    }

    /// An unfinished submission (finished ones are only in the store): its
    /// record, a view of each of its builds in memory, and the ids of those
    /// that are not (to read from the store after the lock).
    pub fn submission_view(&self, sid: SubmissionId) -> Option<(SubmissionSnapshot, Vec<BuildId>)> {
        let sub = self.submissions.get(&sid)?.clone();
        let mut views = Vec::with_capacity(sub.builds.len());
        let mut missing = Vec::new();
        for id in &sub.builds {
            match self.builds.get(id) {
                Some(b) => views.push(b.view.clone()),
                None => missing.push(*id),
            }
        }
        Some(((sub, views), missing))
    }

    /// Whether the submission is finished (or unknown).
    pub fn submission_done(&self, sid: SubmissionId) -> bool {
        self.submissions.get(&sid).is_none_or(|s| s.done)
    }

    /// Every known builder.
    pub fn builders(&self) -> Vec<BuilderView> {
        let mut v: Vec<BuilderView> = self
            .builders
            .values()
            .map(|e| BuilderView {
                record: e.rec.clone(),
                load: e.load.clone(),
                online: e.online,
                running: e.running.len(),
            })
            .collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        v
    }

    /// The online builders' public keys by name.
    pub fn builder_key(&self, name: &str) -> Option<(String, bool)> {
        self.builders
            .get(name)
            .map(|e| (e.rec.public_key.clone(), e.online))
    }

    /// Unfinished, not running builds per system.
    pub fn queue_depths(&self) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for b in self.builds.values() {
            if matches!(b.rec.state, BuildState::Queued | BuildState::Waiting) {
                *m.entry(b.rec.system.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    /// Running builds.
    pub fn running(&self) -> Vec<Arc<BuildView>> {
        let mut v: Vec<Arc<BuildView>> = self
            .builders
            .values()
            .flat_map(|e| e.running.iter())
            .filter_map(|id| self.builds.get(id))
            .filter(|b| matches!(b.rec.state, BuildState::Running { .. }))
            .map(|b| b.view.clone())
            .collect();
        v.sort_by_key(|b| b.id);
        v.dedup_by_key(|b| b.id);
        v
    }

    /// The most recent failures, newest first.
    pub fn recent_failures(&self) -> Vec<FailureView> {
        self.recent_failures.iter().cloned().collect()
    }

    /// The runnable builds of a system in dispatch order (tests, dashboards).
    pub fn queue_order(&self, system: &str) -> Vec<BuildId> {
        let mut keys: Vec<ReadyKey> = self
            .ready
            .iter()
            .filter(|(c, _)| c.system == system)
            .flat_map(|(_, q)| q.iter().copied())
            .collect();
        keys.sort();
        keys.into_iter().map(|k| k.id).collect()
    }

    /// A build's current state (tests, the SSH endpoint).
    pub fn state_of(&self, id: BuildId) -> Option<BuildState> {
        self.builds.get(&id).map(|b| b.rec.state.clone())
    }

    /// A queued build's input closure (tests).
    pub fn inputs_of(&self, id: BuildId) -> Option<Vec<(StorePath, u64)>> {
        self.builds.get(&id).and_then(|b| {
            b.inputs
                .as_ref()
                .map(|v| v.iter().map(|(p, s)| ((**p).clone(), *s)).collect())
        })
    }

    /// How much the scheduler holds in memory (tests, benchmarks): builds,
    /// submissions, input closure entries of queued builds, interned paths.
    pub fn memory_counts(&self) -> (usize, usize, usize, usize) {
        let inputs = self
            .builds
            .values()
            .map(|b| b.inputs.as_ref().map_or(0, |v| v.len()))
            .sum();
        (
            self.builds.len(),
            self.submissions.len(),
            inputs,
            self.paths.len(),
        )
    }
}

#[cfg(test)]
mod tests;
