//! The connection to the coordinator's `FarmService`, every call signed with
//! the user's SSH key.
//!
//! The signature (metadata `x-farm-key`, `x-farm-time`, `x-farm-sig`; the
//! contract in `proto/farm.proto` and `farm_proto::auth`) is made by
//! `farm_common::sign`, the channel (TLS rule, keep-alives) by
//! `farm_common::channel`: the same code the coordinator checks with and the
//! builder dials with.

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

    /// Add the signature metadata for a call to `method` at `unix_time`.
    pub fn sign<T>(&self, req: &mut tonic::Request<T>, method: &str, unix_time: i64) {
        self.signer.sign(req, method, unix_time);
    }
}

/// A connected client.
#[derive(Clone)]
pub struct Farm {
    client: FarmServiceClient<Channel>,
    key: Option<UserKey>,
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
    pub async fn connect(settings: &Settings) -> Result<Farm, CliError> {
        let key = match &settings.key {
            Some(p) => Some(UserKey::load(p)?),
            None => None,
        };
        let ep = endpoint(
            &settings.coordinator,
            ClientTls {
                ca_cert: settings.ca_cert.as_deref(),
                insecure_plaintext: settings.insecure_plaintext,
            },
        )?;
        let channel = ep.connect().await.map_err(|e| CliError::Unreachable {
            addr: settings.coordinator.clone(),
            message: error_chain(&e),
            config: settings.config_display(),
        })?;
        Ok(Farm {
            client: FarmServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
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
            key: self.key.as_ref().map(|k| k.path().to_path_buf()),
            admin,
            config_path: self.config_path.clone(),
        }
    }

    fn request<T>(&self, msg: T, method: &str) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(k) = &self.key {
            k.sign(&mut req, method, now_unix());
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

    pub async fn upload_nar(
        &self,
        stream: impl tonic::IntoStreamingRequest<Message = UploadNarRequest>,
    ) -> Result<UploadNarResponse, tonic::Status> {
        let mut req = stream.into_streaming_request();
        if let Some(k) = &self.key {
            k.sign(&mut req, methods::UPLOAD_NAR, now_unix());
        }
        self.client
            .clone()
            .upload_nar(req)
            .await
            .map(|r| r.into_inner())
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
    use base64::Engine;
    use ed25519_dalek::Verifier;
    use farm_proto::auth::{
        CLI_KEY_METADATA, CLI_SIG_METADATA, CLI_TIME_METADATA, cli_auth_message,
    };

    #[test]
    fn loads_openssh_key_and_signs_per_method() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        crate::keys::write_ssh_key(&path, "me@test").unwrap();
        let key = UserKey::load(&path).unwrap();
        let public_line = key.signer.public_line();
        assert!(public_line.starts_with("ssh-ed25519 "));
        assert!(public_line.ends_with(" me@test"));
        let mut req = tonic::Request::new(());
        key.sign(&mut req, methods::STATUS, 1_700_000_000);
        let md = req.metadata();
        assert_eq!(md.get(CLI_TIME_METADATA).unwrap(), "1700000000");
        assert_eq!(
            md.get(CLI_KEY_METADATA).unwrap().to_str().unwrap(),
            public_line
        );
        let sig = base64::engine::general_purpose::STANDARD
            .decode(md.get(CLI_SIG_METADATA).unwrap().to_str().unwrap())
            .unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
        let vk = key.signer.verifying_key();
        assert!(
            vk.verify(&cli_auth_message(1_700_000_000, methods::STATUS), &sig)
                .is_ok()
        );
        assert!(
            vk.verify(&cli_auth_message(1_700_000_000, methods::CANCEL), &sig)
                .is_err()
        );
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
