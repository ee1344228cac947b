//! `farm-coordinator` binary entry point: flags (and `FARM_*` environment,
//! `--config` TOML) into a [`CoordinatorConfig`], logs to stderr (`RUST_LOG`,
//! default `info`), run until SIGINT or SIGTERM.
use clap::Parser;
use farm_coordinator::CoordinatorConfig;
use farm_coordinator::config::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    farm_coordinator::run(config, shutdown).await?;
    Ok(())
}
