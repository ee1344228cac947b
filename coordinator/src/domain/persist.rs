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

/// Writes past this size are flushed before the lock is taken to insert them.
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

/// Prepare a submission ([`Scheduler::prepare_submission`], ids from the
/// store) and write its new builds' records ahead: blocking, outside the
/// scheduler lock. A failed write leaves none of them behind.
pub fn prepare_submission(
    store: &Store,
    g: GraphSubmission,
    plan: &SharePlan,
    now: i64,
) -> Result<(PreparedSubmission, Ahead), StateError> {
    let mut prepared = Scheduler::prepare_submission(g, plan, now, || store.next_id())?;
    let records = prepared
        .new_builds()
        .map(|r| Ok((r.id, r.drv_path.base_name(), Store::encode(r)?)))
        .collect::<Result<Vec<_>, StateError>>()?;
    let encoded = Store::encode(prepared.record())?;
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
    prepared.written_ahead(encoded);
    let written = written.into_iter().map(|w| (w.id, w)).collect();
    Ok((prepared, Ahead { written }))
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
