//! Shutdown on SIGTERM or SIGINT, for the coordinator and builder daemons.
//!
//! [`shutdown_signal`] resolves on the first signal; from then on a second
//! signal exits the process at once with status 130, and whatever hangs, the
//! process is gone `grace` + 2 s after the first (a watchdog thread, so a
//! stuck runtime cannot hold it; it exits with status 1).

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

/// How long past its grace a stopping daemon may take before the watchdog ends it.
pub const WATCHDOG_SLACK: Duration = Duration::from_secs(2);

/// Resolves on the first SIGINT or SIGTERM; arms the second-signal exit and
/// the watchdog (see the module doc). Must be polled inside a tokio runtime.
pub async fn shutdown_signal(grace: Duration) {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down");
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
    std::thread::spawn(move || {
        std::thread::sleep(grace + WATCHDOG_SLACK);
        eprintln!("shutdown took longer than its grace period; exiting");
        std::process::exit(1);
    });
}
