//! Attacks on the farm's binary cache, with a real Nix 2.8 client copying
//! crafted paths into the real farm (`nix copy --to ssh-ng://` and `ssh://`):
//! - replace-by-hash-part: a path `H-bar` crafted under the hash part of a
//!   published `H-honest` (registered valid in the client's own store with
//!   `nix-store --register-validity`) is refused, whatever the key; the
//!   narinfo of `H-honest` served over HTTP stays byte-identical;
//! - unsigned-content-signed: an input-addressed path uploaded by a key
//!   without the push right is that client's claim: not served over HTTP
//!   (404), not signed, seen only by that client's own queries;
//! - `References` naming a path the NAR does not contain, and one the cache
//!   lacks: refused, naming the reference.
//!
//! After each attack, the published objects on disk and the HTTP narinfos are
//! checked unchanged.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use farm_nix::hash::HashAlgo;
use farm_nix::store_path::StorePath;
use farm_tests::fixture::*;

/// The hang-guard of the whole test.
const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn the_cache_signs_only_what_it_may() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("attack_cache")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        let farm = Farm::setup(&logs)
            .clients(1)
            .pushers(1)
            .start_without_builders()?;
        replace_by_hash_part(&farm)?;
        unsigned_content_is_not_signed(&farm)?;
        bad_references(&farm)?;
        Ok(())
    })
}

/// Every object of the cache on disk, relative to its root.
fn objects(farm: &Farm) -> BTreeSet<String> {
    farm.coordinator
        .cache_files()
        .expect("listing the cache")
        .into_keys()
        .map(|p| p.display().to_string())
        .collect()
}

/// The published objects: everything but the claims and temporary uploads.
fn published(farm: &Farm) -> BTreeSet<String> {
    objects(farm)
        .into_iter()
        .filter(|o| !o.starts_with("claims/") && !o.starts_with("tmp/"))
        .collect()
}

/// `GET /<hash>.narinfo`: status and body.
fn narinfo(farm: &Farm, path: &StorePath) -> anyhow::Result<(u16, Vec<u8>)> {
    http_get_blocking(
        &farm.coordinator.endpoints.http,
        &format!("/{}.narinfo", path.hash_part()),
    )
}

/// Every narinfo the cache serves over HTTP, by hash part.
fn served(farm: &Farm) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for o in published(farm) {
        if let Some(hash) = o.strip_suffix(".narinfo") {
            let (status, body) =
                http_get_blocking(&farm.coordinator.endpoints.http, &format!("/{o}"))?;
            ensure!(status == 200, "{o} is on disk but GET gives {status}");
            out.push((hash.to_string(), body));
        }
    }
    Ok(out)
}

/// What the cache publishes: its objects, and the narinfos it serves.
type Snapshot = (BTreeSet<String>, Vec<(String, Vec<u8>)>);

fn snapshot(farm: &Farm) -> anyhow::Result<Snapshot> {
    Ok((published(farm), served(farm)?))
}

fn ensure_unchanged(farm: &Farm, before: &Snapshot, what: &str) -> anyhow::Result<()> {
    let now = snapshot(farm)?;
    ensure!(
        now.0 == before.0,
        "{what}: the published objects changed: {:?} -> {:?}",
        before.0,
        now.0
    );
    ensure!(now.1 == before.1, "{what}: a served narinfo changed");
    Ok(())
}

/// Build a one-file derivation in the client's own store.
fn build_local(farm: &Farm, name: &str, script: &str) -> anyhow::Result<StorePath> {
    let expr = farm.client.write_file(
        &format!("{name}.nix"),
        &format!(
            "derivation {{ name = \"{name}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"{script}\" ]; }}\n"
        ),
    )?;
    Ok(farm.client.nix_build(&expr, &[] as &[&str])?.remove(0))
}

/// Register `path` (a file with `contents`) valid in the client's store with
/// these references, as an attacker with their own store can.
fn craft(
    farm: &Farm,
    path: &StorePath,
    contents: &str,
    references: &[&StorePath],
) -> anyhow::Result<()> {
    let host = farm.client.host_path_of(path);
    std::fs::write(&host, contents)?;
    let mut input = format!("{path}\n\n{}\n", references.len());
    for r in references {
        input.push_str(&format!("{r}\n"));
    }
    farm.client
        .run_with_input("nix-store", &["--register-validity"], input.as_bytes())?;
    ensure!(farm.client.is_valid_path(path)?, "{path} not registered");
    Ok(())
}

/// A store path with a fresh hash part.
fn fresh(name: &str) -> anyhow::Result<StorePath> {
    let d = HashAlgo::Sha256.digest(format!("attack-cache {name}").as_bytes());
    let mut h = [0u8; 20];
    h.copy_from_slice(&d.digest()[..20]);
    Ok(StorePath::from_digest(&h, name)?)
}

/// A store path under `like`'s hash part, named `name`.
fn same_hash(like: &StorePath, name: &str) -> anyhow::Result<StorePath> {
    Ok(StorePath::parse(&format!(
        "/nix/store/{}-{name}",
        like.hash_part()
    ))?)
}

/// Run `cmd` (a `nix copy …`) expecting it to fail with `expect` in its stderr.
fn refused(farm: &Farm, mut cmd: Command, expect: &str, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().context("running nix copy")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    farm.logs.record(
        format!("{what}: exit {:?}", out.status.code()),
        stderr.to_string(),
    );
    ensure!(!out.status.success(), "{what}: accepted");
    ensure!(
        stderr.contains(expect),
        "{what}: refused without {expect:?} in its error:\n{stderr}"
    );
    Ok(())
}

fn copy(farm: &Farm, push: bool, scheme: &str, args: &[&str]) -> anyhow::Result<Command> {
    let mut cmd = if push {
        farm.pusher_command("nix")?
    } else {
        farm.client_command("nix")?
    };
    cmd.args(["copy", "--to", &farm.store_uri(scheme)])
        .args(args);
    Ok(cmd)
}

fn replace_by_hash_part(farm: &Farm) -> anyhow::Result<()> {
    let honest = build_local(farm, "attack-honest", "echo foo > $out")?;
    farm.client
        .run_command(copy(farm, true, "ssh-ng", &[&honest.to_string()])?)?;
    let (status, signed) = narinfo(farm, &honest)?;
    ensure!(status == 200, "the honest path is not published ({status})");
    ensure!(String::from_utf8_lossy(&signed).contains(&format!("StorePath: {honest}\n")));
    ensure!(String::from_utf8_lossy(&signed).contains("Sig: farm-e2e:"));
    let before = snapshot(farm)?;

    let bar = same_hash(&honest, "attack-bar")?;
    craft(farm, &bar, "other bytes\n", &[])?;
    for (push, scheme) in [(true, "ssh-ng"), (false, "ssh-ng"), (true, "ssh")] {
        refused(
            farm,
            copy(farm, push, scheme, &[&bar.to_string()])?,
            &format!("its hash part is taken by {honest}"),
            &format!("{bar} over {scheme} (push: {push})"),
        )?;
        ensure_unchanged(farm, &before, "replace-by-hash-part")?;
        let (status, now) = narinfo(farm, &honest)?;
        ensure!(
            status == 200 && now == signed,
            "the narinfo of {honest} changed"
        );
    }
    Ok(())
}

fn unsigned_content_is_not_signed(farm: &Farm) -> anyhow::Result<()> {
    let before = snapshot(farm)?;
    let claims_before: BTreeSet<String> = objects(farm)
        .into_iter()
        .filter(|o| o.starts_with("claims/"))
        .collect();
    let own = build_local(farm, "attack-unsigned", "echo mine > $out")?;
    // A key without the push right: the upload is accepted, as its claim.
    farm.client
        .run_command(copy(farm, false, "ssh-ng", &[&own.to_string()])?)?;
    let (status, _) = narinfo(farm, &own)?;
    ensure!(
        status == 404,
        "an unsigned upload is served over HTTP ({status})"
    );
    ensure_unchanged(farm, &before, "unsigned-content-signed")?;
    // Stored as an unsigned claim, and only there.
    let claims: Vec<String> = objects(farm)
        .into_iter()
        .filter(|o| o.starts_with("claims/") && !claims_before.contains(o))
        .collect();
    let claim_narinfo = claims
        .iter()
        .find(|o| o.ends_with(&format!("/{}.narinfo", own.hash_part())))
        .with_context(|| format!("no claim stored: {claims:?}"))?;
    let text = std::fs::read_to_string(
        farm.coordinator
            .state_dir()
            .join("cache")
            .join(claim_narinfo),
    )?;
    ensure!(!text.contains("Sig:"), "the claim is signed:\n{text}");
    // Its owner's queries see it (so `nix copy` does not send it again);
    // another key's do not.
    let mut cmd = farm.client_command("nix")?;
    cmd.args([
        "path-info",
        "--store",
        &farm.store_uri("ssh-ng"),
        &own.to_string(),
    ]);
    farm.client.run_command(cmd)?;
    let mut cmd = farm.pusher_command("nix")?;
    cmd.args([
        "path-info",
        "--store",
        &farm.store_uri("ssh-ng"),
        &own.to_string(),
    ]);
    let out = cmd.output()?;
    ensure!(
        !out.status.success(),
        "another key sees the claim: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn bad_references(farm: &Farm) -> anyhow::Result<()> {
    // A reference the NAR does not contain.
    let dep = build_local(farm, "attack-dep", "echo dep > $out")?;
    farm.client
        .run_command(copy(farm, true, "ssh-ng", &[&dep.to_string()])?)?;
    let before = snapshot(farm)?;
    let liar = fresh("attack-liar")?;
    craft(farm, &liar, "names nothing\n", &[&dep])?;
    for push in [true, false] {
        refused(
            farm,
            copy(farm, push, "ssh-ng", &[&liar.to_string()])?,
            &format!("its reference {dep} does not occur in its NAR"),
            &format!("{liar} (push: {push})"),
        )?;
        ensure_unchanged(farm, &before, "a reference the NAR lacks")?;
    }
    let (status, _) = narinfo(farm, &liar)?;
    ensure!(status == 404);

    // A reference the cache lacks (the NAR does name it).
    let missing = fresh("attack-missing")?;
    craft(farm, &missing, "never uploaded\n", &[])?;
    let needy = fresh("attack-needy")?;
    craft(farm, &needy, &format!("uses {missing}\n"), &[&missing])?;
    for push in [true, false] {
        refused(
            farm,
            copy(
                farm,
                push,
                "ssh-ng",
                &["--no-recursive", &needy.to_string()],
            )?,
            &format!("its reference {missing} is not in the cache"),
            &format!("{needy} (push: {push})"),
        )?;
        ensure_unchanged(farm, &before, "a reference the cache lacks")?;
    }
    ensure!(!objects(farm).iter().any(|o| o.contains(needy.hash_part())));
    Ok(())
}
