//! Who may talk to the coordinator.
//!
//! - Builders ([`BuilderAuth`]): the key in `Hello` must be enrolled
//!   (`--builder-keys`, re-read on every connection, plus keys enrolled in-process),
//!   and the builder must sign a fresh challenge (see `farm_proto::auth`).
//! - CLI users ([`CliAuth`]): each `FarmService` call carries an OpenSSH public
//!   key, a unix time and a signature over the time and the method path, in
//!   metadata. Reading and submitting need a key from `--authorized-keys` or
//!   `--admin-keys`; drain and cancel need one from `--admin-keys`. When neither
//!   file is configured and the gRPC listener is on loopback, every caller gets
//!   both levels; once either file is configured, or beyond loopback, a level
//!   without a file is closed to everybody.

use std::path::PathBuf;

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use farm_proto::auth::{
    CLI_KEY_METADATA, CLI_SIG_METADATA, CLI_TIME_METADATA, builder_auth_message, cli_auth_message,
};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::CoordinatorError;
use crate::keys::{AuthorizedKey, cached_authorized_keys, fingerprint_ed25519, parse_ed25519_line};

/// How far a CLI call's timestamp may be from our clock.
pub const CLI_TIME_SKEW_SECS: i64 = 300;

/// Verify an ed25519 signature made by `key` over `message`.
pub fn verify_ed25519(key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let Ok(vk) = VerifyingKey::from_bytes(key) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    vk.verify(message, &sig).is_ok()
}

/// The builder enrolment list.
#[derive(Debug, Clone, Default)]
pub struct BuilderAuth {
    /// `--builder-keys`, re-read on every check so enrolment needs no restart.
    pub file: Option<PathBuf>,
    /// Keys enrolled without a file (OpenSSH public key lines).
    pub extra: Vec<String>,
}

impl BuilderAuth {
    /// The enrolled entry for `key`, if any. A broken file is an error (logged by
    /// the caller) rather than an empty list, so a typo never silently locks out.
    /// Blocking (reads the key file when it changed): call it off the runtime.
    pub fn enrolled(&self, key: &[u8; 32]) -> Result<Option<AuthorizedKey>, CoordinatorError> {
        for line in &self.extra {
            if let Ok(k) = parse_ed25519_line(line)
                && &k == key
            {
                return Ok(Some(AuthorizedKey {
                    key: k,
                    comment: "in-process".into(),
                }));
            }
        }
        match &self.file {
            None => Ok(None),
            Some(path) => Ok(cached_authorized_keys(path)?
                .iter()
                .find(|k| &k.key == key)
                .cloned()),
        }
    }

    /// Whether `signature` proves the builder holds `key` for this challenge.
    pub fn verify_challenge(key: &[u8; 32], nonce: &[u8], name: &str, signature: &[u8]) -> bool {
        verify_ed25519(key, &builder_auth_message(nonce, name), signature)
    }
}

/// What a CLI call may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Status, logs, submit, watch, cache reads and uploads, machines.
    Read,
    /// Also drain and cancel.
    Admin,
}

/// Who made a CLI call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No key file for the level on a loopback listener: anyone local.
    Local,
    /// A key from the key files (its fingerprint and comment).
    Key {
        fingerprint: String,
        comment: String,
    },
}

/// The CLI key policy.
#[derive(Debug, Clone, Default)]
pub struct CliAuth {
    pub authorized_keys: Option<PathBuf>,
    pub admin_keys: Option<PathBuf>,
    /// Whether the gRPC listener is loopback-only.
    pub loopback: bool,
}

impl CliAuth {
    /// Whether every caller on this listener is trusted: loopback, and neither
    /// key file configured (configuring either locks both levels).
    fn open(&self) -> bool {
        self.loopback && self.authorized_keys.is_none() && self.admin_keys.is_none()
    }

    /// Authorise a call to `method` (its gRPC path) at `level`, now being `now_unix`.
    /// The signature is checked before any key file is looked at; the files are
    /// read (when they changed) off the async runtime.
    pub async fn check(
        &self,
        metadata: &MetadataMap,
        method: &str,
        level: Level,
        now_unix: i64,
    ) -> Result<Caller, Status> {
        let open = self.open();
        let has_key = metadata.get(CLI_KEY_METADATA).is_some();
        if open && !has_key {
            return Ok(Caller::Local);
        }
        let files: Vec<PathBuf> = match level {
            Level::Read => self
                .authorized_keys
                .iter()
                .chain(self.admin_keys.iter())
                .cloned()
                .collect(),
            Level::Admin => self.admin_keys.iter().cloned().collect(),
        };
        if !open && files.is_empty() {
            return Err(Status::permission_denied(match level {
                Level::Read => "no --authorized-keys configured on this coordinator",
                Level::Admin => "no --admin-keys configured on this coordinator",
            }));
        }
        // A signed call on an open loopback listener is still verified, so a bad
        // signature is never silently accepted.
        let key = self.verify(metadata, method, now_unix)?;
        if open {
            return Ok(Caller::Local);
        }
        let found = tokio::task::spawn_blocking(move || {
            for f in &files {
                if let Some(k) = cached_authorized_keys(f)?.iter().find(|k| k.key == key) {
                    return Ok(Some(k.clone()));
                }
            }
            Ok::<_, CoordinatorError>(None)
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "reading CLI key files");
            Status::internal("the coordinator's key files are unreadable")
        })?;
        match found {
            Ok(Some(entry)) => Ok(Caller::Key {
                fingerprint: fingerprint_ed25519(&key),
                comment: entry.comment,
            }),
            Ok(None) => {
                tracing::warn!(method, key = %fingerprint_ed25519(&key), "CLI call with a key not allowed for it");
                Err(Status::permission_denied(format!(
                    "key {} is not allowed to call {method}",
                    fingerprint_ed25519(&key)
                )))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read CLI key file");
                Err(Status::internal(
                    "the coordinator's key files are unreadable",
                ))
            }
        }
    }

    /// Check the signature; returns the key that made it.
    fn verify(
        &self,
        metadata: &MetadataMap,
        method: &str,
        now_unix: i64,
    ) -> Result<[u8; 32], Status> {
        let get = |k: &str| -> Result<&str, Status> {
            metadata
                .get(k)
                .ok_or_else(|| Status::unauthenticated(format!("missing metadata {k}")))?
                .to_str()
                .map_err(|_| Status::unauthenticated(format!("metadata {k} is not ASCII")))
        };
        let key = parse_ed25519_line(get(CLI_KEY_METADATA)?)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let time: i64 = get(CLI_TIME_METADATA)?
            .parse()
            .map_err(|_| Status::unauthenticated("x-farm-time is not a number"))?;
        if time.abs_diff(now_unix) > CLI_TIME_SKEW_SECS.unsigned_abs() {
            return Err(Status::unauthenticated(
                "x-farm-time is too far from the coordinator's clock",
            ));
        }
        let sig_b64 = get(CLI_SIG_METADATA)?;
        if sig_b64.len() > 256 {
            return Err(Status::unauthenticated("x-farm-sig too long"));
        }
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig_b64)
            .map_err(|_| Status::unauthenticated("x-farm-sig is not base64"))?;
        if !verify_ed25519(&key, &cli_auth_message(time, method), &sig) {
            tracing::warn!(method, key = %fingerprint_ed25519(&key), "CLI call with a bad signature");
            return Err(Status::unauthenticated("bad signature"));
        }
        Ok(key)
    }
}

/// Add CLI auth metadata to a request: what the `farm` CLI does (used by tests).
pub fn sign_cli_request<T>(
    req: &mut tonic::Request<T>,
    key: &ed25519_dalek::SigningKey,
    public_line: &str,
    method: &str,
    now_unix: i64,
) {
    use ed25519_dalek::Signer;
    let sig = key.sign(&cli_auth_message(now_unix, method));
    let md = req.metadata_mut();
    if let Ok(v) = public_line.parse() {
        md.insert(CLI_KEY_METADATA, v);
    }
    if let Ok(v) = now_unix.to_string().parse() {
        md.insert(CLI_TIME_METADATA, v);
    }
    if let Ok(v) = base64::engine::general_purpose::STANDARD
        .encode(sig.to_bytes())
        .parse()
    {
        md.insert(CLI_SIG_METADATA, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_proto::auth::methods;

    fn keypair(seed: u8) -> (ed25519_dalek::SigningKey, String) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let pk = ssh_key::PublicKey::from(ssh_key::public::KeyData::Ed25519(
            ssh_key::public::Ed25519PublicKey(sk.verifying_key().to_bytes()),
        ));
        let mut pk = pk;
        pk.set_comment(format!("user{seed}"));
        (sk, pk.to_openssh().unwrap())
    }

    fn signed(seed: u8, method: &str, time: i64) -> MetadataMap {
        let (sk, line) = keypair(seed);
        let mut req = tonic::Request::new(());
        sign_cli_request(&mut req, &sk, &line, method, time);
        req.metadata().clone()
    }

    #[tokio::test]
    async fn cli_levels() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        let admins = dir.path().join("admins");
        std::fs::write(&users, format!("{}\n", keypair(1).1)).unwrap();
        std::fs::write(&admins, format!("{}\n", keypair(2).1)).unwrap();
        let auth = CliAuth {
            authorized_keys: Some(users),
            admin_keys: Some(admins),
            loopback: true,
        };
        let now = 1_700_000_000;
        // user: read yes, admin no
        assert!(matches!(
            auth.check(
                &signed(1, methods::STATUS, now),
                methods::STATUS,
                Level::Read,
                now
            )
            .await,
            Ok(Caller::Key { .. })
        ));
        let e = auth
            .check(
                &signed(1, methods::CANCEL, now),
                methods::CANCEL,
                Level::Admin,
                now,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // admin: both
        assert!(
            auth.check(
                &signed(2, methods::STATUS, now),
                methods::STATUS,
                Level::Read,
                now
            )
            .await
            .is_ok()
        );
        assert!(
            auth.check(
                &signed(2, methods::CANCEL, now),
                methods::CANCEL,
                Level::Admin,
                now
            )
            .await
            .is_ok()
        );
        // unknown key
        assert_eq!(
            auth.check(
                &signed(3, methods::STATUS, now),
                methods::STATUS,
                Level::Read,
                now
            )
            .await
            .unwrap_err()
            .code(),
            tonic::Code::PermissionDenied
        );
        // signature for another method, stale time, no metadata
        assert_eq!(
            auth.check(
                &signed(1, methods::SUBMIT, now),
                methods::STATUS,
                Level::Read,
                now
            )
            .await
            .unwrap_err()
            .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(
                &signed(1, methods::STATUS, now - 1000),
                methods::STATUS,
                Level::Read,
                now
            )
            .await
            .unwrap_err()
            .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(&MetadataMap::new(), methods::STATUS, Level::Read, now)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[tokio::test]
    async fn open_loopback_and_closed_beyond() {
        let now = 1_700_000_000;
        let open = CliAuth {
            loopback: true,
            ..Default::default()
        };
        assert_eq!(
            open.check(&MetadataMap::new(), methods::CANCEL, Level::Admin, now)
                .await
                .unwrap(),
            Caller::Local
        );
        // a bad signature is refused even there
        assert!(
            open.check(
                &signed(1, methods::SUBMIT, now),
                methods::CANCEL,
                Level::Admin,
                now
            )
            .await
            .is_err()
        );
        let closed = CliAuth::default();
        assert_eq!(
            closed
                .check(&MetadataMap::new(), methods::STATUS, Level::Read, now)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
    }

    #[tokio::test]
    async fn one_key_file_locks_both_levels_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        std::fs::write(&users, format!("{}\n", keypair(1).1)).unwrap();
        let auth = CliAuth {
            authorized_keys: Some(users),
            admin_keys: None,
            loopback: true,
        };
        let now = 1_700_000_000;
        for m in [methods::CANCEL, methods::SET_DRAIN] {
            let e = auth
                .check(&MetadataMap::new(), m, Level::Admin, now)
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{m}: {e:?}");
            // nor with a valid signature by an authorized (non-admin) key
            let e = auth
                .check(&signed(1, m, now), m, Level::Admin, now)
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{m}: {e:?}");
        }
        // reading still needs a key
        let e = auth
            .check(&MetadataMap::new(), methods::STATUS, Level::Read, now)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn signature_is_checked_before_key_files() {
        let dir = tempfile::tempdir().unwrap();
        // A key file that cannot be read: a bad or missing signature must still
        // be refused as such, without touching it.
        let auth = CliAuth {
            authorized_keys: Some(dir.path().join("missing")),
            admin_keys: None,
            loopback: false,
        };
        let now = 1_700_000_000;
        let e = auth
            .check(&MetadataMap::new(), methods::STATUS, Level::Read, now)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = auth
            .check(
                &signed(1, methods::SUBMIT, now),
                methods::STATUS,
                Level::Read,
                now,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // A good signature reaches the file, which is unreadable.
        let e = auth
            .check(
                &signed(1, methods::STATUS, now),
                methods::STATUS,
                Level::Read,
                now,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
    }

    #[tokio::test]
    async fn extreme_times_are_refused_without_overflow() {
        let open = CliAuth {
            loopback: true,
            ..Default::default()
        };
        for (time, now) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (i64::MIN, 0)] {
            let e = open
                .check(
                    &signed(1, methods::STATUS, time),
                    methods::STATUS,
                    Level::Read,
                    now,
                )
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn builder_enrolment_and_challenge() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("builders");
        let (sk1, line1) = keypair(1);
        let (_, line2) = keypair(2);
        std::fs::write(&file, format!("{line1}\n")).unwrap();
        let auth = BuilderAuth {
            file: Some(file.clone()),
            extra: vec![],
        };
        let k1 = parse_ed25519_line(&line1).unwrap();
        let k2 = parse_ed25519_line(&line2).unwrap();
        assert!(auth.enrolled(&k1).unwrap().is_some());
        assert!(auth.enrolled(&k2).unwrap().is_none());
        // enrolment is re-read
        std::fs::write(&file, format!("{line1}\n{line2}\n")).unwrap();
        assert!(auth.enrolled(&k2).unwrap().is_some());

        use ed25519_dalek::Signer;
        let nonce = [7u8; 32];
        let sig = sk1.sign(&builder_auth_message(&nonce, "b1")).to_bytes();
        assert!(BuilderAuth::verify_challenge(&k1, &nonce, "b1", &sig));
        assert!(!BuilderAuth::verify_challenge(&k1, &nonce, "b2", &sig));
        assert!(!BuilderAuth::verify_challenge(&k2, &nonce, "b1", &sig));
        assert!(!BuilderAuth::verify_challenge(&k1, &[8u8; 32], "b1", &sig));
        assert!(!BuilderAuth::verify_challenge(
            &k1,
            &nonce,
            "b1",
            &sig[..10]
        ));
    }
}
