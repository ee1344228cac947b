//! Per-test log collection: every farm process writes its stdout and stderr to a
//! file in one log directory, every actor command leaves a transcript, and when
//! the last handle is dropped all of it is printed to the test's (captured)
//! stderr, so a failing test shows what each process and command said.
//!
//! The logs also keep a registry of the processes the test has running (farm
//! processes, actor commands in flight), so a [`deadline`](crate::deadline)
//! that expires can say what was still running and kill all of it.
//!
//! Printing goes through `eprintln!`, which libtest captures: a passing test's
//! logs are discarded, a failing one's (panic *or* `Err` return) are shown.
//! Each file is cut to its last [`TAIL_LINES`] lines; the full files stay in
//! the log directory when `FARM_TEST_KEEP=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::Context as _;

/// How many trailing lines of each log file are printed.
pub const TAIL_LINES: usize = 200;

/// Whether temp roots and log directories are kept (`FARM_TEST_KEEP=1`).
pub fn keep_temp_dirs() -> bool {
    std::env::var_os("FARM_TEST_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Creates a temp dir `farm-PREFIX-…`, kept (and announced) when
/// `FARM_TEST_KEEP=1`.
pub fn temp_dir(prefix: &str) -> anyhow::Result<KeptTempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("farm-{prefix}-"))
        .tempdir()
        .context("creating a temp dir")?;
    Ok(KeptTempDir { dir: Some(dir) })
}

/// A [`tempfile::TempDir`] that is left on disk when `FARM_TEST_KEEP=1`.
#[derive(Debug)]
pub struct KeptTempDir {
    dir: Option<tempfile::TempDir>,
}

impl KeptTempDir {
    pub fn path(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new(""))
    }
}

impl Drop for KeptTempDir {
    fn drop(&mut self) {
        // Unless kept, TempDir's own Drop removes it (we run as root, so Nix's
        // read-only store directories are no obstacle).
        if let Some(dir) = self.dir.take()
            && keep_temp_dirs()
        {
            eprintln!("farm-tests: kept {}", dir.keep().display());
        }
    }
}

#[derive(Debug)]
enum Section {
    /// A process's combined stdout+stderr file.
    File { title: String, path: PathBuf },
    /// An in-memory transcript (an actor command and its output).
    Text { title: String, text: String },
}

/// One process the test has running.
#[derive(Debug)]
struct LiveProcess {
    title: String,
    pid: u32,
    /// Whether it leads its own process group (a [`FarmProcess`](crate::FarmProcess)).
    group: bool,
    since: Instant,
}

/// The processes a test has running. Owners reap their child while holding
/// this lock and unregister it in the same critical section, so whoever
/// signals the registered pids under the lock never hits a reused pid.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next: u64,
    live: BTreeMap<u64, LiveProcess>,
}

/// A registry shared by a test's logs and the processes it tracks.
pub(crate) type SharedRegistry = Arc<Mutex<Registry>>;

impl Registry {
    /// Registers a running process; returns its registration id.
    pub(crate) fn add(&mut self, title: &str, pid: u32, group: bool) -> u64 {
        self.next += 1;
        self.live.insert(
            self.next,
            LiveProcess {
                title: title.to_owned(),
                pid,
                group,
                since: Instant::now(),
            },
        );
        self.next
    }

    /// Forgets a process (it was reaped).
    pub(crate) fn remove(&mut self, id: u64) {
        self.live.remove(&id);
    }
}

/// Locks a registry, whatever a panicking holder left.
pub(crate) fn lock(registry: &SharedRegistry) -> MutexGuard<'_, Registry> {
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug)]
struct Inner {
    name: String,
    dir: KeptTempDir,
    sections: Mutex<Vec<Section>>,
    registry: SharedRegistry,
    /// Set once the logs were handed out whole (by an expired deadline):
    /// dropping the last handle does not print them again.
    printed: AtomicBool,
}

/// A handle on one test's logs; clones share the same directory and sections.
/// The logs are printed when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct TestLogs {
    inner: Arc<Inner>,
}

impl TestLogs {
    /// A fresh log directory for the test `name`.
    pub fn new(name: &str) -> anyhow::Result<TestLogs> {
        Ok(TestLogs {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                dir: temp_dir(&format!("logs-{}", sanitize(name)))?,
                sections: Mutex::new(Vec::new()),
                registry: SharedRegistry::default(),
                printed: AtomicBool::new(false),
            }),
        })
    }

    /// The directory holding the log files.
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// Creates `DIR/<name>.log` (a numbered variant if taken) and registers it
    /// so it is printed with the other logs; returns its path and the open file.
    pub fn create_log_file(&self, name: &str) -> anyhow::Result<(PathBuf, File)> {
        let base = sanitize(name);
        let mut sections = self.sections();
        let mut n = 0;
        let path = loop {
            let candidate = if n == 0 {
                self.dir().join(format!("{base}.log"))
            } else {
                self.dir().join(format!("{base}.{n}.log"))
            };
            if !candidate.exists() {
                break candidate;
            }
            n += 1;
        };
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        sections.push(Section::File {
            title: name.to_owned(),
            path: path.clone(),
        });
        Ok((path, file))
    }

    /// Records a transcript (e.g. a command with its status and output).
    pub fn record(&self, title: impl Into<String>, text: impl Into<String>) {
        self.sections().push(Section::Text {
            title: title.into(),
            text: text.into(),
        });
    }

    /// Everything recorded so far, each file cut to its last [`TAIL_LINES`] lines,
    /// then the processes still running.
    pub fn render(&self) -> String {
        let mut out = render(&self.inner.name, self.dir(), &self.sections());
        let running = self.running();
        if !running.is_empty() {
            let _ = writeln!(out, "----- still running in `{}` -----", self.inner.name);
            for r in running {
                let _ = writeln!(out, "{r}");
            }
        }
        out
    }

    /// The name the logs were made for.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The processes this test has running, one line each: what, pid, for how long.
    pub fn running(&self) -> Vec<String> {
        lock(&self.inner.registry)
            .live
            .values()
            .map(|p| {
                format!(
                    "{} (pid {}{}, running for {:.1} s)",
                    p.title,
                    p.pid,
                    if p.group { ", own process group" } else { "" },
                    p.since.elapsed().as_secs_f64()
                )
            })
            .collect()
    }

    /// SIGKILLs every process the test has running: each registered process,
    /// its process group if it leads one, and every descendant (Nix starts
    /// builds in sessions of their own, so a group kill alone misses them).
    /// Returns the pids signalled. The owners still reap their children.
    pub fn kill_everything(&self) -> Vec<u32> {
        let registry = lock(&self.inner.registry);
        let roots: Vec<u32> = registry.live.values().map(|p| p.pid).collect();
        let groups: Vec<u32> = registry
            .live
            .values()
            .filter(|p| p.group)
            .map(|p| p.pid)
            .collect();
        let mut pids: BTreeSet<u32> = descendants(&roots);
        pids.extend(&roots);
        let mut targets: Vec<String> = groups.iter().map(|g| format!("-{g}")).collect();
        targets.extend(pids.iter().map(u32::to_string));
        if !targets.is_empty() {
            crate::process::signal_all(&targets, "KILL");
        }
        // Held until here: nobody reaps (and frees a pid) while we signal.
        drop(registry);
        pids.into_iter().collect()
    }

    /// Marks the logs as shown: dropping the last handle prints nothing. For
    /// a program that is not a test (the benchmark harness): it prints
    /// [`TestLogs::render`] itself when a run fails, and nothing when it passes.
    pub fn quiet(&self) {
        self.mark_printed();
    }

    /// The registry processes of this test register with.
    pub(crate) fn registry(&self) -> SharedRegistry {
        self.inner.registry.clone()
    }

    /// Marks the logs as shown (their last handle then prints nothing).
    pub(crate) fn mark_printed(&self) {
        self.inner.printed.store(true, Ordering::SeqCst);
    }

    fn sections(&self) -> std::sync::MutexGuard<'_, Vec<Section>> {
        // A panic while holding the lock must not hide the logs.
        self.inner
            .sections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let sections = self
            .sections
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if sections.is_empty() || self.printed.load(Ordering::SeqCst) {
            return;
        }
        let header = if std::thread::panicking() {
            "(test panicked)"
        } else {
            "(libtest shows this only if the test failed)"
        };
        // Runs before the fields drop, so the files are still there to read.
        eprintln!(
            "{header}\n{}",
            render(&self.name, self.dir.path(), sections)
        );
    }
}

fn render(name: &str, dir: &Path, sections: &[Section]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "===== farm-tests logs for `{name}` ({}) =====",
        dir.display()
    );
    for section in sections {
        match section {
            Section::File { title, path } => {
                let text = std::fs::read(path)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
                let _ = writeln!(out, "----- process {title} ({}) -----", path.display());
                out.push_str(&tail(&text, TAIL_LINES));
            }
            Section::Text { title, text } => {
                let _ = writeln!(out, "----- {title} -----");
                out.push_str(text);
            }
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    let _ = writeln!(out, "===== end of logs for `{name}` =====");
    out
}

/// Every live descendant of `roots` (not the roots themselves), from `/proc`.
pub(crate) fn descendants(roots: &[u32]) -> BTreeSet<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // `PID (COMM) STATE PPID …`; COMM may hold spaces and parentheses.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if out.insert(c) {
                todo.push(c);
            }
        }
    }
    out
}

/// The last `n` lines of `text`, with a note of how many were cut.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= n {
        return text.to_owned();
    }
    let cut = lines.len() - n;
    let mut out = format!("[… {cut} earlier lines cut …]\n");
    for line in &lines[cut..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A file-name-safe version of `name`.
pub(crate) fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("x{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 5), "a\nb\nc\n");
        assert_eq!(tail("a\nb\nc\n", 2), "[… 1 earlier lines cut …]\nb\nc\n");
    }

    #[test]
    fn sanitize_makes_file_names() {
        assert_eq!(sanitize("farm coordinator/1"), "farm_coordinator_1");
        assert_eq!(sanitize(".."), "x..");
        assert_eq!(sanitize(""), "x");
    }

    #[test]
    fn render_includes_files_and_transcripts() -> anyhow::Result<()> {
        let logs = TestLogs::new("render")?;
        let (path, _file) = logs.create_log_file("proc")?;
        std::fs::write(&path, "hello from the process\n")?;
        let (path2, _file2) = logs.create_log_file("proc")?;
        assert_ne!(
            path, path2,
            "a second log of the same name gets its own file"
        );
        logs.record("$ echo hi", "hi\n");
        let text = logs.render();
        assert!(text.contains("hello from the process"), "{text}");
        assert!(text.contains("$ echo hi"), "{text}");
        assert!(!text.contains("still running"), "{text}");
        let id = lock(&logs.registry()).add("a stand-in", 4_000_000, false);
        let text = logs.render();
        assert!(text.contains("still running"), "{text}");
        assert!(text.contains("a stand-in (pid 4000000"), "{text}");
        lock(&logs.registry()).remove(id);
        assert!(logs.running().is_empty());
        Ok(())
    }

    #[test]
    fn descendants_are_found_through_proc() -> anyhow::Result<()> {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()?;
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let found = descendants(&[child.id()]);
            if found.len() >= 2 || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let _ = child.kill();
        for p in &found {
            crate::process::signal_all(&[p.to_string()], "KILL");
        }
        let _ = child.wait();
        assert_eq!(found.len(), 2, "{found:?}");
        Ok(())
    }
}
