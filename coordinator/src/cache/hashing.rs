//! An `AsyncWrite` adapter that hashes (sha256) and counts the bytes that pass
//! through it into the inner writer, and remembers whether the inner writer
//! failed, so an I/O error seen by the NAR parser can be told apart: the
//! uploader's stream broke (client error) or the storage did (server error).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use farm_nix::hash::{Hash, HashAlgo, Hasher};
use tokio::io::AsyncWrite;

pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    written: u64,
    failed: bool,
}

impl<W> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> HashingWriter<W> {
        HashingWriter {
            inner,
            hasher: Hasher::new(HashAlgo::Sha256),
            written: 0,
            failed: false,
        }
    }

    /// Whether the inner writer returned an error at some point.
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    pub(crate) fn inner_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The sha256 and length of everything written.
    pub(crate) fn finish(self) -> (Hash, u64) {
        (self.hasher.finish(), self.written)
    }

    fn note<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.failed = true;
        }
        r
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for HashingWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = ready!(Pin::new(&mut this.inner).poll_write(cx, buf));
        let n = this.note(r)?;
        this.hasher.update(&buf[..n]);
        this.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        Poll::Ready(this.note(r))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
        Poll::Ready(this.note(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn hashes_and_counts_what_passes() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").await.unwrap();
        w.write_all(b"world").await.unwrap();
        w.shutdown().await.unwrap();
        assert!(!w.failed());
        let (h, n) = w.finish();
        assert_eq!(n, 11);
        assert_eq!(h, HashAlgo::Sha256.digest(b"hello world"));
    }
}
