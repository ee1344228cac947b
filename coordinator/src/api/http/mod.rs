//! HTTP routes: the binary cache in Nix's layout ([`cache`]).

pub mod cache;
