//! Long-running processes of a test (the farm binaries): each in its own
//! process group, stdout and stderr in one log file registered with the test's
//! [`TestLogs`], SIGKILLed (the whole group) when dropped. Also reading the
//! coordinator's `STATE/endpoints.json`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::logs::{TestLogs, tail};

/// How often the wait loops poll.
const POLL: Duration = Duration::from_millis(50);

/// The addresses and keys a coordinator publishes in `STATE/endpoints.json`
/// once every listener is bound. Extra fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Endpoints {
    /// gRPC listener, `host:port`.
    pub grpc: String,
    /// HTTP listener (cache, metrics, dashboard), `host:port`.
    pub http: String,
    /// SSH nix endpoint, `host:port`.
    pub ssh: String,
    /// The cache signing key's public half, `name:base64`.
    pub cache_public_key: String,
    /// The SSH host key, `ssh-ed25519 AAAA…`.
    pub ssh_host_key: String,
}

impl Endpoints {
    /// `http://` URL of the gRPC listener.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `http://` URL of the HTTP listener (the binary cache).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The SSH listener's port.
    pub fn ssh_port(&self) -> anyhow::Result<u16> {
        port_of(&self.ssh)
    }

    /// Reads and parses `STATE/endpoints.json`; `Ok(None)` while it does not
    /// exist or is not yet complete JSON.
    pub fn read(state_dir: &Path) -> anyhow::Result<Option<Endpoints>> {
        let path = state_dir.join("endpoints.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        match serde_json::from_slice(&bytes) {
            Ok(endpoints) => Ok(Some(endpoints)),
            // Possibly written non-atomically and caught half way: retry.
            Err(e) if e.is_eof() => Ok(None),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "{} is not valid endpoints JSON: {}",
                    path.display(),
                    String::from_utf8_lossy(&bytes)
                )
            }),
        }
    }
}

fn port_of(addr: &str) -> anyhow::Result<u16> {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("{addr:?} has no port"))
}

/// Waits until `STATE/endpoints.json` exists and parses, up to `timeout`.
pub fn wait_for_endpoints(state_dir: &Path, timeout: Duration) -> anyhow::Result<Endpoints> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = Endpoints::read(state_dir)? {
            return Ok(e);
        }
        if Instant::now() >= deadline {
            bail!(
                "no complete {} after {timeout:?}",
                state_dir.join("endpoints.json").display()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// A spawned farm process (or any long-running helper process).
#[derive(Debug)]
pub struct FarmProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

impl FarmProcess {
    /// Spawns `cmd` in a new process group with stdin null and stdout+stderr
    /// appended to `LOGDIR/<name>.log` (which starts with the command line),
    /// registered with `logs`.
    pub fn spawn(logs: &TestLogs, name: &str, mut cmd: Command) -> anyhow::Result<FarmProcess> {
        use std::os::unix::process::CommandExt as _;
        let (log_path, mut file) = logs.create_log_file(name)?;
        {
            use std::io::Write as _;
            writeln!(file, "[farm-tests] $ {cmd:?}").context("writing the log file")?;
        }
        let err_file = file
            .try_clone()
            .context("duplicating the log file handle")?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err_file))
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(FarmProcess {
            name: name.to_owned(),
            child,
            log_path,
            exited: None,
        })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process ID (also its process group ID).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The combined stdout+stderr log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.exited)
    }

    /// Fails with the exit status and the log's tail if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                tail(&self.log(), 40)
            );
        }
        Ok(())
    }

    /// Waits for `STATE/endpoints.json`, failing early (with the log) if the
    /// process exits first.
    pub fn wait_for_endpoints(
        &mut self,
        state_dir: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Endpoints> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = Endpoints::read(state_dir)? {
                return Ok(e);
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} wrote no complete {} within {timeout:?}; its log ends with:\n{}",
                    self.name,
                    state_dir.join("endpoints.json").display(),
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// What the process itself wrote: the log without the harness's header
    /// line (which quotes the command line, and so may contain any needle).
    pub fn output(&self) -> String {
        let log = self.log();
        match log.split_once('\n') {
            Some((header, rest)) if header.starts_with("[farm-tests] $ ") => rest.to_owned(),
            _ => log,
        }
    }

    /// Waits until the process's output contains `needle`, failing if the
    /// process exits or `timeout` passes first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; its log ends with:\n{}",
                    self.name,
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILLs the whole process group and reaps the process.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        signal_group(self.pid(), "KILL");
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        self.exited = Some(status);
        Ok(status)
    }

    /// SIGTERMs the process and waits up to `timeout` for it to exit; then
    /// SIGKILLs what is left of its group. Returns the exit status.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        signal(&self.pid().to_string(), "TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                // Children it left behind in its group go too.
                signal_group(self.pid(), "KILL");
                return Ok(status);
            }
            std::thread::sleep(POLL);
        }
        self.kill()
    }
}

impl Drop for FarmProcess {
    fn drop(&mut self) {
        // Once reaped, the group ID may be reused: only kill a live process.
        if self.exited.is_none() {
            let _ = self.kill();
        }
    }
}

/// Sends `SIG` to the process group `pgid` (ignoring "no such process").
fn signal_group(pgid: u32, sig: &str) {
    signal(&format!("-{pgid}"), sig);
}

/// `kill -s SIG -- TARGET` through the shell's builtin (no libc, no unsafe).
fn signal(target: &str, sig: &str) {
    let _ = Command::new("sh")
        .args(["-c", "kill -s \"$0\" -- \"$1\" 2>/dev/null", sig, target])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_tolerate_extra_fields() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(Endpoints::read(dir.path())?, None);
        std::fs::write(dir.path().join("endpoints.json"), "{\"grpc\": \"127.0")?;
        assert_eq!(
            Endpoints::read(dir.path())?,
            None,
            "partial JSON means retry"
        );
        std::fs::write(
            dir.path().join("endpoints.json"),
            r#"{"grpc":"127.0.0.1:1","http":"127.0.0.1:2","ssh":"127.0.0.1:3",
               "cache_public_key":"farm:AAAA","ssh_host_key":"ssh-ed25519 AAAA","extra":1}"#,
        )?;
        let e = Endpoints::read(dir.path())?.expect("complete file");
        assert_eq!(e.grpc_url(), "http://127.0.0.1:1");
        assert_eq!(e.ssh_port()?, 3);
        std::fs::write(dir.path().join("endpoints.json"), r#"{"grpc": 1}"#)?;
        assert!(
            Endpoints::read(dir.path()).is_err(),
            "wrong types are an error"
        );
        Ok(())
    }
}
