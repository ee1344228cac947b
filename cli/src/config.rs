//! Where the CLI's settings come from: the flag, else the environment (both
//! resolved by clap into [`GlobalArgs`]), else the config file
//! (`$XDG_CONFIG_HOME/nix-farm/config.toml`, `~/.config/nix-farm/config.toml`,
//! or `--config`), else the defaults.
//!
//! Config file (TOML, unknown keys refused):
//! ```toml
//! coordinator = "https://farm.example.org:7070"
//! key = "/home/me/.ssh/id_ed25519"
//! ca-cert = "/etc/nix-farm/ca.pem"
//! ```
//!
//! The key, when none is configured: `~/.ssh/id_ed25519`, else the client key
//! `farm up` generated in its default state directory
//! (`STATE/client/id_ed25519`, see [`default_state_dir`]), so the CLI works
//! right after `farm up` as the same user.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::args::GlobalArgs;
use crate::error::CliError;

/// The coordinator address when nothing else says.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";
/// Largest config file read.
const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// The config file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub coordinator: Option<String>,
    pub key: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The command line flag or its environment variable.
    FlagOrEnv,
    /// The config file.
    File,
    /// The built-in default.
    Default,
    /// The client key `farm up` generated (its default state directory).
    FarmUp,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::FlagOrEnv => "flag or environment",
            Source::File => "config file",
            Source::Default => "default",
            Source::FarmUp => "farm up's client key",
        })
    }
}

/// The settings in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Coordinator URL with its scheme.
    pub coordinator: String,
    pub coordinator_source: Source,
    /// The key to sign with; `None` when no key was configured and neither
    /// default file exists (calls go unsigned, and a coordinator refuses them).
    pub key: Option<PathBuf>,
    pub key_source: Source,
    pub ca_cert: Option<PathBuf>,
    pub ca_cert_source: Source,
    /// `--insecure-plaintext`: plaintext http:// allowed beyond loopback.
    pub insecure_plaintext: bool,
    /// The config file consulted (whether or not it exists).
    pub config_path: Option<PathBuf>,
}

/// The environment the defaults depend on (injected for tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub home: Option<PathBuf>,
    pub xdg_config_home: Option<PathBuf>,
    pub xdg_state_home: Option<PathBuf>,
}

impl Env {
    /// The process environment.
    pub fn from_process() -> Env {
        Env {
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from),
            xdg_config_home: std::env::var_os("XDG_CONFIG_HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from),
            xdg_state_home: std::env::var_os("XDG_STATE_HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from),
        }
    }

    /// The default config file.
    pub fn default_config_path(&self) -> Option<PathBuf> {
        self.xdg_config_home
            .clone()
            .or_else(|| self.home.as_ref().map(|h| h.join(".config")))
            .map(|d| d.join("nix-farm").join("config.toml"))
    }

    /// The default key file.
    pub fn default_key_path(&self) -> Option<PathBuf> {
        self.home
            .as_ref()
            .map(|h| h.join(".ssh").join("id_ed25519"))
    }

    /// The client key `farm up` generates in its default state directory.
    pub fn farm_up_key_path(&self) -> Option<PathBuf> {
        default_state_dir(self.xdg_state_home.clone(), self.home.clone())
            .ok()
            .map(|d| client_key_path(&d))
    }
}

/// `farm up`'s default state directory: `$XDG_STATE_HOME/nix-farm`, else
/// `~/.local/state/nix-farm`.
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

/// Where `farm up` keeps the client key it generates in `state_dir`.
pub fn client_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("client").join("id_ed25519")
}

/// Read a config file. `required` = it was named explicitly (so missing is an error).
pub fn read_file_config(path: &Path, required: bool) -> Result<FileConfig, CliError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(FileConfig::default());
        }
        Err(e) => return Err(CliError::io_path("reading config file", path, e)),
    };
    if meta.len() > MAX_CONFIG_FILE {
        return Err(CliError::Config(format!(
            "{}: config file larger than {MAX_CONFIG_FILE} bytes",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::io_path("reading config file", path, e))?;
    toml::from_str(&text)
        .map_err(|e| CliError::Config(format!("{}: {}", path.display(), e.message())))
}

/// A coordinator address with a scheme: `host:port` becomes `http://` on
/// loopback and `https://` elsewhere.
pub fn normalize_coordinator(addr: &str) -> Result<String, CliError> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Err(CliError::Usage("the coordinator address is empty".into()));
    }
    if let Some((scheme, rest)) = addr.split_once("://") {
        if scheme != "http" && scheme != "https" {
            return Err(CliError::Usage(format!(
                "coordinator URL {addr:?}: use http:// or https://"
            )));
        }
        if rest.is_empty() {
            return Err(CliError::Usage(format!(
                "coordinator URL {addr:?} has no host"
            )));
        }
        return Ok(addr.trim_end_matches('/').to_owned());
    }
    let host = host_of(addr);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    Ok(format!(
        "{}://{addr}",
        if loopback { "http" } else { "https" }
    ))
}

/// The host of `host:port` or `[v6]:port`, brackets removed.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((h, _)) if !h.contains(':') => h,
        _ => addr,
    }
}

/// Resolve the settings: flag/env (already merged by clap in `args`) over the
/// file over the defaults.
pub fn resolve(args: &GlobalArgs, env: &Env) -> Result<Settings, CliError> {
    let (config_path, required) = match &args.config {
        Some(p) => (Some(p.clone()), true),
        None => (env.default_config_path(), false),
    };
    let file = match &config_path {
        Some(p) => read_file_config(p, required)?,
        None => FileConfig::default(),
    };
    resolve_with(args, file, config_path, env)
}

/// [`resolve`] with the file already read.
pub fn resolve_with(
    args: &GlobalArgs,
    file: FileConfig,
    config_path: Option<PathBuf>,
    env: &Env,
) -> Result<Settings, CliError> {
    let pick = |flag: Option<String>, file: Option<String>| match (flag, file) {
        (Some(v), _) => (Some(v), Source::FlagOrEnv),
        (None, Some(v)) => (Some(v), Source::File),
        (None, None) => (None, Source::Default),
    };
    let (coordinator, coordinator_source) = pick(args.coordinator.clone(), file.coordinator);
    let coordinator = normalize_coordinator(coordinator.as_deref().unwrap_or(DEFAULT_COORDINATOR))?;

    let (key, key_source) = match (&args.key, file.key) {
        (Some(k), _) => (Some(k.clone()), Source::FlagOrEnv),
        (None, Some(k)) => (Some(expand_tilde(&k, env)), Source::File),
        (None, None) => match env.default_key_path().filter(|p| p.exists()) {
            Some(k) => (Some(k), Source::Default),
            None => match env.farm_up_key_path().filter(|p| p.exists()) {
                Some(k) => (Some(k), Source::FarmUp),
                None => (None, Source::Default),
            },
        },
    };
    let (ca_cert, ca_cert_source) = match (&args.ca_cert, file.ca_cert) {
        (Some(c), _) => (Some(c.clone()), Source::FlagOrEnv),
        (None, Some(c)) => (Some(expand_tilde(&c, env)), Source::File),
        (None, None) => (None, Source::Default),
    };
    Ok(Settings {
        coordinator,
        coordinator_source,
        key,
        key_source,
        ca_cert,
        ca_cert_source,
        insecure_plaintext: args.insecure_plaintext,
        config_path,
    })
}

/// `~/x` in the config file means `$HOME/x`.
fn expand_tilde(p: &Path, env: &Env) -> PathBuf {
    match (p.strip_prefix("~"), &env.home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => p.to_path_buf(),
    }
}

impl Settings {
    /// The config path for messages.
    pub fn config_display(&self) -> String {
        self.config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.config/nix-farm/config.toml".into())
    }

    /// Human-readable listing for `farm config`.
    pub fn render(&self) -> String {
        let opt = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(none)".into())
        };
        format!(
            "coordinator = {}  ({})\nkey         = {}  ({})\nca-cert     = {}  ({})\nconfig file = {}{}\n",
            self.coordinator,
            self.coordinator_source,
            opt(&self.key),
            self.key_source,
            opt(&self.ca_cert),
            self.ca_cert_source,
            self.config_display(),
            match &self.config_path {
                Some(p) if !p.exists() => "  (does not exist)",
                _ => "",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(home: &Path) -> Env {
        Env {
            home: Some(home.to_path_buf()),
            xdg_config_home: None,
            xdg_state_home: None,
        }
    }

    #[test]
    fn flag_over_file_over_default() {
        let dir = tempfile::tempdir().unwrap();
        let e = env(dir.path());
        let file = FileConfig {
            coordinator: Some("https://file:1".into()),
            key: Some("~/file_key".into()),
            ca_cert: Some("/file/ca.pem".into()),
        };
        // file over default
        let s = resolve_with(&GlobalArgs::default(), file.clone(), None, &e).unwrap();
        assert_eq!(s.coordinator, "https://file:1");
        assert_eq!(s.coordinator_source, Source::File);
        assert_eq!(s.key, Some(dir.path().join("file_key")));
        assert_eq!(s.ca_cert, Some(PathBuf::from("/file/ca.pem")));
        // flag over file
        let args = GlobalArgs {
            coordinator: Some("http://127.0.0.1:9".into()),
            key: Some("/flag/key".into()),
            ca_cert: None,
            insecure_plaintext: true,
            config: None,
        };
        let s = resolve_with(&args, file, None, &e).unwrap();
        assert!(s.insecure_plaintext);
        assert_eq!(s.coordinator, "http://127.0.0.1:9");
        assert_eq!(s.coordinator_source, Source::FlagOrEnv);
        assert_eq!(s.key, Some(PathBuf::from("/flag/key")));
        assert_eq!(s.ca_cert_source, Source::File);
        // defaults: the default key only when it exists
        let s = resolve_with(&GlobalArgs::default(), FileConfig::default(), None, &e).unwrap();
        assert_eq!(s.coordinator, DEFAULT_COORDINATOR);
        assert_eq!(s.key, None);
        // then farm up's client key, when there is one
        let up_key = dir.path().join(".local/state/nix-farm/client/id_ed25519");
        std::fs::create_dir_all(up_key.parent().unwrap()).unwrap();
        std::fs::write(&up_key, "x").unwrap();
        let s = resolve_with(&GlobalArgs::default(), FileConfig::default(), None, &e).unwrap();
        assert_eq!(s.key, Some(up_key.clone()));
        assert_eq!(s.key_source, Source::FarmUp);
        assert!(
            s.render().contains("(farm up's client key)"),
            "{}",
            s.render()
        );
        let xdg = Env {
            xdg_state_home: Some(dir.path().join("xdg")),
            ..e.clone()
        };
        assert_eq!(
            xdg.farm_up_key_path(),
            Some(dir.path().join("xdg/nix-farm/client/id_ed25519"))
        );
        // ~/.ssh/id_ed25519 comes first
        std::fs::create_dir_all(dir.path().join(".ssh")).unwrap();
        std::fs::write(dir.path().join(".ssh/id_ed25519"), "x").unwrap();
        let s = resolve_with(&GlobalArgs::default(), FileConfig::default(), None, &e).unwrap();
        assert_eq!(s.key, Some(dir.path().join(".ssh/id_ed25519")));
        assert_eq!(s.key_source, Source::Default);
    }

    #[test]
    fn config_file_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(&p, "coordinator = \"farm:7070\"\nca-cert = \"/c.pem\"\n").unwrap();
        let f = read_file_config(&p, true).unwrap();
        assert_eq!(f.coordinator.as_deref(), Some("farm:7070"));
        std::fs::write(&p, "coordinatr = \"x\"\n").unwrap();
        let e = read_file_config(&p, true).unwrap_err();
        assert!(e.to_string().contains("coordinatr"), "{e}");
        // missing: fine by default, an error when named
        let missing = dir.path().join("nope.toml");
        assert_eq!(
            read_file_config(&missing, false).unwrap(),
            FileConfig::default()
        );
        assert!(read_file_config(&missing, true).is_err());
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
    fn default_paths_follow_xdg() {
        let e = Env {
            home: Some("/home/u".into()),
            xdg_config_home: Some("/xdg".into()),
            xdg_state_home: None,
        };
        assert_eq!(
            e.default_config_path(),
            Some(PathBuf::from("/xdg/nix-farm/config.toml"))
        );
        let e = Env {
            home: Some("/home/u".into()),
            xdg_config_home: None,
            xdg_state_home: None,
        };
        assert_eq!(
            e.default_config_path(),
            Some(PathBuf::from("/home/u/.config/nix-farm/config.toml"))
        );
    }

    #[test]
    fn coordinator_addresses() {
        assert_eq!(
            normalize_coordinator("127.0.0.1:7070").unwrap(),
            "http://127.0.0.1:7070"
        );
        assert_eq!(
            normalize_coordinator("localhost:1").unwrap(),
            "http://localhost:1"
        );
        assert_eq!(normalize_coordinator("[::1]:1").unwrap(), "http://[::1]:1");
        assert_eq!(
            normalize_coordinator("farm.example.org:7070").unwrap(),
            "https://farm.example.org:7070"
        );
        assert_eq!(
            normalize_coordinator("https://farm:7070/").unwrap(),
            "https://farm:7070"
        );
        assert!(normalize_coordinator("ftp://farm").is_err());
        assert!(normalize_coordinator("").is_err());
    }
}
