//! Generated narinfos: render → parse is the identity, and mangled text never panics.

use farm_nix::narinfo::NarInfo;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::{Hash, HashAlgo, StorePath};
use proptest::prelude::*;

fn store_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,40}")
        .prop_filter_map("valid name", |(digest, name)| {
            StorePath::from_digest(&digest, &name).ok()
        })
}

fn hash() -> impl Strategy<Value = Hash> {
    (
        prop_oneof![
            Just(HashAlgo::Sha256),
            Just(HashAlgo::Sha1),
            Just(HashAlgo::Sha512),
            Just(HashAlgo::Md5)
        ],
        any::<Vec<u8>>(),
    )
        .prop_map(|(algo, data)| algo.digest(&data))
}

fn narinfo() -> impl Strategy<Value = NarInfo> {
    (
        (
            store_path(),
            proptest::option::of(store_path()),
            hash(),
            proptest::collection::btree_set(store_path(), 0..8),
            1..u64::MAX,
            proptest::collection::btree_set("[a-z0-9.-]{1,12}:[A-Za-z0-9+/=]{1,88}", 0..4),
            proptest::option::of(hash().prop_map(|h| format!("fixed:r:{h}"))),
        ),
        "[!-~][ -~]{0,80}",
        prop_oneof![Just("none"), Just("xz"), Just("zstd"), Just("bzip2")],
        proptest::option::of(hash()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |((path, deriver, nar_hash, references, nar_size, sigs, ca), url, comp, fh, fs)| {
                let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
                info.deriver = deriver;
                info.references = references;
                info.sigs = sigs;
                info.ca = ca;
                NarInfo {
                    info,
                    url,
                    compression: comp.to_owned(),
                    file_hash: fh,
                    file_size: fs,
                }
            },
        )
}

proptest! {
    #[test]
    fn render_parse_round_trip(n in narinfo()) {
        let text = n.render();
        let back = NarInfo::parse(&text).unwrap();
        prop_assert_eq!(&back, &n);
        prop_assert_eq!(back.render(), text);
    }

    #[test]
    fn mangled_text_never_panics(n in narinfo(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = n.render().into_bytes();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = NarInfo::parse_bytes(&bytes);
        let _ = NarInfo::parse_bytes(&bytes[..i]);
    }
}
