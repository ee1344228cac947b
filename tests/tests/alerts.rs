//! Alerts end to end, with real Nix, the real farm binaries and a real HTTP
//! receiver: an axum server in the test records every request, and the
//! coordinator has it as both its ntfy topic (`--alert-ntfy`) and its
//! webhook (`--alert-webhook`), each URL with a token in its path, and its
//! thresholds set to seconds.
//!
//! - A watched job (`--alert-jobs ci/app`, `farm build --job ci/app`) that
//!   passes, fails, then passes again gives one `job_failing` alert and one
//!   `resolved` on each target, and nothing while it only passes.
//! - A builder killed with `kill -9` gives exactly one `builder_offline`
//!   message on each target once the 3-second threshold has passed, none more
//!   while it stays away well past it, and exactly one `resolved` on each
//!   when it is started again.
//! - The coordinator's log never shows the targets' tokens.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use farm_tests::fixture::{BuilderSpec, Farm, graph_expr};
use farm_tests::{TestLogs, deadline};

/// The test's hang-guard.
const DEADLINE: Duration = Duration::from_secs(400);
/// How long a wait for an alert may take.
const WAIT: Duration = Duration::from_secs(60);
/// `--alert-builder-offline`, seconds.
const OFFLINE_SECS: u64 = 3;
/// The secrets in the targets' paths.
const NTFY_TOKEN: &str = "topic-tok3n-9f2c";
const HOOK_TOKEN: &str = "hook-s3cret-41aa";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Log = Arc<Mutex<Vec<Received>>>;

/// The receiver: records every POST, answers 200.
fn receiver(rt: &tokio::runtime::Runtime) -> anyhow::Result<(String, Log)> {
    let log: Log = Arc::default();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let rec = log.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
            let rec = rec.clone();
            async move {
                rec.lock().unwrap().push(Received {
                    path: uri.path().to_owned(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned()))
                        .collect(),
                    body,
                });
                "ok"
            }
        },
    );
    rt.spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), log))
}

/// An alert as either target delivered it: (kind, state, subject).
type Seen = (String, String, String);
/// The ntfy messages and the webhook calls, each with what it announced.
type Delivered = (Vec<(Received, Seen)>, Vec<(serde_json::Value, Seen)>);

/// What the receiver got so far: the ntfy messages (by their tags and
/// title) and the webhook calls (by their JSON), each checked for shape.
fn seen(log: &Log) -> anyhow::Result<Delivered> {
    let all = log.lock().unwrap().clone();
    let (mut ntfy, mut hook) = (Vec::new(), Vec::new());
    for r in all {
        if r.path == format!("/ntfy/{NTFY_TOKEN}") {
            let title = r.header("title").context("ntfy without Title")?.to_owned();
            let tags = r.header("tags").context("ntfy without Tags")?;
            let priority = r.header("priority").context("ntfy without Priority")?;
            let state = if tags.contains("white_check_mark") {
                ensure!(priority == "default", "{r:?}");
                ensure!(title.starts_with("[farm] resolved: "), "{r:?}");
                "resolved"
            } else {
                ensure!(tags.contains("warning") && priority == "high", "{r:?}");
                "firing"
            };
            // The title names the kind and subject in words.
            let kind = if title.contains("offline") {
                "builder_offline"
            } else if title.contains("failing") {
                "job_failing"
            } else {
                "other"
            };
            let subject = title
                .split_whitespace()
                .find(|w| *w == "b1" || *w == "ci/app")
                .unwrap_or("?")
                .to_owned();
            ntfy.push((r, (kind.to_owned(), state.to_owned(), subject)));
        } else if r.path == format!("/hook/{HOOK_TOKEN}") {
            ensure!(
                r.header("content-type") == Some("application/json"),
                "{r:?}"
            );
            let v: serde_json::Value = serde_json::from_str(&r.body)?;
            for f in ["alert", "state", "subject", "message", "at"] {
                ensure!(v[f].is_string(), "webhook without {f}: {v}");
            }
            ensure!(v["at"].as_str().unwrap_or("").ends_with('Z'), "{v}");
            let s = (
                v["alert"].as_str().unwrap_or("").to_owned(),
                v["state"].as_str().unwrap_or("").to_owned(),
                v["subject"].as_str().unwrap_or("").to_owned(),
            );
            hook.push((v, s));
        } else {
            anyhow::bail!("a request to an unexpected path: {r:?}");
        }
    }
    Ok((ntfy, hook))
}

/// How many of `want` each target got.
fn counts(log: &Log, want: (&str, &str, &str)) -> anyhow::Result<(usize, usize)> {
    let (ntfy, hook) = seen(log)?;
    let is = |s: &Seen| (s.0.as_str(), s.1.as_str(), s.2.as_str()) == want;
    Ok((
        ntfy.iter().filter(|(_, s)| is(s)).count(),
        hook.iter().filter(|(_, s)| is(s)).count(),
    ))
}

/// Waits until each target got at least one `want`.
fn wait_for(farm: &mut Farm, log: &Log, want: (&str, &str, &str)) -> anyhow::Result<()> {
    let until = Instant::now() + WAIT;
    loop {
        let (n, h) = counts(log, want)?;
        if n >= 1 && h >= 1 {
            return Ok(());
        }
        farm.coordinator.process.ensure_running()?;
        ensure!(
            Instant::now() < until,
            "no {want:?} within {WAIT:?} (ntfy {n}, webhook {h}); received: {:?}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn alerts_fire_once_per_episode_and_resolve_once() -> anyhow::Result<()> {
    let logs = TestLogs::new("alerts")?;
    deadline(DEADLINE, &logs, |logs| scenario(&logs))
}

fn scenario(logs: &TestLogs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let (url, log) = receiver(&rt)?;
    let ntfy = format!("{url}/ntfy/{NTFY_TOKEN}");
    let hook = format!("{url}/hook/{HOOK_TOKEN}");
    let offline = OFFLINE_SECS.to_string();
    let mut farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "b1",
            max_jobs: 2,
            conf: &[],
        }],
        &[
            "--alert-ntfy",
            &ntfy,
            "--alert-webhook",
            &hook,
            "--alert-builder-offline",
            &offline,
            "--alert-jobs",
            "ci/app",
            // Only what this test drives.
            "--alert-disk-free",
            "0",
            "--alert-memory-available",
            "0",
            "--alert-flush-slow-ms",
            "0",
        ],
    )?;
    farm.wait_for_builders(None, 1)?;
    let salt = farm.client.root().display().to_string();

    // 1. The watched job: passes, fails, passes again.
    let build = |farm: &Farm, file: &str, tag: &str, fail: Option<usize>| -> anyhow::Result<i32> {
        let expr = farm
            .client
            .write_file(file, &graph_expr(2, 0.0, &format!("{salt}-{tag}"), fail))?
            .display()
            .to_string();
        let out = farm.run(None, &["build", &expr, "-A", "all", "--job", "ci/app"])?;
        out.status.code().context("farm build killed")
    };
    ensure!(
        build(&farm, "good1.nix", "good1", None)? == 0,
        "good graph failed"
    );
    // Passing: nothing to say (give the loop a few rounds to be sure).
    std::thread::sleep(Duration::from_secs(3));
    let (n, h) = seen(&log)?;
    ensure!(
        n.is_empty() && h.is_empty(),
        "alerts while all is well: {n:?} {h:?}"
    );
    ensure!(
        build(&farm, "bad.nix", "bad", Some(1))? == 1,
        "bad graph did not fail"
    );
    wait_for(&mut farm, &log, ("job_failing", "firing", "ci/app"))?;
    let (_, hooks) = seen(&log)?;
    let msg = hooks[0].0["message"].as_str().unwrap_or("");
    ensure!(msg.contains("farm jobs ci/app"), "says what to do: {msg}");
    ensure!(
        build(&farm, "good2.nix", "good2", None)? == 0,
        "good graph failed"
    );
    wait_for(&mut farm, &log, ("job_failing", "resolved", "ci/app"))?;
    std::thread::sleep(Duration::from_secs(3));
    for state in ["firing", "resolved"] {
        let c = counts(&log, ("job_failing", state, "ci/app"))?;
        ensure!(c == (1, 1), "job {state}: {c:?} (ntfy, webhook)");
    }

    // 2. A builder killed: one alert per target after the threshold, no more.
    farm.kill_builder(0)?;
    let killed = Instant::now();
    farm.wait_builder_offline(0)?;
    wait_for(&mut farm, &log, ("builder_offline", "firing", "b1"))?;
    ensure!(
        killed.elapsed() >= Duration::from_secs(OFFLINE_SECS),
        "the offline alert came before its threshold"
    );
    // Well past the threshold, several times over: still one.
    std::thread::sleep(Duration::from_secs(4 * OFFLINE_SECS));
    let c = counts(&log, ("builder_offline", "firing", "b1"))?;
    ensure!(c == (1, 1), "offline firing: {c:?} (ntfy, webhook)");
    let (ntfy_msgs, hooks) = seen(&log)?;
    let (n, _) = ntfy_msgs
        .iter()
        .find(|(_, s)| s.0 == "builder_offline")
        .context("ntfy offline")?;
    ensure!(
        n.body.contains("farm drain b1") && n.body.contains("farm-builder"),
        "the ntfy message says what to do: {}",
        n.body
    );
    let (v, _) = hooks
        .iter()
        .find(|(_, s)| s.0 == "builder_offline")
        .context("webhook offline")?;
    ensure!(v["message"] == n.body.as_str(), "{v} vs {}", n.body);
    ensure!(v["state"] == "firing" && v["subject"] == "b1", "{v}");

    // 3. It comes back: one "resolved" per target.
    farm.restart_builder(0)?;
    wait_for(&mut farm, &log, ("builder_offline", "resolved", "b1"))?;
    std::thread::sleep(Duration::from_secs(OFFLINE_SECS + 2));
    for state in ["firing", "resolved"] {
        let c = counts(&log, ("builder_offline", state, "b1"))?;
        ensure!(c == (1, 1), "offline {state}: {c:?} (ntfy, webhook)");
    }
    let (n, h) = seen(&log)?;
    ensure!(n.len() == 4 && h.len() == 4, "nothing else: {n:?} {h:?}");

    // No secrets in the coordinator's log; the targets are named by host.
    let out = farm.coordinator.process.output();
    for token in [NTFY_TOKEN, HOOK_TOKEN] {
        ensure!(
            !out.contains(token),
            "the coordinator logged a target's token"
        );
    }
    ensure!(
        out.contains("alert sent"),
        "the coordinator logs what it sent"
    );
    Ok(())
}
