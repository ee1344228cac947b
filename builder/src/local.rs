//! The local Nix, driven through `nix-store --serve --write` (the program Nix's
//! own remote builds run; `--store URI` when the builder has a store of its
//! own, see `BuilderConfig::store`): one process per job, in its own process group so a
//! cancelled or overdue build can be stopped whole. Its stderr is the build log.
//!
//! Stopping: SIGINT to the process group first (Nix then kills the builder's own
//! process group and cleans up), SIGKILL to the group after a grace period
//! ([`KILL_GRACE`], shorter when the builder's own shutdown grace is).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use crate::error::BuilderError;
use crate::jobs::Event;
use crate::logs::{LogState, spawn_pump};
use crate::probe::NixBin;
use farm_nix::serve::ServeClient;

/// How long Nix gets to wind down after SIGINT before SIGKILL (at most).
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(5);

/// The kill grace that fits in a builder shutdown grace: SIGKILL comes at
/// half of it at the latest, so a stopping builder never leaves a build behind.
pub(crate) fn kill_grace_for(shutdown_grace: Duration) -> Duration {
    KILL_GRACE.min(shutdown_grace / 2)
}

/// A running `nix-store --serve --write` for one job.
pub(crate) struct LocalServe {
    child: Child,
    pid: Option<u32>,
    /// The protocol client on its stdin/stdout.
    pub client: ServeClient<ChildStdout, ChildStdin>,
    /// Its stderr, forwarded as the job's log.
    pub log: Arc<LogState>,
    pump: tokio::task::JoinHandle<()>,
    kill_grace: Duration,
}

impl LocalServe {
    /// Start the local Nix and greet it; its stderr goes to `job_id`'s log.
    /// Stopping it sends SIGKILL `kill_grace` after SIGINT.
    pub(crate) async fn spawn(
        bin: &NixBin,
        job_id: &str,
        events: mpsc::Sender<Event>,
        kill_grace: Duration,
    ) -> Result<LocalServe, BuilderError> {
        let mut cmd = bin.store_command("nix-store");
        cmd.args(["--serve", "--write"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| BuilderError::Nix(format!("starting nix-store --serve: {e}")))?;
        let pid = child.id();
        let (stdin, stdout, stderr) =
            match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(i), Some(o), Some(e)) => (i, o, e),
                _ => return Err(BuilderError::Nix("nix-store --serve without pipes".into())),
            };
        let (log, pump) = spawn_pump(stderr, job_id.to_owned(), events);
        let client = match ServeClient::connect(stdout, stdin).await {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill().await;
                let _ = tokio::time::timeout(KILL_GRACE, pump).await;
                return Err(BuilderError::Nix(format!(
                    "nix-store --serve handshake: {e}: {}",
                    log.tail()
                )));
            }
        };
        Ok(LocalServe {
            child,
            pid,
            client,
            log,
            pump,
            kill_grace,
        })
    }

    /// A handle that can stop this process group from elsewhere.
    pub(crate) fn killer(&self) -> Killer {
        Killer {
            pid: self.pid,
            grace: self.kill_grace,
        }
    }

    /// Close the connection and wait for the process (stopping it if it lingers),
    /// then for the rest of its log to be forwarded.
    pub(crate) async fn finish(self) {
        let killer = self.killer();
        let LocalServe {
            mut child,
            client,
            pump,
            kill_grace,
            ..
        } = self;
        drop(client); // EOF on stdin: nix-store --serve exits.
        if tokio::time::timeout(kill_grace, child.wait())
            .await
            .is_err()
        {
            killer.stop(&mut child).await;
        }
        let _ = tokio::time::timeout(kill_grace.max(Duration::from_millis(500)), pump).await;
    }

    /// Stop the process group now (SIGINT, then SIGKILL after the grace period).
    pub(crate) async fn stop(&mut self) {
        let killer = self.killer();
        killer.stop(&mut self.child).await;
    }
}

/// Stops a local Nix's process group.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Killer {
    pid: Option<u32>,
    /// Between SIGINT and SIGKILL.
    grace: Duration,
}

impl Killer {
    /// Send `sig` to the whole process group.
    pub(crate) fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = self
            .pid
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(pid, sig);
        }
    }

    /// SIGINT, wait for `child` up to the grace period, then SIGKILL.
    pub(crate) async fn stop(&self, child: &mut Child) {
        self.signal(rustix::process::Signal::INT);
        if tokio::time::timeout(self.grace, child.wait())
            .await
            .is_err()
        {
            self.signal(rustix::process::Signal::KILL);
            let _ = child.wait().await;
        }
    }
}
