//! Who may talk to the coordinator.
//!
//! - Builders ([`BuilderAuth`]): the key in `Hello` must be enrolled
//!   (`--builder-keys`, re-read on every connection, plus keys enrolled in-process),
//!   and the builder must sign a fresh challenge (see `farm_proto::auth`).
//! - CLI users ([`CliAuth`]): each `FarmService` call carries an OpenSSH public
//!   key, a unix time, a nonce, the sha256 of its first request message and a
//!   signature over those, the method path and this coordinator's identity, in
//!   metadata (`farm_proto::auth`, scheme v2). [`CliAuth::authenticate`] checks
//!   the signature, [`CliAuth::check`] the key files and [`CliAuth::unused`]
//!   the nonce, all before the body is read (the [`super::signed`] layer);
//!   then the layer checks the body digest and [`CliAuth::remember`]s the
//!   nonce (atomically: a second use is refused). Reading and submitting need a key from `--authorized-keys` or
//!   `--admin-keys`; drain and cancel need one from `--admin-keys`. When neither
//!   file is configured and the gRPC listener is on loopback, every caller gets
//!   both levels; once either file is configured, or beyond loopback, a level
//!   without a file is closed to everybody.

use std::path::PathBuf;
use std::sync::Arc;

use farm_common::keys::find_in_files;
use farm_common::sign::{ReplayGuard, VerifiedCall};
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

/// What the signature layer found on a CLI call (put in the request's
/// extensions for the handler's [`CliAuth::check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Authenticated {
    /// No key sent at all.
    Unsigned,
    /// A signature that checked out (its nonce and body are checked too by
    /// the time a handler sees it).
    Signed(VerifiedCall),
}

/// The CLI key policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct CliAuth {
    pub authorized_keys: Option<PathBuf>,
    pub admin_keys: Option<PathBuf>,
    /// Whether the gRPC listener is loopback-only.
    pub loopback: bool,
    /// This coordinator's identity as signed by callers: its cache public key
    /// (`name:base64`), which it proves with `FarmService.Identity`.
    pub identity: String,
    /// Nonces of the calls accepted within the validity window.
    pub replay: Arc<ReplayGuard>,
}

impl CliAuth {
    /// Whether every caller on this listener is trusted: loopback, and neither
    /// key file configured (configuring either locks both levels).
    fn open(&self) -> bool {
        self.loopback && self.authorized_keys.is_none() && self.admin_keys.is_none()
    }

    /// Check the signature on a call to `method` (its gRPC path), now being
    /// `now_unix`, from its metadata alone: key, time, nonce format, and the
    /// signature over them, the method, this coordinator's identity and the
    /// claimed body digest. Neither the key files nor the nonce are looked at.
    pub(crate) fn authenticate(
        &self,
        metadata: &MetadataMap,
        method: &str,
        now_unix: i64,
    ) -> Result<Authenticated, Status> {
        if !farm_common::sign::is_signed(metadata) {
            return Ok(Authenticated::Unsigned);
        }
        farm_common::sign::verify_request(metadata, method, &self.identity, now_unix)
            .map(Authenticated::Signed)
            .map_err(|e| {
                tracing::warn!(method, error = %e, "CLI call refused: bad or missing signature");
                Status::unauthenticated(e.to_string())
            })
    }

    /// Refuse a signed call whose nonce was used already (`UNAUTHENTICATED`),
    /// before its body is read; [`CliAuth::remember`] uses it up after.
    pub(crate) fn unused(&self, call: &VerifiedCall) -> Result<(), Status> {
        self.replay.unused(call).map_err(|e| {
            tracing::warn!(key = %fingerprint_ed25519(&call.key), error = %e, "CLI call refused: replayed");
            Status::unauthenticated(e.to_string())
        })
    }

    /// Accept a signed call's nonce once (a replay is `UNAUTHENTICATED`).
    /// Only for calls [`CliAuth::check`] let through, so that a key nobody
    /// authorized cannot fill the memory.
    pub(crate) fn remember(&self, call: &VerifiedCall, now_unix: i64) -> Result<(), Status> {
        self.replay.remember(call, now_unix).map_err(|e| match e {
            farm_common::Error::Busy(m) => {
                tracing::warn!("CLI call refused: too many nonces to remember");
                Status::resource_exhausted(m)
            }
            e => {
                tracing::warn!(key = %fingerprint_ed25519(&call.key), error = %e, "CLI call refused: replayed");
                Status::unauthenticated(e.to_string())
            }
        })
    }

    /// Authorise an [authenticated](CliAuth::authenticate) call to `method`
    /// (its gRPC path) at `level`. The key files are read (when they changed)
    /// off the async runtime.
    pub(crate) async fn check(
        &self,
        authn: &Authenticated,
        method: &str,
        level: Level,
    ) -> Result<Caller, Status> {
        let open = self.open();
        let signed = match authn {
            Authenticated::Unsigned if open => return Ok(Caller::Local),
            Authenticated::Unsigned => None,
            Authenticated::Signed(call) => Some(call.key),
        };
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
        // A signed call on an open loopback listener was still verified, so a
        // bad signature is never silently accepted.
        let Some(key) = signed else {
            return Err(Status::unauthenticated(format!(
                "{method} needs a signed call: pass --key (or FARM_KEY) with an authorized key"
            )));
        };
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

    const ID: &str = "farm-test:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn signed(seed: u8, method: &str, time: i64) -> MetadataMap {
        let (sk, line) = keypair(seed);
        let mut req = tonic::Request::new(());
        farm_common::sign::CliSigner::new(sk, line).sign_parts(
            &mut req,
            method,
            ID,
            b"",
            time,
            rand::random(),
        );
        req.metadata().clone()
    }

    /// What the signature layer and the handler do together, before the body.
    async fn check_md(
        auth: &CliAuth,
        md: &MetadataMap,
        method: &str,
        level: Level,
        now: i64,
    ) -> Result<Caller, Status> {
        let authn = auth.authenticate(md, method, now)?;
        let caller = auth.check(&authn, method, level).await?;
        if let Authenticated::Signed(call) = &authn {
            auth.remember(call, now)?;
        }
        Ok(caller)
    }

    fn with_id(auth: CliAuth) -> CliAuth {
        CliAuth {
            identity: ID.into(),
            ..auth
        }
    }

    #[tokio::test]
    async fn cli_levels() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        let admins = dir.path().join("admins");
        std::fs::write(&users, format!("{}\n", keypair(1).1)).unwrap();
        std::fs::write(&admins, format!("{}\n", keypair(2).1)).unwrap();
        let auth = with_id(CliAuth {
            authorized_keys: Some(users),
            admin_keys: Some(admins),
            loopback: true,
            ..Default::default()
        });
        let now = 1_700_000_000;
        // user: read yes, admin no
        assert!(matches!(
            check_md(
                &auth,
                &signed(1, methods::STATUS, now),
                methods::STATUS,
                Level::Read,
                now
            )
            .await,
            Ok(Caller::Key { .. })
        ));
        let e = check_md(
            &auth,
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
            check_md(
                &auth,
                &signed(2, methods::STATUS, now),
                methods::STATUS,
                Level::Read,
                now
            )
            .await
            .is_ok()
        );
        assert!(
            check_md(
                &auth,
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
            check_md(
                &auth,
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
            check_md(
                &auth,
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
            check_md(
                &auth,
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
            check_md(
                &auth,
                &MetadataMap::new(),
                methods::STATUS,
                Level::Read,
                now
            )
            .await
            .unwrap_err()
            .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[tokio::test]
    async fn open_loopback_and_closed_beyond() {
        let now = 1_700_000_000;
        let open = with_id(CliAuth {
            loopback: true,
            ..Default::default()
        });
        assert_eq!(
            check_md(
                &open,
                &MetadataMap::new(),
                methods::CANCEL,
                Level::Admin,
                now
            )
            .await
            .unwrap(),
            Caller::Local
        );
        // a bad signature is refused even there
        assert!(
            check_md(
                &open,
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
            check_md(
                &closed,
                &MetadataMap::new(),
                methods::STATUS,
                Level::Read,
                now
            )
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
        let auth = with_id(CliAuth {
            authorized_keys: Some(users),
            admin_keys: None,
            loopback: true,
            ..Default::default()
        });
        let now = 1_700_000_000;
        for m in [methods::CANCEL, methods::SET_DRAIN] {
            let e = check_md(&auth, &MetadataMap::new(), m, Level::Admin, now)
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{m}: {e:?}");
            // nor with a valid signature by an authorized (non-admin) key
            let e = check_md(&auth, &signed(1, m, now), m, Level::Admin, now)
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{m}: {e:?}");
        }
        // reading still needs a key
        let e = check_md(
            &auth,
            &MetadataMap::new(),
            methods::STATUS,
            Level::Read,
            now,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn signature_is_checked_before_key_files() {
        let dir = tempfile::tempdir().unwrap();
        // A key file that cannot be read: a bad or missing signature must still
        // be refused as such, without touching it.
        let auth = with_id(CliAuth {
            authorized_keys: Some(dir.path().join("missing")),
            admin_keys: None,
            loopback: false,
            ..Default::default()
        });
        let now = 1_700_000_000;
        let e = check_md(
            &auth,
            &MetadataMap::new(),
            methods::STATUS,
            Level::Read,
            now,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = check_md(
            &auth,
            &signed(1, methods::SUBMIT, now),
            methods::STATUS,
            Level::Read,
            now,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // A good signature reaches the file, which is unreadable.
        let e = check_md(
            &auth,
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
        let open = with_id(CliAuth {
            loopback: true,
            ..Default::default()
        });
        for (time, now) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (i64::MIN, 0)] {
            let e = check_md(
                &open,
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
