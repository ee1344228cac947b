//! The farm coordinator: scheduler, state, cache, and the gRPC, HTTP and SSH endpoints.

pub mod auth;
pub mod cache;
pub mod config;
pub mod endpoint;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod scheduler;
pub mod ssh;
pub mod state;
pub mod stdio;
