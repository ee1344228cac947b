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
    let reader = farm_tests::Actor::with_logs("reader", logs)?;
    reader.nix_conf_append(&format!(
        "trusted-public-keys = {}",
        farm.coordinator.endpoints.cache_public_key
    ))?;
    reader.run(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--from",
            &farm.cache_url(),
            &raw_out.to_string(),
        ],
    )?;
    let content = std::fs::read(reader.host_path_of(&raw_out))?;
    ensure!(content == b"x\xffy \xfe", "built {content:?}");
    Ok(())
}
