//! The scheduler's decisions onto the state where a plain [`Write`] under the
//! lock would not do: a submission's new builds, written ahead outside the
//! scheduler lock (a big graph's records are most of its cost), and their
//! removal when a concurrent submission made some unnecessary. Every other
//! change the caller of the scheduler applies in order, under its lock
//! ([`Store::apply_all`]; see `Coordinator::with_sched`).
//!
//! [`Write`]: crate::domain::model::Write

use std::collections::HashMap;

use crate::domain::model::{BuildId, SubmissionId};
use crate::domain::scheduler::{
    GraphSubmission, PlanQuery, PreparedSubmission, Scheduler, SharePlan,
};
use crate::domain::state::{StateError, Store, Written};

/// A submission's new builds are flushed after every this many bytes written
/// (and at the end, when they were more), before the lock is taken to insert them.
const BIG_WRITE: usize = 4 << 20;

/// The new builds of a prepared submission, as written ahead, and what each
/// replaced in the log index (to restore should the build be discarded).
pub struct Ahead {
    written: HashMap<BuildId, Written>,
}

impl Ahead {
    /// Remove the builds the insert found unnecessary (`Inserted::discard`);
    /// blocking, after the lock.
    pub fn discard(&self, store: &Store, ids: &[BuildId]) -> Result<(), StateError> {
        let gone: Vec<Written> = ids
            .iter()
            .filter_map(|id| self.written.get(id).cloned())
            .collect();
        store.discard_new_builds(&gone)
    }
}

/// New builds' records written per [`Store::put_new_builds`] call: sled
/// 0.34 keeps the nodes and write buffers of a batch in memory until it is
/// applied, so one batch of a 100 000-build submission held over a gigabyte
/// (docs/performance.md, "Coordinator memory with 100k queued").
pub(crate) const NEW_BUILDS_BATCH: usize = 2000;

/// Prepare a submission ([`Scheduler::prepare_submission`], ids from the
/// store) and write its new builds' records ahead, [`NEW_BUILDS_BATCH`] at a
/// time, each batch encoded just before it is written: blocking, outside the
/// scheduler lock. A failed write leaves none of them behind; a crash in the
/// middle leaves records no recorded submission lists (the submission's own
/// record is written under the lock, after all of them), which the next
/// start drops ([`Store::load`]).
pub fn prepare_submission(
    store: &Store,
    g: GraphSubmission,
    plan: &SharePlan,
    now: i64,
) -> Result<(PreparedSubmission, Ahead), StateError> {
    let mut prepared = Scheduler::prepare_submission(g, plan, now, || store.next_id())?;
    let encoded = Store::encode(prepared.record())?;
    let written = write_ahead(store, &prepared)?;
    prepared.written_ahead(encoded);
    Ok((prepared, Ahead { written }))
}

/// Write `prepared`'s new builds in batches; on a failure, remove every one
/// written so far (and the failed batch's) before returning it.
fn write_ahead(
    store: &Store,
    prepared: &PreparedSubmission,
) -> Result<HashMap<BuildId, Written>, StateError> {
    let mut written: HashMap<BuildId, Written> = HashMap::new();
    let mut batch: Vec<(BuildId, String, Vec<u8>)> = Vec::with_capacity(NEW_BUILDS_BATCH);
    if let Err(e) = write_batches(store, prepared, &mut written, &mut batch) {
        // The failed batch's log index entries, if any were made, are
        // removed without restoring what they replaced (unknown).
        let mut all: Vec<Written> = written.into_values().collect();
        all.extend(batch.iter().map(|(id, base, _)| Written {
            id: *id,
            drv_base_name: base.clone(),
            previous_log_entry: None,
        }));
        let _ = store.discard_new_builds(&all);
        return Err(e);
    }
    Ok(written)
}

/// [`write_ahead`]'s loop: what it wrote is in `written`, the batch being
/// written (if one failed) in `batch`.
fn write_batches(
    store: &Store,
    prepared: &PreparedSubmission,
    written: &mut HashMap<BuildId, Written>,
    batch: &mut Vec<(BuildId, String, Vec<u8>)>,
) -> Result<(), StateError> {
    let mut new_builds = prepared.new_builds();
    let (mut bytes, mut unflushed) = (0usize, 0usize);
    loop {
        batch.clear();
        for r in new_builds.by_ref().take(NEW_BUILDS_BATCH) {
            batch.push((r.id, r.drv_path.base_name(), Store::encode(r)?));
        }
        if batch.is_empty() {
            break;
        }
        let size: usize = batch.iter().map(|(_, _, b)| b.len()).sum();
        let done = store.put_new_builds(batch)?;
        written.extend(done.into_iter().map(|w| (w.id, w)));
        batch.clear();
        bytes += size;
        unflushed += size;
        // Let sled write out what a big submission wrote so far: its buffers
        // stay small, and the few writes made under the lock do not wait
        // behind it.
        if unflushed > BIG_WRITE {
            store.flush_blocking()?;
            unflushed = 0;
        }
    }
    if bytes > BIG_WRITE && unflushed > 0 {
        store.flush_blocking()?;
    }
    Ok(())
}

/// A whole submission in one call on a scheduler the caller holds: planned,
/// prepared and written ahead, inserted, then every write the scheduler holds
/// applied and unused builds discarded (tests, benchmarks; the coordinator
/// splits this around its lock in `Coordinator::submit_graph`). Not flushed.
pub fn submit(
    s: &mut Scheduler,
    store: &Store,
    g: GraphSubmission,
    now: i64,
) -> Result<SubmissionId, StateError> {
    let plan = s.share_plan(&PlanQuery::new(&g));
    let (prepared, ahead) = prepare_submission(store, g, &plan, now)?;
    let ins = s.insert_submission(prepared, now);
    let persisted = store.apply_all(&s.take_writes());
    ahead.discard(store, &ins.discard)?;
    persisted.map(|()| ins.sid)
}
