//! Resource-exhaustion attacks on the farm's Nix endpoint, with the real
//! coordinator, real `ssh` and real Nix 2.8 as the honest client:
//! - oversized protocol messages (a BasicDerivation whose env values are each
//!   legal but together far over the per-message budget, a QueryValidPaths of
//!   paths totalling far over it) over ssh-ng:// (worker) and ssh:// (serve):
//!   each is refused with a clear message and its connection closed, the
//!   coordinator's peak RSS (VmHWM) stays bounded, and an honest client's
//!   build, running meanwhile, succeeds;
//! - 200 idle unauthenticated SSH connections while an honest client builds:
//!   those past the connection limit are refused with a message, the rest
//!   are dropped after the login grace time, the honest build succeeds and new
//!   clients get in again.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use farm_nix::store_path::StorePath;
use farm_nix::wire;
use farm_tests::fixture::*;

/// Each test's hang-guard.
const DEADLINE: Duration = Duration::from_secs(400);
/// How much the coordinator's peak RSS may reach, whatever the attacks send
/// (each sends ~100 MiB; the default budget refuses them past 64 MiB).
const RSS_BOUND_KIB: u64 = 300 * 1024;

/// `VmHWM` (peak resident set) of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/PID/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?)
}

/// Encode with farm-nix's wire writer.
fn enc(f: impl AsyncFnOnce(&mut Vec<u8>) -> Result<(), wire::WireError>) -> Vec<u8> {
    let mut out = Vec::new();
    futures::executor::block_on(f(&mut out)).expect("writing to a Vec");
    out
}

fn u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn string(s: &str) -> Vec<u8> {
    enc(async |w| wire::write_string(w, s).await)
}

fn path(name: &str) -> StorePath {
    StorePath::make(
        "text",
        &farm_nix::hash::HashAlgo::Sha256.digest(name.as_bytes()),
        name,
    )
    .unwrap()
}

/// A BasicDerivation up to its env, whose env then claims 4096 entries of
/// 1 MiB each (every value is under the 64 MiB string limit).
fn basic_derivation_head(out: &StorePath) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(u64s(&[1]));
    v.extend(string("out"));
    v.extend(string(&out.to_string()));
    v.extend(string(""));
    v.extend(string(""));
    v.extend(u64s(&[0])); // inputSrcs
    v.extend(string("x86_64-linux"));
    v.extend(string("/bin/sh"));
    v.extend(u64s(&[0])); // args
    v.extend(u64s(&[4096])); // env entries
    v
}

/// The i-th env entry of the flood: a distinct key and 1 MiB of value.
fn env_entry(i: usize) -> Vec<u8> {
    let mut v = string(&format!("k{i}"));
    v.extend(string(&"v".repeat(1 << 20)));
    v
}

/// The i-th path of a flood: a distinct long name (200 characters) under
/// one hash part (distinct paths all the same, and cheap to make).
fn long_path(i: usize) -> Vec<u8> {
    static HASH_PART: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hash = HASH_PART.get_or_init(|| path("flood").hash_part().to_owned());
    string(&format!("/nix/store/{hash}-{i:08}-{}", "p".repeat(191)))
}

/// One attack: its name, the program it asks for, the bytes before the
/// flood, and the flood's i-th item.
type Attack = (
    &'static str,
    &'static str,
    Vec<u8>,
    Box<dyn Fn(usize) -> Vec<u8>>,
);

/// What one attack sent and how it ended.
struct Outcome {
    sent: u64,
    stderr: String,
    success: bool,
}

/// How many sessions the coordinator has closed for an oversized message.
fn refusals(farm: &Farm) -> usize {
    farm.coordinator
        .process
        .log()
        .matches("protocol message too large")
        .count()
}

/// Run `ssh … nix@127.0.0.1 PROGRAM`, send `head`, then `item(i)` for as
/// long as the farm reads (at most `max_bytes`), then wait for the farm to
/// end the session by itself.
fn attack(
    farm: &Farm,
    program: &str,
    head: Vec<u8>,
    item: impl Fn(usize) -> Vec<u8>,
    max_bytes: u64,
) -> anyhow::Result<Outcome> {
    let err_file = tempfile::NamedTempFile::new()?;
    let mut ssh = std::process::Command::new("ssh");
    ssh.args(farm.ssh_opts()?.split_whitespace())
        .args(["nix@127.0.0.1", program])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(err_file.reopen()?);
    let mut child = ssh.spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut sent = 0u64;
    let mut write = |b: &[u8], sent: &mut u64| -> bool {
        if stdin.write_all(b).is_err() {
            return false;
        }
        *sent += b.len() as u64;
        true
    };
    if write(&head, &mut sent) {
        let mut i = 0;
        while sent < max_bytes && write(&item(i), &mut sent) {
            i += 1;
        }
    }
    // Keep stdin open: the farm must end the session by itself.
    let status = wait_exit(&mut child, Duration::from_secs(60))
        .context("the farm did not end the oversized session")?;
    drop(stdin);
    let mut stderr = String::new();
    std::fs::File::open(err_file.path())?.read_to_string(&mut stderr)?;
    Ok(Outcome {
        sent,
        stderr,
        success: status.success(),
    })
}

fn wait_exit(child: &mut Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > end {
            let _ = child.kill();
            bail!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start an honest `nix-build` over ssh-ng of a derivation that sleeps
/// `secs`, and wait until the farm runs it (so its SSH session is up).
fn start_honest_build(farm: &Farm, salt: &str, secs: u32) -> anyhow::Result<(Child, String)> {
    let expected = format!("honest {salt}");
    let expr = farm.client.write_file(
        &format!("{salt}.nix"),
        &farm_tests::sh_derivation(salt, &format!("/bin/sleep {secs}; echo {expected} > $out")),
    )?;
    let mut cmd = farm.client_command("nix-build")?;
    cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
        .arg(farm.machines("ssh-ng"))
        .arg(&expr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let end = Instant::now() + Duration::from_secs(120);
    while !farm.builds_run().keys().any(|d| d.contains(salt)) {
        ensure!(
            Instant::now() < end,
            "the honest build never started on the farm"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((child, expected))
}

fn finish_honest_build(farm: &Farm, child: Child, expected: &str) -> anyhow::Result<()> {
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the honest build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = StorePath::parse(String::from_utf8_lossy(&out.stdout).trim())
        .context("nix-build printed no path")?;
    let content = std::fs::read_to_string(farm.client.host_path_of(&top))?;
    ensure!(
        content.trim() == expected,
        "wrong honest output: {content:?}"
    );
    Ok(())
}

#[test]
fn oversized_messages_are_refused_with_bounded_memory() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("attack_bounds_oversized")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        let mut farm = Farm::nix_endpoint(&logs, &[] as &[&str])?;
        oversized(&mut farm)
    })
}

fn oversized(farm: &mut Farm) -> anyhow::Result<()> {
    let pid = farm.coordinator.process.pid();
    let before = peak_rss_kib(pid)?;
    println!(
        "coordinator VmHWM before the attacks: {} MiB",
        before / 1024
    );
    let (honest, expected) = start_honest_build(farm, "bounds-oversized", 6)?;

    let max = 100u64 << 20;
    let drv = path("attack.drv");
    let out = path("attack");
    let mut worker_hello = u64s(&[farm_nix::worker::WORKER_MAGIC_1, 0x122, 0, 0]);
    let serve_hello = u64s(&[farm_nix::serve::SERVE_MAGIC_1, 0x205]);

    let mut attacks: Vec<Attack> = Vec::new();
    // ssh-ng: BuildDerivation with 1 MiB env values.
    let mut head = worker_hello.clone();
    head.extend(u64s(&[farm_nix::worker::WorkerOp::BuildDerivation as u64]));
    head.extend(string(&drv.to_string()));
    head.extend(basic_derivation_head(&out));
    attacks.push((
        "ssh-ng BuildDerivation",
        "nix-daemon --stdio",
        head,
        Box::new(env_entry),
    ));
    // ssh-ng: QueryValidPaths of 500 000 long paths (under the element budget, over the byte one).
    let mut head = std::mem::take(&mut worker_hello);
    head.extend(u64s(&[
        farm_nix::worker::WorkerOp::QueryValidPaths as u64,
        500_000,
    ]));
    attacks.push((
        "ssh-ng QueryValidPaths",
        "nix-daemon --stdio",
        head,
        Box::new(long_path),
    ));
    // ssh://: BuildDerivation.
    let mut head = serve_hello.clone();
    head.extend(u64s(&[
        farm_nix::serve::ServeCommand::BuildDerivation as u64
    ]));
    head.extend(string(&drv.to_string()));
    head.extend(basic_derivation_head(&out));
    attacks.push((
        "ssh BuildDerivation",
        "nix-store --serve --write",
        head,
        Box::new(env_entry),
    ));
    // ssh://: QueryValidPaths.
    let mut head = serve_hello;
    head.extend(u64s(&[
        farm_nix::serve::ServeCommand::QueryValidPaths as u64,
        0,
        0,
        500_000,
    ]));
    attacks.push((
        "ssh QueryValidPaths",
        "nix-store --serve --write",
        head,
        Box::new(long_path),
    ));

    for (what, program, head, item) in attacks {
        let refusals_before = refusals(farm);
        let o = attack(farm, program, head, item, max)?;
        let peak = peak_rss_kib(pid)?;
        println!(
            "{what}: sent {} MiB before the farm closed it; coordinator VmHWM now {} MiB; farm said: {}",
            o.sent >> 20,
            peak / 1024,
            o.stderr.trim()
        );
        ensure!(!o.success, "{what}: the session succeeded");
        // The refusal reaches the client on the session's stderr; when the
        // attacker's ssh exits on its broken stdin before reading the last
        // bytes, the coordinator's log still records why it closed.
        ensure!(
            o.stderr.contains("protocol message too large") || refusals(farm) > refusals_before,
            "{what}: no clear refusal: {:?}",
            o.stderr
        );
        ensure!(o.sent < max, "{what}: the farm read all {max} bytes");
        ensure!(
            peak < RSS_BOUND_KIB,
            "{what}: coordinator peak RSS {} MiB over the bound",
            peak / 1024
        );
    }

    // The honest build went on meanwhile, and new clients are served.
    finish_honest_build(farm, honest, &expected)?;
    let mut cmd = farm.client_command("nix")?;
    cmd.args(["store", "ping", "--store", &farm.store_uri("ssh-ng")]);
    farm.client.run_command(cmd)?;
    // No attack path reached the cache.
    ensure!(!farm.cache_has(&out)?, "an attack's output is in the cache");
    println!(
        "coordinator VmHWM after the attacks: {} MiB",
        peak_rss_kib(pid)? / 1024
    );
    Ok(())
}

#[test]
fn idle_unauthenticated_connections_are_bounded() -> anyhow::Result<()> {
    let logs = farm_tests::TestLogs::new("attack_bounds_idle")?;
    farm_tests::deadline(DEADLINE, &logs, |logs| {
        let mut farm = Farm::nix_endpoint(
            &logs,
            &["--ssh-login-grace", "2", "--ssh-max-connections", "100"],
        )?;
        idle(&mut farm)
    })
}

fn idle(farm: &mut Farm) -> anyhow::Result<()> {
    let port = farm.coordinator.endpoints.ssh_port()?;
    let (honest, expected) = start_honest_build(farm, "bounds-idle", 8)?;

    // 200 connections that send an SSH banner and nothing more.
    let t0 = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"SSH-2.0-idle\r\n")?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        conns.push(s);
    }
    let (mut refused, mut dropped) = (0, 0);
    for mut s in conns {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => bail!("an idle connection was not closed by the farm: {e}"),
            }
        }
        if String::from_utf8_lossy(&got).contains("too many SSH connections") {
            refused += 1;
        } else {
            ensure!(
                got.is_empty() || got.starts_with(b"SSH-2.0-"),
                "unexpected answer {:?}",
                String::from_utf8_lossy(&got)
            );
            dropped += 1;
        }
    }
    let took = t0.elapsed();
    println!(
        "200 idle connections: {refused} refused past the limit, {dropped} dropped after the grace time, all closed within {took:?}"
    );
    // The honest build's connection holds one of the 100 slots.
    ensure!(refused >= 100, "only {refused} refused past a limit of 100");
    ensure!((1..=99).contains(&dropped), "{dropped} admitted");
    ensure!(
        took >= Duration::from_millis(1900),
        "dropped before the grace time"
    );

    finish_honest_build(farm, honest, &expected)?;
    // Once they are gone, a new client gets in.
    let mut cmd = farm.client_command("nix")?;
    cmd.args(["store", "ping", "--store", &farm.store_uri("ssh-ng")]);
    farm.client.run_command(cmd)?;
    Ok(())
}
