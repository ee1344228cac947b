//! Submitted derivation graphs: read the `.drv` closure from the cache, skip
//! what the cache already has, and hand the rest to the scheduler.

use farm_nix::store_path::StorePath;

use crate::coordinator::Coordinator;
use crate::scheduler::types::{Priority, SubmissionId};

/// How a submission is to be built.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitOptions {
    pub priority: Priority,
    pub max_silent_time_secs: u64,
    pub build_timeout_secs: u64,
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
}

impl SubmitError {
    pub fn to_status(&self) -> tonic::Status {
        match self {
            SubmitError::Invalid(m) => tonic::Status::failed_precondition(m.clone()),
            SubmitError::Unavailable(m) => tonic::Status::unavailable(m.clone()),
        }
    }
}

impl Coordinator {
    /// Submit derivations (their `.drv` files already in the cache).
    pub async fn submit(
        &self,
        _drvs: Vec<StorePath>,
        _opts: SubmitOptions,
    ) -> Result<SubmissionId, SubmitError> {
        Err(SubmitError::Unavailable(
            "the cache is not wired in yet".into(),
        ))
    }
}
