//! `farm up`: a coordinator and one builder using the local Nix, in one
//! process, state in one directory (`--state-dir`, default
//! `$XDG_STATE_HOME/nix-farm` or `~/.local/state/nix-farm`):
//! `DIR/coordinator` (the coordinator's state, cache and `endpoints.json`) and
//! `DIR/builder` (the builder's key, enrolled in-process) and, on Linux,
//! `DIR/builder-store` (the builder's own chroot store, see [`builder_store`]).
//! Prints how to point Nix and the CLI at it, then runs until Ctrl-C or SIGTERM.
//!
//! Who may use it: `DIR/client/id_ed25519` (generated on first start, 0600 in
//! a 0700 directory) and the user's own `~/.ssh/id_*.pub` keys are admitted at
//! admin level (it is that user's own farm) as [`KeyPolicy::extra`] entries,
//! alongside any key files passed on. Nix reaches the farm through the relay
//! socket `DIR/relay.sock`, which admits only this user's uid and root
//! (`SO_PEERCRED`): the machines line it prints is
//! `ssh-ng://localhost?remote-program=…farm nix-relay --socket DIR/relay.sock`,
//! which Nix runs locally (host `localhost` means no ssh), so it works as
//! printed for this user and for root's nix-daemon. Nix 2.8 machine URIs cannot
//! carry the SSH endpoint's port, so the SSH form (for other hosts, naming the
//! generated key) is printed second, with the ssh_config entry it needs.
//!
//! [`KeyPolicy::extra`]: farm_coordinator::access::KeyPolicy::extra

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::args::UpArgs;
use crate::config::{client_key_path, default_state_dir};
use crate::error::CliError;
use crate::machines::{MachinesJson, render};
use crate::style::{Colour, Painter};
use farm_common::keys::AuthorizedKey;
use farm_coordinator::access::Level;

/// How long the local builder has to stop before the coordinator stops.
const BUILDER_STOP: Duration = Duration::from_secs(30);

/// The `farm-coordinator` command line `farm up`'s flags amount to (so the
/// coordinator's own parser, environment and `--config` file rules apply).
pub fn coordinator_argv(args: &UpArgs, state_dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["farm-coordinator".into(), "--state-dir".into()];
    v.push(state_dir.join("coordinator").into());
    let mut opt = |flag: &str, value: Option<OsString>| {
        if let Some(value) = value {
            v.push(flag.into());
            v.push(value);
        }
    };
    opt("--config", args.coordinator_config.clone().map(Into::into));
    opt("--grpc", args.grpc.clone().map(Into::into));
    opt("--http", args.http.clone().map(Into::into));
    opt("--ssh", args.ssh.clone().map(Into::into));
    opt("--public-host", args.public_host.clone().map(Into::into));
    opt("--read-keys", args.read_keys.clone().map(Into::into));
    opt(
        "--authorized-keys",
        args.authorized_keys.clone().map(Into::into),
    );
    opt("--push-keys", args.push_keys.clone().map(Into::into));
    opt("--admin-keys", args.admin_keys.clone().map(Into::into));
    opt("--builder-keys", args.builder_keys.clone().map(Into::into));
    opt(
        "--cache-key-name",
        args.cache_key_name.clone().map(Into::into),
    );
    v
}

/// The builder's settings (its coordinator URL is filled in once the
/// coordinator is up).
pub fn builder_config(args: &UpArgs, state_dir: &Path) -> farm_builder::BuilderConfig {
    let mut c = farm_builder::BuilderConfig::new("http://127.0.0.1:0", state_dir.join("builder"));
    c.name = args.builder_name.clone();
    c.max_jobs = args.max_jobs;
    c.systems = args.systems.clone();
    if !args.features.is_empty() {
        c.features = Some(args.features.clone());
    }
    c.set_store(builder_store(args.builder_store.as_deref(), state_dir));
    c
}

/// The store the local builder builds in: `--builder-store` (`auto` for
/// Nix's default store), else on Linux a chroot store of its own under the
/// state directory (store dir still `/nix/store`, files in
/// `STATE/builder-store/nix/store`). Its own store is what lets a
/// `nix-build --builders` on this machine's store use the farm: Nix holds
/// the output locks in its store while its build hook waits, so a builder
/// building the same outputs into that same store would wait on them
/// forever. Nix on Linux builds every derivation of a chroot store in its
/// sandbox; on macOS it cannot build in a diverted store at all, so there
/// the builder uses the local store (and the line works from a client with
/// its own store).
pub fn builder_store(flag: Option<&str>, state_dir: &Path) -> Option<String> {
    match flag {
        Some("auto") => None,
        Some(uri) => Some(uri.to_owned()),
        None if cfg!(target_os = "linux") => Some(format!(
            "local?root={}",
            percent_encode(&state_dir.join("builder-store").to_string_lossy())
        )),
        None => None,
    }
}

/// Run `farm up`.
pub async fn run(args: &UpArgs) -> Result<(), CliError> {
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir(
            std::env::var_os("XDG_STATE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        )?,
    };
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| CliError::io_path("creating", &state_dir, e))?;
    private_dir(&state_dir)?;

    let cargs = farm_coordinator::config::Args::try_parse_from(coordinator_argv(args, &state_dir))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut cconf = farm_coordinator::CoordinatorConfig::from_args(cargs)
        .map_err(|e| CliError::Config(e.to_string()))?;

    // Who may use it: the generated client key and the user's own keys, at admin.
    let client_key = client_key_path(&state_dir);
    cconf
        .keys
        .extra
        .push((Level::Admin, load_or_generate_client_key(&client_key)?));
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    for (path, key) in user_public_keys(home.as_deref()) {
        tracing::info!(key = %path.display(), "authorized at admin (your own key)");
        cconf.keys.extra.push((Level::Admin, key));
    }
    // Nix's way in: the relay socket, for this user and root only.
    let relay_socket = match &cconf.relay_socket {
        Some(s) => s.clone(),
        None => {
            let s = state_dir.join("relay.sock");
            cconf.relay_socket = Some(s.clone());
            cconf.relay_level = Level::Admin;
            s
        }
    };
    if cconf.relay_uids.is_none() {
        let me = rustix::process::getuid().as_raw();
        cconf.relay_uids = Some(if me == 0 { vec![0] } else { vec![me, 0] });
    }

    // The builder's key, enrolled in-process.
    let mut bconf = builder_config(args, &state_dir);
    let builder_name = bconf.resolved_name();
    let builder_store = bconf.store.clone();
    if !args.no_builder {
        // Loaded or generated here (not by `prepare_key`, which prints a new
        // key's line for manual enrolment: this one is enrolled in-process).
        let dir = &bconf.state_dir;
        std::fs::create_dir_all(dir).map_err(|e| CliError::io_path("creating", dir, e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| CliError::io_path("securing", dir, e))?;
        }
        let (key, _) = farm_builder::BuilderKey::load_or_generate(
            &bconf.key_path(),
            &format!("farm-builder@{builder_name}"),
        )
        .map_err(|e| CliError::Config(format!("builder key: {e}")))?;
        cconf.extra_builder_keys.push(key.public_line().to_owned());
    }

    // The builder gets up to BUILDER_STOP to finish, then the coordinator its grace.
    let stop_grace = BUILDER_STOP + cconf.shutdown_grace;
    let running = farm_coordinator::start(cconf)
        .await
        .map_err(|e| CliError::Config(format!("starting the coordinator: {e}")))?;
    let endpoints = running.endpoints().clone();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut builder_task = None;
    if !args.no_builder {
        bconf.coordinator = endpoints.grpc_url();
        if endpoints.grpc_tls {
            bconf.ca_cert = endpoints.tls_cert.clone();
        }
        let mut rx = stop_rx.clone();
        builder_task = Some(tokio::spawn(farm_builder::run(bconf, async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
        // Wait (bounded) for the builder to join, so the machines line has its systems.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let joined = running
                .coordinator()
                .status()
                .builders
                .iter()
                .any(|b| b.online && b.record.name == builder_name);
            if joined {
                break;
            }
            if builder_task.as_ref().is_some_and(|t| t.is_finished())
                || tokio::time::Instant::now() > deadline
            {
                tracing::warn!(
                    "the local builder has not joined yet; `farm status` shows when it does"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let m = running.coordinator().machine("ssh-ng");
    let farm_exe = std::env::current_exe()
        .map_err(|e| CliError::io("finding the farm binary for the machines line", e))?;
    let (local_line, ssh_line) =
        local_and_ssh_lines(&m.machines_line, &farm_exe, &relay_socket, &client_key);
    let machines = MachinesJson::from(farm_proto::v1::MachinesResponse {
        machines_line: local_line,
        nix_conf_lines: m.nix_conf_lines,
        ssh_config: String::new(),
    });
    let grpc_url = endpoints.grpc_url();
    let mut intro = format!(
        "nix-farm is up; state in {}\n  gRPC:  {grpc_url}\n  cache: http://{}\n  SSH:   {}\n",
        state_dir.display(),
        endpoints.http,
        endpoints.ssh
    );
    if !args.no_builder {
        intro.push_str(&format!(
            "  builder: {builder_name} (the local Nix, {})\n",
            match &builder_store {
                Some(store) => format!("store {store}"),
                None => "the local store".to_owned(),
            }
        ));
    }
    intro.push_str(&format!(
        "\nexport FARM_COORDINATOR={grpc_url}{}\n\n",
        match (&endpoints.grpc_tls, &endpoints.tls_cert) {
            (true, Some(c)) => format!(" FARM_CA_CERT={}", c.display()),
            _ => String::new(),
        }
    ));
    intro.push_str(&format!(
        "client key: {} (admin; `farm` as this user uses it with no settings)\n\n",
        client_key.display()
    ));
    let painter = Painter {
        enabled: crate::style::stdout_colour(),
    };
    let mut rest = render(&machines, &painter);
    rest.push_str(&painter.paint(
        Colour::Dim,
        "# The line above runs `farm nix-relay` locally (no ssh: Nix runs host \"localhost\" itself)\n\
         # through the relay socket, which admits only this user and root: it works as printed for\n\
         # your nix-build and root's nix-daemon. Other local users are refused.\n\
         # From another host, over SSH with the generated key instead (copy the key there):\n",
    ));
    rest.push_str(&ssh_line);
    rest.push('\n');
    let ssh = m.ssh_config.trim_end();
    if !ssh.is_empty() {
        rest.push_str(&painter.paint(
            Colour::Dim,
            "# with this ssh_config entry (Nix 2.8 machine URIs cannot carry a port):\n",
        ));
        rest.push_str(ssh);
        rest.push('\n');
    }
    print!("{intro}{rest}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    // Run until a signal, or until the builder gives up.
    let builder_ended = async {
        match &mut builder_task {
            Some(t) => Some(t.await),
            None => std::future::pending().await,
        }
    };
    let mut builder_result = None;
    tokio::select! {
        _ = farm_common::signal::shutdown_signal(stop_grace) => {}
        r = builder_ended => builder_result = r,
    }
    eprintln!("farm up: stopping");
    let _ = stop_tx.send(true);
    if builder_result.is_none()
        && let Some(t) = builder_task
    {
        builder_result = tokio::time::timeout(BUILDER_STOP, t).await.ok();
    }
    let coord = running.shutdown().await;
    match builder_result {
        Some(Ok(Err(e))) => return Err(CliError::Config(format!("the builder stopped: {e}"))),
        Some(Err(e)) => return Err(CliError::Config(format!("the builder task failed: {e}"))),
        _ => {}
    }
    coord.map_err(|e| CliError::Config(format!("the coordinator stopped: {e}")))
}

/// Make `dir` private to its owner (0700).
fn private_dir(dir: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| CliError::io_path("securing", dir, e))
}

/// `farm up`'s client key at `path`: loaded, or generated on first start;
/// its directory 0700 and the key 0600.
fn load_or_generate_client_key(path: &Path) -> Result<AuthorizedKey, CliError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| CliError::io_path("creating", dir, e))?;
    private_dir(dir)?;
    if !path.exists() {
        let host = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        crate::keys::write_ssh_key(path, &format!("farm-up@{host}"))?;
        tracing::info!(key = %path.display(), "generated farm up's client key");
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| CliError::io_path("securing", path, e))?;
    let text = std::fs::read_to_string(path).map_err(|e| CliError::io_path("reading", path, e))?;
    let key = ssh_key::PrivateKey::from_openssh(&text).map_err(|e| {
        CliError::Config(format!(
            "{}: not an OpenSSH private key ({e}); remove it and farm up makes a new one",
            path.display()
        ))
    })?;
    Ok(AuthorizedKey::new(
        key.public_key().key_data().clone(),
        key.comment().to_owned(),
    ))
}

/// The user's own public keys, `~/.ssh/id_*.pub` (any algorithm; one that
/// does not parse is skipped with a warning), sorted by file name.
fn user_public_keys(home: Option<&Path>) -> Vec<(PathBuf, AuthorizedKey)> {
    let Some(dir) = home.map(|h| h.join(".ssh")) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("id_") && n.ends_with(".pub"))
        })
        .collect();
    paths.sort();
    let mut keys = Vec::new();
    for path in paths {
        let parsed = farm_common::keys::read_small_file(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| farm_common::keys::parse_public_key_line(&t).map_err(|e| e.to_string()));
        match parsed {
            Ok(k) => {
                let key = AuthorizedKey::new(k.key_data().clone(), k.comment().to_owned());
                keys.push((path, key));
            }
            Err(error) => tracing::warn!(file = %path.display(), %error, "not authorizing it"),
        }
    }
    keys
}

/// `s` percent-encoded for a store URI's query value (all but unreserved
/// characters and `/`): no space (the machines file splits on it), `#`, `&`, `=`.
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A word as `bash -c` reads it back: single-quoted unless plain.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._/=:,+@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// From the coordinator's SSH machines line (`ssh-ng://HOST SYSTEMS - JOBS
/// SPEED SUPPORTED MANDATORY HOSTKEY`): the local line through the relay
/// (Nix runs `REMOTE-PROGRAM --stdio` with `bash -c` for host `localhost`, and
/// percent-decodes the parameter), and the SSH line naming `client_key`.
pub fn local_and_ssh_lines(
    ssh_line: &str,
    farm_exe: &Path,
    relay_socket: &Path,
    client_key: &Path,
) -> (String, String) {
    let cols: Vec<&str> = ssh_line.split_whitespace().collect();
    let col = |i: usize| cols.get(i).copied().unwrap_or("-");
    let program = format!(
        "{} nix-relay --socket {}",
        shell_word(&farm_exe.to_string_lossy()),
        shell_word(&relay_socket.to_string_lossy())
    );
    let local = format!(
        "ssh-ng://localhost?remote-program={} {} - {} {} {} {} -",
        percent_encode(&program),
        col(1),
        col(3),
        col(4),
        col(5),
        col(6)
    );
    let ssh = format!(
        "{} {} {} {} {} {} {} {}",
        col(0),
        col(1),
        client_key.display(),
        col(3),
        col(4),
        col(5),
        col(6),
        col(7)
    );
    (local, ssh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};

    fn up(argv: &[&str]) -> UpArgs {
        let cli = Cli::try_parse_from(
            std::iter::once("farm")
                .chain(std::iter::once("up"))
                .chain(argv.iter().copied()),
        )
        .unwrap();
        match cli.command {
            Command::Up(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn coordinator_flags_pass_through() {
        let a = up(&[
            "--grpc",
            "127.0.0.1:0",
            "--authorized-keys",
            "/k",
            "--push-keys",
            "/p",
            "--read-keys",
            "/r",
            "--system",
            "x86_64-linux",
        ]);
        let argv = coordinator_argv(&a, Path::new("/s"));
        let argv: Vec<String> = argv
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                "farm-coordinator",
                "--state-dir",
                "/s/coordinator",
                "--grpc",
                "127.0.0.1:0",
                "--read-keys",
                "/r",
                "--authorized-keys",
                "/k",
                "--push-keys",
                "/p"
            ]
        );
        let c = farm_coordinator::CoordinatorConfig::from_args(
            farm_coordinator::config::Args::try_parse_from(coordinator_argv(&a, Path::new("/s")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(c.grpc, "127.0.0.1:0");
        assert_eq!(c.keys.build, Some(PathBuf::from("/k")));
        assert_eq!(c.keys.push, Some(PathBuf::from("/p")));
        assert_eq!(c.keys.read, Some(PathBuf::from("/r")));
        let b = builder_config(&a, Path::new("/s"));
        assert_eq!(b.systems, ["x86_64-linux"]);
        assert_eq!(b.state_dir, PathBuf::from("/s/builder"));
        if cfg!(target_os = "linux") {
            assert_eq!(b.store.as_deref(), Some("local?root=/s/builder-store"));
            assert_eq!(b.store_dir, PathBuf::from("/s/builder-store/nix/store"));
        } else {
            assert_eq!(b.store, None);
        }
    }

    #[test]
    fn the_builders_store() {
        assert_eq!(builder_store(Some("auto"), Path::new("/s")), None);
        assert_eq!(
            builder_store(Some("local?root=/x"), Path::new("/s")).as_deref(),
            Some("local?root=/x")
        );
        let own = builder_store(None, Path::new("/home/me/my state"));
        if cfg!(target_os = "linux") {
            assert_eq!(
                own.as_deref(),
                Some("local?root=/home/me/my%20state/builder-store")
            );
        } else {
            assert_eq!(own, None);
        }
    }

    #[test]
    fn machines_lines_for_the_relay_and_for_ssh() {
        let (local, ssh) = local_and_ssh_lines(
            "ssh-ng://127.0.0.1 x86_64-linux - 4 2 big-parallel,kvm - AAAAKEY",
            Path::new("/opt/my farm/bin/farm"),
            Path::new("/s/relay.sock"),
            Path::new("/s/client/id_ed25519"),
        );
        assert_eq!(
            local,
            "ssh-ng://localhost?remote-program=%27/opt/my%20farm/bin/farm%27%20nix-relay%20--socket%20/s/relay.sock x86_64-linux - 4 2 big-parallel,kvm - -"
        );
        assert_eq!(
            ssh,
            "ssh-ng://127.0.0.1 x86_64-linux /s/client/id_ed25519 4 2 big-parallel,kvm - AAAAKEY"
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }

    #[test]
    fn client_key_is_generated_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = client_key_path(dir.path());
        let a = load_or_generate_client_key(&path).unwrap();
        let b = load_or_generate_client_key(&path).unwrap();
        assert_eq!(a, b, "reused on a later start");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // The CLI loads it as its key.
        crate::client::UserKey::load(&path).unwrap();
    }

    #[test]
    fn the_users_own_public_keys() {
        let home = tempfile::tempdir().unwrap();
        assert!(user_public_keys(Some(home.path())).is_empty());
        let ssh = home.path().join(".ssh");
        crate::keys::write_ssh_key(&ssh.join("id_ed25519"), "me@laptop").unwrap();
        std::fs::write(ssh.join("id_broken.pub"), "not a key\n").unwrap();
        std::fs::write(ssh.join("authorized_keys"), "junk\n").unwrap();
        let keys = user_public_keys(Some(home.path()));
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(keys[0].0, ssh.join("id_ed25519.pub"));
        assert_eq!(keys[0].1.comment(), "me@laptop");
    }
}
