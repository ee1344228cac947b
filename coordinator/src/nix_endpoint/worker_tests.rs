//! Worker protocol (ssh-ng://) tests of the endpoint over `tokio::io::duplex`:
//! Nix 2.8 captures replayed against the endpoint and its real cache, and our
//! worker client driving every operation a build hook and a remote-store
//! client use, at client versions 1.34, 1.35 and 1.38.

use std::collections::BTreeSet;

use farm_nix::hash::HashAlgo;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;
use farm_nix::wire::{BuildStatus, DerivedPath, OutputsSpec};
use farm_nix::worker::{BuildMode, ClientSettings, WorkerClient};
use tokio::io::AsyncReadExt;

use super::tests::{capture, file_path, fixture, replay, start};
use crate::nix_endpoint::ssh::NixProgram;

const DAEMON: NixProgram = NixProgram::Daemon;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;

/// The u64 words of a reply at 8-byte offsets.
fn words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Bytes after the handshake (which ends with the first `STDERR_LAST`).
fn after_handshake(b: &[u8]) -> &[u8] {
    let i = words(b).iter().position(|w| *w == STDERR_LAST).unwrap();
    &b[(i + 1) * 8..]
}

fn p(s: &str) -> StorePath {
    StorePath::parse(s).unwrap()
}

#[tokio::test]
async fn worker_copy_to_replayed() {
    // `nix copy --to ssh-ng://` of Nix 2.8: QueryValidPaths, AddMultipleToStore.
    let f = fixture().await;
    let (out, err, code) = replay(&f.endpoint, DAEMON, &capture("worker-copy.0.c2s")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        after_handshake(&out),
        after_handshake(&capture("worker-copy.0.s2c")),
        "replies differ from the real daemon's"
    );
    let top = p("/nix/store/bc4r7wxi759vv6c69kbk0p2kjxc5cj07-capture-test");
    let dep = p("/nix/store/c1fp5qqkcskxhpp16ssriv026s00lag5-capdep");
    let info = f.cache.path_info(&top).await.unwrap().expect("uploaded");
    assert_eq!(info.references, BTreeSet::from([dep.clone()]));
    assert_eq!(
        info.deriver,
        Some(p(
            "/nix/store/ccwfy8gczy2h0s336hi17r38h5m1cdnn-capture-test.drv"
        ))
    );
    assert!(f.cache.path_info(&dep).await.unwrap().is_some());

    // Then `nix path-info -r` of Nix 2.8 (QueryMissing, QueryPathInfo ×2): no errors.
    let (out, err, code) = replay(&f.endpoint, DAEMON, &capture("worker-copy.2.c2s")).await;
    assert_eq!(code, 0, "{err}");
    assert!(!words(after_handshake(&out)).contains(&STDERR_ERROR));
}

#[tokio::test]
async fn worker_copy_from_replayed_gives_nix_the_same_nar() {
    // `nix copy --from ssh-ng://`: BuildPathsWithResults of an opaque path,
    // QueryPathInfo, NarFromPath.
    let f = fixture().await;
    let s2c = capture("worker-copy.1.s2c");
    let start_nar = s2c.windows(13).position(|w| w == b"nix-archive-1").unwrap() - 8;
    let nar = s2c[start_nar..].to_vec();
    let mut info = ValidPathInfo::new(
        p("/nix/store/6x7f2fn34rqy149dlwpjz163gg3sn50p-f3"),
        HashAlgo::Sha256.digest(&nar),
        nar.len() as u64,
    );
    let ca_at = s2c
        .windows(15)
        .position(|w| w == b"fixed:r:sha256:")
        .unwrap();
    info.ca = Some(String::from_utf8(s2c[ca_at..ca_at + 15 + 52].to_vec()).unwrap());
    f.cache
        .ingest(info, &nar[..], crate::cache::Trust::Signed)
        .await
        .unwrap();
    let (out, err, code) = replay(&f.endpoint, DAEMON, &capture("worker-copy.1.c2s")).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with(&nar));
    assert!(!words(after_handshake(&out)).contains(&STDERR_ERROR));
}

#[tokio::test]
async fn worker_store_build_upload_replayed_then_refused_without_builders() {
    // `nix build --store ssh-ng:// --eval-store auto`: the .drv closure comes
    // as AddMultipleToStore (text-addressed .drv files and a source); a
    // store-only endpoint then refuses the build with a protocol error.
    let f = fixture().await;
    let (out, err, code) = replay(&f.endpoint, DAEMON, &capture("worker-store-build.0.c2s")).await;
    assert_eq!(code, 0, "{err}");
    assert!(words(after_handshake(&out)).contains(&STDERR_ERROR));
    for drv in [
        "/nix/store/jxj3i2nzfnbbkc2mfmshbsg85wvkcqwz-capdep.drv",
        "/nix/store/zmy7drxhjh6nzh88nngrfxamihczkcbg-capture-test.drv",
    ] {
        let d = f.endpoint.store.read_drv(&p(drv)).await.unwrap().unwrap();
        assert_eq!(d.platform, "x86_64-linux");
    }
    assert!(
        f.cache
            .path_info(&p("/nix/store/skqpns9cjy9lgapclbwnvvk5z5hyvfdq-capsrc.txt"))
            .await
            .unwrap()
            .unwrap()
            .ca
            .unwrap()
            .starts_with("text:sha256:")
    );
}

#[tokio::test]
async fn worker_client_operations_at_every_version() {
    for minor in [34, 35, 37, 38] {
        let version = farm_nix::wire::ProtocolVersion::new(1, minor);
        let f = fixture().await;
        let s = start(&f.endpoint, DAEMON);
        let mut c = WorkerClient::connect_with_version(s.stdout, s.stdin, version)
            .await
            .unwrap();
        let (dep, dep_nar) = file_path("w-dep", b"dependency\n").await;
        let (mut top, top_nar) =
            file_path("w-top", format!("uses {}\n", dep.path).as_bytes()).await;
        top.references.insert(dep.path.clone());
        let (single, single_nar) = file_path("w-single", b"single\n").await;
        let all: BTreeSet<StorePath> =
            [dep.path.clone(), top.path.clone(), single.path.clone()].into();

        c.set_options(&ClientSettings::default()).await.unwrap();
        assert!(c.query_valid_paths(&all, false).await.unwrap().is_empty());
        assert!(!c.is_valid_path(&dep.path).await.unwrap());
        assert!(
            c.ensure_path(&dep.path).await.is_err(),
            "absent path ensured"
        );
        c.add_multiple_to_store(
            &mut [
                (dep.clone(), &mut &dep_nar[..]),
                (top.clone(), &mut &top_nar[..]),
            ],
            false,
            true,
        )
        .await
        .unwrap();
        c.add_to_store_nar(&single, false, true, &mut &single_nar[..])
            .await
            .unwrap();
        assert_eq!(c.query_valid_paths(&all, false).await.unwrap(), all);
        assert!(c.is_valid_path(&top.path).await.unwrap());
        c.ensure_path(&top.path).await.unwrap();
        c.add_temp_root(&top.path).await.unwrap();
        let info = c.query_path_info(&top.path).await.unwrap().unwrap();
        assert_eq!(info.nar_hash, top.nar_hash);
        assert_eq!(info.references, top.references);
        assert!(info.verify_any(&[f.cache.public_key()]));
        let mut nar = Vec::new();
        c.nar_from_path(&top.path, &mut nar).await.unwrap();
        assert_eq!(nar, top_nar);

        let missing = c
            .query_missing(&[DerivedPath::Opaque(top.path.clone()), {
                let (absent, _) = file_path("w-absent", b"").await;
                DerivedPath::Opaque(absent.path)
            }])
            .await
            .unwrap();
        assert_eq!(missing.unknown.len(), 1);
        assert!(missing.will_build.is_empty());

        // A valid opaque path "builds" as already valid; the farm needs builders for drvs.
        let r = c
            .build_paths_with_results(&[DerivedPath::Opaque(top.path.clone())], BuildMode::Normal)
            .await
            .unwrap();
        assert_eq!(r[0].1.status, BuildStatus::AlreadyValid);
        let drv = p("/nix/store/zmy7drxhjh6nzh88nngrfxamihczkcbg-capture-test.drv");
        let err = c
            .build_paths_with_results(
                &[DerivedPath::Built {
                    drv_path: drv,
                    outputs: OutputsSpec::All,
                }],
                BuildMode::Normal,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not build"), "{err}");
        // The session goes on after an error.
        assert!(c.is_valid_path(&single.path).await.unwrap());
        drop(c);
        assert_eq!(s.done.await.unwrap(), 0, "version {version}");
    }
}

#[tokio::test]
async fn worker_text_files_are_added_as_nix_does() {
    // builtins.toFile "hello" "hello world\n" is this path in Nix 2.8.
    let f = fixture().await;
    let path = f
        .endpoint
        .store
        .add_text("hello", "hello world\n", &BTreeSet::new())
        .await
        .unwrap();
    assert_eq!(
        path.to_string(),
        "/nix/store/w774qnkz4835p5mc4ph97yvci4fg4f5a-hello"
    );
    let mut nar = Vec::new();
    f.endpoint.store.write_nar(&path, &mut nar).await.unwrap();
    let mut restored = Vec::new();
    let summary = farm_nix::nar::copy_nar(
        &mut &nar[..],
        &mut restored,
        &farm_nix::nar::NarLimits::default(),
    )
    .await
    .unwrap();
    assert_eq!(summary.nar_size, nar.len() as u64);
}

#[tokio::test]
async fn worker_garbage_after_the_handshake_ends_the_session_alone() {
    let f = fixture().await;
    let mut input = Vec::new();
    for w in [0x6e69_7863u64, 0x122, 0, 0, 0xdead_beef] {
        input.extend_from_slice(&w.to_le_bytes());
    }
    input.extend_from_slice(&[0xff; 256]);
    let (out, err, code) = replay(&f.endpoint, DAEMON, &input).await;
    assert_eq!(code, 1);
    assert!(words(after_handshake(&out)).contains(&STDERR_ERROR));
    assert!(err.starts_with("error: nix-farm:"), "{err}");

    // Another session on the same endpoint is fine.
    let mut s = start(&f.endpoint, DAEMON);
    let mut c = WorkerClient::connect(s.stdout, s.stdin).await.unwrap();
    let (x, _) = file_path("still-works", b"x\n").await;
    assert!(!c.is_valid_path(&x.path).await.unwrap());
    drop(c);
    assert_eq!(s.done.await.unwrap(), 0);
    let mut e = String::new();
    s.stderr.read_to_string(&mut e).await.unwrap();
    assert!(e.is_empty(), "{e}");
}
