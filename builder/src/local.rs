//! The local Nix, driven through `nix-store --serve --write` (the program Nix's
//! own remote builds run; `--store URI` when the builder has a store of its
//! own, see `BuilderConfig::store`), each in its own process group so a
//! cancelled or overdue build can be stopped whole. Its stderr is the build log.
//!
//! A process is reused by later jobs ([`ServePool`]: a Nix 2.8 start costs
//! ~30 ms, more than a trivial build): a job that went well gives it back,
//! its stderr moved to the next job's log. Claim jobs never use the pool, and
//! it is emptied (each idle process exited, its temporary roots gone) before
//! one starts: see [`crate::claims`]. An idle process is retired after
//! [`POOL_IDLE`], and any after [`POOL_JOBS`] jobs or [`POOL_AGE`], so its
//! temporary roots (which keep paths from the garbage collector) and Nix's
//! in-process path-info cache never live long.
//!
//! Stopping: SIGINT to the process group first (Nix then kills the builder's own
//! process group and cleans up), then, after a grace period ([`KILL_GRACE`],
//! shorter when the builder's own shutdown grace is), SIGKILL to the whole
//! process tree: Nix starts each build in a session of its own, so the
//! group alone would leave the builds running, orphaned, with their
//! environment naming the outputs (Nix's GC counts that as a root). The tree
//! is frozen (SIGSTOP) top-down before it is killed, so nothing in it forks
//! or is orphaned meanwhile, and the kill waits (bounded) until every member
//! is gone ([`LocalServe::kill_tree`]; a claim job's cleanup needs that).

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use crate::error::BuilderError;
use crate::jobs::Event;
use crate::logs::{LogPump, LogState, spawn_pump};
use crate::probe::NixBin;
use farm_nix::serve::ServeClient;

/// How long Nix gets to wind down after SIGINT before SIGKILL (at most).
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long a killed process tree may take to be gone.
pub(crate) const GONE_WAIT: Duration = Duration::from_secs(10);

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
    pump: LogPump,
    kill_grace: Duration,
    /// When it started, and how many jobs it has served.
    born: std::time::Instant,
    jobs: u32,
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
                let _ = tokio::time::timeout(KILL_GRACE, pump.task).await;
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
            born: std::time::Instant::now(),
            jobs: 1,
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
        let _ = tokio::time::timeout(kill_grace.max(Duration::from_millis(500)), pump.task).await;
    }

    /// Stop the process group now (SIGINT, then SIGKILL of the whole tree
    /// after the grace period).
    pub(crate) async fn stop(&mut self) {
        let killer = self.killer();
        killer.stop(&mut self.child).await;
    }

    /// SIGKILL the whole process tree now (the serve process and every
    /// build it started, frozen first) and wait, at most [`GONE_WAIT`],
    /// until all of it is gone. Err names what is still alive.
    pub(crate) async fn kill_tree(&mut self) -> Result<(), String> {
        let killer = self.killer();
        killer.kill_tree(&mut self.child, GONE_WAIT).await
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

    /// SIGINT, wait for `child` up to the grace period, then SIGKILL its tree.
    pub(crate) async fn stop(&self, child: &mut Child) {
        self.signal(rustix::process::Signal::INT);
        if tokio::time::timeout(self.grace, child.wait())
            .await
            .is_err()
            && let Err(e) = self.kill_tree(child, GONE_WAIT).await
        {
            tracing::warn!(error = %e, "a stopped local nix left processes behind");
        }
    }

    /// Freeze `child`'s process tree top-down, SIGKILL all of it, reap
    /// `child`, and wait up to `bound` for the rest to be gone.
    pub(crate) async fn kill_tree(&self, child: &mut Child, bound: Duration) -> Result<(), String> {
        let Some(root) = self.pid else {
            return Ok(());
        };
        let mut frozen: BTreeSet<u32> = BTreeSet::new();
        // Each pass stops what the last one found; a stopped process forks
        // no more, so this ends (bounded all the same).
        for _ in 0..100 {
            let tree = process_tree(root);
            let new: Vec<u32> = tree.difference(&frozen).copied().collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                signal_pid(pid, rustix::process::Signal::STOP);
                frozen.insert(pid);
            }
        }
        for &pid in &frozen {
            signal_pid(pid, rustix::process::Signal::KILL);
        }
        self.signal(rustix::process::Signal::KILL);
        let _ = tokio::time::timeout(bound, child.wait()).await;
        let deadline = Instant::now() + bound;
        loop {
            let alive: Vec<u32> = frozen.iter().copied().filter(|p| is_alive(*p)).collect();
            if alive.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "processes {alive:?} of the local nix still alive {} s after SIGKILL",
                    bound.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An idle pooled process is retired after this long unused.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(30);
/// A pooled process is retired after this long in all.
pub(crate) const POOL_AGE: Duration = Duration::from_secs(600);
/// A pooled process is retired after this many jobs.
pub(crate) const POOL_JOBS: u32 = 1000;
/// How often idle processes are looked at.
const POOL_SWEEP: Duration = Duration::from_secs(10);

/// Local Nix processes kept between jobs (see the module's documentation).
pub(crate) struct ServePool {
    bin: NixBin,
    kill_grace: Duration,
    /// Idle processes, each with the time it was given back.
    idle: std::sync::Mutex<Vec<(LocalServe, std::time::Instant)>>,
    /// Retired processes still exiting.
    retiring: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    sweeper: std::sync::Once,
}

impl ServePool {
    pub(crate) fn new(bin: NixBin, kill_grace: Duration) -> Arc<ServePool> {
        Arc::new(ServePool {
            bin,
            kill_grace,
            idle: std::sync::Mutex::new(Vec::new()),
            retiring: std::sync::Mutex::new(Vec::new()),
            sweeper: std::sync::Once::new(),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(LocalServe, std::time::Instant)>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A local Nix for `job_id`, its stderr that job's log: an idle one if
    /// there is one still fit for use, else a new one. Says whether it was reused.
    pub(crate) async fn acquire(
        &self,
        job_id: &str,
        events: mpsc::Sender<Event>,
    ) -> Result<(LocalServe, bool), BuilderError> {
        loop {
            let next = self.idle().pop();
            let Some((mut serve, since)) = next else {
                let serve = LocalServe::spawn(&self.bin, job_id, events, self.kill_grace).await?;
                return Ok((serve, false));
            };
            let exited = !matches!(serve.child.try_wait(), Ok(None));
            if exited || since.elapsed() > POOL_IDLE || serve.worn() {
                self.retire(serve);
                continue;
            }
            serve.log = serve.pump.retarget(Some((job_id.to_owned(), events))).await;
            serve.jobs += 1;
            return Ok((serve, true));
        }
    }

    /// Take back a process whose job went well (no request left half-done):
    /// the log it wrote so far goes to that job before this returns.
    pub(crate) async fn release(self: &Arc<Self>, mut serve: LocalServe) {
        serve.log = serve.pump.retarget(None).await;
        if serve.worn() {
            self.retire(serve);
            return;
        }
        self.idle().push((serve, std::time::Instant::now()));
        self.sweeper.call_once(|| {
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(POOL_SWEEP).await;
                    let Some(pool) = pool.upgrade() else { return };
                    pool.sweep();
                }
            });
        });
    }

    /// Retire the processes idle for too long.
    fn sweep(&self) {
        let stale: Vec<LocalServe> = {
            let mut idle = self.idle();
            let (stale, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|(s, since)| since.elapsed() > POOL_IDLE || s.worn());
            *idle = keep;
            stale.into_iter().map(|(s, _)| s).collect()
        };
        for serve in stale {
            self.retire(serve);
        }
        self.retiring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|h| !h.is_finished());
    }

    fn retire(&self, serve: LocalServe) {
        let handle = tokio::spawn(serve.finish());
        self.retiring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(handle);
    }

    /// Stop every idle process and wait until each has exited (and with it
    /// its temporary roots): done before a claim job, which deletes paths.
    pub(crate) async fn drain(&self) {
        let idle: Vec<LocalServe> = std::mem::take(&mut *self.idle())
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let retiring = std::mem::take(
            &mut *self
                .retiring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if !idle.is_empty() {
            tracing::info!(
                processes = idle.len(),
                "stopping the idle local nix processes before a claim job"
            );
        }
        futures::future::join_all(idle.into_iter().map(LocalServe::finish)).await;
        for h in retiring {
            let _ = h.await;
        }
    }
}

impl LocalServe {
    /// Due for retirement (by age or jobs served).
    fn worn(&self) -> bool {
        self.jobs >= POOL_JOBS || self.born.elapsed() > POOL_AGE
    }
}

fn signal_pid(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// `(parent, state)` of a process from `/proc/PID/stat` (its name may hold
/// spaces and parentheses: the fields start after the last `)`).
fn stat_of(pid: u32) -> Option<(u32, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((parent, state))
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn is_alive(pid: u32) -> bool {
    stat_of(pid).is_some_and(|(_, state)| state != 'Z' && state != 'X')
}

/// `root` and its living descendants, by their parent links in `/proc`.
fn process_tree(root: u32) -> BTreeSet<u32> {
    let mut children: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((parent, state)) = stat_of(pid)
                && state != 'Z'
                && state != 'X'
            {
                children.entry(parent).or_default().push(pid);
            }
        }
    }
    let mut tree = BTreeSet::new();
    if is_alive(root) {
        tree.insert(root);
    }
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            if tree.insert(c) {
                todo.push(c);
            }
        }
    }
    tree
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process tree where a child runs in a session of its own (as Nix's
    /// builds do) is killed whole, and the kill waits until it is gone.
    #[tokio::test]
    async fn the_whole_tree_goes_even_a_child_in_its_own_session() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!(
                "setsid /bin/sh -c 'echo $$ > {}; exec sleep 300' & sleep 300",
                pidfile.display()
            ))
            .process_group(0);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let grandchild: u32 = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the grandchild never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let root = child.id().unwrap();
        assert!(process_tree(root).contains(&grandchild));
        let killer = Killer {
            pid: Some(root),
            grace: Duration::from_millis(10),
        };
        killer
            .kill_tree(&mut child, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!is_alive(grandchild), "the grandchild outlived the kill");
        assert!(!is_alive(root));
    }
}
