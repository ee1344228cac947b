//! `FarmService`, what the CLI and CI call: every method authorises the caller
//! (see [`crate::api::grpc::auth::CliAuth`]), converts, calls the [`Coordinator`], converts back.

use std::collections::BTreeMap;

use farm_nix::store_path::StorePath;
use farm_proto::auth::methods;
use farm_proto::v1;
use farm_proto::v1::build_event::Event as Ev;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Principal;
use crate::api::grpc::BoxStream;
use crate::api::grpc::auth::{Authenticated, CliAuth, Level};
use crate::api::grpc::convert::{event_to, machine_to, status_to};
use crate::domain::coordinator::Coordinator;
use crate::domain::follow::SubmissionUpdate;
use crate::domain::graph::Root;
use crate::domain::model::*;

/// `FarmService`.
#[derive(Clone)]
pub(crate) struct FarmSvc {
    pub coord: Coordinator,
    pub auth: CliAuth,
    /// The cache signing key, to prove this coordinator's identity
    /// (`Identity`; the identity callers sign for is its public half).
    pub identity_key: farm_nix::signing::SigningKey,
    /// The dashboard's admin sessions (`DashboardLogin` mints their login tokens).
    pub sessions: crate::api::http::dashboard::session::Sessions,
}

impl FarmSvc {
    async fn authorize<T>(
        &self,
        req: &Request<T>,
        method: &str,
        level: Level,
    ) -> Result<Principal, Status> {
        // Put there by the signature layer (`signed`), which checked the
        // signature, nonce and body digest before the body was decoded.
        let authn = req.extensions().get::<Authenticated>().ok_or_else(|| {
            tracing::error!(method, "FarmService call without the signature layer");
            Status::internal("the call was not authenticated")
        })?;
        let peer = req.remote_addr().map(|a| a.ip());
        let caller = self.auth.check(authn, method, level, peer).await?;
        tracing::debug!(method, key = %caller.fingerprint, level = %caller.level, "CLI call");
        Ok(caller)
    }

    /// Make the state durable before acknowledging a change.
    async fn flushed(&self) -> Result<(), Status> {
        Ok(self.coord.flush().await?)
    }
}

/// The events that describe a submission as it stands: `Submitted`, then per
/// build its latest event, then `Done` if it is done.
pub(crate) fn snapshot_events(
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

/// Follow a submission ([`Coordinator::follow_submission`]) as `BuildEvent`s:
/// each snapshot as [`snapshot_events`], each event as itself, an unknown
/// submission as `NOT_FOUND`.
pub(crate) fn watch_stream(coord: Coordinator, sid: SubmissionId) -> BoxStream<v1::BuildEvent> {
    let events = coord.follow_submission(sid).flat_map(move |u| {
        let out: Vec<Result<v1::BuildEvent, Status>> = match u {
            SubmissionUpdate::Snapshot((sub, builds)) => {
                snapshot_events(&sub, &builds).into_iter().map(Ok).collect()
            }
            SubmissionUpdate::Event(e) => vec![Ok(event_to(&e))],
            SubmissionUpdate::Unknown => {
                vec![Err(Status::not_found(format!("no submission s{sid}")))]
            }
        };
        futures::stream::iter(out)
    });
    Box::pin(events)
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
        let resp = status_to(self.coord.status());
        Ok(Response::new(resp))
    }

    type SubmitStream = BoxStream<v1::BuildEvent>;

    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let caller = self
            .authorize(&request, methods::SUBMIT, Level::Build)
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
        // A job's history and badge are public statements about a name, so
        // naming a job needs the push level: a build key could otherwise
        // turn another team's badge red or green with any derivation.
        let job = crate::api::grpc::jobs::submit_job(&req.job)?;
        if job.is_some() && !caller.may(Level::Push) {
            tracing::warn!(key = %caller.fingerprint, "submit under a job name refused: needs push");
            return Err(Status::permission_denied(format!(
                "key {} ({}) has the {} level; naming a job (--job) needs push (a key in {}): a job's history and badge are public",
                caller.fingerprint,
                caller.comment,
                caller.level,
                Level::Push.flag()
            )));
        }
        let opts = crate::domain::graph::SubmitOptions {
            priority: parse_priority(req.priority),
            max_silent_time_secs: req.max_silent_time_secs,
            build_timeout_secs: req.build_timeout_secs,
            client: Some(
                format!("{} {}", caller.fingerprint, caller.comment)
                    .trim_end()
                    .to_owned(),
            ),
            job,
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
        let caller = self
            .authorize(&request, methods::UPLOAD_NAR, Level::Build)
            .await?;
        // Push: published signed. Build: the key's own unsigned claim.
        let trust = if caller.may(Level::Push) {
            crate::cache::Trust::Signed
        } else {
            crate::cache::Trust::Claim {
                owner: caller.fingerprint,
            }
        };
        crate::api::grpc::data::upload_nar(
            &self.coord,
            crate::api::grpc::data::Uploader::Client(trust),
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
        crate::api::grpc::data::download_nar(&self.coord, None, request.into_inner()).await
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
        Ok(Response::new(machine_to(self.coord.machine(protocol))))
    }

    async fn jobs(
        &self,
        request: Request<v1::JobsRequest>,
    ) -> Result<Response<v1::JobsResponse>, Status> {
        self.authorize(&request, methods::JOBS, Level::Read).await?;
        let resp = crate::api::grpc::jobs::jobs(&self.coord, request.into_inner()).await?;
        Ok(Response::new(resp))
    }

    async fn dashboard_login(
        &self,
        request: Request<v1::DashboardLoginRequest>,
    ) -> Result<Response<v1::DashboardLoginResponse>, Status> {
        let caller = self
            .authorize(&request, methods::DASHBOARD_LOGIN, Level::Admin)
            .await?;
        use crate::api::http::dashboard::session::MAX_TOKEN_TTL;
        let asked = request.into_inner().expires_in_secs;
        let ttl = match asked {
            0 => MAX_TOKEN_TTL,
            n => std::time::Duration::from_secs(u64::from(n)).min(MAX_TOKEN_TTL),
        };
        let who = format!("{} {}", caller.fingerprint, caller.comment)
            .trim_end()
            .to_owned();
        let token = self.sessions.mint(who, ttl);
        tracing::info!(key = %caller.fingerprint, ttl_secs = ttl.as_secs(), "dashboard login link made");
        let base = self.coord.facts().http_url.trim_end_matches('/').to_owned();
        Ok(Response::new(v1::DashboardLoginResponse {
            url: format!("{base}/login?token={token}"),
            expires_in_secs: ttl.as_secs() as u32,
        }))
    }

    async fn identity(
        &self,
        request: Request<v1::IdentityRequest>,
    ) -> Result<Response<v1::IdentityResponse>, Status> {
        // No key needed: this is how a caller learns what to sign for.
        let challenge = request.into_inner().challenge;
        if challenge.len() != farm_proto::auth::IDENTITY_CHALLENGE_LEN {
            return Err(Status::invalid_argument(format!(
                "the challenge must be {} bytes",
                farm_proto::auth::IDENTITY_CHALLENGE_LEN
            )));
        }
        // Domain-separated: never a narinfo fingerprint (those start "1;").
        let message = farm_proto::auth::coordinator_identity_message(&challenge);
        Ok(Response::new(v1::IdentityResponse {
            public_key: self.identity_key.verifying_key().to_string(),
            signature: self.identity_key.sign(&message),
        }))
    }
}
