//! The output side shared by the NAR writer and reader: every NAR byte is
//! hashed and counted here, small tokens are gathered in a buffer, big
//! content chunks go straight through to the underlying writer.

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::hash::{HashAlgo, Hasher};

use super::NarSummary;

/// Tokens are gathered up to this many bytes before one write.
const BUF_CAP: usize = 64 * 1024;
/// Chunks at least this long skip the buffer.
const DIRECT_MIN: usize = 8 * 1024;

/// Hashing, counting, buffering writer of NAR bytes.
pub(crate) struct NarOut<'a, W> {
    w: &'a mut W,
    hasher: Hasher,
    size: u64,
    buf: Vec<u8>,
}

impl<'a, W: AsyncWrite + Unpin> NarOut<'a, W> {
    pub(crate) fn new(w: &'a mut W) -> Self {
        NarOut {
            w,
            hasher: Hasher::new(HashAlgo::Sha256),
            size: 0,
            buf: Vec::with_capacity(BUF_CAP),
        }
    }

    /// Bytes accepted so far.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Accept NAR bytes.
    pub(crate) async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if data.len() >= DIRECT_MIN {
            self.flush_buf().await?;
            self.w.write_all(data).await
        } else {
            self.buf.extend_from_slice(data);
            if self.buf.len() >= BUF_CAP {
                self.flush_buf().await?;
            }
            Ok(())
        }
    }

    /// Accept one token: length, bytes, zero padding.
    pub(crate) async fn token(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write(&(data.len() as u64).to_le_bytes()).await?;
        self.write(data).await?;
        self.write(&[0u8; 8][..pad_len(data.len() as u64)]).await
    }

    async fn flush_buf(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Write out what is buffered, flush the writer, return the summary.
    pub(crate) async fn finish(mut self) -> std::io::Result<NarSummary> {
        self.flush_buf().await?;
        self.w.flush().await?;
        Ok(NarSummary {
            nar_size: self.size,
            nar_hash: self.hasher.finish(),
        })
    }
}

/// Number of zero bytes that follow a string of `len` bytes.
pub(crate) fn pad_len(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}
