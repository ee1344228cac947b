//! `farm up` end to end: one process runs a coordinator and a builder using
//! the actor's own Nix; it prints how to point Nix at it, and `farm build`
//! from another actor builds through it.

use std::time::Duration;

use farm_tests::{Actor, TestLogs, deadline, farm_bin, wait_for_endpoints};

#[test]
fn farm_up_runs_a_farm_that_builds() -> anyhow::Result<()> {
    let logs = TestLogs::new("cli_up")?;
    deadline(Duration::from_secs(300), &logs, |logs| farm_up(&logs))
}

fn farm_up(logs: &TestLogs) -> anyhow::Result<()> {
    let host = Actor::with_logs("host", logs)?;
    let state = host.state_dir("farm-up")?;
    let mut up = host.spawn(
        "farm-up",
        farm_bin("farm")?,
        &[
            "up".to_owned(),
            "--state-dir".to_owned(),
            state.display().to_string(),
            "--grpc".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--http".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--ssh".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--builder-name".to_owned(),
            "local".to_owned(),
        ],
    )?;
    let endpoints = wait_for_endpoints(&state.join("coordinator"), Duration::from_secs(60))?;
    up.wait_for_log("# nix.conf", Duration::from_secs(60))?;
    let printed = up.log();
    assert!(
        printed.contains(&format!(
            "export FARM_COORDINATOR=http://{}",
            endpoints.grpc
        )),
        "{printed}"
    );
    let line = printed
        .lines()
        .find(|l| l.starts_with("ssh-ng://"))
        .unwrap_or_else(|| panic!("no machines line in:\n{printed}"));
    assert!(
        line.contains("x86_64-linux") || line.contains("aarch64"),
        "the builder's systems: {line}"
    );
    assert!(
        printed.contains(&format!(
            "extra-trusted-public-keys = {}",
            endpoints.cache_public_key
        )),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("Port {}", endpoints.ssh_port()?)),
        "{printed}"
    );

    // Another actor builds through it.
    let client = Actor::with_logs("client", logs)?;
    let salt = client.root().display().to_string();
    let file = client.write_file(
        "two.nix",
        &farm_tests::fixture::graph_expr(2, 0.0, &salt, None),
    )?;
    let mut cmd = client.command(farm_bin("farm")?);
    cmd.args(["build", &file.display().to_string(), "-A", "d1", "--json"])
        .env("FARM_COORDINATOR", format!("http://{}", endpoints.grpc));
    let out = client.run_command(cmd)?;
    let doc: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(doc["success"], true, "{doc}");
    for d in doc["derivations"].as_array().unwrap() {
        assert_eq!(d["outcome"], "built", "{doc}");
        assert_eq!(d["builder"], "local", "{doc}");
    }

    // --out-link brings the outputs back into the client's store, signed by the farm.
    let link = client.root().join("result");
    let mut cmd = client.command(farm_bin("farm")?);
    cmd.args([
        "build",
        &file.display().to_string(),
        "-A",
        "d1",
        "--out-link",
        &link.display().to_string(),
    ])
    .env("FARM_COORDINATOR", format!("http://{}", endpoints.grpc));
    let printed = client.run_command(cmd)?;
    let out_path = farm_nix::StorePath::parse(printed.trim())?;
    assert!(
        client.is_valid_path(&out_path)?,
        "{out_path} was copied back"
    );
    assert_eq!(
        std::fs::read_link(&link)?.display().to_string(),
        out_path.to_string()
    );
    let text = client.run("cat", &[link.display().to_string()])?;
    assert!(text.contains(&salt), "{text}");

    // SIGTERM stops both cleanly.
    let status = up.stop(Duration::from_secs(30))?;
    assert!(
        status.success(),
        "farm up exited with {status}:\n{}",
        up.log()
    );
    Ok(())
}
