//! The coordinator's durable state, in sled: builds (with their queue state),
//! submissions, builders, and the log index (derivation → its latest build).
//!
//! Layout: one sled tree per kind, keys big-endian `u64` ids (names for
//! builders, derivation base names for the log index, job names for named
//! jobs' histories: `crate::domain::jobs`), values JSON records
//! ([`crate::domain::model`]). Finished outputs are not here: the cache is the truth
//! for those. Writes that must survive a `kill -9` are followed by [`Store::flush`].
//!
//! Two index trees keep start and retention independent of history:
//! - `active`: `b<id>` / `s<id>` (the letter, then the big-endian id) for every
//!   unfinished build and submission, kept in step with the records (an entry is
//!   added before a record that needs it is written and removed after the
//!   record that ends it, so a crash leaves at most a stale entry, which
//!   [`Store::load`] drops). A start reads only these.
//! - `finished`: `(finished_ms, id)` of every finished submission, oldest
//!   first: what retention prunes ([`Store::prune`]), in batches, off the
//!   scheduler lock.
//!
//! A database written before these indexes existed gets them once, at open
//! (`meta` holds the layout version).
//!
//! Flushing is group commit on one thread per database ([`Flusher`]): sled 0.34's
//! `flush_async` never wakes when several flushes are polled at once (sled
//! #1241, #1308), so it is not used anywhere; the flusher calls the blocking
//! `Db::flush` and answers every request that arrived before that flush began
//! with its result, so N concurrent acknowledgements cost one fsync.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::jobs::{JobRecord, JobUpdate};
use crate::domain::lock::lock;
use crate::domain::model::{
    BuildId, BuildRecord, BuilderRecord, Loaded, SubmissionId, SubmissionRecord, Write,
};

/// The layout version this code writes (`meta` tree, key `layout`).
const LAYOUT: u64 = 2;

/// sled's page cache, in bytes (sled 0.34's default is 1 GiB). The scheduler
/// holds everything unfinished in memory and a start reads the `active`
/// builds once, so the state is mostly written, rarely read: sled's cache
/// only keeps what was written lately, and with its default a queue of
/// 100 000 builds kept all their records resident (docs/performance.md,
/// "Coordinator memory with 100k queued").
const CACHE_CAPACITY: u64 = 32 << 20;

/// A state database failure.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record in {tree}: {source}")]
    Corrupt {
        tree: &'static str,
        source: serde_json::Error,
    },
    #[error("encoding record: {0}")]
    Encode(serde_json::Error),
    #[error("flushing the state database: {0}")]
    Flush(String),
    #[error("state task failed: {0}")]
    Task(String),
    #[error(
        "the state database has layout version {0}, newer than this coordinator knows ({LAYOUT})"
    )]
    NewerLayout(u64),
}

/// Handle on the database (cheap to clone).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    flusher: std::sync::Arc<Flusher>,
    builds: sled::Tree,
    submissions: sled::Tree,
    builders: sled::Tree,
    log_index: sled::Tree,
    active: sled::Tree,
    finished: sled::Tree,
    meta: sled::Tree,
    /// Named jobs' histories (`domain::jobs`), bounded by `job_limits`.
    jobs: sled::Tree,
    job_limits: crate::domain::jobs::JobLimits,
}

/// How much finished history the state keeps. Defaults a homelab never has to
/// think about: the last 10 000 finished submissions, none older than 90 days,
/// builders seen within 30 days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Finished submissions kept, newest first; older ones go with their builds.
    pub finished_submissions: usize,
    /// Finished submissions older than this (milliseconds) go too; `None`: no age limit.
    pub max_age_ms: Option<i64>,
    /// Builder records not seen for this long (milliseconds) are removed.
    pub builder_ms: i64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            finished_submissions: 10_000,
            max_age_ms: Some(90 * 86_400_000),
            builder_ms: 30 * 86_400_000,
        }
    }
}

/// Records pruning keeps whatever the retention says: the hook for what later
/// work relies on (the history of named jobs for badges and alerts, builds a
/// pin references). A kept submission is skipped: it stays beyond the
/// retention (and is looked at again each round, so keep them few); a kept
/// build stays (with its log index entry) after its submissions go.
pub trait Keep: Send + Sync {
    /// Keep this finished submission (and so every build it lists).
    fn submission(&self, _s: &SubmissionRecord) -> bool {
        false
    }
    /// Keep this finished build even when no kept submission lists it.
    fn build(&self, _b: &BuildRecord) -> bool {
        false
    }
}

/// Keep nothing beyond the retention (what this release has).
pub struct KeepNothing;

impl Keep for KeepNothing {}

/// What one [`Store::prune`] call removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub submissions: usize,
    pub builds: usize,
    pub log_entries: usize,
    /// Whether more is due (call again).
    pub more: bool,
}

/// Entries per tree (tests, benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeCounts {
    pub builds: usize,
    pub submissions: usize,
    pub builders: usize,
    pub log_index: usize,
    pub active: usize,
    pub finished: usize,
}

fn active_key(kind: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = kind;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn finished_key(finished_ms: i64, id: SubmissionId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&(finished_ms.max(0) as u64).to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

fn id_at(key: &[u8], at: usize) -> Option<u64> {
    key.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

/// A build record already written by [`Store::put_new_builds`], and what it
/// replaced in the log index (restored should the build be discarded).
#[derive(Debug, Clone)]
pub struct Written {
    pub id: BuildId,
    pub drv_base_name: String,
    pub previous_log_entry: Option<sled::IVec>,
}

impl Store {
    /// Open (or create) the database at `path`. Blocking.
    ///
    /// sled releases its file lock from a background thread after the last
    /// handle drops, so a reopen right after a close (a restart in the same
    /// process, a test) may find it still held for a moment: the lock is
    /// retried for up to two seconds before giving up. A second coordinator
    /// on the same state still fails, with sled's "could not acquire lock".
    pub fn open(path: &Path) -> Result<Store, StateError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(CACHE_CAPACITY)
                .open()
            {
                Ok(db) => return Store::from_db(db),
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A database that lives in memory only (tests).
    pub fn temporary() -> Result<Store, StateError> {
        Store::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Store, StateError> {
        let flush_db = db.clone();
        let flusher = Flusher::spawn(move || flush_db.flush().map(drop).map_err(|e| e.to_string()))
            .map_err(|e| StateError::Flush(format!("cannot start the flusher thread: {e}")))?;
        let store = Store {
            flusher: std::sync::Arc::new(flusher),
            builds: db.open_tree("builds")?,
            submissions: db.open_tree("submissions")?,
            builders: db.open_tree("builders")?,
            log_index: db.open_tree("log_index")?,
            active: db.open_tree("active")?,
            finished: db.open_tree("finished")?,
            meta: db.open_tree("meta")?,
            jobs: db.open_tree("jobs")?,
            job_limits: Default::default(),
            db,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Build the `active` and `finished` indexes of a database written before
    /// they existed (one full pass, once).
    fn migrate(&self) -> Result<(), StateError> {
        let version = id_at(&self.meta.get("layout")?.unwrap_or_default(), 0).unwrap_or(0);
        if version == LAYOUT {
            return Ok(());
        }
        if version > LAYOUT {
            return Err(StateError::NewerLayout(version));
        }
        let started = std::time::Instant::now();
        let (mut subs, mut builds) = (0usize, 0usize);
        for item in self.submissions.iter() {
            let (_, v) = item?;
            let s: SubmissionRecord = decode(&v, "submissions")?;
            if s.done {
                self.finished.insert(
                    finished_key(s.finished_ms.unwrap_or(s.created_ms), s.id),
                    &[],
                )?;
            } else {
                self.active.insert(active_key(b's', s.id), &[])?;
            }
            subs += 1;
        }
        for item in self.builds.iter() {
            let (_, v) = item?;
            let b: BuildRecord = decode(&v, "builds")?;
            if !b.state.is_terminal() {
                self.active.insert(active_key(b'b', b.id), &[])?;
            }
            builds += 1;
        }
        self.meta.insert("layout", &LAYOUT.to_be_bytes())?;
        self.db.flush()?;
        if subs + builds > 0 {
            tracing::info!(
                submissions = subs,
                builds,
                millis = started.elapsed().as_millis() as u64,
                "indexed the state database's unfinished and finished work (once)"
            );
        }
        Ok(())
    }

    /// This store with named jobs bounded by `limits` (default: [`JobLimits::default`]).
    ///
    /// [`JobLimits::default`]: crate::domain::jobs::JobLimits
    pub fn with_job_limits(mut self, limits: crate::domain::jobs::JobLimits) -> Store {
        self.job_limits = limits;
        self
    }

    /// Record a named job's run ([`JobRecord::record`]); a new job past the
    /// job limit first evicts the jobs least recently run. Under the
    /// scheduler lock (it is one of its writes), so nothing races it.
    pub fn put_job_run(&self, u: &JobUpdate) -> Result<(), StateError> {
        let key = u.job.as_bytes();
        let mut rec = match self.jobs.get(key)? {
            Some(v) => decode::<JobRecord>(&v, "jobs")?,
            None => {
                let n = self.jobs.len();
                if n >= self.job_limits.max_jobs {
                    self.evict_jobs(n + 1 - self.job_limits.max_jobs)?;
                }
                JobRecord {
                    name: u.job.clone(),
                    runs: Vec::new(),
                }
            }
        };
        rec.record(&u.run, &self.job_limits);
        Store::put(&self.jobs, key, &rec)
    }

    /// Remove the `n` jobs least recently run.
    fn evict_jobs(&self, n: usize) -> Result<(), StateError> {
        let mut all: Vec<(i64, sled::IVec)> = Vec::new();
        for item in self.jobs.iter() {
            let (k, v) = item?;
            let started = decode::<JobRecord>(&v, "jobs").map_or(i64::MIN, |r| r.last_started());
            all.push((started, k));
        }
        all.sort();
        for (_, k) in all.into_iter().take(n) {
            tracing::info!(job = %String::from_utf8_lossy(&k), "forgetting the job least recently run (the job limit is reached)");
            self.jobs.remove(k)?;
        }
        Ok(())
    }

    /// A named job's record.
    pub fn get_job(&self, name: &str) -> Result<Option<JobRecord>, StateError> {
        self.jobs
            .get(name.as_bytes())?
            .map(|v| decode(&v, "jobs"))
            .transpose()
    }

    /// Every named job, by name.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StateError> {
        Store::all(&self.jobs, "jobs")
    }

    /// A fresh id, unique across restarts.
    pub fn next_id(&self) -> Result<u64, StateError> {
        // generate_id is monotonic and persisted in batches; +1 keeps 0 unused.
        Ok(self.db.generate_id()? + 1)
    }

    fn put<T: Serialize>(tree: &sled::Tree, key: &[u8], value: &T) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(value).map_err(StateError::Encode)?;
        tree.insert(key, bytes)?;
        Ok(())
    }

    fn all<T: DeserializeOwned>(
        tree: &sled::Tree,
        name: &'static str,
    ) -> Result<Vec<T>, StateError> {
        let mut out = Vec::new();
        for item in tree.iter() {
            let (_, v) = item?;
            out.push(decode(&v, name)?);
        }
        Ok(out)
    }

    /// Write a build's record (and its `active` entry and log index entry).
    pub fn put_build(&self, b: &BuildRecord) -> Result<(), StateError> {
        let key = active_key(b'b', b.id);
        let terminal = b.state.is_terminal();
        if !terminal && !self.active.contains_key(key)? {
            self.active.insert(key, &[])?;
        }
        Store::put(&self.builds, &b.id.to_be_bytes(), b)?;
        if terminal {
            self.active.remove(key)?;
        }
        self.log_index
            .insert(b.drv_path.base_name().as_bytes(), &b.id.to_be_bytes())?;
        Ok(())
    }

    /// Write the records of new, unfinished builds (what a big submission
    /// does outside the scheduler lock, a bounded number at a time:
    /// `persist::prepare_submission`): their `active` entries first, in one
    /// batch, then the records, in one batch, then the log index. Returns
    /// what each log index entry pointed to before, for
    /// [`Store::discard_new_builds`].
    ///
    /// Not atomic with the submission that lists them: a crash before that
    /// submission is recorded leaves records no recorded submission lists
    /// (and `active` entries with or without a record), which [`Store::load`]
    /// drops. sled 0.34 holds a batch's nodes and write buffers in memory
    /// well past its cache capacity, so callers keep batches small (a batch
    /// of 100 000 records held over a gigabyte).
    pub fn put_new_builds(
        &self,
        records: &[(BuildId, String, Vec<u8>)],
    ) -> Result<Vec<Written>, StateError> {
        let mut active = sled::Batch::default();
        let mut builds = sled::Batch::default();
        for (id, _, bytes) in records {
            active.insert(&active_key(b'b', *id)[..], &[][..]);
            builds.insert(&id.to_be_bytes()[..], bytes.as_slice());
        }
        self.active.apply_batch(active)?;
        self.builds.apply_batch(builds)?;
        let mut out = Vec::with_capacity(records.len());
        for (id, base, _) in records {
            let previous_log_entry = self.log_index.insert(base.as_bytes(), &id.to_be_bytes())?;
            out.push(Written {
                id: *id,
                drv_base_name: base.clone(),
                previous_log_entry,
            });
        }
        Ok(out)
    }

    /// Remove builds written by [`Store::put_new_builds`] that were not used
    /// (a concurrent submission made the same derivation first): record,
    /// `active` entry, and the log index entry back as it was.
    pub fn discard_new_builds(&self, written: &[Written]) -> Result<(), StateError> {
        for w in written {
            let id = w.id.to_be_bytes();
            let _ = self.log_index.compare_and_swap(
                w.drv_base_name.as_bytes(),
                Some(&id[..]),
                w.previous_log_entry.clone(),
            )?;
            self.builds.remove(id)?;
            self.active.remove(active_key(b'b', w.id))?;
        }
        Ok(())
    }

    pub fn get_build(&self, id: BuildId) -> Result<Option<BuildRecord>, StateError> {
        match self.builds.get(id.to_be_bytes())? {
            None => Ok(None),
            Some(v) => decode(&v, "builds").map(Some),
        }
    }

    /// The latest build of a derivation (by its base name).
    pub fn build_of_drv(&self, drv_base_name: &str) -> Result<Option<BuildId>, StateError> {
        Ok(self
            .log_index
            .get(drv_base_name.as_bytes())?
            .and_then(|v| id_at(&v, 0)))
    }

    /// Write a submission's record (and its `active` or `finished` entry).
    pub fn put_submission(&self, s: &SubmissionRecord) -> Result<(), StateError> {
        let key = active_key(b's', s.id);
        if !s.done {
            if !self.active.contains_key(key)? {
                self.active.insert(key, &[])?;
            }
            return Store::put(&self.submissions, &s.id.to_be_bytes(), s);
        }
        Store::put(&self.submissions, &s.id.to_be_bytes(), s)?;
        self.finished.insert(
            finished_key(s.finished_ms.unwrap_or(s.created_ms), s.id),
            &[],
        )?;
        self.active.remove(key)?;
        Ok(())
    }

    /// Whether a submission is recorded (nothing is parsed).
    pub fn has_submission(&self, id: SubmissionId) -> Result<bool, StateError> {
        Ok(self.submissions.contains_key(id.to_be_bytes())?)
    }

    /// Write a new, unfinished submission's record, already encoded.
    pub fn put_new_submission(&self, id: SubmissionId, bytes: &[u8]) -> Result<(), StateError> {
        self.active.insert(active_key(b's', id), &[])?;
        self.submissions.insert(id.to_be_bytes(), bytes)?;
        Ok(())
    }

    pub fn get_submission(&self, id: SubmissionId) -> Result<Option<SubmissionRecord>, StateError> {
        match self.submissions.get(id.to_be_bytes())? {
            None => Ok(None),
            Some(v) => decode(&v, "submissions").map(Some),
        }
    }

    /// Apply one of the scheduler's writes. A failure is logged here too
    /// (the scheduler has decided already; callers mostly go on).
    pub fn apply(&self, w: &Write) -> Result<(), StateError> {
        match w {
            Write::Build(b) => self.put_build(b).inspect_err(|e| {
                tracing::error!(build = b.id, error = %e, "cannot persist build");
            }),
            Write::Submission(s) => self.put_submission(s).inspect_err(|e| {
                tracing::error!(submission = s.id, error = %e, "cannot persist submission");
            }),
            Write::NewSubmission { id, encoded } => {
                self.put_new_submission(*id, encoded).inspect_err(|e| {
                    tracing::error!(submission = id, error = %e, "cannot persist submission");
                })
            }
            Write::Builder(b) => self.put_builder(b).inspect_err(|e| {
                tracing::error!(builder = %b.name, error = %e, "cannot persist builder");
            }),
            Write::ForgetBuilder(name) => self.delete_builder(name).inspect_err(|e| {
                tracing::error!(builder = %name, error = %e, "cannot delete builder record");
            }),
            Write::Job(u) => self.put_job_run(u).inspect_err(|e| {
                tracing::error!(job = %u.job, error = %e, "cannot persist job run");
            }),
        }
    }

    /// Apply the scheduler's writes in order; every one is tried, the first
    /// failure is returned.
    pub fn apply_all(&self, writes: &[Write]) -> Result<(), StateError> {
        let mut first = Ok(());
        for w in writes {
            let r = self.apply(w);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// A record encoded as this database stores it.
    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(value).map_err(StateError::Encode)
    }

    pub fn put_builder(&self, b: &BuilderRecord) -> Result<(), StateError> {
        Store::put(&self.builders, b.name.as_bytes(), b)
    }

    /// Forget a builder's record.
    pub fn delete_builder(&self, name: &str) -> Result<(), StateError> {
        self.builders.remove(name.as_bytes())?;
        Ok(())
    }

    /// What a restart resumes from: unfinished submissions with all their
    /// builds, unfinished builds, and every builder. Reads only what the
    /// `active` index names (plus the builds those submissions list), never the
    /// finished history. Stale index entries are dropped, and so are unfinished
    /// builds no stored submission lists (written by a submission that a crash
    /// interrupted before it was recorded).
    pub fn load(&self) -> Result<Loaded, StateError> {
        let mut submissions = Vec::new();
        let mut wanted: BTreeSet<BuildId> = BTreeSet::new();
        let mut loose: Vec<BuildId> = Vec::new();
        let mut stale: Vec<sled::IVec> = Vec::new();
        for item in self.active.iter() {
            let (k, _) = item?;
            let Some(id) = id_at(&k, 1) else {
                stale.push(k);
                continue;
            };
            match k.first() {
                Some(b's') => match self.get_submission(id)? {
                    Some(s) if !s.done => {
                        wanted.extend(s.builds.iter().copied());
                        submissions.push(s);
                    }
                    _ => stale.push(k),
                },
                Some(b'b') => loose.push(id),
                _ => stale.push(k),
            }
        }
        let listed: HashSet<BuildId> = wanted.iter().copied().collect();
        let mut orphans = Vec::new();
        for id in loose {
            if listed.contains(&id) {
                continue;
            }
            match self.get_build(id)? {
                Some(b) if b.state.is_terminal() => stale.push(active_key(b'b', id)[..].into()),
                Some(b) => {
                    let recorded = b.submissions.iter().any(|s| {
                        self.submissions
                            .contains_key(s.to_be_bytes())
                            .unwrap_or(true)
                    });
                    if recorded {
                        wanted.insert(id);
                    } else {
                        orphans.push(b);
                    }
                }
                None => stale.push(active_key(b'b', id)[..].into()),
            }
        }
        let mut builds = Vec::with_capacity(wanted.len());
        for id in wanted {
            if let Some(b) = self.get_build(id)? {
                builds.push(b);
            }
        }
        for k in stale {
            self.active.remove(k)?;
        }
        for b in orphans {
            tracing::info!(build = %format!("b{}", b.id), drv = %b.drv_path, "dropping a build no recorded submission lists");
            let written = Written {
                id: b.id,
                drv_base_name: b.drv_path.base_name(),
                previous_log_entry: None,
            };
            self.discard_new_builds(std::slice::from_ref(&written))?;
        }
        Ok(Loaded {
            builds,
            submissions,
            builders: Store::all(&self.builders, "builders")?,
        })
    }

    /// Prune finished history past `retention`, at most `batch` submissions
    /// (with the builds only they list, and those builds' log index entries;
    /// their logs stay in the cache). Blocking; takes no scheduler lock: a
    /// finished submission is never written again, and a build record is
    /// removed only if unchanged since it was read (a build the scheduler
    /// shares again meanwhile is rewritten whole by it). Call again while
    /// [`Pruned::more`].
    pub fn prune(
        &self,
        retention: &Retention,
        keep: &dyn Keep,
        now: i64,
        batch: usize,
    ) -> Result<Pruned, StateError> {
        let mut out = Pruned::default();
        // The oldest of the newest `finished_submissions` entries: everything
        // before it is past the count (found from the newest end, so a call
        // costs the retention plus a batch, never the whole history).
        let keep_from: Option<Vec<u8>> = match retention.finished_submissions {
            0 => Some(vec![0xff; 17]),
            n => self
                .finished
                .iter()
                .keys()
                .rev()
                .nth(n - 1)
                .transpose()?
                .map(|k| k.to_vec()),
        };
        let cutoff = retention.max_age_ms.map(|age| now.saturating_sub(age));
        let mut chosen: Vec<(sled::IVec, SubmissionRecord)> = Vec::new();
        for item in self.finished.iter() {
            let (k, _) = item?;
            let (Some(fin), Some(sid)) = (id_at(&k, 0), id_at(&k, 8)) else {
                self.finished.remove(&k)?;
                continue;
            };
            // Both hold for a prefix of the tree (it is ordered by finish time).
            let past_count = keep_from
                .as_ref()
                .is_some_and(|b| k.as_ref() < b.as_slice());
            let too_old = cutoff.is_some_and(|c| (fin as i64) < c);
            if !past_count && !too_old {
                break;
            }
            if chosen.len() >= batch {
                out.more = true;
                break;
            }
            match self.get_submission(sid)? {
                Some(s) if keep.submission(&s) => {}
                Some(s) => chosen.push((k, s)),
                None => {
                    self.finished.remove(&k)?;
                }
            }
        }
        let pruning: HashSet<SubmissionId> = chosen.iter().map(|(_, s)| s.id).collect();
        for (_, s) in &chosen {
            for &id in &s.builds {
                let key = id.to_be_bytes();
                let Some(bytes) = self.builds.get(key)? else {
                    continue;
                };
                let b: BuildRecord = decode(&bytes, "builds")?;
                let others = b.submissions.iter().any(|o| {
                    !pruning.contains(o)
                        && self
                            .submissions
                            .contains_key(o.to_be_bytes())
                            .unwrap_or(true)
                });
                if !b.state.is_terminal()
                    || others
                    || self.active.contains_key(active_key(b'b', id))?
                    || keep.build(&b)
                {
                    continue;
                }
                if self
                    .builds
                    .compare_and_swap(key, Some(bytes), None as Option<&[u8]>)?
                    .is_ok()
                {
                    out.builds += 1;
                    if self
                        .log_index
                        .compare_and_swap(
                            b.drv_path.base_name().as_bytes(),
                            Some(&key[..]),
                            None as Option<&[u8]>,
                        )?
                        .is_ok()
                    {
                        out.log_entries += 1;
                    }
                }
            }
        }
        let mut subs = sled::Batch::default();
        let mut fins = sled::Batch::default();
        for (k, s) in &chosen {
            subs.remove(&s.id.to_be_bytes()[..]);
            fins.remove(k.clone());
        }
        // Records before their index entries: an interrupted prune is redone.
        self.submissions.apply_batch(subs)?;
        self.finished.apply_batch(fins)?;
        out.submissions = chosen.len();
        Ok(out)
    }

    /// Entries per tree (`len` walks each tree: tests and benchmarks only).
    pub fn counts(&self) -> TreeCounts {
        TreeCounts {
            builds: self.builds.len(),
            submissions: self.submissions.len(),
            builders: self.builders.len(),
            log_index: self.log_index.len(),
            active: self.active.len(),
            finished: self.finished.len(),
        }
    }

    /// Every record, parsed: what a start did before the `active` index
    /// (benchmarks compare against it).
    pub fn parse_everything(&self) -> Result<(usize, usize), StateError> {
        let subs: Vec<SubmissionRecord> = Store::all(&self.submissions, "submissions")?;
        let builds: Vec<BuildRecord> = Store::all(&self.builds, "builds")?;
        Ok((subs.len(), builds.len()))
    }

    /// Make every write so far durable: resolves once a flush that began after
    /// this call has finished (shared with every concurrent caller).
    pub async fn flush(&self) -> Result<(), StateError> {
        self.flusher.flush().await
    }

    /// Flushes run so far and the requests they answered.
    pub fn flush_stats(&self) -> FlushStats {
        self.flusher.stats()
    }

    /// From now on, every flush's duration is observed in `histogram` (the
    /// coordinator's metrics; the first one set stays).
    pub fn observe_flushes(&self, histogram: prometheus_client::metrics::histogram::Histogram) {
        let _ = self.flusher.observer.set(histogram);
    }

    /// Make every write so far durable, blocking.
    pub fn flush_blocking(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8], tree: &'static str) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt { tree, source })
}

/// Counters of the group commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Flushes the flusher ran.
    pub flushes: u64,
    /// Flush requests they answered.
    pub requests: u64,
    /// Time spent in flushes, in microseconds (total).
    pub busy_micros: u64,
    /// The longest flush, in microseconds.
    pub max_micros: u64,
}

type FlushReply = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Group commit: one thread runs the blocking flush; every request that
/// arrived while a flush ran is answered by the next one (a request is never
/// answered by a flush that began before it was made). The thread ends when
/// the last [`Flusher`] handle is dropped.
pub struct Flusher {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<FlushReply>>,
    stats: std::sync::Arc<std::sync::Mutex<FlushStats>>,
    /// Where each flush's duration goes, once metrics are attached.
    observer: std::sync::Arc<std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>>,
}

impl Flusher {
    /// Start the flusher thread around `flush`, a blocking call that makes
    /// every earlier write durable.
    pub fn spawn(
        mut flush: impl FnMut() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Flusher> {
        let (tx, rx) = std::sync::mpsc::channel::<FlushReply>();
        let stats = std::sync::Arc::new(std::sync::Mutex::new(FlushStats::default()));
        let thread_stats = stats.clone();
        let observer = std::sync::Arc::new(std::sync::OnceLock::<
            prometheus_client::metrics::histogram::Histogram,
        >::new());
        let thread_observer = observer.clone();
        std::thread::Builder::new()
            .name("state-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        waiting.push(more);
                    }
                    let started = std::time::Instant::now();
                    let r = flush();
                    let took = started.elapsed().as_micros() as u64;
                    {
                        let mut s = lock(&thread_stats);
                        s.flushes += 1;
                        s.requests += waiting.len() as u64;
                        s.busy_micros += took;
                        s.max_micros = s.max_micros.max(took);
                    }
                    if let Some(h) = thread_observer.get() {
                        h.observe(took as f64 / 1e6);
                    }
                    if took > 1_000_000 {
                        tracing::warn!(millis = took / 1000, "state flush was slow");
                    }
                    for w in waiting {
                        let _ = w.send(r.clone());
                    }
                }
            })?;
        Ok(Flusher {
            tx: std::sync::Mutex::new(tx),
            stats,
            observer,
        })
    }

    /// Resolves once a flush that began after this call has finished.
    pub async fn flush(&self) -> Result<(), StateError> {
        let (reply, done) = tokio::sync::oneshot::channel();
        lock(&self.tx)
            .send(reply)
            .map_err(|_| StateError::Flush("the flusher thread has stopped".into()))?;
        match done.await {
            Ok(r) => r.map_err(StateError::Flush),
            Err(_) => Err(StateError::Flush("the flusher thread has stopped".into())),
        }
    }

    pub fn stats(&self) -> FlushStats {
        *lock(&self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests made while a flush runs are answered by the next flush, never
    /// by the one already running; all of them by one. (Multi-threaded: the
    /// test body blocks on the gate while the flush tasks run on workers.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_share_one_and_wait_for_a_covering_one() {
        use std::sync::mpsc;
        let (entered_tx, entered) = mpsc::channel::<u64>();
        let (release, released) = mpsc::channel::<()>();
        let mut n = 0u64;
        let flusher = std::sync::Arc::new(
            Flusher::spawn(move || {
                n += 1;
                entered_tx.send(n).unwrap();
                released.recv().unwrap();
                Ok(())
            })
            .unwrap(),
        );
        // The first request starts flush 1, which blocks.
        let f = flusher.clone();
        let first = tokio::spawn(async move { f.flush().await });
        assert_eq!(entered.recv().unwrap(), 1);
        // Ten more arrive while it runs.
        let mut later = Vec::new();
        for _ in 0..10 {
            let f = flusher.clone();
            later.push(tokio::spawn(async move { f.flush().await }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        // Flush 1 must not have answered them: flush 2 covers them all.
        assert_eq!(entered.recv().unwrap(), 2);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            later.iter().all(|h| !h.is_finished()),
            "answered by a flush that began before them"
        );
        release.send(()).unwrap();
        for h in later {
            h.await.unwrap().unwrap();
        }
        let stats = flusher.stats();
        assert_eq!((stats.flushes, stats.requests), (2, 11));
    }

    /// Many concurrent flushes of a real database all complete (sled's
    /// `flush_async` hung here), with fewer fsyncs than requests.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_flushes_of_a_real_database_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.builds.insert(i.to_be_bytes(), vec![1u8; 512]).unwrap();
                s.flush().await
            }));
        }
        let all = async {
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), all)
            .await
            .expect("flushes hung");
        let stats = store.flush_stats();
        assert_eq!(stats.requests, 200);
        assert!(stats.flushes < 200, "{stats:?}");
    }

    #[test]
    fn a_failing_flush_reports_its_error() {
        let flusher = Flusher::spawn(|| Err("disk on fire".into())).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt.block_on(flusher.flush()).unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }

    /// A restart reopens the state right after closing it; sled may still
    /// hold the file lock for a moment then, which must not fail the open.
    #[test]
    fn reopening_right_after_closing_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        for i in 0..50u32 {
            let store = Store::open(&path).unwrap();
            store.next_id().unwrap();
            store
                .builds
                .insert(i.to_be_bytes(), vec![0u8; 4096])
                .unwrap();
            store.db.flush().unwrap();
            drop(store);
        }
    }

    fn sp(name: &str) -> farm_nix::store_path::StorePath {
        let d = farm_nix::hash::HashAlgo::Sha256.digest(name.as_bytes());
        let mut digest = [0u8; 20];
        digest.copy_from_slice(&d.digest()[..20]);
        farm_nix::store_path::StorePath::from_digest(&digest, name).unwrap()
    }

    fn build(
        id: BuildId,
        sub: SubmissionId,
        state: crate::domain::model::BuildState,
    ) -> BuildRecord {
        BuildRecord {
            id,
            drv_path: sp(&format!("d{id}.drv")),
            drv_aterm: b"Derive()".as_slice().into(),
            system: "x86_64-linux".into(),
            required_features: Default::default(),
            outputs: Default::default(),
            deps: Default::default(),
            priority: Default::default(),
            created_ms: 0,
            submissions: BTreeSet::from([sub]),
            state,
            retries: 0,
            attempt: 0,
            max_silent_time_secs: 0,
            build_timeout_secs: 0,
            error: None,
            builder: None,
            started_ms: None,
            finished_ms: None,
            requested_by: Default::default(),
            claim: None,
        }
    }

    fn submission(id: SubmissionId, builds: &[BuildId], done: bool) -> SubmissionRecord {
        SubmissionRecord {
            id,
            roots: Vec::new(),
            builds: builds.iter().copied().collect(),
            cached: Default::default(),
            priority: Default::default(),
            created_ms: id as i64,
            done,
            cancelled: false,
            client: None,
            finished_ms: done.then_some(id as i64 + 1),
            job: None,
        }
    }

    /// A database from before the `active` and `finished` indexes gets them
    /// at open, once; a start then reads what is unfinished.
    #[test]
    fn an_old_database_is_indexed_once_at_open() {
        use crate::domain::model::{BuildState, Outcome};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            store
                .put_build(&build(1, 10, BuildState::Done(Outcome::Built)))
                .unwrap();
            store.put_submission(&submission(10, &[1], true)).unwrap();
            store
                .put_build(&build(2, 11, BuildState::Done(Outcome::Built)))
                .unwrap();
            store.put_build(&build(3, 11, BuildState::Queued)).unwrap();
            store
                .put_submission(&submission(11, &[2, 3], false))
                .unwrap();
            // as the previous release left it
            store.active.clear().unwrap();
            store.finished.clear().unwrap();
            store.meta.clear().unwrap();
            store.db.flush().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let c = store.counts();
        assert_eq!((c.active, c.finished), (2, 1), "{c:?}");
        let loaded = store.load().unwrap();
        assert_eq!(loaded.submissions.len(), 1);
        assert_eq!(loaded.submissions[0].id, 11);
        let mut ids: Vec<BuildId> = loaded.builds.iter().map(|b| b.id).collect();
        ids.sort();
        assert_eq!(ids, vec![2, 3]);
        // a newer layout is refused, not misread
        store
            .meta
            .insert("layout", &(LAYOUT + 1).to_be_bytes())
            .unwrap();
        store.db.flush().unwrap();
        drop(store);
        let err = Store::open(&path).err().expect("newer layout");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    /// The `active` index follows the records: a build or submission leaves
    /// it when its record says it ended, and stale entries are dropped at load.
    #[test]
    fn the_active_index_follows_the_records() {
        use crate::domain::model::{BuildState, Outcome};
        let store = Store::temporary().unwrap();
        store.put_build(&build(1, 10, BuildState::Waiting)).unwrap();
        store.put_submission(&submission(10, &[1], false)).unwrap();
        assert_eq!(store.counts().active, 2);
        store
            .put_build(&build(1, 10, BuildState::Done(Outcome::Built)))
            .unwrap();
        store.put_submission(&submission(10, &[1], true)).unwrap();
        let c = store.counts();
        assert_eq!((c.active, c.finished), (0, 1), "{c:?}");
        // a stale entry (a crash between a record and its index)
        store.active.insert(active_key(b's', 10), &[]).unwrap();
        store.active.insert(active_key(b'b', 1), &[]).unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.submissions.is_empty() && loaded.builds.is_empty());
        assert_eq!(store.counts().active, 0);
    }

    /// A crash in the middle of a submission's batches of new builds (its
    /// record not written yet): one batch written whole, the next one's
    /// `active` entries without their records. The next load drops both and
    /// their log index entries, and keeps a recorded submission's builds.
    #[test]
    fn a_crash_between_batches_of_new_builds_leaves_nothing() {
        use crate::domain::model::BuildState;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            // a recorded, unfinished submission
            store.put_build(&build(1, 10, BuildState::Queued)).unwrap();
            store.put_submission(&submission(10, &[1], false)).unwrap();
            // submission 20's first batch (builds 100..110), whole
            let records: Vec<(BuildId, String, Vec<u8>)> = (100..110)
                .map(|id| {
                    let b = build(id, 20, BuildState::Waiting);
                    (id, b.drv_path.base_name(), Store::encode(&b).unwrap())
                })
                .collect();
            let written = store.put_new_builds(&records).unwrap();
            assert_eq!(written.len(), 10);
            // its second batch's active entries, then the crash
            for id in 110..120 {
                store.active.insert(active_key(b'b', id), &[]).unwrap();
            }
            store.db.flush().unwrap();
            let c = store.counts();
            assert_eq!((c.builds, c.active, c.log_index), (11, 22, 11), "{c:?}");
        }
        let store = Store::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.submissions.len(), 1);
        let ids: Vec<BuildId> = loaded.builds.iter().map(|b| b.id).collect();
        assert_eq!(ids, vec![1]);
        let c = store.counts();
        assert_eq!((c.builds, c.active, c.log_index), (1, 2, 1), "{c:?}");
        assert_eq!(
            store.build_of_drv(&sp("d1.drv").base_name()).unwrap(),
            Some(1)
        );
        assert_eq!(
            store.build_of_drv(&sp("d100.drv").base_name()).unwrap(),
            None
        );
    }

    /// Named jobs: bounded in number (the least recently run goes), kept
    /// across a reopen.
    #[test]
    fn named_jobs_are_bounded_and_durable() {
        use crate::domain::jobs::{JobLimits, JobRun, JobState};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let run = |sub: u64| JobRun {
            submission: sub,
            state: JobState::Succeeded,
            started_ms: sub as i64,
            finished_ms: Some(sub as i64 + 1),
            drv_paths: vec![],
            outputs: vec![],
            built: 1,
            cached: 0,
            failed: 0,
        };
        let put = |store: &Store, job: &str, sub: u64| {
            store
                .put_job_run(&JobUpdate {
                    job: job.into(),
                    run: run(sub),
                })
                .unwrap()
        };
        {
            let store = Store::open(&path).unwrap().with_job_limits(JobLimits {
                history: 5,
                max_jobs: 2,
            });
            put(&store, "a", 1);
            put(&store, "b", 2);
            put(&store, "a", 3);
            put(&store, "c", 4);
            store.flush_blocking().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let names: Vec<String> = store.jobs().unwrap().into_iter().map(|j| j.name).collect();
        assert_eq!(names, ["a", "c"], "b ran least recently");
        assert_eq!(store.get_job("a").unwrap().unwrap().runs.len(), 2);
        assert!(store.get_job("b").unwrap().is_none());
    }

    #[test]
    fn a_second_open_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = Store::open(&path).unwrap();
        let err = Store::open(&path).err().expect("the state is in use");
        assert!(err.to_string().contains("lock"), "{err}");
    }
}
