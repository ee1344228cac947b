//! Build logs for `farm logs`: [`Coordinator::follow_log`] as `LogChunk`s —
//! a running build's live log (followed on request until the build ends), or
//! the log stored (zstd) in the cache once the build ended. A build is named
//! by its id (`b…`) or its `.drv` path.

use farm_nix::store_path::StorePath;
use farm_proto::v1;
use futures::StreamExt;
use tonic::{Response, Status};

use crate::api::grpc::BoxStream;
use crate::domain::coordinator::Coordinator;
use crate::domain::follow::LogUpdate;
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

pub(crate) async fn logs_stream(
    coord: Coordinator,
    id: &str,
    follow: bool,
) -> Result<Response<BoxStream<v1::LogChunk>>, Status> {
    let (build, drv) = resolve(&coord, id)?;
    let log = coord.follow_log(build, &drv, 0, follow).await?;
    // The log is all there once the build ended; its storing is not waited for.
    let chunks = log
        .take_while(|u| std::future::ready(matches!(u, LogUpdate::Chunk(_))))
        .flat_map(|u| {
            let out: Vec<Result<v1::LogChunk, Status>> = match u {
                LogUpdate::Chunk(data) => data
                    .chunks(CHUNK)
                    .map(|c| Ok(v1::LogChunk { data: c.to_vec() }))
                    .collect(),
                LogUpdate::Ended | LogUpdate::Stored(_) => Vec::new(),
            };
            futures::stream::iter(out)
        });
    Ok(Response::new(Box::pin(chunks)))
}
