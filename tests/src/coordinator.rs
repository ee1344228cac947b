//! The coordinator of a test: `farm-coordinator` on loopback with a state dir
//! of its own, restartable on the same state and ports. It is ready when it
//! has written `STATE/endpoints.json` (every listener bound) and answers a
//! gRPC `Status` call; never judged by its log text.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use farm_proto::v1;
use farm_testkit::{FarmProcess, KeptTempDir, TestLogs, temp_dir};
use serde::Deserialize;

use crate::bins::farm_bin;
use crate::keys::ClientKey;

/// How long a farm process may take to become ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The addresses and keys a coordinator publishes in `STATE/endpoints.json`
/// once every listener is bound. Extra fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Endpoints {
    /// gRPC listener, `host:port`.
    pub grpc: String,
    /// HTTP listener (cache, metrics, dashboard), `host:port`.
    pub http: String,
    /// SSH nix endpoint, `host:port`.
    pub ssh: String,
    /// The cache signing key's public half, `name:base64`.
    pub cache_public_key: String,
    /// The SSH host key, `ssh-ed25519 AAAA…`.
    pub ssh_host_key: String,
}

impl Endpoints {
    /// `http://` URL of the gRPC listener.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `http://` URL of the HTTP listener (the binary cache).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The SSH listener's port.
    pub fn ssh_port(&self) -> anyhow::Result<u16> {
        port_of(&self.ssh)
    }

    /// Reads and parses `STATE/endpoints.json`; `Ok(None)` while it does not
    /// exist or is not yet complete JSON.
    pub fn read(state_dir: &Path) -> anyhow::Result<Option<Endpoints>> {
        let path = state_dir.join("endpoints.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        match serde_json::from_slice(&bytes) {
            Ok(endpoints) => Ok(Some(endpoints)),
            // Possibly written non-atomically and caught half way: retry.
            Err(e) if e.is_eof() => Ok(None),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "{} is not valid endpoints JSON: {}",
                    path.display(),
                    String::from_utf8_lossy(&bytes)
                )
            }),
        }
    }
}

fn port_of(addr: &str) -> anyhow::Result<u16> {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("{addr:?} has no port"))
}

/// Waits until `STATE/endpoints.json` exists and parses, up to `timeout`.
pub fn wait_for_endpoints(state_dir: &Path, timeout: Duration) -> anyhow::Result<Endpoints> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = Endpoints::read(state_dir)? {
            return Ok(e);
        }
        if Instant::now() >= deadline {
            bail!(
                "no complete {} after {timeout:?}",
                state_dir.join("endpoints.json").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `STATE/endpoints.json` of `process`, failing early (with its
/// log) if the process exits first.
pub fn process_endpoints(
    process: &mut FarmProcess,
    state_dir: &Path,
    timeout: Duration,
) -> anyhow::Result<Endpoints> {
    let what = format!(
        "write a complete {}",
        state_dir.join("endpoints.json").display()
    );
    process.wait_until(&what, timeout, || Endpoints::read(state_dir))
}

/// Runs `fut` to completion on a runtime of its own (on a thread of its own,
/// so it works from sync code and from inside another runtime alike).
pub(crate) fn block_on<T: Send + 'static>(
    fut: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for a gRPC call")?
            .block_on(fut)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the gRPC call's thread panicked"))?
}

/// `FarmService.Status` against `grpc_url`, signed with `key` when given
/// (a coordinator with key files refuses unsigned calls).
pub fn grpc_status(grpc_url: &str, key: Option<&ClientKey>) -> anyhow::Result<v1::StatusResponse> {
    let url = grpc_url.to_owned();
    let key = key.cloned();
    block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;
        let mut client = v1::farm_service_client::FarmServiceClient::new(channel);
        let mut req = tonic::Request::new(v1::StatusRequest {});
        if let Some(k) = key {
            // Signed for the coordinator that proves its identity, as `farm` does.
            let identity = farm_common::sign::learn_identity(&mut client).await?;
            k.sign(&mut req, farm_proto::auth::methods::STATUS, &identity)?;
        }
        Ok(client.status(req).await?.into_inner())
    })
}

/// A running `farm-coordinator`, restartable on the same state dir and ports.
#[derive(Debug)]
pub struct Coordinator {
    /// The process (killed on drop).
    pub process: FarmProcess,
    /// What it wrote to `STATE/endpoints.json`.
    pub endpoints: Endpoints,
    /// Its `--state-dir`.
    pub state_dir: PathBuf,
    args: Vec<String>,
    /// Signs the readiness probe when the coordinator has key files.
    probe_key: Option<ClientKey>,
    logs: TestLogs,
    // Dropped after the process.
    _root: Option<KeptTempDir>,
}

impl Coordinator {
    /// `farm-coordinator --state-dir TMP` on ephemeral loopback ports with
    /// `args`, once ready.
    pub fn start<S: AsRef<OsStr>>(logs: &TestLogs, args: &[S]) -> anyhow::Result<Coordinator> {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        Coordinator::start_signed(logs, &args, None)
    }

    /// [`Coordinator::start`], the readiness probe signed with `probe_key`.
    pub fn start_signed(
        logs: &TestLogs,
        args: &[String],
        probe_key: Option<ClientKey>,
    ) -> anyhow::Result<Coordinator> {
        let root = temp_dir("coordinator")?;
        let state_dir = root.path().join("state");
        std::fs::create_dir_all(&state_dir)?;
        let (process, endpoints) = spawn(
            logs,
            &state_dir,
            ["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"],
            args,
            probe_key.as_ref(),
        )?;
        Ok(Coordinator {
            process,
            endpoints,
            state_dir,
            args: args.to_vec(),
            probe_key,
            logs: logs.clone(),
            _root: Some(root),
        })
    }

    /// The coordinator's state directory.
    /// Every file of the cache on disk (relative to the cache's root) with its
    /// size and modification time: what a refused request must leave as it was.
    pub fn cache_files(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<PathBuf, (u64, std::time::SystemTime)>> {
        let root = self.state_dir().join("cache");
        let mut out = std::collections::BTreeMap::new();
        let mut todo = vec![root.clone()];
        while let Some(d) = todo.pop() {
            let entries = match std::fs::read_dir(&d) {
                Ok(e) => e,
                // Files vanish under a live cache (a finished temporary upload).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("listing {}", d.display())));
                }
            };
            for e in entries {
                let e = e?;
                let meta = e.metadata()?;
                if meta.is_dir() {
                    todo.push(e.path());
                } else {
                    out.insert(
                        e.path().strip_prefix(&root)?.to_path_buf(),
                        (meta.len(), meta.modified()?),
                    );
                }
            }
        }
        Ok(out)
    }

    /// The key the readiness probe (and the fixture's own calls) sign with.
    pub fn probe_key(&self) -> Option<&ClientKey> {
        self.probe_key.as_ref()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `http://` URL of its gRPC listener.
    pub fn grpc_url(&self) -> String {
        self.endpoints.grpc_url()
    }

    /// `FarmService.Status` (signed when the coordinator has key files).
    pub fn status(&self) -> anyhow::Result<v1::StatusResponse> {
        grpc_status(&self.grpc_url(), self.probe_key.as_ref())
    }

    /// `kill -9`, then a new process on the same state dir and the same
    /// gRPC, HTTP and SSH ports (a client's command line stays valid).
    pub fn kill_and_restart(&mut self, logs: &TestLogs) -> anyhow::Result<()> {
        self.process.kill()?;
        self.restart(logs)
    }

    /// A new process on the same state dir and ports, once this one is gone
    /// (killed, or stopped), logging to `logs`.
    pub fn restart(&mut self, logs: &TestLogs) -> anyhow::Result<()> {
        let e = self.endpoints.clone();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        // The ports were just released; retry while the kernel still holds them.
        loop {
            match spawn(
                logs,
                &self.state_dir,
                [&e.grpc, &e.http, &e.ssh],
                &self.args,
                self.probe_key.as_ref(),
            ) {
                Ok((process, endpoints)) => {
                    self.process = process;
                    self.endpoints = endpoints;
                    self.logs = logs.clone();
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

/// Spawns `farm-coordinator` on the given gRPC, HTTP and SSH addresses and
/// waits until it is ready: `endpoints.json` written, `Status` answered.
fn spawn(
    logs: &TestLogs,
    state_dir: &Path,
    [grpc, http, ssh]: [&str; 3],
    args: &[String],
    probe_key: Option<&ClientKey>,
) -> anyhow::Result<(FarmProcess, Endpoints)> {
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
    let endpoints = process_endpoints(&mut process, state_dir, STARTUP_TIMEOUT)?;
    let url = endpoints.grpc_url();
    let mut last = String::new();
    process
        .wait_until(
            "answer a Status call",
            STARTUP_TIMEOUT,
            || match grpc_status(&url, probe_key) {
                Ok(_) => Ok(Some(())),
                Err(e) => {
                    last = format!("{e:#}");
                    Ok(None)
                }
            },
        )
        .with_context(|| format!("the last Status call failed: {last}"))?;
    Ok((process, endpoints))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_tolerate_extra_fields() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(Endpoints::read(dir.path())?, None);
        std::fs::write(dir.path().join("endpoints.json"), "{\"grpc\": \"127.0")?;
        assert_eq!(
            Endpoints::read(dir.path())?,
            None,
            "partial JSON means retry"
        );
        std::fs::write(
            dir.path().join("endpoints.json"),
            r#"{"grpc":"127.0.0.1:1","http":"127.0.0.1:2","ssh":"127.0.0.1:3",
               "cache_public_key":"farm:AAAA","ssh_host_key":"ssh-ed25519 AAAA","extra":1}"#,
        )?;
        let e = Endpoints::read(dir.path())?.expect("complete file");
        assert_eq!(e.grpc_url(), "http://127.0.0.1:1");
        assert_eq!(e.ssh_port()?, 3);
        std::fs::write(dir.path().join("endpoints.json"), r#"{"grpc": 1}"#)?;
        assert!(
            Endpoints::read(dir.path()).is_err(),
            "wrong types are an error"
        );
        Ok(())
    }
}
