//! The gRPC services, thin: authenticate, convert, call the [`Coordinator`],
//! convert back.
//!
//! `BuilderService.Session` handshake: the builder's first message must be
//! `Hello` (within [`HANDSHAKE_TIMEOUT`]); an unknown key is refused with
//! UNAUTHENTICATED before anything else is sent (and the refusal logged). Else
//! the coordinator sends a `Challenge` with a fresh nonce, the builder answers
//! with its signature, and a valid one gets `Welcome` with a session token for
//! data calls; a bad one ends the stream with UNAUTHENTICATED (logged).
//!
//! A reconnecting builder lists the jobs it still holds: `running_jobs`, and
//! `finished_jobs` whose results it kept while disconnected. Both stay running
//! there (no requeue, no retry); the results follow `Welcome`. Each result is
//! acknowledged (`JobResultAck`) once recorded and flushed, so the builder can
//! forget it; until then it sends it again on every new session.

use std::time::Duration;

use farm_proto::v1;
use farm_proto::v1::builder_message::Msg as Up;
use farm_proto::v1::coordinator_message::Msg as Down;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::grpc::BoxStream;
use crate::api::grpc::auth::BuilderAuth;
use crate::api::grpc::convert::{capabilities_from, command_message, job_end_from, load_from};
use crate::domain::coordinator::{BuilderCommand, BuilderLink, Coordinator, LinkError};
use crate::domain::model::Capabilities;
use crate::keys::{fingerprint_ed25519, parse_ed25519_line};

/// How long a builder has for each handshake step.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest builder name.
pub(crate) const MAX_NAME_LEN: usize = 64;
/// Messages buffered towards one builder.
const SESSION_BUFFER: usize = 1024;
/// Most job ids in each of `Hello.running_jobs` and `Hello.finished_jobs`.
const MAX_HELD_JOBS: usize = 4096;

/// What goes down a builder's session stream.
type SessionSender = mpsc::Sender<Result<v1::CoordinatorMessage, Status>>;

/// The domain's [`BuilderLink`] over a gRPC session stream: commands are
/// converted and checked against the message limit here, and queued without
/// waiting.
struct GrpcLink(SessionSender);

impl BuilderLink for GrpcLink {
    fn send(&self, command: BuilderCommand) -> Result<(), LinkError> {
        let msg = command_message(command, farm_proto::MAX_MESSAGE_SIZE)?;
        self.0.try_send(Ok(msg)).map_err(|_| LinkError::Closed)
    }
}

/// Whether `name` is an acceptable builder name: 1–64 of `[A-Za-z0-9._-]`.
pub(crate) fn valid_builder_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `BuilderService`.
#[derive(Clone)]
pub(crate) struct BuilderSvc {
    pub coord: Coordinator,
    pub auth: BuilderAuth,
}

impl BuilderSvc {
    /// The job a data call names (`x-farm-job`), if it names one: it must be
    /// running on `builder`. Returns the job's id and, for a claim job, its
    /// owner (whose claims the call may see).
    pub(crate) fn job_of<T>(
        &self,
        req: &Request<T>,
        builder: &str,
    ) -> Result<Option<(String, Option<String>)>, Status> {
        let Some(v) = req.metadata().get(farm_proto::auth::JOB_METADATA) else {
            return Ok(None);
        };
        let job = v
            .to_str()
            .map_err(|_| Status::invalid_argument("x-farm-job is not a job id"))?;
        let claim = self.coord.read_sched(|s| {
            s.running_job(builder, job)
                .and_then(|id| s.build_record(id))
                .map(|b| b.claim.clone())
        });
        match claim {
            Some(claim) => Ok(Some((job.to_owned(), claim))),
            None => Err(Status::permission_denied(format!(
                "job {job} is not running on builder {builder}"
            ))),
        }
    }

    /// The builder a data call's session token belongs to.
    pub(crate) fn session_of<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let token = req
            .metadata()
            .get(farm_proto::auth::SESSION_METADATA)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("missing x-farm-session"))?;
        self.coord
            .session_builder(token)
            .ok_or_else(|| Status::unauthenticated("unknown or expired session"))
    }
}

async fn next_msg(inbound: &mut Streaming<v1::BuilderMessage>, what: &str) -> Result<Up, Status> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, inbound.message()).await {
        Err(_) => Err(Status::deadline_exceeded(format!("no {what} in time"))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(None)) => Err(Status::cancelled(format!("stream ended before {what}"))),
        Ok(Ok(Some(v1::BuilderMessage { msg: None }))) => {
            Err(Status::invalid_argument("empty message"))
        }
        Ok(Ok(Some(v1::BuilderMessage { msg: Some(m) }))) => Ok(m),
    }
}

#[tonic::async_trait]
impl v1::builder_service_server::BuilderService for BuilderSvc {
    type SessionStream = ReceiverStream<Result<v1::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::BuilderMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer_ip = request.remote_addr().map(|a| a.ip());
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into());
        let mut inbound = request.into_inner();
        let hello = match next_msg(&mut inbound, "Hello").await? {
            Up::Hello(h) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if !valid_builder_name(&hello.name) {
            tracing::warn!(%peer, "refused builder: invalid name");
            return Err(Status::invalid_argument(
                "builder name must be 1-64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        let name = hello.name.clone();
        let key = match parse_ed25519_line(&hello.public_key) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(builder = %name, %peer, error = %e, "refused builder: bad public key");
                return Err(Status::unauthenticated(format!("bad public key: {e}")));
            }
        };
        let fp = fingerprint_ed25519(&key);
        let auth = self.auth.clone();
        let enrolled = tokio::task::spawn_blocking(move || auth.enrolled(&key, peer_ip))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "checking builder enrolment");
                Status::internal("checking the builder's enrolment failed")
            })?;
        match enrolled {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::warn!(
                    builder = %name,
                    %peer,
                    key = %fp,
                    "refused builder: key is not enrolled (add its public key to --builder-keys)"
                );
                return Err(Status::unauthenticated(format!(
                    "builder key {fp} is not enrolled on this coordinator"
                )));
            }
            Err(e) => {
                tracing::error!(builder = %name, %peer, error = %e, "refused builder: cannot read the builder keys");
                return Err(Status::unauthenticated(
                    "the coordinator cannot read its builder keys",
                ));
            }
        }
        // A name belongs to the key it joined with, online or not, while that key
        // stays enrolled: another enrolled key must not take over its record and
        // running jobs. This early check spares a doomed handshake; the binding
        // itself is checked again, atomically, when the session goes online.
        let mut replaces: Option<String> = None;
        if let Some(other) = self.coord.known_key(&name)
            && parse_ed25519_line(&other).ok() != Some(key)
        {
            let old_enrolled = match parse_ed25519_line(&other) {
                Ok(old) => {
                    let auth = self.auth.clone();
                    tokio::task::spawn_blocking(move || auth.listed(&old))
                        .await
                        .map(|r| !matches!(r, Ok(false)))
                        .unwrap_or(true)
                }
                Err(_) => false,
            };
            if old_enrolled {
                tracing::warn!(builder = %name, %peer, key = %fp, "refused builder: name belongs to another key");
                return Err(Status::already_exists(format!(
                    "the builder name {name} belongs to another enrolled key; to re-enrol under \
                     that name remove the old key from --builder-keys, or use another --name"
                )));
            }
            tracing::info!(builder = %name, key = %fp, "builder name taken over: its old key is no longer enrolled");
            replaces = Some(other);
        }
        let caps = capabilities_from(hello.capabilities.clone().unwrap_or_default())?;
        if hello.running_jobs.len() > MAX_HELD_JOBS {
            return Err(Status::invalid_argument("too many running_jobs"));
        }
        if hello.finished_jobs.len() > MAX_HELD_JOBS {
            return Err(Status::invalid_argument("too many finished_jobs"));
        }
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let coord = self.coord.clone();
        tokio::spawn(async move {
            run_session(coord, hello, key, fp, replaces, caps, peer, inbound, tx).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DownloadNarStream = BoxStream<v1::NarChunk>;

    async fn download_nar(
        &self,
        request: Request<v1::DownloadNarRequest>,
    ) -> Result<Response<Self::DownloadNarStream>, Status> {
        let builder = self.session_of(&request)?;
        let owner = self.job_of(&request, &builder)?.and_then(|(_, o)| o);
        crate::api::grpc::data::download_nar(&self.coord, owner.as_deref(), request.into_inner())
            .await
    }

    async fn upload_nar(
        &self,
        request: Request<Streaming<v1::UploadNarRequest>>,
    ) -> Result<Response<v1::UploadNarResponse>, Status> {
        let builder = self.session_of(&request)?;
        let job = self.job_of(&request, &builder)?.map(|(j, _)| j);
        tracing::debug!(%builder, job = job.as_deref().unwrap_or(""), "builder upload");
        crate::api::grpc::data::upload_nar(
            &self.coord,
            crate::api::grpc::data::Uploader::Builder {
                builder: &builder,
                job: job.as_deref(),
            },
            request.into_inner(),
        )
        .await
    }

    async fn query_path_infos(
        &self,
        request: Request<v1::QueryPathInfosRequest>,
    ) -> Result<Response<v1::QueryPathInfosResponse>, Status> {
        let builder = self.session_of(&request)?;
        let owner = self.job_of(&request, &builder)?.and_then(|(_, o)| o);
        crate::api::grpc::data::query_path_infos(
            &self.coord,
            owner.as_deref(),
            request.into_inner(),
        )
        .await
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    coord: Coordinator,
    hello: v1::Hello,
    key: [u8; 32],
    fp: String,
    replaces: Option<String>,
    caps: Capabilities,
    peer: String,
    mut inbound: Streaming<v1::BuilderMessage>,
    tx: SessionSender,
) {
    let name = hello.name.clone();
    let nonce = {
        use rand::RngCore;
        let mut n = [0u8; farm_proto::auth::NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut n);
        n
    };
    let challenge = v1::CoordinatorMessage {
        msg: Some(Down::Challenge(v1::Challenge {
            nonce: nonce.to_vec(),
        })),
    };
    if tx.send(Ok(challenge)).await.is_err() {
        return;
    }
    let sig = match next_msg(&mut inbound, "ChallengeResponse").await {
        Ok(Up::ChallengeResponse(r)) => r.signature,
        Ok(_) => {
            tracing::warn!(builder = %name, %peer, "refused builder: expected ChallengeResponse");
            let _ = tx
                .send(Err(Status::invalid_argument("expected ChallengeResponse")))
                .await;
            return;
        }
        Err(e) => {
            tracing::warn!(builder = %name, %peer, error = %e.message(), "refused builder: handshake failed");
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    if !BuilderAuth::verify_challenge(&key, &nonce, &name, &sig) {
        tracing::warn!(builder = %name, %peer, key = %fp, "refused builder: bad challenge signature");
        let _ = tx
            .send(Err(Status::unauthenticated("bad challenge signature")))
            .await;
        return;
    }
    let public_key = crate::keys::public_key_line_ed25519(&key);
    // A finished job is held like a running one until its result arrives.
    let mut held = hello.running_jobs.clone();
    for job in &hello.finished_jobs {
        if !held.contains(job) {
            held.push(job.clone());
        }
    }
    if !hello.finished_jobs.is_empty() {
        tracing::info!(builder = %name, finished = hello.finished_jobs.len(), "builder holds results of jobs that ended while it was away");
    }
    let online = coord.builder_online(
        &name,
        &public_key,
        replaces.as_deref(),
        caps,
        &held,
        std::sync::Arc::new(GrpcLink(tx.clone())),
    );
    let (conn, token, draining) = match online {
        Ok(o) => o,
        Err(taken) => {
            tracing::warn!(builder = %name, %peer, key = %fp, "refused builder: name belongs to another key");
            let _ = tx
                .send(Err(Status::already_exists(format!(
                    "{taken}; to re-enrol under that name remove the old key from \
                     --builder-keys, or use another --name"
                ))))
                .await;
            return;
        }
    };
    let welcome = v1::CoordinatorMessage {
        msg: Some(Down::Welcome(v1::Welcome {
            session_token: token,
            cache_public_key: coord.facts().cache_public_key.clone(),
            draining,
        })),
    };
    // Welcome goes first: the channel is FIFO and nothing was sent on it yet
    // except the challenge (builder_online dispatches nothing by itself).
    if tx.send(Ok(welcome)).await.is_err() {
        coord.builder_offline(&name, conn);
        return;
    }
    tracing::info!(builder = %name, %peer, key = %fp, version = %hello.version, "builder authenticated");
    coord.kick();
    let stopping = coord.stopping().clone();
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = stopping.cancelled() => break,
        };
        let msg = match next {
            Ok(Some(v1::BuilderMessage { msg: Some(m) })) => m,
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => {
                tracing::info!(builder = %name, error = %e.message(), "builder stream error");
                break;
            }
        };
        match msg {
            Up::Load(l) => coord.builder_load(&name, load_from(l)),
            Up::Log(l) => coord.job_log(&name, &l.job_id, &l.data),
            Up::Started(s) => {
                tracing::debug!(builder = %name, job = %s.job_id, "job started");
                coord.job_started(&name, &s.job_id);
            }
            Up::Result(r) => {
                let coord = coord.clone();
                let name = name.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let job_id = r.job_id.clone();
                    let status =
                        v1::JobStatus::try_from(r.status).unwrap_or(v1::JobStatus::Unspecified);
                    let end = job_end_from(status, &r.error_message);
                    coord.job_result(&name, &job_id, end).await;
                    // Acknowledge only what a crash cannot lose.
                    match coord.flush().await {
                        Ok(()) => {
                            let ack = v1::CoordinatorMessage {
                                msg: Some(Down::ResultAck(v1::JobResultAck { job_id })),
                            };
                            let _ = tx.send(Ok(ack)).await;
                        }
                        Err(e) => {
                            tracing::error!(builder = %name, job = %job_id, error = %e, "cannot flush a job result; not acknowledging it");
                        }
                    }
                });
            }
            Up::Hello(_) | Up::ChallengeResponse(_) => {
                tracing::warn!(builder = %name, "unexpected handshake message in session; closing");
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "unexpected handshake message",
                    )))
                    .await;
                break;
            }
        }
    }
    coord.builder_offline(&name, conn);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer;
    use farm_proto::v1::builder_service_client::BuilderServiceClient;

    /// A builder's half-open session: its outbound messages, the coordinator's replies.
    struct Half {
        tx: mpsc::Sender<v1::BuilderMessage>,
        rx: Streaming<v1::CoordinatorMessage>,
    }

    async fn hello(url: &str, name: &str, key: &ed25519_dalek::SigningKey) -> Result<Half, Status> {
        let mut client = BuilderServiceClient::connect(url.to_owned()).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        let public_key = crate::keys::public_key_line_ed25519(&key.verifying_key().to_bytes());
        tx.send(v1::BuilderMessage {
            msg: Some(Up::Hello(v1::Hello {
                name: name.to_owned(),
                public_key,
                capabilities: Some(v1::Capabilities {
                    systems: vec!["x86_64-linux".into()],
                    max_jobs: 1,
                    ..Default::default()
                }),
                version: "test".into(),
                running_jobs: Vec::new(),
                finished_jobs: Vec::new(),
            })),
        })
        .await
        .unwrap();
        let rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Half { tx, rx })
    }

    /// Answers the challenge; returns whether the session was welcomed (and
    /// the session, kept open) or the refusal.
    async fn answer(
        mut h: Half,
        name: &str,
        key: &ed25519_dalek::SigningKey,
        nonce: Vec<u8>,
    ) -> Result<Half, Status> {
        let sig = key.sign(&farm_proto::auth::builder_auth_message(&nonce, name));
        h.tx.send(v1::BuilderMessage {
            msg: Some(Up::ChallengeResponse(v1::ChallengeResponse {
                signature: sig.to_bytes().to_vec(),
            })),
        })
        .await
        .unwrap();
        match h.rx.message().await? {
            Some(v1::CoordinatorMessage {
                msg: Some(Down::Welcome(_)),
            }) => Ok(h),
            other => Err(Status::internal(format!("unexpected {other:?}"))),
        }
    }

    async fn challenge(h: &mut Half) -> Vec<u8> {
        match h.rx.message().await.unwrap() {
            Some(v1::CoordinatorMessage {
                msg: Some(Down::Challenge(c)),
            }) => c.nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    /// Two enrolled keys connect at once under the same new name, both past
    /// the early check (both are challenged): exactly one is welcomed and
    /// holds the name; the other is refused with ALREADY_EXISTS, then and on
    /// a later try. Over real gRPC, many rounds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_keys_racing_for_a_new_name_end_with_one_holder() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<ed25519_dalek::SigningKey> = (0..2)
            .map(|_| ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
            .collect();
        let lines: String = keys
            .iter()
            .map(|k| {
                format!(
                    "{}\n",
                    crate::keys::public_key_line_ed25519(&k.verifying_key().to_bytes())
                )
            })
            .collect();
        let key_file = dir.path().join("builder_keys");
        std::fs::write(&key_file, lines).unwrap();
        let mut cfg = crate::CoordinatorConfig::for_tests(dir.path().join("state"));
        cfg.builder_keys = Some(key_file);
        let running = crate::server::start(cfg).await.unwrap();
        let url = running.endpoints().grpc_url();
        let mut winners = [0usize; 2];
        let mut open = Vec::new();
        for round in 0..12 {
            let name = format!("racer-{round}");
            // both say hello and are challenged before either answers
            let (a, b) = tokio::join!(hello(&url, &name, &keys[0]), hello(&url, &name, &keys[1]));
            let (mut a, mut b) = (a.unwrap(), b.unwrap());
            let (na, nb) = tokio::join!(challenge(&mut a), challenge(&mut b));
            // alternate who answers first
            let (ra, rb) = if round % 2 == 0 {
                tokio::join!(
                    answer(a, &name, &keys[0], na),
                    answer(b, &name, &keys[1], nb)
                )
            } else {
                let (rb, ra) = tokio::join!(
                    answer(b, &name, &keys[1], nb),
                    answer(a, &name, &keys[0], na)
                );
                (ra, rb)
            };
            let (winner, loser) = match (ra, rb) {
                (Ok(h), Err(e)) => {
                    winners[0] += 1;
                    open.push(h);
                    (0, e)
                }
                (Err(e), Ok(h)) => {
                    winners[1] += 1;
                    open.push(h);
                    (1, e)
                }
                (Ok(_), Ok(_)) => panic!("round {round}: both keys were welcomed as {name}"),
                (Err(a), Err(b)) => panic!("round {round}: both refused: {a}; {b}"),
            };
            assert_eq!(loser.code(), tonic::Code::AlreadyExists, "{loser}");
            let holder = running.coordinator().known_key(&name).unwrap();
            assert_eq!(
                holder,
                crate::keys::public_key_line_ed25519(&keys[winner].verifying_key().to_bytes())
            );
            // the loser tries again on its own: refused at once
            let refused = hello(&url, &name, &keys[1 - winner]).await.err().unwrap();
            assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused}");
        }
        assert_eq!(winners[0] + winners[1], 12);
        drop(open);
        running.shutdown().await.unwrap();
    }
}
