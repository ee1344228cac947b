//! The coordinator's domain service: the scheduler behind a mutex, the
//! connected builders' sessions, live logs, and the submission event channels.
//! gRPC handlers (and later the SSH endpoint) call into [`Coordinator`]; it
//! carries out what the scheduler decides (send jobs, resolve input closures,
//! store logs) and delivers events to watchers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc};

use crate::cache::Cache;
use crate::domain::lock::lock;
use crate::domain::model::*;
use crate::domain::observe::{self, StateSnapshot};
use crate::domain::scheduler::{GraphSubmission, JobEnd, PlanQuery, Scheduler, SubmissionSnapshot};
use crate::domain::state::{KeepNothing, Retention, StateError, Store};
use crate::metrics::Metrics;

/// Finished submissions pruned per batch (each batch is its own few sled
/// writes; nothing holds the scheduler lock meanwhile).
const PRUNE_BATCH: usize = 256;

/// Views of the builds `ids` that the store has (blocking).
fn read_builds(store: &Store, ids: &[BuildId]) -> Vec<Arc<BuildView>> {
    ids.iter()
        .filter_map(|id| store.get_build(*id).ok().flatten())
        .map(Arc::new)
        .collect()
}

/// Live log bytes kept per running build; beyond it the head is dropped.
pub const MAX_LIVE_LOG: usize = 64 * 1024 * 1024;

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the domain tells a connected builder. The API layer that owns the
/// builder's stream turns each into its wire message (gRPC:
/// `api::grpc::convert`).
#[derive(Debug, Clone)]
pub enum BuilderCommand {
    /// Build this job.
    Job(Assignment),
    /// Stop this job.
    Cancel { job_id: String },
    /// Take no new jobs (or take them again).
    Drain { draining: bool },
}

/// Why a command did not reach its builder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The session ended or its buffer is full.
    #[error("the builder's session is gone or not keeping up")]
    Closed,
    /// The encoded command is over the transport's message limit (it would
    /// end the builder's whole session).
    #[error("{len} bytes encoded, over the farm's {limit} byte message limit")]
    TooLarge { len: usize, limit: usize },
}

/// A connected builder's downstream, as the domain sees it: implemented by the
/// API layer that holds the session (never blocks: a full buffer is `Closed`).
pub trait BuilderLink: Send + Sync + 'static {
    fn send(&self, command: BuilderCommand) -> Result<(), LinkError>;
}

struct Session {
    conn: u64,
    token: String,
    link: Arc<dyn BuilderLink>,
}

/// The connected builders, by name, and each one's data-call token. One
/// mutex over both (mini-redis style): a session and its token are made and
/// ended together, so one lock keeps them in step with no order between two.
#[derive(Default)]
struct Sessions {
    by_name: HashMap<String, Session>,
    /// Data-call session token → builder name.
    by_token: HashMap<String, String>,
}

/// A running build's log so far, and where it is in its life. Kept as the
/// chunks the builder sent; past [`MAX_LIVE_LOG`] whole chunks are dropped
/// from the head (no bytes are moved).
#[derive(Default)]
pub struct LiveLog {
    chunks: std::collections::VecDeque<bytes::Bytes>,
    /// Bytes held in `chunks`.
    held: usize,
    /// Bytes dropped from the head to stay under [`MAX_LIVE_LOG`].
    pub dropped: u64,
    /// The build ended: no more bytes come.
    pub ended: bool,
    /// Set once storing the ended log was tried: whether it is in the cache.
    pub stored: Option<bool>,
}

impl LiveLog {
    /// Append bytes, dropping whole chunks from the head past [`MAX_LIVE_LOG`].
    pub fn push(&mut self, data: &[u8]) {
        self.push_capped(data, MAX_LIVE_LOG);
    }

    fn push_capped(&mut self, data: &[u8], cap: usize) {
        if data.is_empty() {
            return;
        }
        self.chunks.push_back(bytes::Bytes::copy_from_slice(data));
        self.held += data.len();
        while self.held > cap
            && let Some(front) = self.chunks.pop_front()
        {
            self.held -= front.len();
            self.dropped += front.len() as u64;
        }
    }

    /// Absolute offset of the end of the log (dropped bytes count).
    pub fn end(&self) -> u64 {
        self.dropped + self.held as u64
    }

    /// The bytes from absolute `offset` (or from the oldest kept byte) to the end.
    pub fn read_from(&self, offset: u64) -> Vec<u8> {
        let mut skip = offset.saturating_sub(self.dropped);
        let mut out = Vec::new();
        for c in &self.chunks {
            let len = c.len() as u64;
            if skip >= len {
                skip -= len;
                continue;
            }
            out.extend_from_slice(&c[skip as usize..]);
            skip = 0;
        }
        out
    }

    /// The kept chunks (cheap: reference-counted).
    pub fn chunks(&self) -> Vec<bytes::Bytes> {
        self.chunks.iter().cloned().collect()
    }
}

/// Fixed facts about this coordinator that handlers report.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub cache_public_key: String,
    /// `ssh-ed25519 AAAA…`.
    pub ssh_host_key: String,
    /// Host and port Nix clients reach the SSH endpoint at.
    pub ssh_host: String,
    pub ssh_port: u16,
    /// `http://host:port` of the cache.
    pub http_url: String,
}

/// The coordinator's shared state.
///
/// What each lock guards:
/// - `sched`: the scheduler (builds, submissions, builders, the queue), and
///   the order of its decisions: a call's writes are applied to `store` and
///   its batch queued to `outbox_tx` before the guard drops, so the outbox
///   carries batches out, and flushes their writes, in decision order.
/// - `sessions`: each connected builder's session (name → connection, token,
///   link) and its data-call token (token → name), one map each under one
///   mutex (see [`Sessions`]).
/// - `events`: each followed submission's broadcast channel.
/// - `logs`: the live log of each running build (until its log is stored:
///   see [`crate::domain::follow`]); each `LiveLog` has its own
///   mutex, so appending to one log does not stop readers of another.
///
/// Lock order: `sessions` before `sched` ([`Coordinator::builder_online`]
/// holds both, so the name is bound in the scheduler and the session
/// registered in one step, before the scheduler can dispatch to it).
/// `events`, `logs` and a `LiveLog` are leaves: each is taken with no other
/// lock held (a `logs` guard is dropped before its `LiveLog` is locked).
/// Nothing is locked while `sched` is held, and `sched` is never taken while
/// a leaf is held.
///
/// They are std mutexes, not tokio ones: every critical section is short and
/// synchronous, and no guard is held across an `.await` (the scheduler is
/// pure; sled writes under `sched` are blocking and brief; anything slow,
/// such as a flush or a store read for a follower, happens after the guard
/// drops). [`lock`] says why poisoning is ignored.
///
/// Not locks: `log_notify` wakes log followers when a live log is created,
/// grows, ends or is stored and when a build ends (armed before
/// they look, so none is missed); `kick` is signalled after a builder came
/// online; `stopping` ends sessions and followers; `outbox_tx` is the ordered
/// queue to [`run_outbox`].
///
/// The rest stay apart: the scheduler lock is the busy one, and merging the
/// maps of followers' channels or live logs into it would make every log
/// chunk and every event delivery wait for scheduling decisions.
pub(crate) struct Inner {
    sched: Mutex<Scheduler>,
    /// The state database (a handle: cloned, it is read without any lock).
    store: Store,
    sessions: Mutex<Sessions>,
    pub(crate) events: Mutex<HashMap<SubmissionId, broadcast::Sender<Event>>>,
    /// Live logs, from dispatch until stored (see [`crate::domain::follow`]).
    pub(crate) logs: Mutex<HashMap<BuildId, Arc<Mutex<LiveLog>>>>,
    /// Fires when a live log is created, grows, ends or is stored, and when a build ends.
    pub(crate) log_notify: Notify,
    kick: Notify,
    pub(crate) facts: Facts,
    pub(crate) cache: Cache,
    /// Cancelled when the coordinator stops: sessions and followers end.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
    /// The scheduler's decisions in the order it made them, to the task that
    /// carries them out ([`run_outbox`]).
    outbox_tx: mpsc::UnboundedSender<Batch>,
    /// Prometheus metrics: counted here and where things happen; the state
    /// gauges are read at scrape time ([`crate::domain::observe`]).
    pub(crate) metrics: Metrics,
    /// Builds whose input closure is to be resolved ([`Coordinator::spawn_prepare`]).
    prepares: Mutex<PrepareQueue>,
}

/// At most this many input closures are resolved at once. A task per build
/// held ~2.8 KB each while it waited: 280 MB for a 100 000-build submission
/// (issue 13's heap profile); a queue of ids costs 8 bytes a build.
const PREPARE_WORKERS: usize = 64;

#[derive(Default)]
struct PrepareQueue {
    waiting: std::collections::VecDeque<BuildId>,
    /// Worker tasks running (each takes ids until the queue is empty).
    workers: usize,
}

/// One `with_sched` call's decisions.
struct Batch {
    actions: Vec<Action>,
    notices: Vec<Notice>,
}

/// Handle on the coordinator's domain (cheap to clone).
#[derive(Clone)]
pub struct Coordinator {
    pub(crate) inner: Arc<Inner>,
}

impl Coordinator {
    /// A coordinator over a loaded scheduler and the state it was loaded
    /// from (the writes the load made are applied here).
    pub fn new(mut sched: Scheduler, store: Store, cache: Cache, facts: Facts) -> Coordinator {
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        let _ = store.apply_all(&sched.take_writes());
        let coord = Coordinator {
            inner: Arc::new_cyclic(|weak| {
                let weak: std::sync::Weak<Inner> = weak.clone();
                // The state gauges, read at each scrape.
                let metrics = Metrics::new(
                    cache.metrics(),
                    Box::new(move |enc| {
                        let Some(inner) = weak.upgrade() else {
                            return Ok(());
                        };
                        let c = Coordinator { inner };
                        let snap = c.read_sched(StateSnapshot::of);
                        let (cache, flush) = (c.cache().clone(), c.store().flush_stats());
                        drop(c);
                        observe::encode_state(snap, &cache, flush, enc)
                    }),
                );
                store.observe_flushes(metrics.flush_histogram());
                Inner {
                    sched: Mutex::new(sched),
                    store,
                    sessions: Mutex::new(Sessions::default()),
                    events: Mutex::new(HashMap::new()),
                    logs: Mutex::new(HashMap::new()),
                    log_notify: Notify::new(),
                    kick: Notify::new(),
                    facts,
                    cache,
                    stopping: tokio_util::sync::CancellationToken::new(),
                    outbox_tx,
                    metrics,
                    prepares: Mutex::new(PrepareQueue::default()),
                }
            }),
        };
        tokio::spawn(run_outbox(Arc::downgrade(&coord.inner), outbox_rx));
        coord
    }

    /// Make every state write so far durable.
    pub async fn flush(&self) -> Result<(), crate::domain::state::StateError> {
        self.inner.store.flush().await
    }

    pub fn facts(&self) -> &Facts {
        &self.inner.facts
    }

    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// The coordinator's metrics (rendered by `GET /metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Cancelled once the coordinator is stopping.
    pub fn stopping(&self) -> &tokio_util::sync::CancellationToken {
        &self.inner.stopping
    }

    /// End every builder session and stream follower.
    pub fn stop(&self) {
        self.inner.stopping.cancel();
        lock(&self.inner.sessions).by_name.clear();
        lock(&self.inner.events).clear();
        self.inner.log_notify.notify_waiters();
    }

    /// Run `f` on the scheduler, dispatch, then carry out what it decided.
    ///
    /// Under the scheduler lock, in this order: `f`, the dispatch, the
    /// scheduler's writes applied to the state, and the batch of actions and
    /// notices queued to the outbox task; so batches are carried out in the
    /// order they were made, each after its writes (and a batch that sends a
    /// job or reports an end waits for a flush covering them: [`run_outbox`]).
    /// A write that fails is logged; the decision stands.
    pub fn with_sched<R>(&self, f: impl FnOnce(&mut Scheduler, i64) -> R) -> R {
        self.with_sched_persisted(f).0
    }

    /// [`Coordinator::with_sched`], also returning the first error writing
    /// what `f` itself changed (not what the dispatch after it did).
    fn with_sched_persisted<R>(
        &self,
        f: impl FnOnce(&mut Scheduler, i64) -> R,
    ) -> (R, Result<(), StateError>) {
        let now = now_ms();
        let mut s = lock(&self.inner.sched);
        let held = std::time::Instant::now();
        let r = f(&mut s, now);
        let own = s.take_writes();
        s.dispatch(now);
        let dispatched = s.take_writes();
        let actions = s.take_actions();
        let notices = s.take_notices();
        let persisted = self.inner.store.apply_all(&own);
        let _ = self.inner.store.apply_all(&dispatched);
        observe::count_decisions(&self.inner.metrics, &actions, &notices);
        if !actions.is_empty() || !notices.is_empty() {
            let _ = self.inner.outbox_tx.send(Batch { actions, notices });
        }
        drop(s);
        self.inner.metrics.lock_held(held.elapsed().as_secs_f64());
        // The records written are freed after the lock.
        drop((own, dispatched));
        (r, persisted)
    }

    /// Read-only look at the scheduler.
    pub fn read_sched<R>(&self, f: impl FnOnce(&Scheduler) -> R) -> R {
        f(&lock(&self.inner.sched))
    }

    /// The state database (a clone of the handle: read it without the lock).
    pub fn store(&self) -> Store {
        self.inner.store.clone()
    }

    /// Add a derivation graph: what is shared is looked up under the
    /// scheduler lock, the new builds' ids, records and writes are made
    /// outside it, and the lock is held again only to insert them, so a big
    /// graph does not stall builder sessions. Not flushed yet.
    pub async fn submit_graph(&self, g: GraphSubmission) -> Result<SubmissionId, StateError> {
        let (q, g) = tokio::task::spawn_blocking(move || (PlanQuery::new(&g), g))
            .await
            .map_err(|e| StateError::Task(format!("planning the submission: {e}")))?;
        let plan = self.read_sched(|s| s.share_plan(&q));
        let store = self.store();
        let now = now_ms();
        let prep_store = store.clone();
        let (prepared, ahead) = tokio::task::spawn_blocking(move || {
            drop(q);
            crate::domain::persist::prepare_submission(&prep_store, g, &plan, now)
        })
        .await
        .map_err(|e| StateError::Task(format!("preparing the submission: {e}")))??;
        // (The insert's scratch, `ins.leftovers`, is freed here, after the lock.)
        let (ins, persisted) =
            self.with_sched_persisted(|s, now| s.insert_submission(prepared, now));
        self.inner.metrics.submitted();
        if !ins.discard.is_empty() {
            let discard = ins.discard;
            tokio::task::spawn_blocking(move || ahead.discard(&store, &discard))
                .await
                .map_err(|e| StateError::Task(format!("discarding unused builds: {e}")))??;
        }
        persisted.map(|()| ins.sid)
    }

    /// Every named job, by name (read off the runtime).
    pub async fn jobs(&self) -> Result<Vec<crate::domain::jobs::JobRecord>, StateError> {
        let store = self.store();
        tokio::task::spawn_blocking(move || store.jobs())
            .await
            .map_err(|e| StateError::Task(format!("reading the jobs: {e}")))?
    }

    /// One named job, if recorded (read off the runtime).
    pub async fn job(
        &self,
        name: &str,
    ) -> Result<Option<crate::domain::jobs::JobRecord>, StateError> {
        let (store, name) = (self.store(), name.to_owned());
        tokio::task::spawn_blocking(move || store.get_job(&name))
            .await
            .map_err(|e| StateError::Task(format!("reading a job: {e}")))?
    }

    /// What the alerts look at now: the builders (one short look under the
    /// scheduler lock), the watched jobs (read off the runtime), the cache's
    /// size and the state's flush counters.
    pub async fn alert_observation(
        &self,
        watched: &std::collections::BTreeSet<String>,
    ) -> crate::domain::alerts::Observation {
        use crate::domain::alerts::{BuilderObs, JobObs, Observation, Verdict};
        use crate::domain::jobs::JobState;
        let builders = self.read_sched(|s| s.builders());
        let builders = builders
            .into_iter()
            .map(|b| {
                // A builder that has not reported its load yet reports zeros.
                let reported =
                    b.online && (b.load.disk_free_bytes > 0 || b.load.memory_available_bytes > 0);
                BuilderObs {
                    online: b.online,
                    draining: b.record.draining,
                    last_seen_ms: b.record.last_seen_ms,
                    disk_free_bytes: reported.then_some(b.load.disk_free_bytes),
                    memory_available_bytes: reported.then_some(b.load.memory_available_bytes),
                    name: b.record.name,
                }
            })
            .collect();
        let store = self.store();
        let names: Vec<String> = watched.iter().cloned().collect();
        let jobs = tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .map(|name| {
                    let rec = match store.get_job(&name) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(job = %name, error = %e, "cannot read a watched job");
                            None
                        }
                    };
                    let runs = rec.map(|r| r.runs).unwrap_or_default();
                    let mut judged = runs
                        .iter()
                        .filter(|r| matches!(r.state, JobState::Succeeded | JobState::Failed));
                    let newest = judged.next();
                    JobObs {
                        verdict: newest.map(|r| match r.state {
                            JobState::Succeeded => Verdict::Passing,
                            _ => Verdict::Failing,
                        }),
                        submission: newest.map(|r| r.submission),
                        passed_before: judged.any(|r| r.state == JobState::Succeeded),
                        name,
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        Observation {
            builders,
            jobs,
            cache_stored_bytes: self.cache().sizes().1,
            flush: self.store().flush_stats(),
        }
    }

    /// A build's view: from the scheduler, else (a finished build no longer
    /// in memory) from the store, read after the lock is released.
    pub fn build_view(&self, id: BuildId) -> Option<Arc<BuildView>> {
        let view = self.read_sched(|s| s.build_view(id));
        let store = self.store();
        view.or_else(|| store.get_build(id).ok().flatten().map(Arc::new))
    }

    /// The latest build of a derivation, in memory or in the store's log index.
    pub fn build_of_drv(&self, drv: &farm_nix::store_path::StorePath) -> Option<BuildId> {
        let id = self.read_sched(|s| s.build_of_drv(drv));
        let store = self.store();
        id.or_else(|| store.build_of_drv(&drv.base_name()).ok().flatten())
    }

    /// A submission and a view of each of its builds. An unfinished one comes
    /// from the scheduler (views are shared, not copied); a finished one, and
    /// builds not in memory, from the store after the lock is released.
    pub async fn submission(&self, sid: SubmissionId) -> Option<SubmissionSnapshot> {
        let found = self.read_sched(|s| s.submission_view(sid));
        let store = self.store();
        match found {
            Some(((sub, mut builds), missing)) if missing.is_empty() => {
                builds.sort_by_key(|b| b.id);
                Some((sub, builds))
            }
            Some(((sub, mut builds), missing)) => {
                let more = tokio::task::spawn_blocking(move || read_builds(&store, &missing))
                    .await
                    .ok()?;
                builds.extend(more);
                builds.sort_by_key(|b| b.id);
                Some((sub, builds))
            }
            None => tokio::task::spawn_blocking(move || {
                let sub = store.get_submission(sid).ok().flatten()?;
                let ids: Vec<BuildId> = sub.builds.iter().copied().collect();
                Some((Arc::new(sub), read_builds(&store, &ids)))
            })
            .await
            .ok()
            .flatten(),
        }
    }

    /// Whether a submission exists (in memory, else recorded; nothing is read
    /// but the key).
    pub fn submission_known(&self, sid: SubmissionId) -> bool {
        let in_memory = self.read_sched(|s| !s.submission_done(sid));
        let store = self.store();
        in_memory || store.has_submission(sid).unwrap_or(false)
    }

    /// Prune the state's finished history past `retention`, every `period`,
    /// in batches off the scheduler lock (and old builder records, under it:
    /// there are few). Runs until the coordinator stops.
    pub async fn pruner(self, retention: Retention, period: Duration) {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.prune_once(&retention).await;
        }
    }

    /// One pruning round (see [`Coordinator::pruner`]); returns what went.
    pub async fn prune_once(&self, retention: &Retention) -> crate::domain::state::Pruned {
        let builders = self.forget_old_builders(retention);
        let store = self.store();
        let r = retention.clone();
        let total = tokio::task::spawn_blocking(move || {
            let mut total = crate::domain::state::Pruned::default();
            loop {
                match store.prune(&r, &KeepNothing, now_ms(), PRUNE_BATCH) {
                    Ok(p) => {
                        total.submissions += p.submissions;
                        total.builds += p.builds;
                        total.log_entries += p.log_entries;
                        if !p.more {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "pruning the state database failed");
                        break;
                    }
                }
                std::thread::yield_now();
            }
            total
        })
        .await
        .unwrap_or_default();
        if total.submissions > 0 || !builders.is_empty() {
            tracing::info!(
                submissions = total.submissions,
                builds = total.builds,
                log_entries = total.log_entries,
                builders = builders.len(),
                "pruned finished history past the retention"
            );
        }
        total
    }

    /// Carry out one batch of the scheduler's decisions (the state that
    /// records them is already flushed when they need it: see [`run_outbox`]).
    fn carry_out(&self, actions: Vec<Action>) {
        let mut lost: Vec<(String, String)> = Vec::new();
        let mut too_big: Vec<(String, String, usize, usize)> = Vec::new();
        for a in actions {
            match a {
                Action::Dispatch(job) => {
                    self.open_live_log(job.build);
                    let builder = job.builder.clone();
                    let job_id = job.job_id.clone();
                    // A message past the builder's decoding limit would end its
                    // whole session; the link refuses it and this build fails.
                    match self.send_to(&builder, BuilderCommand::Job(job)) {
                        Ok(()) => {}
                        Err(LinkError::TooLarge { len, limit }) => {
                            too_big.push((builder, job_id, len, limit))
                        }
                        Err(LinkError::Closed) => lost.push((builder, job_id)),
                    }
                }
                Action::Cancel { builder, job_id } => {
                    let _ = self.send_to(&builder, BuilderCommand::Cancel { job_id });
                }
                Action::Drain { builder, draining } => {
                    let _ = self.send_to(&builder, BuilderCommand::Drain { draining });
                }
                Action::Prepare { build } => self.spawn_prepare(build),
                Action::BuildEnded { build } => self.spawn_build_ended(build),
            }
        }
        for (builder, job, len, limit) in too_big {
            tracing::warn!(%builder, %job, len, "job too large to send");
            self.with_sched(|s, now| {
                s.job_ended(
                    &builder,
                    &job,
                    JobEnd::Failed(format!(
                        "the job (its .drv and input paths) is {len} bytes encoded, over the farm's \
                         {limit} byte message limit"
                    )),
                    now,
                )
            });
        }
        for (builder, job) in lost {
            tracing::warn!(%builder, %job, "could not send a job to its builder");
            self.with_sched(|s, now| {
                s.job_ended(
                    &builder,
                    &job,
                    JobEnd::Transient(format!("could not send the job to {builder}")),
                    now,
                )
            });
        }
    }

    fn send_to(&self, builder: &str, command: BuilderCommand) -> Result<(), LinkError> {
        let link = lock(&self.inner.sessions)
            .by_name
            .get(builder)
            .map(|s| s.link.clone());
        match link {
            Some(link) => link.send(command),
            None => Err(LinkError::Closed),
        }
    }

    /// Resolve a build's input closure (from the cache), then make it
    /// runnable: queued, and worked by at most [`PREPARE_WORKERS`] tasks in
    /// the order asked.
    fn spawn_prepare(&self, build: BuildId) {
        let mut q = lock(&self.inner.prepares);
        q.waiting.push_back(build);
        if q.workers >= PREPARE_WORKERS {
            return;
        }
        q.workers += 1;
        drop(q);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                // Taken and, when none is left, the worker counted out under
                // the same lock as the push: no id is left without a worker.
                let next = {
                    let mut q = lock(&this.inner.prepares);
                    let next = q.waiting.pop_front();
                    if next.is_none() {
                        q.workers -= 1;
                    }
                    next
                };
                let Some(build) = next else { break };
                // A task of its own, so a panic fails this build, not the worker.
                let c = this.clone();
                let r = match tokio::spawn(async move { c.prepare(build).await }).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("resolving its inputs failed: {e}")),
                };
                this.with_sched(|s, now| match r {
                    Ok(Prepared::Ready(inputs)) => s.set_ready(build, inputs),
                    Ok(Prepared::Cached) => s.set_cached(build, now),
                    Err(e) => s.prepare_failed(build, e, now),
                });
            }
        });
    }

    // ───────────────────────────── builder sessions ─────────────────────────────

    /// An authenticated builder's session begins. Returns its connection
    /// number, session token and whether it is drained; or, when `name` is
    /// bound to another key (other than `replaces`, a key the caller found no
    /// longer enrolled), that it is taken: checked and bound under the
    /// scheduler lock in one step, so two keys racing for a new name cannot
    /// both get it.
    pub fn builder_online(
        &self,
        name: &str,
        public_key: &str,
        replaces: Option<&str>,
        caps: Capabilities,
        running_jobs: &[String],
        link: Arc<dyn BuilderLink>,
    ) -> Result<(u64, String, bool), crate::domain::scheduler::NameTaken> {
        let token = random_token();
        // Register the session before the scheduler can dispatch to it.
        let mut sessions = lock(&self.inner.sessions);
        let (conn, draining) = {
            let mut s = lock(&self.inner.sched);
            let joined =
                s.builder_join(name, public_key, replaces, caps, running_jobs, now_ms())?;
            // Its record now; its actions go with the next batch (`kick`).
            let _ = self.inner.store.apply_all(&s.take_writes());
            joined
        };
        let session = Session {
            conn,
            token: token.clone(),
            link,
        };
        if let Some(old) = sessions.by_name.insert(name.to_owned(), session) {
            sessions.by_token.remove(&old.token);
        }
        sessions.by_token.insert(token.clone(), name.to_owned());
        Ok((conn, token, draining))
    }

    /// Remove builder records not seen within `retention` (see [`Retention`]).
    pub fn forget_old_builders(&self, retention: &Retention) -> Vec<String> {
        self.with_sched(|s, now| s.forget_builders(now, retention.builder_ms))
    }

    /// Run the scheduler after a builder came online (called once `Welcome` is sent).
    pub fn kick(&self) {
        self.with_sched(|_, _| ());
        self.inner.kick.notify_one();
    }

    /// The builder's stream ended.
    pub fn builder_offline(&self, name: &str, conn: u64) {
        {
            let mut sessions = lock(&self.inner.sessions);
            if sessions.by_name.get(name).is_some_and(|s| s.conn == conn)
                && let Some(s) = sessions.by_name.remove(name)
            {
                sessions.by_token.remove(&s.token);
            }
        }
        self.with_sched(|s, now| s.builder_disconnected(name, conn, now));
    }

    /// Whether a builder with this name is connected now, and with which key.
    pub fn connected_key(&self, name: &str) -> Option<String> {
        let online = lock(&self.inner.sessions).by_name.contains_key(name);
        if !online {
            return None;
        }
        self.read_sched(|s| s.builder_key(name).map(|(k, _)| k))
    }

    /// The key a builder of this name last joined with, online or not.
    pub fn known_key(&self, name: &str) -> Option<String> {
        self.read_sched(|s| s.builder_key(name).map(|(k, _)| k))
    }

    /// The builder a data-call session token belongs to.
    pub fn session_builder(&self, token: &str) -> Option<String> {
        lock(&self.inner.sessions).by_token.get(token).cloned()
    }

    /// A load report.
    pub fn builder_load(&self, name: &str, load: Load) {
        self.with_sched(|s, now| s.builder_load(name, load, now));
    }

    /// A builder reports it started a job: the dispatch latency is observed.
    pub fn job_started(&self, builder: &str, job: &str) {
        if let Some(waited) = self.with_sched(|s, _| s.job_started(builder, job)) {
            self.inner.metrics.job_started(waited.as_secs_f64());
        }
    }

    /// Log bytes of a running job.
    pub fn job_log(&self, builder: &str, job: &str, data: &[u8]) {
        let Some(build) = self.read_sched(|s| s.running_job(builder, job)) else {
            return;
        };
        // A job that survived a coordinator restart has no buffer yet.
        let live = lock(&self.inner.logs).entry(build).or_default().clone();
        {
            let mut l = lock(&live);
            l.push(data);
            drop(l);
            self.inner.log_notify.notify_waiters();
        }
    }

    /// Periodic scheduler work; runs until the coordinator stops.
    pub async fn ticker(self, period: Duration) {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.with_sched(|s, now| s.tick(now));
        }
    }
}

/// Carry out the scheduler's decisions in the order they were made. Every
/// decision is written to sled under the scheduler lock; a batch that sends a
/// job (its attempt number must be on disk, or a crash would reissue the same
/// job id) or reports a build's or a submission's end waits for a state flush
/// first. Batches queued meanwhile share that flush (group commit). Without
/// such a batch, the state is still flushed soon, off the delivery path.
/// Ends with the coordinator.
async fn run_outbox(inner: std::sync::Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Batch>) {
    while let Some(first) = rx.recv().await {
        let mut batches = vec![first];
        while let Ok(more) = rx.try_recv() {
            batches.push(more);
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let coord = Coordinator { inner };
        let store = coord.store();
        let must_flush = batches.iter().any(|b| {
            b.actions.iter().any(|a| matches!(a, Action::Dispatch(_)))
                || b.notices.iter().any(|n| {
                    matches!(
                        n.event,
                        Event::Finished { .. } | Event::SubmissionDone { .. }
                    )
                })
        });
        if must_flush {
            if let Err(e) = store.flush().await {
                tracing::error!(error = %e, "cannot flush the state database before sending jobs or results");
            }
        } else {
            tokio::spawn(async move {
                if let Err(e) = store.flush().await {
                    tracing::error!(error = %e, "cannot flush the state database");
                }
            });
        }
        for batch in batches {
            {
                let events = lock(&coord.inner.events);
                for n in batch.notices {
                    for sid in &n.submissions {
                        if let Some(tx) = events.get(sid) {
                            let _ = tx.send(n.event.clone());
                        }
                    }
                }
            }
            coord.carry_out(batch.actions);
        }
    }
}

/// What resolving a build's inputs found.
pub enum Prepared {
    /// Its input closure, in dependency order, with NAR sizes.
    Ready(Vec<(farm_nix::store_path::StorePath, u64)>),
    /// Its outputs are in the cache already.
    Cached,
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Coordinator {
    /// A builder reported a job's end. A `Built` counts only once every output
    /// is in the cache; otherwise it is a transient failure.
    pub async fn job_result(&self, builder: &str, job_id: &str, mut end: JobEnd) {
        if end == JobEnd::Built {
            let outputs = self.read_sched(|s| {
                s.running_job(builder, job_id)
                    .and_then(|id| s.build_record(id))
                    .map(|b| {
                        (
                            b.claim.clone(),
                            b.outputs.values().cloned().collect::<Vec<_>>(),
                        )
                    })
            });
            let Some((claim, outputs)) = outputs else {
                tracing::info!(builder, job = %job_id, "result for a job that is not running there; ignored");
                return;
            };
            if let Err(e) = self.verify_outputs(claim.as_deref(), &outputs).await {
                end = JobEnd::Transient(e.to_string());
            }
        }
        self.with_sched(|s, now| s.job_ended(builder, job_id, end, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through the coordinator: a graph submitted in phases, followed while
    /// in memory and (once finished and evicted) from the store, then pruned
    /// by the retention, after which it is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submissions_are_read_outside_the_lock_and_pruned_by_retention() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::CoordinatorConfig::for_tests(dir.path().join("state"));
        let running = crate::server::start(cfg).await.unwrap();
        let coord = running.coordinator().clone();
        let path = |n: &str| {
            farm_nix::store_path::StorePath::parse(&format!("/nix/store/{}-{n}", "b".repeat(32)))
                .unwrap()
        };
        let nb = |n: &str, deps: &[&str]| crate::domain::scheduler::NewBuild {
            drv_path: path(&format!("{n}.drv")),
            drv_aterm: format!("Derive-{n}").into_bytes().into(),
            system: "riscv64-linux".into(),
            required_features: Default::default(),
            outputs: [("out".to_string(), path(n))].into(),
            input_drvs: deps.iter().map(|d| path(&format!("{d}.drv"))).collect(),
            claim: None,
        };
        // No builder can take it: it ends at once, unschedulable.
        let g = GraphSubmission {
            roots: vec![path("top.drv")],
            builds: vec![nb("leaf", &[]), nb("top", &["leaf"])],
            ..Default::default()
        };
        let sid = coord.submit_graph(g).await.unwrap();
        coord.flush().await.unwrap();
        assert!(coord.read_sched(|s| s.submission_view(sid).is_none()));
        let (sub, builds) = coord.submission(sid).await.expect("read from the store");
        assert!(sub.done);
        assert_eq!(builds.len(), 2);
        assert!(builds.iter().all(|b| b.state.is_terminal()));
        let leaf = builds
            .iter()
            .find(|b| b.drv_path == path("leaf.drv"))
            .unwrap();
        assert_eq!(leaf.state, BuildState::Done(Outcome::Unschedulable));
        assert_eq!(coord.build_of_drv(&path("leaf.drv")), Some(leaf.id));
        assert!(coord.build_view(leaf.id).is_some());
        assert!(coord.submission_known(sid));
        // Retention 0: the finished submission goes with its builds.
        let pruned = coord
            .prune_once(&Retention {
                finished_submissions: 0,
                max_age_ms: None,
                builder_ms: i64::MAX,
            })
            .await;
        assert_eq!(
            (pruned.submissions, pruned.builds, pruned.log_entries),
            (1, 2, 2)
        );
        assert!(coord.submission(sid).await.is_none());
        assert!(!coord.submission_known(sid));
        assert!(coord.build_view(leaf.id).is_none());
        assert_eq!(coord.build_of_drv(&path("leaf.drv")), None);
        drop(coord);
        running.shutdown().await.unwrap();
    }

    #[test]
    fn live_log_drops_whole_chunks_past_the_cap() {
        let mut l = LiveLog::default();
        l.push_capped(b"aaaa", 10);
        l.push_capped(b"bbbb", 10);
        assert_eq!((l.dropped, l.end()), (0, 8));
        l.push_capped(b"cccc", 10);
        // 12 > 10: the oldest chunk goes, whole
        assert_eq!((l.dropped, l.end()), (4, 12));
        assert_eq!(l.read_from(0), b"bbbbcccc");
        assert_eq!(l.read_from(6), b"bbcccc");
        assert_eq!(l.read_from(9), b"ccc");
        assert_eq!(l.read_from(12), b"");
        assert_eq!(l.read_from(40), b"");
        assert_eq!(l.chunks().concat(), b"bbbbcccc");
        l.push_capped(b"", 10);
        assert_eq!(l.chunks().len(), 2);
    }
}
