//! `farm up`: a coordinator and one builder using the local Nix, in one
//! process, state in one directory (`--state-dir`, default
//! `$XDG_STATE_HOME/nix-farm` or `~/.local/state/nix-farm`):
//! `DIR/coordinator` (the coordinator's state, cache and `endpoints.json`) and
//! `DIR/builder` (the builder's key, enrolled in-process). Prints how to point
//! Nix and the CLI at it, then runs until Ctrl-C or SIGTERM.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::args::UpArgs;
use crate::error::CliError;
use crate::machines::{MachinesJson, render};
use crate::style::Painter;

/// How long the local builder has to stop before the coordinator stops.
const BUILDER_STOP: Duration = Duration::from_secs(30);

/// The default state directory.
pub fn default_state_dir(
    xdg_state_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Result<PathBuf, CliError> {
    xdg_state_home
        .map(|d| d.join("nix-farm"))
        .or_else(|| home.map(|h| h.join(".local/state/nix-farm")))
        .ok_or_else(|| {
            CliError::Usage("neither XDG_STATE_HOME nor HOME is set: pass --state-dir".into())
        })
}

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
    opt(
        "--authorized-keys",
        args.authorized_keys.clone().map(Into::into),
    );
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
    c
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

    let cargs = farm_coordinator::config::Args::try_parse_from(coordinator_argv(args, &state_dir))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut cconf = farm_coordinator::CoordinatorConfig::from_args(cargs)
        .map_err(|e| CliError::Config(e.to_string()))?;

    // The builder's key, enrolled in-process.
    let mut bconf = builder_config(args, &state_dir);
    let builder_name = bconf.resolved_name();
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
    let machines = MachinesJson::from(farm_proto::v1::MachinesResponse {
        machines_line: m.machines_line,
        nix_conf_lines: m.nix_conf_lines,
        ssh_config: m.ssh_config,
    });
    let grpc_url = endpoints.grpc_url();
    let mut intro = format!(
        "nix-farm is up; state in {}\n  gRPC:  {grpc_url}\n  cache: http://{}\n  SSH:   {}\n",
        state_dir.display(),
        endpoints.http,
        endpoints.ssh
    );
    if !args.no_builder {
        intro.push_str(&format!("  builder: {builder_name} (the local Nix)\n"));
    }
    intro.push_str(&format!(
        "\nexport FARM_COORDINATOR={grpc_url}{}\n\n",
        match (&endpoints.grpc_tls, &endpoints.tls_cert) {
            (true, Some(c)) => format!(" FARM_CA_CERT={}", c.display()),
            _ => String::new(),
        }
    ));
    print!(
        "{intro}{}",
        render(
            &machines,
            &Painter {
                enabled: crate::style::stdout_colour()
            }
        )
    );
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
    fn state_dir_defaults() {
        assert_eq!(
            default_state_dir(Some("/xdg".into()), Some("/home/u".into())).unwrap(),
            PathBuf::from("/xdg/nix-farm")
        );
        assert_eq!(
            default_state_dir(None, Some("/home/u".into())).unwrap(),
            PathBuf::from("/home/u/.local/state/nix-farm")
        );
        assert!(default_state_dir(None, None).is_err());
    }

    #[test]
    fn coordinator_flags_pass_through() {
        let a = up(&[
            "--grpc",
            "127.0.0.1:0",
            "--authorized-keys",
            "/k",
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
                "--authorized-keys",
                "/k"
            ]
        );
        let c = farm_coordinator::CoordinatorConfig::from_args(
            farm_coordinator::config::Args::try_parse_from(coordinator_argv(&a, Path::new("/s")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(c.grpc, "127.0.0.1:0");
        assert_eq!(c.keys.build, Some(PathBuf::from("/k")));
        let b = builder_config(&a, Path::new("/s"));
        assert_eq!(b.systems, ["x86_64-linux"]);
        assert_eq!(b.state_dir, PathBuf::from("/s/builder"));
    }
}
