//! How every HTTP route fails: a cache error becomes 400 (the request was at
//! fault) or 500, with a one-line body and no internals; the cause is logged.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::cache::CacheError;

pub(crate) fn text(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

pub(crate) fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n".into(),
    )
}

/// A failed request: logged, and answered by its kind only.
pub(crate) struct HttpError(pub(crate) CacheError);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let err = self.0;
        if err.is_client_error() {
            tracing::info!(error = %err, "bad cache request");
            text(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                "bad request\n".into(),
            )
        } else {
            tracing::error!(error = %err, "cache request failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "internal server error\n".into(),
            )
        }
    }
}
