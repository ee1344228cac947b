//! The farm's records and the words the scheduler and the state share:
//! builds, submissions and builders (what is persisted, as serde records),
//! what a start loads, the writes the scheduler hands back, and the events and
//! actions it emits. Both [`super::scheduler`] and [`super::state`] use these;
//! neither names the other.
//!
//! Times are unix milliseconds (`i64`) everywhere, so a restart keeps every timer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use farm_nix::store_path::StorePath;
use serde::{Deserialize, Serialize};

/// A build's id (`b<n>` on the wire).
pub type BuildId = u64;
/// A submission's id (`s<n>` on the wire).
pub type SubmissionId = u64;

/// How urgent a submission is; higher goes first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum Priority {
    #[default]
    Ci,
    Interactive,
}

/// How a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// A builder built it and every output is in the cache.
    Built,
    /// Its outputs turned up in the cache without building (after a restart or a race).
    Cached,
    Failed,
    DependencyFailed,
    Cancelled,
    TimedOut,
    Unschedulable,
}

impl Outcome {
    /// Whether the outputs exist.
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Built | Outcome::Cached)
    }
}

/// Where a build is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildState {
    /// Waiting for dependencies (or for its input closure to be resolved).
    Waiting,
    /// Runnable, waiting for a builder.
    Queued,
    /// Sent to `builder` as job `job_id`.
    Running {
        builder: String,
        job_id: String,
        started_ms: i64,
    },
    /// Finished.
    Done(Outcome),
}

impl BuildState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, BuildState::Done(_))
    }
}

/// A derivation the farm builds, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: BuildId,
    pub drv_path: StorePath,
    /// The `.drv` text, so a restart needs nothing from the cache to resume
    /// (shared, not copied, by views and jobs).
    #[serde(with = "arc_bytes")]
    pub drv_aterm: Arc<[u8]>,
    pub system: String,
    pub required_features: BTreeSet<String>,
    /// Output name → path.
    pub outputs: BTreeMap<String, StorePath>,
    /// Builds this one needs first.
    pub deps: BTreeSet<BuildId>,
    pub priority: Priority,
    pub created_ms: i64,
    pub submissions: BTreeSet<SubmissionId>,
    pub state: BuildState,
    /// Attempts so far that ended in a transient failure or a lost builder.
    pub retries: u32,
    /// The current attempt number (job ids are `b<id>.<attempt>`).
    pub attempt: u32,
    pub max_silent_time_secs: u64,
    pub build_timeout_secs: u64,
    pub error: Option<String>,
    /// The builder of the last attempt.
    pub builder: Option<String>,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// Who asked for it: each client (SSH/CLI key fingerprint and comment,
    /// or `local`) of every submission that included it.
    #[serde(default)]
    pub requested_by: BTreeSet<String>,
    /// `Some(owner)`: a build-hook derivation the farm could not verify,
    /// asked for by a client without the push right (`owner` is its key's
    /// fingerprint). Built for that client alone: never shared with another
    /// build, its inputs may be the owner's claims, and its outputs become
    /// the owner's claims (never signed, never served to anyone else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

/// A set of derivations somebody asked for, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmissionRecord {
    pub id: SubmissionId,
    pub roots: Vec<StorePath>,
    pub builds: BTreeSet<BuildId>,
    /// Derivations of the graph whose outputs were already in the cache.
    pub cached: BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    pub priority: Priority,
    pub created_ms: i64,
    pub done: bool,
    pub cancelled: bool,
    /// Who submitted it (key fingerprint and comment, or `local`).
    #[serde(default)]
    pub client: Option<String>,
    /// When it was marked done (retention counts from here).
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// The named job it runs under (`farm build --job`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// A build as queries and followers see it: the record itself. The
/// scheduler keeps each record in an `Arc` and changes it copy-on-write, so
/// a view and the write of a state change share the record instead of each
/// copying its strings (one clone per change, made by the next change, not
/// two per change).
pub type BuildView = BuildRecord;

/// `Arc<str>` as a plain JSON string (the record format is unchanged).
/// The `.drv` text: a string when it is UTF-8 (as records were written before
/// derivations could hold other bytes), else the list of its bytes.
mod arc_bytes {
    use std::fmt;
    use std::sync::Arc;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(v) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.serialize_bytes(v),
        }
    }

    struct Text;

    impl<'de> Visitor<'de> for Text {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a list of bytes")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        Ok(Arc::from(d.deserialize_any(Text)?))
    }
}

/// What a builder says it can do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Capabilities {
    /// Own system first, then extra platforms.
    pub systems: Vec<String>,
    pub supported_features: BTreeSet<String>,
    pub mandatory_features: BTreeSet<String>,
    pub max_jobs: u32,
    pub speed_factor: f64,
    pub cores: u32,
    pub memory_bytes: u64,
    pub nix_version: String,
}

impl Capabilities {
    /// Nix's rule: the system is one of ours, every required feature is
    /// supported (mandatory ones count as supported), and every mandatory
    /// feature is required.
    pub fn can_build(&self, system: &str, required: &BTreeSet<String>) -> bool {
        self.systems.iter().any(|s| s == system)
            && required
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|f| required.contains(f))
    }
}

/// A builder's last load report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub running_jobs: u32,
    pub load_avg_1: f64,
    pub load_avg_5: f64,
    pub memory_available_bytes: u64,
    pub disk_free_bytes: u64,
    /// PSI "some avg10" percentages; negative = unknown.
    pub cpu_pressure: f64,
    pub memory_pressure: f64,
    pub io_pressure: f64,
    /// Why the builder refuses every job (its store is tainted); empty: none.
    #[serde(default)]
    pub store_problem: String,
}

impl Default for Load {
    fn default() -> Load {
        Load {
            running_jobs: 0,
            load_avg_1: 0.0,
            load_avg_5: 0.0,
            memory_available_bytes: 0,
            disk_free_bytes: 0,
            cpu_pressure: -1.0,
            memory_pressure: -1.0,
            io_pressure: -1.0,
            store_problem: String::new(),
        }
    }
}

/// A builder the farm has seen, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuilderRecord {
    pub name: String,
    /// OpenSSH public key line.
    pub public_key: String,
    pub capabilities: Capabilities,
    pub last_seen_ms: i64,
    pub draining: bool,
}

/// Everything a start loads (see `Store::load`).
#[derive(Debug, Default)]
pub struct Loaded {
    pub builds: Vec<BuildRecord>,
    pub submissions: Vec<SubmissionRecord>,
    pub builders: Vec<BuilderRecord>,
}

/// A record the scheduler changed, to write to the state. The caller applies
/// them in the order given, before it carries out the actions and notices
/// taken with them (see `Coordinator::with_sched`).
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// A build's record (and its `active` and log index entries), shared
    /// with the scheduler's copy of it.
    Build(Arc<BuildRecord>),
    /// A submission's record (and its `active` or `finished` entry).
    Submission(Arc<SubmissionRecord>),
    /// A new, unfinished submission's record, already encoded by the caller
    /// (outside the lock: see `PreparedSubmission::written_ahead`).
    NewSubmission { id: SubmissionId, encoded: Vec<u8> },
    /// A builder's record.
    Builder(Box<BuilderRecord>),
    /// Forget a builder's record.
    ForgetBuilder(String),
    /// A named job's run (see `domain::jobs`).
    Job(Box<crate::domain::jobs::JobUpdate>),
}

/// Something that happened to a build or submission, for the submissions that include it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Queued {
        build: BuildId,
        drv_path: StorePath,
    },
    Started {
        build: BuildId,
        drv_path: StorePath,
        builder: String,
    },
    Finished {
        build: BuildId,
        drv_path: StorePath,
        outcome: Outcome,
        error: Option<String>,
        outputs: BTreeMap<String, StorePath>,
        builder: Option<String>,
        started_ms: Option<i64>,
        finished_ms: Option<i64>,
    },
    SubmissionDone {
        submission: SubmissionId,
        success: bool,
        built: u32,
        cached: u32,
        failed: u32,
    },
}

/// An event and the submissions it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub submissions: Vec<SubmissionId>,
    pub event: Event,
}

/// A job to send to a builder.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub builder: String,
    pub build: BuildId,
    pub job_id: String,
    pub drv_path: StorePath,
    pub drv_aterm: Arc<[u8]>,
    /// The input closure, dependencies first (paths shared with the scheduler's).
    pub input_paths: Vec<Arc<StorePath>>,
    pub max_silent_time_secs: u64,
    pub build_timeout_secs: u64,
    /// [`BuildRecord::claim`]: the builder fetches the owner's claims among
    /// the inputs and keeps the job apart from signed ones.
    pub claim: Option<String>,
}

/// What the scheduler wants done outside itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a job to a builder.
    Dispatch(Assignment),
    /// Tell a builder to stop a job.
    Cancel { builder: String, job_id: String },
    /// Tell a builder whether it is drained.
    Drain { builder: String, draining: bool },
    /// Resolve a build's input closure (then call `Scheduler::set_ready`).
    Prepare { build: BuildId },
    /// A build ended: store its log, forget its live state.
    BuildEnded { build: BuildId },
}

/// The job id of a build's attempt.
pub fn job_id(build: BuildId, attempt: u32) -> String {
    format!("b{build}.{attempt}")
}

/// Parse a job id into build id and attempt.
pub fn parse_job_id(s: &str) -> Option<(BuildId, u32)> {
    let rest = s.strip_prefix('b')?;
    let (b, a) = rest.split_once('.')?;
    Some((b.parse().ok()?, a.parse().ok()?))
}

/// Parse `b<n>` (or a bare number).
pub fn parse_build_id(s: &str) -> Option<BuildId> {
    s.strip_prefix('b').unwrap_or(s).parse().ok()
}

/// Parse `s<n>` (or a bare number).
pub fn parse_submission_id(s: &str) -> Option<SubmissionId> {
    s.strip_prefix('s').unwrap_or(s).parse().ok()
}
