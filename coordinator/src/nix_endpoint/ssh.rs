//! The SSH transport of the Nix endpoint: a russh server that authenticates
//! clients by public key against the farm's authorized keys, and routes each
//! exec request for `nix-store --serve --write` (ssh://) or
//! `nix-daemon --stdio` (ssh-ng://) to a [`NixSessionHandler`] with the
//! channel's stdin, stdout and stderr. Anything else is refused with a
//! one-line message. Every session runs in its own task: a broken or hostile
//! session ends alone.
//!
//! Bounds before work ([`SshLimits`]): past `max_connections` open
//! connections a new one gets a one-line refusal and is closed before any SSH
//! is spoken; a connection that has not authenticated within `login_grace` is
//! disconnected (whether it is stuck in the banner, the key exchange or
//! authentication); one key runs at most `max_sessions_per_key` commands at
//! once (more are refused with a message on their stderr); and a peer that
//! stops answering keepalives is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Handler, Msg, Server as _, Session};
use russh::{Channel, ChannelId, Disconnect};
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
    /// A connection from which nothing at all arrives (not even a keepalive
    /// reply) is closed after this long.
    pub inactivity_timeout: Duration,
    pub limits: SshLimits,
}

/// What one client may hold of the SSH endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SshLimits {
    /// Time from accepting a connection to its successful authentication.
    pub login_grace: Duration,
    /// Open connections, authenticated or not.
    pub max_connections: usize,
    /// Commands (Nix sessions) one key runs at once, over all its connections.
    pub max_sessions_per_key: usize,
}

/// Default [`SshLimits::login_grace`]: 30 s. A Nix client authenticates with
/// a key in well under a second, even over a slow link; sshd's 120 s is
/// there for people typing passwords, which this endpoint does not take.
pub const DEFAULT_LOGIN_GRACE: Duration = Duration::from_secs(30);
/// Default [`SshLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default [`SshLimits::max_sessions_per_key`]: a busy build host runs one
/// session per remote build (its `max-jobs` for the farm) plus a few copies.
pub const DEFAULT_MAX_SESSIONS_PER_KEY: usize = 64;

impl Default for SshLimits {
    fn default() -> Self {
        SshLimits {
            login_grace: DEFAULT_LOGIN_GRACE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_sessions_per_key: DEFAULT_MAX_SESSIONS_PER_KEY,
        }
    }
}

/// How often a silent peer is sent a keepalive, and how many unanswered ones
/// close its connection (a vanished client is noticed within about 2 minutes).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_MAX: usize = 4;

struct Shared {
    authorizer: Arc<dyn KeyAuthorizer>,
    handler: Arc<dyn NixSessionHandler>,
    max_sessions_per_key: usize,
    /// Session slots per key fingerprint (only authorized keys get an entry).
    per_key: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Shared {
    /// A session slot for `fingerprint`, `None` if it runs as many as allowed.
    fn key_slot(&self, fingerprint: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(fingerprint.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.max_sessions_per_key)))
                .clone()
        };
        sem.try_acquire_owned().ok()
    }
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
            authenticated: Arc::new(AtomicBool::new(false)),
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
    /// Set once a key is accepted (read by the login grace timer).
    authenticated: Arc<AtomicBool>,
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
                self.authenticated.store(true, Ordering::SeqCst);
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
        let key_slot = shared.key_slot(&identity.fingerprint);
        if key_slot.is_none() {
            tracing::warn!(peer = ?self.peer, key = %identity.fingerprint, max = shared.max_sessions_per_key, "ssh session refused: this key runs too many sessions");
        }
        tokio::spawn(async move {
            // The slots are held until the command ends.
            let _slot = slot;
            let mut stderr = channel.make_writer_ext(Some(1));
            let program = match key_slot {
                Some(key_slot) => parse_exec(&command)
                    .and_then(|p| effective_program(p, identity.forced_command.as_deref()))
                    .map(|p| (p, key_slot)),
                None => Err(RefusedCommand(format!(
                    "nix-farm: this key already runs {} sessions (the limit); try again later",
                    shared.max_sessions_per_key
                ))),
            };
            let code = match program {
                Ok((program, _key_slot)) => {
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
    serve_counted(listener, config, authorizer, handler, shutdown, None).await
}

/// [`serve`], each accepted connection counting in `counter` while it is open.
pub async fn serve_counted(
    listener: TcpListener,
    config: SshConfig,
    authorizer: Arc<dyn KeyAuthorizer>,
    handler: Arc<dyn NixSessionHandler>,
    shutdown: impl Future<Output = ()> + Send,
    counter: Option<crate::metrics::ConnTracker>,
) -> std::io::Result<()> {
    let limits = config.limits;
    let russh_config = Arc::new(russh::server::Config {
        inactivity_timeout: Some(config.inactivity_timeout),
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        keys: vec![config.host_key],
        ..Default::default()
    });
    let mut server = Server {
        shared: Arc::new(Shared {
            authorizer,
            handler,
            max_sessions_per_key: limits.max_sessions_per_key.max(1),
            per_key: Mutex::new(HashMap::new()),
        }),
    };
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not exit.
                    tracing::warn!(%error, "ssh accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => {
                let _ = stop_tx.send(true);
                return Ok(());
            }
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "ssh connection refused: too many connections");
            tokio::spawn(refuse(socket));
            continue;
        };
        let _ = socket.set_nodelay(true);
        let handler = server.new_client(Some(peer));
        let config = russh_config.clone();
        let stop = stop_rx.clone();
        let counted = counter.as_ref().map(|c| c.open());
        tokio::spawn(async move {
            let _slot = slot;
            let _counted = counted;
            run_connection(config, socket, handler, peer, limits.login_grace, stop).await;
        });
    }
}

/// Tell a client past the connection limit why, in a line before any SSH
/// banner (which clients show), and close.
async fn refuse(mut socket: tokio::net::TcpStream) {
    let msg = b"nix-farm: too many SSH connections to this farm; try again later\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.write_all(msg)).await;
    let _ = socket.shutdown().await;
}

/// Run one connection to its end, disconnecting it if it has not
/// authenticated within `grace` or when the server stops.
async fn run_connection(
    config: Arc<russh::server::Config>,
    socket: tokio::net::TcpStream,
    handler: Connection,
    peer: SocketAddr,
    grace: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let authenticated = handler.authenticated.clone();
    let deadline = tokio::time::Instant::now() + grace;
    let kill = Arc::new(KillSwitch::default());
    let socket = Killable {
        inner: socket,
        kill: kill.clone(),
    };
    // Until the client's banner: dropping the future closes the socket.
    let session = match tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(config, socket, handler),
    )
    .await
    {
        Ok(Ok(session)) => session,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "ssh connection setup failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, grace_secs = grace.as_secs_f64(), "ssh connection dropped: no SSH banner within the login grace time");
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    let why: &'static str = 'run: {
        tokio::select! {
            r = &mut session => return log_end(peer, r),
            () = tokio::time::sleep_until(deadline) => {
                if !authenticated.load(Ordering::SeqCst) {
                    tracing::info!(%peer, grace_secs = grace.as_secs_f64(), "ssh connection dropped: not authenticated within the login grace time");
                    break 'run "nix-farm: login grace time exceeded";
                }
            }
            () = stopped(&mut stop) => break 'run "nix-farm coordinator shutting down",
        }
        tokio::select! {
            r = &mut session => return log_end(peer, r),
            () = stopped(&mut stop) => "nix-farm coordinator shutting down",
        }
    };
    // Ask the session to disconnect; if it cannot (say, in the middle of a
    // key exchange the peer never finishes), cut its socket.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        handle.disconnect(Disconnect::ByApplication, why.into(), String::new()),
    )
    .await;
    if tokio::time::timeout(Duration::from_secs(1), &mut session)
        .await
        .is_err()
    {
        kill.kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut session).await;
    }
}

/// Cuts a [`Killable`] stream: its reads and writes fail from then on.
#[derive(Default)]
struct KillSwitch {
    killed: AtomicBool,
    waker: Mutex<Option<std::task::Waker>>,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }

    /// `Some(error)` once killed; otherwise remember who to wake.
    fn check(&self, cx: &std::task::Context<'_>) -> Option<std::io::Error> {
        if self.killed.load(Ordering::SeqCst) {
            return Some(std::io::ErrorKind::ConnectionAborted.into());
        }
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        // Killed between the check and storing the waker: do not miss it.
        self.killed
            .load(Ordering::SeqCst)
            .then(|| std::io::ErrorKind::ConnectionAborted.into())
    }
}

/// A TCP stream the connection's supervisor can cut even while russh's
/// session task (which owns it) is waiting on it.
struct Killable {
    inner: tokio::net::TcpStream,
    kill: Arc<KillSwitch>,
}

impl AsyncRead for Killable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(e) = self.kill.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.kill.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(e) = self.kill.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves once the server stops.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn log_end(peer: SocketAddr, r: Result<(), russh::Error>) {
    match r {
        Ok(()) => tracing::debug!(%peer, "ssh connection closed"),
        Err(error) => tracing::debug!(%peer, %error, "ssh session ended with an error"),
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
