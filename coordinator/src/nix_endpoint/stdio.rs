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
