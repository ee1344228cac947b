//! Failures end to end, on a real coordinator and real builders:
//! - a failing derivation is reported failed with its log (over gRPC `Logs`
//!   and the cache's `/log/`), what depends on it is a dependency failure and
//!   never runs, and an unrelated branch still finishes — it is held back by a
//!   gate until the failure has been reported, so it provably finishes after;
//! - a builder whose key is not enrolled is refused, and the refusal is logged
//!   on both sides.

use std::collections::BTreeMap;

use farm_proto::v1;
use farm_proto::v1::BuildOutcome;
use farm_proto::v1::build_event::Event as Ev;
use farm_tests::fixture::*;
use farm_tests::{TestLogs, deadline_async};

/// What the failing build prints before it fails.
const LOG_MARKER: &str = "f-bad-says-the-disk-is-on-fire";

#[test]
fn a_failure_fails_its_dependents_and_spares_unrelated_work() -> anyhow::Result<()> {
    let logs = TestLogs::new("farm_failure")?;
    deadline_async(DEADLINE, &logs, |logs| async move {
        a_failure_fails_its_dependents_and_spares_unrelated_work_run(&logs).await
    })
}

async fn a_failure_fails_its_dependents_and_spares_unrelated_work_run(
    logs: &TestLogs,
) -> anyhow::Result<()> {
    let farm = Farm::start(
        logs,
        &[
            BuilderSpec {
                name: "f-one",
                max_jobs: 2,
                conf: &["system-features ="],
            },
            BuilderSpec {
                name: "f-two",
                max_jobs: 2,
                conf: &["system-features ="],
            },
        ],
        &[],
    )?;
    let bindings: Vec<(String, String)> = vec![
        ("ok1".into(), "mk \"f-ok-1\" \"echo ok > $out\" []".into()),
        (
            "okgate".into(),
            "mk \"f-ok-gate\" (gate \"ok-go\" + \"echo $deps > $out\") [ ok1 ]".into(),
        ),
        (
            "ok3".into(),
            "mk \"f-ok-3\" \"echo $deps > $out\" [ okgate ]".into(),
        ),
        (
            "bad".into(),
            format!("mk \"f-bad\" \"echo {LOG_MARKER}; echo on-stderr >&2; exit 3\" []"),
        ),
        (
            "dep1".into(),
            "mk \"f-dep-1\" \"echo $deps > $out\" [ bad ]".into(),
        ),
        (
            "dep2".into(),
            "mk \"f-dep-2\" \"echo $deps > $out\" [ dep1 ok1 ]".into(),
        ),
    ];
    let nix = graph_nix(farm.witness_dir(), &bindings, &["ok3", "dep2"]);
    let file = farm.client.write_file("failure.nix", &nix)?;
    let roots = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    assert_eq!(roots.len(), 2, "{roots:?}");
    farm.upload_closure(&roots).await?;

    let mut events = farm.submit(&roots).await?;
    // The failure is reported while the unrelated branch is still held at its gate.
    let failed = events
        .until(
            GRAPH_TIMEOUT,
            |e| matches!(e, Ev::Finished(f) if drv_name(&f.drv_path) == "f-bad"),
        )
        .await?;
    let Ev::Finished(failed) = failed else {
        unreachable!()
    };
    assert_eq!(
        outcome(&failed),
        BuildOutcome::Failed,
        "{}",
        events.render()
    );
    assert!(
        failed.error_message.contains("exit code 3"),
        "a failure says why: {failed:?}"
    );
    assert!(
        !failed.error_message.contains('\u{1b}'),
        "no terminal escapes in the message: {failed:?}"
    );
    assert!(
        !events
            .finished()
            .iter()
            .any(|f| drv_name(&f.drv_path).starts_with("f-ok-g")),
        "the gated branch cannot have finished yet: {}",
        events.render()
    );
    wait_for_file(&farm.witness_dir().join("ok-go.started"), WAIT)?;
    std::fs::write(farm.witness_dir().join("ok-go"), "")?;

    let done = events.done(GRAPH_TIMEOUT).await?;
    let log = events.render();
    assert!(!done.success, "{log}");
    let outcomes: BTreeMap<String, BuildOutcome> = events
        .outcomes()
        .into_iter()
        .map(|(drv, f)| (drv_name(&drv), outcome(f)))
        .collect();
    let expect = [
        ("f-ok-1", BuildOutcome::Built),
        ("f-ok-gate", BuildOutcome::Built),
        ("f-ok-3", BuildOutcome::Built),
        ("f-bad", BuildOutcome::Failed),
        ("f-dep-1", BuildOutcome::DependencyFailed),
        ("f-dep-2", BuildOutcome::DependencyFailed),
    ];
    for (name, want) in expect {
        assert_eq!(outcomes.get(name), Some(&want), "{name}: {log}");
    }
    assert_eq!(done.built, 3, "{log}");
    assert_eq!(done.failed, 3, "the failure and its two dependents: {log}");

    // What ran: everything but the dependents, once each.
    let mut ran: Vec<String> = farm
        .witness_lines()?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    ran.sort();
    assert_eq!(ran, ["f-bad", "f-ok-1", "f-ok-3", "f-ok-gate"], "{log}");

    // The failed build's log, from the coordinator (gRPC) and the cache (HTTP).
    let bad_drv = events
        .outcomes()
        .keys()
        .find(|d| drv_name(d) == "f-bad")
        .cloned()
        .expect("f-bad has an outcome");
    let mut client = farm.farm_client().await?;
    let mut stream = client
        .logs(v1::LogsRequest {
            build_id: bad_drv.clone(),
            follow: false,
        })
        .await?
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = stream.message().await? {
        text.extend_from_slice(&chunk.data);
    }
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains(LOG_MARKER), "gRPC log: {text:?}");
    assert!(text.contains("on-stderr"), "stderr is in the log: {text:?}");
    let base = bad_drv.rsplit('/').next().unwrap_or_default();
    let (status, body) =
        http_get(&farm.coordinator.endpoints.http, &format!("/log/{base}")).await?;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(LOG_MARKER), "HTTP log: {body:?}");
    // A host with the farm's cache as its substituter reads the failed
    // build's log with plain `nix log`, and with `--store http://…`.
    let cache_url = format!("http://{}", farm.coordinator.endpoints.http);
    let via_substituter = farm
        .client
        .run_async(
            "nix",
            &["--option", "substituters", &cache_url, "log", &bad_drv],
        )
        .await?;
    assert!(
        via_substituter.contains(LOG_MARKER),
        "nix log (substituter): {via_substituter:?}"
    );
    let via_store = farm
        .client
        .run_async("nix", &["log", "--store", &cache_url, &bad_drv])
        .await?;
    assert!(
        via_store.contains(LOG_MARKER),
        "nix log --store: {via_store:?}"
    );
    Ok(())
}

#[test]
fn a_builder_with_an_unknown_key_is_refused_and_logged() -> anyhow::Result<()> {
    let logs = TestLogs::new("farm_unknown_key")?;
    deadline_async(DEADLINE, &logs, |logs| async move {
        a_builder_with_an_unknown_key_is_refused_and_logged_run(&logs).await
    })
}

async fn a_builder_with_an_unknown_key_is_refused_and_logged_run(
    logs: &TestLogs,
) -> anyhow::Result<()> {
    let mut farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "member",
            max_jobs: 1,
            conf: &["system-features ="],
        }],
        &[],
    )?;
    // Its own key, never enrolled.
    let mut intruder = Builder::new(logs, "intruder", 1, &["system-features ="])?;
    let enrolled = std::fs::read_to_string(&farm.builder_keys)?;
    assert!(!enrolled.contains(&intruder.public_key));
    intruder.start(&farm.grpc_url())?;

    let coordinator = &mut farm.coordinator.process;
    let deadline = std::time::Instant::now() + WAIT;
    let refusal = loop {
        let log = coordinator.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("refused builder") && l.contains("builder=intruder "))
        {
            break line.to_owned();
        }
        coordinator.ensure_running()?;
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the coordinator did not log refusing the intruder:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(refusal.contains("not enrolled"), "{refusal}");
    assert!(refusal.contains("key=SHA256:"), "names the key: {refusal}");
    intruder
        .process()?
        .wait_for_log("the coordinator refused this builder", WAIT)?;
    assert!(
        !coordinator
            .log()
            .lines()
            .any(|l| l.contains("builder authenticated") && l.contains("builder=intruder ")),
        "the intruder never got in"
    );

    // The farm knows the member, not the intruder.
    let status = farm
        .farm_client()
        .await?
        .status(v1::StatusRequest {})
        .await?
        .into_inner();
    let names: Vec<&str> = status.builders.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["member"], "{status:?}");
    Ok(())
}
