//! Named jobs: `farm build --job NAME` records each submission under NAME
//! with its outcome and outputs, for `farm jobs` and the badges.
//!
//! A job is one record in the state's `jobs` tree (key: the name, value: JSON
//! [`JobRecord`]) holding its last runs, newest first. A run is written when
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

use crate::domain::model::SubmissionId;
use crate::domain::state::StateError;

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

    /// When it last ran (its newest run's start).
    fn last_started(&self) -> i64 {
        self.last().map_or(i64::MIN, |r| r.started_ms)
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

fn decode(bytes: &[u8]) -> Result<JobRecord, StateError> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
        tree: "jobs",
        source,
    })
}

/// Record `u` in `tree`: its run replaces the one of the same submission
/// (an end never goes back to `building`) or becomes the newest; the history
/// is cut to the limit; a new job past the job limit evicts the one least
/// recently run. Blocking (sled), under the scheduler lock.
pub(crate) fn apply(
    tree: &sled::Tree,
    limits: &JobLimits,
    u: &JobUpdate,
) -> Result<(), StateError> {
    let key = u.job.as_bytes();
    let mut rec = match tree.get(key)? {
        Some(v) => decode(&v)?,
        None => {
            if limits.max_jobs > 0 && tree.len() >= limits.max_jobs {
                evict_least_recent(tree, tree.len() + 1 - limits.max_jobs)?;
            }
            JobRecord {
                name: u.job.clone(),
                runs: Vec::new(),
            }
        }
    };
    match rec
        .runs
        .iter_mut()
        .find(|r| r.submission == u.run.submission)
    {
        Some(r) if r.state != JobState::Building && u.run.state == JobState::Building => {}
        Some(r) => *r = u.run.clone(),
        None => {
            rec.runs.insert(0, u.run.clone());
            rec.runs.sort_by_key(|r| std::cmp::Reverse(r.started_ms));
        }
    }
    rec.runs.truncate(limits.history.max(1));
    let bytes = serde_json::to_vec(&rec).map_err(StateError::Encode)?;
    tree.insert(key, bytes)?;
    Ok(())
}

/// Remove the `n` jobs least recently run.
fn evict_least_recent(tree: &sled::Tree, n: usize) -> Result<(), StateError> {
    let mut all: Vec<(i64, sled::IVec)> = Vec::new();
    for item in tree.iter() {
        let (k, v) = item?;
        let started = decode(&v).map(|r| r.last_started()).unwrap_or(i64::MIN);
        all.push((started, k));
    }
    all.sort();
    for (_, k) in all.into_iter().take(n) {
        tracing::info!(job = %String::from_utf8_lossy(&k), "forgetting the job least recently run (the job limit is reached)");
        tree.remove(k)?;
    }
    Ok(())
}

impl crate::domain::coordinator::Coordinator {
    /// Every named job, by name (read off the runtime).
    pub async fn jobs(&self) -> Result<Vec<JobRecord>, StateError> {
        let store = self.store();
        tokio::task::spawn_blocking(move || list(store.jobs_tree()))
            .await
            .map_err(|e| StateError::Task(format!("reading the jobs: {e}")))?
    }

    /// One named job, if recorded (read off the runtime).
    pub async fn job(&self, name: &str) -> Result<Option<JobRecord>, StateError> {
        let store = self.store();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || get(store.jobs_tree(), &name))
            .await
            .map_err(|e| StateError::Task(format!("reading a job: {e}")))?
    }
}

/// A job's record.
pub fn get(tree: &sled::Tree, name: &str) -> Result<Option<JobRecord>, StateError> {
    tree.get(name.as_bytes())?.map(|v| decode(&v)).transpose()
}

/// Every job, by name.
pub fn list(tree: &sled::Tree) -> Result<Vec<JobRecord>, StateError> {
    tree.iter()
        .map(|item| {
            let (_, v) = item?;
            decode(&v)
        })
        .collect()
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

    fn put(tree: &sled::Tree, limits: &JobLimits, job: &str, r: JobRun) {
        apply(
            tree,
            limits,
            &JobUpdate {
                job: job.into(),
                run: r,
            },
        )
        .unwrap();
    }

    #[test]
    fn runs_are_replaced_bounded_and_jobs_evicted() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("jobs").unwrap();
        let limits = JobLimits {
            history: 3,
            max_jobs: 2,
        };
        put(&tree, &limits, "a", run(1, JobState::Building));
        assert_eq!(get(&tree, "a").unwrap().unwrap().badge(), Badge::Building);
        put(&tree, &limits, "a", run(1, JobState::Succeeded));
        // A late `building` never undoes an end.
        put(&tree, &limits, "a", run(1, JobState::Building));
        let a = get(&tree, "a").unwrap().unwrap();
        assert_eq!((a.runs.len(), a.badge()), (1, Badge::Passing));
        put(&tree, &limits, "a", run(2, JobState::Failed));
        assert_eq!(get(&tree, "a").unwrap().unwrap().badge(), Badge::Failing);
        // A cancelled run has no verdict: the one before it counts.
        put(&tree, &limits, "a", run(3, JobState::Cancelled));
        assert_eq!(get(&tree, "a").unwrap().unwrap().badge(), Badge::Failing);
        put(&tree, &limits, "a", run(4, JobState::Succeeded));
        let a = get(&tree, "a").unwrap().unwrap();
        let subs: Vec<_> = a.runs.iter().map(|r| r.submission).collect();
        assert_eq!(subs, [4, 3, 2], "newest first, bounded");
        // Two jobs at most: a third evicts the one least recently run.
        put(&tree, &limits, "b", run(5, JobState::Succeeded));
        put(&tree, &limits, "a", run(6, JobState::Building));
        put(&tree, &limits, "c", run(7, JobState::Failed));
        let names: Vec<String> = list(&tree).unwrap().into_iter().map(|j| j.name).collect();
        assert_eq!(names, ["a", "c"]);
        assert!(get(&tree, "b").unwrap().is_none());
        let only_cancelled = JobRecord {
            name: "x".into(),
            runs: vec![run(1, JobState::Cancelled)],
        };
        assert_eq!(only_cancelled.badge(), Badge::Unknown);
    }
}
