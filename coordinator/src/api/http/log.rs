//! `GET /log/<drv base name>`: a finished build's stored log, as `nix log`
//! reads it from a binary cache.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use farm_nix::store_path::StorePath;

use super::error::{HttpError, not_found};
use crate::cache::Cache;

pub(crate) async fn log(State(cache): State<Cache>, Path(drv): Path<String>) -> Response {
    let Ok(drv) = StorePath::from_base_name(&drv) else {
        return not_found();
    };
    if !drv.is_derivation() {
        return not_found();
    }
    match cache.get_log(&drv).await {
        Ok(Some(log)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            log,
        )
            .into_response(),
        Ok(None) => not_found(),
        Err(e) => HttpError(e).into_response(),
    }
}
