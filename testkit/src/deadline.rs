//! Deadlines for end-to-end tests: a test's body runs on a thread of its own
//! and the test waits for it at most the given time. When that expires the
//! test fails instead of hanging CI: the error says what was still running,
//! every process the test registered in its [`TestLogs`] (farm processes,
//! actor commands in flight, and all their descendants) is SIGKILLed, and the
//! error carries every log of the test (coordinator, builders, clients), so
//! libtest prints them with the failure.
//!
//! A hang is a failure, not a timing assertion: limits are generous
//! hang-guards, never performance claims.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};

use crate::logs::TestLogs;

/// How long the body gets, once its processes are killed, to finish by
/// itself (so its own error is reported too).
const AFTER_KILL: Duration = Duration::from_secs(10);

type Outcome<T> = std::thread::Result<anyhow::Result<T>>;

/// Runs `body` (given a handle on `logs`) on its own thread and returns what
/// it returns, or, if it does not finish within `limit`, an error naming what
/// was running and holding every log, after killing all the test's processes.
/// A panic in the body is re-raised here, so assertions fail the test as usual.
pub fn deadline<T, F>(limit: Duration, logs: &TestLogs, body: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce(TestLogs) -> anyhow::Result<T> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Outcome<T>>();
    let handle = logs.clone();
    let name = thread::current().name().unwrap_or("test").to_owned();
    // libtest's output capture is inherited by the thread.
    thread::Builder::new()
        .name(format!("{name} (body)"))
        .spawn(move || {
            let outcome = catch_unwind(AssertUnwindSafe(|| body(handle)));
            let _ = tx.send(outcome);
        })
        .context("spawning the test body's thread")?;
    let started = Instant::now();
    match rx.recv_timeout(limit) {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(RecvTimeoutError::Disconnected) => {
            Err(anyhow!("the test body's thread ended without a result"))
        }
        Err(RecvTimeoutError::Timeout) => Err(expired(limit, started, logs, &rx)),
    }
}

/// [`deadline`] for an async body: it runs on a multi-threaded tokio runtime
/// (two workers) made for it on the body's thread.
pub fn deadline_async<T, F, Fut>(limit: Duration, logs: &TestLogs, body: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce(TestLogs) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    deadline(limit, logs, move |logs| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting a tokio runtime for the test")?;
        let result = runtime.block_on(body(logs));
        // Tasks left behind (a follower of a killed process) must not hold the test.
        runtime.shutdown_timeout(Duration::from_secs(5));
        result
    })
}

/// The error of an expired deadline, after killing what the test runs.
fn expired<T>(
    limit: Duration,
    started: Instant,
    logs: &TestLogs,
    rx: &mpsc::Receiver<Outcome<T>>,
) -> anyhow::Error {
    let running = logs.running();
    let killed = logs.kill_everything();
    let then = match rx.recv_timeout(AFTER_KILL) {
        Ok(Ok(Ok(_))) => "then returned Ok (too late)".to_owned(),
        Ok(Ok(Err(e))) => format!("then failed: {e:#}"),
        Ok(Err(panic)) => format!("then panicked: {}", panic_message(&*panic)),
        Err(_) => format!("was still stuck {AFTER_KILL:?} after the kill"),
    };
    let mut msg = format!(
        "`{}` did not finish within its deadline of {limit:?} (waited {:.1} s)\n",
        logs.name(),
        started.elapsed().as_secs_f64()
    );
    if running.is_empty() {
        msg.push_str("no registered process was running\n");
    } else {
        msg.push_str("still running at the deadline:\n");
        for r in &running {
            msg.push_str(&format!("  {r}\n"));
        }
    }
    msg.push_str(&format!(
        "killed {} processes (pids {killed:?}); the test body {then}\n",
        killed.len()
    ));
    msg.push_str(&logs.render());
    logs.mark_printed();
    anyhow!(msg)
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".to_owned())
}
