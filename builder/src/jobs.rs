//! The job manager: accepts jobs from the session, runs up to max-jobs of them at
//! once through an [`Execute`] backend, cancels them on request, refuses new ones
//! while draining, and turns what they do into [`Event`]s the session forwards to
//! the coordinator. Jobs outlive a session: a reconnect does not touch them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use farm_proto::v1::{Job, JobResult, JobStatus};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::link::Link;

/// Something a job did that the coordinator should hear about.
#[derive(Debug)]
pub(crate) enum Event {
    /// The job got a slot and began.
    Started(String),
    /// Log bytes of a job, in order.
    Log(String, Bytes),
    /// The job is over.
    Result(JobResult),
}

/// Why a job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The coordinator cancelled it.
    Cancelled,
    /// The builder is shutting down.
    Shutdown,
}

/// A job's stop switch, with the reason it was pulled.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    token: CancellationToken,
    reason: Arc<OnceLock<CancelReason>>,
}

impl Cancel {
    /// Ask the job to stop (the first reason sticks).
    pub fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Resolves once the job is asked to stop.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// Why the job was asked to stop, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.token.is_cancelled().then(|| {
            self.reason
                .get()
                .copied()
                .unwrap_or(CancelReason::Cancelled)
        })
    }
}

/// What a running job gets to work with.
#[derive(Clone)]
pub struct JobContext {
    /// The stop switch.
    pub cancel: Cancel,
    /// Where events go.
    pub(crate) events: mpsc::Sender<Event>,
    /// The current coordinator link (None while disconnected), for data calls.
    pub(crate) link: watch::Receiver<Option<Link>>,
}

/// Runs one job to its result. The result's job id, start and stop time are
/// filled in by the manager when the backend leaves them zero.
pub trait Execute: Send + Sync + 'static {
    /// Run `job`; must return promptly once `ctx.cancel` fires.
    fn execute(&self, job: Job, ctx: JobContext) -> impl Future<Output = JobResult> + Send;

    /// Why this backend refuses every job now (its store is tainted), if it
    /// does; reported to the coordinator with the load.
    fn store_problem(&self) -> Option<String> {
        None
    }
}

struct Inner<E> {
    exec: E,
    running: Mutex<HashMap<String, Cancel>>,
    draining: AtomicBool,
    slots: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
    link: watch::Receiver<Option<Link>>,
    idle: tokio::sync::Notify,
}

/// The job manager (cheap to clone).
pub(crate) struct JobManager<E> {
    inner: Arc<Inner<E>>,
}

impl<E> Clone for JobManager<E> {
    fn clone(&self) -> Self {
        JobManager {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// The current Unix time in seconds.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A result with only a status and a message.
pub fn failure(job_id: &str, status: JobStatus, message: impl Into<String>) -> JobResult {
    JobResult {
        job_id: job_id.to_owned(),
        status: status as i32,
        error_message: message.into(),
        ..Default::default()
    }
}

impl<E: Execute> JobManager<E> {
    /// A manager running at most `max_jobs` jobs at once.
    pub(crate) fn new(
        exec: E,
        max_jobs: u32,
        events: mpsc::Sender<Event>,
        link: watch::Receiver<Option<Link>>,
    ) -> Self {
        let max = usize::try_from(max_jobs.max(1)).unwrap_or(1);
        JobManager {
            inner: Arc::new(Inner {
                exec,
                running: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                slots: Arc::new(Semaphore::new(max)),
                events,
                link,
                idle: tokio::sync::Notify::new(),
            }),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cancel>> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ids of the jobs accepted and not yet finished.
    pub(crate) fn running_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.running().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Why every job is refused now, if it is (see [`Execute::store_problem`]).
    pub(crate) fn store_problem(&self) -> Option<String> {
        self.inner.exec.store_problem()
    }

    /// How many jobs are accepted and not yet finished.
    pub(crate) fn running_count(&self) -> u32 {
        u32::try_from(self.running().len()).unwrap_or(u32::MAX)
    }

    /// Whether new jobs are refused.
    pub(crate) fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Start or stop draining: while draining, running jobs finish and new ones are refused.
    pub(crate) fn set_draining(&self, draining: bool) {
        let was = self.inner.draining.swap(draining, Ordering::SeqCst);
        if was != draining {
            tracing::info!(
                draining,
                running = self.running_count(),
                "drain state changed"
            );
        }
    }

    /// Accept a job: run it when a slot is free. A duplicate id is ignored; while
    /// draining, the job is answered at once with a transient failure.
    pub(crate) fn submit(&self, job: Job) {
        let id = job.job_id.clone();
        if id.is_empty() || id.len() > 1024 {
            tracing::warn!("ignoring a job with an invalid id");
            return;
        }
        if self.is_draining() {
            tracing::info!(job = %id, "refusing job: draining");
            let result = failure(&id, JobStatus::MiscFailure, "builder is draining");
            let events = self.inner.events.clone();
            tokio::spawn(async move {
                let _ = events.send(Event::Result(result)).await;
            });
            return;
        }
        let cancel = Cancel::default();
        {
            let mut running = self.running();
            if running.contains_key(&id) {
                tracing::debug!(job = %id, "job already running; ignoring duplicate");
                return;
            }
            running.insert(id.clone(), cancel.clone());
        }
        let this = self.clone();
        tokio::spawn(async move { this.run_one(job, cancel).await });
    }

    async fn run_one(self, job: Job, cancel: Cancel) {
        let id = job.job_id.clone();
        let inner = &self.inner;
        let permit = tokio::select! {
            p = Arc::clone(&inner.slots).acquire_owned() => p.ok(),
            () = cancel.cancelled() => None,
        };
        let mut result = match permit {
            None => failure(
                &id,
                status_for(cancel.reason()),
                cancel_message(cancel.reason()),
            ),
            Some(_permit) => {
                tracing::info!(job = %id, drv = %job.drv_path, "job started");
                let _ = inner.events.send(Event::Started(id.clone())).await;
                let start = now_unix();
                let ctx = JobContext {
                    cancel: cancel.clone(),
                    events: inner.events.clone(),
                    link: inner.link.clone(),
                };
                let mut r = inner.exec.execute(job, ctx).await;
                if r.start_time_unix == 0 {
                    r.start_time_unix = start;
                }
                r
            }
        };
        result.job_id = id.clone();
        if result.stop_time_unix == 0 {
            result.stop_time_unix = now_unix();
        }
        tracing::info!(
            job = %id,
            status = ?JobStatus::try_from(result.status).unwrap_or(JobStatus::Unspecified),
            error = %result.error_message,
            "job finished"
        );
        // Send the result before forgetting the job, so a reconnect in between
        // still lists it as running rather than losing it.
        let _ = inner.events.send(Event::Result(result)).await;
        let empty = {
            let mut running = self.running();
            running.remove(&id);
            running.is_empty()
        };
        if empty {
            inner.idle.notify_waiters();
        }
    }

    /// Ask a job to stop; its result says Cancelled. Unknown ids are ignored.
    pub(crate) fn cancel(&self, job_id: &str) {
        if let Some(c) = self.running().get(job_id) {
            tracing::info!(job = %job_id, "cancelling job");
            c.cancel(CancelReason::Cancelled);
        }
    }

    /// Refuse new jobs and stop every running one (builder shutdown).
    pub(crate) fn shutdown(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        for c in self.running().values() {
            c.cancel(CancelReason::Shutdown);
        }
    }

    /// Resolves when no job is running.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.running().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// The status a job stopped for `reason` reports.
pub(crate) fn status_for(reason: Option<CancelReason>) -> JobStatus {
    match reason {
        Some(CancelReason::Shutdown) => JobStatus::MiscFailure,
        _ => JobStatus::Cancelled,
    }
}

/// The message a job stopped for `reason` reports.
pub(crate) fn cancel_message(reason: Option<CancelReason>) -> &'static str {
    match reason {
        Some(CancelReason::Shutdown) => "builder shut down",
        _ => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A backend that waits until told (or cancelled), to test the manager itself.
    struct Gate {
        open: Arc<tokio::sync::Notify>,
        active: Arc<std::sync::atomic::AtomicUsize>,
        peak: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Execute for Gate {
        async fn execute(&self, job: Job, ctx: JobContext) -> JobResult {
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            let r = tokio::select! {
                () = self.open.notified() => JobResult { status: JobStatus::Built as i32, ..Default::default() },
                () = ctx.cancel.cancelled() => failure(&job.job_id, status_for(ctx.cancel.reason()), "stopped"),
            };
            self.active.fetch_sub(1, Ordering::SeqCst);
            r
        }
    }

    fn job(id: &str) -> Job {
        Job {
            job_id: id.into(),
            ..Default::default()
        }
    }

    fn setup(
        max: u32,
    ) -> (
        JobManager<Gate>,
        mpsc::Receiver<Event>,
        Arc<tokio::sync::Notify>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (tx, rx) = mpsc::channel(100);
        let (_ltx, lrx) = watch::channel(None);
        let open = Arc::new(tokio::sync::Notify::new());
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = Gate {
            open: open.clone(),
            active: Default::default(),
            peak: peak.clone(),
        };
        (JobManager::new(gate, max, tx, lrx), rx, open, peak)
    }

    async fn next_result(rx: &mut mpsc::Receiver<Event>) -> JobResult {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap()
            {
                Event::Result(r) => return r,
                _ => continue,
            }
        }
    }

    #[tokio::test]
    async fn runs_at_most_max_jobs_and_cancels_queued_and_running() {
        let (m, mut rx, open, peak) = setup(2);
        for id in ["a", "b", "c"] {
            m.submit(job(id));
        }
        m.submit(job("a")); // duplicate, ignored
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(m.running_count(), 3);
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        m.cancel("c"); // still waiting for a slot
        let r = next_result(&mut rx).await;
        assert_eq!(r.job_id, "c");
        assert_eq!(r.status, JobStatus::Cancelled as i32);
        m.cancel("a");
        let r = next_result(&mut rx).await;
        assert_eq!(
            (r.job_id.as_str(), r.status),
            ("a", JobStatus::Cancelled as i32)
        );
        open.notify_waiters();
        let r = next_result(&mut rx).await;
        assert_eq!(
            (r.job_id.as_str(), r.status),
            ("b", JobStatus::Built as i32)
        );
        assert!(r.start_time_unix > 0 && r.stop_time_unix >= r.start_time_unix);
        tokio::time::timeout(Duration::from_secs(5), m.wait_idle())
            .await
            .unwrap();
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn draining_finishes_running_jobs_and_refuses_new_ones() {
        let (m, mut rx, open, _) = setup(4);
        m.submit(job("a"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        m.set_draining(true);
        m.submit(job("b"));
        let r = next_result(&mut rx).await;
        assert_eq!(
            (r.job_id.as_str(), r.status),
            ("b", JobStatus::MiscFailure as i32)
        );
        assert_eq!(m.running_ids(), ["a"]);
        open.notify_waiters();
        let r = next_result(&mut rx).await;
        assert_eq!(
            (r.job_id.as_str(), r.status),
            ("a", JobStatus::Built as i32)
        );
        m.set_draining(false);
        m.submit(job("c"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(m.running_ids(), ["c"]);
        m.shutdown();
        let r = next_result(&mut rx).await;
        assert_eq!(
            (r.job_id.as_str(), r.status),
            ("c", JobStatus::MiscFailure as i32)
        );
    }
}
