//! Test helpers: run the real `nix-store`/`nix-hash`, and a private Nix store
//! in a mount namespace (`unshare --mount` + bind mount over `/nix`), so tests
//! never touch the host's `/nix`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Run `cmd`, feeding `stdin`, and return stdout; panics with stderr on failure.
pub(crate) fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Vec<u8> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let out = child.wait_with_output().expect("wait");
    if let Some(f) = feeder {
        f.join().expect("stdin feeder");
    }
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `nix-store --dump path`.
pub(crate) fn nix_dump(path: &Path) -> Vec<u8> {
    let mut cmd = Command::new("nix-store");
    cmd.arg("--dump").arg(path);
    run(cmd, None)
}

/// `nix-hash --type sha256 --base32 path` (the sha256 of its NAR, nix32).
pub(crate) fn nix_hash(path: &Path) -> String {
    let mut cmd = Command::new("nix-hash");
    cmd.args(["--type", "sha256", "--base32"]).arg(path);
    String::from_utf8(run(cmd, None))
        .expect("utf-8")
        .trim()
        .to_string()
}

/// A fresh, private Nix store: `ROOT/nix` is bind-mounted over `/nix` in a
/// private mount namespace for every command.
pub(crate) struct PrivateStore {
    dir: tempfile::TempDir,
}

impl PrivateStore {
    pub(crate) fn new() -> PrivateStore {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("nix")).expect("mkdir nix");
        std::fs::create_dir_all(dir.path().join("conf")).expect("mkdir conf");
        std::fs::write(
            dir.path().join("conf/nix.conf"),
            "sandbox = false\nsubstituters =\nbuild-users-group =\n\
             experimental-features = nix-command\n",
        )
        .expect("write nix.conf");
        PrivateStore { dir }
    }

    /// Host path of this store's `/nix/store`.
    pub(crate) fn store_on_host(&self) -> PathBuf {
        self.dir.path().join("nix/store")
    }

    /// `program args…` inside the namespace.
    pub(crate) fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "sh",
            "-c",
            "mount --bind \"$0/nix\" /nix && NIX_CONF_DIR=\"$0/conf\" exec \"$@\"",
        ])
        .arg(self.dir.path())
        .arg(program)
        .args(args);
        cmd
    }

    /// Run and return stdout.
    pub(crate) fn run(&self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
        run(self.command(program, args), stdin)
    }

    /// Run and return stdout as trimmed text.
    pub(crate) fn run_str(&self, program: &str, args: &[&str]) -> String {
        String::from_utf8(self.run(program, args, None))
            .expect("utf-8")
            .trim()
            .to_string()
    }
}
