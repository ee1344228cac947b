//! Tests of the NAR writer, reader and restore: golden comparisons with the
//! real `nix-store --dump` / `nix-hash` / `nix-store --restore`, one rejection
//! test per validation rule, and property tests.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::*;
use crate::hash::HashAlgo;
use farm_testkit::host::{nix_dump, nix_hash, rt, run};

fn write_file(path: &Path, data: &[u8], mode: u32) {
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tree with every kind of node the brief asks for.
fn rich_tree(root: &Path) {
    std::fs::create_dir(root).unwrap();
    write_file(&root.join("hello.txt"), b"hello world\n", 0o644);
    write_file(&root.join("run.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    // Group-executable only: Nix looks at the owner bit alone.
    write_file(&root.join("group-exec"), b"g", 0o654);
    write_file(&root.join("empty"), b"", 0o644);
    write_file(&root.join("empty-exec"), b"", 0o755);
    write_file(&root.join("big.bin"), &noise((1 << 20) + 12345, 7), 0o644);
    for len in 1..=17 {
        write_file(
            &root.join(format!("pad{len:02}")),
            &noise(len, len as u64),
            0o644,
        );
    }
    // Byte order, not locale order: "B" < "a" < "a-b" < "a.b" < "ab" < "é".
    for name in [
        "a",
        "B",
        "ab",
        "a.b",
        "a-b",
        "é",
        "Zürich",
        "日本語",
        "~tilde",
    ] {
        write_file(&root.join(name), name.as_bytes(), 0o644);
    }
    std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../up/ü", root.join("rel-dangling")).unwrap();
    std::fs::create_dir(root.join("emptydir")).unwrap();
    let deep = root.join("d1/d2/d3/d4");
    std::fs::create_dir_all(&deep).unwrap();
    write_file(&deep.join("leaf"), b"leaf", 0o755);
    std::os::unix::fs::symlink("../../..", deep.join("up")).unwrap();
    std::fs::create_dir(root.join("d1/d2/empty")).unwrap();
    write_file(&root.join("d1/x"), b"x", 0o644);
}

async fn dump_vec(path: &Path) -> (Vec<u8>, NarSummary) {
    let mut out = Vec::new();
    let summary = dump_path(path, &mut out).await.expect("dump_path");
    (out, summary)
}

fn sha256(data: &[u8]) -> Hash {
    HashAlgo::Sha256.digest(data)
}

#[test]
fn dump_matches_nix_store_dump_and_nix_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    rich_tree(&root);
    let (ours, summary) = rt().block_on(dump_vec(&root));
    let theirs = nix_dump(&root);
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs, "NAR differs from nix-store --dump");
    assert_eq!(summary.nar_size, theirs.len() as u64);
    assert_eq!(summary.nar_hash, sha256(&theirs));
    assert_eq!(summary.nar_hash.to_nix32(), nix_hash(&root));
}

#[test]
fn dump_single_nodes_match_nix() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    write_file(&file, b"contents", 0o644);
    let exe = tmp.path().join("exe");
    write_file(&exe, &noise(100_000, 3), 0o700);
    let empty = tmp.path().join("empty");
    write_file(&empty, b"", 0o600);
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink("/nix/store/nothing", &link).unwrap();
    let dir = tmp.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    for p in [&file, &exe, &empty, &link, &dir] {
        let (ours, summary) = rt().block_on(dump_vec(p));
        assert!(ours == nix_dump(p), "{p:?} differs from nix-store --dump");
        assert_eq!(summary.nar_hash, sha256(&ours));
        assert_eq!(summary.nar_hash.to_nix32(), nix_hash(p), "{p:?}");
    }
}

/// The NAR of bytes is that of a file holding them, as `nix-store --dump`
/// writes it, for every padding length and both executable flags.
#[test]
fn dump_bytes_matches_nix() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, len) in [0, 1, 7, 8, 9, 15, 16, 100_000].into_iter().enumerate() {
        let data = noise(len, i as u64);
        for executable in [false, true] {
            let file = tmp.path().join(format!("f{i}-{executable}"));
            write_file(&file, &data, if executable { 0o755 } else { 0o644 });
            let theirs = nix_dump(&file);
            let mut ours = Vec::new();
            let summary = rt()
                .block_on(dump_bytes(&data, executable, &mut ours))
                .unwrap();
            assert!(ours == theirs, "{len} bytes, executable {executable}");
            assert_eq!(summary.nar_hash, sha256(&theirs));
            assert_eq!(summary.nar_size, theirs.len() as u64);
            if !executable {
                assert!(nar_of_bytes(&data) == theirs, "{len} bytes in memory");
            }
        }
    }
}

#[test]
fn dump_refuses_fifo() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    let mut cmd = std::process::Command::new("mkfifo");
    cmd.arg(&fifo);
    run(cmd, None);
    let err = rt()
        .block_on(dump_path(tmp.path(), &mut tokio::io::sink()))
        .unwrap_err();
    assert!(
        matches!(&err, NarError::UnsupportedFileType { path } if *path == fifo),
        "{err:?}"
    );
}

#[test]
fn copy_nar_accepts_nix_output_and_stops_at_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    rich_tree(&root);
    let nar = nix_dump(&root);
    rt().block_on(async {
        // Exact copy with the same summary.
        let mut out = Vec::new();
        let s = copy_nar(&mut nar.as_slice(), &mut out, &NarLimits::default())
            .await
            .unwrap();
        assert!(out == nar);
        assert_eq!(s.nar_size, nar.len() as u64);
        assert_eq!(s.nar_hash.to_nix32(), nix_hash(&root));

        // Bytes after the NAR are left unread: a reader that fails when polled
        // past the end proves not one byte more is asked for.
        let mut r = nar.as_slice().chain(FailReader);
        let s2 = copy_nar(&mut r, &mut tokio::io::sink(), &NarLimits::default())
            .await
            .unwrap();
        assert_eq!(s, s2);

        // Same through a reader that returns one to three bytes per read.
        let mut trailing = nar.clone();
        trailing.extend_from_slice(b"TRAILER!");
        let mut r = Dribble::new(trailing.clone());
        let s3 = copy_nar(&mut r, &mut tokio::io::sink(), &NarLimits::default())
            .await
            .unwrap();
        assert_eq!(s, s3);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"TRAILER!");

        // copy_nar_exact accepts the exact stream, rejects trailing bytes.
        copy_nar_exact(
            &mut nar.as_slice(),
            &mut tokio::io::sink(),
            &NarLimits::default(),
        )
        .await
        .unwrap();
        let err = copy_nar_exact(
            &mut trailing.as_slice(),
            &mut tokio::io::sink(),
            &NarLimits::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, NarError::TrailingBytes), "{err:?}");
    });
}

#[test]
fn every_proper_prefix_is_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    write_file(&root.join("a"), b"abc", 0o755);
    std::os::unix::fs::symlink("a", root.join("b")).unwrap();
    std::fs::create_dir(root.join("c")).unwrap();
    let nar = nix_dump(&root);
    rt().block_on(async {
        for len in 0..nar.len() {
            let err = copy_nar(
                &mut &nar[..len],
                &mut tokio::io::sink(),
                &NarLimits::default(),
            )
            .await
            .unwrap_err();
            assert!(matches!(err, NarError::Truncated), "prefix {len}: {err:?}");
        }
    });
}

#[test]
fn restore_round_trips_and_matches_nix_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    rich_tree(&root);
    let nar = nix_dump(&root);
    let dest = tmp.path().join("restored");
    let s = rt()
        .block_on(restore(&mut nar.as_slice(), &dest, &NarLimits::default()))
        .unwrap();
    assert_eq!(s.nar_hash, sha256(&nar));
    assert_eq!(s.nar_size, nar.len() as u64);
    assert!(nix_dump(&dest) == nar, "restored tree dumps differently");
    let mode = |p: &str| {
        std::fs::symlink_metadata(dest.join(p))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_ne!(mode("run.sh") & 0o100, 0);
    assert_eq!(mode("hello.txt") & 0o111, 0);
    assert_eq!(
        std::fs::read_link(dest.join("dangling")).unwrap(),
        Path::new("/does/not/exist")
    );
    // No temporary sibling is left behind.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Cross-check: nix-store --restore of our own dump gives the same tree.
    let (ours, _) = rt().block_on(dump_vec(&root));
    let dest2 = tmp.path().join("nix-restored");
    let mut cmd = std::process::Command::new("nix-store");
    cmd.arg("--restore").arg(&dest2);
    run(cmd, Some(&ours));
    assert!(nix_dump(&dest2) == nar);
}

#[test]
fn restore_single_file_and_symlink_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = tmp.path().join("exe");
    write_file(&exe, b"#!/bin/sh\n", 0o755);
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink("exe", &link).unwrap();
    for p in [&exe, &link] {
        let nar = nix_dump(p);
        let dest = tmp.path().join(format!(
            "restored-{}",
            p.file_name().unwrap().to_string_lossy()
        ));
        rt().block_on(restore(&mut nar.as_slice(), &dest, &NarLimits::default()))
            .unwrap();
        assert!(nix_dump(&dest) == nar);
    }
}

#[test]
fn restore_refuses_existing_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src, b"x", 0o644);
    let nar = nix_dump(&src);
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let err = rt()
        .block_on(restore(&mut nar.as_slice(), &dest, &NarLimits::default()))
        .unwrap_err();
    assert!(matches!(err, NarError::DestinationExists { .. }), "{err:?}");
    // Untouched, and the dangling symlink case counts as existing too.
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);
    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink("/nowhere", &dangling).unwrap();
    let err = rt()
        .block_on(restore(
            &mut nar.as_slice(),
            &dangling,
            &NarLimits::default(),
        ))
        .unwrap_err();
    assert!(matches!(err, NarError::DestinationExists { .. }), "{err:?}");
}

#[test]
fn restore_leaves_nothing_on_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    rich_tree(&root);
    let nar = nix_dump(&root);
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let dest = work.join("dest");
    rt().block_on(async {
        // Truncated in the middle of the big file, and bad at the very end.
        let mut bad_end = nar.clone();
        let n = bad_end.len();
        bad_end[n - 8] = 2;
        for bad in [&nar[..nar.len() / 2], &nar[..nar.len() - 1], &bad_end[..]] {
            let err = restore(&mut &bad[..], &dest, &NarLimits::default())
                .await
                .unwrap_err();
            assert!(
                matches!(err, NarError::Truncated | NarError::UnexpectedToken { .. }),
                "{err:?}"
            );
            assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
        }
    });
}

// ---- rejection tests: hand-built NARs ----

/// One NAR token.
fn tok(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v.resize(v.len() + (8 - s.len() % 8) % 8, 0);
    v
}

fn toks(ts: &[&[u8]]) -> Vec<u8> {
    ts.iter().flat_map(|t| tok(t)).collect()
}

/// Hand-built NAR tree (for tests that need invalid ones).
enum N {
    F(&'static [u8]),
    L(&'static [u8]),
    D(Vec<(&'static [u8], N)>),
}

fn enc(n: &N, out: &mut Vec<u8>) {
    out.extend(toks(&[b"(", b"type"]));
    match n {
        N::F(c) => out.extend(toks(&[b"regular", b"contents", c])),
        N::L(t) => out.extend(toks(&[b"symlink", b"target", t])),
        N::D(es) => {
            out.extend(tok(b"directory"));
            for (name, child) in es {
                out.extend(toks(&[b"entry", b"(", b"name", name, b"node"]));
                enc(child, out);
                out.extend(tok(b")"));
            }
        }
    }
    out.extend(tok(b")"));
}

fn nar_of(n: &N) -> Vec<u8> {
    let mut v = tok(b"nix-archive-1");
    enc(n, &mut v);
    v
}

fn check(nar: &[u8], limits: &NarLimits) -> Result<NarSummary, NarError> {
    rt().block_on(copy_nar(&mut &nar[..], &mut tokio::io::sink(), limits))
}

fn reject(nar: &[u8]) -> NarError {
    check(nar, &NarLimits::default()).expect_err("must be rejected")
}

#[test]
fn hand_built_valid_nar_is_accepted() {
    let nar = nar_of(&N::D(vec![
        (b"a", N::F(b"1")),
        (b"b", N::L(b"a")),
        (b"c", N::D(vec![])),
    ]));
    let s = check(&nar, &NarLimits::default()).unwrap();
    assert_eq!(s.nar_hash, sha256(&nar));
}

#[test]
fn rejects_invalid_names() {
    let cases: [(&'static [u8], InvalidNameReason); 6] = [
        (b"", InvalidNameReason::Empty),
        (b".", InvalidNameReason::Dot),
        (b"..", InvalidNameReason::DotDot),
        (b"a/b", InvalidNameReason::Slash),
        (b"/", InvalidNameReason::Slash),
        (b"a\0b", InvalidNameReason::Nul),
    ];
    for (name, want) in cases {
        let err = reject(&nar_of(&N::D(vec![(name, N::F(b""))])));
        assert!(
            matches!(err, NarError::InvalidName { reason, .. } if reason == want),
            "{name:?}: {err:?}"
        );
    }
}

#[test]
fn rejects_unsorted_and_duplicate_entries() {
    let err = reject(&nar_of(&N::D(vec![(b"b", N::F(b"")), (b"a", N::F(b""))])));
    assert!(
        matches!(&err, NarError::UnsortedEntries { prev, name } if prev == "b" && name == "a"),
        "{err:?}"
    );
    // Byte order: "B" (0x42) sorts before "a" (0x61).
    let err = reject(&nar_of(&N::D(vec![(b"a", N::F(b"")), (b"B", N::F(b""))])));
    assert!(matches!(err, NarError::UnsortedEntries { .. }), "{err:?}");
    let err = reject(&nar_of(&N::D(vec![(b"a", N::F(b"")), (b"a", N::L(b"x"))])));
    assert!(
        matches!(&err, NarError::DuplicateEntry { name } if name == "a"),
        "{err:?}"
    );
    // Ordering is per directory: the same name in two directories is fine.
    check(
        &nar_of(&N::D(vec![
            (b"x", N::D(vec![(b"z", N::F(b""))])),
            (b"y", N::D(vec![(b"a", N::F(b""))])),
        ])),
        &NarLimits::default(),
    )
    .unwrap();
}

fn nested(depth: usize) -> N {
    let mut n = N::D(vec![]);
    for _ in 1..depth {
        n = N::D(vec![(b"d", n)]);
    }
    n
}

#[test]
fn rejects_nesting_deeper_than_the_limit() {
    let limits = NarLimits {
        max_depth: 5,
        ..NarLimits::default()
    };
    check(&nar_of(&nested(5)), &limits).unwrap();
    let err = check(&nar_of(&nested(6)), &limits).unwrap_err();
    assert!(matches!(err, NarError::TooDeep { max: 5 }), "{err:?}");
    // The default limit holds against a very deep NAR without recursion.
    let mut deep = tok(b"nix-archive-1");
    for _ in 0..100_000 {
        deep.extend(toks(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]));
    }
    let err = reject(&deep);
    assert!(matches!(err, NarError::TooDeep { .. }), "{err:?}");
}

/// `nix-archive-1 ( type directory entry ( name` followed by `len`.
fn nar_with_name_len(len: u64) -> Vec<u8> {
    let mut v = toks(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
    ]);
    v.extend_from_slice(&len.to_le_bytes());
    v
}

#[test]
fn rejects_lengths_over_limits_before_allocating() {
    // A name length of u64::MAX must fail on the length, not on allocation.
    let err = reject(&nar_with_name_len(u64::MAX));
    assert!(
        matches!(err, NarError::NameTooLong { len: u64::MAX, .. }),
        "{err:?}"
    );
    let limits = NarLimits {
        max_name_len: 4,
        max_target_len: 4,
        max_file_size: 4,
        max_entries_per_dir: 2,
        ..NarLimits::default()
    };
    let err = check(&nar_of(&N::D(vec![(b"abcde", N::F(b""))])), &limits).unwrap_err();
    assert!(
        matches!(err, NarError::NameTooLong { len: 5, max: 4 }),
        "{err:?}"
    );
    check(&nar_of(&N::D(vec![(b"abcd", N::L(b"abcd"))])), &limits).unwrap();
    let err = check(&nar_of(&N::L(b"abcde")), &limits).unwrap_err();
    assert!(
        matches!(err, NarError::TargetTooLong { len: 5, max: 4 }),
        "{err:?}"
    );
    let err = check(&nar_of(&N::F(b"abcde")), &limits).unwrap_err();
    assert!(
        matches!(err, NarError::FileTooLarge { len: 5, max: 4 }),
        "{err:?}"
    );
    let three = N::D(vec![
        (b"a", N::F(b"")),
        (b"b", N::F(b"")),
        (b"c", N::F(b"")),
    ]);
    let err = check(&nar_of(&three), &limits).unwrap_err();
    assert!(
        matches!(err, NarError::TooManyEntries { max: 2 }),
        "{err:?}"
    );

    // Symlink target and file contents with absurd lengths.
    let mut v = toks(&[b"nix-archive-1", b"(", b"type", b"symlink", b"target"]);
    v.extend_from_slice(&u64::MAX.to_le_bytes());
    let err = reject(&v);
    assert!(matches!(err, NarError::TargetTooLong { .. }), "{err:?}");
    let mut v = toks(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    v.extend_from_slice(&u64::MAX.to_le_bytes());
    let err = reject(&v);
    assert!(matches!(err, NarError::FileTooLarge { .. }), "{err:?}");
    // A keyword whose length is absurd.
    let mut v = toks(&[b"nix-archive-1", b"("]);
    v.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let err = reject(&v);
    assert!(matches!(err, NarError::TokenTooLong { .. }), "{err:?}");

    // Whole-NAR size limit: exactly the size passes, one byte less fails,
    // also when the excess is in file contents (checked before reading them).
    let nar = nar_of(&N::D(vec![(b"f", N::F(b"0123456789"))]));
    let exact = NarLimits {
        max_total_size: nar.len() as u64,
        ..NarLimits::default()
    };
    check(&nar, &exact).unwrap();
    let less = NarLimits {
        max_total_size: nar.len() as u64 - 1,
        ..NarLimits::default()
    };
    let err = check(&nar, &less).unwrap_err();
    assert!(matches!(err, NarError::NarTooLarge { .. }), "{err:?}");
    let mut v = toks(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    v.extend_from_slice(&(1u64 << 30).to_le_bytes());
    let err = check(
        &v,
        &NarLimits {
            max_total_size: 1 << 20,
            ..NarLimits::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, NarError::NarTooLarge { .. }), "{err:?}");
}

#[test]
fn rejects_non_zero_padding() {
    let good = nar_of(&N::D(vec![(b"abc", N::F(b"xyz"))]));
    check(&good, &NarLimits::default()).unwrap();
    // Padding of: the magic, a keyword, the name, the contents.
    let find = |t: &[u8]| {
        let t = tok(t);
        good.windows(t.len()).position(|w| w == t).unwrap()
    };
    let positions = [
        8 + 13,
        find(b"directory") + 8 + 9,
        find(b"abc") + 8 + 3,
        find(b"xyz") + 8 + 3,
    ];
    for pos in positions {
        let mut bad = good.clone();
        assert_eq!(bad[pos], 0);
        bad[pos] = 1;
        let err = reject(&bad);
        assert!(matches!(err, NarError::NonZeroPadding), "at {pos}: {err:?}");
    }
}

#[test]
fn rejects_unknown_tokens_and_structure() {
    let err = reject(&toks(&[b"nix-archive-2", b"("]));
    assert!(
        matches!(&err, NarError::BadMagic { found } if found == "nix-archive-2"),
        "{err:?}"
    );
    let mut big_magic = (1000u64).to_le_bytes().to_vec();
    big_magic.extend_from_slice(&[b'x'; 1000]);
    let err = reject(&big_magic);
    assert!(matches!(err, NarError::BadMagic { .. }), "{err:?}");

    let m: &[u8] = b"nix-archive-1";
    let cases: Vec<(Vec<&[u8]>, &str)> = vec![
        (vec![m, b"type"], "\"(\""),
        (vec![m, b"(", b"kind"], "\"type\""),
        (
            vec![m, b"(", b"type", b"fifo"],
            "\"regular\", \"symlink\" or \"directory\"",
        ),
        (
            vec![m, b"(", b"type", b"regular", b"size"],
            "\"executable\" or \"contents\"",
        ),
        (
            vec![m, b"(", b"type", b"regular", b"executable", b"1"],
            "\"\" after \"executable\"",
        ),
        (
            vec![
                m,
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"",
                b"executable",
            ],
            "\"contents\"",
        ),
        (
            vec![m, b"(", b"type", b"symlink", b"contents"],
            "\"target\"",
        ),
        (
            vec![m, b"(", b"type", b"symlink", b"target", b"x", b"entry"],
            "\")\" closing a symlink",
        ),
        (
            vec![m, b"(", b"type", b"regular", b"contents", b"x", b"("],
            "\")\" closing a regular file",
        ),
        (
            vec![m, b"(", b"type", b"directory", b"node"],
            "\"entry\" or \")\"",
        ),
        (
            vec![m, b"(", b"type", b"directory", b"entry", b"name"],
            "\"(\" opening an entry",
        ),
        (
            vec![m, b"(", b"type", b"directory", b"entry", b"(", b"node"],
            "\"name\"",
        ),
        (
            vec![
                m,
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"a",
                b"(",
            ],
            "\"node\"",
        ),
        (
            vec![
                m,
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"a",
                b"node",
                b"(",
                b"type",
                b"symlink",
                b"target",
                b"b",
                b")",
                b"entry",
            ],
            "\")\" closing an entry",
        ),
    ];
    for (ts, want) in cases {
        let err = reject(&toks(&ts));
        assert!(
            matches!(&err, NarError::UnexpectedToken { expected, .. } if *expected == want),
            "{want}: {err:?}"
        );
    }
    // An executable flag after contents is not part of the grammar either.
    let err = reject(&toks(&[
        m,
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"",
        b"executable",
    ]));
    assert!(matches!(err, NarError::UnexpectedToken { .. }), "{err:?}");
}

#[test]
fn rejects_bad_symlink_targets() {
    for target in [&b""[..], b"a\0b"] {
        let mut v = toks(&[b"nix-archive-1", b"(", b"type", b"symlink", b"target"]);
        v.extend(tok(target));
        v.extend(tok(b")"));
        let err = reject(&v);
        assert!(
            matches!(err, NarError::InvalidSymlinkTarget { .. }),
            "{err:?}"
        );
    }
}

#[test]
fn reader_events_describe_the_tree() {
    let nar = nar_of(&N::D(vec![
        (b"a", N::F(b"hello")),
        (b"b", N::D(vec![(b"c", N::L(b"../a"))])),
    ]));
    rt().block_on(async {
        let mut r = nar.as_slice();
        let mut out = Vec::new();
        let mut reader = NarReader::new(&mut r, &mut out, &NarLimits::default());
        let mut events = Vec::new();
        let mut contents = Vec::new();
        while let Some(e) = reader.next_event().await.unwrap() {
            if let NarEvent::Regular { .. } = e {
                let mut buf = [0u8; 2];
                loop {
                    let n = reader.read_contents(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    contents.extend_from_slice(&buf[..n]);
                }
            }
            events.push(e);
        }
        let s = reader.finish().await.unwrap();
        assert_eq!(
            events,
            vec![
                NarEvent::Directory,
                NarEvent::Entry {
                    name: b"a".to_vec()
                },
                NarEvent::Regular {
                    executable: false,
                    size: 5
                },
                NarEvent::Entry {
                    name: b"b".to_vec()
                },
                NarEvent::Directory,
                NarEvent::Entry {
                    name: b"c".to_vec()
                },
                NarEvent::Symlink {
                    target: b"../a".to_vec()
                },
                NarEvent::EndDirectory,
                NarEvent::EndDirectory,
            ]
        );
        assert_eq!(contents, b"hello");
        assert_eq!(s.nar_hash, sha256(&nar));
        assert!(out == nar);
    });
}

// ---- readers used by the tests ----

/// Fails every read: chained after a NAR, it proves nothing past it is read.
struct FailReader;

impl AsyncRead for FailReader {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::Error::other("read past the end of the NAR")))
    }
}

/// Hands out one to three bytes per read.
struct Dribble {
    data: Vec<u8>,
    pos: usize,
}

impl Dribble {
    fn new(data: Vec<u8>) -> Self {
        Dribble { data, pos: 0 }
    }
}

impl AsyncRead for Dribble {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (1 + self.pos % 3)
            .min(buf.remaining())
            .min(self.data.len() - self.pos);
        let pos = self.pos;
        buf.put_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

// ---- property tests ----

#[derive(Debug, Clone)]
enum Tree {
    File { exec: bool, data: Vec<u8> },
    Link(String),
    Dir(BTreeMap<String, Tree>),
}

fn tree_strategy() -> impl Strategy<Value = Tree> {
    let name = "[a-zA-Z0-9_.~é日-]{1,6}".prop_filter("not . or ..", |n| n != "." && n != "..");
    let leaf = prop_oneof![
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(exec, data)| Tree::File { exec, data }),
        (
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 60_000..70_000)
        )
            .prop_map(|(exec, data)| Tree::File { exec, data }),
        "[a-z./ü]{1,12}".prop_map(Tree::Link),
    ];
    leaf.prop_recursive(4, 40, 6, move |inner| {
        prop::collection::btree_map(name.clone(), inner, 0..6).prop_map(Tree::Dir)
    })
}

fn materialise(t: &Tree, path: &Path) {
    match t {
        Tree::File { exec, data } => write_file(path, data, if *exec { 0o755 } else { 0o644 }),
        Tree::Link(target) => std::os::unix::fs::symlink(target, path).unwrap(),
        Tree::Dir(entries) => {
            std::fs::create_dir(path).unwrap();
            for (name, child) in entries {
                materialise(child, &path.join(name));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_dump_copy_restore(tree in tree_strategy()) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        materialise(&tree, &root);
        let rt = rt();
        let (nar, summary) = rt.block_on(dump_vec(&root));
        prop_assert!(nar == nix_dump(&root), "differs from nix-store --dump");
        prop_assert_eq!(&summary.nar_hash, &sha256(&nar));
        prop_assert_eq!(summary.nar_size, nar.len() as u64);

        let mut copy = Vec::new();
        let s2 = rt
            .block_on(copy_nar(&mut Dribble::new(nar.clone()), &mut copy, &NarLimits::default()))
            .unwrap();
        prop_assert_eq!(&s2, &summary);
        prop_assert!(copy == nar);

        let dest = tmp.path().join("restored");
        let s3 = rt
            .block_on(restore(&mut nar.as_slice(), &dest, &NarLimits::default()))
            .unwrap();
        prop_assert_eq!(&s3, &summary);
        let (again, _) = rt.block_on(dump_vec(&dest));
        prop_assert!(again == nar);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_nars_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let mut nar = nar_of(&N::D(vec![
            (b"a", N::F(b"hello")),
            (b"b", N::D(vec![(b"c", N::L(b"../a")), (b"d", N::F(b""))])),
            (b"e", N::L(b"x")),
        ]));
        for (idx, byte, kind) in edits {
            if nar.is_empty() {
                break;
            }
            let i = idx.index(nar.len());
            match kind {
                0 => nar[i] = byte,
                1 => nar.truncate(i),
                2 => nar.insert(i, byte),
                _ => { nar.remove(i); }
            }
        }
        let rt = rt();
        let mut out = Vec::new();
        let mut r = nar.as_slice();
        if let Ok(s) = rt.block_on(copy_nar(&mut r, &mut out, &NarLimits::default())) {
                // What was accepted is exactly the bytes consumed and copied.
                let consumed = nar.len() - r.len();
                prop_assert_eq!(s.nar_size, consumed as u64);
                prop_assert_eq!(&s.nar_hash, &sha256(&nar[..consumed]));
                prop_assert!(out == nar[..consumed]);
        }
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        if rt.block_on(restore(&mut nar.as_slice(), &dest, &NarLimits::default())).is_err() {
            prop_assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        }
    }
}
