//! Attacks on the access levels and on `authorized_keys` options, with real
//! Nix 2.8 over the farm's SSH endpoint and the real `farm` CLI:
//! - a read-level key (`--read-keys`) tries to build (`farm build`, the
//!   ssh-ng build hook), to push (`nix copy --to ssh-ng://`) and to act as
//!   an admin (`farm drain`, `farm cancel`): each refused with an error that
//!   names the level it lacks;
//! - a build-level key tries admin operations: refused;
//! - `from="10.0.0.0/8"` refuses the key from loopback (SSH and CLI);
//!   `command="nix-store --serve"` limits a key to read-only ssh://;
//!   `restrict` is honoured (a build through it works);
//! - a key file with an option the farm does not support stops the
//!   coordinator at startup with the file, line and option named.
//!
//! After the refusals the farm is checked unchanged: the cache directory's
//! files (names, sizes, times), the queue, running builds and failures in `farm status`, and the
//! builder's state (not draining).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use farm_tests::fixture::*;

const DEADLINE: std::time::Duration = std::time::Duration::from_secs(400);

/// What the refusals must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    cache: std::collections::BTreeMap<PathBuf, (u64, std::time::SystemTime)>,
    queued: u64,
    running: usize,
    failures: usize,
    builders: Vec<String>,
}

fn snapshot(farm: &Farm) -> anyhow::Result<Snapshot> {
    let s = farm.status(None)?;
    Ok(Snapshot {
        cache: farm.coordinator.cache_files()?,
        queued: s["queued_total"].as_u64().context("queued_total")?,
        running: s["running"].as_array().map_or(0, Vec::len),
        failures: s["recent_failures"].as_array().map_or(0, Vec::len),
        builders: s["builders"]
            .as_array()
            .context("builders")?
            .iter()
            .map(|b| b["state"].to_string())
            .collect(),
    })
}

/// Runs `cmd`; it must fail, and its output must contain every one of `needles`.
fn refused(
    farm: &Farm,
    what: &str,
    cmd: std::process::Command,
    needles: &[&str],
) -> anyhow::Result<()> {
    match farm.client.run_command(cmd) {
        Ok(out) => bail!("{what} was not refused; it printed {out:?}"),
        Err(e) => {
            let msg = format!("{e:#}");
            for n in needles {
                ensure!(
                    msg.contains(n),
                    "{what}: the refusal does not say {n:?}:\n{msg}"
                );
            }
            Ok(())
        }
    }
}

/// `farm ARGS` with `key`: must fail, saying each of `needles`.
fn farm_refused(farm: &Farm, key: &Path, args: &[&str], needles: &[&str]) -> anyhow::Result<()> {
    let out = farm.run(Some(key), args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "farm {args:?} was not refused: {stderr}"
    );
    for n in needles {
        ensure!(
            stderr.contains(n),
            "farm {args:?}: the refusal does not say {n:?}:\n{stderr}"
        );
    }
    Ok(())
}

struct Keys {
    _dir: tempfile::TempDir,
    reader: PathBuf,
    dev: PathBuf,
    lan_only: PathBuf,
    serve_only: PathBuf,
    restricted: PathBuf,
    args: Vec<String>,
}

fn keys() -> anyhow::Result<Keys> {
    let dir = tempfile::Builder::new()
        .prefix("farm-e2e-levels-")
        .tempdir()?;
    let key = |name: &str| -> anyhow::Result<(PathBuf, String)> {
        let p = dir.path().join(format!("{name}_ed25519"));
        let line = ssh_key(&p, &format!("{name}@attack"))?;
        Ok((p, line))
    };
    let (reader, reader_line) = key("reader")?;
    let (dev, dev_line) = key("dev")?;
    let (lan_only, lan_line) = key("lan")?;
    let (serve_only, serve_line) = key("serve")?;
    let (restricted, restricted_line) = key("restricted")?;
    let read_file = dir.path().join("read_keys");
    std::fs::write(&read_file, format!("{reader_line}\n"))?;
    let build_file = dir.path().join("authorized_keys");
    std::fs::write(
        &build_file,
        format!(
            "{dev_line}\nfrom=\"10.0.0.0/8\" {lan_line}\ncommand=\"nix-store --serve\" {serve_line}\nrestrict,no-pty {restricted_line}\n"
        ),
    )?;
    let args = vec![
        "--read-keys".to_owned(),
        read_file.display().to_string(),
        "--authorized-keys".to_owned(),
        build_file.display().to_string(),
    ];
    Ok(Keys {
        _dir: dir,
        reader,
        dev,
        lan_only,
        serve_only,
        restricted,
        args,
    })
}

#[test]
fn levels_and_key_options() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("attack_levels")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        let k = keys()?;
        let farm = Farm::setup(&logs)
            .builders(&[BuilderSpec {
                name: X86_BUILDER,
                max_jobs: 2,
                conf: &[],
            }])
            .args(&k.args)
            .start()?;
        run(&farm, &k)
    })
}

fn run(farm: &Farm, k: &Keys) -> anyhow::Result<()> {
    let expr = farm.client.write_file(
        "levels.nix",
        &farm_tests::sh_derivation("levels-attack", "echo built-by-the-farm > $out"),
    )?;
    let drv = farm
        .client
        .run("nix-instantiate", &[&expr])?
        .trim()
        .to_owned();
    // Something the client has that the farm does not: a source path.
    let src = farm
        .client
        .write_file("pushed.txt", "pushed by an attacker\n")?;
    let src_path = farm
        .client
        .run("nix-store", &["--add", src.to_str().context("path")?])?
        .trim()
        .to_owned();

    let before = snapshot(farm)?;
    let store = farm.store_uri("ssh-ng");
    let ssh = |key: &Path| farm.ssh_opts_with_key(key);

    // A read-level key: reading works, building, pushing and admin do not.
    let s = farm.run(Some(&k.reader), &["status", "--json"])?;
    ensure!(
        s.status.success(),
        "the read key cannot read: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    farm_refused(
        farm,
        &k.reader,
        &["build", &drv],
        &["read level", "needs build"],
    )?;
    let mut hook = farm.client.command("nix-build");
    hook.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(format!("{store} x86_64-linux - 2 1 - - -"))
        .arg(&expr)
        .env("NIX_SSHOPTS", ssh(&k.reader)?);
    refused(
        farm,
        "a read key's hook build",
        hook,
        &["needs the build level"],
    )?;
    let mut copy = farm.client.command("nix");
    copy.args(["copy", "--to", &store, &src_path])
        .env("NIX_SSHOPTS", ssh(&k.reader)?);
    refused(
        farm,
        "a read key's nix copy",
        copy,
        &["adding paths needs the build level"],
    )?;
    for args in [&["drain", X86_BUILDER][..], &["cancel", "s1"][..]] {
        farm_refused(farm, &k.reader, args, &["read level", "needs admin"])?;
        farm_refused(farm, &k.dev, args, &["build level", "needs admin"])?;
    }
    ensure!(
        snapshot(farm)? == before,
        "a refused request changed the farm"
    );

    // from=: refused from loopback, over SSH and the CLI alike.
    let mut ping = farm.client.command("nix");
    ping.args(["store", "ping", "--store", &store])
        .env("NIX_SSHOPTS", ssh(&k.lan_only)?);
    refused(
        farm,
        "a from=10.0.0.0/8 key over ssh from loopback",
        ping,
        &["Permission denied"],
    )?;
    farm_refused(farm, &k.lan_only, &["status"], &["from="])?;

    // command="nix-store --serve": read-only ssh://, no ssh-ng, no CLI.
    let mut copy = farm.client.command("nix");
    copy.args(["copy", "--to", &farm.store_uri("ssh"), &src_path])
        .env("NIX_SSHOPTS", ssh(&k.serve_only)?);
    refused(
        farm,
        "a serve-only key's ssh:// copy",
        copy,
        &["write access"],
    )?;
    let mut ping = farm.client.command("nix");
    ping.args(["store", "ping", "--store", &store])
        .env("NIX_SSHOPTS", ssh(&k.serve_only)?);
    refused(
        farm,
        "a serve-only key over ssh-ng",
        ping,
        &["may only run"],
    )?;
    farm_refused(farm, &k.serve_only, &["status"], &["command="])?;
    ensure!(
        snapshot(farm)? == before,
        "a refused request changed the farm"
    );
    // A build key may build, but not speak for a named job (its public
    // badge); the .drv it uploads first is verified content, so the check
    // here is that no job and no build was recorded.
    farm_refused(
        farm,
        &k.dev,
        &["build", &drv, "--job", "ci/app"],
        &["build level", "naming a job (--job) needs push"],
    )?;
    let jobs = farm.run(Some(&k.dev), &["jobs", "--json"])?;
    ensure!(
        jobs.status.success() && !String::from_utf8_lossy(&jobs.stdout).contains("ci/app"),
        "a refused job name was recorded: {}",
        String::from_utf8_lossy(&jobs.stdout)
    );
    ensure!(
        !farm.builds_run().keys().any(|d| d == &drv),
        "the refused --job build ran"
    );

    // restrict (and no-pty) change nothing the farm offers: it builds.
    let mut hook = farm.client.command("nix-build");
    hook.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(format!("{store} x86_64-linux - 2 1 - - -"))
        .arg(&expr)
        .env("NIX_SSHOPTS", ssh(&k.restricted)?);
    let out = farm.client.run_command(hook)?;
    let path = out.trim();
    let built = std::fs::read_to_string(
        farm.client
            .host_path_of(&farm_nix::store_path::StorePath::parse(path)?),
    )?;
    ensure!(
        built == "built-by-the-farm\n",
        "the restricted key's build gave {built:?}"
    );
    ensure!(
        farm.builds_run().keys().any(|d| d == &drv),
        "the restricted key's build did not run on the farm"
    );
    Ok(())
}

/// An option the farm cannot honour stops it at startup, naming it.
#[test]
fn an_unsupported_option_stops_the_coordinator() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("attack_levels_option")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        let dir = tempfile::tempdir()?;
        let line = ssh_key(&dir.path().join("k"), "k@attack")?;
        let file = dir.path().join("authorized_keys");
        std::fs::write(&file, format!("# users\npermitopen=\"db:5432\" {line}\n"))?;
        let state = dir.path().join("state");
        let mut cmd = std::process::Command::new(farm_tests::farm_bin("farm-coordinator")?);
        cmd.args([
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--ssh",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--authorized-keys")
        .arg(&file);
        let out = farm_tests::tracked_output(&logs, "farm-coordinator with permitopen", &mut cmd)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "the coordinator started with permitopen: {stderr}"
        );
        for n in [file.display().to_string().as_str(), "line 2", "permitopen"] {
            ensure!(
                stderr.contains(n),
                "the startup error does not name {n:?}:\n{stderr}"
            );
        }
        Ok(())
    })
}
