//! The coordinator's durable state, in sled: builds (with their queue state),
//! submissions, builders, and the log index (derivation → its latest build).
//!
//! Layout: one sled tree per kind, keys big-endian `u64` ids (names for
//! builders, derivation base names for the log index), values JSON records
//! (`scheduler::types`). Finished outputs are not here: the cache is the truth
//! for those. Writes that must survive a `kill -9` are followed by [`Store::flush`].

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
}

/// Handle on the database (cheap to clone).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
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
        Ok(Store {
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

    /// Make every write so far durable.
    pub async fn flush(&self) -> Result<(), StateError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Make every write so far durable, blocking.
    pub fn flush_blocking(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
