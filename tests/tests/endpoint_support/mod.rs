//! A whole farm for the Nix endpoint's end-to-end tests: a coordinator, two
//! builders (one also advertising `aarch64-darwin` through Nix's
//! `extra-platforms`), and a Nix client actor with its own store and SSH key.
//! The client reaches the coordinator's SSH endpoint with the system `ssh`
//! (`NIX_SSHOPTS` carries the port, key and a known_hosts file holding the
//! coordinator's host key).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use farm_nix::store_path::StorePath;
use farm_tests::{Actor, Coordinator, FarmProcess, TestLogs, farm_bin};

pub const X86_BUILDER: &str = "b-x86";
pub const DARWIN_BUILDER: &str = "b-darwin";

/// Each endpoint test's hang-guard.
pub const DEADLINE: Duration = Duration::from_secs(400);

pub struct TestFarm {
    pub logs: TestLogs,
    pub coordinator: Coordinator,
    pub builders: Vec<(Actor, FarmProcess)>,
    pub client: Actor,
    /// The client's private key (authorized on the farm).
    pub client_key: PathBuf,
    pub known_hosts: PathBuf,
    pub ssh_port: u16,
}

/// `ssh-keygen` a fresh ed25519 key at `path` (and `path.pub`).
pub fn ssh_keygen(path: &std::path::Path) -> anyhow::Result<String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "nix-client@test",
            "-f",
        ])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(std::fs::read_to_string(path.with_extension("pub"))?)
}

impl TestFarm {
    /// The farm, logging to `logs`.
    pub fn start(logs: &TestLogs) -> anyhow::Result<TestFarm> {
        Self::start_with(logs, &[])
    }

    /// [`TestFarm::start`] with extra coordinator arguments.
    pub fn start_with(logs: &TestLogs, extra: &[&std::ffi::OsStr]) -> anyhow::Result<TestFarm> {
        let logs = logs.clone();
        let client = Actor::with_logs("client", &logs)?;
        let b_x86 = Actor::with_logs(X86_BUILDER, &logs)?;
        let b_darwin = Actor::with_logs(DARWIN_BUILDER, &logs)?;
        b_darwin.nix_conf_append("extra-platforms = aarch64-darwin")?;

        // Keys: the builders' (enrolled), the client's (authorized).
        let builder_bin = farm_bin("farm-builder")?;
        let mut builder_keys = String::new();
        for b in [&b_x86, &b_darwin] {
            let state = b.state_dir("farm-builder")?;
            let mut cmd = b.command(&builder_bin);
            cmd.args(["--coordinator", "http://127.0.0.1:1", "--print-public-key"])
                .arg("--state-dir")
                .arg(&state);
            builder_keys.push_str(b.run_command(cmd)?.trim());
            builder_keys.push('\n');
        }
        let keys_dir = client.root().join("farm-keys");
        std::fs::create_dir_all(&keys_dir)?;
        let builder_keys_file = keys_dir.join("builder_keys");
        std::fs::write(&builder_keys_file, builder_keys)?;
        let client_key = client.root().join("home/.ssh/id_ed25519");
        let client_pub = ssh_keygen(&client_key)?;
        let authorized = keys_dir.join("authorized_keys");
        std::fs::write(&authorized, &client_pub)?;

        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--authorized-keys".as_ref(),
            authorized.as_os_str(),
            "--builder-keys".as_ref(),
            builder_keys_file.as_os_str(),
        ];
        args.extend_from_slice(extra);
        let coordinator = Coordinator::start(&logs, &args)?;
        let ssh_port = coordinator.endpoints.ssh_port()?;
        let known_hosts = keys_dir.join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!(
                "[127.0.0.1]:{ssh_port} {}\n",
                coordinator.endpoints.ssh_host_key
            ),
        )?;

        let mut builders = Vec::new();
        for (actor, name) in [(b_x86, X86_BUILDER), (b_darwin, DARWIN_BUILDER)] {
            let state = actor.state_dir("farm-builder")?;
            let process = actor.spawn(
                "farm-builder",
                &builder_bin,
                &[
                    "--coordinator".as_ref(),
                    coordinator.endpoints.grpc_url().as_ref(),
                    "--state-dir".as_ref(),
                    state.as_os_str(),
                    "--name".as_ref(),
                    name.as_ref(),
                    "--max-jobs".as_ref(),
                    "4".as_ref(),
                ],
            )?;
            builders.push((actor, process));
        }
        let mut farm = TestFarm {
            logs,
            coordinator,
            builders,
            client,
            client_key,
            known_hosts,
            ssh_port,
        };
        for name in [X86_BUILDER, DARWIN_BUILDER] {
            farm.wait_for_coordinator_log(
                |l| l.contains("builder online") && l.contains(name),
                Duration::from_secs(60),
            )
            .with_context(|| format!("builder {name} never came online"))?;
        }
        Ok(farm)
    }

    /// Wait until a line of the coordinator's log satisfies `pred`.
    pub fn wait_for_coordinator_log(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.coordinator.process.log().lines().any(&pred) {
                return Ok(());
            }
            self.coordinator.process.ensure_running()?;
            if Instant::now() > deadline {
                bail!("timed out waiting for the coordinator's log");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `NIX_SSHOPTS` for the client: port, key, and the coordinator's host key.
    pub fn ssh_opts(&self) -> String {
        self.ssh_opts_with_key(&self.client_key)
    }

    pub fn ssh_opts_with_key(&self, key: &std::path::Path) -> String {
        format!(
            "-p {} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
            self.ssh_port,
            key.display(),
            self.known_hosts.display()
        )
    }

    /// The store URI of the farm for `scheme` (`ssh` or `ssh-ng`).
    pub fn store_uri(&self, scheme: &str) -> String {
        format!("{scheme}://nix@127.0.0.1")
    }

    /// A machines line (`--builders`) for the farm, both systems.
    pub fn machines(&self, scheme: &str) -> String {
        format!(
            "{} x86_64-linux,aarch64-darwin - 8 1 - - -",
            self.store_uri(scheme)
        )
    }

    /// A command in the client's namespace with `NIX_SSHOPTS` set.
    pub fn client_command(&self, program: &str) -> Command {
        let mut cmd = self.client.command(program);
        cmd.env("NIX_SSHOPTS", self.ssh_opts());
        cmd
    }

    /// The `build running` lines of the coordinator's log: drv → builder.
    pub fn builds_run(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for line in self.coordinator.process.log().lines() {
            if !line.contains("build running") {
                continue;
            }
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            if let (Some(drv), Some(builder)) = (field("drv"), field("builder")) {
                out.insert(drv, builder);
            }
        }
        out
    }

    /// The HTTP URL of the farm's cache.
    pub fn cache_url(&self) -> String {
        self.coordinator.endpoints.http_url()
    }
}

/// A layered graph: `width` leaves, then `depth` layers where node j depends on
/// nodes j and j+1 of the layer below, then one `top` over the last layer; all
/// built with `/bin/sh`. `salt` makes the paths unique to a test.
pub fn layered_graph_nix(salt: &str, width: usize, depth: usize) -> String {
    let mut s = String::from(
        "let\n  mk = name: script: derivation {\n    inherit name;\n    system = \"x86_64-linux\";\n    builder = \"/bin/sh\";\n    args = [ \"-c\" script ];\n  };\n",
    );
    for j in 0..width {
        s.push_str(&format!(
            "  l0n{j} = mk \"{salt}-l0n{j}\" \"echo L0N{j}-{salt} > $out\";\n"
        ));
    }
    for k in 1..=depth {
        for j in 0..width {
            let a = format!("l{}n{}", k - 1, j);
            let b = format!("l{}n{}", k - 1, (j + 1) % width);
            s.push_str(&format!(
                "  l{k}n{j} = mk \"{salt}-l{k}n{j}\" \"/bin/cat ${{{a}}} ${{{b}}} > $out; echo L{k}N{j} >> $out; echo building L{k}N{j} >&2\";\n"
            ));
        }
    }
    let last: Vec<String> = (0..width).map(|j| format!("${{l{depth}n{j}}}")).collect();
    s.push_str(&format!(
        "in mk \"{salt}-top\" \"/bin/cat {} > $out\"\n",
        last.join(" ")
    ));
    s
}

/// What `top` of [`layered_graph_nix`] contains.
pub fn layered_graph_expected(salt: &str, width: usize, depth: usize) -> String {
    let mut layer: Vec<String> = (0..width).map(|j| format!("L0N{j}-{salt}\n")).collect();
    for k in 1..=depth {
        layer = (0..width)
            .map(|j| format!("{}{}L{k}N{j}\n", layer[j], layer[(j + 1) % width]))
            .collect();
    }
    layer.concat()
}

/// Every `.drv` in the closure of `drv` (itself included), from the client's store.
pub fn drv_closure(client: &Actor, drv: &StorePath) -> anyhow::Result<Vec<StorePath>> {
    Ok(client
        .closure(drv)?
        .into_iter()
        .filter(|p| p.name().ends_with(".drv"))
        .collect())
}

/// The output paths of derivations (`nix-store -q --outputs`).
pub fn outputs_of(client: &Actor, drvs: &[StorePath]) -> anyhow::Result<Vec<StorePath>> {
    let mut args = vec!["-q".to_string(), "--outputs".into()];
    args.extend(drvs.iter().map(|d| d.to_string()));
    client
        .run("nix-store", &args)?
        .lines()
        .map(|l| Ok(StorePath::parse(l.trim())?))
        .collect()
}
