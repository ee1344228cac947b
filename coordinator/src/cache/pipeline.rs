//! Ingest's second stage: the zstd compression of a NAR runs on a blocking
//! thread of its own, so the NAR parse with its sha256 and reference scan
//! (the uploader's task) and the compression (this thread) use two cores at
//! once. [`ChunkSender`] is the `AsyncWrite` the parser copies the NAR into:
//! it gathers the bytes into chunks of [`CHUNK`] and hands them over a
//! bounded channel (at most [`DEPTH`] chunks in flight, so memory stays
//! bounded and a slow stage holds back the faster one); [`compress`] turns
//! them into compressed chunks on another bounded channel, which the upload
//! writes to storage (hashing them there, see [`super::hashing`]).
//!
//! Failures travel as closed channels: if storage fails, the compressor's
//! send fails, it stops, and the parser's next write fails
//! ([`ChunkSender::downstream_failed`] tells that apart from a broken
//! upload stream); if the parse fails, the sender is dropped and the
//! compressor ends, and the caller discards what was written.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// Bytes of NAR per chunk handed to the compressor.
pub(crate) const CHUNK: usize = 1 << 20;
/// Chunks in flight on each channel.
pub(crate) const DEPTH: usize = 4;

/// The parser's end: gathers writes into chunks and sends them on.
pub(crate) struct ChunkSender {
    tx: PollSender<Vec<u8>>,
    buf: Vec<u8>,
    failed: bool,
}

impl ChunkSender {
    pub(crate) fn new(tx: mpsc::Sender<Vec<u8>>) -> ChunkSender {
        ChunkSender {
            tx: PollSender::new(tx),
            buf: Vec::with_capacity(CHUNK),
            failed: false,
        }
    }

    /// Whether a write failed because the compressor (so storage) was gone.
    pub(crate) fn downstream_failed(&self) -> bool {
        self.failed
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let gone = |this: &mut ChunkSender| {
            this.failed = true;
            io::Error::new(io::ErrorKind::BrokenPipe, "the compressor stopped")
        };
        if ready!(self.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(gone(self)));
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        if self.tx.send_item(chunk).is_err() {
            return Poll::Ready(Err(gone(self)));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ChunkSender {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() >= CHUNK {
            ready!(this.poll_send(cx))?;
        }
        // Below CHUNK now: take what fits, so a chunk is never larger.
        let n = data.len().min(CHUNK - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Chunks go on when full or at shutdown; a flush mid-NAR need not
        // push a small one through.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// Compresses the chunks from `rx` at zstd `level` into one zstd frame sent
/// on `tx` as it grows, until `rx` closes. Runs on a blocking thread. An
/// error: zstd's, or `tx` closed (storage failed or the ingest was dropped).
pub(crate) fn compress(
    mut rx: mpsc::Receiver<Vec<u8>>,
    tx: mpsc::Sender<Vec<u8>>,
    level: i32,
) -> io::Result<()> {
    let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "the storage writer stopped");
    let mut enc = zstd::stream::write::Encoder::new(Vec::with_capacity(CHUNK), level)?;
    while let Some(chunk) = rx.blocking_recv() {
        enc.write_all(&chunk)?;
        if enc.get_ref().len() >= CHUNK / 2 {
            let out = std::mem::replace(enc.get_mut(), Vec::with_capacity(CHUNK));
            tx.blocking_send(out).map_err(|_| closed())?;
        }
    }
    let out = enc.finish()?;
    if !out.is_empty() {
        tx.blocking_send(out).map_err(|_| closed())?;
    }
    Ok(())
}
