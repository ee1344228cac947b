//! `GET /metrics`: the coordinator's Prometheus registry in OpenMetrics text
//! (what is in it: [`crate::metrics`], `docs/metrics.md`).

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use crate::domain::coordinator::Coordinator;

/// The scrape's response.
pub(crate) fn response(coord: &Coordinator) -> impl IntoResponse + use<> {
    (
        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        coord.metrics().render(),
    )
}
