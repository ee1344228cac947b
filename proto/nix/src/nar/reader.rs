//! Streaming NAR reader and validator. [`NarReader`] is a pull parser over an
//! `AsyncRead`: it reads token by token, exactly as many bytes as the grammar
//! (see the [module docs](super)) calls for, so it stops at the final `)` and
//! never reads past the end of the NAR. Every byte it reads is hashed, counted
//! and copied to a writer in the same pass; file contents are streamed in
//! chunks, never held whole.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::out::{NarOut, pad_len};
use super::{NAR_MAGIC, NarError, NarLimits, NarSummary, show, validate_entry_name};

/// Longest keyword token of the grammar (`nix-archive-1` has 13 bytes).
const MAX_KEYWORD: usize = 16;
/// Chunk size used when the reader skips file contents itself.
const SKIP_CHUNK: usize = 64 * 1024;

/// One step of a NAR, as [`NarReader::next_event`] yields it.
///
/// Sequence: a node is `Regular`, `Symlink`, or `Directory` followed by zero or
/// more (`Entry`, node) pairs and `EndDirectory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarEvent {
    /// A regular file of `size` bytes; read its contents with
    /// [`NarReader::read_contents`], or the next `next_event` skips them.
    Regular { executable: bool, size: u64 },
    /// A symlink (target not empty, no NUL).
    Symlink { target: Vec<u8> },
    /// A directory starts; its entries follow.
    Directory,
    /// A directory entry named `name` (valid, in order); its node follows.
    Entry { name: Vec<u8> },
    /// The innermost open directory ends.
    EndDirectory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    NodeStart,
    Contents { remaining: u64, pad: usize },
    AfterNode,
    InDirectory,
    Finished,
}

/// An open directory: the last entry name seen and how many entries so far.
struct DirFrame {
    prev: Option<Vec<u8>>,
    entries: usize,
}

/// Pull parser that validates a NAR while copying its bytes to `W` and
/// hashing them.
pub struct NarReader<'a, R, W> {
    r: &'a mut R,
    out: NarOut<'a, W>,
    limits: NarLimits,
    dirs: Vec<DirFrame>,
    state: State,
    skip_buf: Vec<u8>,
}

impl<'a, R: AsyncRead + Unpin, W: AsyncWrite + Unpin> NarReader<'a, R, W> {
    /// Read a NAR from `r`, copying every byte read to `w`.
    pub fn new(r: &'a mut R, w: &'a mut W, limits: &NarLimits) -> Self {
        NarReader {
            r,
            out: NarOut::new(w),
            limits: limits.clone(),
            dirs: Vec::new(),
            state: State::Start,
            skip_buf: Vec::new(),
        }
    }

    /// The next event, or `None` once the whole NAR has been read.
    pub async fn next_event(&mut self) -> Result<Option<NarEvent>, NarError> {
        loop {
            match self.state {
                State::Start => {
                    let (buf, len) = self
                        .read_keyword_with(|len| NarError::BadMagic {
                            found: format!("<token of {len} bytes>"),
                        })
                        .await?;
                    if &buf[..len] != NAR_MAGIC.as_bytes() {
                        return Err(NarError::BadMagic {
                            found: show(&buf[..len]),
                        });
                    }
                    self.state = State::NodeStart;
                }
                State::NodeStart => return self.node_start().await.map(Some),
                State::Contents { .. } => self.skip_contents().await?,
                State::AfterNode => {
                    if self.dirs.is_empty() {
                        self.state = State::Finished;
                        return Ok(None);
                    }
                    // The node finished was the node of an entry: close it.
                    self.expect(")", "\")\" closing an entry").await?;
                    self.state = State::InDirectory;
                }
                State::InDirectory => return self.directory_step().await.map(Some),
                State::Finished => return Ok(None),
            }
        }
    }

    /// Read the contents of the current regular file into `buf`; returns the
    /// number of bytes read, 0 once the file's contents are all read (or when
    /// the current event is not a regular file).
    pub async fn read_contents(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        let State::Contents { remaining, pad } = self.state else {
            return Ok(0);
        };
        if remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = self.r.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(NarError::Truncated);
        }
        self.out.write(&buf[..n]).await?;
        self.state = State::Contents {
            remaining: remaining - n as u64,
            pad,
        };
        Ok(n)
    }

    /// Read (and validate) the rest of the NAR, flush the writer, and return
    /// the NAR's size and hash.
    pub async fn finish(mut self) -> Result<NarSummary, NarError> {
        while self.next_event().await?.is_some() {}
        Ok(self.out.finish().await?)
    }

    async fn node_start(&mut self) -> Result<NarEvent, NarError> {
        self.expect("(", "\"(\"").await?;
        self.expect("type", "\"type\"").await?;
        let (buf, len) = self.read_keyword().await?;
        match &buf[..len] {
            b"regular" => {
                let (buf, len) = self.read_keyword().await?;
                let executable = match &buf[..len] {
                    b"executable" => {
                        self.expect("", "\"\" after \"executable\"").await?;
                        self.expect("contents", "\"contents\"").await?;
                        true
                    }
                    b"contents" => false,
                    other => {
                        return Err(NarError::UnexpectedToken {
                            expected: "\"executable\" or \"contents\"",
                            found: show(other),
                        });
                    }
                };
                let size = self.read_u64().await?;
                if size > self.limits.max_file_size {
                    return Err(NarError::FileTooLarge {
                        len: size,
                        max: self.limits.max_file_size,
                    });
                }
                let pad = pad_len(size);
                self.check_total(size.saturating_add(pad as u64))?;
                self.state = State::Contents {
                    remaining: size,
                    pad,
                };
                Ok(NarEvent::Regular { executable, size })
            }
            b"symlink" => {
                self.expect("target", "\"target\"").await?;
                let max = self.limits.max_target_len;
                let target = self
                    .read_string(max, |len| NarError::TargetTooLong { len, max })
                    .await?;
                if target.is_empty() || target.contains(&0) {
                    return Err(NarError::InvalidSymlinkTarget {
                        target: show(&target),
                    });
                }
                self.expect(")", "\")\" closing a symlink").await?;
                self.state = State::AfterNode;
                Ok(NarEvent::Symlink { target })
            }
            b"directory" => {
                if self.dirs.len() >= self.limits.max_depth {
                    return Err(NarError::TooDeep {
                        max: self.limits.max_depth,
                    });
                }
                self.dirs.push(DirFrame {
                    prev: None,
                    entries: 0,
                });
                self.state = State::InDirectory;
                Ok(NarEvent::Directory)
            }
            other => Err(NarError::UnexpectedToken {
                expected: "\"regular\", \"symlink\" or \"directory\"",
                found: show(other),
            }),
        }
    }

    async fn directory_step(&mut self) -> Result<NarEvent, NarError> {
        let (buf, len) = self.read_keyword().await?;
        match &buf[..len] {
            b")" => {
                self.dirs.pop();
                self.state = State::AfterNode;
                Ok(NarEvent::EndDirectory)
            }
            b"entry" => {
                let max_entries = self.limits.max_entries_per_dir;
                let frame = self.dirs.last_mut().expect("in a directory");
                if frame.entries >= max_entries {
                    return Err(NarError::TooManyEntries { max: max_entries });
                }
                frame.entries += 1;
                self.expect("(", "\"(\" opening an entry").await?;
                self.expect("name", "\"name\"").await?;
                let max = self.limits.max_name_len;
                let name = self
                    .read_string(max, |len| NarError::NameTooLong { len, max })
                    .await?;
                validate_entry_name(&name)?;
                let frame = self.dirs.last_mut().expect("in a directory");
                if let Some(prev) = &frame.prev {
                    match name.as_slice().cmp(prev.as_slice()) {
                        std::cmp::Ordering::Equal => {
                            return Err(NarError::DuplicateEntry { name: show(&name) });
                        }
                        std::cmp::Ordering::Less => {
                            return Err(NarError::UnsortedEntries {
                                prev: show(prev),
                                name: show(&name),
                            });
                        }
                        std::cmp::Ordering::Greater => {}
                    }
                }
                frame.prev = Some(name.clone());
                self.expect("node", "\"node\"").await?;
                self.state = State::NodeStart;
                Ok(NarEvent::Entry { name })
            }
            other => Err(NarError::UnexpectedToken {
                expected: "\"entry\" or \")\"",
                found: show(other),
            }),
        }
    }

    /// Consume what is left of the current file's contents, its padding and
    /// the `)` closing the node.
    async fn skip_contents(&mut self) -> Result<(), NarError> {
        let State::Contents { mut remaining, pad } = self.state else {
            return Ok(());
        };
        if remaining > 0 && self.skip_buf.is_empty() {
            let cap = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(SKIP_CHUNK);
            self.skip_buf = vec![0u8; cap];
        }
        while remaining > 0 {
            let want = self
                .skip_buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let n = self.r.read(&mut self.skip_buf[..want]).await?;
            if n == 0 {
                return Err(NarError::Truncated);
            }
            self.out.write(&self.skip_buf[..n]).await?;
            remaining -= n as u64;
        }
        self.read_padding(pad).await?;
        self.expect(")", "\")\" closing a regular file").await?;
        self.state = State::AfterNode;
        Ok(())
    }

    fn check_total(&self, more: u64) -> Result<(), NarError> {
        let max = self.limits.max_total_size;
        if self.out.size().saturating_add(more) > max {
            return Err(NarError::NarTooLarge { max });
        }
        Ok(())
    }

    /// Read exactly `buf.len()` bytes, then hash and copy them.
    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        self.check_total(buf.len() as u64)?;
        match self.r.read_exact(buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(NarError::Truncated);
            }
            Err(e) => return Err(e.into()),
        }
        self.out.write(buf).await?;
        Ok(())
    }

    async fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b).await?;
        Ok(u64::from_le_bytes(b))
    }

    async fn read_padding(&mut self, pad: usize) -> Result<(), NarError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b[..pad]).await?;
        if b.iter().any(|&x| x != 0) {
            return Err(NarError::NonZeroPadding);
        }
        Ok(())
    }

    /// Read a short token (a keyword) into a fixed buffer.
    async fn read_keyword(&mut self) -> Result<([u8; MAX_KEYWORD], usize), NarError> {
        self.read_keyword_with(|len| NarError::TokenTooLong { len })
            .await
    }

    async fn read_keyword_with(
        &mut self,
        too_long: impl FnOnce(u64) -> NarError,
    ) -> Result<([u8; MAX_KEYWORD], usize), NarError> {
        let len = self.read_u64().await?;
        if len > MAX_KEYWORD as u64 {
            return Err(too_long(len));
        }
        let len = len as usize;
        let mut buf = [0u8; MAX_KEYWORD];
        self.read_exact(&mut buf[..len]).await?;
        self.read_padding(pad_len(len as u64)).await?;
        Ok((buf, len))
    }

    async fn expect(&mut self, token: &str, what: &'static str) -> Result<(), NarError> {
        let (buf, len) = self.read_keyword().await?;
        if &buf[..len] != token.as_bytes() {
            return Err(NarError::UnexpectedToken {
                expected: what,
                found: show(&buf[..len]),
            });
        }
        Ok(())
    }

    /// Read a string of at most `max` bytes; the limit is checked before
    /// anything is allocated.
    async fn read_string(
        &mut self,
        max: usize,
        too_long: impl FnOnce(u64) -> NarError,
    ) -> Result<Vec<u8>, NarError> {
        let len = self.read_u64().await?;
        if len > max as u64 {
            return Err(too_long(len));
        }
        self.check_total(len)?;
        let mut v = vec![0u8; len as usize];
        self.read_exact(&mut v).await?;
        self.read_padding(pad_len(len)).await?;
        Ok(v)
    }
}

/// Parse and validate exactly one NAR from `r`, copying its bytes to `w`
/// (pass `tokio::io::sink()` to only validate). Reads not one byte past the
/// end of the NAR, so `r` may carry more data after it. Flushes `w`.
pub async fn copy_nar<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    limits: &NarLimits,
) -> Result<NarSummary, NarError> {
    NarReader::new(r, w, limits).finish().await
}

/// Like [`copy_nar`] for a stream that holds the NAR and nothing else:
/// fails with [`NarError::TrailingBytes`] if anything follows it.
pub async fn copy_nar_exact<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    limits: &NarLimits,
) -> Result<NarSummary, NarError> {
    let summary = copy_nar(r, w, limits).await?;
    expect_eof(r).await?;
    Ok(summary)
}

/// Fail with [`NarError::TrailingBytes`] unless `r` is at its end.
pub async fn expect_eof<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), NarError> {
    let mut b = [0u8; 1];
    if r.read(&mut b).await? != 0 {
        return Err(NarError::TrailingBytes);
    }
    Ok(())
}
