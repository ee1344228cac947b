//! Test data Nix wrote (`testdata/keys`, `testdata/narinfo`): parse, render
//! back byte for byte, and verify every signature with Nix's key.

use std::path::PathBuf;

use farm_nix::HashAlgo;
use farm_nix::narinfo::NarInfo;
use farm_nix::signing::{SigningKey, VerifyingKey};

fn testdata(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(p)
}

#[test]
fn nix_written_narinfos() {
    let nix_key = VerifyingKey::read_file(&testdata("keys/nix.pub")).unwrap();
    let secret = SigningKey::read_file(&testdata("keys/nix.sec")).unwrap();
    assert_eq!(secret.verifying_key(), nix_key);
    let mut count = 0;
    let (mut with_ca, mut with_deriver, mut xz) = (0, 0, 0);
    for entry in std::fs::read_dir(testdata("narinfo")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "narinfo") {
            continue;
        }
        count += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let ni = NarInfo::parse(&text).unwrap();
        let file_name = path.file_name().unwrap().to_str().unwrap();
        assert!(file_name.starts_with(ni.info.path.hash_part()));
        assert_eq!(ni.render(), text, "{file_name}");
        assert!(
            ni.info.verify_any(std::slice::from_ref(&nix_key)),
            "{file_name}"
        );
        // Nix's signatures are exactly what we would write with its key
        let ours = secret.sign(&ni.info.fingerprint());
        assert!(ni.info.sigs.contains(&ours), "{file_name}");
        // and tampering breaks verification
        let mut t = ni.info.clone();
        t.nar_size += 1;
        assert!(!t.verify_any(std::slice::from_ref(&nix_key)));
        if ni.compression == "none" {
            let nar = std::fs::read(testdata("narinfo").join(&ni.url)).unwrap();
            assert_eq!(nar.len() as u64, ni.info.nar_size);
            assert_eq!(HashAlgo::Sha256.digest(&nar), ni.info.nar_hash);
            assert_eq!(Some(ni.info.nar_hash.clone()), ni.file_hash);
        } else {
            assert_eq!(ni.compression, "xz");
            assert!(ni.url.ends_with(".nar.xz"));
            xz += 1;
        }
        with_ca += ni.info.ca.is_some() as usize;
        with_deriver += ni.info.deriver.is_some() as usize;
    }
    assert_eq!((count, with_ca, with_deriver, xz), (6, 2, 4, 2));
}
