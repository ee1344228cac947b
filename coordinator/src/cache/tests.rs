//! Unit tests of the cache over an in-memory and a local object store, with NARs
//! that real `nix-store --dump` produced.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use farm_nix::hash::HashAlgo;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::signing::SigningKey;
use farm_nix::store_path::StorePath;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use tokio::io::AsyncReadExt;

use super::*;

/// A directory tree with a file, an executable and a symlink, as `nix-store --dump` serialises it.
pub(crate) fn sample_nar(seed: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("data.txt"), format!("hello {seed}\n").repeat(500)).unwrap();
    let exe = root.join("bin/run");
    std::fs::write(&exe, format!("#!/bin/sh\necho {seed}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("bin/run", root.join("link")).unwrap();
    nix_dump(&root)
}

/// As [`sample_nar`], with a file naming `refs`, so that the reference scan finds them.
pub(crate) fn nar_with_refs(seed: &str, refs: &[&StorePath]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("data.txt"), format!("hello {seed}\n")).unwrap();
    let mut text = String::new();
    for r in refs {
        text.push_str(&format!("{r}\n"));
    }
    std::fs::write(root.join("refs"), text).unwrap();
    nix_dump(&root)
}

/// Put `paths` into the cache's index as if they were published (no
/// objects): for tests that need many references present.
fn pretend_published(cache: &Cache, paths: &BTreeSet<StorePath>) {
    let mut index = cache.inner.index.write().unwrap();
    for p in paths {
        let info = ValidPathInfo::new(p.clone(), HashAlgo::Sha256.digest(b""), 1);
        index.insert(
            p.hash_part().to_string(),
            super::Published::new(Arc::new(NarInfo {
                info,
                url: "nar/none.nar.zst".into(),
                compression: "zstd".into(),
                file_hash: None,
                file_size: None,
            })),
        );
    }
}

/// Incompressible bytes, so that a NAR holding them stays larger than one
/// upload chunk after zstd and goes up as a multipart upload.
fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

pub(crate) fn nix_dump(path: &Path) -> Vec<u8> {
    let out = std::process::Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("nix-store runs");
    assert!(out.status.success(), "nix-store --dump failed: {:?}", out);
    out.stdout
}

fn sp(hash_char: char, name: &str) -> StorePath {
    StorePath::parse(&format!(
        "/nix/store/{}-{name}",
        hash_char.to_string().repeat(32)
    ))
    .unwrap()
}

fn claim(path: &StorePath, nar: &[u8]) -> ValidPathInfo {
    ValidPathInfo::new(path.clone(), HashAlgo::Sha256.digest(nar), nar.len() as u64)
}

fn key() -> SigningKey {
    SigningKey::generate("farm-test-1").unwrap()
}

async fn memory_cache() -> Cache {
    let config = CacheConfig::local("/nonexistent-unused");
    Cache::with_store(config, Arc::new(InMemory::new()), key())
        .await
        .unwrap()
}

async fn objects(cache: &Cache) -> BTreeSet<String> {
    cache
        .object_store()
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

async fn read_all(mut r: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.unwrap();
    v
}

#[tokio::test]
async fn ingest_publishes_signed_narinfo_and_nar() {
    let cache = memory_cache().await;
    let dep = sp('1', "dep");
    let top = sp('2', "top");
    let dep_nar = sample_nar("dep");
    let top_nar = nar_with_refs("top", &[&dep]);

    let dep_info = cache
        .ingest(claim(&dep, &dep_nar), &dep_nar[..], Trust::Signed)
        .await
        .unwrap();
    let mut top_claim = claim(&top, &top_nar);
    top_claim.references = [dep.clone(), top.clone()].into();
    top_claim.deriver = Some(sp('3', "top.drv"));
    top_claim.sigs.insert("someone:bogus".into());
    let top_info = cache
        .ingest(top_claim.clone(), &top_nar[..], Trust::Signed)
        .await
        .unwrap();

    // Our signature replaces the uploader's, and verifies.
    assert_eq!(top_info.sigs.len(), 1);
    assert!(top_info.verify_any(&[cache.public_key()]));
    assert!(dep_info.verify_any(&[cache.public_key()]));
    assert!(!top_info.verify_any(&[key().verifying_key()]));
    assert_eq!(top_info.references, top_claim.references);
    assert_eq!(top_info.deriver, top_claim.deriver);

    let objs = objects(&cache).await;
    assert_eq!(objs.len(), 4, "{objs:?}");
    assert!(objs.contains(&format!("{}.narinfo", top.hash_part())));
    assert!(objs.iter().all(|o| !o.starts_with("tmp/")));

    // The stored narinfo is the one served, and names a NAR object that exists.
    let ni = cache.narinfo(&top).unwrap();
    assert_eq!(ni.compression, "zstd");
    let stored = cache
        .object_store()
        .get(&ObjectPath::from(format!("{}.narinfo", top.hash_part())))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(std::str::from_utf8(&stored).unwrap(), ni.render());
    let compressed = cache
        .object_store()
        .get(&ObjectPath::from(ni.url.as_str()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(Some(compressed.len() as u64), ni.file_size);
    assert_eq!(Some(HashAlgo::Sha256.digest(&compressed)), ni.file_hash);
    assert_eq!(zstd::decode_all(&compressed[..]).unwrap(), top_nar);

    // Queries.
    let reader = cache.nar_reader(&top).await.unwrap().unwrap();
    assert_eq!(read_all(reader).await, top_nar);
    let absent = sp('4', "absent");
    assert!(cache.nar_reader(&absent).await.unwrap().is_none());
    assert_eq!(
        cache
            .valid_paths(&[dep.clone(), absent.clone(), top.clone()])
            .await
            .unwrap(),
        [dep.clone(), top.clone()].into()
    );
    assert_eq!(cache.path_info(&top).await.unwrap().unwrap(), top_info);
    assert_eq!(cache.path_info(&absent).await.unwrap(), None);
    // Same hash part, other name: not the same path.
    assert_eq!(cache.path_info(&sp('2', "other")).await.unwrap(), None);
    assert_eq!(
        cache.closure(&[top.clone(), absent.clone()]).await.unwrap(),
        [dep.clone(), top.clone()].into()
    );
    assert_eq!(
        cache.closure(std::slice::from_ref(&dep)).await.unwrap(),
        [dep].into()
    );
}

async fn assert_nothing_published(cache: &Cache, expect: &BTreeSet<String>) {
    assert_eq!(
        &objects(cache).await,
        expect,
        "a failed upload left objects behind"
    );
}

/// Every file under `dir`, relative (object_store's listing hides a local
/// store's in-progress staging files; the disk does not).
fn files_on_disk(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn bad_uploads_publish_nothing_in_memory() {
    bad_uploads_publish_nothing_and_a_good_one_follows(memory_cache().await, None).await;
}

#[tokio::test]
async fn bad_uploads_publish_nothing_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let cache = Cache::open(CacheConfig::local(&root), key()).await.unwrap();
    bad_uploads_publish_nothing_and_a_good_one_follows(cache, Some(&root)).await;
    assert_eq!(files_on_disk(&root).len(), 4, "{:?}", files_on_disk(&root));
}

async fn bad_uploads_publish_nothing_and_a_good_one_follows(cache: Cache, disk: Option<&Path>) {
    let assert_nothing_published = async |cache: &Cache, expect: &BTreeSet<String>| {
        assert_nothing_published(cache, expect).await;
        if let Some(root) = disk {
            assert_eq!(&files_on_disk(root), expect, "files left on disk");
        }
    };
    let path = sp('5', "victim");
    let nar = sample_nar("victim");
    let other = sample_nar("other");
    let empty = BTreeSet::new();

    // Wrong hash (the NAR of something else, same size claim of that).
    let mut c = claim(&path, &nar);
    c.nar_hash = HashAlgo::Sha256.digest(&other);
    let e = cache.ingest(c, &nar[..], Trust::Signed).await.unwrap_err();
    assert!(matches!(e, CacheError::HashMismatch { .. }), "{e}");
    assert!(e.is_client_error());
    assert_nothing_published(&cache, &empty).await;

    // Claimed size too small: the stream is cut at the claim.
    let mut c = claim(&path, &nar);
    c.nar_size -= 8;
    let e = cache.ingest(c, &nar[..], Trust::Signed).await.unwrap_err();
    assert!(e.is_client_error(), "{e}");
    assert_nothing_published(&cache, &empty).await;

    // Claimed size too large.
    let mut c = claim(&path, &nar);
    c.nar_size += 8;
    let e = cache.ingest(c, &nar[..], Trust::Signed).await.unwrap_err();
    assert!(matches!(e, CacheError::SizeMismatch { .. }), "{e}");
    assert_nothing_published(&cache, &empty).await;

    // Cut off halfway.
    let half = &nar[..nar.len() / 2];
    let e = cache
        .ingest(claim(&path, &nar), half, Trust::Signed)
        .await
        .unwrap_err();
    assert!(matches!(e, CacheError::BadNar { .. }), "{e}");
    assert_nothing_published(&cache, &empty).await;

    // Malformed: a claim that matches garbage bytes exactly.
    let mut garbage = nar.clone();
    garbage[8..21].copy_from_slice(b"nix-archive-2");
    let e = cache
        .ingest(claim(&path, &garbage), &garbage[..], Trust::Signed)
        .await
        .unwrap_err();
    assert!(matches!(e, CacheError::BadNar { .. }), "{e}");
    assert_nothing_published(&cache, &empty).await;

    // Bad claims are refused before reading.
    let mut c = claim(&path, &nar);
    c.ca = Some("fixed:r:sha256:abc\nSig: evil".into());
    assert!(matches!(
        cache.ingest(c, &nar[..], Trust::Signed).await.unwrap_err(),
        CacheError::InvalidClaim { .. }
    ));
    let mut c = claim(&path, &nar);
    c.nar_hash = HashAlgo::Sha1.digest(&nar);
    assert!(matches!(
        cache.ingest(c, &nar[..], Trust::Signed).await.unwrap_err(),
        CacheError::InvalidClaim { .. }
    ));
    assert!(cache.is_empty());

    // A larger-than-one-chunk upload that breaks off late also leaves nothing.
    let big_dir = tempfile::tempdir().unwrap();
    let big_file = big_dir.path().join("big");
    let data = random_bytes(12_000_000);
    std::fs::write(&big_file, &data).unwrap();
    let big_nar = nix_dump(&big_file);
    let cut = &big_nar[..big_nar.len() - 100];
    let big = sp('6', "big");
    let e = cache
        .ingest(claim(&big, &big_nar), cut, Trust::Signed)
        .await
        .unwrap_err();
    assert!(matches!(e, CacheError::BadNar { .. }), "{e}");
    assert_nothing_published(&cache, &empty).await;

    // Now the correct uploads succeed.
    cache
        .ingest(claim(&path, &nar), &nar[..], Trust::Signed)
        .await
        .unwrap();
    cache
        .ingest(claim(&big, &big_nar), &big_nar[..], Trust::Signed)
        .await
        .unwrap();
    assert_eq!(objects(&cache).await.len(), 4);
    let back = read_all(cache.nar_reader(&big).await.unwrap().unwrap()).await;
    assert!(back == big_nar, "big NAR round trip differs");
}

#[tokio::test]
async fn same_path_twice_or_concurrently_is_stored_once() {
    let cache = memory_cache().await;
    let path = sp('7', "twice");
    let nar = sample_nar("twice");
    let first = cache
        .ingest(claim(&path, &nar), &nar[..], Trust::Signed)
        .await
        .unwrap();
    let again = cache
        .ingest(claim(&path, &nar), &nar[..], Trust::Signed)
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(objects(&cache).await.len(), 2);

    // A second upload of a present path is still checked.
    let mut c = claim(&path, &nar);
    c.nar_size += 1;
    assert!(cache.ingest(c, &nar[..], Trust::Signed).await.is_err());

    // Sixteen concurrent uploads of a fresh path: all succeed with one result.
    let path = sp('8', "racy");
    let nar = Arc::new(sample_nar("racy"));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (cache, path, nar) = (cache.clone(), path.clone(), nar.clone());
            tokio::spawn(async move {
                cache
                    .ingest(claim(&path, &nar), &nar[..], Trust::Signed)
                    .await
            })
        })
        .collect();
    let mut results = BTreeSet::new();
    for t in tasks {
        let info = t.await.unwrap().unwrap();
        results.insert(info.fingerprint() + &info.sigs.iter().cloned().collect::<String>());
    }
    assert_eq!(results.len(), 1);
    assert_eq!(objects(&cache).await.len(), 4);
}

#[tokio::test]
async fn identical_nars_of_two_paths_share_one_object() {
    let cache = memory_cache().await;
    let nar = sample_nar("same");
    let (a, b) = (sp('a', "a"), sp('b', "b"));
    cache
        .ingest(claim(&a, &nar), &nar[..], Trust::Signed)
        .await
        .unwrap();
    cache
        .ingest(claim(&b, &nar), &nar[..], Trust::Signed)
        .await
        .unwrap();
    assert_eq!(
        cache.narinfo(&a).unwrap().url,
        cache.narinfo(&b).unwrap().url
    );
    assert_eq!(objects(&cache).await.len(), 3);
}

#[tokio::test]
async fn local_store_reopens_with_its_index_and_sweeps_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig::local(dir.path().join("cache"));
    let k = key();
    let path = sp('c', "persist");
    let nar = sample_nar("persist");
    let info = {
        let cache = Cache::open(config.clone(), k.clone()).await.unwrap();
        cache
            .ingest(claim(&path, &nar), &nar[..], Trust::Signed)
            .await
            .unwrap()
    };
    // An upload a crash interrupted.
    let leftover = dir.path().join("cache/tmp/xyz.nar.zst");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, b"partial").unwrap();
    // A local store's multipart staging file (object_store's listing hides those).
    let staging = dir.path().join("cache/tmp/abc.nar.zst#1");
    std::fs::write(&staging, b"partial").unwrap();
    // Garbage beside the narinfos is ignored, not fatal.
    std::fs::write(dir.path().join("cache/junk.narinfo"), b"not a narinfo").unwrap();

    let cache = Cache::open(config, k).await.unwrap();
    assert!(!leftover.exists());
    assert!(!staging.exists());
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.path_info(&path).await.unwrap(), Some(info));
    let back = read_all(cache.nar_reader(&path).await.unwrap().unwrap()).await;
    assert_eq!(back, nar);
}

#[tokio::test]
async fn logs_round_trip_compressed() {
    let cache = memory_cache().await;
    let drv = sp('d', "hello.drv");
    let log = b"building...\nbuilt\n".repeat(1000);
    assert_eq!(cache.get_log(&drv).await.unwrap(), None);
    cache.put_log(&drv, &log).await.unwrap();
    assert_eq!(cache.get_log(&drv).await.unwrap(), Some(log.clone()));
    let objs = objects(&cache).await;
    let stored = cache
        .object_store()
        .get(&ObjectPath::from(format!("log/{}", drv.base_name())))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        stored.len() < log.len() / 10,
        "log stored uncompressed? {objs:?}"
    );
    assert!(matches!(
        cache.put_log(&sp('f', "hello"), b"x").await.unwrap_err(),
        CacheError::NotADerivation { .. }
    ));
}

#[tokio::test]
async fn config_is_checked() {
    let mut config = CacheConfig::local("/unused");
    config.zstd_level = 40;
    assert!(matches!(
        Cache::with_store(config, Arc::new(InMemory::new()), key()).await,
        Err(CacheError::Config(_))
    ));
    let c: CacheConfig =
        toml::from_str("zstd_level = 9\n[storage]\ntype = \"local\"\nroot = \"/var/cache\"\n")
            .unwrap();
    assert_eq!(c.zstd_level, 9);
    assert_eq!(c.priority, 30);
    assert!(c.want_mass_query);
}

#[tokio::test]
async fn storage_failures_are_server_errors_and_publish_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let cache = Cache::open(CacheConfig::local(&root), key()).await.unwrap();
    // Make every temporary upload fail: `tmp` is a file, not a directory.
    std::fs::write(root.join("tmp"), b"in the way").unwrap();

    let small = sample_nar("small");
    let big_dir = tempfile::tempdir().unwrap();
    let data = random_bytes(10_000_000);
    std::fs::write(big_dir.path().join("big"), &data).unwrap();
    let big = nix_dump(&big_dir.path().join("big"));
    for (path, nar) in [(sp('g', "small"), &small), (sp('h', "big"), &big)] {
        let e = cache
            .ingest(claim(&path, nar), &nar[..], Trust::Signed)
            .await
            .unwrap_err();
        assert!(
            !e.is_client_error(),
            "{path}: storage failure blamed on the client: {e}"
        );
        assert_eq!(e.http_status(), 500);
        assert!(cache.narinfo(&path).is_none());
        assert_eq!(files_on_disk(&root), ["tmp".to_string()].into());
    }

    std::fs::remove_file(root.join("tmp")).unwrap();
    let path = sp('h', "big");
    cache
        .ingest(claim(&path, &big), &big[..], Trust::Signed)
        .await
        .unwrap();
    assert!(cache.narinfo(&path).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_ingest_leaves_nothing_and_releases_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let cache = Cache::open(CacheConfig::local(&root), key()).await.unwrap();
    let big_dir = tempfile::tempdir().unwrap();
    let data = random_bytes(12_000_000);
    std::fs::write(big_dir.path().join("big"), &data).unwrap();
    let big = Arc::new(nix_dump(&big_dir.path().join("big")));
    let path = sp('i', "cancelled");

    // The uploader sends 10 MB, then stalls; the connection is then dropped.
    let (mut w, r) = tokio::io::duplex(1 << 16);
    let feed = big.clone();
    let feeder = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        w.write_all(&feed[..10_000_000]).await.unwrap();
        std::future::pending::<()>().await;
    });
    let task = {
        let (cache, path, big) = (cache.clone(), path.clone(), big.clone());
        tokio::spawn(async move { cache.ingest(claim(&path, &big), r, Trust::Signed).await })
    };
    let in_flight = |root: &Path| {
        files_on_disk(root)
            .into_iter()
            .any(|f| f.starts_with("tmp/"))
    };
    let mut waited = 0;
    while !in_flight(&root) {
        assert!(waited < 200, "the upload never reached the disk");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 1;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    feeder.abort();
    let mut waited = 0;
    while !files_on_disk(&root).is_empty() {
        assert!(waited < 100, "left behind: {:?}", files_on_disk(&root));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(cache.narinfo(&path).is_none());
    // The path's lock was released with the cancelled ingest.
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        cache.ingest(claim(&path, &big), &big[..], Trust::Signed),
    )
    .await
    .expect("the path stayed locked")
    .unwrap();
}

#[tokio::test]
async fn exact_ingest_refuses_trailing_bytes() {
    let cache = memory_cache().await;
    let path = sp('7', "trailing");
    let nar = sample_nar("trailing");
    let mut with_junk = nar.clone();
    with_junk.extend_from_slice(b"junk");
    let e = cache
        .ingest_exact(claim(&path, &nar), &with_junk[..], Trust::Signed)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CacheError::BadNar {
                source: NarError::TrailingBytes,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(cache.is_empty(), "nothing published");
    assert!(
        objects(&cache).await.is_empty(),
        "{:?}",
        objects(&cache).await
    );
    // the streaming ingest (the SSH worker path) leaves what follows unread
    let mut rest = &with_junk[..];
    cache
        .ingest(claim(&path, &nar), &mut rest, Trust::Signed)
        .await
        .unwrap();
    assert_eq!(rest, b"junk");
    // once stored, an exact re-upload with trailing bytes is still refused
    let e = cache
        .ingest_exact(claim(&path, &nar), &with_junk[..], Trust::Signed)
        .await
        .unwrap_err();
    assert!(matches!(e, CacheError::BadNar { .. }), "{e:?}");
    cache
        .ingest_exact(claim(&path, &nar), &nar[..], Trust::Signed)
        .await
        .unwrap();
}

/// `n` distinct store paths whose names are `name_len` characters long.
fn many_paths(n: usize, name_len: usize) -> BTreeSet<StorePath> {
    let alphabet = farm_nix::nixbase32::ALPHABET;
    (0..n)
        .map(|i| {
            let mut hash = String::with_capacity(32);
            let mut x = i;
            for _ in 0..32 {
                hash.push(alphabet[x % 32] as char);
                x /= 32;
            }
            let name = format!("{i}-{}", "r".repeat(name_len));
            StorePath::parse(&format!("/nix/store/{hash}-{}", &name[..name_len])).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_narinfo_over_4_mib_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig::local(dir.path().join("cache"));
    let k = key();
    let path = sp('k', "many-refs");
    let refs = many_paths(80_000, 60);
    let nar = nar_with_refs("many-refs", &refs.iter().collect::<Vec<_>>());
    let mut c = claim(&path, &nar);
    c.references = refs.clone();
    let info = {
        let cache = Cache::open(config.clone(), k.clone()).await.unwrap();
        pretend_published(&cache, &refs);
        cache.ingest(c, &nar[..], Trust::Signed).await.unwrap()
    };
    let on_disk = std::fs::metadata(
        dir.path()
            .join(format!("cache/{}.narinfo", path.hash_part())),
    )
    .unwrap()
    .len();
    assert!(on_disk > 5 << 20, "the narinfo is {on_disk} bytes");

    let cache = Cache::open(config, k).await.unwrap();
    assert_eq!(cache.len(), 1, "the big narinfo was loaded again");
    assert_eq!(cache.path_info(&path).await.unwrap(), Some(info));
    assert!(
        cache
            .path_info(&path)
            .await
            .unwrap()
            .unwrap()
            .verify_any(&[cache.public_key()])
    );
    let back = read_all(cache.nar_reader(&path).await.unwrap().unwrap()).await;
    assert_eq!(back, nar);
}

#[tokio::test]
async fn a_narinfo_the_index_could_not_load_is_refused_before_reading() {
    let cache = memory_cache().await;
    let path = sp('l', "too-many-refs");
    let nar = sample_nar("too-many-refs");
    let mut c = claim(&path, &nar);
    // 140 000 references with the longest names: over 32 MiB of narinfo.
    c.references = many_paths(140_000, farm_nix::store_path::MAX_NAME_LEN);
    // Nothing is read: the stream would fail if it were.
    let e = cache
        .ingest(c, tokio::io::empty(), Trust::Signed)
        .await
        .expect_err("a narinfo over the limit");
    let CacheError::InvalidClaim { reason, .. } = &e else {
        panic!("{e:?}");
    };
    assert!(reason.contains("narinfo would be"), "{reason}");
    assert!(e.is_client_error());
    assert!(cache.is_empty());
    assert!(objects(&cache).await.is_empty());
}

/// Records every fsync the durable store makes, with what was visible at that
/// moment: whether the watched path's narinfo existed on disk and whether the
/// cache's index (what acknowledgements and `verify_outputs` read) had it.
struct RecordingFsync {
    root: std::path::PathBuf,
    events: std::sync::Mutex<Vec<String>>,
    watch: std::sync::Mutex<Option<(Cache, StorePath)>>,
}

impl std::fmt::Debug for RecordingFsync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordingFsync")
    }
}

impl RecordingFsync {
    fn note(&self, kind: &str, p: &Path) {
        let rel = match p.strip_prefix(&self.root) {
            Ok(r) if r.as_os_str().is_empty() => ".".to_string(),
            Ok(r) => r.display().to_string(),
            Err(_) => "<outside>".to_string(),
        };
        let mut line = format!("{kind} {rel}");
        if let Some((cache, path)) = self.watch.lock().unwrap().as_ref() {
            let written = self
                .root
                .join(format!("{}.narinfo", path.hash_part()))
                .exists();
            let visible = cache.narinfo(path).is_some();
            line.push_str(&format!(" narinfo={written} visible={visible}"));
        }
        self.events.lock().unwrap().push(line);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

impl durable::Fsync for RecordingFsync {
    fn file(&self, path: &Path) -> std::io::Result<()> {
        durable::OsFsync.file(path)?;
        self.note("file", path);
        Ok(())
    }
    fn dir(&self, path: &Path) -> std::io::Result<()> {
        durable::OsFsync.dir(path)?;
        self.note("dir", path);
        Ok(())
    }
}

fn position(events: &[String], prefix: &str) -> usize {
    events
        .iter()
        .position(|e| e.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {events:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nar_then_narinfo_are_durable_before_the_upload_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    std::fs::create_dir_all(&root).unwrap();
    let root = std::fs::canonicalize(&root).unwrap();
    let fsync = Arc::new(RecordingFsync {
        root: root.clone(),
        events: Default::default(),
        watch: Default::default(),
    });
    let local = object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap();
    let store =
        durable::DurableLocal::with_fsync(&root, Arc::new(local), "tmp", fsync.clone()).unwrap();
    let cache = Cache::with_store(CacheConfig::local(&root), Arc::new(store), key())
        .await
        .unwrap();

    // A small NAR (one put) and one larger than an upload chunk (multipart).
    let big_dir = tempfile::tempdir().unwrap();
    std::fs::write(big_dir.path().join("big"), random_bytes(10_000_000)).unwrap();
    let big = nix_dump(&big_dir.path().join("big"));
    let small = sample_nar("durable");
    for (path, nar) in [(sp('m', "durable"), &small), (sp('n', "durable-big"), &big)] {
        *fsync.watch.lock().unwrap() = Some((cache.clone(), path.clone()));
        fsync.take();
        let info = cache
            .ingest(claim(&path, nar), &nar[..], Trust::Signed)
            .await
            .unwrap();
        // The acknowledgement: what the uploader (and verify_outputs) now sees.
        assert!(cache.narinfo(&path).is_some());
        let ni = cache.narinfo(&path).unwrap();
        assert_eq!(info.path, path);
        let events = fsync.take();
        assert!(
            !events.iter().any(|e| e.contains(" tmp")),
            "scratch objects are not synced: {events:#?}"
        );
        let nar_file = position(&events, &format!("file {}", ni.url));
        let nar_dir = position(&events, "dir nar ");
        let narinfo_file = position(&events, &format!("file {}.narinfo", path.hash_part()));
        let root_dir = narinfo_file + 1 + position(&events[narinfo_file + 1..], "dir . ");
        assert!(
            nar_file < nar_dir && nar_dir < narinfo_file && narinfo_file < root_dir,
            "NAR file, NAR dir, narinfo file, root dir: {events:#?}"
        );
        for e in &events[..narinfo_file] {
            assert!(
                e.ends_with("narinfo=false visible=false"),
                "the narinfo was written before its NAR was durable: {events:#?}"
            );
        }
        for e in &events[narinfo_file..=root_dir] {
            assert!(
                e.ends_with("narinfo=true visible=false"),
                "the path was visible before its narinfo was durable: {events:#?}"
            );
        }
    }
    // The cache a coordinator opens on a local directory goes through it too.
    let opened = Cache::open(CacheConfig::local(dir.path().join("other")), key())
        .await
        .unwrap();
    assert!(
        opened
            .object_store()
            .to_string()
            .starts_with("DurableLocal("),
        "{}",
        opened.object_store()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upload_does_not_hold_the_path_and_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::local(dir.path().join("cache"));
    config.upload_grace_secs = 10;
    config.upload_min_rate = 0;
    let cache = Cache::open(config, key()).await.unwrap();
    let path = sp('p', "hostage");
    let claimed_by_client = sample_nar("the client's claim");
    let built = sample_nar("what the builder built");

    // The client claims the path and trickles: most of its NAR, then a byte
    // every 100 ms. The pipe is small, so the first write returning means the
    // ingest has taken those bytes.
    let (mut w, r) = tokio::io::duplex(64);
    let feed = claimed_by_client.clone();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    let feeder = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let half = feed.len() / 2;
        w.write_all(&feed[..half]).await.unwrap();
        let _ = sent_tx.send(());
        for b in &feed[half..] {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if w.write_all(std::slice::from_ref(b)).await.is_err() {
                return;
            }
        }
    });
    let trickle = {
        let (cache, path, nar) = (cache.clone(), path.clone(), claimed_by_client.clone());
        tokio::spawn(async move { cache.ingest(claim(&path, &nar), r, Trust::Signed).await })
    };
    sent_rx.await.unwrap();

    // The builder's upload of the same path goes through at once.
    let info = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        cache.ingest(claim(&path, &built), &built[..], Trust::Signed),
    )
    .await
    .expect("the builder's upload hangs")
    .unwrap();
    assert!(
        !trickle.is_finished(),
        "the builder's upload waited for the trickling one"
    );
    assert_eq!(info.nar_hash, HashAlgo::Sha256.digest(&built));

    // The trickler is cut off at its deadline, with an error that says so.
    let e = tokio::time::timeout(std::time::Duration::from_secs(60), trickle)
        .await
        .expect("the trickling upload never ends")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(e, CacheError::UploadTimedOut { limit_secs: 10, .. }),
        "{e:?}"
    );
    assert!(e.is_client_error());
    assert!(e.to_string().contains("timed out"), "{e}");
    feeder.abort();

    // The cache holds the builder's NAR, and nothing of the trickler's.
    let back = read_all(cache.nar_reader(&path).await.unwrap().unwrap()).await;
    assert!(back == built, "the cache serves the client's bytes");
    let mut waited = 0;
    while files_on_disk(&dir.path().join("cache"))
        .iter()
        .any(|f| f.starts_with("tmp/"))
    {
        assert!(
            waited < 100,
            "{:?}",
            files_on_disk(&dir.path().join("cache"))
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 1;
    }
    assert_eq!(objects(&cache).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slower_of_two_uploads_discards_its_object() {
    // Two uploads of one path with different (each self-consistent) NARs: a
    // slow one starts first, a fast one overtakes it. The first to finish
    // publishes; the other, still checked, returns what was published and
    // leaves nothing behind.
    let cache = memory_cache().await;
    let path = sp('q', "two-builds");
    let slow_nar = sample_nar("slow build");
    let fast_nar = sample_nar("fast build");
    let (mut w, r) = tokio::io::duplex(64);
    let feed = slow_nar.clone();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    let feeder = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (head, tail) = feed.split_at(feed.len() - 512);
        w.write_all(head).await.unwrap();
        let _ = sent_tx.send(());
        for chunk in tail.chunks(64) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            w.write_all(chunk).await.unwrap();
        }
    });
    let slow = {
        let (cache, path, nar) = (cache.clone(), path.clone(), slow_nar.clone());
        tokio::spawn(async move { cache.ingest(claim(&path, &nar), r, Trust::Signed).await })
    };
    sent_rx.await.unwrap();
    let fast = cache
        .ingest(claim(&path, &fast_nar), &fast_nar[..], Trust::Signed)
        .await
        .unwrap();
    assert!(!slow.is_finished(), "the slow upload was not overtaken");
    let slow = slow.await.unwrap().unwrap();
    feeder.await.unwrap();
    assert_eq!(slow, fast, "the slower upload returns what was published");
    assert_eq!(fast.nar_hash, HashAlgo::Sha256.digest(&fast_nar));
    let back = read_all(cache.nar_reader(&path).await.unwrap().unwrap()).await;
    assert!(back == fast_nar);
    assert_eq!(
        objects(&cache).await.len(),
        2,
        "{:?}",
        objects(&cache).await
    );

    // A superseded upload is still checked against its own claim.
    let path = sp('r', "checked");
    let good = sample_nar("good");
    cache
        .ingest(claim(&path, &good), &good[..], Trust::Signed)
        .await
        .unwrap();
    let mut bad = claim(&path, &good);
    bad.nar_hash = HashAlgo::Sha256.digest(b"something else");
    assert!(matches!(
        cache
            .ingest(bad, &good[..], Trust::Signed)
            .await
            .unwrap_err(),
        CacheError::HashMismatch { .. }
    ));
}

#[test]
fn upload_limits_have_defaults_and_read_from_toml() {
    let c = CacheConfig::local("/x");
    assert_eq!(c.upload_grace_secs, 120);
    assert_eq!(c.upload_min_rate, 64 << 10);
    let c: CacheConfig = toml::from_str(
        "upload_grace_secs = 5\nupload_min_rate = 1000\n[storage]\ntype = \"local\"\nroot = \"/x\"\n",
    )
    .unwrap();
    assert_eq!((c.upload_grace_secs, c.upload_min_rate), (5, 1000));
}

fn alice() -> Trust {
    Trust::Claim {
        owner: "SHA256:alice/key+fingerprint".into(),
    }
}
const ALICE: &str = "SHA256:alice/key+fingerprint";
const BOB: &str = "SHA256:bob";

async fn narinfo_object(cache: &Cache, hash_part: &str) -> Vec<u8> {
    cache
        .object_store()
        .get(&ObjectPath::from(format!("{hash_part}.narinfo")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn another_name_under_a_published_hash_part_is_refused() {
    let cache = memory_cache().await;
    let foo = sp('5', "foo");
    let bar = sp('5', "bar");
    let foo_nar = sample_nar("foo");
    cache
        .ingest(claim(&foo, &foo_nar), &foo_nar[..], Trust::Signed)
        .await
        .unwrap();
    let before = objects(&cache).await;
    let signed = narinfo_object(&cache, foo.hash_part()).await;

    let bar_nar = sample_nar("bar");
    for trust in [Trust::Signed, alice()] {
        let e = cache
            .ingest(claim(&bar, &bar_nar), &bar_nar[..], trust)
            .await
            .unwrap_err();
        match &e {
            CacheError::HashPartTaken { path, existing } => {
                assert_eq!((path, existing), (&bar, &foo));
            }
            other => panic!("expected HashPartTaken, got {other:?}"),
        }
        assert!(e.is_client_error());
        let msg = e.to_string();
        assert!(
            msg.contains(&bar.to_string()) && msg.contains(&foo.to_string()),
            "{msg}"
        );
    }
    // The same name again, other bytes: the first upload stays.
    let other = sample_nar("foo, other bytes");
    let kept = cache
        .ingest(claim(&foo, &other), &other[..], Trust::Signed)
        .await
        .unwrap();
    assert_eq!(kept.nar_hash, HashAlgo::Sha256.digest(&foo_nar));
    assert_eq!(objects(&cache).await, before);
    assert_eq!(narinfo_object(&cache, foo.hash_part()).await, signed);
    assert!(cache.narinfo(&bar).is_none());
    assert_eq!(cache.claims_len(), 0);
}

#[tokio::test]
async fn of_two_racing_names_under_one_hash_part_exactly_one_publishes() {
    for _ in 0..5 {
        let cache = memory_cache().await;
        let foo = sp('6', "foo");
        let bar = sp('6', "bar");
        // Large enough that both are streaming when the other publishes.
        let foo_nar = nar_of_random_file(3 << 20);
        let bar_nar = nar_of_random_file(3 << 20);
        // Pipes, so both ingests pass the early check and stream side by
        // side: the publish lock decides.
        let feed = |nar: Vec<u8>| {
            let (mut w, r) = tokio::io::duplex(64 << 10);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = w.write_all(&nar).await;
            });
            r
        };
        let (a, b) = tokio::join!(
            cache.ingest(claim(&foo, &foo_nar), feed(foo_nar.clone()), Trust::Signed),
            cache.ingest(claim(&bar, &bar_nar), feed(bar_nar.clone()), Trust::Signed),
        );
        let (winner, loser_err) = match (a, b) {
            (Ok(w), Err(e)) | (Err(e), Ok(w)) => (w, e),
            other => panic!("expected one winner, got {other:?}"),
        };
        assert!(
            matches!(loser_err, CacheError::HashPartTaken { ref existing, .. } if *existing == winner.path),
            "{loser_err:?}"
        );
        assert_eq!(cache.len(), 1);
        let objs = objects(&cache).await;
        assert_eq!(objs.len(), 2, "one narinfo and one NAR: {objs:?}");
        assert_eq!(
            cache.narinfo_by_hash(foo.hash_part()).unwrap().info.path,
            winner.path
        );
    }
}

fn nar_of_random_file(n: usize) -> Vec<u8> {
    farm_nix::nar::nar_of_bytes(&random_bytes(n))
}

#[tokio::test]
async fn references_must_occur_in_the_nar_and_be_in_the_cache() {
    let cache = memory_cache().await;
    let dep = sp('7', "dep");
    let dep_nar = sample_nar("dep");
    cache
        .ingest(claim(&dep, &dep_nar), &dep_nar[..], Trust::Signed)
        .await
        .unwrap();
    let before = objects(&cache).await;
    let top = sp('8', "top");
    let absent = sp('9', "absent");

    // In the cache, but the NAR never names it.
    let plain = sample_nar("top");
    let mut c = claim(&top, &plain);
    c.references = [dep.clone()].into();
    for trust in [Trust::Signed, alice()] {
        match cache.ingest(c.clone(), &plain[..], trust).await {
            Err(CacheError::BadReference {
                reference, reason, ..
            }) => {
                assert_eq!(reference, dep);
                assert!(reason.contains("does not occur in its NAR"), "{reason}");
            }
            other => panic!("expected BadReference, got {other:?}"),
        }
    }
    // Named in the NAR, but not in the cache: refused before reading.
    let naming = nar_with_refs("top", &[&dep, &absent]);
    let mut c = claim(&top, &naming);
    c.references = [dep.clone(), absent.clone()].into();
    match cache.ingest(c, tokio::io::empty(), Trust::Signed).await {
        Err(e @ CacheError::BadReference { .. }) => {
            assert!(e.to_string().contains(&absent.to_string()), "{e}");
            assert!(e.to_string().contains("not in the cache"), "{e}");
        }
        other => panic!("expected BadReference, got {other:?}"),
    }
    assert_eq!(objects(&cache).await, before);
    assert!(cache.narinfo(&top).is_none());

    // A self-reference needs neither; a reference found and present passes.
    let good = nar_with_refs("top", &[&dep]);
    let mut c = claim(&top, &good);
    c.references = [dep.clone(), top.clone()].into();
    let info = cache.ingest(c, &good[..], Trust::Signed).await.unwrap();
    assert_eq!(info.references, [dep, top].into());
}

#[tokio::test]
async fn a_claim_is_unsigned_and_seen_only_by_its_owner() {
    let cache = memory_cache().await;
    let p = sp('a', "claimed");
    let nar = sample_nar("claimed");
    let info = cache
        .ingest(claim(&p, &nar), &nar[..], alice())
        .await
        .unwrap();
    assert!(info.sigs.is_empty(), "never signed");
    assert_eq!(cache.len(), 0);
    assert_eq!(cache.claims_len(), 1);
    // Not published: not for HTTP, not for anyone else.
    assert!(cache.narinfo(&p).is_none());
    assert!(cache.narinfo_by_hash(p.hash_part()).is_none());
    assert!(
        cache
            .valid_paths(std::slice::from_ref(&p))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(cache.path_info(&p).await.unwrap().is_none());
    assert!(cache.nar_reader(&p).await.unwrap().is_none());
    assert!(
        cache
            .closure(std::slice::from_ref(&p))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(cache.path_info_for(BOB, &p).await.unwrap().is_none());
    assert!(
        cache
            .valid_paths_for(BOB, std::slice::from_ref(&p))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(cache.nar_reader_for(BOB, &p).await.unwrap().is_none());
    // Its owner sees it.
    assert_eq!(
        cache
            .valid_paths_for(ALICE, std::slice::from_ref(&p))
            .await
            .unwrap(),
        [p.clone()].into()
    );
    assert_eq!(cache.path_info_for(ALICE, &p).await.unwrap(), Some(info));
    let back = read_all(cache.nar_reader_for(ALICE, &p).await.unwrap().unwrap()).await;
    assert_eq!(back, nar);
    // Stored apart from the published objects.
    let objs = objects(&cache).await;
    assert_eq!(objs.len(), 2, "{objs:?}");
    assert!(objs.iter().all(|o| o.starts_with("claims/")), "{objs:?}");

    // The owner's later uploads may build on it, as claims too; a trusted
    // upload, or another client's, may not reference it.
    let top = sp('b', "top");
    let top_nar = nar_with_refs("top", &[&p]);
    let mut c = claim(&top, &top_nar);
    c.references = [p.clone()].into();
    let top_info = cache
        .ingest(c.clone(), &top_nar[..], alice())
        .await
        .unwrap();
    assert!(top_info.sigs.is_empty());
    assert_eq!(
        cache
            .closure_for(ALICE, std::slice::from_ref(&top))
            .await
            .unwrap(),
        [p.clone(), top.clone()].into()
    );
    for trust in [Trust::Signed, Trust::Claim { owner: BOB.into() }] {
        let e = cache
            .ingest(c.clone(), &top_nar[..], trust)
            .await
            .unwrap_err();
        assert!(matches!(e, CacheError::BadReference { .. }), "{e:?}");
    }
    assert_eq!(cache.len(), 0);
}

#[tokio::test]
async fn a_claim_never_blocks_or_replaces_a_signed_path() {
    let cache = memory_cache().await;
    let foo = sp('c', "foo");
    let bar = sp('c', "bar");
    let bar_nar = sample_nar("bar");
    // A claim first, under the hash part a signed path will take.
    cache
        .ingest(claim(&bar, &bar_nar), &bar_nar[..], alice())
        .await
        .unwrap();
    // The owner's own claims: first writer wins there too.
    let foo_nar = sample_nar("foo");
    let e = cache
        .ingest(claim(&foo, &foo_nar), &foo_nar[..], alice())
        .await
        .unwrap_err();
    assert!(matches!(e, CacheError::HashPartTaken { .. }), "{e:?}");
    // A signed upload is not in its way.
    let signed = cache
        .ingest(claim(&foo, &foo_nar), &foo_nar[..], Trust::Signed)
        .await
        .unwrap();
    assert!(signed.verify_any(&[cache.public_key()]));
    assert_eq!(cache.narinfo(&foo).unwrap().info, signed);
    // The signed path now hides the claim, for its owner too.
    assert!(cache.path_info_for(ALICE, &bar).await.unwrap().is_none());
    assert_eq!(
        cache.path_info_for(ALICE, &foo).await.unwrap(),
        Some(signed.clone())
    );
    // Claiming a signed path returns the signed info; another name is refused.
    let again = cache
        .ingest(claim(&foo, &foo_nar), &foo_nar[..], alice())
        .await
        .unwrap();
    assert_eq!(again, signed);
    let e = cache
        .ingest(claim(&bar, &bar_nar), &bar_nar[..], alice())
        .await
        .unwrap_err();
    assert!(matches!(e, CacheError::HashPartTaken { .. }), "{e:?}");

    // The same path, claimed then uploaded signed: published normally.
    let same = sp('d', "same");
    let same_nar = sample_nar("same");
    cache
        .ingest(claim(&same, &same_nar), &same_nar[..], alice())
        .await
        .unwrap();
    let signed = cache
        .ingest(claim(&same, &same_nar), &same_nar[..], Trust::Signed)
        .await
        .unwrap();
    assert!(signed.verify_any(&[cache.public_key()]));
    assert_eq!(cache.path_info(&same).await.unwrap(), Some(signed));
}

#[tokio::test]
async fn verified_paths_are_signed_whoever_uploads_them() {
    use farm_nix::content_address::{ContentAddress, make_fixed_output_path, make_text_path};
    let cache = memory_cache().await;
    // A flat fixed-output path, checked against its bytes.
    let hash = HashAlgo::Sha256.digest(b"hello");
    let fixed = make_fixed_output_path("hello", false, &hash, &BTreeSet::new(), None).unwrap();
    let nar = farm_nix::nar::nar_of_bytes(b"hello");
    let mut c = claim(&fixed, &nar);
    c.ca = Some(
        ContentAddress::Fixed {
            recursive: false,
            hash,
        }
        .to_string(),
    );
    let info = cache.ingest(c, &nar[..], alice()).await.unwrap();
    assert!(info.verify_any(&[cache.public_key()]), "signed");
    assert!(cache.narinfo(&fixed).is_some(), "published");

    // A text path referencing a signed path: signed. Referencing the
    // owner's claim: the owner's claim, as its closure is not all signed.
    let claimed = sp('h', "claimed");
    let claimed_nar = sample_nar("claimed");
    cache
        .ingest(claim(&claimed, &claimed_nar), &claimed_nar[..], alice())
        .await
        .unwrap();
    for (dep, signed) in [(&fixed, true), (&claimed, false)] {
        let text = format!("uses {dep}\n");
        let h = HashAlgo::Sha256.digest(text.as_bytes());
        let refs: BTreeSet<StorePath> = [dep.clone()].into();
        let path = make_text_path("t", &h, &refs).unwrap();
        let nar = farm_nix::nar::nar_of_bytes(text.as_bytes());
        let mut c = claim(&path, &nar);
        c.references = refs;
        c.ca = Some(ContentAddress::Text(h).to_string());
        let info = cache.ingest(c, &nar[..], alice()).await.unwrap();
        assert_eq!(info.verify_any(&[cache.public_key()]), signed, "{dep}");
        assert_eq!(cache.narinfo(&path).is_some(), signed);
        assert!(cache.path_info_for(ALICE, &path).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn claims_are_loaded_again_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig::local(dir.path().join("cache"));
    let k = key();
    let p = sp('f', "claimed");
    let q = sp('g', "signed");
    let nar = sample_nar("claimed");
    let q_nar = sample_nar("signed");
    let info = {
        let cache = Cache::open(config.clone(), k.clone()).await.unwrap();
        cache
            .ingest(claim(&q, &q_nar), &q_nar[..], Trust::Signed)
            .await
            .unwrap();
        cache
            .ingest(claim(&p, &nar), &nar[..], alice())
            .await
            .unwrap()
    };
    // Something that is not a claims directory is left alone.
    std::fs::create_dir_all(dir.path().join("cache/claims/not-an-owner")).unwrap();
    std::fs::write(
        dir.path().join("cache/claims/not-an-owner/x.narinfo"),
        "junk",
    )
    .unwrap();
    let cache = Cache::open(config, k).await.unwrap();
    assert_eq!((cache.len(), cache.claims_len()), (1, 1));
    assert_eq!(cache.path_info_for(ALICE, &p).await.unwrap(), Some(info));
    assert!(cache.path_info(&p).await.unwrap().is_none());
    assert!(cache.path_info_for(BOB, &p).await.unwrap().is_none());
    let back = read_all(cache.nar_reader_for(ALICE, &p).await.unwrap().unwrap()).await;
    assert_eq!(back, nar);
}
