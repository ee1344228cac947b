//! Locating the farm binaries (`farm-coordinator`, `farm-builder`, `farm`) for
//! end-to-end tests, building them first.
//!
//! Cargo only exposes `CARGO_BIN_EXE_<name>` to tests of the package that
//! defines the binary, and a library dependency does not build a package's
//! binaries. So the first call in a test process runs
//! `$CARGO build -p farm-coordinator -p farm-builder -p farm-cli --bins` with
//! the same target directory and profile as the running test executable
//! (`target/<profile>/deps/<test>` → `target/<profile>/`). When the binaries are
//! fresh this is a no-op taking well under a second; the cargo build lock makes
//! concurrent test binaries safe. The nested cargo runs without the `CARGO_*`
//! variables `cargo test` sets for the test process (they would make build
//! scripts rerun). `FARM_BIN_DIR=DIR` skips the build and takes
//! the binaries from `DIR` (e.g. when packaging the tests).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};

/// The packages whose binaries the end-to-end tests run.
pub const FARM_PACKAGES: &[&str] = &["farm-coordinator", "farm-builder", "farm-cli"];

/// The binaries those packages define.
pub const FARM_BINARIES: &[&str] = &["farm-coordinator", "farm-builder", "farm"];

/// The path of the farm binary `name` (one of [`FARM_BINARIES`]), built first
/// (once per test process) so it is never stale.
pub fn farm_bin(name: &str) -> anyhow::Result<PathBuf> {
    if !FARM_BINARIES.contains(&name) {
        bail!("{name:?} is not a farm binary (expected one of {FARM_BINARIES:?})");
    }
    static BIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BIN_DIR
        .get_or_init(|| locate_and_build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!("farm binary {} does not exist", path.display());
    }
    Ok(path)
}

fn locate_and_build() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FARM_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let layout = BuildLayout::from_test_exe(&exe)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the farm-tests crate has no parent directory")?;

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace)
        .arg("build")
        .arg("--quiet")
        .arg("--bins")
        .arg("--target-dir")
        .arg(&layout.target_dir);
    for package in FARM_PACKAGES {
        cmd.arg("-p").arg(package);
    }
    cmd.args(layout.profile_args());
    // `cargo test` runs us with the test crate's CARGO_MANIFEST_DIR,
    // CARGO_PKG_*, … in the environment. Build scripts that declare
    // `rerun-if-env-changed` on them (ring does, for CARGO_MANIFEST_DIR) would
    // see a change and rebuild half the dependency tree here, and again in the
    // next plain `cargo` run: give the nested cargo a plain environment.
    // (User settings such as CARGO_HOME, CARGO_INCREMENTAL, CARGO_PROFILE_*
    // stay: the outer build used them too.)
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let set_by_cargo_test = k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || matches!(
                &*k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "CARGO_MAKEFLAGS"
            );
        if set_by_cargo_test {
            cmd.env_remove(&key);
        }
    }
    if let Some(triple) = &layout.triple {
        cmd.arg("--target").arg(triple);
    }
    eprintln!("farm-tests: building the farm binaries: {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is CARGO set?)"))?;
    if !out.status.success() {
        bail!(
            "building the farm binaries failed ({}): {cmd:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(layout.profile_dir)
}

/// Where the running test executable was built: `TARGET[/TRIPLE]/PROFILE/deps/EXE`.
#[derive(Debug, PartialEq, Eq)]
struct BuildLayout {
    target_dir: PathBuf,
    triple: Option<String>,
    profile_dir: PathBuf,
    profile: String,
}

impl BuildLayout {
    fn from_test_exe(exe: &Path) -> anyhow::Result<BuildLayout> {
        let parent = exe
            .parent()
            .with_context(|| format!("{} has no parent", exe.display()))?;
        // Cargo marks the target dir itself with CACHEDIR.TAG and keeps its
        // `.rustc_info.json` there (a target dir copied without the tag still
        // has the latter); with `--target TRIPLE` the profile dir sits one
        // level further down.
        let is_target_dir =
            |d: &Path| d.join("CACHEDIR.TAG").exists() || d.join(".rustc_info.json").exists();
        // A test runs from `PROFILE/deps/`; a binary (the benchmark harness,
        // `cargo run -p farm-bench`) from `PROFILE/` itself.
        let in_profile_dir = parent
            .parent()
            .is_some_and(|a| is_target_dir(a) || a.parent().is_some_and(is_target_dir));
        let profile_dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().context("deps has no parent")?.to_path_buf()
        } else if in_profile_dir {
            parent.to_path_buf()
        } else {
            bail!(
                "the executable {} is not in a cargo `deps` or profile directory; \
                 set FARM_BIN_DIR to the directory holding the farm binaries",
                exe.display()
            );
        };
        let profile = name_of(&profile_dir)?;
        let above = profile_dir.parent().context("profile dir has no parent")?;
        let (target_dir, triple) = if is_target_dir(above) {
            (above.to_path_buf(), None)
        } else {
            let target = above
                .parent()
                .context("no target dir above the profile dir")?;
            (target.to_path_buf(), Some(name_of(above)?))
        };
        Ok(BuildLayout {
            target_dir,
            triple,
            profile_dir,
            profile,
        })
    }

    /// Cargo flags selecting the same profile the test was built with. The
    /// `test` profile inherits from `dev` and shares its directory, `bench`
    /// shares `release`'s.
    fn profile_args(&self) -> Vec<String> {
        match self.profile.as_str() {
            "debug" => vec![],
            "release" => vec!["--release".to_owned()],
            other => vec!["--profile".to_owned(), other.to_owned()],
        }
    }
}

fn name_of(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no UTF-8 file name", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_a_plain_debug_build() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let target = tmp.path().join("target");
        std::fs::create_dir_all(target.join("debug/deps"))?;
        std::fs::write(target.join("CACHEDIR.TAG"), "")?;
        let layout = BuildLayout::from_test_exe(&target.join("debug/deps/harness-0123"))?;
        assert_eq!(layout.target_dir, target);
        assert_eq!(layout.triple, None);
        assert_eq!(layout.profile_dir, target.join("debug"));
        assert!(layout.profile_args().is_empty());
        Ok(())
    }

    #[test]
    fn layout_of_a_cross_release_build() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let target = tmp.path().join("target");
        std::fs::create_dir_all(target.join("x86_64-unknown-linux-gnu/release/deps"))?;
        std::fs::write(target.join("CACHEDIR.TAG"), "")?;
        let layout = BuildLayout::from_test_exe(
            &target.join("x86_64-unknown-linux-gnu/release/deps/harness-0123"),
        )?;
        assert_eq!(layout.target_dir, target);
        assert_eq!(layout.triple.as_deref(), Some("x86_64-unknown-linux-gnu"));
        assert_eq!(layout.profile_args(), vec!["--release".to_owned()]);
        Ok(())
    }

    #[test]
    fn layout_of_a_binary_in_the_profile_dir() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let target = tmp.path().join("target");
        std::fs::create_dir_all(target.join("release"))?;
        std::fs::write(target.join("CACHEDIR.TAG"), "")?;
        let layout = BuildLayout::from_test_exe(&target.join("release/farm-bench"))?;
        assert_eq!(layout.target_dir, target);
        assert_eq!(layout.triple, None);
        assert_eq!(layout.profile_dir, target.join("release"));
        assert_eq!(layout.profile_args(), vec!["--release".to_owned()]);
        Ok(())
    }

    #[test]
    fn layout_rejects_an_exe_outside_deps() {
        assert!(BuildLayout::from_test_exe(Path::new("/usr/bin/true")).is_err());
    }

    #[test]
    fn unknown_binary_names_are_refused() {
        assert!(farm_bin("sh").is_err());
    }
}
