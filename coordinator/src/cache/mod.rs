//! The farm's binary cache: every output builders produce and every input a
//! client pushes lands here, verified and zstd-compressed; what the farm may
//! vouch for is signed, and every host can substitute that over HTTP (see
//! [`crate::api::http::cache`]); the rest stays its uploader's claim (below).
//!
//! Ingest ([`Cache::ingest`]) parses and verifies one NAR while it streams
//! (structure, sha256, size; the size claim bounds how much is read), compresses
//! it with zstd into a temporary object `tmp/…` of its own, then publishes it:
//! renames it to `nar/<filehash>.nar.zst` (filehash = nix32 sha256 of the
//! compressed bytes), and only then writes the signed `<hash>.narinfo`. A
//! reader therefore never sees a narinfo whose NAR is missing or partial; a
//! failed upload deletes its temporary object and publishes nothing.
//!
//! Uploads of one store path stream side by side, each into its own temporary
//! object; a per-path lock covers only the short publish step (is the path
//! there already? rename the NAR, write the narinfo). The first to finish
//! publishes; a later one, still verified against its own claim, discards its
//! object and returns what was published. So a slow or stalled uploader never
//! delays another upload of the same path (a builder's of its job's output),
//! and every upload has a deadline that grows with its claimed size
//! ([`CacheConfig::upload_grace_secs`], [`CacheConfig::upload_min_rate`]).
//!
//! Durability: the local backend is wrapped in [`durable::DurableLocal`], so
//! the NAR is on disk (file and directory fsynced) before the narinfo is
//! written, the narinfo before the path enters the index, and the index is
//! what an upload is acknowledged from and what a build's outputs are checked
//! against before the build counts as built.
//!
//! Trust ([`Trust`]): the cache signs only what it may. A trusted upload
//! ([`Trust::Signed`]: a push key's, a builder's output of its job) and a
//! verified one (a `.drv`, a checked content address) is published signed,
//! once everything it references is signed. Any other upload is the
//! uploader's claim ([`Trust::Claim`]): stored with an unsigned narinfo under
//! `claims/<owner dir>/` (its NAR beside it, in that directory's `nar/`),
//! never signed, never served over HTTP, visible only to that owner's
//! queries (the `*_for` methods), and never in the way of a signed path.
//!
//! First writer wins per hash part: once a path is published, an upload of
//! another name under the same hash part is refused
//! ([`CacheError::HashPartTaken`]), decided under the per-hash-part publish
//! lock, so two racing uploads cannot both win. Among one owner's claims the
//! same holds. References ([`content::check_references`]): each one but the
//! path itself must occur in the NAR (scanned while it streams) and be in
//! the cache, as the uploader sees it.
//!
//! The narinfos are also kept in an in-memory index (hash part → narinfo),
//! loaded from storage when the cache opens; this cache is the index's only
//! writer, so queries never touch storage. One size bound,
//! [`farm_nix::narinfo::MAX_NARINFO_SIZE`], holds for the narinfos ingest
//! writes and for those the index loads, so whatever was accepted is loaded
//! again after a restart.

pub(crate) mod content;
pub use drv_hashes::{DrvHashes, checked_modulo};
mod deadline;
mod drv_hashes;
pub(crate) mod durable;
mod error;
mod hashing;
mod pipeline;
mod storage;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock, Weak};

use async_compression::tokio::bufread::ZstdDecoder;
use farm_nix::hash::{Hash, HashAlgo};
use farm_nix::nar::{NarError, NarLimits, NarSummary};
use farm_nix::narinfo::{MAX_NARINFO_SIZE, NarInfo};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::signing::{SigningKey, VerifyingKey};
use farm_nix::store_path::StorePath;
use futures::{StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio_util::io::StreamReader;

use self::content::Presence;
use self::deadline::Deadline;
use crate::metrics::{CacheMetrics, UploadResult};
pub use error::CacheError;
pub use storage::StorageConfig;

/// The cache's settings. TOML (inside the coordinator's config):
/// ```toml
/// [cache]
/// zstd_level = 1
/// priority = 30
/// [cache.storage]
/// type = "local"
/// root = "/var/lib/farm/cache"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub storage: StorageConfig,
    /// zstd level for NARs and logs (1 fastest … 19 smallest; negative: faster still).
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// `Priority` in `nix-cache-info`: lower is preferred (cache.nixos.org is 40).
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// `WantMassQuery` in `nix-cache-info`.
    #[serde(default = "default_true")]
    pub want_mass_query: bool,
    /// The largest NAR accepted, in bytes.
    #[serde(default = "default_max_nar_size")]
    pub max_nar_size: u64,
    /// The largest build log kept, in bytes (uncompressed).
    #[serde(default = "default_max_log_size")]
    pub max_log_size: u64,
    /// Seconds every upload may take on top of its transfer time at
    /// `upload_min_rate`; an upload still unfinished then is refused.
    #[serde(default = "default_upload_grace_secs")]
    pub upload_grace_secs: u64,
    /// The slowest transfer allowed, in bytes per second of NAR: an upload of
    /// N bytes must end within `upload_grace_secs + N / upload_min_rate`
    /// seconds (0: the grace alone).
    #[serde(default = "default_upload_min_rate")]
    pub upload_min_rate: u64,
}

fn default_zstd_level() -> i32 {
    // The fastest level: ingest keeps pace with a fast uplink (see
    // docs/performance.md, "Cache ingest and reads", for its size cost).
    1
}
fn default_priority() -> u32 {
    30
}
fn default_true() -> bool {
    true
}
fn default_max_nar_size() -> u64 {
    64 << 30
}
fn default_max_log_size() -> u64 {
    256 << 20
}
fn default_upload_grace_secs() -> u64 {
    120
}
fn default_upload_min_rate() -> u64 {
    // 512 kbit/s: a slow uplink still gets through, a trickle does not.
    64 << 10
}

impl CacheConfig {
    /// Defaults, storing objects on the local filesystem under `root`.
    pub fn local(root: impl Into<std::path::PathBuf>) -> CacheConfig {
        CacheConfig {
            storage: StorageConfig::Local { root: root.into() },
            zstd_level: default_zstd_level(),
            priority: default_priority(),
            want_mass_query: true,
            max_nar_size: default_max_nar_size(),
            max_log_size: default_max_log_size(),
            upload_grace_secs: default_upload_grace_secs(),
            upload_min_rate: default_upload_min_rate(),
        }
    }
}

/// Who vouches for an upload, and so where it is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Published and signed: the caller decided the uploader may (a push key,
    /// a builder's output of a job it was assigned).
    Signed,
    /// An unverified upload of a client without the push right: stored as
    /// that client's claim, unsigned and visible only to `owner` (the client
    /// key's fingerprint). A verified path (a `.drv`, a checked `ca`) whose
    /// references are all signed is published signed all the same.
    Claim { owner: String },
}

/// One owner's claims: hash part → unsigned narinfo.
type Claims = HashMap<String, Arc<NarInfo>>;

/// A published narinfo with its text as served, rendered once when it enters
/// the index, so an HTTP lookup copies nothing.
struct Published {
    ni: Arc<NarInfo>,
    text: bytes::Bytes,
}

impl Published {
    fn new(ni: Arc<NarInfo>) -> Published {
        let text = bytes::Bytes::from(ni.render());
        Published { ni, text }
    }
}

/// The binary cache. Cheap to clone (one `Arc` inside).
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    config: CacheConfig,
    store: Arc<dyn ObjectStore>,
    key: SigningKey,
    public_key: VerifyingKey,
    /// hash part → published narinfo.
    index: RwLock<HashMap<String, Published>>,
    /// owner directory ([`owner_dir`]) → that owner's claims. Lock order:
    /// `index` before `claims`.
    claims: RwLock<HashMap<String, Claims>>,
    /// hash part → lock held while an upload of that path is published.
    publishing: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    /// Uploads, ingests and what is served (the coordinator exposes them).
    metrics: CacheMetrics,
    /// Checked derivations' hashes modulo, learnt at ingest and at submit.
    drv_hashes: DrvHashes,
}

/// Size of the buffer in front of the object store; larger NARs go up as a
/// multipart upload of parts this big.
const UPLOAD_CHUNK: usize = 8 << 20;
/// NARs up to this size are read whole and stored with one `put`
/// ([`Cache::upload_small_nar`]): for a `.drv` or a small output, the
/// pipeline's thread hand-offs and the multipart upload cost more than the
/// work (a 260-byte `.drv` took 1–3 ms to stream through them).
const SMALL_NAR: u64 = 128 << 10;
/// Parts of one NAR uploaded at once.
const UPLOAD_CONCURRENCY: usize = 4;
/// narinfo objects read at once when the cache opens.
const LOAD_CONCURRENCY: usize = 32;
/// Longest content-address string accepted from an uploader.
const MAX_CA_LEN: usize = 512;

/// Object keys.
fn narinfo_key(hash_part: &str) -> ObjectPath {
    ObjectPath::from(format!("{hash_part}.narinfo"))
}
fn nar_key(file_hash: &Hash) -> ObjectPath {
    ObjectPath::from(format!("nar/{}.nar.zst", file_hash.to_nix32()))
}
fn log_key(drv: &StorePath) -> ObjectPath {
    ObjectPath::from(format!("log/{}", drv.base_name()))
}
/// Where an owner's claims live: `claims/<nix32 sha256 of the owner>`, so any
/// fingerprint makes one safe, fixed-length directory name.
fn owner_dir(owner: &str) -> String {
    HashAlgo::Sha256.digest(owner.as_bytes()).to_nix32()
}
const CLAIMS: &str = "claims";
fn claim_narinfo_key(dir: &str, hash_part: &str) -> ObjectPath {
    ObjectPath::from(format!("{CLAIMS}/{dir}/{hash_part}.narinfo"))
}
fn claim_nar_key(dir: &str, file_hash: &Hash) -> ObjectPath {
    ObjectPath::from(format!(
        "{CLAIMS}/{dir}/nar/{}.nar.zst",
        file_hash.to_nix32()
    ))
}

impl Cache {
    /// Open (or create) the cache: connect its storage, delete temporary
    /// objects left by uploads a crash interrupted, and load the narinfo index.
    pub async fn open(config: CacheConfig, signing_key: SigningKey) -> Result<Cache, CacheError> {
        let store = config.storage.build()?;
        if let StorageConfig::Local { root } = &config.storage {
            // object_store's listing hides a local store's staging files
            // (`name#N`) of interrupted uploads: clear the directory itself.
            match std::fs::remove_dir_all(root.join("tmp")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(CacheError::Config(format!(
                        "clearing {}: {e}",
                        root.join("tmp").display()
                    )));
                }
                _ => {}
            }
        }
        Cache::with_store(config, store, signing_key).await
    }

    /// As [`Cache::open`], over an already built object store (tests use
    /// `object_store::memory::InMemory`); `config.storage` is then ignored.
    pub async fn with_store(
        config: CacheConfig,
        store: Arc<dyn ObjectStore>,
        signing_key: SigningKey,
    ) -> Result<Cache, CacheError> {
        if config.zstd_level > 22 || config.zstd_level < -7 {
            return Err(CacheError::Config(format!(
                "zstd level {} is outside -7..=22",
                config.zstd_level
            )));
        }
        // Leftovers of interrupted uploads: nothing refers to them.
        let tmp = ObjectPath::from("tmp");
        let leftovers: Vec<_> = store
            .list(Some(&tmp))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        for loc in leftovers {
            tracing::info!(object = %loc, "deleting leftover temporary upload");
            ignore_not_found(store.delete(&loc).await)?;
        }

        let index: HashMap<String, Published> = load_narinfos(&store, None)
            .await?
            .into_iter()
            .map(|(h, ni)| (h, Published::new(ni)))
            .collect();
        let claims = load_claims(&store).await?;
        tracing::info!(
            paths = index.len(),
            claims = claims.values().map(HashMap::len).sum::<usize>(),
            "binary cache opened"
        );
        let public_key = signing_key.verifying_key();
        Ok(Cache {
            inner: Arc::new(Inner {
                config,
                store,
                key: signing_key,
                public_key,
                index: RwLock::new(index),
                claims: RwLock::new(claims),
                publishing: Mutex::new(HashMap::new()),
                metrics: CacheMetrics::default(),
                drv_hashes: DrvHashes::default(),
            }),
        })
    }

    /// The key narinfos are signed with, for clients' `trusted-public-keys`.
    pub fn public_key(&self) -> VerifyingKey {
        self.inner.public_key.clone()
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// The object store behind the cache (tests list it to check nothing leaked).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.inner.store.clone()
    }

    /// Its counters (uploads, ingests, what is served).
    pub fn metrics(&self) -> &CacheMetrics {
        &self.inner.metrics
    }

    /// NAR bytes and stored (compressed) bytes of the published paths.
    pub fn sizes(&self) -> (u64, u64) {
        self.read_index().values().fold((0, 0), |(nar, file), p| {
            let ni = &p.ni;
            (nar + ni.info.nar_size, file + ni.file_size.unwrap_or(0))
        })
    }

    /// Number of published paths.
    pub fn len(&self) -> usize {
        self.read_index().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Published>> {
        // A poisoned lock only means a panic elsewhere mid-insert of a whole value.
        self.inner.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The published narinfo of the path whose hash part is `hash_part`.
    pub fn narinfo_by_hash(&self, hash_part: &str) -> Option<Arc<NarInfo>> {
        self.read_index().get(hash_part).map(|p| p.ni.clone())
    }

    /// The text of the published narinfo whose hash part is `hash_part`, as
    /// served over HTTP (rendered when it was published or loaded).
    pub fn narinfo_text(&self, hash_part: &str) -> Option<bytes::Bytes> {
        self.read_index().get(hash_part).map(|p| p.text.clone())
    }

    /// The published narinfo of `path` (`None` if absent, or if only another
    /// path with the same hash part is present).
    pub fn narinfo(&self, path: &StorePath) -> Option<Arc<NarInfo>> {
        self.narinfo_by_hash(path.hash_part())
            .filter(|ni| &ni.info.path == path)
    }

    fn read_claims(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Claims>> {
        self.inner.claims.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of claims, of all owners.
    pub fn claims_len(&self) -> usize {
        self.read_claims().values().map(HashMap::len).sum()
    }

    /// Run `f` with a lookup of what `owner` sees (`None`: everyone, the
    /// signed paths alone; `Some`: those plus that owner's claims, a claim
    /// only where no signed path holds its hash part).
    fn with_view<T>(
        &self,
        owner: Option<&str>,
        f: impl FnOnce(&dyn Fn(&StorePath) -> Option<(Arc<NarInfo>, Presence)>) -> T,
    ) -> T {
        let index = self.read_index();
        let claims = self.read_claims();
        let mine = owner.and_then(|o| claims.get(&owner_dir(o)));
        let look = |p: &StorePath| match index.get(p.hash_part()).map(|e| &e.ni) {
            Some(ni) => (&ni.info.path == p).then(|| (ni.clone(), Presence::Signed)),
            None => mine?
                .get(p.hash_part())
                .filter(|ni| &ni.info.path == p)
                .map(|ni| (ni.clone(), Presence::Claimed)),
        };
        f(&look)
    }

    fn valid_paths_in(&self, owner: Option<&str>, paths: &[StorePath]) -> BTreeSet<StorePath> {
        self.with_view(owner, |look| {
            paths
                .iter()
                .filter(|p| look(p).is_some())
                .cloned()
                .collect()
        })
    }

    /// Which of `paths` are published (signed).
    pub async fn valid_paths(
        &self,
        paths: &[StorePath],
    ) -> Result<BTreeSet<StorePath>, CacheError> {
        Ok(self.valid_paths_in(None, paths))
    }

    /// Which of `paths` `owner` sees: published ones and its own claims.
    pub async fn valid_paths_for(
        &self,
        owner: &str,
        paths: &[StorePath],
    ) -> Result<BTreeSet<StorePath>, CacheError> {
        Ok(self.valid_paths_in(Some(owner), paths))
    }

    /// The hashes modulo of the derivations checked so far (see [`DrvHashes`]).
    pub fn drv_hashes(&self) -> &DrvHashes {
        &self.inner.drv_hashes
    }

    /// The published info of `path` (signed with the cache's key).
    pub async fn path_info(&self, path: &StorePath) -> Result<Option<ValidPathInfo>, CacheError> {
        Ok(self.narinfo(path).map(|ni| ni.info.clone()))
    }

    /// The info of `path` as `owner` sees it: signed if published, unsigned
    /// if it is only `owner`'s claim.
    pub async fn path_info_for(
        &self,
        owner: &str,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, CacheError> {
        Ok(self.with_view(Some(owner), |look| {
            look(path).map(|(ni, _)| ni.info.clone())
        }))
    }

    fn closure_in(&self, owner: Option<&str>, paths: &[StorePath]) -> BTreeSet<StorePath> {
        self.with_view(owner, |look| {
            let mut seen = BTreeSet::new();
            let mut queue: VecDeque<StorePath> = paths.iter().cloned().collect();
            while let Some(p) = queue.pop_front() {
                if seen.contains(&p) {
                    continue;
                }
                let Some((ni, _)) = look(&p) else {
                    continue;
                };
                for r in &ni.info.references {
                    if !seen.contains(r) {
                        queue.push_back(r.clone());
                    }
                }
                seen.insert(p);
            }
            seen
        })
    }

    /// The closure of `paths` under references, restricted to present paths:
    /// absent roots and absent references are left out.
    pub async fn closure(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, CacheError> {
        Ok(self.closure_in(None, paths))
    }

    /// As [`Cache::closure`], over what `owner` sees.
    pub async fn closure_for(
        &self,
        owner: &str,
        paths: &[StorePath],
    ) -> Result<BTreeSet<StorePath>, CacheError> {
        Ok(self.closure_in(Some(owner), paths))
    }

    /// The decompressed NAR of `path`, streaming; `None` if the path is absent.
    pub async fn nar_reader(
        &self,
        path: &StorePath,
    ) -> Result<Option<Box<dyn AsyncRead + Unpin + Send>>, CacheError> {
        match self.narinfo(path) {
            Some(ni) => self.open_nar(&ni).await.map(Some),
            None => Ok(None),
        }
    }

    /// As [`Cache::nar_reader`], also for `owner`'s claims.
    pub async fn nar_reader_for(
        &self,
        owner: &str,
        path: &StorePath,
    ) -> Result<Option<Box<dyn AsyncRead + Unpin + Send>>, CacheError> {
        match self.with_view(Some(owner), |look| look(path).map(|(ni, _)| ni)) {
            Some(ni) => self.open_nar(&ni).await.map(Some),
            None => Ok(None),
        }
    }

    async fn open_nar(
        &self,
        ni: &NarInfo,
    ) -> Result<Box<dyn AsyncRead + Unpin + Send>, CacheError> {
        let key = ObjectPath::from(ni.url.as_str());
        let stream = self
            .inner
            .store
            .get(&key)
            .await?
            .into_stream()
            .map_err(std::io::Error::other);
        let reader = StreamReader::new(stream);
        match ni.compression.as_str() {
            "zstd" => Ok(Box::new(ZstdDecoder::new(reader))),
            "none" => Ok(Box::new(reader)),
            other => Err(CacheError::Corrupt {
                key: key.to_string(),
                reason: format!("unknown compression {other:?}"),
            }),
        }
    }

    /// The key of the compressed NAR object `nar/<name>`, for HTTP.
    /// `name` must already be validated (`<nix32 sha256>.nar.zst`).
    pub(crate) fn nar_object_key(name: &str) -> ObjectPath {
        ObjectPath::from(format!("nar/{name}"))
    }

    /// Verify and store one NAR for `claimed.path` (see the module docs). Reads
    /// exactly one NAR from `nar` (not a byte past its end) and returns the
    /// stored info: `claimed`'s path, deriver, references, CA and NAR hash/size,
    /// with the uploader's signatures replaced by the cache's own when it is
    /// published signed, or none when it is stored as `trust`'s claim.
    ///
    /// Refused before a byte is read: a path whose hash part is taken by
    /// another name ([`CacheError::HashPartTaken`]), a reference the uploader
    /// cannot see in the cache ([`CacheError::BadReference`]). If the path is
    /// already present, the upload is still read and checked against its own
    /// claim, and the info already stored is returned (its NAR hash may differ
    /// from the claim's if the path was built twice, non-deterministically). A
    /// claim of a path published signed returns the signed info. The NAR is
    /// bounded by the claimed size while it streams, and must arrive within
    /// the time that size allows ([`CacheError::UploadTimedOut`]). Returns once
    /// NAR and narinfo are durable. Cancel-safe: a dropped ingest deletes its
    /// temporary object.
    pub async fn ingest(
        &self,
        claimed: ValidPathInfo,
        nar: impl AsyncRead + Unpin + Send,
        trust: Trust,
    ) -> Result<ValidPathInfo, CacheError> {
        self.ingest_inner(claimed, nar, trust, false).await
    }

    /// As [`Cache::ingest`], for a stream that must hold the NAR and nothing
    /// else: bytes after the NAR's end are refused before anything is published.
    pub async fn ingest_exact(
        &self,
        claimed: ValidPathInfo,
        nar: impl AsyncRead + Unpin + Send,
        trust: Trust,
    ) -> Result<ValidPathInfo, CacheError> {
        self.ingest_inner(claimed, nar, trust, true).await
    }

    async fn ingest_inner(
        &self,
        claimed: ValidPathInfo,
        nar: impl AsyncRead + Unpin + Send,
        trust: Trust,
        exact: bool,
    ) -> Result<ValidPathInfo, CacheError> {
        let started = std::time::Instant::now();
        let nar_size = claimed.nar_size;
        let r = self.ingest_checked(claimed, nar, trust, exact).await;
        let result = match r {
            Ok(_) => UploadResult::Accepted,
            Err(_) => UploadResult::Refused,
        };
        self.inner.metrics.upload_ended(result, nar_size, started);
        r
    }

    async fn ingest_checked(
        &self,
        claimed: ValidPathInfo,
        nar: impl AsyncRead + Unpin + Send,
        trust: Trust,
        exact: bool,
    ) -> Result<ValidPathInfo, CacheError> {
        let (check, mut narinfo) = self.check_claim(&claimed)?;
        let owner = match &trust {
            Trust::Signed => None,
            Trust::Claim { owner } => Some(owner.as_str()),
        };
        let refs_signed = self
            .with_view(owner, |look| {
                content::check_references(&check, |r| look(r).map(|(_, p)| p))
            })
            .map_err(|(reference, reason)| CacheError::BadReference {
                path: claimed.path.clone(),
                reference,
                reason,
            })?;
        // `None`: published signed; `Some(dir)`: stored as that owner's claim.
        let dest = match owner {
            Some(o) if !content::signs(false, &check, refs_signed) => {
                narinfo.info.sigs.clear();
                Some(owner_dir(o))
            }
            _ => None,
        };
        let config = &self.inner.config;
        let mut nar = Deadline::new(
            nar,
            deadline::upload_time_limit(
                claimed.nar_size,
                config.upload_grace_secs,
                config.upload_min_rate,
            ),
        );
        match self
            .ingest_stream(&claimed, &check, narinfo, dest.as_deref(), &mut nar, exact)
            .await
        {
            Err(e) if nar.expired() => {
                tracing::info!(path = %claimed.path, error = %e, "upload timed out");
                Err(CacheError::UploadTimedOut {
                    path: claimed.path.clone(),
                    nar_size: claimed.nar_size,
                    limit_secs: nar.limit().as_secs(),
                })
            }
            r => r,
        }
    }

    /// What an upload of `path` into `dest` (`None`: the signed paths;
    /// `Some(dir)`: that owner's claims) meets: the info to return instead
    /// of publishing it, or a refusal if its hash part is taken by another
    /// name. A signed path decides for everyone; a claim only among its
    /// owner's claims, and never for a signed upload.
    fn existing(
        &self,
        path: &StorePath,
        dest: Option<&str>,
    ) -> Result<Option<ValidPathInfo>, CacheError> {
        let decide = |ni: &NarInfo| {
            if &ni.info.path == path {
                Ok(Some(ni.info.clone()))
            } else {
                Err(CacheError::HashPartTaken {
                    path: path.clone(),
                    existing: ni.info.path.clone(),
                })
            }
        };
        if let Some(ni) = self.narinfo_by_hash(path.hash_part()) {
            return decide(&ni);
        }
        if let Some(dir) = dest
            && let Some(ni) = self
                .read_claims()
                .get(dir)
                .and_then(|c| c.get(path.hash_part()))
        {
            return decide(ni);
        }
        Ok(None)
    }

    /// Read, verify and (unless the path is there already) publish one NAR;
    /// `narinfo` is the claim's narinfo (signed unless `dest` names an
    /// owner's claims), still without its NAR's URL, file hash and file size.
    async fn ingest_stream(
        &self,
        claimed: &ValidPathInfo,
        check: &content::ContentCheck,
        narinfo: NarInfo,
        dest: Option<&str>,
        nar: &mut (impl AsyncRead + Unpin + Send),
        exact: bool,
    ) -> Result<ValidPathInfo, CacheError> {
        let limits = NarLimits {
            max_total_size: claimed.nar_size,
            ..NarLimits::default()
        };
        if let Some(existing) = self.existing(&claimed.path, dest)? {
            // Stored already: still read and check the upload, so the caller's
            // stream stays in step and a bad upload is still refused.
            let (summary, contents) =
                content::copy_inspect(nar, &mut tokio::io::sink(), &limits, check)
                    .await
                    .map_err(|source| CacheError::BadNar {
                        path: claimed.path.clone(),
                        source,
                    })?;
            if exact {
                expect_end(claimed, nar).await?;
            }
            check_summary(claimed, &summary)?;
            check_content(claimed, check, &summary, &contents, &self.inner.drv_hashes)?;
            tracing::debug!(path = %claimed.path, "already in the cache");
            return Ok(existing);
        }

        let began = std::time::Instant::now();
        // This upload's own object: no other upload of the path waits for it.
        let tmp = ObjectPath::from(format!(
            "tmp/{}-{:016x}.nar.zst",
            claimed.path.hash_part(),
            rand::random::<u64>()
        ));
        let store = &self.inner.store;
        // Deletes `tmp` if this future is dropped (cancelled) before it is renamed.
        let mut guard = TmpGuard {
            store: store.clone(),
            path: Some(tmp.clone()),
        };
        let (file_hash, file_size) = match self
            .upload_nar(claimed, check, nar, &limits, &tmp, exact)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                // The upload was aborted; make sure nothing stays behind.
                guard.path = None;
                if let Err(de) = ignore_not_found(store.delete(&tmp).await) {
                    tracing::warn!(object = %tmp, error = %de, "cannot delete failed upload");
                }
                return Err(e);
            }
        };

        let streamed = began.elapsed();
        // Publish: only this short step is serialised per hash part, so of
        // two racing uploads under one hash part exactly one publishes.
        let lock = self.path_lock(claimed.path.hash_part());
        let _publishing = lock.lock().await;
        let publishing = std::time::Instant::now();
        let existing = self.existing(&claimed.path, dest);
        if !matches!(existing, Ok(None)) {
            // Another upload finished first: ours is not needed, or refused.
            guard.path = None;
            if let Err(de) = ignore_not_found(store.delete(&tmp).await) {
                tracing::warn!(object = %tmp, error = %de, "cannot delete a superseded upload");
            }
            tracing::debug!(path = %claimed.path, "published meanwhile by another upload");
            return existing.map(|e| e.expect("matched Some"));
        }

        let (nar_obj, narinfo_obj) = match dest {
            None => (nar_key(&file_hash), narinfo_key(claimed.path.hash_part())),
            Some(dir) => (
                claim_nar_key(dir, &file_hash),
                claim_narinfo_key(dir, claimed.path.hash_part()),
            ),
        };
        // Durable when it returns (see `durable`): the NAR is on disk before
        // the narinfo that names it is written.
        let renamed = store.rename(&tmp, &nar_obj).await;
        let nar_durable = publishing.elapsed();
        guard.path = None;
        if let Err(e) = renamed {
            let _ = ignore_not_found(store.delete(&tmp).await);
            return Err(e.into());
        }

        let narinfo = NarInfo {
            url: nar_obj.to_string(),
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            ..narinfo
        };
        let text = bytes::Bytes::from(narinfo.render());
        if let Err(e) = store
            .put(&narinfo_obj, PutPayload::from(text.clone()))
            .await
        {
            // Unpublished: drop the NAR object unless another narinfo uses it
            // (identical NARs of different paths share one object).
            let shared = match dest {
                None => self.read_index().values().any(|p| p.ni.url == narinfo.url),
                Some(dir) => self
                    .read_claims()
                    .get(dir)
                    .is_some_and(|c| c.values().any(|ni| ni.url == narinfo.url)),
            };
            if !shared {
                let _ = ignore_not_found(store.delete(&nar_obj).await);
            }
            return Err(e.into());
        }
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            path = %narinfo.info.path,
            nar_size = narinfo.info.nar_size,
            file_size,
            signed = dest.is_none(),
            stream_ms = format_args!("{:.1}", ms(streamed)),
            nar_ms = format_args!("{:.1}", ms(nar_durable)),
            publish_ms = format_args!("{:.1}", ms(publishing.elapsed())),
            "stored in the cache"
        );
        self.inner
            .metrics
            .ingested(narinfo.info.nar_size, file_size);
        let info = narinfo.info.clone();
        let hash_part = claimed.path.hash_part().to_string();
        // Only now, with NAR and narinfo durable, is the path visible: to
        // queries, to the uploader's acknowledgement, to `verify_outputs`.
        match dest {
            None => {
                self.inner
                    .index
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        hash_part,
                        Published {
                            ni: Arc::new(narinfo),
                            text,
                        },
                    );
            }
            Some(dir) => {
                self.inner
                    .claims
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(dir.to_string())
                    .or_default()
                    .insert(hash_part, Arc::new(narinfo));
            }
        }
        Ok(info)
    }

    /// Stream, verify and compress the NAR into `tmp`. Two stages at once
    /// (see [`pipeline`]): this task parses, hashes and scans the NAR and
    /// writes the compressed bytes to storage (hashing them), a blocking
    /// thread compresses. On error the multipart upload (if any) is aborted;
    /// the caller deletes `tmp`.
    async fn upload_nar(
        &self,
        claimed: &ValidPathInfo,
        check: &content::ContentCheck,
        nar: &mut (impl AsyncRead + Unpin + Send),
        limits: &NarLimits,
        tmp: &ObjectPath,
        exact: bool,
    ) -> Result<(Hash, u64), CacheError> {
        if claimed.nar_size <= SMALL_NAR {
            return self
                .upload_small_nar(claimed, check, nar, limits, tmp, exact)
                .await;
        }
        let mut upload = hashing::HashingWriter::new(
            BufWriter::with_capacity(self.inner.store.clone(), tmp.clone(), UPLOAD_CHUNK)
                .with_max_concurrency(UPLOAD_CONCURRENCY),
        );
        let (nar_tx, nar_rx) = tokio::sync::mpsc::channel(pipeline::DEPTH);
        let (zst_tx, zst_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(pipeline::DEPTH);
        let level = self.inner.config.zstd_level;
        // Ends when its input closes (the parse ended, or this future was
        // dropped) or its output does (storage failed).
        let compressor =
            tokio::task::spawn_blocking(move || pipeline::compress(nar_rx, zst_tx, level));
        let parse = async {
            let mut sink = pipeline::ChunkSender::new(nar_tx);
            let mut copied = content::copy_inspect(nar, &mut sink, limits, check).await;
            if exact
                && copied.is_ok()
                && let Err(e) = farm_nix::nar::expect_eof(nar).await
            {
                copied = Err(e);
            }
            // Only a whole NAR is sent to its end; a failed one is dropped
            // (closing the channel) and its output discarded below.
            if copied.is_ok()
                && let Err(e) = sink.shutdown().await
            {
                copied = Err(NarError::Io(e));
            }
            (copied, sink.downstream_failed())
        };
        let store = async {
            // Moved in: dropped as soon as storage fails, which stops the
            // compressor and then the parse.
            let mut zst_rx = zst_rx;
            while let Some(chunk) = zst_rx.recv().await {
                upload.write_all(&chunk).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let ((copied, downstream_failed), stored) = tokio::join!(parse, store);
        let compressed = match compressor.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        let storage_err = stored.err().or_else(|| compressed.err());
        let checked = match copied {
            Ok((summary, contents)) => match storage_err {
                Some(e) => Err(CacheError::StorageIo(e)),
                None => check_summary(claimed, &summary).and_then(|()| {
                    check_content(claimed, check, &summary, &contents, &self.inner.drv_hashes)
                }),
            },
            Err(NarError::Io(e)) if downstream_failed || upload.failed() => {
                Err(CacheError::StorageIo(storage_err.unwrap_or(e)))
            }
            Err(source) => Err(CacheError::BadNar {
                path: claimed.path.clone(),
                source,
            }),
        };
        if let Err(e) = checked {
            if let Err(ae) = upload.inner_mut().abort().await {
                tracing::warn!(object = %tmp, error = %ae, "cannot abort upload");
            }
            return Err(e);
        }
        // Completes the upload. On failure the writer cleans up after itself
        // (and must not be aborted: `BufWriter::abort` panics once shut down);
        // the caller still deletes `tmp`.
        if let Err(e) = upload.shutdown().await {
            return Err(CacheError::StorageIo(e));
        }
        Ok(upload.finish())
    }

    /// [`Cache::upload_nar`] for a NAR of at most [`SMALL_NAR`] bytes (its
    /// claimed size, which bounds what is read): read whole and checked,
    /// then compressed here and stored with one `put`; nothing is written
    /// for a NAR that fails its checks.
    async fn upload_small_nar(
        &self,
        claimed: &ValidPathInfo,
        check: &content::ContentCheck,
        nar: &mut (impl AsyncRead + Unpin + Send),
        limits: &NarLimits,
        tmp: &ObjectPath,
        exact: bool,
    ) -> Result<(Hash, u64), CacheError> {
        let bad = |source| CacheError::BadNar {
            path: claimed.path.clone(),
            source,
        };
        let mut whole = Vec::with_capacity(claimed.nar_size as usize);
        let (summary, contents) = content::copy_inspect(nar, &mut whole, limits, check)
            .await
            .map_err(bad)?;
        if exact {
            farm_nix::nar::expect_eof(nar).await.map_err(bad)?;
        }
        check_summary(claimed, &summary)?;
        check_content(claimed, check, &summary, &contents, &self.inner.drv_hashes)?;
        let compressed = zstd::bulk::compress(&whole, self.inner.config.zstd_level)
            .map_err(CacheError::StorageIo)?;
        let mut hasher = farm_nix::hash::Hasher::new(HashAlgo::Sha256);
        hasher.update(&compressed);
        let size = compressed.len() as u64;
        self.inner
            .store
            .put(tmp, PutPayload::from(compressed))
            .await?;
        Ok((hasher.finish(), size))
    }

    /// Check the claim alone; returns what must be checked in its NAR and the
    /// narinfo it will publish (signed; URL and file hash/size still to fill in).
    fn check_claim(
        &self,
        claimed: &ValidPathInfo,
    ) -> Result<(content::ContentCheck, NarInfo), CacheError> {
        let bad = |reason: String| CacheError::InvalidClaim {
            path: claimed.path.clone(),
            reason,
        };
        if claimed.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(bad("the NAR hash must be sha256".into()));
        }
        if claimed.nar_size == 0 {
            return Err(bad("the NAR size is zero".into()));
        }
        if claimed.nar_size > self.inner.config.max_nar_size {
            return Err(bad(format!(
                "the NAR is larger than the cache accepts ({} > {} bytes)",
                claimed.nar_size, self.inner.config.max_nar_size
            )));
        }
        if let Some(ca) = &claimed.ca {
            // It goes into the narinfo verbatim: no line breaks, nothing odd.
            if ca.is_empty()
                || ca.len() > MAX_CA_LEN
                || !ca.bytes().all(|b| b.is_ascii_graphic())
                || !(ca.starts_with("fixed:") || ca.starts_with("text:"))
            {
                return Err(bad("malformed content address".into()));
            }
        }
        let check = content::ContentCheck::for_claim(claimed).map_err(bad)?;

        let mut info = ValidPathInfo {
            path: claimed.path.clone(),
            deriver: claimed.deriver.clone(),
            nar_hash: claimed.nar_hash.clone(),
            references: claimed.references.clone(),
            // A narinfo does not carry it; 0 keeps index and storage identical.
            registration_time: 0,
            nar_size: claimed.nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: claimed.ca.clone(),
        };
        // The narinfo at its longest (signature, file hash and URL have fixed
        // lengths, the file size at most 20 digits) must be one the index
        // loads again; checked before the signing work.
        info.sigs.insert(self.inner.key.sign(""));
        let placeholder = HashAlgo::Sha256.digest(b"");
        let mut narinfo = NarInfo {
            info,
            url: nar_key(&placeholder).to_string(),
            compression: "zstd".to_string(),
            file_hash: Some(placeholder),
            file_size: Some(u64::MAX),
        };
        let len = narinfo.render().len();
        if len > MAX_NARINFO_SIZE {
            return Err(bad(format!(
                "its narinfo would be {len} bytes ({} references), more than the {MAX_NARINFO_SIZE} the cache accepts",
                claimed.references.len()
            )));
        }
        narinfo.info.sigs.clear();
        narinfo.info.sign(&self.inner.key);
        narinfo.file_hash = None;
        narinfo.file_size = None;
        Ok((check, narinfo))
    }

    fn path_lock(&self, hash_part: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .inner
            .publishing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(lock) = map.get(hash_part).and_then(Weak::upgrade) {
            return lock;
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(hash_part.to_string(), Arc::downgrade(&lock));
        lock
    }

    /// Store the build log of `drv`, zstd-compressed, under `log/<drv base name>`.
    pub async fn put_log(&self, drv: &StorePath, log: &[u8]) -> Result<(), CacheError> {
        if !drv.is_derivation() {
            return Err(CacheError::NotADerivation { drv: drv.clone() });
        }
        let limit = self.inner.config.max_log_size;
        if log.len() as u64 > limit {
            return Err(CacheError::LogTooLarge {
                size: log.len() as u64,
                limit,
            });
        }
        let level = self.inner.config.zstd_level;
        let data = log.to_vec();
        let compressed = tokio::task::spawn_blocking(move || zstd::bulk::compress(&data, level))
            .await
            .map_err(|e| CacheError::StorageIo(std::io::Error::other(e)))?
            .map_err(CacheError::StorageIo)?;
        self.inner
            .store
            .put(&log_key(drv), PutPayload::from(compressed))
            .await?;
        Ok(())
    }

    /// The build log of `drv`, if one was stored.
    pub async fn get_log(&self, drv: &StorePath) -> Result<Option<Vec<u8>>, CacheError> {
        if !drv.is_derivation() {
            return Ok(None);
        }
        let key = log_key(drv);
        let compressed = match self.inner.store.get(&key).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let limit = self.inner.config.max_log_size;
        let log = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut out = Vec::new();
            zstd::stream::read::Decoder::new(&compressed[..])?
                .take(limit + 1)
                .read_to_end(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .await
        .map_err(|e| CacheError::StorageIo(std::io::Error::other(e)))?
        .map_err(|e| CacheError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        if log.len() as u64 > limit {
            return Err(CacheError::Corrupt {
                key: key.to_string(),
                reason: "decompresses beyond the log size limit".into(),
            });
        }
        Ok(Some(log))
    }
}

/// Deletes a temporary object in the background when dropped while still armed
/// (`path` is `Some`): an ingest whose future was cancelled mid-upload.
struct TmpGuard {
    store: Arc<dyn ObjectStore>,
    path: Option<ObjectPath>,
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        let Some(path) = self.path.take() else {
            return;
        };
        let store = self.store.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = ignore_not_found(store.delete(&path).await) {
                    tracing::warn!(object = %path, error = %e, "cannot delete cancelled upload");
                }
            });
        }
    }
}

fn check_summary(claimed: &ValidPathInfo, summary: &NarSummary) -> Result<(), CacheError> {
    if summary.nar_size != claimed.nar_size {
        return Err(CacheError::SizeMismatch {
            path: claimed.path.clone(),
            claimed: claimed.nar_size,
            actual: summary.nar_size,
        });
    }
    if summary.nar_hash != claimed.nar_hash {
        return Err(CacheError::HashMismatch {
            path: claimed.path.clone(),
            claimed: Box::new(claimed.nar_hash.clone()),
            actual: Box::new(summary.nar_hash.clone()),
        });
    }
    Ok(())
}

/// Refuse bytes after the NAR.
async fn expect_end(
    claimed: &ValidPathInfo,
    nar: &mut (impl AsyncRead + Unpin),
) -> Result<(), CacheError> {
    farm_nix::nar::expect_eof(nar)
        .await
        .map_err(|source| CacheError::BadNar {
            path: claimed.path.clone(),
            source,
        })
}

/// Check the NAR's contents against the claim; a `.drv` that passes is also
/// checked for the memo of hashes modulo (`drv_hashes`; its outcome changes
/// nothing here: a submission checks what the memo does not know).
fn check_content(
    claimed: &ValidPathInfo,
    check: &content::ContentCheck,
    summary: &NarSummary,
    contents: &content::FileContents,
    drv_hashes: &DrvHashes,
) -> Result<(), CacheError> {
    let drv = content::verify(claimed, check, summary, contents).map_err(|reason| {
        CacheError::InvalidClaim {
            path: claimed.path.clone(),
            reason,
        }
    })?;
    if let Some(r) = content::unscanned_reference(check, contents) {
        return Err(CacheError::BadReference {
            path: claimed.path.clone(),
            reference: r.clone(),
            reason: "does not occur in its NAR (no file, symlink or name holds its hash part)"
                .into(),
        });
    }
    if let Some(drv) = drv {
        drv_hashes.learn(&claimed.path, &drv);
    }
    Ok(())
}

fn ignore_not_found(r: object_store::Result<()>) -> object_store::Result<()> {
    match r {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        r => r,
    }
}

/// Read every `<hash>.narinfo` directly under `prefix` (the top level when
/// `None`), up to [`MAX_NARINFO_SIZE`] bytes each: the bound ingest holds the
/// narinfos it writes to, so only a narinfo some other writer left is skipped.
async fn load_narinfos(
    store: &Arc<dyn ObjectStore>,
    prefix: Option<&ObjectPath>,
) -> Result<HashMap<String, Arc<NarInfo>>, CacheError> {
    let listing = store.list_with_delimiter(prefix).await?;
    let keys: Vec<_> = listing
        .objects
        .into_iter()
        .filter(|m| m.location.as_ref().ends_with(".narinfo"))
        .filter(|m| {
            let fits = m.size <= MAX_NARINFO_SIZE as u64;
            if !fits {
                tracing::warn!(object = %m.location, size = m.size, limit = MAX_NARINFO_SIZE, "narinfo larger than the cache writes; ignored");
            }
            fits
        })
        .map(|m| m.location)
        .collect();
    let loaded: Vec<Option<(String, Arc<NarInfo>)>> = futures::stream::iter(keys)
        .map(|key| {
            let store = store.clone();
            async move {
                let bytes = store.get(&key).await?.bytes().await?;
                let parsed = NarInfo::parse_bytes(&bytes);
                match parsed {
                    Ok(ni)
                        if key.filename()
                            == Some(&format!("{}.narinfo", ni.info.path.hash_part())) =>
                    {
                        Ok::<_, CacheError>(Some((
                            ni.info.path.hash_part().to_string(),
                            Arc::new(ni),
                        )))
                    }
                    Ok(_) => {
                        tracing::warn!(object = %key, "narinfo names another path; ignored");
                        Ok(None)
                    }
                    Err(e) => {
                        tracing::warn!(object = %key, error = %e, "unreadable narinfo; ignored");
                        Ok(None)
                    }
                }
            }
        })
        .buffer_unordered(LOAD_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(loaded.into_iter().flatten().collect())
}

/// Every owner's claims under `claims/<owner dir>/`, bounded as the index.
/// A claim never carries a signature, whatever the object holds.
async fn load_claims(store: &Arc<dyn ObjectStore>) -> Result<HashMap<String, Claims>, CacheError> {
    let owners = store
        .list_with_delimiter(Some(&ObjectPath::from(CLAIMS)))
        .await?
        .common_prefixes;
    let mut claims = HashMap::new();
    for dir in owners {
        let Some(name) = dir.filename().map(str::to_string) else {
            continue;
        };
        // An owner directory is a nix32 sha256 (52 characters); skip anything else.
        if name.len() != farm_nix::nixbase32::encoded_len(32)
            || !name
                .bytes()
                .all(|b| farm_nix::nixbase32::ALPHABET.contains(&b))
        {
            tracing::warn!(object = %dir, "not a claims directory; ignored");
            continue;
        }
        let mut mine = load_narinfos(store, Some(&dir)).await?;
        for ni in mine.values_mut() {
            if !ni.info.sigs.is_empty() {
                Arc::make_mut(ni).info.sigs.clear();
            }
        }
        if !mine.is_empty() {
            claims.insert(name, mine);
        }
    }
    Ok(claims)
}

#[cfg(test)]
pub(crate) mod tests;
