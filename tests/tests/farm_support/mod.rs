//! Shared pieces of the farm end-to-end tests (`tests/tests/farm_*.rs`): a real
//! `farm-coordinator` on loopback with its own state dir (restartable on the same
//! state and gRPC port), real `farm-builder`s each inside an [`Actor`] with its own
//! `/nix`, enrolled through a `--builder-keys` file, and a client actor that
//! instantiates a graph, uploads its `.drv` closure through
//! `FarmService.UploadNar` and follows `Submit`'s event stream.
//!
//! Builds write to a host directory outside every store (the "witness" dir;
//! `sandbox = false`): each build appends `NAME NIX_BUILD_TOP` to `built.log`,
//! and `NIX_BUILD_TOP` lies under the building actor's root, so the file says
//! which derivation ran where, independently of the farm's own reports. Gated
//! builds wait for a file in that dir, which makes "during a build" exact.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use farm_nix::hash::Hash;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;
use farm_proto::v1;
use farm_proto::v1::build_event::Event as Ev;
use farm_proto::v1::farm_service_client::FarmServiceClient;
use farm_tests::{Actor, Endpoints, FarmProcess, LinkProxy, TestLogs, farm_bin};

/// How long one graph may take before a test gives up (a hang is a failure,
/// not a timing assertion).
pub const GRAPH_TIMEOUT: Duration = Duration::from_secs(150);
/// How long to wait for processes and files to appear.
pub const WAIT: Duration = Duration::from_secs(60);
/// Each test's hang-guard: past it the test fails with every log.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// One builder: its actor (own store), its process while running.
pub struct Builder {
    pub name: String,
    pub actor: Actor,
    pub state_dir: PathBuf,
    pub max_jobs: u32,
    pub public_key: String,
    pub process: Option<FarmProcess>,
}

impl Builder {
    /// A builder actor whose nix.conf gets `conf_lines`, with its key generated
    /// (`farm-builder --print-public-key`).
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
        let out = actor.run(
            farm_bin("farm-builder")?.to_str().context("bin path")?,
            &[
                "--print-public-key",
                "--coordinator",
                "http://127.0.0.1:1",
                "--state-dir",
                state_dir.to_str().context("state dir")?,
                "--name",
                name,
            ],
        )?;
        let public_key = out
            .lines()
            .find(|l| l.starts_with("ssh-ed25519 "))
            .with_context(|| format!("no public key line in {out:?}"))?
            .to_owned();
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

/// The coordinator, restartable on the same state dir and ports.
pub struct CoordinatorProc {
    pub process: FarmProcess,
    pub endpoints: Endpoints,
    pub state_dir: PathBuf,
    args: Vec<String>,
}

impl CoordinatorProc {
    /// Starts `farm-coordinator` with `--state-dir state_dir --grpc grpc …`.
    pub fn start(
        logs: &TestLogs,
        state_dir: &Path,
        grpc: &str,
        args: &[String],
    ) -> anyhow::Result<CoordinatorProc> {
        CoordinatorProc::start_on(logs, state_dir, [grpc, "127.0.0.1:0", "127.0.0.1:0"], args)
    }

    /// Starts `farm-coordinator` on the given gRPC, HTTP and SSH addresses.
    pub fn start_on(
        logs: &TestLogs,
        state_dir: &Path,
        [grpc, http, ssh]: [&str; 3],
        args: &[String],
    ) -> anyhow::Result<CoordinatorProc> {
        let mut cmd = std::process::Command::new(farm_bin("farm-coordinator")?);
        cmd.arg("--state-dir")
            .arg(state_dir)
            .args(["--grpc", grpc, "--http", http, "--ssh", ssh])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        // A restart must not read the previous run's endpoints.
        let _ = std::fs::remove_file(state_dir.join("endpoints.json"));
        let mut process = FarmProcess::spawn(logs, "farm-coordinator", cmd)?;
        let endpoints = process.wait_for_endpoints(state_dir, WAIT)?;
        Ok(CoordinatorProc {
            process,
            endpoints,
            state_dir: state_dir.to_owned(),
            args: args.to_vec(),
        })
    }

    /// `kill -9`, then a new process on the same state dir and the same
    /// gRPC, HTTP and SSH ports (a client's command line stays valid).
    pub fn kill_and_restart(&mut self, logs: &TestLogs) -> anyhow::Result<()> {
        self.process.kill()?;
        self.restart(logs)
    }

    /// A new process on the same state dir and ports, once this one is gone
    /// (killed, or stopped).
    pub fn restart(&mut self, logs: &TestLogs) -> anyhow::Result<()> {
        let e = self.endpoints.clone();
        let deadline = Instant::now() + WAIT;
        // The ports were just released; retry while the kernel still holds them.
        loop {
            match CoordinatorProc::start_on(
                logs,
                &self.state_dir,
                [&e.grpc, &e.http, &e.ssh],
                &self.args,
            ) {
                Ok(c) => {
                    *self = c;
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline && format!("{e:#}").contains("in use") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A coordinator, builders, a client and a witness dir.
pub struct Farm {
    pub logs: TestLogs,
    pub client: Actor,
    pub builders: Vec<Builder>,
    pub coordinator: CoordinatorProc,
    pub witness: tempfile::TempDir,
    pub builder_keys: PathBuf,
    /// The links of the builders that dial the coordinator through a proxy, by name.
    pub proxies: BTreeMap<String, LinkProxy>,
    // Kept alive for the coordinator's state.
    _state: tempfile::TempDir,
}

/// What a builder is like: name, max-jobs, nix.conf lines.
pub struct BuilderSpec<'a> {
    pub name: &'a str,
    pub max_jobs: u32,
    pub conf: &'a [&'a str],
}

impl Farm {
    /// Generates the builders' keys, enrols them, starts the coordinator (with
    /// `extra_args`), then the builders, and waits until each is authenticated.
    pub fn start(
        logs: &TestLogs,
        specs: &[BuilderSpec<'_>],
        extra_args: &[&str],
    ) -> anyhow::Result<Farm> {
        Farm::start_with(logs, specs, extra_args, &[])
    }

    /// [`Farm::start`], the builders named in `proxied` dialing the
    /// coordinator through a [`LinkProxy`] each (in [`Farm::proxies`]).
    pub fn start_with(
        logs: &TestLogs,
        specs: &[BuilderSpec<'_>],
        extra_args: &[&str],
        proxied: &[&str],
    ) -> anyhow::Result<Farm> {
        let mut farm = Farm::assemble(logs, specs, extra_args, proxied)?;
        for i in 0..farm.builders.len() {
            let url = farm.builder_url(i);
            farm.builders[i].start(&url)?;
        }
        for i in 0..farm.builders.len() {
            farm.wait_builder_online(i)?;
        }
        Ok(farm)
    }

    /// [`Farm::start`] up to the builders: their keys are enrolled, the test
    /// starts them (e.g. against another URL, with other flags).
    pub fn start_without_builders(
        logs: &TestLogs,
        specs: &[BuilderSpec<'_>],
        extra_args: &[&str],
    ) -> anyhow::Result<Farm> {
        Farm::assemble(logs, specs, extra_args, &[])
    }

    /// The coordinator, the builders' actors and keys, the proxies: all but
    /// starting the builders.
    fn assemble(
        logs: &TestLogs,
        specs: &[BuilderSpec<'_>],
        extra_args: &[&str],
        proxied: &[&str],
    ) -> anyhow::Result<Farm> {
        let client = Actor::with_logs("client", logs)?;
        let mut builders = Vec::new();
        for s in specs {
            builders.push(Builder::new(logs, s.name, s.max_jobs, s.conf)?);
        }
        let state = tempfile::Builder::new()
            .prefix("farm-e2e-coordinator-")
            .tempdir()?;
        let builder_keys = state.path().join("builder_keys");
        let keys: String = builders
            .iter()
            .map(|b| format!("{}\n", b.public_key))
            .collect();
        std::fs::write(&builder_keys, keys)?;
        let state_dir = state.path().join("state");
        std::fs::create_dir_all(&state_dir)?;
        let mut args: Vec<String> = vec![
            "--builder-keys".into(),
            builder_keys.to_str().context("path")?.into(),
            "--cache-key-name".into(),
            "farm-e2e".into(),
        ];
        // A short grace by default (a test may ask for another).
        if !extra_args.contains(&"--builder-grace") {
            args.extend(["--builder-grace".into(), "1".into()]);
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let coordinator = CoordinatorProc::start(logs, &state_dir, "127.0.0.1:0", &args)?;
        let witness = tempfile::Builder::new()
            .prefix("farm-e2e-witness-")
            .tempdir()?;
        let grpc: std::net::SocketAddr = coordinator.endpoints.grpc.parse()?;
        let mut proxies = BTreeMap::new();
        for name in proxied {
            ensure!(
                builders.iter().any(|b| b.name == *name),
                "no builder {name} to proxy"
            );
            proxies.insert(name.to_string(), LinkProxy::start(grpc)?);
        }
        let farm = Farm {
            logs: logs.clone(),
            client,
            builders,
            coordinator,
            witness,
            builder_keys,
            proxies,
            _state: state,
        };
        Ok(farm)
    }

    /// Waits until the coordinator logged builder `i` as authenticated (since
    /// its last start).
    pub fn wait_builder_online(&mut self, i: usize) -> anyhow::Result<()> {
        let name = self.builders[i].name.clone();
        let needle = format!("builder={name} ");
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.coordinator.process.log();
            if log
                .lines()
                .any(|l| l.contains("builder authenticated") && l.contains(&needle))
            {
                return Ok(());
            }
            self.coordinator.process.ensure_running()?;
            self.builders[i].process()?.ensure_running()?;
            if Instant::now() >= deadline {
                bail!("builder {name} did not authenticate within {WAIT:?}");
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

    /// How many times the current coordinator logged builder `i` online.
    pub fn times_online(&self, i: usize) -> usize {
        // The field is logged quoted (`builder="NAME"`).
        let name = &self.builders[i].name;
        let needles = [format!("builder=\"{name}\""), format!("builder={name} ")];
        self.coordinator
            .process
            .log()
            .lines()
            .filter(|l| l.contains("builder online") && needles.iter().any(|n| l.contains(n)))
            .count()
    }

    /// Waits until the current coordinator logged builder `i` online more
    /// than `before` times.
    pub fn wait_online_again(&mut self, i: usize, before: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        while self.times_online(i) <= before {
            self.coordinator.process.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "builder {} did not come online again within {WAIT:?}",
                    self.builders[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
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

    /// Starts builder `i` again (same state dir, same link) and waits until
    /// the coordinator has it online again.
    pub fn restart_builder(&mut self, i: usize) -> anyhow::Result<()> {
        let before = self.times_online(i);
        let url = self.builder_url(i);
        self.builders[i].start(&url)?;
        self.wait_online_again(i, before)
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
        if let Some(k) = key {
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
        let infos = path_infos(&self.client, drvs)?;
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

    /// A FarmService client (no key: the coordinator's listener is loopback and
    /// it has no `--authorized-keys`, so local callers are allowed).
    pub async fn farm_client(
        &self,
    ) -> anyhow::Result<FarmServiceClient<tonic::transport::Channel>> {
        Ok(FarmServiceClient::connect(self.grpc_url()).await?)
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
}

/// A submission's events as they arrive.
pub struct EventStream {
    stream: tonic::Streaming<v1::BuildEvent>,
    pub events: Vec<Ev>,
}

impl EventStream {
    /// Reads until `pred` holds for an event (returned), the stream ends, or
    /// the timeout passes (both errors listing what came).
    pub async fn until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Ev) -> bool,
    ) -> anyhow::Result<Ev> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.message()).await;
            let msg = match next {
                Err(_) => bail!(
                    "no matching event within {timeout:?}; events so far:\n{}",
                    self.render()
                ),
                Ok(Err(status)) => bail!(
                    "event stream failed: {status}; events so far:\n{}",
                    self.render()
                ),
                Ok(Ok(None)) => bail!(
                    "event stream ended without a matching event; events so far:\n{}",
                    self.render()
                ),
                Ok(Ok(Some(m))) => m,
            };
            let Some(ev) = msg.event else { continue };
            self.events.push(ev.clone());
            if pred(&ev) {
                return Ok(ev);
            }
        }
    }

    /// Reads until `SubmissionDone`.
    pub async fn done(&mut self, timeout: Duration) -> anyhow::Result<v1::SubmissionDone> {
        match self.until(timeout, |e| matches!(e, Ev::Done(_))).await? {
            Ev::Done(d) => Ok(d),
            _ => unreachable!("until returns a matching event"),
        }
    }

    /// The submission id from `Submitted`.
    pub fn submission_id(&self) -> Option<String> {
        self.events.iter().find_map(|e| match e {
            Ev::Submitted(s) => Some(s.submission_id.clone()),
            _ => None,
        })
    }

    /// Every distinct `BuildFinished`, in order (see [`EventStream::started`]).
    pub fn finished(&self) -> Vec<&v1::BuildFinished> {
        let mut seen = Vec::new();
        for e in &self.events {
            if let Ev::Finished(f) = e
                && !seen.contains(&f)
            {
                seen.push(f);
            }
        }
        seen
    }

    /// Every distinct `BuildStarted`, in order. A watch stream (a snapshot,
    /// then live events) may repeat an event that happened while the snapshot
    /// was taken; an identical repeat says nothing new, so it is dropped here.
    pub fn started(&self) -> Vec<&v1::BuildStarted> {
        let mut seen = Vec::new();
        for e in &self.events {
            if let Ev::Started(s) = e
                && !seen.contains(&s)
            {
                seen.push(s);
            }
        }
        seen
    }

    /// The last outcome per derivation path.
    pub fn outcomes(&self) -> BTreeMap<String, &v1::BuildFinished> {
        self.finished()
            .into_iter()
            .map(|f| (f.drv_path.clone(), f))
            .collect()
    }

    /// The events, one per line.
    pub fn render(&self) -> String {
        self.events
            .iter()
            .map(|e| format!("{}\n", render_event(e)))
            .collect()
    }
}

/// One event as a short line.
pub fn render_event(e: &Ev) -> String {
    match e {
        Ev::Submitted(s) => format!(
            "submitted {} total={} cached={}",
            s.submission_id, s.total, s.cached
        ),
        Ev::Queued(q) => format!("queued {} {}", q.build_id, q.drv_path),
        Ev::Started(s) => format!("started {} {} on {}", s.build_id, s.drv_path, s.builder),
        Ev::Finished(f) => format!(
            "finished {} {} {:?} on {:?} {}",
            f.build_id,
            f.drv_path,
            v1::BuildOutcome::try_from(f.outcome).unwrap_or(v1::BuildOutcome::Unspecified),
            f.builder,
            f.error_message
        ),
        Ev::Done(d) => format!(
            "done {} success={} built={} cached={} failed={}",
            d.submission_id, d.success, d.built, d.cached, d.failed
        ),
    }
}

/// The outcome of a `BuildFinished`.
pub fn outcome(f: &v1::BuildFinished) -> v1::BuildOutcome {
    v1::BuildOutcome::try_from(f.outcome).unwrap_or(v1::BuildOutcome::Unspecified)
}

/// The derivation name of a `.drv` path (`/nix/store/…-NAME.drv` → `NAME`).
pub fn drv_name(drv_path: &str) -> String {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base);
    name.trim_end_matches(".drv").to_owned()
}

/// The path infos of `paths`' closure in `actor`'s store (`nix path-info --json -r`).
pub fn path_infos(actor: &Actor, paths: &[StorePath]) -> anyhow::Result<Vec<ValidPathInfo>> {
    let mut args = vec![
        "path-info".to_string(),
        "--json".into(),
        "-r".into(),
        "--derivation".into(),
    ];
    args.extend(paths.iter().map(|p| p.to_string()));
    let json: serde_json::Value = serde_json::from_str(&actor.run("nix", &args)?)?;
    let mut out = Vec::new();
    for item in json
        .as_array()
        .context("path-info output is not an array")?
    {
        let s = |k: &str| item.get(k).and_then(|v| v.as_str());
        let path = StorePath::parse(s("path").context("path")?)?;
        let nar_hash = Hash::parse_any(s("narHash").context("narHash")?)?;
        let nar_size = item["narSize"].as_u64().context("narSize")?;
        let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
        for r in item["references"].as_array().context("references")? {
            info.references
                .insert(StorePath::parse(r.as_str().context("reference")?)?);
        }
        if let Some(d) = s("deriver") {
            info.deriver = Some(StorePath::parse(d)?);
        }
        info.ca = s("ca").map(str::to_owned);
        out.push(info);
    }
    Ok(out)
}

/// `infos` with every path after its references.
fn topo_order(infos: Vec<ValidPathInfo>) -> anyhow::Result<Vec<ValidPathInfo>> {
    let mut by_path: HashMap<StorePath, ValidPathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut done: BTreeSet<StorePath> = BTreeSet::new();
    let mut out = Vec::new();
    while !by_path.is_empty() {
        let ready: Vec<StorePath> = by_path
            .values()
            .filter(|i| {
                i.references
                    .iter()
                    .all(|r| r == &i.path || done.contains(r) || !by_path.contains_key(r))
            })
            .map(|i| i.path.clone())
            .collect();
        ensure!(
            !ready.is_empty(),
            "reference cycle among {:?}",
            by_path.keys()
        );
        for p in ready {
            let info = by_path.remove(&p).context("present")?;
            done.insert(p);
            out.push(info);
        }
    }
    Ok(out)
}

/// `nix-store --dump PATH` inside the actor.
pub fn dump(actor: &Actor, path: &StorePath) -> anyhow::Result<Vec<u8>> {
    let out = actor
        .command("nix-store")
        .arg("--dump")
        .arg(path.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()?;
    ensure!(
        out.status.success(),
        "nix-store --dump {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
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

/// A Nix expression prelude: `mk NAME SCRIPT DEPS` makes a `/bin/sh` derivation
/// that records itself in the witness file, `gate FILE` waits for a file.
pub fn prelude(witness: &Path) -> String {
    let w = witness.display();
    format!(
        r#"
  witness = "{w}";
  mkWith = attrs: name: script: deps: derivation ({{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      echo "${{name}} $NIX_BUILD_TOP" >> ${{witness}}/built.log
      ${{script}}
    '' ];
    deps = deps;
  }} // attrs);
  mk = mkWith {{}};
  gate = file: ''
    echo $$ > ${{witness}}/${{file}}.pid
    echo "$NIX_BUILD_TOP" >> ${{witness}}/${{file}}.started
    while [ ! -e ${{witness}}/${{file}} ]; do /bin/sleep 0.1; done
  '';
"#
    )
}

/// `GET target` over a fresh HTTP/1.1 connection to `addr` (`host:port`):
/// (status, body). Only `Content-Length` bodies (what the cache sends).
pub async fn http_get(addr: &str, target: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split])?.to_ascii_lowercase();
    ensure!(
        !head.contains("transfer-encoding: chunked"),
        "unexpected chunked response to {target}"
    );
    let status: u16 = head.split(' ').nth(1).context("status line")?.parse()?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// `GET target` over a fresh HTTP/1.1 connection to `addr`, blocking: (status, body).
pub fn http_get_blocking(addr: &str, target: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split])?;
    let status: u16 = head.split(' ').nth(1).context("status line")?.parse()?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// A graph of `/bin/sh` derivations as one Nix file, and what it holds.
pub struct Graph {
    /// The expression (evaluates to a list of the roots).
    pub nix: String,
    /// Every derivation name in it.
    pub names: Vec<String>,
}

/// A Nix string literal of `s`.
pub fn lit(s: &str) -> String {
    farm_tests::nix_string(s)
}

/// Builds the Nix text of a graph from `(binding, expression)` pairs and roots.
pub fn graph_nix(witness: &Path, bindings: &[(String, String)], roots: &[&str]) -> String {
    let mut nix = String::from("let\n");
    nix.push_str(&prelude(witness));
    for (name, expr) in bindings {
        nix.push_str(&format!("  {name} = {expr};\n"));
    }
    nix.push_str("in [ ");
    for r in roots {
        nix.push_str(r);
        nix.push(' ');
    }
    nix.push_str("]\n");
    nix
}

/// SSH keys for client actors, authorized on the coordinator
/// (`--authorized-keys`): the Nix clients log in to its SSH endpoint with
/// them, and `farm` signs its calls with them (`FARM_KEY`).
pub struct SshAccess {
    dir: tempfile::TempDir,
    /// One private key per client.
    pub keys: Vec<PathBuf>,
}

impl SshAccess {
    /// `n` fresh ed25519 keys (`ssh-keygen`), all authorized.
    pub fn new(n: usize) -> anyhow::Result<SshAccess> {
        let dir = tempfile::Builder::new().prefix("farm-e2e-ssh-").tempdir()?;
        let mut keys = Vec::new();
        let mut authorized = String::new();
        for i in 0..n {
            let key = dir.path().join(format!("client{i}_ed25519"));
            let out = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C"])
                .arg(format!("client{i}@farm-e2e"))
                .arg("-f")
                .arg(&key)
                .output()?;
            ensure!(
                out.status.success(),
                "ssh-keygen: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            authorized.push_str(&std::fs::read_to_string(key.with_extension("pub"))?);
            keys.push(key);
        }
        std::fs::write(dir.path().join("authorized_keys"), authorized)?;
        Ok(SshAccess { dir, keys })
    }

    /// The coordinator flags that authorize the keys.
    pub fn coordinator_args(&self) -> [String; 2] {
        [
            "--authorized-keys".to_owned(),
            self.dir
                .path()
                .join("authorized_keys")
                .display()
                .to_string(),
        ]
    }

    /// `NIX_SSHOPTS` for key `i` against `farm`'s SSH endpoint: its port, the
    /// key, and a known_hosts file holding the coordinator's host key.
    pub fn nix_sshopts(&self, farm: &Farm, i: usize) -> anyhow::Result<String> {
        let e = &farm.coordinator.endpoints;
        let port = e.ssh_port()?;
        let known_hosts = self.dir.path().join("known_hosts");
        let line = format!("[127.0.0.1]:{port} {}\n", e.ssh_host_key);
        // Other clients' ssh may be reading it: replace it whole, and only
        // when it changes (never truncate it under a reader).
        if std::fs::read_to_string(&known_hosts).ok().as_deref() != Some(line.as_str()) {
            let tmp = self.dir.path().join(format!("known_hosts.{i}.tmp"));
            std::fs::write(&tmp, &line)?;
            std::fs::rename(&tmp, &known_hosts)?;
        }
        Ok(format!(
            "-p {port} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
            self.keys[i].display(),
            known_hosts.display()
        ))
    }
}

/// The farm as a Nix store and as a remote builder.
pub const FARM_STORE: &str = "ssh-ng://nix@127.0.0.1";

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

/// Derivations every client graph shares, and how many each has in all.
pub const SHARED_BY_ALL: usize = 4;
pub const GRAPH_SIZE: usize = 20;
/// Client-own derivations of a graph: all but the shared ones, the two
/// pair-shared ones and the top.
const OWN: usize = GRAPH_SIZE - SHARED_BY_ALL - 2 - 1;

/// Client `i`'s graph (of `n` clients) in round `salt`: one top derivation
/// over [`GRAPH_SIZE`] `- 1` others — [`SHARED_BY_ALL`] shared by every
/// client, `pair-i` and `pair-(i+1 mod n)` each shared with one neighbour,
/// and the client's own — each sleeping `sleep` seconds. Each build appends
/// `start NAME BUILD_TOP` to `WITNESS/runs.log` when it starts and `done …`
/// right before it ends. The top waits for `WITNESS/<gate>` when given.
/// Returns the Nix file's text and the derivation names.
pub fn client_graph(
    witness: &Path,
    salt: &str,
    i: usize,
    n: usize,
    sleep: f32,
    gate: Option<&str>,
) -> (String, Vec<String>) {
    let w = witness.display();
    let mut nix = format!(
        r#"let
  mk = name: deps: script: derivation {{
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      echo "start ${{name}} $NIX_BUILD_TOP" >> {w}/runs.log
      ${{script}}
      echo "${{name}} $deps" > $out
      echo "done ${{name}} $NIX_BUILD_TOP" >> {w}/runs.log
    '' ];
  }};
  nap = "/bin/sleep {sleep}";
"#
    );
    let mut names = Vec::new();
    let mut bind = |var: String, name: String, deps: Vec<String>, script: String| {
        nix.push_str(&format!(
            "  {var} = mk {} [ {} ] {script};\n",
            lit(&name),
            deps.join(" ")
        ));
        names.push(name);
        var
    };
    let g: Vec<String> = (0..SHARED_BY_ALL)
        .map(|k| {
            let deps = match k {
                0 | 1 => vec![],
                2 => vec!["g0".to_owned()],
                _ => vec![format!("g{}", k - 2), format!("g{}", k - 1)],
            };
            bind(
                format!("g{k}"),
                format!("{salt}shared-{k}"),
                deps,
                "nap".into(),
            )
        })
        .collect();
    let pairs: Vec<String> = [i, (i + 1) % n]
        .into_iter()
        .enumerate()
        .map(|(j, k)| {
            bind(
                format!("p{j}"),
                format!("{salt}pair-{k}"),
                vec![g[k % SHARED_BY_ALL].clone()],
                "nap".into(),
            )
        })
        .collect();
    let mut own: Vec<String> = Vec::new();
    for j in 0..OWN {
        let deps = match j {
            0 => vec![g[SHARED_BY_ALL - 1].clone(), pairs[0].clone()],
            1 => vec![pairs[1].clone()],
            _ => {
                let mut d = vec![own[j - 2].clone()];
                if j >= 3 {
                    d.push(own[j - 3].clone());
                }
                d
            }
        };
        let var = bind(
            format!("u{j}"),
            format!("{salt}c{i}-u{j}"),
            deps,
            "nap".into(),
        );
        own.push(var);
    }
    let script = match gate {
        Some(file) => lit(&format!(
            "while [ ! -e {w}/{file} ]; do /bin/sleep 0.1; done"
        )),
        None => "nap".to_owned(),
    };
    let all: Vec<String> = g.iter().chain(&pairs).chain(&own).cloned().collect();
    bind("top".into(), format!("{salt}c{i}-top"), all, script);
    nix.push_str("in top\n");
    (nix, names)
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
