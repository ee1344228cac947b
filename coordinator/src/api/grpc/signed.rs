//! The signature layer in front of `FarmService`: every call is authenticated
//! before its body is read, and its body checked against what was signed
//! before it is decoded.
//!
//! In order, on the raw HTTP/2 request:
//! 1. `FarmService.Identity` passes (it needs no key: it is how a caller learns
//!    what to sign for), its message limited to [`MAX_IDENTITY_MESSAGE`] bytes.
//! 2. [`CliAuth::authenticate`]: key, time, nonce format and the signature over
//!    method, this coordinator's identity and the claimed body digest, from
//!    the headers alone.
//! 3. [`CliAuth::check`] at [`Level::Read`]: the key is in a key file at all
//!    (or the listener is open), so nobody unknown gets a message read.
//! 4. [`CliAuth::unused`]: the nonce has not been used within the window.
//! 5. The first gRPC message is read (at most [`MAX_MESSAGE_SIZE`], within
//!    [`FIRST_MESSAGE_TIMEOUT`]) and its exact received bytes hashed against
//!    the signed digest; [`CliAuth::remember`] then uses the nonce up
//!    (atomically, so of two concurrent copies one is refused; a copy with a
//!    changed body never gets here, so it cannot use up the honest call's
//!    nonce). The call goes on to tonic with the bytes read put back in
//!    front of the rest of the body, and the [`Authenticated`] result in its
//!    extensions for the handler's own level check.
//!
//! For a client-streaming call (`UploadNar`) the digest covers the first
//! message, the `info` header naming the NAR's hash and size; the cache
//! verifies the data that follows against it.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use farm_proto::MAX_MESSAGE_SIZE;
use farm_proto::auth::methods;
use http_body::{Body as _, Frame};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use crate::api::grpc::auth::{Authenticated, CliAuth, Level};

/// Longest wait for a signed call's first message once its headers are in.
pub(crate) const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `IdentityRequest` read (its one field is a 32-byte challenge).
pub(crate) const MAX_IDENTITY_MESSAGE: usize = 256;
/// A gRPC message's frame header: compressed flag and big-endian length.
const FRAME_HEADER: usize = 5;

/// `inner` (the `FarmService` server) behind the signature checks.
#[derive(Clone)]
pub(crate) struct SignedCalls<S> {
    inner: S,
    auth: CliAuth,
}

impl<S> SignedCalls<S> {
    pub(crate) fn new(inner: S, auth: CliAuth) -> Self {
        SignedCalls { inner, auth }
    }
}

impl<S: NamedService> NamedService for SignedCalls<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<http::Request<Body>> for SignedCalls<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The ready service goes with this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            match admit(&auth, req, farm_common::sign::now_unix()).await {
                Ok(req) => inner.call(req).await,
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The client's address, as tonic records it on each request (TCP or TLS).
fn peer_ip(req: &http::Request<Body>) -> Option<std::net::IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

/// Steps 1 to 5 of the module doc: the request to pass on, or why not.
async fn admit(
    auth: &CliAuth,
    req: http::Request<Body>,
    now_unix: i64,
) -> Result<http::Request<Body>, Status> {
    let method = req.uri().path().to_owned();
    if method == methods::IDENTITY {
        // Nobody is known yet: read no more than a challenge's worth.
        let (parts, body) = req.into_parts();
        let (read, _) = tokio::time::timeout(
            FIRST_MESSAGE_TIMEOUT,
            first_message(body, MAX_IDENTITY_MESSAGE),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("no request message"))??;
        let body = Body::new(Prefixed {
            prefix: Some(read.buffered.freeze()),
            rest: read.rest,
        });
        return Ok(http::Request::from_parts(parts, body));
    }
    let metadata = MetadataMap::from_headers(req.headers().clone());
    let authn = auth.authenticate(&metadata, &method, now_unix)?;
    auth.check(&authn, &method, Level::Read, peer_ip(&req))
        .await?;
    let (mut parts, body) = req.into_parts();
    let body = match &authn {
        Authenticated::Unsigned => body,
        Authenticated::Signed(call) => {
            auth.unused(call)?;
            let (read, message) =
                tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, first_message(body, MAX_MESSAGE_SIZE))
                    .await
                    .map_err(|_| {
                        Status::deadline_exceeded(format!(
                            "no request message within {} s",
                            FIRST_MESSAGE_TIMEOUT.as_secs()
                        ))
                    })??;
            call.check_body(&read.buffered[FRAME_HEADER..FRAME_HEADER + message])
                .map_err(|e| {
                    tracing::warn!(%method, "CLI call refused: body differs from the signed one");
                    Status::unauthenticated(e.to_string())
                })?;
            auth.remember(call, now_unix)?;
            Body::new(Prefixed {
                prefix: Some(read.buffered.freeze()),
                rest: read.rest,
            })
        }
    };
    parts.extensions.insert(authn);
    Ok(http::Request::from_parts(parts, body))
}

/// What [`first_message`] read: every byte so far (the first message's frame
/// and whatever came after it in the same chunks) and the body's remainder.
struct FirstMessage {
    buffered: BytesMut,
    rest: Body,
}

/// Read the body up to the end of its first gRPC message, of at most `max`
/// bytes; returns what was read and the message's length (its bytes follow
/// the frame header).
async fn first_message(mut body: Body, max: usize) -> Result<(FirstMessage, usize), Status> {
    let mut buffered = BytesMut::new();
    loop {
        if buffered.len() >= FRAME_HEADER {
            let len = u32::from_be_bytes([buffered[1], buffered[2], buffered[3], buffered[4]]);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > max {
                return Err(Status::out_of_range(format!(
                    "request message of {len} bytes, more than the {max} allowed"
                )));
            }
            if buffered.len() >= FRAME_HEADER + len {
                return Ok((
                    FirstMessage {
                        buffered,
                        rest: body,
                    },
                    len,
                ));
            }
        }
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while data.has_remaining() {
                        let chunk = data.chunk();
                        buffered.extend_from_slice(chunk);
                        let n = chunk.len();
                        data.advance(n);
                    }
                }
                Err(_) => {
                    return Err(Status::invalid_argument(
                        "the request ended before its first message",
                    ));
                }
            },
            Some(Err(e)) => return Err(Status::from_error(e.into())),
            None => {
                return Err(Status::invalid_argument(
                    "the request ended before its first message",
                ));
            }
        }
    }
}

/// A body whose first bytes were already read: `prefix`, then `rest`.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(p) = self.prefix.take()
            && !p.is_empty()
        {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.as_ref().is_none_or(|p| p.is_empty()) && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_common::sign::CliSigner;
    use prost::Message;

    const ID: &str = "farm-test:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const NOW: i64 = 1_700_000_000;

    fn keypair(seed: u8) -> (CliSigner, String) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let line = farm_common::keys::public_key_line_ed25519(&sk.verifying_key().to_bytes());
        (CliSigner::new(sk, line.clone()), line)
    }

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v
    }

    /// A request as it arrives: headers from a signed `tonic::Request` for
    /// `signed_msg`, body `body` in chunks of 3 bytes.
    fn raw_request(
        signer: &CliSigner,
        method: &str,
        signed_msg: &[u8],
        body: Vec<u8>,
        nonce: u8,
    ) -> http::Request<Body> {
        let mut req = tonic::Request::new(());
        signer.sign_parts(&mut req, method, ID, signed_msg, NOW, [nonce; 16]);
        let chunks: Vec<Result<Frame<Bytes>, Status>> = body
            .chunks(3)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            chunks,
        )));
        let mut http = http::Request::builder()
            .uri(format!("http://farm{method}"))
            .body(body)
            .unwrap();
        *http.headers_mut() = req.metadata().clone().into_headers();
        http
    }

    async fn body_bytes(req: http::Request<Body>) -> Vec<u8> {
        use http_body_util::BodyExt;
        req.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    fn auth(dir: &std::path::Path) -> CliAuth {
        let users = dir.join("users");
        std::fs::write(&users, format!("{}\n", keypair(1).1)).unwrap();
        CliAuth {
            keys: crate::access::KeyPolicy {
                build: Some(users),
                ..Default::default()
            },
            identity: ID.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn passes_the_signed_body_on_whole_and_refuses_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(dir.path());
        let (me, _) = keypair(1);
        let msg = farm_proto::v1::CancelRequest { id: "s1".into() }.encode_to_vec();
        // A stream: the first message, then more frames.
        let mut body = framed(&msg);
        body.extend(framed(b"second"));
        let ok = admit(
            &auth,
            raw_request(&me, methods::CANCEL, &msg, body.clone(), 1),
            NOW,
        )
        .await
        .unwrap();
        assert!(matches!(
            ok.extensions().get::<Authenticated>(),
            Some(Authenticated::Signed(_))
        ));
        assert_eq!(body_bytes(ok).await, body);

        // The same request again.
        let e = admit(
            &auth,
            raw_request(&me, methods::CANCEL, &msg, body.clone(), 1),
            NOW,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("already made once"), "{e:?}");

        // A changed body.
        let other = farm_proto::v1::CancelRequest { id: "s2".into() }.encode_to_vec();
        let e = admit(
            &auth,
            raw_request(&me, methods::CANCEL, &msg, framed(&other), 2),
            NOW,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("not the one that was signed"), "{e:?}");
        // ... which did not use up the nonce of the call it was copied from.
        admit(
            &auth,
            raw_request(&me, methods::CANCEL, &msg, framed(&msg), 2),
            NOW,
        )
        .await
        .unwrap();

        // Another method's signature.
        let mut req = raw_request(&me, methods::CANCEL, &msg, framed(&msg), 3);
        *req.uri_mut() = format!("http://farm{}", methods::SET_DRAIN)
            .parse()
            .unwrap();
        let e = admit(&auth, req, NOW).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        // Signed for another coordinator.
        let other_coord = CliAuth {
            identity: "farm-other:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB=".into(),
            ..auth.clone()
        };
        let e = admit(
            &other_coord,
            raw_request(&me, methods::CANCEL, &msg, framed(&msg), 4),
            NOW,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        // Expired.
        let e = admit(
            &auth,
            raw_request(&me, methods::CANCEL, &msg, framed(&msg), 5),
            NOW + 400,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        // A body that ends early.
        let e = admit(
            &auth,
            raw_request(&me, methods::CANCEL, &msg, framed(&msg)[..4].to_vec(), 6),
            NOW,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }

    #[tokio::test]
    async fn nobody_unknown_gets_a_body_read() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(dir.path());
        // A valid signature by a key in no file, with an oversized message
        // announced: refused on the key, before anything is read (no nonce kept).
        let (stranger, _) = keypair(9);
        let mut huge = vec![0u8];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let e = admit(
            &auth,
            raw_request(&stranger, methods::UPLOAD_NAR, b"", huge.clone(), 1),
            NOW,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(auth.replay.is_empty());
        // Unsigned on a closed listener: refused too.
        let mut req = raw_request(&stranger, methods::UPLOAD_NAR, b"", huge.clone(), 2);
        req.headers_mut().clear();
        let e = admit(&auth, req, NOW).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // An authorized key announcing more than the limit: refused on the
        // length, without reading that much.
        let (me, _) = keypair(1);
        let e = admit(
            &auth,
            raw_request(&me, methods::UPLOAD_NAR, b"", huge, 3),
            NOW,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        // Identity needs nothing, but reads no more than a challenge's worth.
        let challenge = framed(&[1; 34]);
        let mut req = raw_request(&stranger, methods::IDENTITY, b"", challenge.clone(), 4);
        req.headers_mut().clear();
        let ok = admit(&auth, req, NOW).await.unwrap();
        assert_eq!(body_bytes(ok).await, challenge);
        let mut big = vec![0u8];
        big.extend_from_slice(&(MAX_IDENTITY_MESSAGE as u32 + 1).to_be_bytes());
        let mut req = raw_request(&stranger, methods::IDENTITY, b"", big, 5);
        req.headers_mut().clear();
        let e = admit(&auth, req, NOW).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    }
}
