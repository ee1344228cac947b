//! The end-to-end harness: the farm's binaries on ephemeral loopback ports,
//! with actors that each have their own /nix.
//!
//! From [`farm_testkit`] (re-exported): [`FarmProcess`], [`TestLogs`],
//! [`deadline`] / [`deadline_async`], [`tracked_output`], [`nix_string`],
//! [`sh_derivation`]. Here:
//!
//! - [`Actor`]: the testkit's actor with store paths typed as farm-nix's.
//! - [`fixture`]: the one farm fixture: [`Farm`] (coordinator, builders,
//!   client, witness dir; restartable coordinator; readiness from
//!   `endpoints.json` and gRPC `Status`), [`SshAccess`] / [`ssh_key`] (every
//!   key, made one way), the test graphs, the event stream, the cache GET.
//! - [`farm_bin`]: the path of a farm binary, built on first use.
//! - [`LinkProxy`]: a TCP link between two processes that a test cuts and restores.
//! - [`recorder`]: a `FarmService` proxy that records `farm`'s calls as sent,
//!   and replays them (attack tests).
//!
//! Needs root (mount namespaces), `unshare` and Nix (`nix-store`, `nix-build`)
//! on PATH; see the README.

mod actor;
mod bins;
mod client;
mod coordinator;
mod farm;
mod graphs;
mod keys;
mod proxy;
pub mod recorder;

pub use actor::Actor;
pub use bins::{FARM_BINARIES, FARM_PACKAGES, farm_bin};
pub use coordinator::{
    Coordinator, Endpoints, STARTUP_TIMEOUT, grpc_status, process_endpoints, wait_for_endpoints,
};
pub use farm::{Builder, BuilderSpec, Farm, FarmSetup};
pub use farm_testkit::{
    BASE_NIX_CONF, FarmProcess, TAIL_LINES, TestLogs, deadline, deadline_async, keep_temp_dirs,
    nix_string, sh_derivation, tracked_output,
};
pub use keys::{ClientKey, SignedClient, SshAccess, ssh_key};
pub use proxy::LinkProxy;

/// Everything an end-to-end test file needs of the farm fixture, for one glob import.
pub mod fixture {
    pub use crate::client::*;
    pub use crate::farm::*;
    pub use crate::graphs::*;
    pub use crate::keys::{ClientKey, SshAccess, ssh_key};
}
