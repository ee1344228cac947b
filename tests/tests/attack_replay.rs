//! Attack: replaying the `farm` CLI's signed calls. Real `farm` calls are
//! captured on their way to the coordinator (a recording proxy between the
//! real `farm` binary and the real `farm-coordinator`, holding each captured
//! call back so its signature is still unused), then a Submit, an UploadNar
//! and a Cancel are each sent (c) unchanged to a second coordinator that
//! trusts the same key, (a) with a changed body to the first, then once as
//! they were (the delayed honest call: accepted) and (b) a second time: every
//! attempt but the honest one is refused as unauthenticated, and the
//! coordinators' state (`farm status --json`, the cache files, the
//! submissions) is unchanged by them. And: `farm` refuses plaintext to a
//! non-loopback address before trying any connection (counted by the
//! kernel, in a network namespace of its own where that address is local).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use farm_proto::auth::methods;
use farm_proto::v1;
use farm_tests::fixture::{BuilderSpec, ClientKey, Farm, SshAccess, graph_expr, ssh_key};
use farm_tests::recorder::{Answer, GrpcRecorder, Recorded, frames, replay};
use farm_tests::{Coordinator, TestLogs, deadline, farm_bin};
use prost::Message;
use tonic::codegen::Bytes;

/// Each test's hang-guard.
const DEADLINE: Duration = Duration::from_secs(400);

#[test]
fn replayed_calls_are_refused() -> anyhow::Result<()> {
    let logs = TestLogs::new("attack_replay")?;
    deadline(DEADLINE, &logs, |logs| replayed(&logs))
}

/// What a replay could change: the status, the cache's files.
type Snapshot = (
    serde_json::Value,
    BTreeMap<PathBuf, (u64, std::time::SystemTime)>,
);

/// `farm status --json` without what changes by itself (builder load, last seen).
fn status(farm: &Farm, admin: &Path) -> anyhow::Result<serde_json::Value> {
    let mut s = farm.status(Some(admin))?;
    if let Some(bs) = s["builders"].as_array_mut() {
        for b in bs {
            *b = serde_json::json!({
                "name": b["name"], "state": b["state"], "running_jobs": b["running_jobs"],
            });
        }
    }
    Ok(s)
}

fn snapshot_a(farm: &Farm, admin: &Path) -> anyhow::Result<Snapshot> {
    Ok((status(farm, admin)?, farm.coordinator.cache_files()?))
}

fn snapshot_b(b: &Coordinator) -> anyhow::Result<Snapshot> {
    let status = b.status()?;
    Ok((
        serde_json::json!({
            "builders": status.builders.len(),
            "queue": status.queue.iter().map(|q| q.queued).sum::<u32>(),
            "running": status.running.len(),
        }),
        b.cache_files()?,
    ))
}

/// Whether the coordinator at `url` knows submission `sid` (a signed Watch).
fn submission_known(url: &str, key: &ClientKey, sid: &str) -> anyhow::Result<bool> {
    let (url, key, sid) = (url.to_owned(), key.clone(), sid.to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect()
            .await?;
        let mut client = v1::farm_service_client::FarmServiceClient::new(channel);
        let identity = farm_common::sign::learn_identity(&mut client).await?;
        let mut req = tonic::Request::new(v1::WatchRequest { submission_id: sid });
        key.sign(&mut req, methods::WATCH, &identity)?;
        match client.watch(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(s.into()),
        }
    })
}

fn refused(answer: &Answer, what: &str, expect: &str) {
    assert_eq!(
        answer.code,
        tonic::Code::Unauthenticated,
        "{what}: {answer:?}"
    );
    assert!(answer.message.contains(expect), "{what}: {answer:?}");
}

/// Run `farm ARGS…` (admin key) through the recorder, which holds `path`;
/// returns the one call to `path` it captured.
fn capture(
    farm: &Farm,
    rec: &GrpcRecorder,
    admin: &Path,
    path: &str,
    args: &[&str],
) -> anyhow::Result<Recorded> {
    rec.hold(&[path]);
    let before = rec.calls(path).len();
    let mut full = vec!["--coordinator", rec.url()];
    full.extend_from_slice(args);
    let out = farm.run(Some(admin), &full)?;
    assert!(
        !out.status.success(),
        "the held call cannot succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = rec.calls(path);
    anyhow::ensure!(
        calls.len() == before + 1,
        "farm {args:?} made {} calls to {path}",
        calls.len() - before
    );
    let call = calls[before].clone();
    for k in [
        "x-farm-key",
        "x-farm-sig",
        "x-farm-nonce",
        "x-farm-body-sha256",
    ] {
        anyhow::ensure!(
            call.headers.contains_key(k),
            "{path}: no {k} in {:?}",
            call.headers
        );
    }
    Ok(call)
}

/// The call with its first message replaced by `tamper(first)`.
fn tampered<M: Message + Default>(
    call: &Recorded,
    tamper: impl FnOnce(&mut M),
) -> anyhow::Result<Bytes> {
    let mut messages = call.messages()?;
    let mut first = M::decode(messages[0].clone())?;
    tamper(&mut first);
    messages[0] = Bytes::from(first.encode_to_vec());
    Ok(frames(&messages))
}

/// (c), (a), the honest call, (b) for one captured call; `after_honest`
/// checks what the honest call did.
fn attack(
    what: &str,
    farm: &Farm,
    b: &Coordinator,
    admin: &Path,
    call: &Recorded,
    changed: Bytes,
) -> anyhow::Result<()> {
    let a_url = farm.grpc_url();
    let a0 = snapshot_a(farm, admin)?;
    let b0 = snapshot_b(b)?;
    // (c) Against a second coordinator trusting the same key.
    let ans = replay(&b.grpc_url(), call, call.body.clone())?;
    refused(
        &ans,
        &format!("{what} on the second coordinator"),
        "another coordinator",
    );
    assert_eq!(snapshot_b(b)?, b0, "{what}: the second coordinator changed");
    // (a) With a changed body.
    let ans = replay(&a_url, call, changed)?;
    refused(
        &ans,
        &format!("{what} with a changed body"),
        "not the one that was signed",
    );
    assert_eq!(
        snapshot_a(farm, admin)?,
        a0,
        "{what}: a changed body changed the farm"
    );
    // The honest call, delayed: accepted once.
    let ans = replay(&a_url, call, call.body.clone())?;
    assert_eq!(
        ans.code,
        tonic::Code::Ok,
        "{what}, the honest call: {ans:?}"
    );
    let a1 = snapshot_a(farm, admin)?;
    // (b) The same call a second time.
    let ans = replay(&a_url, call, call.body.clone())?;
    refused(&ans, &format!("{what} a second time"), "already made once");
    assert_eq!(
        snapshot_a(farm, admin)?,
        a1,
        "{what}: the second use changed the farm"
    );
    Ok(())
}

fn replayed(logs: &TestLogs) -> anyhow::Result<()> {
    let access = SshAccess::named(&[], &["admin"])?;
    let admin = access.admin_keys[0].clone();
    // A drained builder: what is submitted stays queued, so a replayed
    // Submit or Cancel would show in the status.
    let farm = Farm::setup(logs)
        .builders(&[BuilderSpec {
            name: "b1",
            max_jobs: 1,
            conf: &[],
        }])
        .access(&access)
        .start()?;
    farm.wait_for_builders(Some(&admin), 1)?;
    assert!(farm.run(Some(&admin), &["drain", "b1"])?.status.success());
    let mut b_args = access.coordinator_args();
    b_args.extend(["--cache-key-name".to_owned(), "farm-b".to_owned()]);
    let b = Coordinator::start_signed(logs, &b_args, access.probe_key()?)?;
    assert_ne!(
        b.endpoints.cache_public_key, farm.coordinator.endpoints.cache_public_key,
        "two coordinators, two identities"
    );
    let rec = GrpcRecorder::start(&farm.grpc_url())?;
    let salt = farm.client.root().display().to_string();
    let one = farm
        .client
        .write_file("one.nix", &graph_expr(1, 0.1, &salt, None))?;
    let two = farm
        .client
        .write_file("two.nix", &graph_expr(1, 0.1, &format!("{salt}-two"), None))?;
    let (one, two) = (one.display().to_string(), two.display().to_string());

    // Captures: a Submit (its uploads go through), an UploadNar, a Cancel.
    let submit = capture(
        &farm,
        &rec,
        &admin,
        methods::SUBMIT,
        &["build", &one, "-A", "d0"],
    )?;
    let upload = capture(
        &farm,
        &rec,
        &admin,
        methods::UPLOAD_NAR,
        &["build", &two, "-A", "d0"],
    )?;
    let cancel = capture(&farm, &rec, &admin, methods::CANCEL, &["cancel", "s999"])?;
    let key = ClientKey::load(&admin)?;
    assert!(!submission_known(&farm.grpc_url(), &key, "s1")?);

    // Submit: the attacker asks for a 1-second timeout (the build would fail).
    let changed = tampered::<v1::SubmitRequest>(&submit, |m| m.build_timeout_secs = 1)?;
    attack("Submit", &farm, &b, &admin, &submit, changed)?;
    assert!(
        submission_known(&farm.grpc_url(), &key, "s1")?,
        "the honest Submit is s1"
    );
    assert!(
        !submission_known(&farm.grpc_url(), &key, "s2")?,
        "no replayed Submit made a submission"
    );
    let now = status(&farm, &admin)?;
    assert_eq!(
        now["queued_total"], 1,
        "the honest submission's build is queued: {now}"
    );

    // UploadNar: the attacker renames the path under the same hash part.
    let info = match v1::UploadNarRequest::decode(upload.messages()?[0].clone())?.msg {
        Some(v1::upload_nar_request::Msg::Info(i)) => i,
        other => anyhow::bail!("the first UploadNar message is {other:?}"),
    };
    let path = farm_nix::StorePath::parse(&info.store_path)?;
    assert!(!farm.cache_has(&path)?, "{path} was held back");
    let changed = tampered::<v1::UploadNarRequest>(&upload, |m| {
        if let Some(v1::upload_nar_request::Msg::Info(i)) = &mut m.msg {
            i.store_path = format!("/nix/store/{}-evil", path.hash_part());
        }
    })?;
    attack("UploadNar", &farm, &b, &admin, &upload, changed)?;
    assert!(
        farm.cache_has(&path)?,
        "the honest upload of {path} went in"
    );
    let (_, narinfo) = farm_tests::fixture::http_get_blocking(
        &farm.coordinator.endpoints.http,
        &format!("/{}.narinfo", path.hash_part()),
    )?;
    let narinfo = String::from_utf8(narinfo)?;
    assert!(narinfo.contains(&format!("StorePath: {path}")), "{narinfo}");

    // Cancel: the attacker turns "cancel s999" into "cancel s1".
    let changed = tampered::<v1::CancelRequest>(&cancel, |m| m.id = "s1".into())?;
    let queued = status(&farm, &admin)?;
    attack("Cancel", &farm, &b, &admin, &cancel, changed)?;
    let now = status(&farm, &admin)?;
    assert_eq!(now, queued, "nothing was cancelled");
    assert_eq!(now["queued_total"], 1, "s1's build is still queued: {now}");
    Ok(())
}

#[test]
fn plaintext_to_a_non_loopback_host_is_refused_before_connecting() -> anyhow::Result<()> {
    let logs = TestLogs::new("attack_replay_plaintext")?;
    deadline(DEADLINE, &logs, |logs| plaintext(&logs))
}

/// `farm ARGS…` in a network namespace of its own where 192.0.2.1 (TEST-NET-1,
/// never routed) is a local address: its output, and how many TCP connections
/// the namespace tried (`ActiveOpens` in its /proc/net/snmp).
fn in_netns(logs: &TestLogs, key: &Path, args: &[&str]) -> anyhow::Result<(String, u64, Duration)> {
    let home = tempfile::tempdir()?;
    let farm = farm_bin("farm")?;
    let script = "set -e; ip link set lo up; ip addr add 192.0.2.1/32 dev lo; \
         set +e; \"$0\" \"$@\" 2>&1; echo \"exit=$?\"; \
         awk '/^Tcp:/ { if (h) print \"active_opens=\" $6; h = 1 }' /proc/net/snmp";
    let started = Instant::now();
    let out = std::process::Command::new("unshare")
        .args(["--net", "bash", "-c", script])
        .arg(&farm)
        .arg("--key")
        .arg(key)
        .args(args)
        .env("HOME", home.path())
        .env_remove("FARM_COORDINATOR")
        .env_remove("FARM_KEY")
        .env_remove("FARM_INSECURE_PLAINTEXT")
        .env_remove("FARM_CONFIG")
        .output()?;
    let elapsed = started.elapsed();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    logs.record(
        format!("$ farm {} (own netns)", args.join(" ")),
        text.clone(),
    );
    let opens = text
        .lines()
        .find_map(|l| l.strip_prefix("active_opens="))
        .with_context(|| format!("no TCP counters: {text}"))?
        .trim()
        .parse()?;
    Ok((text, opens, elapsed))
}

fn plaintext(logs: &TestLogs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("id_ed25519");
    ssh_key(&key, "me@test")?;
    let (text, opens, elapsed) = in_netns(
        logs,
        &key,
        &["--coordinator", "http://192.0.2.1:7070", "status"],
    )?;
    assert!(!text.contains("exit=0"), "{text}");
    assert!(
        text.contains("--insecure-plaintext") && text.contains("https://"),
        "the error says what to do: {text}"
    );
    assert!(text.contains("nothing was sent"), "{text}");
    assert_eq!(opens, 0, "farm tried a connection: {text}");
    // No connect attempt, so no connect timeout (10 s) either.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    // The control: forced, the same command does dial (and the counter sees it).
    let (text, opens, _) = in_netns(
        logs,
        &key,
        &[
            "--coordinator",
            "http://192.0.2.1:7070",
            "--insecure-plaintext",
            "status",
        ],
    )?;
    assert!(!text.contains("exit=0"), "nothing listens there: {text}");
    assert!(opens >= 1, "the forced call did not dial: {text}");
    Ok(())
}
