//! The harness itself: actors' stores are separate from each other and from the
//! host's `/nix`, failures carry stderr, processes are logged and killed, and
//! the farm binaries are found.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use farm_nix::StorePath;
use farm_tests::{
    Actor, FarmProcess, TestLogs, deadline, deadline_async, farm_bin, process_endpoints,
    sh_derivation, wait_for_endpoints,
};

/// Each harness test's hang-guard.
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn actors_have_separate_stores() -> anyhow::Result<()> {
    let logs = TestLogs::new("actors_have_separate_stores")?;
    deadline(DEADLINE, &logs, |logs| separate_stores(&logs))
}

fn separate_stores(logs: &TestLogs) -> anyhow::Result<()> {
    let alice = Actor::with_logs("alice", logs)?;
    let bob = Actor::with_logs("bob", logs)?;

    // A source added to alice's store.
    let marker = format!("alice-{}\n", alice.root().display());
    let file = alice.write_file("src/hello.txt", &marker)?;
    let added = alice.add_to_store(&file)?;
    assert!(alice.is_valid_path(&added)?);
    assert_eq!(
        std::fs::read_to_string(alice.host_path_of(&added))?,
        marker,
        "the store file lives under alice's root"
    );
    assert!(!bob.is_valid_path(&added)?, "bob's store does not have it");
    assert!(!bob.host_path_of(&added).exists());
    assert!(
        !Path::new(&added.to_string()).exists(),
        "the host's /nix/store must not have it"
    );

    // A derivation built by bob with /bin/sh (unique per run: the root path
    // is in the output).
    let expr = bob.write_file(
        "build.nix",
        &sh_derivation(
            "harness-hello",
            &format!("echo built for {} > $out", bob.root().display()),
        ),
    )?;
    let outs = bob.nix_build(&expr, &[] as &[&str])?;
    let [out] = outs.as_slice() else {
        panic!("expected one output, got {outs:?}");
    };
    assert_eq!(out.name(), "harness-hello");
    assert!(bob.is_valid_path(out)?);
    assert_eq!(
        std::fs::read_to_string(bob.host_path_of(out))?,
        format!("built for {}\n", bob.root().display())
    );
    assert!(!alice.is_valid_path(out)?, "alice's store does not have it");
    assert!(!Path::new(&out.to_string()).exists(), "nor does the host's");

    // Inside the namespace the path is at /nix/store, where nix put it.
    let seen = bob.run("cat", &[out.to_string()])?;
    assert!(seen.starts_with("built for"), "{seen}");
    Ok(())
}

#[test]
fn a_derivation_with_a_dependency_has_its_closure() -> anyhow::Result<()> {
    let logs = TestLogs::new("closure")?;
    deadline(DEADLINE, &logs, |logs| closure(&logs))
}

fn closure(logs: &TestLogs) -> anyhow::Result<()> {
    let actor = Actor::with_logs("closure", logs)?;
    let dep = sh_derivation("dep", &format!("echo {} > $out", actor.root().display()));
    let expr = format!(
        "let dep = {dep}; in derivation {{ name = \"top\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [ \"-c\" \"cat ${{dep}} > $out; echo ${{dep}} >> $out\" ]; }}"
    );
    let file = actor.write_file("top.nix", &expr)?;
    let outs = actor.nix_build(&file, &[] as &[&str])?;
    let [top] = outs.as_slice() else {
        panic!("expected one output, got {outs:?}");
    };
    let closure = actor.closure(top)?;
    assert_eq!(closure.len(), 2, "{closure:?}");
    assert!(closure.iter().any(|p| p.name() == "dep"), "{closure:?}");
    let drvs = actor.nix_instantiate(&file, &[] as &[&str])?;
    assert!(drvs[0].name().ends_with(".drv"), "{drvs:?}");
    Ok(())
}

#[test]
fn a_failing_command_reports_its_stderr() -> anyhow::Result<()> {
    let logs = TestLogs::new("failing")?;
    deadline(DEADLINE, &logs, |logs| failing_command(&logs))
}

fn failing_command(logs: &TestLogs) -> anyhow::Result<()> {
    let actor = Actor::with_logs("failing", logs)?;
    let missing = StorePath::parse("/nix/store/00000000000000000000000000000000-missing")?;
    let err = actor
        .run(
            "nix-store",
            &["--query", "--references", &missing.to_string()],
        )
        .expect_err("querying a path that is not in the store fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("nix-store --query --references"), "{msg}");
    assert!(msg.contains("exit status: 1"), "{msg}");
    assert!(
        msg.contains("is not valid"),
        "the error carries nix's stderr: {msg}"
    );

    let err = actor
        .run("sh", &["-c", "echo to-stdout; echo to-stderr >&2; exit 3"])
        .expect_err("exit 3 fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(msg.contains("to-stderr"), "{msg}");
    // Every command is in the test's logs.
    assert!(actor.logs().render().contains("to-stdout"));
    Ok(())
}

#[test]
fn nix_conf_lines_are_appended() -> anyhow::Result<()> {
    let logs = TestLogs::new("conf")?;
    deadline(DEADLINE, &logs, |logs| conf_lines(&logs))
}

fn conf_lines(logs: &TestLogs) -> anyhow::Result<()> {
    let actor = Actor::with_logs("conf", logs)?;
    actor.nix_conf_append("max-jobs = 7")?;
    let out = actor.run("nix", &["show-config"])?;
    assert!(out.lines().any(|l| l == "max-jobs = 7"), "{out}");
    assert!(out.lines().any(|l| l == "sandbox = false"), "{out}");
    Ok(())
}

#[test]
fn processes_are_logged_waited_for_and_killed() -> anyhow::Result<()> {
    let logs = TestLogs::new("processes")?;
    deadline(DEADLINE, &logs, |logs| processes(&logs))
}

fn processes(logs: &TestLogs) -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    // A stand-in for a coordinator: logs, writes endpoints.json in two steps
    // (a reader must not take the partial file), then serves forever.
    let script = r#"
        echo starting; echo on-stderr >&2
        printf '{"grpc":"127.0.0.1:1",' > "$0/endpoints.json"
        sleep 0.3
        printf '"http":"127.0.0.1:2","ssh":"127.0.0.1:3","cache_public_key":"k:AA","ssh_host_key":"ssh-ed25519 AA","new":[]}' >> "$0/endpoints.json"
        echo ready
        exec sleep 1000
    "#;
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(script).arg(state.path());
    let mut proc = FarmProcess::spawn(logs, "fake-coordinator", cmd)?;
    let endpoints = process_endpoints(&mut proc, state.path(), Duration::from_secs(10))?;
    assert_eq!(endpoints.ssh, "127.0.0.1:3");
    assert_eq!(wait_for_endpoints(state.path(), Duration::ZERO)?, endpoints);
    proc.wait_for_log("ready", Duration::from_secs(10))?;
    assert!(
        proc.log().contains("on-stderr"),
        "stderr goes to the log too"
    );
    proc.ensure_running()?;

    let status = proc.kill()?;
    assert!(!status.success());
    assert!(
        proc.ensure_running().is_err(),
        "a killed process is not running"
    );
    assert!(logs.render().contains("starting"));

    // A process that dies early fails the wait with its log, not a timeout.
    let state2 = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "echo cannot bind >&2; exit 2"]);
    let mut dead = FarmProcess::spawn(logs, "dead", cmd)?;
    let err = process_endpoints(&mut dead, state2.path(), Duration::from_secs(30))
        .expect_err("the process exits without endpoints");
    let msg = format!("{err:#}");
    assert!(msg.contains("cannot bind"), "{msg}");
    assert!(msg.contains("exit status: 2"), "{msg}");

    // stop() sends SIGTERM and returns once the process is gone.
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "trap 'echo got-term; exit 0' TERM; echo trapped; while :; do sleep 0.05; done",
    ]);
    // The log's header quotes the command line: waiting for a word of the
    // script must wait for the process to print it, not match the header.
    let mut late = std::process::Command::new("sh");
    late.args(["-c", "sleep 30; echo late-marker"]);
    let mut late = FarmProcess::spawn(logs, "late", late)?;
    assert!(
        late.wait_for_log("late-marker", Duration::from_millis(300))
            .is_err()
    );
    late.kill()?;

    let mut polite = FarmProcess::spawn(logs, "polite", cmd)?;
    polite.wait_for_log("trapped", Duration::from_secs(10))?;
    let status = polite.stop(Duration::from_secs(10))?;
    assert!(status.success(), "{status}: {}", polite.log());
    assert!(polite.log().contains("got-term"));
    Ok(())
}

#[test]
fn dropping_a_process_kills_its_group() -> anyhow::Result<()> {
    let logs = TestLogs::new("drop")?;
    deadline(DEADLINE, &logs, |logs| drop_kills_group(&logs))
}

fn drop_kills_group(logs: &TestLogs) -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new("sh");
    // A child in the background that would outlive a plain kill of the parent.
    // (printf so that the needle is not in the command line heading the log)
    cmd.args(["-c", "sleep 1000 & printf 'child%s=%s\\n' '' $!; wait"]);
    let mut proc = FarmProcess::spawn(logs, "parent", cmd)?;
    proc.wait_for_log("child=", Duration::from_secs(10))?;
    let log = proc.log();
    let child_pid: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("child="))
        .and_then(|p| p.trim().parse().ok())
        .expect("child pid in the log");
    let proc_dir = format!("/proc/{child_pid}");
    assert!(Path::new(&proc_dir).exists());
    drop(proc);
    // The child was SIGKILLed; it is reaped by init, so wait for it to vanish
    // (a zombie still has a /proc entry, with state Z).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(format!("{proc_dir}/stat")).unwrap_or_default();
        let alive = state
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'));
        if !alive {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "child {child_pid} survived"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn farm_binaries_are_built_and_found() -> anyhow::Result<()> {
    // The first call builds them: allow for a cold build on a slow machine.
    let logs = TestLogs::new("farm_bin")?;
    deadline(Duration::from_secs(900), &logs, |_| found())
}

fn found() -> anyhow::Result<()> {
    for name in farm_tests::FARM_BINARIES {
        let path = farm_bin(name)?;
        assert!(path.is_file(), "{}", path.display());
        assert_eq!(path.file_name().and_then(|n| n.to_str()), Some(*name));
    }
    Ok(())
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Waits up to 10 s for `pid` to be gone.
fn gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn a_hanging_test_fails_at_its_deadline_with_every_log() -> anyhow::Result<()> {
    // The check itself runs under a deadline: were the inner one broken, this
    // test would fail here instead of hanging.
    let outer = TestLogs::new("deadline_outer")?;
    deadline(Duration::from_secs(120), &outer, |_| {
        let logs = TestLogs::new("deadline_inner")?;
        let (pids_tx, pids_rx) = std::sync::mpsc::channel::<u32>();
        let started = Instant::now();
        let err = deadline(Duration::from_secs(3), &logs, move |logs| {
            // A service with a child of its own, which logs a marker.
            let mut cmd = Command::new("sh");
            cmd.args([
                "-c",
                "printf 'service-%s\\n' log-marker; sleep 1000 & printf 'child%s=%s\\n' '' $!; wait",
            ]);
            let mut service = FarmProcess::spawn(&logs, "stuck-service", cmd)?;
            service.wait_for_log("child=", Duration::from_secs(10))?;
            pids_tx.send(service.pid())?;
            let child: u32 = service
                .output()
                .lines()
                .find_map(|l| l.strip_prefix("child="))
                .and_then(|p| p.trim().parse().ok())
                .context("the service's child pid")?;
            pids_tx.send(child)?;
            // An actor whose command hangs (it reports its own pid first).
            let actor = Actor::with_logs("hanger", &logs)?;
            actor.run("sh", &["-c", "echo actor-transcript-marker"])?;
            let pid_file = actor.root().join("hang.pid");
            actor.run(
                "sh",
                &[
                    "-c",
                    &format!("echo $$ > {}; exec sleep 1000", pid_file.display()),
                ],
            )?;
            drop(service);
            Ok(())
        })
        .expect_err("a body that hangs fails the test");
        let msg = format!("{err:#}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the deadline fired late: {:?}",
            started.elapsed()
        );
        assert!(
            msg.contains("did not finish within its deadline of 3s"),
            "{msg}"
        );
        // Every log: the service's, the actor's finished command…
        assert!(msg.contains("service-log-marker"), "{msg}");
        assert!(msg.contains("actor-transcript-marker"), "{msg}");
        // …and what was still running, by name.
        assert!(msg.contains("still running at the deadline"), "{msg}");
        assert!(msg.contains("stuck-service (pid"), "{msg}");
        assert!(msg.contains("[hanger] $ sh -c"), "{msg}");
        // The hung command was killed, so the body failed by itself.
        assert!(msg.contains("the test body then failed"), "{msg}");
        // Nothing is left running: the service, its child, the actor's command.
        let pids: Vec<u32> = pids_rx.try_iter().collect();
        assert_eq!(pids.len(), 2, "{pids:?}");
        for pid in pids {
            assert!(gone(pid), "pid {pid} survived the deadline");
        }
        assert!(logs.running().is_empty(), "{:?}", logs.running());

        // A body that finishes in time passes its value through; a panic fails.
        let quick = TestLogs::new("deadline_quick")?;
        assert_eq!(deadline(Duration::from_secs(30), &quick, |_| Ok(7))?, 7);
        let panicked = std::panic::catch_unwind(|| {
            deadline(Duration::from_secs(30), &quick, |_| -> anyhow::Result<()> {
                panic!("an assertion in the body")
            })
        });
        assert!(panicked.is_err(), "a panic in the body fails the test");
        let async_value = deadline_async(Duration::from_secs(30), &quick, |_| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok("async")
        })?;
        assert_eq!(async_value, "async");
        Ok(())
    })
}
