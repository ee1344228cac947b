//! The gRPC client endpoint the builder and the `farm` CLI dial the
//! coordinator with, under one rule:
//!
//! - `https://` needs the coordinator's certificate (or its CA) pinned with
//!   `--ca-cert`; the server name checked is the URL's host.
//! - `http://` (plaintext) only to a loopback host, unless the caller forces
//!   it with [`INSECURE_PLAINTEXT_FLAG`] (the same flag name the coordinator
//!   uses to listen in plaintext beyond loopback).
//!
//! Messages are limited to [`farm_proto::MAX_MESSAGE_SIZE`] both ways: use
//! [`MAX_MESSAGE_SIZE`] on every generated client.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use tonic::codegen::http::Uri;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::Error;

pub use farm_proto::MAX_MESSAGE_SIZE;

/// The flag (in builder and CLI) that allows plaintext beyond loopback.
pub const INSECURE_PLAINTEXT_FLAG: &str = "--insecure-plaintext";
/// Its environment variable.
pub const INSECURE_PLAINTEXT_ENV: &str = "FARM_INSECURE_PLAINTEXT";

/// How long dialling may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive ping period and its answer's timeout: a dead coordinator
/// (or a dead path to it) is noticed within ~40 s even on an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// TCP keep-alive, for what HTTP/2 pings do not cover (half-open sockets).
const TCP_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// How to reach the coordinator.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientTls<'a> {
    /// PEM certificate or CA of the coordinator, for `https://`.
    pub ca_cert: Option<&'a Path>,
    /// Allow `http://` to a non-loopback host ([`INSECURE_PLAINTEXT_FLAG`]).
    pub insecure_plaintext: bool,
}

/// Whether `host` (as in a URL, IPv6 possibly bracketed) is a loopback name or address.
pub fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Check a coordinator URL against the rule above, without touching files.
pub fn check_url(url: &str, tls: ClientTls<'_>) -> Result<Uri, Error> {
    let bad = |message: String| Error::Endpoint {
        url: url.to_owned(),
        message,
    };
    let uri: Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let host = uri.host().ok_or_else(|| bad("no host".into()))?;
    match uri.scheme_str() {
        Some("https") if tls.ca_cert.is_none() => Err(bad(
            "https needs the coordinator's certificate: pass --ca-cert with it or its CA (the coordinator's STATE_DIR/tls/cert.pem)".into(),
        )),
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) || tls.insecure_plaintext => Ok(uri),
        Some("http") => Err(bad(format!(
            "plaintext http is only allowed to a loopback address: use https:// with --ca-cert, or pass {INSECURE_PLAINTEXT_FLAG} (or {INSECURE_PLAINTEXT_ENV}=true) to send unencrypted anyway"
        ))),
        _ => Err(bad("must start with https:// or http://".into())),
    }
}

/// The tonic endpoint for `url`: checked by [`check_url`], TLS with the
/// pinned certificate for `https://`, timeouts and keep-alives set. Reads the
/// certificate file (blocking, small).
pub fn endpoint(url: &str, tls: ClientTls<'_>) -> Result<Endpoint, Error> {
    let uri = check_url(url, tls)?;
    let bad = |message: String| Error::Endpoint {
        url: url.to_owned(),
        message,
    };
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(format!("{e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(TCP_KEEP_ALIVE))
        .http2_keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .keep_alive_while_idle(true);
    if uri.scheme_str() == Some("https")
        && let Some(path) = tls.ca_cert
    {
        let pem = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let host = uri.host().unwrap_or_default();
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'));
        ep = ep
            .tls_config(config)
            .map_err(|e| bad(format!("TLS setup: {e}")))?;
    }
    Ok(ep)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: ClientTls<'static> = ClientTls {
        ca_cert: None,
        insecure_plaintext: false,
    };

    #[test]
    fn plaintext_only_to_loopback_unless_forced() {
        for ok in [
            "http://127.0.0.1:7070",
            "http://[::1]:7070",
            "http://localhost:7070",
            "http://LOCALHOST:7070",
            "http://127.3.4.5:1",
        ] {
            assert!(check_url(ok, PLAIN).is_ok(), "{ok}");
        }
        let e = check_url("http://10.0.0.1:7070", PLAIN).unwrap_err();
        assert!(e.to_string().contains(INSECURE_PLAINTEXT_FLAG), "{e}");
        assert!(check_url("http://farm.example:7070", PLAIN).is_err());
        let forced = ClientTls {
            insecure_plaintext: true,
            ..PLAIN
        };
        assert!(check_url("http://10.0.0.1:7070", forced).is_ok());
        assert!(endpoint("http://10.0.0.1:7070", forced).is_ok());
    }

    #[test]
    fn https_needs_a_pinned_certificate() {
        let e = check_url("https://farm.example:7070", PLAIN).unwrap_err();
        assert!(e.to_string().contains("--ca-cert"), "{e}");
        let ca = ClientTls {
            ca_cert: Some(Path::new("/nonexistent/ca.pem")),
            ..PLAIN
        };
        assert!(check_url("https://farm.example:7070", ca).is_ok());
        // The file is read when the endpoint is built.
        let e = endpoint("https://farm.example:7070", ca).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        assert!(check_url("ftp://127.0.0.1", ca).is_err());
        assert!(check_url("not a url", ca).is_err());
        assert!(endpoint("http://127.0.0.1:7070", PLAIN).is_ok());
    }
}
