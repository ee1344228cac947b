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

/// Refuse `what` unless `client`'s key has at least the `needed` level.
pub(crate) fn need_level(
    client: &crate::nix_endpoint::ssh::ClientIdentity,
    needed: crate::access::Level,
    what: &str,
) -> Result<(), HandlerError> {
    if client.level >= needed {
        return Ok(());
    }
    tracing::warn!(client = %client.fingerprint, has = %client.level, needs = %needed, "{what} refused: below the key's level");
    Err(HandlerError::new(format!(
        "nix-farm: {what} needs the {needed} level; key {} has {} (a key in the coordinator's {} may)",
        client.fingerprint,
        client.level,
        needed.flag()
    )))
}
