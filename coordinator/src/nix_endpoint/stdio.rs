//! The stdio relay, for sites that put OpenSSH in front of the farm.
//!
//! OpenSSH runs `farm-coordinator stdio --socket PATH` as a forced command
//! (`command="…"` in authorized_keys); the relay reads the client's command
//! from `SSH_ORIGINAL_COMMAND`, connects to the coordinator's local Unix
//! socket and relays stdin, stdout and stderr. The coordinator runs the same
//! [`NixSessionHandler`] as for its own SSH server.
//!
//! Socket protocol (relay → coordinator), after connecting:
//! `u32 len` + UTF-8 JSON preamble `{"command": "...", "client": "..."}`, then
//! the raw stdin bytes until the relay shuts down its write half.
//! Coordinator → relay: frames `[u8 kind][u32 len LE][len bytes]`, kind 1 =
//! stdout, 2 = stderr, 3 = exit status (4 bytes LE), after which the
//! coordinator closes the connection.
//!
//! Who may connect: the socket's mode and directory, and optionally a list of
//! uids checked with `SO_PEERCRED` ([`serve_with`]; `farm up` admits only its
//! own user and root). A refused peer gets one stderr line and exit status 1.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::nix_endpoint::ssh::{ClientIdentity, Level, NixSessionHandler, SessionIo, parse_exec};

const KIND_STDOUT: u8 = 1;
const KIND_STDERR: u8 = 2;
const KIND_EXIT: u8 = 3;
const MAX_PREAMBLE: u32 = 64 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;

/// Why the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(
        "cannot reach the coordinator at {path}: {source} (is farm-coordinator running, and may this user open its socket?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("relay I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the coordinator sent a malformed frame")]
    BadFrame,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Preamble {
    command: String,
    client: String,
}

/// Relay one session: `command` is what the SSH client asked to run, `client`
/// names who OpenSSH authenticated (recorded with the builds it asks for).
/// Returns the exit status to exit with.
pub async fn relay(
    socket: &Path,
    command: &str,
    client: &str,
    stdin: impl AsyncRead + Unpin,
    mut stdout: impl AsyncWrite + Unpin,
    mut stderr: impl AsyncWrite + Unpin,
) -> Result<u32, RelayError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| RelayError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut rd, mut wr) = stream.into_split();
    let preamble = serde_json::to_vec(&Preamble {
        command: command.into(),
        client: client.into(),
    })
    .expect("a preamble serialises");
    wr.write_all(&(preamble.len() as u32).to_le_bytes()).await?;
    wr.write_all(&preamble).await?;
    let upload = async move {
        let mut stdin = stdin;
        let r = tokio::io::copy(&mut stdin, &mut wr).await;
        let _ = wr.shutdown().await;
        r
    };
    let download = async {
        let mut buf = Vec::new();
        loop {
            let kind = match rd.read_u8().await {
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(255),
                Err(e) => return Err(RelayError::Io(e)),
            };
            let len = rd.read_u32_le().await?;
            if len > MAX_FRAME {
                return Err(RelayError::BadFrame);
            }
            buf.resize(len as usize, 0);
            rd.read_exact(&mut buf).await?;
            match kind {
                KIND_STDOUT => {
                    stdout.write_all(&buf).await?;
                    stdout.flush().await?;
                }
                KIND_STDERR => {
                    stderr.write_all(&buf).await?;
                    stderr.flush().await?;
                }
                KIND_EXIT if len == 4 => {
                    return Ok(u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")));
                }
                _ => return Err(RelayError::BadFrame),
            }
        }
    };
    tokio::pin!(upload);
    tokio::pin!(download);
    // The session ends when the coordinator says so; stdin may still be open.
    let mut upload_done = false;
    loop {
        tokio::select! {
            r = &mut upload, if !upload_done => { upload_done = true; r?; }
            r = &mut download => return r,
        }
    }
}

/// A pipe whose far end is framed as `kind` onto the relay connection.
fn framed_pipe(
    kind: u8,
    tx: tokio::sync::mpsc::Sender<(u8, Vec<u8>)>,
) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
    let (near, mut far) = tokio::io::duplex(64 * 1024);
    let pump = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = far.read(&mut buf).await {
            if n == 0 || tx.send((kind, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    });
    (near, pump)
}

async fn serve_one(
    stream: UnixStream,
    handler: Arc<dyn NixSessionHandler>,
    level: Level,
) -> Result<(), RelayError> {
    let (mut rd, mut wr) = stream.into_split();
    let len = rd.read_u32_le().await?;
    if len > MAX_PREAMBLE {
        return Err(RelayError::BadFrame);
    }
    let mut buf = vec![0; len as usize];
    rd.read_exact(&mut buf).await?;
    let preamble: Preamble = serde_json::from_slice(&buf).map_err(|_| RelayError::BadFrame)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u8, Vec<u8>)>(64);
    let writer = tokio::spawn(async move {
        while let Some((kind, data)) = rx.recv().await {
            wr.write_u8(kind).await?;
            wr.write_u32_le(data.len() as u32).await?;
            wr.write_all(&data).await?;
            if kind == KIND_EXIT {
                break;
            }
        }
        wr.shutdown().await
    });
    let code = match parse_exec(&preamble.command) {
        Ok(program) => {
            let client = ClientIdentity {
                public_key: String::new(),
                fingerprint: format!("relay:{}", preamble.client),
                comment: preamble.client.clone(),
                level,
                forced_command: None,
            };
            let (stdout, out_pump) = framed_pipe(KIND_STDOUT, tx.clone());
            let (stderr, err_pump) = framed_pipe(KIND_STDERR, tx.clone());
            let io = SessionIo {
                stdin: Box::new(rd),
                stdout: Box::new(stdout),
                stderr: Box::new(stderr),
            };
            let code = handler.run(program, client, io).await;
            // The handler dropped its ends: the pumps drain what is left, then stop.
            let _ = out_pump.await;
            let _ = err_pump.await;
            code
        }
        Err(refused) => {
            let _ = tx
                .send((KIND_STDERR, format!("{refused}\n").into_bytes()))
                .await;
            127
        }
    };
    let _ = tx.send((KIND_EXIT, code.to_le_bytes().to_vec())).await;
    drop(tx);
    writer
        .await
        .map_err(|e| RelayError::Io(std::io::Error::other(e)))??;
    Ok(())
}

/// Bind the relay socket at `path` (replacing a stale one) with mode 0660: the
/// socket's owner and group may relay, so the group decides who may reach the
/// farm through OpenSSH's forced command; others may not connect.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Tell a peer whose uid is not admitted so, in the relay's framing, after
/// reading its preamble (so the message is not lost to a write error on its side).
async fn refuse_peer(stream: UnixStream, why: String) -> Result<(), RelayError> {
    let (mut rd, mut wr) = stream.into_split();
    let len = rd.read_u32_le().await?;
    if len <= MAX_PREAMBLE {
        let mut buf = vec![0; len as usize];
        rd.read_exact(&mut buf).await?;
    }
    let line = format!("error: nix-farm: {why}\n");
    for (kind, data) in [
        (KIND_STDERR, line.into_bytes()),
        (KIND_EXIT, 1u32.to_le_bytes().to_vec()),
    ] {
        wr.write_u8(kind).await?;
        wr.write_u32_le(data.len() as u32).await?;
        wr.write_all(&data).await?;
    }
    wr.shutdown().await?;
    // Let the relay read the frames before the connection goes: drain what it
    // still sends (bounded) until it hangs up.
    let mut sink = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

/// Whether the peer of `stream` may relay: `Err` says why not.
fn check_peer(stream: &UnixStream, allowed_uids: Option<&[u32]>) -> Result<(), String> {
    let Some(allowed) = allowed_uids else {
        return Ok(());
    };
    let uid = stream
        .peer_cred()
        .map_err(|e| format!("cannot tell who connected to the relay socket: {e}"))?
        .uid();
    if allowed.contains(&uid) {
        return Ok(());
    }
    let list: Vec<String> = allowed.iter().map(u32::to_string).collect();
    Err(format!(
        "this farm refuses uid {uid}: its relay socket admits only uid {} (the user who started it, and root); other users need a key and the SSH endpoint",
        list.join(", ")
    ))
}

/// Accept relay connections on `listener` until `shutdown` resolves; each runs
/// on its own, its client at `level` (`--relay-level`: the OpenSSH account
/// in front decides who reaches the socket). A failed `accept` (say, out of file descriptors) is logged and
/// the loop goes on after a short pause; it never ends the relay server.
pub async fn serve(
    listener: UnixListener,
    handler: Arc<dyn NixSessionHandler>,
    level: Level,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_with(listener, handler, level, None, shutdown).await
}

/// [`serve`], admitting only peers whose uid (`SO_PEERCRED`) is in
/// `allowed_uids` when that is given (`None`: whoever can open the socket).
pub async fn serve_with(
    listener: UnixListener,
    handler: Arc<dyn NixSessionHandler>,
    level: Level,
    allowed_uids: Option<Vec<u32>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let allowed_uids: Option<Arc<[u32]>> = allowed_uids.map(Into::into);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "relay socket: accept failed");
                        // Out of descriptors (EMFILE/ENFILE) clears only as
                        // others close: do not spin meanwhile.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if let Err(why) = check_peer(&stream, allowed_uids.as_deref()) {
                    tracing::warn!(%why, "relay socket: peer refused");
                    tokio::spawn(async move {
                        if let Err(error) = refuse_peer(stream, why).await {
                            tracing::debug!(%error, "relay refusal not delivered");
                        }
                    });
                    continue;
                }
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve_one(stream, handler, level).await {
                        tracing::debug!(%error, "relay session ended with an error");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix_endpoint::ssh::BoxFuture;
    use crate::nix_endpoint::ssh::NixProgram;

    /// Answers every session with "ok" on stdout.
    struct Ok;

    impl NixSessionHandler for Ok {
        fn run(
            &self,
            _program: NixProgram,
            _client: ClientIdentity,
            mut io: SessionIo,
        ) -> BoxFuture<'static, u32> {
            Box::pin(async move {
                let _ = io.stdout.write_all(b"ok").await;
                0
            })
        }
    }

    async fn session(allowed: Option<Vec<u32>>) -> (u32, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("relay.sock");
        let listener = bind(&sock).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(
            listener,
            Arc::new(Ok),
            Level::Admin,
            allowed,
            async {
                let _ = stop_rx.await;
            },
        ));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            relay(
                &sock,
                "nix-daemon --stdio",
                "me",
                tokio::io::empty(),
                &mut out,
                &mut err,
            ),
        )
        .await
        .expect("the relay ends")
        .unwrap();
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[tokio::test]
    async fn peer_uids_are_checked_when_listed() {
        let me = my_uid();
        assert_eq!(session(None).await, (0, "ok".into(), String::new()));
        assert_eq!(
            session(Some(vec![me])).await,
            (0, "ok".into(), String::new())
        );
        let (code, out, err) = session(Some(vec![me.wrapping_add(1)])).await;
        assert_eq!((code, out.as_str()), (1, ""));
        assert!(
            err.starts_with("error: nix-farm: this farm refuses uid ")
                && err.contains(&format!("uid {me}:")),
            "{err}"
        );
    }

    /// This process's uid, as the peer credentials report it.
    fn my_uid() -> u32 {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let b = UnixStream::from_std({
            a.set_nonblocking(true).unwrap();
            a
        })
        .unwrap();
        b.peer_cred().unwrap().uid()
    }
}
