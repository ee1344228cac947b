//! `farm machines` end to end: the line it prints, given as `--builders` to a
//! real Nix 2.8 client, builds through the farm, with no `NIX_SSHOPTS` at all.
//! The SSH endpoint is not on port 22, so the ssh_config lines it prints (a
//! `Host` with its `Port` and `HostKeyAlias`) go into the client's
//! `~/.ssh/config`, as a user following its output would do. Both the default
//! `ssh-ng://` line and `--protocol ssh` are built with.
//!
//! OpenSSH finds `~/.ssh` through the password database, not `HOME`, so the
//! client's builds run with its home bind-mounted on root's home inside its
//! own mount namespace (the host's is never touched). The client's
//! `~/.ssh/id_ed25519` is the farm's push key: a host whose hook builds fill
//! the cache (a build key's hook builds are its own claims, see `attack_hook`).

use std::process::Command;

use anyhow::{Context, ensure};
use farm_nix::store_path::StorePath;
use farm_tests::farm_bin;
use farm_tests::fixture::*;

/// Each endpoint test's hang-guard.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(400);

#[test]
fn the_printed_machines_line_builds_through_the_farm() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("cli_machines")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        run(&mut Farm::nix_endpoint(&logs, &[] as &[&str])?)
    })
}

fn run(farm: &mut Farm) -> anyhow::Result<()> {
    let pusher = farm.own_ssh()?.admin_keys[0].clone();
    let home_key = farm.client_key()?.to_path_buf();
    std::fs::copy(&pusher, &home_key)?;
    std::fs::copy(pusher.with_extension("pub"), home_key.with_extension("pub"))?;
    for (protocol, salt) in [(None, "machines-ng"), (Some("ssh"), "machines-ssh")] {
        let (line, ssh_config) = farm_machines(farm, protocol)?;
        eprintln!("farm machines {protocol:?}:\n{line}\n{ssh_config}");
        let scheme = protocol.unwrap_or("ssh-ng");
        ensure!(
            line.starts_with(&format!("{scheme}://127.0.0.1 ")),
            "unexpected machines line {line:?}"
        );
        ensure!(
            ssh_config
                == format!(
                    "Host 127.0.0.1\n  Port {}\n  HostKeyAlias 127.0.0.1\n",
                    farm.coordinator.endpoints.ssh_port()?
                ),
            "unexpected ssh_config {ssh_config:?}"
        );
        let ssh_dir = farm.client.root().join("home/.ssh");
        if protocol.is_none() {
            // The line alone is not enough: without the ssh_config, ssh goes
            // to port 22, where there is no farm.
            let _ = std::fs::remove_file(ssh_dir.join("config"));
            ensure!(
                build_with(farm, &line, "machines-no-config").is_err(),
                "built without the ssh_config"
            );
        }
        // What the user pastes into ~/.ssh/config.
        std::fs::write(ssh_dir.join("config"), &ssh_config)?;
        build_with(farm, &line, salt)?;
    }
    Ok(())
}

/// `farm machines [--protocol P] --json` as the client: (machines line, ssh_config).
fn farm_machines(farm: &Farm, protocol: Option<&str>) -> anyhow::Result<(String, String)> {
    let mut args = vec![
        "machines".to_owned(),
        "--json".into(),
        "--coordinator".into(),
        farm.coordinator.endpoints.grpc_url(),
    ];
    if let Some(p) = protocol {
        args.extend(["--protocol".to_owned(), p.to_owned()]);
    }
    let mut cmd = farm.client.command(farm_bin("farm")?);
    cmd.args(&args).env("FARM_KEY", farm.client_key()?);
    let out = farm.client.run_command(cmd)?;
    let json: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("farm machines printed {out:?}"))?;
    let line = json["machines_line"]
        .as_str()
        .context("no machines_line")?
        .to_owned();
    let ssh_config = json["ssh_config"]
        .as_str()
        .context("no ssh_config")?
        .to_owned();
    // The human output carries the same two parts verbatim.
    let mut cmd = farm.client.command(farm_bin("farm")?);
    cmd.args(args.iter().filter(|a| *a != "--json"))
        .env("FARM_KEY", farm.client_key()?)
        .env("NO_COLOR", "1");
    let human = farm.client.run_command(cmd)?;
    ensure!(
        human.lines().any(|l| l == line),
        "human output lacks the line:\n{human}"
    );
    ensure!(
        human.contains(&ssh_config),
        "human output lacks the ssh_config:\n{human}"
    );
    Ok((line, ssh_config))
}

/// `nix-build --max-jobs 0 --builders LINE` of a three-derivation graph in the
/// client, with its home as root's (so ssh reads its `.ssh/config` and
/// `.ssh/id_ed25519`) and no `NIX_SSHOPTS`; every derivation must have run on
/// a farm builder and its output be in the farm's cache.
fn build_with(farm: &mut Farm, line: &str, salt: &str) -> anyhow::Result<()> {
    let expr = farm
        .client
        .write_file(&format!("{salt}.nix"), &layered_graph_nix(salt, 1, 1))?;
    let home = farm.client.root().join("home");
    let mut cmd: Command = farm.client.command("sh");
    cmd.arg("-c")
        .arg(r#"mount --bind "$0" /root && exec "$@""#)
        .arg(&home)
        .args([
            "nix-build",
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
        ])
        .arg(line)
        .arg(&expr)
        .env_remove("NIX_SSHOPTS");
    let out = farm.client.run_command(cmd)?;
    let top = StorePath::parse(out.trim()).context("nix-build printed no path")?;
    let content = std::fs::read_to_string(farm.client.host_path_of(&top))?;
    ensure!(
        content == layered_graph_expected(salt, 1, 1),
        "wrong output:\n{content}"
    );
    let top_drv = StorePath::parse(
        farm.client
            .run("nix-store", &["-q", "--deriver", &top.to_string()])?
            .trim(),
    )?;
    let drvs = drv_closure(&farm.client, &top_drv)?;
    ensure!(drvs.len() == 3, "expected 3 derivations, got {drvs:?}");
    let ran = farm.builds_run();
    for d in &drvs {
        let builder = ran
            .get(&d.to_string())
            .with_context(|| format!("{d} did not run on a farm builder"))?;
        ensure!(
            builder == X86_BUILDER || builder == DARWIN_BUILDER,
            "{d} ran on {builder:?}"
        );
    }
    let outputs = outputs_of(&farm.client, &drvs)?;
    let mut args = vec!["path-info".to_string(), "--store".into(), farm.cache_url()];
    args.extend(outputs.iter().map(|p| p.to_string()));
    ensure!(farm.client.run("nix", &args)?.lines().count() == outputs.len());
    Ok(())
}
