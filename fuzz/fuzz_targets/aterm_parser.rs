//! Fuzzes the derivation ATerm parser (`farm_nix::derivation::Derivation::parse_aterm`):
//! no panics on any bytes, whatever it accepts serialises (`to_aterm`) to
//! the same bytes and parses back to the same derivation, and computing its
//! output paths never panics.
#![no_main]

use farm_nix::derivation::{Derivation, hash_derivation_modulo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(drv) = Derivation::parse_aterm(data) else {
        return;
    };
    let aterm = drv.to_aterm();
    let shown = String::from_utf8_lossy(&aterm);
    let again = Derivation::parse_aterm(&aterm)
        .unwrap_or_else(|e| panic!("to_aterm output does not parse: {e}\n{shown}"));
    assert_eq!(
        again, drv,
        "derivation changed in a to_aterm/parse round\n{shown}"
    );
    assert_eq!(again.to_aterm(), aterm, "to_aterm is not stable");
    let _ = drv.required_system_features();
    let _ = drv.output_paths();
    let _ = drv.drv_path("fuzz");
    let _ = drv.to_basic("fuzz");
    let _ = hash_derivation_modulo(&drv, &|_| None);
    let _ = drv.check_output_paths("fuzz", &|_| None);
});
