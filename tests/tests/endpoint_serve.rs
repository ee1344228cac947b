//! The farm as an `ssh://` remote builder (serve protocol, `nix-store --serve
//! --write` over the coordinator's own SSH server), end to end with a real
//! Nix 2.8 client that may not build anything itself (`--max-jobs 0`): a
//! layered graph of 25 derivations is built on the farm's two builders and
//! comes back right; every output is in the farm's cache (the client logs in
//! with a push key: a build key's hook builds are its own claims, see
//! `attack_hook`); a failing build
//! shows the farm's log; an `aarch64-darwin` derivation runs on the builder
//! that has that platform.

use anyhow::{Context, ensure};
use farm_nix::store_path::StorePath;
use farm_tests::fixture::*;

/// Each endpoint test's hang-guard.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(400);

const WIDTH: usize = 6;
const DEPTH: usize = 3;

#[test]
fn nix_build_with_the_farm_as_ssh_builder() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("endpoint_serve")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        run(&mut Farm::nix_endpoint(&logs, &[] as &[&str])?)
    })
}

fn run(farm: &mut Farm) -> anyhow::Result<()> {
    let salt = "serve";
    let expr = farm
        .client
        .write_file("graph.nix", &layered_graph_nix(salt, WIDTH, DEPTH))?;

    // The graph, built remotely only, by a host whose hook builds fill the cache.
    let mut cmd = farm.pusher_command("nix-build")?;
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm.machines("ssh"))
        .arg(&expr);
    let out = farm.client.run_command(cmd)?;
    let top = StorePath::parse(out.trim()).context("nix-build printed no path")?;
    let content = std::fs::read_to_string(farm.client.host_path_of(&top))?;
    ensure!(
        content == layered_graph_expected(salt, WIDTH, DEPTH),
        "wrong output:\n{content}"
    );

    // Every derivation ran on a farm builder, and every output is in the farm's cache.
    let top_drv = StorePath::parse(
        farm.client
            .run("nix-store", &["-q", "--deriver", &top.to_string()])?
            .trim(),
    )?;
    let drvs = drv_closure(&farm.client, &top_drv)?;
    ensure!(
        drvs.len() == WIDTH * (DEPTH + 1) + 1,
        "{} derivations",
        drvs.len()
    );
    let ran = farm.builds_run();
    for d in &drvs {
        let builder = ran
            .get(&d.to_string())
            .with_context(|| format!("{d} did not run on a farm builder"))?;
        ensure!(
            builder == X86_BUILDER || builder == DARWIN_BUILDER,
            "{d} ran on {builder}"
        );
    }
    let l1n0 = drvs
        .iter()
        .find(|d| d.name() == format!("{salt}-l1n0.drv"))
        .context("no l1n0")?;
    let log = farm.client.run("nix", &["log", &l1n0.to_string()])?;
    ensure!(log.contains("building L1N0"), "nix log shows {log:?}");
    let outputs = outputs_of(&farm.client, &drvs)?;
    let mut args = vec!["path-info".to_string(), "--store".into(), farm.cache_url()];
    args.extend(outputs.iter().map(|p| p.to_string()));
    let listed = farm.client.run("nix", &args)?;
    ensure!(
        listed.lines().count() == outputs.len(),
        "the cache lists {} of {} outputs",
        listed.lines().count(),
        outputs.len()
    );

    // A failing derivation: non-zero exit, and the farm's build log is shown.
    let failing = farm.client.write_file(
        "fail.nix",
        &farm_tests::sh_derivation(
            "serve-fails",
            "echo this-is-the-farm-log-of-a-failure >&2; exit 3",
        ),
    )?;
    let mut cmd = farm.client_command("nix-build")?;
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm.machines("ssh"))
        .arg(&failing);
    let err = farm
        .client
        .run_command(cmd)
        .err()
        .context("a failing build succeeded")?;
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("this-is-the-farm-log-of-a-failure"),
        "the failure does not show the farm's log:\n{msg}"
    );

    // aarch64-darwin lands on the builder that has it.
    let darwin = farm.client.write_file(
        "darwin.nix",
        "derivation { name = \"serve-darwin\"; system = \"aarch64-darwin\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo built for darwin > $out\" ]; }\n",
    )?;
    let mut cmd = farm.client_command("nix-build")?;
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm.machines("ssh"))
        .arg(&darwin);
    let out = farm.client.run_command(cmd)?;
    let path = StorePath::parse(out.trim())?;
    ensure!(std::fs::read_to_string(farm.client.host_path_of(&path))? == "built for darwin\n");
    let drv = farm
        .client
        .run("nix-store", &["-q", "--deriver", &path.to_string()])?;
    let ran = farm.builds_run();
    ensure!(
        ran.get(drv.trim()).map(String::as_str) == Some(DARWIN_BUILDER),
        "the darwin derivation ran on {:?}",
        ran.get(drv.trim())
    );
    Ok(())
}
