//! Nix's own formats and wire protocols. Pure: no networking and no knowledge of
//! the farm. Async readers/writers over `AsyncRead`/`AsyncWrite` where a format streams.

pub mod hash;
pub mod nixbase32;
pub mod store_path;

pub use hash::{Hash, HashAlgo, Hasher};
pub use store_path::StorePath;
