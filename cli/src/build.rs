//! `farm build`: evaluate installables locally, upload the `.drv` files and
//! sources the farm lacks, submit the graph and follow it: a progress bar on a
//! terminal, plain lines otherwise; failed builds' logs (every log with `-L`);
//! a JSON result with `--json`; outputs fetched back only with `--copy-out` or
//! `--out-link`; Ctrl-C cancels the submission unless `--detach`. A lost
//! coordinator (restarted, or the network cut) does not end the follow: the
//! submission is followed again (`Watch`) for up to [`RECONNECT_WINDOW`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_nix::store_path::StorePath;
use farm_proto::v1::{
    BuildEvent, BuildFinished, BuildOutcome, Priority, SubmitRequest, build_event,
};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::args::{BuildArgs, PriorityArg};
use crate::client::Farm;
use crate::error::CliError;
use crate::nix::{self, EvalArgs};
use crate::style::{self, Colour, Painter};
use crate::upload;

/// Most log bytes printed for a failed build (its tail).
const MAX_FAILED_LOG: usize = 1024 * 1024;

/// How long `farm build` keeps trying to follow its submission again after
/// losing the coordinator, counted from the loss, before it gives up.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(300);
/// The first pause between attempts to follow again; it doubles up to
/// [`RECONNECT_MAX_PAUSE`].
const RECONNECT_FIRST_PAUSE: Duration = Duration::from_millis(200);
const RECONNECT_MAX_PAUSE: Duration = Duration::from_secs(2);

/// One derivation in `--json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrvResult {
    pub drv_path: String,
    pub requested: bool,
    pub outcome: &'static str,
    pub outputs: BTreeMap<String, String>,
    pub builder: Option<String>,
    pub error: Option<String>,
    pub start_time: Option<i64>,
    pub stop_time: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UploadedJson {
    pub paths: usize,
    pub bytes: u64,
}

/// The `--json` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuildJson {
    pub submission_id: String,
    pub success: bool,
    pub derivations: Vec<DrvResult>,
    pub uploaded: UploadedJson,
}

/// The JSON name of an outcome.
pub fn outcome_name(o: i32) -> &'static str {
    match BuildOutcome::try_from(o) {
        Ok(BuildOutcome::Built) => "built",
        Ok(BuildOutcome::Cached) => "cached",
        Ok(BuildOutcome::Failed) => "failed",
        Ok(BuildOutcome::DependencyFailed) => "dependency_failed",
        Ok(BuildOutcome::Cancelled) => "cancelled",
        Ok(BuildOutcome::TimedOut) => "timed_out",
        Ok(BuildOutcome::Unschedulable) => "unschedulable",
        Ok(BuildOutcome::Unspecified) | Err(_) => "not_built",
    }
}

fn is_success(outcome: &str) -> bool {
    outcome == "built" || outcome == "cached"
}

/// Where progress goes: a bar on a terminal, plain lines on stderr otherwise.
#[derive(Clone)]
struct Out {
    bar: Option<ProgressBar>,
    painter: Painter,
}

impl Out {
    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    /// Print a block of bytes (a log) as it is, suspending the bar.
    fn raw(&self, bytes: &[u8]) {
        use std::io::Write;
        let write = || {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(bytes);
            if !bytes.ends_with(b"\n") && !bytes.is_empty() {
                let _ = e.write_all(b"\n");
            }
            let _ = e.flush();
        };
        match &self.bar {
            Some(b) => b.suspend(write),
            None => write(),
        }
    }

    fn paint(&self, c: Colour, s: &str) -> String {
        self.painter.paint(c, s)
    }
}

/// The follow-along state of a submission.
struct Tracker {
    out: Out,
    total: u32,
    cached: u32,
    done: u32,
    running: BTreeMap<String, (String, String, Instant)>,
    finished: BTreeMap<String, BuildFinished>,
    print_logs: bool,
    log_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Whether a `Submitted` came already (a second one follows a reconnection).
    submitted: bool,
}

impl Tracker {
    fn counter(&self) -> String {
        format!("[{}/{}]", self.done + self.cached, self.total)
    }

    fn update_bar(&self) {
        if let Some(b) = &self.out.bar {
            b.set_length(u64::from(self.total));
            b.set_position(u64::from(self.done + self.cached));
            let names: Vec<String> = self
                .running
                .values()
                .take(3)
                .map(|(drv, builder, _)| format!("{} on {builder}", style::short_path(drv)))
                .collect();
            let more = self.running.len().saturating_sub(3);
            b.set_message(if names.is_empty() {
                "waiting for builders".to_owned()
            } else if more > 0 {
                format!("{} (+{more})", names.join(", "))
            } else {
                names.join(", ")
            });
        }
    }
}

/// Run `farm build`.
/// Run `farm build`; `connect` (the connection to the farm) is awaited while
/// Nix evaluates.
pub async fn run(
    connect: impl std::future::Future<Output = Result<Farm, CliError>>,
    args: &BuildArgs,
) -> Result<(), CliError> {
    let painter = Painter {
        enabled: style::stderr_colour(),
    };
    let bar = (std::io::stderr().is_terminal() && !args.no_progress_bar).then(|| {
        let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {elapsed} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let out = Out { bar, painter };
    let result = run_inner(connect, args, &out).await;
    if let Some(b) = &out.bar {
        b.finish_and_clear();
    }
    result
}

fn pairs(v: &[String]) -> Vec<(String, String)> {
    v.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

async fn run_inner(
    connect: impl std::future::Future<Output = Result<Farm, CliError>>,
    args: &BuildArgs,
    out: &Out,
) -> Result<(), CliError> {
    // 1. Evaluate.
    let installables = args
        .installables
        .iter()
        .map(|s| nix::classify(s))
        .collect::<Result<Vec<_>, _>>()?;
    let eval = EvalArgs {
        attrs: args.attrs.clone(),
        args: pairs(&args.args),
        argstrs: pairs(&args.argstrs),
    };
    if let Some(b) = &out.bar {
        b.set_message("evaluating");
    }
    let started = Instant::now();
    let phase = |what: &str, since: &mut Instant| {
        tracing::debug!(
            phase = what,
            ms = since.elapsed().as_millis() as u64,
            "farm build phase"
        );
        *since = Instant::now();
    };
    let mut since = started;
    let (roots, farm) = tokio::try_join!(nix::instantiate(&installables, &eval), connect)?;
    let farm = &farm;
    phase("evaluate", &mut since);

    // 2. Upload what the farm lacks.
    // The closure, from the `.drv` files themselves (each read once: the
    // results need their outputs too).
    let (closure, local_outputs) = nix::drv_closure(&roots).await?;
    phase("closure", &mut since);
    // One batched question for the closure and every output it names: the
    // upload needs the first, the results the second (a derivation nobody
    // reports on is "cached" when its outputs were already there).
    let asked: Vec<StorePath> = closure
        .iter()
        .cloned()
        .chain(local_outputs.iter().flat_map(|(_, o)| o.values().cloned()))
        .collect();
    let present = upload::farm_has(farm, &asked).await?;
    phase("ask the farm", &mut since);
    let stats = upload::upload_missing(farm, &closure, &present, |info, i, n| {
        if let Some(b) = &out.bar {
            b.set_message(format!(
                "uploading {}/{n}: {}",
                i + 1,
                style::short_path(&info.path.to_string())
            ));
        }
    })
    .await?;
    phase("upload", &mut since);
    out.line(&format!(
        "uploaded {} of {} paths ({}) the farm lacked",
        stats.paths,
        stats.closure,
        style::bytes(stats.bytes)
    ));

    // 3. Submit and follow.
    let request = SubmitRequest {
        drv_paths: roots.iter().map(|p| p.to_string()).collect(),
        priority: match args.priority {
            PriorityArg::Ci => Priority::Ci,
            PriorityArg::Interactive => Priority::Interactive,
        } as i32,
        max_silent_time_secs: args.max_silent_time.unwrap_or(0),
        build_timeout_secs: args.timeout.unwrap_or(0),
        job: args.job.clone().unwrap_or_default(),
    };
    let mut events = Some(farm.submit(request.clone()).await?);
    phase("submit call", &mut since);
    let mut tracker = Tracker {
        out: out.clone(),
        total: 0,
        cached: 0,
        done: 0,
        running: BTreeMap::new(),
        finished: BTreeMap::new(),
        print_logs: args.print_build_logs,
        log_tasks: Vec::new(),
        submitted: false,
    };
    let mut submission_id = String::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // Since when the coordinator is lost, and the pause before the next try.
    let mut lost_since: Option<Instant> = None;
    let mut pause = RECONNECT_FIRST_PAUSE;
    let done = loop {
        let Some(stream) = events.as_mut() else {
            let since = *lost_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= RECONNECT_WINDOW {
                return Err(CliError::Unreachable {
                    addr: farm.addr().to_owned(),
                    message: format!(
                        "lost for {} s while following submission {}; the builds may go on (see `farm status`, `farm build` again follows them)",
                        RECONNECT_WINDOW.as_secs(),
                        if submission_id.is_empty() {
                            "(not yet acknowledged)"
                        } else {
                            &submission_id
                        }
                    ),
                    config: "the config file".into(),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = &mut ctrl_c => {
                    if let Some(b) = &out.bar { b.finish_and_clear(); }
                    interrupt(farm, &submission_id).await;
                    return Err(CliError::Interrupted);
                }
            }
            pause = (pause * 2).min(RECONNECT_MAX_PAUSE);
            events = follow_again(farm, &request, &submission_id).await?;
            continue;
        };
        tokio::select! {
            ev = stream.next() => match ev {
                None => {
                    lost(out, &submission_id, "the coordinator ended the event stream");
                    events = None;
                }
                Some(Err(s)) if is_connection_loss(&s) => {
                    lost(out, &submission_id, s.message());
                    events = None;
                }
                Some(Err(s)) => {
                    return Err(farm.status_error("following the submission", false, s));
                }
                Some(Ok(ev)) => {
                    lost_since = None;
                    pause = RECONNECT_FIRST_PAUSE;
                    if let Some(build_event::Event::Submitted(s)) = &ev.event {
                        submission_id = s.submission_id.clone();
                        if args.detach {
                            return detach(args, &submission_id, stats);
                        }
                    }
                    if let Some(done) = handle_event(farm, &mut tracker, ev).await {
                        break done;
                    }
                }
            },
            _ = &mut ctrl_c => {
                if let Some(b) = &out.bar { b.finish_and_clear(); }
                interrupt(farm, &submission_id).await;
                return Err(CliError::Interrupted);
            }
        }
    };
    for t in tracker.log_tasks.drain(..) {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    // 4. Results.
    phase("follow until done", &mut since);
    let results = collect_results(farm, local_outputs, &roots, &tracker.finished, &present).await?;
    phase("results", &mut since);
    let failed: Vec<&DrvResult> = results
        .iter()
        .filter(|r| r.requested && !is_success(r.outcome))
        .collect();
    // Name a derivation that failed itself rather than one that only depended on it.
    let first = failed
        .iter()
        .find(|r| r.outcome != "dependency_failed")
        .or(failed.first());
    let failure_summary = format!(
        "{} of the requested derivations did not build{}",
        failed.len().max(done.failed as usize),
        first
            .map(|r| format!(" (first: {}, {})", r.drv_path, r.outcome))
            .unwrap_or_default()
    );
    let success = done.success && failed.is_empty();
    out.line(&format!(
        "{} {} built, {} cached, {} failed",
        if success {
            out.paint(Colour::Green, "done:")
        } else {
            out.paint(Colour::Red, "failed:")
        },
        done.built,
        done.cached,
        done.failed
    ));

    // 5. Bring outputs back when asked.
    if success && (args.copy_out || args.out_link.is_some()) {
        if let Some(b) = &out.bar {
            b.set_message("copying outputs back");
        }
        copy_back(farm, args, &roots, &results, out).await?;
    }

    if args.json {
        let doc = BuildJson {
            submission_id: done.submission_id.clone(),
            success,
            derivations: results,
            uploaded: UploadedJson {
                paths: stats.paths,
                bytes: stats.bytes,
            },
        };
        println!(
            "{}",
            serde_json::to_string(&doc).map_err(|e| CliError::Usage(e.to_string()))?
        );
    } else if success {
        for r in results.iter().filter(|r| r.requested) {
            for p in r.outputs.values() {
                println!("{p}");
            }
        }
    }
    phase("report", &mut since);
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "farm build total"
    );
    if success {
        Ok(())
    } else {
        Err(CliError::BuildFailed(failure_summary))
    }
}

/// Whether a failed call or event stream is a lost connection to the
/// coordinator (it died, restarted, or the network broke), worth trying
/// again, rather than an answer.
fn is_connection_loss(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => true,
        Code::DeadlineExceeded => true,
        // A broken HTTP/2 connection, as tonic reports some of them.
        Code::Internal => status.message().contains("h2 protocol error"),
        _ => false,
    }
}

/// Say once that the coordinator was lost.
fn lost(out: &Out, submission_id: &str, why: &str) {
    let what = if submission_id.is_empty() {
        "submitting again".to_owned()
    } else {
        format!("following submission {submission_id} again")
    };
    out.line(&format!(
        "lost the coordinator ({}); {what} once it is back",
        style::sanitize(why)
    ));
}

/// A new event stream after losing the coordinator: `Watch` of the
/// submission, or, if the coordinator never acknowledged it, the same
/// `Submit` again (builds are shared, so nothing is built twice). `Ok(None)`
/// while the coordinator is still out of reach.
async fn follow_again(
    farm: &Farm,
    request: &SubmitRequest,
    submission_id: &str,
) -> Result<Option<tonic::Streaming<BuildEvent>>, CliError> {
    if submission_id.is_empty() {
        return match farm.submit(request.clone()).await {
            Ok(s) => Ok(Some(s)),
            Err(CliError::Unreachable { .. }) => Ok(None),
            Err(e) => Err(e),
        };
    }
    match farm.watch(submission_id).await {
        Ok(s) => Ok(Some(s)),
        Err(s) if is_connection_loss(&s) => Ok(None),
        Err(s) => Err(farm.status_error("following the submission", false, s)),
    }
}

fn detach(args: &BuildArgs, id: &str, stats: upload::UploadStats) -> Result<(), CliError> {
    if args.json {
        println!("{}", serde_json::json!({ "submission_id": id }));
    } else {
        println!("{id}");
        eprintln!(
            "submitted as {id} after uploading {} paths; follow it with `farm status`, cancel it with `farm cancel {id}`",
            stats.paths
        );
    }
    Ok(())
}

async fn interrupt(farm: &Farm, submission_id: &str) {
    if submission_id.is_empty() {
        eprintln!("interrupted before the farm acknowledged the submission");
        return;
    }
    eprintln!("interrupted: cancelling submission {submission_id}");
    match farm.cancel(submission_id).await {
        Ok(r) => eprintln!("cancelled {} builds", r.cancelled),
        Err(e) => eprintln!("could not cancel {submission_id}: {e}"),
    }
}

/// Apply one event; returns the final `SubmissionDone`.
async fn handle_event(
    farm: &Farm,
    t: &mut Tracker,
    ev: BuildEvent,
) -> Option<farm_proto::v1::SubmissionDone> {
    let out = t.out.clone();
    match ev.event? {
        build_event::Event::Submitted(s) => {
            t.total = s.total;
            t.cached = s.cached;
            if t.submitted {
                out.line(&format!("following submission {} again", s.submission_id));
            } else {
                out.line(&format!(
                    "submitted {}: {} derivations, {} already in the cache",
                    s.submission_id, s.total, s.cached
                ));
            }
            t.submitted = true;
        }
        build_event::Event::Queued(_) => {}
        build_event::Event::Started(s) => {
            // A watcher that fell behind gets a fresh snapshot: skip repeats.
            if t.running.contains_key(&s.build_id) || t.finished.contains_key(&s.drv_path) {
                return None;
            }
            out.line(&format!(
                "{} building {} on {}",
                t.counter(),
                style::short_path(&s.drv_path),
                out.paint(Colour::Blue, &s.builder)
            ));
            if t.print_logs {
                t.log_tasks.push(spawn_log_follower(
                    farm.clone(),
                    out.clone(),
                    &s.build_id,
                    &s.drv_path,
                ));
            }
            t.running
                .insert(s.build_id, (s.drv_path, s.builder, Instant::now()));
        }
        build_event::Event::Finished(f) => {
            if t.finished.contains_key(&f.drv_path) {
                return None;
            }
            let started = t.running.remove(&f.build_id);
            let took = match (f.start_time_unix, f.stop_time_unix) {
                (a, b) if a > 0 && b >= a => format!(" ({})", style::duration((b - a) as u64)),
                _ => started
                    .map(|(_, _, at)| format!(" ({})", style::duration(at.elapsed().as_secs())))
                    .unwrap_or_default(),
            };
            let name = outcome_name(f.outcome);
            // Cached roots are reported too, but `Submitted` counted them already.
            if name != "cached" {
                t.done += 1;
            }
            let on = if f.builder.is_empty() {
                String::new()
            } else {
                format!(" on {}", f.builder)
            };
            if is_success(name) {
                out.line(&format!(
                    "{} {} {}{on}{took}",
                    t.counter(),
                    out.paint(Colour::Green, name),
                    style::short_path(&f.drv_path)
                ));
            } else {
                let why = if f.error_message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", style::sanitize(&f.error_message))
                };
                out.line(&format!(
                    "{} {} {}{on}{took}{why}",
                    t.counter(),
                    out.paint(Colour::Red, name),
                    f.drv_path
                ));
                let has_log = matches!(name, "failed" | "timed_out");
                if has_log && !t.print_logs && !f.build_id.is_empty() {
                    print_failed_log(farm, &out, &f.build_id, &f.drv_path).await;
                }
            }
            t.finished.insert(f.drv_path.clone(), f);
        }
        build_event::Event::Done(d) => {
            t.update_bar();
            return Some(d);
        }
    }
    t.update_bar();
    None
}

/// How long a failed build's stored log may take to appear after its result.
const LOG_APPEAR_TIMEOUT: Duration = Duration::from_secs(10);

/// The stored log of a finished build. The coordinator may announce the
/// result a moment before the log is stored, so "no log" is retried briefly.
async fn finished_log(
    farm: &Farm,
    build_id: &str,
) -> Result<tonic::Streaming<farm_proto::v1::LogChunk>, CliError> {
    let deadline = Instant::now() + LOG_APPEAR_TIMEOUT;
    let mut pause = Duration::from_millis(100);
    loop {
        match farm.logs(build_id, false).await {
            Err(CliError::NotFound(_)) if Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

async fn print_failed_log(farm: &Farm, out: &Out, build_id: &str, drv: &str) {
    let mut log = Vec::new();
    match finished_log(farm, build_id).await {
        Ok(mut stream) => {
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        log.extend_from_slice(&c.data);
                        if log.len() > 2 * MAX_FAILED_LOG {
                            log.drain(..log.len() - MAX_FAILED_LOG);
                        }
                    }
                    Err(s) => {
                        out.line(&format!(
                            "(could not read the log of {drv}: {})",
                            s.message()
                        ));
                        break;
                    }
                }
            }
        }
        Err(e) => {
            out.line(&format!("(could not read the log of {drv}: {e})"));
            return;
        }
    }
    let truncated = log.len() > MAX_FAILED_LOG;
    if truncated {
        log.drain(..log.len() - MAX_FAILED_LOG);
    }
    out.line(&out.paint(
        Colour::Bold,
        &format!(
            "── log of {drv}{} ──",
            if truncated {
                " (last 1 MiB; `farm logs` for all)"
            } else {
                ""
            }
        ),
    ));
    out.raw(&log);
    out.line(&out.paint(Colour::Bold, "── end of log ──"));
}

/// With `-L`: print a running build's log live, each line prefixed with its name.
fn spawn_log_follower(
    farm: Farm,
    out: Out,
    build_id: &str,
    drv: &str,
) -> tokio::task::JoinHandle<()> {
    let build_id = build_id.to_owned();
    let prefix = style::short_path(drv).trim_end_matches(".drv").to_owned();
    let prefix = Arc::new(out.paint(Colour::Dim, &format!("{prefix}> ")));
    tokio::spawn(async move {
        let Ok(mut stream) = farm.logs(&build_id, true).await else {
            return;
        };
        let mut pending: Vec<u8> = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            pending.extend_from_slice(&chunk.data);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                out.line(&format!(
                    "{prefix}{}",
                    String::from_utf8_lossy(&line[..line.len() - 1])
                ));
            }
            if pending.len() > 64 * 1024 {
                out.line(&format!("{prefix}{}", String::from_utf8_lossy(&pending)));
                pending.clear();
            }
        }
        if !pending.is_empty() {
            out.line(&format!("{prefix}{}", String::from_utf8_lossy(&pending)));
        }
    })
}

/// Every derivation of the closure (each with its outputs, read locally)
/// with its outcome and outputs: the farm's report where it sent one, else
/// "cached" when the cache holds all its outputs (`present`: what it held
/// before the submission; the rest is asked again), else "not_built".
async fn collect_results(
    farm: &Farm,
    local_outputs: Vec<(StorePath, BTreeMap<String, StorePath>)>,
    roots: &[StorePath],
    finished: &BTreeMap<String, BuildFinished>,
    present: &BTreeSet<StorePath>,
) -> Result<Vec<DrvResult>, CliError> {
    let mut results = Vec::new();
    let mut unreported: Vec<(usize, Vec<StorePath>)> = Vec::new();
    for (drv, outputs) in local_outputs {
        let key = drv.to_string();
        let requested = roots.contains(&drv);
        let r = match finished.get(&key) {
            Some(f) => {
                let mut outs: BTreeMap<String, String> = outputs
                    .iter()
                    .map(|(n, p)| (n.clone(), p.to_string()))
                    .collect();
                outs.extend(f.outputs.iter().map(|(k, v)| (k.clone(), v.clone())));
                DrvResult {
                    drv_path: key,
                    requested,
                    outcome: outcome_name(f.outcome),
                    outputs: outs,
                    builder: (!f.builder.is_empty()).then(|| f.builder.clone()),
                    error: (!f.error_message.is_empty()).then(|| style::sanitize(&f.error_message)),
                    start_time: (f.start_time_unix > 0).then_some(f.start_time_unix),
                    stop_time: (f.stop_time_unix > 0).then_some(f.stop_time_unix),
                }
            }
            None => {
                unreported.push((results.len(), outputs.values().cloned().collect()));
                DrvResult {
                    drv_path: key,
                    requested,
                    outcome: "not_built",
                    outputs: outputs
                        .iter()
                        .map(|(n, p)| (n.clone(), p.to_string()))
                        .collect(),
                    builder: None,
                    error: None,
                    start_time: None,
                    stop_time: None,
                }
            }
        };
        results.push(r);
    }
    let ask: Vec<StorePath> = unreported
        .iter()
        .flat_map(|(_, o)| o.iter())
        .filter(|o| !present.contains(*o))
        .cloned()
        .collect();
    let have = if ask.is_empty() {
        BTreeSet::new()
    } else {
        upload::farm_has(farm, &ask).await?
    };
    for (i, outs) in unreported {
        if !outs.is_empty() && outs.iter().all(|o| present.contains(o) || have.contains(o)) {
            results[i].outcome = "cached";
        }
    }
    Ok(results)
}

/// `--copy-out` / `--out-link`: fetch the requested outputs from the farm's
/// cache into the local store, and make the links.
async fn copy_back(
    farm: &Farm,
    args: &BuildArgs,
    roots: &[StorePath],
    results: &[DrvResult],
    out: &Out,
) -> Result<(), CliError> {
    let m = farm.machines("ssh-ng").await?;
    let (url, key) = cache_settings(&m.nix_conf_lines);
    let url = url.ok_or_else(|| {
        CliError::Refused("the coordinator did not say where its binary cache is".into())
    })?;
    let mut paths = Vec::new();
    for root in roots {
        let r = results.iter().find(|r| r.drv_path == root.to_string());
        for p in r.map(|r| r.outputs.values()).into_iter().flatten() {
            if let Ok(sp) = StorePath::parse(p) {
                paths.push(sp);
            }
        }
    }
    nix::copy_from_cache(&url, key.as_deref(), &paths).await?;
    out.line(&format!("copied {} outputs from {url}", paths.len()));
    if let Some(link) = &args.out_link {
        for (i, root) in roots.iter().enumerate() {
            let Some(r) = results.iter().find(|r| r.drv_path == root.to_string()) else {
                continue;
            };
            for (name, p) in &r.outputs {
                let mut l = link.as_os_str().to_owned();
                if i > 0 {
                    l.push(format!("-{}", i + 1));
                }
                if name != "out" {
                    l.push(format!("-{name}"));
                }
                let sp = StorePath::parse(p).map_err(|e| CliError::Usage(e.to_string()))?;
                nix::add_root(std::path::Path::new(&l), &sp).await?;
            }
        }
    }
    Ok(())
}

/// The substituter URL and public key among the coordinator's nix.conf lines.
pub fn cache_settings(lines: &[String]) -> (Option<String>, Option<String>) {
    let mut url = None;
    let mut key = None;
    for l in lines {
        let Some((k, v)) = l.split_once('=') else {
            continue;
        };
        let v = v.split_whitespace().next().map(str::to_owned);
        match k.trim() {
            "substituters"
            | "extra-substituters"
            | "trusted-substituters"
            | "extra-trusted-substituters" => url = url.or(v),
            "trusted-public-keys" | "extra-trusted-public-keys" => key = key.or(v),
            _ => {}
        }
    }
    (url, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_are_stable() {
        assert_eq!(outcome_name(BuildOutcome::Built as i32), "built");
        assert_eq!(outcome_name(BuildOutcome::Cached as i32), "cached");
        assert_eq!(outcome_name(BuildOutcome::Failed as i32), "failed");
        assert_eq!(
            outcome_name(BuildOutcome::DependencyFailed as i32),
            "dependency_failed"
        );
        assert_eq!(outcome_name(BuildOutcome::TimedOut as i32), "timed_out");
        assert_eq!(
            outcome_name(BuildOutcome::Unschedulable as i32),
            "unschedulable"
        );
        assert_eq!(outcome_name(BuildOutcome::Cancelled as i32), "cancelled");
        assert_eq!(outcome_name(99), "not_built");
    }

    #[test]
    fn a_lost_connection_is_followed_again_a_refusal_is_not() {
        use tonic::{Code, Status};
        for lost in [
            Status::unavailable("connection refused"),
            Status::unknown("h2 protocol error: error reading a body from connection"),
            Status::cancelled("operation was canceled"),
            Status::internal("h2 protocol error: stream reset"),
        ] {
            assert!(is_connection_loss(&lost), "{lost:?}");
        }
        for answer in [
            Status::not_found("no submission s9"),
            Status::permission_denied("key not authorized"),
            Status::unauthenticated("unsigned"),
            Status::invalid_argument("bad submission id"),
            Status::internal("the state database failed"),
            Status::new(Code::ResourceExhausted, "too big"),
        ] {
            assert!(!is_connection_loss(&answer), "{answer:?}");
        }
    }

    #[test]
    fn finds_the_cache_in_nix_conf_lines() {
        let (u, k) = cache_settings(&[
            "extra-substituters = http://127.0.0.1:7080".into(),
            "extra-trusted-public-keys = farm-1:abcd=".into(),
        ]);
        assert_eq!(u.as_deref(), Some("http://127.0.0.1:7080"));
        assert_eq!(k.as_deref(), Some("farm-1:abcd="));
        assert_eq!(cache_settings(&[]), (None, None));
    }

    #[test]
    fn json_shape() {
        let doc = BuildJson {
            submission_id: "s1".into(),
            success: true,
            derivations: vec![DrvResult {
                drv_path: "/nix/store/fpfzx999brqs5x1w0n2dpyya4v8d43lh-b.drv".into(),
                requested: true,
                outcome: "built",
                outputs: [(
                    "out".to_owned(),
                    "/nix/store/clvrfiq699vwn0pddcx6b2ilqh8i102y-b".to_owned(),
                )]
                .into(),
                builder: Some("b1".into()),
                error: None,
                start_time: Some(1),
                stop_time: Some(2),
            }],
            uploaded: UploadedJson {
                paths: 3,
                bytes: 100,
            },
        };
        let v = serde_json::to_value(&doc).unwrap();
        assert_eq!(
            v["derivations"][0]["outputs"]["out"],
            "/nix/store/clvrfiq699vwn0pddcx6b2ilqh8i102y-b"
        );
        assert_eq!(v["derivations"][0]["outcome"], "built");
        assert!(v["derivations"][0]["error"].is_null());
        assert_eq!(v["uploaded"]["paths"], 3);
    }
}
