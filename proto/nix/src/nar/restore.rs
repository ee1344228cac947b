//! Restore a NAR to the filesystem, validating it as it streams in. The tree
//! is built in a hidden temporary sibling of the destination and renamed into
//! place only once the whole NAR has been read and validated, so an error
//! leaves nothing at the destination.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWriteExt};

use super::reader::{NarEvent, NarReader};
use super::{NarError, NarLimits, NarSummary, fs_err};

const CHUNK: usize = 256 * 1024;

async fn exists(path: &Path) -> bool {
    tokio::fs::symlink_metadata(path).await.is_ok()
}

/// Read one NAR from `r` and recreate it at `dest` (a regular file, symlink or
/// directory, as the NAR's root is). Executable files get mode 0777, other
/// files 0666, directories 0777, all less the process umask.
///
/// Refuses if `dest` exists. Reads not one byte past the end of the NAR. On
/// any error nothing is left at `dest`. (The final rename is checked against
/// an existing `dest` just before, not atomically.)
pub async fn restore<R: AsyncRead + Unpin>(
    r: &mut R,
    dest: &Path,
    limits: &NarLimits,
) -> Result<NarSummary, NarError> {
    if exists(dest).await {
        return Err(NarError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let Some(file_name) = dest.file_name() else {
        return Err(NarError::BadDestination {
            path: dest.to_path_buf(),
        });
    };
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".restore-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let tmp = parent.join(tmp_name);

    let result = restore_into(r, &tmp, limits).await;
    let result = match result {
        Ok(_) if exists(dest).await => Err(NarError::DestinationExists {
            path: dest.to_path_buf(),
        }),
        Ok(summary) => tokio::fs::rename(&tmp, dest)
            .await
            .map(|()| summary)
            .map_err(fs_err("rename into", dest)),
        Err(e) => Err(e),
    };
    if result.is_err() {
        remove_all(&tmp).await;
    }
    result
}

/// Best-effort removal of a partly restored tree.
async fn remove_all(path: &Path) {
    match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.is_dir() => {
            let _ = tokio::fs::remove_dir_all(path).await;
        }
        Ok(_) => {
            let _ = tokio::fs::remove_file(path).await;
        }
        Err(_) => {}
    }
}

async fn restore_into<R: AsyncRead + Unpin>(
    r: &mut R,
    root: &Path,
    limits: &NarLimits,
) -> Result<NarSummary, NarError> {
    let mut sink = tokio::io::sink();
    let mut reader = NarReader::new(r, &mut sink, limits);
    // Open directories, innermost last, and where the next node goes.
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut next: Option<PathBuf> = Some(root.to_path_buf());
    let mut buf: Vec<u8> = Vec::new();
    while let Some(event) = reader.next_event().await? {
        match event {
            NarEvent::Entry { name } => {
                let dir = dirs
                    .last()
                    .expect("the parser yields entries only in a directory");
                next = Some(dir.join(OsStr::from_bytes(&name)));
            }
            NarEvent::EndDirectory => {
                dirs.pop();
            }
            NarEvent::Directory => {
                let path = next.take().expect("the parser yields one node per entry");
                tokio::fs::create_dir(&path)
                    .await
                    .map_err(fs_err("create directory", &path))?;
                dirs.push(path);
            }
            NarEvent::Symlink { target } => {
                let path = next.take().expect("the parser yields one node per entry");
                tokio::fs::symlink(OsStr::from_bytes(&target), &path)
                    .await
                    .map_err(fs_err("create symlink", &path))?;
            }
            NarEvent::Regular { executable, size } => {
                let path = next.take().expect("the parser yields one node per entry");
                let mut file = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if executable { 0o777 } else { 0o666 })
                    .open(&path)
                    .await
                    .map_err(fs_err("create file", &path))?;
                if size > 0 && buf.is_empty() {
                    buf = vec![0u8; CHUNK];
                }
                loop {
                    let n = reader.read_contents(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buf[..n])
                        .await
                        .map_err(fs_err("write", &path))?;
                }
                file.flush().await.map_err(fs_err("write", &path))?;
            }
        }
    }
    reader.finish().await
}
