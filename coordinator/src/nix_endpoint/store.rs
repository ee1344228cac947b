//! The store behind both Nix protocols: the farm's cache. Path queries are
//! answered from its index, uploads are verified and ingested into it, and
//! NARs are streamed back out of it. Both protocol handlers call this; it
//! turns cache failures into the messages a Nix client prints (the details of
//! internal failures stay in the coordinator's log).
//!
//! Each session sees the store as its client does ([`FarmStore::for_client`]):
//! a client with the push right uploads signed paths and sees the signed ones;
//! any other client's unverified uploads are its own claims, which only its
//! own queries see (so `nix copy` does not send them again every time), and so
//! are the outputs of its claim builds, which its build hook copies back.

use std::collections::BTreeSet;

use farm_nix::content_address::{ContentAddress, make_text_path};
use farm_nix::derivation::{Derivation, read_drv};
use farm_nix::export::{ExportError, ExportReader};
use farm_nix::hash::HashAlgo;
use farm_nix::nar::{NarError, NarLimits, nar_of_bytes};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;
use farm_nix::wire::HandlerError;
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use crate::cache::{Cache, Trust};
use crate::nix_endpoint::error::handler_error;
use crate::nix_endpoint::ssh::ClientIdentity;

/// The cache as a Nix store.
#[derive(Clone)]
pub(crate) struct FarmStore {
    cache: Cache,
    /// Whose store this is: uploads get this trust, queries see its claims.
    who: Trust,
}

impl FarmStore {
    /// The store as a client with the push right sees it.
    pub(crate) fn new(cache: Cache) -> FarmStore {
        FarmStore {
            cache,
            who: Trust::Signed,
        }
    }

    /// The store as `client` sees it: signed uploads if its level is push or
    /// admin, its own claims otherwise (owned by its key's fingerprint).
    pub(crate) fn for_client(&self, client: &ClientIdentity) -> FarmStore {
        FarmStore {
            cache: self.cache.clone(),
            who: if client.level >= crate::access::Level::Push {
                Trust::Signed
            } else {
                Trust::Claim {
                    owner: client.fingerprint.clone(),
                }
            },
        }
    }

    fn owner(&self) -> Option<&str> {
        match &self.who {
            Trust::Signed => None,
            Trust::Claim { owner } => Some(owner),
        }
    }

    /// Which of `paths` the cache holds.
    pub(crate) async fn valid_paths(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        let list: Vec<StorePath> = paths.iter().cloned().collect();
        match self.owner() {
            None => self.cache.valid_paths(&list).await,
            Some(o) => self.cache.valid_paths_for(o, &list).await,
        }
        .map_err(|e| handler_error("querying valid paths", e))
    }

    pub(crate) async fn is_valid(&self, path: &StorePath) -> Result<bool, HandlerError> {
        Ok(self.path_info(path).await?.is_some())
    }

    /// The published info of `path` (with the cache's signature), or the
    /// client's own unsigned claim of it.
    pub(crate) async fn path_info(
        &self,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, HandlerError> {
        match self.owner() {
            None => self.cache.path_info(path).await,
            Some(o) => self.cache.path_info_for(o, path).await,
        }
        .map_err(|e| handler_error(&format!("querying {path}"), e))
    }

    /// The closure of `paths` under references (paths the cache lacks are left out).
    pub(crate) async fn closure(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        let list: Vec<StorePath> = paths.iter().cloned().collect();
        match self.owner() {
            None => self.cache.closure(&list).await,
            Some(o) => self.cache.closure_for(o, &list).await,
        }
        .map_err(|e| handler_error("computing a closure", e))
    }

    /// Stream the NAR of `path` to `out`. A path the cache lacks is an error.
    pub(crate) async fn write_nar(
        &self,
        path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, HandlerError> {
        let reader = match self.owner() {
            None => self.cache.nar_reader(path).await,
            Some(o) => self.cache.nar_reader_for(o, path).await,
        }
        .map_err(|e| handler_error(&format!("reading {path}"), e))?;
        let Some(reader) = reader else {
            return Err(HandlerError::new(format!(
                "path '{path}' is not valid in the farm's store"
            )));
        };
        let mut reader = self
            .cache
            .metrics()
            .meter_reader(crate::metrics::Via::Nix, reader);
        let n = tokio::io::copy(&mut reader, out).await.map_err(|e| {
            tracing::error!(%path, error = %e, "streaming a NAR out of the cache");
            HandlerError::new(format!("reading {path} from the farm's cache failed"))
        })?;
        Ok(n)
    }

    /// Verify and store one uploaded path; `nar` yields exactly its NAR.
    pub(crate) async fn add(
        &self,
        info: ValidPathInfo,
        nar: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<ValidPathInfo, HandlerError> {
        let path = info.path.clone();
        let stored = self
            .cache
            .ingest(info, nar, self.who.clone())
            .await
            .map_err(|e| handler_error(&format!("adding {path}"), e))?;
        tracing::debug!(%path, "path uploaded into the cache");
        Ok(stored)
    }

    /// Import an export stream (`nix-store --export` format): each NAR is
    /// spooled to a temporary file while it is validated (its hash and size
    /// come after it in the stream), then ingested. The spool is bounded by
    /// the cache's `max_nar_size` as it grows: a NAR over it is refused before
    /// a byte past the limit is written (a regular file too large for it
    /// before any of its contents), and nothing of it is published.
    pub(crate) async fn import(
        &self,
        stream: &mut (dyn AsyncRead + Unpin + Send),
        limits: &NarLimits,
    ) -> Result<Vec<StorePath>, HandlerError> {
        let spool_err = |e: std::io::Error| {
            tracing::error!(error = %e, "spooling an imported NAR");
            HandlerError::new("importing paths: cannot spool the NAR on the farm")
        };
        let limits = bounded_by(limits, self.cache.config().max_nar_size);
        let mut stream = stream;
        let mut reader = ExportReader::new(&mut stream, &limits);
        let mut imported = Vec::new();
        loop {
            let file = tempfile::tempfile().map_err(spool_err)?;
            let mut file = tokio::fs::File::from_std(file);
            let next = reader.next_path(&mut file).await.map_err(|e| match e {
                ExportError::Nar(NarError::NarTooLarge { .. } | NarError::FileTooLarge { .. }) => {
                    HandlerError::new(format!(
                        "importing paths: a NAR is larger than the farm's cache accepts (max_nar_size is {} bytes); nothing of it was stored",
                        self.cache.config().max_nar_size
                    ))
                }
                e => HandlerError::new(format!("importing paths: {e}")),
            })?;
            let Some(exported) = next else {
                return Ok(imported);
            };
            file.flush().await.map_err(spool_err)?;
            file.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(spool_err)?;
            let info = exported.to_path_info();
            self.add(info, &mut file).await?;
            imported.push(exported.path);
        }
    }

    /// A derivation in the cache (its `.drv` file), parsed; `None` if absent.
    pub(crate) async fn read_drv(
        &self,
        drv: &StorePath,
    ) -> Result<Option<Derivation>, HandlerError> {
        let reader = match self.owner() {
            None => self.cache.nar_reader(drv).await,
            Some(o) => self.cache.nar_reader_for(o, drv).await,
        }
        .map_err(|e| handler_error(&format!("reading {drv}"), e))?;
        let Some(mut reader) = reader else {
            return Ok(None);
        };
        let bad = |why: String| HandlerError::new(format!("'{drv}' is not a derivation: {why}"));
        let text = read_drv(&mut reader)
            .await
            .map_err(|e| bad(e.to_string()))?;
        Derivation::parse_aterm(&text)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    /// Add a text file as Nix's `addTextToStore` does (a `text:` content-addressed
    /// path, e.g. a `.drv` written by a client evaluating against this store).
    pub(crate) async fn add_text(
        &self,
        name: &str,
        text: &str,
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, HandlerError> {
        let inner = HashAlgo::Sha256.digest(text.as_bytes());
        let path = make_text_path(name, &inner, references)
            .map_err(|e| HandlerError::new(format!("adding text {name:?}: {e}")))?;
        let nar = nar_of_bytes(text.as_bytes());
        let mut info = ValidPathInfo::new(
            path.clone(),
            HashAlgo::Sha256.digest(&nar),
            nar.len() as u64,
        );
        info.references = references.clone();
        info.ca = Some(ContentAddress::Text(inner).to_string());
        self.add(info, &mut &nar[..]).await?;
        Ok(path)
    }
}

/// `limits` with no NAR, and no file in one, larger than `max_nar_size`.
pub(crate) fn bounded_by(limits: &NarLimits, max_nar_size: u64) -> NarLimits {
    NarLimits {
        max_total_size: limits.max_total_size.min(max_nar_size),
        max_file_size: limits.max_file_size.min(max_nar_size),
        ..limits.clone()
    }
}
