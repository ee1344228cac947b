//! The `farm-coordinator` binary: starts with `--state-dir` and port 0,
//! writes a valid `endpoints.json` once its listeners are up, reuses its keys
//! on a second start (after a `kill -9`), runs TLS beyond loopback and refuses
//! plaintext there unless forced.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use farm_coordinator::Endpoints;

/// Each test's hang-guard: past it the test fails instead of hanging.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(state: &Path, grpc: &str) -> Proc {
    let _ = std::fs::remove_file(state.join("endpoints.json"));
    Proc(
        Command::new(env!("CARGO_BIN_EXE_farm-coordinator"))
            .arg("--state-dir")
            .arg(state)
            .args([
                "--grpc",
                grpc,
                "--http",
                "127.0.0.1:0",
                "--ssh",
                "127.0.0.1:0",
            ])
            .env("FARM_CACHE_KEY_NAME", "bin-test-1")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn wait_endpoints(state: &Path, p: &mut Proc) -> Endpoints {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(bytes) = std::fs::read(state.join("endpoints.json")) {
            return serde_json::from_slice(&bytes).unwrap();
        }
        if let Some(status) = p.0.try_wait().unwrap() {
            panic!("farm-coordinator exited early: {status}");
        }
        assert!(Instant::now() < deadline, "no endpoints.json");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn starts_writes_endpoints_and_reuses_keys() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("starts_writes_endpoints_and_reuses_keys")?;
    farm_tests::deadline(DEADLINE, &logs, |_| {
        starts_writes_endpoints_and_reuses_keys_body();
        Ok(())
    })
}

fn starts_writes_endpoints_and_reuses_keys_body() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut p = spawn(&state, "127.0.0.1:0");
    let e = wait_endpoints(&state, &mut p);
    for a in [&e.grpc, &e.http, &e.ssh] {
        let addr: SocketAddr = a.parse().unwrap();
        assert!(addr.ip().is_loopback());
        assert_ne!(addr.port(), 0);
        TcpStream::connect(addr).unwrap();
    }
    assert!(!e.grpc_tls);
    // the cache key: named from the environment, matches the key files
    let vk = farm_nix::signing::VerifyingKey::parse(&e.cache_public_key).unwrap();
    assert_eq!(vk.name(), "bin-test-1");
    assert_eq!(
        std::fs::read_to_string(state.join("cache-key.pub"))
            .unwrap()
            .trim(),
        e.cache_public_key
    );
    let sk = farm_nix::signing::SigningKey::read_file(&state.join("cache-key.sec")).unwrap();
    assert_eq!(sk.verifying_key().to_string(), e.cache_public_key);
    // the SSH host key: OpenSSH ed25519, matching the private key file
    assert!(
        e.ssh_host_key.starts_with("ssh-ed25519 AAAA"),
        "{}",
        e.ssh_host_key
    );
    let host = ssh_key::PrivateKey::from_openssh(
        std::fs::read_to_string(state.join("ssh_host_ed25519_key")).unwrap(),
    )
    .unwrap();
    let public = ssh_key::PublicKey::from_openssh(&e.ssh_host_key).unwrap();
    assert_eq!(host.public_key().key_data(), public.key_data());
    // the cache answers on the HTTP listener with that key's store
    let info = http_get(&e.http, "/nix-cache-info");
    assert!(info.starts_with("HTTP/1.1 200"), "{info}");
    assert!(info.contains("StoreDir: /nix/store"), "{info}");
    let metrics = http_get(&e.http, "/metrics");
    assert!(metrics.contains("farm_running_builds 0"), "{metrics}");
    assert!(metrics.contains("farm_cache_paths 0"), "{metrics}");

    // kill -9 and start again: same keys
    p.0.kill().unwrap();
    p.0.wait().unwrap();
    let mut p2 = spawn(&state, "127.0.0.1:0");
    let e2 = wait_endpoints(&state, &mut p2);
    assert_eq!(e2.cache_public_key, e.cache_public_key);
    assert_eq!(e2.ssh_host_key, e.ssh_host_key);
}

#[test]
fn tls_beyond_loopback_and_plaintext_refused_there() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("tls_beyond_loopback_and_plaintext_refused_there")?;
    farm_tests::deadline(DEADLINE, &logs, |_| {
        tls_beyond_loopback_and_plaintext_refused_there_body();
        Ok(())
    })
}

fn tls_beyond_loopback_and_plaintext_refused_there_body() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut p = spawn(&state, "0.0.0.0:0");
    let e = wait_endpoints(&state, &mut p);
    assert!(e.grpc_tls);
    let cert = e.tls_cert.clone().unwrap();
    assert!(
        std::fs::read_to_string(&cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(e.grpc_url().starts_with("https://"));
    drop(p);

    let out = Command::new(env!("CARGO_BIN_EXE_farm-coordinator"))
        .arg("--state-dir")
        .arg(dir.path().join("plain"))
        .args([
            "--grpc",
            "0.0.0.0:0",
            "--http",
            "127.0.0.1:0",
            "--ssh",
            "127.0.0.1:0",
            "--tls",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-plaintext"), "{err}");
}
