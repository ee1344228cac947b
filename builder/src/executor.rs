//! Runs a job with the local Nix.
use farm_proto::v1::{Job, JobResult, JobStatus};

use crate::config::BuilderConfig;
use crate::error::BuilderError;
use crate::jobs::{Execute, JobContext, failure};

/// Builds with the local Nix.
pub struct NixExecutor {}

impl NixExecutor {
    /// An executor for this configuration.
    pub fn new(_config: &BuilderConfig) -> Result<Self, BuilderError> {
        Ok(NixExecutor {})
    }
}

impl Execute for NixExecutor {
    async fn execute(&self, job: Job, _ctx: JobContext) -> JobResult {
        failure(
            &job.job_id,
            JobStatus::MiscFailure,
            "building is not implemented yet",
        )
    }
}
