//! What handlers read: in memory only, shared views rather than copies;
//! the coordinator falls back to the store, outside the lock, for the rest.

use super::*;

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

/// One class of the queue (see [`Scheduler::queue_classes`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueClass {
    pub runnable: u32,
    pub waiting: u32,
    pub oldest_runnable_secs: f64,
}

/// An unfinished submission's progress (the dashboard).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubmissionProgress {
    pub id: SubmissionId,
    pub job: Option<String>,
    pub client: Option<String>,
    pub created_ms: i64,
    /// Derivations in its graph (builds and those already cached).
    pub total: u32,
    pub built: u32,
    pub cached: u32,
    pub failed: u32,
    pub running: u32,
    /// Waiting or queued.
    pub pending: u32,
}

/// A submission as followers see it: its record and a view of each build.
pub type SubmissionSnapshot = (Arc<SubmissionRecord>, Vec<Arc<BuildView>>);

impl Scheduler {
    /// A build's record, if it is in memory.
    pub fn build_record(&self, id: BuildId) -> Option<&BuildRecord> {
        self.builds.get(&id).map(|b| &*b.rec)
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

    /// The unfinished submissions' progress, oldest first.
    pub fn submissions_progress(&self) -> Vec<SubmissionProgress> {
        let mut v: Vec<SubmissionProgress> = self
            .submissions
            .values()
            .filter(|s| !s.done)
            .map(|s| {
                let mut p = SubmissionProgress {
                    id: s.id,
                    job: s.job.clone(),
                    client: s.client.clone(),
                    created_ms: s.created_ms,
                    total: (s.builds.len() + s.cached.len()) as u32,
                    cached: s.cached.len() as u32,
                    ..Default::default()
                };
                for id in &s.builds {
                    match self.builds.get(id).map(|b| &b.rec.state) {
                        Some(BuildState::Waiting | BuildState::Queued) => p.pending += 1,
                        Some(BuildState::Running { .. }) => p.running += 1,
                        Some(BuildState::Done(Outcome::Built)) => p.built += 1,
                        Some(BuildState::Done(Outcome::Cached)) => p.cached += 1,
                        Some(BuildState::Done(_)) => p.failed += 1,
                        None => {}
                    }
                }
                p
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Whether the submission is finished (or unknown).
    pub fn submission_done(&self, sid: SubmissionId) -> bool {
        self.submissions.get(&sid).is_none_or(|s| s.done)
    }

    /// Every known builder.
    pub fn builders(&self) -> Vec<BuilderView> {
        let mut v: Vec<BuilderView> = self
            .entries()
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
        self.entry(name)
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

    /// The queue by class (system, required features): per class, the
    /// runnable builds, the builds waiting for dependencies or inputs, and
    /// how long the oldest runnable one has waited (seconds).
    pub fn queue_classes(&self) -> BTreeMap<(String, BTreeSet<String>), QueueClass> {
        let mut m: BTreeMap<(String, BTreeSet<String>), QueueClass> = BTreeMap::new();
        for (class, q) in &self.ready {
            let oldest = q
                .iter()
                .filter_map(|k| self.builds.get(&k.id)?.runnable_at)
                .map(|t| t.elapsed().as_secs_f64())
                .fold(0.0, f64::max);
            let e = m
                .entry((class.system.clone(), class.features.clone()))
                .or_default();
            e.runnable = q.len() as u32;
            e.oldest_runnable_secs = oldest;
        }
        for b in self.builds.values() {
            if b.rec.state == BuildState::Waiting {
                m.entry((b.rec.system.clone(), b.rec.required_features.clone()))
                    .or_default()
                    .waiting += 1;
            }
        }
        m
    }

    /// Running builds.
    pub fn running(&self) -> Vec<Arc<BuildView>> {
        let mut v: Vec<Arc<BuildView>> = self
            .entries()
            .flat_map(|e| e.running.iter())
            .filter_map(|id| self.builds.get(id))
            .filter(|b| matches!(b.rec.state, BuildState::Running { .. }))
            .map(|b| b.view.clone())
            .collect();
        v.sort_by_key(|b| b.id);
        v.dedup_by_key(|b| b.id);
        v
    }

    /// Builds put back in the queue since this scheduler started.
    pub fn requeues(&self) -> u64 {
        self.requeues
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
