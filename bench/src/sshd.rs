//! OpenSSH servers for the baselines: a real `sshd` inside an actor's
//! namespace (its sessions see the actor's `/nix` and get its `nix.conf`,
//! so `nix-daemon --stdio` serves the actor's store: Nix's own remote
//! building to that machine), and the client's `ssh -F` config naming each
//! one by an alias (`NIX_SSHOPTS=-F FILE`, one port per server).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use farm_tests::{Actor, FarmProcess, ssh_key};

use crate::run::free_port;

/// The cipher both the farm's SSH endpoint and OpenSSH are asked for, so the
/// `ssh` baselines encrypt as the farm's path does.
pub const CIPHER: &str = "chacha20-poly1305@openssh.com";

/// An `sshd` running in an actor.
pub struct Sshd {
    pub alias: String,
    pub port: u16,
    pub host_pub: String,
    pub process: FarmProcess,
}

/// Starts `sshd` in `actor`'s namespace on a loopback port, letting in
/// `client_pub` as root; sessions get the actor's `NIX_CONF_DIR`, `HOME`,
/// `TMPDIR` (its nix.conf has `build-users-group =`, no sandbox).
pub fn start(actor: &Actor, alias: &str, client_pub: &str) -> anyhow::Result<Sshd> {
    let dir = actor.root().join("sshd");
    std::fs::create_dir_all(&dir)?;
    let host_key = dir.join("ssh_host_ed25519_key");
    let host_pub = ssh_key(&host_key, &format!("{alias}-sshd@farm-bench"))?;
    std::fs::write(
        dir.join("authorized_keys"),
        format!("{}\n", client_pub.trim()),
    )?;
    let port = free_port()?;
    let root = actor.root();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nMaxStartups 100:30:200\nMaxSessions 100\n\
             SetEnv NIX_CONF_DIR={} HOME={} TMPDIR={} XDG_CACHE_HOME={}\nLogLevel INFO\n",
            host_key.display(),
            dir.join("sshd.pid").display(),
            dir.join("authorized_keys").display(),
            actor.conf_dir().display(),
            root.join("home").display(),
            root.join("tmp").display(),
            root.join("cache").display(),
        ),
    )?;
    // sshd's privilege separation directory.
    std::fs::create_dir_all("/run/sshd")?;
    let mut cmd = actor.command("/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&config);
    let mut process = FarmProcess::spawn(actor.logs(), &format!("{alias}/sshd"), cmd)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        process.ensure_running()?;
        if Instant::now() > deadline {
            bail!("sshd of {alias} did not listen:\n{}", process.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Sshd {
        alias: alias.to_owned(),
        port,
        host_pub,
        process,
    })
}

/// Writes `DIR/ssh_config` and `DIR/known_hosts` for the servers (each
/// `Host ALIAS`, as root, with `key`, cipher [`CIPHER`]); returns the config.
pub fn client_config(dir: &Path, key: &Path, servers: &[&Sshd]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let known = dir.join("known_hosts");
    let mut config = String::new();
    let mut hosts = String::new();
    for s in servers {
        config.push_str(&format!(
            "Host {}\n  HostName 127.0.0.1\n  Port {}\n  User root\n  IdentityFile {}\n  \
             IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking yes\n  \
             UserKnownHostsFile {}\n  Ciphers {CIPHER}\n",
            s.alias,
            s.port,
            key.display(),
            known.display()
        ));
        hosts.push_str(&format!("[127.0.0.1]:{} {}\n", s.port, s.host_pub.trim()));
    }
    std::fs::write(&known, hosts)?;
    let path = dir.join("ssh_config");
    std::fs::write(&path, config)?;
    // One login proves the setup before anything is timed.
    for s in servers {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&path)
            .args([&s.alias, "true"])
            .stdin(std::process::Stdio::null())
            .output()
            .context("running ssh")?;
        if !out.status.success() {
            bail!(
                "ssh to {} (sshd on port {}) failed: {}\nsshd log:\n{}",
                s.alias,
                s.port,
                String::from_utf8_lossy(&out.stderr),
                s.process.log()
            );
        }
    }
    Ok(path)
}
