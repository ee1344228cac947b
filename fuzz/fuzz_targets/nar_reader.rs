//! Fuzzes the streaming NAR reader (`farm_nix::nar::copy_nar`) with arbitrary
//! bytes: it must never panic, and whenever it accepts a NAR it must have
//! copied exactly the bytes it consumed, counted and hashed them correctly,
//! and stopped at the NAR's end (never reading past it).
#![no_main]

use farm_nix::HashAlgo;
use farm_nix::nar::{NarLimits, copy_nar};
use libfuzzer_sys::fuzz_target;

static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    });
    // Tight limits exercise the limit checks; the default limits the
    // production paths.
    let tight = NarLimits {
        max_depth: 4,
        max_name_len: 16,
        max_target_len: 32,
        max_entries_per_dir: 4,
        max_file_size: 64,
        max_total_size: 1024,
    };
    for limits in [NarLimits::default(), tight] {
        let mut input: &[u8] = data;
        let mut copy = Vec::new();
        let result = rt.block_on(copy_nar(&mut input, &mut copy, &limits));
        if let Ok(summary) = result {
            let consumed = data.len() - input.len();
            assert_eq!(
                &copy[..],
                &data[..consumed],
                "copied bytes differ from input"
            );
            assert_eq!(summary.nar_size, consumed as u64, "nar_size");
            assert_eq!(summary.nar_hash, HashAlgo::Sha256.digest(&copy), "nar_hash");
            assert!(consumed as u64 <= limits.max_total_size);
            // A NAR is a sequence of 8-byte-aligned strings.
            assert_eq!(consumed % 8, 0, "NAR length is not a multiple of 8");
        }
    }
});
