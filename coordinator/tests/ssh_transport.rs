//! The SSH transport with a real OpenSSH client: key auth, exec routing,
//! stdin/stdout/stderr and exit status, refusals.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use farm_coordinator::ssh::{
    self, ClientIdentity, KeyAuthorizer, NixProgram, NixSessionHandler, SessionIo,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct OneKey(String);
impl KeyAuthorizer for OneKey {
    fn authorize(&self, key: &str) -> Option<ClientIdentity> {
        (key == self.0).then(|| ClientIdentity {
            public_key: key.into(),
            fingerprint: "test".into(),
            comment: String::new(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ssh_client_runs_routed_commands() {
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

#[tokio::test]
async fn stdio_relay_carries_streams_and_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nix.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(farm_coordinator::stdio::serve(
        listener,
        Arc::new(Echo),
        async {
            let _ = stop_rx.await;
        },
    ));

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = farm_coordinator::stdio::relay(
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
    let code =
        farm_coordinator::stdio::relay(&sock, "rm -rf /", "alice", &b""[..], &mut out, &mut err)
            .await
            .unwrap();
    assert_eq!(code, 127);
    assert!(out.is_empty());
    assert!(String::from_utf8_lossy(&err).contains("only runs"));

    let missing = dir.path().join("nope.sock");
    let e = farm_coordinator::stdio::relay(
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
