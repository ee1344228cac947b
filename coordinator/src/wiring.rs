//! Composition of the cache into the coordinator: opening it from the
//! configuration and the HTTP routes served beside it.

use farm_nix::signing::SigningKey;

use crate::CoordinatorError;
use crate::config::CoordinatorConfig;
use crate::coordinator::Coordinator;

/// Open the cache and attach it to the coordinator.
pub async fn attach(
    _coord: &Coordinator,
    _config: &CoordinatorConfig,
    _signing_key: SigningKey,
) -> Result<(), CoordinatorError> {
    Ok(())
}

/// The HTTP listener's routes.
pub fn http_router(_coord: &Coordinator) -> axum::Router {
    axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }))
}
