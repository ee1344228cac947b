//! Fuzzes the `.narinfo` parser (`farm_nix::narinfo::NarInfo::parse_bytes`):
//! no panics, and whatever it accepts renders to text that parses back to the
//! same value (render is a fixed point after one round).
#![no_main]

use farm_nix::narinfo::NarInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(info) = NarInfo::parse_bytes(data) else {
        return;
    };
    let text = info.render();
    let again = NarInfo::parse(&text)
        .unwrap_or_else(|e| panic!("rendered narinfo does not parse: {e}\n{text}"));
    assert_eq!(
        again, info,
        "narinfo changed in a render/parse round\n{text}"
    );
    assert_eq!(again.render(), text, "render is not stable");
    let _ = info.info.fingerprint();
});
