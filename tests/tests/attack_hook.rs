//! Build-hook derivations from keys without push (Nix 2.8's hook sends a
//! BasicDerivation, never the `.drv`, so the farm cannot check what it
//! builds): each is that client's claim build. Real Nix clients and farm
//! binaries throughout.
//!
//! - a build key's hook build (ssh-ng:// and ssh://) works, the client gets
//!   its output, and the output is only that key's claim: no narinfo over
//!   HTTP, an unsigned one under `claims/`; a push key's identical hook build
//!   is signed;
//! - an attacker that goes first with its own recipe under an honest `.drv`
//!   path and outputs gets a build of its own; the honest `farm build` of the
//!   real `.drv` afterwards builds honestly and the cache serves those bytes,
//!   signed;
//! - a two-step hook graph of a build key (step 2 uses step 1's output, a
//!   claim) builds through claims, over both protocols;
//! - the builder's store lends an attacker's bytes to nobody: a claim job that
//!   produced them at an honest output path, while an honest build needing
//!   that path waits for the same builder, leaves nothing behind, and the
//!   honest build publishes honest bytes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use farm_nix::StorePath;
use farm_nix::derivation::{BasicDerivation, Derivation, name_from_drv_path};
use farm_tests::fixture::{BuilderSpec, Farm, http_get_blocking, wait_for_file};
use farm_tests::{TestLogs, deadline, sh_derivation};

/// The hang-guard.
const DEADLINE: Duration = Duration::from_secs(500);

fn farm(logs: &TestLogs, max_jobs: u32) -> anyhow::Result<Farm> {
    Farm::setup(logs)
        .builders(&[BuilderSpec {
            name: "h1",
            max_jobs,
            conf: &[],
        }])
        .clients(2)
        .pushers(1)
        .start()
}

/// `nix-build --max-jobs 0 --builders 'SCHEME://…'` of `expr` with `cmd`'s
/// key: the output path it printed.
fn hook_build(
    farm: &Farm,
    mut cmd: std::process::Command,
    scheme: &str,
    expr: &Path,
) -> anyhow::Result<StorePath> {
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(format!(
            "{} x86_64-linux - 2 1 - - -",
            farm.store_uri(scheme)
        ))
        .arg(expr);
    let out = farm.client.run_command(cmd)?;
    Ok(StorePath::parse(
        out.trim()
            .lines()
            .last()
            .context("nix-build printed no path")?,
    )?)
}

/// The claim narinfo of `path` on disk (any owner), if there is one.
fn claim_narinfo(farm: &Farm, path: &StorePath) -> anyhow::Result<Option<String>> {
    let name = format!("{}.narinfo", path.hash_part());
    for rel in farm.coordinator.cache_files()?.keys() {
        if rel.starts_with("claims") && rel.file_name().is_some_and(|n| *n == *name) {
            let text =
                std::fs::read_to_string(farm.coordinator.state_dir().join("cache").join(rel))?;
            return Ok(Some(text));
        }
    }
    Ok(None)
}

/// `path` is only a claim: no narinfo over HTTP, an unsigned one under `claims/`.
fn only_claimed(farm: &Farm, path: &StorePath) -> anyhow::Result<()> {
    ensure!(!farm.cache_has(path)?, "the cache serves {path}");
    let text = claim_narinfo(farm, path)?.with_context(|| format!("no claim of {path}"))?;
    ensure!(
        !text.contains("Sig:"),
        "the claim of {path} is signed:\n{text}"
    );
    Ok(())
}

/// The narinfo of `path` the cache serves over HTTP, signed by the farm.
fn signed_narinfo(farm: &Farm, path: &StorePath) -> anyhow::Result<String> {
    let (code, body) = http_get_blocking(
        &farm.coordinator.endpoints.http,
        &format!("/{}.narinfo", path.hash_part()),
    )?;
    ensure!(code == 200, "GET narinfo of {path}: {code}");
    let text = String::from_utf8(body)?;
    ensure!(text.contains("Sig: farm-e2e:"), "not signed:\n{text}");
    Ok(text)
}

#[test]
fn a_build_keys_hook_build_is_its_claim_and_a_push_keys_is_signed() -> anyhow::Result<()> {
    let logs = TestLogs::new("attack_hook_claim")?;
    deadline(DEADLINE, &logs, |logs| claimed(&logs))
}

fn claimed(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = farm(logs, 2)?;
    let salt = farm.client.root().display().to_string();
    for scheme in ["ssh-ng", "ssh"] {
        let expr = farm.client.write_file(
            &format!("claim-{scheme}.nix"),
            &sh_derivation(
                &format!("claim-{scheme}"),
                &format!("echo built {scheme} {salt} > $out"),
            ),
        )?;
        let want = format!("built {scheme} {salt}\n");
        let out = hook_build(&farm, farm.client_command("nix-build")?, scheme, &expr)?;
        ensure!(std::fs::read_to_string(farm.client.host_path_of(&out))? == want);
        only_claimed(&farm, &out)?;
        ensure!(
            !farm.builders[0].actor.is_valid_path(&out)?,
            "{scheme}: the builder's store kept the claim {out}"
        );

        // The same derivation from a push key: built for the cache, signed.
        farm.client
            .run("nix-store", &["--delete", &out.to_string()])?;
        let again = hook_build(&farm, farm.pusher_command("nix-build")?, scheme, &expr)?;
        ensure!(again == out, "{again} != {out}");
        ensure!(std::fs::read_to_string(farm.client.host_path_of(&out))? == want);
        signed_narinfo(&farm, &out)?;
    }
    Ok(())
}

/// How many times the coordinator ran a build of `drv`.
fn runs_of(farm: &Farm, drv: &StorePath) -> usize {
    let needle = format!("drv={drv}");
    farm.coordinator
        .process
        .log()
        .lines()
        .filter(|l| l.contains("build running") && l.contains(&needle))
        .count()
}

/// The honest `.drv` at `expr` (instantiated in the client's store, not on the
/// farm), its path, its output and its BasicDerivation as the hook sends it.
fn victim(farm: &Farm, expr: &Path) -> anyhow::Result<(StorePath, StorePath, BasicDerivation)> {
    let client = &farm.client;
    let drv_path = client.nix_instantiate(expr, &[] as &[&str])?[0].clone();
    let drv = Derivation::parse_aterm(std::fs::read(client.host_path_of(&drv_path))?)?;
    let out = drv.output_paths()["out"].clone();
    let basic = drv.resolve(&name_from_drv_path(&drv_path)?, &|_, _| None)?;
    Ok((drv_path, out, basic))
}

#[test]
fn an_attacker_first_does_not_poison_the_honest_build() -> anyhow::Result<()> {
    let logs = TestLogs::new("attack_hook_first")?;
    deadline(DEADLINE, &logs, |logs| first(&logs))
}

fn first(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = farm(logs, 1)?;
    let access = farm.own_ssh()?;
    let (honest_key, attacker_key) = (&access.keys[0], &access.keys[1]);
    let salt = farm.client.root().display().to_string();
    let expr = farm.client.write_file(
        "victim.nix",
        &sh_derivation("first-victim", &format!("echo honest {salt} > $out")),
    )?;
    let (victim_drv, victim_out, honest_basic) = victim(&farm, &expr)?;

    // The attacker goes first: its recipe, the victim's `.drv` path and output
    // (the farm has not seen the real `.drv`). It gets a build of its own.
    let mut forged = honest_basic.clone();
    forged.args = vec!["-c".into(), format!("echo pwned {salt} > $out").into()];
    let said = farm.serve_build(attacker_key, &victim_drv, &forged)?;
    ensure!(said.contains("Ok("), "the attacker's build failed:\n{said}");
    only_claimed(&farm, &victim_out)?;
    ensure!(
        !farm.builders[0].actor.is_valid_path(&victim_out)?,
        "the builder's store kept the attacker's {victim_out}"
    );
    ensure!(runs_of(&farm, &victim_drv) == 1);

    // The honest client's full `.drv`: a build of its own, honest bytes, signed.
    let out = farm.run(
        Some(honest_key),
        &["build", &victim_drv.to_string(), "--json"],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        runs_of(&farm, &victim_drv) == 2,
        "the honest build joined the attacker's"
    );
    signed_narinfo(&farm, &victim_out)?;
    let content = String::from_utf8(farm.fetched_from_cache(logs, &victim_out)?)?;
    ensure!(
        content == format!("honest {salt}\n"),
        "the cache serves {content:?}"
    );
    // The attacker asking again is refused now that the farm knows the real
    // `.drv`; the honest recipe gets the signed honest path.
    let said = farm.serve_build(attacker_key, &victim_drv, &forged)?;
    ensure!(said.contains("as the farm's cache holds it"), "{said}");
    let said = farm.serve_build(attacker_key, &victim_drv, &honest_basic)?;
    ensure!(said.contains("Ok("), "{said}");
    ensure!(runs_of(&farm, &victim_drv) == 2, "built a third time");
    Ok(())
}

#[test]
fn a_two_step_hook_graph_of_a_build_key_builds_through_claims() -> anyhow::Result<()> {
    let logs = TestLogs::new("attack_hook_two_steps")?;
    deadline(DEADLINE, &logs, |logs| two_steps(&logs))
}

fn two_steps(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = farm(logs, 2)?;
    let salt = farm.client.root().display().to_string();
    for scheme in ["ssh-ng", "ssh"] {
        let expr = farm.client.write_file(
            &format!("steps-{scheme}.nix"),
            &format!(
                r#"let one = derivation {{ name = "step1-{scheme}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo one {salt} > $out" ]; }};
in derivation {{ name = "step2-{scheme}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "/bin/cat ${{one}} > $out; echo two >> $out" ]; }}
"#
            ),
        )?;
        let two = hook_build(&farm, farm.client_command("nix-build")?, scheme, &expr)?;
        let content = std::fs::read_to_string(farm.client.host_path_of(&two))?;
        ensure!(
            content == format!("one {salt}\ntwo\n"),
            "{scheme}: built {content:?}"
        );
        let one = farm
            .client
            .closure(&two)?
            .into_iter()
            .find(|p| p.name() == format!("step1-{scheme}"));
        // The output does not reference step 1 (it copied its bytes): find it by its derivation.
        let one = match one {
            Some(p) => p,
            None => {
                let drv = farm
                    .client
                    .run("nix-store", &["-q", "--deriver", &two.to_string()])?;
                let refs = farm
                    .client
                    .run("nix-store", &["-q", "--references", drv.trim()])?;
                let one_drv = refs
                    .lines()
                    .find(|l| l.ends_with(&format!("step1-{scheme}.drv")))
                    .context("no step 1 derivation")?;
                let out = farm
                    .client
                    .run("nix-store", &["-q", "--outputs", one_drv])?;
                StorePath::parse(out.trim())?
            }
        };
        for p in [&one, &two] {
            only_claimed(&farm, p)?;
            ensure!(
                !farm.builders[0].actor.is_valid_path(p)?,
                "the builder's store kept the claim {p}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_builders_store_lends_an_attackers_bytes_to_nobody() -> anyhow::Result<()> {
    let logs = TestLogs::new("attack_hook_store")?;
    deadline(DEADLINE, &logs, |logs| store(&logs))
}

fn store(logs: &TestLogs) -> anyhow::Result<()> {
    // Two slots: the honest job is sent to the same builder while the claim
    // job runs there.
    let farm = farm(logs, 2)?;
    let access = farm.own_ssh()?;
    let (honest_key, attacker_key) = (&access.keys[0], &access.keys[1]);
    let salt = farm.client.root().display().to_string();
    let started = farm.witness_dir().join("claim-started");
    // The claim job holds the store until the test has seen the honest job
    // reach the builder (released then; at most 300 s, so no hang).
    let release = farm.witness_dir().join("claim-release");
    let expr = farm.client.write_file(
        "store.nix",
        &format!(
            r#"rec {{
  victim = derivation {{ name = "store-victim"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo honest {salt} > $out" ]; }};
  user = derivation {{ name = "store-user"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "/bin/cat ${{victim}} > $out; echo used >> $out" ]; }};
}}
"#
        ),
    )?;
    let victim_drv = farm.client.nix_instantiate(&expr, &["-A", "victim"])?[0].clone();
    let user_drv = farm.client.nix_instantiate(&expr, &["-A", "user"])?[0].clone();
    let drv = Derivation::parse_aterm(std::fs::read(farm.client.host_path_of(&victim_drv))?)?;
    let victim_out = drv.output_paths()["out"].clone();
    let user_out = Derivation::parse_aterm(std::fs::read(farm.client.host_path_of(&user_drv))?)?
        .output_paths()["out"]
        .clone();
    let mut forged = drv.resolve(&name_from_drv_path(&victim_drv)?, &|_, _| None)?;
    forged.args = vec![
        "-c".into(),
        format!(
            "echo started > {}; i=0; while [ ! -e {} ] && [ $i -lt 3000 ]; do /bin/sleep 0.1; i=$((i+1)); done; echo pwned {salt} > $out",
            started.display(),
            release.display()
        )
        .into(),
    ];

    std::thread::scope(|scope| -> anyhow::Result<()> {
        let attack = scope.spawn(|| farm.serve_build(attacker_key, &victim_drv, &forged));
        // While the claim job runs: the honest graph that needs the victim's output.
        wait_for_file(&started, Duration::from_secs(120))?;
        let honest = scope.spawn(|| {
            farm.run(
                Some(honest_key),
                &["build", &user_drv.to_string(), "--json"],
            )
        });
        // Release the claim job once the honest job of the victim has
        // reached the builder (its second "job started" for that .drv).
        let builder_log = || {
            farm.builders[0]
                .process
                .as_ref()
                .map(|p| p.log())
                .unwrap_or_default()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        let reached = loop {
            let starts = builder_log()
                .lines()
                .filter(|l| l.contains("job started") && l.contains(&victim_drv.to_string()))
                .count();
            if starts >= 2 {
                break true;
            }
            if std::time::Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Released either way, so the claim job ends and the threads join.
        std::fs::write(&release, "go\n")?;
        ensure!(
            reached,
            "the honest job never reached the builder:\n{}",
            builder_log()
        );
        let out = honest.join().expect("honest thread")?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = attack.join().expect("attack thread")?;
        ensure!(said.contains("Ok("), "the attacker's build failed:\n{said}");
        Ok(())
    })?;
    ensure!(
        runs_of(&farm, &victim_drv) == 2,
        "the honest build joined the attacker's"
    );
    signed_narinfo(&farm, &victim_out)?;
    signed_narinfo(&farm, &user_out)?;
    let victim_bytes = String::from_utf8(farm.fetched_from_cache(logs, &victim_out)?)?;
    ensure!(
        victim_bytes == format!("honest {salt}\n"),
        "{victim_bytes:?}"
    );
    let user_bytes = String::from_utf8(farm.fetched_from_cache(logs, &user_out)?)?;
    ensure!(
        user_bytes == format!("honest {salt}\nused\n"),
        "{user_bytes:?}"
    );
    // The builder's store holds the honest bytes, and nothing of the claim job is pending.
    let b = &farm.builders[0];
    let there = std::fs::read_to_string(b.actor.host_path_of(&victim_out))?;
    ensure!(
        there == format!("honest {salt}\n"),
        "the builder holds {there:?}"
    );
    ensure!(!b.state_dir.join("claim-paths").exists());
    let log = b.process.as_ref().context("builder process")?.log();
    // The honest job of the victim reached the builder while the claim job
    // ran, and waited for the claim job's paths to be deleted.
    let lines: Vec<&str> = log.lines().collect();
    let victim_starts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("job started") && lines[i].contains(&victim_drv.to_string()))
        .collect();
    let deleted = lines
        .iter()
        .position(|l| l.contains("deleted a claim job's paths"))
        .with_context(|| format!("the builder did not clean up:\n{log}"))?;
    ensure!(
        victim_starts.len() == 2 && victim_starts[1] < deleted,
        "the honest job did not overlap the claim job:\n{log}"
    );

    Ok(())
}
