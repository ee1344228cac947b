//! NAR (Nix ARchive): streaming writer from a filesystem path ([`dump_path`])
//! or from bytes ([`dump_bytes`], [`nar_of_bytes`]),
//! streaming reader/validator ([`copy_nar`], [`NarReader`]) and restore to a
//! directory ([`restore`]). Every function hashes (sha256) and counts the NAR
//! bytes as they pass, so one pass gives both the copy and its [`NarSummary`].
//!
//! # Grammar
//!
//! Every token is a Nix wire string: `u64` little-endian length, the bytes, then
//! zero padding up to a multiple of 8. File contents are one such string.
//!
//! ```text
//! nar       = str("nix-archive-1") node
//! node      = str("(") str("type") kind str(")")
//! kind      = str("regular") [ str("executable") str("") ] str("contents") str(CONTENTS)
//!           | str("symlink") str("target") str(TARGET)
//!           | str("directory") { entry }
//! entry     = str("entry") str("(") str("name") str(NAME) str("node") node str(")")
//! ```
//!
//! Entries of a directory appear in strictly increasing byte order of their
//! names (so no duplicates); a name is never empty, `.`, `..`, and never
//! contains `/` or NUL. The end of a NAR is only found by parsing it: the
//! reader here never reads a byte past the final `)`.

mod out;
mod reader;
mod restore;
mod writer;

use std::path::PathBuf;

use crate::hash::Hash;

pub use reader::{NarEvent, NarReader, copy_nar, copy_nar_exact, expect_eof};
pub use restore::restore;
pub use writer::{dump_bytes, dump_path, nar_of_bytes};

/// The magic first token of every NAR.
pub const NAR_MAGIC: &str = "nix-archive-1";

/// Bounds the reader enforces before allocating or accepting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarLimits {
    /// Maximum number of directories nested inside each other (the root
    /// directory counts as 1).
    pub max_depth: usize,
    /// Maximum length in bytes of one directory entry name.
    pub max_name_len: usize,
    /// Maximum length in bytes of a symlink target.
    pub max_target_len: usize,
    /// Maximum number of entries in one directory.
    pub max_entries_per_dir: usize,
    /// Maximum size in bytes of one regular file.
    pub max_file_size: u64,
    /// Maximum size in bytes of the whole NAR.
    pub max_total_size: u64,
}

impl Default for NarLimits {
    fn default() -> Self {
        NarLimits {
            max_depth: 1024,
            max_name_len: 1024,
            max_target_len: 4096,
            max_entries_per_dir: 1 << 20,
            max_file_size: 1 << 40,
            max_total_size: 1 << 40,
        }
    }
}

/// What one pass over a NAR yields: its size and sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarSummary {
    /// Number of bytes of the NAR.
    pub nar_size: u64,
    /// sha256 of the NAR bytes.
    pub nar_hash: Hash,
}

/// Why an entry name is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidNameReason {
    Empty,
    Dot,
    DotDot,
    Slash,
    Nul,
}

impl std::fmt::Display for InvalidNameReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InvalidNameReason::Empty => "is empty",
            InvalidNameReason::Dot => "is \".\"",
            InvalidNameReason::DotDot => "is \"..\"",
            InvalidNameReason::Slash => "contains '/'",
            InvalidNameReason::Nul => "contains NUL",
        })
    }
}

/// Every way reading, writing or restoring a NAR can fail.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{op} {path}: {source}")]
    Fs {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("NAR is truncated (unexpected end of stream)")]
    Truncated,
    #[error("not a NAR: bad magic {found:?}")]
    BadMagic { found: String },
    #[error("unexpected NAR token: expected {expected}, found {found:?}")]
    UnexpectedToken {
        expected: &'static str,
        found: String,
    },
    #[error("NAR token of {len} bytes is longer than any expected token")]
    TokenTooLong { len: u64 },
    #[error("non-zero padding after a NAR string")]
    NonZeroPadding,
    #[error("entry name of {len} bytes exceeds the limit of {max}")]
    NameTooLong { len: u64, max: usize },
    #[error("symlink target of {len} bytes exceeds the limit of {max}")]
    TargetTooLong { len: u64, max: usize },
    #[error("file of {len} bytes exceeds the limit of {max}")]
    FileTooLarge { len: u64, max: u64 },
    #[error("NAR exceeds the size limit of {max} bytes")]
    NarTooLarge { max: u64 },
    #[error("directories nested deeper than the limit of {max}")]
    TooDeep { max: usize },
    #[error("directory has more than the limit of {max} entries")]
    TooManyEntries { max: usize },
    #[error("invalid entry name {name:?}: {reason}")]
    InvalidName {
        name: String,
        reason: InvalidNameReason,
    },
    #[error("entry {name:?} is not sorted after {prev:?}")]
    UnsortedEntries { prev: String, name: String },
    #[error("duplicate entry {name:?}")]
    DuplicateEntry { name: String },
    #[error("invalid symlink target {target:?}")]
    InvalidSymlinkTarget { target: String },
    #[error("trailing bytes after the end of the NAR")]
    TrailingBytes,
    #[error("{path}: unsupported file type (not a regular file, symlink or directory)")]
    UnsupportedFileType { path: PathBuf },
    #[error("{path}: file changed size while being archived")]
    FileChanged { path: PathBuf },
    #[error("{path}: destination already exists")]
    DestinationExists { path: PathBuf },
    #[error("{path}: destination has no parent directory or file name")]
    BadDestination { path: PathBuf },
}

/// Map an I/O error on `path` to [`NarError::Fs`].
pub(crate) fn fs_err<'p>(
    op: &'static str,
    path: &'p std::path::Path,
) -> impl FnOnce(std::io::Error) -> NarError + 'p {
    move |source| NarError::Fs {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Lossy, readable rendering of a (possibly binary) name for error messages.
pub(crate) fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Check an entry name against the NAR rules.
pub fn validate_entry_name(name: &[u8]) -> Result<(), NarError> {
    let reason = if name.is_empty() {
        Some(InvalidNameReason::Empty)
    } else if name == b"." {
        Some(InvalidNameReason::Dot)
    } else if name == b".." {
        Some(InvalidNameReason::DotDot)
    } else if name.contains(&b'/') {
        Some(InvalidNameReason::Slash)
    } else if name.contains(&0) {
        Some(InvalidNameReason::Nul)
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NarError::InvalidName {
            name: show(name),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
