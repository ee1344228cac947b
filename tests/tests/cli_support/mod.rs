//! Shared setup of the `farm` CLI end-to-end tests: a coordinator, builders
//! each in its own actor (own `/nix`) enrolled with keys made by
//! `farm keys ssh`, and a client actor in whose namespace `farm` runs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use farm_tests::{Actor, Coordinator, FarmProcess, TestLogs, farm_bin};

/// A running farm and a client.
pub struct TestFarm {
    pub logs: TestLogs,
    pub client: Actor,
    pub builders: Vec<(Actor, FarmProcess)>,
    pub coordinator: Coordinator,
    pub keys: tempfile::TempDir,
}

/// One builder to start.
pub struct BuilderSpec {
    pub name: &'static str,
    pub max_jobs: u32,
}

/// Generate an SSH key with `farm keys ssh`; returns (private key path, public line).
pub fn ssh_key(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, String)> {
    let path = dir.join(name);
    let out = Command::new(farm_bin("farm")?)
        .args(["keys", "ssh", "--comment", name, "--out"])
        .arg(&path)
        .output()?;
    if !out.status.success() {
        bail!("farm keys ssh: {}", String::from_utf8_lossy(&out.stderr));
    }
    let line = String::from_utf8(out.stdout)?.trim().to_owned();
    Ok((path, line))
}

impl TestFarm {
    /// A coordinator (with `extra` flags) and `builders`, all joined, logging to `logs`.
    pub fn start(
        logs: &TestLogs,
        builders: &[BuilderSpec],
        extra: &[String],
    ) -> anyhow::Result<TestFarm> {
        let logs = logs.clone();
        let keys = tempfile::tempdir()?;
        let builder_keys = keys.path().join("builder_keys");
        let mut enrolled = String::new();
        let mut actors = Vec::new();
        for b in builders {
            let actor = Actor::with_logs(b.name, &logs)?;
            let state = actor.state_dir("builder")?;
            // The builder's key, made by the CLI, enrolled before it starts.
            let (_, line) = ssh_key(&state, "builder_ed25519")?;
            enrolled.push_str(&line);
            enrolled.push('\n');
            actors.push((actor, state, b));
        }
        std::fs::write(&builder_keys, enrolled)?;
        let mut args = vec![
            "--builder-keys".to_owned(),
            builder_keys.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let coordinator = Coordinator::start(&logs, &args)?;
        let url = coordinator.endpoints.grpc_url();
        let mut running = Vec::new();
        for (actor, state, b) in actors {
            let proc = actor.spawn(
                "farm-builder",
                farm_bin("farm-builder")?,
                &[
                    "--coordinator".to_owned(),
                    url.clone(),
                    "--state-dir".to_owned(),
                    state.display().to_string(),
                    "--name".to_owned(),
                    b.name.to_owned(),
                    "--max-jobs".to_owned(),
                    b.max_jobs.to_string(),
                ],
            )?;
            running.push((actor, proc));
        }
        let client = Actor::with_logs("client", &logs)?;
        Ok(TestFarm {
            logs,
            client,
            builders: running,
            coordinator,
            keys,
        })
    }

    /// `farm ARGS…` in the client's namespace, pointed at the coordinator,
    /// signing with `key` (none: unsigned).
    pub fn farm(&self, key: Option<&Path>, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = self.client.command(farm_bin("farm")?);
        cmd.args(args)
            .env("FARM_COORDINATOR", self.coordinator.endpoints.grpc_url())
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(k) = key {
            cmd.env("FARM_KEY", k);
        }
        Ok(cmd)
    }

    /// `farm ARGS…` in the background as a [`FarmProcess`] named `name`: its
    /// stderr in the test's logs, its stdout apart ([`FarmProcess::stdout`]).
    pub fn spawn_farm(
        &self,
        name: &str,
        key: Option<&Path>,
        args: &[&str],
    ) -> anyhow::Result<FarmProcess> {
        FarmProcess::spawn_split_stdout(&self.logs, name, self.farm(key, args)?)
    }

    /// Run `farm ARGS…` to completion (any exit status), recorded in the logs.
    pub fn run(&self, key: Option<&Path>, args: &[&str]) -> anyhow::Result<Output> {
        let title = format!("$ farm {}", args.join(" "));
        let out = farm_tests::tracked_output(&self.logs, &title, &mut self.farm(key, args)?)
            .with_context(|| format!("running farm {args:?}"))?;
        self.logs.record(
            format!("$ farm {}", args.join(" ")),
            format!(
                "exit: {}\nstdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
        Ok(out)
    }

    /// `farm status --json`, parsed.
    pub fn status(&self, key: Option<&Path>) -> anyhow::Result<serde_json::Value> {
        let out = self.run(key, &["status", "--json"])?;
        if !out.status.success() {
            bail!(
                "farm status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Wait until `n` builders are online (not offline).
    pub fn wait_for_builders(
        &self,
        key: Option<&Path>,
        n: usize,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status(key)?;
            let online = s["builders"]
                .as_array()
                .map(|b| b.iter().filter(|b| b["state"] != "offline").count())
                .unwrap_or(0);
            if online >= n {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("only {online} of {n} builders joined: {s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A `.nix` file of `n` derivations in layers (each depends on up to two of
/// the previous), each sleeping `sleep` seconds (with the host's `/bin/sleep`: builds have no `PATH`); attribute `all` depends on all.
/// `salt` makes the outputs unique to this test run.
pub fn graph_expr(n: usize, sleep: f32, salt: &str, failing: Option<usize>) -> String {
    let mut s = String::from(
        "let\n  mk = name: deps: script: derivation {\n    inherit name;\n    system = builtins.currentSystem;\n    builder = \"/bin/sh\";\n    args = [ \"-c\" script ];\n    deps = deps;\n  };\n",
    );
    for i in 0..n {
        let deps: Vec<String> = [i.checked_sub(1), i.checked_sub(7)]
            .into_iter()
            .flatten()
            .map(|d| format!("d{d}"))
            .collect();
        let script = if failing == Some(i) {
            format!("echo d{i} says this build is doomed; exit 3")
        } else {
            format!("echo building d{i} {salt}; /bin/sleep {sleep}; echo d{i} {salt} $deps > $out")
        };
        s.push_str(&format!(
            "  d{i} = mk \"d{i}\" [ {} ] {};\n",
            deps.join(" "),
            farm_tests::nix_string(&script)
        ));
    }
    s.push_str("  all = [ ");
    for i in 0..n {
        s.push_str(&format!("d{i} "));
    }
    s.push_str("];\nin { inherit all; ");
    for i in 0..n {
        s.push_str(&format!("d{i} = d{i}; "));
    }
    s.push_str("}\n");
    s
}
