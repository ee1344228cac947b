//! The coordinator's durable state, in sled: builds (with their queue state),
//! submissions, builders, and the log index (derivation → its latest build).
//!
//! Layout: one sled tree per kind, keys big-endian `u64` ids (names for
//! builders, derivation base names for the log index), values JSON records
//! (`scheduler::types`). Finished outputs are not here: the cache is the truth
//! for those. Writes that must survive a `kill -9` are followed by [`Store::flush`].
//!
//! Flushing is group commit on one thread per database ([`Flusher`]): sled 0.34's
//! `flush_async` never wakes when several flushes are polled at once (sled
//! #1241, #1308), so it is not used anywhere; the flusher calls the blocking
//! `Db::flush` and answers every request that arrived before that flush began
//! with its result, so N concurrent acknowledgements cost one fsync.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::scheduler::types::{
    BuildId, BuildRecord, BuilderRecord, SubmissionId, SubmissionRecord,
};

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
}

/// Everything loaded at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub builds: Vec<BuildRecord>,
    pub submissions: Vec<SubmissionRecord>,
    pub builders: Vec<BuilderRecord>,
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
            match sled::Config::new().path(path).open() {
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
        Ok(Store {
            flusher: std::sync::Arc::new(flusher),
            builds: db.open_tree("builds")?,
            submissions: db.open_tree("submissions")?,
            builders: db.open_tree("builders")?,
            log_index: db.open_tree("log_index")?,
            db,
        })
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
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|source| StateError::Corrupt { tree: name, source })?,
            );
        }
        Ok(out)
    }

    pub fn put_build(&self, b: &BuildRecord) -> Result<(), StateError> {
        Store::put(&self.builds, &b.id.to_be_bytes(), b)?;
        self.log_index
            .insert(b.drv_path.base_name().as_bytes(), &b.id.to_be_bytes())?;
        Ok(())
    }

    pub fn get_build(&self, id: BuildId) -> Result<Option<BuildRecord>, StateError> {
        match self.builds.get(id.to_be_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StateError::Corrupt {
                    tree: "builds",
                    source,
                }),
        }
    }

    /// The latest build of a derivation (by its base name).
    pub fn build_of_drv(&self, drv_base_name: &str) -> Result<Option<BuildId>, StateError> {
        Ok(self
            .log_index
            .get(drv_base_name.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    pub fn put_submission(&self, s: &SubmissionRecord) -> Result<(), StateError> {
        Store::put(&self.submissions, &s.id.to_be_bytes(), s)
    }

    pub fn get_submission(&self, id: SubmissionId) -> Result<Option<SubmissionRecord>, StateError> {
        match self.submissions.get(id.to_be_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StateError::Corrupt {
                    tree: "submissions",
                    source,
                }),
        }
    }

    pub fn put_builder(&self, b: &BuilderRecord) -> Result<(), StateError> {
        Store::put(&self.builders, b.name.as_bytes(), b)
    }

    /// What a restart resumes from: unfinished submissions with all their builds,
    /// unfinished builds, and every builder.
    pub fn load(&self) -> Result<Loaded, StateError> {
        let submissions: Vec<SubmissionRecord> =
            Store::all::<SubmissionRecord>(&self.submissions, "submissions")?
                .into_iter()
                .filter(|s| !s.done)
                .collect();
        let mut wanted: std::collections::BTreeSet<BuildId> = submissions
            .iter()
            .flat_map(|s| s.builds.iter().copied())
            .collect();
        let mut builds = Vec::new();
        for item in self.builds.iter() {
            let (_, v) = item?;
            let b: BuildRecord =
                serde_json::from_slice(&v).map_err(|source| StateError::Corrupt {
                    tree: "builds",
                    source,
                })?;
            if !b.state.is_terminal() || wanted.remove(&b.id) {
                builds.push(b);
            }
        }
        Ok(Loaded {
            builds,
            submissions,
            builders: Store::all(&self.builders, "builders")?,
        })
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

    /// Make every write so far durable, blocking.
    pub fn flush_blocking(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }
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
                        let mut s = thread_stats.lock().unwrap_or_else(|e| e.into_inner());
                        s.flushes += 1;
                        s.requests += waiting.len() as u64;
                        s.busy_micros += took;
                        s.max_micros = s.max_micros.max(took);
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
        })
    }

    /// Resolves once a flush that began after this call has finished.
    pub async fn flush(&self) -> Result<(), StateError> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(reply)
            .map_err(|_| StateError::Flush("the flusher thread has stopped".into()))?;
        match done.await {
            Ok(r) => r.map_err(StateError::Flush),
            Err(_) => Err(StateError::Flush("the flusher thread has stopped".into())),
        }
    }

    pub fn stats(&self) -> FlushStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
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

    #[test]
    fn a_second_open_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = Store::open(&path).unwrap();
        let err = Store::open(&path).err().expect("the state is in use");
        assert!(err.to_string().contains("lock"), "{err}");
    }
}
