//! The end-to-end harness: actors with their own /nix, the farm binaries on ephemeral ports.
//!
//! - [`Actor`]: a test participant with its own Nix store, mounted on `/nix`
//!   in a private mount namespace for every command it runs.
//! - [`FarmProcess`]: a long-running process with a log file, killed on drop;
//!   [`Endpoints`] / [`wait_for_endpoints`] read a coordinator's `endpoints.json`.
//! - [`Coordinator`]: `farm-coordinator` on ephemeral loopback ports.
//! - [`TestLogs`]: every process log and actor command of a test, printed
//!   (to libtest's captured output) when the test ends.
//! - [`farm_bin`]: the path of a farm binary, built on first use.
//! - [`LinkProxy`]: a TCP link between two processes that a test cuts and restores.
//! - [`deadline`] / [`deadline_async`]: every end-to-end test's body runs under
//!   one; when it expires the test fails with every log and nothing is left running.
//!
//! Needs root (mount namespaces), `unshare` and Nix (`nix-store`, `nix-build`)
//! on PATH; see the README.

mod actor;
mod bins;
mod deadline;
mod farm;
mod logs;
mod process;
mod proxy;

pub use actor::{Actor, BASE_NIX_CONF, nix_string, sh_derivation};
pub use bins::{FARM_BINARIES, FARM_PACKAGES, farm_bin};
pub use deadline::{deadline, deadline_async};
pub use farm::Coordinator;
pub use logs::{TAIL_LINES, TestLogs, keep_temp_dirs};
pub use process::{Endpoints, FarmProcess, tracked_output, wait_for_endpoints};
pub use proxy::LinkProxy;
