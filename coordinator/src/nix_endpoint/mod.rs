//! The Nix endpoint: what runs behind the SSH server ([`crate::nix_endpoint::ssh`]) and the
//! stdio relay ([`crate::nix_endpoint::stdio`]) once a client's exec request is routed.
//! [`Endpoint`] implements [`NixSessionHandler`]: `nix-store --serve --write`
//! sessions get the serve protocol ([`serve`]), `nix-daemon --stdio` sessions
//! the worker protocol ([`worker`]); both are backed by the farm's cache
//! ([`store`]) and its scheduler ([`build`]). A session that fails ends with a
//! one-line message on its stderr and a non-zero exit status; it never
//! affects another session.

pub(crate) mod access;
pub(crate) mod build;
pub(crate) mod error;
pub(crate) mod farm;
pub(crate) mod serve;
pub mod ssh;
pub mod stdio;
pub(crate) mod store;
pub(crate) mod worker;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod worker_tests;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use self::build::BuildBackend;
use self::serve::ServeSession;
use self::store::FarmStore;
use crate::cache::Cache;
use crate::metrics::ConnTracker;
use crate::nix_endpoint::ssh::{
    BoxFuture, ClientIdentity, NixProgram, NixSessionHandler, SessionIo,
};

/// Why a Nix session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Serve(farm_nix::serve::ServeError),
    #[error("{0}")]
    Worker(farm_nix::worker::WorkerError),
}

/// The Nix endpoint (cheap to clone).
#[derive(Clone)]
pub struct Endpoint {
    store: FarmStore,
    builds: Option<Arc<dyn BuildBackend>>,
    /// Bounds on what one client message may carry (both protocols).
    limits: farm_nix::wire::Limits,
    /// Sessions by protocol, when serving a coordinator (`farm_nix_sessions`).
    sessions: Option<(ConnTracker, ConnTracker)>,
}

impl Endpoint {
    /// An endpoint over `cache` whose builds go to `builds` (`None`: a
    /// store-only endpoint, which refuses builds).
    pub fn new(cache: Cache, builds: Option<Arc<dyn BuildBackend>>) -> Endpoint {
        Endpoint {
            store: FarmStore::new(cache),
            builds,
            limits: farm_nix::wire::Limits::default(),
            sessions: None,
        }
    }

    /// The same endpoint with these protocol limits.
    pub fn with_limits(mut self, limits: farm_nix::wire::Limits) -> Endpoint {
        self.limits = limits;
        self
    }

    /// The endpoint of a running coordinator: its cache, builds on its scheduler.
    pub fn for_coordinator(coord: &crate::domain::coordinator::Coordinator) -> Endpoint {
        let mut e = Endpoint::new(
            coord.cache().clone(),
            Some(Arc::new(farm::FarmBuilds::new(coord.clone()))),
        );
        let m = coord.metrics();
        e.sessions = Some((m.serve_sessions.clone(), m.daemon_sessions.clone()));
        e
    }

    /// Run one session to its end; returns the exit status.
    pub async fn run_session(
        &self,
        program: NixProgram,
        client: ClientIdentity,
        io: SessionIo,
    ) -> u32 {
        // stdout stays open until a failure's line is on stderr: Nix's
        // legacy ssh:// client kills its ssh as soon as stdout ends, so a
        // line sent after stdout's EOF is lost (it then reports only
        // "unexpected end-of-file").
        let SessionIo {
            stdin,
            mut stdout,
            stderr,
        } = io;
        let _counted = self.sessions.as_ref().map(|(serve, daemon)| match program {
            NixProgram::Serve { .. } => serve.open(),
            NixProgram::Daemon => daemon.open(),
        });
        let (result, mut stderr) = match program {
            NixProgram::Serve { write } => {
                let mut session = ServeSession {
                    store: self.store.for_client(&client),
                    builds: self.builds.clone(),
                    client: client.clone(),
                    stderr,
                    write,
                };
                let config = farm_nix::serve::ServeConfig {
                    limits: self.limits,
                    ..Default::default()
                };
                let r = farm_nix::serve::run_server_with_config(
                    stdin,
                    &mut stdout,
                    &mut session,
                    &config,
                )
                .await
                .map_err(SessionError::Serve);
                (r, session.stderr)
            }
            NixProgram::Daemon => {
                let r = worker::run(self, &client, stdin, &mut stdout)
                    .await
                    .map_err(SessionError::Worker);
                (r, stderr)
            }
        };
        match result {
            Ok(()) => {
                tracing::debug!(client = %client.fingerprint, "nix session ended");
                0
            }
            Err(e) => {
                tracing::info!(client = %client.fingerprint, error = %e, "nix session failed");
                let line = format!("error: nix-farm: {}\n", e.to_string().replace('\n', " "));
                // Bounded: a client that stopped reading stderr does not
                // hold the session (and its stdout) open.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    let _ = stderr.write_all(line.as_bytes()).await;
                    let _ = stderr.flush().await;
                })
                .await;
                1
            }
        }
    }
}

/// Bind the relay socket at `path` (a stale socket file left by a previous
/// run is replaced), readable and writable by its owner and group only: the
/// OpenSSH account running `farm-coordinator stdio` must be in that group.
pub fn bind_relay_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

impl NixSessionHandler for Endpoint {
    fn run(
        &self,
        program: NixProgram,
        client: ClientIdentity,
        io: SessionIo,
    ) -> BoxFuture<'static, u32> {
        let this = self.clone();
        Box::pin(async move { this.run_session(program, client, io).await })
    }
}

/// `farm-coordinator stdio`: the forced command of an OpenSSH account in
/// front of the farm (`command="farm-coordinator stdio --socket PATH --client
/// NAME" ssh-ed25519 …` in its authorized_keys). Reads what the client asked
/// to run from `SSH_ORIGINAL_COMMAND` and relays the session to the
/// coordinator's relay socket.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "farm-coordinator stdio")]
pub struct StdioArgs {
    /// The coordinator's `--relay-socket`.
    #[arg(long, env = "FARM_RELAY_SOCKET", value_name = "PATH")]
    pub socket: std::path::PathBuf,
    /// Who this key belongs to, recorded with the builds it asks for
    /// [default: the local user name].
    #[arg(long, value_name = "NAME")]
    pub client: Option<String>,
}

/// Run the stdio relay on this process's stdin, stdout and stderr; returns the exit status.
pub async fn run_stdio(args: StdioArgs) -> u32 {
    let mut stderr = tokio::io::stderr();
    let Ok(command) = std::env::var("SSH_ORIGINAL_COMMAND") else {
        let _ = stderr
            .write_all(b"nix-farm: no SSH_ORIGINAL_COMMAND; use this as an OpenSSH forced command for Nix (ssh:// or ssh-ng://)\n")
            .await;
        return 1;
    };
    let client = args
        .client
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    match crate::nix_endpoint::stdio::relay(
        &args.socket,
        &command,
        &client,
        tokio::io::stdin(),
        tokio::io::stdout(),
        tokio::io::stderr(),
    )
    .await
    {
        Ok(code) => code,
        Err(e) => {
            let _ = stderr
                .write_all(format!("error: nix-farm: {e}\n").as_bytes())
                .await;
            1
        }
    }
}
