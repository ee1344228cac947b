//! `FarmService.Jobs` and the job name of a `Submit`: named jobs
//! (`domain::jobs`) to and from the wire.

use farm_proto::v1;
use tonic::Status;

use crate::domain::coordinator::Coordinator;
use crate::domain::jobs::{JobRecord, JobRun, JobState};

/// The job name of a `Submit` (`""`: none), checked by the shared rule
/// before anything is recorded.
pub(crate) fn submit_job(job: &str) -> Result<Option<String>, Status> {
    if job.is_empty() {
        return Ok(None);
    }
    farm_proto::job::check_job_name(job).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(Some(job.to_owned()))
}

fn state_to(s: JobState) -> v1::JobState {
    match s {
        JobState::Building => v1::JobState::Building,
        JobState::Succeeded => v1::JobState::Succeeded,
        JobState::Failed => v1::JobState::Failed,
        JobState::Cancelled => v1::JobState::Cancelled,
    }
}

fn run_to(r: &JobRun) -> v1::JobRun {
    v1::JobRun {
        submission_id: format!("s{}", r.submission),
        state: state_to(r.state) as i32,
        started_unix_ms: r.started_ms,
        finished_unix_ms: r.finished_ms.unwrap_or(0),
        drv_paths: r.drv_paths.clone(),
        outputs: r.outputs.clone(),
        built: r.built,
        cached: r.cached,
        failed: r.failed,
    }
}

fn summary_to(j: &JobRecord) -> v1::JobSummary {
    v1::JobSummary {
        name: j.name.clone(),
        runs: j.runs.len() as u32,
        last: j.last().map(run_to),
    }
}

/// `Jobs`: every job with its latest run, or one job's history.
pub(crate) async fn jobs(
    coord: &Coordinator,
    req: v1::JobsRequest,
) -> Result<v1::JobsResponse, Status> {
    if req.name.is_empty() {
        let all = coord.jobs().await?;
        return Ok(v1::JobsResponse {
            jobs: all.iter().map(summary_to).collect(),
            history: Vec::new(),
            found: false,
        });
    }
    farm_proto::job::check_job_name(&req.name)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(match coord.job(&req.name).await? {
        Some(j) => v1::JobsResponse {
            jobs: vec![summary_to(&j)],
            history: j.runs.iter().map(run_to).collect(),
            found: true,
        },
        None => v1::JobsResponse::default(),
    })
}
