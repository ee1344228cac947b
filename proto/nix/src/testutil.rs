//! Test helpers shared by farm-nix's unit tests: captures of real Nix 2.8
//! conversations, running the real `nix-store`/`nix-hash`, and private Nix
//! stores (`unshare --mount` + a bind mount over `/nix`, with their own
//! nix.conf), so tests never touch the host's `/nix`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::derivation::{BasicDerivation, Derivation, name_from_drv_path};
use crate::store_path::StorePath;
use crate::wire;

/// A current-thread tokio runtime (I/O and timers enabled) for tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

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

/// Run `cmd`, feeding `stdin`, and return stdout; panics with stderr on failure.
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

/// `nix-store --dump path`.
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

/// A fresh, private Nix store: `ROOT/nix` is bind-mounted over `/nix` in a
/// private mount namespace for every command, with `ROOT/conf/nix.conf`.
pub struct PrivateStore {
    dir: tempfile::TempDir,
}

impl PrivateStore {
    pub fn new() -> PrivateStore {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["nix/store", "nix/var/nix", "conf"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        std::fs::write(
            dir.path().join("conf/nix.conf"),
            "sandbox = false\nsubstituters =\nbuild-users-group =\n\
             experimental-features = nix-command\n",
        )
        .expect("write nix.conf");
        PrivateStore { dir }
    }

    /// Host path of this store's `/nix/store`.
    pub fn store_on_host(&self) -> PathBuf {
        self.dir.path().join("nix/store")
    }

    /// `program args…` inside the namespace.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "sh",
            "-c",
            r#"mount --bind "$0/nix" /nix && NIX_CONF_DIR="$0/conf" exec "$@""#,
        ])
        .arg(self.dir.path())
        .arg(program)
        .args(args)
        .env_remove("NIX_REMOTE");
        cmd
    }

    /// [`PrivateStore::command`] as a tokio process, killed when dropped.
    pub fn async_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(self.command(program, args));
        cmd.kill_on_drop(true);
        cmd
    }

    /// Run and return stdout.
    pub fn run(&self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
        run(self.command(program, args), stdin)
    }

    /// Run and return stdout as trimmed text.
    pub fn run_str(&self, program: &str, args: &[&str]) -> String {
        String::from_utf8(self.run(program, args, None))
            .expect("utf-8")
            .trim()
            .to_string()
    }
}

/// Instantiate the captures' test derivation (`test.nix`, taken from
/// `make-captures.sh`) with `salt` in `store`, as the capture scenario did;
/// returns the `.drv` path `nix-instantiate` printed.
pub fn instantiate_capture_drv(store: &PrivateStore, salt: &str) -> String {
    let script = std::fs::read_to_string(captures_dir().join("make-captures.sh")).unwrap();
    let start = script
        .find("<<'NIX'\n")
        .expect("test.nix in make-captures.sh")
        + "<<'NIX'\n".len();
    let len = script[start..].find("\nNIX\n").expect("end of test.nix");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("test.nix");
    std::fs::write(&file, &script[start..start + len + 1]).unwrap();
    store.run_str(
        "nix-instantiate",
        &[file.to_str().unwrap(), "--argstr", "salt", salt],
    )
}

/// Check a `BasicDerivation` a real Nix client sent in a `BuildDerivation`
/// request (`req_bytes`: op `op`, the `.drv` path, the derivation, options)
/// against the `.drv` files in `store`: it must be `Derivation::to_basic` of
/// `drv_path` with the used outputs of its input derivations added to the
/// input sources (what Nix's build hook sends), and our encoding of that must
/// be the captured bytes.
pub async fn check_captured_basic_derivation(
    store: &PrivateStore,
    op: u64,
    req_bytes: &[u8],
    drv_path: &StorePath,
    drv: &BasicDerivation,
) {
    let read_drv = |p: &StorePath| {
        let file = store.store_on_host().join(p.base_name());
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{p} was not instantiated: {e}"));
        Derivation::parse_aterm(&text).unwrap()
    };
    let full = read_drv(drv_path);
    let mut want = full.to_basic(&name_from_drv_path(drv_path).unwrap());
    for (input, outputs) in &full.input_drvs {
        let paths = read_drv(input).output_paths();
        for o in outputs {
            want.input_srcs.insert(paths[o].clone());
        }
    }
    assert_eq!(*drv, want, "{drv_path}");
    let mut head = op.to_le_bytes().to_vec();
    wire::write_store_path(&mut head, drv_path).await.unwrap();
    let mut bytes = Vec::new();
    wire::write_basic_derivation(&mut bytes, &want)
        .await
        .unwrap();
    assert_eq!(req_bytes[..head.len()], head[..], "{drv_path}");
    assert!(
        req_bytes[head.len()..].starts_with(&bytes),
        "wire form of {drv_path}"
    );
}
