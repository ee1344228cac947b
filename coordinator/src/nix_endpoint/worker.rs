//! The worker protocol (`nix-daemon --stdio`, ssh-ng://) over the farm:
//! path queries from the cache, uploads (`AddToStoreNar`,
//! `AddMultipleToStore`, `AddTextToStore`) into it, `NarFromPath` out of it,
//! and builds on the farm: `BuildDerivation` (build hook) and
//! `BuildPathsWithResults` / `BuildPaths` (the farm schedules the whole graph
//! below the requested derivations). While builds run, each gets a build
//! activity whose log lines go out as `RESULT` type 101 messages, which is what
//! `nix build -L` prints and `nix log` keeps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use farm_nix::derivation::BasicDerivation;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;
use farm_nix::wire::{BuildResult, BuildStatus, DerivedPath, HandlerError, OutputsSpec};
use farm_nix::worker::{
    ACT_BUILD, BuildMode, ClientSettings, Field, Logger, Missing, WorkerHandler,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::Endpoint;
use super::build::{BuildBackend, BuildEvent, BuildSettings};
use super::store::FarmStore;
use crate::access::Level;
use crate::nix_endpoint::error::need_level;
use crate::nix_endpoint::ssh::{BoxFuture, ClientIdentity};

/// Nix's `lvlInfo`.
const LVL_INFO: u64 = 3;
/// Longest partial log line kept before it is sent anyway.
const MAX_LINE: usize = 64 * 1024;

/// Serve one worker protocol session.
pub(crate) async fn run(
    endpoint: &Endpoint,
    client: &ClientIdentity,
    stdin: impl AsyncRead + Unpin + Send,
    stdout: impl AsyncWrite + Unpin + Send,
) -> Result<(), farm_nix::worker::WorkerError> {
    let mut session = WorkerSession {
        store: endpoint.store.for_client(client),
        builds: endpoint.builds.clone(),
        client: client.clone(),
        settings: BuildSettings::default(),
        next_activity: 1,
    };
    let config = farm_nix::worker::WorkerConfig {
        limits: endpoint.limits,
        ..Default::default()
    };
    farm_nix::worker::run_server_with_config(stdin, stdout, &mut session, &config).await
}

/// One worker session.
pub(crate) struct WorkerSession {
    store: FarmStore,
    builds: Option<Arc<dyn BuildBackend>>,
    client: ClientIdentity,
    /// From `SetOptions`, when a client sends it.
    settings: BuildSettings,
    next_activity: u64,
}

/// Per running derivation: its activity, and the unfinished last log line.
struct Activity {
    id: u64,
    partial: Vec<u8>,
}

impl WorkerSession {
    fn backend(&self) -> Result<Arc<dyn BuildBackend>, HandlerError> {
        self.builds
            .clone()
            .ok_or_else(|| HandlerError::new("this farm endpoint does not build"))
    }

    /// Drive `build` to its end while relaying its events to the client as
    /// build activities and log lines.
    async fn relay<T>(
        &mut self,
        build: BoxFuture<'static, Result<T, HandlerError>>,
        mut rx: mpsc::Receiver<BuildEvent>,
        log: &mut Logger<'_>,
    ) -> Result<T, HandlerError> {
        let mut activities: BTreeMap<StorePath, Activity> = BTreeMap::new();
        let mut build = build;
        let result = loop {
            tokio::select! {
                r = &mut build => break r,
                Some(ev) = rx.recv() => self.event(ev, &mut activities, log).await,
            }
        };
        while let Ok(ev) = rx.try_recv() {
            self.event(ev, &mut activities, log).await;
        }
        for (_, a) in std::mem::take(&mut activities) {
            finish_activity(a, log).await;
        }
        result
    }

    async fn event(
        &mut self,
        ev: BuildEvent,
        activities: &mut BTreeMap<StorePath, Activity>,
        log: &mut Logger<'_>,
    ) {
        // A client that stops reading does not stop the farm's builds: errors
        // writing to it are ignored here (the reply fails later).
        match ev {
            BuildEvent::Started { drv, builder } => {
                if activities.contains_key(&drv) {
                    return;
                }
                let id = self.next_activity;
                self.next_activity += 1;
                let text = format!("building '{drv}' on farm builder '{builder}'");
                let _ = log
                    .start_activity(
                        id,
                        LVL_INFO,
                        ACT_BUILD,
                        &text,
                        vec![
                            Field::String(drv.to_string()),
                            Field::String(format!("farm:{builder}")),
                            Field::Int(1),
                            Field::Int(1),
                        ],
                        0,
                    )
                    .await;
                activities.insert(
                    drv,
                    Activity {
                        id,
                        partial: Vec::new(),
                    },
                );
            }
            BuildEvent::Log { drv, data } => {
                let Some(a) = activities.get_mut(&drv) else {
                    return;
                };
                a.partial.extend_from_slice(&data);
                while let Some(nl) = a.partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = a.partial.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line[..line.len() - 1]);
                    let _ = log.build_log_line(a.id, line.trim_end_matches('\r')).await;
                }
                if a.partial.len() > MAX_LINE {
                    let line = String::from_utf8_lossy(&a.partial).into_owned();
                    a.partial.clear();
                    let _ = log.build_log_line(a.id, &line).await;
                }
            }
            BuildEvent::Finished { drv, .. } => {
                if let Some(a) = activities.remove(&drv) {
                    finish_activity(a, log).await;
                }
            }
        }
    }

    fn settings(&self) -> BuildSettings {
        self.settings.clone()
    }
}

async fn finish_activity(a: Activity, log: &mut Logger<'_>) {
    if !a.partial.is_empty() {
        let line = String::from_utf8_lossy(&a.partial).into_owned();
        let _ = log.build_log_line(a.id, &line).await;
    }
    let _ = log.stop_activity(a.id).await;
}

fn refuse_mode(mode: BuildMode) -> Result<(), HandlerError> {
    match mode {
        BuildMode::Normal => Ok(()),
        other => Err(HandlerError::new(format!(
            "the farm only builds in normal mode, not {other:?}"
        ))),
    }
}

impl WorkerHandler for WorkerSession {
    async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, HandlerError> {
        self.store.path_info(path).await
    }

    async fn nar_from_path(
        &mut self,
        path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<(), HandlerError> {
        self.store.write_nar(path, out).await.map(|_| ())
    }

    async fn add_to_store_nar(
        &mut self,
        info: ValidPathInfo,
        _repair: bool,
        _dont_check_sigs: bool,
        nar: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<(), HandlerError> {
        need_level(&self.client, Level::Build, "adding paths")?;
        // Signatures do not matter: the cache verifies the NAR and signs it itself.
        self.store.add(info, nar).await.map(|_| ())
    }

    async fn is_valid_path(&mut self, path: &StorePath) -> Result<bool, HandlerError> {
        self.store.is_valid(path).await
    }

    async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        _substitute: bool,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        self.store.valid_paths(paths).await
    }

    async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: BasicDerivation,
        mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> Result<BuildResult, HandlerError> {
        need_level(&self.client, Level::Build, "building")?;
        refuse_mode(mode)?;
        let backend = self.backend()?;
        let (tx, rx) = mpsc::channel(256);
        let build = backend.build_derivation(
            self.client.clone(),
            drv_path.clone(),
            drv,
            self.settings(),
            tx,
        );
        let outcome = self.relay(build, rx, log).await?;
        Ok(outcome.to_build_result())
    }

    async fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> Result<Vec<BuildResult>, HandlerError> {
        need_level(&self.client, Level::Build, "building")?;
        refuse_mode(mode)?;
        let drvs: Vec<StorePath> = paths
            .iter()
            .filter_map(|p| match p {
                DerivedPath::Built { drv_path, .. } => Some(drv_path.clone()),
                DerivedPath::Opaque(_) => None,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut outcomes = BTreeMap::new();
        if !drvs.is_empty() {
            let backend = self.backend()?;
            let (tx, rx) = mpsc::channel(1024);
            let build = backend.build_graph(self.client.clone(), drvs, self.settings(), tx);
            outcomes = self.relay(build, rx, log).await?;
        }
        let mut results = Vec::with_capacity(paths.len());
        for p in paths {
            results.push(match p {
                DerivedPath::Opaque(path) => {
                    if self.store.is_valid(path).await? {
                        BuildResult::new(BuildStatus::AlreadyValid, "")
                    } else {
                        BuildResult::new(
                            BuildStatus::MiscFailure,
                            format!(
                                "path '{path}' is not valid in the farm's store and cannot be built"
                            ),
                        )
                    }
                }
                DerivedPath::Built { drv_path, outputs } => {
                    let Some(o) = outcomes.get(drv_path) else {
                        return Err(HandlerError::new(format!("the farm lost '{drv_path}'")));
                    };
                    let mut o = o.clone();
                    if let OutputsSpec::Names(names) = outputs {
                        o.outputs.retain(|name, _| names.contains(name));
                    }
                    o.to_build_result()
                }
            });
        }
        Ok(results)
    }

    async fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        log: &mut Logger<'_>,
    ) -> Result<(), HandlerError> {
        let results = self.build_paths_with_results(paths, mode, log).await?;
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.status.is_success())
            .map(|r| r.error_msg.clone())
            .collect();
        match failed.as_slice() {
            [] => Ok(()),
            [one] => Err(HandlerError::new(one)),
            many => Err(HandlerError::new(format!(
                "{} builds failed on the farm:\n{}",
                many.len(),
                many.join("\n")
            ))),
        }
    }

    async fn query_missing(&mut self, paths: &[DerivedPath]) -> Result<Missing, HandlerError> {
        let mut m = Missing {
            will_build: BTreeSet::new(),
            will_substitute: BTreeSet::new(),
            unknown: BTreeSet::new(),
            download_size: 0,
            nar_size: 0,
        };
        for p in paths {
            match p {
                DerivedPath::Opaque(path) => {
                    if !self.store.is_valid(path).await? {
                        m.unknown.insert(path.clone());
                    }
                }
                DerivedPath::Built { drv_path, outputs } => {
                    let Some(drv) = self.store.read_drv(drv_path).await? else {
                        m.unknown.insert(drv_path.clone());
                        continue;
                    };
                    let wanted: BTreeSet<StorePath> = drv
                        .output_paths()
                        .into_iter()
                        .filter(|(name, _)| match outputs {
                            OutputsSpec::All => true,
                            OutputsSpec::Names(n) => n.contains(name),
                        })
                        .map(|(_, p)| p)
                        .collect();
                    if self.store.valid_paths(&wanted).await?.len() != wanted.len() {
                        m.will_build.insert(drv_path.clone());
                    }
                }
            }
        }
        Ok(m)
    }

    async fn set_options(&mut self, settings: &ClientSettings) -> Result<(), HandlerError> {
        self.settings.max_silent_time = settings.max_silent_time;
        for (name, value) in &settings.overrides {
            if name == "timeout" {
                self.settings.build_timeout = value.parse().unwrap_or(0);
            }
        }
        Ok(())
    }

    async fn query_derivation_output_map(
        &mut self,
        drv_path: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>, HandlerError> {
        let drv =
            self.store.read_drv(drv_path).await?.ok_or_else(|| {
                HandlerError::new(format!("'{drv_path}' is not in the farm's store"))
            })?;
        Ok(drv
            .outputs
            .into_iter()
            .map(|(name, o)| (name, o.path))
            .collect())
    }

    async fn add_text_to_store(
        &mut self,
        name: &str,
        text: &str,
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, HandlerError> {
        need_level(&self.client, Level::Build, "adding paths")?;
        self.store.add_text(name, text, references).await
    }
}
