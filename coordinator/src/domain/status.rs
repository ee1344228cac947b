//! What the farm looks like from outside, as plain data every API shows its
//! own way: [`FarmStatus`] (`farm status`, the dashboard, metrics),
//! [`Overview`] (the dashboard: the status, the queue by class with why it
//! waits, submissions' progress, the cache) and [`FarmMachine`] (the farm as
//! one Nix remote builder, `farm machines`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::domain::coordinator::{Coordinator, Facts};
use crate::domain::model::BuildView;
use crate::domain::scheduler::{BuilderView, FailureView, QueueClass, SubmissionProgress};

/// The farm now, read in one look at the scheduler.
#[derive(Debug, Clone)]
pub struct FarmStatus {
    pub builders: Vec<BuilderView>,
    /// Builds waiting, per system.
    pub queue: BTreeMap<String, u32>,
    pub running: Vec<Arc<BuildView>>,
    pub recent_failures: Vec<FailureView>,
}

/// One class of the queue (system and required features), and why its head waits.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassView {
    pub system: String,
    pub features: BTreeSet<String>,
    pub queue: QueueClass,
    /// Why the builds at the head of this class are not running.
    pub why: String,
}

/// The cache at a glance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheView {
    pub paths: usize,
    pub nar_bytes: u64,
    pub stored_bytes: u64,
    pub narinfo_hits: u64,
    pub narinfo_misses: u64,
}

/// Everything the dashboard's overview shows.
#[derive(Debug, Clone)]
pub struct Overview {
    pub status: FarmStatus,
    pub classes: Vec<ClassView>,
    pub submissions: Vec<SubmissionProgress>,
    pub cache: CacheView,
}

/// The farm as one remote builder for Nix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmMachine {
    /// A `nix.buildMachines` / `--builders` line.
    pub machines_line: String,
    /// `nix.conf` lines that make the farm's cache a substituter.
    pub nix_conf_lines: Vec<String>,
    /// An `ssh_config` block when the SSH endpoint is not on port 22, else empty.
    pub ssh_config: String,
}

impl Coordinator {
    /// The farm now.
    pub fn status(&self) -> FarmStatus {
        self.read_sched(|s| FarmStatus {
            builders: s.builders(),
            queue: s.queue_depths(),
            running: s.running(),
            recent_failures: s.recent_failures(),
        })
    }

    /// What the dashboard's overview shows, read in one look at the scheduler.
    pub fn overview(&self) -> Overview {
        let (status, classes, submissions) = self.read_sched(|s| {
            (
                FarmStatus {
                    builders: s.builders(),
                    queue: s.queue_depths(),
                    running: s.running(),
                    recent_failures: s.recent_failures(),
                },
                s.queue_classes(),
                s.submissions_progress(),
            )
        });
        let classes = classes
            .into_iter()
            .map(|((system, features), queue)| ClassView {
                why: why_waiting(&system, &features, &queue, &status.builders),
                system,
                features,
                queue,
            })
            .collect();
        let cache = self.cache();
        let (nar_bytes, stored_bytes) = cache.sizes();
        let (narinfo_hits, narinfo_misses) = cache.metrics().narinfo_counts();
        Overview {
            status,
            classes,
            submissions,
            cache: CacheView {
                paths: cache.len(),
                nar_bytes,
                stored_bytes,
                narinfo_hits,
                narinfo_misses,
            },
        }
    }

    /// The farm as one remote builder, over `protocol` (`ssh-ng` or `ssh`).
    pub fn machine(&self, protocol: &str) -> FarmMachine {
        let builders = self.read_sched(|s| s.builders());
        machines(self.facts(), protocol, &builders)
    }
}

/// Why the head of a queue class is not running, in words for an operator.
fn why_waiting(
    system: &str,
    features: &BTreeSet<String>,
    q: &QueueClass,
    builders: &[BuilderView],
) -> String {
    if q.runnable == 0 {
        return if q.waiting == 1 {
            "waiting for its dependencies".into()
        } else {
            format!("all {} waiting for their dependencies", q.waiting)
        };
    }
    let able: Vec<&BuilderView> = builders
        .iter()
        .filter(|b| b.record.capabilities.can_build(system, features))
        .collect();
    if able.is_empty() {
        return if features.is_empty() {
            format!("no builder can build {system}")
        } else {
            format!(
                "no builder can build {system} with {}",
                features.iter().cloned().collect::<Vec<_>>().join(",")
            )
        };
    }
    let online: Vec<&&BuilderView> = able.iter().filter(|b| b.online).collect();
    if online.is_empty() {
        return format!("every able builder is offline ({})", names(&able));
    }
    let open: Vec<&&&BuilderView> = online.iter().filter(|b| !b.record.draining).collect();
    if open.is_empty() {
        return format!("every able builder is draining ({})", names(&able));
    }
    let slots: u64 = open
        .iter()
        .map(|b| u64::from(b.record.capabilities.max_jobs))
        .sum();
    let used: u64 = open.iter().map(|b| b.running as u64).sum();
    if used >= slots {
        format!("all {slots} slots of the able builders are busy")
    } else {
        "being dispatched".into()
    }
}

fn names(bs: &[&BuilderView]) -> String {
    bs.iter()
        .map(|b| b.record.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The machines line, nix.conf lines and ssh_config for using the farm as one
/// remote builder, computed as the NixOS client module does (`farmMachine` in
/// `nixos-modules/lib.nix`, `programs.ssh.extraConfig` in `client.nix`):
///
/// `PROTOCOL://HOST SYSTEMS - MAXJOBS SPEED SUPPORTED MANDATORY HOSTKEY` with
/// the real SSH host; every system any builder has (online or not), sorted and
/// unique; no key file (`-`, the client's own SSH identity); the sum of their
/// slots (at least 1); the fastest builder's speed factor as an integer (Nix
/// 2.8 parses an integer; at least 1); as supported, the union of every
/// builder's supported and mandatory features minus the mandatory column
/// (`farmMachine.supportedFeatures`), then the mandatory ones, since
/// `nix.buildMachines` writes `supportedFeatures ++ mandatoryFeatures` there
/// and so the line is byte-identical to the client's `/etc/nix/machines`; as
/// mandatory, the features every builder requires (usually none, `-`); the
/// base64 host key.
///
/// Nix 2.8 machine URIs cannot carry a port, so when the endpoint is not on
/// port 22 the ssh_config gives it: `Host HOST` / `Port N` / `HostKeyAlias
/// HOST`. The alias because Nix writes the machines line's host key under the
/// bare host name, while ssh with a non-22 port looks up `[HOST]:N` (OpenSSH 9
/// then falls back to the bare name; the alias makes the lookup exact).
fn machines(facts: &Facts, protocol: &str, builders: &[BuilderView]) -> FarmMachine {
    use base64::Engine;
    let mut systems: BTreeSet<String> = BTreeSet::new();
    let mut supported: BTreeSet<String> = BTreeSet::new();
    let mut mandatory: Option<BTreeSet<String>> = None;
    let mut jobs: u32 = 0;
    let mut speed: f64 = 1.0;
    for b in builders {
        let caps = &b.record.capabilities;
        systems.extend(caps.systems.iter().cloned());
        supported.extend(caps.supported_features.iter().cloned());
        supported.extend(caps.mandatory_features.iter().cloned());
        mandatory = Some(match mandatory {
            None => caps.mandatory_features.clone(),
            Some(m) => m.intersection(&caps.mandatory_features).cloned().collect(),
        });
        jobs = jobs.saturating_add(caps.max_jobs);
        if caps.speed_factor.is_finite() && caps.speed_factor > speed {
            speed = caps.speed_factor;
        }
    }
    let mandatory = mandatory.unwrap_or_default();
    let mut features: Vec<String> = supported.difference(&mandatory).cloned().collect();
    features.extend(mandatory.iter().cloned());
    // Saturating float-to-int cast; at least 1 (checked above).
    let speed = (speed.round() as u64).max(1);
    let host = &facts.ssh_host;
    let host_key_b64 = base64::engine::general_purpose::STANDARD.encode(&facts.ssh_host_key);
    let join = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let machines_line = format!(
        "{protocol}://{host} {} - {} {speed} {} {} {host_key_b64}",
        join(systems.into_iter().collect()),
        jobs.max(1),
        join(features),
        join(mandatory.into_iter().collect()),
    );
    let ssh_config = if facts.ssh_port == 22 {
        String::new()
    } else {
        format!(
            "Host {host}\n  Port {}\n  HostKeyAlias {host}\n",
            facts.ssh_port
        )
    };
    FarmMachine {
        machines_line,
        nix_conf_lines: vec![
            format!("extra-substituters = {}", facts.http_url),
            format!("extra-trusted-public-keys = {}", facts.cache_public_key),
        ],
        ssh_config,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{BuilderRecord, Capabilities, Load};

    fn builder(
        systems: &[&str],
        supported: &[&str],
        mandatory: &[&str],
        max_jobs: u32,
        speed_factor: f64,
    ) -> BuilderView {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        BuilderView {
            record: BuilderRecord {
                name: "b".into(),
                public_key: String::new(),
                capabilities: Capabilities {
                    systems: systems.iter().map(|s| s.to_string()).collect(),
                    supported_features: set(supported),
                    mandatory_features: set(mandatory),
                    max_jobs,
                    speed_factor,
                    ..Default::default()
                },
                last_seen_ms: 0,
                draining: false,
            },
            load: Load::default(),
            online: true,
            running: 0,
        }
    }

    fn facts(port: u16) -> Facts {
        Facts {
            cache_public_key: "farm-1:abc=".into(),
            ssh_host_key: "ssh-ed25519 AAAAkey".into(),
            ssh_host: "farm.example.org".into(),
            ssh_port: port,
            http_url: "http://farm.example.org:7080".into(),
        }
    }

    #[test]
    fn the_farm_as_one_machine_like_the_nixos_module() {
        let bs = [
            builder(
                &["x86_64-linux", "i686-linux"],
                &["kvm", "big-parallel"],
                &["benchmark"],
                4,
                2.0,
            ),
            builder(
                &["aarch64-linux", "x86_64-linux"],
                &["nixos-test"],
                &["benchmark"],
                3,
                3.6,
            ),
        ];
        let m = machines(&facts(7022), "ssh-ng", &bs);
        assert_eq!(
            m.machines_line,
            "ssh-ng://farm.example.org aarch64-linux,i686-linux,x86_64-linux - 7 4 \
             big-parallel,kvm,nixos-test,benchmark benchmark c3NoLWVkMjU1MTkgQUFBQWtleQ=="
        );
        assert_eq!(
            m.ssh_config,
            "Host farm.example.org\n  Port 7022\n  HostKeyAlias farm.example.org\n"
        );
        assert_eq!(
            m.nix_conf_lines,
            [
                "extra-substituters = http://farm.example.org:7080",
                "extra-trusted-public-keys = farm-1:abc=",
            ]
        );
    }

    #[test]
    fn mandatory_only_when_every_builder_requires_it() {
        let bs = [
            builder(&["x86_64-linux"], &[], &["benchmark"], 1, 1.0),
            builder(&["x86_64-linux"], &["kvm"], &[], 1, 0.5),
        ];
        let m = machines(&facts(22), "ssh", &bs);
        assert_eq!(
            m.machines_line,
            "ssh://farm.example.org x86_64-linux - 2 1 benchmark,kvm - c3NoLWVkMjU1MTkgQUFBQWtleQ=="
        );
        assert_eq!(m.ssh_config, "");

        // required by all: the mandatory column, and after the others in the
        // features column as nix.buildMachines writes it
        let bs = [
            builder(&["x86_64-linux"], &["kvm"], &["benchmark", "gpu"], 1, 1.0),
            builder(&["x86_64-linux"], &["big-parallel"], &["benchmark"], 1, 1.0),
        ];
        let m = machines(&facts(22), "ssh-ng", &bs);
        assert_eq!(
            m.machines_line,
            "ssh-ng://farm.example.org x86_64-linux - 2 1 big-parallel,gpu,kvm,benchmark benchmark \
             c3NoLWVkMjU1MTkgQUFBQWtleQ=="
        );
    }

    #[test]
    fn no_builders_still_a_usable_line() {
        let m = machines(&facts(22), "ssh-ng", &[]);
        assert_eq!(
            m.machines_line,
            "ssh-ng://farm.example.org - - 1 1 - - c3NoLWVkMjU1MTkgQUFBQWtleQ=="
        );
        let speedy = [builder(&["x86_64-linux"], &[], &[], 0, f64::NAN)];
        assert!(
            machines(&facts(22), "ssh-ng", &speedy)
                .machines_line
                .contains(" - 1 1 - - ")
        );
    }
}
