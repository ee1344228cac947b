//! Conversions between the `farm.v1` wire messages and the domain's types,
//! in one place: the domain never sees a `v1` message, the services never
//! build one by hand.

use std::collections::BTreeMap;

use farm_nix::store_path::StorePath;
use farm_proto::v1;
use farm_proto::v1::build_event::Event as Ev;
use farm_proto::v1::coordinator_message::Msg as Down;
use tonic::Status;

use crate::domain::coordinator::{BuilderCommand, LinkError};
use crate::domain::model::*;
use crate::domain::scheduler::JobEnd;
use crate::domain::status::{FarmMachine, FarmStatus};

/// Most entries in a capability list.
const MAX_LIST: usize = 64;

fn bounded_list(field: &str, v: Vec<String>) -> Result<Vec<String>, Status> {
    if v.len() > MAX_LIST || v.iter().any(|s| s.is_empty() || s.len() > 128) {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {MAX_LIST} non-empty entries of at most 128 bytes"
        )));
    }
    Ok(v)
}

/// Capabilities from a `Hello`, checked.
pub(crate) fn capabilities_from(c: v1::Capabilities) -> Result<Capabilities, Status> {
    let systems = bounded_list("systems", c.systems)?;
    if systems.is_empty() {
        return Err(Status::invalid_argument("capabilities.systems is empty"));
    }
    Ok(Capabilities {
        systems,
        supported_features: bounded_list("supported_features", c.supported_features)?
            .into_iter()
            .collect(),
        mandatory_features: bounded_list("mandatory_features", c.mandatory_features)?
            .into_iter()
            .collect(),
        max_jobs: c.max_jobs.clamp(1, 1024),
        speed_factor: if c.speed_factor.is_finite() && c.speed_factor > 0.0 {
            c.speed_factor.min(1000.0)
        } else {
            1.0
        },
        cores: c.cores,
        memory_bytes: c.memory_bytes,
        nix_version: c.nix_version.chars().take(128).collect(),
    })
}

/// Capabilities as `farm status` shows them.
pub(crate) fn capabilities_to(c: &Capabilities) -> v1::Capabilities {
    v1::Capabilities {
        systems: c.systems.clone(),
        supported_features: c.supported_features.iter().cloned().collect(),
        mandatory_features: c.mandatory_features.iter().cloned().collect(),
        max_jobs: c.max_jobs,
        speed_factor: c.speed_factor,
        cores: c.cores,
        memory_bytes: c.memory_bytes,
        nix_version: c.nix_version.clone(),
    }
}

/// A load report.
pub(crate) fn load_from(l: v1::LoadReport) -> Load {
    let finite = |x: f64| if x.is_finite() { x } else { -1.0 };
    Load {
        running_jobs: l.running_jobs,
        load_avg_1: finite(l.load_avg_1).max(0.0),
        load_avg_5: finite(l.load_avg_5).max(0.0),
        memory_available_bytes: l.memory_available_bytes,
        disk_free_bytes: l.disk_free_bytes,
        cpu_pressure: finite(l.cpu_pressure),
        memory_pressure: finite(l.memory_pressure),
        io_pressure: finite(l.io_pressure),
        store_problem: bounded(l.store_problem, MAX_STORE_PROBLEM),
    }
}

/// Longest store problem kept from a load report, in bytes.
const MAX_STORE_PROBLEM: usize = 2000;

/// `s` cut to at most `max` bytes, at a character boundary.
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A load report as `farm status` shows it.
pub(crate) fn load_to(l: &Load) -> v1::LoadReport {
    v1::LoadReport {
        running_jobs: l.running_jobs,
        load_avg_1: l.load_avg_1,
        load_avg_5: l.load_avg_5,
        memory_available_bytes: l.memory_available_bytes,
        disk_free_bytes: l.disk_free_bytes,
        cpu_pressure: l.cpu_pressure,
        memory_pressure: l.memory_pressure,
        io_pressure: l.io_pressure,
        store_problem: l.store_problem.clone(),
    }
}

/// How a builder's job result maps onto the scheduler (before output verification).
pub(crate) fn job_end_from(status: v1::JobStatus, error: &str) -> JobEnd {
    let msg = || {
        if error.is_empty() {
            format!("{status:?}")
        } else {
            error.chars().take(4096).collect()
        }
    };
    match status {
        v1::JobStatus::Built => JobEnd::Built,
        v1::JobStatus::Failed => JobEnd::Failed(msg()),
        v1::JobStatus::TimedOut => JobEnd::TimedOut(msg()),
        v1::JobStatus::Cancelled
        | v1::JobStatus::InputError
        | v1::JobStatus::UploadError
        | v1::JobStatus::MiscFailure
        | v1::JobStatus::Unspecified => JobEnd::Transient(msg()),
    }
}

/// The message of a command to a builder, or why it cannot go: over `limit`
/// bytes encoded (the builder would refuse it and end its whole session).
pub(crate) fn command_message(
    command: BuilderCommand,
    limit: usize,
) -> Result<v1::CoordinatorMessage, LinkError> {
    let msg = match command {
        BuilderCommand::Job(job) => Down::Job(v1::Job {
            job_id: job.job_id,
            drv_path: job.drv_path.to_string(),
            drv_aterm: job.drv_aterm.to_vec(),
            input_paths: job.input_paths.iter().map(|p| p.to_string()).collect(),
            max_silent_time_secs: job.max_silent_time_secs,
            build_timeout_secs: job.build_timeout_secs,
            claim_owner: job.claim.unwrap_or_default(),
        }),
        BuilderCommand::Cancel { job_id } => Down::Cancel(v1::CancelJob { job_id }),
        BuilderCommand::Drain { draining } => Down::Drain(v1::Drain { draining }),
    };
    let msg = v1::CoordinatorMessage { msg: Some(msg) };
    let len = prost::Message::encoded_len(&msg);
    if len > limit {
        Err(LinkError::TooLarge { len, limit })
    } else {
        Ok(msg)
    }
}

fn secs(ms: Option<i64>) -> i64 {
    ms.map(|m| m / 1000).unwrap_or(0)
}

fn outputs_map(o: &BTreeMap<String, StorePath>) -> std::collections::HashMap<String, String> {
    o.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
}

/// The wire outcome of a domain outcome.
pub(crate) fn outcome_to(o: Outcome) -> v1::BuildOutcome {
    match o {
        Outcome::Built => v1::BuildOutcome::Built,
        Outcome::Cached => v1::BuildOutcome::Cached,
        Outcome::Failed => v1::BuildOutcome::Failed,
        Outcome::DependencyFailed => v1::BuildOutcome::DependencyFailed,
        Outcome::Cancelled => v1::BuildOutcome::Cancelled,
        Outcome::TimedOut => v1::BuildOutcome::TimedOut,
        Outcome::Unschedulable => v1::BuildOutcome::Unschedulable,
    }
}

/// A domain event as a `BuildEvent`.
pub(crate) fn event_to(e: &Event) -> v1::BuildEvent {
    let ev = match e {
        Event::Queued { build, drv_path } => Ev::Queued(v1::BuildQueued {
            build_id: format!("b{build}"),
            drv_path: drv_path.to_string(),
        }),
        Event::Started {
            build,
            drv_path,
            builder,
        } => Ev::Started(v1::BuildStarted {
            build_id: format!("b{build}"),
            drv_path: drv_path.to_string(),
            builder: builder.clone(),
        }),
        Event::Finished {
            build,
            drv_path,
            outcome,
            error,
            outputs,
            builder,
            started_ms,
            finished_ms,
        } => Ev::Finished(v1::BuildFinished {
            build_id: format!("b{build}"),
            drv_path: drv_path.to_string(),
            outcome: outcome_to(*outcome) as i32,
            error_message: error.clone().unwrap_or_default(),
            outputs: outputs_map(outputs),
            builder: builder.clone().unwrap_or_default(),
            start_time_unix: secs(*started_ms),
            stop_time_unix: secs(*finished_ms),
        }),
        Event::SubmissionDone {
            submission,
            success,
            built,
            cached,
            failed,
        } => Ev::Done(v1::SubmissionDone {
            submission_id: format!("s{submission}"),
            success: *success,
            built: *built,
            cached: *cached,
            failed: *failed,
        }),
    };
    v1::BuildEvent { event: Some(ev) }
}

/// `farm status`'s answer.
pub(crate) fn status_to(st: FarmStatus) -> v1::StatusResponse {
    let builders = st
        .builders
        .into_iter()
        .map(|b| {
            let state = if !b.online {
                v1::BuilderState::Offline
            } else if b.record.draining {
                v1::BuilderState::Draining
            } else if b.running > 0 {
                v1::BuilderState::Busy
            } else {
                v1::BuilderState::Idle
            };
            v1::BuilderStatus {
                name: b.record.name.clone(),
                state: state as i32,
                capabilities: Some(capabilities_to(&b.record.capabilities)),
                load: Some(load_to(&b.load)),
                last_seen_unix: b.record.last_seen_ms / 1000,
                public_key: b.record.public_key.clone(),
            }
        })
        .collect();
    let queue = st
        .queue
        .into_iter()
        .map(|(system, queued)| v1::QueueDepth { system, queued })
        .collect();
    let running = st
        .running
        .into_iter()
        .map(|b| {
            let (builder, started) = match &b.state {
                BuildState::Running {
                    builder,
                    started_ms,
                    ..
                } => (builder.clone(), *started_ms / 1000),
                _ => (String::new(), 0),
            };
            v1::RunningBuild {
                build_id: format!("b{}", b.id),
                drv_path: b.drv_path.to_string(),
                builder,
                started_unix: started,
            }
        })
        .collect();
    let recent_failures = st
        .recent_failures
        .into_iter()
        .map(|f| v1::RecentFailure {
            build_id: format!("b{}", f.build),
            drv_path: f.drv_path.to_string(),
            builder: f.builder.unwrap_or_default(),
            error_message: f.error,
            finished_unix: f.finished_ms / 1000,
        })
        .collect();
    v1::StatusResponse {
        builders,
        queue,
        running,
        recent_failures,
    }
}

/// `farm machines`'s answer.
pub(crate) fn machine_to(m: FarmMachine) -> v1::MachinesResponse {
    v1::MachinesResponse {
        machines_line: m.machines_line,
        nix_conf_lines: m.nix_conf_lines,
        ssh_config: m.ssh_config,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn oversized_jobs_are_not_sent() {
        let path = |n: &str| {
            farm_nix::store_path::StorePath::parse(&format!("/nix/store/{}-{n}", "a".repeat(32)))
                .unwrap()
        };
        let job = Assignment {
            builder: "b".into(),
            build: 1,
            job_id: "1.1".into(),
            drv_path: path("x.drv"),
            drv_aterm: "D".repeat(4096).into_bytes().into(),
            input_paths: (0..100)
                .map(|i| Arc::new(path(&format!("in{i}"))))
                .collect(),
            max_silent_time_secs: 0,
            build_timeout_secs: 0,
            claim: None,
        };
        let Err(LinkError::TooLarge { len, .. }) =
            command_message(BuilderCommand::Job(job.clone()), 4096)
        else {
            panic!("not refused")
        };
        assert!(len > 4096 + 100 * 40, "{len}");
        let msg = command_message(BuilderCommand::Job(job), len).unwrap();
        assert_eq!(prost::Message::encoded_len(&msg), len);
    }
}
