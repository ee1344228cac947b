//! The crate's one error type.

use std::path::PathBuf;

/// Everything the shared pieces can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key or authorized_keys file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key or authorized_keys file is larger than any sane one.
    #[error("{}: file too large ({len} bytes, at most {max})", path.display())]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    /// A line of an authorized_keys file is not a key entry.
    #[error("{}line {line}: {message}", file_prefix(path))]
    BadLine {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        /// 1-based line number.
        line: usize,
        message: String,
    },
    /// A single public key line (not from a file) is unusable.
    #[error("{0}")]
    PublicKey(String),
    /// A coordinator URL, or the TLS setup for it, is unusable.
    #[error("coordinator URL {url:?}: {message}")]
    Endpoint { url: String, message: String },
    /// A signed call's proof is missing or wrong.
    #[error("{0}")]
    Unauthenticated(String),
    /// Too many signed calls within one validity window to remember their nonces.
    #[error("{0}")]
    Busy(String),
}

fn file_prefix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!("{}: ", p.display()),
        None => String::new(),
    }
}
