//! Attack: a `.drv` whose declared output path is not the one Nix computes
//! for it (hashDerivationModulo). A client takes an honest derivation, edits
//! its output path (and the `out` variable) to the path of another, honest
//! derivation's output it wants to take over, makes the result a valid path
//! of its own store at its text path (Nix refuses to register it, so the
//! attacker writes its store's database) and asks `farm build` for it. The farm refuses it before queuing anything, naming
//! the derivation, the output, the declared and the computed path; nothing is
//! queued, run or failed afterwards and the cache holds neither path. An
//! honest derivation holding bytes that are not UTF-8 (env value and
//! argument) builds on the same farm, its output carrying those bytes
//! (the builder hands them to its local Nix unchanged).

use std::time::Duration;

use anyhow::ensure;
use farm_nix::StorePath;
use farm_nix::derivation::{Derivation, name_from_drv_path};
use farm_tests::fixture::{BuilderSpec, Farm};
use farm_tests::{TestLogs, deadline};

/// The hang-guard.
const DEADLINE: Duration = Duration::from_secs(400);

#[test]
fn forged_output_path_is_refused_and_leaves_nothing() -> anyhow::Result<()> {
    let logs = TestLogs::new("attack_drv_forged_outputs")?;
    deadline(DEADLINE, &logs, |logs| forged(&logs))
}

fn forged(logs: &TestLogs) -> anyhow::Result<()> {
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
    let client = &farm.client;
    let salt = client.root().display().to_string();
    let exprs = client.write_file(
        "drvs.nix",
        &format!(
            r#"{{
  victim = derivation {{ name = "victim"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo honest {salt} > $out" ]; }};
  thief = derivation {{ name = "thief"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo pwned {salt} > $out" ]; }};
}}"#
        ),
    )?;
    let victim_drv = client.nix_instantiate(&exprs, &["-A", "victim"])?[0].clone();
    let thief_drv = client.nix_instantiate(&exprs, &["-A", "thief"])?[0].clone();
    let read = |p: &StorePath| -> anyhow::Result<Derivation> {
        Ok(Derivation::parse_aterm(std::fs::read(
            client.host_path_of(p),
        )?)?)
    };
    let victim_out = read(&victim_drv)?.output_paths()["out"].clone();
    let thief = read(&thief_drv)?;
    let honest_out = thief.output_paths()["out"].clone();

    // The forged .drv: the thief's recipe, the victim's output path.
    let mut forged = thief.clone();
    forged.outputs.get_mut("out").unwrap().path = Some(victim_out.clone());
    forged
        .env
        .insert("out".into(), victim_out.to_string().into());
    // Nix itself refuses to register such a .drv (it checks the outputs
    // too), so the attacker writes its own store's database, as the owner of
    // a machine can: the file at its text path, a row in ValidPaths.
    let text = forged.to_aterm();
    let forged_drv = forged.drv_path("thief")?;
    let file = client.host_path_of(&forged_drv);
    std::fs::write(&file, &text)?;
    let nar = farm_nix::nar::nar_of_bytes(&text);
    let nar_hash = farm_nix::HashAlgo::Sha256.digest(&nar).to_base16();
    let db = client.nix_dir_on_host().join("var/nix/db/db.sqlite");
    let sql = format!(
        "insert into ValidPaths (path, hash, registrationTime, narSize) values ('{forged_drv}', 'sha256:{nar_hash}', strftime('%s','now'), {});",
        nar.len()
    );
    let st = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(&sql)
        .status()?;
    ensure!(st.success(), "sqlite3 {sql}");
    ensure!(client.is_valid_path(&forged_drv)?);
    ensure!(name_from_drv_path(&forged_drv)? == "thief");

    let out = farm.run(None, &["build", &forged_drv.to_string(), "--json"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the forged .drv was accepted: {stderr}"
    );
    for part in [
        forged_drv.to_string(),
        "\"out\"".to_owned(),
        victim_out.to_string(),
        honest_out.to_string(),
    ] {
        ensure!(
            stderr.contains(&part),
            "the error names {part}; it says:\n{stderr}"
        );
    }

    // Nothing entered the farm: no job queued, running or failed; no output cached.
    let s = farm.status(None)?;
    ensure!(s["queued_total"] == 0, "{s}");
    ensure!(s["running"].as_array().is_some_and(|r| r.is_empty()), "{s}");
    ensure!(
        s["recent_failures"]
            .as_array()
            .is_some_and(|r| r.is_empty()),
        "{s}"
    );
    ensure!(farm.builds_run().is_empty(), "{:?}", farm.builds_run());
    for p in [&victim_out, &honest_out] {
        ensure!(!farm.cache_has(p)?, "the cache serves {p}");
    }

    // The honest victim still builds, to its own path, with its own content.
    let out = farm.run(None, &["build", &victim_drv.to_string(), "--json"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(farm.cache_has(&victim_out)?);
    ensure!(!farm.cache_has(&honest_out)?);

    // Bytes that are not UTF-8 go through the farm unchanged.
    std::fs::write(
        client.root().join("raw.nix"),
        [
            &b"derivation { name = \"raw\"; system = builtins.currentSystem; builder = \"/bin/sh\";\n  v = \"x\xffy\"; args = [ \"-c\" \"printf '%s %s' \\\"$v\\\" \xfe > $out\" ]; salt = \""[..],
            salt.as_bytes(),
            b"\"; }\n",
        ]
        .concat(),
    )?;
    let raw_drv =
        client.nix_instantiate(&client.root().join("raw.nix"), &[] as &[&str])?[0].clone();
    let raw_bytes = std::fs::read(client.host_path_of(&raw_drv))?;
    ensure!(
        std::str::from_utf8(&raw_bytes).is_err(),
        "the .drv holds non-UTF-8 bytes"
    );
    let raw_out = Derivation::parse_aterm(&raw_bytes)?.output_paths()["out"].clone();
    let out = farm.run(None, &["build", &raw_drv.to_string(), "--json"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content = farm.fetched_from_cache(logs, &raw_out)?;
    ensure!(content == b"x\xffy \xfe", "built {content:?}");
    Ok(())
}

/// A poisoned build-hook derivation: an attacker with a build key sends, over
/// ssh:// (the serve protocol, as Nix's hook does), another recipe under the
/// real path of a `.drv` the farm's cache holds. It is refused; the honest
/// client's output stays the honest one, byte for byte, and the same
/// derivation sent honestly is still accepted.
#[test]
fn a_poisoned_hook_derivation_is_refused() -> anyhow::Result<()> {
    let logs = TestLogs::new("attack_drv_poisoned_hook")?;
    deadline(DEADLINE, &logs, |logs| poisoned(&logs))
}

fn poisoned(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = Farm::setup(logs)
        .builders(&[BuilderSpec {
            name: "b1",
            max_jobs: 1,
            conf: &[],
        }])
        .clients(2)
        .start()?;
    let access = farm.own_ssh()?;
    let (honest_key, attacker_key) = (&access.keys[0], &access.keys[1]);
    let client = &farm.client;
    let salt = client.root().display().to_string();
    let expr = client.write_file(
        "victim.nix",
        &farm_tests::sh_derivation("poison-victim", &format!("echo honest {salt} > $out")),
    )?;
    let victim_drv = client.nix_instantiate(&expr, &[] as &[&str])?[0].clone();
    let victim = Derivation::parse_aterm(std::fs::read(client.host_path_of(&victim_drv))?)?;
    let victim_out = victim.output_paths()["out"].clone();
    let name = name_from_drv_path(&victim_drv)?;

    // The honest client builds it through the farm: the .drv is in the cache.
    let out = farm.run(
        Some(honest_key),
        &["build", &victim_drv.to_string(), "--json"],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let narinfo = format!("/{}.narinfo", victim_out.hash_part());
    let (code, before) =
        farm_tests::fixture::http_get_blocking(&farm.coordinator.endpoints.http, &narinfo)?;
    ensure!(
        code == 200,
        "the honest output is not in the cache ({code})"
    );

    // The attacker's recipe under the victim's path and output.
    let honest_basic = victim.resolve(&name, &|_, _| None)?;
    let mut forged = honest_basic.clone();
    forged.args = vec!["-c".into(), format!("echo pwned {salt} > $out").into()];
    let send = |drv: farm_nix::derivation::BasicDerivation| {
        farm.serve_build(attacker_key, &victim_drv, &drv)
    };
    let said = send(forged)?;
    ensure!(
        said.contains("is not") && said.contains("as the farm's cache holds it"),
        "the poisoned derivation was not refused as such:\n{said}"
    );
    let (_, after) =
        farm_tests::fixture::http_get_blocking(&farm.coordinator.endpoints.http, &narinfo)?;
    ensure!(after == before, "the honest output's narinfo changed");
    ensure!(
        farm.builds_run().len() == 1,
        "the poisoned derivation ran: {:?}",
        farm.builds_run()
    );

    // The honest recipe under its own path is the hook's normal case: accepted
    // (already built, so nothing runs again).
    let said = send(honest_basic)?;
    ensure!(
        !said.contains("as the farm's cache holds it"),
        "the honest derivation was refused:\n{said}"
    );
    ensure!(
        said.contains("Ok("),
        "the honest derivation failed:\n{said}"
    );

    // The honest client's output, fetched by another host, is the honest build's.
    let content = String::from_utf8(farm.fetched_from_cache(logs, &victim_out)?)?;
    ensure!(
        content == format!("honest {salt}\n"),
        "the cache serves {content:?}"
    );
    Ok(())
}
