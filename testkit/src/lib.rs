//! Test support shared by every crate's tests, with no dependency on a farm
//! crate (so `farm-nix`'s own unit tests can use it):
//!
//! - [`Actor`]: a test participant with its own Nix store, mounted on `/nix`
//!   in a private mount namespace for every command it runs (nix.conf with
//!   no substituters and no sandbox); [`Actor::wrapper_bin_dir`] for code
//!   under test that runs Nix itself.
//! - [`FarmProcess`]: a long-running process with a log file, killed on drop;
//!   [`tracked_output`]: a short command whose output is captured and that an
//!   expiring deadline still kills.
//! - [`TestLogs`]: every process log and actor command of a test, printed
//!   (to libtest's captured output) when the test ends.
//! - [`deadline`] / [`deadline_async`]: a test's body runs under one; when it
//!   expires the test fails with every log and nothing is left running.
//! - [`host`]: a runtime and the real Nix tools on host files, for unit tests.
//!
//! Needs root (mount namespaces), `unshare` and Nix (`nix-store`, `nix-build`)
//! on PATH; see the README.

mod actor;
mod deadline;
pub mod host;
mod logs;
mod process;

pub use actor::{Actor, BASE_NIX_CONF, NIX_PROGRAMS, nix_string, sh_derivation};
pub use deadline::{deadline, deadline_async};
pub use logs::{KeptTempDir, TAIL_LINES, TestLogs, keep_temp_dirs, temp_dir};
pub use process::{FarmProcess, tracked_output, tracked_output_with_input};
