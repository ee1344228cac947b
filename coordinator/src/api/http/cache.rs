//! The binary cache over HTTP, in Nix's layout: `GET /nix-cache-info`,
//! `GET`/`HEAD /<hash>.narinfo`, `GET /nar/<filehash>.nar.zst` (with single
//! byte-range requests) and `GET /log/<drv base name>`. Handlers are thin: they
//! validate the name strictly (so no request can name anything outside the
//! cache's layout), call [`Cache`], and map errors to a status without
//! showing internals. The coordinator merges its own routes (`/metrics`, the
//! dashboard) into the same router.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::TryStreamExt;
use object_store::{GetOptions, GetRange};

use super::error::{HttpError, not_found, text};
use crate::cache::Cache;

/// The cache routes, ready to be served or merged into a larger router.
pub fn cache_router(cache: Cache) -> Router {
    Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/nar/{file}", get(nar))
        .route("/log/{drv}", get(super::log::log))
        .route("/{file}", get(narinfo))
        .with_state(cache)
}

/// `len` characters of the nix32 alphabet (a hash part or a NAR file hash).
fn is_nix32(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| farm_nix::nixbase32::ALPHABET.contains(&b))
}

async fn cache_info(State(cache): State<Cache>) -> Response {
    let cfg = cache.config();
    text(
        StatusCode::OK,
        "text/x-nix-cache-info",
        format!(
            "StoreDir: {}\nWantMassQuery: {}\nPriority: {}\n",
            farm_nix::store_path::STORE_DIR,
            u8::from(cfg.want_mass_query),
            cfg.priority
        ),
    )
}

async fn narinfo(State(cache): State<Cache>, Path(file): Path<String>) -> Response {
    let Some(hash) = file.strip_suffix(".narinfo").filter(|h| is_nix32(h, 32)) else {
        return not_found();
    };
    let found = cache.narinfo_text(hash);
    cache.metrics().narinfo(found.is_some());
    match found {
        // Rendered when it was published: the answer copies nothing.
        Some(t) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/x-nix-narinfo"),
            )],
            t,
        )
            .into_response(),
        None => not_found(),
    }
}

/// A parsed `Range` header: only one `bytes=` range is honoured; anything else
/// (several ranges, other units, bad syntax) is ignored and the whole object
/// sent, as RFC 9110 allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// `a-b` (inclusive) or `a-`.
    From { start: u64, end: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

fn parse_range(value: &str) -> Option<ByteRange> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if a.is_empty() {
        return Some(ByteRange::Suffix(num(b)?));
    }
    let start = num(a)?;
    if b.is_empty() {
        return Some(ByteRange::From { start, end: None });
    }
    let end = num(b)?;
    (end >= start).then_some(ByteRange::From {
        start,
        end: Some(end),
    })
}

/// The half-open byte range `range` selects in an object of `size` bytes;
/// `None` if it is unsatisfiable.
fn resolve_range(range: ByteRange, size: u64) -> Option<std::ops::Range<u64>> {
    match range {
        ByteRange::From { start, end } => {
            if start >= size {
                return None;
            }
            let end = end.map_or(size, |e| e.saturating_add(1).min(size));
            Some(start..end)
        }
        ByteRange::Suffix(0) => None,
        ByteRange::Suffix(n) => Some(size.saturating_sub(n)..size),
    }
}

async fn nar(State(cache): State<Cache>, Path(file): Path<String>, headers: HeaderMap) -> Response {
    let Some(hash) = file.strip_suffix(".nar.zst") else {
        return not_found();
    };
    if !is_nix32(hash, 52) {
        return not_found();
    }
    let key = Cache::nar_object_key(&file);
    let store = cache.object_store();
    let meta = match store.head(&key).await {
        Ok(m) => m,
        Err(object_store::Error::NotFound { .. }) => return not_found(),
        Err(e) => return HttpError(e.into()).into_response(),
    };
    let size = meta.size;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_range);
    let selected = match range {
        None => None,
        Some(r) => match resolve_range(r, size) {
            Some(sel) => Some(sel),
            None => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [
                        (header::CONTENT_RANGE, format!("bytes */{size}")),
                        (header::ACCEPT_RANGES, "bytes".to_string()),
                    ],
                )
                    .into_response();
            }
        },
    };
    let options = GetOptions {
        range: selected.clone().map(GetRange::Bounded),
        ..GetOptions::default()
    };
    let result = match store.get_opts(&key, options).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return not_found(),
        Err(e) => return HttpError(e.into()).into_response(),
    };
    let meter = cache.metrics().serving(crate::metrics::Via::Http);
    let body = Body::from_stream(
        object_stream(result)
            .inspect_ok(move |chunk| meter.sent(chunk.len()))
            .map_err(std::io::Error::other),
    );
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    match selected {
        Some(sel) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = response.headers_mut();
            h.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(sel.end - sel.start),
            );
            if let Ok(v) =
                HeaderValue::from_str(&format!("bytes {}-{}/{size}", sel.start, sel.end - 1))
            {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        None => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
    }
    response
}

/// Bytes read from a local object per chunk sent.
const FILE_CHUNK: usize = 1 << 20;
/// Chunks read ahead of the connection.
const FILE_AHEAD: usize = 4;

/// The bytes of `result`. A local file (object_store's `LocalFileSystem`
/// hands it over open) is read by one blocking thread in chunks of
/// [`FILE_CHUNK`], a few ahead of the connection, instead of object_store's
/// own stream of 8 KiB chunks, each a blocking task of its own; any other
/// storage streams as it comes.
fn object_stream(
    result: object_store::GetResult,
) -> futures::stream::BoxStream<'static, Result<bytes::Bytes, object_store::Error>> {
    use futures::StreamExt;
    let range = result.range.clone();
    match result.payload {
        object_store::GetResultPayload::File(file, path) => {
            let (tx, rx) = tokio::sync::mpsc::channel(FILE_AHEAD);
            tokio::task::spawn_blocking(move || read_chunks(file, &path, range, &tx));
            futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (chunk, rx))
            })
            .boxed()
        }
        _ => result.into_stream(),
    }
}

/// Sends `range` of `file` on `tx` (an error ends it); stops when the
/// receiver is gone (the connection closed).
fn read_chunks(
    mut file: std::fs::File,
    path: &std::path::Path,
    range: std::ops::Range<u64>,
    tx: &tokio::sync::mpsc::Sender<Result<bytes::Bytes, object_store::Error>>,
) {
    use std::io::{Read, Seek, SeekFrom};
    let fail = |e: std::io::Error| object_store::Error::Generic {
        store: "LocalFileSystem",
        source: format!("reading {}: {e}", path.display()).into(),
    };
    if let Err(e) = file.seek(SeekFrom::Start(range.start)) {
        let _ = tx.blocking_send(Err(fail(e)));
        return;
    }
    let mut left = range.end - range.start;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(FILE_CHUNK);
        let mut buf = bytes::BytesMut::zeroed(want);
        let mut got = 0;
        while got < want {
            match file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(fail(e)));
                    return;
                }
            }
        }
        if got == 0 {
            let eof =
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "shorter than its size");
            let _ = tx.blocking_send(Err(fail(eof)));
            return;
        }
        buf.truncate(got);
        left -= got as u64;
        if tx.blocking_send(Ok(buf.freeze())).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_parsing() {
        assert_eq!(
            parse_range("bytes=0-99"),
            Some(ByteRange::From {
                start: 0,
                end: Some(99)
            })
        );
        assert_eq!(
            parse_range("bytes=5-"),
            Some(ByteRange::From {
                start: 5,
                end: None
            })
        );
        assert_eq!(parse_range("bytes=-7"), Some(ByteRange::Suffix(7)));
        assert_eq!(parse_range("bytes=0-1,4-5"), None);
        assert_eq!(parse_range("bytes=9-3"), None);
        assert_eq!(parse_range("items=0-1"), None);
        assert_eq!(parse_range("bytes=+1-2"), None);
        assert_eq!(parse_range("bytes=-"), None);
        assert_eq!(parse_range("bytes=99999999999999999999999-"), None);
    }

    #[test]
    fn range_resolution() {
        let r = |s| resolve_range(parse_range(s).unwrap(), 100);
        assert_eq!(r("bytes=0-9"), Some(0..10));
        assert_eq!(r("bytes=90-200"), Some(90..100));
        assert_eq!(r("bytes=99-"), Some(99..100));
        assert_eq!(r("bytes=100-"), None);
        assert_eq!(r("bytes=-10"), Some(90..100));
        assert_eq!(r("bytes=-1000"), Some(0..100));
        assert_eq!(r("bytes=-0"), None);
    }

    #[test]
    fn names() {
        assert!(is_nix32("0123456789abcdfghijklmnpqrsvwxyz", 32));
        assert!(!is_nix32("0123456789abcdefghijklmnpqrsvwxy", 32));
        assert!(!is_nix32("../../etc/passwd", 16));
    }
}

#[cfg(test)]
mod router_tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode, header};
    use farm_nix::hash::HashAlgo;
    use farm_nix::path_info::ValidPathInfo;
    use farm_nix::signing::SigningKey;
    use farm_nix::store_path::StorePath;
    use object_store::memory::InMemory;
    use tower::ServiceExt;

    use super::cache_router;
    use crate::cache::tests::sample_nar;
    use crate::cache::{Cache, CacheConfig};

    async fn cache_with_path() -> (Cache, StorePath, Vec<u8>) {
        let cache = Cache::with_store(
            CacheConfig::local("/unused"),
            Arc::new(InMemory::new()),
            SigningKey::generate("http-test").unwrap(),
        )
        .await
        .unwrap();
        let path = StorePath::parse(&format!("/nix/store/{}-served", "9".repeat(32))).unwrap();
        let nar = sample_nar("served");
        let claim = ValidPathInfo::new(
            path.clone(),
            HashAlgo::Sha256.digest(&nar),
            nar.len() as u64,
        );
        cache
            .ingest(claim, &nar[..], crate::cache::Trust::Signed)
            .await
            .unwrap();
        (cache, path, nar)
    }

    async fn send(
        cache: &Cache,
        method: Method,
        uri: &str,
        range: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(r) = range {
            req = req.header(header::RANGE, r);
        }
        let resp = cache_router(cache.clone())
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec();
        (status, headers, body)
    }

    #[tokio::test]
    async fn cache_info_and_narinfo() {
        let (cache, path, _) = cache_with_path().await;
        let (s, h, b) = send(&cache, Method::GET, "/nix-cache-info", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/x-nix-cache-info");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
        );

        let uri = format!("/{}.narinfo", path.hash_part());
        let (s, h, b) = send(&cache, Method::GET, &uri, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/x-nix-narinfo");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            cache.narinfo(&path).unwrap().render()
        );

        let (s, h, b) = send(&cache, Method::HEAD, &uri, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/x-nix-narinfo");
        assert!(b.is_empty());

        for missing in [
            format!("/{}.narinfo", "0".repeat(32)),
            "/x.narinfo".into(),
            format!("/{}.narinfo", "e".repeat(32)),
            format!("/{}", path.hash_part()),
            "/nar".into(),
            "/".into(),
        ] {
            let (s, _, _) = send(&cache, Method::GET, &missing, None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{missing}");
            let (s, _, _) = send(&cache, Method::HEAD, &missing, None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "HEAD {missing}");
        }
    }

    #[tokio::test]
    async fn nar_with_ranges() {
        let (cache, path, nar) = cache_with_path().await;
        let ni = cache.narinfo(&path).unwrap();
        let uri = format!("/{}", ni.url);
        let (s, h, full) = send(&cache, Method::GET, &uri, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "application/x-nix-nar");
        assert_eq!(h[header::ACCEPT_RANGES], "bytes");
        assert_eq!(Some(full.len() as u64), ni.file_size);
        assert_eq!(zstd::decode_all(&full[..]).unwrap(), nar);
        let n = full.len();

        for (range, want) in [
            ("bytes=0-9", 0..10),
            ("bytes=10-19", 10..20),
            (&format!("bytes={}-", n - 5) as &str, n - 5..n),
            ("bytes=-7", n - 7..n),
            (&format!("bytes=3-{}", n + 100), 3..n),
        ] {
            let (s, h, b) = send(&cache, Method::GET, &uri, Some(range)).await;
            assert_eq!(s, StatusCode::PARTIAL_CONTENT, "{range}");
            assert_eq!(b, full[want.clone()], "{range}");
            assert_eq!(
                h[header::CONTENT_RANGE],
                format!("bytes {}-{}/{n}", want.start, want.end - 1)
            );
            assert_eq!(
                h[header::CONTENT_LENGTH],
                (want.end - want.start).to_string()
            );
        }
        let (s, h, _) = send(&cache, Method::GET, &uri, Some(&format!("bytes={n}-"))).await;
        assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(h[header::CONTENT_RANGE], format!("bytes */{n}"));
        // Several ranges, or nonsense: the whole object.
        for r in ["bytes=0-1,5-6", "lines=1-2", "bytes=x-y"] {
            let (s, _, b) = send(&cache, Method::GET, &uri, Some(r)).await;
            assert_eq!(s, StatusCode::OK, "{r}");
            assert_eq!(b, full);
        }
        let (s, _, b) = send(&cache, Method::HEAD, &uri, None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(b.is_empty());
        let absent = format!("/nar/{}.nar.zst", "0".repeat(52));
        assert_eq!(
            send(&cache, Method::GET, &absent, None).await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn logs_and_traversal() {
        let (cache, _, _) = cache_with_path().await;
        let drv = StorePath::parse(&format!("/nix/store/{}-x.drv", "1".repeat(32))).unwrap();
        cache.put_log(&drv, b"the log\n").await.unwrap();
        let (s, h, b) = send(
            &cache,
            Method::GET,
            &format!("/log/{}", drv.base_name()),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(b, b"the log\n");
        let other = format!("/log/{}-y.drv", "2".repeat(32));
        assert_eq!(
            send(&cache, Method::GET, &other, None).await.0,
            StatusCode::NOT_FOUND
        );

        // Objects exist outside the served names; none of these may reach them.
        for uri in [
            "/nar/..%2F..%2Fetc%2Fpasswd".to_string(),
            "/nar/../nix-cache-info".into(),
            "/nar/%2e%2e%2f9999.narinfo".into(),
            format!("/nar/..%2F{}.narinfo", "9".repeat(32)),
            format!("/log/..%2F{}.narinfo", "9".repeat(32)),
            "/log/..%2F..%2Fetc%2Fpasswd".into(),
            format!("/log/{}-x.drv%2F..%2F..%2Fa", "1".repeat(32)),
            "/tmp/anything".into(),
            "/..%2Ftmp".into(),
        ] {
            let (s, _, b) = send(&cache, Method::GET, &uri, None).await;
            assert!(
                s == StatusCode::NOT_FOUND || s == StatusCode::BAD_REQUEST,
                "{uri}: {s}"
            );
            assert!(!String::from_utf8_lossy(&b).contains("StorePath"), "{uri}");
        }
    }
}
