//! The connection to the coordinator's `FarmService`, every call signed with
//! the user's SSH key.
//!
//! The signature (metadata `x-farm-key`, `x-farm-time`, `x-farm-nonce`,
//! `x-farm-body-sha256`, `x-farm-sig`; the contract in `proto/farm.proto` and
//! `farm_proto::auth`) is made by `farm_common::sign`, for the coordinator
//! identity learnt once per connection with `farm_common::sign::learn_identity`
//! (the coordinator proves it holds the cache key it names); the channel (TLS
//! rule, keep-alives) by `farm_common::channel`: the same code the coordinator
//! checks with and the builder dials with. The URL is checked against that
//! rule before anything else, so no request (signed or not) is ever sent in
//! plaintext beyond loopback unless `--insecure-plaintext` says so.

use std::path::{Path, PathBuf};

use farm_common::channel::{ClientTls, MAX_MESSAGE_SIZE};
use farm_common::sign::CliSigner;
use farm_proto::auth::methods;
use farm_proto::v1::farm_service_client::FarmServiceClient;
use farm_proto::v1::*;
use tonic::transport::{Channel, Endpoint};

use crate::config::Settings;
use crate::error::{CallContext, CliError};

pub use farm_common::sign::now_unix;

/// Largest private key file read.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// The user's key, ready to sign calls.
#[derive(Clone)]
pub struct UserKey {
    path: PathBuf,
    signer: CliSigner,
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserKey")
            .field("path", &self.path)
            .field("public_line", &self.signer.public_line())
            .finish_non_exhaustive()
    }
}

impl UserKey {
    /// Load an unencrypted OpenSSH ed25519 private key.
    pub fn load(path: &Path) -> Result<UserKey, CliError> {
        let meta =
            std::fs::metadata(path).map_err(|e| CliError::io_path("reading key", path, e))?;
        if meta.len() > MAX_KEY_FILE {
            return Err(CliError::Config(format!(
                "{}: too large for an SSH private key",
                path.display()
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| CliError::io_path("reading key", path, e))?;
        let bad = |why: String| {
            CliError::Config(format!(
                "{}: {why}; --key (or FARM_KEY) must name an unencrypted OpenSSH ed25519 private key (ssh-keygen -t ed25519, or `farm keys ssh`)",
                path.display()
            ))
        };
        let key = ssh_key::PrivateKey::from_openssh(&text).map_err(|e| bad(e.to_string()))?;
        if key.is_encrypted() {
            return Err(bad("the key is encrypted with a passphrase".into()));
        }
        let Some(pair) = key.key_data().ed25519() else {
            return Err(bad(format!("a {} key, not ed25519", key.algorithm())));
        };
        let signing = ed25519_dalek::SigningKey::from_bytes(&pair.private.to_bytes());
        let public_line = key
            .public_key()
            .to_openssh()
            .map_err(|e| bad(e.to_string()))?;
        Ok(UserKey {
            path: path.to_path_buf(),
            signer: CliSigner::new(signing, public_line),
        })
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sign a call to `method` for the coordinator `identity`, now.
    pub fn sign<T: prost::Message>(
        &self,
        req: &mut tonic::Request<T>,
        method: &str,
        identity: &str,
    ) {
        self.signer.sign(req, method, identity);
    }

    /// Sign a client-streaming call whose first message is `first`.
    pub fn sign_stream<T>(
        &self,
        req: &mut tonic::Request<T>,
        method: &str,
        identity: &str,
        first: &impl prost::Message,
    ) {
        self.signer.sign_parts(
            req,
            method,
            identity,
            &first.encode_to_vec(),
            now_unix(),
            rand::random(),
        );
    }
}

/// A connected client.
#[derive(Clone)]
pub struct Farm {
    client: FarmServiceClient<Channel>,
    /// The key and the coordinator identity calls are signed for.
    key: Option<(UserKey, String)>,
    addr: String,
    config_path: String,
}

/// The tonic endpoint for a coordinator URL (the farm's one client rule:
/// https with a pinned certificate, or plaintext to loopback unless forced).
pub fn endpoint(url: &str, tls: ClientTls<'_>) -> Result<Endpoint, CliError> {
    farm_common::channel::endpoint(url, tls).map_err(|e| CliError::Config(e.to_string()))
}

impl Farm {
    /// Load the key and connect.
    /// Check the URL (plaintext only to loopback unless forced: refused
    /// here, before any connection is tried), load the key, connect, and
    /// learn the coordinator's identity when calls are to be signed.
    pub async fn connect(settings: &Settings) -> Result<Farm, CliError> {
        let tls = ClientTls {
            ca_cert: settings.ca_cert.as_deref(),
            insecure_plaintext: settings.insecure_plaintext,
        };
        farm_common::channel::check_url(&settings.coordinator, tls).map_err(|e| {
            CliError::Config(format!("{e}\n  (nothing was sent: farm signs its calls with your key, and refuses to send them where anyone on the path could read them)"))
        })?;
        let key = match &settings.key {
            Some(p) => Some(UserKey::load(p)?),
            None => None,
        };
        let ep = endpoint(&settings.coordinator, tls)?;
        let channel = ep.connect().await.map_err(|e| CliError::Unreachable {
            addr: settings.coordinator.clone(),
            message: error_chain(&e),
            config: settings.config_display(),
        })?;
        let mut client = FarmServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let ctx = CallContext {
            addr: settings.coordinator.clone(),
            key: settings.key.clone(),
            admin: false,
            config_path: settings.config_display(),
        };
        let key = match key {
            Some(k) => {
                let identity = farm_common::sign::learn_identity(&mut client)
                    .await
                    .map_err(|s| ctx.status("learning the coordinator's identity", s))?;
                Some((k, identity))
            }
            None => None,
        };
        Ok(Farm {
            client,
            key,
            addr: settings.coordinator.clone(),
            config_path: settings.config_display(),
        })
    }

    /// The coordinator URL.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn ctx(&self, admin: bool) -> CallContext {
        CallContext {
            addr: self.addr.clone(),
            key: self.key.as_ref().map(|(k, _)| k.path().to_path_buf()),
            admin,
            config_path: self.config_path.clone(),
        }
    }

    fn request<T: prost::Message>(&self, msg: T, method: &str) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some((k, identity)) = &self.key {
            k.sign(&mut req, method, identity);
        }
        req
    }

    /// Map a failed call's status to an error that says what to do.
    pub fn status_error(&self, what: &str, admin: bool, status: tonic::Status) -> CliError {
        self.ctx(admin).status(what, status)
    }

    pub async fn status(&self) -> Result<StatusResponse, CliError> {
        let req = self.request(StatusRequest {}, methods::STATUS);
        self.client
            .clone()
            .status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error("status", false, s))
    }

    pub async fn submit(
        &self,
        msg: SubmitRequest,
    ) -> Result<tonic::Streaming<BuildEvent>, CliError> {
        let req = self.request(msg, methods::SUBMIT);
        self.client
            .clone()
            .submit(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error("submit", false, s))
    }

    /// Follow an existing submission (a snapshot of it, then its live
    /// events); the raw status on failure, so a caller can tell a lost
    /// connection from a refusal.
    pub async fn watch(
        &self,
        submission_id: &str,
    ) -> Result<tonic::Streaming<BuildEvent>, tonic::Status> {
        let req = self.request(
            WatchRequest {
                submission_id: submission_id.to_owned(),
            },
            methods::WATCH,
        );
        self.client.clone().watch(req).await.map(|r| r.into_inner())
    }

    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
    ) -> Result<tonic::Streaming<LogChunk>, CliError> {
        let req = self.request(
            LogsRequest {
                build_id: id.to_owned(),
                follow,
            },
            methods::LOGS,
        );
        self.client
            .clone()
            .logs(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error("logs", false, s))
    }

    pub async fn cancel(&self, id: &str) -> Result<CancelResponse, CliError> {
        let req = self.request(CancelRequest { id: id.to_owned() }, methods::CANCEL);
        self.client
            .clone()
            .cancel(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error("cancel", true, s))
    }

    pub async fn set_drain(&self, builder: &str, draining: bool) -> Result<(), CliError> {
        let req = self.request(
            SetDrainRequest {
                builder: builder.to_owned(),
                draining,
            },
            methods::SET_DRAIN,
        );
        self.client
            .clone()
            .set_drain(req)
            .await
            .map(|_| ())
            .map_err(|s| self.status_error(if draining { "drain" } else { "undrain" }, true, s))
    }

    pub async fn query_valid_paths(&self, paths: Vec<String>) -> Result<Vec<String>, CliError> {
        let req = self.request(
            QueryValidPathsRequest { store_paths: paths },
            methods::QUERY_VALID_PATHS,
        );
        self.client
            .clone()
            .query_valid_paths(req)
            .await
            .map(|r| r.into_inner().valid)
            .map_err(|s| self.status_error("querying the cache", false, s))
    }

    /// Upload a NAR: `info` (the header message, signed: it names the NAR's
    /// hash and size, which the cache checks `data` against), then `data`.
    pub async fn upload_nar(
        &self,
        info: UploadNarRequest,
        data: impl futures::Stream<Item = UploadNarRequest> + Send + 'static,
    ) -> Result<UploadNarResponse, tonic::Status> {
        use futures::StreamExt;
        let mut req = tonic::Request::new(());
        if let Some((k, identity)) = &self.key {
            k.sign_stream(&mut req, methods::UPLOAD_NAR, identity, &info);
        }
        let (metadata, extensions, ()) = req.into_parts();
        let stream = futures::stream::once(std::future::ready(info)).chain(data);
        let req = tonic::Request::from_parts(metadata, extensions, stream);
        self.client
            .clone()
            .upload_nar(req)
            .await
            .map(|r| r.into_inner())
    }

    pub async fn jobs(&self, name: &str) -> Result<farm_proto::v1::JobsResponse, CliError> {
        let req = self.request(
            farm_proto::v1::JobsRequest {
                name: name.to_owned(),
            },
            methods::JOBS,
        );
        self.client
            .clone()
            .jobs(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error("jobs", false, s))
    }

    /// A single-use admin login link for the web dashboard.
    pub async fn dashboard_login(
        &self,
        expires_in_secs: u32,
    ) -> Result<farm_proto::v1::DashboardLoginResponse, CliError> {
        let req = self.request(
            farm_proto::v1::DashboardLoginRequest { expires_in_secs },
            methods::DASHBOARD_LOGIN,
        );
        self.client
            .clone()
            .dashboard_login(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error("dashboard login", true, s))
    }

    pub async fn machines(&self, protocol: &str) -> Result<MachinesResponse, CliError> {
        let req = self.request(
            MachinesRequest {
                protocol: protocol.to_owned(),
            },
            methods::MACHINES,
        );
        self.client
            .clone()
            .machines(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error("machines", false, s))
    }
}

/// An error and its sources on one line (tonic's transport errors hide the cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_common::sign::verify_request;
    use farm_proto::auth::CLI_KEY_METADATA;

    #[test]
    fn loads_openssh_key_and_signs_per_method_body_and_coordinator() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        crate::keys::write_ssh_key(&path, "me@test").unwrap();
        let key = UserKey::load(&path).unwrap();
        let public_line = key.signer.public_line();
        assert!(public_line.starts_with("ssh-ed25519 "));
        assert!(public_line.ends_with(" me@test"));
        let id = "farm-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let msg = CancelRequest { id: "s1".into() };
        let mut req = tonic::Request::new(msg.clone());
        key.sign(&mut req, methods::CANCEL, id);
        let md = req.metadata();
        assert_eq!(
            md.get(CLI_KEY_METADATA).unwrap().to_str().unwrap(),
            public_line
        );
        let now = now_unix();
        let call = verify_request(md, methods::CANCEL, id, now).unwrap();
        call.check_body(&prost::Message::encode_to_vec(&msg))
            .unwrap();
        assert!(verify_request(md, methods::STATUS, id, now).is_err());
        assert!(verify_request(md, methods::CANCEL, "farm-2:AAAA", now).is_err());
        // A stream is signed over its header message.
        let info = UploadNarRequest {
            msg: Some(upload_nar_request::Msg::Info(PathInfo {
                store_path: "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x".into(),
                nar_size: 1,
                ..Default::default()
            })),
        };
        let mut req = tonic::Request::new(());
        key.sign_stream(&mut req, methods::UPLOAD_NAR, id, &info);
        let call = verify_request(req.metadata(), methods::UPLOAD_NAR, id, now).unwrap();
        call.check_body(&prost::Message::encode_to_vec(&info))
            .unwrap();
    }

    #[tokio::test]
    async fn plaintext_beyond_loopback_is_refused_before_connecting() {
        // TEST-NET-1: never routed; a connection attempt would hang until the
        // 10 s connect timeout, a refusal comes back at once.
        let args = crate::args::GlobalArgs {
            coordinator: Some("http://192.0.2.1:1".into()),
            ..Default::default()
        };
        let settings = crate::config::resolve_with(
            &args,
            Default::default(),
            None,
            &crate::config::Env::default(),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let e = match Farm::connect(&settings).await {
            Err(e) => e,
            Ok(_) => panic!("connected"),
        };
        assert!(matches!(e, CliError::Config(_)), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("--insecure-plaintext") && text.contains("https://"),
            "{text}"
        );
        assert!(text.contains("nothing was sent"), "{text}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn refuses_what_is_not_an_ed25519_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "not a key").unwrap();
        let e = UserKey::load(&path).unwrap_err();
        assert!(e.to_string().contains("ed25519"), "{e}");
        assert!(UserKey::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn https_needs_a_ca_cert_and_plaintext_loopback() {
        let none = ClientTls::default();
        assert!(endpoint("https://farm:7070", none).is_err());
        assert!(endpoint("http://127.0.0.1:7070", none).is_ok());
        // Stricter than before: plaintext beyond loopback needs the flag.
        let e = endpoint("http://10.1.2.3:7070", none).unwrap_err();
        assert!(e.to_string().contains("--insecure-plaintext"), "{e}");
        let forced = ClientTls {
            insecure_plaintext: true,
            ..none
        };
        assert!(endpoint("http://10.1.2.3:7070", forced).is_ok());
    }
}
