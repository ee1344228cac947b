//! The builder's link to the coordinator: dials the gRPC `Session` stream,
//! proves its key (Hello → Challenge → ChallengeResponse → Welcome), then
//! forwards load reports, job events and results up and jobs, cancels and drain
//! orders down. When the stream breaks it reconnects with jittered exponential
//! backoff; jobs keep running meanwhile. A job's result is kept until the
//! coordinator acknowledges it: a new session lists the kept ones in `Hello`
//! (so the coordinator keeps those builds running here) and sends them again
//! (logs produced while disconnected are dropped).
//!
//! Stopping ([`Stop`]) is bounded by its grace period: running jobs are stopped,
//! their results delivered if connected, and whatever is still in flight at the
//! deadline is left.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use farm_proto::v1::builder_message::Msg as Up;
use farm_proto::v1::builder_service_client::BuilderServiceClient;
use farm_proto::v1::coordinator_message::Msg as Down;
use farm_proto::v1::{
    BuilderMessage, Capabilities, ChallengeResponse, Hello, JobLog, JobResult, JobStarted,
};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::Uri;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::BuilderError;
use crate::jobs::{Event, Execute, JobManager};
use crate::key::BuilderKey;

/// Metadata key carrying the session token on data calls.
pub const SESSION_HEADER: &str = "x-farm-session";

/// Longest nonce accepted from the coordinator.
const MAX_NONCE: usize = 1024;
/// How long each step of the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// First delay before reconnecting.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
/// Longest delay between reconnect attempts: well inside the coordinator's
/// builder grace (60 s by default), so that after any outage (a coordinator
/// restart) the builder is back before its running jobs are given up on.
const RECONNECT_MAX: Duration = Duration::from_secs(15);
/// Largest gRPC message accepted (NAR chunks are far smaller).
pub const MAX_MESSAGE: usize = farm_proto::MAX_MESSAGE_SIZE;

/// Check a coordinator URL: `https://` needs a pinned CA/cert, `http://` is only
/// allowed to a loopback host.
pub fn check_url(url: &str, have_ca: bool) -> Result<Uri, BuilderError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| BuilderError::Config(format!("coordinator URL {url:?}: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| BuilderError::Config(format!("coordinator URL {url:?} has no host")))?;
    match uri.scheme_str() {
        Some("https") if !have_ca => Err(BuilderError::Config(format!(
            "coordinator URL {url:?} is https: pass --ca-cert with the coordinator's certificate or CA"
        ))),
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(BuilderError::Config(format!(
            "coordinator URL {url:?}: plain http is only allowed to a loopback address; use https://"
        ))),
        _ => Err(BuilderError::Config(format!(
            "coordinator URL {url:?} must start with https:// or http://"
        ))),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Build the gRPC endpoint (TLS with the pinned certificate for https).
pub fn endpoint(url: &str, ca_cert: Option<&std::path::Path>) -> Result<Endpoint, BuilderError> {
    let uri = check_url(url, ca_cert.is_some())?;
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| BuilderError::Config(format!("coordinator URL {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if uri.scheme_str() == Some("https") {
        let path = ca_cert.ok_or_else(|| BuilderError::Config("https needs --ca-cert".into()))?;
        let pem = std::fs::read(path).map_err(|e| BuilderError::reading(path, e))?;
        let host = uri.host().unwrap_or_default();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'));
        ep = ep
            .tls_config(tls)
            .map_err(|e| BuilderError::Config(format!("TLS: {e}")))?;
    }
    Ok(ep)
}

/// Adds the session token to every data call.
#[derive(Clone)]
pub struct SessionAuth {
    token: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for SessionAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(SESSION_HEADER, self.token.clone());
        Ok(req)
    }
}

/// A data-call client that carries the session token.
pub type DataClient = BuilderServiceClient<InterceptedService<Channel, SessionAuth>>;

/// The live connection jobs use for data calls.
#[derive(Clone)]
pub struct Link {
    channel: Channel,
    auth: SessionAuth,
    /// The cache's public key from `Welcome` (`name:base64`).
    pub cache_public_key: String,
}

impl Link {
    /// Whether both are the same session (a reconnect makes a new one).
    pub fn same_session(&self, other: &Link) -> bool {
        self.auth.token == other.auth.token
    }

    /// A data-call client on this link.
    pub fn client(&self) -> DataClient {
        BuilderServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// Wait for a link to be up (at most `wait`).
pub async fn current_link(rx: &mut watch::Receiver<Option<Link>>, wait: Duration) -> Option<Link> {
    let got = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
    match got {
        Ok(Ok(link)) => link.clone(),
        _ => None,
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Start at `base`, never exceed `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// Forget past failures.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: uniform in [ceiling/2, ceiling], ceiling doubling per failure up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(16);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        let lo = ceiling / 2;
        let span = ceiling.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(rand::thread_rng().gen_range(0..=span))
    }
}

/// What the session needs from the rest of the builder.
pub struct SessionParams {
    /// Builder name.
    pub name: String,
    /// The key proven on connect.
    pub key: BuilderKey,
    /// What we advertise.
    pub capabilities: Capabilities,
    /// The coordinator.
    pub endpoint: Endpoint,
    /// Load report period.
    pub load_interval: Duration,
    /// The store directory measured for free space.
    pub store_dir: std::path::PathBuf,
}

/// A request to stop, with the grace period it allows: the builder stops its
/// jobs, reports them, and is done by the deadline whatever is in flight.
#[derive(Debug, Clone)]
pub struct Stop {
    token: CancellationToken,
    grace: Duration,
    at: Arc<OnceLock<Instant>>,
}

impl Stop {
    /// Not requested yet; once it is, stopping may take `grace` at most.
    pub fn new(grace: Duration) -> Self {
        Stop {
            token: CancellationToken::new(),
            grace,
            at: Arc::new(OnceLock::new()),
        }
    }

    /// Ask to stop (the first request sets the deadline).
    pub fn request(&self) {
        let _ = self.at.set(Instant::now());
        self.token.cancel();
    }

    /// Whether stopping was asked for.
    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once stopping is asked for.
    pub async fn requested(&self) {
        self.token.cancelled().await;
    }

    /// When stopping must be over (None until requested).
    pub fn deadline(&self) -> Option<Instant> {
        self.at.get().map(|t| *t + self.grace)
    }

    /// Resolves at the deadline (never before a request).
    pub async fn expired(&self) {
        self.requested().await;
        if let Some(d) = self.deadline() {
            tokio::time::sleep_until(d).await;
        }
    }
}

/// Most job results kept for the coordinator at once (as many as a `Hello` may
/// list); past that the oldest is dropped and its build runs again elsewhere.
const MAX_UNACKED: usize = 4096;

/// Events from jobs on their way up, across sessions. A job's result is kept
/// until the coordinator acknowledges it (`JobResultAck`, or a `CancelJob` for
/// a job that ended): every new session lists the kept ones in
/// `Hello.finished_jobs` and sends them again after `Welcome`. Logs and start
/// notices produced while disconnected are dropped.
pub struct Outbox {
    rx: mpsc::Receiver<Event>,
    /// Results not acknowledged yet, oldest first.
    unacked: VecDeque<JobResult>,
    /// Of those, the ones still to send on the current session.
    resend: VecDeque<String>,
}

impl Outbox {
    /// Wrap the receiving end of the jobs' event channel.
    pub fn new(rx: mpsc::Receiver<Event>) -> Self {
        Outbox {
            rx,
            unacked: VecDeque::new(),
            resend: VecDeque::new(),
        }
    }

    fn hold(&mut self, r: JobResult) {
        if self.unacked.len() >= MAX_UNACKED
            && let Some(old) = self.unacked.pop_front()
        {
            tracing::warn!(job = %old.job_id, "too many unacknowledged results; dropping the oldest");
        }
        self.unacked.push_back(r);
    }

    /// Start a session: take in the results that are ready, queue every kept
    /// one to be sent (again); returns their job ids for `Hello`.
    fn begin_session(&mut self) -> Vec<String> {
        while let Ok(ev) = self.rx.try_recv() {
            if let Event::Result(r) = ev {
                self.hold(r);
            }
        }
        self.resend = self.unacked.iter().map(|r| r.job_id.clone()).collect();
        self.resend.iter().cloned().collect()
    }

    /// Next message to send while connected.
    async fn next(&mut self) -> BuilderMessage {
        while let Some(id) = self.resend.pop_front() {
            if let Some(r) = self.unacked.iter().find(|r| r.job_id == id) {
                return result_message(r.clone());
            }
        }
        let Some(ev) = self.rx.recv().await else {
            return std::future::pending().await;
        };
        match ev {
            Event::Started(job_id) => BuilderMessage {
                msg: Some(Up::Started(JobStarted { job_id })),
            },
            Event::Log(job_id, data) => BuilderMessage {
                msg: Some(Up::Log(JobLog {
                    job_id,
                    data: data.to_vec(),
                })),
            },
            Event::Result(r) => {
                self.hold(r.clone());
                result_message(r)
            }
        }
    }

    /// While disconnected: keep results, drop logs and start notices.
    async fn absorb_one(&mut self) {
        match self.rx.recv().await {
            Some(Event::Result(r)) => self.hold(r),
            Some(_) => {}
            None => std::future::pending::<()>().await,
        }
    }

    /// The coordinator has `job_id`'s result (or does not want it): forget it.
    /// Whether it was kept.
    fn acknowledged(&mut self, job_id: &str) -> bool {
        self.resend.retain(|id| id != job_id);
        let before = self.unacked.len();
        self.unacked.retain(|r| r.job_id != job_id);
        self.unacked.len() != before
    }

    /// Whether every result so far is acknowledged.
    fn settled(&self) -> bool {
        self.unacked.is_empty() && self.rx.is_empty()
    }

    /// How many results wait for an acknowledgement.
    fn unacked_count(&self) -> usize {
        self.unacked.len()
    }
}

fn result_message(r: JobResult) -> BuilderMessage {
    BuilderMessage {
        msg: Some(Up::Result(r)),
    }
}

/// How a session ended.
enum SessionEnd {
    /// The stream closed or failed after Welcome (or stopping cut the handshake).
    Lost(String),
    /// Stopped: the jobs are stopped and their results delivered (or the
    /// grace ran out).
    Shutdown,
}

/// Dial, authenticate and serve sessions until `stop` is requested; then stop
/// the jobs, deliver their results if connected, and return by the deadline.
pub async fn run_sessions<E: Execute>(
    params: SessionParams,
    jobs: JobManager<E>,
    mut outbox: Outbox,
    link_tx: watch::Sender<Option<Link>>,
    stop: Stop,
) {
    let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    loop {
        let outcome =
            session_once(&params, &jobs, &mut outbox, &link_tx, &mut backoff, &stop).await;
        link_tx.send_replace(None);
        match outcome {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::Lost(_)) if stop.is_requested() => break,
            Ok(SessionEnd::Lost(why)) => {
                tracing::warn!(reason = %why, "lost the coordinator; reconnecting");
            }
            Err(BuilderError::Unauthenticated(msg)) => {
                tracing::error!(
                    public_key = %params.key.public_line(),
                    "the coordinator refused this builder ({msg}); enrol the key in its --builder-keys"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot reach the coordinator"),
        }
        if stop.is_requested() {
            break;
        }
        let delay = backoff.next_delay();
        tracing::debug!(?delay, "waiting before reconnecting");
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                () = outbox.absorb_one() => {}
                () = stop.requested() => break,
            }
        }
        if stop.is_requested() {
            break;
        }
    }
    // Stopping while disconnected: stop the jobs (bounded); their results
    // have nowhere to go.
    tracing::info!(
        running = jobs.running_count(),
        "stopping while disconnected: stopping the running jobs"
    );
    jobs.shutdown();
    let deadline = stop.deadline().unwrap_or_else(Instant::now);
    let idle = tokio::time::timeout_at(deadline, async {
        tokio::select! {
            () = jobs.wait_idle() => {}
            () = async { loop { outbox.absorb_one().await } } => {}
        }
    })
    .await;
    if idle.is_err() {
        tracing::warn!(
            running = jobs.running_count(),
            "the shutdown grace ran out before every job stopped"
        );
    }
    let undelivered = outbox.unacked_count();
    if undelivered > 0 {
        tracing::warn!(
            undelivered,
            "stopped with job results the coordinator has not acknowledged; it runs those builds again"
        );
    }
}

async fn session_once<E: Execute>(
    p: &SessionParams,
    jobs: &JobManager<E>,
    outbox: &mut Outbox,
    link_tx: &watch::Sender<Option<Link>>,
    backoff: &mut Backoff,
    stop: &Stop,
) -> Result<SessionEnd, BuilderError> {
    // Running ids first: a job that ends after this still has its result in
    // the channel when `begin_session` drains it, so each job is listed.
    let running_jobs = jobs.running_ids();
    let finished_jobs = outbox.begin_session();
    let (n_running, n_finished) = (running_jobs.len(), finished_jobs.len());
    let handshake = async {
        let channel = p.endpoint.connect().await.map_err(|e| {
            BuilderError::Connect(format!("{}: {}", p.endpoint.uri(), error_chain(&e)))
        })?;
        let mut client = BuilderServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel::<BuilderMessage>(256);
        let hello = Hello {
            name: p.name.clone(),
            public_key: p.key.public_line().to_owned(),
            capabilities: Some(p.capabilities.clone()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            running_jobs,
            finished_jobs,
        };
        tx.send(BuilderMessage {
            msg: Some(Up::Hello(hello)),
        })
        .await
        .map_err(|_| BuilderError::Protocol("session closed before Hello".into()))?;

        let response =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, client.session(ReceiverStream::new(rx)))
                .await
                .map_err(|_| BuilderError::Connect("timed out opening the session".into()))?
                .map_err(status_error)?;
        let mut inbound = response.into_inner();

        let nonce = match next_down(&mut inbound).await? {
            Down::Challenge(c) => c.nonce,
            other => {
                return Err(BuilderError::Protocol(format!(
                    "expected Challenge, got {}",
                    down_name(&other)
                )));
            }
        };
        if nonce.len() < 16 || nonce.len() > MAX_NONCE {
            return Err(BuilderError::Protocol(format!(
                "challenge nonce of {} bytes",
                nonce.len()
            )));
        }
        let signature = p.key.sign_challenge(&nonce, &p.name).to_vec();
        tx.send(BuilderMessage {
            msg: Some(Up::ChallengeResponse(ChallengeResponse { signature })),
        })
        .await
        .map_err(|_| BuilderError::Connect("session closed during the handshake".into()))?;
        let welcome = match next_down(&mut inbound).await? {
            Down::Welcome(w) => w,
            other => {
                return Err(BuilderError::Protocol(format!(
                    "expected Welcome, got {}",
                    down_name(&other)
                )));
            }
        };
        Ok((channel, tx, inbound, welcome))
    };
    let (channel, tx, mut inbound, welcome) = tokio::select! {
        r = handshake => r?,
        () = stop.requested() => return Ok(SessionEnd::Lost("stopping".into())),
    };
    let token = welcome
        .session_token
        .parse()
        .map_err(|_| BuilderError::Protocol("session token is not valid ASCII metadata".into()))?;
    tracing::info!(
        coordinator = %p.endpoint.uri(),
        name = %p.name,
        draining = welcome.draining,
        running = n_running,
        finished = n_finished,
        "connected"
    );
    backoff.reset();
    jobs.set_draining(welcome.draining);
    link_tx.send_replace(Some(Link {
        channel,
        auth: SessionAuth { token },
        cache_public_key: welcome.cache_public_key,
    }));

    let mut ticker = tokio::time::interval(p.load_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next: Option<BuilderMessage> = None;
    let mut stopping = false;
    let mut idle = false;
    let mut lost: Option<String> = None;
    loop {
        if stopping && idle && next.is_none() && outbox.settled() {
            tracing::info!("every job stopped and reported");
            break;
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.msg {
                    Some(Down::Job(job)) => {
                        tracing::info!(job = %job.job_id, drv = %job.drv_path, "job received");
                        jobs.submit(job);
                    }
                    Some(Down::Cancel(c)) => {
                        jobs.cancel(&c.job_id);
                        if outbox.acknowledged(&c.job_id) {
                            tracing::info!(job = %c.job_id, "the coordinator does not want this job's result; dropped");
                        }
                    }
                    Some(Down::ResultAck(a)) => {
                        outbox.acknowledged(&a.job_id);
                    }
                    Some(Down::Drain(d)) => jobs.set_draining(d.draining || stopping),
                    Some(other) => tracing::warn!("unexpected {} from the coordinator", down_name(&other)),
                    None => {}
                },
                Ok(None) => lost = Some("the coordinator closed the session".into()),
                Err(status) => lost = Some(format!("{}: {}", status.code(), status.message())),
            },
            m = outbox.next(), if next.is_none() => next = Some(m),
            permit = tx.reserve(), if next.is_some() => match permit {
                Ok(permit) => {
                    if let Some(m) = next.take() {
                        permit.send(m);
                    }
                }
                Err(_) => lost = Some("session stream closed".into()),
            },
            _ = ticker.tick() => {
                let load = crate::load::current(jobs.running_count(), &p.store_dir).await;
                // Load reports are best effort: skip one rather than block.
                let _ = tx.try_send(BuilderMessage { msg: Some(Up::Load(load)) });
            }
            () = stop.requested(), if !stopping => {
                tracing::info!(running = jobs.running_count(), "stopping: cancelling running jobs");
                stopping = true;
                jobs.shutdown();
            }
            () = jobs.wait_idle(), if stopping && !idle => idle = true,
            () = stop.expired(), if stopping => {
                tracing::warn!(
                    running = jobs.running_count(),
                    unacknowledged = outbox.unacked_count(),
                    "the shutdown grace ran out; leaving what is still in flight"
                );
                break;
            }
        }
        if let Some(why) = lost.take() {
            // A result taken for sending stays kept in the outbox: it goes again.
            return Ok(SessionEnd::Lost(why));
        }
    }
    // Close our side; let the stream deliver what is queued and end (bounded).
    drop(tx);
    let wait = stop
        .deadline()
        .map(|d| d.saturating_duration_since(Instant::now()))
        .unwrap_or_default()
        .min(Duration::from_secs(2));
    let _ = tokio::time::timeout(wait, async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    Ok(SessionEnd::Shutdown)
}

async fn next_down(
    inbound: &mut tonic::Streaming<farm_proto::v1::CoordinatorMessage>,
) -> Result<Down, BuilderError> {
    let got = tokio::time::timeout(HANDSHAKE_TIMEOUT, inbound.message())
        .await
        .map_err(|_| BuilderError::Connect("timed out during the handshake".into()))?
        .map_err(status_error)?;
    got.and_then(|m| m.msg).ok_or_else(|| {
        BuilderError::Connect("the coordinator closed the session during the handshake".into())
    })
}

fn status_error(status: tonic::Status) -> BuilderError {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            BuilderError::Unauthenticated(status.message().to_owned())
        }
        code => BuilderError::Connect(format!("{code}: {}", status.message())),
    }
}

fn down_name(m: &Down) -> &'static str {
    match m {
        Down::Challenge(_) => "Challenge",
        Down::Welcome(_) => "Welcome",
        Down::Job(_) => "Job",
        Down::Cancel(_) => "CancelJob",
        Down::Drain(_) => "Drain",
        Down::ResultAck(_) => "JobResultAck",
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(check_url("http://127.0.0.1:7070", false).is_ok());
        assert!(check_url("http://[::1]:7070", false).is_ok());
        assert!(check_url("http://localhost:7070", false).is_ok());
        assert!(check_url("http://10.0.0.1:7070", false).is_err());
        assert!(check_url("https://farm.example:7070", false).is_err());
        assert!(check_url("https://farm.example:7070", true).is_ok());
        assert!(check_url("ftp://127.0.0.1", true).is_err());
        assert!(check_url("not a url", true).is_err());
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(2));
        }
        assert!(last >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // Jitter: many draws at the cap are not all equal.
        let draws: std::collections::BTreeSet<_> = (0..20)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
                b.next_delay()
            })
            .collect();
        assert!(draws.len() > 1);
    }
}
