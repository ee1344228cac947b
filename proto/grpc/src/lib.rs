//! Generated gRPC code for the farm (tonic + prost) and conversions into domain types.

/// The generated `farm.v1` package.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("farm.v1");
}
