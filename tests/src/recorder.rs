//! A recording `FarmService` proxy for attack tests: `farm` dials it as its
//! coordinator; every call's headers (the signature metadata among them) and
//! raw request body (the gRPC frames exactly as `farm` sent them) are
//! recorded, then forwarded unchanged to the real coordinator, or, for the
//! methods the test [holds](GrpcRecorder::hold), answered `UNAVAILABLE` and
//! never forwarded (so the captured signature is still unused). [`replay`]
//! sends a recorded call, with its body or another, to any coordinator.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt, Full};
use tonic::body::Body;
use tonic::codegen::{Bytes, Service, http};

/// One call as `farm` made it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The gRPC path, e.g. `/farm.v1.FarmService/Cancel`.
    pub path: String,
    /// Every header (signature metadata included).
    pub headers: http::HeaderMap,
    /// The request body: gRPC frames (flag, u32 length, message), as sent.
    pub body: Bytes,
}

impl Recorded {
    /// The request's messages, unframed.
    pub fn messages(&self) -> anyhow::Result<Vec<Bytes>> {
        let mut out = Vec::new();
        let mut rest = self.body.clone();
        while !rest.is_empty() {
            anyhow::ensure!(rest.len() >= 5, "a truncated gRPC frame");
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            anyhow::ensure!(rest.len() >= 5 + len, "a truncated gRPC message");
            out.push(rest.slice(5..5 + len));
            rest = rest.slice(5 + len..);
        }
        Ok(out)
    }
}

/// gRPC frames (uncompressed) of `messages`, as a body.
pub fn frames(messages: &[Bytes]) -> Bytes {
    let mut out = Vec::new();
    for m in messages {
        out.push(0);
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    Bytes::from(out)
}

#[derive(Clone)]
struct Recorder {
    target: tonic::transport::Channel,
    target_url: String,
    records: Arc<Mutex<Vec<Recorded>>>,
    hold: Arc<Mutex<BTreeSet<String>>>,
}

impl tonic::server::NamedService for Recorder {
    const NAME: &'static str = "farm.v1.FarmService";
}

impl Service<http::Request<Body>> for Recorder {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let headers = req.headers().clone();
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(tonic::Status::internal(format!("recorder: {e}")).into_http()),
            };
            let rec = Recorded {
                path: path.clone(),
                headers,
                body,
            };
            this.records.lock().unwrap().push(rec.clone());
            if this.hold.lock().unwrap().contains(&path) {
                return Ok(tonic::Status::unavailable("held by the test's recorder").into_http());
            }
            match send(
                this.target.clone(),
                &this.target_url,
                &rec,
                rec.body.clone(),
            )
            .await
            {
                Ok(resp) => Ok(resp),
                Err(e) => Ok(tonic::Status::unavailable(format!("recorder: {e:#}")).into_http()),
            }
        })
    }
}

async fn send(
    mut channel: tonic::transport::Channel,
    url: &str,
    rec: &Recorded,
    body: Bytes,
) -> anyhow::Result<http::Response<Body>> {
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("{url}{}", rec.path))
        .body(Body::new(Full::new(body)))?;
    *req.headers_mut() = rec.headers.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
    Ok(channel.call(req).await?)
}

/// A running recorder (stopped on drop).
pub struct GrpcRecorder {
    url: String,
    records: Arc<Mutex<Vec<Recorded>>>,
    hold: Arc<Mutex<BTreeSet<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcRecorder {
    /// A recorder on a loopback port forwarding to the coordinator at `target_url`.
    pub fn start(target_url: &str) -> anyhow::Result<GrpcRecorder> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let records = Arc::new(Mutex::new(Vec::new()));
        let hold = Arc::new(Mutex::new(BTreeSet::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let target_url = target_url.to_owned();
        let (r, h) = (records.clone(), hold.clone());
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let setup = async {
                    let target =
                        tonic::transport::Endpoint::from_shared(target_url.clone())?.connect_lazy();
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    anyhow::Ok((target, listener))
                };
                let (target, listener) = match setup.await {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let svc = Recorder {
                    target,
                    target_url,
                    records: r,
                    hold: h,
                };
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the recorder did not start")??;
        Ok(GrpcRecorder {
            url,
            records,
            hold,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The URL `farm` should dial.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// From now on, calls to these gRPC paths are recorded but not forwarded
    /// (answered `UNAVAILABLE`); every other call is forwarded.
    pub fn hold(&self, paths: &[&str]) {
        *self.hold.lock().unwrap() = paths.iter().map(|p| p.to_string()).collect();
    }

    /// The calls to `path` recorded so far.
    pub fn calls(&self, path: &str) -> Vec<Recorded> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

impl Drop for GrpcRecorder {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a coordinator answered a replayed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: tonic::Code,
    pub message: String,
}

/// Send `rec` (its headers as recorded, `body` as its body) to the
/// coordinator at `url`; a streaming answer that starts with a message counts
/// as `Ok` (the call was accepted), without waiting for its end.
pub fn replay(url: &str, rec: &Recorded, body: Bytes) -> anyhow::Result<Answer> {
    let url = url.to_owned();
    let rec = rec.clone();
    crate::coordinator::block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let resp = send(channel, &url, &rec, body).await?;
        let from = |h: &http::HeaderMap| {
            h.get("grpc-status").map(|s| Answer {
                code: tonic::Code::from_bytes(s.as_bytes()),
                message: h
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    .map(percent_decode)
                    .unwrap_or_default(),
            })
        };
        if let Some(a) = from(resp.headers()) {
            return Ok(a);
        }
        let mut body = resp.into_body();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
                .await
                .context("no answer to the replayed call within 30 s")?;
            match frame {
                None => anyhow::bail!("the answer ended without a status"),
                Some(Err(e)) => anyhow::bail!("reading the answer: {e}"),
                Some(Ok(f)) => match f.into_trailers() {
                    Ok(t) => return from(&t).context("trailers without grpc-status"),
                    Err(f) if f.is_data() => {
                        // A message: accepted. A unary answer's status follows
                        // at once; a stream's may never come.
                        match tokio::time::timeout(Duration::from_secs(2), body.frame()).await {
                            Ok(Some(Ok(f))) => {
                                if let Ok(t) = f.into_trailers() {
                                    return from(&t).context("trailers without grpc-status");
                                }
                                return Ok(Answer {
                                    code: tonic::Code::Ok,
                                    message: String::new(),
                                });
                            }
                            _ => {
                                return Ok(Answer {
                                    code: tonic::Code::Ok,
                                    message: String::new(),
                                });
                            }
                        }
                    }
                    Err(_) => {}
                },
            }
        }
    })
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
