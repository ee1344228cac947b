//! Farm builds as the Nix endpoint asks for them: one `BasicDerivation` from a
//! build hook (`BuildDerivation`), or a graph of `.drv` files already in the
//! cache (`BuildPathsWithResults`, `nix build --store ssh-ng://…`). The
//! protocol handlers hand a [`BuildBackend`] the request and a channel; the
//! backend sends the builds' progress and logs down the channel while they run
//! and returns each derivation's [`BuildOutcome`].

use std::collections::BTreeMap;

use farm_nix::derivation::BasicDerivation;
use farm_nix::store_path::StorePath;
use farm_nix::wire::{BuildResult, BuildStatus, HandlerError};
use tokio::sync::mpsc;

use crate::nix_endpoint::ssh::{BoxFuture, ClientIdentity};

/// Settings a client sends with a build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildSettings {
    /// Seconds without output before the build is killed (0: no limit).
    pub max_silent_time: u64,
    /// Seconds the build may take (0: no limit).
    pub build_timeout: u64,
}

/// Something that happened while a request's builds ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// A derivation started on a farm builder.
    Started { drv: StorePath, builder: String },
    /// Bytes of a running derivation's log.
    Log { drv: StorePath, data: Vec<u8> },
    /// A derivation finished.
    Finished {
        drv: StorePath,
        outcome: BuildOutcome,
    },
}

/// How one derivation's build ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutcome {
    pub status: BuildStatus,
    pub error: String,
    /// Output name → path (the outputs are in the cache when the status is a success).
    pub outputs: BTreeMap<String, StorePath>,
    /// Unix seconds (0 when it never ran).
    pub start_time: u64,
    pub stop_time: u64,
    /// The builder that ran it, if one did.
    pub builder: Option<String>,
    /// Whether a builder built it for this request (rather than finding it in the cache).
    pub built: bool,
}

impl BuildOutcome {
    /// As a protocol build result (built outputs filled in for successes).
    pub fn to_build_result(&self) -> BuildResult {
        let mut r = BuildResult::new(self.status, self.error.clone());
        r.times_built = u64::from(self.built);
        r.start_time = self.start_time;
        r.stop_time = self.stop_time;
        if self.status.is_success() {
            for (name, path) in &self.outputs {
                r.add_built_output(name, path);
            }
        }
        r
    }
}

/// Where the endpoint's builds run: the coordinator's scheduler.
pub trait BuildBackend: Send + Sync + 'static {
    /// Build one derivation whose whole input closure is in the cache
    /// (`drv.input_srcs`); no `.drv` file is needed. Returns when it ended.
    fn build_derivation(
        &self,
        client: ClientIdentity,
        drv_path: StorePath,
        drv: BasicDerivation,
        settings: BuildSettings,
        events: mpsc::Sender<BuildEvent>,
    ) -> BoxFuture<'static, Result<BuildOutcome, HandlerError>>;

    /// Build the derivations `drvs` (their `.drv` files, and those of every
    /// dependency, are in the cache) and everything they need that the cache
    /// lacks. Returns each requested derivation's outcome once all ended.
    fn build_graph(
        &self,
        client: ClientIdentity,
        drvs: Vec<StorePath>,
        settings: BuildSettings,
        events: mpsc::Sender<BuildEvent>,
    ) -> BoxFuture<'static, Result<BTreeMap<StorePath, BuildOutcome>, HandlerError>>;
}
