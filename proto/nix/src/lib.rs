//! Nix's own formats and wire protocols. Pure: no networking and no knowledge of
//! the farm. Async readers/writers over `AsyncRead`/`AsyncWrite` where a format streams.

#[cfg(test)]
mod captures;
pub mod content_address;
pub mod derivation;
pub mod export;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod path_info;
pub mod references;
pub mod serve;
pub mod signing;
pub mod store_path;
pub mod wire;
pub mod worker;

pub use hash::{Hash, HashAlgo, Hasher};
pub use store_path::StorePath;
