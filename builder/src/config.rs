//! The builder's settings: command-line flags (each also read from env
//! `FARM_<FLAG>`), an optional TOML file (`--config`, same keys as the flags in
//! kebab-case, unknown keys rejected), and defaults. Precedence: flag, env, file,
//! default. Probed values (systems, features, max-jobs) fill what is left unset
//! when the builder starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::error::BuilderError;

/// Everything `farm_builder::run` needs.
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// Coordinator gRPC URL (`https://host:port`, or `http://` on loopback).
    pub coordinator: String,
    /// State directory (key, scratch space).
    pub state_dir: PathBuf,
    /// The private key file; default `STATE_DIR/builder_ed25519`.
    pub key: Option<PathBuf>,
    /// Builder name; default the host name.
    pub name: Option<String>,
    /// Builds at once; default the local Nix's max-jobs, else the core count.
    pub max_jobs: Option<u32>,
    /// Relative speed advertised to the scheduler.
    pub speed_factor: f64,
    /// Systems; empty = probe (system, then extra-platforms).
    pub systems: Vec<String>,
    /// Supported features; None = probe (system-features).
    pub features: Option<Vec<String>>,
    /// Mandatory features.
    pub mandatory_features: Vec<String>,
    /// PEM file with the coordinator's CA or certificate (pinned) for `https://`.
    pub ca_cert: Option<PathBuf>,
    /// Allow plaintext `http://` to a non-loopback coordinator (insecure).
    pub insecure_plaintext: bool,
    /// How often to report load.
    pub load_interval: Duration,
    /// Directory holding `nix`, `nix-store`; None = `PATH`.
    pub nix_bin_dir: Option<PathBuf>,
    /// The Nix store to build in (a store URI, passed as `--store` to the
    /// Nix commands that open the store); None = Nix's default store. Set it with
    /// [`BuilderConfig::set_store`], which also sets `store_dir`.
    pub store: Option<String>,
    /// The store directory whose free space is reported: `/nix/store`, or
    /// the real directory of a local chroot store (`local?root=DIR`).
    pub store_dir: PathBuf,
    /// Parallel input downloads per job.
    pub download_parallelism: usize,
    /// How long stopping may take at most: running builds are stopped, their
    /// results reported; whatever is still in flight then is abandoned.
    pub shutdown_grace: Duration,
}

impl BuilderConfig {
    /// A config with defaults for everything but the coordinator and state dir.
    pub fn new(coordinator: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        BuilderConfig {
            coordinator: coordinator.into(),
            state_dir: state_dir.into(),
            key: None,
            name: None,
            max_jobs: None,
            speed_factor: 1.0,
            systems: Vec::new(),
            features: None,
            mandatory_features: Vec::new(),
            ca_cert: None,
            insecure_plaintext: false,
            load_interval: Duration::from_secs(5),
            nix_bin_dir: None,
            store: None,
            store_dir: PathBuf::from(farm_nix::store_path::STORE_DIR),
            download_parallelism: 8,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// Build in the store `uri` (None = Nix's default store); the free space
    /// reported is then measured where that store keeps its files.
    pub fn set_store(&mut self, uri: Option<String>) {
        self.store_dir = uri
            .as_deref()
            .and_then(real_store_dir)
            .unwrap_or_else(|| PathBuf::from(farm_nix::store_path::STORE_DIR));
        self.store = uri;
    }

    /// How to dial the coordinator.
    pub fn client_tls(&self) -> farm_common::channel::ClientTls<'_> {
        farm_common::channel::ClientTls {
            ca_cert: self.ca_cert.as_deref(),
            insecure_plaintext: self.insecure_plaintext,
        }
    }

    /// The key file path.
    pub fn key_path(&self) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("builder_ed25519"))
    }

    /// The builder name (flag, else host name).
    pub fn resolved_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "builder".to_owned())
        })
    }
}

/// Command-line flags of `farm-builder`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "farm-builder",
    version,
    about = "nix-farm build daemon: builds what the coordinator sends with the local nix"
)]
pub struct Args {
    /// TOML file with the same settings (kebab-case keys).
    #[arg(long, env = "FARM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Coordinator gRPC URL, e.g. https://farm.example:7070 (http:// only on loopback).
    #[arg(long, env = "FARM_COORDINATOR")]
    pub coordinator: Option<String>,
    /// State directory (key, scratch).
    #[arg(long, env = "FARM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Private key file (default STATE_DIR/builder_ed25519).
    #[arg(long, env = "FARM_KEY")]
    pub key: Option<PathBuf>,
    /// Builder name (default: host name).
    #[arg(long, env = "FARM_NAME")]
    pub name: Option<String>,
    /// Builds at once (default: nix's max-jobs, else the core count).
    #[arg(long, env = "FARM_MAX_JOBS")]
    pub max_jobs: Option<u32>,
    /// Relative speed of this machine (default 1).
    #[arg(long, env = "FARM_SPEED_FACTOR")]
    pub speed_factor: Option<f64>,
    /// A system this builder builds for (repeatable; default: probed).
    #[arg(long = "system", env = "FARM_SYSTEM", value_delimiter = ',')]
    pub systems: Vec<String>,
    /// A supported feature (repeatable; default: probed system-features).
    #[arg(long = "feature", env = "FARM_FEATURE", value_delimiter = ',')]
    pub features: Vec<String>,
    /// A mandatory feature (repeatable).
    #[arg(
        long = "mandatory-feature",
        env = "FARM_MANDATORY_FEATURE",
        value_delimiter = ','
    )]
    pub mandatory_features: Vec<String>,
    /// PEM file with the coordinator's CA or certificate, pinned for https://.
    #[arg(long, env = "FARM_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Allow plaintext http:// to a non-loopback coordinator. Insecure: the
    /// traffic (jobs, logs, NARs) is readable and alterable on the way.
    #[arg(long, env = "FARM_INSECURE_PLAINTEXT", action = clap::ArgAction::SetTrue)]
    pub insecure_plaintext: bool,
    /// Seconds between load reports (default 5).
    #[arg(long, env = "FARM_LOAD_INTERVAL")]
    pub load_interval: Option<u64>,
    /// Directory with the nix programs (default: PATH).
    #[arg(long, env = "FARM_NIX_BIN_DIR")]
    pub nix_bin_dir: Option<PathBuf>,
    /// The Nix store to build in, as a store URI passed as `--store` to the
    /// Nix commands that open the store (default: Nix's own default, the local store or
    /// its daemon). E.g. `local?root=/var/lib/farm-builder/store`, a chroot
    /// store of the builder's own (store dir still /nix/store; Nix on Linux
    /// then builds every derivation in its sandbox, see `sandbox-paths`).
    #[arg(long, env = "FARM_STORE", value_name = "URI")]
    pub store: Option<String>,
    /// Seconds a stop (SIGTERM, SIGINT) may take at most: running builds are
    /// stopped and reported to the coordinator; whatever is still in flight
    /// then is abandoned (a second signal exits at once) [default: 10].
    #[arg(long, env = "FARM_SHUTDOWN_GRACE", value_name = "SECS")]
    pub shutdown_grace: Option<u64>,
    /// Print the public key line (generating the key if needed) and exit.
    #[arg(long)]
    pub print_public_key: bool,
}

/// The TOML file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct FileConfig {
    /// See `--coordinator`.
    pub coordinator: Option<String>,
    /// See `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// See `--key`.
    pub key: Option<PathBuf>,
    /// See `--name`.
    pub name: Option<String>,
    /// See `--max-jobs`.
    pub max_jobs: Option<u32>,
    /// See `--speed-factor`.
    pub speed_factor: Option<f64>,
    /// See `--system`.
    #[serde(alias = "systems")]
    pub system: Option<Vec<String>>,
    /// See `--feature`.
    #[serde(alias = "features")]
    pub feature: Option<Vec<String>>,
    /// See `--mandatory-feature`.
    #[serde(alias = "mandatory-features")]
    pub mandatory_feature: Option<Vec<String>>,
    /// See `--ca-cert`.
    pub ca_cert: Option<PathBuf>,
    /// See `--insecure-plaintext`.
    pub insecure_plaintext: Option<bool>,
    /// See `--load-interval`.
    pub load_interval: Option<u64>,
    /// See `--nix-bin-dir`.
    pub nix_bin_dir: Option<PathBuf>,
    /// See `--store`.
    pub store: Option<String>,
    /// See `--shutdown-grace`.
    pub shutdown_grace: Option<u64>,
}

impl FileConfig {
    /// Read and parse a TOML config file.
    pub(crate) fn load(path: &Path) -> Result<Self, BuilderError> {
        let meta = std::fs::metadata(path).map_err(|e| BuilderError::reading(path, e))?;
        if meta.len() > 1024 * 1024 {
            return Err(BuilderError::Config(format!(
                "{}: config file too large",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| BuilderError::reading(path, e))?;
        toml::from_str(&text).map_err(|e| BuilderError::Config(format!("{}: {e}", path.display())))
    }
}

impl Args {
    /// Merge flags (and env), the config file, and defaults into a `BuilderConfig`.
    pub fn into_config(self) -> Result<BuilderConfig, BuilderError> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        merge(self, file)
    }
}

fn non_empty(v: Vec<String>) -> Option<Vec<String>> {
    (!v.is_empty()).then_some(v)
}

/// Flags win over the file; the file wins over defaults.
pub(crate) fn merge(args: Args, file: FileConfig) -> Result<BuilderConfig, BuilderError> {
    let coordinator = args.coordinator.or(file.coordinator).ok_or_else(|| {
        BuilderError::Config(
            "--coordinator (or FARM_COORDINATOR, or `coordinator` in --config) is required".into(),
        )
    })?;
    let state_dir = args.state_dir.or(file.state_dir).ok_or_else(|| {
        BuilderError::Config(
            "--state-dir (or FARM_STATE_DIR, or `state-dir` in --config) is required".into(),
        )
    })?;
    let mut c = BuilderConfig::new(coordinator, state_dir);
    c.key = args.key.or(file.key);
    c.name = args.name.or(file.name);
    c.max_jobs = args.max_jobs.or(file.max_jobs);
    c.speed_factor = args.speed_factor.or(file.speed_factor).unwrap_or(1.0);
    c.systems = non_empty(args.systems).or(file.system).unwrap_or_default();
    c.features = non_empty(args.features).or(file.feature);
    c.mandatory_features = non_empty(args.mandatory_features)
        .or(file.mandatory_feature)
        .unwrap_or_default();
    c.ca_cert = args.ca_cert.or(file.ca_cert);
    c.insecure_plaintext = args.insecure_plaintext || file.insecure_plaintext.unwrap_or(false);
    if let Some(secs) = args.load_interval.or(file.load_interval) {
        c.load_interval = Duration::from_secs(secs.max(1));
    }
    c.nix_bin_dir = args.nix_bin_dir.or(file.nix_bin_dir);
    c.set_store(args.store.or(file.store));
    if let Some(secs) = args.shutdown_grace.or(file.shutdown_grace) {
        c.shutdown_grace = Duration::from_secs(secs);
    }
    validate(&c)?;
    Ok(c)
}

/// Checks that hold for any config, however it was built.
pub(crate) fn validate(c: &BuilderConfig) -> Result<(), BuilderError> {
    if !(c.speed_factor.is_finite() && c.speed_factor > 0.0) {
        return Err(BuilderError::Config(format!(
            "speed factor must be a positive number, got {}",
            c.speed_factor
        )));
    }
    if c.max_jobs == Some(0) {
        return Err(BuilderError::Config("max-jobs must be at least 1".into()));
    }
    check_name(&c.resolved_name())?;
    if let Some(store) = &c.store
        && (store.is_empty() || store.chars().any(char::is_control))
    {
        return Err(BuilderError::Config(format!(
            "invalid store URI {store:?}: give a Nix store URI such as local?root=/path"
        )));
    }
    farm_common::channel::check_url(&c.coordinator, c.client_tls())
        .map_err(|e| BuilderError::Config(e.to_string()))?;
    Ok(())
}

/// Where a local store URI keeps its files, when that is not `/nix/store`:
/// `local?root=DIR` (also with `real=` or `store=`) and a bare absolute path
/// (Nix's shorthand for `local?root=PATH`). None for any other store (the
/// default one, a daemon, a remote store), whose files are measured at
/// `/nix/store`.
pub(crate) fn real_store_dir(uri: &str) -> Option<PathBuf> {
    if uri.starts_with('/') && !uri.contains('?') {
        return Some(Path::new(uri).join("nix/store"));
    }
    let (scheme, query) = uri.split_once('?')?;
    if scheme != "local" {
        return None;
    }
    let mut root = None;
    let mut real = None;
    let mut store = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match key {
            "root" => root = Some(value),
            "real" => real = Some(value),
            "store" => store = Some(value),
            _ => {}
        }
    }
    if let Some(real) = real {
        return Some(PathBuf::from(real));
    }
    let store = store.unwrap_or_else(|| farm_nix::store_path::STORE_DIR.to_owned());
    let root = root?;
    Some(Path::new(&root).join(store.trim_start_matches('/')))
}

/// `%XX` escapes decoded (a malformed escape is kept as written).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Builder names are 1–64 characters of `A-Z a-z 0-9 . _ -` (what the
/// coordinator accepts), so a bad one is reported here, before connecting.
pub(crate) fn check_name(name: &str) -> Result<(), BuilderError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BuilderError::Config(format!(
            "invalid builder name {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (set --name)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("farm-builder").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn flags_build_a_config() {
        let c = parse(&[
            "--coordinator",
            "http://127.0.0.1:7070",
            "--state-dir",
            "/var/lib/b",
            "--max-jobs",
            "3",
            "--system",
            "x86_64-linux",
            "--system",
            "i686-linux",
            "--feature",
            "kvm",
            "--mandatory-feature",
            "benchmark",
            "--speed-factor",
            "2.5",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.max_jobs, Some(3));
        assert_eq!(c.systems, ["x86_64-linux", "i686-linux"]);
        assert_eq!(c.features, Some(vec!["kvm".to_owned()]));
        assert_eq!(c.mandatory_features, ["benchmark"]);
        assert_eq!(c.speed_factor, 2.5);
        assert_eq!(c.key_path(), Path::new("/var/lib/b/builder_ed25519"));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10), "the default");
    }

    #[test]
    fn file_fills_what_flags_leave_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(
            &path,
            "coordinator = \"http://localhost:7070\"\nstate-dir = \"/s\"\nmax-jobs = 4\n\
             name = \"from-file\"\nsystems = [\"aarch64-linux\"]\nfeature = [\"big-parallel\"]\n\
             shutdown-grace = 3\n",
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap(), "--name", "from-flag"])
            .into_config()
            .unwrap();
        assert_eq!(c.coordinator, "http://localhost:7070");
        assert_eq!(c.name.as_deref(), Some("from-flag"));
        assert_eq!(c.max_jobs, Some(4));
        assert_eq!(c.systems, ["aarch64-linux"]);
        assert_eq!(c.features, Some(vec!["big-parallel".to_owned()]));
        assert_eq!(c.shutdown_grace, Duration::from_secs(3));
        let c = parse(&["--config", path.to_str().unwrap(), "--shutdown-grace", "7"])
            .into_config()
            .unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(7), "the flag wins");
    }

    #[test]
    fn a_store_of_its_own() {
        let c = parse(&[
            "--coordinator",
            "http://127.0.0.1:7070",
            "--state-dir",
            "/s",
            "--store",
            "local?root=/s/my%20store",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.store.as_deref(), Some("local?root=/s/my%20store"));
        assert_eq!(c.store_dir, Path::new("/s/my store/nix/store"));
        let c = parse(&[
            "--coordinator",
            "http://127.0.0.1:7070",
            "--state-dir",
            "/s",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.store, None);
        assert_eq!(c.store_dir, Path::new("/nix/store"));
        assert_eq!(
            real_store_dir("/r").as_deref(),
            Some(Path::new("/r/nix/store"))
        );
        assert_eq!(
            real_store_dir("local?store=/gnu/store&root=/r").as_deref(),
            Some(Path::new("/r/gnu/store"))
        );
        assert_eq!(
            real_store_dir("local?real=/data/store").as_deref(),
            Some(Path::new("/data/store"))
        );
        assert_eq!(real_store_dir("daemon"), None);
        assert_eq!(real_store_dir("local"), None);
        assert_eq!(real_store_dir("ssh-ng://host?root=/r"), None);
        let err = parse(&[
            "--coordinator",
            "http://127.0.0.1:7070",
            "--state-dir",
            "/s",
            "--store",
            "",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("store URI"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(
            &path,
            "coordinator = \"http://localhost:1\"\nmax_jobz = 1\n",
        )
        .unwrap();
        let err = parse(&["--config", path.to_str().unwrap(), "--state-dir", "/s"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_jobz"), "{err}");
    }

    #[test]
    fn required_and_invalid_values_are_reported() {
        let err = parse(&["--state-dir", "/s"]).into_config().unwrap_err();
        assert!(err.to_string().contains("--coordinator"), "{err}");
        let err = parse(&[
            "--coordinator",
            "http://127.0.0.1:1",
            "--state-dir",
            "/s",
            "--max-jobs",
            "0",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("max-jobs"), "{err}");
        let err = parse(&[
            "--coordinator",
            "http://127.0.0.1:1",
            "--state-dir",
            "/s",
            "--name",
            "a b",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("invalid builder name"), "{err}");
        assert!(check_name("builder-01.lab_x").is_ok());
        assert!(check_name(&"x".repeat(65)).is_err());
        let err = parse(&[
            "--coordinator",
            "http://farm.example:7070",
            "--state-dir",
            "/s",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        let forced = parse(&[
            "--coordinator",
            "http://farm.example:7070",
            "--state-dir",
            "/s",
            "--insecure-plaintext",
        ])
        .into_config()
        .unwrap();
        assert!(forced.insecure_plaintext);
        let err = parse(&[
            "--coordinator",
            "https://farm.example:7070",
            "--state-dir",
            "/s",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("--ca-cert"), "{err}");
    }
}
