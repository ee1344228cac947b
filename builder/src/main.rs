//! `farm-builder` binary entry point: flags, logging, signals, then [`farm_builder::run`].

use anyhow::Context;
use clap::Parser;
use farm_builder::config::Args;

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
    farm_builder::run(config, shutdown_signal(grace))
        .await
        .context("farm-builder")?;
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM. From then on a second signal exits
/// at once, and whatever hangs, the process is gone shortly after its grace
/// period (a watchdog thread, so a stuck runtime cannot hold it); as the
/// coordinator does.
async fn shutdown_signal(grace: std::time::Duration) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(grace_secs = grace.as_secs_f64(), "shutdown requested");
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
    std::thread::spawn(move || {
        std::thread::sleep(grace + std::time::Duration::from_secs(2));
        eprintln!("shutdown took longer than its grace period; exiting");
        std::process::exit(1);
    });
}
