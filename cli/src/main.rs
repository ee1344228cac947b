//! `farm`: the command line to see and drive the farm. Parses the command
//! line, resolves the settings, runs the subcommand and turns its error into
//! the documented exit status (see [`error`]).

mod args;
mod build;
mod client;
mod config;
mod error;
mod jobs;
mod keys;
mod machines;
mod nix;
mod ops;
mod relay;
mod status;
mod style;
#[cfg(feature = "up")]
mod up;
mod upload;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::args::{Cli, Command, KeysCommand};
use crate::client::Farm;
use crate::error::{CliError, EXIT_OK, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    // `farm nix-relay`: stdout and stderr belong to the Nix session (no logging).
    if let Command::NixRelay(a) = &cli.command {
        return relay::run(a);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if matches!(cli.command, Command::Up(_)) {
            "info"
        } else {
            "warn"
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("farm: cannot start the async runtime: {e}");
            return ExitCode::from(error::EXIT_FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            match &e {
                CliError::Interrupted => {}
                CliError::BuildFailed(m) => eprintln!("farm: {m}"),
                e => eprintln!("farm: error: {e}"),
            }
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let env = config::Env::from_process();
    match &cli.command {
        Command::Completions(a) => {
            let mut cmd = Cli::command();
            clap_complete::generate(a.shell, &mut cmd, "farm", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man(a) => return write_man_pages(&a.out),
        Command::Keys(k) => {
            return match k {
                KeysCommand::Cache(a) => keys::cache(a),
                KeysCommand::Ssh(a) => keys::ssh(a),
                KeysCommand::RotateCache(a) => keys::rotate_cache(a),
            };
        }
        Command::Config => {
            let settings = config::resolve(&cli.global, &env)?;
            print!("{}", settings.render());
            return Ok(());
        }
        #[cfg(feature = "up")]
        Command::Up(a) => return up::run(a).await,
        #[cfg(not(feature = "up"))]
        Command::Up(_) => {
            return Err(CliError::Usage(
                "this farm binary was built without `farm up` (cargo feature `up`); \
                 install one with default features: cargo install --path cli"
                    .into(),
            ));
        }
        _ => {}
    }
    let settings = config::resolve(&cli.global, &env)?;
    // `farm build` connects while Nix evaluates.
    if let Command::Build(a) = &cli.command {
        return build::run(Farm::connect(&settings), a).await;
    }
    let farm = Farm::connect(&settings).await?;
    match &cli.command {
        Command::Status(a) => status::run(&farm, a).await,
        Command::Jobs(a) => jobs::run(&farm, a).await,
        Command::Logs(a) => ops::logs(&farm, a).await,
        Command::Cancel(a) => ops::cancel(&farm, a).await,
        Command::Drain(a) => ops::drain(&farm, a, true).await,
        Command::Undrain(a) => ops::drain(&farm, a, false).await,
        Command::Machines(a) => machines::run(&farm, a).await,
        Command::Dashboard(a) => ops::dashboard(&farm, a).await,
        Command::Build(_)
        | Command::Completions(_)
        | Command::Man(_)
        | Command::Keys(_)
        | Command::Config
        | Command::NixRelay(_)
        | Command::Up(_) => Ok(()),
    }
}

/// Write `farm.1` and one page per subcommand (`farm-build.1`, …) to `dir`.
fn write_man_pages(dir: &std::path::Path) -> Result<(), CliError> {
    std::fs::create_dir_all(dir).map_err(|e| CliError::io_path("creating", dir, e))?;
    let cmd = Cli::command();
    let mut written = Vec::new();
    let mut render = |cmd: clap::Command, name: String| -> Result<(), CliError> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        // The page's title; a one-shot command, so leaking the name is harmless.
        let title: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(cmd.name(title))
            .render(&mut buf)
            .map_err(|e| CliError::io("rendering the man page", e))?;
        std::fs::write(&path, buf).map_err(|e| CliError::io_path("writing", &path, e))?;
        written.push(path);
        Ok(())
    };
    render(cmd.clone(), "farm".into())?;
    for sub in cmd.get_subcommands() {
        let name = format!("farm-{}", sub.get_name());
        render(sub.clone(), name)?;
    }
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn build_flags_parse() {
        let cli = Cli::try_parse_from([
            "farm", "build", "x.nix", "-A", "a", "-A", "b", "--arg", "n", "1", "--argstr", "s",
            "v", "-L", "--json",
        ])
        .unwrap();
        let Command::Build(b) = cli.command else {
            panic!("not build")
        };
        assert_eq!(b.attrs, ["a", "b"]);
        assert_eq!(b.args, ["n", "1"]);
        assert_eq!(b.argstrs, ["s", "v"]);
        assert!(b.print_build_logs && b.json);
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = Cli::try_parse_from(["farm", "status", "--coordinator", "http://x:1", "--json"])
            .unwrap();
        assert_eq!(cli.global.coordinator.as_deref(), Some("http://x:1"));
        let cli = Cli::try_parse_from(["farm", "status", "--watch"]).unwrap();
        let Command::Status(s) = cli.command else {
            panic!()
        };
        assert_eq!(s.watch, Some(2.0));
    }

    #[test]
    fn man_pages_render() {
        let dir = tempfile::tempdir().unwrap();
        write_man_pages(dir.path()).unwrap();
        let main = std::fs::read_to_string(dir.path().join("farm.1")).unwrap();
        assert!(main.contains("farm"));
        assert!(dir.path().join("farm-build.1").exists());
    }
}
