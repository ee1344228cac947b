//! Choosing among builders: how soon a builder would finish a build (free
//! slots, speed factor, live load and pressure, bytes of the input closure it
//! still lacks), and the message for work no builder can ever take.

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashSet};
use std::hash::Hash;

use farm_nix::store_path::StorePath;

use crate::domain::model::{Capabilities, Load};

/// Estimated relative time for a builder to finish a build; lower is better.
///
/// `(1 + busy + load/2 + pressure) * (1 + missing/2) / speed²` where `busy` is
/// the share of its slots in use, `load` the 1-minute load average per core
/// (capped at 4), `pressure` the worst PSI share (0..1) and `missing` the share
/// of the input closure's bytes it does not hold.
/// (Paths are anything that borrows as a [`StorePath`]: the scheduler passes
/// its interned `Arc<StorePath>`s.)
#[cfg_attr(not(test), allow(dead_code))] // the scheduler scores through `score_with`
pub(crate) fn score<H, P>(
    caps: &Capabilities,
    load: &Load,
    running: usize,
    held: &HashSet<H>,
    inputs: &[(P, u64)],
) -> f64
where
    H: Borrow<StorePath> + Hash + Eq,
    P: Borrow<StorePath>,
{
    score_with(base(caps, load, running), inputs, |p| {
        held.contains(p.borrow())
    })
}

/// The part of [`score`] that does not depend on the build: the first factor
/// `1 + busy + load/2 + pressure` and the speed factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Base {
    pub(crate) factor: f64,
    pub(crate) speed: f64,
}

impl Base {
    /// The score when the builder holds every input byte (or there are none):
    /// a lower bound of its score for any build.
    pub(crate) fn warm(&self) -> f64 {
        combine(*self, 0.0)
    }

    /// The score when it holds none of the input bytes: an upper bound, and
    /// its exact score for a build whose inputs it holds none of.
    pub(crate) fn cold(&self) -> f64 {
        combine(*self, 1.0)
    }
}

/// [`Base`] of a builder with `running` jobs.
pub(crate) fn base(caps: &Capabilities, load: &Load, running: usize) -> Base {
    let slots = caps.max_jobs.max(1) as f64;
    let busy = running as f64 / slots;
    let cores = caps.cores.max(1) as f64;
    let per_core = if load.load_avg_1.is_finite() {
        (load.load_avg_1 / cores).clamp(0.0, 4.0)
    } else {
        0.0
    };
    let pressure = [load.cpu_pressure, load.memory_pressure, load.io_pressure]
        .into_iter()
        .filter(|p| p.is_finite() && *p >= 0.0)
        .fold(0.0f64, f64::max)
        .min(100.0)
        / 100.0;
    let speed = if caps.speed_factor.is_finite() && caps.speed_factor > 0.0 {
        caps.speed_factor
    } else {
        1.0
    };
    Base {
        factor: 1.0 + busy + 0.5 * per_core + pressure,
        speed,
    }
}

/// [`score`] from a builder's [`Base`] and whether it holds each input.
/// Exactly [`Base::warm`] when there are no input bytes and exactly
/// [`Base::cold`] when it holds none of them (the same operations in the
/// same order), and never below `warm` (rounding is monotonic).
pub(crate) fn score_with<P>(base: Base, inputs: &[(P, u64)], holds: impl Fn(&P) -> bool) -> f64 {
    let mut total: u64 = 0;
    let mut missing: u64 = 0;
    for (p, s) in inputs {
        total += *s;
        if !holds(p) {
            missing += *s;
        }
    }
    let transfer = if total > 0 {
        missing as f64 / total as f64
    } else {
        0.0
    };
    combine(base, transfer)
}

/// The speed factor counts squared (issue 13: the simulator showed it 5 %
/// shorter on deep chains over a mixed farm and unchanged on every other
/// case; a fast builder with a slot left and no inputs beats a slow idle one
/// holding them all).
fn combine(base: Base, transfer: f64) -> f64 {
    base.factor * (1.0 + 0.5 * transfer) / (base.speed * base.speed)
}

/// A builder as the unschedulable message describes it.
pub(crate) struct Known<'a> {
    pub name: &'a str,
    pub caps: &'a Capabilities,
}

fn list(set: &BTreeSet<String>) -> String {
    if set.is_empty() {
        "-".into()
    } else {
        set.iter().cloned().collect::<Vec<_>>().join(",")
    }
}

/// Why no builder in `known` can take a derivation for `system` needing
/// `required`, and what the farm has.
pub(crate) fn unschedulable_message(
    drv: &StorePath,
    system: &str,
    required: &BTreeSet<String>,
    known: &[Known<'_>],
) -> String {
    let same_system: Vec<&Known<'_>> = known
        .iter()
        .filter(|k| k.caps.systems.iter().any(|s| s == system))
        .collect();
    let missing = if same_system.is_empty() {
        format!("no builder has system {system}")
    } else {
        let lacking: BTreeSet<String> = required
            .iter()
            .filter(|f| {
                !same_system.iter().any(|k| {
                    k.caps.supported_features.contains(*f) || k.caps.mandatory_features.contains(*f)
                })
            })
            .cloned()
            .collect();
        if !lacking.is_empty() {
            format!("no {system} builder supports feature(s) {}", list(&lacking))
        } else {
            let unrequested: BTreeSet<String> = same_system
                .iter()
                .flat_map(|k| k.caps.mandatory_features.iter())
                .filter(|f| !required.contains(*f))
                .cloned()
                .collect();
            if unrequested.is_empty() {
                format!("no single {system} builder has all of {}", list(required))
            } else {
                format!(
                    "the {system} builders that have these features also require mandatory feature(s) {} that it does not request",
                    list(&unrequested)
                )
            }
        }
    };
    let has = if known.is_empty() {
        "the farm has no builders".to_string()
    } else {
        let mut parts: Vec<String> = known
            .iter()
            .take(20)
            .map(|k| {
                format!(
                    "{} (systems {}; features {}; mandatory {})",
                    k.name,
                    if k.caps.systems.is_empty() {
                        "-".into()
                    } else {
                        k.caps.systems.join(",")
                    },
                    list(&k.caps.supported_features),
                    list(&k.caps.mandatory_features)
                )
            })
            .collect();
        if known.len() > 20 {
            parts.push(format!("and {} more", known.len() - 20));
        }
        format!("the farm has: {}", parts.join("; "))
    };
    format!(
        "no builder can build {drv} (system {system}, required features {}): {missing}; {has}",
        list(required)
    )
}
