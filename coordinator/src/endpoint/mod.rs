//! The Nix endpoint: what runs behind the SSH server ([`crate::ssh`]) and the
//! stdio relay ([`crate::stdio`]) once a client's exec request is routed.
//! [`Endpoint`] implements [`NixSessionHandler`]: `nix-store --serve --write`
//! sessions get the serve protocol ([`serve`]), `nix-daemon --stdio` sessions
//! the worker protocol ([`worker`]); both are backed by the farm's cache
//! ([`store`]) and its scheduler ([`build`]). A session that fails ends with a
//! one-line message on its stderr and a non-zero exit status; it never
//! affects another session.

pub mod build;
pub mod serve;
pub mod store;
pub mod worker;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use self::build::BuildBackend;
use self::serve::ServeSession;
use self::store::FarmStore;
use crate::cache::Cache;
use crate::ssh::{BoxFuture, ClientIdentity, NixProgram, NixSessionHandler, SessionIo};

/// The Nix endpoint (cheap to clone).
#[derive(Clone)]
pub struct Endpoint {
    store: FarmStore,
    builds: Option<Arc<dyn BuildBackend>>,
}

impl Endpoint {
    /// An endpoint over `cache` whose builds go to `builds` (`None`: a
    /// store-only endpoint, which refuses builds).
    pub fn new(cache: Cache, builds: Option<Arc<dyn BuildBackend>>) -> Endpoint {
        Endpoint {
            store: FarmStore::new(cache),
            builds,
        }
    }

    /// Run one session to its end; returns the exit status.
    pub async fn run_session(
        &self,
        program: NixProgram,
        client: ClientIdentity,
        io: SessionIo,
    ) -> u32 {
        let SessionIo {
            stdin,
            stdout,
            stderr,
        } = io;
        let (result, mut stderr) = match program {
            NixProgram::Serve { write } => {
                let mut session = ServeSession {
                    store: self.store.clone(),
                    builds: self.builds.clone(),
                    client: client.clone(),
                    stderr,
                    write,
                };
                let r = farm_nix::serve::run_server(stdin, stdout, &mut session)
                    .await
                    .map_err(|e| e.to_string());
                (r, session.stderr)
            }
            NixProgram::Daemon => {
                let r = worker::run(self, &client, stdin, stdout).await;
                (r, stderr)
            }
        };
        match result {
            Ok(()) => {
                tracing::debug!(client = %client.fingerprint, "nix session ended");
                0
            }
            Err(message) => {
                tracing::info!(client = %client.fingerprint, error = %message, "nix session failed");
                let line = format!("error: nix-farm: {}\n", message.replace('\n', " "));
                let _ = stderr.write_all(line.as_bytes()).await;
                let _ = stderr.flush().await;
                1
            }
        }
    }
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
