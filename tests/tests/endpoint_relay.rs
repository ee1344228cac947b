//! The stdio mode, for sites with OpenSSH in front of the farm: a real `sshd`
//! whose authorized_keys line forces `farm-coordinator stdio --socket …`
//! relays a real Nix 2.8 client's ssh-ng:// and ssh:// sessions to the
//! coordinator's `--relay-socket`. Builds go to the farm's builders; a
//! command other than the two Nix programs is refused with one line.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use farm_nix::store_path::StorePath;
use farm_tests::fixture::*;
use farm_tests::{FarmProcess, farm_bin};

/// Each endpoint test's hang-guard.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(400);

struct Sshd {
    process: FarmProcess,
    port: u16,
    known_hosts: std::path::PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `sshd` on a loopback port: the client's key may only run the relay.
fn start_sshd(farm: &Farm, socket: &std::path::Path) -> anyhow::Result<Sshd> {
    let dir = farm.client.root().join("sshd");
    std::fs::create_dir_all(&dir)?;
    let host_key = dir.join("ssh_host_ed25519_key");
    let host_pub = ssh_key(&host_key, "sshd-host@farm-e2e")?;
    let client_pub = std::fs::read_to_string(farm.client_key()?.with_extension("pub"))?;
    let relay = farm_bin("farm-coordinator")?;
    std::fs::write(
        dir.join("authorized_keys"),
        format!(
            "command=\"{} stdio --socket {} --client relay-user\",restrict {}",
            relay.display(),
            socket.display(),
            client_pub.trim()
        ),
    )?;
    let port = free_port()?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel VERBOSE\n",
            host_key.display(),
            dir.join("sshd.pid").display(),
            dir.join("authorized_keys").display(),
        ),
    )?;
    // sshd's privilege separation directory.
    std::fs::create_dir_all("/run/sshd")?;
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&config);
    let process = FarmProcess::spawn(&farm.logs, "sshd", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("sshd did not start:\n{}", process.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_pub}"))?;
    Ok(Sshd {
        process,
        port,
        known_hosts,
    })
}

#[test]
fn nix_through_openssh_and_the_stdio_relay() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("endpoint_relay")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        let socket_dir = tempfile::tempdir()?;
        let socket = socket_dir.path().join("relay.sock");
        let mut farm = Farm::nix_endpoint(&logs, &["--relay-socket".as_ref(), socket.as_os_str()])?;
        run(&mut farm, &socket)
    })
}

fn run(farm: &mut Farm, socket: &std::path::Path) -> anyhow::Result<()> {
    let sshd = start_sshd(farm, socket)?;
    let opts = format!(
        "-p {} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
        sshd.port,
        farm.client_key()?.display(),
        sshd.known_hosts.display()
    );
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    for (scheme, salt) in [("ssh-ng", "relayworker"), ("ssh", "relayserve")] {
        let expr = farm
            .client
            .write_file(&format!("{salt}.nix"), &layered_graph_nix(salt, 2, 1))?;
        let mut cmd = farm.client.command("nix-build");
        cmd.env("NIX_SSHOPTS", &opts)
            .args(["--no-out-link", "--max-jobs", "0", "--builders"])
            .arg(format!(
                "{scheme}://{user}@127.0.0.1 x86_64-linux - 4 1 - - -"
            ))
            .arg(&expr);
        let out = farm.client.run_command(cmd)?;
        let top = StorePath::parse(out.trim()).context("no output path")?;
        let content = std::fs::read_to_string(farm.client.host_path_of(&top))?;
        ensure!(content == layered_graph_expected(salt, 2, 1), "{content}");
        let ran = farm.builds_run();
        ensure!(
            ran.keys().filter(|d| d.contains(salt)).count() == 5,
            "not every {scheme} build ran on the farm: {ran:?}"
        );
    }
    ensure!(
        farm.coordinator.process.log().contains("relay:relay-user"),
        "the relay's client name is not recorded"
    );

    // Anything else is refused with one line.
    let out = Command::new("ssh")
        .args(opts.split_whitespace())
        .args([&format!("{user}@127.0.0.1"), "ls /"])
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "ls ran");
    ensure!(out.stdout.is_empty());
    ensure!(err.contains("only runs"), "{err}");
    drop(sshd.process);
    Ok(())
}
