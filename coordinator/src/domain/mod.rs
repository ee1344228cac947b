//! The coordinator's domain: what the farm knows and decides, with no
//! transport in it. [`coordinator::Coordinator`] is the facade the API layers
//! call; [`scheduler`] decides, [`state`] persists, [`graph`] turns a
//! derivation graph into a submission. Nothing here names tonic, axum or
//! russh (a test in `coordinator/tests/layering.rs` checks it).

pub mod coordinator;
pub mod error;
pub mod graph;
pub mod scheduler;
pub mod state;
pub mod status;
