//! Starting the farm's own binaries for a test: the coordinator on ephemeral
//! loopback ports with a temp state dir, builders inside an actor's namespace.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::actor::Actor;
use crate::bins::farm_bin;
use crate::logs::{KeptTempDir, TestLogs, temp_dir};
use crate::process::{Endpoints, FarmProcess};

/// How long a farm binary may take to bind its listeners.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `farm-coordinator` with its endpoints.
#[derive(Debug)]
pub struct Coordinator {
    /// The process (killed on drop).
    pub process: FarmProcess,
    /// What it wrote to `STATE/endpoints.json`.
    pub endpoints: Endpoints,
    // Dropped after the process.
    state: KeptTempDir,
}

impl Coordinator {
    /// Runs `farm-coordinator --state-dir TMP --grpc 127.0.0.1:0 --http
    /// 127.0.0.1:0 --ssh 127.0.0.1:0 EXTRA…` and waits for its endpoints.
    pub fn start<S: AsRef<OsStr>>(
        logs: &TestLogs,
        extra_args: &[S],
    ) -> anyhow::Result<Coordinator> {
        let state = temp_dir("coordinator-state")?;
        let mut cmd = std::process::Command::new(farm_bin("farm-coordinator")?);
        cmd.arg("--state-dir")
            .arg(state.path())
            .args([
                "--grpc",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--ssh",
                "127.0.0.1:0",
            ])
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let mut process = FarmProcess::spawn(logs, "farm-coordinator", cmd)?;
        let endpoints = process.wait_for_endpoints(state.path(), STARTUP_TIMEOUT)?;
        Ok(Coordinator {
            process,
            endpoints,
            state,
        })
    }

    /// The coordinator's state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
}

impl Actor {
    /// Spawns `program args…` inside this actor's namespace (its `/nix`) as a
    /// [`FarmProcess`] logging to the actor's [`TestLogs`].
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        name: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> anyhow::Result<FarmProcess> {
        let mut cmd = self.command(program);
        cmd.args(args);
        FarmProcess::spawn(self.logs(), &format!("{}/{name}", self.name()), cmd)
    }

    /// A directory in the actor's root for a farm binary's state (created).
    pub fn state_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root().join("state").join(crate::logs::sanitize(name));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}
