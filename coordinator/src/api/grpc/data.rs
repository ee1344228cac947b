//! NAR transfer and path-info calls shared by `BuilderService` and
//! `FarmService`: thin wrappers over the cache.
//!
//! Upload framing: the first `UploadNarRequest` carries `info` (the claimed
//! path info), every later one a `data` chunk of the NAR, in order. The cache
//! verifies hash, size and structure while the bytes stream and publishes
//! nothing unless they match.
//!
//! Who may upload what (see [`Uploader`]): a builder only the declared outputs
//! of the jobs assigned to it now, published signed (a claim job's as its
//! owner's claims); a client with the push
//! right any path, signed; any other authorized client any path too, but as its
//! own unsigned claim (see [`crate::cache::Trust`]). The cache still verifies
//! every NAR against its claim.

use farm_nix::path_info::ValidPathInfo;
use farm_proto::convert::parse_store_paths;
use farm_proto::v1;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::AsyncRead;
use tonic::{Response, Status, Streaming};

use crate::api::grpc::BoxStream;
use crate::domain::coordinator::Coordinator;

/// Bytes per downloaded chunk.
const CHUNK: usize = 256 * 1024;
/// Most paths in one query.
const MAX_QUERY: usize = 100_000;
/// Longest wait for the next chunk of an upload.
pub(crate) const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The NAR of a path the cache holds: a signed one, or (`owner`: for a claim
/// job's builder) also that owner's claim.
pub(crate) async fn download_nar(
    coord: &Coordinator,
    owner: Option<&str>,
    req: v1::DownloadNarRequest,
) -> Result<Response<BoxStream<v1::NarChunk>>, Status> {
    let path = farm_proto::convert::parse_store_path("store_path", &req.store_path)?;
    let reader = match owner {
        None => coord.cache().nar_reader(&path).await?,
        Some(o) => coord.cache().nar_reader_for(o, &path).await?,
    }
    .ok_or_else(|| Status::not_found(format!("{path} is not in the cache")))?;
    let reader = coord
        .cache()
        .metrics()
        .meter_reader(crate::metrics::Via::Grpc, reader);
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, CHUNK).map(move |r| match r {
        Ok(data) => Ok(v1::NarChunk {
            data: data.to_vec(),
        }),
        Err(e) => {
            tracing::error!(error = %e, "reading a NAR from the cache");
            Err(Status::internal("reading the NAR from the cache failed"))
        }
    });
    Ok(Response::new(Box::pin(stream)))
}

/// Who is uploading: builders may publish only outputs of their running jobs
/// (of the job named, when it is: signed, or a claim job's owner's claims);
/// clients (CLI, Nix) with the trust their key level gives.
pub(crate) enum Uploader<'a> {
    Builder {
        builder: &'a str,
        job: Option<&'a str>,
    },
    Client(crate::cache::Trust),
}

pub(crate) async fn upload_nar(
    coord: &Coordinator,
    uploader: Uploader<'_>,
    mut stream: Streaming<v1::UploadNarRequest>,
) -> Result<Response<v1::UploadNarResponse>, Status> {
    let first = stream
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("empty upload"))?;
    let info = match first.msg {
        Some(v1::upload_nar_request::Msg::Info(i)) => i,
        _ => {
            return Err(Status::invalid_argument(
                "the first message must carry info",
            ));
        }
    };
    let claimed = ValidPathInfo::try_from(info)?;
    let path = claimed.path.clone();
    let trust = match uploader {
        Uploader::Builder { builder, job } => {
            match coord.read_sched(|s| s.output_upload(builder, job, &path)) {
                Some(None) => crate::cache::Trust::Signed,
                // A claim job's output: its owner's, never signed.
                Some(Some(owner)) => crate::cache::Trust::Claim { owner },
                None => {
                    tracing::warn!(%builder, %path, "refused upload: not an output of a job running on this builder");
                    return Err(Status::permission_denied(format!(
                        "{path} is not an output of a job running on builder {builder}; builders may upload only their jobs' outputs"
                    )));
                }
            }
        }
        Uploader::Client(trust) => trust,
    };
    let reader = nar_data(stream, UPLOAD_IDLE_TIMEOUT);
    // The whole stream must be this one NAR: trailing bytes are refused.
    let published = coord.cache().ingest_exact(claimed, reader, trust).await?;
    tracing::debug!(path = %path, size = published.nar_size, "NAR ingested");
    Ok(Response::new(v1::UploadNarResponse {
        store_path: published.path.to_string(),
    }))
}

/// The NAR bytes of an upload's `data` messages, as a reader. A gap of more
/// than `idle` between messages is an error (`TimedOut`), so a stalled
/// uploader is dropped long before the cache's overall upload deadline.
pub(crate) fn nar_data<S>(stream: S, idle: Duration) -> impl AsyncRead + Send + Unpin + 'static
where
    S: Stream<Item = Result<v1::UploadNarRequest, Status>> + Send + Unpin + 'static,
{
    let data = futures::stream::unfold(Some(stream), move |st| async move {
        let mut st = st?;
        match tokio::time::timeout(idle, st.next()).await {
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no NAR data for {} s", idle.as_secs()),
                )),
                None,
            )),
            Ok(None) => None,
            Ok(Some(Ok(v1::UploadNarRequest {
                msg: Some(v1::upload_nar_request::Msg::Data(d)),
            }))) => Some((Ok(bytes::Bytes::from(d)), Some(st))),
            Ok(Some(Ok(_))) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "info sent twice in one upload",
                )),
                None,
            )),
            Ok(Some(Err(s))) => Some((Err(std::io::Error::other(s.message().to_string())), None)),
        }
    });
    tokio_util::io::StreamReader::new(Box::pin(data))
}

/// The infos of the paths the cache holds (as `owner` sees it, when given:
/// a claim's info is unsigned).
pub(crate) async fn query_path_infos(
    coord: &Coordinator,
    owner: Option<&str>,
    req: v1::QueryPathInfosRequest,
) -> Result<Response<v1::QueryPathInfosResponse>, Status> {
    let paths = parse_store_paths("store_paths", &req.store_paths, MAX_QUERY)?;
    let mut infos = Vec::new();
    for p in &paths {
        let info = match owner {
            None => coord.cache().path_info(p).await?,
            Some(o) => coord.cache().path_info_for(o, p).await?,
        };
        if let Some(info) = info {
            infos.push(v1::PathInfo::from(&info));
        }
    }
    Ok(Response::new(v1::QueryPathInfosResponse { infos }))
}

pub(crate) async fn query_valid_paths(
    coord: &Coordinator,
    req: v1::QueryValidPathsRequest,
) -> Result<Response<v1::QueryValidPathsResponse>, Status> {
    let paths = parse_store_paths("store_paths", &req.store_paths, MAX_QUERY)?;
    let valid = coord.cache().valid_paths(&paths).await?;
    Ok(Response::new(v1::QueryValidPathsResponse {
        valid: valid.iter().map(|p| p.to_string()).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn data(d: &[u8]) -> Result<v1::UploadNarRequest, Status> {
        Ok(v1::UploadNarRequest {
            msg: Some(v1::upload_nar_request::Msg::Data(d.to_vec())),
        })
    }

    #[tokio::test]
    async fn a_stalled_upload_times_out() {
        let stalled = futures::stream::iter([data(b"abc")]).chain(futures::stream::pending());
        let mut r = nar_data(Box::pin(stalled), Duration::from_millis(100));
        let mut buf = Vec::new();
        let e = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut buf))
            .await
            .expect("the reader gives up by itself")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(buf, b"abc");

        let ok = futures::stream::iter([data(b"ab"), data(b"c")]);
        let mut r = nar_data(ok, Duration::from_millis(100));
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, b"abc");
    }
}
