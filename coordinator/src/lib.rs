//! The farm coordinator: scheduler, state, cache, and the gRPC, HTTP and SSH endpoints.
//!
//! Library entry points (what `farm-coordinator` and `farm up` call):
//! [`server::start`] binds every listener and returns a [`server::RunningCoordinator`]
//! (its [`server::Endpoints`], and `shutdown()`); [`server::run`] runs until a
//! shutdown future resolves.

#![deny(unreachable_pub)]

// The public API is what `farm-coordinator`, `farm up`, the benchmark and the
// tests use: starting a coordinator (`start`, `run`, `config`), the domain
// (for `farm up`'s status and `restart_bench`), the cache (served alone in
// the cache tests), the metrics (their names, read by the Grafana board's
// test) and the SSH transport (its own tests). The rest is
// crate-private, and `unreachable_pub` keeps it so.
pub mod access;
pub mod alerting;
mod api;
pub mod cache;
pub mod config;
pub mod domain;
mod keys;
pub mod metrics;
pub mod nix_endpoint;
mod server;

pub use api::http::cache::cache_router;
pub use config::CoordinatorConfig;
pub use server::{Endpoints, RunningCoordinator, run, start};

/// What can stop the coordinator from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("configuration: {0}")]
    Config(String),
    /// The cache signing key is unusable.
    #[error("cache signing key {}: {source}", path.display())]
    SigningKey {
        path: std::path::PathBuf,
        source: farm_nix::signing::SigningError,
    },
    /// The SSH host key is unusable.
    #[error("SSH host key {}: {source}", path.display())]
    HostKey {
        path: std::path::PathBuf,
        source: ssh_key::Error,
    },
    /// The SSH server cannot use the host key.
    #[error("the SSH server cannot load the host key: {0}")]
    SshServerKey(#[source] russh::keys::ssh_key::Error),
    /// Generating the self-signed TLS certificate failed.
    #[error("generating the TLS certificate: {0}")]
    TlsCertificate(#[from] rcgen::Error),
    /// A key or certificate file could not be written.
    #[error("writing {}: {source}", path.display())]
    WriteKey {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The shutdown grace ran out before the state was flushed.
    #[error("stopped before the state was flushed (shutdown grace ran out)")]
    FlushTimedOut,
    /// A key file (authorized keys, key lines) is unreadable or malformed.
    #[error("key: {0}")]
    KeyFile(#[from] farm_common::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("state database: {0}")]
    State(#[from] domain::state::StateError),
    #[error("cache: {0}")]
    Cache(#[from] cache::CacheError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("a server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
