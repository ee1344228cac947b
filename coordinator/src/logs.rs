//! Build logs: live from a running build's buffer (optionally followed), or
//! stored (zstd) in the cache once the build ended.

use farm_proto::v1;
use tonic::{Response, Status};

use crate::coordinator::Coordinator;
use crate::grpc::BoxStream;

pub async fn logs_stream(
    _coord: Coordinator,
    _id: &str,
    _follow: bool,
) -> Result<Response<BoxStream<v1::LogChunk>>, Status> {
    Err(Status::unimplemented("the cache is not wired in yet"))
}
