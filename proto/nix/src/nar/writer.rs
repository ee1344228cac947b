//! Streaming NAR writer: serialises a filesystem path exactly as
//! `nix-store --dump` does, streaming file contents in chunks and hashing on
//! the way. Walks directories with an explicit stack (no recursion), so the
//! returned future is `Send` whenever the writer is.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::future::Future;

use tokio::io::{AsyncReadExt, AsyncWrite};

use super::out::{NarOut, pad_len};
use super::{NAR_MAGIC, NarError, NarSummary, fs_err};

/// Size of the chunks file contents are read in.
const CHUNK: usize = 256 * 1024;

/// One directory being walked: its path, its sorted entry names, the next one.
struct Frame {
    dir: PathBuf,
    names: Vec<OsString>,
    next: usize,
}

/// Write the NAR of `path` (a regular file, symlink or directory; symlinks are
/// not followed) to `w`, byte-identical to `nix-store --dump path`. Returns the
/// NAR's size and sha256. The writer is flushed at the end.
///
/// Directory entries are sorted by the bytes of their names; a regular file is
/// executable when its owner-execute bit is set. Sockets, FIFOs and devices are
/// refused, as is a file that changes size while it is read.
pub async fn dump_path<W: AsyncWrite + Unpin>(
    path: &Path,
    w: &mut W,
) -> Result<NarSummary, NarError> {
    let mut out = NarOut::new(w);
    let mut buf = vec![0u8; CHUNK];
    out.token(NAR_MAGIC.as_bytes()).await?;
    let mut stack: Vec<Frame> = Vec::new();
    if let Some(frame) = dump_node(path, &mut out, &mut buf).await? {
        stack.push(frame);
    }
    while let Some(top) = stack.last_mut() {
        if top.next < top.names.len() {
            let name = &top.names[top.next];
            top.next += 1;
            let child = top.dir.join(name);
            out.token(b"entry").await?;
            out.token(b"(").await?;
            out.token(b"name").await?;
            out.token(name.as_bytes()).await?;
            out.token(b"node").await?;
            match dump_node(&child, &mut out, &mut buf).await? {
                Some(frame) => stack.push(frame),
                None => out.token(b")").await?,
            }
        } else {
            stack.pop();
            // Close the directory node, then the entry holding it, if any.
            out.token(b")").await?;
            if !stack.is_empty() {
                out.token(b")").await?;
            }
        }
    }
    Ok(out.finish().await?)
}

/// Write one node. A regular file or symlink is written whole, with its closing
/// `)`; a directory is only opened, and its frame returned for the caller to walk.
async fn dump_node<W: AsyncWrite + Unpin>(
    path: &Path,
    out: &mut NarOut<'_, W>,
    buf: &mut [u8],
) -> Result<Option<Frame>, NarError> {
    let meta = tokio::fs::symlink_metadata(path)
        .await
        .map_err(fs_err("stat", path))?;
    out.token(b"(").await?;
    out.token(b"type").await?;
    let ft = meta.file_type();
    if ft.is_file() {
        let size = meta.len();
        regular_header(out, meta.permissions().mode() & 0o100 != 0, size).await?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(fs_err("open", path))?;
        let mut remaining = size;
        while remaining > 0 {
            let want = buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let n = file
                .read(&mut buf[..want])
                .await
                .map_err(fs_err("read", path))?;
            if n == 0 {
                return Err(NarError::FileChanged {
                    path: path.to_path_buf(),
                });
            }
            out.write(&buf[..n]).await?;
            remaining -= n as u64;
        }
        let extra = file
            .read(&mut buf[..1])
            .await
            .map_err(fs_err("read", path))?;
        if extra != 0 {
            return Err(NarError::FileChanged {
                path: path.to_path_buf(),
            });
        }
        regular_trailer(out, size).await?;
        Ok(None)
    } else if ft.is_symlink() {
        let target = tokio::fs::read_link(path)
            .await
            .map_err(fs_err("readlink", path))?;
        out.token(b"symlink").await?;
        out.token(b"target").await?;
        out.token(target.as_os_str().as_bytes()).await?;
        out.token(b")").await?;
        Ok(None)
    } else if ft.is_dir() {
        out.token(b"directory").await?;
        let mut rd = tokio::fs::read_dir(path)
            .await
            .map_err(fs_err("read directory", path))?;
        let mut names = Vec::new();
        while let Some(entry) = rd
            .next_entry()
            .await
            .map_err(fs_err("read directory", path))?
        {
            names.push(entry.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(Some(Frame {
            dir: path.to_path_buf(),
            names,
            next: 0,
        }))
    } else {
        Err(NarError::UnsupportedFileType {
            path: path.to_path_buf(),
        })
    }
}

/// Open a regular file's node (after `( type`): its kind, the executable
/// flag, and the length of its contents, which the caller writes next.
async fn regular_header<W: AsyncWrite + Unpin>(
    out: &mut NarOut<'_, W>,
    executable: bool,
    size: u64,
) -> std::io::Result<()> {
    out.token(b"regular").await?;
    if executable {
        out.token(b"executable").await?;
        out.token(b"").await?;
    }
    out.token(b"contents").await?;
    out.write(&size.to_le_bytes()).await
}

/// Close a regular file's node after its `size` bytes of contents.
async fn regular_trailer<W: AsyncWrite + Unpin>(
    out: &mut NarOut<'_, W>,
    size: u64,
) -> std::io::Result<()> {
    out.write(&[0u8; 8][..pad_len(size)]).await?;
    out.token(b")").await
}

/// Write the NAR of a single regular file holding `contents` to `w`,
/// byte-identical to `nix-store --dump` of such a file (executable when
/// `executable`). Returns the NAR's size and sha256; the writer is flushed.
pub async fn dump_bytes<W: AsyncWrite + Unpin>(
    contents: &[u8],
    executable: bool,
    w: &mut W,
) -> Result<NarSummary, NarError> {
    let mut out = NarOut::new(w);
    out.token(NAR_MAGIC.as_bytes()).await?;
    out.token(b"(").await?;
    out.token(b"type").await?;
    regular_header(&mut out, executable, contents.len() as u64).await?;
    out.write(contents).await?;
    regular_trailer(&mut out, contents.len() as u64).await?;
    Ok(out.finish().await?)
}

/// The NAR of a single non-executable regular file holding `contents`, in
/// memory: how a `text:` path (a `.drv`, `builtins.toFile`) is stored, and
/// the "NAR of these bytes" tests need. The same bytes as [`dump_bytes`].
pub fn nar_of_bytes(contents: &[u8]) -> Vec<u8> {
    let mut nar = Vec::with_capacity(contents.len() + 128);
    {
        let fut = std::pin::pin!(dump_bytes(contents, false, &mut nar));
        // Writing to a Vec never waits, so the first poll finishes.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.poll(&mut cx) {
            std::task::Poll::Ready(r) => {
                r.expect("writing a NAR to memory cannot fail");
            }
            std::task::Poll::Pending => unreachable!("writing to a Vec does not wait"),
        }
    }
    nar
}
