//! NAR transfer and path-info calls shared by `BuilderService` and
//! `FarmService`: thin wrappers over the cache.

use farm_proto::v1;
use tonic::{Response, Status, Streaming};

use crate::coordinator::Coordinator;
use crate::grpc::BoxStream;

pub async fn download_nar(
    _coord: &Coordinator,
    _req: v1::DownloadNarRequest,
) -> Result<Response<BoxStream<v1::NarChunk>>, Status> {
    Err(Status::unimplemented("the cache is not wired in yet"))
}

pub async fn upload_nar(
    _coord: &Coordinator,
    _stream: Streaming<v1::UploadNarRequest>,
) -> Result<Response<v1::UploadNarResponse>, Status> {
    Err(Status::unimplemented("the cache is not wired in yet"))
}

pub async fn query_path_infos(
    _coord: &Coordinator,
    _req: v1::QueryPathInfosRequest,
) -> Result<Response<v1::QueryPathInfosResponse>, Status> {
    Err(Status::unimplemented("the cache is not wired in yet"))
}

pub async fn query_valid_paths(
    _coord: &Coordinator,
    _req: v1::QueryValidPathsRequest,
) -> Result<Response<v1::QueryValidPathsResponse>, Status> {
    Err(Status::unimplemented("the cache is not wired in yet"))
}
