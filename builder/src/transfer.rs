//! Moving NARs between the cache and the local store, over the coordinator's
//! data calls: `QueryPathInfos` + `DownloadNar` for inputs (verified: NAR
//! structure, size and sha256 against the cache's signed info; a claim job's
//! inputs may also be its owner's unsigned claims, which the coordinator
//! serves to that job alone), `UploadNar` for outputs (streamed as the local
//! Nix dumps them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use farm_nix::nar::{NarLimits, NarSummary, copy_nar, expect_eof};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::signing::VerifyingKey;
use farm_nix::store_path::StorePath;
use farm_proto::v1::{self, DownloadNarRequest, QueryPathInfosRequest, UploadNarRequest};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::error::{BuilderError, error_chain};
use crate::link::Link;

/// Paths per `QueryPathInfos` call.
const QUERY_BATCH: usize = 500;
/// Bytes per upload chunk.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// A transfer failure, its message for the job result.
fn terr(msg: impl Into<String>) -> BuilderError {
    BuilderError::Transfer(msg.into())
}

/// A `PathInfo` message as a domain path info (bounded, validated by
/// `farm_proto::convert`).
pub fn info_from_proto(p: v1::PathInfo) -> Result<ValidPathInfo, BuilderError> {
    let path = p.store_path.clone();
    ValidPathInfo::try_from(p).map_err(|e| terr(format!("path info of {path:?}: {e}")))
}

/// The cache's infos for `paths`; every one must be there and, when the
/// coordinator named a cache key, carry a valid signature by it, unless
/// `claim` (a claim job's fetch, on its job's link): then the unsigned ones
/// are the job owner's claims, returned apart (every one, with no cache key).
pub(crate) async fn query_infos(
    link: &Link,
    paths: &[StorePath],
    claim: bool,
) -> Result<(BTreeMap<StorePath, ValidPathInfo>, BTreeSet<StorePath>), BuilderError> {
    let key = cache_key(link)?;
    let mut client = link.client();
    let mut out = BTreeMap::new();
    for batch in paths.chunks(QUERY_BATCH) {
        let resp = client
            .query_path_infos(QueryPathInfosRequest {
                store_paths: batch.iter().map(ToString::to_string).collect(),
            })
            .await
            .map_err(|s| terr(format!("QueryPathInfos: {}: {}", s.code(), s.message())))?
            .into_inner();
        for p in resp.infos {
            let info = info_from_proto(p)?;
            out.insert(info.path.clone(), info);
        }
    }
    let mut unsigned = BTreeSet::new();
    for p in paths {
        let Some(info) = out.get(p) else {
            return Err(terr(format!("input {p} is not in the cache")));
        };
        let signed = key
            .as_ref()
            .is_some_and(|k| info.verify_any(std::slice::from_ref(k)));
        if claim && !signed {
            unsigned.insert(p.clone());
        } else if let Some(key) = &key
            && !signed
        {
            return Err(terr(format!(
                "input {p}: no valid signature by the cache key {}",
                key.name()
            )));
        }
    }
    Ok((out, unsigned))
}

fn cache_key(link: &Link) -> Result<Option<VerifyingKey>, BuilderError> {
    if link.cache_public_key.is_empty() {
        return Ok(None);
    }
    VerifyingKey::parse(&link.cache_public_key)
        .map(Some)
        .map_err(|e| {
            terr(format!(
                "the coordinator's cache key {:?}: {e}",
                link.cache_public_key
            ))
        })
}

/// NARs up to this size are fetched into memory, larger ones into a scratch
/// file (at most `download_parallelism` of them are held at once).
pub(crate) const IN_MEMORY_NAR: u64 = 4 * 1024 * 1024;

/// A downloaded, verified NAR.
pub(crate) enum Fetched {
    /// Small ones ([`IN_MEMORY_NAR`]): no scratch file.
    Memory(Vec<u8>),
    /// In this scratch file.
    File(std::path::PathBuf),
}

/// Download `info.path`'s NAR, checking its structure, size and hash: into
/// memory when it is small, else into `dest`.
pub(crate) async fn fetch(
    link: &Link,
    info: &ValidPathInfo,
    dest: std::path::PathBuf,
) -> Result<(Fetched, u64), BuilderError> {
    if info.nar_size <= IN_MEMORY_NAR {
        let mut buf = Vec::with_capacity(usize::try_from(info.nar_size).unwrap_or(0));
        let n = download_into(link, info, &mut buf, "memory").await?;
        return Ok((Fetched::Memory(buf), n));
    }
    let n = download(link, info, &dest).await?;
    Ok((Fetched::File(dest), n))
}

/// Download `info.path`'s NAR into `dest`, checking its structure, size and hash.
pub(crate) async fn download(
    link: &Link,
    info: &ValidPathInfo,
    dest: &Path,
) -> Result<u64, BuilderError> {
    let file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| terr(format!("creating {}: {e}", dest.display())))?;
    let mut file = tokio::io::BufWriter::new(file);
    download_into(link, info, &mut file, &dest.display().to_string()).await
}

/// Download `info.path`'s NAR into `file` (named `what` in errors), checking
/// its structure, size and hash; flushed when it returns.
async fn download_into<W: tokio::io::AsyncWrite + Unpin + Send>(
    link: &Link,
    info: &ValidPathInfo,
    file: &mut W,
    what: &str,
) -> Result<u64, BuilderError> {
    let path = &info.path;
    let stream = link
        .client()
        .download_nar(DownloadNarRequest {
            store_path: path.to_string(),
        })
        .await
        .map_err(|s| terr(format!("DownloadNar {path}: {}: {}", s.code(), s.message())))?
        .into_inner();
    let stream = stream.map(|r| {
        r.map(|c| bytes::Bytes::from(c.data))
            .map_err(|s| std::io::Error::other(format!("{}: {}", s.code(), s.message())))
    });
    let mut reader = tokio_util::io::StreamReader::new(stream);
    let limits = NarLimits {
        max_total_size: info.nar_size,
        ..NarLimits::default()
    };
    let summary = copy_nar(&mut reader, file, &limits)
        .await
        .map_err(|e| terr(format!("downloading {path}: {}", error_chain(&e))))?;
    expect_eof(&mut reader)
        .await
        .map_err(|e| terr(format!("downloading {path}: {e}")))?;
    file.flush()
        .await
        .map_err(|e| terr(format!("writing {what}: {e}")))?;
    if summary.nar_size != info.nar_size || summary.nar_hash != info.nar_hash {
        return Err(terr(format!(
            "{path}: downloaded NAR has size {} and hash {}, the cache says {} and {}",
            summary.nar_size,
            summary.nar_hash.to_nix32_prefixed(),
            info.nar_size,
            info.nar_hash.to_nix32_prefixed()
        )));
    }
    Ok(summary.nar_size)
}

/// Upload `info.path`: its info first, then the NAR read from `nar` in chunks.
/// The caller checks that what it wrote into `nar` matches `info`.
pub(crate) async fn upload<R: AsyncRead + Send + 'static>(
    link: &Link,
    info: &ValidPathInfo,
    nar: R,
) -> Result<(), BuilderError> {
    let head = futures::stream::once(futures::future::ready(UploadNarRequest {
        msg: Some(v1::upload_nar_request::Msg::Info(v1::PathInfo::from(info))),
    }));
    let body = tokio_util::io::ReaderStream::with_capacity(nar, UPLOAD_CHUNK)
        .take_while(|c| futures::future::ready(c.is_ok()))
        .filter_map(|c| {
            futures::future::ready(c.ok().map(|data| UploadNarRequest {
                msg: Some(v1::upload_nar_request::Msg::Data(data.to_vec())),
            }))
        });
    link.client()
        .upload_nar(head.chain(body))
        .await
        .map_err(|s| {
            terr(format!(
                "UploadNar {}: {}: {}",
                info.path,
                s.code(),
                s.message()
            ))
        })?;
    Ok(())
}

/// Check a NAR produced for upload against the info it was announced with.
pub(crate) fn check_summary(
    info: &ValidPathInfo,
    summary: &NarSummary,
) -> Result<(), BuilderError> {
    if summary.nar_size != info.nar_size || summary.nar_hash != info.nar_hash {
        return Err(terr(format!(
            "{}: the store's NAR ({} bytes, {}) differs from its registered info ({} bytes, {})",
            info.path,
            summary.nar_size,
            summary.nar_hash.to_nix32_prefixed(),
            info.nar_size,
            info.nar_hash.to_nix32_prefixed()
        )));
    }
    Ok(())
}

/// Order `infos` so every path comes after the paths it references (among them).
pub(crate) fn references_first(infos: Vec<ValidPathInfo>) -> Vec<ValidPathInfo> {
    let mut remaining: BTreeMap<StorePath, ValidPathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut done: BTreeSet<StorePath> = BTreeSet::new();
    let mut out = Vec::with_capacity(remaining.len());
    while !remaining.is_empty() {
        let ready: Vec<StorePath> = remaining
            .values()
            .filter(|i| {
                i.references
                    .iter()
                    .all(|r| r == &i.path || done.contains(r) || !remaining.contains_key(r))
            })
            .map(|i| i.path.clone())
            .collect();
        // A reference cycle cannot happen in a store; take the rest as they are.
        let ready = if ready.is_empty() {
            remaining.keys().cloned().collect()
        } else {
            ready
        };
        for p in ready {
            if let Some(i) = remaining.remove(&p) {
                done.insert(p);
                out.push(i);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(name.as_bytes());
        let hash = farm_nix::nixbase32::encode(&digest[..20]);
        StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap()
    }

    #[test]
    fn path_info_round_trips_through_the_message() {
        let mut info = ValidPathInfo::new(sp("out"), farm_nix::HashAlgo::Sha256.digest(b"x"), 120);
        info.deriver = Some(sp("x.drv"));
        info.references = [sp("dep"), sp("out")].into_iter().collect();
        info.sigs = ["k:sig".to_string()].into_iter().collect();
        let back = info_from_proto(v1::PathInfo::from(&info)).unwrap();
        assert_eq!(back, info);
        let mut bad = v1::PathInfo::from(&info);
        bad.references.push("/tmp/nope".into());
        assert!(info_from_proto(bad).is_err());
    }

    #[test]
    fn orders_outputs_references_first() {
        let h = farm_nix::HashAlgo::Sha256.digest(b"x");
        let mut out = ValidPathInfo::new(sp("out"), h.clone(), 1);
        let dev = ValidPathInfo::new(sp("dev"), h.clone(), 1);
        let mut doc = ValidPathInfo::new(sp("doc"), h, 1);
        out.references = [sp("dev"), sp("out"), sp("elsewhere")]
            .into_iter()
            .collect();
        doc.references = [sp("out")].into_iter().collect();
        let order: Vec<String> = references_first(vec![doc, out, dev])
            .into_iter()
            .map(|i| i.path.name().to_owned())
            .collect();
        assert_eq!(order, ["dev", "out", "doc"]);
    }
}
