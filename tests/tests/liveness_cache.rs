//! The cache under uploads that do not play along, end to end with the real
//! binaries and real Nix:
//!
//! - A client claims a derivation's output path over `FarmService.UploadNar`
//!   with bytes of its own and trickles them, while a real `farm-builder`
//!   builds that derivation and uploads the output. The builder's upload is not
//!   held behind the claim: the build is `Built` while the trickle is still
//!   going; the trickle is then cut at its deadline (`upload_grace_secs`, set
//!   short here) with `DEADLINE_EXCEEDED` and a message that says so; the cache
//!   serves what the builder built.
//! - `nix copy --to ssh-ng://` of a path larger than the cache's
//!   `max_nar_size` fails with the reason on the client's terminal and stores
//!   nothing, while a path under the limit is copied.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use farm_nix::hash::HashAlgo;
use farm_nix::narinfo::NarInfo;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;
use farm_proto::v1;
use farm_tests::fixture::{BuilderSpec, Farm, GRAPH_TIMEOUT, http_get, outcome, prelude};
use farm_tests::{TestLogs, deadline_async};

/// The whole test's deadline: past it the test fails (and prints every log).
const TEST_DEADLINE: Duration = Duration::from_secs(300);
/// The coordinator's upload grace in the trickle test.
const UPLOAD_GRACE_SECS: u64 = 30;

/// `n` incompressible bytes.
fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::with_capacity(n);
    std::fs::File::open("/dev/urandom")?
        .take(n as u64)
        .read_to_end(&mut v)?;
    ensure!(v.len() == n, "short read from /dev/urandom");
    Ok(v)
}

/// Files under `dir` whose name starts with `prefix` (none if `dir` is absent).
fn files_starting_with(dir: &std::path::Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn a_trickling_client_upload_does_not_hold_a_builders_output_hostage() -> anyhow::Result<()> {
    let logs = TestLogs::new("liveness_cache_trickle")?;
    deadline_async(TEST_DEADLINE, &logs, |logs| async move {
        trickle_test(&logs).await
    })
}

async fn trickle_test(logs: &TestLogs) -> anyhow::Result<()> {
    let conf_dir = tempfile::tempdir()?;
    let config = conf_dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!("[cache]\nupload_grace_secs = {UPLOAD_GRACE_SECS}\nupload_min_rate = 0\n"),
    )?;
    let config_arg = config.to_str().context("config path")?;
    let farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "builder",
            max_jobs: 1,
            conf: &["system-features ="],
        }],
        &["--config", config_arg],
    )?;
    let built_contents = b"built by the farm builder\n";
    let expr = format!(
        "let {prelude}\nin mk \"hostage\" \"echo built by the farm builder > $out\" []\n",
        prelude = prelude(farm.witness_dir())
    );
    let file = farm.client.write_file("hostage.nix", &expr)?;
    let drvs = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    ensure!(drvs.len() == 1, "{drvs:?}");
    let out_path = StorePath::parse(
        farm.client
            .run("nix-store", &["-q", "--outputs", &drvs[0].to_string()])?
            .trim(),
    )?;
    farm.upload_closure(&drvs).await?;

    // The claim: the output path with bytes of the client's own, 10 MiB (so
    // its temporary object reaches the disk), then a trickle of 16 bytes a
    // second that would take more than an hour to finish.
    let mut fake = random_bytes(10 << 20)?;
    fake.extend_from_slice(&[b'x'; 64 << 10]);
    let fake_nar = farm_nix::nar::nar_of_bytes(&fake);
    let claim = ValidPathInfo::new(
        out_path.clone(),
        HashAlgo::Sha256.digest(&fake_nar),
        fake_nar.len() as u64,
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::UploadNarRequest>(4);
    let mut client = farm.farm_client().await?;
    let upload = tokio::spawn(async move {
        client
            .upload_nar(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            }))
            .await
    });
    let trickle_started = Instant::now();
    let feeder = tokio::spawn(async move {
        let send = |msg| tx.send(v1::UploadNarRequest { msg: Some(msg) });
        if send(v1::upload_nar_request::Msg::Info(v1::PathInfo::from(
            &claim,
        )))
        .await
        .is_err()
        {
            return;
        }
        let fast = fake_nar.len() - (60 << 10);
        for chunk in fake_nar[..fast].chunks(64 << 10) {
            if send(v1::upload_nar_request::Msg::Data(chunk.to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
        for chunk in fake_nar[fast..].chunks(8) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if send(v1::upload_nar_request::Msg::Data(chunk.to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    });

    // The claim is being ingested: its temporary object is on the disk.
    let tmp_dir = farm.coordinator.state_dir.join("cache/tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    while files_starting_with(&tmp_dir, out_path.hash_part()).is_empty() {
        ensure!(
            !upload.is_finished(),
            "the claim's upload ended early: {:?}",
            upload.await
        );
        ensure!(
            Instant::now() < deadline,
            "the claim's upload never reached {}",
            tmp_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Meanwhile the farm builds the derivation and its builder uploads the output.
    let mut events = farm.submit(&drvs).await?;
    let done = events.done(GRAPH_TIMEOUT).await?;
    let built_after = trickle_started.elapsed();
    ensure!(
        !upload.is_finished(),
        "the claim's upload ended before the build did (after {built_after:?}): {:?}\n{}",
        upload.await,
        events.render()
    );
    ensure!(done.success && done.built == 1, "{}", events.render());
    let finished = events.outcomes();
    let top = finished
        .get(&drvs[0].to_string())
        .context("no outcome for the derivation")?;
    ensure!(
        outcome(top) == v1::BuildOutcome::Built,
        "{}",
        events.render()
    );

    // The claim is cut off at its deadline, with a clear reason.
    let status = match tokio::time::timeout(Duration::from_secs(120), upload).await {
        Err(_) => bail!("the trickling upload was never cut off"),
        Ok(joined) => match joined? {
            Ok(resp) => bail!("the trickling upload was accepted: {resp:?}"),
            Err(status) => status,
        },
    };
    feeder.abort();
    ensure!(
        status.code() == tonic::Code::DeadlineExceeded,
        "trickle refused with {status:?}"
    );
    ensure!(
        status.message().contains("timed out") && status.message().contains(&out_path.to_string()),
        "unclear refusal: {status:?}"
    );
    let cut_after = trickle_started.elapsed();
    ensure!(
        cut_after >= Duration::from_secs(UPLOAD_GRACE_SECS),
        "cut after {cut_after:?}, before its deadline"
    );

    // The cache serves what the builder built, and nothing of the claim is left.
    let (code, body) = http_get(
        &farm.coordinator.endpoints.http,
        &format!("/{}.narinfo", out_path.hash_part()),
    )
    .await?;
    ensure!(code == 200, "narinfo: HTTP {code}");
    let ni = NarInfo::parse(std::str::from_utf8(&body)?)?;
    let expected = farm_nix::nar::nar_of_bytes(built_contents);
    ensure!(
        ni.info.nar_hash == HashAlgo::Sha256.digest(&expected)
            && ni.info.nar_size == expected.len() as u64,
        "the cache holds something else than the builder's output: {ni:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_starting_with(&tmp_dir, out_path.hash_part()).is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the claim's temporary object stayed: {:?}",
            files_starting_with(&tmp_dir, out_path.hash_part())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let witness = farm.witness_lines()?;
    ensure!(
        witness == vec![("hostage".to_string(), "builder".to_string())],
        "{witness:?}"
    );
    Ok(())
}

#[test]
fn nix_copy_of_a_path_over_max_nar_size_is_refused_with_the_reason() -> anyhow::Result<()> {
    let logs = TestLogs::new("liveness_cache_copy")?;
    deadline_async(TEST_DEADLINE, &logs, copy_test)
}

/// `nix copy --to ssh-ng://` as the client with its push key (a build key's
/// upload stays its own unsigned claim, not served over HTTP), killed if the
/// test's deadline passes.
async fn nix_copy_to(farm: &Farm, path: &StorePath) -> anyhow::Result<std::process::Output> {
    let push_key = farm
        .own_ssh()?
        .admin_keys
        .first()
        .context("the farm has no push key")?
        .clone();
    let mut cmd = farm.client.tokio_command("nix");
    cmd.env("NIX_SSHOPTS", farm.ssh_opts_with_key(&push_key)?)
        .args(["copy", "--to", &farm.store_uri("ssh-ng"), &path.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = cmd.output().await?;
    farm.logs.record(
        format!("[client] $ nix copy --to ssh-ng:// {path}"),
        format!(
            "exit: {}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    );
    Ok(out)
}

async fn copy_test(logs: TestLogs) -> anyhow::Result<()> {
    const MAX: u64 = 64 << 10;
    let conf_dir = tempfile::tempdir()?;
    let config = conf_dir.path().join("coordinator.toml");
    std::fs::write(&config, format!("[cache]\nmax_nar_size = {MAX}\n"))?;
    let farm = Farm::nix_endpoint(&logs, &["--config".as_ref(), config.as_os_str()])?;
    let expr = farm.client.write_file(
        "sizes.nix",
        "let mk = name: script: derivation { inherit name; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" script ]; };\n\
         in [ (mk \"copy-small\" \"echo small > $out\") (mk \"copy-large\" \"/usr/bin/head -c 200000 /dev/zero > $out\") (mk \"copy-after\" \"echo after > $out\") ]\n",
    )?;
    let outs = farm.client.nix_build(&expr, &[] as &[&str])?;
    ensure!(outs.len() == 3, "{outs:?}");
    let (small, large, after) = (&outs[0], &outs[1], &outs[2]);

    let out = nix_copy_to(&farm, small).await?;
    ensure!(out.status.success(), "the small copy failed: {out:?}");
    let out = nix_copy_to(&farm, large).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the large copy succeeded: {stderr}");
    ensure!(
        stderr.contains("larger than the cache accepts") && stderr.contains(&MAX.to_string()),
        "unclear refusal: {stderr}"
    );

    let http = &farm.coordinator.endpoints.http;
    for (path, present) in [(small, true), (large, false)] {
        let (code, _) = http_get(http, &format!("/{}.narinfo", path.hash_part())).await?;
        ensure!(
            (code == 200) == present,
            "{path}: HTTP {code} for its narinfo"
        );
    }
    // The refusal failed that session only: the next copy goes through.
    let out = nix_copy_to(&farm, after).await?;
    ensure!(
        out.status.success(),
        "a copy after the refusal failed: {out:?}"
    );
    let (code, _) = http_get(http, &format!("/{}.narinfo", after.hash_part())).await?;
    ensure!(code == 200, "{after}: HTTP {code} for its narinfo");
    Ok(())
}
