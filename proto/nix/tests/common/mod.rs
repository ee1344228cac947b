//! A private Nix store for tests: a temporary root whose `nix/` is bind-mounted
//! on `/nix` in a fresh mount namespace for every command, with its own
//! nix.conf, HOME and cache directory. The host's `/nix` is never touched.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct NixRoot {
    dir: tempfile::TempDir,
}

impl NixRoot {
    /// A root whose nix.conf holds the base settings plus `extra` lines.
    pub fn new(extra: &[&str]) -> NixRoot {
        let dir = tempfile::Builder::new()
            .prefix("farm-nix-test-")
            .tempdir()
            .unwrap();
        for d in ["nix", "conf", "home", "cache"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let root = NixRoot { dir };
        let mut conf = String::from(
            "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\n",
        );
        if !extra.iter().any(|l| l.starts_with("substituters")) {
            conf.push_str("substituters =\n");
        }
        for l in extra {
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::write(root.path().join("conf/nix.conf"), conf).unwrap();
        root
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Host path of this root's `/nix/store/<base>`.
    pub fn host_path(&self, store_path: &str) -> PathBuf {
        self.path()
            .join("nix/store")
            .join(store_path.strip_prefix("/nix/store/").unwrap())
    }

    /// Run `program args…` inside the namespace.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        let nix_dir = self.path().join("nix");
        Command::new("unshare")
            .args([
                "--mount",
                "--",
                "sh",
                "-c",
                r#"mount --bind "$0" /nix && exec "$@""#,
            ])
            .arg(&nix_dir)
            .arg(program)
            .args(args)
            .env("NIX_CONF_DIR", self.path().join("conf"))
            .env("HOME", self.path().join("home"))
            .env("XDG_CACHE_HOME", self.path().join("cache"))
            .env_remove("NIX_REMOTE")
            .output()
            .unwrap()
    }

    /// Run and return stdout, panicking with stderr on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}
