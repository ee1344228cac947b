//! Build logs for `farm logs`: a running build's live buffer (followed on
//! request until the build ends), or the log stored (zstd) in the cache once
//! the build ended. A build is named by its id (`b…`) or its `.drv` path.

use std::time::Duration;

use farm_nix::store_path::StorePath;
use farm_proto::v1;
use tonic::{Response, Status};

use crate::api::grpc::BoxStream;
use crate::domain::coordinator::Coordinator;
use crate::domain::model::{BuildId, parse_build_id};

/// Bytes per log chunk sent.
const CHUNK: usize = 64 * 1024;

/// Resolve a build id or `.drv` path to (build, derivation).
fn resolve(coord: &Coordinator, id: &str) -> Result<(Option<BuildId>, StorePath), Status> {
    if id.starts_with('/') {
        let drv = farm_proto::convert::parse_store_path("build_id", id)?;
        let build = coord.build_of_drv(&drv);
        return Ok((build, drv));
    }
    let build = parse_build_id(id).ok_or_else(|| {
        Status::invalid_argument(format!("{id:?} is not a build id or .drv path"))
    })?;
    let rec = coord
        .build_view(build)
        .ok_or_else(|| Status::not_found(format!("no build {id}")))?;
    Ok((Some(build), rec.drv_path.clone()))
}

pub async fn logs_stream(
    coord: Coordinator,
    id: &str,
    follow: bool,
) -> Result<Response<BoxStream<v1::LogChunk>>, Status> {
    let (build, drv) = resolve(&coord, id)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<v1::LogChunk, Status>>(16);
    let live = build.and_then(|b| coord.live_log(b));
    let pending = build.is_some_and(|b| coord.is_pending(b));
    if live.is_none() && !(follow && pending) {
        // Finished (or never run here): the stored log.
        let data = coord
            .cache()
            .get_log(&drv)
            .await?
            .ok_or_else(|| Status::not_found(format!("no log for {drv}")))?;
        tokio::spawn(async move {
            for c in data.chunks(CHUNK) {
                if tx
                    .send(Ok(v1::LogChunk { data: c.to_vec() }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        return Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )));
    }
    let build = build.expect("live or pending implies a build");
    tokio::spawn(async move {
        // Wait for a pending build to start.
        let live = loop {
            if let Some(l) = coord.live_log(build) {
                break Some(l);
            }
            if !coord.is_pending(build) || coord.stopping().is_cancelled() {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let Some(live) = live else {
            // It ended without running here: whatever was stored.
            if let Ok(Some(data)) = coord.cache().get_log(&drv).await {
                for c in data.chunks(CHUNK) {
                    if tx
                        .send(Ok(v1::LogChunk { data: c.to_vec() }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            return;
        };
        // Absolute offset into the log (bytes dropped from the head count).
        let mut offset: u64 = 0;
        loop {
            let changed = coord.log_changed();
            let (chunk, ended) = {
                let l = live.lock().unwrap_or_else(|e| e.into_inner());
                let chunk = l.read_from(offset);
                offset = l.end();
                (chunk, l.ended)
            };
            for c in chunk.chunks(CHUNK) {
                if tx
                    .send(Ok(v1::LogChunk { data: c.to_vec() }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if ended || !follow || coord.stopping().is_cancelled() {
                return;
            }
            // Woken by new bytes, or re-check now and then.
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}
