//! `farm-coordinator` binary entry point: flags (and `FARM_*` environment,
//! `--config` TOML) into a [`CoordinatorConfig`], logs to stderr (`RUST_LOG`,
//! default `info`), run until SIGINT or SIGTERM. `farm-coordinator stdio` is the
//! relay an OpenSSH forced command runs (see [`farm_coordinator::nix_endpoint::StdioArgs`]).
use clap::Parser;
use farm_coordinator::CoordinatorConfig;
use farm_coordinator::config::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `farm-coordinator stdio …`: the relay for OpenSSH-fronted sites (no logging:
    // stdout and stderr belong to the Nix session).
    if std::env::args_os().nth(1).is_some_and(|a| a == "stdio") {
        let args =
            farm_coordinator::nix_endpoint::StdioArgs::parse_from(std::env::args_os().skip(1));
        let code = farm_coordinator::nix_endpoint::run_stdio(args).await;
        std::process::exit(i32::try_from(code).unwrap_or(1));
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = CoordinatorConfig::from_args(args)?;
    let grace = config.shutdown_grace;
    // A second signal exits at once; whatever hangs, the process is gone
    // shortly after its grace period (shared with the builder).
    let shutdown = farm_common::signal::shutdown_signal(grace);
    farm_coordinator::run(config, shutdown).await?;
    Ok(())
}
