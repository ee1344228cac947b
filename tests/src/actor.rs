//! The end-to-end tests' actor: [`farm_testkit::Actor`] (its own `/nix`, every
//! command in its mount namespace) with the store paths its commands print
//! parsed as farm-nix [`StorePath`]s. Everything else is the testkit actor's,
//! through `Deref`; the testkit cannot name farm-nix's types itself (farm-nix's
//! tests depend on it).

use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use farm_nix::StorePath;
use farm_testkit::TestLogs;

/// One test participant with its own `/nix`.
#[derive(Debug)]
pub struct Actor {
    inner: farm_testkit::Actor,
}

impl Deref for Actor {
    type Target = farm_testkit::Actor;

    fn deref(&self) -> &farm_testkit::Actor {
        &self.inner
    }
}

impl Actor {
    /// A new actor with its own logs (printed when the test fails).
    pub fn new(name: &str) -> anyhow::Result<Actor> {
        Ok(Actor {
            inner: farm_testkit::Actor::new(name)?,
        })
    }

    /// A new actor whose command transcripts go to `logs` (shared with the
    /// test's other actors and processes).
    pub fn with_logs(name: &str, logs: &TestLogs) -> anyhow::Result<Actor> {
        Ok(Actor {
            inner: farm_testkit::Actor::with_logs(name, logs)?,
        })
    }

    /// The host path of a store path of this actor (`/nix/store/x` → `ROOT/nix/store/x`).
    pub fn host_path_of(&self, path: &StorePath) -> PathBuf {
        self.store_dir_on_host().join(path.base_name())
    }

    /// `nix-build --no-out-link EXPR_FILE ARGS…`; returns the output paths it printed.
    pub fn nix_build<S: AsRef<OsStr>>(
        &self,
        expr_file: &Path,
        args: &[S],
    ) -> anyhow::Result<Vec<StorePath>> {
        let mut cmd = self.command("nix-build");
        cmd.arg("--no-out-link").arg(expr_file).args(args);
        parse_store_paths(&self.inner.run_command(cmd)?)
    }

    /// `nix-instantiate EXPR_FILE ARGS…`; returns the `.drv` paths it printed.
    pub fn nix_instantiate<S: AsRef<OsStr>>(
        &self,
        expr_file: &Path,
        args: &[S],
    ) -> anyhow::Result<Vec<StorePath>> {
        let mut cmd = self.command("nix-instantiate");
        cmd.arg(expr_file).args(args);
        parse_store_paths(&self.inner.run_command(cmd)?)
    }

    /// `nix-store --add PATH` (a host path, e.g. one under [`Actor::root`]).
    pub fn add_to_store(&self, path: &Path) -> anyhow::Result<StorePath> {
        let mut cmd = self.command("nix-store");
        cmd.arg("--add").arg(path);
        single_store_path(&self.inner.run_command(cmd)?)
    }

    /// Whether `path` is a valid path in the actor's store (its database, not
    /// just the file system).
    pub fn is_valid_path(&self, path: &StorePath) -> anyhow::Result<bool> {
        self.inner.is_valid(&path.to_string())
    }

    /// The closure of `path` in the actor's store (`nix-store -qR`).
    pub fn closure(&self, path: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        parse_store_paths(&self.run("nix-store", &["-qR", &path.to_string()])?)
    }
}

fn parse_store_paths(stdout: &str) -> anyhow::Result<Vec<StorePath>> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| StorePath::parse(l).with_context(|| format!("{l:?} is not a store path")))
        .collect()
}

fn single_store_path(stdout: &str) -> anyhow::Result<StorePath> {
    match parse_store_paths(stdout)?.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("expected one store path, got {other:?}"),
    }
}
