//! The Nix endpoint's one error conversion: a domain or cache error becomes
//! the protocol error the Nix client prints. What the client did wrong is
//! shown with its context; what failed inside the farm is logged here and
//! the client is told only where to look.

use farm_nix::wire::HandlerError;

use crate::domain::error::DomainError;

/// `e` as the error a Nix client sees, prefixed by what was being done.
pub(crate) fn handler_error(context: &str, e: impl Into<DomainError>) -> HandlerError {
    let e = e.into();
    if let DomainError::Cache(c) = &e
        && c.is_client_error()
    {
        HandlerError::new(format!("{context}: {c}"))
    } else if e.is_client_error() {
        HandlerError::new(format!("{context}: {e}"))
    } else {
        tracing::error!(error = %e, "{context}");
        HandlerError::new(format!(
            "{context}: internal error in the farm (see the coordinator's log)"
        ))
    }
}
