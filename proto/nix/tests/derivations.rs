//! ATerm against the real `.drv` files in `testdata/drv` (made by Nix 2.8's
//! `nix-instantiate`, see its README), and a generated round trip.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use farm_nix::StorePath;
use farm_nix::derivation::{
    ByteString, Derivation, DerivationError, DerivationOutput, hash_derivation_modulo,
    name_from_drv_path,
};
use proptest::prelude::*;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/drv")
}

/// Every `.drv` in testdata: (store path from the file name, text).
fn real_drvs() -> Vec<(StorePath, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(testdata()).unwrap() {
        let path = entry.unwrap().path();
        let base = path.file_name().unwrap().to_str().unwrap().to_owned();
        if base.ends_with(".drv") {
            let sp = StorePath::from_base_name(&base).unwrap();
            out.push((sp, std::fs::read_to_string(&path).unwrap()));
        }
    }
    out.sort();
    assert_eq!(out.len(), 10, "all ten test derivations are present");
    out
}

fn drv(name: &str) -> Derivation {
    let (_, text) = real_drvs()
        .into_iter()
        .find(|(p, _)| name_from_drv_path(p).unwrap() == name)
        .unwrap_or_else(|| panic!("no test derivation {name}"));
    Derivation::parse_aterm(&text).unwrap()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn real_drvs_round_trip_byte_for_byte_and_hash_to_their_path() {
    for (path, text) in real_drvs() {
        let d = Derivation::parse_aterm(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(d.to_aterm(), text.as_bytes(), "{path}");
        let name = name_from_drv_path(&path).unwrap();
        assert_eq!(d.drv_path(&name).unwrap(), path, "{path}");
        if let Some(n) = d.env.get(b"name".as_slice()) {
            assert_eq!(n, &name, "{path}");
        }
    }
}

#[test]
fn input_addressed() {
    let d = drv("simple");
    assert_eq!(d.builder, "/bin/sh");
    assert_eq!(d.platform, "x86_64-linux");
    assert!(!d.is_fixed_output());
    let out = &d.outputs["out"];
    assert_eq!((out.hash_algo.as_str(), out.hash.as_str()), ("", ""));
    assert_eq!(d.output_paths()["out"].name(), "simple");
    assert_eq!(d.input_drvs.len(), 1);
    let (dep, wanted) = d.input_drvs.iter().next().unwrap();
    assert_eq!(dep.name(), "dep.drv");
    assert_eq!(wanted, &set(&["out"]));
    assert_eq!(d.input_srcs.len(), 1);
    assert_eq!(d.input_srcs.iter().next().unwrap().name(), "build.sh");
    assert_eq!(d.args[1], d.input_srcs.iter().next().unwrap().to_string());
    let b = d.to_basic("simple");
    assert_eq!(b.name, "simple");
    assert_eq!(b.input_srcs, d.input_srcs);
    assert_eq!(b.env, d.env);
    assert_eq!(b.args, d.args);
    assert_eq!(b.output_paths(), d.output_paths());
}

#[test]
fn fixed_outputs() {
    let flat = drv("fixed-flat");
    assert!(flat.is_fixed_output());
    assert_eq!(flat.outputs["out"].hash_algo, "sha256");
    // sha256("hello")
    assert_eq!(
        flat.outputs["out"].hash,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    let rec = drv("fixed-recursive");
    assert!(rec.is_fixed_output());
    assert_eq!(rec.outputs["out"].hash_algo, "r:sha256");
    // the SRI hash from the expression, printed in base16
    let sri =
        farm_nix::Hash::parse_any(rec.env[b"outputHash".as_slice()].to_str().unwrap()).unwrap();
    assert_eq!(rec.outputs["out"].hash, sri.to_base16());
}

#[test]
fn multiple_outputs() {
    let d = drv("multi");
    assert_eq!(
        d.outputs.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["dev", "lib", "out"])
    );
    let paths = d.output_paths();
    assert_eq!(paths["dev"].name(), "multi-dev");
    assert_eq!(paths["lib"].name(), "multi-lib");
    assert_eq!(paths["out"].name(), "multi");
    assert_eq!(d.env[b"outputs".as_slice()], "out dev lib");

    let user = drv("uses-multi");
    let multi_path = real_drvs()
        .into_iter()
        .find(|(p, _)| p.name() == "multi.drv")
        .unwrap()
        .0;
    assert_eq!(user.input_drvs[&multi_path], set(&["dev", "lib"]));
    assert_eq!(user.env[b"d".as_slice()], paths["dev"].to_string());
}

#[test]
fn system_features() {
    assert_eq!(
        drv("features").required_system_features(),
        set(&["big-parallel"])
    );
    let s = drv("structured");
    assert!(s.has_structured_attrs());
    assert!(!s.env.contains_key(b"requiredSystemFeatures".as_slice()));
    assert_eq!(s.required_system_features(), set(&["kvm", "nixos-test"]));
    assert_eq!(
        s.to_basic("structured").required_system_features(),
        set(&["kvm", "nixos-test"])
    );
    assert!(drv("simple").required_system_features().is_empty());
    assert_eq!(drv("aarch64-thing").platform, "aarch64-darwin");
}

#[test]
fn escaped_strings() {
    let d = drv("escapes");
    assert_eq!(
        d.env[b"text".as_slice()],
        "line one\nline \"two\"\ttabbed\r\nback\\slash \\n not a newline\n\n"
    );
    assert_eq!(d.args[1], "echo \"quoted\" 'single' \\backslash\\ > $out");
    assert_eq!(d.env[b"unicode".as_slice()], "héllo wörld ✓");
    assert_eq!(d.env[b"empty".as_slice()], "");
    assert_eq!(d.env[b"dollar".as_slice()], "${not interpolated}");
}

fn store_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-zA-Z0-9+._?=-]{1,30}")
        .prop_filter_map("valid name", |(digest, name)| {
            StorePath::from_digest(&digest, &name).ok()
        })
}

fn output() -> impl Strategy<Value = DerivationOutput> {
    (
        proptest::option::of(store_path()),
        prop_oneof![
            Just(""),
            Just("sha256"),
            Just("r:sha256"),
            Just("text:sha256")
        ],
        "[0-9a-f]{0,64}",
    )
        .prop_map(|(path, algo, hash)| DerivationOutput {
            path,
            hash_algo: algo.to_string(),
            hash,
        })
}

/// Any string, weighted towards the characters ATerm escapes.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\"\\\\\n\r\t a-z,()\\[\\]]{0,40}",]
}

/// Any bytes (env values, args and the builder need not be UTF-8), or text.
fn bytes() -> impl Strategy<Value = ByteString> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(ByteString::from),
        text().prop_map(ByteString::from),
    ]
}

fn derivation() -> impl Strategy<Value = Derivation> {
    (
        proptest::collection::btree_map("[a-z][a-z0-9-]{0,10}", output(), 0..4),
        proptest::collection::btree_map(
            store_path(),
            proptest::collection::btree_set("[a-z]{1,6}", 0..3),
            0..4,
        ),
        proptest::collection::btree_set(store_path(), 0..4),
        text(),
        bytes(),
        proptest::collection::vec(bytes(), 0..4),
        proptest::collection::btree_map(bytes(), bytes(), 0..6),
    )
        .prop_map(
            |(outputs, input_drvs, input_srcs, platform, builder, args, env)| Derivation {
                outputs,
                input_drvs,
                input_srcs,
                platform,
                builder,
                args,
                env: env.into_iter().collect::<BTreeMap<_, _>>(),
            },
        )
}

proptest! {
    #[test]
    fn generated_derivations_round_trip(d in derivation()) {
        let text = d.to_aterm();
        let back = Derivation::parse_aterm(&text).unwrap();
        prop_assert_eq!(&back, &d);
        prop_assert_eq!(back.to_aterm(), text);
    }

    #[test]
    fn truncated_or_mangled_text_never_panics(d in derivation(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let text = d.to_aterm();
        let at = cut.index(text.len());
        if let Some(prefix) = text.get(..at) {
            prop_assert!(Derivation::parse_aterm(prefix).is_err());
        }
        let mut bytes = text;
        bytes[at] = byte;
        let _ = Derivation::parse_aterm(&bytes);
    }
}

/// Modulo hashes of every test derivation, read bottom-up and memoised (as a
/// caller of `hash_derivation_modulo` does).
fn modulo_hashes() -> BTreeMap<StorePath, farm_nix::Hash> {
    let drvs: BTreeMap<StorePath, Derivation> = real_drvs()
        .into_iter()
        .map(|(p, t)| (p, Derivation::parse_aterm(&t).unwrap()))
        .collect();
    let mut memo = BTreeMap::new();
    while memo.len() < drvs.len() {
        let before = memo.len();
        for (p, d) in &drvs {
            if memo.contains_key(p) || !d.input_drvs.keys().all(|i| memo.contains_key(i)) {
                continue;
            }
            let h = hash_derivation_modulo(d, &|i| memo.get(i).cloned()).unwrap();
            memo.insert(p.clone(), h);
        }
        assert!(memo.len() > before, "the test derivations form no cycle");
    }
    memo
}

#[test]
fn computed_output_paths_are_the_ones_nix_chose() {
    let memo = modulo_hashes();
    for (path, text) in real_drvs() {
        let d = Derivation::parse_aterm(&text).unwrap();
        let name = name_from_drv_path(&path).unwrap();
        let computed = d
            .computed_output_paths(&name, &|i| memo.get(i).cloned())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(computed, d.output_paths(), "{path}");
        d.check_output_paths(&name, &|i| memo.get(i).cloned())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    // an unknown input is an error, not a guess
    let simple = drv("simple");
    let e = simple
        .computed_output_paths("simple", &|_| None)
        .unwrap_err();
    assert!(matches!(e, DerivationError::UnknownInput(_)), "{e}");
}

#[test]
fn an_edited_output_path_is_refused_naming_it() {
    let memo = modulo_hashes();
    let lookup = |i: &StorePath| memo.get(i).cloned();
    for name in ["simple", "multi", "fixed-flat", "fixed-recursive"] {
        let honest = drv(name);
        for (o, out) in &honest.outputs {
            let mut d = honest.clone();
            let forged = StorePath::parse(&format!(
                "/nix/store/00000000000000000000000000000000-{}",
                out.path.as_ref().unwrap().name()
            ))
            .unwrap();
            d.outputs.get_mut(o).unwrap().path = Some(forged.clone());
            d.env.insert(o.as_str().into(), forged.to_string().into());
            let e = d.check_output_paths(name, &lookup).unwrap_err();
            match &e {
                DerivationError::WrongOutputPath {
                    output,
                    declared,
                    computed,
                    ..
                } => {
                    assert_eq!(output, o);
                    assert_eq!(declared, &forged.to_string());
                    assert_eq!(Some(computed), out.path.as_ref());
                }
                e => panic!("{name}: {e}"),
            }
            let msg = e.to_string();
            assert!(
                msg.contains(&forged.to_string()) && msg.contains(o),
                "{msg}"
            );
            // only the environment variable edited: refused too
            let mut d = honest.clone();
            d.env.insert(o.as_str().into(), forged.to_string().into());
            assert!(d.check_output_paths(name, &lookup).is_err(), "{name} {o}");
        }
    }
    // a different builder gives different input-addressed paths
    let mut d = drv("dep");
    d.builder = b"/bin/\xffsh".as_slice().into();
    assert!(matches!(
        d.check_output_paths("dep", &lookup),
        Err(DerivationError::WrongOutputPath { .. })
    ));
}

#[test]
fn content_addressed_and_impure_are_refused() {
    for (path, algo, hash) in [
        (None, "r:sha256", ""),
        (None, "r:sha256", "impure"),
        (None, "", ""),
    ] {
        let mut d = drv("dep");
        d.outputs.insert(
            "out".into(),
            DerivationOutput {
                path,
                hash_algo: algo.into(),
                hash: hash.into(),
            },
        );
        let e = d.computed_output_paths("dep", &|_| None).unwrap_err();
        assert!(matches!(e, DerivationError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("experimental"), "{e}");
    }
}

#[test]
fn resolve_replaces_input_derivations_by_their_outputs() {
    let drvs: BTreeMap<StorePath, Derivation> = real_drvs()
        .into_iter()
        .map(|(p, t)| (p, Derivation::parse_aterm(&t).unwrap()))
        .collect();
    let outputs =
        |p: &StorePath, o: &str| drvs.get(p).and_then(|d| d.output_paths().get(o).cloned());
    let user = drv("uses-multi");
    let b = user.resolve("uses-multi", &outputs).unwrap();
    let multi = drv("multi").output_paths();
    assert!(b.input_srcs.contains(&multi["dev"]) && b.input_srcs.contains(&multi["lib"]));
    assert!(!b.input_srcs.contains(&multi["out"]));
    assert_eq!(b.env, user.env);
    // same content, same digest; any change, another
    assert_eq!(
        b.digest(),
        user.resolve("uses-multi", &outputs).unwrap().digest()
    );
    let mut other = b.clone();
    other.env.insert("x".into(), b"\xff".as_slice().into());
    assert_ne!(other.digest(), b.digest());
    let mut renamed = b.clone();
    renamed.name = "other".into();
    assert_ne!(renamed.digest(), b.digest());
    let e = user.resolve("uses-multi", &|_, _| None).unwrap_err();
    assert!(
        matches!(e, DerivationError::UnknownInputOutput { .. }),
        "{e}"
    );
}
