//! A pipe between a protocol server, which parses and validates a NAR coming
//! off the connection, and a handler, which reads it as a plain `AsyncRead`.
//! If the handler stops reading (it returned, or failed), the server keeps
//! parsing into the void so the connection stays in step.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncWrite, DuplexStream};

/// Buffer between the two ends.
pub const PIPE_SIZE: usize = 64 * 1024;

/// A pipe: the writer half wrapped in [`PipeWriter`], and the reader half.
pub fn pipe() -> (PipeWriter, DuplexStream) {
    let (tx, rx) = tokio::io::duplex(PIPE_SIZE);
    (PipeWriter { inner: Some(tx) }, rx)
}

/// The writing end of [`pipe`]: once the reader is gone, writes succeed and
/// are discarded. Dropping it signals EOF to the reader.
#[derive(Debug)]
pub struct PipeWriter {
    inner: Option<DuplexStream>,
}

impl PipeWriter {
    /// Whether the reading end went away before everything was written.
    pub fn reader_gone(&self) -> bool {
        self.inner.is_none()
    }
}

impl AsyncWrite for PipeWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(buf.len()));
        };
        match Pin::new(inner).poll_write(cx, buf) {
            Poll::Ready(Err(_)) => {
                self.inner = None;
                Poll::Ready(Ok(buf.len()))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(inner).poll_flush(cx) {
            Poll::Ready(Err(_)) => {
                self.inner = None;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(inner).poll_shutdown(cx) {
            Poll::Ready(Err(_)) => {
                self.inner = None;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}
