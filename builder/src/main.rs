//! `farm-builder` binary entry point: flags, logging, signals (the farm's
//! shared SIGTERM/SIGINT handling, `farm_common::signal`), then [`farm_builder::run`].

use anyhow::Context;
use clap::Parser;
use farm_builder::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FARM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let print_only = args.print_public_key;
    let config = args.into_config()?;
    if print_only {
        let (key, origin) = farm_builder::prepare_key(&config)?;
        // prepare_key already printed a freshly generated key.
        if origin == farm_builder::KeyOrigin::Loaded {
            println!("{}", key.public_line());
        }
        return Ok(());
    }
    let grace = config.shutdown_grace;
    farm_builder::run(config, farm_common::signal::shutdown_signal(grace))
        .await
        .context("farm-builder")?;
    Ok(())
}
