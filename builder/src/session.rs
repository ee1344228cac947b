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
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use farm_common::channel::{ClientTls, MAX_MESSAGE_SIZE};

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
use tonic::transport::Endpoint;

use crate::error::{BuilderError, error_chain};
use crate::jobs::{Event, Execute, JobManager};
use crate::key::BuilderKey;
use crate::link::Link;

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

/// Build the gRPC endpoint: the farm's one client rule (`farm_common::channel`).
pub(crate) fn endpoint(url: &str, tls: ClientTls<'_>) -> Result<Endpoint, BuilderError> {
    farm_common::channel::endpoint(url, tls).map_err(|e| BuilderError::Config(e.to_string()))
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Start at `base`, never exceed `max`.
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// Forget past failures.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: uniform in [ceiling/2, ceiling], ceiling doubling per failure up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(16);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        let lo = ceiling / 2;
        let span = ceiling.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(rand::thread_rng().gen_range(0..=span))
    }
}

/// What the session needs from the rest of the builder.
pub(crate) struct SessionParams {
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
pub(crate) struct Stop {
    token: CancellationToken,
    grace: Duration,
    at: Arc<OnceLock<Instant>>,
}

impl Stop {
    /// Not requested yet; once it is, stopping may take `grace` at most.
    pub(crate) fn new(grace: Duration) -> Self {
        Stop {
            token: CancellationToken::new(),
            grace,
            at: Arc::new(OnceLock::new()),
        }
    }

    /// Ask to stop (the first request sets the deadline).
    pub(crate) fn request(&self) {
        let _ = self.at.set(Instant::now());
        self.token.cancel();
    }

    /// Whether stopping was asked for.
    pub(crate) fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once stopping is asked for.
    pub(crate) async fn requested(&self) {
        self.token.cancelled().await;
    }

    /// When stopping must be over (None until requested).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.at.get().map(|t| *t + self.grace)
    }

    /// Resolves at the deadline (never before a request).
    pub(crate) async fn expired(&self) {
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
pub(crate) struct Outbox {
    rx: mpsc::Receiver<Event>,
    /// Results not acknowledged yet, oldest first.
    unacked: VecDeque<JobResult>,
    /// Of those, the ones still to send on the current session.
    resend: VecDeque<String>,
}

impl Outbox {
    /// Wrap the receiving end of the jobs' event channel.
    pub(crate) fn new(rx: mpsc::Receiver<Event>) -> Self {
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
pub(crate) async fn run_sessions<E: Execute>(
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
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
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
    link_tx.send_replace(Some(Link::new(channel, token, welcome.cache_public_key)));

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
                let mut load = crate::load::current(jobs.running_count(), &p.store_dir).await;
                load.store_problem = jobs.store_problem().unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

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
