//! Alerts: what the farm should tell an operator, decided from what it
//! observes. Pure: [`Alerts::evaluate`] takes an [`Observation`] (builders
//! with their load reports, the watched jobs' verdicts, the cache's size,
//! the state database's flush counters) and the time, and returns the
//! [`Alert`]s to send; sending them (ntfy, webhooks) is `crate::alerting`'s.
//!
//! Every alert has a kind and a subject (a builder's name, a job's name,
//! `cache`, `state`): one *episode* per (kind, subject). An episode opens
//! when its condition has held for the kind's delay (a builder offline for
//! `builder_offline_ms`, a builder's disk or memory low for `load_hold_ms`;
//! the others at once), fires once, and ends with one `resolved` alert when
//! the condition has been clear for the kind's delay (low disk or memory:
//! `load_hold_ms`, so a builder whose memory swings does not flap; the
//! others at once), or when its subject is no longer tracked (a builder
//! drained or forgotten, a job no longer watched). A value that is not known
//! (an offline builder's load, a job that has no verdict yet) changes
//! nothing. Episodes live in memory: a coordinator restart during one
//! announces it again if it still holds after its delay.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::domain::state::FlushStats;

/// Thresholds and delays (0 for a threshold: that alert is off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertConfig {
    /// A builder offline (not drained) this long alerts.
    pub builder_offline_ms: i64,
    /// A connected builder reporting less free disk in its store alerts.
    pub disk_free_min_bytes: u64,
    /// A connected builder reporting less available memory alerts.
    pub memory_available_min_bytes: u64,
    /// How long low disk or memory must last to alert, and be fixed to recover.
    pub load_hold_ms: i64,
    /// Named jobs whose success → failure → success is announced.
    pub watched_jobs: BTreeSet<String>,
    /// The cache storing more than this (compressed bytes) alerts.
    pub cache_max_bytes: u64,
    /// State flushes slower than this on average over `flush_window_ms` alert.
    pub flush_slow_ms: u64,
    /// The window the flush average is taken over.
    pub flush_window_ms: i64,
}

impl Default for AlertConfig {
    fn default() -> AlertConfig {
        AlertConfig {
            builder_offline_ms: 5 * 60_000,
            disk_free_min_bytes: 5 << 30,
            memory_available_min_bytes: 1 << 30,
            load_hold_ms: 2 * 60_000,
            watched_jobs: BTreeSet::new(),
            cache_max_bytes: 0,
            flush_slow_ms: 1000,
            flush_window_ms: 60_000,
        }
    }
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertKind {
    BuilderOffline,
    BuilderDiskLow,
    BuilderMemoryLow,
    JobFailing,
    CacheOverSize,
    StateFlushSlow,
}

impl AlertKind {
    /// The name alerts carry (`alert` in a webhook's JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::BuilderOffline => "builder_offline",
            AlertKind::BuilderDiskLow => "builder_disk_low",
            AlertKind::BuilderMemoryLow => "builder_memory_low",
            AlertKind::JobFailing => "job_failing",
            AlertKind::CacheOverSize => "cache_over_size",
            AlertKind::StateFlushSlow => "state_flush_slow",
        }
    }
}

/// Whether an episode begins or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// One message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    pub state: AlertState,
    pub subject: String,
    /// What happened and what to do.
    pub message: String,
    pub at_ms: i64,
}

impl Alert {
    /// A one-line title: `[farm] builder b1 offline` / `[farm] resolved: …`.
    pub fn title(&self) -> String {
        let what = match self.kind {
            AlertKind::BuilderOffline => format!("builder {} offline", self.subject),
            AlertKind::BuilderDiskLow => format!("builder {} disk low", self.subject),
            AlertKind::BuilderMemoryLow => format!("builder {} memory low", self.subject),
            AlertKind::JobFailing => format!("job {} failing", self.subject),
            AlertKind::CacheOverSize => "cache over size".to_owned(),
            AlertKind::StateFlushSlow => "state flush slow".to_owned(),
        };
        match self.state {
            AlertState::Firing => format!("[farm] {what}"),
            AlertState::Resolved => format!("[farm] resolved: {what}"),
        }
    }

    /// `at` as RFC 3339 UTC.
    pub fn at_rfc3339(&self) -> String {
        rfc3339(self.at_ms)
    }
}

/// A builder as the alerts see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderObs {
    pub name: String,
    pub online: bool,
    pub draining: bool,
    pub last_seen_ms: i64,
    /// From its last load report, while connected (`None`: none yet).
    pub disk_free_bytes: Option<u64>,
    pub memory_available_bytes: Option<u64>,
}

/// A job's verdict: its newest run that has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passing,
    Failing,
}

/// A watched job as the alerts see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobObs {
    pub name: String,
    /// `None`: no run with a verdict (or no such job yet).
    pub verdict: Option<Verdict>,
    /// The newest run with a verdict's submission.
    pub submission: Option<u64>,
    /// Whether an earlier run in its history succeeded.
    pub passed_before: bool,
}

/// What the farm looks like now.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub builders: Vec<BuilderObs>,
    /// The watched jobs.
    pub jobs: Vec<JobObs>,
    /// Compressed bytes the cache stores for its published paths.
    pub cache_stored_bytes: u64,
    pub flush: FlushStats,
}

/// One (kind, subject)'s episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Episode {
    /// The condition holds since then, not long enough yet.
    Pending { since: i64 },
    /// Fired (at `fired`); `clear_since`: the condition is clear since then.
    Firing {
        fired: i64,
        clear_since: Option<i64>,
    },
}

/// One condition, this round.
struct Check {
    key: (AlertKind, String),
    /// `Some(true)`: holds; `Some(false)`: clear; `None`: unknown (no change).
    bad: Option<bool>,
    /// Since when it holds (when known better than "now").
    since: i64,
    fire_after: i64,
    clear_after: i64,
    firing: String,
    resolved: String,
}

/// The alert evaluator: episodes by (kind, subject).
#[derive(Debug)]
pub struct Alerts {
    config: AlertConfig,
    /// When evaluation began (a builder offline since before counts from then).
    started_ms: i64,
    episodes: BTreeMap<(AlertKind, String), Episode>,
    /// Each watched job's last verdict seen.
    verdicts: BTreeMap<String, Verdict>,
    /// Flush counters over the window, oldest first.
    flushes: VecDeque<(i64, FlushStats)>,
}

impl Alerts {
    pub fn new(config: AlertConfig, now_ms: i64) -> Alerts {
        Alerts {
            config,
            started_ms: now_ms,
            episodes: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            flushes: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &AlertConfig {
        &self.config
    }

    /// The (kind, subject) pairs firing now.
    pub fn firing(&self) -> Vec<(AlertKind, String)> {
        self.episodes
            .iter()
            .filter(|(_, e)| matches!(e, Episode::Firing { .. }))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Look at the farm at `now_ms`: the alerts to send (each episode's
    /// `firing` once, its `resolved` once).
    pub fn evaluate(&mut self, obs: &Observation, now_ms: i64) -> Vec<Alert> {
        let checks = self.checks(obs, now_ms);
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for c in checks {
            seen.insert(c.key.clone());
            self.step(c, now_ms, &mut out);
        }
        // Subjects no longer tracked: their episodes end.
        let gone: Vec<_> = self
            .episodes
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(Episode::Firing { .. }) = self.episodes.remove(&key) {
                let message = match key.0 {
                    AlertKind::BuilderOffline
                    | AlertKind::BuilderDiskLow
                    | AlertKind::BuilderMemoryLow => {
                        format!("builder {} is no longer tracked (forgotten)", key.1)
                    }
                    AlertKind::JobFailing => {
                        format!("job {} is no longer watched", key.1)
                    }
                    _ => "no longer checked".to_owned(),
                };
                out.push(Alert {
                    kind: key.0,
                    state: AlertState::Resolved,
                    subject: key.1,
                    message,
                    at_ms: now_ms,
                });
            }
        }
        for j in &obs.jobs {
            if let Some(v) = j.verdict {
                self.verdicts.insert(j.name.clone(), v);
            }
        }
        self.verdicts
            .retain(|name, _| obs.jobs.iter().any(|j| &j.name == name));
        out
    }

    fn step(&mut self, c: Check, now: i64, out: &mut Vec<Alert>) {
        let Some(bad) = c.bad else {
            return;
        };
        let alert = |state, message: &String| Alert {
            kind: c.key.0,
            state,
            subject: c.key.1.clone(),
            message: message.clone(),
            at_ms: now,
        };
        let next = match (self.episodes.get(&c.key).copied(), bad) {
            (None, false) => None,
            (None, true) => Some(Episode::Pending {
                since: c.since.min(now),
            }),
            (Some(Episode::Pending { .. }), false) => None,
            (Some(p @ Episode::Pending { .. }), true) => Some(p),
            (Some(Episode::Firing { fired, .. }), true) => Some(Episode::Firing {
                fired,
                clear_since: None,
            }),
            (Some(Episode::Firing { fired, clear_since }), false) => {
                let since = clear_since.unwrap_or(now);
                if now - since >= c.clear_after {
                    out.push(alert(AlertState::Resolved, &c.resolved));
                    None
                } else {
                    Some(Episode::Firing {
                        fired,
                        clear_since: Some(since),
                    })
                }
            }
        };
        let next = match next {
            Some(Episode::Pending { since }) if now - since >= c.fire_after => {
                out.push(alert(AlertState::Firing, &c.firing));
                Some(Episode::Firing {
                    fired: now,
                    clear_since: None,
                })
            }
            n => n,
        };
        match next {
            Some(e) => {
                self.episodes.insert(c.key, e);
            }
            None => {
                self.episodes.remove(&c.key);
            }
        }
    }

    fn checks(&mut self, obs: &Observation, now: i64) -> Vec<Check> {
        let cfg = &self.config;
        let mut v = Vec::new();
        for b in &obs.builders {
            let name = &b.name;
            let since = b.last_seen_ms.max(self.started_ms);
            let offline_for = duration((now - since).max(0));
            v.push(Check {
                key: (AlertKind::BuilderOffline, name.clone()),
                bad: Some(!b.online && !b.draining),
                since,
                fire_after: cfg.builder_offline_ms,
                clear_after: 0,
                firing: format!(
                    "builder {name} has been offline for {offline_for} (last seen {}): check \
                     farm-builder on its host (`systemctl status farm-builder`, its journal) and \
                     its network path to the coordinator; its jobs went back to the queue. If it \
                     is gone for good, `farm drain {name}` ends this alert.",
                    rfc3339(b.last_seen_ms)
                ),
                resolved: if b.draining {
                    format!("builder {name} is drained: no longer alerting about it")
                } else {
                    format!("builder {name} is back online")
                },
            });
            let low = |have: Option<u64>, min: u64| match (b.online, have) {
                _ if min == 0 => Some(false),
                (true, Some(have)) => Some(have < min),
                _ => None,
            };
            v.push(Check {
                key: (AlertKind::BuilderDiskLow, name.clone()),
                bad: low(b.disk_free_bytes, cfg.disk_free_min_bytes),
                since: now,
                fire_after: cfg.load_hold_ms,
                clear_after: cfg.load_hold_ms,
                firing: format!(
                    "builder {name} has {} free in its Nix store (alert below {}): collect \
                     garbage there (`nix-collect-garbage`, or lower its store's retention) or \
                     grow the disk; `farm drain {name}` keeps new builds off it meanwhile.",
                    bytes(b.disk_free_bytes.unwrap_or(0)),
                    bytes(cfg.disk_free_min_bytes)
                ),
                resolved: format!(
                    "builder {name} has {} free in its Nix store again",
                    bytes(b.disk_free_bytes.unwrap_or(0))
                ),
            });
            v.push(Check {
                key: (AlertKind::BuilderMemoryLow, name.clone()),
                bad: low(b.memory_available_bytes, cfg.memory_available_min_bytes),
                since: now,
                fire_after: cfg.load_hold_ms,
                clear_after: cfg.load_hold_ms,
                firing: format!(
                    "builder {name} has {} of memory available (alert below {}): lower its \
                     max-jobs or cores, or find what else uses memory on that host; `farm drain \
                     {name}` keeps new builds off it meanwhile.",
                    bytes(b.memory_available_bytes.unwrap_or(0)),
                    bytes(cfg.memory_available_min_bytes)
                ),
                resolved: format!(
                    "builder {name} has {} of memory available again",
                    bytes(b.memory_available_bytes.unwrap_or(0))
                ),
            });
        }
        for j in &obs.jobs {
            let name = &j.name;
            let key = (AlertKind::JobFailing, name.clone());
            let open = self.episodes.contains_key(&key);
            let was_passing = self.verdicts.get(name) == Some(&Verdict::Passing);
            let sub = j
                .submission
                .map_or_else(String::new, |s| format!(" (s{s})"));
            v.push(Check {
                key,
                bad: j.verdict.map(|verdict| {
                    verdict == Verdict::Failing && (open || was_passing || j.passed_before)
                }),
                since: now,
                fire_after: 0,
                clear_after: 0,
                firing: format!(
                    "job {name} failed{sub} after passing: see `farm jobs {name}` for its runs \
                     and `farm logs <derivation>` for the failed build's log; fix it and build \
                     the job again."
                ),
                resolved: format!("job {name} passes again{sub}"),
            });
        }
        if cfg.cache_max_bytes > 0 {
            v.push(Check {
                key: (AlertKind::CacheOverSize, "cache".into()),
                bad: Some(obs.cache_stored_bytes > cfg.cache_max_bytes),
                since: now,
                fire_after: 0,
                clear_after: 0,
                firing: format!(
                    "the binary cache stores {} (alert above {}): free space in its storage \
                     (remove what nobody needs any more) or give it more and raise \
                     --alert-cache-bytes.",
                    bytes(obs.cache_stored_bytes),
                    bytes(cfg.cache_max_bytes)
                ),
                resolved: format!(
                    "the binary cache stores {}, under the threshold again",
                    bytes(obs.cache_stored_bytes)
                ),
            });
        }
        if cfg.flush_slow_ms > 0 {
            let window = cfg.flush_window_ms.max(1);
            self.flushes.push_back((now, obs.flush));
            while self.flushes.len() > 1 && self.flushes[1].0 <= now - window {
                self.flushes.pop_front();
            }
            let (_, old) = self.flushes[0];
            let n = obs.flush.flushes.saturating_sub(old.flushes);
            let mean_ms = (n > 0).then(|| {
                obs.flush.busy_micros.saturating_sub(old.busy_micros) as f64 / n as f64 / 1000.0
            });
            let mean = mean_ms.unwrap_or(0.0);
            v.push(Check {
                key: (AlertKind::StateFlushSlow, "state".into()),
                bad: mean_ms.map(|m| m > cfg.flush_slow_ms as f64),
                since: now,
                fire_after: 0,
                clear_after: 0,
                firing: format!(
                    "state database flushes took {mean:.0} ms on average over the last {} \
                     (alert above {} ms): jobs and results wait for them. The disk under the \
                     state directory is slow or saturated: check its latency (`iostat -x`) and \
                     what else writes to it.",
                    duration(window),
                    cfg.flush_slow_ms
                ),
                resolved: format!("state database flushes take {mean:.0} ms on average again"),
            });
        }
        v
    }
}

/// Milliseconds as `3m12s`, `2h5m`, `45s`.
fn duration(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

/// Bytes in binary units, one decimal.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC (`2026-12-01T21:05:00Z`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // The civil date of a day number (days since 1970-01-01).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn cfg() -> AlertConfig {
        AlertConfig {
            builder_offline_ms: 5 * MIN,
            disk_free_min_bytes: 100,
            memory_available_min_bytes: 100,
            load_hold_ms: MIN,
            watched_jobs: ["ci".to_string()].into(),
            cache_max_bytes: 1000,
            flush_slow_ms: 100,
            flush_window_ms: MIN,
        }
    }

    fn builder(name: &str, online: bool, last_seen_ms: i64) -> BuilderObs {
        BuilderObs {
            name: name.into(),
            online,
            draining: false,
            last_seen_ms,
            disk_free_bytes: online.then_some(1000),
            memory_available_bytes: online.then_some(1000),
        }
    }

    fn obs(builders: Vec<BuilderObs>) -> Observation {
        Observation {
            builders,
            ..Observation::default()
        }
    }

    fn kinds(alerts: &[Alert]) -> Vec<(AlertKind, AlertState, &str)> {
        alerts
            .iter()
            .map(|a| (a.kind, a.state, a.subject.as_str()))
            .collect()
    }

    #[test]
    fn offline_fires_once_after_the_delay_and_resolves_once() {
        let t0 = 1_000_000_000_000;
        let mut a = Alerts::new(cfg(), t0);
        assert!(
            a.evaluate(&obs(vec![builder("b1", true, t0)]), t0)
                .is_empty()
        );
        // Gone at t0 + 1 min: nothing until 5 minutes later.
        let gone = t0 + MIN;
        for t in [gone, gone + MIN, gone + 4 * MIN] {
            assert!(
                a.evaluate(&obs(vec![builder("b1", false, gone)]), t)
                    .is_empty()
            );
        }
        let fired = a.evaluate(&obs(vec![builder("b1", false, gone)]), gone + 5 * MIN);
        assert_eq!(
            kinds(&fired),
            [(AlertKind::BuilderOffline, AlertState::Firing, "b1")]
        );
        assert!(fired[0].message.contains("offline for 5m0s"), "{fired:?}");
        assert!(fired[0].message.contains("farm drain b1"), "{fired:?}");
        // Once per episode: not again, however long it lasts.
        for i in 6..100 {
            assert!(
                a.evaluate(&obs(vec![builder("b1", false, gone)]), gone + i * MIN)
                    .is_empty()
            );
        }
        let back = a.evaluate(
            &obs(vec![builder("b1", true, gone + 100 * MIN)]),
            gone + 100 * MIN,
        );
        assert_eq!(
            kinds(&back),
            [(AlertKind::BuilderOffline, AlertState::Resolved, "b1")]
        );
        assert!(
            a.evaluate(&obs(vec![builder("b1", true, gone)]), gone + 101 * MIN)
                .is_empty()
        );
        // A second episode fires again.
        let gone2 = gone + 200 * MIN;
        assert!(
            a.evaluate(&obs(vec![builder("b1", false, gone2)]), gone2)
                .is_empty()
        );
        let again = a.evaluate(&obs(vec![builder("b1", false, gone2)]), gone2 + 5 * MIN);
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn a_short_absence_says_nothing() {
        let mut a = Alerts::new(cfg(), 0);
        assert!(
            a.evaluate(&obs(vec![builder("b1", false, 0)]), MIN)
                .is_empty()
        );
        assert!(
            a.evaluate(&obs(vec![builder("b1", true, 0)]), 2 * MIN)
                .is_empty()
        );
        assert!(a.firing().is_empty());
    }

    #[test]
    fn offline_since_before_the_start_counts_from_the_start() {
        // Last seen a day ago, the coordinator just started: 5 minutes from now.
        let start = 100 * 24 * 60 * MIN;
        let mut a = Alerts::new(cfg(), start);
        let b = || obs(vec![builder("old", false, start - 24 * 60 * MIN)]);
        assert!(a.evaluate(&b(), start).is_empty());
        assert!(a.evaluate(&b(), start + 4 * MIN).is_empty());
        assert_eq!(a.evaluate(&b(), start + 5 * MIN).len(), 1);
    }

    #[test]
    fn drained_or_forgotten_builders_end_their_episode() {
        let mut a = Alerts::new(cfg(), 0);
        a.evaluate(&obs(vec![builder("b1", false, 0)]), 0);
        assert_eq!(
            a.evaluate(&obs(vec![builder("b1", false, 0)]), 5 * MIN)
                .len(),
            1
        );
        let mut drained = builder("b1", false, 0);
        drained.draining = true;
        let r = a.evaluate(&obs(vec![drained.clone()]), 6 * MIN);
        assert_eq!(
            kinds(&r),
            [(AlertKind::BuilderOffline, AlertState::Resolved, "b1")]
        );
        assert!(r[0].message.contains("drained"), "{r:?}");
        assert!(a.evaluate(&obs(vec![drained]), 20 * MIN).is_empty());
        // Forgotten while firing.
        let mut a = Alerts::new(cfg(), 0);
        a.evaluate(&obs(vec![builder("b2", false, 0)]), 0);
        assert_eq!(
            a.evaluate(&obs(vec![builder("b2", false, 0)]), 5 * MIN)
                .len(),
            1
        );
        let r = a.evaluate(&obs(vec![]), 6 * MIN);
        assert_eq!(
            kinds(&r),
            [(AlertKind::BuilderOffline, AlertState::Resolved, "b2")]
        );
    }

    #[test]
    fn low_disk_and_memory_hold_before_firing_and_before_recovering() {
        let mut a = Alerts::new(cfg(), 0);
        let with = |disk, mem| {
            let mut b = builder("b1", true, 0);
            b.disk_free_bytes = Some(disk);
            b.memory_available_bytes = Some(mem);
            obs(vec![b])
        };
        assert!(a.evaluate(&with(50, 1000), 0).is_empty());
        // Back above before the hold: nothing.
        assert!(a.evaluate(&with(1000, 1000), MIN / 2).is_empty());
        assert!(a.evaluate(&with(50, 50), MIN).is_empty());
        assert!(a.evaluate(&with(50, 50), MIN + MIN / 2).is_empty());
        let fired = a.evaluate(&with(50, 50), 2 * MIN);
        assert_eq!(
            kinds(&fired),
            [
                (AlertKind::BuilderDiskLow, AlertState::Firing, "b1"),
                (AlertKind::BuilderMemoryLow, AlertState::Firing, "b1"),
            ]
        );
        assert!(fired[0].message.contains("50 B free"), "{fired:?}");
        // Memory swings back and forth: no flapping.
        assert!(a.evaluate(&with(50, 1000), 2 * MIN + 1).is_empty());
        assert!(a.evaluate(&with(50, 50), 2 * MIN + 2).is_empty());
        assert!(a.evaluate(&with(50, 1000), 3 * MIN).is_empty());
        // Offline: unknown, no change.
        assert!(
            a.evaluate(&obs(vec![builder("b1", false, 3 * MIN)]), 3 * MIN + 10)
                .is_empty()
        );
        // The clear counts from the first clear sample seen.
        let r = a.evaluate(&with(1000, 1000), 4 * MIN);
        assert_eq!(
            kinds(&r),
            [(AlertKind::BuilderMemoryLow, AlertState::Resolved, "b1")]
        );
        assert!(a.evaluate(&with(1000, 1000), 4 * MIN + 1).is_empty());
        let r = a.evaluate(&with(1000, 1000), 5 * MIN + 1);
        assert_eq!(
            kinds(&r),
            [(AlertKind::BuilderDiskLow, AlertState::Resolved, "b1")]
        );
    }

    #[test]
    fn a_threshold_of_zero_is_off() {
        let mut c = cfg();
        c.disk_free_min_bytes = 0;
        c.memory_available_min_bytes = 0;
        c.load_hold_ms = 0;
        let mut a = Alerts::new(c, 0);
        let mut b = builder("b1", true, 0);
        b.disk_free_bytes = Some(0);
        b.memory_available_bytes = Some(0);
        assert!(a.evaluate(&obs(vec![b.clone()]), 0).is_empty());
        assert!(a.evaluate(&obs(vec![b]), 10 * MIN).is_empty());
    }

    fn job(verdict: Option<Verdict>, sub: u64, passed_before: bool) -> Observation {
        Observation {
            jobs: vec![JobObs {
                name: "ci".into(),
                verdict,
                submission: Some(sub),
                passed_before,
            }],
            ..Observation::default()
        }
    }

    #[test]
    fn a_watched_job_alerts_on_success_to_failure_and_back() {
        let mut a = Alerts::new(cfg(), 0);
        // Never passed, failing: not a regression.
        assert!(
            a.evaluate(&job(Some(Verdict::Failing), 1, false), 0)
                .is_empty()
        );
        assert!(
            a.evaluate(&job(Some(Verdict::Passing), 2, false), 1)
                .is_empty()
        );
        assert!(a.evaluate(&job(None, 2, false), 2).is_empty());
        let fired = a.evaluate(&job(Some(Verdict::Failing), 3, false), 3);
        assert_eq!(
            kinds(&fired),
            [(AlertKind::JobFailing, AlertState::Firing, "ci")]
        );
        assert!(fired[0].message.contains("s3"), "{fired:?}");
        // Failing again, building in between: the same episode.
        assert!(a.evaluate(&job(None, 3, true), 4).is_empty());
        assert!(
            a.evaluate(&job(Some(Verdict::Failing), 4, false), 5)
                .is_empty()
        );
        let r = a.evaluate(&job(Some(Verdict::Passing), 5, true), 6);
        assert_eq!(
            kinds(&r),
            [(AlertKind::JobFailing, AlertState::Resolved, "ci")]
        );
        assert!(
            a.evaluate(&job(Some(Verdict::Passing), 5, true), 7)
                .is_empty()
        );
        // Seen failing first, but its history passed before (e.g. after a restart).
        let mut a = Alerts::new(cfg(), 0);
        assert_eq!(
            a.evaluate(&job(Some(Verdict::Failing), 9, true), 0).len(),
            1
        );
    }

    #[test]
    fn cache_over_size_and_slow_flushes() {
        let mut a = Alerts::new(cfg(), 0);
        let o = |cache, flushes, busy_ms: u64| Observation {
            cache_stored_bytes: cache,
            flush: FlushStats {
                flushes,
                requests: flushes,
                busy_micros: busy_ms * 1000,
                max_micros: 0,
            },
            ..Observation::default()
        };
        assert!(a.evaluate(&o(10, 0, 0), 0).is_empty());
        // 10 flushes of 10 ms: fine. Then 10 of 500 ms in the window: slow.
        assert!(a.evaluate(&o(10, 10, 100), 1000).is_empty());
        let r = a.evaluate(&o(2000, 20, 5100), 2000);
        assert_eq!(
            kinds(&r),
            [
                (AlertKind::CacheOverSize, AlertState::Firing, "cache"),
                (AlertKind::StateFlushSlow, AlertState::Firing, "state"),
            ]
        );
        assert!(r[1].message.contains("255 ms"), "{r:?}");
        // No flush in a while: unknown, no change.
        assert!(a.evaluate(&o(2000, 20, 5100), 2 * MIN + 3000).is_empty());
        assert!(a.evaluate(&o(2000, 20, 5100), 3 * MIN).is_empty());
        // Fast flushes again, once the slow ones left the window.
        let r = a.evaluate(&o(10, 30, 5200), 3 * MIN + 1000);
        assert_eq!(
            kinds(&r),
            [
                (AlertKind::CacheOverSize, AlertState::Resolved, "cache"),
                (AlertKind::StateFlushSlow, AlertState::Resolved, "state"),
            ]
        );
    }

    #[test]
    fn formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_159_100_000), "2026-12-01T21:05:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(duration(45_000), "45s");
        assert_eq!(duration(192_000), "3m12s");
        assert_eq!(duration(7_500_000), "2h5m");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}
