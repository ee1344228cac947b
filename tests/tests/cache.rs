//! The binary cache end to end with real Nix: one actor builds a closure (a
//! directory tree with an executable and a symlink that refers to a dependency,
//! and a multi-output derivation whose outputs refer to each other); its NARs
//! (`nix-store --dump`) and path infos (`nix path-info --json`) are ingested
//! into a `Cache` served over real HTTP on a loopback port; fresh actors then
//! substitute from it with `nix-store --realise` and `nix copy --from`, verify
//! what they got, and an actor trusting another key is refused. Bad uploads of
//! real NARs publish nothing; Range requests and 64 concurrent narinfo lookups
//! are checked over the socket.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use farm_coordinator::cache::{Cache, CacheConfig, Trust};
use farm_coordinator::cache_router;
use farm_nix::hash::HashAlgo;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::signing::SigningKey;
use farm_nix::store_path::StorePath;
use farm_tests::fixture::{dump, path_infos};
use farm_tests::{Actor, TestLogs, deadline_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The closure the builder actor makes. `/bin/*` tools by absolute path:
/// derivations see no PATH.
const CLOSURE_NIX: &str = r#"
let
  sh = script: name: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  dep = sh "echo 'I am the dependency' > $out" "cache-dep";
  tree = sh ''
    /bin/mkdir -p $out/bin $out/share/doc
    printf '#!/bin/sh\necho hello from the cache\n' > $out/bin/hello
    /bin/chmod +x $out/bin/hello
    /bin/ln -s bin/hello $out/hello-link
    echo ${dep} > $out/share/doc/dep-path
    /usr/bin/head -c 10000000 /dev/urandom > $out/share/blob
  '' "cache-tree";
  multi = derivation {
    name = "cache-multi";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = [ "out" "lib" "dev" ];
    args = [ "-c" ''
      /bin/mkdir -p $lib $dev
      echo "lib of multi" > $lib/libmulti
      echo "out uses $lib" > $out
      echo "dev uses $out and $lib" > $dev/include
    '' ];
  };
in [ tree multi.out multi.lib multi.dev ]
"#;

/// A minimal HTTP/1.1 client over a fresh connection: (status, headers, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<(u16, BTreeMap<String, String>, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split])?;
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .context("status line")?
        .parse()?;
    let mut headers = BTreeMap::new();
    for l in lines {
        let (k, v) = l.split_once(':').context("header line")?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    ensure!(
        !headers.contains_key("transfer-encoding"),
        "unexpected chunked response"
    );
    if method != "HEAD" {
        let len: usize = headers
            .get("content-length")
            .context("no content-length")?
            .parse()?;
        ensure!(
            len == body.len(),
            "content-length {len} but {} bytes",
            body.len()
        );
    }
    Ok((status, headers, body))
}

/// Every object under the cache's storage root, relative, from the disk itself.
fn files_under(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out
}

/// Nix's words for "no trusted signature" (realise warns, copy errors).
fn is_signature_refusal(msg: &str) -> bool {
    msg.contains("is not signed by any of the keys") || msg.contains("lacks a valid signature")
}

/// A client actor substituting only from the farm's cache, trusting `key`.
fn client(name: &str, logs: &TestLogs, url: &str, key: &str) -> anyhow::Result<Actor> {
    let actor = Actor::with_logs(name, logs)?;
    actor.nix_conf_append(&format!("substituters = {url}"))?;
    actor.nix_conf_append(&format!("trusted-public-keys = {key}"))?;
    // No stale "absent" answers between steps.
    actor.nix_conf_append("narinfo-cache-negative-ttl = 0")?;
    Ok(actor)
}

#[test]
fn nix_substitutes_a_closure_from_the_cache() -> anyhow::Result<()> {
    let logs = TestLogs::new("cache_e2e")?;
    deadline_async(
        std::time::Duration::from_secs(300),
        &logs,
        |logs| async move { run(&logs).await },
    )
}

async fn run(logs: &TestLogs) -> anyhow::Result<()> {
    // 1. Build the closure in the builder's own store.
    let builder = Actor::with_logs("builder", logs)?;
    let expr = builder.write_file("closure.nix", CLOSURE_NIX)?;
    let roots = builder.nix_build(&expr, &[] as &[&str])?;
    ensure!(roots.len() == 4, "expected 4 outputs, got {roots:?}");
    let infos = path_infos(&builder, &roots)?;
    ensure!(infos.len() == 5, "closure: {infos:?}");
    let by_name: BTreeMap<&str, &ValidPathInfo> =
        infos.iter().map(|i| (i.path.name(), i)).collect();
    let dep = by_name["cache-dep"].path.clone();
    let tree = by_name["cache-tree"].path.clone();
    let out = by_name["cache-multi"].path.clone();
    let lib = by_name["cache-multi-lib"].path.clone();
    let dev = by_name["cache-multi-dev"].path.clone();
    ensure!(by_name["cache-tree"].references.contains(&dep));
    ensure!(by_name["cache-multi"].references.contains(&lib));
    ensure!(by_name["cache-multi-dev"].references.contains(&out));
    ensure!(by_name["cache-multi-dev"].references.contains(&lib));
    ensure!(by_name["cache-tree"].deriver.is_some());
    let nars: BTreeMap<StorePath, Vec<u8>> = infos
        .iter()
        .map(|i| Ok((i.path.clone(), dump(&builder, &i.path)?)))
        .collect::<anyhow::Result<_>>()?;

    // 2. The cache on local disk, served on an ephemeral loopback port.
    let state = tempfile::tempdir()?;
    let root = state.path().join("cache");
    let key = SigningKey::generate("farm-e2e-1")?;
    let cache = Cache::open(CacheConfig::local(&root), key.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(axum::serve(listener, cache_router(cache.clone())).into_future());
    let url = format!("http://{addr}");

    // 3. Bad uploads of a real NAR publish nothing, over HTTP or on disk.
    let dep_info = by_name["cache-dep"];
    let dep_nar = &nars[&dep];
    let tree_nar = &nars[&tree];
    let mut wrong_hash = dep_info.clone();
    wrong_hash.nar_hash = HashAlgo::Sha256.digest(b"something else");
    let mut wrong_size = dep_info.clone();
    wrong_size.nar_size += 1;
    let tree_info = by_name["cache-tree"];
    let attempts: Vec<(&str, ValidPathInfo, &[u8])> = vec![
        ("wrong hash", wrong_hash, &dep_nar[..]),
        ("wrong size", wrong_size, &dep_nar[..]),
        (
            "cut off halfway",
            dep_info.clone(),
            &dep_nar[..dep_nar.len() / 2],
        ),
        (
            "big NAR cut off",
            tree_info.clone(),
            &tree_nar[..tree_nar.len() - 4096],
        ),
        ("another path's NAR", tree_info.clone(), &dep_nar[..]),
    ];
    for (what, claim, bytes) in attempts {
        let path = claim.path.clone();
        match cache.ingest(claim, bytes, Trust::Signed).await {
            Ok(_) => bail!("{what}: the bad upload was accepted"),
            Err(e) => ensure!(e.is_client_error(), "{what}: not a client error: {e}"),
        }
        let (status, _, _) =
            http(addr, "GET", &format!("/{}.narinfo", path.hash_part()), &[]).await?;
        ensure!(
            status == 404,
            "{what}: narinfo visible after a failed upload"
        );
        ensure!(
            files_under(&root).is_empty(),
            "{what}: objects left behind: {:?}",
            files_under(&root)
        );
    }

    // 4. The correct uploads, dependencies first (the cache refuses a
    // reference it does not hold yet).
    let mut ordered: Vec<&ValidPathInfo> = Vec::new();
    while ordered.len() < infos.len() {
        let before = ordered.len();
        for info in &infos {
            let done = |p: &StorePath| p == &info.path || ordered.iter().any(|o| &o.path == p);
            if !ordered.iter().any(|o| o.path == info.path) && info.references.iter().all(done) {
                ordered.push(info);
            }
        }
        ensure!(ordered.len() > before, "the references form a cycle");
    }
    let t = std::time::Instant::now();
    let mut total = 0;
    for info in ordered {
        let published = cache
            .ingest(info.clone(), &nars[&info.path][..], Trust::Signed)
            .await?;
        ensure!(published.verify_any(&[key.verifying_key()]));
        total += info.nar_size;
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "ingested {total} NAR bytes in {secs:.2}s ({:.1} MB/s, debug build)",
        total as f64 / secs / 1e6
    );
    // Again, and concurrently: stored once.
    let before = files_under(&root);
    let again: Vec<_> = (0..4)
        .map(|_| {
            let (cache, info, nar) = (cache.clone(), dep_info.clone(), dep_nar.clone());
            tokio::spawn(async move { cache.ingest(info, &nar[..], Trust::Signed).await })
        })
        .collect();
    for t in again {
        t.await??;
    }
    ensure!(
        files_under(&root) == before,
        "a repeated upload stored more"
    );
    ensure!(
        !before.iter().any(|f| f.starts_with("tmp/")),
        "temporary objects remain: {before:?}"
    );
    ensure!(
        before.len() == 10,
        "5 narinfos and 5 NARs expected: {before:?}"
    );
    let log_drv = by_name["cache-tree"].deriver.clone().context("deriver")?;
    cache
        .put_log(&log_drv, b"building cache-tree\nall good\n")
        .await?;

    let public = key.verifying_key().to_string();
    let all: Vec<String> = infos.iter().map(|i| i.path.to_string()).collect();

    // 5. A fresh client realises the closure from the cache and verifies it.
    let alice = client("alice", logs, &url, &public)?;
    let mut args = vec!["--realise".to_string()];
    args.extend(roots.iter().map(|p| p.to_string()));
    alice.run_async("nix-store", &args).await?;
    for p in &all {
        alice.run_async("nix-store", &["--verify-path", p]).await?;
    }
    let hello = alice
        .run_async(&format!("{tree}/hello-link"), &[] as &[&str])
        .await?;
    ensure!(hello == "hello from the cache\n", "{hello:?}");
    let tree_host = alice.host_path_of(&tree);
    ensure!(std::fs::symlink_metadata(tree_host.join("hello-link"))?.is_symlink());
    ensure!(std::fs::read_link(tree_host.join("hello-link"))? == Path::new("bin/hello"));
    ensure!(
        std::fs::read_to_string(tree_host.join("share/doc/dep-path"))?.trim() == dep.to_string()
    );
    ensure!(
        std::fs::read_to_string(alice.host_path_of(&dev).join("include"))?
            .contains(&lib.to_string())
    );
    ensure!(alice.is_valid_path(&dep)?, "the dependency came along");
    // `nix log` finds the build log in the cache.
    let log = alice.run_async("nix", &["log", &tree.to_string()]).await?;
    ensure!(log.contains("all good"), "nix log printed {log:?}");

    // 6. Another fresh client copies it with `nix copy --from` and `nix store verify`.
    let bob = client("bob", logs, &url, &public)?;
    let mut args = vec!["copy".to_string(), "--from".into(), url.clone()];
    args.extend(roots.iter().map(|p| p.to_string()));
    bob.run_async("nix", &args).await?;
    let mut args = vec![
        "store".to_string(),
        "verify".into(),
        "-r".into(),
        "--sigs-needed".into(),
        "1".into(),
    ];
    args.extend(roots.iter().map(|p| p.to_string()));
    bob.run_async("nix", &args).await?;
    for p in [&dep, &tree, &out, &lib, &dev] {
        ensure!(bob.is_valid_path(p)?, "bob lacks {p}");
    }

    // 7. A client trusting another key refuses every path.
    let other = SigningKey::generate("farm-e2e-1")?
        .verifying_key()
        .to_string();
    let eve = client("eve", logs, &url, &other)?;
    let refused = eve
        .run_async("nix-store", &["--realise", &tree.to_string()])
        .await
        .err()
        .context("eve substituted with an untrusted signature")?;
    eprintln!("realise refused: {refused:#}");
    ensure!(
        is_signature_refusal(&format!("{refused:#}")),
        "refused for another reason: {refused:#}"
    );
    let refused = eve
        .run_async("nix", &["copy", "--from", &url, &out.to_string()])
        .await
        .err()
        .context("eve copied with an untrusted signature")?;
    eprintln!("copy refused: {refused:#}");
    ensure!(
        is_signature_refusal(&format!("{refused:#}")),
        "refused for another reason: {refused:#}"
    );
    for p in [&dep, &tree, &out] {
        ensure!(!eve.is_valid_path(p)?, "eve has {p}");
    }

    // 8. Over the socket: Range requests return the right bytes…
    let ni = cache.narinfo(&tree).context("tree narinfo")?;
    let object = std::fs::read(root.join(&ni.url))?;
    let n = object.len();
    ensure!(n > 1 << 20, "the tree NAR should be large: {n}");
    let target = format!("/{}", ni.url);
    let (status, headers, body) = http(addr, "GET", &target, &[]).await?;
    ensure!(status == 200 && body == object);
    ensure!(headers["content-type"] == "application/x-nix-nar");
    for (range, want) in [
        ("bytes=0-0".to_string(), 0..1),
        ("bytes=1000-1999".into(), 1000..2000),
        (format!("bytes={}-", n - 10), n - 10..n),
        ("bytes=-4096".into(), n - 4096..n),
        (format!("bytes={}-{}", n / 2, n + 5), n / 2..n),
    ] {
        let (status, headers, body) = http(addr, "GET", &target, &[("Range", &range)]).await?;
        ensure!(status == 206, "{range}: {status}");
        ensure!(body == object[want.clone()], "{range}: wrong bytes");
        ensure!(
            headers["content-range"] == format!("bytes {}-{}/{n}", want.start, want.end - 1),
            "{range}: {headers:?}"
        );
    }
    let (status, _, _) = http(addr, "GET", &target, &[("Range", &format!("bytes={n}-"))]).await?;
    ensure!(status == 416);
    let (status, headers, body) =
        http(addr, "HEAD", &format!("/{}.narinfo", tree.hash_part()), &[]).await?;
    ensure!(status == 200 && body.is_empty() && headers["content-type"] == "text/x-nix-narinfo");

    // …and 64 concurrent narinfo lookups all answer correctly.
    let mut expected: Vec<(String, Option<String>)> = infos
        .iter()
        .map(|i| {
            (
                i.path.hash_part().to_string(),
                Some(cache.narinfo(&i.path).unwrap().render()),
            )
        })
        .collect();
    for c in ["0", "1", "2"] {
        expected.push((c.repeat(32), None));
    }
    let expected = Arc::new(expected);
    let lookups: Vec<_> = (0..64)
        .map(|i| {
            let expected = expected.clone();
            tokio::spawn(async move {
                let (hash, want) = &expected[i % expected.len()];
                let (status, _, body) = http(addr, "GET", &format!("/{hash}.narinfo"), &[]).await?;
                match want {
                    Some(text) => ensure!(status == 200 && body == text.as_bytes(), "{hash}"),
                    None => ensure!(status == 404, "{hash}: {status}"),
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for l in lookups {
        l.await??;
    }

    // 9. Paths outside the layout are never served.
    for target in [
        "/nar/..%2F..%2F..%2Fetc%2Fpasswd",
        "/log/..%2F..%2Fetc%2Fpasswd",
        "/tmp/x",
        "/nar/../nix-cache-info",
    ] {
        let (status, _, _) = http(addr, "GET", target, &[]).await?;
        ensure!(status == 404 || status == 400, "{target}: {status}");
    }

    // 10. The cache reopens from disk with the same contents.
    let reopened = Cache::open(CacheConfig::local(&root), key).await?;
    ensure!(reopened.len() == 5);
    ensure!(
        reopened.closure(std::slice::from_ref(&tree)).await? == [tree.clone(), dep.clone()].into()
    );
    server.abort();
    Ok(())
}

/// `nix log` of a build that failed on the farm: a derivation that writes to
/// stderr and exits 1, built with `farm build` by the client, whose Nix then
/// uses the farm's cache as its substituter. Plain `nix log <drv>` and
/// `nix log --store <cache URL> <drv>` both print what the build wrote.
#[test]
fn nix_log_shows_a_failed_farm_build() -> anyhow::Result<()> {
    let logs = TestLogs::new("cache_failed_log")?;
    farm_tests::deadline(std::time::Duration::from_secs(300), &logs, |logs| {
        failed_log(&logs)
    })
}

fn failed_log(logs: &TestLogs) -> anyhow::Result<()> {
    use farm_tests::fixture::{BuilderSpec, Farm};
    let farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "b1",
            max_jobs: 1,
            conf: &[],
        }],
        &[],
    )?;
    farm.wait_for_builders(None, 1)?;
    let salt = farm.client.root().display().to_string();
    let said = format!("the doomed build complains on stderr ({salt})");
    let expr = format!(
        "derivation {{ name = \"doomed\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [ \"-c\" {} ]; }}\n",
        farm_tests::nix_string(&format!("echo stdout line; echo '{said}' >&2; exit 1"))
    );
    let file = farm.client.write_file("doomed.nix", &expr)?;
    let drvs = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    ensure!(drvs.len() == 1, "{drvs:?}");
    let drv = drvs[0].to_string();
    let out = farm.run(None, &["build", &drv])?;
    ensure!(
        out.status.code() == Some(1),
        "the doomed build did not fail: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The log is stored when the build ends: wait until the cache serves it.
    let url = farm.cache_url();
    let http = farm.coordinator.endpoints.http.clone();
    let target = format!("/log/{}", drvs[0].base_name());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let body = {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect(&http)?;
            write!(
                s,
                "GET {target} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
            )?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            raw
        };
        if body.starts_with("HTTP/1.1 200") {
            ensure!(body.contains(&said), "the stored log lacks stderr: {body}");
            break;
        }
        ensure!(
            std::time::Instant::now() < until,
            "the failed build's log was never served: {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // The client's Nix, with the farm's cache as its substituter.
    farm.client
        .nix_conf_append(&format!("extra-substituters = {url}"))?;
    farm.client.nix_conf_append(&format!(
        "extra-trusted-public-keys = {}",
        farm.coordinator.endpoints.cache_public_key
    ))?;
    let log = farm.client.run("nix", &["log", &drv])?;
    ensure!(log.contains(&said), "nix log printed {log:?}");
    ensure!(log.contains("stdout line"), "nix log printed {log:?}");
    let log = farm.client.run("nix", &["log", "--store", &url, &drv])?;
    ensure!(log.contains(&said), "nix log --store printed {log:?}");
    Ok(())
}
