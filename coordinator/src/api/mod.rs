//! The coordinator's network APIs over the domain: gRPC for builders and the
//! CLI ([`grpc`]) and HTTP for the binary cache and operators ([`http`]).
//! Each converts its wire types to domain calls and domain errors to its own
//! responses, once per boundary.

pub(crate) mod grpc;
pub(crate) mod http;
