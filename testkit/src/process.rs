//! Long-running processes of a test (the farm binaries, clients followed while
//! they run): each in its own process group, stdout and stderr in a log file
//! registered with the test's [`TestLogs`] (stdout in a file of its own when
//! asked), registered as running until reaped, SIGKILLed (the whole group)
//! when dropped. Also short commands with captured output that stay
//! killable while they run ([`tracked_output`]).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::logs::{SharedRegistry, TestLogs, lock, tail};
use anyhow::{Context as _, bail};

/// How often the wait loops poll.
const POLL: Duration = Duration::from_millis(50);

/// A child process registered with its test's [`TestLogs`] while it runs.
/// It is reaped only through [`Tracked::try_wait`], which unregisters it under
/// the registry's lock, so a deadline that signals registered pids under that
/// lock never signals a pid the kernel has handed to someone else.
#[derive(Debug)]
struct Tracked {
    registry: SharedRegistry,
    id: u64,
}

impl Tracked {
    fn new(logs: &TestLogs, title: &str, child: &Child, group: bool) -> Tracked {
        let registry = logs.registry();
        let id = lock(&registry).add(title, child.id(), group);
        Tracked { registry, id }
    }

    /// `child.try_wait()`, unregistering it once reaped.
    fn try_wait(&self, child: &mut Child) -> std::io::Result<Option<ExitStatus>> {
        let mut registry = lock(&self.registry);
        let status = child.try_wait()?;
        if status.is_some() {
            registry.remove(self.id);
        }
        Ok(status)
    }

    /// Polls until the child exits (a short first pause, then up to 50 ms).
    fn wait(&self, child: &mut Child) -> std::io::Result<ExitStatus> {
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait(child)? {
                return Ok(status);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(POLL);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.registry).remove(self.id);
    }
}

/// Runs `cmd` to completion with its stdout and stderr captured (as
/// [`Command::output`]), registered with `logs` as `title` meanwhile, so an
/// expiring [`deadline`](crate::deadline) shows it and kills it.
pub fn tracked_output(logs: &TestLogs, title: &str, cmd: &mut Command) -> std::io::Result<Output> {
    tracked_output_with_input(logs, title, cmd, None)
}

/// [`tracked_output`] feeding `input` (when given) to the command's stdin.
pub fn tracked_output_with_input(
    logs: &TestLogs,
    title: &str,
    cmd: &mut Command,
    input: Option<&[u8]>,
) -> std::io::Result<Output> {
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let tracked = Tracked::new(logs, title, &child, false);
    let feeder = match (input, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || {
                use std::io::Write as _;
                // The command may exit without reading it all; its status says why.
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let readers = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    ]
    .map(|pipe| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    });
    let status = tracked.wait(&mut child)?;
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let [stdout, stderr] = readers.map(|r| r.join().unwrap_or_default());
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A spawned farm process (or any long-running helper process).
#[derive(Debug)]
pub struct FarmProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
    stdout_path: Option<PathBuf>,
    exited: Option<ExitStatus>,
    tracked: Tracked,
}

impl FarmProcess {
    /// Spawns `cmd` in a new process group with stdin null and stdout+stderr
    /// appended to `LOGDIR/<name>.log` (which starts with the command line),
    /// registered with `logs`.
    pub fn spawn(logs: &TestLogs, name: &str, cmd: Command) -> anyhow::Result<FarmProcess> {
        FarmProcess::spawn_inner(logs, name, cmd, false)
    }

    /// [`FarmProcess::spawn`] with stdout in a file of its own
    /// (`LOGDIR/<name>.stdout.log`, read with [`FarmProcess::stdout`]) and
    /// stderr in `LOGDIR/<name>.log`: for a client whose stdout is its result.
    pub fn spawn_split_stdout(
        logs: &TestLogs,
        name: &str,
        cmd: Command,
    ) -> anyhow::Result<FarmProcess> {
        FarmProcess::spawn_inner(logs, name, cmd, true)
    }

    fn spawn_inner(
        logs: &TestLogs,
        name: &str,
        mut cmd: Command,
        split: bool,
    ) -> anyhow::Result<FarmProcess> {
        use std::os::unix::process::CommandExt as _;
        let (log_path, mut file) = logs.create_log_file(name)?;
        {
            use std::io::Write as _;
            writeln!(file, "[farm-tests] $ {cmd:?}").context("writing the log file")?;
        }
        let (stdout_path, out_file) = if split {
            let (path, f) = logs.create_log_file(&format!("{name}.stdout"))?;
            (Some(path), f)
        } else {
            let f = file
                .try_clone()
                .context("duplicating the log file handle")?;
            (None, f)
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out_file))
            .stderr(Stdio::from(file))
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let tracked = Tracked::new(logs, name, &child, true);
        Ok(FarmProcess {
            name: name.to_owned(),
            child,
            log_path,
            stdout_path,
            exited: None,
            tracked,
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

    /// What the process wrote to stdout, when spawned with
    /// [`FarmProcess::spawn_split_stdout`] (else empty).
    pub fn stdout(&self) -> String {
        self.stdout_path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .tracked
                .try_wait(&mut self.child)
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.exited)
    }

    /// Waits up to `timeout` for the process to exit by itself; past it, fails
    /// with the log's tail (the process keeps running).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {timeout:?}; its log ends with:\n{}",
                    self.name,
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(POLL);
        }
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

    /// Polls `probe` until it yields a value, failing early (with the log's
    /// tail) if the process exits first, or when `timeout` passes (the error
    /// says the process did not do `what`).
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe()? {
                return Ok(value);
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} did not {what} within {timeout:?}; its log ends with:\n{}",
                    self.name,
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
            .tracked
            .wait(&mut self.child)
            .with_context(|| format!("waiting for {}", self.name))?;
        self.exited = Some(status);
        Ok(status)
    }

    /// Sends `sig` (`TERM`, `INT`, `KILL`, …) to the process itself (not its
    /// group), unless it has been reaped already.
    pub fn signal(&mut self, sig: &str) -> anyhow::Result<()> {
        if self.try_wait()?.is_none() {
            // Under the registry's lock: the pid cannot be reaped meanwhile.
            let _registry = lock(&self.tracked.registry);
            signal(&self.pid().to_string(), sig);
        }
        Ok(())
    }

    /// SIGKILLs the process, its group and every descendant (Nix runs builds
    /// in sessions of their own, which a group kill misses): the machine
    /// dies with everything it ran. Reaps the process.
    pub fn kill_tree(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        {
            let _registry = lock(&self.tracked.registry);
            let mut targets = vec![format!("-{}", self.pid())];
            targets.extend(
                crate::logs::descendants(&[self.pid()])
                    .iter()
                    .map(u32::to_string),
            );
            signal_all(&targets, "KILL");
        }
        self.kill()
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
    signal_all(&[target.to_owned()], sig);
}

/// `kill -s SIG -- TARGETS…` (pids, `-PGID` for groups), ignoring the ones gone.
pub(crate) fn signal_all(targets: &[String], sig: &str) {
    let _ = Command::new("sh")
        .args([
            "-c",
            "sig=$0; for t in \"$@\"; do kill -s \"$sig\" -- \"$t\" 2>/dev/null; done; true",
            sig,
        ])
        .args(targets)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
