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
//! path: NAR file, NAR directory, narinfo file, root directory. S3-compatible
//! stores are durable by contract and are not wrapped.
//!
//! The cache relies on this order: the NAR's `rename` returns only once the
//! NAR is durable, the narinfo's `put` only once the narinfo is, and only then
//! does the cache publish the path in its index (what uploads are acknowledged
//! with and what `verify_outputs` checks before a build counts as built).

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
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
            scratch: ObjectPath::from(scratch),
        })
    }

    /// A handle that syncs `location` off the runtime (`None` for scratch).
    fn syncer(&self, location: &ObjectPath) -> object_store::Result<Option<Syncer>> {
        if location.prefix_matches(&self.scratch) {
            return Ok(None);
        }
        Ok(Some(Syncer {
            file: self.layout.path_to_filesystem(location)?,
            root: self.root.clone(),
            fsync: self.fsync.clone(),
            synced_dirs: self.synced_dirs.clone(),
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
        tokio::task::spawn_blocking(move || self.blocking())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|e| object_store::Error::Generic {
                store: "DurableLocal",
                source: format!("fsync {}: {e}", path.display()).into(),
            })
    }

    /// The file, the directory naming it, then each directory up to the root
    /// whose entry has not been synced yet (a write may have just created it).
    fn blocking(&self) -> std::io::Result<()> {
        self.fsync.file(&self.file)?;
        let Some(mut dir) = self.file.parent().map(Path::to_path_buf) else {
            return Ok(());
        };
        self.fsync.dir(&dir)?;
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
