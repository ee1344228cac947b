//! The end-to-end harness: actors with their own /nix, the farm binaries on ephemeral ports.
