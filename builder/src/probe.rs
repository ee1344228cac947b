//! What this machine can build: the local Nix's system, extra-platforms,
//! system-features, max-jobs and version (from `nix show-config`), and the
//! host's cores and memory.
//!
//! `nix show-config --json` prints `{"<setting>": {"value": …, …}, …}`; the text
//! form prints `<setting> = <space-separated value>` lines. Both are parsed; the
//! text form is the fallback for a Nix that lacks `--json`.

use std::path::PathBuf;

use serde_json::Value;
use tokio::process::Command;

use crate::error::BuilderError;

/// What the local Nix says about itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct NixProbe {
    /// `system`.
    pub system: String,
    /// `extra-platforms`.
    pub extra_platforms: Vec<String>,
    /// `system-features`.
    pub system_features: Vec<String>,
    /// `max-jobs` (None for `auto` or absent).
    pub max_jobs: Option<u32>,
    /// `nix --version`'s version number ("2.8.0").
    pub version: String,
}

/// Longest `nix show-config` output we accept.
const MAX_CONFIG_OUTPUT: usize = 4 * 1024 * 1024;

/// Parse the JSON form of `nix show-config --json`.
pub(crate) fn parse_show_config_json(text: &str) -> Result<NixProbe, BuilderError> {
    if text.len() > MAX_CONFIG_OUTPUT {
        return Err(BuilderError::Probe("show-config output too large".into()));
    }
    let v: Value = serde_json::from_str(text)
        .map_err(|e| BuilderError::Probe(format!("show-config JSON: {e}")))?;
    let setting = |name: &str| v.get(name).and_then(|s| s.get("value"));
    let system = setting("system")
        .and_then(Value::as_str)
        .ok_or_else(|| BuilderError::Probe("show-config has no `system`".into()))?
        .to_owned();
    let list = |name: &str| -> Vec<String> {
        match setting(name) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    };
    let max_jobs = match setting("max-jobs") {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    Ok(NixProbe {
        system,
        extra_platforms: list("extra-platforms"),
        system_features: list("system-features"),
        max_jobs,
        version: String::new(),
    })
}

/// Parse the text form of `nix show-config`.
pub(crate) fn parse_show_config_text(text: &str) -> Result<NixProbe, BuilderError> {
    if text.len() > MAX_CONFIG_OUTPUT {
        return Err(BuilderError::Probe("show-config output too large".into()));
    }
    let mut probe = NixProbe::default();
    let mut have_system = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        let words = || value.split_whitespace().map(str::to_owned).collect();
        match key.trim() {
            "system" => {
                probe.system = value.trim().to_owned();
                have_system = !probe.system.is_empty();
            }
            "extra-platforms" => probe.extra_platforms = words(),
            "system-features" => probe.system_features = words(),
            "max-jobs" => probe.max_jobs = value.trim().parse().ok(),
            _ => {}
        }
    }
    if !have_system {
        return Err(BuilderError::Probe("show-config has no `system`".into()));
    }
    Ok(probe)
}

/// Parse `nix --version` output ("nix (Nix) 2.8.0") into "2.8.0".
pub(crate) fn parse_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let word = line.split_whitespace().last()?;
    word.starts_with(|c: char| c.is_ascii_digit())
        .then(|| word.to_owned())
}

/// Where the Nix programs are (a directory, or `None` to use `PATH`), and
/// the store they build in (a store URI, or `None` for Nix's default).
#[derive(Debug, Clone, Default)]
pub(crate) struct NixBin {
    dir: Option<PathBuf>,
    store: Option<String>,
}

impl NixBin {
    /// Programs from `dir`, or from `PATH` when `None`, on Nix's default store.
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        NixBin { dir, store: None }
    }

    /// The same programs on the store `store` (a Nix store URI; `None` for
    /// Nix's default).
    pub(crate) fn with_store(mut self, store: Option<String>) -> Self {
        self.store = store;
        self
    }

    /// The path (or bare name) of a Nix program.
    pub(crate) fn program(&self, name: &str) -> PathBuf {
        match &self.dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    /// A `Command` for a Nix program.
    pub(crate) fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.program(name));
        cmd.kill_on_drop(true);
        cmd
    }

    /// A `Command` for a Nix program that opens the store: the configured
    /// store is passed as `--store URI`.
    pub(crate) fn store_command(&self, name: &str) -> Command {
        let mut cmd = self.command(name);
        if let Some(store) = &self.store {
            cmd.arg("--store").arg(store);
        }
        cmd
    }
}

/// Ask the local Nix about itself.
pub(crate) async fn probe_nix(bin: &NixBin) -> Result<NixProbe, BuilderError> {
    let json = run_capture(
        bin.command("nix")
            .args(["--extra-experimental-features", "nix-command"])
            .args(["show-config", "--json"]),
    )
    .await;
    let mut probe = match json {
        Ok(text) => parse_show_config_json(&text)?,
        Err(json_err) => {
            let text = run_capture(
                bin.command("nix")
                    .args(["--extra-experimental-features", "nix-command"])
                    .arg("show-config"),
            )
            .await
            .map_err(|e| BuilderError::Probe(format!("{json_err}; then {e}")))?;
            parse_show_config_text(&text)?
        }
    };
    let version = run_capture(bin.command("nix").arg("--version")).await?;
    probe.version = parse_version(&version).unwrap_or_else(|| version.trim().to_owned());
    Ok(probe)
}

async fn run_capture(cmd: &mut Command) -> Result<String, BuilderError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| BuilderError::Probe(format!("running {:?}: {e}", cmd.as_std())))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(BuilderError::Probe(format!(
            "{:?} failed ({}): {}",
            cmd.as_std(),
            out.status,
            stderr.trim()
        )));
    }
    if out.stdout.len() > MAX_CONFIG_OUTPUT {
        return Err(BuilderError::Probe("output too large".into()));
    }
    String::from_utf8(out.stdout).map_err(|_| BuilderError::Probe("output is not UTF-8".into()))
}

/// The host's CPU count and total memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HostProbe {
    /// Logical CPUs.
    pub cores: u32,
    /// Total memory in bytes (0 when unknown).
    pub memory_bytes: u64,
}

/// Probe the host's cores and memory.
pub(crate) async fn probe_host() -> HostProbe {
    let cores = u32::try_from(num_cpus::get()).unwrap_or(u32::MAX);
    let memory_bytes = total_memory().await.unwrap_or(0);
    HostProbe {
        cores,
        memory_bytes,
    }
}

async fn total_memory() -> Option<u64> {
    if let Ok(text) = tokio::fs::read_to_string("/proc/meminfo").await {
        return meminfo_field(&text, "MemTotal");
    }
    // macOS: sysctl hw.memsize prints bytes.
    let out = Command::new("sysctl")
        .args(["-n", "hw.memsize"])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// A `/proc/meminfo` field in bytes (the file gives kB).
pub(crate) fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => n.checked_mul(1024),
            None => Some(n),
            Some(_) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of `nix show-config --json` from Nix 2.8.0 (x86_64-linux).
    const SHOW_CONFIG_JSON: &str = include_str!("../testdata/show-config-2.8.json");
    /// Real output of `nix show-config` from Nix 2.8.0.
    const SHOW_CONFIG_TEXT: &str = include_str!("../testdata/show-config-2.8.txt");

    fn expected() -> NixProbe {
        NixProbe {
            system: "x86_64-linux".into(),
            extra_platforms: vec![
                "i686-linux".into(),
                "x86_64-v1-linux".into(),
                "x86_64-v2-linux".into(),
                "x86_64-v3-linux".into(),
            ],
            system_features: vec![
                "benchmark".into(),
                "big-parallel".into(),
                "kvm".into(),
                "nixos-test".into(),
            ],
            max_jobs: Some(1),
            version: String::new(),
        }
    }

    #[test]
    fn parses_real_json_output() {
        assert_eq!(
            parse_show_config_json(SHOW_CONFIG_JSON).unwrap(),
            expected()
        );
    }

    #[test]
    fn parses_real_text_output() {
        assert_eq!(
            parse_show_config_text(SHOW_CONFIG_TEXT).unwrap(),
            expected()
        );
    }

    #[test]
    fn both_forms_agree_and_missing_system_is_an_error() {
        assert!(parse_show_config_json("{}").is_err());
        assert!(parse_show_config_json("not json").is_err());
        assert!(parse_show_config_text("cores = 2\n").is_err());
    }

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nix (Nix) 2.8.0\n").as_deref(), Some("2.8.0"));
        assert_eq!(
            parse_version("nix (Lix, like Nix) 2.91.1\nSystem type: x").as_deref(),
            Some("2.91.1")
        );
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn reads_meminfo_fields_in_bytes() {
        let text = "MemTotal:        8048508 kB\nMemFree:  100 kB\nMemAvailable:    5000000 kB\n";
        assert_eq!(meminfo_field(text, "MemTotal"), Some(8048508 * 1024));
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(5000000 * 1024));
        assert_eq!(meminfo_field(text, "Mem"), None);
        assert_eq!(meminfo_field(text, "SwapTotal"), None);
    }

    #[tokio::test]
    async fn probes_the_installed_nix() {
        // `nix show-config` reads configuration only; it never touches /nix.
        let probe = probe_nix(&NixBin::default()).await.unwrap();
        assert!(!probe.system.is_empty());
        assert!(
            probe.version.starts_with(|c: char| c.is_ascii_digit()),
            "{probe:?}"
        );
        let host = probe_host().await;
        assert!(host.cores >= 1);
        assert!(host.memory_bytes > 0);
    }
}
