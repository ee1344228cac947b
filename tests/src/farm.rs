//! The farm of an end-to-end test, one fixture for every test file: a real
//! `farm-coordinator` on loopback ([`Coordinator`], restartable on the same
//! state and ports), real `farm-builder`s each inside an [`Actor`] with its
//! own `/nix` (keys made by [`ssh_key`], enrolled through `--builder-keys`),
//! a client actor, and, when asked, client keys authorized on the
//! coordinator ([`SshAccess`]: Nix clients log in to its SSH endpoint with
//! them, `farm` signs with them) and builders dialing through a
//! [`LinkProxy`].
//!
//! Ready means: the coordinator wrote `endpoints.json` and answers `Status`;
//! a builder is online when `Status` lists it so. Nothing waits on log text.
//!
//! Builds write to a host directory outside every store (the "witness" dir;
//! `sandbox = false`): each build appends `NAME NIX_BUILD_TOP` to `built.log`,
//! and `NIX_BUILD_TOP` lies under the building actor's root, so the file says
//! which derivation ran where, independently of the farm's own reports. Gated
//! builds wait for a file in that dir, which makes "during a build" exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use farm_nix::store_path::StorePath;
use farm_proto::v1;
use farm_testkit::{FarmProcess, TestLogs, tracked_output};

use crate::LinkProxy;
use crate::actor::Actor;
use crate::bins::farm_bin;
use crate::client::{EventStream, drv_path_infos, dump, http_get_blocking, topo_order};
use crate::coordinator::Coordinator;
use crate::graphs::graph_nix;
use crate::keys::{SignedClient, SshAccess, ssh_key};

/// How long one graph may take before a test gives up (a hang is a failure,
/// not a timing assertion).
pub const GRAPH_TIMEOUT: Duration = Duration::from_secs(150);
/// How long to wait for processes and files to appear.
pub const WAIT: Duration = Duration::from_secs(60);
/// Each test's hang-guard: past it the test fails with every log.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// The farm as a Nix store and as a remote builder.
pub const FARM_STORE: &str = "ssh-ng://nix@127.0.0.1";

/// The Nix endpoint's farm ([`Farm::nix_endpoint`]): an x86_64-linux builder…
pub const X86_BUILDER: &str = "b-x86";
/// …and one also advertising `aarch64-darwin` (Nix's `extra-platforms`).
pub const DARWIN_BUILDER: &str = "b-darwin";

/// What a builder is like: name, max-jobs, nix.conf lines.
#[derive(Debug, Clone, Copy)]
pub struct BuilderSpec<'a> {
    pub name: &'a str,
    pub max_jobs: u32,
    pub conf: &'a [&'a str],
}

/// One builder: its actor (own store), its process while running.
#[derive(Debug)]
pub struct Builder {
    pub name: String,
    pub actor: Actor,
    pub state_dir: PathBuf,
    pub max_jobs: u32,
    pub public_key: String,
    pub process: Option<FarmProcess>,
}

impl Builder {
    /// A builder actor whose nix.conf gets `conf_lines`, with its key made
    /// (`STATE/builder_ed25519`, where `farm-builder` looks for it).
    pub fn new(
        logs: &TestLogs,
        name: &str,
        max_jobs: u32,
        conf_lines: &[&str],
    ) -> anyhow::Result<Builder> {
        let actor = Actor::with_logs(name, logs)?;
        for line in conf_lines {
            actor.nix_conf_append(line)?;
        }
        let state_dir = actor.state_dir("builder")?;
        let public_key = ssh_key(
            &state_dir.join("builder_ed25519"),
            &format!("{name}@farm-e2e"),
        )?;
        Ok(Builder {
            name: name.to_owned(),
            actor,
            state_dir,
            max_jobs,
            public_key,
            process: None,
        })
    }

    /// Starts `farm-builder` in the actor against `grpc_url`.
    pub fn start(&mut self, grpc_url: &str) -> anyhow::Result<()> {
        self.start_with(grpc_url, &[])
    }

    /// [`Builder::start`] with extra `farm-builder` flags.
    pub fn start_with(&mut self, grpc_url: &str, extra_args: &[&str]) -> anyhow::Result<()> {
        let bin = farm_bin("farm-builder")?;
        let max_jobs = self.max_jobs.to_string();
        let mut cmd = self.actor.command(bin);
        cmd.args(["--coordinator", grpc_url, "--state-dir"])
            .arg(&self.state_dir)
            .args(["--name", &self.name, "--max-jobs", &max_jobs])
            .args(["--load-interval", "1"])
            .args(extra_args)
            .env(
                "FARM_LOG",
                std::env::var("FARM_LOG").unwrap_or_else(|_| "info".into()),
            );
        let process = FarmProcess::spawn(
            self.actor.logs(),
            &format!("{}/farm-builder", self.name),
            cmd,
        )?;
        self.process = Some(process);
        Ok(())
    }

    pub fn process(&mut self) -> anyhow::Result<&mut FarmProcess> {
        self.process
            .as_mut()
            .with_context(|| format!("builder {} is not running", self.name))
    }

    /// Host path prefix that identifies this builder in witness lines.
    pub fn root(&self) -> &Path {
        self.actor.root()
    }
}

/// How a farm is made: its builders, the coordinator's flags, who may call
/// it, which builders dial through a proxy. [`FarmSetup::start`] brings it up.
pub struct FarmSetup<'a> {
    logs: TestLogs,
    builders: Vec<BuilderSpec<'a>>,
    args: Vec<String>,
    proxied: Vec<String>,
    access: Option<&'a SshAccess>,
    own_access: usize,
    own_pushers: usize,
}

impl<'a> FarmSetup<'a> {
    /// These builders.
    pub fn builders(mut self, specs: &[BuilderSpec<'a>]) -> Self {
        self.builders.extend_from_slice(specs);
        self
    }

    /// These coordinator flags (after the fixture's own).
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: &[S]) -> Self {
        self.args.extend(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        );
        self
    }

    /// Authorize `access`'s keys on the coordinator (the fixture signs its
    /// own calls with the first).
    pub fn access(mut self, access: &'a SshAccess) -> Self {
        self.access = Some(access);
        self
    }

    /// `n` client keys of the farm's own ([`Farm::ssh`]), authorized: the
    /// client actor logs in to the SSH endpoint with the first.
    pub fn clients(mut self, n: usize) -> Self {
        self.own_access = n;
        self
    }

    /// Also `n` keys of the farm's own with the push right (`pusher0` …, in
    /// `--admin-keys`, a level that includes push), in
    /// [`SshAccess::admin_keys`] of [`Farm::ssh`].
    pub fn pushers(mut self, n: usize) -> Self {
        self.own_pushers = n;
        self
    }

    /// The builder named `name` dials the coordinator through a
    /// [`LinkProxy`] (in [`Farm::proxies`]).
    pub fn proxied(mut self, name: &str) -> Self {
        self.proxied.push(name.to_owned());
        self
    }

    /// The coordinator, then the builders, once each is online.
    pub fn start(self) -> anyhow::Result<Farm> {
        let mut farm = self.start_without_builders()?;
        for i in 0..farm.builders.len() {
            let url = farm.builder_url(i);
            farm.builders[i].start(&url)?;
        }
        for i in 0..farm.builders.len() {
            farm.wait_builder_online(i)?;
        }
        Ok(farm)
    }

    /// All but starting the builders: their keys are enrolled, the test
    /// starts them (e.g. against another URL, with other flags).
    pub fn start_without_builders(self) -> anyhow::Result<Farm> {
        let logs = self.logs;
        let client = Actor::with_logs("client", &logs)?;
        let mut builders = Vec::new();
        for s in &self.builders {
            builders.push(Builder::new(&logs, s.name, s.max_jobs, s.conf)?);
        }
        let keys = tempfile::Builder::new()
            .prefix("farm-e2e-builder-keys-")
            .tempdir()?;
        let builder_keys = keys.path().join("builder_keys");
        let lines: String = builders
            .iter()
            .map(|b| format!("{}\n", b.public_key))
            .collect();
        std::fs::write(&builder_keys, lines)?;
        let own = if self.own_access > 0 {
            let users: Vec<String> = (0..self.own_access).map(|i| format!("client{i}")).collect();
            let pushers: Vec<String> = (0..self.own_pushers)
                .map(|i| format!("pusher{i}"))
                .collect();
            let users: Vec<&str> = users.iter().map(String::as_str).collect();
            let pushers: Vec<&str> = pushers.iter().map(String::as_str).collect();
            Some(SshAccess::named(&users, &pushers)?)
        } else {
            None
        };
        // The client's own key is where ssh looks for it: `~/.ssh/id_ed25519`.
        let client_key = match &own {
            Some(a) => {
                let ssh_dir = client.root().join("home/.ssh");
                std::fs::create_dir_all(&ssh_dir)?;
                let key = ssh_dir.join("id_ed25519");
                std::fs::copy(&a.keys[0], &key)?;
                std::fs::copy(a.keys[0].with_extension("pub"), key.with_extension("pub"))?;
                Some(key)
            }
            None => None,
        };
        // Without client keys of its own, the farm authorizes an operator key
        // (admin) that the fixture's calls and `farm` commands sign with: a
        // coordinator with no key file accepts nobody.
        let operator = match (&self.access, &own) {
            (None, None) => Some(SshAccess::named(&[], &["operator"])?),
            _ => None,
        };
        let access = self.access.or(own.as_ref()).or(operator.as_ref());
        let mut args: Vec<String> = vec![
            "--builder-keys".into(),
            builder_keys.to_str().context("path")?.into(),
            "--cache-key-name".into(),
            "farm-e2e".into(),
        ];
        // A short grace by default (a test may ask for another).
        if !self.args.iter().any(|a| a == "--builder-grace") {
            args.extend(["--builder-grace".into(), "1".into()]);
        }
        let probe_key = match access {
            Some(a) => {
                args.extend(a.coordinator_args());
                a.probe_key()?
            }
            None => None,
        };
        args.extend(self.args);
        let coordinator = Coordinator::start_signed(&logs, &args, probe_key)?;
        let witness = tempfile::Builder::new()
            .prefix("farm-e2e-witness-")
            .tempdir()?;
        let grpc: std::net::SocketAddr = coordinator.endpoints.grpc.parse()?;
        let mut proxies = BTreeMap::new();
        for name in &self.proxied {
            ensure!(
                builders.iter().any(|b| &b.name == name),
                "no builder {name} to proxy"
            );
            proxies.insert(name.clone(), LinkProxy::start(grpc)?);
        }
        Ok(Farm {
            logs,
            client,
            builders,
            coordinator,
            witness,
            builder_keys,
            proxies,
            ssh: own,
            client_key,
            operator_key: operator.as_ref().map(|o| o.admin_keys[0].clone()),
            _operator: operator,
            _keys: keys,
        })
    }
}

/// A coordinator, builders, a client and a witness dir.
pub struct Farm {
    pub logs: TestLogs,
    pub client: Actor,
    pub builders: Vec<Builder>,
    pub coordinator: Coordinator,
    pub witness: tempfile::TempDir,
    pub builder_keys: PathBuf,
    /// The links of the builders that dial the coordinator through a proxy, by name.
    pub proxies: BTreeMap<String, LinkProxy>,
    /// The farm's own client keys ([`FarmSetup::clients`]).
    pub ssh: Option<SshAccess>,
    /// The first of them, in the client's `~/.ssh/id_ed25519`.
    client_key: Option<PathBuf>,
    /// The admin key `farm` commands sign with when no key is given (a farm
    /// set up without client keys of its own).
    pub operator_key: Option<PathBuf>,
    _operator: Option<SshAccess>,
    _keys: tempfile::TempDir,
}

impl Farm {
    /// A farm to set up: add builders, flags, access, then start it.
    pub fn setup(logs: &TestLogs) -> FarmSetup<'static> {
        FarmSetup {
            logs: logs.clone(),
            builders: Vec::new(),
            args: Vec::new(),
            proxied: Vec::new(),
            access: None,
            own_access: 0,
            own_pushers: 0,
        }
    }

    /// The farm the Nix endpoint's tests talk to: [`X86_BUILDER`] and
    /// [`DARWIN_BUILDER`] (4 jobs each), the coordinator with `extra_args`,
    /// and one client key of the farm's own, authorized, for the client
    /// actor's `ssh` ([`Farm::ssh_opts`]), and one push key
    /// ([`Farm::pusher_command`]).
    pub fn nix_endpoint<S: AsRef<std::ffi::OsStr>>(
        logs: &TestLogs,
        extra_args: &[S],
    ) -> anyhow::Result<Farm> {
        Farm::setup(logs)
            .builders(&[
                BuilderSpec {
                    name: X86_BUILDER,
                    max_jobs: 4,
                    conf: &[],
                },
                BuilderSpec {
                    name: DARWIN_BUILDER,
                    max_jobs: 4,
                    conf: &["extra-platforms = aarch64-darwin"],
                },
            ])
            .args(extra_args)
            .clients(1)
            .pushers(1)
            .start()
    }

    /// The coordinator (with `extra_args`), then the builders, once each is online.
    pub fn start(
        logs: &TestLogs,
        specs: &[BuilderSpec<'_>],
        extra_args: &[&str],
    ) -> anyhow::Result<Farm> {
        Farm::setup(logs).builders(specs).args(extra_args).start()
    }

    /// [`Farm::start`] up to the builders: their keys are enrolled, the test
    /// starts them (e.g. against another URL, with other flags).
    pub fn start_without_builders(
        logs: &TestLogs,
        specs: &[BuilderSpec<'_>],
        extra_args: &[&str],
    ) -> anyhow::Result<Farm> {
        Farm::setup(logs)
            .builders(specs)
            .args(extra_args)
            .start_without_builders()
    }

    /// The state of builder `i` as the coordinator's `Status` reports it
    /// (`None`: not listed).
    pub fn builder_state(&self, i: usize) -> anyhow::Result<Option<v1::BuilderState>> {
        let name = &self.builders[i].name;
        let status = self.coordinator.status()?;
        Ok(status
            .builders
            .iter()
            .find(|b| &b.name == name)
            .map(|b| v1::BuilderState::try_from(b.state).unwrap_or(v1::BuilderState::Unspecified)))
    }

    /// Waits until the coordinator's `Status` lists builder `i` online (any
    /// state but offline), failing early if the coordinator or the builder exits.
    pub fn wait_builder_online(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let state = self.builder_state(i)?;
            if state.is_some_and(|s| s != v1::BuilderState::Offline) {
                return Ok(());
            }
            self.coordinator.process.ensure_running()?;
            self.builders[i].process()?.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "builder {} was not online within {WAIT:?} (Status says {state:?})",
                    self.builders[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the coordinator's `Status` has builder `i` offline (its
    /// session ended).
    pub fn wait_builder_offline(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let state = self.builder_state(i)?;
            if state.is_none_or(|s| s == v1::BuilderState::Offline) {
                return Ok(());
            }
            self.coordinator.process.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "builder {} was still {state:?} after {WAIT:?}",
                    self.builders[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn grpc_url(&self) -> String {
        self.coordinator.endpoints.grpc_url()
    }

    /// The coordinator URL builder `i` dials: its proxy's, or the coordinator's.
    pub fn builder_url(&self, i: usize) -> String {
        match self.proxies.get(&self.builders[i].name) {
            Some(p) => format!("http://{}", p.addr()),
            None => self.grpc_url(),
        }
    }

    /// Cuts builder `i`'s link (it dials through a proxy), waits until the
    /// coordinator has it offline, keeps it cut for `lasting`, restores it and
    /// waits until the builder is online again.
    pub fn cut_link(&mut self, i: usize, lasting: Duration) -> anyhow::Result<()> {
        let name = self.builders[i].name.clone();
        let proxy = self
            .proxies
            .get(&name)
            .with_context(|| format!("builder {name} has no proxy"))?;
        proxy.cut();
        self.wait_builder_offline(i)?;
        std::thread::sleep(lasting);
        self.proxies[&name].restore();
        self.wait_builder_online(i)
    }

    /// `kill -9` of builder `i` and everything it runs (its builds too), as
    /// when the machine dies.
    pub fn kill_builder(&mut self, i: usize) -> anyhow::Result<()> {
        let mut process = self.builders[i]
            .process
            .take()
            .with_context(|| format!("builder {} is not running", self.builders[i].name))?;
        process.kill_tree()?;
        Ok(())
    }

    /// Starts builder `i` again (same state dir, same link) once the
    /// coordinator has seen it go, and waits until it is online again.
    pub fn restart_builder(&mut self, i: usize) -> anyhow::Result<()> {
        ensure!(
            self.builders[i].process.is_none(),
            "builder {} is still running",
            self.builders[i].name
        );
        self.wait_builder_offline(i)?;
        let url = self.builder_url(i);
        self.builders[i].start(&url)?;
        self.wait_builder_online(i)
    }

    /// `farm ARGS…` in `actor`'s namespace against this coordinator, signing
    /// with `key` when given.
    pub fn farm_command(
        &self,
        actor: &Actor,
        key: Option<&Path>,
        args: &[&str],
    ) -> anyhow::Result<std::process::Command> {
        let mut cmd = actor.command(farm_bin("farm")?);
        cmd.args(args)
            .env("FARM_COORDINATOR", self.grpc_url())
            .env("NO_COLOR", "1");
        if let Some(k) = key.or(self.operator_key.as_deref()) {
            cmd.env("FARM_KEY", k);
        }
        Ok(cmd)
    }

    /// `farm status --json` (signed with `key`), parsed.
    pub fn status(&self, key: Option<&Path>) -> anyhow::Result<serde_json::Value> {
        let cmd = self.farm_command(&self.client, key, &["status", "--json"])?;
        let out = self.client.run_command(cmd)?;
        serde_json::from_str(&out).with_context(|| format!("farm status printed {out:?}"))
    }

    /// Whether the farm's cache serves a narinfo for `path`.
    pub fn cache_has(&self, path: &StorePath) -> anyhow::Result<bool> {
        let target = format!("/{}.narinfo", path.hash_part());
        let (status, _) = http_get_blocking(&self.coordinator.endpoints.http, &target)?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            other => bail!("GET {target} answered {other}"),
        }
    }

    /// `path` as another host substitutes it from the farm's cache (a fresh
    /// actor trusting the farm's key, so only signed paths come): its bytes.
    pub fn fetched_from_cache(&self, logs: &TestLogs, path: &StorePath) -> anyhow::Result<Vec<u8>> {
        let reader = Actor::with_logs(&format!("reader-{}", path.name()), logs)?;
        reader.nix_conf_append(&format!(
            "trusted-public-keys = {}",
            self.coordinator.endpoints.cache_public_key
        ))?;
        reader.run(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--from",
                &self.cache_url(),
                &path.to_string(),
            ],
        )?;
        Ok(std::fs::read(reader.host_path_of(path))?)
    }

    /// Build `drv` under `drv_path` over ssh:// (the serve protocol, as Nix's
    /// hook does) logged in with `key`: the result and ssh's stderr, as text.
    pub fn serve_build(
        &self,
        key: &Path,
        drv_path: &StorePath,
        drv: &farm_nix::derivation::BasicDerivation,
    ) -> anyhow::Result<String> {
        let ssh_opts = self.ssh_opts_with_key(key)?;
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async {
            let mut child = tokio::process::Command::new("ssh")
                .args(ssh_opts.split_whitespace())
                .args(["nix@127.0.0.1", "nix-store --serve --write"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child.stdin.take().context("stdin")?;
            let stdout = child.stdout.take().context("stdout")?;
            let mut serve = farm_nix::serve::ServeClient::connect(stdout, stdin).await?;
            let result = serve
                .build_derivation(drv_path, drv, &Default::default())
                .await;
            drop(serve);
            let out = child.wait_with_output().await?;
            Ok(format!(
                "{result:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }

    /// The witness dir's path (also valid inside every actor).
    pub fn witness_dir(&self) -> &Path {
        self.witness.path()
    }

    /// Which builder's actor root `build_top` lies under.
    pub fn builder_of_build_top(&self, build_top: &str) -> Option<String> {
        self.builders
            .iter()
            .find(|b| Path::new(build_top).starts_with(b.root()))
            .map(|b| b.name.clone())
    }

    /// The witness lines: (derivation name, builder name or the raw build dir).
    pub fn witness_lines(&self) -> anyhow::Result<Vec<(String, String)>> {
        let path = self.witness_dir().join("built.log");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        text.lines()
            .map(|l| {
                let (name, top) = l
                    .split_once(' ')
                    .with_context(|| format!("witness line {l:?}"))?;
                Ok((
                    name.to_owned(),
                    self.builder_of_build_top(top)
                        .unwrap_or_else(|| top.to_owned()),
                ))
            })
            .collect()
    }

    /// Uploads the closure of `drvs` (the `.drv` files and sources) from the
    /// client's store to the farm's cache, dependencies first.
    pub async fn upload_closure(&self, drvs: &[StorePath]) -> anyhow::Result<usize> {
        let infos = drv_path_infos(&self.client, drvs)?;
        let ordered = topo_order(infos)?;
        let mut client = self.farm_client().await?;
        for info in &ordered {
            let nar = dump(&self.client, &info.path)?;
            ensure!(
                nar.len() as u64 == info.nar_size,
                "nix-store --dump {} gave {} bytes, path-info says {}",
                info.path,
                nar.len(),
                info.nar_size
            );
            let mut msgs = vec![v1::UploadNarRequest {
                msg: Some(v1::upload_nar_request::Msg::Info(v1::PathInfo::from(info))),
            }];
            for chunk in nar.chunks(64 * 1024) {
                msgs.push(v1::UploadNarRequest {
                    msg: Some(v1::upload_nar_request::Msg::Data(chunk.to_vec())),
                });
            }
            let resp = client
                .upload_nar(futures::stream::iter(msgs))
                .await
                .with_context(|| format!("uploading {}", info.path))?
                .into_inner();
            ensure!(
                resp.store_path == info.path.to_string(),
                "upload of {} answered {:?}",
                info.path,
                resp.store_path
            );
        }
        Ok(ordered.len())
    }

    /// A FarmService client signing with the fixture's own key (the operator
    /// key, or the first client key).
    pub async fn farm_client(&self) -> anyhow::Result<SignedClient> {
        let key = self
            .coordinator
            .probe_key()
            .context("this farm's coordinator has no key to sign with")?
            .clone();
        SignedClient::connect(&self.grpc_url(), key).await
    }

    /// Submits `drvs` and returns the event stream.
    pub async fn submit(&self, drvs: &[StorePath]) -> anyhow::Result<EventStream> {
        let mut client = self.farm_client().await?;
        let stream = client
            .submit(v1::SubmitRequest {
                drv_paths: drvs.iter().map(|d| d.to_string()).collect(),
                priority: v1::Priority::Ci as i32,
                max_silent_time_secs: 0,
                build_timeout_secs: 0,
                ..Default::default()
            })
            .await
            .context("Submit")?
            .into_inner();
        Ok(EventStream {
            stream,
            events: Vec::new(),
        })
    }

    /// Follows an existing submission.
    pub async fn watch(&self, submission_id: &str) -> anyhow::Result<EventStream> {
        let mut client = self.farm_client().await?;
        let stream = client
            .watch(v1::WatchRequest {
                submission_id: submission_id.to_owned(),
            })
            .await
            .context("Watch")?
            .into_inner();
        Ok(EventStream {
            stream,
            events: Vec::new(),
        })
    }

    /// The builder that is `name`.
    pub fn builder(&mut self, name: &str) -> anyhow::Result<&mut Builder> {
        self.builders
            .iter_mut()
            .find(|b| b.name == name)
            .with_context(|| format!("no builder {name}"))
    }

    /// The farm's own client keys ([`FarmSetup::clients`]), else its operator
    /// key's access (for its known_hosts and `NIX_SSHOPTS`).
    pub fn own_ssh(&self) -> anyhow::Result<&SshAccess> {
        self.ssh
            .as_ref()
            .or(self._operator.as_ref())
            .context("this farm was set up without client keys (FarmSetup::clients)")
    }

    /// The client's private key (`~/.ssh/id_ed25519` in the client's home:
    /// the farm's first own client key).
    pub fn client_key(&self) -> anyhow::Result<&Path> {
        self.client_key
            .as_deref()
            .context("this farm was set up without client keys (FarmSetup::clients)")
    }

    /// `NIX_SSHOPTS` for the client: port, its key, the coordinator's host key.
    pub fn ssh_opts(&self) -> anyhow::Result<String> {
        self.ssh_opts_with_key(self.client_key()?)
    }

    /// `NIX_SSHOPTS` with another key.
    pub fn ssh_opts_with_key(&self, key: &Path) -> anyhow::Result<String> {
        self.own_ssh()?
            .nix_sshopts_with(&self.coordinator.endpoints, key)
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
    pub fn client_command(&self, program: &str) -> anyhow::Result<Command> {
        let mut cmd = self.client.command(program);
        cmd.env("NIX_SSHOPTS", self.ssh_opts()?);
        Ok(cmd)
    }

    /// As [`Farm::client_command`], logging in with the farm's first push key
    /// ([`FarmSetup::pushers`]): its uploads are signed.
    pub fn pusher_command(&self, program: &str) -> anyhow::Result<Command> {
        let key = self
            .own_ssh()?
            .admin_keys
            .first()
            .context("this farm was set up without push keys (FarmSetup::pushers)")?;
        let mut cmd = self.client.command(program);
        cmd.env("NIX_SSHOPTS", self.ssh_opts_with_key(key)?);
        Ok(cmd)
    }

    /// The HTTP URL of the farm's cache.
    pub fn cache_url(&self) -> String {
        self.coordinator.endpoints.http_url()
    }

    /// The `build running` lines of the coordinator's log: drv → builder
    /// (what the tests check about placement; not a readiness signal).
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

    /// `farm ARGS…` in the client's namespace against the coordinator,
    /// signing with `key` (none: unsigned), stdout and stderr piped.
    pub fn farm(&self, key: Option<&Path>, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = self.farm_command(&self.client, key, args)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        Ok(cmd)
    }

    /// `farm ARGS…` in the background as a [`FarmProcess`] named `name`: its
    /// stderr in the test's logs, its stdout apart ([`FarmProcess::stdout`]).
    pub fn spawn_farm(
        &self,
        name: &str,
        key: Option<&Path>,
        args: &[&str],
    ) -> anyhow::Result<FarmProcess> {
        FarmProcess::spawn_split_stdout(&self.logs, name, self.farm(key, args)?)
    }

    /// Runs `farm ARGS…` to completion (any exit status), recorded in the logs.
    pub fn run(&self, key: Option<&Path>, args: &[&str]) -> anyhow::Result<Output> {
        let title = format!("$ farm {}", args.join(" "));
        let out = tracked_output(&self.logs, &title, &mut self.farm(key, args)?)
            .with_context(|| format!("running farm {args:?}"))?;
        self.logs.record(
            title,
            format!(
                "exit: {}\nstdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
        Ok(out)
    }

    /// Waits until `farm status --json` (signed with `key`) shows `n`
    /// builders not offline; returns that status.
    pub fn wait_for_builders(
        &self,
        key: Option<&Path>,
        n: usize,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.status(key)?;
            let online = s["builders"]
                .as_array()
                .map(|b| b.iter().filter(|b| b["state"] != "offline").count())
                .unwrap_or(0);
            if online >= n {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("only {online} of {n} builders joined: {s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The three ways a client builds through the farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPath {
    /// `farm build --json FILE`.
    FarmBuild,
    /// `nix-build --max-jobs 0 --builders 'ssh-ng://…'` (Nix's build hook).
    BuildHook,
    /// `nix build --store ssh-ng://… --eval-store auto -f FILE`.
    Store,
}

impl ClientPath {
    /// Client `i`'s path: the three in turn.
    pub fn of(i: usize) -> ClientPath {
        [
            ClientPath::FarmBuild,
            ClientPath::BuildHook,
            ClientPath::Store,
        ][i % 3]
    }
}

/// The command building `file` in `actor` the way `path` does, signing (or
/// logging in) with `ssh.keys[key]`.
pub fn client_command(
    farm: &Farm,
    ssh: &SshAccess,
    key: usize,
    actor: &Actor,
    path: ClientPath,
    file: &Path,
) -> anyhow::Result<std::process::Command> {
    let file = file.to_str().context("graph path")?;
    Ok(match path {
        ClientPath::FarmBuild => {
            farm.farm_command(actor, Some(&ssh.keys[key]), &["build", "--json", file])?
        }
        ClientPath::BuildHook => {
            let mut cmd = actor.command("nix-build");
            cmd.args(["--no-out-link", "--max-jobs", "0", "--builders"])
                .arg(format!("{FARM_STORE} x86_64-linux - 8 1 - - -"))
                .arg(file)
                .env("NIX_SSHOPTS", ssh.nix_sshopts(farm, key)?);
            cmd
        }
        ClientPath::Store => {
            let mut cmd = actor.command("nix");
            cmd.args(["build", "--no-link", "--json", "--store", FARM_STORE])
                .args(["--eval-store", "auto", "-f", file])
                .env("NIX_SSHOPTS", ssh.nix_sshopts(farm, key)?);
            cmd
        }
    })
}

/// One line of `WITNESS/runs.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// `true` for `done`, `false` for `start`.
    pub done: bool,
    pub name: String,
    /// The builder whose actor root holds the build dir (or the dir itself).
    pub builder: String,
}

impl Farm {
    /// `WITNESS/runs.log`, parsed, in order.
    pub fn runs(&self) -> anyhow::Result<Vec<Run>> {
        let path = self.witness_dir().join("runs.log");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        text.lines()
            .map(|l| {
                let mut w = l.splitn(3, ' ');
                let (Some(kind), Some(name), Some(top)) = (w.next(), w.next(), w.next()) else {
                    bail!("witness line {l:?}");
                };
                ensure!(kind == "start" || kind == "done", "witness line {l:?}");
                Ok(Run {
                    done: kind == "done",
                    name: name.to_owned(),
                    builder: self
                        .builder_of_build_top(top)
                        .unwrap_or_else(|| top.to_owned()),
                })
            })
            .collect()
    }
}

/// How many times each derivation started and finished, by name.
pub fn run_counts(runs: &[Run]) -> BTreeMap<String, (usize, usize)> {
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in runs {
        let e = out.entry(r.name.clone()).or_default();
        if r.done {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
    }
    out
}

/// Where the gated build behind `WITNESS/<gate>` started so far (builder names).
pub fn gate_starts(farm: &Farm, gate: &str) -> Vec<String> {
    std::fs::read_to_string(farm.witness_dir().join(format!("{gate}.started")))
        .unwrap_or_default()
        .lines()
        .map(|top| {
            farm.builder_of_build_top(top)
                .unwrap_or_else(|| top.to_owned())
        })
        .collect()
}

/// Waits until builds behind `gate` have started `n` times.
pub fn wait_gate_starts(farm: &Farm, gate: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let starts = gate_starts(farm, gate);
        if starts.len() >= n {
            return Ok(starts);
        }
        ensure!(
            Instant::now() < deadline,
            "builds behind {gate} started {} times, not {n}, within {WAIT:?}",
            starts.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `path` exists.
pub fn wait_for_file(path: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Instantiates `bindings` (roots `roots`), uploads the closure, submits.
pub async fn submit_graph(
    farm: &Farm,
    file: &str,
    bindings: &[(&str, String)],
    roots: &[&str],
) -> anyhow::Result<EventStream> {
    let b: Vec<(String, String)> = bindings
        .iter()
        .map(|(n, e)| (n.to_string(), e.clone()))
        .collect();
    let nix = graph_nix(farm.witness_dir(), &b, roots);
    let file = farm.client.write_file(file, &nix)?;
    let drvs = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    farm.upload_closure(&drvs).await?;
    farm.submit(&drvs).await
}

/// How many times each derivation ran, and where, per the witness file.
pub fn runs(farm: &Farm) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut ran: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, builder) in farm.witness_lines()? {
        ran.entry(name).or_default().push(builder);
    }
    Ok(ran)
}

impl SshAccess {
    /// `NIX_SSHOPTS` for key `i` against `farm`'s SSH endpoint.
    pub fn nix_sshopts(&self, farm: &Farm, i: usize) -> anyhow::Result<String> {
        let key = self
            .keys
            .get(i)
            .with_context(|| format!("no client key {i}"))?;
        self.nix_sshopts_with(&farm.coordinator.endpoints, key)
    }
}
