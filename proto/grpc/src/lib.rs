//! Generated gRPC code for the farm (tonic + prost) and conversions into domain types.
//!
//! - [`v1`]: the `farm.v1` package compiled from `proto/farm.proto`.
//! - [`convert`]: `From`/`TryFrom` between messages and `farm-nix` domain types.
//! - [`auth`]: the exact bytes builders and CLI users sign, and the metadata keys
//!   that carry session tokens and signatures, shared by every side.
//! - [`job`]: what a named job's name may be (the CLI and the coordinator
//!   check the same rule).

pub mod auth;
pub mod convert;
pub mod job;

/// The generated `farm.v1` package.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("farm.v1");
}

pub use convert::ConvertError;

/// Largest gRPC message either side encodes or decodes (coordinator, builder,
/// CLI). A job carries its whole `.drv` (up to 16 MiB) and its input paths,
/// so the coordinator checks a job's encoded length against this before
/// sending it; NAR data goes in far smaller chunks.
pub const MAX_MESSAGE_SIZE: usize = 32 * 1024 * 1024;
