//! The web dashboard end to end, in a real headless Chromium driven over the
//! DevTools protocol (a minimal client over a websocket, below), on a real
//! coordinator with two real builders running a graph: a build that prints
//! a line every 0.2 s until its gate opens (running when looked at), one held
//! at a gate, one waiting on it, one that fails.
//!
//! The browser logs in as admin with the link `farm dashboard` prints, sees
//! both builders, the running build and the failure, opens the running build
//! and sees its live log grow with no reload (the same document: a marker
//! set on `window` survives and the navigation count stays 1), then its
//! outputs once it is let through; it drains and undrains a builder with the
//! page's own toggle. Screenshots of both pages go to `docs/`.
//!
//! And the admin login's refusals, over plain HTTP, each checked to change
//! nothing (the builder stays undrained): a viewer's drain, a login token
//! used twice, an expired one, a GET of the login link (which logs nobody
//! in and leaves the token usable), a drain without the CSRF token, with a
//! foreign or no `Origin`, and a login POST from a foreign `Origin`; and
//! `farm dashboard` with a non-admin key gets no link.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use farm_proto::v1::build_event::Event as Ev;
use farm_tests::fixture::*;
use farm_tests::{FarmProcess, TestLogs, deadline_async};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// The whole test's hang-guard.
const TEST_DEADLINE: Duration = Duration::from_secs(420);
/// Longest wait for the page to show something.
const PAGE_WAIT: Duration = Duration::from_secs(30);

// ───────────────────────────── DevTools protocol ─────────────────────────────

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium and one page of it, attached over the DevTools protocol.
struct Browser {
    _process: FarmProcess,
    _profile: tempfile::TempDir,
    ws: Ws,
    next_id: u64,
    session: String,
}

impl Browser {
    async fn launch(logs: &TestLogs) -> anyhow::Result<Browser> {
        let profile = tempfile::Builder::new()
            .prefix("farm-e2e-chromium-")
            .tempdir()?;
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--window-size=1440,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null());
        let process = FarmProcess::spawn(logs, "chromium", cmd)?;
        // Chromium writes its DevTools port and browser path here once listening.
        let port_file = profile.path().join("DevToolsActivePort");
        wait_for_file(&port_file, PAGE_WAIT).context("chromium's DevTools endpoint")?;
        let text = loop {
            let t = std::fs::read_to_string(&port_file)?;
            if t.lines().count() >= 2 {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut lines = text.lines();
        let port = lines.next().context("port line")?.trim().to_owned();
        let path = lines.next().context("path line")?.trim().to_owned();
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let mut b = Browser {
            _process: process,
            _profile: profile,
            ws,
            next_id: 0,
            session: String::new(),
        };
        let target = b
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        b.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        b.call("Page.enable", json!({})).await?;
        b.call("Runtime.enable", json!({})).await?;
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1440, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        Ok(b)
    }

    /// One command (on the page's session once attached); its result.
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).await?;
        loop {
            let m = tokio::time::timeout(PAGE_WAIT, self.ws.next())
                .await
                .with_context(|| format!("no answer to {method}"))?
                .context("the DevTools connection closed")??;
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["id"].as_u64() != Some(id) {
                continue; // an event
            }
            if let Some(e) = v.get("error") {
                bail!("{method}: {e}");
            }
            return Ok(v["result"].clone());
        }
    }

    /// Evaluates `expr` in the page (promises awaited); its value as JSON.
    async fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expr` until it is `true`; fails after [`PAGE_WAIT`] with
    /// what the page showed and the last evaluation error, if any. An error
    /// is "not yet": while a navigation loads, `document.body` is null and
    /// the old execution context is gone.
    async fn wait_for(&mut self, what: &str, expr: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + PAGE_WAIT;
        let mut last_error = None;
        loop {
            match self.eval(expr).await {
                Ok(Value::Bool(true)) => return Ok(()),
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            }
            if Instant::now() >= deadline {
                let shown = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await
                    .unwrap_or_default();
                bail!(
                    "the page did not show {what} within {PAGE_WAIT:?}; it shows:\n{}{}",
                    shown.as_str().unwrap_or_default(),
                    last_error
                        .map(|e| format!("\nlast evaluation error: {e:#}"))
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        self.call("Page.navigate", json!({ "url": url })).await?;
        Ok(())
    }

    async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": false }),
            )
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().context("screenshot data")?)?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

// ───────────────────────────── plain HTTP ─────────────────────────────

/// An HTTP/1.1 answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request to `addr` (`host:port`, also the `Host`), `Connection: close`.
async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Answer> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(PAGE_WAIT, s.read_to_end(&mut raw))
        .await
        .context("no HTTP answer")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// A login token from `farm dashboard` (signed with `admin`), and its link.
fn login_link(farm: &Farm, admin: &Path, expires: u32) -> anyhow::Result<(String, String)> {
    let out = farm.run(
        Some(admin),
        &["dashboard", "--expires-in", &expires.to_string()],
    )?;
    ensure!(
        out.status.success(),
        "farm dashboard: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout)?.trim().to_owned();
    let token = url
        .split_once("/login?token=")
        .map(|(_, t)| t.to_owned())
        .with_context(|| format!("not a login link: {url}"))?;
    ensure!(token.len() >= 32, "a short token: {url}");
    Ok((url, token))
}

/// Exchanges a token by the login POST; the answer.
async fn exchange(http: &str, origin: &str, token: &str) -> anyhow::Result<Answer> {
    request(
        http,
        "POST",
        "/login",
        &[("Origin", origin)],
        &json!({ "token": token }).to_string(),
    )
    .await
}

/// Every builder's state per `farm status --json`.
fn builder_states(farm: &Farm, key: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let s = farm.status(Some(key))?;
    Ok(s["builders"]
        .as_array()
        .context("builders")?
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or_default().to_owned(),
                b["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

fn ensure_not_drained(farm: &Farm, key: &Path, after: &str) -> anyhow::Result<()> {
    let states = builder_states(farm, key)?;
    ensure!(
        states.iter().all(|(_, s)| s != "draining"),
        "after {after}: a builder is draining: {states:?}"
    );
    Ok(())
}

/// Where the screenshots go: the test's log directory (printed with the
/// logs), or the repository's `docs/` when `FARM_UPDATE_SCREENSHOTS=1`, so an
/// ordinary run never rewrites tracked files.
fn screenshot_dir(logs: &TestLogs) -> PathBuf {
    if std::env::var_os("FARM_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
    } else {
        logs.dir().to_path_buf()
    }
}

// ───────────────────────────── the test ─────────────────────────────

#[test]
fn dashboard_in_headless_chromium() -> anyhow::Result<()> {
    let logs = TestLogs::new("dashboard")?;
    deadline_async(TEST_DEADLINE, &logs, |logs| async move {
        dashboard(&logs).await
    })
}

async fn dashboard(logs: &TestLogs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("dashboard: {what} at {:.1?}", t0.elapsed());
    // `viewer` may read and build; `admin` may also drain.
    let access = SshAccess::named(&["viewer"], &["admin"])?;
    let (viewer, admin) = (access.keys[0].clone(), access.admin_keys[0].clone());
    let farm = Farm::setup(logs)
        .builders(&[
            BuilderSpec {
                name: "d-one",
                max_jobs: 2,
                conf: &["system-features ="],
            },
            BuilderSpec {
                name: "d-two",
                max_jobs: 2,
                conf: &["system-features ="],
            },
        ])
        .access(&access)
        .start()?;
    farm.wait_for_builders(Some(&viewer), 2)?;
    step("farm up");
    let http = farm.coordinator.endpoints.http.clone();
    let origin = format!("http://{http}");

    let bindings: Vec<(&str, String)> = vec![
        (
            "tick",
            "mk \"d-ticker\" (\"i=0; while [ ! -e \" + witness + \"/go-tick ]; do i=$((i+1)); echo tick-line-$i; /bin/sleep 0.2; done; echo ticked > $out\") []".into(),
        ),
        (
            "held",
            "mk \"d-held\" (gate \"go-held\" + \"echo held > $out\") []".into(),
        ),
        ("after", "mk \"d-after\" \"echo $deps > $out\" [ held ]".into()),
        (
            "bad",
            "mk \"d-doomed\" \"echo this build is doomed; exit 3\" []".into(),
        ),
    ];
    let mut events =
        submit_graph(&farm, "dashboard.nix", &bindings, &["tick", "after", "bad"]).await?;
    wait_gate_starts(&farm, "go-held", 1)?;
    while !events
        .finished()
        .iter()
        .any(|f| drv_name(&f.drv_path) == "d-doomed")
    {
        events
            .until(GRAPH_TIMEOUT, |e| matches!(e, Ev::Finished(_)))
            .await?;
    }
    let ticker = loop {
        if let Some(s) = events
            .started()
            .into_iter()
            .find(|s| drv_name(&s.drv_path) == "d-ticker")
        {
            break s.build_id.clone();
        }
        events
            .until(GRAPH_TIMEOUT, |e| matches!(e, Ev::Started(_)))
            .await?;
    };

    step("graph running");
    // ── the browser, logged in as admin with `farm dashboard`'s link ──
    let mut b = Browser::launch(logs).await?;
    let (link, _) = login_link(&farm, &admin, 120)?;
    b.navigate(&link).await?;
    b.wait_for(
        "the overview, logged in as admin",
        "location.pathname === '/' && document.body.dataset.page === 'overview' \
         && document.getElementById('who').innerText.includes('admin')",
    )
    .await?;
    ensure!(
        b.eval("location.search").await? == json!(""),
        "the token stayed in the address"
    );
    b.wait_for(
        "both builders",
        "[...document.querySelectorAll('#builders tr[data-builder]')].map(r => r.dataset.builder).sort().join() === 'd-one,d-two'",
    )
    .await?;
    b.wait_for(
        "the running build",
        "[...document.querySelectorAll('#running a.build-link')].some(a => a.innerText.includes('d-ticker'))",
    )
    .await?;
    b.wait_for(
        "the failed build in recent failures",
        "document.getElementById('failures') !== null && document.getElementById('failures').innerText.includes('d-doomed')",
    )
    .await?;
    b.wait_for(
        "the queue's waiting build and why",
        "document.getElementById('queue') !== null && document.getElementById('queue').innerText.includes('waiting for its dependencies')",
    )
    .await?;
    b.wait_for(
        "the submission's progress",
        "document.getElementById('submissions') !== null && document.getElementById('submissions').innerText.includes('1 failed')",
    )
    .await?;
    step("overview seen");
    // Let the elapsed times and the load tick once before the picture.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.screenshot(&screenshot_dir(logs).join("dashboard-overview.png"))
        .await?;

    // ── the running build's page: the log grows in the same document ──
    b.eval("window.__farmMarker = 'same document'; true")
        .await?;
    let navigations = b
        .eval("performance.getEntriesByType('navigation').length")
        .await?;
    ensure!(navigations == json!(1), "navigations: {navigations}");
    b.eval(
        "[...document.querySelectorAll('#running a.build-link')].find(a => a.innerText.includes('d-ticker')).click(); true",
    )
    .await?;
    b.wait_for(
        "the build page with some log",
        &format!(
            "document.body.dataset.page === 'build' && location.hash === '#/build/{ticker}' \
             && document.getElementById('log') !== null && document.getElementById('log').innerText.includes('tick-line-')"
        ),
    )
    .await?;
    let lines = "document.getElementById('log').innerText.split('\\n').filter(l => l.startsWith('tick-line-')).length";
    let first = b.eval(lines).await?.as_u64().context("line count")?;
    b.wait_for("the log growing", &format!("{lines} >= {} ", first + 5))
        .await?;
    let later = b.eval(lines).await?.as_u64().context("line count")?;
    ensure!(later > first, "the log did not grow: {first} then {later}");
    ensure!(
        b.eval("window.__farmMarker").await? == json!("same document"),
        "the page was reloaded"
    );
    ensure!(
        b.eval("performance.getEntriesByType('navigation').length")
            .await?
            == navigations,
        "a navigation happened"
    );
    b.wait_for(
        "the build's builder and state",
        "document.querySelector('h1 .pill') !== null && document.querySelector('h1 .pill').innerText === 'running'",
    )
    .await?;
    step("log grew");
    b.screenshot(&screenshot_dir(logs).join("dashboard-build.png"))
        .await?;

    // Let it through: the page shows it built, with its output, still the same document.
    std::fs::write(farm.witness_dir().join("go-tick"), "")?;
    b.wait_for(
        "the build built with its output",
        "document.querySelector('h1 .pill').innerText === 'built' \
         && document.getElementById('outputs').innerText.includes('/nix/store/') \
         && document.getElementById('log-state').textContent === 'complete'",
    )
    .await?;
    ensure!(b.eval("window.__farmMarker").await? == json!("same document"));
    let log = b.eval("document.getElementById('log').innerText").await?;
    let log = log.as_str().unwrap_or_default();
    ensure!(
        log.contains("tick-line-1\n"),
        "the log lost its start: {log}"
    );

    step("build done in the page");
    // ── the admin's drain toggle, from the page ──
    b.eval("location.hash = '#/'; true").await?;
    b.wait_for(
        "the drain toggle",
        "document.querySelector('button.drain[data-builder=\"d-two\"]') !== null",
    )
    .await?;
    b.eval("document.querySelector('button.drain[data-builder=\"d-two\"]').click(); true")
        .await?;
    wait_state(&farm, &viewer, "d-two", "draining")?;
    b.wait_for(
        "the undrain toggle",
        "document.querySelector('button.drain.on[data-builder=\"d-two\"]') !== null",
    )
    .await?;
    b.eval("document.querySelector('button.drain.on[data-builder=\"d-two\"]').click(); true")
        .await?;
    wait_state(&farm, &viewer, "d-two", "")?;

    step("page drain toggled");
    // ── refusals, each changing nothing ──
    // A non-admin key gets no login link.
    let out = farm.run(Some(&viewer), &["dashboard"])?;
    ensure!(
        out.status.code() == Some(3) && out.stdout.is_empty(),
        "a viewer's farm dashboard: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("--admin-keys"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drain_body = json!({ "draining": true }).to_string();
    let drain_path = "/api/builders/d-one/drain";
    // A read-only viewer (no session): refused.
    let a = request(
        &http,
        "POST",
        drain_path,
        &[("Origin", &origin)],
        &drain_body,
    )
    .await?;
    ensure!(a.status == 403, "a viewer's drain: {} {}", a.status, a.body);
    ensure_not_drained(&farm, &viewer, "a viewer's drain")?;
    let s = request(&http, "GET", "/api/session", &[], "").await?;
    ensure!(s.body.contains("\"admin\":false"), "{}", s.body);

    // GET of the login link logs nobody in and does not use the token up.
    let (_, token) = login_link(&farm, &admin, 120)?;
    let g = request(&http, "GET", &format!("/login?token={token}"), &[], "").await?;
    ensure!(g.status == 200, "GET /login: {}", g.status);
    ensure!(
        g.header("set-cookie").is_none(),
        "GET /login set a cookie: {:?}",
        g.headers
    );
    // A login POST from another site: refused, and the token still works after.
    let foreign = exchange(&http, "http://evil.example", &token).await?;
    ensure!(foreign.status == 403, "a foreign login: {}", foreign.status);
    ensure!(foreign.header("set-cookie").is_none());
    let ok = exchange(&http, &origin, &token).await?;
    ensure!(ok.status == 200, "login: {} {}", ok.status, ok.body);
    let cookie = ok
        .header("set-cookie")
        .context("no session cookie")?
        .to_owned();
    ensure!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap_or_default().to_owned();
    let csrf = serde_json::from_str::<Value>(&ok.body)?["csrf"]
        .as_str()
        .context("csrf")?
        .to_owned();
    // The same token again: refused.
    let again = exchange(&http, &origin, &token).await?;
    ensure!(again.status == 403, "a token used twice: {}", again.status);
    ensure!(again.header("set-cookie").is_none());
    // An expired token: refused.
    let (_, short) = login_link(&farm, &admin, 1)?;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let expired = exchange(&http, &origin, &short).await?;
    ensure!(
        expired.status == 403,
        "an expired token: {}",
        expired.status
    );
    // A made-up token: refused.
    let forged = exchange(&http, &origin, &"0".repeat(64)).await?;
    ensure!(forged.status == 403, "a forged token: {}", forged.status);

    // The session without its CSRF token, with a wrong one, from another
    // origin, with no origin: refused.
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "no CSRF token",
            vec![("Cookie", &cookie), ("Origin", &origin)],
        ),
        (
            "a wrong CSRF token",
            vec![
                ("Cookie", &cookie),
                ("Origin", &origin),
                ("X-CSRF-Token", "0123"),
            ],
        ),
        (
            "a foreign Origin",
            vec![
                ("Cookie", &cookie),
                ("Origin", "http://evil.example"),
                ("X-CSRF-Token", &csrf),
            ],
        ),
        (
            "no Origin",
            vec![("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        ),
        (
            "the CSRF token without the session",
            vec![("Origin", &origin), ("X-CSRF-Token", &csrf)],
        ),
    ];
    for (what, headers) in &cases {
        let a = request(&http, "POST", drain_path, headers, &drain_body).await?;
        ensure!(a.status == 403, "{what}: {} {}", a.status, a.body);
        ensure_not_drained(&farm, &viewer, what)?;
    }
    // Everything right: the drain happens (so the refusals were the checks).
    let a = request(
        &http,
        "POST",
        drain_path,
        &[
            ("Cookie", &cookie),
            ("Origin", &origin),
            ("X-CSRF-Token", &csrf),
        ],
        &drain_body,
    )
    .await?;
    ensure!(
        a.status == 200,
        "the admin's drain: {} {}",
        a.status,
        a.body
    );
    wait_state(&farm, &viewer, "d-one", "draining")?;

    step("refusals checked");
    // Done: let the held build through and the graph finish.
    std::fs::write(farm.witness_dir().join("go-held"), "")?;
    let done = events.done(GRAPH_TIMEOUT).await?;
    ensure!(!done.success && done.failed == 1, "{done:?}");
    Ok(())
}

/// Waits until `builder` is in `state` (`""`: any but draining).
fn wait_state(farm: &Farm, key: &Path, builder: &str, state: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let states = builder_states(farm, key)?;
        let now = states
            .iter()
            .find(|(n, _)| n == builder)
            .map(|(_, s)| s.as_str());
        let ok = match state {
            "" => now.is_some_and(|s| s != "draining"),
            s => now == Some(s),
        };
        if ok {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{builder} not {state:?} within {WAIT:?}: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
