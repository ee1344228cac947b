//! `GET /metrics` end to end, on a real coordinator with two real builders:
//! scraped during a graph (gated builds hold slots, a failure and its
//! dependent have ended, a build waits for a gated dependency) and after it,
//! every value checked against what happened as the farm's own gRPC `Status`
//! and the submission's events report it; narinfo hits and misses counted as
//! a real `nix-store` substitutes from the cache over HTTP. Every scrape is
//! validated as OpenMetrics text with a real parser (`prometheus-parse`, plus
//! the format's rules it does not check: every sample of a declared family,
//! counters sampled as `_total`, histogram buckets cumulative up to `+Inf` =
//! `_count`, no sample twice, `# EOF` last).
//!
//! And the Grafana board (`contrib/grafana/nix-farm.json`): every panel's
//! query and every template variable names only metrics a started
//! coordinator exposes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use farm_nix::store_path::StorePath;
use farm_proto::v1;
use farm_proto::v1::BuildOutcome;
use farm_proto::v1::build_event::Event as Ev;
use farm_tests::fixture::*;
use farm_tests::{Actor, TestLogs, deadline, deadline_async, tracked_output};

// ───────────────────────────── the exposition ─────────────────────────────

/// One scrape, parsed and validated.
struct Exposition {
    text: String,
    /// Family name → type, from the `# TYPE` lines.
    types: BTreeMap<String, String>,
    samples: Vec<prometheus_parse::Sample>,
}

/// The family a sample name belongs to, given the declared families.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<(&'a str, &'a str)> {
    if types.contains_key(name) {
        return Some((name, ""));
    }
    for suffix in ["_total", "_created", "_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.contains_key(base)
        {
            return Some((base, suffix));
        }
    }
    None
}

impl Exposition {
    fn parse(text: &str) -> anyhow::Result<Exposition> {
        use prometheus_parse::LineInfo;
        let lines: Vec<&str> = text.lines().collect();
        ensure!(lines.last() == Some(&"# EOF"), "no `# EOF` at the end");
        let mut types = BTreeMap::new();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for (i, line) in lines.iter().enumerate() {
            let at = || format!("line {}: {line:?}", i + 1);
            if *line == "# EOF" {
                ensure!(i + 1 == lines.len(), "{}: # EOF before the end", at());
                continue;
            }
            if line.starts_with("# UNIT ") {
                continue;
            }
            match LineInfo::parse(line) {
                LineInfo::Doc { .. } => {}
                LineInfo::Type {
                    metric_name,
                    metric_alias,
                    sample_type,
                } => {
                    let name = metric_alias.unwrap_or(metric_name);
                    let ty = match sample_type {
                        prometheus_parse::SampleType::Counter => "counter",
                        prometheus_parse::SampleType::Gauge => "gauge",
                        prometheus_parse::SampleType::Histogram => "histogram",
                        other => bail!("{}: unexpected type {other:?}", at()),
                    };
                    ensure!(
                        types.insert(name.clone(), ty.to_string()).is_none(),
                        "{}: {name} declared twice",
                        at()
                    );
                }
                LineInfo::Sample {
                    metric_name,
                    labels,
                    value,
                    timestamp,
                } => {
                    ensure!(timestamp.is_none(), "{}: a timestamp", at());
                    ensure!(
                        value.parse::<f64>().is_ok() || value == "+Inf",
                        "{}: value {value:?}",
                        at()
                    );
                    let Some((family, suffix)) = family_of(metric_name, &types) else {
                        bail!("{}: a sample of no declared family", at());
                    };
                    let ty = types[family].as_str();
                    let ok = match ty {
                        "counter" => suffix == "_total" || suffix == "_created",
                        "gauge" => suffix.is_empty(),
                        _ => matches!(suffix, "_bucket" | "_sum" | "_count"),
                    };
                    ensure!(ok, "{}: {metric_name} in a {ty} family", at());
                    ensure!(
                        seen.insert(format!("{metric_name}{{{}}}", labels.unwrap_or(""))),
                        "{}: the same sample twice",
                        at()
                    );
                }
                LineInfo::Empty | LineInfo::Ignored => bail!("{}: not OpenMetrics text", at()),
            }
        }
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
        let e = Exposition {
            text: text.to_string(),
            types,
            samples: scrape.samples,
        };
        e.check_histograms()?;
        Ok(e)
    }

    /// Buckets are cumulative, and the `+Inf` bucket is the `_count`.
    fn check_histograms(&self) -> anyhow::Result<()> {
        for s in &self.samples {
            let prometheus_parse::Value::Histogram(buckets) = &s.value else {
                continue;
            };
            let mut last = 0.0;
            for b in buckets {
                ensure!(
                    b.count >= last,
                    "{} {}: buckets not cumulative",
                    s.metric,
                    s.labels
                );
                last = b.count;
            }
            let inf = buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .with_context(|| format!("{} {}: no +Inf bucket", s.metric, s.labels))?;
            let count = self.sum(&format!("{}_count", s.metric), &labels_of(&s.labels));
            ensure!(
                Some(inf.count) == count,
                "{} {}: +Inf bucket {} but _count {count:?}",
                s.metric,
                s.labels,
                inf.count
            );
        }
        Ok(())
    }

    /// The sum of the samples of `name` that carry every label in `labels`
    /// (`None`: no such sample).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in &self.samples {
            if s.metric != name || !labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) {
                continue;
            }
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            *found.get_or_insert(0.0) += v;
        }
        found
    }

    /// [`Exposition::sum`], which must exist.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        self.sum(name, labels)
            .with_context(|| format!("no sample {name} {labels:?} in:\n{}", self.text))
    }

    /// Every name a query may use: each family's sample names.
    fn names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (name, ty) in &self.types {
            match ty.as_str() {
                "counter" => {
                    out.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        out.insert(format!("{name}{s}"));
                    }
                }
                _ => {
                    out.insert(name.clone());
                }
            }
        }
        out
    }
}

fn labels_of(l: &prometheus_parse::Labels) -> Vec<(&str, &str)> {
    l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// `GET /metrics` from the coordinator at `http` (`host:port`), validated.
fn scrape(http: &str) -> anyhow::Result<Exposition> {
    let (status, body) = http_get_blocking(http, "/metrics")?;
    ensure!(status == 200, "GET /metrics answered {status}");
    let text = String::from_utf8(body)?;
    Exposition::parse(&text).with_context(|| format!("the exposition:\n{text}"))
}

/// Scrapes until `ok` holds (the builders' messages and the outbox run on
/// their own time), or fails after [`WAIT`] showing the last scrape.
fn scrape_until(
    http: &str,
    what: &str,
    mut ok: impl FnMut(&Exposition) -> bool,
) -> anyhow::Result<Exposition> {
    let deadline = Instant::now() + WAIT;
    loop {
        let e = scrape(http)?;
        if ok(&e) {
            return Ok(e);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not so within {WAIT:?}; last scrape:\n{}", e.text);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ───────────────────────────── during a graph ─────────────────────────────

const OUTCOMES: [(&str, BuildOutcome); 3] = [
    ("built", BuildOutcome::Built),
    ("failed", BuildOutcome::Failed),
    ("dependency_failed", BuildOutcome::DependencyFailed),
];

/// Outcome label → how many `Finished` events say so.
fn event_outcomes(events: &EventStream) -> BTreeMap<&'static str, f64> {
    let mut m: BTreeMap<&'static str, f64> = OUTCOMES.iter().map(|(l, _)| (*l, 0.0)).collect();
    for f in events.finished() {
        if let Some((l, _)) = OUTCOMES.iter().find(|(_, o)| *o == outcome(f)) {
            *m.entry(l).or_default() += 1.0;
        }
    }
    m
}

fn check_outcomes(e: &Exposition, events: &EventStream, what: &str) -> anyhow::Result<()> {
    for (label, want) in event_outcomes(events) {
        let got = e
            .sum("farm_builds_finished_total", &[("outcome", label)])
            .unwrap_or(0.0);
        ensure!(
            got == want,
            "{what}: farm_builds_finished_total{{outcome={label}}} is {got}, the events say {want}:\n{}\n{}",
            events.render(),
            e.text
        );
    }
    Ok(())
}

/// A fresh Nix client that substitutes from the farm's cache only.
fn substituter(farm: &Farm, logs: &TestLogs) -> anyhow::Result<Actor> {
    let actor = Actor::with_logs("substituter", logs)?;
    actor.nix_conf_append(&format!("substituters = {}", farm.cache_url()))?;
    actor.nix_conf_append(&format!(
        "trusted-public-keys = {}",
        farm.coordinator.endpoints.cache_public_key
    ))?;
    actor.nix_conf_append("narinfo-cache-negative-ttl = 0")?;
    Ok(actor)
}

fn output_of(events: &EventStream, name: &str) -> anyhow::Result<StorePath> {
    let f = events
        .finished()
        .into_iter()
        .find(|f| drv_name(&f.drv_path) == name)
        .with_context(|| format!("{name} has not finished:\n{}", events.render()))?;
    let out = f
        .outputs
        .get("out")
        .with_context(|| format!("{name} has no output: {f:?}"))?;
    Ok(StorePath::parse(out)?)
}

#[test]
fn metrics_during_a_graph_match_what_happened() -> anyhow::Result<()> {
    let logs = TestLogs::new("metrics")?;
    deadline_async(DEADLINE, &logs, |logs| async move {
        during_a_graph(&logs).await
    })
}

async fn during_a_graph(logs: &TestLogs) -> anyhow::Result<()> {
    // One client key of the farm's own, for a Nix client over SSH.
    let farm = Farm::setup(logs)
        .builders(&[
            BuilderSpec {
                name: "m-one",
                max_jobs: 2,
                conf: &["system-features ="],
            },
            BuilderSpec {
                name: "m-two",
                max_jobs: 2,
                conf: &["system-features ="],
            },
        ])
        .clients(1)
        .start()?;
    let http = farm.coordinator.endpoints.http.clone();
    let status = farm.coordinator.status()?;
    let system = status
        .builders
        .first()
        .and_then(|b| b.capabilities.as_ref()?.systems.first().cloned())
        .context("a builder's system")?;

    // Before any work: both builders idle, 4 slots, nothing queued or running.
    let before = scrape_until(&http, "both builders idle", |e| {
        e.sum("farm_builders", &[("state", "idle")]) == Some(2.0)
    })?;
    ensure!(before.get("farm_builder_up", &[("builder", "m-one")])? == 1.0);
    ensure!(before.get("farm_builder_up", &[("builder", "m-two")])? == 1.0);
    ensure!(
        before.get("farm_slots", &[("system", &system)])? == 4.0,
        "{}",
        before.text
    );
    ensure!(before.get("farm_running_builds", &[])? == 0.0);
    ensure!(before.sum("farm_builds_finished_total", &[]).unwrap_or(0.0) == 0.0);

    // Three gated builds (3 of the 4 slots, so both builders are busy), one
    // waiting on a gated one, a failure and its dependent, one plain success.
    let bindings: Vec<(&str, String)> = vec![
        (
            "g1",
            "mk \"m-gate-1\" (gate \"go-1\" + \"echo 1 > $out\") []".into(),
        ),
        (
            "g2",
            "mk \"m-gate-2\" (gate \"go-2\" + \"echo 2 > $out\") []".into(),
        ),
        (
            "g3",
            "mk \"m-gate-3\" (gate \"go-3\" + \"echo 3 > $out\") []".into(),
        ),
        (
            "after",
            "mk \"m-after\" \"echo $deps > $out\" [ g1 ]".into(),
        ),
        ("bad", "mk \"m-bad\" \"echo doomed; exit 3\" []".into()),
        ("dep", "mk \"m-dep\" \"echo $deps > $out\" [ bad ]".into()),
        ("ok", "mk \"m-ok\" \"echo fine > $out\" []".into()),
    ];
    let mut events = submit_graph(
        &farm,
        "metrics.nix",
        &bindings,
        &["after", "g2", "g3", "dep", "ok"],
    )
    .await?;
    for gate in ["go-1", "go-2", "go-3"] {
        wait_gate_starts(&farm, gate, 1)?;
    }
    // Everything that is not held has ended.
    while ["m-bad", "m-dep", "m-ok"].iter().any(|n| {
        !events
            .finished()
            .iter()
            .any(|f| drv_name(&f.drv_path) == *n)
    }) {
        events
            .until(GRAPH_TIMEOUT, |e| matches!(e, Ev::Finished(_)))
            .await?;
    }
    let started = events.started().len() as f64;
    ensure!(started == 5.0, "{}", events.render());

    // The moment is stable now: three builds held at their gates, m-after waiting.
    let during = scrape_until(
        &http,
        "every started job's dispatch latency observed",
        |e| e.sum("farm_dispatch_latency_seconds_count", &[]) == Some(started),
    )?;
    let status = farm.coordinator.status()?;
    check_outcomes(&during, &events, "during the graph")?;
    ensure!(during.get("farm_builds_finished_total", &[("outcome", "built")])? == 1.0);
    ensure!(during.get("farm_builds_finished_total", &[("outcome", "failed")])? == 1.0);
    ensure!(
        during.get(
            "farm_builds_finished_total",
            &[("outcome", "dependency_failed")]
        )? == 1.0
    );
    // Slots used = running jobs, as the gRPC status has them.
    let running = status.running.len() as f64;
    ensure!(running == 3.0, "Status: {status:?}");
    ensure!(
        during.get("farm_slots_used", &[("system", &system)])? == running,
        "{}",
        during.text
    );
    ensure!(during.get("farm_slots_used", &[])? == running);
    ensure!(during.get("farm_running_builds", &[])? == running);
    ensure!(during.get("farm_builder_running_jobs", &[])? == running);
    for b in &status.builders {
        let jobs = status
            .running
            .iter()
            .filter(|r| r.builder == b.name)
            .count() as f64;
        ensure!(
            during.get("farm_builder_running_jobs", &[("builder", &b.name)])? == jobs,
            "{}: {}",
            b.name,
            during.text
        );
        let load = b
            .load
            .clone()
            .context("a connected builder reports its load")?;
        ensure!(
            during.get(
                "farm_builder_memory_available_bytes",
                &[("builder", &b.name)]
            )? > 0.0
        );
        ensure!(load.memory_available_bytes > 0);
        ensure!(during.get("farm_builder_disk_free_bytes", &[("builder", &b.name)])? > 0.0);
        during.get("farm_builder_load1", &[("builder", &b.name)])?;
        ensure!(during.get("farm_builder_slots", &[("builder", &b.name)])? == 2.0);
    }
    ensure!(
        during.get("farm_builders", &[("state", "busy")])? == 2.0,
        "{}",
        during.text
    );
    ensure!(during.get("farm_slots", &[("system", &system)])? == 4.0);
    // The queue: m-after waits for m-gate-1; nothing runnable (a slot is free).
    let class = [("system", system.as_str()), ("features", "")];
    ensure!(
        during.get("farm_queue_waiting", &class)? == 1.0,
        "{}",
        during.text
    );
    ensure!(
        during.get("farm_queue_runnable", &class)? == 0.0,
        "{}",
        during.text
    );
    ensure!(during.get("farm_queue_depth", &[("system", &system)])? == 1.0);
    let queued: u32 = status.queue.iter().map(|q| q.queued).sum();
    ensure!(f64::from(queued) == 1.0, "Status: {status:?}");
    ensure!(during.get("farm_jobs_dispatched_total", &[])? == started);
    ensure!(
        during.get(
            "farm_build_duration_seconds_count",
            &[("outcome", "failed")]
        )? == 1.0
    );
    ensure!(during.get("farm_build_duration_seconds_count", &[("outcome", "built")])? == 1.0);
    ensure!(during.get("farm_submissions_total", &[])? == 1.0);
    ensure!(during.get("farm_submissions_active", &[])? == 1.0);
    // Builders and the test's client hold gRPC connections; nothing came over SSH.
    ensure!(during.get("farm_connections", &[("kind", "grpc")])? >= 2.0);
    ensure!(during.get("farm_connections_opened_total", &[("kind", "grpc")])? >= 2.0);
    ensure!(during.get("farm_connections", &[("kind", "ssh")])? == 0.0);
    ensure!(
        during
            .sum("farm_cache_served_paths_total", &[("via", "http")])
            .unwrap_or(0.0)
            == 0.0
    );
    ensure!(during.get("farm_cache_uploads_total", &[("result", "accepted")])? >= 2.0);
    ensure!(during.get("farm_cache_ingested_paths_total", &[])? >= 2.0);
    ensure!(
        during.get("farm_cache_paths", &[])?
            == during.get("farm_cache_ingested_paths_total", &[])?
    );
    ensure!(during.get("farm_state_flush_duration_seconds_count", &[])? >= 1.0);

    // A real Nix client substitutes m-ok's output from the cache: a narinfo
    // hit and a NAR over HTTP; asking for a gated build's output (not in the
    // cache yet) is a miss.
    let sub = substituter(&farm, logs)?;
    let ok_out = output_of(&events, "m-ok")?;
    sub.run_async("nix-store", &["--realise", &ok_out.to_string()])
        .await?;
    ensure!(sub.is_valid_path(&ok_out)?, "{ok_out} was not substituted");
    let hit = scrape(&http)?;
    ensure!(
        hit.get("farm_cache_narinfo_requests_total", &[("result", "hit")])? >= 1.0,
        "{}",
        hit.text
    );
    ensure!(
        hit.sum("farm_cache_narinfo_requests_total", &[("result", "miss")])
            .unwrap_or(0.0)
            == 0.0
    );
    ensure!(hit.get("farm_cache_served_paths_total", &[("via", "http")])? == 1.0);
    ensure!(hit.get("farm_cache_served_bytes_total", &[("via", "http")])? > 0.0);
    ensure!(
        hit.get(
            "farm_cache_download_duration_seconds_count",
            &[("via", "http")]
        )? == 1.0
    );
    // The gated m-gate-2's output path, from its derivation in the client's store.
    let g2_drv = events
        .started()
        .into_iter()
        .find(|s| drv_name(&s.drv_path) == "m-gate-2")
        .map(|s| s.drv_path.clone())
        .context("m-gate-2 started")?;
    let g2_out = farm
        .client
        .run("nix-store", &["-q", "--outputs", &g2_drv])?;
    let mut cmd = sub.command("nix-store");
    cmd.args(["--realise", g2_out.trim()]);
    let out = tracked_output(logs, "[substituter] nix-store --realise (absent)", &mut cmd)?;
    ensure!(!out.status.success(), "an absent path was realised");
    let miss = scrape(&http)?;
    ensure!(
        miss.get("farm_cache_narinfo_requests_total", &[("result", "miss")])? >= 1.0,
        "{}",
        miss.text
    );
    ensure!(
        miss.get("farm_cache_narinfo_requests_total", &[("result", "hit")])?
            == hit.get("farm_cache_narinfo_requests_total", &[("result", "hit")])?
    );

    // Release the gates: everything ends, and the counts are the graph's.
    for gate in ["go-1", "go-2", "go-3"] {
        std::fs::write(farm.witness_dir().join(gate), "")?;
    }
    let done = events.done(GRAPH_TIMEOUT).await?;
    ensure!(!done.success, "{}", events.render());
    let after = scrape_until(&http, "both builders idle again", |e| {
        e.sum("farm_builders", &[("state", "idle")]) == Some(2.0)
    })?;
    check_outcomes(&after, &events, "after the graph")?;
    let built = after.get("farm_builds_finished_total", &[("outcome", "built")])?;
    let failed = after.get("farm_builds_finished_total", &[("outcome", "failed")])?
        + after.get(
            "farm_builds_finished_total",
            &[("outcome", "dependency_failed")],
        )?;
    ensure!(
        built == f64::from(done.built) && built == 5.0,
        "{done:?}\n{}",
        after.text
    );
    ensure!(
        failed == f64::from(done.failed) && failed == 2.0,
        "{done:?}\n{}",
        after.text
    );
    ensure!(after.get("farm_build_duration_seconds_count", &[("outcome", "built")])? == 5.0);
    ensure!(after.get("farm_running_builds", &[])? == 0.0);
    ensure!(after.get("farm_slots_used", &[("system", &system)])? == 0.0);
    ensure!(after.sum("farm_queue_depth", &[]).unwrap_or(0.0) == 0.0);
    ensure!(after.get("farm_submissions_active", &[])? == 0.0);
    ensure!(after.get("farm_jobs_dispatched_total", &[])? == 6.0);
    ensure!(after.get("farm_build_requeues_total", &[])? == 0.0);

    // A Nix client over the SSH endpoint: one connection, one daemon session,
    // both closed again once it is done.
    let mut ping = farm.client_command("nix")?;
    ping.args(["store", "ping", "--store", &farm.store_uri("ssh-ng")]);
    farm.client.run_command(ping)?;
    let ssh = scrape_until(&http, "the SSH connection closed", |e| {
        e.sum("farm_connections", &[("kind", "ssh")]) == Some(0.0)
            && e.sum("farm_nix_sessions", &[("protocol", "daemon")]) == Some(0.0)
    })?;
    ensure!(ssh.get("farm_connections_opened_total", &[("kind", "ssh")])? >= 1.0);
    ensure!(ssh.get("farm_nix_sessions_started_total", &[("protocol", "daemon")])? == 1.0);
    ensure!(ssh.get("farm_nix_sessions_started_total", &[("protocol", "serve")])? == 0.0);

    let status = farm.coordinator.status()?;
    ensure!(status.running.is_empty(), "Status: {status:?}");
    ensure!(
        status
            .builders
            .iter()
            .all(|b| b.state == v1::BuilderState::Idle as i32),
        "Status: {status:?}"
    );
    Ok(())
}

// ───────────────────────────── the Grafana board ─────────────────────────────

/// PromQL words that are not metric names: keywords, and the aggregation
/// operators (which may be followed by `by (…)` rather than `(`).
const PROMQL_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];

/// The metric names a PromQL expression selects: identifiers outside label
/// matchers, ranges, strings and grouping clauses that are not functions
/// (followed by `(`), keywords, Grafana variables or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Strings, `{…}` matchers and `[…]` ranges out.
    let mut flat = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_str: Option<char> = None;
    for c in expr.chars() {
        if let Some(q) = in_str {
            if c == q {
                in_str = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => in_str = Some(c),
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => flat.push(c),
        }
        if matches!(c, '{' | '}' | '[' | ']') {
            flat.push(' ');
        }
    }
    let chars: Vec<char> = flat.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' {
            // A Grafana variable: `$name` or `${name}` (the braces are gone).
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = j < chars.len() && chars[j] == '(';
            let is_word = PROMQL_WORDS.contains(&word.as_str());
            if is_word
                && call
                && matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                )
            {
                // Its parenthesised label list names labels, not metrics.
                skip_group = true;
            } else if !call && !is_word && !skip_group {
                out.insert(word);
            }
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            // Numbers (and durations such as 5m after a digit).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c == ')' && skip_group {
            skip_group = false;
        }
        i += 1;
    }
    out
}

/// Every query of the board: panel targets (rows' panels too) and template variables.
fn board_queries(board: &serde_json::Value) -> anyhow::Result<Vec<(String, String)>> {
    fn panels(list: &serde_json::Value, out: &mut Vec<(String, String)>) -> anyhow::Result<()> {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            if p["type"] == "row" {
                panels(&p["panels"], out)?;
                continue;
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            ensure!(!targets.is_empty(), "panel {title:?} has no query");
            for t in targets {
                let expr = t["expr"]
                    .as_str()
                    .with_context(|| format!("panel {title:?}: a target without expr"))?;
                out.push((title.clone(), expr.to_string()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    panels(&board["panels"], &mut out)?;
    for v in board["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .with_context(|| format!("variable {}: no query", v["name"]))?;
        // label_values(METRIC, LABEL): the metric is the first argument.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .map(|(m, _)| m.to_string())
            .with_context(|| format!("variable {}: not label_values(…): {q}", v["name"]))?;
        out.push((format!("variable {}", v["name"]), inner));
    }
    Ok(out)
}

/// What in `queries` names a metric not in `exported`.
fn unknown_metrics(queries: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    let mut bad = Vec::new();
    for (title, expr) in queries {
        for name in metric_names(expr) {
            if !exported.contains(&name) {
                bad.push(format!("{title:?} queries {name} ({expr})"));
            }
        }
    }
    bad
}

#[test]
fn every_grafana_panel_queries_an_exported_metric() -> anyhow::Result<()> {
    let logs = TestLogs::new("metrics_grafana")?;
    deadline(DEADLINE, &logs, |logs| {
        // A coordinator alone, as a fresh farm has it: every family is
        // declared before anything happened.
        let farm = Farm::setup(&logs).start()?;
        let exported = scrape(&farm.coordinator.endpoints.http)?.names();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/grafana/nix-farm.json");
        let board: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        ensure!(
            board["title"].is_string() && board["uid"].is_string(),
            "not a dashboard"
        );
        let queries = board_queries(&board)?;
        ensure!(queries.len() >= 15, "only {} queries", queries.len());
        let bad = unknown_metrics(&queries, &exported);
        ensure!(
            bad.is_empty(),
            "metrics the coordinator does not export:\n{}",
            bad.join("\n")
        );
        // Each query names at least one metric, and the check can fail.
        for (title, expr) in &queries {
            ensure!(
                !metric_names(expr).is_empty(),
                "{title:?}: no metric in {expr}"
            );
        }
        let wrong = [(
            "a panel".to_string(),
            "sum(rate(farm_builds_finsihed_total[5m]))".to_string(),
        )];
        ensure!(
            unknown_metrics(&wrong, &exported).len() == 1,
            "a misspelt metric went unnoticed"
        );
        Ok(())
    })
}

#[test]
fn promql_metric_names_are_extracted() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (le) (rate(farm_dispatch_latency_seconds_bucket{job=~\"$job\"}[$__rate_interval])))"
        ),
        ["farm_dispatch_latency_seconds_bucket"]
    );
    assert_eq!(
        names(
            "sum(rate(farm_cache_narinfo_requests_total{result=\"hit\"}[5m])) / sum(rate(farm_cache_narinfo_requests_total[5m]))"
        ),
        ["farm_cache_narinfo_requests_total"]
    );
    assert_eq!(
        names("farm_slots_used / on(system) group_left farm_slots > 0.5"),
        ["farm_slots", "farm_slots_used"]
    );
    assert_eq!(names("1 - farm_builder_up"), ["farm_builder_up"]);
}
