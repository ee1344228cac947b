//! A named job's run as its submission is inserted and as it ends: the
//! [`Write::Job`] the state applies (see `domain::jobs`).

use super::*;
use crate::domain::jobs::{JobRun, JobState, JobUpdate};

impl Scheduler {
    /// Write the job run of submission `sid` if it runs under a job: building
    /// (`end` = `None`), or ended with (success, built, cached, failed).
    /// The outputs are those of the requested derivations that were built or
    /// cached so far.
    pub(super) fn record_job_run(&mut self, sid: SubmissionId, end: Option<(bool, u32, u32, u32)>) {
        let Some(sub) = self.submissions.get(&sid) else {
            return;
        };
        let Some(job) = sub.job.clone() else {
            return;
        };
        let mut outputs = Vec::new();
        for root in &sub.roots {
            if let Some(outs) = sub.cached.get(root) {
                outputs.extend(outs.values().map(|p| p.to_string()));
                continue;
            }
            let Some(b) = self.by_drv.get(root).and_then(|id| self.builds.get(id)) else {
                continue;
            };
            if matches!(b.rec.state, BuildState::Done(o) if o.is_success()) {
                outputs.extend(b.rec.outputs.values().map(|p| p.to_string()));
            }
        }
        outputs.sort();
        outputs.dedup();
        let (state, built, cached, failed) = match end {
            None => (JobState::Building, 0, sub.cached.len() as u32, 0),
            Some((_, b, c, f)) if sub.cancelled => (JobState::Cancelled, b, c, f),
            Some((true, b, c, f)) => (JobState::Succeeded, b, c, f),
            Some((false, b, c, f)) => (JobState::Failed, b, c, f),
        };
        let run = JobRun {
            submission: sid,
            state,
            started_ms: sub.created_ms,
            finished_ms: sub.finished_ms.filter(|_| end.is_some()),
            drv_paths: sub.roots.iter().map(|p| p.to_string()).collect(),
            outputs,
            built,
            cached,
            failed,
        };
        self.writes
            .push(Write::Job(Box::new(JobUpdate { job, run })));
    }
}
