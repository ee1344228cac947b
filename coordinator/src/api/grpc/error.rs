//! The gRPC layer's one error conversion: domain, cache and state errors
//! become a `Status`, so every handler ends in `?`. The caller's mistakes are
//! shown as they are (FAILED_PRECONDITION for a request the farm's state
//! refuses, INVALID_ARGUMENT for data it sent, NOT_FOUND, DEADLINE_EXCEEDED
//! for an upload out of time); internal failures are logged here and reported
//! without internals.

use tonic::Status;

use crate::cache::CacheError;
use crate::domain::error::DomainError;
use crate::domain::state::StateError;

impl From<DomainError> for Status {
    fn from(e: DomainError) -> Status {
        match e {
            DomainError::Invalid(m) => Status::failed_precondition(m),
            DomainError::NotFound(m) => Status::not_found(m),
            DomainError::Cache(c) => c.into(),
            DomainError::State(s) => s.into(),
            DomainError::Corrupt(m) => {
                tracing::error!(error = %m, "corrupt coordinator data");
                Status::internal("the coordinator's data is inconsistent; see its log")
            }
        }
    }
}

impl From<CacheError> for Status {
    fn from(e: CacheError) -> Status {
        if let CacheError::UploadTimedOut { .. } = e {
            Status::deadline_exceeded(e.to_string())
        } else if e.is_client_error() {
            Status::invalid_argument(e.to_string())
        } else {
            tracing::error!(error = %e, "cache failure");
            Status::internal("the farm's cache failed; see the coordinator's log")
        }
    }
}

impl From<StateError> for Status {
    fn from(e: StateError) -> Status {
        tracing::error!(error = %e, "state database failure");
        Status::internal("the coordinator could not save its state")
    }
}
