//! Who may do what through the CLI, and draining, end to end: unknown keys
//! cannot read status, authorized keys can read but not drain or cancel, admin
//! keys can; a drained builder finishes its running build, takes no new ones,
//! and takes them again once undrained.

use std::time::{Duration, Instant};

use farm_tests::fixture::{BuilderSpec, Farm, SshAccess, graph_expr};
use farm_tests::{TestLogs, deadline};

/// Each test's hang-guard.
const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn keys_decide_who_reads_and_who_changes() -> anyhow::Result<()> {
    let logs = TestLogs::new("cli_admin_keys")?;
    deadline(DEADLINE, &logs, |logs| keys_decide(&logs))
}

fn keys_decide(logs: &TestLogs) -> anyhow::Result<()> {
    // `user` may read, `admin` may also change; nobody knows the stranger.
    let access = SshAccess::named(&["user"], &["admin"])?;
    let (user, admin) = (access.keys[0].clone(), access.admin_keys[0].clone());
    let stranger = access.stranger("stranger")?;
    let farm = Farm::setup(logs)
        .builders(&[BuilderSpec {
            name: "b1",
            max_jobs: 1,
            conf: &[],
        }])
        .access(&access)
        .start()?;
    farm.wait_for_builders(Some(&user), 1)?;

    // Unknown key, and no key: no status.
    for key in [Some(stranger.as_path()), None] {
        let out = farm.run(key, &["status"])?;
        assert_eq!(out.status.code(), Some(3), "{key:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--authorized-keys"), "{err}");
    }
    // User: reads, but cannot drain or cancel.
    assert!(farm.run(Some(&user), &["status"])?.status.success());
    assert!(farm.run(Some(&user), &["machines"])?.status.success());
    for args in [&["drain", "b1"][..], &["cancel", "s1"][..]] {
        let out = farm.run(Some(&user), args)?;
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--admin-keys"), "{err}");
    }
    let s = farm.status(Some(&user))?;
    assert_eq!(
        s["builders"][0]["state"], "idle",
        "the user's drain did nothing: {s}"
    );
    // Admin: drains and undrains.
    assert!(farm.run(Some(&admin), &["drain", "b1"])?.status.success());
    assert_eq!(
        farm.status(Some(&user))?["builders"][0]["state"],
        "draining"
    );
    assert!(farm.run(Some(&admin), &["undrain", "b1"])?.status.success());
    assert_eq!(farm.status(Some(&user))?["builders"][0]["state"], "idle");
    Ok(())
}

#[test]
fn drain_finishes_the_running_build_and_takes_no_new_ones() -> anyhow::Result<()> {
    let logs = TestLogs::new("cli_drain")?;
    deadline(DEADLINE, &logs, |logs| drain(&logs))
}

fn drain(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "b1",
            max_jobs: 1,
            conf: &[],
        }],
        &[],
    )?;
    farm.wait_for_builders(None, 1)?;
    let salt = farm.client.root().display().to_string();
    // A chain of 3 (each depends on the previous), 3 seconds each.
    let file = farm
        .client
        .write_file("chain.nix", &graph_expr(3, 3.0, &salt, None))?;
    let file = file.display().to_string();
    let mut child = farm.spawn_farm(
        "farm build (drain)",
        None,
        &["build", &file, "-A", "d2", "--json"],
    )?;

    // Wait for the first build to run, then drain.
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        let s = farm.status(None)?;
        if let Some(r) = s["running"].as_array().and_then(|r| r.first()) {
            break r["drv_path"].as_str().unwrap_or_default().to_owned();
        }
        assert!(Instant::now() < deadline, "nothing started: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(first.ends_with("-d0.drv"), "{first}");
    assert!(farm.run(None, &["drain", "b1"])?.status.success());

    // The running build finishes; nothing new starts while drained.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = farm.status(None)?;
        let running = s["running"].as_array().map(Vec::len).unwrap_or(0);
        if running == 0 {
            assert_eq!(s["builders"][0]["state"], "draining", "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the running build did not finish: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..15 {
        let s = farm.status(None)?;
        assert!(
            s["running"].as_array().is_none_or(|r| r.is_empty()),
            "a drained builder took a build: {s}"
        );
        assert!(
            s["queued_total"].as_u64().unwrap_or(0) >= 1,
            "d1 waits in the queue: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        child.try_wait()?.is_none(),
        "the build cannot finish while drained"
    );

    // Undrain: the rest builds and farm build succeeds.
    assert!(farm.run(None, &["undrain", "b1"])?.status.success());
    let status = child.wait_exit(Duration::from_secs(120))?;
    assert_eq!(status.code(), Some(0), "{}", child.output());
    let doc: serde_json::Value = serde_json::from_str(&child.stdout())?;
    assert!(
        doc["derivations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["outcome"] == "built"),
        "{doc}"
    );
    Ok(())
}

#[test]
fn ctrl_c_cancels_what_was_submitted() -> anyhow::Result<()> {
    let logs = TestLogs::new("cli_ctrl_c")?;
    deadline(DEADLINE, &logs, |logs| ctrl_c(&logs))
}

fn ctrl_c(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "b1",
            max_jobs: 1,
            conf: &[],
        }],
        &[],
    )?;
    farm.wait_for_builders(None, 1)?;
    let salt = farm.client.root().display().to_string();
    let file = farm
        .client
        .write_file("slow.nix", &graph_expr(3, 30.0, &salt, None))?;
    let mut child = farm.spawn_farm(
        "farm build (ctrl-c)",
        None,
        &["build", &file.display().to_string(), "-A", "d2"],
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = farm.status(None)?;
        if s["running"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "nothing started: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The actor's command execs farm, so this PID is farm's.
    child.signal("INT")?;
    let status = child.wait_exit(Duration::from_secs(60))?;
    let stderr = child.output();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cancelling submission"), "{stderr}");
    // The running build is stopped and nothing else waits.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = farm.status(None)?;
        let idle = s["running"].as_array().is_none_or(|r| r.is_empty())
            && s["queued_total"].as_u64() == Some(0);
        if idle {
            break;
        }
        assert!(Instant::now() < deadline, "the submission still runs: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
