//! Starting and stopping the coordinator: keys, the state database, the
//! cache, the scheduler, and the gRPC, HTTP and SSH listeners; then
//! `DIR/endpoints.json` once every listener is bound.
//!
//! `endpoints.json`:
//! `{"grpc": "host:port", "http": "host:port", "ssh": "host:port",
//!   "cache_public_key": "name:base64", "ssh_host_key": "ssh-ed25519 AAAA…",
//!   "grpc_tls": bool, "tls_cert": "/path/cert.pem" | null}`
//! (addresses as bound, so port 0 becomes the real port).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::grpc::auth::{BuilderAuth, CliAuth};
use crate::api::grpc::limits;
use crate::config::{CoordinatorConfig, host_for};
use crate::domain::coordinator::{Coordinator, Facts, now_ms};
use crate::domain::scheduler::{Scheduler, SchedulerConfig};
use crate::domain::state::Store;
use crate::{CoordinatorError, keys};

/// HTTP/2 streams one gRPC connection may have open at once.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Requests one gRPC connection may have in flight at once.
pub(crate) const CONCURRENCY_PER_CONNECTION: usize = 64;
/// How often finished history past the retention is pruned (first at start).
pub(crate) const PRUNE_PERIOD: Duration = Duration::from_secs(300);

/// Where the coordinator listens and how to trust it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub grpc: String,
    pub http: String,
    pub ssh: String,
    pub cache_public_key: String,
    pub ssh_host_key: String,
    #[serde(default)]
    pub grpc_tls: bool,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
}

impl Endpoints {
    /// The URL a builder or the CLI dials for gRPC.
    pub fn grpc_url(&self) -> String {
        format!(
            "{}://{}",
            if self.grpc_tls { "https" } else { "http" },
            self.grpc
        )
    }
}

/// A coordinator that is up.
pub struct RunningCoordinator {
    endpoints: Endpoints,
    coordinator: Coordinator,
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<(), CoordinatorError>>,
    /// How long stopping may take at most.
    grace: Duration,
}

impl RunningCoordinator {
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The domain handle (for in-process callers such as the SSH endpoint).
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Stop every listener and wait for them; the state is flushed.
    pub async fn shutdown(mut self) -> Result<(), CoordinatorError> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Wait until a server fails (or all stop). Once stopping, sessions and
    /// followers are ended, and everything after (servers finishing, the last
    /// state flush, tasks letting go of the state) fits in the grace period:
    /// what has not finished by then is abandoned.
    async fn join(&mut self) -> Result<(), CoordinatorError> {
        let mut result = Ok(());
        let mut stop_rx = self.stop.subscribe();
        let grace = self.grace;
        let coord = std::sync::Arc::downgrade(&self.coordinator.inner);
        let (deadline_tx, mut deadline_rx) = watch::channel(None::<tokio::time::Instant>);
        let stopped = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
            let deadline = tokio::time::Instant::now() + grace;
            let _ = deadline_tx.send(Some(deadline));
            if let Some(inner) = coord.upgrade() {
                Coordinator { inner }.stop();
            }
            // Servers get most of the grace; the flush and the rest share what is left.
            tokio::time::sleep(grace.mul_f32(0.7)).await;
        };
        tokio::pin!(stopped);
        loop {
            let r = tokio::select! {
                r = self.tasks.join_next() => match r {
                    Some(r) => r,
                    None => break,
                },
                _ = &mut stopped => {
                    tracing::warn!("servers did not stop in time; aborting them");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            };
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                    let _ = self.stop.send(true);
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => {
                    if result.is_ok() {
                        result = Err(CoordinatorError::Task(e));
                    }
                    let _ = self.stop.send(true);
                }
            }
        }
        self.coordinator.stop();
        let deadline = deadline_rx
            .borrow_and_update()
            .unwrap_or_else(|| tokio::time::Instant::now() + grace);
        let store = self.coordinator.store();
        match tokio::time::timeout_at(deadline, store.flush()).await {
            Ok(r) => r?,
            Err(_) => {
                tracing::error!("the last state flush did not finish within the shutdown grace");
                return Err(CoordinatorError::FlushTimedOut);
            }
        }
        drop(store);
        // Tasks still winding down (session ends, spawned work) hold the
        // coordinator and with it the state database's lock: give them what is
        // left of the grace, so that the same process can open the state again.
        while std::sync::Arc::strong_count(&self.coordinator.inner) > 1
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!("coordinator stopped");
        result
    }
}

/// Run until `shutdown` resolves (or a server fails).
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let mut running = start(config).await?;
    let stop = running.stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    running.join().await
}

async fn bind(addr: &str) -> Result<TcpListener, CoordinatorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

fn local(l: &TcpListener, what: &str) -> Result<SocketAddr, CoordinatorError> {
    l.local_addr().map_err(|source| CoordinatorError::Io {
        context: format!("address of the {what} listener"),
        source,
    })
}

fn shown(addr: SocketAddr) -> String {
    format!("{}:{}", host_for(addr.ip()), addr.port())
}

/// Start the coordinator: everything bound and `endpoints.json` written when this returns.
pub async fn start(config: CoordinatorConfig) -> Result<RunningCoordinator, CoordinatorError> {
    let io = |context: String| move |source| CoordinatorError::Io { context, source };
    std::fs::create_dir_all(&config.state_dir)
        .map_err(io(format!("creating {}", config.state_dir.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) =
            std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        {
            tracing::warn!(
                dir = %config.state_dir.display(),
                error = %e,
                "cannot make the state directory private (mode 0700); it holds the farm's keys"
            );
        }
    }
    let signing_key = keys::cache_signing_key(&config)?;
    let host_key = keys::ssh_host_key(&config.state_dir)?;
    let host_key_openssh = host_key
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|source| CoordinatorError::HostKey {
            path: config.state_dir.join("ssh_host_ed25519_key"),
            source,
        })?;
    let ssh_host_key = keys::public_key_line(host_key.public_key());

    let grpc_l = bind(&config.grpc).await?;
    let http_l = bind(&config.http).await?;
    let ssh_l = bind(&config.ssh).await?;
    let grpc_addr = local(&grpc_l, "gRPC")?;
    let http_addr = local(&http_l, "HTTP")?;
    let ssh_addr = local(&ssh_l, "SSH")?;
    let tls_on = config.grpc_tls(grpc_addr)?;
    let tls = if tls_on {
        let mut names = vec![config.advertised_host(grpc_addr)];
        if let Ok(h) = hostname::get()
            && let Ok(h) = h.into_string()
        {
            names.push(h);
        }
        if !grpc_addr.ip().is_unspecified() {
            names.push(grpc_addr.ip().to_string());
        }
        Some(keys::tls_files(&config, &names)?)
    } else {
        None
    };

    let db_path = config.db_path();
    let job_limits = config.jobs;
    let store = tokio::task::spawn_blocking(move || {
        Store::open(&db_path).map(|s| s.with_job_limits(job_limits))
    })
    .await
    .map_err(|e| CoordinatorError::Io {
        context: "opening the state database".into(),
        source: std::io::Error::other(e.to_string()),
    })??;
    let sched_cfg = SchedulerConfig {
        grace_ms: config.builder_grace.as_millis() as i64,
        max_retries: config.max_retries,
        unschedulable_wait_ms: config.unschedulable_wait.as_millis() as i64,
        recent_window_ms: config.recent_builder_window.as_millis() as i64,
    };
    let sched = Scheduler::load(sched_cfg, store.load()?, now_ms());

    let facts = Facts {
        cache_public_key: signing_key.verifying_key().to_string(),
        ssh_host_key: ssh_host_key.clone(),
        ssh_host: config.advertised_host(ssh_addr),
        ssh_port: ssh_addr.port(),
        http_url: format!(
            "http://{}:{}",
            config.advertised_host(http_addr),
            http_addr.port()
        ),
    };
    let builder_auth = BuilderAuth {
        file: config.builder_keys.clone(),
        extra: config.extra_builder_keys.clone(),
    };
    if builder_auth.file.is_none() && builder_auth.extra.is_empty() {
        tracing::warn!("no --builder-keys configured: no builder can join");
    }
    if config.keys.is_empty() {
        tracing::warn!(
            "no client key files (--authorized-keys, --read-keys, --push-keys, --admin-keys): no client can use this coordinator"
        );
    }
    // A broken key file is an error now, not at the first client.
    config.keys.check_files()?;
    let cli_auth = CliAuth {
        keys: config.keys.clone(),
        identity: signing_key.verifying_key().to_string(),
        replay: Default::default(),
    };
    let identity_key = signing_key.clone();
    let cache = crate::cache::Cache::open(config.cache.clone(), signing_key).await?;
    let coordinator = Coordinator::new(sched, store, cache, facts);

    let (stop, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks: JoinSet<Result<(), CoordinatorError>> = JoinSet::new();
    // The dashboard's admin sessions: minted over gRPC, used over HTTP.
    let sessions = crate::api::http::dashboard::session::Sessions::default();

    // gRPC
    {
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            // Bounds per HTTP/2 connection: open streams, and requests in flight.
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
            .http2_max_header_list_size(limits::MAX_HEADER_LIST);
        if let Some(t) = &tls {
            let identity = tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem);
            builder =
                builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
        }
        let router = builder
            .layer(limits::UnaryTimeoutLayer(limits::UNARY_TIMEOUT))
            .add_service(
                farm_proto::v1::builder_service_server::BuilderServiceServer::new(
                    crate::api::grpc::builder::BuilderSvc {
                        coord: coordinator.clone(),
                        auth: builder_auth,
                    },
                )
                .max_decoding_message_size(limits::BUILDER_MAX_DECODE)
                .max_encoding_message_size(farm_proto::MAX_MESSAGE_SIZE),
            )
            // Signatures, nonces and body digests are checked before tonic
            // decodes a message (api::grpc::signed).
            .add_service(crate::api::grpc::signed::SignedCalls::new(
                farm_proto::v1::farm_service_server::FarmServiceServer::new(
                    crate::api::grpc::farm::FarmSvc {
                        coord: coordinator.clone(),
                        auth: cli_auth.clone(),
                        identity_key,
                        sessions: sessions.clone(),
                    },
                )
                .max_decoding_message_size(limits::FARM_MAX_DECODE)
                .max_encoding_message_size(farm_proto::MAX_MESSAGE_SIZE),
                cli_auth,
            ));
        // Each accepted connection counts in `farm_connections{kind="grpc"}` while open.
        let conns = coordinator.metrics().grpc_connections.clone();
        let incoming = futures::StreamExt::map(
            tonic::transport::server::TcpIncoming::from(grpc_l).with_nodelay(Some(true)),
            move |r| r.map(|tcp| crate::metrics::CountedIo::new(tcp, &conns)),
        );
        let done = stopped();
        tasks.spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, done)
                .await
                .map_err(CoordinatorError::from)
        });
    }
    // HTTP
    {
        let app = crate::api::http::router(&coordinator, sessions);
        let done = stopped();
        tasks.spawn(async move {
            // No Nagle delay on keep-alive connections: a narinfo answer is
            // one small write that must not wait for the client's ACK.
            let http_l = axum::serve::ListenerExt::tap_io(http_l, |tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
            });
            axum::serve(http_l, app)
                .with_graceful_shutdown(done)
                .await
                .map_err(|source| CoordinatorError::Io {
                    context: "HTTP server".into(),
                    source,
                })
        });
    }
    // SSH: the Nix endpoint (ssh:// and ssh-ng://), and the relay socket for
    // sites with OpenSSH in front.
    {
        let endpoint = crate::nix_endpoint::Endpoint::for_coordinator(&coordinator)
            .with_limits(config.nix_limits);
        let keys = crate::nix_endpoint::access::AuthorizedKeysFiles::new(config.keys.clone());
        let ssh_config = crate::nix_endpoint::ssh::SshConfig {
            host_key: crate::nix_endpoint::ssh::load_host_key(&host_key_openssh)
                .map_err(CoordinatorError::SshServerKey)?,
            inactivity_timeout: Duration::from_secs(24 * 3600),
            limits: config.ssh_limits,
        };
        let done = stopped();
        let ep = endpoint.clone();
        let conns = coordinator.metrics().ssh_connections.clone();
        tasks.spawn(async move {
            crate::nix_endpoint::ssh::serve_counted(
                ssh_l,
                ssh_config,
                std::sync::Arc::new(keys),
                std::sync::Arc::new(ep),
                done,
                Some(conns),
            )
            .await
            .map_err(|source| CoordinatorError::Io {
                context: "SSH server".into(),
                source,
            })
        });
        if let Some(path) = &config.relay_socket {
            let listener = crate::nix_endpoint::bind_relay_socket(path)
                .map_err(io(format!("binding the relay socket {}", path.display())))?;
            let done = stopped();
            let relay_level = config.relay_level;
            let relay_uids = config.relay_uids.clone();
            tasks.spawn(async move {
                crate::nix_endpoint::stdio::serve_with(
                    listener,
                    std::sync::Arc::new(endpoint),
                    relay_level,
                    relay_uids,
                    done,
                )
                .await
                .map_err(|source| CoordinatorError::Io {
                    context: "relay socket".into(),
                    source,
                })
            });
        }
    }
    // Retention: finished history past it is pruned, off the scheduler lock.
    {
        let done = stopped();
        let c = coordinator.clone();
        let retention = config.retention.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = done => {}
                _ = c.pruner(retention, PRUNE_PERIOD) => {}
            }
            Ok(())
        });
    }
    // Alerts: evaluated only when they have somewhere to go.
    if !config.alert_targets.is_empty() {
        let senders = crate::alerting::Senders::start(&config.alert_targets)
            .map_err(|e| CoordinatorError::Config(e.to_string()))?;
        let done = stopped();
        let c = coordinator.clone();
        let alerts = config.alerts.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = done => {}
                _ = crate::alerting::run(c, alerts, senders, Duration::from_secs(1)) => {}
            }
            Ok(())
        });
    }
    // Scheduler ticks
    {
        let done = stopped();
        let c = coordinator.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = done => {}
                _ = c.ticker(Duration::from_secs(1)) => {}
            }
            Ok(())
        });
    }

    let endpoints = Endpoints {
        grpc: shown(grpc_addr),
        http: shown(http_addr),
        ssh: shown(ssh_addr),
        cache_public_key: coordinator.facts().cache_public_key.clone(),
        ssh_host_key,
        grpc_tls: tls.is_some(),
        tls_cert: tls.map(|t| t.cert_path),
    };
    let path = config.state_dir.join("endpoints.json");
    let json = serde_json::to_vec_pretty(&endpoints).map_err(|e| CoordinatorError::Io {
        context: "encoding endpoints.json".into(),
        source: std::io::Error::other(e),
    })?;
    keys::write_file_atomic(&path, &json, 0o644)
        .map_err(io(format!("writing {}", path.display())))?;
    tracing::info!(
        grpc = %endpoints.grpc,
        http = %endpoints.http,
        ssh = %endpoints.ssh,
        tls = endpoints.grpc_tls,
        cache_key = %endpoints.cache_public_key,
        "coordinator listening"
    );
    Ok(RunningCoordinator {
        endpoints,
        coordinator,
        stop,
        tasks,
        grace: config.shutdown_grace,
    })
}

/// A gRPC connection that counts while open keeps the connection info tonic
/// gives handlers (the peer's address).
impl tonic::transport::server::Connected for crate::metrics::CountedIo<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
