//! Fuzzes the derivation ATerm parser (`farm_nix::derivation::Derivation::parse_aterm`):
//! no panics, and whatever it accepts serialises (`to_aterm`) to text that
//! parses back to the same derivation.
#![no_main]

use farm_nix::derivation::Derivation;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(drv) = Derivation::parse_aterm(text) else {
        return;
    };
    let aterm = drv.to_aterm();
    let again = Derivation::parse_aterm(&aterm)
        .unwrap_or_else(|e| panic!("to_aterm output does not parse: {e}\n{aterm}"));
    assert_eq!(
        again, drv,
        "derivation changed in a to_aterm/parse round\n{aterm}"
    );
    assert_eq!(again.to_aterm(), aterm, "to_aterm is not stable");
    let _ = drv.required_system_features();
    let _ = drv.output_paths();
    let _ = drv.drv_path("fuzz");
    let _ = drv.to_basic("fuzz");
});
