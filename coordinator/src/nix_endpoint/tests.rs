//! Endpoint tests over `tokio::io::duplex`: real Nix 2.8 captures replayed
//! against the endpoint and its real cache (on a temporary directory), and our
//! own protocol clients driving uploads, queries and downloads.

use std::collections::BTreeSet;
use std::path::Path;

use farm_nix::hash::HashAlgo;
use farm_nix::nar::{NarLimits, dump_path};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::serve::ServeClient;
use farm_nix::signing::SigningKey;
use farm_nix::store_path::StorePath;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::Endpoint;
use crate::cache::{Cache, CacheConfig};
use crate::nix_endpoint::ssh::{ClientIdentity, NixProgram, SessionIo};

pub(super) struct Fixture {
    pub endpoint: Endpoint,
    pub cache: Cache,
    _dir: tempfile::TempDir,
}

pub(super) async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(
        CacheConfig::local(dir.path().join("cache")),
        SigningKey::generate("test-farm").unwrap(),
    )
    .await
    .unwrap();
    Fixture {
        endpoint: Endpoint::new(cache.clone(), None),
        cache,
        _dir: dir,
    }
}

pub(super) fn client() -> ClientIdentity {
    ClientIdentity {
        public_key: "ssh-ed25519 AAAAtest".into(),
        fingerprint: "SHA256:test".into(),
        comment: "test@client".into(),
        // Uploads in these tests are published signed.
        level: crate::access::Level::Push,
        forced_command: None,
    }
}

/// A running session: the client's ends of stdin/stdout/stderr, and the exit status.
pub(super) struct Session {
    pub stdin: DuplexStream,
    pub stdout: DuplexStream,
    pub stderr: DuplexStream,
    pub done: tokio::task::JoinHandle<u32>,
}

pub(super) fn start(endpoint: &Endpoint, program: NixProgram) -> Session {
    let (stdin, server_in) = tokio::io::duplex(1 << 16);
    let (server_out, stdout) = tokio::io::duplex(1 << 16);
    let (server_err, stderr) = tokio::io::duplex(1 << 16);
    let io = SessionIo {
        stdin: Box::new(server_in),
        stdout: Box::new(server_out),
        stderr: Box::new(server_err),
    };
    let ep = endpoint.clone();
    let done = tokio::spawn(async move { ep.run_session(program, client(), io).await });
    Session {
        stdin,
        stdout,
        stderr,
        done,
    }
}

/// Feed `input` as the whole of stdin; collect stdout, stderr and the exit status.
pub(super) async fn replay(
    endpoint: &Endpoint,
    program: NixProgram,
    input: &[u8],
) -> (Vec<u8>, String, u32) {
    let s = start(endpoint, program);
    let Session {
        mut stdin,
        mut stdout,
        mut stderr,
        done,
    } = s;
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
        let _ = stdin.shutdown().await;
        // Keep the pipe open until the server is done reading.
        stdin
    });
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    });
    let err_reader = tokio::spawn(async move {
        let mut err = Vec::new();
        let _ = stderr.read_to_end(&mut err).await;
        err
    });
    let code = done.await.unwrap();
    drop(writer.await.unwrap());
    let out = reader.await.unwrap();
    let err = err_reader.await.unwrap();
    (out, String::from_utf8_lossy(&err).into_owned(), code)
}

pub(super) fn capture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../proto/nix/testdata/captures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A store path, its NAR (of a regular file with `contents`) and the info for it.
pub(super) async fn file_path(name: &str, contents: &[u8]) -> (ValidPathInfo, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, contents).unwrap();
    let mut nar = Vec::new();
    let summary = dump_path(&f, &mut nar).await.unwrap();
    let digest = HashAlgo::Sha256.digest(name.as_bytes());
    let mut d = [0u8; 20];
    d.copy_from_slice(&digest.digest()[..20]);
    let path = StorePath::from_digest(&d, name).unwrap();
    (
        ValidPathInfo::new(path, summary.nar_hash, summary.nar_size),
        nar,
    )
}

const SERVE: NixProgram = NixProgram::Serve { write: true };

#[tokio::test]
async fn serve_copy_to_replayed_byte_for_byte() {
    // `nix copy --to ssh://` of Nix 2.8: QueryValidPaths, then AddToStoreNar.
    let f = fixture().await;
    let (out, err, code) = replay(&f.endpoint, SERVE, &capture("serve-copy.0.c2s")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, capture("serve-copy.0.s2c"));
    let p = StorePath::parse("/nix/store/6y22rc8ryfijj8ci7ld6xrqfqx2aabp5-f1").unwrap();
    let info = f.cache.path_info(&p).await.unwrap().expect("uploaded");
    assert_eq!(info.nar_size, 128);
    assert!(info.ca.as_deref().unwrap().starts_with("fixed:r:sha256:"));
    assert!(info.verify_any(&[f.cache.public_key()]));
}

#[tokio::test]
async fn serve_copy_from_replayed_gives_nix_the_same_nar() {
    // `nix copy --from ssh://` of Nix 2.8: QueryPathInfos, QueryClosure, then
    // DumpStorePath. Seed the path from the NAR the real server sent, then
    // compare what we send.
    let f = fixture().await;
    let s2c = capture("serve-copy.1.s2c");
    // The NAR is the tail of the reply, after the path infos.
    let start = s2c.windows(13).position(|w| w == b"nix-archive-1").unwrap() - 8;
    let nar = s2c[start..].to_vec();
    let mut info = ValidPathInfo::new(
        StorePath::parse("/nix/store/r40ns0ck2npd74rrinrdya478ahjv1gz-f2").unwrap(),
        HashAlgo::Sha256.digest(&nar),
        nar.len() as u64,
    );
    info.ca =
        Some("fixed:r:sha256:1b61svgx8jg341mpr2icr71ynvgazjx35fgl1xcs7im04a05l3f1".to_owned());
    f.cache
        .ingest(info.clone(), &nar[..], crate::cache::Trust::Signed)
        .await
        .unwrap();

    let (out, err, code) = replay(&f.endpoint, SERVE, &capture("serve-copy.1.c2s")).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with(&nar), "the NAR Nix got is not the one stored");
    // Parse our QueryPathInfos reply like Nix does and compare with the real one's.
    let ours = farm_nix::serve::read_path_infos(
        &mut &out[16..],
        farm_nix::serve::SERVE_PROTOCOL_VERSION,
        &farm_nix::wire::Limits::default(),
    )
    .await
    .unwrap();
    let theirs = farm_nix::serve::read_path_infos(
        &mut &s2c[16..],
        farm_nix::serve::SERVE_PROTOCOL_VERSION,
        &farm_nix::wire::Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0].path, theirs[0].path);
    assert_eq!(ours[0].nar_hash, theirs[0].nar_hash);
    assert_eq!(ours[0].nar_size, theirs[0].nar_size);
    assert_eq!(ours[0].ca, theirs[0].ca);
    assert_eq!(ours[0].references, theirs[0].references);
}

#[tokio::test]
async fn serve_store_ping_replayed() {
    let f = fixture().await;
    let (out, err, code) = replay(&f.endpoint, SERVE, &capture("serve-copy.2.c2s")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, capture("serve-copy.2.s2c"));
}

#[tokio::test]
async fn serve_upload_query_download_round_trip() {
    let f = fixture().await;
    let s = start(&f.endpoint, SERVE);
    let mut c = ServeClient::connect(s.stdout, s.stdin).await.unwrap();
    let (dep, dep_nar) = file_path("dep", b"a dependency\n").await;
    // It names the dependency in its contents, so the reference scan finds it.
    let (mut top, top_nar) = file_path("top", format!("uses {}\n", dep.path).as_bytes()).await;
    top.references.insert(dep.path.clone());
    top.deriver =
        Some(StorePath::parse("/nix/store/0xfvc2ddwq53x0mcf3bwh5ckf8xya4sw-top.drv").unwrap());
    let both: BTreeSet<StorePath> = [dep.path.clone(), top.path.clone()].into();

    assert!(
        c.query_valid_paths(&both, false, false)
            .await
            .unwrap()
            .is_empty()
    );
    c.add_to_store_nar(&dep, &mut &dep_nar[..]).await.unwrap();
    c.add_to_store_nar(&top, &mut &top_nar[..]).await.unwrap();
    // The same path again is fine (stored once).
    c.add_to_store_nar(&dep, &mut &dep_nar[..]).await.unwrap();
    assert_eq!(
        c.query_valid_paths(&both, false, false).await.unwrap(),
        both
    );

    let infos = c
        .query_path_infos(&[top.path.clone()].into())
        .await
        .unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].nar_hash, top.nar_hash);
    assert_eq!(infos[0].nar_size, top.nar_size);
    assert_eq!(infos[0].references, top.references);
    assert_eq!(infos[0].deriver, top.deriver);
    assert!(infos[0].verify_any(&[f.cache.public_key()]));

    assert_eq!(
        c.query_closure(&[top.path.clone()].into(), false)
            .await
            .unwrap(),
        both
    );
    let mut nar = Vec::new();
    let summary = c.dump_store_path(&top.path, &mut nar).await.unwrap();
    assert_eq!(nar, top_nar);
    assert_eq!(summary.nar_hash, top.nar_hash);
    drop(c);
    assert_eq!(s.done.await.unwrap(), 0);
}

#[tokio::test]
async fn serve_import_paths_ingests_an_export_stream() {
    let f = fixture().await;
    let (a, a_nar) = file_path("imported-a", b"first\n").await;
    let (mut b, b_nar) = file_path("imported-b", format!("uses {}\n", a.path).as_bytes()).await;
    b.references.insert(a.path.clone());
    let mut stream = Vec::new();
    let limits = NarLimits::default();
    farm_nix::export::write_export_entry(
        &mut stream,
        &a.path,
        &a.references,
        None,
        &mut &a_nar[..],
        &limits,
    )
    .await
    .unwrap();
    farm_nix::export::write_export_entry(
        &mut stream,
        &b.path,
        &b.references,
        None,
        &mut &b_nar[..],
        &limits,
    )
    .await
    .unwrap();
    farm_nix::export::finish(&mut stream).await.unwrap();

    let s = start(&f.endpoint, SERVE);
    let mut c = ServeClient::connect(s.stdout, s.stdin).await.unwrap();
    c.import_paths(&mut &stream[..]).await.unwrap();
    let info = f.cache.path_info(&b.path).await.unwrap().expect("imported");
    assert_eq!(info.nar_hash, b.nar_hash);
    assert_eq!(info.references, b.references);
    assert!(f.cache.path_info(&a.path).await.unwrap().is_some());
    let mut nar = Vec::new();
    c.dump_store_path(&a.path, &mut nar).await.unwrap();
    assert_eq!(nar, a_nar);
}

#[tokio::test]
async fn serve_upload_with_a_wrong_hash_is_refused_and_stores_nothing() {
    let f = fixture().await;
    let (mut info, nar) = file_path("liar", b"the truth\n").await;
    info.nar_hash = HashAlgo::Sha256.digest(b"something else");
    let mut s = start(&f.endpoint, SERVE);
    let mut c = ServeClient::connect(s.stdout, s.stdin).await.unwrap();
    assert!(c.add_to_store_nar(&info, &mut &nar[..]).await.is_err());
    drop(c);
    assert_eq!(s.done.await.unwrap(), 1);
    let mut err = String::new();
    s.stderr.read_to_string(&mut err).await.unwrap();
    assert!(err.contains("match"), "{err}");
    assert!(f.cache.path_info(&info.path).await.unwrap().is_none());
}

#[tokio::test]
async fn serve_read_only_session_refuses_uploads() {
    let f = fixture().await;
    let (info, nar) = file_path("ro", b"read only\n").await;
    let mut s = start(&f.endpoint, NixProgram::Serve { write: false });
    let mut c = ServeClient::connect(s.stdout, s.stdin).await.unwrap();
    assert!(c.add_to_store_nar(&info, &mut &nar[..]).await.is_err());
    drop(c);
    assert_eq!(s.done.await.unwrap(), 1);
    let mut err = String::new();
    s.stderr.read_to_string(&mut err).await.unwrap();
    assert!(err.contains("--write"), "{err}");
    assert!(f.cache.path_info(&info.path).await.unwrap().is_none());
}

#[tokio::test]
async fn serve_garbage_after_the_handshake_ends_the_session_with_a_message() {
    let f = fixture().await;
    let mut input = Vec::new();
    input.extend_from_slice(&0x390c_9debu64.to_le_bytes());
    input.extend_from_slice(&0x207u64.to_le_bytes());
    input.extend_from_slice(&0xdead_beefu64.to_le_bytes());
    input.extend_from_slice(&[0xff; 64]);
    let (out, err, code) = replay(&f.endpoint, SERVE, &input).await;
    assert_eq!(code, 1);
    assert_eq!(out.len(), 16, "only the handshake");
    assert!(err.starts_with("error: nix-farm:"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test]
async fn serve_dump_of_an_absent_path_fails_cleanly() {
    let f = fixture().await;
    let (info, _) = file_path("absent", b"nothing\n").await;
    let mut s = start(&f.endpoint, SERVE);
    let mut c = ServeClient::connect(s.stdout, s.stdin).await.unwrap();
    let mut nar = Vec::new();
    assert!(c.dump_store_path(&info.path, &mut nar).await.is_err());
    drop(c);
    assert_eq!(s.done.await.unwrap(), 1);
    let mut err = String::new();
    s.stderr.read_to_string(&mut err).await.unwrap();
    assert!(err.contains("not valid"), "{err}");
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counting<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        r
    }
}

/// A cache that accepts NARs of at most `max_nar_size` bytes.
async fn small_cache(dir: &Path, max_nar_size: u64) -> Cache {
    let mut config = CacheConfig::local(dir.join("cache"));
    config.max_nar_size = max_nar_size;
    Cache::open(config, SigningKey::generate("test-farm").unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn import_paths_over_max_nar_size_is_refused_as_it_spools() {
    const MAX: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let cache = small_cache(dir.path(), MAX).await;
    let store = super::store::FarmStore::new(cache.clone());
    let path =
        |name: &str| StorePath::parse(&format!("/nix/store/{}-{name}", "z".repeat(32))).unwrap();

    // A small path first (imported), then a directory of 64 files of 4 KiB:
    // over the limit in total, every file under it.
    let (small, small_nar) = file_path("import-small", b"fits\n").await;
    let tree = tempfile::tempdir().unwrap();
    for i in 0..64 {
        std::fs::write(tree.path().join(format!("f{i:02}")), vec![b'x'; 4096]).unwrap();
    }
    let mut stream = Vec::new();
    let limits = NarLimits::default();
    farm_nix::export::write_export_entry(
        &mut stream,
        &small.path,
        &BTreeSet::new(),
        None,
        &mut &small_nar[..],
        &limits,
    )
    .await
    .unwrap();
    let big = path("import-big");
    let big_summary = farm_nix::export::write_export_entry_from_path(
        &mut stream,
        &big,
        &BTreeSet::new(),
        None,
        tree.path(),
    )
    .await
    .unwrap();
    farm_nix::export::finish(&mut stream).await.unwrap();
    assert!(big_summary.nar_size > 4 * MAX);

    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut counted = Counting {
        inner: &stream[..],
        read: read.clone(),
    };
    let e = store.import(&mut counted, &limits).await.unwrap_err();
    assert!(
        e.message.contains("larger than the farm's cache accepts")
            && e.message.contains(&MAX.to_string()),
        "{}",
        e.message
    );
    let read = read.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        read < small_nar.len() as u64 + MAX + 8192,
        "read {read} bytes of a {}-byte stream: the spool was not bounded",
        stream.len()
    );
    assert!(
        cache.narinfo(&small.path).is_some(),
        "the path before it was imported"
    );
    assert!(cache.narinfo(&big).is_none());

    // One file announcing a terabyte: refused at its header, before its bytes
    // (there are none: the stream ends right after the size).
    let mut header = Vec::new();
    for t in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        header.extend_from_slice(&(t.len() as u64).to_le_bytes());
        header.extend_from_slice(t);
        header.resize(header.len().div_ceil(8) * 8, 0);
    }
    header.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut stream = 1u64.to_le_bytes().to_vec();
    stream.extend_from_slice(&header);
    let e = store.import(&mut &stream[..], &limits).await.unwrap_err();
    assert!(
        e.message.contains("larger than the farm's cache accepts"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn serve_import_paths_over_max_nar_size_fails_the_session_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cache = small_cache(dir.path(), 16 << 10).await;
    let endpoint = Endpoint::new(cache.clone(), None);
    let (big, big_nar) = file_path("import-too-big", &vec![b'y'; 100 << 10]).await;
    let mut stream = Vec::new();
    farm_nix::export::write_export_entry(
        &mut stream,
        &big.path,
        &BTreeSet::new(),
        None,
        &mut &big_nar[..],
        &NarLimits::default(),
    )
    .await
    .unwrap();
    farm_nix::export::finish(&mut stream).await.unwrap();

    let mut s = start(&endpoint, SERVE);
    let mut c = ServeClient::connect(s.stdout, s.stdin).await.unwrap();
    assert!(c.import_paths(&mut &stream[..]).await.is_err());
    drop(c);
    assert_eq!(s.done.await.unwrap(), 1);
    let mut err = String::new();
    s.stderr.read_to_string(&mut err).await.unwrap();
    assert!(
        err.contains("larger than the farm's cache accepts") && err.contains("max_nar_size"),
        "{err}"
    );
    assert!(cache.is_empty());
}
