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

use farm_common::keys::find_in_files;
use farm_proto::auth::builder_auth_message;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::CoordinatorError;
use crate::keys::{AuthorizedKey, cached_authorized_keys, fingerprint_ed25519, parse_ed25519_line};

/// How far a CLI call's timestamp may be from our clock, and the signature
/// check itself: the farm's one definition, shared with the CLI's signer.
pub(crate) use farm_common::sign::verify_ed25519;

/// The builder enrolment list.
#[derive(Debug, Clone, Default)]
pub(crate) struct BuilderAuth {
    /// `--builder-keys`, re-read on every check so enrolment needs no restart.
    pub file: Option<PathBuf>,
    /// Keys enrolled without a file (OpenSSH public key lines).
    pub extra: Vec<String>,
}

impl BuilderAuth {
    /// The enrolled entry for `key`, if any. A broken file is an error (logged by
    /// the caller) rather than an empty list, so a typo never silently locks out.
    /// Blocking (reads the key file when it changed): call it off the runtime.
    pub(crate) fn enrolled(
        &self,
        key: &[u8; 32],
    ) -> Result<Option<AuthorizedKey>, CoordinatorError> {
        for line in &self.extra {
            if let Ok(k) = parse_ed25519_line(line)
                && &k == key
            {
                return Ok(Some(AuthorizedKey::new(
                    ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(k)),
                    "in-process",
                )));
            }
        }
        match &self.file {
            None => Ok(None),
            Some(path) => Ok(cached_authorized_keys(path)?
                .iter()
                .find(|k| k.ed25519().as_ref() == Some(key))
                .cloned()),
        }
    }

    /// Whether `signature` proves the builder holds `key` for this challenge.
    pub(crate) fn verify_challenge(
        key: &[u8; 32],
        nonce: &[u8],
        name: &str,
        signature: &[u8],
    ) -> bool {
        verify_ed25519(key, &builder_auth_message(nonce, name), signature)
    }
}

/// What a CLI call may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// Status, logs, submit, watch, cache reads and uploads, machines.
    Read,
    /// Also drain and cancel.
    Admin,
}

/// Who made a CLI call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
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
pub(crate) struct CliAuth {
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
    pub(crate) async fn check(
        &self,
        metadata: &MetadataMap,
        method: &str,
        level: Level,
        now_unix: i64,
    ) -> Result<Caller, Status> {
        let open = self.open();
        let has_key = farm_common::sign::is_signed(metadata);
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
        // Only ed25519 entries can match: other key types in the files serve
        // the SSH endpoint.
        let found = tokio::task::spawn_blocking(move || {
            find_in_files(&files, |k| k.ed25519() == Some(key)).map_err(CoordinatorError::from)
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "reading CLI key files");
            Status::internal("the coordinator's key files are unreadable")
        })?;
        match found {
            Ok(Some(entry)) => Ok(Caller::Key {
                fingerprint: fingerprint_ed25519(&key),
                comment: entry.comment().to_owned(),
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
        farm_common::sign::verify_request(metadata, method, now_unix).map_err(|e| {
            tracing::warn!(method, error = %e, "CLI call refused: bad or missing signature");
            Status::unauthenticated(e.to_string())
        })
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
        farm_common::sign::CliSigner::new(sk, line).sign(&mut req, method, time);
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
