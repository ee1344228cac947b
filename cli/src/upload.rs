//! Pushing what the farm lacks: ask the farm which paths of a closure it has
//! (batched `QueryValidPaths`), then upload the rest a dependency level at a
//! time, several at once, with `UploadNar` (first message the path info, then
//! the NAR in chunks, dumped from the local store as it streams).

use std::collections::BTreeSet;
use std::path::PathBuf;

use farm_nix::store_path::StorePath;
use farm_proto::v1::{PathInfo, UploadNarRequest, upload_nar_request};
use futures::StreamExt;
use tokio_util::io::ReaderStream;

use crate::client::Farm;
use crate::error::CliError;
use crate::nix::LocalPathInfo;

/// Paths per `QueryValidPaths` call.
pub const QUERY_BATCH: usize = 1000;
/// Bytes per NAR chunk message.
const CHUNK: usize = 256 * 1024;

/// `UploadNar` calls in flight at once (paths of one dependency level).
const UPLOAD_CONCURRENCY: usize = 8;

/// `QueryValidPaths` calls in flight at once.
const QUERY_CONCURRENCY: usize = 4;

/// The subset of `paths` the farm's cache holds.
pub async fn farm_has(farm: &Farm, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, CliError> {
    let mut valid = BTreeSet::new();
    let mut answers = futures::stream::iter(paths.chunks(QUERY_BATCH))
        .map(|chunk| async move {
            let r = farm
                .query_valid_paths(chunk.iter().map(|p| p.to_string()).collect())
                .await;
            (chunk, r)
        })
        .buffered(QUERY_CONCURRENCY);
    while let Some((chunk, answer)) = answers.next().await {
        let asked: BTreeSet<&StorePath> = chunk.iter().collect();
        for p in answer? {
            // Only what we asked about counts.
            if let Ok(sp) = StorePath::parse(&p)
                && asked.contains(&sp)
            {
                valid.insert(sp);
            }
        }
    }
    Ok(valid)
}

/// The gRPC path info of a local path.
pub fn to_proto(info: &LocalPathInfo) -> PathInfo {
    PathInfo {
        store_path: info.path.to_string(),
        deriver: info
            .deriver
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default(),
        nar_hash: info.nar_hash.to_nix32_prefixed(),
        nar_size: info.nar_size,
        references: info.references.iter().map(|r| r.to_string()).collect(),
        sigs: info.sigs.clone(),
        ca: info.ca.clone().unwrap_or_default(),
    }
}

/// Upload one path from the local store.
pub async fn upload_one(farm: &Farm, info: &LocalPathInfo) -> Result<(), CliError> {
    let fs_path = PathBuf::from(info.path.to_string());
    let (mut w, r) = tokio::io::duplex(CHUNK);
    let dump = tokio::spawn(async move { farm_nix::nar::dump_path(&fs_path, &mut w).await });
    let first = UploadNarRequest {
        msg: Some(upload_nar_request::Msg::Info(to_proto(info))),
    };
    let data = ReaderStream::with_capacity(r, CHUNK)
        // A read error can only come from the dump side, reported below.
        .take_while(|c| std::future::ready(c.is_ok()))
        .filter_map(|c| {
            std::future::ready(c.ok().map(|b| UploadNarRequest {
                msg: Some(upload_nar_request::Msg::Data(b.to_vec())),
            }))
        });
    let result = farm.upload_nar(first, data).await;
    let dumped = dump.await;
    match dumped {
        Ok(Ok(summary)) => {
            if summary.nar_size != info.nar_size || summary.nar_hash != info.nar_hash {
                return Err(CliError::Nix {
                    command: format!("dumping {}", info.path),
                    message: format!(
                        "the local store's NAR ({} bytes, {}) differs from its registered info ({} bytes, {}): run `nix-store --verify --check-contents`",
                        summary.nar_size,
                        summary.nar_hash.to_nix32_prefixed(),
                        info.nar_size,
                        info.nar_hash.to_nix32_prefixed()
                    ),
                });
            }
        }
        Ok(Err(e)) => {
            return Err(CliError::Nix {
                command: format!("dumping {}", info.path),
                message: e.to_string(),
            });
        }
        Err(e) => {
            return Err(CliError::Nix {
                command: format!("dumping {}", info.path),
                message: e.to_string(),
            });
        }
    }
    result
        .map(|_| ())
        .map_err(|s| farm.status_error(&format!("uploading {}", info.path), false, s))
}

/// What an upload did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UploadStats {
    /// Paths in the closure.
    pub closure: usize,
    /// Paths uploaded.
    pub paths: usize,
    /// NAR bytes uploaded.
    pub bytes: u64,
}

/// Upload whatever of `closure` the farm lacks (`present`: what
/// [`farm_has`] said it holds), in dependency order; the local store is
/// asked about (`nix path-info`) only the paths the farm lacks, so a wholly
/// cached closure costs no Nix process. `on_path` hears of each path before
/// its upload.
pub async fn upload_missing(
    farm: &Farm,
    closure: &[StorePath],
    present: &BTreeSet<StorePath>,
    mut on_path: impl FnMut(&LocalPathInfo, usize, usize),
) -> Result<UploadStats, CliError> {
    let lacking: Vec<StorePath> = closure
        .iter()
        .filter(|p| !present.contains(*p))
        .cloned()
        .collect();
    let mut stats = UploadStats {
        closure: closure.len(),
        ..Default::default()
    };
    if lacking.is_empty() {
        return Ok(stats);
    }
    let infos = crate::nix::path_infos(&lacking).await?;
    let levels = crate::nix::dependency_levels(&lacking, &infos);
    let n = lacking.len();
    let mut i = 0;
    for level in levels {
        let level = level
            .iter()
            .map(|p| {
                infos.get(p).ok_or_else(|| CliError::Nix {
                    command: "nix path-info".into(),
                    message: format!("no information about {p}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for info in &level {
            on_path(info, i, n);
            i += 1;
        }
        // A level's references are all uploaded: its paths go at once.
        let mut uploads = futures::stream::iter(level.iter().map(|info| upload_one(farm, info)))
            .buffer_unordered(UPLOAD_CONCURRENCY);
        while let Some(done) = uploads.next().await {
            done?;
        }
        stats.paths += level.len();
        stats.bytes += level.iter().map(|info| info.nar_size).sum::<u64>();
    }
    Ok(stats)
}
