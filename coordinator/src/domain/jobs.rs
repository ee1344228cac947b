//! Named jobs: `farm build --job NAME` records each submission under NAME
//! with its outcome and outputs, for `farm jobs` and the badges.
//!
//! This module is the words (records, what a badge says, how a run goes into
//! a history); the state stores them (`Store::put_job_run`, one record per job
//! in its `jobs` tree, key the name, value JSON [`JobRecord`], runs newest
//! first) and the coordinator reads them (`Coordinator::jobs`, `job`). A run is written when
//! its submission is inserted (`building`) and again when it ends
//! (`succeeded` / `failed` / `cancelled`): the scheduler hands both back as a
//! [`Write::Job`](crate::domain::model::Write::Job), applied under its lock
//! like every other write and made durable by the same group-commit flushes.
//! The end is written before the submission's own record says it is done, so
//! a crash between the two leaves a finished job and an unfinished
//! submission, which the next start resumes and ends again (same run,
//! replaced): never a run that stays `building`.
//!
//! Bounded twice ([`JobLimits`]): runs per job (oldest dropped) and jobs
//! (the one least recently run goes when a new name would pass the bound).
//! A run holds what `farm jobs` shows, not references to submissions, so the
//! submissions' own retention does not touch it.

use serde::{Deserialize, Serialize};

/// A submission's id (`domain::model::SubmissionId`; not imported, so the
/// model may name these records without a cycle).
type SubmissionId = u64;

/// How much job history the state keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Runs kept per job, newest first (at least 1).
    pub history: usize,
    /// Jobs kept; a new name past this evicts the job least recently run.
    pub max_jobs: usize,
}

impl Default for JobLimits {
    fn default() -> JobLimits {
        JobLimits {
            history: 50,
            max_jobs: 1000,
        }
    }
}

/// Where a run of a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Building,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Building => "building",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// One submission of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRun {
    pub submission: SubmissionId,
    pub state: JobState,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// The requested derivations.
    pub drv_paths: Vec<String>,
    /// The outputs of those that were built or cached.
    pub outputs: Vec<String>,
    pub built: u32,
    pub cached: u32,
    pub failed: u32,
}

/// A job's record: its runs, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub name: String,
    pub runs: Vec<JobRun>,
}

/// A run to record under a job (the scheduler's write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUpdate {
    pub job: String,
    pub run: JobRun,
}

/// What a badge says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Badge {
    Passing,
    Failing,
    Building,
    Unknown,
}

impl Badge {
    pub fn as_str(self) -> &'static str {
        match self {
            Badge::Passing => "passing",
            Badge::Failing => "failing",
            Badge::Building => "building",
            Badge::Unknown => "unknown",
        }
    }
}

impl JobRecord {
    /// The newest run.
    pub fn last(&self) -> Option<&JobRun> {
        self.runs.first()
    }

    /// The badge: `building` while its newest run builds, else the verdict of
    /// its newest run that has one (a cancelled run has none), else `unknown`.
    pub fn badge(&self) -> Badge {
        if self.last().is_some_and(|r| r.state == JobState::Building) {
            return Badge::Building;
        }
        self.runs
            .iter()
            .find_map(|r| match r.state {
                JobState::Succeeded => Some(Badge::Passing),
                JobState::Failed => Some(Badge::Failing),
                JobState::Building | JobState::Cancelled => None,
            })
            .unwrap_or(Badge::Unknown)
    }
}

impl JobRecord {
    /// When it last ran (its newest run's start; never: the minimum).
    pub fn last_started(&self) -> i64 {
        self.last().map_or(i64::MIN, |r| r.started_ms)
    }

    /// Put `run` in the history: it replaces the run of the same submission
    /// (an end never goes back to `building`) or joins it, newest first; the
    /// history is then cut to `limits.history`.
    pub fn record(&mut self, run: &JobRun, limits: &JobLimits) {
        match self
            .runs
            .iter_mut()
            .find(|r| r.submission == run.submission)
        {
            Some(r) if r.state != JobState::Building && run.state == JobState::Building => {}
            Some(r) => *r = run.clone(),
            None => {
                self.runs.insert(0, run.clone());
                self.runs.sort_by_key(|r| std::cmp::Reverse(r.started_ms));
            }
        }
        self.runs.truncate(limits.history.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(sub: SubmissionId, state: JobState) -> JobRun {
        JobRun {
            submission: sub,
            state,
            started_ms: sub as i64 * 1000,
            finished_ms: (state != JobState::Building).then_some(sub as i64 * 1000 + 5),
            drv_paths: vec![],
            outputs: vec![],
            built: 0,
            cached: 0,
            failed: 0,
        }
    }

    #[test]
    fn runs_are_replaced_bounded_and_judged() {
        let limits = JobLimits {
            history: 3,
            max_jobs: 2,
        };
        let mut a = JobRecord {
            name: "a".into(),
            runs: Vec::new(),
        };
        assert_eq!(a.badge(), Badge::Unknown);
        a.record(&run(1, JobState::Building), &limits);
        assert_eq!(a.badge(), Badge::Building);
        a.record(&run(1, JobState::Succeeded), &limits);
        // A late `building` never undoes an end.
        a.record(&run(1, JobState::Building), &limits);
        assert_eq!((a.runs.len(), a.badge()), (1, Badge::Passing));
        a.record(&run(2, JobState::Failed), &limits);
        assert_eq!(a.badge(), Badge::Failing);
        // A cancelled run has no verdict: the one before it counts.
        a.record(&run(3, JobState::Cancelled), &limits);
        assert_eq!(a.badge(), Badge::Failing);
        a.record(&run(4, JobState::Succeeded), &limits);
        let subs: Vec<_> = a.runs.iter().map(|r| r.submission).collect();
        assert_eq!(subs, [4, 3, 2], "newest first, bounded");
        let only_cancelled = JobRecord {
            name: "x".into(),
            runs: vec![run(1, JobState::Cancelled)],
        };
        assert_eq!(only_cancelled.badge(), Badge::Unknown);
    }
}
