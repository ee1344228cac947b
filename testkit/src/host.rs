//! Commands on the host, for unit tests that compare with the real Nix tools
//! on files outside any store (`nix-store --dump`, `nix-hash`) and drive
//! async code: a current-thread runtime, a command run to completion that
//! panics with its stderr on failure.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// A current-thread tokio runtime (I/O and timers enabled) for tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Runs `cmd`, feeding `stdin`, and returns stdout; panics with stderr on failure.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Vec<u8> {
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

/// `nix-store --dump path` (the NAR of any file tree).
pub fn nix_dump(path: &Path) -> Vec<u8> {
    let mut cmd = Command::new("nix-store");
    cmd.arg("--dump").arg(path);
    run(cmd, None)
}

/// `nix-hash --type sha256 --base32 path` (the sha256 of its NAR, nix32).
pub fn nix_hash(path: &Path) -> String {
    let mut cmd = Command::new("nix-hash");
    cmd.args(["--type", "sha256", "--base32"]).arg(path);
    String::from_utf8(run(cmd, None))
        .expect("utf-8")
        .trim()
        .to_string()
}
