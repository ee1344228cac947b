//! The builder's error type: one enum for everything the library can fail with.

use std::path::PathBuf;

/// Everything that can go wrong in the builder library.
#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    /// A configuration value is missing or invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Reading or writing a file failed.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// What was being done ("reading", "writing", …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The builder's key file is unusable.
    #[error("key {}: {message}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Probing the local Nix failed.
    #[error("probing the local nix: {0}")]
    Probe(String),
    /// Talking to the coordinator failed.
    #[error("coordinator: {0}")]
    Connect(String),
    /// The coordinator refused our key.
    #[error("the coordinator refused this builder: {0}")]
    Unauthenticated(String),
    /// A protocol violation by the coordinator.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Moving a NAR between the cache and the local store failed (the
    /// message goes into the job's result).
    #[error("{0}")]
    Transfer(String),
    /// Running the local Nix failed.
    #[error("local nix: {0}")]
    Nix(String),
    /// A plain I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl BuilderError {
    /// A `File` error for reading `path`.
    pub(crate) fn reading(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BuilderError::File {
            what: "reading",
            path: path.into(),
            source,
        }
    }

    /// A `File` error for writing `path`.
    pub(crate) fn writing(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BuilderError::File {
            what: "writing",
            path: path.into(),
            source,
        }
    }
}

/// An error and its sources on one line (tonic's transport errors hide the cause).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
