//! The builder's live load, reported to the coordinator every few seconds:
//! load average (`/proc/loadavg`, or `sysctl vm.loadavg` on macOS), memory
//! available (`/proc/meminfo` MemAvailable), free disk on the store (statvfs),
//! and pressure stall information (`/proc/pressure/{cpu,memory,io}`, "some avg10")
//! where the kernel has it; -1 where it does not.

use std::path::Path;

use farm_proto::v1::LoadReport;

use crate::probe::meminfo_field;

/// Parse `/proc/loadavg` ("0.52 0.58 0.59 1/467 12345") into (1 min, 5 min).
pub(crate) fn parse_loadavg(text: &str) -> Option<(f64, f64)> {
    let mut words = text.split_whitespace();
    let one = words.next()?.parse().ok()?;
    let five = words.next()?.parse().ok()?;
    Some((one, five))
}

/// Parse macOS `sysctl -n vm.loadavg` ("{ 1.23 1.45 1.67 }").
pub(crate) fn parse_sysctl_loadavg(text: &str) -> Option<(f64, f64)> {
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    parse_loadavg(inner)
}

/// Parse a PSI file: the `avg10` of its `some` line, in percent.
pub(crate) fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

/// Free bytes for unprivileged users on the filesystem holding `path`, or,
/// while `path` does not exist yet (a store not created until the first
/// build), on the filesystem of its nearest existing ancestor.
pub(crate) fn disk_free(path: &Path) -> Option<u64> {
    let st = path.ancestors().find_map(|p| rustix::fs::statvfs(p).ok())?;
    st.f_bavail.checked_mul(st.f_frsize)
}

/// Gather a load report now. `running_jobs` comes from the job manager;
/// `store` is the store directory whose filesystem is measured.
pub(crate) async fn current(running_jobs: u32, store: &Path) -> LoadReport {
    let (load_avg_1, load_avg_5) = load_average().await.unwrap_or((-1.0, -1.0));
    let memory_available_bytes = match tokio::fs::read_to_string("/proc/meminfo").await {
        Ok(text) => meminfo_field(&text, "MemAvailable").unwrap_or(0),
        Err(_) => 0,
    };
    let store = store.to_owned();
    let disk_free_bytes = tokio::task::spawn_blocking(move || disk_free(&store))
        .await
        .ok()
        .flatten()
        .unwrap_or(0);
    LoadReport {
        running_jobs,
        load_avg_1,
        load_avg_5,
        memory_available_bytes,
        disk_free_bytes,
        cpu_pressure: psi("cpu").await,
        memory_pressure: psi("memory").await,
        io_pressure: psi("io").await,
        // Filled in by the session (it knows the job backend).
        store_problem: String::new(),
    }
}

async fn load_average() -> Option<(f64, f64)> {
    if let Ok(text) = tokio::fs::read_to_string("/proc/loadavg").await {
        return parse_loadavg(&text);
    }
    let out = tokio::process::Command::new("sysctl")
        .args(["-n", "vm.loadavg"])
        .output()
        .await
        .ok()?;
    parse_sysctl_loadavg(&String::from_utf8_lossy(&out.stdout))
}

async fn psi(resource: &str) -> f64 {
    match tokio::fs::read_to_string(format!("/proc/pressure/{resource}")).await {
        Ok(text) => parse_psi_some_avg10(&text).unwrap_or(-1.0),
        Err(_) => -1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loadavg_forms() {
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/467 12345\n"),
            Some((0.52, 0.58))
        );
        assert_eq!(
            parse_sysctl_loadavg("{ 1.23 1.45 1.67 }\n"),
            Some((1.23, 1.45))
        );
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("x y"), None);
    }

    #[test]
    fn parses_psi() {
        let cpu = "some avg10=2.04 avg60=0.75 avg300=0.40 total=157656722\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_avg10(cpu), Some(2.04));
        assert_eq!(parse_psi_some_avg10("full avg10=1.00\n"), None);
        assert_eq!(parse_psi_some_avg10("some avg10=nope\n"), None);
    }

    /// A store directory that does not exist yet is measured on the
    /// filesystem that will hold it (a fresh host has no /nix/store).
    #[test]
    fn a_missing_store_is_measured_on_its_parent_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nix/store");
        assert!(!missing.exists());
        assert!(disk_free(&missing).is_some_and(|n| n > 0));
    }

    #[tokio::test]
    async fn measures_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let report = current(3, dir.path()).await;
        assert_eq!(report.running_jobs, 3);
        assert!(report.disk_free_bytes > 0);
        if Path::new("/proc/loadavg").exists() {
            assert!(report.load_avg_1 >= 0.0);
            assert!(report.memory_available_bytes > 0);
        }
        if Path::new("/proc/pressure/cpu").exists() {
            assert!(report.cpu_pressure >= 0.0);
        } else {
            assert_eq!(report.cpu_pressure, -1.0);
        }
    }
}
