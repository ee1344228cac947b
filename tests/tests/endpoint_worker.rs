//! The farm over `ssh-ng://` (worker protocol, `nix-daemon --stdio` over the
//! coordinator's own SSH server), end to end with a real Nix 2.8 client:
//! - as a remote builder (`nix-build --max-jobs 0 --builders ssh-ng://…`) of a
//!   25-derivation layered graph, and a failing derivation whose farm log Nix shows;
//! - as a store (`nix build --store ssh-ng://… --eval-store auto`): the farm
//!   builds the whole graph and the client store receives no output;
//! - `nix store ping`, `nix copy --to` (then substituted over HTTP by a fresh
//!   client) and `nix copy --from`;
//! - an unknown key is refused; a client sending garbage after the handshake
//!   is cut off while another client's build completes.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use farm_nix::store_path::StorePath;
use farm_tests::Actor;
use farm_tests::fixture::*;

/// Each endpoint test's hang-guard.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(400);

const WIDTH: usize = 6;
const DEPTH: usize = 3;

#[test]
fn the_farm_over_ssh_ng() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("endpoint_worker")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        run(&mut Farm::nix_endpoint(&logs, &[] as &[&str])?)
    })
}

fn run(farm: &mut Farm) -> anyhow::Result<()> {
    build_hook(farm)?;
    store_build(farm)?;
    store_ping_and_copy(farm)?;
    refusals(farm)?;
    Ok(())
}

/// `nix-build --max-jobs 0 --builders 'ssh-ng://…'`, by a host with a push
/// key (its hook builds fill the cache; a build key's are its own claims,
/// see `attack_hook`).
fn build_hook(farm: &mut Farm) -> anyhow::Result<()> {
    let salt = "worker-hook";
    let expr = farm
        .client
        .write_file("hook.nix", &layered_graph_nix(salt, WIDTH, DEPTH))?;
    let mut cmd = farm.pusher_command("nix-build")?;
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm.machines("ssh-ng"))
        .arg(&expr);
    let out = farm.client.run_command(cmd)?;
    let top = StorePath::parse(out.trim()).context("nix-build printed no path")?;
    let content = std::fs::read_to_string(farm.client.host_path_of(&top))?;
    ensure!(
        content == layered_graph_expected(salt, WIDTH, DEPTH),
        "wrong output:\n{content}"
    );
    let top_drv = StorePath::parse(
        farm.client
            .run("nix-store", &["-q", "--deriver", &top.to_string()])?
            .trim(),
    )?;
    let drvs = drv_closure(&farm.client, &top_drv)?;
    ensure!(drvs.len() == WIDTH * (DEPTH + 1) + 1);
    let ran = farm.builds_run();
    for d in &drvs {
        ensure!(
            ran.contains_key(&d.to_string()),
            "{d} did not run on a farm builder"
        );
    }
    let outputs = outputs_of(&farm.client, &drvs)?;
    let mut args = vec!["path-info".to_string(), "--store".into(), farm.cache_url()];
    args.extend(outputs.iter().map(|p| p.to_string()));
    ensure!(farm.client.run("nix", &args)?.lines().count() == outputs.len());
    // The farm's build log reached the client's own `nix log`.
    let l1n0 = drvs
        .iter()
        .find(|d| d.name() == format!("{salt}-l1n0.drv"))
        .context("no l1n0")?;
    let log = farm.client.run("nix", &["log", &l1n0.to_string()])?;
    ensure!(log.contains("building L1N0"), "nix log shows {log:?}");

    // A failure shows the farm's log.
    let failing = farm.client.write_file(
        "fail.nix",
        &farm_tests::sh_derivation(
            "worker-fails",
            "echo this-is-the-ssh-ng-farm-log-of-a-failure >&2; exit 3",
        ),
    )?;
    let mut cmd = farm.client_command("nix-build")?;
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm.machines("ssh-ng"))
        .arg(&failing);
    let err = farm
        .client
        .run_command(cmd)
        .err()
        .context("a failing build succeeded")?;
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("this-is-the-ssh-ng-farm-log-of-a-failure"),
        "the failure does not show the farm's log:\n{msg}"
    );
    Ok(())
}

/// `nix build --store ssh-ng://… --eval-store auto`: the farm builds it all.
fn store_build(farm: &mut Farm) -> anyhow::Result<()> {
    let salt = "worker-store";
    let expr = farm
        .client
        .write_file("store.nix", &layered_graph_nix(salt, WIDTH, DEPTH))?;
    let mut cmd = farm.client_command("nix")?;
    cmd.args(["build", "--no-link", "-L", "--json", "--store"])
        .arg(farm.store_uri("ssh-ng"))
        .args(["--eval-store", "auto", "-f"])
        .arg(&expr);
    let output = cmd.stdin(Stdio::null()).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "nix build --store failed:\n{stderr}"
    );
    // -L: the farm's build logs, line by line, prefixed with the derivation's name.
    ensure!(
        stderr.contains("building L3N5"),
        "nix build -L did not show the farm's logs:\n{stderr}"
    );
    let out = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(&out).context("nix build --json")?;
    let top = StorePath::parse(
        json[0]["outputs"]["out"]
            .as_str()
            .context("nix build printed no output path")?,
    )?;
    ensure!(
        !farm.client.is_valid_path(&top)?,
        "the client store received the output"
    );
    // Every derivation ran on the farm, and the result is right (read from the cache).
    let top_drv = farm
        .client
        .nix_instantiate(&expr, &[] as &[&str])?
        .remove(0);
    let drvs = drv_closure(&farm.client, &top_drv)?;
    ensure!(drvs.len() == WIDTH * (DEPTH + 1) + 1, "{} drvs", drvs.len());
    let ran = farm.builds_run();
    for d in &drvs {
        ensure!(
            ran.contains_key(&d.to_string()),
            "{d} did not run on a farm builder"
        );
    }
    let fresh = Actor::with_logs("fresh-store-reader", &farm.logs)?;
    fresh.nix_conf_append(&format!(
        "trusted-public-keys = {}",
        farm.coordinator.endpoints.cache_public_key
    ))?;
    fresh.run(
        "nix-store",
        &[
            "--realise",
            &top.to_string(),
            "--option",
            "substituters",
            &farm.cache_url(),
        ],
    )?;
    let content = std::fs::read_to_string(fresh.host_path_of(&top))?;
    ensure!(
        content == layered_graph_expected(salt, WIDTH, DEPTH),
        "wrong output:\n{content}"
    );
    Ok(())
}

/// `nix store ping`, `nix copy --to` (substitutable over HTTP afterwards) and `--from`.
fn store_ping_and_copy(farm: &mut Farm) -> anyhow::Result<()> {
    let uri = farm.store_uri("ssh-ng");
    let mut cmd = farm.client_command("nix")?;
    cmd.args(["store", "ping", "--store", &uri]);
    farm.client.run_command(cmd)?;

    // copy --to: a closure of two paths built locally.
    let expr = farm.client.write_file(
        "local.nix",
        "let dep = derivation { name = \"copy-dep\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo dep > $out\" ]; }; in derivation { name = \"copy-top\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo ${dep} > $out\" ]; }\n",
    )?;
    let top = farm.client.nix_build(&expr, &[] as &[&str])?.remove(0);
    // With the push right: input-addressed paths of a key without it would
    // stay its unsigned claims, never served over HTTP (see attack_cache).
    let mut cmd = farm.pusher_command("nix")?;
    cmd.args(["copy", "--to", &uri, &top.to_string()]);
    farm.client.run_command(cmd)?;
    let fresh = Actor::with_logs("fresh-substituter", &farm.logs)?;
    fresh.nix_conf_append(&format!(
        "trusted-public-keys = {}",
        farm.coordinator.endpoints.cache_public_key
    ))?;
    fresh.run(
        "nix-store",
        &[
            "--realise",
            &top.to_string(),
            "--option",
            "substituters",
            &farm.cache_url(),
        ],
    )?;
    ensure!(
        fresh.closure(&top)?.len() == 2,
        "the closure did not come along"
    );
    ensure!(
        std::fs::read(fresh.host_path_of(&top))? == std::fs::read(farm.client.host_path_of(&top))?
    );

    // copy --from: something the farm built (the store build's leaf), into a fresh client.
    let from = Actor::with_logs("copy-from", &farm.logs)?;
    let leaf = farm
        .builds_run()
        .keys()
        .find(|d| d.contains("worker-store-l0n0"))
        .cloned()
        .context("no store-build leaf ran")?;
    let leaf_out = outputs_of(&farm.client, &[StorePath::parse(&leaf)?])?.remove(0);
    let mut cmd = from.command("nix");
    cmd.env("NIX_SSHOPTS", farm.ssh_opts()?).args([
        "copy",
        "--from",
        &uri,
        "--no-check-sigs",
        &leaf_out.to_string(),
    ]);
    from.run_command(cmd)?;
    ensure!(std::fs::read_to_string(from.host_path_of(&leaf_out))? == "L0N0-worker-store\n");
    Ok(())
}

/// An unknown key is refused; garbage after the handshake ends that session
/// while another client's build completes.
fn refusals(farm: &mut Farm) -> anyhow::Result<()> {
    let stranger_key = farm.client.root().join("stranger/id_ed25519");
    ssh_key(&stranger_key, "stranger@elsewhere")?;
    let mut cmd = farm.client.command("nix");
    cmd.env("NIX_SSHOPTS", farm.ssh_opts_with_key(&stranger_key)?)
        .args(["store", "ping", "--store", &farm.store_uri("ssh-ng")]);
    let err = farm
        .client
        .run_command(cmd)
        .err()
        .context("an unknown key was let in")?;
    ensure!(
        format!("{err:#}").contains("Permission denied"),
        "unexpected refusal: {err:#}"
    );

    // A slow build by a good client…
    let slow = farm.client.write_file(
        "slow.nix",
        &farm_tests::sh_derivation("worker-slow", "/bin/sleep 4; echo slow and sure > $out"),
    )?;
    let mut cmd = farm.client_command("nix-build")?;
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm.machines("ssh-ng"))
        .arg(&slow)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let good = cmd.spawn()?;

    // …while a hostile one sends garbage after a valid handshake.
    let mut ssh = std::process::Command::new("ssh");
    ssh.args(farm.ssh_opts()?.split_whitespace())
        .args(["nix@127.0.0.1", "nix-daemon --stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut hostile = ssh.spawn()?;
    {
        let mut stdin = hostile.stdin.take().context("stdin")?;
        let mut hello = Vec::new();
        for w in [0x6e69_7863u64, 0x122, 0, 0] {
            hello.extend_from_slice(&w.to_le_bytes());
        }
        stdin.write_all(&hello)?;
        stdin.flush()?;
        std::thread::sleep(Duration::from_millis(500));
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 13) as u8).collect();
        let _ = stdin.write_all(&garbage);
        let _ = stdin.flush();
        // Keep stdin open: the server must end the session by itself.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = hostile.try_wait()? {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = hostile.kill();
                bail!("the hostile session was not ended by the farm");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        drop(stdin);
        let mut err = String::new();
        hostile
            .stderr
            .take()
            .context("stderr")?
            .read_to_string(&mut err)?;
        ensure!(!status.success(), "the hostile session exited successfully");
        ensure!(
            err.contains("nix-farm"),
            "no message for the hostile client: {err:?}"
        );
    }

    let out = good.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the good client's build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = StorePath::parse(String::from_utf8_lossy(&out.stdout).trim())?;
    ensure!(std::fs::read_to_string(farm.client.host_path_of(&path))? == "slow and sure\n");
    farm.coordinator.process.ensure_running()?;
    Ok(())
}
