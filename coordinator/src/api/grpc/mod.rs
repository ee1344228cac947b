//! gRPC services: `BuilderService` ([`builder`]), `FarmService` ([`farm`]),
//! the NAR data calls both share ([`data`]), build logs ([`logs`]), and how
//! callers prove who they are ([`auth`]).

pub mod auth;
pub mod builder;
pub mod convert;
pub mod data;
pub(crate) mod error;
pub mod farm;
pub mod logs;

use std::pin::Pin;

use futures::Stream;
use tonic::Status;

/// A boxed response stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
