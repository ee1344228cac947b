//! Bounds on gRPC requests before the services see them: the largest message
//! each service decodes, and a deadline on every call whose request is one
//! message ([`UnaryTimeoutLayer`]). Streams from the client (`UploadNar`, a
//! builder's `Session`) are bounded per message instead, and by the idle
//! timeouts of the services that read them.

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::codegen::http;

/// Largest message the `FarmService` decodes (CLI and CI requests): a
/// `QueryValidPaths` or `Submit` of ~150 000 paths, an `UploadNar` chunk
/// (256 KiB) or path info. Half the 32 MiB the coordinator may send.
pub(crate) const FARM_MAX_DECODE: usize = 16 << 20;
/// Largest message the `BuilderService` decodes: a job result with its
/// outputs' infos, a log chunk, a NAR chunk, a batch of path queries.
pub(crate) const BUILDER_MAX_DECODE: usize = 8 << 20;
/// Largest HTTP/2 header list (the metadata: tokens, signatures).
pub(crate) const MAX_HEADER_LIST: u32 = 64 << 10;
/// Deadline of a call whose request is a single message, from its arrival to
/// its response (headers, for a streamed response): a client that sends its
/// request slowly, or a call stuck behind a slow store, is cut off.
pub(crate) const UNARY_TIMEOUT: Duration = Duration::from_secs(120);

/// The calls whose request is one message and whose answer starts soon
/// (not `UploadNar` or the builder `Session`, whose request streams last as
/// long as the client needs, nor `Submit`, which loads a whole graph of up to
/// 100 000 derivations from the cache before it answers).
const SINGLE_REQUEST_CALLS: &[&str] = &[
    "/farm.v1.FarmService/Status",
    "/farm.v1.FarmService/Watch",
    "/farm.v1.FarmService/Logs",
    "/farm.v1.FarmService/Cancel",
    "/farm.v1.FarmService/SetDrain",
    "/farm.v1.FarmService/QueryValidPaths",
    "/farm.v1.FarmService/DownloadNar",
    "/farm.v1.FarmService/Machines",
    "/farm.v1.FarmService/Jobs",
    "/farm.v1.FarmService/DashboardLogin",
    "/farm.v1.BuilderService/DownloadNar",
    "/farm.v1.BuilderService/QueryPathInfos",
];

/// Puts [`UNARY_TIMEOUT`] (or the given duration) on the single-request calls.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnaryTimeoutLayer(pub Duration);

impl<S> tower::Layer<S> for UnaryTimeoutLayer {
    type Service = UnaryTimeout<S>;
    fn layer(&self, inner: S) -> UnaryTimeout<S> {
        UnaryTimeout {
            inner,
            timeout: self.0,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct UnaryTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B, RB> tower::Service<http::Request<B>> for UnaryTimeout<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let limited = SINGLE_REQUEST_CALLS.contains(&method.as_str());
        let timeout = self.timeout;
        let fut = self.inner.call(req);
        Box::pin(async move {
            if !limited {
                return fut.await;
            }
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(%method, secs = timeout.as_secs(), "gRPC call cut off: over the request timeout");
                    Ok(tonic::Status::deadline_exceeded(format!(
                        "{method} took longer than the coordinator's {} s request timeout",
                        timeout.as_secs()
                    ))
                    .into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    /// A service that answers after `delay`.
    fn slow(
        delay: Duration,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Send + 'static,
    > + Send {
        tower::service_fn(move |_req: http::Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        })
    }

    fn req(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn single_request_calls_get_a_deadline_streams_do_not() {
        let layer = UnaryTimeoutLayer(Duration::from_millis(50));
        let svc = layer.layer(slow(Duration::from_secs(30)));
        let resp = svc
            .oneshot(req("/farm.v1.FarmService/Status"))
            .await
            .unwrap();
        let status = tonic::Status::from_header_map(resp.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("request timeout"), "{status:?}");
        // An upload is not cut off by the single-request deadline.
        let layer = UnaryTimeoutLayer(Duration::from_millis(50));
        let svc = layer.layer(slow(Duration::from_millis(300)));
        let resp = svc
            .oneshot(req("/farm.v1.FarmService/UploadNar"))
            .await
            .unwrap();
        assert!(tonic::Status::from_header_map(resp.headers()).is_none());
    }
}
