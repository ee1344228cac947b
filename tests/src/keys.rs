//! Every key of a test farm, made one way: `farm keys ssh` (the farm's own
//! generator, OpenSSH ed25519, 0600) for builders (their key file in their
//! state dir, enrolled with `--builder-keys`), for clients (authorized with
//! `--authorized-keys` / `--admin-keys`; the Nix clients log in to the SSH
//! endpoint with them, `farm` signs its calls with them) and for any other
//! SSH party a test runs (an sshd's host key).
//!
//! [`ClientKey`] signs the fixture's own gRPC calls (the readiness probe) with
//! farm-common's signer, the one `farm` uses.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};

use crate::bins::farm_bin;
use crate::coordinator::Endpoints;

/// Generates an ed25519 key pair at `path` and `path.pub` (creating the
/// directory) with `farm keys ssh`; returns the public line.
pub fn ssh_key(path: &Path, comment: &str) -> anyhow::Result<String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = std::process::Command::new(farm_bin("farm")?)
        .args(["keys", "ssh", "--comment", comment, "--out"])
        .arg(path)
        .output()
        .context("running farm keys ssh")?;
    ensure!(
        out.status.success(),
        "farm keys ssh --out {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(
        line.starts_with("ssh-ed25519 "),
        "farm keys ssh printed {line:?}"
    );
    Ok(line)
}

/// A client key that signs gRPC calls as `farm` does (farm-common's
/// [`CliSigner`](farm_common::sign::CliSigner)).
#[derive(Debug, Clone)]
pub struct ClientKey {
    signer: farm_common::sign::CliSigner,
}

impl ClientKey {
    /// Loads an unencrypted OpenSSH ed25519 private key.
    pub fn load(path: &Path) -> anyhow::Result<ClientKey> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let key = ssh_key::PrivateKey::from_openssh(&text)
            .with_context(|| format!("{} is not an OpenSSH private key", path.display()))?;
        let Some(pair) = key.key_data().ed25519() else {
            bail!("{} is not an ed25519 key", path.display());
        };
        let signing = ed25519_dalek::SigningKey::from_bytes(&pair.private.to_bytes());
        Ok(ClientKey {
            signer: farm_common::sign::CliSigner::new(signing, key.public_key().to_openssh()?),
        })
    }

    /// Adds the signature metadata of a call to `method` (its gRPC path) now,
    /// for the coordinator `identity` (its cache public key).
    pub fn sign<T: prost::Message>(
        &self,
        req: &mut tonic::Request<T>,
        method: &str,
        identity: &str,
    ) -> anyhow::Result<()> {
        self.signer.sign(req, method, identity);
        Ok(())
    }
}

/// Client keys authorized on a coordinator: `keys` in its `--authorized-keys`
/// file (`--push-keys` when made by [`SshAccess::pushing`]), `admin_keys` in
/// its `--admin-keys` file (when there are any).
#[derive(Debug)]
pub struct SshAccess {
    dir: tempfile::TempDir,
    /// The flag that authorizes `keys`.
    keys_flag: &'static str,
    /// One private key per client (read access).
    pub keys: Vec<PathBuf>,
    /// Admin keys (may drain and cancel).
    pub admin_keys: Vec<PathBuf>,
}

impl SshAccess {
    /// `n` fresh client keys (`client0` …), all authorized.
    pub fn new(n: usize) -> anyhow::Result<SshAccess> {
        let names: Vec<String> = (0..n).map(|i| format!("client{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        SshAccess::named(&names, &[])
    }

    /// As [`SshAccess::new`], the keys with the push right (`--push-keys`):
    /// their hook builds are signed and shared, as a trusted host's.
    pub fn pushing(n: usize) -> anyhow::Result<SshAccess> {
        let mut a = SshAccess::new(n)?;
        a.keys_flag = "--push-keys";
        Ok(a)
    }

    /// Keys named `users` (authorized) and `admins` (in `--admin-keys`).
    pub fn named(users: &[&str], admins: &[&str]) -> anyhow::Result<SshAccess> {
        let dir = tempfile::Builder::new().prefix("farm-e2e-ssh-").tempdir()?;
        let make = |names: &[&str], file: &str| -> anyhow::Result<Vec<PathBuf>> {
            let mut keys = Vec::new();
            let mut lines = String::new();
            for name in names {
                let key = dir.path().join(format!("{name}_ed25519"));
                lines.push_str(&ssh_key(&key, &format!("{name}@farm-e2e"))?);
                lines.push('\n');
                keys.push(key);
            }
            if !names.is_empty() {
                std::fs::write(dir.path().join(file), lines)?;
            }
            Ok(keys)
        };
        let keys = make(users, "authorized_keys")?;
        let admin_keys = make(admins, "admin_keys")?;
        Ok(SshAccess {
            dir,
            keys_flag: "--authorized-keys",
            keys,
            admin_keys,
        })
    }

    /// A key that is authorized nowhere, named `name` (in this access's dir).
    pub fn stranger(&self, name: &str) -> anyhow::Result<PathBuf> {
        let key = self.dir.path().join(format!("stranger-{name}_ed25519"));
        ssh_key(&key, &format!("{name}@elsewhere"))?;
        Ok(key)
    }

    /// The coordinator flags that authorize the keys.
    pub fn coordinator_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, file, keys) in [
            (self.keys_flag, "authorized_keys", &self.keys),
            ("--admin-keys", "admin_keys", &self.admin_keys),
        ] {
            if !keys.is_empty() {
                args.push(flag.to_owned());
                args.push(self.dir.path().join(file).display().to_string());
            }
        }
        args
    }

    /// The key the fixture signs its own calls with: the first one.
    pub fn probe_key(&self) -> anyhow::Result<Option<ClientKey>> {
        self.keys
            .first()
            .or(self.admin_keys.first())
            .map(|k| ClientKey::load(k))
            .transpose()
    }

    /// `NIX_SSHOPTS` for `key` against the SSH endpoint in `endpoints`: its
    /// port, the key, and a known_hosts file holding the coordinator's host key.
    pub fn nix_sshopts_with(&self, endpoints: &Endpoints, key: &Path) -> anyhow::Result<String> {
        let port = endpoints.ssh_port()?;
        let known_hosts = self.known_hosts(endpoints)?;
        Ok(format!(
            "-p {port} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
            key.display(),
            known_hosts.display()
        ))
    }

    /// The known_hosts file holding the coordinator's SSH host key (kept
    /// current across restarts).
    pub fn known_hosts(&self, endpoints: &Endpoints) -> anyhow::Result<PathBuf> {
        let port = endpoints.ssh_port()?;
        let known_hosts = self.dir.path().join("known_hosts");
        let line = format!("[127.0.0.1]:{port} {}\n", endpoints.ssh_host_key);
        // Other clients' ssh may be reading it: replace it whole, and only
        // when it changes (never truncate it under a reader).
        if std::fs::read_to_string(&known_hosts).ok().as_deref() != Some(line.as_str()) {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = self.dir.path().join(format!("known_hosts.{n}.tmp"));
            std::fs::write(&tmp, &line)?;
            std::fs::rename(&tmp, &known_hosts)?;
        }
        Ok(known_hosts)
    }
}

/// A `FarmService` client that signs each call as `farm` does (the method,
/// the first request message and the coordinator's identity, learnt once),
/// for the calls the tests make directly.
pub struct SignedClient {
    key: ClientKey,
    identity: String,
    inner: farm_proto::v1::farm_service_client::FarmServiceClient<tonic::transport::Channel>,
}

impl SignedClient {
    /// Connects to `url` and learns the coordinator's identity.
    pub async fn connect(url: &str, key: ClientKey) -> anyhow::Result<SignedClient> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect()
            .await?;
        let mut inner = farm_proto::v1::farm_service_client::FarmServiceClient::new(channel);
        let identity = farm_common::sign::learn_identity(&mut inner).await?;
        Ok(SignedClient {
            key,
            identity,
            inner,
        })
    }

    fn signed<T: prost::Message>(
        &self,
        msg: T,
        method: &str,
    ) -> Result<tonic::Request<T>, tonic::Status> {
        let mut req = tonic::Request::new(msg);
        self.key
            .sign(&mut req, method, &self.identity)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(req)
    }

    pub async fn status(
        &mut self,
        msg: farm_proto::v1::StatusRequest,
    ) -> Result<tonic::Response<farm_proto::v1::StatusResponse>, tonic::Status> {
        let req = self.signed(msg, farm_proto::auth::methods::STATUS)?;
        self.inner.status(req).await
    }

    pub async fn logs(
        &mut self,
        msg: farm_proto::v1::LogsRequest,
    ) -> Result<tonic::Response<tonic::Streaming<farm_proto::v1::LogChunk>>, tonic::Status> {
        let req = self.signed(msg, farm_proto::auth::methods::LOGS)?;
        self.inner.logs(req).await
    }

    pub async fn submit(
        &mut self,
        msg: farm_proto::v1::SubmitRequest,
    ) -> Result<tonic::Response<tonic::Streaming<farm_proto::v1::BuildEvent>>, tonic::Status> {
        let req = self.signed(msg, farm_proto::auth::methods::SUBMIT)?;
        self.inner.submit(req).await
    }

    pub async fn watch(
        &mut self,
        msg: farm_proto::v1::WatchRequest,
    ) -> Result<tonic::Response<tonic::Streaming<farm_proto::v1::BuildEvent>>, tonic::Status> {
        let req = self.signed(msg, farm_proto::auth::methods::WATCH)?;
        self.inner.watch(req).await
    }

    /// `UploadNar` of `messages`: the first (the `info` header) is signed.
    pub async fn upload_nar(
        &mut self,
        messages: impl futures::Stream<Item = farm_proto::v1::UploadNarRequest> + Send + 'static,
    ) -> Result<tonic::Response<farm_proto::v1::UploadNarResponse>, tonic::Status> {
        use futures::StreamExt;
        let mut messages = Box::pin(messages);
        let Some(first) = messages.next().await else {
            return Err(tonic::Status::invalid_argument("no message to upload"));
        };
        let header = self.signed(first.clone(), farm_proto::auth::methods::UPLOAD_NAR)?;
        let (metadata, extensions, _) = header.into_parts();
        let stream = futures::stream::once(async move { first }).chain(messages);
        let req = tonic::Request::from_parts(metadata, extensions, stream);
        self.inner.upload_nar(req).await
    }
}
