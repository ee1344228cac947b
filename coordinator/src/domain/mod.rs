//! The coordinator's domain: what the farm knows and decides, with no
//! transport in it. [`coordinator::Coordinator`] is the facade the API layers
//! call; [`scheduler`] decides, [`state`] persists, both in the words of
//! [`model`]; [`persist`] writes a submission's new builds ahead of the
//! scheduler lock; [`graph`] turns a derivation graph into a submission;
//! [`status`] is the farm as its APIs show it; [`follow`] streams a
//! submission's events and a build's log to whoever follows them;
//! [`observe`] is the farm as Prometheus metrics see it; [`jobs`] keeps the
//! history of named jobs (`farm build --job`); [`alerts`] decides which
//! alerts to send (episodes, once each), from what the coordinator observes.
//! Nothing here names tonic, axum or russh (a test in
//! `tests/tests/layering.rs` checks it).

pub mod alerts;
pub mod coordinator;
pub mod error;
pub mod follow;
pub mod graph;
pub mod jobs;
pub(crate) mod lock;
pub mod model;
pub(crate) mod observe;
pub mod persist;
pub mod scheduler;
pub mod state;
pub mod status;

#[cfg(test)]
mod restart_tests;
