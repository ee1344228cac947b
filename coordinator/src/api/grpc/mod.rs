//! gRPC services: `BuilderService` ([`builder`]), `FarmService` ([`farm`]),
//! the NAR data calls both share ([`data`]), build logs ([`logs`]), how
//! named jobs ([`jobs`]), how callers prove who they are ([`auth`], checked before a body is read by
//! [`signed`]), and the size and time bounds on requests ([`limits`]).

pub(crate) mod auth;
pub(crate) mod builder;
pub(crate) mod convert;
pub(crate) mod data;
pub(crate) mod error;
pub(crate) mod farm;
pub(crate) mod jobs;
pub(crate) mod limits;
pub(crate) mod logs;
pub(crate) mod signed;

use std::pin::Pin;

use futures::Stream;
use tonic::Status;

/// A boxed response stream.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
