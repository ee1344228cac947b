//! Timed commands in an actor's namespace, and the tools the cases need.
//!
//! The clock runs inside the namespace, around the measured program only
//! (`date +%s%N` before and after, in the same `sh`): the harness's own
//! process polling (the testkit waits in steps of up to 50 ms) and the
//! namespace's setup are not in the figure. The command stays registered
//! with the case's logs, so an expiring deadline lists and kills it.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use farm_tests::{TestLogs, tracked_output};

/// The wrapper around the measured program (`$@`): its wall time in ns on
/// the last line of stderr, its exit status as its own.
const TIMER: &str = r#"s=$(/bin/date +%s%N); "$@"; rc=$?; e=$(/bin/date +%s%N); echo "farm-bench-ns $((e - s))" >&2; exit $rc"#;
const MARK: &str = "farm-bench-ns ";

/// What a timed command did: its wall time.
pub struct Timed {
    pub time: Duration,
    /// What the command wrote to stderr (the timer's line taken out).
    pub stderr: String,
}

/// Runs `cmd` (made by an actor's `command`, so `unshare --mount sh -c
/// SCRIPT NIXDIR PROGRAM ARGS…`) with `PROGRAM ARGS…` timed; fails, with its
/// stderr, unless it succeeds. Recorded in `logs` as `title`.
pub fn timed(logs: &TestLogs, title: &str, cmd: Command) -> anyhow::Result<Timed> {
    ensure!(
        cmd.get_program() == "unshare",
        "not an actor's command: {cmd:?}"
    );
    let args: Vec<OsString> = cmd.get_args().map(OsString::from).collect();
    ensure!(
        args.len() >= 6 && args[0] == "--mount",
        "not an actor's command: {cmd:?}"
    );
    let mut wrapped = Command::new("unshare");
    wrapped
        .args(&args[..5])
        .args(["sh", "-c", TIMER, "sh"])
        .args(&args[5..]);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped.stdin(std::process::Stdio::null());
    let output = tracked_output(logs, title, &mut wrapped)
        .with_context(|| format!("cannot start {title}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let (rest, ns) = match stderr.rfind(MARK) {
        Some(at) => {
            let ns: u64 = stderr[at + MARK.len()..]
                .trim()
                .parse()
                .with_context(|| format!("{title}: the timer printed {:?}", &stderr[at..]))?;
            (stderr[..at].to_owned(), ns)
        }
        None => (stderr.clone(), 0),
    };
    logs.record(
        format!("$ {title}"),
        format!(
            "exit: {} after {:.3} s\nstderr:\n{}",
            output.status,
            ns as f64 / 1e9,
            tail(&rest, 60)
        ),
    );
    if !output.status.success() {
        bail!(
            "{title} failed ({}):\n{}",
            output.status,
            tail(&rest, 40).trim_end()
        );
    }
    ensure!(ns > 0, "{title}: no time printed (stderr: {rest})");
    Ok(Timed {
        time: Duration::from_nanos(ns),
        stderr: rest,
    })
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join("\n")
}

/// Fails with the Debian package to install when a tool the case needs is missing.
pub fn require(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    for (tool, package) in tools {
        let found = if tool.starts_with('/') {
            Path::new(tool).is_file()
        } else {
            std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        };
        if !found {
            bail!("`{tool}` is missing: install it with `apt-get install -y {package}`");
        }
    }
    Ok(())
}

/// A loopback port free right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A word unique to this run (derivation names stay uncached between runs).
pub fn nonce() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{}x{}", std::process::id(), secs % 100_000_000)
}

/// Seconds since the epoch of a tracing timestamp (`2026-12-01T18:00:00.123456Z`).
pub fn log_time(stamp: &str) -> Option<f64> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let s = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}
