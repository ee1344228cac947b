//! The worker protocol (`nix-daemon --stdio`, ssh-ng://) over the farm.

use tokio::io::{AsyncRead, AsyncWrite};

use super::Endpoint;
use crate::ssh::ClientIdentity;

/// Serve one worker protocol session.
pub async fn run(
    _endpoint: &Endpoint,
    _client: &ClientIdentity,
    _stdin: impl AsyncRead + Unpin + Send,
    _stdout: impl AsyncWrite + Unpin + Send,
) -> Result<(), String> {
    Err("the worker protocol (ssh-ng://) is not served yet".into())
}
