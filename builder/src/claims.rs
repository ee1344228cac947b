//! Claim jobs and the builder's store. A claim job builds a client's
//! unverified build-hook derivation (the job's `claim_owner`): its unsigned
//! inputs (that client's claims) and its outputs are bytes nobody verified,
//! at real store paths. The builder's store must never lend them to another
//! job: a valid path is taken as it is (as an input it is not fetched again,
//! as an output Nix reports it already valid), so a signed job would carry
//! them into a signed upload, and another client's claim job into its claims.
//!
//! So ([`StoreGuard`]):
//! - a claim job has the store to itself: it takes it exclusively, every other
//!   job shared (a fair lock: neither kind starves the other);
//! - before it imports or builds anything, the paths it may leave (the
//!   unsigned inputs the store lacks, its outputs not valid yet) are written
//!   to `STATE_DIR/claim-paths` ([`StoreGuard::record`]);
//! - before it lets go of the store its local Nix is stopped, with every
//!   build it started, and gone (the executor kills the process tree: a
//!   process whose environment or open files name a path keeps it alive for
//!   Nix's GC); then it deletes the paths (`nix-store --delete`), checks with
//!   Nix that none is valid any more, and removes the file
//!   ([`StoreGuard::purge`]; a few retries, holding the store);
//! - if that fails, or a crash left the file behind (its paths are deleted
//!   when the builder starts), the builder is tainted: it refuses every job,
//!   naming the paths, and keeps trying to delete them in the background
//!   (every [`BACKGROUND_PAUSE`] at most); once that works it takes jobs
//!   again. A taint that deleting cannot cure (the file unreadable) lasts
//!   until an operator acts. The coordinator sees each refusal as a failed
//!   attempt, and the taint in the builder's load reports (`farm status`).
//!
//! This holds as long as a build cannot write to the store itself (Nix's
//! build users or sandbox): a builder that runs builds as root without a
//! sandbox trusts every derivation it runs, whoever sent it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use farm_nix::store_path::StorePath;
use tokio::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::probe::NixBin;

/// Extra attempts at deleting a claim job's paths while holding the store,
/// and the pause between them (10 s in all: the job's processes are gone by
/// then, this covers a slow exit of something outside the job's tree).
const PURGE_RETRIES: u32 = 20;
const PURGE_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Once tainted: the first pause before deleting again in the background,
/// and the longest (the pause doubles up to it).
const BACKGROUND_FIRST: Duration = Duration::from_secs(2);
pub(crate) const BACKGROUND_PAUSE: Duration = Duration::from_secs(30);

/// The file listing what a running (or crashed) claim job may have left.
const CLAIM_PATHS: &str = "claim-paths";

/// A job's hold on the store: shared for signed jobs, exclusive for claim jobs.
pub(crate) enum Section<'a> {
    Shared(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

#[derive(Default)]
struct State {
    /// Paths the claim job in the store may leave (as in the file).
    recorded: BTreeSet<StorePath>,
    /// Why the store is not to be used, once it is not.
    tainted: Option<String>,
    /// A background task is deleting the recorded paths again.
    retrying: bool,
}

/// How often and how soon purges are tried (shorter in tests).
#[derive(Debug, Clone, Copy)]
struct Pauses {
    retries: u32,
    retry: Duration,
    background_first: Duration,
    background_max: Duration,
}

const PAUSES: Pauses = Pauses {
    retries: PURGE_RETRIES,
    retry: PURGE_RETRY_PAUSE,
    background_first: BACKGROUND_FIRST,
    background_max: BACKGROUND_PAUSE,
};

/// Keeps claim jobs' unverified paths out of every other job's way (cheap
/// to clone: one guard per store).
#[derive(Clone)]
pub(crate) struct StoreGuard {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    lock: RwLock<()>,
    /// Set when a claim job's section ended without its cleanup (its task
    /// panicked or was dropped): no job may use the store until a restart
    /// runs [`StoreGuard::recover`] on the file.
    abandoned: AtomicBool,
    state: Mutex<State>,
    /// The taint, readable without the async lock (for load reports).
    problem: std::sync::Mutex<Option<String>>,
    file: PathBuf,
    bin: NixBin,
    pauses: Pauses,
}

impl std::ops::Deref for StoreGuard {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl StoreGuard {
    pub(crate) fn new(state_dir: &Path, bin: NixBin) -> StoreGuard {
        Self::with_pauses(state_dir, bin, PAUSES)
    }

    fn with_pauses(state_dir: &Path, bin: NixBin, pauses: Pauses) -> StoreGuard {
        StoreGuard {
            inner: Arc::new(Inner {
                lock: RwLock::new(()),
                abandoned: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                problem: std::sync::Mutex::new(None),
                file: state_dir.join(CLAIM_PATHS),
                bin,
                pauses,
            }),
        }
    }

    /// Why the store takes no jobs now, if it does not.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.abandoned.load(Ordering::SeqCst) {
            return Some(self.abandoned_message());
        }
        self.problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn abandoned_message(&self) -> String {
        format!(
            "a claim job ended without deleting what it brought into the store; restart the builder (it deletes the paths listed in {} at start)",
            self.file.display()
        )
    }

    /// At start: delete what a claim job that did not finish left (listed in
    /// the file); the store is tainted if that cannot be done.
    pub(crate) async fn recover(&self) {
        let _store = self.lock.write().await;
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                self.taint(format!("cannot read {}: {e}", self.file.display()))
                    .await;
                return;
            }
        };
        let mut paths = BTreeSet::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            match StorePath::parse(line) {
                Ok(p) => {
                    paths.insert(p);
                }
                Err(e) => {
                    self.taint(format!("{}: {line:?}: {e}", self.file.display()))
                        .await;
                    return;
                }
            }
        }
        tracing::warn!(
            paths = paths.len(),
            "an earlier claim job did not finish; deleting what it left in the store"
        );
        self.state.lock().await.recorded = paths;
        self.purge().await;
    }

    /// Take the store for a job: exclusively for a claim job. Refused (with
    /// the reason) when the store is tainted.
    pub(crate) async fn enter(&self, claim: bool) -> Result<Section<'_>, String> {
        let section = if claim {
            Section::Exclusive(self.lock.write().await)
        } else {
            Section::Shared(self.lock.read().await)
        };
        if self.abandoned.load(Ordering::SeqCst) {
            return Err(self.abandoned_message());
        }
        match &self.state.lock().await.tainted {
            Some(why) => Err(why.clone()),
            None => Ok(section),
        }
    }

    /// The cleanup a claim job owes before its section ends: run it with
    /// [`ClaimCleanup::purge`]; dropped without that (a panic, a dropped
    /// task), it marks the store abandoned.
    pub(crate) fn cleanup(&self) -> ClaimCleanup<'_> {
        ClaimCleanup {
            guard: self,
            done: false,
        }
    }

    /// Note paths the claim job holding the store may leave, durably, before
    /// it imports or builds them.
    pub(crate) async fn record(
        &self,
        paths: impl IntoIterator<Item = StorePath>,
    ) -> Result<(), String> {
        let mut st = self.state.lock().await;
        let before = st.recorded.len();
        st.recorded.extend(paths);
        if st.recorded.len() == before && self.file.exists() {
            return Ok(());
        }
        let text: String = st.recorded.iter().map(|p| format!("{p}\n")).collect();
        write_durably(&self.file, text.as_bytes()).map_err(|e| {
            format!(
                "recording a claim job's paths in {}: {e}",
                self.file.display()
            )
        })
    }

    /// Delete the recorded paths from the store (the claim job holding it is
    /// over, its Nix stopped and gone) and check that none is valid any more;
    /// then forget them. Otherwise the store is tainted, and deleting goes
    /// on in the background until it works.
    pub(crate) async fn purge(&self) {
        let paths: Vec<StorePath> = self.state.lock().await.recorded.iter().cloned().collect();
        if !paths.is_empty() {
            // Something may still be exiting: retry a little before tainting.
            let mut result = self.delete(&paths).await;
            for _ in 0..self.pauses.retries {
                if result.is_ok() {
                    break;
                }
                tokio::time::sleep(self.pauses.retry).await;
                result = self.delete(&paths).await;
            }
            match result {
                Ok(()) => {
                    tracing::info!(
                        paths = paths.len(),
                        "deleted a claim job's paths from the store"
                    );
                }
                Err(why) => {
                    let list: Vec<String> = paths.iter().map(ToString::to_string).collect();
                    self.taint(format!(
                        "the store may still hold unverified paths of a claim job ({why}); this builder takes no jobs until they are deleted (it keeps trying; by hand: nix-store --delete {}, then remove {} and restart it)",
                        list.join(" "),
                        self.file.display()
                    ))
                    .await;
                    self.retry_in_background().await;
                    return;
                }
            }
        }
        self.forget().await;
    }

    /// The paths are gone: forget them and remove the file (or taint).
    async fn forget(&self) {
        self.state.lock().await.recorded.clear();
        if let Err(e) = std::fs::remove_file(&self.file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            self.taint(format!("cannot remove {}: {e}", self.file.display()))
                .await;
        }
    }

    /// Start (once) a task deleting the recorded paths until that works,
    /// then lifting the taint. The store stays tainted meanwhile, so no
    /// job enters it while any of the paths may remain.
    async fn retry_in_background(&self) {
        {
            let mut st = self.state.lock().await;
            if st.retrying {
                return;
            }
            st.retrying = true;
        }
        let guard = self.clone();
        tokio::spawn(async move {
            let mut pause = guard.pauses.background_first;
            let mut attempts = 0u32;
            loop {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(guard.pauses.background_max);
                attempts += 1;
                let paths: Vec<StorePath> =
                    guard.state.lock().await.recorded.iter().cloned().collect();
                match guard.delete(&paths).await {
                    Ok(()) => {
                        guard.forget().await;
                        let mut st = guard.state.lock().await;
                        st.retrying = false;
                        if st.recorded.is_empty() && !guard.file.exists() {
                            st.tainted = None;
                            *guard
                                .problem
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                            tracing::warn!(
                                paths = paths.len(),
                                attempts,
                                "deleted the claim job's paths at last: the builder's store is clean, taking jobs again"
                            );
                        }
                        return;
                    }
                    Err(why) => {
                        tracing::warn!(
                            attempts,
                            error = %why,
                            next_in_secs = pause.as_secs(),
                            "the builder's store still holds a claim job's paths; trying again"
                        );
                    }
                }
            }
        });
    }

    async fn delete(&self, paths: &[StorePath]) -> Result<(), String> {
        let out = self
            .bin
            .store_command("nix-store")
            .arg("--delete")
            .args(paths.iter().map(ToString::to_string))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("running nix-store --delete: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nix-store --delete: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        // What Nix now holds valid of them: nothing.
        let out = self
            .bin
            .store_command("nix-store")
            .args(["--check-validity", "--print-invalid"])
            .args(paths.iter().map(ToString::to_string))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("running nix-store --check-validity: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let invalid: BTreeSet<&str> = text.lines().map(str::trim).collect();
        if !out.status.success() {
            return Err(format!(
                "nix-store --check-validity: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        match paths
            .iter()
            .find(|p| !invalid.contains(p.to_string().as_str()))
        {
            Some(p) => Err(format!("{p} is still valid after nix-store --delete")),
            None => Ok(()),
        }
    }

    async fn taint(&self, why: String) {
        tracing::error!(reason = %why, "the builder's store is not safe to build in");
        *self
            .problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why.clone());
        self.state.lock().await.tainted = Some(why);
    }
}

/// A claim job's pending cleanup (see [`StoreGuard::cleanup`]).
pub(crate) struct ClaimCleanup<'a> {
    guard: &'a StoreGuard,
    done: bool,
}

impl ClaimCleanup<'_> {
    /// Delete what the claim job brought into the store (or taint it).
    pub(crate) async fn purge(mut self) {
        self.guard.purge().await;
        self.done = true;
    }
}

impl Drop for ClaimCleanup<'_> {
    fn drop(&mut self) {
        if !self.done {
            tracing::error!(
                "a claim job ended without its cleanup; the builder takes no jobs until it is restarted"
            );
            self.guard.abandoned.store(true, Ordering::SeqCst);
        }
    }
}

/// Write `data` to `path` through a temporary file, synced before and after the rename.
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        StorePath::parse(&format!("/nix/store/{}-{name}", "a".repeat(32))).unwrap()
    }

    /// A `nix-store` that fails, as one that cannot delete a path does.
    fn failing_nix(dir: &Path) -> NixBin {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let prog = bin.join("nix-store");
        std::fs::write(&prog, "#!/bin/sh\necho 'cannot delete' >&2\nexit 1\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        NixBin::new(Some(bin))
    }

    #[tokio::test]
    async fn a_claim_job_has_the_store_alone() {
        let dir = tempfile::tempdir().unwrap();
        let g = StoreGuard::new(dir.path(), NixBin::new(None));
        let a = g.enter(false).await.unwrap();
        let b = g.enter(false).await.unwrap();
        // Exclusive waits for both shared holders.
        let ex = tokio::time::timeout(std::time::Duration::from_millis(100), g.enter(true)).await;
        assert!(ex.is_err(), "a claim job entered beside signed jobs");
        drop((a, b));
        let ex = g.enter(true).await.unwrap();
        let sh = tokio::time::timeout(std::time::Duration::from_millis(100), g.enter(false)).await;
        assert!(sh.is_err(), "a signed job entered beside a claim job");
        drop(ex);
        g.enter(false).await.unwrap();
    }

    const QUICK: Pauses = Pauses {
        retries: 2,
        retry: Duration::from_millis(10),
        background_first: Duration::from_millis(20),
        background_max: Duration::from_millis(50),
    };

    /// A `nix-store` that cannot delete until `DIR/deletable` exists (as
    /// when a process still holds the paths), and then does.
    fn nix_deleting_once(dir: &Path) -> NixBin {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let prog = bin.join("nix-store");
        let gate = dir.join("deletable");
        std::fs::write(
            &prog,
            format!(
                r#"#!/bin/sh
case "$1" in
--delete) [ -e {gate} ] && exit 0; echo "error: cannot delete path '$2' since it is still alive" >&2; exit 1;;
--check-validity) [ -e {gate} ] || exit 0; shift 2; for p in "$@"; do echo "$p"; done; exit 0;;
esac
exit 1
"#,
                gate = gate.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        NixBin::new(Some(bin))
    }

    #[tokio::test]
    async fn a_tainted_store_is_cleaned_in_the_background_and_used_again() {
        let dir = tempfile::tempdir().unwrap();
        let g = StoreGuard::with_pauses(dir.path(), nix_deleting_once(dir.path()), QUICK);
        {
            let _ex = g.enter(true).await.unwrap();
            let cleanup = g.cleanup();
            g.record([sp("z")]).await.unwrap();
            cleanup.purge().await;
        }
        let why = g.enter(false).await.err().expect("tainted");
        assert!(
            why.contains("still alive") && why.contains(&sp("z").to_string()),
            "{why}"
        );
        assert_eq!(g.problem().as_deref(), Some(why.as_str()));
        // Still failing: still tainted, the file kept.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(g.enter(true).await.is_err());
        assert!(dir.path().join(CLAIM_PATHS).exists());
        // What held the paths is gone: the background delete works, the
        // taint is lifted, the file removed.
        std::fs::write(dir.path().join("deletable"), "").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while g.problem().is_some() {
            assert!(std::time::Instant::now() < deadline, "still tainted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!dir.path().join(CLAIM_PATHS).exists());
        drop(g.enter(true).await.unwrap());
        g.enter(false).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_delete_taints_the_store_and_a_crash_is_recovered_from() {
        let dir = tempfile::tempdir().unwrap();
        let g = StoreGuard::with_pauses(dir.path(), failing_nix(dir.path()), QUICK);
        {
            let _ex = g.enter(true).await.unwrap();
            g.record([sp("x")]).await.unwrap();
            let listed = std::fs::read_to_string(dir.path().join(CLAIM_PATHS)).unwrap();
            assert_eq!(listed, format!("{}\n", sp("x")));
            g.purge().await;
        }
        let why = g.enter(false).await.err().expect("tainted");
        assert!(why.contains(&sp("x").to_string()), "{why}");
        assert!(g.enter(true).await.is_err());
        // The file stays: a restart tries again, and stays tainted while it fails.
        assert!(dir.path().join(CLAIM_PATHS).exists());
        let again = StoreGuard::with_pauses(dir.path(), failing_nix(dir.path()), QUICK);
        again.recover().await;
        assert!(again.enter(false).await.is_err());
        // Nothing recorded: nothing to delete, no file, not tainted.
        let clean = tempfile::tempdir().unwrap();
        let fresh = StoreGuard::with_pauses(clean.path(), failing_nix(clean.path()), QUICK);
        fresh.recover().await;
        {
            let _ex = fresh.enter(true).await.unwrap();
            fresh.purge().await;
        }
        fresh.enter(false).await.unwrap();
    }

    #[tokio::test]
    async fn a_claim_job_dropped_before_its_cleanup_leaves_the_store_refused() {
        let dir = tempfile::tempdir().unwrap();
        let g = StoreGuard::new(dir.path(), NixBin::new(None));
        {
            let _ex = g.enter(true).await.unwrap();
            let _cleanup = g.cleanup();
            g.record([sp("y")]).await.unwrap();
            // The job's task ends here without purge (a panic, a drop).
        }
        let why = g.enter(false).await.err().expect("abandoned");
        assert!(why.contains("restart the builder"), "{why}");
        assert!(g.enter(true).await.is_err());
        // A cleanup that ran leaves the store usable.
        let clean = tempfile::tempdir().unwrap();
        let fresh = StoreGuard::new(clean.path(), NixBin::new(None));
        {
            let _ex = fresh.enter(true).await.unwrap();
            fresh.cleanup().purge().await;
        }
        fresh.enter(false).await.unwrap();
    }
}
