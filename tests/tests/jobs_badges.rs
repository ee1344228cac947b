//! Named jobs and their badges end to end, with real Nix and the real farm
//! binaries: `farm build --job ci/app` of a graph that builds, then of one
//! that fails, then of one held at a gate; `farm jobs` and `farm jobs ci/app`
//! (JSON) and `GET /badge/ci/app.svg` / `.json` after each (the SVG parsed:
//! its text nodes and the colour of its right half), and while the gated
//! build runs. The history is bounded (`--job-history 2`), an unknown job's
//! badge is `unknown` (200), a malformed name is refused by the CLI and by
//! the coordinator with nothing recorded, and the history survives a
//! `kill -9` of the coordinator.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use farm_proto::v1;
use farm_tests::fixture::{BuilderSpec, Farm, graph_expr};
use farm_tests::{TestLogs, deadline};

/// The test's hang-guard.
const DEADLINE: Duration = Duration::from_secs(400);
/// How long a wait for one state may take.
const WAIT: Duration = Duration::from_secs(120);

#[test]
fn jobs_and_badges() -> anyhow::Result<()> {
    let logs = TestLogs::new("jobs_badges")?;
    deadline(DEADLINE, &logs, |logs| scenario(&logs))
}

/// An HTTP answer: status, headers (lower-case names), body.
type Answer = (u16, Vec<(String, String)>, String);

/// `GET target` from `addr` over HTTP/1.1.
fn get(addr: &str, target: &str) -> anyhow::Result<Answer> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no end of headers")?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .context("status line")?
        .parse()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    ensure!(
        !head.to_ascii_lowercase().contains("chunked"),
        "chunked answer to {target}"
    );
    Ok((status, headers, body.to_owned()))
}

/// What a badge SVG shows: its text nodes (each `<text>`'s content, in
/// order) and the fill of every `<rect>`, parsed as XML.
fn parse_svg(svg: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(svg);
    let (mut texts, mut fills) = (Vec::new(), Vec::new());
    let mut in_text = false;
    let mut root_seen = false;
    loop {
        match reader.read_event()? {
            Event::Start(e) | Event::Empty(e) if !root_seen => {
                ensure!(e.name().as_ref() == b"svg", "the root is not <svg>: {svg}");
                root_seen = true;
            }
            Event::Start(e) if e.name().as_ref() == b"text" => {
                in_text = true;
                texts.push(String::new());
            }
            Event::End(e) if e.name().as_ref() == b"text" => in_text = false,
            Event::Text(t) if in_text => {
                texts.last_mut().context("text")?.push_str(&t.decode()?);
            }
            Event::Empty(e) if e.name().as_ref() == b"rect" => {
                if let Some(a) = e.try_get_attribute("fill")? {
                    fills.push(a.unescape_value()?.into_owned());
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    ensure!(root_seen, "no <svg>: {svg}");
    Ok((texts, fills))
}

/// The badge of `job` (as it goes in the URL) as (texts, right-half
/// colour), checked to be a 200 SVG nobody caches, and the endpoint JSON's
/// (message, colour), checked to name the job.
fn badge(
    farm: &Farm,
    url_name: &str,
    job: &str,
) -> anyhow::Result<(Vec<String>, String, (String, String))> {
    let http = &farm.coordinator.endpoints.http;
    let (status, headers, body) = get(http, &format!("/badge/{url_name}.svg"))?;
    ensure!(status == 200, "badge of {url_name}: {status} {body}");
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    ensure!(
        header("content-type").starts_with("image/svg+xml"),
        "{headers:?}"
    );
    ensure!(header("cache-control") == "no-cache", "{headers:?}");
    let (texts, fills) = parse_svg(&body)?;
    // Each half's text twice (its shadow, then itself): label, message.
    ensure!(texts.len() == 4, "{texts:?} in {body}");
    ensure!(texts[0] == job && texts[1] == job, "{texts:?}");
    ensure!(texts[2] == texts[3], "{texts:?}");
    // The rounded clip, the grey label, the coloured message, the gradient.
    ensure!(
        fills.len() == 4 && fills[0] == "#fff" && fills[1] == "#555" && fills[3] == "url(#s)",
        "{fills:?}"
    );
    let (status, _, json) = get(http, &format!("/badge/{url_name}.json"))?;
    ensure!(status == 200, "{status} {json}");
    let v: serde_json::Value = serde_json::from_str(&json)?;
    ensure!(v["schemaVersion"] == 1 && v["label"] == job, "{v}");
    Ok((
        vec![texts[2].clone()],
        fills[2].clone(),
        (
            v["message"].as_str().unwrap_or("").to_owned(),
            v["color"].as_str().unwrap_or("").to_owned(),
        ),
    ))
}

/// Asserts the badge of `ci/app` says `message` in `colour` (SVG) and
/// `json_colour` (endpoint), under both spellings of the name in the URL.
fn assert_badge(farm: &Farm, message: &str, colour: &str, json_colour: &str) -> anyhow::Result<()> {
    for url_name in ["ci/app", "ci%2Fapp"] {
        let (texts, fill, (m, c)) = badge(farm, url_name, "ci/app")?;
        ensure!(
            texts == [message],
            "{url_name}: {texts:?}, wanted {message}"
        );
        ensure!(fill == colour, "{url_name}: {fill}, wanted {colour}");
        ensure!(
            (m.as_str(), c.as_str()) == (message, json_colour),
            "{url_name}: {m} {c}"
        );
    }
    Ok(())
}

fn json(out: &std::process::Output) -> anyhow::Result<serde_json::Value> {
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "not JSON: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `farm jobs --json` and `farm jobs ci/app --json`.
fn jobs(farm: &Farm) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    let list = farm.run(None, &["jobs", "--json"])?;
    ensure!(list.status.code() == Some(0), "farm jobs failed");
    let one = farm.run(None, &["jobs", "ci/app", "--json"])?;
    ensure!(one.status.code() == Some(0), "farm jobs ci/app failed");
    Ok((json(&list)?, json(&one)?))
}

fn scenario(logs: &TestLogs) -> anyhow::Result<()> {
    let mut farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "b1",
            max_jobs: 2,
            conf: &[],
        }],
        &["--job-history", "2"],
    )?;
    farm.wait_for_builders(None, 1)?;
    let salt = farm.client.root().display().to_string();

    // Before any run: unknown, grey, 200.
    assert_badge(&farm, "unknown", "#9f9f9f", "lightgrey")?;

    // 1. A graph that builds.
    let good = farm
        .client
        .write_file("good.nix", &graph_expr(3, 0.0, &salt, None))?
        .display()
        .to_string();
    let out = farm.run(
        None,
        &["build", &good, "-A", "all", "--job", "ci/app", "--json"],
    )?;
    ensure!(out.status.code() == Some(0), "the good graph did not build");
    let built = json(&out)?;
    let want_outputs: BTreeSet<String> = built["derivations"]
        .as_array()
        .context("derivations")?
        .iter()
        .filter(|d| d["requested"] == true)
        .filter_map(|d| d["outputs"]["out"].as_str().map(str::to_owned))
        .collect();
    ensure!(want_outputs.len() == 3, "{built}");
    let (list, one) = jobs(&farm)?;
    let listed = list["jobs"].as_array().context("jobs")?;
    ensure!(listed.len() == 1, "{list}");
    let j = &listed[0];
    ensure!(j["name"] == "ci/app" && j["state"] == "succeeded", "{list}");
    ensure!(j["outputs"] == 3 && j["runs"] == 1, "{list}");
    ensure!(
        j["submission_id"] == built["submission_id"],
        "{list} vs {built}"
    );
    ensure!(j["started"].is_i64() && j["finished"].is_i64(), "{list}");
    ensure!(j["duration_secs"].is_u64(), "{list}");
    let runs = one["runs"].as_array().context("runs")?;
    ensure!(runs.len() == 1 && runs[0]["state"] == "succeeded", "{one}");
    let got: BTreeSet<String> = runs[0]["outputs"]
        .as_array()
        .context("outputs")?
        .iter()
        .filter_map(|o| o.as_str().map(str::to_owned))
        .collect();
    ensure!(got == want_outputs, "{got:?} vs {want_outputs:?}");
    ensure!(runs[0]["built"] == 3 && runs[0]["failed"] == 0, "{one}");
    assert_badge(&farm, "passing", "#4c1", "brightgreen")?;

    // 2. The same job, a failing graph.
    let bad = farm
        .client
        .write_file(
            "bad.nix",
            &graph_expr(3, 0.0, &format!("{salt}-bad"), Some(1)),
        )?
        .display()
        .to_string();
    let out = farm.run(None, &["build", &bad, "-A", "all", "--job", "ci/app"])?;
    ensure!(out.status.code() == Some(1), "the bad graph did not fail");
    let (list, one) = jobs(&farm)?;
    ensure!(list["jobs"][0]["state"] == "failed", "{list}");
    let runs = one["runs"].as_array().context("runs")?;
    let states: Vec<&str> = runs.iter().filter_map(|r| r["state"].as_str()).collect();
    ensure!(states == ["failed", "succeeded"], "newest first: {one}");
    ensure!(runs[0]["failed"].as_u64() >= Some(1), "{one}");
    assert_badge(&farm, "failing", "#e05d44", "red")?;

    // 3. While a build runs: building. It waits for a file the test makes.
    let open = farm.witness_dir().join("open");
    let gated = format!(
        "derivation {{ name = \"gated\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [ \"-c\" {} ]; }}\n",
        farm_tests::nix_string(&format!(
            "while [ ! -e {} ]; do /bin/sleep 0.1; done; echo {salt} > $out",
            open.display()
        ))
    );
    let gated = farm
        .client
        .write_file("gated.nix", &gated)?
        .display()
        .to_string();
    let mut child = farm.spawn_farm(
        "farm build --job ci/app gated",
        None,
        &["build", &gated, "--job", "ci/app", "--json"],
    )?;
    let until = Instant::now() + WAIT;
    loop {
        let (list, _) = jobs(&farm)?;
        if list["jobs"][0]["state"] == "building" {
            ensure!(list["jobs"][0]["finished"].is_null(), "{list}");
            break;
        }
        ensure!(child.try_wait()?.is_none(), "the gated build ended early");
        ensure!(
            Instant::now() < until,
            "the job never showed building: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_badge(&farm, "building", "#dfb317", "yellow")?;
    std::fs::write(&open, "")?;
    let status = child.wait_exit(WAIT)?;
    ensure!(
        status.code() == Some(0),
        "the gated build failed: {}",
        child.output()
    );
    assert_badge(&farm, "passing", "#4c1", "brightgreen")?;

    // The history is bounded: 3 runs, the 2 newest kept.
    let (list, one) = jobs(&farm)?;
    let states: Vec<&str> = one["runs"]
        .as_array()
        .context("runs")?
        .iter()
        .filter_map(|r| r["state"].as_str())
        .collect();
    ensure!(states == ["succeeded", "failed"], "{one}");
    ensure!(list["jobs"][0]["runs"] == 2, "{list}");

    // 4. Another job's name no job has: unknown.
    let http = farm.coordinator.endpoints.http.clone();
    let (texts, fill, (m, c)) = badge(&farm, "nope/never", "nope/never")?;
    ensure!(
        texts == ["unknown"] && fill == "#9f9f9f",
        "{texts:?} {fill}"
    );
    ensure!(m == "unknown" && c == "lightgrey", "{m} {c}");
    // Not job names: refused, not shown.
    for target in [
        "/badge/ci/../app.svg",
        "/badge/ci/%2E%2E/app.svg",
        "/badge/a%20b.svg",
        "/badge/%3Cscript%3E.svg",
        "/badge/ci/app",
        "/badge/.svg",
    ] {
        let (status, _, body) = get(&http, target)?;
        ensure!(status == 400, "{target}: {status} {body}");
    }

    // 5. Malformed names: the CLI refuses before evaluating anything, the
    // coordinator refuses a raw Submit; nothing is recorded.
    let before = jobs(&farm)?;
    for name in ["bad name", "../etc", "ci//app", &"x".repeat(129), "<b>"] {
        let out = farm.run(None, &["build", &good, "-A", "all", "--job", name])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(2), "{name}: {stderr}");
        ensure!(stderr.contains("job name"), "{name}: {stderr}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let drv = built["derivations"][0]["drv_path"]
        .as_str()
        .context("a drv")?
        .to_owned();
    let refused = rt.block_on(async {
        let mut client = farm.farm_client().await?;
        anyhow::Ok(
            client
                .submit(v1::SubmitRequest {
                    drv_paths: vec![drv.clone()],
                    job: "ci/../app".into(),
                    ..Default::default()
                })
                .await
                .err(),
        )
    })?;
    let refused = refused.context("a Submit with a malformed job name was accepted")?;
    ensure!(
        refused.code() == tonic::Code::InvalidArgument && refused.message().contains("job name"),
        "{refused:?}"
    );
    ensure!(jobs(&farm)? == before, "a refused name changed the jobs");

    // 6. The history outlives the coordinator (kill -9: only what was flushed).
    farm.coordinator.kill_and_restart(logs)?;
    let after = jobs(&farm)?;
    ensure!(
        after == before,
        "after a restart: {after:?}\nbefore: {before:?}"
    );
    assert_badge(&farm, "passing", "#4c1", "brightgreen")?;
    Ok(())
}
