//! The live web dashboard at `/`: a page and its script and style embedded in
//! the binary (no framework, nothing fetched at run time), JSON snapshots of
//! the farm, and server-sent events that follow it: the overview
//! ([`Coordinator::overview`], sent again on every change
//! [`Coordinator::farm_changed`] reports and every second for the builders'
//! load), and one build with its live log ([`Coordinator::follow_log`], the
//! follow API `farm logs` uses).
//!
//! Read-only for everyone. Admin actions (drain, undrain) need an admin
//! session ([`session`]): `farm dashboard` (signed, admin level) gets a
//! single-use login link; `GET /login` only serves a page, whose same-origin
//! `POST /login` exchanges the token for an HttpOnly, SameSite=Strict cookie.
//! Every POST needs a same-origin `Origin`; an admin action also needs the
//! session's CSRF token in `X-CSRF-Token`. Anything else is 403 and changes
//! nothing.

pub(crate) mod session;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::domain::coordinator::{Coordinator, now_ms};
use crate::domain::follow::{LogStream, LogUpdate};
use crate::domain::model::{BuildState, BuildView, Outcome, parse_build_id};
use crate::domain::status::Overview;
use session::{Session, Sessions};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const LOGIN_HTML: &str = include_str!("dashboard/login.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const LOGIN_JS: &str = include_str!("dashboard/login.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The session cookie's name.
const COOKIE: &str = "farm_session";
/// The header an admin action carries its CSRF token in.
const CSRF_HEADER: &str = "x-csrf-token";
/// Shortest time between two overview events.
const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// Longest time between two looks at the overview (the builders' load
/// changes without a notification).
const MAX_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Dash {
    coord: Coordinator,
    sessions: Sessions,
}

/// The dashboard's routes.
pub(crate) fn dashboard_router(coord: Coordinator, sessions: Sessions) -> Router {
    Router::new()
        .route("/", get(|| async { page(INDEX_HTML) }))
        .route("/build/{id}", get(|| async { page(INDEX_HTML) }))
        .route("/login", get(|| async { page(LOGIN_HTML) }).post(login))
        .route("/logout", post(logout))
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/dashboard/login.js",
            get(|| async { asset("text/javascript; charset=utf-8", LOGIN_JS) }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/api/session", get(whoami))
        .route("/api/overview", get(overview))
        .route("/api/events", get(overview_events))
        .route("/api/build/{id}", get(build))
        .route("/api/build/{id}/events", get(build_events))
        .route("/api/builders/{name}/drain", post(drain))
        .with_state(Dash { coord, sessions })
}

/// Headers every dashboard page carries: scripts and styles only from here,
/// never framed (a drain toggle cannot be clicked through another site).
fn page(html: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn refused(why: &'static str) -> Response {
    tracing::warn!(why, "dashboard request refused");
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("forbidden: {why}\n"),
    )
        .into_response()
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(s) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            s,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a dashboard answer");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

// ─────────────────────────────── sessions ───────────────────────────────

/// Whether the request's `Origin` is this very host (as the browser reached
/// it, per `Host`). A browser sends `Origin` on every POST; no `Origin` is
/// refused too.
fn same_origin(headers: &HeaderMap) -> bool {
    let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    rest == Some(host)
}

/// The session id in the request's cookie.
fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

fn session_of(d: &Dash, headers: &HeaderMap) -> Option<(String, Session)> {
    let id = session_id(headers)?;
    let s = d.sessions.get(&id)?;
    Some((id, s))
}

/// An admin action's checks, in order: same origin, a session, its CSRF
/// token. The session, or why not.
fn admin(d: &Dash, headers: &HeaderMap) -> Result<Session, &'static str> {
    if !same_origin(headers) {
        return Err("not from this dashboard (Origin)");
    }
    let Some((_, s)) = session_of(d, headers) else {
        return Err("not logged in as admin (run `farm dashboard`)");
    };
    let token = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    if !token.is_some_and(|t| session::same(t, &s.csrf)) {
        return Err("no valid CSRF token");
    }
    Ok(s)
}

#[derive(Deserialize)]
struct LoginBody {
    token: String,
}

/// `POST /login`: a same-origin exchange of a login token for a session.
async fn login(
    State(d): State<Dash>,
    headers: HeaderMap,
    body: axum::extract::Json<LoginBody>,
) -> Response {
    if !same_origin(&headers) {
        return refused("login not from this dashboard (Origin)");
    }
    let Some((id, s)) = d.sessions.exchange(&body.token) else {
        return refused(
            "this login link is used up, expired or unknown (run `farm dashboard` again)",
        );
    };
    tracing::info!(who = %s.who, "dashboard admin login");
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        session::SESSION_TTL.as_secs()
    );
    let mut r = json(&SessionJson {
        admin: true,
        csrf: Some(s.csrf),
        who: Some(s.who),
    });
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(d): State<Dash>, headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return refused("logout not from this dashboard (Origin)");
    }
    if let Some((id, _)) = session_of(&d, &headers) {
        d.sessions.end(&id);
    }
    let mut r = json(&SessionJson::default());
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("farm_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

#[derive(Serialize, Default)]
struct SessionJson {
    admin: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    csrf: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    who: Option<String>,
}

/// `GET /api/session`: whether this browser is an admin, and its CSRF token
/// (readable by this origin's script only: no CORS headers are ever sent).
async fn whoami(State(d): State<Dash>, headers: HeaderMap) -> Response {
    match session_of(&d, &headers) {
        Some((_, s)) => json(&SessionJson {
            admin: true,
            csrf: Some(s.csrf),
            who: Some(s.who),
        }),
        None => json(&SessionJson::default()),
    }
}

#[derive(Deserialize)]
struct DrainBody {
    draining: bool,
}

/// `POST /api/builders/<name>/drain` `{"draining": bool}`: admin only.
async fn drain(
    State(d): State<Dash>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::extract::Json<DrainBody>,
) -> Response {
    let s = match admin(&d, &headers) {
        Ok(s) => s,
        Err(why) => return refused(why),
    };
    let draining = body.draining;
    if !d.coord.with_sched(|sc, _| sc.set_drain(&name, draining)) {
        return (StatusCode::NOT_FOUND, "no such builder\n").into_response();
    }
    if let Err(e) = d.coord.flush().await {
        tracing::error!(error = %e, "cannot flush the state database");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    tracing::info!(builder = %name, draining, who = %s.who, "drain set from the dashboard");
    json(&serde_json::json!({ "builder": name, "draining": draining }))
}

// ─────────────────────────────── the farm as JSON ───────────────────────────────

#[derive(Serialize, PartialEq)]
struct BuilderJson {
    name: String,
    state: &'static str,
    systems: Vec<String>,
    supported_features: Vec<String>,
    mandatory_features: Vec<String>,
    slots: u32,
    used: usize,
    speed_factor: f64,
    cores: u32,
    memory_bytes: u64,
    nix_version: String,
    load1: f64,
    load5: f64,
    memory_available_bytes: u64,
    disk_free_bytes: u64,
    /// PSI "some avg10" percent; `null` when unknown.
    cpu_pressure: Option<f64>,
    memory_pressure: Option<f64>,
    io_pressure: Option<f64>,
    last_seen_ms: i64,
}

#[derive(Serialize, PartialEq)]
struct ClassJson {
    system: String,
    features: Vec<String>,
    runnable: u32,
    waiting: u32,
    oldest_runnable_secs: u64,
    why: String,
}

#[derive(Serialize, PartialEq)]
struct BuildJson {
    id: String,
    drv_path: String,
    name: String,
    system: String,
    features: Vec<String>,
    /// waiting, queued, running, or the outcome.
    state: &'static str,
    builder: Option<String>,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    attempt: u32,
    retries: u32,
    error: Option<String>,
    outputs: BTreeMap<String, String>,
}

#[derive(Serialize, PartialEq)]
struct FailureJson {
    id: String,
    drv_path: String,
    name: String,
    builder: Option<String>,
    error: String,
    finished_ms: i64,
}

#[derive(Serialize, PartialEq)]
struct SubmissionJson {
    id: String,
    job: Option<String>,
    client: Option<String>,
    created_ms: i64,
    total: u32,
    built: u32,
    cached: u32,
    failed: u32,
    running: u32,
    pending: u32,
}

#[derive(Serialize, PartialEq)]
struct CacheJson {
    paths: usize,
    nar_bytes: u64,
    stored_bytes: u64,
    narinfo_hits: u64,
    narinfo_misses: u64,
    /// Hits over narinfo requests; `null` before the first.
    hit_rate: Option<f64>,
}

#[derive(Serialize, PartialEq)]
struct OverviewJson {
    builders: Vec<BuilderJson>,
    queue: Vec<ClassJson>,
    running: Vec<BuildJson>,
    submissions: Vec<SubmissionJson>,
    failures: Vec<FailureJson>,
    cache: CacheJson,
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Built => "built",
        Outcome::Cached => "cached",
        Outcome::Failed => "failed",
        Outcome::DependencyFailed => "dependency failed",
        Outcome::Cancelled => "cancelled",
        Outcome::TimedOut => "timed out",
        Outcome::Unschedulable => "unschedulable",
    }
}

fn psi(v: f64) -> Option<f64> {
    (v >= 0.0 && v.is_finite()).then_some(v)
}

fn build_json(b: &BuildView) -> BuildJson {
    let (state, builder, started) = match &b.state {
        BuildState::Waiting => ("waiting", b.builder.clone(), b.started_ms),
        BuildState::Queued => ("queued", b.builder.clone(), b.started_ms),
        BuildState::Running {
            builder,
            started_ms,
            ..
        } => ("running", Some(builder.clone()), Some(*started_ms)),
        BuildState::Done(o) => (outcome_str(*o), b.builder.clone(), b.started_ms),
    };
    BuildJson {
        id: format!("b{}", b.id),
        drv_path: b.drv_path.to_string(),
        name: b.drv_path.name().trim_end_matches(".drv").to_owned(),
        system: b.system.clone(),
        features: b.required_features.iter().cloned().collect(),
        state,
        builder,
        started_ms: started,
        finished_ms: b.finished_ms,
        attempt: b.attempt,
        retries: b.retries,
        error: b.error.clone(),
        outputs: b
            .outputs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
    }
}

fn overview_json(o: Overview) -> OverviewJson {
    let builders = o
        .status
        .builders
        .iter()
        .map(|b| {
            let caps = &b.record.capabilities;
            BuilderJson {
                name: b.record.name.clone(),
                state: if !b.online {
                    "offline"
                } else if b.record.draining {
                    "draining"
                } else if b.running > 0 {
                    "busy"
                } else {
                    "idle"
                },
                systems: caps.systems.clone(),
                supported_features: caps.supported_features.iter().cloned().collect(),
                mandatory_features: caps.mandatory_features.iter().cloned().collect(),
                slots: caps.max_jobs,
                used: b.running,
                speed_factor: caps.speed_factor,
                cores: caps.cores,
                memory_bytes: caps.memory_bytes,
                nix_version: caps.nix_version.clone(),
                load1: b.load.load_avg_1,
                load5: b.load.load_avg_5,
                memory_available_bytes: b.load.memory_available_bytes,
                disk_free_bytes: b.load.disk_free_bytes,
                cpu_pressure: psi(b.load.cpu_pressure),
                memory_pressure: psi(b.load.memory_pressure),
                io_pressure: psi(b.load.io_pressure),
                last_seen_ms: b.record.last_seen_ms,
            }
        })
        .collect();
    let queue = o
        .classes
        .into_iter()
        .map(|c| ClassJson {
            system: c.system,
            features: c.features.into_iter().collect(),
            runnable: c.queue.runnable,
            waiting: c.queue.waiting,
            oldest_runnable_secs: c.queue.oldest_runnable_secs as u64,
            why: c.why,
        })
        .collect();
    let c = o.cache;
    let asked = c.narinfo_hits + c.narinfo_misses;
    OverviewJson {
        builders,
        queue,
        running: o.status.running.iter().map(|b| build_json(b)).collect(),
        submissions: o
            .submissions
            .into_iter()
            .map(|s| SubmissionJson {
                id: format!("s{}", s.id),
                job: s.job,
                client: s.client,
                created_ms: s.created_ms,
                total: s.total,
                built: s.built,
                cached: s.cached,
                failed: s.failed,
                running: s.running,
                pending: s.pending,
            })
            .collect(),
        failures: o
            .status
            .recent_failures
            .into_iter()
            .map(|f| FailureJson {
                id: format!("b{}", f.build),
                name: f.drv_path.name().trim_end_matches(".drv").to_owned(),
                drv_path: f.drv_path.to_string(),
                builder: f.builder,
                error: f.error,
                finished_ms: f.finished_ms,
            })
            .collect(),
        cache: CacheJson {
            paths: c.paths,
            nar_bytes: c.nar_bytes,
            stored_bytes: c.stored_bytes,
            narinfo_hits: c.narinfo_hits,
            narinfo_misses: c.narinfo_misses,
            hit_rate: (asked > 0).then(|| c.narinfo_hits as f64 / asked as f64),
        },
    }
}

/// A snapshot with the server's clock (for elapsed times).
#[derive(Serialize)]
struct Stamped<'a, T: Serialize> {
    now_ms: i64,
    #[serde(flatten)]
    v: &'a T,
}

fn stamped<T: Serialize>(v: &T) -> String {
    serde_json::to_string(&Stamped {
        now_ms: now_ms(),
        v,
    })
    .unwrap_or_else(|_| "{}".into())
}

async fn overview(State(d): State<Dash>) -> Response {
    json(&Stamped {
        now_ms: now_ms(),
        v: &overview_json(d.coord.overview()),
    })
}

/// `GET /api/events`: an `overview` event now and after every change.
async fn overview_events(
    State(d): State<Dash>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct S {
        coord: Coordinator,
        last: Option<OverviewJson>,
        sent_once: bool,
    }
    let s = S {
        coord: d.coord.clone(),
        last: None,
        sent_once: false,
    };
    let stream = futures::stream::unfold(s, |mut s| async move {
        if s.sent_once {
            tokio::time::sleep(MIN_INTERVAL).await;
        }
        loop {
            if s.coord.stopping().is_cancelled() {
                return None;
            }
            // Armed before looking, so a change during the look is not missed.
            let coord = s.coord.clone();
            let changed = coord.farm_changed();
            let now = overview_json(s.coord.overview());
            if s.last.as_ref() != Some(&now) {
                let data = stamped(&now);
                s.last = Some(now);
                s.sent_once = true;
                return Some((Ok(Event::default().event("overview").data(data)), s));
            }
            let _ = tokio::time::timeout(MAX_INTERVAL, changed).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn find_build(coord: &Coordinator, id: &str) -> Option<std::sync::Arc<BuildView>> {
    coord.build_view(parse_build_id(id)?)
}

async fn build(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    match find_build(&d.coord, &id) {
        Some(b) => json(&Stamped {
            now_ms: now_ms(),
            v: &build_json(&b),
        }),
        None => super::error::not_found(),
    }
}

/// Bytes of a log as text, split only at whole UTF-8 characters (a
/// character cut between two chunks waits for the rest; invalid bytes
/// become U+FFFD).
#[derive(Default)]
struct Utf8Carry {
    carry: Vec<u8>,
}

impl Utf8Carry {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.carry.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.carry;
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(good));
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{fffd}');
                            rest = &bad[n..];
                        }
                        None => {
                            rest = bad;
                            break;
                        }
                    }
                }
            }
        }
        self.carry = rest.to_vec();
        out
    }
}

/// `GET /api/build/<id>/events`: `reset` (start over: a reconnect sends the
/// whole log again), `build` (the build as JSON, again on every change),
/// `log` (the next text of its log, a JSON string), `ended` (the whole log
/// was sent), and `end` (the build is over and so is this stream).
async fn build_events(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    let Some(b) = find_build(&d.coord, &id) else {
        return super::error::not_found();
    };
    let log = match d.coord.follow_log(Some(b.id), &b.drv_path, 0, true).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(build = b.id, error = %e, "no log to follow");
            None
        }
    };
    struct S {
        coord: Coordinator,
        id: u64,
        log: Option<LogStream>,
        text: Utf8Carry,
        last: Option<BuildJson>,
        out: VecDeque<Event>,
        finished: bool,
    }
    let mut out = VecDeque::new();
    out.push_back(Event::default().event("reset").data("{}"));
    let s = S {
        coord: d.coord.clone(),
        id: b.id,
        log,
        text: Utf8Carry::default(),
        last: None,
        out,
        finished: false,
    };
    let stream = futures::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.finished || s.coord.stopping().is_cancelled() {
                return None;
            }
            let coord = s.coord.clone();
            let changed = coord.farm_changed();
            let view = s.coord.build_view(s.id);
            let now = view.as_deref().map(build_json);
            let over = view
                .as_deref()
                .is_none_or(|v| matches!(v.state, BuildState::Done(_)));
            if let Some(j) = now.as_ref().filter(|j| s.last.as_ref() != Some(*j)) {
                s.out
                    .push_back(Event::default().event("build").data(stamped(j)));
                s.last = now;
                continue;
            }
            if over && s.log.is_none() {
                s.out.push_back(Event::default().event("end").data("{}"));
                s.finished = true;
                continue;
            }
            let next_log = async {
                match s.log.as_mut() {
                    Some(l) => l.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                u = next_log => match u {
                    Some(LogUpdate::Chunk(data)) => {
                        let text = s.text.push(&data);
                        if !text.is_empty() {
                            let data = serde_json::to_string(&text).unwrap_or_default();
                            s.out.push_back(Event::default().event("log").data(data));
                        }
                    }
                    Some(LogUpdate::Ended) => {
                        s.out.push_back(Event::default().event("ended").data("{}"));
                    }
                    Some(LogUpdate::Stored(_)) | None => s.log = None,
                },
                _ = tokio::time::timeout(MAX_INTERVAL, changed) => {}
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks() {
        let mut c = Utf8Carry::default();
        let s = "héllo ✓".as_bytes();
        let mut out = String::new();
        for b in s {
            out.push_str(&c.push(&[*b]));
        }
        assert_eq!(out, "héllo ✓");
        let mut c = Utf8Carry::default();
        assert_eq!(c.push(b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn origin_must_be_this_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7080"));
        assert!(!same_origin(&h), "no Origin");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7080"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn cookie_parsing() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; farm_session=abc; b=2"),
        );
        assert_eq!(session_id(&h).as_deref(), Some("abc"));
    }
}
