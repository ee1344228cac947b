//! A stand-in coordinator for the builder's tests: a real tonic server speaking
//! `BuilderService` (handshake with signature check, jobs, cancel, drain) with an
//! in-memory cache for `DownloadNar` / `UploadNar` / `QueryPathInfos`. It checks
//! what the builder sends; it does not schedule anything.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::Verifier;
use farm_proto::v1::builder_message::Msg as Up;
use farm_proto::v1::builder_service_server::{BuilderService, BuilderServiceServer};
use farm_proto::v1::coordinator_message::Msg as Down;
use farm_proto::v1::*;
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
pub struct State {
    /// Enrolled public keys (raw ed25519); None = accept any valid signature.
    pub enrolled: Option<Vec<[u8; 32]>>,
    pub hellos: Vec<Hello>,
    pub rejected: usize,
    pub loads: Vec<LoadReport>,
    pub started: Vec<String>,
    pub logs: HashMap<String, Vec<u8>>,
    pub results: Vec<JobResult>,
    pub to_builder: Option<mpsc::Sender<Result<CoordinatorMessage, Status>>>,
    pub sessions: usize,
    /// Sessions whose inbound stream has ended (the builder let go of them).
    pub ended: usize,
    /// The cache: path → (info, NAR).
    pub cache: BTreeMap<String, (PathInfo, Vec<u8>)>,
    /// Paths uploaded by the builder.
    pub uploaded: Vec<String>,
    pub downloads: Vec<String>,
    /// Reject uploads whose hash is wrong (always on) and count them.
    pub bad_uploads: usize,
    pub draining_on_welcome: bool,
    /// Refuse new sessions (UNAVAILABLE), as an unreachable coordinator.
    pub refuse: bool,
    /// Acknowledge each result as it arrives (`JobResultAck`).
    pub auto_ack: bool,
    /// The cache's signing key; its public half goes out in Welcome.
    pub cache_key: Option<farm_nix::signing::SigningKey>,
}

#[derive(Clone)]
pub struct Fake {
    pub state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

const TOKEN: &str = "test-session-token";

impl Fake {
    pub async fn start() -> Fake {
        Self::start_with(None).await
    }

    /// A stand-in serving TLS with this certificate and key (PEM).
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Fake {
        Self::start_with(Some(tonic::transport::Identity::from_pem(
            cert_pem, key_pem,
        )))
        .await
    }

    async fn start_with(identity: Option<tonic::transport::Identity>) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            cache_key: Some(farm_nix::signing::SigningKey::generate("test-cache-1").unwrap()),
            ..State::default()
        }));
        let svc = Svc {
            state: state.clone(),
        };
        tokio::spawn(async move {
            let mut server = tonic::transport::Server::builder();
            if let Some(identity) = identity {
                server = server
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .unwrap();
            }
            server
                .add_service(
                    BuilderServiceServer::new(svc)
                        .max_decoding_message_size(32 << 20)
                        .max_encoding_message_size(32 << 20),
                )
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        Fake { state, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Wait until `cond` holds (10 s at most).
    pub async fn wait(&self, what: &str, cond: impl Fn(&State) -> bool) {
        self.wait_for(what, Duration::from_secs(60), cond).await
    }

    pub async fn wait_for(&self, what: &str, limit: Duration, cond: impl Fn(&State) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if cond(&self.state.lock().unwrap()) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn send(&self, msg: Down) {
        let tx = self.with(|s| s.to_builder.clone()).expect("no session");
        tx.send(Ok(CoordinatorMessage { msg: Some(msg) }))
            .await
            .unwrap();
    }

    /// End the current session from the coordinator's side.
    pub fn kick(&self) {
        self.with(|s| s.to_builder = None);
    }

    pub fn result(&self, job: &str) -> Option<JobResult> {
        self.with(|s| s.results.iter().find(|r| r.job_id == job).cloned())
    }

    pub async fn wait_result(&self, job: &str, limit: Duration) -> JobResult {
        self.wait_for(&format!("result of {job}"), limit, |s| {
            s.results.iter().any(|r| r.job_id == job)
        })
        .await;
        self.result(job).unwrap()
    }

    pub fn log(&self, job: &str) -> String {
        self.with(|s| {
            String::from_utf8_lossy(s.logs.get(job).map(Vec::as_slice).unwrap_or_default())
                .into_owned()
        })
    }

    /// Put a path into the cache, signed by the cache key.
    pub fn add_to_cache(&self, info: PathInfo, nar: Vec<u8>) {
        self.with(|s| {
            let info = sign(s, info);
            s.cache.insert(info.store_path.clone(), (info, nar))
        });
    }

    /// Put a path of `env`'s store into the cache.
    pub fn publish(&self, env: &farm_testkit::Actor, path: &str) {
        let nar = env.run_bytes("nix-store", &["--dump", path]).unwrap();
        let refs = env
            .run("nix-store", &["--query", "--references", path])
            .unwrap();
        let deriver = env
            .run("nix-store", &["--query", "--deriver", path])
            .unwrap();
        let deriver = deriver.trim();
        let info = PathInfo {
            store_path: path.to_owned(),
            deriver: if deriver.starts_with('/') {
                deriver.to_owned()
            } else {
                String::new()
            },
            nar_hash: nar_hash(&nar),
            nar_size: nar.len() as u64,
            references: refs.lines().map(str::to_owned).collect(),
            sigs: vec![],
            ca: String::new(),
        };
        self.add_to_cache(info, nar);
    }
}

fn sign(s: &State, info: PathInfo) -> PathInfo {
    let Some(key) = &s.cache_key else { return info };
    let mut v = farm_builder::info_from_proto(info).unwrap();
    v.sign(key);
    PathInfo::from(&v)
}

/// "sha256:<nix32>" of bytes.
pub fn nar_hash(nar: &[u8]) -> String {
    let digest = sha2::Sha256::digest(nar);
    format!("sha256:{}", farm_nix::nixbase32::encode(&digest))
}

struct Svc {
    state: Arc<Mutex<State>>,
}

fn check_token<T>(req: &Request<T>) -> Result<(), Status> {
    match req
        .metadata()
        .get("x-farm-session")
        .and_then(|v| v.to_str().ok())
    {
        Some(TOKEN) => Ok(()),
        _ => Err(Status::unauthenticated("missing or wrong session token")),
    }
}

#[tonic::async_trait]
impl BuilderService for Svc {
    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;
    type DownloadNarStream = ReceiverStream<Result<NarChunk, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<BuilderMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if self.state.lock().unwrap().refuse {
            return Err(Status::unavailable("refusing sessions"));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let Ok(Some(BuilderMessage {
                msg: Some(Up::Hello(hello)),
            })) = inbound.message().await
            else {
                let _ = tx
                    .send(Err(Status::invalid_argument("expected Hello")))
                    .await;
                return;
            };
            let nonce: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
            let _ = tx
                .send(Ok(CoordinatorMessage {
                    msg: Some(Down::Challenge(Challenge {
                        nonce: nonce.clone(),
                    })),
                }))
                .await;
            let Ok(Some(BuilderMessage {
                msg: Some(Up::ChallengeResponse(resp)),
            })) = inbound.message().await
            else {
                let _ = tx
                    .send(Err(Status::invalid_argument("expected ChallengeResponse")))
                    .await;
                return;
            };
            let pk = ssh_key::PublicKey::from_openssh(&hello.public_key).unwrap();
            let raw = pk.key_data().ed25519().unwrap().0;
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&raw).unwrap();
            let mut msg = b"nix-farm builder auth v1\n".to_vec();
            msg.extend_from_slice(&nonce);
            msg.extend_from_slice(hello.name.as_bytes());
            let sig_ok = <[u8; 64]>::try_from(resp.signature.as_slice())
                .map(|s| {
                    vk.verify(&msg, &ed25519_dalek::Signature::from_bytes(&s))
                        .is_ok()
                })
                .unwrap_or(false);
            let enrolled = state
                .lock()
                .unwrap()
                .enrolled
                .as_ref()
                .is_none_or(|keys| keys.contains(&raw));
            if !sig_ok || !enrolled {
                state.lock().unwrap().rejected += 1;
                let _ = tx
                    .send(Err(Status::unauthenticated("builder key not enrolled")))
                    .await;
                return;
            }
            let (draining, cache_public_key) = {
                let mut s = state.lock().unwrap();
                s.hellos.push(hello);
                s.sessions += 1;
                s.to_builder = Some(tx.clone());
                let key = s.cache_key.as_ref().map(|k| k.verifying_key().to_string());
                (s.draining_on_welcome, key.unwrap_or_default())
            };
            let _ = tx
                .send(Ok(CoordinatorMessage {
                    msg: Some(Down::Welcome(Welcome {
                        session_token: TOKEN.into(),
                        cache_public_key,
                        draining,
                    })),
                }))
                .await;
            drop(tx);
            while let Ok(Some(m)) = inbound.message().await {
                let mut s = state.lock().unwrap();
                match m.msg {
                    Some(Up::Load(l)) => s.loads.push(l),
                    Some(Up::Started(j)) => s.started.push(j.job_id),
                    Some(Up::Log(l)) => s
                        .logs
                        .entry(l.job_id)
                        .or_default()
                        .extend_from_slice(&l.data),
                    Some(Up::Result(r)) => {
                        if s.auto_ack
                            && let Some(tx) = &s.to_builder
                        {
                            let _ = tx.try_send(Ok(CoordinatorMessage {
                                msg: Some(Down::ResultAck(JobResultAck {
                                    job_id: r.job_id.clone(),
                                })),
                            }));
                        }
                        s.results.push(r)
                    }
                    _ => {}
                }
            }
            state.lock().unwrap().ended += 1;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn download_nar(
        &self,
        req: Request<DownloadNarRequest>,
    ) -> Result<Response<Self::DownloadNarStream>, Status> {
        check_token(&req)?;
        let path = req.into_inner().store_path;
        let nar = {
            let mut s = self.state.lock().unwrap();
            s.downloads.push(path.clone());
            s.cache.get(&path).map(|(_, n)| n.clone())
        };
        let nar = nar.ok_or_else(|| Status::not_found(format!("{path} is not in the cache")))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for chunk in nar.chunks(1000) {
                if tx
                    .send(Ok(NarChunk {
                        data: chunk.to_vec(),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn upload_nar(
        &self,
        req: Request<Streaming<UploadNarRequest>>,
    ) -> Result<Response<UploadNarResponse>, Status> {
        check_token(&req)?;
        let mut inbound = req.into_inner();
        let Some(UploadNarRequest {
            msg: Some(upload_nar_request::Msg::Info(info)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument("first message must be info"));
        };
        let mut nar = Vec::new();
        while let Some(m) = inbound.message().await? {
            match m.msg {
                Some(upload_nar_request::Msg::Data(d)) => nar.extend_from_slice(&d),
                _ => return Err(Status::invalid_argument("info twice")),
            }
        }
        if nar.len() as u64 != info.nar_size || nar_hash(&nar) != info.nar_hash {
            self.state.lock().unwrap().bad_uploads += 1;
            return Err(Status::invalid_argument("NAR hash or size mismatch"));
        }
        let path = info.store_path.clone();
        let mut s = self.state.lock().unwrap();
        s.uploaded.push(path.clone());
        let info = sign(&s, info);
        s.cache.insert(path.clone(), (info, nar));
        Ok(Response::new(UploadNarResponse { store_path: path }))
    }

    async fn query_path_infos(
        &self,
        req: Request<QueryPathInfosRequest>,
    ) -> Result<Response<QueryPathInfosResponse>, Status> {
        check_token(&req)?;
        let s = self.state.lock().unwrap();
        let infos = req
            .into_inner()
            .store_paths
            .iter()
            .filter_map(|p| s.cache.get(p).map(|(i, _)| i.clone()))
            .collect();
        Ok(Response::new(QueryPathInfosResponse { infos }))
    }
}
