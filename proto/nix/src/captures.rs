//! The captures of real Nix 2.8 conversations (`testdata/captures`, made by
//! `make-captures.sh`) for the protocol unit tests, and checking what they
//! carry against the `.drv` files of a private store ([`farm_testkit::Actor`]).

use std::path::{Path, PathBuf};

use farm_testkit::Actor;

use crate::derivation::{BasicDerivation, Derivation, name_from_drv_path};
use crate::store_path::StorePath;
use crate::wire;

/// Directory holding the captures.
pub fn captures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/captures")
}

/// Every capture whose name starts with `prefix`: (name, client→server bytes, server→client bytes).
pub fn captures(prefix: &str) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(captures_dir()).expect("captures dir") {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".c2s")
            && stem.starts_with(prefix)
        {
            let dir = captures_dir();
            let c2s = std::fs::read(dir.join(&name)).unwrap();
            let s2c = std::fs::read(dir.join(format!("{stem}.s2c"))).unwrap();
            out.push((stem.to_owned(), c2s, s2c));
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no captures named {prefix}*");
    out
}

/// Instantiate the captures' test derivation (`test.nix`, taken from
/// `make-captures.sh`) with `salt` in `store`, as the capture scenario did;
/// returns the `.drv` path `nix-instantiate` printed.
pub fn instantiate_capture_drv(store: &Actor, salt: &str) -> String {
    let script = std::fs::read_to_string(captures_dir().join("make-captures.sh")).unwrap();
    let start = script
        .find("<<'NIX'\n")
        .expect("test.nix in make-captures.sh")
        + "<<'NIX'\n".len();
    let len = script[start..].find("\nNIX\n").expect("end of test.nix");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("test.nix");
    std::fs::write(&file, &script[start..start + len + 1]).unwrap();
    store
        .run(
            "nix-instantiate",
            &[file.to_str().unwrap(), "--argstr", "salt", salt],
        )
        .expect("nix-instantiate the captures' test.nix")
        .trim()
        .to_owned()
}

/// Check a `BasicDerivation` a real Nix client sent in a `BuildDerivation`
/// request (`req_bytes`: op `op`, the `.drv` path, the derivation, options)
/// against the `.drv` files in `store`: it must be `Derivation::to_basic` of
/// `drv_path` with the used outputs of its input derivations added to the
/// input sources (what Nix's build hook sends), and our encoding of that must
/// be the captured bytes.
pub async fn check_captured_basic_derivation(
    store: &Actor,
    op: u64,
    req_bytes: &[u8],
    drv_path: &StorePath,
    drv: &BasicDerivation,
) {
    let read_drv = |p: &StorePath| {
        let file = store.store_dir_on_host().join(p.base_name());
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{p} was not instantiated: {e}"));
        Derivation::parse_aterm(&text).unwrap()
    };
    let full = read_drv(drv_path);
    let mut want = full.to_basic(&name_from_drv_path(drv_path).unwrap());
    for (input, outputs) in &full.input_drvs {
        let paths = read_drv(input).output_paths();
        for o in outputs {
            want.input_srcs.insert(paths[o].clone());
        }
    }
    assert_eq!(*drv, want, "{drv_path}");
    let mut head = op.to_le_bytes().to_vec();
    wire::write_store_path(&mut head, drv_path).await.unwrap();
    let mut bytes = Vec::new();
    wire::write_basic_derivation(&mut bytes, &want)
        .await
        .unwrap();
    assert_eq!(req_bytes[..head.len()], head[..], "{drv_path}");
    assert!(
        req_bytes[head.len()..].starts_with(&bytes),
        "wire form of {drv_path}"
    );
}
