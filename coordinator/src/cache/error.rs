//! The cache's error type, and which errors are the uploader's fault.

use farm_nix::hash::Hash;
use farm_nix::nar::NarError;
use farm_nix::store_path::StorePath;

/// Everything that can go wrong in the cache. Client-caused variants
/// ([`CacheError::is_client_error`]) carry a message fit to show the uploader;
/// the others are logged and reported to clients only as an internal error.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The claimed path info is unusable (wrong hash type, zero size, bad CA…).
    #[error("invalid path info for {path}: {reason}")]
    InvalidClaim { path: StorePath, reason: String },
    /// Another path with the same hash part is published (or, for a claim,
    /// claimed by the same owner) already: the first writer keeps it.
    #[error(
        "{path} is refused: its hash part is taken by {existing}, which the cache already holds"
    )]
    HashPartTaken {
        path: StorePath,
        existing: StorePath,
    },
    /// A claimed reference the NAR does not mention, or the cache lacks.
    #[error("{path} is refused: its reference {reference} {reason}")]
    BadReference {
        path: StorePath,
        reference: StorePath,
        reason: String,
    },
    #[error("NAR hash mismatch for {path}: claimed {claimed}, got {actual}")]
    HashMismatch {
        path: StorePath,
        claimed: Box<Hash>,
        actual: Box<Hash>,
    },
    #[error("NAR size mismatch for {path}: claimed {claimed} bytes, got {actual}")]
    SizeMismatch {
        path: StorePath,
        claimed: u64,
        actual: u64,
    },
    /// The NAR stream was malformed, too large for its claim, or broke off.
    #[error("bad NAR for {path}: {source}")]
    BadNar {
        path: StorePath,
        #[source]
        source: NarError,
    },
    /// The upload did not finish within the time its size allows.
    #[error("upload of {path} timed out: a {nar_size}-byte NAR must arrive within {limit_secs} s")]
    UploadTimedOut {
        path: StorePath,
        nar_size: u64,
        limit_secs: u64,
    },
    #[error("build log of {drv} is not a derivation path")]
    NotADerivation { drv: StorePath },
    #[error("build log too large ({size} bytes, limit {limit})")]
    LogTooLarge { size: u64, limit: u64 },
    /// The object store failed.
    #[error("storage: {0}")]
    Storage(#[from] object_store::Error),
    /// Writing into the object store failed mid-stream.
    #[error("storage I/O: {0}")]
    StorageIo(#[source] std::io::Error),
    /// An object in the store is not what the cache wrote.
    #[error("corrupt cache object {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("cache configuration: {0}")]
    Config(String),
}

impl CacheError {
    /// Whether the request (the claim, the NAR, the log) was at fault, rather than the cache.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            CacheError::InvalidClaim { .. }
                | CacheError::HashPartTaken { .. }
                | CacheError::BadReference { .. }
                | CacheError::HashMismatch { .. }
                | CacheError::SizeMismatch { .. }
                | CacheError::BadNar { .. }
                | CacheError::UploadTimedOut { .. }
                | CacheError::NotADerivation { .. }
                | CacheError::LogTooLarge { .. }
        )
    }

    /// The HTTP status this error maps to (400 for client errors, 500 otherwise).
    pub fn http_status(&self) -> u16 {
        if self.is_client_error() { 400 } else { 500 }
    }
}
