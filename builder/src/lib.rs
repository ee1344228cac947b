//! The farm builder: the daemon on each build machine. It probes what the local
//! Nix can build, proves its key to the coordinator, reports its load, and runs
//! the jobs it is sent with the local Nix: fetch missing inputs from the cache,
//! build, stream the log, upload the outputs, report the result.
//!
//! [`run`] is the whole daemon; `farm up` embeds it, the `farm-builder` binary
//! wraps it with flags. The public API is what this file exports (the config,
//! the key, the error, and the [`Execute`] seam tests run jobs through);
//! every module is crate-private.
//!
//! Modules, arrows pointing one way: `session` (the gRPC stream) drives
//! `jobs` (the manager), which runs `executor` (local Nix, `transfer` of
//! NARs); both sides reach the coordinator's data calls through `link`, which
//! depends on neither.

#![deny(unreachable_pub)]

mod claims;
mod config;
mod error;
mod executor;
mod jobs;
mod key;
mod link;
mod load;
mod local;
mod logs;
mod probe;
mod session;
mod transfer;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;

use farm_proto::v1::Capabilities;
use tokio::sync::{mpsc, watch};

pub use config::{Args, BuilderConfig};
pub use error::BuilderError;
use jobs::JobManager;
pub use jobs::{Cancel, CancelReason, Execute, JobContext, failure};
pub use key::{BuilderKey, KeyOrigin};
use probe::NixBin;
use session::{Outbox, SessionParams, Stop};
pub use transfer::info_from_proto;

/// Create the state directory (0700) and load or generate the key. Prints the
/// public key line on stdout when the key is new, so it can be enrolled.
pub fn prepare_key(config: &BuilderConfig) -> Result<(BuilderKey, KeyOrigin), BuilderError> {
    let dir = &config.state_dir;
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| BuilderError::writing(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| BuilderError::writing(dir, e))?;
    }
    let name = config.resolved_name();
    let (key, origin) =
        BuilderKey::load_or_generate(&config.key_path(), &format!("farm-builder@{name}"))?;
    if origin == KeyOrigin::Generated {
        tracing::info!(path = %key.path().display(), "generated a new builder key; enrol its public key on the coordinator");
        println!("{}", key.public_line());
    } else {
        tracing::info!(public_key = %key.public_line(), "builder key");
    }
    Ok((key, origin))
}

/// What this builder advertises: flags first, probed values for the rest.
pub async fn capabilities(config: &BuilderConfig) -> Result<Capabilities, BuilderError> {
    let nix = probe::probe_nix(&NixBin::new(config.nix_bin_dir.clone())).await?;
    let host = probe::probe_host().await;
    let mut systems = if config.systems.is_empty() {
        std::iter::once(nix.system.clone())
            .chain(nix.extra_platforms.iter().cloned())
            .collect()
    } else {
        config.systems.clone()
    };
    dedup(&mut systems);
    let mut supported = config
        .features
        .clone()
        .unwrap_or_else(|| nix.system_features.clone());
    // A mandatory feature is necessarily a supported one.
    supported.extend(config.mandatory_features.iter().cloned());
    dedup(&mut supported);
    let mut mandatory = config.mandatory_features.clone();
    dedup(&mut mandatory);
    let max_jobs = config
        .max_jobs
        .or(nix.max_jobs.filter(|&n| n > 0))
        .unwrap_or(host.cores)
        .max(1);
    Ok(Capabilities {
        systems,
        supported_features: supported,
        mandatory_features: mandatory,
        max_jobs,
        speed_factor: config.speed_factor,
        cores: host.cores,
        memory_bytes: host.memory_bytes,
        nix_version: nix.version,
    })
}

fn dedup(v: &mut Vec<String>) {
    let mut seen = std::collections::BTreeSet::new();
    v.retain(|s| !s.is_empty() && seen.insert(s.clone()));
}

/// Run the builder until `shutdown` resolves: connect (and reconnect), build
/// what the coordinator sends. On shutdown running builds are stopped and
/// reported as transient failures so the coordinator reschedules them; it
/// returns within `config.shutdown_grace` of `shutdown` resolving.
pub async fn run(
    config: BuilderConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BuilderError> {
    config::validate(&config)?;
    let (key, _) = prepare_key(&config)?;
    let caps = capabilities(&config).await?;
    tracing::info!(
        systems = ?caps.systems,
        features = ?caps.supported_features,
        mandatory = ?caps.mandatory_features,
        max_jobs = caps.max_jobs,
        nix = %caps.nix_version,
        "builder capabilities"
    );
    let exec = executor::NixExecutor::new(&config)?;
    exec.check_store().await?;
    run_with(config, key, caps, exec, shutdown).await
}

/// [`run`] with an explicit key, capabilities and execution backend.
pub async fn run_with<E: Execute>(
    config: BuilderConfig,
    key: BuilderKey,
    caps: Capabilities,
    exec: E,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BuilderError> {
    let endpoint = session::endpoint(&config.coordinator, config.client_tls())?;
    let (event_tx, event_rx) = mpsc::channel(1024);
    let (link_tx, link_rx) = watch::channel(None);
    let jobs = JobManager::new(exec, caps.max_jobs, event_tx, link_rx);
    let stop = Stop::new(config.shutdown_grace);
    let trigger = stop.clone();
    let watcher = tokio::spawn(async move {
        shutdown.await;
        trigger.request();
    });
    let params = SessionParams {
        name: config.resolved_name(),
        key,
        capabilities: caps,
        endpoint,
        load_interval: config.load_interval,
        store_dir: config.store_dir.clone(),
    };
    session::run_sessions(params, jobs, Outbox::new(event_rx), link_tx, stop).await;
    watcher.abort();
    tracing::info!("builder stopped");
    Ok(())
}
