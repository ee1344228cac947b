//! Durability for the local storage backend: `object_store`'s
//! `LocalFileSystem` writes into a staging file and renames it into place, but
//! never fsyncs, so after a power cut an object it reported written may be
//! missing or empty. [`DurableLocal`] wraps it (any `ObjectStore` whose objects
//! are files under one root) and, before a write returns, fsyncs the object's
//! file and the directory holding its name, plus, once per process, every
//! directory between it and the root that a write may have just created.
//!
//! Writes covered: `put`, a multipart upload's `complete`, `copy`, `rename`
//! and their `_if_not_exists` forms (the destination is synced). Reads, lists
//! and deletes pass straight through. Objects under the scratch prefix (the
//! cache's `tmp/`) are not synced when written: they only become something
//! when renamed out of it, and the rename syncs the destination (its data
//! too, since it is the same file). That leaves four fsyncs per published
//! path: NAR file, NAR directory, narinfo file, root directory. The two
//! directory fsyncs are shared by the writers whose changes are done when
//! one starts (group commit, [`DirGroup`]): uploads finishing together wait
//! for one fsync of `nar/` and one of the root rather than one each in turn.
//! S3-compatible stores are durable by contract and are not wrapped.
//!
//! The cache relies on this order: the NAR's `rename` returns only once the
//! NAR is durable, the narinfo's `put` only once the narinfo is, and only then
//! does the cache publish the path in its index (what uploads are acknowledged
//! with and what `verify_outputs` checks before a build counts as built).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

/// How files and directories are made durable (tests record the calls).
pub(crate) trait Fsync: Send + Sync + fmt::Debug {
    /// Flush a file's data and metadata to disk.
    fn file(&self, path: &Path) -> std::io::Result<()>;
    /// Flush a directory's entries to disk.
    fn dir(&self, path: &Path) -> std::io::Result<()>;
}

/// The real thing: `fsync(2)` through `File::sync_all`.
#[derive(Debug, Default)]
pub(crate) struct OsFsync;

impl Fsync for OsFsync {
    fn file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }

    fn dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
}

/// A local object store whose writes are durable when they return.
#[derive(Debug)]
pub(crate) struct DurableLocal {
    inner: Arc<dyn ObjectStore>,
    /// Maps object keys to files (the same layout as `inner`).
    layout: LocalFileSystem,
    root: PathBuf,
    fsync: Arc<dyn Fsync>,
    /// Directories under `root` whose own entry is known to be durable.
    synced_dirs: Arc<Mutex<HashSet<PathBuf>>>,
    /// Each directory's group commit (see [`DirGroup`]).
    groups: Arc<Mutex<HashMap<PathBuf, Arc<DirGroup>>>>,
    /// Keys under this prefix are scratch: written without syncing.
    scratch: ObjectPath,
}

impl DurableLocal {
    /// Wrap `inner`, whose objects are the files under `root` (created if
    /// missing); objects under `scratch` are not synced when written.
    pub(crate) fn new(
        root: &Path,
        inner: Arc<dyn ObjectStore>,
        scratch: &str,
    ) -> object_store::Result<DurableLocal> {
        DurableLocal::with_fsync(root, inner, scratch, Arc::new(OsFsync))
    }

    /// As [`DurableLocal::new`], syncing through `fsync`.
    pub(crate) fn with_fsync(
        root: &Path,
        inner: Arc<dyn ObjectStore>,
        scratch: &str,
        fsync: Arc<dyn Fsync>,
    ) -> object_store::Result<DurableLocal> {
        let io = |e: std::io::Error| object_store::Error::Generic {
            store: "DurableLocal",
            source: Box::new(e),
        };
        std::fs::create_dir_all(root).map_err(io)?;
        let root = std::fs::canonicalize(root).map_err(io)?;
        // The root itself may be new: make its entry durable once.
        if let Some(parent) = root.parent() {
            fsync.dir(parent).map_err(io)?;
        }
        let layout = LocalFileSystem::new_with_prefix(&root)?;
        Ok(DurableLocal {
            inner,
            layout,
            root,
            fsync,
            synced_dirs: Arc::new(Mutex::new(HashSet::new())),
            groups: Arc::new(Mutex::new(HashMap::new())),
            scratch: ObjectPath::from(scratch),
        })
    }

    /// A handle that syncs `location` off the runtime (`None` for scratch).
    fn syncer(&self, location: &ObjectPath) -> object_store::Result<Option<Syncer>> {
        if location.prefix_matches(&self.scratch) {
            return Ok(None);
        }
        let file = self.layout.path_to_filesystem(location)?;
        let group = file.parent().map(|dir| {
            self.groups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(dir.to_path_buf())
                .or_default()
                .clone()
        });
        Ok(Some(Syncer {
            file,
            root: self.root.clone(),
            fsync: self.fsync.clone(),
            synced_dirs: self.synced_dirs.clone(),
            group,
        }))
    }
}

/// Everything needed to make one object durable, owned (for `spawn_blocking`
/// and for a multipart upload that outlives the borrow of the store).
#[derive(Debug, Clone)]
struct Syncer {
    file: PathBuf,
    root: PathBuf,
    fsync: Arc<dyn Fsync>,
    synced_dirs: Arc<Mutex<HashSet<PathBuf>>>,
    /// The group commit of the file's directory.
    group: Option<Arc<DirGroup>>,
}

/// Group commit of one directory's fsyncs: an fsync of a directory that
/// starts after a change to it (a rename into it returned) makes that change
/// durable, so writers whose changes are all done when one writer's fsync
/// starts share that fsync instead of each making its own, one after the
/// other. Every writer still returns only after an fsync that started after
/// its own change; a failed fsync covers nobody (each waiting writer then
/// makes its own).
#[derive(Debug, Default)]
struct DirGroup {
    /// Changes done so far (each writer counts its own before its sync).
    done: AtomicU64,
    /// How many of them a finished fsync covers.
    synced: AtomicU64,
    /// Held while an fsync of the directory runs (by a blocking thread).
    running: Mutex<()>,
}

impl DirGroup {
    /// Make `dir` durable for a change to it that is done (blocking).
    fn sync(&self, dir: &Path, fsync: &dyn Fsync) -> std::io::Result<()> {
        let mine = self.done.fetch_add(1, Ordering::SeqCst) + 1;
        let _turn = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if self.synced.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        // Every change counted by now is done: this fsync covers them all.
        let upto = self.done.load(Ordering::SeqCst);
        fsync.dir(dir)?;
        self.synced.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }
}

/// Run the syncer, if there is one.
async fn sync(syncer: Option<Syncer>) -> object_store::Result<()> {
    match syncer {
        Some(s) => s.run().await,
        None => Ok(()),
    }
}

impl Syncer {
    async fn run(self) -> object_store::Result<()> {
        let path = self.file.clone();
        self.durable()
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "DurableLocal",
                source: format!("fsync {}: {e}", path.display()).into(),
            })
    }

    /// The file and the directory naming it at once (both are written by
    /// now; two fsyncs in flight together share the filesystem's journal
    /// commit where one after the other each waits for its own), the
    /// directory's fsync shared with other writers' (see [`DirGroup`]); then
    /// each directory up to the root whose entry has not been synced yet (a
    /// write may have just created it).
    async fn durable(self) -> std::io::Result<()> {
        let this = Arc::new(self);
        let blocking = |f: Box<dyn FnOnce() -> std::io::Result<()> + Send>| async move {
            tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
        };
        let Some(dir) = this.file.parent().map(Path::to_path_buf) else {
            let s = this.clone();
            return blocking(Box::new(move || s.fsync.file(&s.file))).await;
        };
        let (s, d) = (this.clone(), dir.clone());
        let file = blocking(Box::new(move || s.fsync.file(&s.file)));
        let (s, d2) = (this.clone(), dir.clone());
        let entry = blocking(Box::new(move || match &s.group {
            Some(g) => g.sync(&d2, s.fsync.as_ref()),
            None => s.fsync.dir(&d2),
        }));
        let (file, entry) = tokio::join!(file, entry);
        file?;
        entry?;
        let known = |d: &Path| {
            this.synced_dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(d)
        };
        if d == this.root || !d.starts_with(&this.root) || known(&d) {
            return Ok(());
        }
        blocking(Box::new(move || this.ancestors(dir))).await
    }

    /// Each directory from `dir` up to the root whose entry has not been
    /// synced yet: its parent is synced.
    fn ancestors(&self, mut dir: PathBuf) -> std::io::Result<()> {
        while dir != self.root && dir.starts_with(&self.root) {
            let known = self
                .synced_dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&dir);
            if known {
                break;
            }
            let Some(parent) = dir.parent().map(Path::to_path_buf) else {
                break;
            };
            self.fsync.dir(&parent)?;
            self.synced_dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(dir);
            dir = parent;
        }
        Ok(())
    }
}

impl fmt::Display for DurableLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DurableLocal({})", self.inner)
    }
}

/// A multipart upload whose `complete` returns once the object is durable.
#[derive(Debug)]
struct DurableUpload {
    inner: Box<dyn MultipartUpload>,
    syncer: Option<Syncer>,
}

#[async_trait]
impl MultipartUpload for DurableUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let r = self.inner.complete().await?;
        sync(self.syncer.clone()).await?;
        Ok(r)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for DurableLocal {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let syncer = self.syncer(location)?;
        let r = self.inner.put_opts(location, payload, opts).await?;
        sync(syncer).await?;
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let syncer = self.syncer(location)?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(DurableUpload { inner, syncer }))
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_range(
        &self,
        location: &ObjectPath,
        range: Range<u64>,
    ) -> object_store::Result<Bytes> {
        self.inner.get_range(location, range).await
    }

    async fn get_ranges(
        &self,
        location: &ObjectPath,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    async fn head(&self, location: &ObjectPath) -> object_store::Result<ObjectMeta> {
        self.inner.head(location).await
    }

    async fn delete(&self, location: &ObjectPath) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&ObjectPath>,
        offset: &ObjectPath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
        let syncer = self.syncer(to)?;
        self.inner.copy(from, to).await?;
        sync(syncer).await
    }

    async fn rename(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
        let syncer = self.syncer(to)?;
        self.inner.rename(from, to).await?;
        sync(syncer).await
    }

    async fn copy_if_not_exists(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
    ) -> object_store::Result<()> {
        let syncer = self.syncer(to)?;
        self.inner.copy_if_not_exists(from, to).await?;
        sync(syncer).await
    }

    async fn rename_if_not_exists(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
    ) -> object_store::Result<()> {
        let syncer = self.syncer(to)?;
        self.inner.rename_if_not_exists(from, to).await?;
        sync(syncer).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Counts directory fsyncs; each takes a while, as on a busy disk.
    #[derive(Debug, Default)]
    struct SlowFsync {
        dirs: AtomicUsize,
        /// Fsyncs started so far, read by writers before their change.
        started: AtomicUsize,
    }

    impl Fsync for SlowFsync {
        fn file(&self, _: &Path) -> std::io::Result<()> {
            Ok(())
        }

        fn dir(&self, _: &Path) -> std::io::Result<()> {
            self.started.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            self.dirs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn writers_finishing_together_share_a_directory_fsync_started_after_their_change() {
        let group = Arc::new(DirGroup::default());
        let fsync = Arc::new(SlowFsync::default());
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let (group, fsync) = (group.clone(), fsync.clone());
                std::thread::spawn(move || {
                    // The change is done now: a covering fsync starts later.
                    let before = fsync.started.load(Ordering::SeqCst);
                    group.sync(Path::new("/nowhere"), fsync.as_ref()).unwrap();
                    assert!(
                        fsync.started.load(Ordering::SeqCst) > before,
                        "returned without an fsync started after its change"
                    );
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let n = fsync.dirs.load(Ordering::SeqCst);
        assert!((1..8).contains(&n), "{n} fsyncs for 8 writers at once");
        // Alone, each writer makes its own.
        group.sync(Path::new("/nowhere"), fsync.as_ref()).unwrap();
        assert_eq!(fsync.dirs.load(Ordering::SeqCst), n + 1);
    }
}
