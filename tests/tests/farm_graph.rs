//! The farm builds a whole graph: a coordinator and three builders, each with
//! its own store — two x86_64-linux builders with different max-jobs, and one
//! that also advertises `aarch64-darwin` (Nix `extra-platforms`) and the
//! `big-parallel` feature. The client uploads a 35-derivation graph's `.drv`
//! closure (and a source) and submits it over gRPC. Checked: every output is in
//! the cache and signed, a fresh client substitutes the top output's closure
//! from the HTTP cache, each derivation ran exactly once (the farm's events and
//! an independent witness file the builds append to agree), the darwin and
//! big-parallel ones ran only on the builder that advertises them, and both
//! x86_64 builders did work.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use farm_nix::hash::HashAlgo;
use farm_nix::narinfo::NarInfo;
use farm_nix::signing::VerifyingKey;
use farm_nix::store_path::StorePath;
use farm_proto::v1::BuildOutcome;
use farm_tests::fixture::*;
use farm_tests::{Actor, TestLogs, deadline_async};

/// Layers of plain derivations and their width.
const LAYERS: usize = 5;
const WIDTH: usize = 6;

/// The three builders: (name, max-jobs, nix.conf lines).
fn builders() -> Vec<BuilderSpec<'static>> {
    vec![
        BuilderSpec {
            name: "x86-a",
            max_jobs: 1,
            conf: &["system-features ="],
        },
        BuilderSpec {
            name: "x86-b",
            max_jobs: 3,
            conf: &["system-features ="],
        },
        BuilderSpec {
            name: "mac",
            max_jobs: 2,
            conf: &[
                "extra-platforms = aarch64-darwin",
                "system-features = big-parallel",
            ],
        },
    ]
}

/// The graph: a source; `LAYERS` layers of `WIDTH` nodes, each depending on
/// two nodes of the layer below (layer 0 on the source); a `big-parallel`
/// node, an `aarch64-darwin` node, a three-output node, a fixed-output node;
/// and a top depending on the last layer and every special one. Every output
/// names its dependencies, so the top's closure is every output and the source.
fn graph(witness: &std::path::Path, fixed_word: &str) -> (String, Vec<String>) {
    let mut b: Vec<(String, String)> = Vec::new();
    let mut names = Vec::new();
    b.push((
        "src".into(),
        "builtins.path { path = ./graph-src.txt; name = \"graph-src\"; }".into(),
    ));
    for l in 0..LAYERS {
        for i in 0..WIDTH {
            let name = format!("g-{l}-{i}");
            let deps = if l == 0 {
                "[ src ]".to_string()
            } else {
                format!("[ n{}_{} n{}_{} ]", l - 1, i, l - 1, (i + 1) % WIDTH)
            };
            b.push((
                format!("n{l}_{i}"),
                format!("mk {} \"echo {name} $deps > $out\" {deps}", lit(&name)),
            ));
            names.push(name);
        }
    }
    b.push((
        "big".into(),
        "mkWith { requiredSystemFeatures = [ \"big-parallel\" ]; } \"g-big\" \
         \"echo big $deps > $out\" [ n1_0 ]"
            .into(),
    ));
    b.push((
        "darwin".into(),
        "mkWith { system = \"aarch64-darwin\"; } \"g-darwin\" \
         \"echo darwin $deps > $out\" [ n2_1 ]"
            .into(),
    ));
    b.push((
        "multi".into(),
        "mkWith { outputs = [ \"out\" \"lib\" \"dev\" ]; } \"g-multi\" \
         \"/bin/mkdir $lib $dev; echo lib $deps > $lib/lib; echo out $lib > $out; \
         echo dev $out $lib > $dev/dev\" [ n0_3 ]"
            .into(),
    ));
    // `fixed_word` is a plain word: `echo` writes it and a newline.
    let hash = HashAlgo::Sha256
        .digest(format!("{fixed_word}\n").as_bytes())
        .to_base16();
    b.push((
        "fixed".into(),
        format!(
            "mkWith {{ outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; \
             outputHash = \"{hash}\"; }} \"g-fixed\" \"echo {fixed_word} > $out\" []"
        ),
    ));
    let last: Vec<String> = (0..WIDTH).map(|i| format!("n{}_{i}", LAYERS - 1)).collect();
    b.push((
        "top".into(),
        format!(
            "mk \"g-top\" \"echo top $deps > $out\" [ {} big darwin multi.out multi.lib multi.dev fixed ]",
            last.join(" ")
        ),
    ));
    names.extend(["g-big", "g-darwin", "g-multi", "g-fixed", "g-top"].map(String::from));
    (graph_nix(witness, &b, &["top"]), names)
}

#[test]
fn three_builders_build_a_graph_once_each_into_the_signed_cache() -> anyhow::Result<()> {
    let logs = TestLogs::new("farm_graph")?;
    deadline_async(DEADLINE, &logs, |logs| async move {
        three_builders_build_a_graph_once_each_into_the_signed_cache_run(&logs).await
    })
}

async fn three_builders_build_a_graph_once_each_into_the_signed_cache_run(
    logs: &TestLogs,
) -> anyhow::Result<()> {
    let farm = Farm::start(logs, &builders(), &[])?;
    // Unique per run, so the fixed output is not shared with other runs.
    let fixed_word = format!(
        "fixed-output-{}",
        farm.witness_dir()
            .file_name()
            .and_then(|n| n.to_str())
            .context("witness dir name")?
    );
    assert!(
        fixed_word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    );
    let (nix, names) = graph(farm.witness_dir(), &fixed_word);
    farm.client
        .write_file("graph-src.txt", "the graph's source\n")?;
    let file = farm.client.write_file("graph.nix", &nix)?;
    let roots = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    let [top_drv] = roots.as_slice() else {
        anyhow::bail!("expected one root, got {roots:?}");
    };
    let uploaded = farm.upload_closure(&roots).await?;
    assert_eq!(
        uploaded,
        names.len() + 1,
        "every .drv and the source are uploaded"
    );

    let started = std::time::Instant::now();
    let mut events = farm.submit(&roots).await?;
    let done = events.done(GRAPH_TIMEOUT).await?;
    let elapsed = started.elapsed();
    let log = events.render();
    assert!(done.success, "{log}");
    assert_eq!(done.built as usize, names.len(), "{log}");
    assert_eq!(done.failed, 0, "{log}");

    // Each derivation: exactly one start and one finish, built.
    let mut starts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in events.started() {
        starts
            .entry(drv_name(&s.drv_path))
            .or_default()
            .push(s.builder.clone());
    }
    let mut finishes: BTreeMap<String, Vec<(BuildOutcome, String)>> = BTreeMap::new();
    let mut outputs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for f in events.finished() {
        finishes
            .entry(drv_name(&f.drv_path))
            .or_default()
            .push((outcome(f), f.builder.clone()));
        outputs.insert(
            drv_name(&f.drv_path),
            f.outputs.clone().into_iter().collect(),
        );
    }
    let expected: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(
        starts.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{log}"
    );
    assert_eq!(
        finishes.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{log}"
    );
    for name in &names {
        assert_eq!(starts[name].len(), 1, "{name} started once: {log}");
        let f = &finishes[name];
        assert_eq!(f.len(), 1, "{name} finished once: {log}");
        assert_eq!(f[0].0, BuildOutcome::Built, "{name}: {log}");
        assert_eq!(f[0].1, starts[name][0], "{name} finished where it started");
    }

    // The witness: what actually ran, and where, from the builds themselves.
    let witness = farm.witness_lines()?;
    let mut ran: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, builder) in &witness {
        ran.entry(name.clone()).or_default().push(builder.clone());
    }
    assert_eq!(
        ran.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{witness:?}"
    );
    for (name, where_) in &ran {
        assert_eq!(where_.len(), 1, "{name} ran exactly once: {where_:?}");
        assert_eq!(
            where_[0], starts[name][0],
            "{name} ran where the farm says it did"
        );
    }
    assert_eq!(
        ran["g-darwin"],
        ["mac"],
        "only mac advertises aarch64-darwin"
    );
    assert_eq!(ran["g-big"], ["mac"], "only mac has big-parallel");
    let per_builder = |b: &str| ran.values().filter(|w| w[0] == b).count();
    assert!(per_builder("x86-a") > 0, "x86-a did work: {ran:?}");
    assert!(per_builder("x86-b") > 0, "x86-b did work: {ran:?}");

    // Every output is in the cache with a valid signature by the farm's key.
    let http = farm.coordinator.endpoints.http.clone();
    let key = VerifyingKey::parse(&farm.coordinator.endpoints.cache_public_key)?;
    let mut all_outputs: BTreeSet<StorePath> = BTreeSet::new();
    for (name, outs) in &outputs {
        let want = if name == "g-multi" { 3 } else { 1 };
        assert_eq!(outs.len(), want, "{name} outputs {outs:?}");
        for path in outs.values() {
            let path = StorePath::parse(path)?;
            let (status, body) = http_get(&http, &format!("/{}.narinfo", path.hash_part())).await?;
            assert_eq!(status, 200, "{path} is in the cache");
            let info = NarInfo::parse(std::str::from_utf8(&body)?)
                .with_context(|| format!("narinfo of {path}"))?;
            assert_eq!(info.info.path, path);
            let fingerprint = info.info.fingerprint();
            assert!(
                info.info.sigs.iter().any(|s| key.verify(&fingerprint, s)),
                "{path} is signed by {}: {:?}",
                key.name(),
                info.info.sigs
            );
            all_outputs.insert(path);
        }
    }
    assert_eq!(
        all_outputs.len(),
        names.len() + 2,
        "multi has three outputs"
    );

    // A fresh client with only the farm's cache as substituter realises the
    // top output: its whole closure comes from the cache, signatures checked.
    let top_out = StorePath::parse(&outputs["g-top"]["out"])?;
    let fresh = Actor::with_logs("fresh-client", logs)?;
    fresh.nix_conf_append(&format!(
        "substituters = {}",
        farm.coordinator.endpoints.http_url()
    ))?;
    fresh.nix_conf_append(&format!(
        "trusted-public-keys = {}",
        farm.coordinator.endpoints.cache_public_key
    ))?;
    fresh.nix_conf_append("require-sigs = true")?;
    fresh.run("nix-store", &["--realise", &top_out.to_string()])?;
    let closure: BTreeSet<StorePath> = fresh.closure(&top_out)?.into_iter().collect();
    let mut want = all_outputs.clone();
    let src = closure
        .iter()
        .find(|p| p.name() == "graph-src")
        .context("the source is in the top's closure")?
        .clone();
    want.insert(src.clone());
    assert_eq!(
        closure, want,
        "the top's closure is every output and the source"
    );
    fresh.run("nix-store", &["--verify-path", &top_out.to_string()])?;
    assert_eq!(
        std::fs::read_to_string(fresh.host_path_of(&src))?,
        "the graph's source\n"
    );
    let fixed_out = StorePath::parse(&outputs["g-fixed"]["out"])?;
    assert_eq!(
        std::fs::read_to_string(fresh.host_path_of(&fixed_out))?,
        format!("{fixed_word}\n")
    );
    let top_text = std::fs::read_to_string(fresh.host_path_of(&top_out))?;
    assert!(top_text.starts_with("top "), "{top_text}");
    for out in all_outputs.iter().filter(|p| p.name().starts_with("g-4-")) {
        assert!(top_text.contains(&out.to_string()), "{top_text}");
    }
    assert!(!top_drv.to_string().is_empty());
    eprintln!(
        "farm_graph: {} derivations built in {elapsed:?} (x86-a {}, x86-b {}, mac {})",
        names.len(),
        per_builder("x86-a"),
        per_builder("x86-b"),
        per_builder("mac")
    );
    Ok(())
}
