//! The one follow API: what gRPC `Watch`/`Logs`, the SSH endpoint (and a
//! dashboard) read to follow the farm, as streams of domain values, with no
//! polling.
//!
//! - [`Coordinator::follow_submission`]: a snapshot of a submission, then its
//!   scheduler [`Event`]s as they happen; a follower that falls behind the
//!   broadcast gets a fresh snapshot. Ends after `SubmissionDone`.
//! - [`Coordinator::follow_log`]: a build's log: the live log while it runs
//!   (kept per build in a [`LiveLog`], created when the job is dispatched),
//!   then `Ended` once the build ended and `Stored` once its log is in the
//!   cache; for a build that ended before we looked, the stored log.
//!
//! Every wait is on a notification: the submission's broadcast channel, or the
//! coordinator's log notifier, which fires when a live log is created, grows,
//! ends or is stored, and when a build ends (whether or not it ran). Both end
//! when the coordinator stops.
//!
//! A build's live log stays visible until its log is stored, so whoever looks
//! after the build ended finds either the live log or the stored one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::domain::coordinator::{Coordinator, LiveLog};
use crate::domain::error::DomainError;
use crate::domain::lock::lock;
use crate::domain::model::{BuildId, BuildState, Event, SubmissionId};
use crate::domain::scheduler::SubmissionSnapshot;
use farm_nix::store_path::StorePath;

/// Capacity of a submission's event channel (a follower that falls further
/// behind gets a fresh snapshot).
const EVENT_CHANNEL: usize = 4096;
// ─────────────────────────────── live logs ───────────────────────────────

/// What a log follower gets, in this order: chunks, then `Ended`, then
/// `Stored`. A follower that wants only the log can stop at `Ended`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogUpdate {
    /// The next bytes of the log (all that came since the previous chunk).
    Chunk(Bytes),
    /// The build ended: every byte of its log has been sent.
    Ended,
    /// Storing the ended log was tried: whether it is in the cache now. Last.
    Stored(bool),
}

/// A build's log as a stream (see [`Coordinator::follow_log`]).
pub type LogStream = std::pin::Pin<Box<dyn Stream<Item = LogUpdate> + Send + 'static>>;

/// Whether a build in this state may still produce a live log.
fn may_run(state: &Option<BuildState>) -> bool {
    matches!(
        state,
        Some(BuildState::Waiting | BuildState::Queued | BuildState::Running { .. })
    )
}

/// The state of one log follower (driven by [`LogFollower::next`]).
struct LogFollower {
    coord: Coordinator,
    build: BuildId,
    drv: StorePath,
    follow: bool,
    /// Absolute offset into `live` (dropped bytes count).
    offset: u64,
    live: Option<Arc<Mutex<LiveLog>>>,
    ended_sent: bool,
    out: VecDeque<LogUpdate>,
    done: bool,
}

impl LogFollower {
    async fn next(&mut self) -> Option<LogUpdate> {
        loop {
            if let Some(u) = self.out.pop_front() {
                return Some(u);
            }
            if self.done {
                return None;
            }
            self.step().await;
        }
    }

    /// Queue what there is now; if nothing, wait for the next change.
    async fn step(&mut self) {
        let coord = self.coord.clone();
        // Armed before looking, so no change between the look and the wait is missed.
        let changed = coord.inner.log_notify.notified();
        let current = coord.live_log(self.build);
        match (&self.live, current) {
            (None, Some(l)) => self.live = Some(l),
            // A retry's new attempt: its log replaces the unfinished one.
            (Some(mine), Some(l)) if !Arc::ptr_eq(mine, &l) && !lock(mine).ended => {
                self.live = Some(l);
                self.offset = 0;
            }
            _ => {}
        }
        if let Some(live) = &self.live {
            let (chunk, ended, stored) = {
                let l = lock(live);
                let chunk = l.read_from(self.offset);
                self.offset = l.end();
                (chunk, l.ended, l.stored)
            };
            if !chunk.is_empty() {
                self.out.push_back(LogUpdate::Chunk(chunk.into()));
            }
            if ended && !self.ended_sent {
                self.ended_sent = true;
                self.out.push_back(LogUpdate::Ended);
            }
            if let Some(stored) = stored {
                self.out.push_back(LogUpdate::Stored(stored));
                self.done = true;
                return;
            }
            if !self.follow && !ended {
                self.done = true;
                return;
            }
            // Ended and being stored: wait for it, even when not following.
        } else {
            let state = coord.read_sched(|s| s.state_of(self.build));
            if !may_run(&state) {
                // It ended without a live log here (or it went, stored, between
                // the two looks): the stored log.
                self.read_stored().await;
                return;
            }
        }
        if !self.out.is_empty() {
            return;
        }
        tokio::select! {
            _ = changed => {}
            _ = coord.stopping().cancelled() => self.done = true,
        }
    }

    /// Queue the stored log of a build that is over, then the end.
    async fn read_stored(&mut self) {
        let data = match self.coord.cache().get_log(&self.drv).await {
            Ok(data) => data,
            Err(e) => {
                tracing::warn!(drv = %self.drv, error = %e, "cannot read a stored build log");
                None
            }
        };
        self.push_stored(data, true);
    }

    /// Queue a stored log from the offset (and, if `over`, the end), and finish.
    fn push_stored(&mut self, data: Option<Vec<u8>>, over: bool) {
        self.done = true;
        let stored = data.is_some();
        if let Some(data) = data {
            let data = Bytes::from(data);
            if (self.offset as usize) < data.len() {
                self.out
                    .push_back(LogUpdate::Chunk(data.slice(self.offset as usize..)));
            }
        }
        if over {
            self.out.push_back(LogUpdate::Ended);
            self.out.push_back(LogUpdate::Stored(stored));
        }
    }
}

fn no_log(drv: &StorePath) -> DomainError {
    DomainError::NotFound(format!("no log for {drv}"))
}

fn stream_of(f: LogFollower) -> LogStream {
    Box::pin(futures::stream::unfold(f, |mut f| async move {
        let u = f.next().await?;
        Some((u, f))
    }))
}

impl Coordinator {
    /// A build's log from byte `from`, as [`LogUpdate`]s. `build` is the
    /// build to follow (`None`: only a stored log of `drv`, e.g. a build the
    /// state has forgotten).
    ///
    /// With a live log: its bytes, and when `follow`, every byte after them
    /// until the build ends (`Ended`), then `Stored`; without `follow`, the
    /// bytes there are now (and the end, if it ended). A build that has no live
    /// log yet but may still run is waited for when following (it is pending,
    /// or just dispatched); a build that is over gives its stored log, then
    /// `Ended` and `Stored(true)`. [`DomainError::NotFound`] when there is
    /// nothing to read and nothing to wait for. Streams end when the coordinator stops.
    pub async fn follow_log(
        &self,
        build: Option<BuildId>,
        drv: &StorePath,
        from: u64,
        follow: bool,
    ) -> Result<LogStream, DomainError> {
        let mut f = LogFollower {
            coord: self.clone(),
            build: build.unwrap_or_default(),
            drv: drv.clone(),
            follow,
            offset: from,
            live: None,
            ended_sent: false,
            out: VecDeque::new(),
            done: false,
        };
        if let Some(build) = build {
            if let Some(live) = self.live_log(build) {
                f.live = Some(live);
                return Ok(stream_of(f));
            }
            let state = self.read_sched(|s| s.state_of(build));
            if follow && may_run(&state) {
                return Ok(stream_of(f));
            }
            if may_run(&state) {
                // Not running yet (or no bytes since a restart): whatever an
                // earlier build of the derivation stored, without an end.
                let data = self.cache().get_log(drv).await?;
                let data = data.ok_or_else(|| no_log(drv))?;
                f.push_stored(Some(data), false);
                return Ok(stream_of(f));
            }
        }
        // Over (or unknown here): the stored log.
        let data = self.cache().get_log(drv).await?;
        let data = data.ok_or_else(|| no_log(drv))?;
        f.push_stored(Some(data), true);
        Ok(stream_of(f))
    }

    /// The live log of a build that is running (or ended, until its log is stored).
    pub(crate) fn live_log(&self, build: BuildId) -> Option<Arc<Mutex<LiveLog>>> {
        lock(&self.inner.logs).get(&build).cloned()
    }

    /// A job was dispatched: a fresh live log for its build (a retry's
    /// replaces the unfinished one; its followers move to it).
    pub(crate) fn open_live_log(&self, build: BuildId) {
        lock(&self.inner.logs).insert(build, Arc::new(Mutex::new(LiveLog::default())));
        self.inner.log_notify.notify_waiters();
    }

    /// A build ended: mark its live log ended, store it, mark it stored, and
    /// only then forget it (so a late follower finds the live or the stored
    /// log, never neither). Followers are woken at each step, also when the
    /// build never ran (a pending follower then reads the stored log).
    pub(crate) fn spawn_build_ended(&self, build: BuildId) {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(live) = this.live_log(build) else {
                this.inner.log_notify.notify_waiters();
                return;
            };
            // The chunks are shared, not copied, under the lock.
            let chunks = {
                let mut l = lock(&live);
                l.ended = true;
                l.chunks()
            };
            this.inner.log_notify.notify_waiters();
            let stored = this.store_log(build, chunks.concat()).await;
            lock(&live).stored = Some(stored);
            {
                let mut logs = lock(&this.inner.logs);
                if logs.get(&build).is_some_and(|l| Arc::ptr_eq(l, &live)) {
                    logs.remove(&build);
                }
            }
            this.inner.log_notify.notify_waiters();
        });
    }
}

impl Coordinator {
    /// Resolves at the next change of a build (dispatched, its log grew, it
    /// ended, its log was stored) or when the coordinator stops: what a
    /// follower of the whole farm (the dashboard) waits on between looks.
    /// Armed when called, before it is first polled: call it, then look,
    /// then await it, and no change after the call is missed.
    pub fn farm_changed(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        let notified = self.inner.log_notify.notified();
        let stop = self.stopping().cancelled();
        async move {
            tokio::select! {
                _ = notified => {}
                _ = stop => {}
            }
        }
    }
}

// ─────────────────────────────── submissions ───────────────────────────────

/// What a submission follower gets.
#[derive(Debug, Clone)]
pub enum SubmissionUpdate {
    /// The submission as it stands, on disk: first, and again after the
    /// follower fell behind (events before it are superseded). When it is
    /// done, it is the last item.
    Snapshot(SubmissionSnapshot),
    /// What happened next; `SubmissionDone` is the last item. An event may
    /// repeat what the snapshot before it shows (decided before the snapshot
    /// was read, delivered after its state was flushed); none is missed.
    Event(Event),
    /// The submission is not known (never was, or pruned). Last.
    Unknown,
}

/// A follower's subscription; dropping it drops the channel if it was the last.
struct SubmissionFollower {
    coord: Coordinator,
    sid: SubmissionId,
    /// `None`: subscribe and snapshot next.
    rx: Option<broadcast::Receiver<Event>>,
    done: bool,
}

impl SubmissionFollower {
    async fn next(&mut self) -> Option<SubmissionUpdate> {
        if self.done {
            return None;
        }
        let Some(rx) = self.rx.as_mut() else {
            return Some(self.snapshot().await);
        };
        let next = tokio::select! {
            e = rx.recv() => e,
            _ = self.coord.stopping().cancelled() => Err(RecvError::Closed),
        };
        match next {
            Ok(e) => {
                self.done = matches!(e, Event::SubmissionDone { .. });
                Some(SubmissionUpdate::Event(e))
            }
            Err(RecvError::Lagged(_)) => {
                self.rx = None;
                Some(self.snapshot().await)
            }
            Err(RecvError::Closed) => {
                self.done = true;
                None
            }
        }
    }

    /// Subscribe (first, so nothing after the snapshot is missed), then the snapshot.
    async fn snapshot(&mut self) -> SubmissionUpdate {
        self.rx = Some(self.coord.subscribe(self.sid));
        // The snapshot reports only what is on disk.
        if let Err(e) = self.coord.flush().await {
            tracing::error!(error = %e, "cannot flush the state database");
        }
        match self.coord.submission(self.sid).await {
            Some(snap) => {
                self.done = snap.0.done;
                SubmissionUpdate::Snapshot(snap)
            }
            None => {
                self.done = true;
                SubmissionUpdate::Unknown
            }
        }
    }
}

impl Drop for SubmissionFollower {
    fn drop(&mut self) {
        if self.rx.take().is_some() {
            self.coord.unsubscribe(self.sid);
        }
    }
}

impl Coordinator {
    /// Follow a submission: a [`SubmissionUpdate::Snapshot`], then its events
    /// until `SubmissionDone` (a fresh snapshot whenever the follower fell
    /// behind). Ends after the last item or when the coordinator stops.
    pub fn follow_submission(
        &self,
        sid: SubmissionId,
    ) -> impl Stream<Item = SubmissionUpdate> + Send + 'static {
        let f = SubmissionFollower {
            coord: self.clone(),
            sid,
            rx: None,
            done: false,
        };
        futures::stream::unfold(f, |mut f| async move {
            let u = f.next().await?;
            Some((u, f))
        })
    }

    /// Subscribe to a submission's events.
    fn subscribe(&self, sid: SubmissionId) -> broadcast::Receiver<Event> {
        let mut events = lock(&self.inner.events);
        events
            .entry(sid)
            .or_insert_with(|| broadcast::channel(EVENT_CHANNEL).0)
            .subscribe()
    }

    /// Drop a submission's event channel if nobody listens any more.
    fn unsubscribe(&self, sid: SubmissionId) {
        let mut events = lock(&self.inner.events);
        if events.get(&sid).is_some_and(|tx| tx.receiver_count() == 0) {
            events.remove(&sid);
        }
    }
}

#[cfg(test)]
mod tests;
