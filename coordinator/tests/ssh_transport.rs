//! The SSH transport with a real OpenSSH client: key auth, exec routing,
//! stdin/stdout/stderr and exit status, refusals.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use farm_coordinator::nix_endpoint::ssh::{
    self, ClientIdentity, KeyAuthorizer, NixProgram, NixSessionHandler, SessionIo,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Each test's hang-guard: past it the test fails instead of hanging.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

struct OneKey(String);
impl KeyAuthorizer for OneKey {
    fn authorize(&self, key: &str, _peer: Option<std::net::IpAddr>) -> Option<ClientIdentity> {
        (key == self.0).then(|| ClientIdentity {
            public_key: key.into(),
            fingerprint: "test".into(),
            comment: String::new(),
            level: farm_coordinator::access::Level::Build,
            forced_command: None,
        })
    }
}

/// Echoes stdin to stdout with the program's name in front, says hello on stderr.
struct Echo;
impl NixSessionHandler for Echo {
    fn run(
        &self,
        program: NixProgram,
        _client: ClientIdentity,
        mut io: SessionIo,
    ) -> ssh::BoxFuture<'static, u32> {
        Box::pin(async move {
            let mut input = Vec::new();
            io.stdin.read_to_end(&mut input).await.unwrap();
            io.stderr.write_all(b"hello on stderr\n").await.unwrap();
            io.stderr.flush().await.unwrap();
            io.stdout
                .write_all(format!("{program:?}:").as_bytes())
                .await
                .unwrap();
            io.stdout.write_all(&input).await.unwrap();
            io.stdout.flush().await.unwrap();
            3
        })
    }
}

fn keygen(path: &std::path::Path) -> String {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    let line = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let mut parts = line.split_whitespace();
    format!("{} {}", parts.next().unwrap(), parts.next().unwrap())
}

fn ssh_cmd(key: &std::path::Path, port: u16, command: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
        "-p",
    ])
    .arg(port.to_string())
    .arg("-i")
    .arg(key)
    .arg("anyone@127.0.0.1")
    .arg(command);
    c
}

#[test]
fn real_ssh_client_runs_routed_commands() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("real_ssh_client_runs_routed_commands")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        real_ssh_client_runs_routed_commands_body().await;
        Ok(())
    })
}

async fn real_ssh_client_runs_routed_commands_body() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    let good_pub = keygen(&good);
    keygen(&bad);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    keygen(&dir.path().join("host"));
    let host_key =
        ssh::load_host_key(&std::fs::read_to_string(dir.path().join("host")).unwrap()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ssh::serve(
        listener,
        ssh::SshConfig {
            host_key,
            inactivity_timeout: Duration::from_secs(30),
            limits: ssh::SshLimits::default(),
        },
        Arc::new(OneKey(good_pub)),
        Arc::new(Echo),
        async {
            let _ = stop_rx.await;
        },
    ));

    let run = move |key: std::path::PathBuf, command: &'static str, input: &'static [u8]| {
        tokio::task::spawn_blocking(move || {
            let mut child = ssh_cmd(&key, port, command)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input).unwrap();
            child.wait_with_output().unwrap()
        })
    };

    let out = run(good.clone(), "nix-daemon --stdio", b"ping")
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Daemon:ping");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "hello on stderr\n");
    assert_eq!(out.status.code(), Some(3));

    let out = run(good.clone(), "nix-store --serve --write", b"x")
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Serve { write: true }:x"
    );

    let out = run(good.clone(), "cat /etc/passwd", b"").await.unwrap();
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("only runs `nix-store --serve --write` and `nix-daemon --stdio`"),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(127));

    let out = run(bad.clone(), "nix-daemon --stdio", b"ping")
        .await
        .unwrap();
    assert!(out.stdout.is_empty());
    assert_eq!(
        out.status.code(),
        Some(255),
        "unknown key must be refused: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn stdio_relay_carries_streams_and_exit_status() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("stdio_relay_carries_streams_and_exit_status")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        stdio_relay_carries_streams_and_exit_status_body().await;
        Ok(())
    })
}

async fn stdio_relay_carries_streams_and_exit_status_body() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nix.sock");
    // a stale socket file is replaced; the new one is for owner and group only
    std::fs::write(&sock, b"stale").unwrap();
    let listener = farm_coordinator::nix_endpoint::stdio::bind(&sock).unwrap();
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(&sock).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(farm_coordinator::nix_endpoint::stdio::serve(
        listener,
        Arc::new(Echo),
        farm_coordinator::access::Level::Build,
        async {
            let _ = stop_rx.await;
        },
    ));

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = farm_coordinator::nix_endpoint::stdio::relay(
        &sock,
        "nix-daemon --stdio",
        "alice",
        &b"ping"[..],
        &mut out,
        &mut err,
    )
    .await
    .unwrap();
    assert_eq!(
        (code, out.as_slice(), err.as_slice()),
        (3, &b"Daemon:ping"[..], &b"hello on stderr\n"[..])
    );

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = farm_coordinator::nix_endpoint::stdio::relay(
        &sock,
        "rm -rf /",
        "alice",
        &b""[..],
        &mut out,
        &mut err,
    )
    .await
    .unwrap();
    assert_eq!(code, 127);
    assert!(out.is_empty());
    assert!(String::from_utf8_lossy(&err).contains("only runs"));

    let missing = dir.path().join("nope.sock");
    let e = farm_coordinator::nix_endpoint::stdio::relay(
        &missing,
        "nix-daemon --stdio",
        "a",
        &b""[..],
        Vec::new(),
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("is farm-coordinator running"), "{e}");

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

struct AnyHost;
impl russh::client::Handler for AnyHost {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Open a channel and start a command that runs until its stdin ends.
async fn start_session(
    h: &russh::client::Handle<AnyHost>,
) -> Result<russh::Channel<russh::client::Msg>, russh::Error> {
    let ch = h.channel_open_session().await?;
    ch.exec(true, "nix-daemon --stdio").await?;
    Ok(ch)
}

#[test]
fn running_sessions_per_connection_are_capped() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("running_sessions_per_connection_are_capped")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        running_sessions_per_connection_are_capped_body().await;
        Ok(())
    })
}

async fn running_sessions_per_connection_are_capped_body() {
    let dir = tempfile::tempdir().unwrap();
    let client_key = dir.path().join("client");
    let client_pub = keygen(&client_key);
    keygen(&dir.path().join("host"));
    let host_key =
        ssh::load_host_key(&std::fs::read_to_string(dir.path().join("host")).unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ssh::serve(
        listener,
        ssh::SshConfig {
            host_key,
            inactivity_timeout: Duration::from_secs(30),
            limits: ssh::SshLimits::default(),
        },
        Arc::new(OneKey(client_pub)),
        Arc::new(Echo),
        async {
            let _ = stop_rx.await;
        },
    ));

    let config = Arc::new(russh::client::Config::default());
    let mut h = russh::client::connect(config, addr, AnyHost).await.unwrap();
    let key = russh::keys::load_secret_key(&client_key, None).unwrap();
    let auth = h
        .authenticate_publickey(
            "anyone",
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success());

    // Every running command holds its slot (Echo runs until stdin ends).
    let mut running = Vec::new();
    for _ in 0..ssh::MAX_SESSIONS_PER_CONNECTION {
        running.push(start_session(&h).await.unwrap());
    }
    assert!(
        h.channel_open_session().await.is_err(),
        "a 17th session on one connection is refused"
    );
    // One ends: its slot is free again.
    let mut first = running.remove(0);
    first.eof().await.unwrap();
    loop {
        match first.wait().await {
            Some(russh::ChannelMsg::ExitStatus { exit_status }) => {
                assert_eq!(exit_status, 3);
                break;
            }
            Some(_) => continue,
            None => panic!("the session ended without an exit status"),
        }
    }
    let mut again = None;
    for _ in 0..100 {
        if let Ok(ch) = start_session(&h).await {
            again = Some(ch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a slot is given back when a command ends");
    drop(running);
    drop(h);
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn login_grace_and_connection_limits() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("login_grace_and_connection_limits")?;
    farm_tests::deadline_async(DEADLINE, &logs, |_| async {
        login_grace_and_connection_limits_body().await;
        Ok(())
    })
}

/// Read from `s` until the server closes it (or `limit` passes: `None`).
async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn login_grace_and_connection_limits_body() {
    let dir = tempfile::tempdir().unwrap();
    let client_key = dir.path().join("client");
    let client_pub = keygen(&client_key);
    keygen(&dir.path().join("host"));
    let host_key =
        ssh::load_host_key(&std::fs::read_to_string(dir.path().join("host")).unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = Duration::from_secs(2);
    let server = tokio::spawn(ssh::serve(
        listener,
        ssh::SshConfig {
            host_key,
            inactivity_timeout: Duration::from_secs(3600),
            limits: ssh::SshLimits {
                login_grace: grace,
                max_connections: 6,
                max_sessions_per_key: 2,
            },
        },
        Arc::new(OneKey(client_pub)),
        Arc::new(Echo),
        async {
            let _ = stop_rx.await;
        },
    ));

    // An authenticated connection, made first, outlives the grace time.
    let config = Arc::new(russh::client::Config::default());
    let mut h = russh::client::connect(config, addr, AnyHost).await.unwrap();
    let key = russh::keys::load_secret_key(&client_key, None).unwrap();
    let auth = h
        .authenticate_publickey(
            "anyone",
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success());

    // Five idle ones fill the limit: four send the banner and stop, one sends nothing.
    let t0 = tokio::time::Instant::now();
    let mut idle = Vec::new();
    for i in 0..5 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if i > 0 {
            s.write_all(b"SSH-2.0-idle\r\n").await.unwrap();
        }
        idle.push(s);
    }
    // Let the server accept them before the next ones come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Past the limit: one line saying why, then closed, before any SSH.
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let got = read_until_closed(&mut s, Duration::from_secs(10))
            .await
            .expect("a connection past the limit is closed at once");
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("too many SSH connections"), "{text:?}");
        assert!(!text.contains("SSH-2.0"), "{text:?}");
    }
    // The idle ones are dropped once the grace time has passed, not before.
    for mut s in idle {
        let got = read_until_closed(&mut s, Duration::from_secs(20))
            .await
            .expect("an unauthenticated connection is dropped after the grace time");
        assert!(t0.elapsed() >= grace - Duration::from_millis(100));
        assert!(
            got.is_empty() || got.starts_with(b"SSH-2.0-"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(t0.elapsed() < grace + Duration::from_secs(10));
    // Slots are free again: a real client gets in.
    let out = tokio::task::spawn_blocking({
        let client_key = client_key.clone();
        move || {
            let mut c = ssh_cmd(&client_key, addr.port(), "nix-daemon --stdio");
            c.stdin(Stdio::null()).output().unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Daemon:");

    // The first connection still works after the grace time, and one key
    // runs at most two sessions at once, on any connections.
    let _a = start_session(&h).await.unwrap();
    let _b = start_session(&h).await.unwrap();
    let out = tokio::task::spawn_blocking({
        let client_key = client_key.clone();
        move || {
            let mut c = ssh_cmd(&client_key, addr.port(), "nix-daemon --stdio");
            c.stdin(Stdio::null()).output().unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already runs 2 sessions"), "{err}");
    assert_eq!(out.status.code(), Some(127));
    drop((_a, _b));
    drop(h);
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
