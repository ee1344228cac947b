//! Fuzzes the `nix-store --export` stream reader (`farm_nix::export`): no
//! panics; each accepted path's NAR is what was copied out.
#![no_main]

use farm_nix::HashAlgo;
use farm_nix::export::ExportReader;
use farm_nix::nar::NarLimits;
use libfuzzer_sys::fuzz_target;

static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    });
    rt.block_on(async {
        let mut input: &[u8] = data;
        let limits = NarLimits::default();
        let mut reader = ExportReader::new(&mut input, &limits);
        // Each path's NAR is at least 8 bytes, so this loop is bounded.
        for _ in 0..=data.len() / 8 {
            let mut nar = Vec::new();
            match reader.next_path(&mut nar).await {
                Ok(Some(path)) => {
                    assert_eq!(path.nar.nar_size, nar.len() as u64);
                    assert_eq!(path.nar.nar_hash, HashAlgo::Sha256.digest(&nar));
                    let _ = path.to_path_info();
                }
                Ok(None) | Err(_) => break,
            }
        }
    });
});
