//! HTTP routes, one module per family: the binary cache in Nix's layout
//! ([`cache`]), stored build logs ([`log`]), Prometheus metrics
//! ([`metrics`]), named jobs' status badges ([`badge`]), the live web
//! dashboard at `/` ([`dashboard`]); [`error`] is how every route reports a
//! failure.

pub(crate) mod badge;
pub(crate) mod cache;
pub(crate) mod dashboard;
pub(crate) mod error;
pub(crate) mod log;
pub(crate) mod metrics;

use crate::domain::coordinator::Coordinator;

/// The HTTP listener's routes: the binary cache, `/metrics`, `/healthz`,
/// badges and the dashboard (whose admin sessions `sessions` holds).
pub(crate) fn router(coord: &Coordinator, sessions: dashboard::session::Sessions) -> axum::Router {
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
        .merge(dashboard::dashboard_router(coord.clone(), sessions))
        .merge(cache::cache_router(coord.cache().clone()))
}
