//! HTTP routes, one module per family: the binary cache in Nix's layout
//! ([`cache`]), stored build logs ([`log`]), Prometheus metrics
//! ([`metrics`]), named jobs' status badges ([`badge`]); [`error`] is how
//! every route reports a failure.

pub(crate) mod badge;
pub(crate) mod cache;
pub(crate) mod error;
pub(crate) mod log;
pub(crate) mod metrics;

use crate::domain::coordinator::Coordinator;

/// The HTTP listener's routes: the binary cache, `/metrics` and `/healthz`.
pub(crate) fn router(coord: &Coordinator) -> axum::Router {
    let c = coord.clone();
    let metrics = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let c = c.clone();
                async move { metrics::response(&c) }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    metrics
        .merge(badge::badge_router(coord.clone()))
        .merge(cache::cache_router(coord.cache().clone()))
}
