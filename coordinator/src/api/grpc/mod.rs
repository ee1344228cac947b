//! gRPC services: `BuilderService` ([`builder`]), `FarmService` ([`farm`]),
//! the NAR data calls both share ([`data`]), build logs ([`logs`]), and how
//! callers prove who they are ([`auth`]).

pub mod auth;
pub mod builder;
pub mod convert;
pub mod data;
pub mod farm;
pub mod logs;
