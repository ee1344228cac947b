//! The domain's one error type. Each layer above converts it once, at its
//! boundary: to a gRPC `Status` (`api::grpc::error`), to a Nix protocol error
//! (`nix_endpoint::error`). What the caller did wrong is shown as it is;
//! what failed inside is logged there and reported without internals.

use crate::cache::CacheError;
use crate::domain::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The request names something unusable (not in the cache, not a
    /// derivation, too large…); the message says what to do.
    #[error("{0}")]
    Invalid(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The state database failed.
    #[error("state database: {0}")]
    State(#[from] StateError),
    /// The cache failed, or refused what the request sent.
    #[error("cache: {0}")]
    Cache(#[from] CacheError),
    /// Something the coordinator stored is not what it wrote.
    #[error("{0}")]
    Corrupt(String),
}

impl DomainError {
    /// Whether the caller was at fault (else the coordinator was).
    pub fn is_client_error(&self) -> bool {
        match self {
            DomainError::Invalid(_) | DomainError::NotFound(_) => true,
            DomainError::Cache(e) => e.is_client_error(),
            DomainError::State(_) | DomainError::Corrupt(_) => false,
        }
    }
}
