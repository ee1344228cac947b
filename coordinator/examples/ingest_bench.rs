//! Stage breakdown of cache ingest (prints figures, asserts nothing):
//! `cargo run --release -p farm-coordinator --example ingest_bench [DIR]`.
//!
//! Builds the push case's mixed tree (64 × 4 MiB random files, 2000 text
//! files of growing size, a copy of `/usr/share/doc`; as `bench/src/push.rs`)
//! unless DIR names a tree to use, serialises it to one NAR in memory, then
//! times each stage of ingest alone on that NAR (sha256, the NAR parse with
//! its sha256, the reference scan, zstd at levels 1 and 3, sha256 of the
//! compressed bytes) and whole ingests (`Cache::ingest_exact`, local storage
//! with fsync, under a temporary directory) at each zstd level in
//! `FARM_BENCH_LEVELS` (default `1,3`).

use std::io::Write as _;
use std::time::Instant;

use farm_coordinator::cache::{Cache, CacheConfig, Trust};
use farm_nix::hash::HashAlgo;
use farm_nix::nar::{NarLimits, copy_nar, dump_path};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::references::RefScanner;
use farm_nix::signing::SigningKey;
use farm_nix::store_path::StorePath;

fn make_tree(dir: &std::path::Path) -> std::io::Result<()> {
    let random = dir.join("random");
    std::fs::create_dir_all(&random)?;
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut buf = vec![0u8; 4 << 20];
    for i in 0..64 {
        std::io::Read::read_exact(&mut urandom, &mut buf)?;
        std::fs::write(random.join(format!("r{i:02}.bin")), &buf)?;
    }
    let text = dir.join("text");
    std::fs::create_dir_all(&text)?;
    for i in 0..2000usize {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(text.join(format!("t{i:04}.txt")))?);
        let (mut written, mut line) = (0, 0);
        while written < 45 * i {
            let l = format!("file {i} line {line}: the quick brown fox jumps over the lazy dog\n");
            f.write_all(l.as_bytes())?;
            written += l.len();
            line += 1;
        }
        f.flush()?;
    }
    let st = std::process::Command::new("cp")
        .args(["-a", "/usr/share/doc"])
        .arg(dir.join("doc"))
        .status()?;
    assert!(st.success(), "cp -a /usr/share/doc failed");
    Ok(())
}

fn report(stage: &str, bytes: usize, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!(
        "| {stage} | {:.0} ms | {:.0} MB/s |",
        s * 1e3,
        bytes as f64 / 1e6 / s
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let tree = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            let t = scratch.path().join("push-tree");
            make_tree(&t)?;
            t
        }
    };
    let mut nar = Vec::new();
    dump_path(&tree, &mut nar).await?;
    let n = nar.len();
    println!("NAR of {:.1} MB\n", n as f64 / 1e6);
    println!("| stage (alone, one thread, NAR in memory) | time | NAR rate |");
    println!("|---|---|---|");

    let t = Instant::now();
    let nar_hash = HashAlgo::Sha256.digest(&nar);
    report("sha256", n, t);

    let t = Instant::now();
    let limits = NarLimits::default();
    copy_nar(&mut &nar[..], &mut tokio::io::sink(), &limits).await?;
    report("NAR parse + its sha256 (copy_nar into a sink)", n, t);

    let path = StorePath::from_base_name("0123456789abcdfghijklmnpqrsvwxyz-push-tree")?;
    let absent = StorePath::from_base_name("zyxwvsrqpnmlkjihgfdcba9876543210-other")?;
    let t = Instant::now();
    let mut scan = RefScanner::new([&absent]);
    for c in nar.chunks(64 << 10) {
        scan.update(c);
    }
    report("reference scan (one absent candidate)", n, t);

    for level in [1, 3] {
        let t = Instant::now();
        let z = zstd::bulk::compress(&nar, level)?;
        report(
            &format!(
                "zstd level {level} (→ {:.1} MB, {:.1} %)",
                z.len() as f64 / 1e6,
                100.0 * z.len() as f64 / n as f64
            ),
            n,
            t,
        );
        let t = Instant::now();
        HashAlgo::Sha256.digest(&z);
        report(&format!("sha256 of the level-{level} output"), n, t);
    }

    let levels = std::env::var("FARM_BENCH_LEVELS").unwrap_or_else(|_| "1,3".into());
    println!("\n| whole ingest (Cache::ingest_exact, local storage, fsync) | time | NAR rate |");
    println!("|---|---|---|");
    for level in levels.split(',') {
        let level: i32 = level.trim().parse()?;
        let root = scratch.path().join(format!("cache-{level}"));
        let mut config = CacheConfig::local(&root);
        config.zstd_level = level;
        let cache = Cache::open(config, SigningKey::generate("bench-1")?).await?;
        let claimed = ValidPathInfo {
            path: path.clone(),
            deriver: None,
            nar_hash: nar_hash.clone(),
            references: Default::default(),
            registration_time: 0,
            nar_size: n as u64,
            ultimate: false,
            sigs: Default::default(),
            ca: None,
        };
        let t = Instant::now();
        cache.ingest_exact(claimed, &nar[..], Trust::Signed).await?;
        let (_, file) = cache.sizes();
        report(
            &format!("ingest, zstd level {level} (→ {:.1} MB)", file as f64 / 1e6),
            n,
            t,
        );
    }
    Ok(())
}
