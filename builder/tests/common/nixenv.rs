//! A private Nix store for tests: ROOT/nix bind-mounted on /nix inside a mount
//! namespace, with wrapper scripts (`ROOT/bin/nix-store`, …) that enter it, so a
//! builder under test that runs "nix-store" from ROOT/bin uses this store and
//! never the real /nix.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct NixEnv {
    pub dir: tempfile::TempDir,
}

const PROGRAMS: &[&str] = &["nix", "nix-store", "nix-instantiate", "nix-build"];

impl NixEnv {
    pub fn new() -> NixEnv {
        let dir = tempfile::Builder::new()
            .prefix("farm-builder-nix-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("nix")).unwrap();
        std::fs::create_dir_all(root.join("conf")).unwrap();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(
            root.join("conf/nix.conf"),
            "sandbox = false\nsubstituters =\nbuild-users-group =\nexperimental-features = nix-command\n",
        )
        .unwrap();
        for prog in PROGRAMS {
            let script = format!(
                "#!/bin/sh\nexec unshare --mount sh -c 'mount --bind \"$0/nix\" /nix && NIX_CONF_DIR=\"$0/conf\" exec /usr/bin/{prog} \"$@\"' '{}' \"$@\"\n",
                root.display()
            );
            let path = root.join("bin").join(prog);
            std::fs::write(&path, script).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        NixEnv { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.root().join("bin")
    }

    /// Run a wrapped Nix program; panics with its stderr on failure.
    pub fn run(&self, prog: &str, args: &[&str]) -> String {
        let out = Command::new(self.bin_dir().join(prog))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{prog} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run with bytes on stdin.
    pub fn run_bytes(&self, prog: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new(self.bin_dir().join(prog))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The host path of a store path of this store.
    pub fn host_path(&self, store_path: &str) -> PathBuf {
        self.root().join(store_path.trim_start_matches('/'))
    }

    /// Whether the store holds `path` as a valid path.
    pub fn is_valid(&self, path: &str) -> bool {
        Command::new(self.bin_dir().join("nix-store"))
            .args(["--check-validity", path])
            .output()
            .unwrap()
            .status
            .success()
    }
}
