//! Test helpers shared by the protocol tests: captures of real Nix 2.8
//! conversations, and private Nix stores for live tests against real Nix.

use std::path::{Path, PathBuf};

/// Directory holding the captures.
pub fn captures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/captures")
}

/// Every capture whose name starts with `prefix`: (name, client→server bytes, server→client bytes).
pub fn captures(prefix: &str) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(captures_dir()).expect("captures dir") {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".c2s")
            && stem.starts_with(prefix)
        {
            let dir = captures_dir();
            let c2s = std::fs::read(dir.join(&name)).unwrap();
            let s2c = std::fs::read(dir.join(format!("{stem}.s2c"))).unwrap();
            out.push((stem.to_owned(), c2s, s2c));
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no captures named {prefix}*");
    out
}

/// A private Nix store (its own `/nix`, bound in a mount namespace) and nix.conf.
pub struct PrivateStore {
    pub dir: tempfile::TempDir,
}

impl PrivateStore {
    pub fn new() -> PrivateStore {
        let dir = tempfile::tempdir().unwrap();
        for d in ["nix/store", "nix/var/nix", "conf"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(
            dir.path().join("conf/nix.conf"),
            "sandbox = false\nsubstituters =\nbuild-users-group =\nexperimental-features = nix-command\n",
        )
        .unwrap();
        PrivateStore { dir }
    }

    /// `program args…` running with this store on `/nix`.
    pub fn command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("unshare");
        c.arg("--mount")
            .arg("sh")
            .arg("-c")
            .arg(r#"mount --bind "$0/nix" /nix && NIX_CONF_DIR="$0/conf" exec "$@""#)
            .arg(self.dir.path())
            .arg(program)
            .args(args)
            .env_remove("NIX_REMOTE")
            .kill_on_drop(true);
        c
    }

    /// Run to completion; stdout on success, panic with stderr otherwise.
    pub async fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program, args).output().await.unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}
