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
//! - before it lets go of the store it deletes them (`nix-store --delete`),
//!   checks with Nix that none is valid any more, and removes the file
//!   ([`StoreGuard::purge`]);
//! - if that fails, or a crash left the file behind (its paths are deleted
//!   when the builder starts), the builder is tainted: it refuses every job,
//!   naming the paths, until an operator deletes them and the file and
//!   restarts it. The coordinator sees each refusal as a failed attempt.
//!
//! This holds as long as a build cannot write to the store itself (Nix's
//! build users or sandbox): a builder that runs builds as root without a
//! sandbox trusts every derivation it runs, whoever sent it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use farm_nix::store_path::StorePath;
use tokio::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::probe::NixBin;

/// Extra attempts at deleting a claim job's paths, and the pause between
/// them (30 s in all: enough for a killed job's Nix to exit).
const PURGE_RETRIES: u32 = 60;
const PURGE_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

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
}

/// Keeps claim jobs' unverified paths out of every other job's way.
pub(crate) struct StoreGuard {
    lock: RwLock<()>,
    /// Set when a claim job's section ended without its cleanup (its task
    /// panicked or was dropped): no job may use the store until a restart
    /// runs [`StoreGuard::recover`] on the file.
    abandoned: AtomicBool,
    state: Mutex<State>,
    file: PathBuf,
    bin: NixBin,
}

impl StoreGuard {
    pub(crate) fn new(state_dir: &Path, bin: NixBin) -> StoreGuard {
        StoreGuard {
            lock: RwLock::new(()),
            abandoned: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            file: state_dir.join(CLAIM_PATHS),
            bin,
        }
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
            return Err(format!(
                "a claim job ended without deleting what it brought into the store; restart the builder (it deletes the paths listed in {} at start)",
                self.file.display()
            ));
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
    /// over, its Nix stopped) and check that none is valid any more; then
    /// forget them. Otherwise the store is tainted.
    pub(crate) async fn purge(&self) {
        let paths: Vec<StorePath> = self.state.lock().await.recorded.iter().cloned().collect();
        if !paths.is_empty() {
            // The claim job's Nix may still be exiting (a cancelled or cut-off
            // job's `nix-store --serve` holds temporary roots on the paths
            // until it is gone): retry for a while before tainting the store.
            let mut result = self.delete(&paths).await;
            for _ in 0..PURGE_RETRIES {
                if result.is_ok() {
                    break;
                }
                tokio::time::sleep(PURGE_RETRY_PAUSE).await;
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
                        "the store may still hold unverified paths of a claim job ({why}); this builder takes no jobs until they are deleted (nix-store --delete {}) and {} is removed, then restarted",
                        list.join(" "),
                        self.file.display()
                    ))
                    .await;
                    return;
                }
            }
        }
        self.state.lock().await.recorded.clear();
        if let Err(e) = std::fs::remove_file(&self.file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            self.taint(format!("cannot remove {}: {e}", self.file.display()))
                .await;
        }
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

    #[tokio::test]
    async fn a_failed_delete_taints_the_store_and_a_crash_is_recovered_from() {
        let dir = tempfile::tempdir().unwrap();
        let g = StoreGuard::new(dir.path(), failing_nix(dir.path()));
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
        let again = StoreGuard::new(dir.path(), failing_nix(dir.path()));
        again.recover().await;
        assert!(again.enter(false).await.is_err());
        // Nothing recorded: nothing to delete, no file, not tainted.
        let clean = tempfile::tempdir().unwrap();
        let fresh = StoreGuard::new(clean.path(), failing_nix(clean.path()));
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
