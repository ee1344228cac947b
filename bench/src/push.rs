//! The push case: a ~485 MB mixed path (64 × 4 MiB random files, 2000 text
//! files of growing size, a copy of `/usr/share/doc`) in the client's store,
//! pushed into the farm's cache with `nix copy --to ssh-ng://` (the push
//! key), against what the bytes cost without the farm: `nix-store --dump |
//! zstd -1` in the client, and the same through OpenSSH (`ssh` to an `sshd`
//! in another actor, the cipher the farm's endpoint is asked for, `zstd -1`
//! on the far side).

use std::io::Write as _;

use anyhow::{Context as _, ensure};
use farm_tests::fixture::*;
use farm_tests::{Actor, TestLogs};

use crate::report::{CaseReport, Figure};
use crate::run::{require, timed};
use crate::sshd;

/// Writes the mixed tree under `dir`.
fn make_tree(dir: &std::path::Path) -> anyhow::Result<()> {
    let random = dir.join("random");
    std::fs::create_dir_all(&random)?;
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut buf = vec![0u8; 4 << 20];
    for i in 0..64 {
        std::io::Read::read_exact(&mut urandom, &mut buf)?;
        std::fs::write(random.join(format!("r{i:02}.bin")), &buf)?;
    }
    let text = dir.join("text");
    std::fs::create_dir_all(&text)?;
    for i in 0..2000usize {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(text.join(format!("t{i:04}.txt")))?);
        let mut written = 0;
        let mut line = 0;
        while written < 45 * i {
            let l = format!("file {i} line {line}: the quick brown fox jumps over the lazy dog\n");
            f.write_all(l.as_bytes())?;
            written += l.len();
            line += 1;
        }
        f.flush()?;
    }
    let out = std::process::Command::new("cp")
        .args(["-a", "/usr/share/doc"])
        .arg(dir.join("doc"))
        .output()?;
    ensure!(
        out.status.success(),
        "cp -a /usr/share/doc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn run(logs: &TestLogs) -> anyhow::Result<CaseReport> {
    require(&[
        ("zstd", "zstd"),
        ("/usr/sbin/sshd", "openssh-server"),
        ("ssh", "openssh-client"),
    ])?;
    // One builder, for the builder's upload path (one job: a copy of the path).
    let farm = Farm::setup(logs)
        .builders(&[BuilderSpec {
            name: "b-1",
            max_jobs: 1,
            conf: &[],
        }])
        .clients(1)
        .pushers(1)
        .start()?;
    let client = &farm.client;
    let tree = client.root().join("push-tree");
    make_tree(&tree)?;
    let path = client.add_to_store(&tree)?;
    std::fs::remove_dir_all(&tree)?;
    let info: serde_json::Value =
        serde_json::from_str(&client.run("nix", &["path-info", "--json", &path.to_string()])?)?;
    let nar_size = info[0]["narSize"].as_u64().context("narSize")?;
    let mut report = CaseReport::new(
        "push",
        format!(
            "one path of {:.0} MB NAR (64 × 4 MiB random, 2000 growing text files, /usr/share/doc) from the client's store; MB = 10^6 bytes of NAR",
            nar_size as f64 / 1e6
        ),
    );
    let p = path.to_string();

    // Baseline 1: the bytes, compressed, with no network.
    let mut cmd = client.command("sh");
    cmd.args([
        "-c",
        &format!("nix-store --dump {p} | zstd -1 -q -c > /dev/null"),
    ]);
    let t = timed(logs, "[client] nix-store --dump | zstd -1", cmd)?;
    let zstd_f = Figure::throughput("nix-store --dump | zstd -1", nar_size, t.time);

    // Baseline 2: through OpenSSH, the same cipher, zstd on the far side.
    let sink = Actor::with_logs("sink", logs)?;
    let key = farm.client_key()?.to_owned();
    let client_pub = std::fs::read_to_string(key.with_extension("pub"))?;
    let server = sshd::start(&sink, "sink", &client_pub)?;
    let config = sshd::client_config(&client.root().join("ssh-baseline"), &key, &[&server])?;
    let mut cmd = client.command("sh");
    cmd.args([
        "-c",
        &format!(
            "nix-store --dump {p} | ssh -F {} sink 'zstd -1 -q -c > /dev/null'",
            config.display()
        ),
    ]);
    let t = timed(logs, "[client] nix-store --dump | ssh zstd -1", cmd)?;
    let ssh_f = Figure::throughput(
        format!("nix-store --dump | ssh ({}) zstd -1", sshd::CIPHER),
        nar_size,
        t.time,
    );

    // The farm: `nix copy --to ssh-ng://` with the push key.
    let push_key = farm
        .own_ssh()?
        .admin_keys
        .first()
        .context("no push key")?
        .clone();
    let mut cmd = client.command("nix");
    cmd.args(["copy", "--to", &farm.store_uri("ssh-ng"), &p])
        .env(
            "NIX_SSHOPTS",
            format!(
                "{} -o Ciphers={}",
                farm.ssh_opts_with_key(&push_key)?,
                sshd::CIPHER
            ),
        );
    let t = timed(logs, "[client] nix copy --to ssh-ng://farm", cmd)?;
    ensure!(farm.cache_has(&path)?, "the cache lacks {path}");
    let copy_f = Figure::throughput("nix copy --to ssh-ng:// (farm ingest)", nar_size, t.time);

    report.row(&copy_f, &zstd_f, Some("≥ 0.9×"));
    report.row(&copy_f, &ssh_f, None);
    report.note(format!("farm ingest took {:.2} s", t.time.as_secs_f64()));

    // The builder's upload path (`BuilderService.UploadNar`, no SSH): a
    // derivation whose output is a copy of the path (the same files, so the
    // same NAR bytes under another name), built by the farm's builder; the
    // builder fetches the input from the cache, copies it, then dumps the
    // output from its store and uploads it: its `job phases` log line has the
    // upload's time (the dump through `nix-store --serve` and `UploadNar`,
    // until the coordinator acknowledged the ingest).
    let file = client.write_file(
        "copy.nix",
        &format!(
            "derivation {{\n  name = \"push-copy-{}\";\n  system = \"x86_64-linux\";\n  builder = \"/bin/sh\";\n  \
             args = [ \"-c\" \"/bin/cp -r ${{builtins.storePath {p}}} $out\" ];\n}}\n",
            crate::run::nonce()
        ),
    )?;
    let cmd = farm.farm_command(
        client,
        Some(&key),
        &["build", "--json", file.to_str().context("path")?],
    )?;
    let t = timed(logs, "[client] farm build (a copy of the path)", cmd)?;
    let log = farm.builders[0]
        .process
        .as_ref()
        .context("the builder is not running")?
        .log();
    let phases = log
        .lines()
        .rfind(|l| l.contains("job phases"))
        .context("the builder logged no `job phases` line")?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let v = phases
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .with_context(|| format!("no {name} in {phases:?}"))?;
        Ok(v.trim_matches('"').parse()?)
    };
    let upload_ms = field("upload_ms=")?;
    let fetch_ms = field("fetch_ms=")?;
    let build_ms = field("build_ms=")?;
    let up_f = Figure::throughput(
        "builder upload (dump + BuilderService.UploadNar, farm ingest)",
        nar_size,
        std::time::Duration::from_secs_f64(upload_ms / 1000.0),
    );
    report.row(&up_f, &zstd_f, Some("≥ 0.9×"));
    report.note(format!(
        "builder job (farm build of a copy of the path, {:.1} s in all): fetch of the input {:.0} ms ({:.0} MB/s), \
         cp -r {:.0} ms, upload {:.0} ms",
        t.time.as_secs_f64(),
        fetch_ms,
        nar_size as f64 / 1e3 / fetch_ms.max(1e-3),
        build_ms,
        upload_ms
    ));
    Ok(report)
}
