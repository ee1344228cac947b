//! The `farm-builder` binary: settings from env `FARM_*` and `--config`, the key
//! printed to enrol, and a real process joining a stand-in coordinator and
//! leaving on SIGTERM.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Fake;
use farm_testkit::{Actor, NIX_PROGRAMS};

/// Each test's hang-guard: past it the test fails instead of hanging.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

const BIN: &str = env!("CARGO_BIN_EXE_farm-builder");

#[test]
fn prints_the_same_public_key_every_time_and_keeps_it_private() -> anyhow::Result<()> {
    let logs =
        farm_testkit::TestLogs::new("prints_the_same_public_key_every_time_and_keeps_it_private")?;
    farm_testkit::deadline(DEADLINE, &logs, |_| {
        prints_the_same_public_key_every_time_and_keeps_it_private_body();
        Ok(())
    })
}

fn prints_the_same_public_key_every_time_and_keeps_it_private_body() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        let out = Command::new(BIN)
            .arg("--print-public-key")
            .env("FARM_STATE_DIR", dir.path().join("state"))
            .env("FARM_COORDINATOR", "http://127.0.0.1:1")
            .env("FARM_NAME", "cli-test")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert!(first.starts_with("ssh-ed25519 AAAA"), "{first}");
    assert_eq!(first.lines().count(), 1);
    assert_eq!(run(), first);
    let key = dir.path().join("state/builder_ed25519");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pub_line = std::fs::read_to_string(dir.path().join("state/builder_ed25519.pub")).unwrap();
    assert_eq!(pub_line, first);
}

#[test]
fn rejects_unknown_config_keys_and_plain_http_to_remote_hosts() -> anyhow::Result<()> {
    let logs =
        farm_testkit::TestLogs::new("rejects_unknown_config_keys_and_plain_http_to_remote_hosts")?;
    farm_testkit::deadline(DEADLINE, &logs, |_| {
        rejects_unknown_config_keys_and_plain_http_to_remote_hosts_body();
        Ok(())
    })
}

fn rejects_unknown_config_keys_and_plain_http_to_remote_hosts_body() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("b.toml");
    std::fs::write(
        &cfg,
        "coordinator = \"http://127.0.0.1:1\"\nstate-dir = \"/tmp/x\"\nbogus = 1\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));

    let out = Command::new(BIN)
        .args(["--coordinator", "http://192.0.2.1:7070", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn the_daemon_joins_with_env_settings_and_stops_on_sigterm() -> anyhow::Result<()> {
    let logs =
        farm_testkit::TestLogs::new("the_daemon_joins_with_env_settings_and_stops_on_sigterm")?;
    farm_testkit::deadline_async(DEADLINE, &logs, |_| async {
        the_daemon_joins_with_env_settings_and_stops_on_sigterm_body().await;
        Ok(())
    })
}

async fn the_daemon_joins_with_env_settings_and_stops_on_sigterm_body() {
    let fake = Fake::start().await;
    let nix = Actor::new("builder").unwrap();
    let nix_bin_dir = nix.wrapper_bin_dir(NIX_PROGRAMS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("b.toml");
    // The file sets the name and speed; env overrides the name.
    std::fs::write(
        &cfg,
        "name = \"from-file\"\nspeed-factor = 3.0\nmandatory-features = [\"big\"]\n",
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .env("FARM_CONFIG", &cfg)
        .env("FARM_COORDINATOR", fake.url())
        .env("FARM_STATE_DIR", dir.path().join("state"))
        .env("FARM_NAME", "from-env")
        .env("FARM_MAX_JOBS", "3")
        .env("FARM_SYSTEM", "x86_64-linux,aarch64-linux")
        .env("FARM_NIX_BIN_DIR", &nix_bin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    fake.wait("the daemon's session", |s| s.sessions == 1).await;
    let hello = fake.with(|s| s.hellos[0].clone());
    assert_eq!(hello.name, "from-env");
    let caps = hello.capabilities.unwrap();
    assert_eq!(caps.systems, ["x86_64-linux", "aarch64-linux"]);
    assert_eq!(caps.max_jobs, 3);
    assert_eq!(caps.speed_factor, 3.0);
    assert_eq!(caps.mandatory_features, ["big"]);
    // Probed: the local nix's system-features, plus the mandatory one.
    assert!(caps.supported_features.contains(&"big".to_string()));
    assert!(
        caps.supported_features.contains(&"nixos-test".to_string()),
        "{caps:?}"
    );
    assert!(
        caps.nix_version.starts_with(|c: char| c.is_ascii_digit()),
        "{caps:?}"
    );

    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
