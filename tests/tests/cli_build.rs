//! `farm build` end to end with real Nix: a 30-derivation graph built by two
//! builders from a client without a terminal (exit 0, every output in the
//! JSON and in the cache, `farm status --json` showing the builders and the
//! running builds meanwhile), and a graph with a failing derivation (exit 1,
//! its log printed); input sources that reference other sources reach the
//! builders.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use farm_tests::fixture::{BuilderSpec, Farm, graph_expr};
use farm_tests::{TestLogs, deadline};

/// Each test's hang-guard.
const DEADLINE: Duration = Duration::from_secs(400);

#[test]
fn builds_a_30_derivation_graph() -> anyhow::Result<()> {
    let logs = TestLogs::new("cli_build_graph")?;
    deadline(DEADLINE, &logs, |logs| graph(&logs))
}

fn graph(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = Farm::start(
        logs,
        &[
            BuilderSpec {
                name: "b1",
                max_jobs: 2,
                conf: &[],
            },
            BuilderSpec {
                name: "b2",
                max_jobs: 2,
                conf: &[],
            },
        ],
        &[],
    )?;
    farm.wait_for_builders(None, 2)?;
    let salt = farm.client.root().display().to_string();
    let file = farm
        .client
        .write_file("graph.nix", &graph_expr(30, 0.3, &salt, None))?;
    let file = file.display().to_string();

    // The build runs in the background while we watch the status.
    let mut child = farm.spawn_farm(
        "farm build graph",
        None,
        &["build", &file, "-A", "all", "--json"],
    )?;
    let mut saw_running = false;
    let mut saw_caps = false;
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait()?.is_none() {
        let s = farm.status(None)?;
        let builders = s["builders"].as_array().cloned().unwrap_or_default();
        let names: BTreeSet<&str> = builders.iter().filter_map(|b| b["name"].as_str()).collect();
        assert_eq!(names, BTreeSet::from(["b1", "b2"]), "{s}");
        saw_caps |= builders.iter().all(|b| {
            b["systems"].as_array().is_some_and(|v| !v.is_empty())
                && b["max_jobs"] == 2
                && b["supported_features"].is_array()
                && b["mandatory_features"].is_array()
        });
        if let Some(r) = s["running"].as_array()
            && !r.is_empty()
        {
            saw_running = true;
            for b in r {
                assert!(
                    b["drv_path"].as_str().unwrap_or("").ends_with(".drv"),
                    "{s}"
                );
                assert!(
                    ["b1", "b2"].contains(&b["builder"].as_str().unwrap_or("")),
                    "{s}"
                );
            }
            assert!(
                builders.iter().any(|b| b["state"] == "busy"),
                "a builder runs something but none is busy: {s}"
            );
        }
        assert!(Instant::now() < deadline, "farm build takes too long");
        std::thread::sleep(Duration::from_millis(150));
    }
    let status = child.wait_exit(Duration::from_secs(60))?;
    let stdout = child.stdout();
    let stderr = child.output();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(saw_running, "farm status never showed a running build");
    assert!(
        saw_caps,
        "farm status never showed both builders' capabilities"
    );
    // No terminal: plain lines, no progress bar escapes.
    assert!(!stderr.contains('\x1b'), "{stderr}");
    assert!(stderr.contains("building d"), "{stderr}");

    let doc: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(doc["success"], true);
    let drvs = doc["derivations"].as_array().expect("derivations");
    assert_eq!(drvs.len(), 30, "{doc}");
    let mut outputs = Vec::new();
    for d in drvs {
        assert_eq!(d["outcome"], "built", "{d}");
        let out = d["outputs"]["out"].as_str().expect("an out output");
        outputs.push(out.to_owned());
    }
    assert_eq!(drvs.iter().filter(|d| d["requested"] == true).count(), 30);

    // Every output is in the farm's cache: real Nix reads it from there.
    let cache = farm.coordinator.endpoints.http_url();
    let key = &farm.coordinator.endpoints.cache_public_key;
    let reader = farm_tests::Actor::with_logs("reader", logs)?;
    reader.nix_conf_append(&format!("trusted-public-keys = {key}"))?;
    let mut args = vec![
        "--extra-experimental-features".to_owned(),
        "nix-command".to_owned(),
        "copy".to_owned(),
        "--from".to_owned(),
        cache.clone(),
    ];
    args.extend(outputs.iter().cloned());
    reader.run("nix", &args)?;
    for o in &outputs {
        let text = reader.run("cat", &[o])?;
        assert!(text.contains(&salt), "{o}: {text}");
        assert!(
            !farm.client.is_valid_path(&farm_nix::StorePath::parse(o)?)?,
            "nothing is downloaded by default"
        );
    }

    // Again: everything is cached now, nothing is uploaded or built.
    let out = farm.run(None, &["build", &file, "-A", "d29", "--json"])?;
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["uploaded"]["paths"], 0, "{doc}");
    assert!(
        doc["derivations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["outcome"] == "cached"),
        "{doc}"
    );

    // Input sources travel with their own references: `farm build` walks
    // the `.drv` files itself and asks Nix only about the sources' closure
    // (`outer` names `inner`, which no `.drv` names).
    let src_file = farm.client.write_file(
        "sources.nix",
        &format!(
            r#"let
  inner = builtins.toFile "inner" "inner {salt}";
  outer = builtins.toFile "outer" "points at ${{inner}}";
  mk = name: script: derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  }};
  a = mk "src-a" "read -r _ _ p < ${{outer}}; /bin/cat $p > $out";
in mk "src-b" "/bin/cat ${{a}} > $out; echo ${{outer}} >> $out"
"#
        ),
    )?;
    let out = farm.run(None, &["build", &src_file.display().to_string(), "--json"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // src-a.drv, src-b.drv, outer and inner: the whole closure, uploaded.
    assert_eq!(doc["uploaded"]["paths"], 4, "{doc}");
    let drvs = doc["derivations"].as_array().expect("derivations");
    assert_eq!(drvs.len(), 2, "{doc}");
    assert!(drvs.iter().all(|d| d["outcome"] == "built"), "{doc}");
    let b = drvs
        .iter()
        .find(|d| d["requested"] == true)
        .and_then(|d| d["outputs"]["out"].as_str())
        .expect("src-b's output")
        .to_owned();
    reader.run(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--from",
            &cache,
            &b,
        ],
    )?;
    let text = reader.run("cat", &[&b])?;
    assert!(text.starts_with(&format!("inner {salt}")), "{b}: {text}");
    Ok(())
}

#[test]
fn a_failing_derivation_exits_1_with_its_log() -> anyhow::Result<()> {
    let logs = TestLogs::new("cli_build_failure")?;
    deadline(DEADLINE, &logs, |logs| failure(&logs))
}

fn failure(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "b1",
            max_jobs: 2,
            conf: &[],
        }],
        &[],
    )?;
    farm.wait_for_builders(None, 1)?;
    let salt = farm.client.root().display().to_string();
    let file = farm
        .client
        .write_file("graph.nix", &graph_expr(6, 0.0, &salt, Some(3)))?;
    let out = farm.run(
        None,
        &["build", &file.display().to_string(), "-A", "all", "--json"],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("d3 says this build is doomed"),
        "the failed build's log is printed:\n{stderr}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["success"], false);
    let outcome = |name: &str| {
        doc["derivations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| {
                d["drv_path"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("-{name}.drv"))
            })
            .map(|d| d["outcome"].as_str().unwrap().to_owned())
    };
    assert_eq!(outcome("d3").as_deref(), Some("failed"), "{doc}");
    assert_eq!(outcome("d2").as_deref(), Some("built"), "{doc}");
    assert_eq!(outcome("d4").as_deref(), Some("dependency_failed"), "{doc}");

    // The log stays readable by derivation path, and status lists the failure.
    let d3 = doc["derivations"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|d| d["drv_path"].as_str().filter(|p| p.ends_with("-d3.drv")))
        .unwrap()
        .to_owned();
    let out = farm.run(None, &["logs", &d3])?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("d3 says this build is doomed"));
    let s = farm.status(None)?;
    let failures = s["recent_failures"].as_array().cloned().unwrap_or_default();
    assert!(failures.iter().any(|f| f["drv_path"] == d3.as_str()), "{s}");
    assert!(
        !failures
            .iter()
            .any(|f| f["error"].as_str().unwrap_or("").contains('\x1b')),
        "{s}"
    );

    // A bad installable is a usage error.
    let out = farm.run(None, &["build", "/no/such/file.nix"])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}
