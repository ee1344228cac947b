//! An actor: one participant of a test (a nix client, a builder machine, the
//! store a unit test talks to) with its own Nix store. Its temp root holds
//! `nix/` (bind-mounted over `/nix` in a private mount namespace for every
//! command it runs), `conf/nix.conf`, `home/`, `cache/` and `tmp/`; with
//! [`Actor::wrapper_bin_dir`] also `bin/`, scripts that run the real Nix
//! programs in that namespace for code under test that runs them itself.
//!
//! Every command goes through
//! `unshare --mount sh -c 'mount --bind "$0" /nix && exec "$@"' ROOT/nix PROGRAM ARGS…`:
//! `unshare` (no `--fork`) and `exec` keep the PID of `PROGRAM`, the mount is
//! private to that process tree, and the host's `/nix` is never written. The
//! bind source is passed as an argument, never through the environment, so it
//! cannot silently fall back to binding `/nix` onto itself.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, bail};

use crate::logs::{KeptTempDir, TestLogs, sanitize, temp_dir};
use crate::process::FarmProcess;

/// The `nix.conf` every actor starts with: no sandbox (no user namespaces
/// needed), no substituters (no network), no build users (we are root in a
/// private store).
pub const BASE_NIX_CONF: &str = "\
sandbox = false
substituters =
build-users-group =
experimental-features = nix-command
";

/// The host's settings an actor's commands never see (they would point Nix
/// at the host's daemon, channels or configuration).
const UNSET_ENV: &[&str] = &[
    "NIX_REMOTE",
    "NIX_PATH",
    "NIX_USER_CONF_FILES",
    "XDG_CONFIG_HOME",
    "XDG_CONFIG_DIRS",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
];

/// The Nix programs code under test runs (see [`Actor::wrapper_bin_dir`]).
pub const NIX_PROGRAMS: &[&str] = &["nix", "nix-store", "nix-instantiate", "nix-build"];

/// The script run by `sh -c`: `$0` is the actor's nix dir, `$@` the command.
const NAMESPACE_SCRIPT: &str = r#"mount --bind "$0" /nix && exec "$@""#;

/// One test participant with its own `/nix`.
#[derive(Debug)]
pub struct Actor {
    name: String,
    logs: TestLogs,
    // Declared last: removed after everything else is dropped.
    root: KeptTempDir,
}

impl Actor {
    /// A new actor with its own logs (printed when the test fails).
    pub fn new(name: &str) -> anyhow::Result<Actor> {
        let logs = TestLogs::new(name)?;
        Actor::with_logs(name, &logs)
    }

    /// A new actor whose command transcripts go to `logs` (shared with the
    /// test's other actors and processes).
    pub fn with_logs(name: &str, logs: &TestLogs) -> anyhow::Result<Actor> {
        check_environment()?;
        let root = temp_dir(&format!("actor-{}", sanitize(name)))?;
        for dir in ["nix", "conf", "home", "cache", "tmp"] {
            std::fs::create_dir_all(root.path().join(dir))
                .with_context(|| format!("creating {dir} in {}", root.path().display()))?;
        }
        std::fs::write(root.path().join("conf/nix.conf"), BASE_NIX_CONF)
            .context("writing nix.conf")?;
        let actor = Actor {
            name: name.to_owned(),
            logs: logs.clone(),
            root,
        };
        actor
            .run("nix-store", &["--init"])
            .with_context(|| format!("initialising the store of actor {name}"))?;
        if !actor.root().join("nix/var/nix/db").is_dir() {
            bail!(
                "`nix-store --init` did not create {}/nix/var/nix/db",
                actor.root().display()
            );
        }
        Ok(actor)
    }

    /// The actor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The logs this actor records its commands in.
    pub fn logs(&self) -> &TestLogs {
        &self.logs
    }

    /// The actor's temp root on the host.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The host directory mounted on `/nix` in the actor's namespace.
    pub fn nix_dir_on_host(&self) -> PathBuf {
        self.root().join("nix")
    }

    /// The host path of the actor's `/nix/store`.
    pub fn store_dir_on_host(&self) -> PathBuf {
        self.root().join("nix/store")
    }

    /// The host path of a store path of this actor (`/nix/store/x` →
    /// `ROOT/nix/store/x`; also `/nix/store/x/sub` → `ROOT/nix/store/x/sub`).
    pub fn host_path(&self, store_path: &str) -> anyhow::Result<PathBuf> {
        let rest = store_path
            .strip_prefix("/nix/store/")
            .with_context(|| format!("{store_path:?} is not under /nix/store"))?;
        if rest.is_empty() || Path::new(rest).components().any(|c| c.as_os_str() == "..") {
            bail!("{store_path:?} is not a path in the store");
        }
        Ok(self.store_dir_on_host().join(rest))
    }

    /// The actor's `NIX_CONF_DIR`.
    pub fn conf_dir(&self) -> PathBuf {
        self.root().join("conf")
    }

    /// Appends a line to the actor's `nix.conf`.
    pub fn nix_conf_append(&self, line: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let path = self.conf_dir().join("nix.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(file, "{}", line.trim_end_matches('\n'))
            .with_context(|| format!("appending to {}", path.display()))
    }

    /// A command running `program` in the actor's mount namespace (its store on
    /// `/nix`) with its `nix.conf`, `HOME`, `XDG_CACHE_HOME` and `TMPDIR`, and
    /// without `NIX_REMOTE`. Add arguments, env, stdio as with any `Command`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let root = self.root();
        let mut cmd = Command::new("unshare");
        cmd.arg("--mount")
            .arg("sh")
            .arg("-c")
            .arg(NAMESPACE_SCRIPT)
            .arg(self.nix_dir_on_host())
            .arg(program)
            .env("NIX_CONF_DIR", self.conf_dir())
            .env("HOME", root.join("home"))
            .env("XDG_CACHE_HOME", root.join("cache"))
            .env("TMPDIR", root.join("tmp"))
            .stdin(Stdio::null());
        for var in UNSET_ENV {
            cmd.env_remove(var);
        }
        cmd
    }

    /// [`Actor::command`] as a tokio command (killed when dropped).
    pub fn tokio_command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(self.command(program));
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs `program args…` in the actor's namespace and returns its stdout.
    /// A failure's error names the command and carries its exit status and stderr.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> anyhow::Result<String> {
        let mut cmd = self.command(program);
        cmd.args(args);
        self.run_command(cmd)
    }

    /// Runs a command made by [`Actor::command`] (stdin null, output captured),
    /// records it in the logs, and returns its stdout; fails like [`Actor::run`].
    /// While it runs the command is registered with the logs, so an expiring
    /// [`deadline`](crate::deadline) lists and kills it.
    pub fn run_command(&self, cmd: Command) -> anyhow::Result<String> {
        let stdout = self.run_command_bytes(cmd)?;
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }

    /// [`Actor::run_command`] returning stdout as bytes (a NAR, an export).
    pub fn run_command_bytes(&self, mut cmd: Command) -> anyhow::Result<Vec<u8>> {
        let shown = show_command(&cmd);
        let title = format!("[{}] $ {shown}", self.name);
        let output = crate::process::tracked_output(&self.logs, &title, &mut cmd)
            .with_context(|| format!("[{}] cannot start {shown}", self.name))?;
        self.check_output(&shown, output)
    }

    /// [`Actor::run_bytes`] with `input` on the command's stdin.
    pub fn run_with_input<S: AsRef<OsStr>>(
        &self,
        program: &str,
        args: &[S],
        input: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        let mut cmd = self.command(program);
        cmd.args(args);
        let shown = show_command(&cmd);
        let title = format!("[{}] $ {shown} < {} bytes", self.name, input.len());
        let output =
            crate::process::tracked_output_with_input(&self.logs, &title, &mut cmd, Some(input))
                .with_context(|| format!("[{}] cannot start {shown}", self.name))?;
        self.check_output(&shown, output)
    }

    /// [`Actor::run`] returning stdout as bytes.
    pub fn run_bytes<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> anyhow::Result<Vec<u8>> {
        let mut cmd = self.command(program);
        cmd.args(args);
        self.run_command_bytes(cmd)
    }

    /// Runs `program args…` in the actor's namespace, recorded in the logs,
    /// and returns its output whatever its exit status (for a command
    /// expected to fail).
    pub fn output<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> anyhow::Result<Output> {
        let mut cmd = self.command(program);
        cmd.args(args);
        let shown = show_command(&cmd);
        let title = format!("[{}] $ {shown}", self.name);
        let output = crate::process::tracked_output(&self.logs, &title, &mut cmd)
            .with_context(|| format!("[{}] cannot start {shown}", self.name))?;
        self.record(&shown, &output);
        Ok(output)
    }

    /// Async [`Actor::run`], for tests on a multi-threaded tokio runtime (the
    /// command is waited for with [`tokio::task::block_in_place`]).
    pub async fn run_async<S: AsRef<OsStr>>(
        &self,
        program: &str,
        args: &[S],
    ) -> anyhow::Result<String> {
        tokio::task::block_in_place(|| self.run(program, args))
    }

    fn check_output(&self, shown: &str, output: Output) -> anyhow::Result<Vec<u8>> {
        self.record(shown, &output);
        if !output.status.success() {
            bail!(
                "[{}] `{shown}` failed ({})\nstderr:\n{}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
        Ok(output.stdout)
    }

    /// Records a command's transcript (status, tails of stdout and stderr).
    fn record(&self, shown: &str, output: &Output) {
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let mut transcript = format!("exit: {}\n", output.status);
        if !stdout.is_empty() {
            let _ = write!(transcript, "stdout:\n{}", crate::logs::tail(&stdout, 50));
        }
        if !stderr.is_empty() {
            if !transcript.ends_with('\n') {
                transcript.push('\n');
            }
            let _ = write!(transcript, "stderr:\n{}", crate::logs::tail(&stderr, 100));
        }
        self.logs
            .record(format!("[{}] $ {shown}", self.name), transcript);
    }

    /// Writes `contents` to `ROOT/<relative>` (creating directories) and
    /// returns the host path, which is also valid inside the namespace.
    pub fn write_file(&self, relative: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let rel = Path::new(relative);
        if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
            bail!("{relative:?} must be a relative path inside the actor's root");
        }
        let path = self.root().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Whether `store_path` is a valid path in the actor's store (its
    /// database, not just the file system).
    pub fn is_valid(&self, store_path: &str) -> anyhow::Result<bool> {
        let out = self.run(
            "nix-store",
            &["--check-validity", "--print-invalid", store_path],
        )?;
        Ok(out.trim().is_empty())
    }

    /// Spawns `program args…` inside this actor's namespace (its `/nix`) as a
    /// [`FarmProcess`] logging to the actor's [`TestLogs`].
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        name: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> anyhow::Result<FarmProcess> {
        let mut cmd = self.command(program);
        cmd.args(args);
        FarmProcess::spawn(self.logs(), &format!("{}/{name}", self.name()), cmd)
    }

    /// A directory in the actor's root for a daemon's state (created).
    pub fn state_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root().join("state").join(sanitize(name));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// `ROOT/bin` holding one script per program of `programs` (found on
    /// `PATH` now) that runs it in the actor's namespace with the actor's
    /// `nix.conf`, `HOME` and `XDG_CACHE_HOME`, without `NIX_REMOTE`: for code
    /// under test that runs Nix itself (`--nix-bin-dir`). `TMPDIR` is the
    /// caller's.
    pub fn wrapper_bin_dir(&self, programs: &[&str]) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        let bin = self.root().join("bin");
        std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        for program in programs {
            let real = find_on_path(program)?;
            let script = format!(
                "#!/bin/sh\n\
                 unset {unset}\n\
                 export NIX_CONF_DIR={conf} HOME={home} XDG_CACHE_HOME={cache}\n\
                 exec unshare --mount sh -c {ns} {nix} {real} \"$@\"\n",
                unset = UNSET_ENV.join(" "),
                conf = shell_quote(&self.conf_dir()),
                home = shell_quote(&self.root().join("home")),
                cache = shell_quote(&self.root().join("cache")),
                ns = shell_quote(Path::new(NAMESPACE_SCRIPT)),
                nix = shell_quote(&self.nix_dir_on_host()),
                real = shell_quote(&real),
            );
            let path = bin.join(program);
            std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", path.display()))?;
        }
        Ok(bin)
    }
}

/// A derivation expression building with `/bin/sh` only (no nixpkgs): `script`
/// runs with `$out` set. Interpolations of other derivations make dependencies.
pub fn sh_derivation(name: &str, script: &str) -> String {
    format!(
        "derivation {{\n  name = {};\n  system = builtins.currentSystem;\n  builder = \"/bin/sh\";\n  args = [ \"-c\" {} ];\n}}\n",
        nix_string(name),
        nix_string(script)
    )
}

/// `s` as a Nix string literal (escaping `\`, `"` and `${`).
pub fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where `program` is on `PATH`.
fn find_on_path(program: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|f| f.is_file())
        })
        .with_context(|| format!("`{program}` is not on PATH"))
}

/// `path` in single quotes for `sh`.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

/// The command line as the user would type it (without the namespace wrapper).
fn show_command(cmd: &Command) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .skip(5) // --mount sh -c SCRIPT NIXDIR
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("{a:?}")
            } else {
                a.into_owned()
            }
        })
        .collect();
    args.join(" ")
}

/// Checks once that this process can make mount namespaces and that `/nix`
/// exists to mount over (creating an empty `/nix` if it is missing).
fn check_environment() -> anyhow::Result<()> {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| check_environment_once().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn check_environment_once() -> anyhow::Result<()> {
    if !is_root()? {
        bail!(
            "the end-to-end tests run as root: each actor bind-mounts its own store \
             over /nix in a private mount namespace (`unshare --mount`)"
        );
    }
    if !Path::new("/nix").is_dir() {
        std::fs::create_dir_all("/nix")
            .context("creating an empty /nix to bind-mount actor stores over")?;
    }
    for tool in ["unshare", "nix-store", "nix-build"] {
        if find_on_path(tool).is_err() {
            bail!(
                "`{tool}` is not on PATH; install Nix and util-linux \
                 (`apt-get install -y nix-bin util-linux`)"
            );
        }
    }
    let out = Command::new("unshare")
        .args(["--mount", "true"])
        .output()
        .context("running `unshare --mount true`")?;
    if !out.status.success() {
        bail!(
            "cannot create a mount namespace (`unshare --mount true`: {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn is_root() -> anyhow::Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid line in /proc/self/status")?;
    // Uid: real effective saved fs
    Ok(uid_line.split_whitespace().nth(2) == Some("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_string_escapes() {
        assert_eq!(nix_string("a\"b\\c${d}$e\n"), r#""a\"b\\c\${d}$e\n""#);
    }

    #[test]
    fn sh_derivation_is_an_expression() {
        let e = sh_derivation("x", "echo ${HOME} > $out");
        assert!(e.contains("builder = \"/bin/sh\""), "{e}");
        assert!(e.contains(r#""echo \${HOME} > $out""#), "{e}");
    }
}
