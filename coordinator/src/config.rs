//! The coordinator's settings: command-line flags (each also read from the
//! environment as `FARM_<FLAG>`), an optional TOML file (`--config`, unknown keys
//! refused) holding the same settings under the flags' names, and the resolved
//! [`CoordinatorConfig`] the library runs with (what `farm up` builds directly).
//!
//! Precedence: flag or environment variable, then the file, then the default.
//!
//! TOML example (keys are the long flag names):
//! ```toml
//! state-dir = "/var/lib/farm"
//! grpc = "0.0.0.0:7070"
//! builder-keys = "/etc/farm/builder_keys"
//! retain-finished = 10000   # finished submissions kept in the state database
//! retain-days = 90          # …and none older (0: by count only)
//! retain-builders-days = 30 # builder records not seen for longer are removed
//! [cache]                # optional: the cache's own settings (`cache::CacheConfig`)
//! zstd_level = 1
//! [cache.storage]        # optional; default: a local directory in the state dir
//! type = "s3"
//! bucket = "nix-farm"
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use serde::Deserialize;

use crate::CoordinatorError;
use crate::access::{KeyPolicy, Level};
use crate::cache::CacheConfig;
use crate::domain::state::Retention;

/// Default gRPC listen address.
pub const DEFAULT_GRPC: &str = "127.0.0.1:7070";
/// Default HTTP listen address (cache, metrics, dashboard).
pub const DEFAULT_HTTP: &str = "127.0.0.1:7080";
/// Default SSH listen address (the Nix endpoint).
pub const DEFAULT_SSH: &str = "127.0.0.1:7022";

/// Whether gRPC runs over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS when the gRPC address is not loopback, plaintext on loopback.
    #[default]
    Auto,
    /// Always TLS.
    On,
    /// Never TLS; beyond loopback this needs `--insecure-plaintext` too.
    Off,
}

/// `farm-coordinator`: the nix-farm coordinator (scheduler, binary cache, gRPC, HTTP and SSH endpoints).
///
/// Authentication: builders join only with a key listed in --builder-keys.
/// Clients (Nix over SSH, and the `farm` CLI, which signs each call) are
/// admitted by the key files, one per level: --read-keys (status, logs, cache
/// reads), --authorized-keys (also builds, and uploads kept as that client's
/// unsigned claims), --push-keys (also uploads and hook-build outputs the
/// farm signs), --admin-keys (also drain and cancel). A key gets the highest
/// level whose file admits it (`from=` in a line limits it to addresses).
/// With no key file, no client is accepted, on loopback too.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "farm-coordinator", version, about, long_about)]
pub struct Args {
    /// TOML file holding any of these settings (keys are the long flag names).
    #[arg(long, env = "FARM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the state database, keys, the local cache and endpoints.json.
    #[arg(long, env = "FARM_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// gRPC listen address (builders, CLI) [default: 127.0.0.1:7070]; port 0 picks one.
    #[arg(long, env = "FARM_GRPC", value_name = "ADDR")]
    pub grpc: Option<String>,
    /// HTTP listen address (binary cache, /metrics, dashboard) [default: 127.0.0.1:7080].
    #[arg(long, env = "FARM_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// SSH listen address (Nix's ssh:// and ssh-ng:// endpoint) [default: 127.0.0.1:7022].
    #[arg(long, env = "FARM_SSH", value_name = "ADDR")]
    pub ssh: Option<String>,
    /// Host name clients and builders reach this coordinator by [default: the
    /// listen address's host when specific, else this machine's host name].
    #[arg(long, env = "FARM_PUBLIC_HOST", value_name = "HOST")]
    pub public_host: Option<String>,
    /// Name of the generated cache signing key [default: the host name].
    #[arg(long, env = "FARM_CACHE_KEY_NAME", value_name = "NAME")]
    pub cache_key_name: Option<String>,
    /// Use this existing cache signing key (Nix format `name:base64`) instead of generating one.
    #[arg(long, env = "FARM_CACHE_KEY_FILE", value_name = "FILE")]
    pub cache_key_file: Option<PathBuf>,
    /// Directory of the local cache [default: STATE_DIR/cache].
    #[arg(long, env = "FARM_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// zstd level for stored NARs and logs [default: 1].
    #[arg(long, env = "FARM_ZSTD_LEVEL", value_name = "N")]
    pub zstd_level: Option<i32>,
    /// Priority advertised in nix-cache-info; lower is preferred [default: 30].
    #[arg(long, env = "FARM_CACHE_PRIORITY", value_name = "N")]
    pub cache_priority: Option<u32>,
    /// Clients that may only read: status, logs, cache queries and downloads
    /// (OpenSSH authorized_keys format).
    #[arg(long, env = "FARM_READ_KEYS", value_name = "FILE")]
    pub read_keys: Option<PathBuf>,
    /// Clients that may build (Nix over ssh:// and ssh-ng://, `farm build`):
    /// submit `.drv` builds and build-hook builds. What they upload is kept as
    /// their own unsigned claim: usable in their builds, never signed or
    /// served to others (OpenSSH authorized_keys format).
    #[arg(long, env = "FARM_AUTHORIZED_KEYS", value_name = "FILE")]
    pub authorized_keys: Option<PathBuf>,
    /// Clients the farm trusts like Nix's trusted-users: what they upload, and
    /// the outputs of their build-hook builds, are signed into the cache. Give
    /// one to each host whose hook builds should fill the cache.
    #[arg(long, env = "FARM_PUSH_KEYS", value_name = "FILE")]
    pub push_keys: Option<PathBuf>,
    /// Operators: everything push may, and drain, cancel (authorized_keys format).
    #[arg(long, env = "FARM_ADMIN_KEYS", value_name = "FILE")]
    pub admin_keys: Option<PathBuf>,
    /// Builders' public keys (authorized_keys format); re-read on every builder connection.
    #[arg(long, env = "FARM_BUILDER_KEYS", value_name = "FILE")]
    pub builder_keys: Option<PathBuf>,
    /// Unix socket for `farm-coordinator stdio` (sites with OpenSSH in front of
    /// the Nix endpoint); not opened unless given.
    #[arg(long, env = "FARM_RELAY_SOCKET", value_name = "PATH")]
    pub relay_socket: Option<PathBuf>,
    /// What clients of the stdio relay may do (the OpenSSH account's
    /// authorized_keys decides who they are) [default: build].
    #[arg(long, env = "FARM_RELAY_LEVEL", value_name = "LEVEL")]
    pub relay_level: Option<RelayLevel>,
    /// Only these uids may use the relay socket (comma-separated; checked
    /// with SO_PEERCRED) [default: whoever may open it].
    #[arg(
        long,
        env = "FARM_RELAY_UIDS",
        value_name = "UID,…",
        value_delimiter = ','
    )]
    pub relay_uids: Option<Vec<u32>>,
    /// gRPC TLS [default: auto = TLS unless the gRPC address is loopback].
    #[arg(long, env = "FARM_TLS", value_name = "MODE")]
    pub tls: Option<TlsMode>,
    /// TLS certificate chain (PEM) [default: generated, STATE_DIR/tls/cert.pem].
    #[arg(long, env = "FARM_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) [default: generated, STATE_DIR/tls/key.pem].
    #[arg(long, env = "FARM_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow plaintext gRPC on a non-loopback address (with --tls off). Insecure.
    #[arg(long, env = "FARM_INSECURE_PLAINTEXT", action = ArgAction::SetTrue)]
    pub insecure_plaintext: bool,
    /// Seconds a vanished builder's jobs wait for it before they are requeued [default: 60].
    #[arg(long, env = "FARM_BUILDER_GRACE", value_name = "SECS")]
    pub builder_grace: Option<u64>,
    /// How many times a build is retried after transient failures or lost builders [default: 3].
    #[arg(long, env = "FARM_MAX_RETRIES", value_name = "N")]
    pub max_retries: Option<u32>,
    /// Seconds work waits for a matching builder that was seen recently but is gone [default: 600].
    #[arg(long, env = "FARM_UNSCHEDULABLE_WAIT", value_name = "SECS")]
    pub unschedulable_wait: Option<u64>,
    /// A builder last seen within this many seconds counts as "seen recently" [default: 86400].
    #[arg(long, env = "FARM_RECENT_BUILDER_WINDOW", value_name = "SECS")]
    pub recent_builder_window: Option<u64>,
    /// Seconds the coordinator takes at most to stop on SIGTERM/SIGINT: listeners
    /// close, builders and followers are told, the state is flushed; whatever is
    /// still running then is abandoned (a second signal exits at once) [default: 10].
    #[arg(long, env = "FARM_SHUTDOWN_GRACE", value_name = "SECS")]
    pub shutdown_grace: Option<u64>,
    /// Finished submissions kept in the state database, newest first; older
    /// ones are pruned with the builds only they list (build logs stay in the
    /// cache) [default: 10000].
    #[arg(long, env = "FARM_RETAIN_FINISHED", value_name = "N")]
    pub retain_finished: Option<usize>,
    /// Finished submissions older than this many days are pruned too; 0 keeps
    /// them by count only [default: 90].
    #[arg(long, env = "FARM_RETAIN_DAYS", value_name = "DAYS")]
    pub retain_days: Option<u64>,
    /// Builder records not seen for this many days are removed (and their
    /// names freed) [default: 30].
    #[arg(long, env = "FARM_RETAIN_BUILDERS_DAYS", value_name = "DAYS")]
    pub retain_builders_days: Option<u64>,
    /// Runs kept per named job (`farm build --job`), newest first [default: 50].
    #[arg(long, env = "FARM_JOB_HISTORY", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub job_history: Option<u32>,
    /// Named jobs kept; a new name past this forgets the job least recently
    /// run [default: 1000].
    #[arg(long, env = "FARM_MAX_JOBS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_jobs: Option<u32>,
    /// Seconds an SSH client has from connecting to authenticating; then it
    /// is disconnected [default: 30].
    #[arg(long, env = "FARM_SSH_LOGIN_GRACE", value_name = "SECS")]
    pub ssh_login_grace: Option<u64>,
    /// Open SSH connections at most, authenticated or not; more are refused [default: 512].
    #[arg(long, env = "FARM_SSH_MAX_CONNECTIONS", value_name = "N")]
    pub ssh_max_connections: Option<usize>,
    /// Nix sessions one client key runs at once over SSH; more are refused [default: 64].
    #[arg(long, env = "FARM_SSH_MAX_SESSIONS_PER_KEY", value_name = "N")]
    pub ssh_max_sessions_per_key: Option<usize>,
    /// Most bytes of strings one Nix protocol message (a BasicDerivation, a
    /// path set, a path info…) may carry in all; a larger one closes its
    /// connection [default: 67108864 = 64 MiB].
    #[arg(long, env = "FARM_NIX_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub nix_max_message_bytes: Option<u64>,
    /// Most list elements (paths, env entries…) one Nix protocol message may
    /// carry in all [default: 524288].
    #[arg(long, env = "FARM_NIX_MAX_MESSAGE_ITEMS", value_name = "N")]
    pub nix_max_message_items: Option<u64>,
    /// Send alerts to this ntfy topic (`https://ntfy.sh/TOPIC`): each is
    /// POSTed as the message body with Title, Priority and Tags headers.
    /// Logs name it by scheme and host only [default: none].
    #[arg(
        long,
        env = "FARM_ALERT_NTFY",
        value_name = "URL",
        conflicts_with = "alert_ntfy_file"
    )]
    pub alert_ntfy: Option<String>,
    /// Read the ntfy topic URL from this file (a secret: keeps it off the
    /// command line).
    #[arg(long, env = "FARM_ALERT_NTFY_FILE", value_name = "FILE")]
    pub alert_ntfy_file: Option<PathBuf>,
    /// Send alerts to this URL as JSON: POST {"alert", "state":
    /// "firing"|"resolved", "subject", "message", "title", "at"}
    /// [default: none].
    #[arg(
        long,
        env = "FARM_ALERT_WEBHOOK",
        value_name = "URL",
        conflicts_with = "alert_webhook_file"
    )]
    pub alert_webhook: Option<String>,
    /// Read the webhook URL from this file (a secret).
    #[arg(long, env = "FARM_ALERT_WEBHOOK_FILE", value_name = "FILE")]
    pub alert_webhook_file: Option<PathBuf>,
    /// Alert when a builder (not drained) is offline this many seconds
    /// [default: 300].
    #[arg(long, env = "FARM_ALERT_BUILDER_OFFLINE", value_name = "SECS")]
    pub alert_builder_offline: Option<u64>,
    /// Alert when a connected builder reports less free disk in its Nix
    /// store than this; 0: never [default: 5368709120 = 5 GiB].
    #[arg(long, env = "FARM_ALERT_DISK_FREE", value_name = "BYTES")]
    pub alert_disk_free: Option<u64>,
    /// Alert when a connected builder reports less available memory than
    /// this; 0: never [default: 1073741824 = 1 GiB].
    #[arg(long, env = "FARM_ALERT_MEMORY_AVAILABLE", value_name = "BYTES")]
    pub alert_memory_available: Option<u64>,
    /// Seconds low disk or memory must last before it alerts, and be over
    /// before it recovers [default: 120].
    #[arg(long, env = "FARM_ALERT_LOAD_HOLD", value_name = "SECS")]
    pub alert_load_hold: Option<u64>,
    /// Named jobs (`farm build --job`) to watch: one alert when one goes
    /// from passing to failing, one when it passes again (comma-separated)
    /// [default: none].
    #[arg(
        long,
        env = "FARM_ALERT_JOBS",
        value_name = "NAME,…",
        value_delimiter = ','
    )]
    pub alert_jobs: Option<Vec<String>>,
    /// Alert when the binary cache stores more than this many (compressed)
    /// bytes; 0: never [default: 0].
    #[arg(long, env = "FARM_ALERT_CACHE_BYTES", value_name = "BYTES")]
    pub alert_cache_bytes: Option<u64>,
    /// Alert when state database flushes take longer than this on average
    /// over --alert-flush-window; 0: never [default: 1000].
    #[arg(long, env = "FARM_ALERT_FLUSH_SLOW_MS", value_name = "MS")]
    pub alert_flush_slow_ms: Option<u64>,
    /// Seconds the flush average is taken over [default: 60].
    #[arg(long, env = "FARM_ALERT_FLUSH_WINDOW", value_name = "SECS")]
    pub alert_flush_window: Option<u64>,
}

/// The TOML file: the same settings as the flags, by their long names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub grpc: Option<String>,
    pub http: Option<String>,
    pub ssh: Option<String>,
    pub public_host: Option<String>,
    pub cache_key_name: Option<String>,
    pub cache_key_file: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub zstd_level: Option<i32>,
    pub cache_priority: Option<u32>,
    pub read_keys: Option<PathBuf>,
    pub authorized_keys: Option<PathBuf>,
    pub push_keys: Option<PathBuf>,
    pub admin_keys: Option<PathBuf>,
    pub builder_keys: Option<PathBuf>,
    pub relay_socket: Option<PathBuf>,
    pub relay_level: Option<RelayLevel>,
    pub relay_uids: Option<Vec<u32>>,
    pub tls: Option<TlsMode>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_plaintext: Option<bool>,
    pub builder_grace: Option<u64>,
    pub max_retries: Option<u32>,
    pub unschedulable_wait: Option<u64>,
    pub recent_builder_window: Option<u64>,
    pub shutdown_grace: Option<u64>,
    pub retain_finished: Option<usize>,
    pub retain_days: Option<u64>,
    pub retain_builders_days: Option<u64>,
    pub job_history: Option<u32>,
    pub max_jobs: Option<u32>,
    pub ssh_login_grace: Option<u64>,
    pub ssh_max_connections: Option<usize>,
    pub ssh_max_sessions_per_key: Option<usize>,
    pub nix_max_message_bytes: Option<u64>,
    pub nix_max_message_items: Option<u64>,
    pub alert_ntfy: Option<String>,
    pub alert_ntfy_file: Option<PathBuf>,
    pub alert_webhook: Option<String>,
    pub alert_webhook_file: Option<PathBuf>,
    pub alert_builder_offline: Option<u64>,
    pub alert_disk_free: Option<u64>,
    pub alert_memory_available: Option<u64>,
    pub alert_load_hold: Option<u64>,
    pub alert_jobs: Option<Vec<String>>,
    pub alert_cache_bytes: Option<u64>,
    pub alert_flush_slow_ms: Option<u64>,
    pub alert_flush_window: Option<u64>,
    /// The cache's own `CacheConfig` (which refuses unknown keys too); its
    /// `storage` defaults to the local directory.
    pub cache: Option<toml::Table>,
}

/// `--relay-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayLevel {
    Read,
    Build,
    Push,
    Admin,
}

impl RelayLevel {
    fn level(self) -> Level {
        match self {
            RelayLevel::Read => Level::Read,
            RelayLevel::Build => Level::Build,
            RelayLevel::Push => Level::Push,
            RelayLevel::Admin => Level::Admin,
        }
    }
}

/// Everything the coordinator runs with, resolved.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub state_dir: PathBuf,
    pub grpc: String,
    pub http: String,
    pub ssh: String,
    pub public_host: Option<String>,
    pub cache_key_name: Option<String>,
    pub cache_key_file: Option<PathBuf>,
    /// The binary cache's settings (default: local, in `STATE_DIR/cache`).
    pub cache: CacheConfig,
    /// The client key files, one per level.
    pub keys: KeyPolicy,
    pub builder_keys: Option<PathBuf>,
    /// Builder keys accepted in addition to the file (OpenSSH public key lines);
    /// `farm up` enrols its in-process builder this way.
    pub extra_builder_keys: Vec<String>,
    /// Unix socket the stdio relay (`farm-coordinator stdio`) connects to.
    pub relay_socket: Option<PathBuf>,
    /// The level of the stdio relay's clients.
    pub relay_level: Level,
    /// The uids the relay socket admits (`SO_PEERCRED`); `None`: whoever may
    /// open the socket (the OpenSSH account in front decides).
    pub relay_uids: Option<Vec<u32>>,
    pub tls: TlsMode,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_plaintext: bool,
    pub builder_grace: Duration,
    pub max_retries: u32,
    pub unschedulable_wait: Duration,
    pub recent_builder_window: Duration,
    /// How long stopping may take at most.
    pub shutdown_grace: Duration,
    /// How much finished history the state database keeps.
    pub retention: Retention,
    /// How much named-job history it keeps.
    pub jobs: crate::domain::jobs::JobLimits,
    /// Login grace time and connection limits of the SSH endpoint.
    pub ssh_limits: crate::nix_endpoint::ssh::SshLimits,
    /// Per-item and per-message bounds of the Nix protocols.
    pub nix_limits: farm_nix::wire::Limits,
    /// Where alerts go (none: no alerts are evaluated).
    pub alert_targets: crate::alerting::AlertTargets,
    /// What alerts, and when.
    pub alerts: crate::domain::alerts::AlertConfig,
}

#[cfg(test)]
impl CoordinatorConfig {
    /// For unit tests: every listener on loopback port 0, the cache key named `test`.
    pub(crate) fn for_tests(state_dir: impl Into<PathBuf>) -> CoordinatorConfig {
        let mut cfg = CoordinatorConfig::new(state_dir);
        cfg.grpc = "127.0.0.1:0".into();
        cfg.http = "127.0.0.1:0".into();
        cfg.ssh = "127.0.0.1:0".into();
        cfg.cache_key_name = Some("test".into());
        cfg
    }
}

impl CoordinatorConfig {
    /// The defaults, with state in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> CoordinatorConfig {
        let state_dir: PathBuf = state_dir.into();
        CoordinatorConfig {
            state_dir: state_dir.clone(),
            grpc: DEFAULT_GRPC.into(),
            http: DEFAULT_HTTP.into(),
            ssh: DEFAULT_SSH.into(),
            public_host: None,
            cache_key_name: None,
            cache_key_file: None,
            cache: CacheConfig::local(state_dir.join("cache")),
            keys: KeyPolicy::default(),
            builder_keys: None,
            extra_builder_keys: Vec::new(),
            relay_socket: None,
            relay_level: Level::Build,
            relay_uids: None,
            tls: TlsMode::Auto,
            tls_cert: None,
            tls_key: None,
            insecure_plaintext: false,
            builder_grace: Duration::from_secs(60),
            max_retries: 3,
            unschedulable_wait: Duration::from_secs(600),
            recent_builder_window: Duration::from_secs(86_400),
            shutdown_grace: Duration::from_secs(10),
            retention: Retention::default(),
            jobs: Default::default(),
            ssh_limits: crate::nix_endpoint::ssh::SshLimits::default(),
            nix_limits: farm_nix::wire::Limits::default(),
            alert_targets: Default::default(),
            alerts: Default::default(),
        }
    }

    /// Merge flags (and environment) over the `--config` file over the defaults.
    pub fn from_args(args: Args) -> Result<CoordinatorConfig, CoordinatorError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let state_dir = args.state_dir.or(file.state_dir).ok_or_else(|| {
            CoordinatorError::Config(
                "--state-dir (or FARM_STATE_DIR, or state-dir in --config) is required".into(),
            )
        })?;
        let d = CoordinatorConfig::new(state_dir);
        let tls_cert = args.tls_cert.or(file.tls_cert);
        let tls_key = args.tls_key.or(file.tls_key);
        if tls_cert.is_some() != tls_key.is_some() {
            return Err(CoordinatorError::Config(
                "tls-cert and tls-key go together".into(),
            ));
        }
        let mut cache = match file.cache {
            None => d.cache.clone(),
            Some(mut table) => {
                if !table.contains_key("storage") {
                    let mut local = toml::Table::new();
                    local.insert("type".into(), "local".into());
                    local.insert(
                        "root".into(),
                        d.state_dir
                            .join("cache")
                            .to_string_lossy()
                            .into_owned()
                            .into(),
                    );
                    table.insert("storage".into(), local.into());
                }
                toml::Value::Table(table)
                    .try_into::<CacheConfig>()
                    .map_err(|e| {
                        CoordinatorError::Config(format!("[cache] in the config file: {e}"))
                    })?
            }
        };
        if let Some(dir) = args.cache_dir.or(file.cache_dir) {
            cache.storage = crate::cache::StorageConfig::Local { root: dir };
        }
        if let Some(level) = args.zstd_level.or(file.zstd_level) {
            cache.zstd_level = level;
        }
        if let Some(p) = args.cache_priority.or(file.cache_priority) {
            cache.priority = p;
        }
        let target = |url: Option<String>, file: Option<PathBuf>, what: &str| match (url, file) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(path)) => read_secret(&path, what).map(Some),
            (None, None) => Ok(None),
        };
        let alert_targets = crate::alerting::AlertTargets {
            ntfy: target(
                args.alert_ntfy.or(file.alert_ntfy),
                args.alert_ntfy_file.or(file.alert_ntfy_file),
                "alert-ntfy-file",
            )?,
            webhook: target(
                args.alert_webhook.or(file.alert_webhook),
                args.alert_webhook_file.or(file.alert_webhook_file),
                "alert-webhook-file",
            )?,
        };
        let da = d.alerts.clone();
        let secs_ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let alerts = crate::domain::alerts::AlertConfig {
            builder_offline_ms: args
                .alert_builder_offline
                .or(file.alert_builder_offline)
                .map_or(da.builder_offline_ms, secs_ms),
            disk_free_min_bytes: args
                .alert_disk_free
                .or(file.alert_disk_free)
                .unwrap_or(da.disk_free_min_bytes),
            memory_available_min_bytes: args
                .alert_memory_available
                .or(file.alert_memory_available)
                .unwrap_or(da.memory_available_min_bytes),
            load_hold_ms: args
                .alert_load_hold
                .or(file.alert_load_hold)
                .map_or(da.load_hold_ms, secs_ms),
            watched_jobs: args
                .alert_jobs
                .or(file.alert_jobs)
                .unwrap_or_default()
                .into_iter()
                .map(|j| j.trim().to_owned())
                .filter(|j| !j.is_empty())
                .collect(),
            cache_max_bytes: args
                .alert_cache_bytes
                .or(file.alert_cache_bytes)
                .unwrap_or(da.cache_max_bytes),
            flush_slow_ms: args
                .alert_flush_slow_ms
                .or(file.alert_flush_slow_ms)
                .unwrap_or(da.flush_slow_ms),
            flush_window_ms: args
                .alert_flush_window
                .or(file.alert_flush_window)
                .map_or(da.flush_window_ms, |s| secs_ms(s.max(1))),
        };
        Ok(CoordinatorConfig {
            alert_targets,
            alerts,
            grpc: args.grpc.or(file.grpc).unwrap_or(d.grpc),
            http: args.http.or(file.http).unwrap_or(d.http),
            ssh: args.ssh.or(file.ssh).unwrap_or(d.ssh),
            public_host: args.public_host.or(file.public_host),
            cache_key_name: args.cache_key_name.or(file.cache_key_name),
            cache_key_file: args.cache_key_file.or(file.cache_key_file),
            cache,
            keys: KeyPolicy {
                read: args.read_keys.or(file.read_keys),
                build: args.authorized_keys.or(file.authorized_keys),
                push: args.push_keys.or(file.push_keys),
                admin: args.admin_keys.or(file.admin_keys),
                extra: Vec::new(),
            },
            builder_keys: args.builder_keys.or(file.builder_keys),
            extra_builder_keys: Vec::new(),
            relay_socket: args.relay_socket.or(file.relay_socket),
            relay_level: args
                .relay_level
                .or(file.relay_level)
                .map_or(Level::Build, RelayLevel::level),
            relay_uids: args.relay_uids.or(file.relay_uids),
            tls: args.tls.or(file.tls).unwrap_or(d.tls),
            tls_cert,
            tls_key,
            insecure_plaintext: args.insecure_plaintext || file.insecure_plaintext.unwrap_or(false),
            builder_grace: args
                .builder_grace
                .or(file.builder_grace)
                .map(Duration::from_secs)
                .unwrap_or(d.builder_grace),
            max_retries: args
                .max_retries
                .or(file.max_retries)
                .unwrap_or(d.max_retries),
            unschedulable_wait: args
                .unschedulable_wait
                .or(file.unschedulable_wait)
                .map(Duration::from_secs)
                .unwrap_or(d.unschedulable_wait),
            recent_builder_window: args
                .recent_builder_window
                .or(file.recent_builder_window)
                .map(Duration::from_secs)
                .unwrap_or(d.recent_builder_window),
            shutdown_grace: args
                .shutdown_grace
                .or(file.shutdown_grace)
                .map(Duration::from_secs)
                .unwrap_or(d.shutdown_grace),
            retention: Retention {
                finished_submissions: args
                    .retain_finished
                    .or(file.retain_finished)
                    .unwrap_or(d.retention.finished_submissions),
                max_age_ms: match args.retain_days.or(file.retain_days) {
                    None => d.retention.max_age_ms,
                    Some(0) => None,
                    Some(days) => Some(days_ms(days)),
                },
                builder_ms: args
                    .retain_builders_days
                    .or(file.retain_builders_days)
                    .map(days_ms)
                    .unwrap_or(d.retention.builder_ms),
            },
            jobs: crate::domain::jobs::JobLimits {
                history: args
                    .job_history
                    .or(file.job_history)
                    .map_or(d.jobs.history, |n| n.max(1) as usize),
                max_jobs: args
                    .max_jobs
                    .or(file.max_jobs)
                    .map_or(d.jobs.max_jobs, |n| n.max(1) as usize),
            },
            ssh_limits: crate::nix_endpoint::ssh::SshLimits {
                login_grace: args
                    .ssh_login_grace
                    .or(file.ssh_login_grace)
                    .map(Duration::from_secs)
                    .unwrap_or(d.ssh_limits.login_grace),
                max_connections: args
                    .ssh_max_connections
                    .or(file.ssh_max_connections)
                    .unwrap_or(d.ssh_limits.max_connections),
                max_sessions_per_key: args
                    .ssh_max_sessions_per_key
                    .or(file.ssh_max_sessions_per_key)
                    .unwrap_or(d.ssh_limits.max_sessions_per_key),
            },
            nix_limits: farm_nix::wire::Limits {
                max_message_bytes: args
                    .nix_max_message_bytes
                    .or(file.nix_max_message_bytes)
                    .unwrap_or(d.nix_limits.max_message_bytes),
                max_message_items: args
                    .nix_max_message_items
                    .or(file.nix_max_message_items)
                    .unwrap_or(d.nix_limits.max_message_items),
                ..d.nix_limits
            },
            state_dir: d.state_dir,
        })
    }

    /// Whether the gRPC listener (bound at `addr`) uses TLS, or an error when
    /// plaintext beyond loopback was asked for without `insecure_plaintext`.
    pub fn grpc_tls(&self, addr: SocketAddr) -> Result<bool, CoordinatorError> {
        let loopback = addr.ip().is_loopback();
        match self.tls {
            TlsMode::On => Ok(true),
            TlsMode::Auto => Ok(!loopback),
            TlsMode::Off if loopback || self.insecure_plaintext => Ok(false),
            TlsMode::Off => Err(CoordinatorError::Config(format!(
                "refusing plaintext gRPC on non-loopback address {addr}: use TLS, or pass --insecure-plaintext to force it"
            ))),
        }
    }

    /// The host name clients are told to use for a listener bound at `addr`.
    pub fn advertised_host(&self, addr: SocketAddr) -> String {
        if let Some(h) = &self.public_host {
            return h.clone();
        }
        if addr.ip().is_unspecified() {
            return hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
        }
        host_for(addr.ip())
    }

    /// Name for a generated cache signing key.
    pub fn cache_key_name(&self) -> String {
        if let Some(n) = &self.cache_key_name {
            return n.clone();
        }
        hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty() && !h.contains(':'))
            .unwrap_or_else(|| "nix-farm".into())
    }

    /// The sled database directory.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("state.sled")
    }
}

/// Days in milliseconds (saturating).
fn days_ms(days: u64) -> i64 {
    i64::try_from(days.saturating_mul(86_400_000)).unwrap_or(i64::MAX)
}

/// An IP as it goes in front of `:port` (IPv6 in brackets).
pub fn host_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Most bytes a config file may have.
const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// A secret held in a file (a URL with a token): its first line.
fn read_secret(path: &Path, what: &str) -> Result<String, CoordinatorError> {
    let bad = |why: String| CoordinatorError::Config(format!("{what} {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > 64 * 1024 {
        return Err(bad("file too large".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(line.to_owned())
}

fn read_file_config(path: &Path) -> Result<FileConfig, CoordinatorError> {
    let bad = |why: String| CoordinatorError::Config(format!("{}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_CONFIG_FILE {
        return Err(bad("config file too large".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    toml::from_str(&text).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("farm-coordinator").chain(argv.iter().copied()))
            .unwrap()
    }

    #[test]
    fn flags_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "state-dir = \"/from/file\"\ngrpc = \"0.0.0.0:1\"\nmax-retries = 7\nzstd-level = 5\n[cache]\npriority = 10\n[cache.storage]\ntype = \"local\"\nroot = \"/c\"\n",
        )
        .unwrap();
        let c = CoordinatorConfig::from_args(parse(&[
            "--config",
            file.to_str().unwrap(),
            "--grpc",
            "127.0.0.1:0",
        ]))
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/from/file"));
        assert_eq!(c.grpc, "127.0.0.1:0");
        assert_eq!(c.http, DEFAULT_HTTP);
        assert_eq!(c.max_retries, 7);
        assert_eq!(c.cache.priority, 10);
        assert_eq!(c.cache.zstd_level, 5);
        assert_eq!(
            c.cache.storage,
            crate::cache::StorageConfig::Local { root: "/c".into() }
        );
        // without a [cache] table: local, in the state dir
        let c = CoordinatorConfig::from_args(parse(&["--state-dir", "/s"])).unwrap();
        assert_eq!(c.relay_uids, None);
        let c =
            CoordinatorConfig::from_args(parse(&["--state-dir", "/s", "--relay-uids", "0,1000"]))
                .unwrap();
        assert_eq!(c.relay_uids, Some(vec![0, 1000]));
        let c = CoordinatorConfig::from_args(parse(&["--state-dir", "/s"])).unwrap();
        assert_eq!(
            c.cache.storage,
            crate::cache::StorageConfig::Local {
                root: "/s/cache".into()
            }
        );
    }

    #[test]
    fn unknown_file_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "state-dir = \"/x\"\ngrcp = \"typo\"\n").unwrap();
        let e =
            CoordinatorConfig::from_args(parse(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("grcp"), "{e}");
    }

    #[test]
    fn retention_from_flags_and_file() {
        let c = CoordinatorConfig::from_args(parse(&["--state-dir", "/s"])).unwrap();
        assert_eq!(c.retention, Retention::default());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "state-dir = \"/s\"\nretain-finished = 50\nretain-days = 0\nretain-builders-days = 2\n",
        )
        .unwrap();
        let c = CoordinatorConfig::from_args(parse(&[
            "--config",
            file.to_str().unwrap(),
            "--retain-finished",
            "7",
        ]))
        .unwrap();
        assert_eq!(
            c.retention,
            Retention {
                finished_submissions: 7,
                max_age_ms: None,
                builder_ms: 2 * 86_400_000,
            }
        );
        let c = CoordinatorConfig::from_args(parse(&["--state-dir", "/s", "--retain-days", "3"]))
            .unwrap();
        assert_eq!(c.retention.max_age_ms, Some(3 * 86_400_000));
    }

    #[test]
    fn alert_settings() {
        let c = CoordinatorConfig::from_args(parse(&["--state-dir", "/s"])).unwrap();
        assert!(c.alert_targets.is_empty());
        assert_eq!(c.alerts, crate::domain::alerts::AlertConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hook");
        std::fs::write(&secret, "http://127.0.0.1:9/hook/tok\n").unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            format!(
                "state-dir = \"/s\"\nalert-webhook-file = {:?}\nalert-jobs = [\"ci/a\"]\nalert-disk-free = 7\n",
                secret.display().to_string()
            ),
        )
        .unwrap();
        let c = CoordinatorConfig::from_args(parse(&[
            "--config",
            file.to_str().unwrap(),
            "--alert-ntfy",
            "https://ntfy.example.org/t",
            "--alert-builder-offline",
            "3",
            "--alert-jobs",
            "x,y",
        ]))
        .unwrap();
        assert_eq!(
            c.alert_targets.ntfy.as_deref(),
            Some("https://ntfy.example.org/t")
        );
        assert_eq!(
            c.alert_targets.webhook.as_deref(),
            Some("http://127.0.0.1:9/hook/tok")
        );
        assert_eq!(c.alerts.builder_offline_ms, 3000);
        assert_eq!(c.alerts.disk_free_min_bytes, 7);
        assert_eq!(
            c.alerts.watched_jobs,
            ["x".to_string(), "y".to_string()].into()
        );
    }

    #[test]
    fn state_dir_required() {
        assert!(CoordinatorConfig::from_args(parse(&[])).is_err());
    }

    #[test]
    fn tls_policy() {
        let mut c = CoordinatorConfig::new("/x");
        let lo: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert!(!c.grpc_tls(lo).unwrap());
        assert!(c.grpc_tls(any).unwrap());
        c.tls = TlsMode::Off;
        assert!(!c.grpc_tls(lo).unwrap());
        assert!(c.grpc_tls(any).is_err());
        c.insecure_plaintext = true;
        assert!(!c.grpc_tls(any).unwrap());
        c.tls = TlsMode::On;
        assert!(c.grpc_tls(lo).unwrap());
    }
}
