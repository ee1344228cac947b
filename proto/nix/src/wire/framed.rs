//! Framed streams: `[u64 len][len bytes, no padding]…` ended by `len = 0`, the
//! way the worker protocol (≥ 1.23) carries NARs and `AddMultipleToStore` data.
//!
//! [`FramedReader`] presents the payload as one `AsyncRead` that reports EOF at
//! the terminator, leaving the underlying reader positioned right after it.
//! A reader dropped before reaching the terminator leaves the underlying stream
//! in the middle of a frame: call [`FramedReader::drain`] to skip the rest, or
//! close the connection. [`FramedWriter`] buffers writes into frames and must
//! be ended with [`FramedWriter::finish`], which writes the terminator.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::WireError;

/// Frame size Nix's `FramedSink` uses (its buffer size).
pub const DEFAULT_FRAME_SIZE: usize = 32 * 1024;

/// Reads the payload of a framed stream.
#[derive(Debug)]
pub struct FramedReader<R> {
    inner: R,
    /// Bytes left in the current frame.
    remaining: u64,
    /// Partially read length header.
    header: [u8; 8],
    header_len: usize,
    done: bool,
    max_frame: u64,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    /// Read frames from `inner`, rejecting any frame longer than `max_frame`.
    pub fn new(inner: R, max_frame: u64) -> Self {
        FramedReader {
            inner,
            remaining: 0,
            header: [0; 8],
            header_len: 0,
            done: false,
            max_frame,
        }
    }

    /// Whether the terminator has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Skip whatever payload is left and the terminator; returns the number of
    /// payload bytes skipped.
    pub async fn drain(&mut self) -> Result<u64, WireError> {
        let mut skipped = 0u64;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.read(&mut buf).await.map_err(WireError::from_io)?;
            if n == 0 {
                return Ok(skipped);
            }
            skipped += n as u64;
        }
    }

    /// Give back the underlying reader (positioned after the terminator if
    /// [`FramedReader::is_done`]).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FramedReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.remaining > 0 {
                let want = (buf.remaining() as u64).min(this.remaining) as usize;
                let mut sub = ReadBuf::new(buf.initialize_unfilled_to(want));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sub))?;
                let n = sub.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "framed stream truncated inside a frame",
                    )));
                }
                buf.advance(n);
                this.remaining -= n as u64;
                return Poll::Ready(Ok(()));
            }
            // Read the next length header (possibly in pieces).
            while this.header_len < 8 {
                let mut sub = ReadBuf::new(&mut this.header[this.header_len..]);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sub))?;
                let n = sub.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "framed stream ended without a terminator",
                    )));
                }
                this.header_len += n;
            }
            this.header_len = 0;
            let len = u64::from_le_bytes(this.header);
            if len == 0 {
                this.done = true;
                return Poll::Ready(Ok(()));
            }
            if len > this.max_frame {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "frame of {len} bytes exceeds the limit of {}",
                        this.max_frame
                    ),
                )));
            }
            this.remaining = len;
        }
    }
}

/// Writes a framed stream; [`FramedWriter::finish`] writes the terminator.
#[derive(Debug)]
pub struct FramedWriter<W> {
    inner: W,
    /// Payload collected for the next frame.
    data: Vec<u8>,
    frame_size: usize,
    /// Encoded bytes (header + payload) not yet accepted by `inner`.
    pending: Vec<u8>,
    pending_pos: usize,
}

impl<W: AsyncWrite + Unpin> FramedWriter<W> {
    /// Frames of at most [`DEFAULT_FRAME_SIZE`] bytes, as Nix writes them.
    pub fn new(inner: W) -> Self {
        Self::with_frame_size(inner, DEFAULT_FRAME_SIZE)
    }

    /// Frames of at most `frame_size` bytes (at least 1).
    pub fn with_frame_size(inner: W, frame_size: usize) -> Self {
        let frame_size = frame_size.max(1);
        FramedWriter {
            inner,
            data: Vec::with_capacity(frame_size.min(1 << 20)),
            frame_size,
            pending: Vec::new(),
            pending_pos: 0,
        }
    }

    /// Emit buffered payload as a frame, write the terminator, flush; returns the inner writer.
    pub async fn finish(mut self) -> Result<W, WireError> {
        self.flush().await?;
        self.inner.write_all(&0u64.to_le_bytes()).await?;
        self.inner.flush().await?;
        Ok(self.inner)
    }

    fn encode_frame(&mut self) {
        debug_assert!(self.pending_pos == self.pending.len());
        self.pending.clear();
        self.pending_pos = 0;
        if !self.data.is_empty() {
            self.pending
                .extend_from_slice(&(self.data.len() as u64).to_le_bytes());
            self.pending.extend_from_slice(&self.data);
            self.data.clear();
        }
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_pos < self.pending.len() {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.pending_pos..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_pos += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FramedWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if this.data.len() >= this.frame_size {
            this.encode_frame();
            ready!(this.poll_pending(cx))?;
        }
        let n = buf.len().min(this.frame_size - this.data.len());
        this.data.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if !this.data.is_empty() {
            this.encode_frame();
            ready!(this.poll_pending(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    /// Flushes the payload but neither writes the terminator nor shuts the
    /// inner writer down: use [`FramedWriter::finish`].
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use farm_testkit::host::rt;

    #[test]
    fn layout_and_position() {
        rt().block_on(async {
            let mut out = Vec::new();
            let mut fw = FramedWriter::with_frame_size(&mut out, 4);
            fw.write_all(b"abcdef").await.unwrap();
            fw.finish().await.unwrap();
            out.extend_from_slice(b"rest");
            let mut expect = Vec::new();
            expect.extend_from_slice(&4u64.to_le_bytes());
            expect.extend_from_slice(b"abcd");
            expect.extend_from_slice(&2u64.to_le_bytes());
            expect.extend_from_slice(b"ef");
            expect.extend_from_slice(&0u64.to_le_bytes());
            expect.extend_from_slice(b"rest");
            assert_eq!(out, expect);

            let mut r = &out[..];
            let mut fr = FramedReader::new(&mut r, 100);
            let mut payload = Vec::new();
            fr.read_to_end(&mut payload).await.unwrap();
            assert_eq!(payload, b"abcdef");
            assert!(fr.is_done());
            assert_eq!(r, b"rest");
        });
    }

    #[test]
    fn drain_and_errors() {
        rt().block_on(async {
            let mut out = Vec::new();
            let mut fw = FramedWriter::new(&mut out);
            fw.write_all(&[7u8; 100]).await.unwrap();
            fw.finish().await.unwrap();
            out.push(42);
            let mut r = &out[..];
            let mut fr = FramedReader::new(&mut r, 1000);
            let mut two = [0u8; 2];
            fr.read_exact(&mut two).await.unwrap();
            assert_eq!(fr.drain().await.unwrap(), 98);
            assert_eq!(r, [42]);

            // Frame over the limit.
            let mut r = &out[..];
            let mut fr = FramedReader::new(&mut r, 10);
            let e = fr.read(&mut two).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);

            // No terminator.
            let cut = &out[..out.len() - 9];
            let mut r = cut;
            let mut fr = FramedReader::new(&mut r, 1000);
            assert!(matches!(fr.drain().await, Err(WireError::UnexpectedEof)));
        });
    }

    proptest! {
        #[test]
        fn roundtrip(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..10), fs in 1usize..40) {
            rt().block_on(async {
                let mut out = Vec::new();
                let mut fw = FramedWriter::with_frame_size(&mut out, fs);
                let mut all = Vec::new();
                for c in &chunks {
                    fw.write_all(c).await.unwrap();
                    all.extend_from_slice(c);
                }
                fw.finish().await.unwrap();
                let mut r = &out[..];
                let mut fr = FramedReader::new(&mut r, fs as u64);
                let mut back = Vec::new();
                fr.read_to_end(&mut back).await.unwrap();
                prop_assert_eq!(back, all);
                prop_assert!(r.is_empty());
                Ok(())
            })?;
        }
    }
}
