//! `FarmService`, what the CLI and CI call: every method authorises the caller
//! (see [`crate::api::grpc::auth::CliAuth`]), converts, calls the [`Coordinator`], converts back.

use std::collections::{BTreeMap, BTreeSet};

use farm_nix::store_path::StorePath;
use farm_proto::auth::methods;
use farm_proto::v1;
use farm_proto::v1::build_event::Event as Ev;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status, Streaming};

use crate::api::grpc::BoxStream;
use crate::api::grpc::auth::{Caller, CliAuth, Level};
use crate::api::grpc::convert::{capabilities_to, event_to, load_to};
use crate::domain::coordinator::{Coordinator, now_ms};
use crate::domain::graph::Root;
use crate::domain::scheduler::types::*;

/// `FarmService`.
#[derive(Clone)]
pub struct FarmSvc {
    pub coord: Coordinator,
    pub auth: CliAuth,
}

impl FarmSvc {
    async fn authorize<T>(
        &self,
        req: &Request<T>,
        method: &str,
        level: Level,
    ) -> Result<Caller, Status> {
        let caller = self
            .auth
            .check(req.metadata(), method, level, now_ms() / 1000)
            .await?;
        tracing::debug!(method, caller = ?caller, "CLI call");
        Ok(caller)
    }

    /// Make the state durable before acknowledging a change.
    async fn flushed(&self) -> Result<(), Status> {
        Ok(self.coord.flush().await?)
    }
}

/// The events that describe a submission as it stands: `Submitted`, then per
/// build its latest event, then `Done` if it is done.
pub fn snapshot_events(
    sub: &SubmissionRecord,
    builds: &[std::sync::Arc<BuildView>],
) -> Vec<v1::BuildEvent> {
    let mut out = vec![v1::BuildEvent {
        event: Some(Ev::Submitted(v1::Submitted {
            submission_id: format!("s{}", sub.id),
            total: (sub.builds.len() + sub.cached.len()) as u32,
            cached: sub.cached.len() as u32,
        })),
    }];
    for (drv, outputs) in &sub.cached {
        if sub.roots.contains(drv) {
            out.push(event_to(&Event::Finished {
                build: 0,
                drv_path: drv.clone(),
                outcome: Outcome::Cached,
                error: None,
                outputs: outputs.clone(),
                builder: None,
                started_ms: None,
                finished_ms: None,
            }));
        }
    }
    let mut built = 0;
    let mut cached = sub.cached.len() as u32;
    let mut failed = 0;
    for b in builds {
        let e = match &b.state {
            BuildState::Waiting | BuildState::Queued => Event::Queued {
                build: b.id,
                drv_path: b.drv_path.clone(),
            },
            BuildState::Running { builder, .. } => Event::Started {
                build: b.id,
                drv_path: b.drv_path.clone(),
                builder: builder.clone(),
            },
            BuildState::Done(o) => {
                match o {
                    Outcome::Built => built += 1,
                    Outcome::Cached => cached += 1,
                    _ => failed += 1,
                }
                Event::Finished {
                    build: b.id,
                    drv_path: b.drv_path.clone(),
                    outcome: *o,
                    error: b.error.clone(),
                    outputs: if o.is_success() {
                        b.outputs.clone()
                    } else {
                        BTreeMap::new()
                    },
                    builder: b.builder.clone(),
                    started_ms: b.started_ms,
                    finished_ms: b.finished_ms,
                }
            }
        };
        out.push(event_to(&e));
    }
    if sub.done {
        out.push(event_to(&Event::SubmissionDone {
            submission: sub.id,
            success: failed == 0 && !sub.cancelled,
            built,
            cached,
            failed,
        }));
    }
    out
}

/// Follow a submission: a snapshot, then live events until it is done. A
/// watcher that falls behind gets a fresh snapshot.
pub fn watch_stream(coord: Coordinator, sid: SubmissionId) -> BoxStream<v1::BuildEvent> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<v1::BuildEvent, Status>>(256);
    tokio::spawn(async move {
        'outer: loop {
            let mut events = coord.subscribe(sid);
            // The snapshot reports only what is on disk.
            if let Err(e) = coord.flush().await {
                tracing::error!(error = %e, "cannot flush the state database");
            }
            let Some((sub, builds)) = coord.submission(sid).await else {
                let _ = tx
                    .send(Err(Status::not_found(format!("no submission s{sid}"))))
                    .await;
                break;
            };
            for e in snapshot_events(&sub, &builds) {
                if tx.send(Ok(e)).await.is_err() {
                    break 'outer;
                }
            }
            if sub.done {
                break;
            }
            loop {
                let next = tokio::select! {
                    e = events.recv() => e,
                    _ = coord.stopping().cancelled() => break 'outer,
                };
                match next {
                    Ok(e) => {
                        let done = matches!(e, Event::SubmissionDone { .. });
                        if tx.send(Ok(event_to(&e))).await.is_err() || done {
                            break 'outer;
                        }
                    }
                    Err(RecvError::Lagged(_)) => continue 'outer,
                    Err(RecvError::Closed) => break 'outer,
                }
            }
        }
        drop(tx);
        coord.unsubscribe_idle();
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn parse_priority(p: i32) -> Priority {
    match v1::Priority::try_from(p) {
        Ok(v1::Priority::Interactive) => Priority::Interactive,
        _ => Priority::Ci,
    }
}

#[tonic::async_trait]
impl v1::farm_service_server::FarmService for FarmSvc {
    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.authorize(&request, methods::STATUS, Level::Read)
            .await?;
        let resp = self.coord.read_sched(|s| {
            let builders = s
                .builders()
                .into_iter()
                .map(|b| {
                    let state = if !b.online {
                        v1::BuilderState::Offline
                    } else if b.record.draining {
                        v1::BuilderState::Draining
                    } else if b.running > 0 {
                        v1::BuilderState::Busy
                    } else {
                        v1::BuilderState::Idle
                    };
                    v1::BuilderStatus {
                        name: b.record.name.clone(),
                        state: state as i32,
                        capabilities: Some(capabilities_to(&b.record.capabilities)),
                        load: Some(load_to(&b.load)),
                        last_seen_unix: b.record.last_seen_ms / 1000,
                        public_key: b.record.public_key.clone(),
                    }
                })
                .collect();
            let queue = s
                .queue_depths()
                .into_iter()
                .map(|(system, queued)| v1::QueueDepth { system, queued })
                .collect();
            let running = s
                .running()
                .into_iter()
                .map(|b| {
                    let (builder, started) = match &b.state {
                        BuildState::Running {
                            builder,
                            started_ms,
                            ..
                        } => (builder.clone(), *started_ms / 1000),
                        _ => (String::new(), 0),
                    };
                    v1::RunningBuild {
                        build_id: format!("b{}", b.id),
                        drv_path: b.drv_path.to_string(),
                        builder,
                        started_unix: started,
                    }
                })
                .collect();
            let recent_failures = s
                .recent_failures()
                .into_iter()
                .map(|f| v1::RecentFailure {
                    build_id: format!("b{}", f.build),
                    drv_path: f.drv_path.to_string(),
                    builder: f.builder.unwrap_or_default(),
                    error_message: f.error,
                    finished_unix: f.finished_ms / 1000,
                })
                .collect();
            v1::StatusResponse {
                builders,
                queue,
                running,
                recent_failures,
            }
        });
        Ok(Response::new(resp))
    }

    type SubmitStream = BoxStream<v1::BuildEvent>;

    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let caller = self
            .authorize(&request, methods::SUBMIT, Level::Read)
            .await?;
        let req = request.into_inner();
        let drvs = farm_proto::convert::parse_store_paths("drv_paths", &req.drv_paths, 100_000)?;
        if drvs.is_empty() {
            return Err(Status::invalid_argument("drv_paths is empty"));
        }
        if let Some(bad) = drvs.iter().find(|p| !p.is_derivation()) {
            return Err(Status::invalid_argument(format!(
                "{bad} is not a .drv path"
            )));
        }
        let opts = crate::domain::graph::SubmitOptions {
            priority: parse_priority(req.priority),
            max_silent_time_secs: req.max_silent_time_secs,
            build_timeout_secs: req.build_timeout_secs,
            client: Some(match caller {
                Caller::Local => "local".to_owned(),
                Caller::Key {
                    fingerprint,
                    comment,
                } => format!("{fingerprint} {comment}").trim_end().to_owned(),
            }),
        };
        let sid = self
            .coord
            .submit(drvs.into_iter().map(Root::Drv).collect(), opts)
            .await?;
        Ok(Response::new(watch_stream(self.coord.clone(), sid)))
    }

    type WatchStream = BoxStream<v1::BuildEvent>;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize(&request, methods::WATCH, Level::Read)
            .await?;
        let id = request.into_inner().submission_id;
        let sid = parse_submission_id(&id)
            .ok_or_else(|| Status::invalid_argument(format!("bad submission id {id:?}")))?;
        if !self.coord.submission_known(sid) {
            return Err(Status::not_found(format!("no submission {id}")));
        }
        Ok(Response::new(watch_stream(self.coord.clone(), sid)))
    }

    type LogsStream = BoxStream<v1::LogChunk>;

    async fn logs(
        &self,
        request: Request<v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        self.authorize(&request, methods::LOGS, Level::Read).await?;
        let req = request.into_inner();
        crate::api::grpc::logs::logs_stream(self.coord.clone(), &req.build_id, req.follow).await
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        self.authorize(&request, methods::CANCEL, Level::Admin)
            .await?;
        let id = request.into_inner().id;
        let cancelled = if id.starts_with('s') {
            let sid = parse_submission_id(&id)
                .ok_or_else(|| Status::invalid_argument(format!("bad submission id {id:?}")))?;
            self.coord
                .with_sched(|s, now| s.cancel_submission(sid, now))
        } else if let Some(b) = parse_build_id(&id) {
            self.coord.with_sched(|s, now| s.cancel_build(b, now))
        } else if let Ok(drv) = StorePath::parse(&id) {
            self.coord.with_sched(|s, now| match s.build_of_drv(&drv) {
                Some(b) => s.cancel_build(b, now),
                None => 0,
            })
        } else {
            return Err(Status::invalid_argument(format!(
                "{id:?} is not a build id (b…), submission id (s…) or .drv path"
            )));
        };
        tracing::info!(%id, cancelled, "cancel requested");
        self.flushed().await?;
        Ok(Response::new(v1::CancelResponse { cancelled }))
    }

    async fn set_drain(
        &self,
        request: Request<v1::SetDrainRequest>,
    ) -> Result<Response<v1::SetDrainResponse>, Status> {
        self.authorize(&request, methods::SET_DRAIN, Level::Admin)
            .await?;
        let req = request.into_inner();
        if !self
            .coord
            .with_sched(|s, _| s.set_drain(&req.builder, req.draining))
        {
            return Err(Status::not_found(format!(
                "no builder named {:?}",
                req.builder
            )));
        }
        self.flushed().await?;
        Ok(Response::new(v1::SetDrainResponse {}))
    }

    async fn query_valid_paths(
        &self,
        request: Request<v1::QueryValidPathsRequest>,
    ) -> Result<Response<v1::QueryValidPathsResponse>, Status> {
        self.authorize(&request, methods::QUERY_VALID_PATHS, Level::Read)
            .await?;
        crate::api::grpc::data::query_valid_paths(&self.coord, request.into_inner()).await
    }

    async fn upload_nar(
        &self,
        request: Request<Streaming<v1::UploadNarRequest>>,
    ) -> Result<Response<v1::UploadNarResponse>, Status> {
        self.authorize(&request, methods::UPLOAD_NAR, Level::Read)
            .await?;
        crate::api::grpc::data::upload_nar(
            &self.coord,
            crate::api::grpc::data::Uploader::Client,
            request.into_inner(),
        )
        .await
    }

    type DownloadNarStream = BoxStream<v1::NarChunk>;

    async fn download_nar(
        &self,
        request: Request<v1::DownloadNarRequest>,
    ) -> Result<Response<Self::DownloadNarStream>, Status> {
        self.authorize(&request, methods::DOWNLOAD_NAR, Level::Read)
            .await?;
        crate::api::grpc::data::download_nar(&self.coord, request.into_inner()).await
    }

    async fn machines(
        &self,
        request: Request<v1::MachinesRequest>,
    ) -> Result<Response<v1::MachinesResponse>, Status> {
        self.authorize(&request, methods::MACHINES, Level::Read)
            .await?;
        let protocol = request.into_inner().protocol;
        let protocol = match protocol.as_str() {
            "" | "ssh-ng" => "ssh-ng",
            "ssh" => "ssh",
            other => {
                return Err(Status::invalid_argument(format!(
                    "protocol must be ssh-ng or ssh, not {other:?}"
                )));
            }
        };
        let builders = self.coord.read_sched(|s| s.builders());
        Ok(Response::new(machines(
            self.coord.facts(),
            protocol,
            &builders,
        )))
    }
}

/// The machines line, nix.conf lines and ssh_config for using the farm as one
/// remote builder, computed as the NixOS client module does (`farmMachine` in
/// `nixos-modules/lib.nix`, `programs.ssh.extraConfig` in `client.nix`):
///
/// `PROTOCOL://HOST SYSTEMS - MAXJOBS SPEED SUPPORTED MANDATORY HOSTKEY` with
/// the real SSH host; every system any builder has (online or not), sorted and
/// unique; no key file (`-`, the client's own SSH identity); the sum of their
/// slots (at least 1); the fastest builder's speed factor as an integer (Nix
/// 2.8 parses an integer; at least 1); as supported, the union of every
/// builder's supported and mandatory features minus the mandatory column
/// (`farmMachine.supportedFeatures`), then the mandatory ones, since
/// `nix.buildMachines` writes `supportedFeatures ++ mandatoryFeatures` there
/// and so the line is byte-identical to the client's `/etc/nix/machines`; as
/// mandatory, the features every builder requires (usually none, `-`); the
/// base64 host key.
///
/// Nix 2.8 machine URIs cannot carry a port, so when the endpoint is not on
/// port 22 the ssh_config gives it: `Host HOST` / `Port N` / `HostKeyAlias
/// HOST`. The alias because Nix writes the machines line's host key under the
/// bare host name, while ssh with a non-22 port looks up `[HOST]:N` (OpenSSH 9
/// then falls back to the bare name; the alias makes the lookup exact).
pub fn machines(
    facts: &crate::domain::coordinator::Facts,
    protocol: &str,
    builders: &[crate::domain::scheduler::BuilderView],
) -> v1::MachinesResponse {
    use base64::Engine;
    let mut systems: BTreeSet<String> = BTreeSet::new();
    let mut supported: BTreeSet<String> = BTreeSet::new();
    let mut mandatory: Option<BTreeSet<String>> = None;
    let mut jobs: u32 = 0;
    let mut speed: f64 = 1.0;
    for b in builders {
        let caps = &b.record.capabilities;
        systems.extend(caps.systems.iter().cloned());
        supported.extend(caps.supported_features.iter().cloned());
        supported.extend(caps.mandatory_features.iter().cloned());
        mandatory = Some(match mandatory {
            None => caps.mandatory_features.clone(),
            Some(m) => m.intersection(&caps.mandatory_features).cloned().collect(),
        });
        jobs = jobs.saturating_add(caps.max_jobs);
        if caps.speed_factor.is_finite() && caps.speed_factor > speed {
            speed = caps.speed_factor;
        }
    }
    let mandatory = mandatory.unwrap_or_default();
    let mut features: Vec<String> = supported.difference(&mandatory).cloned().collect();
    features.extend(mandatory.iter().cloned());
    // Saturating float-to-int cast; at least 1 (checked above).
    let speed = (speed.round() as u64).max(1);
    let host = &facts.ssh_host;
    let host_key_b64 = base64::engine::general_purpose::STANDARD.encode(&facts.ssh_host_key);
    let join = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let machines_line = format!(
        "{protocol}://{host} {} - {} {speed} {} {} {host_key_b64}",
        join(systems.into_iter().collect()),
        jobs.max(1),
        join(features),
        join(mandatory.into_iter().collect()),
    );
    let ssh_config = if facts.ssh_port == 22 {
        String::new()
    } else {
        format!(
            "Host {host}\n  Port {}\n  HostKeyAlias {host}\n",
            facts.ssh_port
        )
    };
    v1::MachinesResponse {
        machines_line,
        nix_conf_lines: vec![
            format!("extra-substituters = {}", facts.http_url),
            format!("extra-trusted-public-keys = {}", facts.cache_public_key),
        ],
        ssh_config,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::coordinator::Facts;
    use crate::domain::scheduler::BuilderView;
    use crate::domain::scheduler::types::{BuilderRecord, Capabilities, Load};

    fn builder(
        systems: &[&str],
        supported: &[&str],
        mandatory: &[&str],
        max_jobs: u32,
        speed_factor: f64,
    ) -> BuilderView {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        BuilderView {
            record: BuilderRecord {
                name: "b".into(),
                public_key: String::new(),
                capabilities: Capabilities {
                    systems: systems.iter().map(|s| s.to_string()).collect(),
                    supported_features: set(supported),
                    mandatory_features: set(mandatory),
                    max_jobs,
                    speed_factor,
                    ..Default::default()
                },
                last_seen_ms: 0,
                draining: false,
            },
            load: Load {
                running_jobs: 0,
                load_avg_1: 0.0,
                load_avg_5: 0.0,
                memory_available_bytes: 0,
                disk_free_bytes: 0,
                cpu_pressure: -1.0,
                memory_pressure: -1.0,
                io_pressure: -1.0,
            },
            online: true,
            running: 0,
        }
    }

    fn facts(port: u16) -> Facts {
        Facts {
            cache_public_key: "farm-1:abc=".into(),
            ssh_host_key: "ssh-ed25519 AAAAkey".into(),
            ssh_host: "farm.example.org".into(),
            ssh_port: port,
            http_url: "http://farm.example.org:7080".into(),
        }
    }

    #[test]
    fn the_farm_as_one_machine_like_the_nixos_module() {
        let bs = [
            builder(
                &["x86_64-linux", "i686-linux"],
                &["kvm", "big-parallel"],
                &["benchmark"],
                4,
                2.0,
            ),
            builder(
                &["aarch64-linux", "x86_64-linux"],
                &["nixos-test"],
                &["benchmark"],
                3,
                3.6,
            ),
        ];
        let m = machines(&facts(7022), "ssh-ng", &bs);
        assert_eq!(
            m.machines_line,
            "ssh-ng://farm.example.org aarch64-linux,i686-linux,x86_64-linux - 7 4 \
             big-parallel,kvm,nixos-test,benchmark benchmark c3NoLWVkMjU1MTkgQUFBQWtleQ=="
        );
        assert_eq!(
            m.ssh_config,
            "Host farm.example.org\n  Port 7022\n  HostKeyAlias farm.example.org\n"
        );
        assert_eq!(
            m.nix_conf_lines,
            [
                "extra-substituters = http://farm.example.org:7080",
                "extra-trusted-public-keys = farm-1:abc=",
            ]
        );
    }

    #[test]
    fn mandatory_only_when_every_builder_requires_it() {
        let bs = [
            builder(&["x86_64-linux"], &[], &["benchmark"], 1, 1.0),
            builder(&["x86_64-linux"], &["kvm"], &[], 1, 0.5),
        ];
        let m = machines(&facts(22), "ssh", &bs);
        assert_eq!(
            m.machines_line,
            "ssh://farm.example.org x86_64-linux - 2 1 benchmark,kvm - c3NoLWVkMjU1MTkgQUFBQWtleQ=="
        );
        assert_eq!(m.ssh_config, "");

        // required by all: the mandatory column, and after the others in the
        // features column as nix.buildMachines writes it
        let bs = [
            builder(&["x86_64-linux"], &["kvm"], &["benchmark", "gpu"], 1, 1.0),
            builder(&["x86_64-linux"], &["big-parallel"], &["benchmark"], 1, 1.0),
        ];
        let m = machines(&facts(22), "ssh-ng", &bs);
        assert_eq!(
            m.machines_line,
            "ssh-ng://farm.example.org x86_64-linux - 2 1 big-parallel,gpu,kvm,benchmark benchmark \
             c3NoLWVkMjU1MTkgQUFBQWtleQ=="
        );
    }

    #[test]
    fn no_builders_still_a_usable_line() {
        let m = machines(&facts(22), "ssh-ng", &[]);
        assert_eq!(
            m.machines_line,
            "ssh-ng://farm.example.org - - 1 1 - - c3NoLWVkMjU1MTkgQUFBQWtleQ=="
        );
        let speedy = [builder(&["x86_64-linux"], &[], &[], 0, f64::NAN)];
        assert!(
            machines(&facts(22), "ssh-ng", &speedy)
                .machines_line
                .contains(" - 1 1 - - ")
        );
    }
}
