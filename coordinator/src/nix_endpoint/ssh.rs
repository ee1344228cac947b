//! The SSH transport of the Nix endpoint: a russh server that authenticates
//! clients by public key against the farm's authorized keys, and routes each
//! exec request for `nix-store --serve --write` (ssh://) or
//! `nix-daemon --stdio` (ssh-ng://) to a [`NixSessionHandler`] with the
//! channel's stdin, stdout and stderr. Anything else is refused with a
//! one-line message. Every session runs in its own task: a broken or hostile
//! session ends alone.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Handler, Msg, Server as _, Session};
use russh::{Channel, ChannelId};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

pub use crate::access::Level;

/// The Nix program a client asked to run over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NixProgram {
    /// `nix-store --serve [--write]`: the serve protocol (ssh://).
    Serve { write: bool },
    /// `nix-daemon --stdio`: the worker protocol (ssh-ng://).
    Daemon,
}

/// Who is on the other end of a session, as the authorized keys say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The key as an OpenSSH line without comment (`ssh-ed25519 AAAA…`).
    pub public_key: String,
    /// `SHA256:…` fingerprint, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The comment of the matching authorized_keys line (often user@host).
    pub comment: String,
    /// What the key may do (the key file that admitted it).
    pub level: Level,
    /// `command=` of its entry: the only Nix program it may run.
    pub forced_command: Option<String>,
}

/// The byte streams of one exec session.
pub struct SessionIo {
    pub stdin: Box<dyn AsyncRead + Send + Unpin>,
    pub stdout: Box<dyn AsyncWrite + Send + Unpin>,
    /// What Nix shows as the remote side's messages (build logs over ssh://).
    pub stderr: Box<dyn AsyncWrite + Send + Unpin>,
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs a Nix protocol over one session; returns the exit status.
pub trait NixSessionHandler: Send + Sync + 'static {
    fn run(
        &self,
        program: NixProgram,
        client: ClientIdentity,
        io: SessionIo,
    ) -> BoxFuture<'static, u32>;
}

/// Decides whether a public key (OpenSSH form, no comment) may connect from
/// `peer` (`None`: the address is unknown).
pub trait KeyAuthorizer: Send + Sync + 'static {
    fn authorize(&self, public_key: &str, peer: Option<IpAddr>) -> Option<ClientIdentity>;
}

/// The program a session runs: what the client asked for, limited by the
/// key's `command=`. A forced command must name the same Nix program (it
/// cannot turn ssh:// into ssh-ng://, so a mismatch is refused rather than
/// answered in the wrong protocol); a forced `nix-store --serve` without
/// `--write` makes the session read-only whatever the client asked.
pub fn effective_program(
    requested: NixProgram,
    forced: Option<&str>,
) -> Result<NixProgram, RefusedCommand> {
    let Some(forced) = forced else {
        return Ok(requested);
    };
    let allowed = parse_exec(forced).map_err(|_| {
        RefusedCommand(format!(
            "nix-farm: this key's command={forced:?} (in its authorized_keys entry) is not a Nix program the farm runs; use \"nix-store --serve --write\" or \"nix-daemon --stdio\""
        ))
    })?;
    match (requested, allowed) {
        (NixProgram::Serve { write }, NixProgram::Serve { write: allowed }) => {
            Ok(NixProgram::Serve {
                write: write && allowed,
            })
        }
        (NixProgram::Daemon, NixProgram::Daemon) => Ok(NixProgram::Daemon),
        _ => Err(RefusedCommand(format!(
            "nix-farm: this key may only run {forced:?} (command= in its authorized_keys entry)"
        ))),
    }
}

/// Why an exec command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RefusedCommand(pub String);

/// Parse the command line Nix sends over SSH. Accepts an optional leading
/// `exec`, a program given by path, and `--store URI` arguments (ignored: the
/// farm is one store).
pub fn parse_exec(command: &str) -> Result<NixProgram, RefusedCommand> {
    let refuse = || {
        RefusedCommand(format!(
            "nix-farm: this endpoint only runs `nix-store --serve --write` and `nix-daemon --stdio`, not {:?}",
            command.chars().take(120).collect::<String>()
        ))
    };
    let words = shell_words(command).ok_or_else(refuse)?;
    let mut it = words.iter().map(String::as_str).peekable();
    if it.peek() == Some(&"exec") {
        it.next();
    }
    let program = it.next().ok_or_else(refuse)?;
    let base = program.rsplit('/').next().unwrap_or(program);
    let mut flags = Vec::new();
    while let Some(w) = it.next() {
        if w == "--store" {
            it.next().ok_or_else(refuse)?;
        } else if w.starts_with("--store=") {
        } else {
            flags.push(w);
        }
    }
    match (base, flags.as_slice()) {
        ("nix-store", ["--serve"]) => Ok(NixProgram::Serve { write: false }),
        ("nix-store", ["--serve", "--write"]) | ("nix-store", ["--write", "--serve"]) => {
            Ok(NixProgram::Serve { write: true })
        }
        ("nix-daemon", ["--stdio"]) => Ok(NixProgram::Daemon),
        _ => Err(refuse()),
    }
}

/// Split a command line into words with POSIX-shell single and double quotes
/// and backslash escapes. `None` for an unterminated quote.
fn shell_words(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => cur.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => cur.push(chars.next()?),
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next()?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

/// Load a host key from OpenSSH private key text (as `ssh-keygen` or the
/// coordinator's key generation writes it).
pub fn load_host_key(openssh: &str) -> Result<PrivateKey, russh::keys::ssh_key::Error> {
    PrivateKey::from_openssh(openssh)
}

/// Settings of the SSH listener.
#[derive(Clone)]
pub struct SshConfig {
    pub host_key: PrivateKey,
    /// Idle sessions are closed after this long.
    pub inactivity_timeout: Duration,
}

struct Shared {
    authorizer: Arc<dyn KeyAuthorizer>,
    handler: Arc<dyn NixSessionHandler>,
}

#[derive(Clone)]
struct Server {
    shared: Arc<Shared>,
}

impl russh::server::Server for Server {
    type Handler = Connection;
    fn new_client(&mut self, peer: Option<SocketAddr>) -> Connection {
        Connection {
            shared: self.shared.clone(),
            peer,
            identity: None,
            channels: HashMap::new(),
            sessions: Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS_PER_CONNECTION)),
        }
    }
    fn handle_session_error(&mut self, error: russh::Error) {
        tracing::debug!(%error, "ssh session ended with an error");
    }
}

/// One client connection.
pub struct Connection {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    identity: Option<ClientIdentity>,
    /// Opened channels not yet running a command, each holding a session slot.
    channels: HashMap<ChannelId, (Channel<Msg>, tokio::sync::OwnedSemaphorePermit)>,
    /// Session slots of this connection: a slot is taken when a channel opens
    /// and given back when its command ends (or it is refused).
    sessions: Arc<tokio::sync::Semaphore>,
}

/// Sessions (opened channels and running commands) one SSH connection may have.
pub const MAX_SESSIONS_PER_CONNECTION: usize = 16;

fn openssh_without_comment(key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    key.to_openssh()
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let line = openssh_without_comment(key.public_key);
        match self
            .shared
            .authorizer
            .authorize(&line, self.peer.map(|p| p.ip()))
        {
            Some(identity) => {
                tracing::info!(peer = ?self.peer, user, key = %identity.fingerprint, level = %identity.level, "ssh client authenticated");
                self.identity = Some(identity);
                Ok(Auth::Accept)
            }
            None => {
                let fp = key.public_key.fingerprint(HashAlg::Sha256).to_string();
                tracing::warn!(peer = ?self.peer, user, key = %fp, "ssh key refused: not in the authorized keys");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(slot) = self.sessions.clone().try_acquire_owned() else {
            tracing::warn!(peer = ?self.peer, "ssh channel refused: too many sessions on this connection");
            drop(reply);
            return Ok(());
        };
        self.channels.insert(channel.id(), (channel, slot));
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((channel, slot)) = self.channels.remove(&id) else {
            session.channel_failure(id)?;
            return Ok(());
        };
        let Some(identity) = self.identity.clone() else {
            session.channel_failure(id)?;
            return Ok(());
        };
        session.channel_success(id)?;
        let handle = session.handle();
        let command = String::from_utf8_lossy(data).into_owned();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // The slot is held until the command ends.
            let _slot = slot;
            let mut stderr = channel.make_writer_ext(Some(1));
            let program = parse_exec(&command)
                .and_then(|p| effective_program(p, identity.forced_command.as_deref()));
            let code = match program {
                Ok(program) => {
                    tracing::debug!(?program, client = %identity.fingerprint, "ssh exec");
                    let stream = channel.into_stream();
                    let (stdin, stdout) = tokio::io::split(stream);
                    // stderr was made before the channel moved into its stream.
                    let io = SessionIo {
                        stdin: Box::new(stdin),
                        stdout: Box::new(stdout),
                        stderr: Box::new(stderr),
                    };
                    shared.handler.run(program, identity, io).await
                }
                Err(refused) => {
                    let _ = stderr.write_all(format!("{refused}\n").as_bytes()).await;
                    let _ = stderr.flush().await;
                    drop(channel);
                    127
                }
            };
            let _ = handle.exit_status_request(id, code).await;
            let _ = handle.eof(id).await;
            let _ = handle.close(id).await;
        });
        Ok(())
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // No interactive shells: say what this endpoint is for.
        session.channel_success(id)?;
        let msg = "nix-farm: no shell here; use this host as a Nix remote builder or store (ssh:// or ssh-ng://)\r\n";
        session.extended_data(id, 1, msg.as_bytes().to_vec())?;
        session.exit_status_request(id, 1)?;
        session.eof(id)?;
        session.close(id)?;
        self.channels.remove(&id);
        Ok(())
    }
}

/// Serve SSH on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: SshConfig,
    authorizer: Arc<dyn KeyAuthorizer>,
    handler: Arc<dyn NixSessionHandler>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let russh_config = Arc::new(russh::server::Config {
        inactivity_timeout: Some(config.inactivity_timeout),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        keys: vec![config.host_key],
        ..Default::default()
    });
    let mut server = Server {
        shared: Arc::new(Shared {
            authorizer,
            handler,
        }),
    };
    let running = server.run_on_socket(russh_config, &listener);
    let handle = running.handle();
    tokio::select! {
        r = running => r,
        () = shutdown => {
            handle.shutdown("nix-farm coordinator shutting down".into());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_nix_sends() {
        assert_eq!(
            parse_exec("nix-store --serve --write"),
            Ok(NixProgram::Serve { write: true })
        );
        assert_eq!(
            parse_exec("nix-store --serve"),
            Ok(NixProgram::Serve { write: false })
        );
        assert_eq!(parse_exec("nix-daemon --stdio"), Ok(NixProgram::Daemon));
        assert_eq!(
            parse_exec("exec nix-daemon --stdio"),
            Ok(NixProgram::Daemon)
        );
        assert_eq!(
            parse_exec("/run/current-system/sw/bin/nix-store --serve --write --store 'daemon'"),
            Ok(NixProgram::Serve { write: true })
        );
        assert_eq!(
            parse_exec("nix-daemon --stdio --store=auto"),
            Ok(NixProgram::Daemon)
        );
    }

    #[test]
    fn refuses_everything_else() {
        for cmd in [
            "",
            "ls",
            "nix-store --serve --write; rm -rf /",
            "bash -c 'nix-daemon --stdio'",
            "nix-daemon",
            "nix-daemon --stdio --store",
            "'unterminated",
        ] {
            let err = parse_exec(cmd).unwrap_err();
            assert!(err.0.contains("only runs"), "{cmd}: {err}");
        }
    }
}
