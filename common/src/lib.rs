//! What the coordinator, the builder and the `farm` CLI share beyond the wire
//! format itself (that is `farm-proto`: messages, the exact bytes signed, the
//! metadata keys, the message size limit):
//!
//! - [`keys`]: OpenSSH public key lines and `authorized_keys` files, parsed
//!   once for everybody (typed keys, a malformed line is an error naming file
//!   and line, re-read when the file changes).
//! - [`sign`]: signing a CLI call with an ed25519 key, and checking one.
//! - [`channel`]: the gRPC client endpoint (URL check, TLS with a pinned
//!   certificate, plaintext only to loopback unless forced, keep-alives).
//! - [`signal`]: the daemons' SIGTERM/SIGINT handling with its grace watchdog.
//!
//! A crate of its own rather than part of `farm-proto` so that the gRPC
//! language stays free of file I/O, process signals and key handling.

#![deny(unreachable_pub)]

pub mod channel;
pub mod key_options;
pub mod keys;
pub mod sign;
pub mod signal;

mod error;

pub use error::Error;
