//! The Nix side of the repository: every `.nix` file (NixOS and nix-darwin
//! modules, `flake.nix`, the VM test) must parse with the real Nix
//! (`nix-instantiate --parse`), and the modules must pass
//! `nixos-modules/check.sh` (evaluation with nixpkgs' module system, command
//! lines checked against the farm binaries, `docs/options.md` regenerated)
//! with nixpkgs' lib from `NIXPKGS_LIB`, else from `../shared/nixpkgs-lib/lib`
//! beside the checkout (so `cargo test --workspace` needs no setup there).
//! With neither, the test fails: it never passes without evaluating.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Every `*.nix` file under `dir`, skipping build output and git metadata.
fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | ".git" | "node_modules") {
                nix_files(&path, out);
            }
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

/// `nix-instantiate --parse` against a dummy store: parsing needs no store,
/// and this keeps the test off the host's /nix.
fn parse(file: &Path) -> std::process::Output {
    Command::new("nix-instantiate")
        .args(["--store", "dummy://", "--parse"])
        .arg(file)
        .env("NIX_PATH", "")
        .output()
        .expect("running nix-instantiate (apt-get install nix-bin)")
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    nix_files(&repo_root(), &mut files);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(repo_root()).unwrap().display().to_string())
        .collect();
    for expected in [
        "flake.nix",
        "nixos-modules/coordinator.nix",
        "nixos-modules/builder.nix",
        "nixos-modules/client.nix",
        "nixos-modules/darwin-builder.nix",
        "nixos-modules/tests/farm.nix",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not found among {names:?}"
        );
    }
    let mut failures = Vec::new();
    for (file, name) in files.iter().zip(&names) {
        let out = parse(file);
        if !out.status.success() {
            failures.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "unparsable:\n{}", failures.join("\n"));
}

/// The parse check can fail: a syntax error is reported as one.
#[test]
fn a_syntax_error_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.nix");
    std::fs::write(&bad, "{ services.nix-farm.client = { enable = true; ").unwrap();
    let out = parse(&bad);
    assert!(!out.status.success(), "a truncated attribute set parsed");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("syntax error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where nixpkgs' lib is: `NIXPKGS_LIB`, else `../shared/nixpkgs-lib/lib`.
fn nixpkgs_lib() -> PathBuf {
    if let Some(lib) = std::env::var_os("NIXPKGS_LIB") {
        return PathBuf::from(lib);
    }
    let shared = repo_root().join("../shared/nixpkgs-lib/lib");
    assert!(
        shared.join("modules.nix").is_file(),
        "no nixpkgs lib to evaluate the modules with: set NIXPKGS_LIB=/path/to/nixpkgs/lib \
         (e.g. a checkout of github:nix-community/nixpkgs.lib), or put it at {}",
        shared.display()
    );
    shared
}

/// The full module check with nixpkgs' lib and the farm binaries this test
/// run built.
#[test]
fn modules_evaluate_with_nixpkgs_lib() {
    let lib = nixpkgs_lib();
    let bin_dir = farm_tests::farm_bin("farm-coordinator")
        .expect("building the farm binaries")
        .parent()
        .expect("a binary has a directory")
        .to_path_buf();
    let out = Command::new(repo_root().join("nixos-modules/check.sh"))
        .arg(&lib)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .expect("running nixos-modules/check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\n0 failure(s)"), "{stdout}");
    assert!(
        !stdout.contains("REWRITTEN"),
        "docs/options.md was out of date with the modules; check.sh rewrote it: commit it\n{stdout}"
    );
}
