//! Golden tests against real Nix 2.8 in private stores: keys, signatures and
//! narinfo files interoperate in both directions, and a real Nix client
//! substitutes from a binary cache whose narinfos we rendered and signed.

use std::collections::BTreeSet;
use std::path::Path;

use farm_nix::narinfo::NarInfo;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::signing::{SigningKey, VerifyingKey};
use farm_nix::{Hash, HashAlgo, StorePath};
use farm_testkit::Actor;

/// A private store (own `/nix`, no substituters) whose nix.conf also has `extra`.
fn store(name: &str, extra: &[&str]) -> Actor {
    let actor = Actor::new(name).expect("a private store");
    for line in extra {
        actor.nix_conf_append(line).expect("nix.conf");
    }
    actor
}

/// Build a two-derivation closure (`top` refers to `dep`) and return top's path.
fn build_closure(root: &Actor) -> String {
    let expr = root.root().join("closure.nix");
    std::fs::write(
        &expr,
        r#"
let
  dep = derivation { name = "dep"; system = builtins.currentSystem; builder = "/bin/sh";
                     args = [ "-c" "echo dep > $out" ]; };
in derivation { name = "top"; system = builtins.currentSystem; builder = "/bin/sh";
                args = [ "-c" "echo ${dep} > $out" ]; }
"#,
    )
    .unwrap();
    root.run("nix-build", &["--no-out-link", expr.to_str().unwrap()])
        .unwrap()
        .trim()
        .to_owned()
}

/// `nix path-info --json` of one path, as a ValidPathInfo.
fn path_info(root: &Actor, path: &str) -> ValidPathInfo {
    let json = root.run("nix", &["path-info", "--json", path]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let v = &v[0];
    let mut info = ValidPathInfo::new(
        StorePath::parse(v["path"].as_str().unwrap()).unwrap(),
        Hash::parse_any(v["narHash"].as_str().unwrap()).unwrap(),
        v["narSize"].as_u64().unwrap(),
    );
    for r in v["references"].as_array().unwrap() {
        info.references
            .insert(StorePath::parse(r.as_str().unwrap()).unwrap());
    }
    if let Some(sigs) = v["signatures"].as_array() {
        for s in sigs {
            info.sigs.insert(s.as_str().unwrap().to_owned());
        }
    }
    info
}

#[test]
fn keys_from_nix_load_and_match() {
    let root = store("root", &[]);
    let sec = root.root().join("nix.sec");
    let public = root.root().join("nix.pub");
    root.run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "nix-made-1",
            sec.to_str().unwrap(),
            public.to_str().unwrap(),
        ],
    )
    .unwrap();
    let sk = SigningKey::read_file(&sec).unwrap();
    let pk = VerifyingKey::read_file(&public).unwrap();
    assert_eq!(sk.name(), "nix-made-1");
    assert_eq!(sk.verifying_key(), pk);
    // we print both exactly as Nix wrote them
    assert_eq!(
        sk.to_secret_string(),
        std::fs::read_to_string(&sec).unwrap().trim()
    );
    assert_eq!(
        pk.to_string(),
        std::fs::read_to_string(&public).unwrap().trim()
    );
}

#[test]
fn nix_signs_with_our_key_and_we_agree() {
    let root = store("root", &[]);
    let key = SigningKey::generate("farm-test-1").unwrap();
    let key_file = root.root().join("ours.sec");
    key.write_secret_key_file(&key_file).unwrap();
    let top = build_closure(&root);

    let before = path_info(&root, &top);
    assert_eq!(before.references.len(), 1, "top refers to dep");
    assert!(!before.verify_any(&[key.verifying_key()]));

    root.run(
        "nix",
        &[
            "store",
            "sign",
            "--key-file",
            key_file.to_str().unwrap(),
            &top,
        ],
    )
    .unwrap();
    let info = path_info(&root, &top);
    let nix_sigs: Vec<&String> = info
        .sigs
        .iter()
        .filter(|s| s.starts_with("farm-test-1:"))
        .collect();
    assert_eq!(nix_sigs.len(), 1, "{:?}", info.sigs);
    assert!(info.verify_any(&[key.verifying_key()]));
    assert!(key.verifying_key().verify(&info.fingerprint(), nix_sigs[0]));
    // ed25519 is deterministic: our signature of our fingerprint is Nix's
    assert_eq!(&key.sign(&info.fingerprint()), nix_sigs[0]);
    // a different key of the same name does not verify it
    let other = SigningKey::generate("farm-test-1").unwrap();
    assert!(!info.verify_any(&[other.verifying_key()]));

    // and Nix accepts our public key for its own check
    let verify = root
        .output(
            "nix",
            &[
                "store",
                "verify",
                "--no-contents",
                "--trusted-public-keys",
                &key.verifying_key().to_string(),
                &top,
            ],
        )
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// NAR of `path` as `nix-store --dump` writes it.
fn dump(root: &Actor, path: &Path) -> Vec<u8> {
    let out = root
        .output("nix-store", &["--dump", path.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Put one NAR and our signed narinfo for it into a `file://` cache.
fn publish(
    cache: &Path,
    path: &StorePath,
    nar: &[u8],
    references: &[&StorePath],
    key: &SigningKey,
) -> NarInfo {
    let nar_hash = HashAlgo::Sha256.digest(nar);
    let mut info = ValidPathInfo::new(path.clone(), nar_hash.clone(), nar.len() as u64);
    info.references = references.iter().map(|r| (*r).clone()).collect();
    info.deriver =
        Some(StorePath::from_digest(&[7u8; 20], &format!("{}.drv", path.name())).unwrap());
    info.sign(key);
    let url = format!("nar/{}.nar", nar_hash.to_nix32());
    std::fs::write(cache.join(&url), nar).unwrap();
    let mut ni = NarInfo::new(info, url, "none".into());
    ni.file_hash = Some(nar_hash);
    ni.file_size = Some(nar.len() as u64);
    std::fs::write(
        cache.join(format!("{}.narinfo", path.hash_part())),
        ni.render(),
    )
    .unwrap();
    ni
}

#[test]
fn real_nix_substitutes_what_we_signed() {
    let key = SigningKey::generate("farm-cache-1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();

    // A: a small tree (file, executable, symlink, subdirectory)
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("hello"), "hello from the farm\n").unwrap();
    std::fs::write(tree.join("sub/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            tree.join("sub/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("hello", tree.join("link")).unwrap();
    // B: a single file that refers to A (and to itself)
    let a = StorePath::make(
        "output:out",
        &HashAlgo::Sha256.digest(b"farm A"),
        "farm-tree",
    )
    .unwrap();
    let b = StorePath::make(
        "output:out",
        &HashAlgo::Sha256.digest(b"farm B"),
        "farm-file",
    )
    .unwrap();
    let file = work.path().join("file");
    std::fs::write(&file, format!("uses {a}\n")).unwrap();

    let dumper = store("dumper", &[]);
    let nar_a = dump(&dumper, &tree);
    let nar_b = dump(&dumper, &file);
    publish(&cache, &a, &nar_a, &[], &key);
    publish(&cache, &b, &nar_b, &[&a, &b], &key);

    let subst = format!("substituters = file://{}", cache.display());
    let trusted = format!("trusted-public-keys = {}", key.verifying_key());
    let client = store("client", &[&subst, &trusted, "require-sigs = true"]);
    client
        .run("nix-store", &["--realise", &b.to_string()])
        .unwrap();
    // B and, through its references, A are there with the right contents
    assert_eq!(
        std::fs::read_to_string(client.host_path(&b.to_string()).unwrap()).unwrap(),
        format!("uses {a}\n")
    );
    let got_a = client.host_path(&a.to_string()).unwrap();
    assert_eq!(
        std::fs::read_to_string(got_a.join("hello")).unwrap(),
        "hello from the farm\n"
    );
    assert_eq!(
        std::fs::read_link(got_a.join("link")).unwrap(),
        Path::new("hello")
    );
    assert_eq!(dump(&client, &got_a), nar_a);
    // Nix recorded what the narinfo said, our signature included
    let info = path_info(&client, &b.to_string());
    let want: BTreeSet<StorePath> = [a.clone(), b.clone()].into();
    assert_eq!(info.references, want);
    assert!(info.verify_any(&[key.verifying_key()]));

    // With another trusted key Nix refuses the same cache.
    let other = SigningKey::generate("farm-cache-1").unwrap();
    let trusted_other = format!("trusted-public-keys = {}", other.verifying_key());
    let refusing = store("refusing", &[&subst, &trusted_other]);
    let out = refusing
        .output("nix-store", &["--realise", &b.to_string()])
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not signed by any of the keys"),
        "{stderr}"
    );
    assert!(!refusing.host_path(&b.to_string()).unwrap().exists());
    assert!(!refusing.host_path(&a.to_string()).unwrap().exists());
}

#[test]
fn narinfos_written_by_nix_parse_render_and_verify() {
    let key = SigningKey::generate("nix-copy-1").unwrap();
    let probe = tempfile::tempdir().unwrap();
    let key_file = probe.path().join("k.sec");
    key.write_secret_key_file(&key_file).unwrap();
    let secret = format!("secret-key-files = {}", key_file.display());
    let root = store("root", &[&secret]);
    let top = build_closure(&root);
    // a .drv too: a content-addressed text path, so CA appears
    let drv = root
        .run("nix-store", &["--query", "--deriver", &top])
        .unwrap()
        .trim()
        .to_owned();
    // secret-key-files signs what Nix builds; the .drv files it only wrote, so
    // sign those with `nix store sign` and the same key
    root.run(
        "nix",
        &[
            "store",
            "sign",
            "--derivation",
            "--recursive",
            "--key-file",
            key_file.to_str().unwrap(),
            &drv,
        ],
    )
    .unwrap();

    for (dir, query, compression) in [("plain", "?compression=none", "none"), ("xz", "", "xz")] {
        let cache = root.root().join(dir);
        let to = format!("file://{}{query}", cache.display());
        root.run("nix", &["copy", "--to", &to, &top]).unwrap();
        root.run("nix", &["copy", "--derivation", "--to", &to, &drv])
            .unwrap();
        let mut seen = BTreeSet::new();
        for entry in std::fs::read_dir(&cache).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_none_or(|e| e != "narinfo") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let ni =
                NarInfo::parse(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", p.display()));
            assert_eq!(
                format!("{}.narinfo", ni.info.path.hash_part()),
                p.file_name().unwrap().to_str().unwrap()
            );
            assert_eq!(ni.compression, compression);
            // our rendering is what Nix wrote
            assert_eq!(ni.render(), text, "{}", p.display());
            assert_eq!(NarInfo::parse(&ni.render()).unwrap(), ni);
            // signed with our key, by secret-key-files or `nix store sign`
            assert!(ni.info.verify_any(&[key.verifying_key()]), "{text}");
            // the NAR file is where URL says, with the size and hash claimed
            let file = std::fs::read(cache.join(&ni.url)).unwrap();
            assert_eq!(Some(file.len() as u64), ni.file_size);
            assert_eq!(Some(HashAlgo::Sha256.digest(&file)), ni.file_hash.clone());
            if compression == "none" {
                assert_eq!(file.len() as u64, ni.info.nar_size);
                assert_eq!(HashAlgo::Sha256.digest(&file), ni.info.nar_hash);
            }
            seen.insert(ni.info.path.to_string());
        }
        assert!(seen.contains(&top), "{seen:?}");
        assert!(seen.contains(&drv), "{seen:?}");
        assert!(seen.len() >= 3, "top, dep and the drv closure: {seen:?}");
        let drv_info = NarInfo::parse(
            &std::fs::read_to_string(cache.join(format!(
                "{}.narinfo",
                StorePath::parse(&drv).unwrap().hash_part()
            )))
            .unwrap(),
        )
        .unwrap();
        assert!(
            drv_info
                .info
                .ca
                .as_deref()
                .is_some_and(|c| c.starts_with("text:sha256:")),
            "{:?}",
            drv_info.info.ca
        );
        let top_info = NarInfo::parse(
            &std::fs::read_to_string(cache.join(format!(
                "{}.narinfo",
                StorePath::parse(&top).unwrap().hash_part()
            )))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(top_info.info.references.len(), 1);
        assert_eq!(
            top_info.info.deriver.as_ref().map(|d| d.to_string()),
            Some(drv.clone())
        );
    }
}
