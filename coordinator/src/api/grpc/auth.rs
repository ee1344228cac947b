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
//!   nonce (atomically: a second use is refused). The key's level comes from
//!   the key files ([`crate::access`]): read for status, logs and cache reads,
//!   build to submit and upload, admin to drain and cancel. No key file:
//!   nobody, on loopback too; an unsigned call: nobody.

use std::path::PathBuf;
use std::sync::Arc;

use farm_common::sign::{ReplayGuard, VerifiedCall};

use farm_proto::auth::builder_auth_message;
use tonic::Status;
use tonic::metadata::MetadataMap;

use std::net::IpAddr;

use crate::CoordinatorError;
pub(crate) use crate::access::Level;
use crate::access::{KeyPolicy, Principal, Refusal};
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
    /// The enrolled entry for `key` that admits a builder at `peer` (its
    /// `from=`), if any. A broken file is an error (logged by the caller)
    /// rather than an empty list, so a typo never silently locks out; an entry
    /// with `command=` (meaningless for a builder) is an error too.
    /// Blocking (reads the key file when it changed): call it off the runtime.
    pub(crate) fn enrolled(
        &self,
        key: &[u8; 32],
        peer: Option<IpAddr>,
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
            Some(path) => {
                let keys = cached_authorized_keys(path)?;
                let mut matching = keys.iter().filter(|k| k.ed25519().as_ref() == Some(key));
                match matching.find(|k| k.admits(peer)) {
                    Some(k) if k.options().command.is_some() => {
                        Err(CoordinatorError::Config(format!(
                            "{}: the entry of builder key {} has command=, which means nothing for a builder; remove it",
                            path.display(),
                            k.fingerprint()
                        )))
                    }
                    found => Ok(found.cloned()),
                }
            }
        }
    }

    /// Whether `key` is enrolled at all, from any address (a name stays bound
    /// to a key that is still listed). Blocking, as [`BuilderAuth::enrolled`].
    pub(crate) fn listed(&self, key: &[u8; 32]) -> Result<bool, CoordinatorError> {
        if self
            .extra
            .iter()
            .any(|l| parse_ed25519_line(l).is_ok_and(|k| &k == key))
        {
            return Ok(true);
        }
        match &self.file {
            None => Ok(false),
            Some(path) => Ok(cached_authorized_keys(path)?
                .iter()
                .any(|k| k.ed25519().as_ref() == Some(key))),
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

/// The CLI key policy: the level files ([`KeyPolicy`]), this coordinator's
/// identity and the nonces seen.
#[derive(Debug, Clone, Default)]
pub(crate) struct CliAuth {
    pub keys: KeyPolicy,
    /// This coordinator's identity as signed by callers: its cache public key
    /// (`name:base64`), which it proves with `FarmService.Identity`.
    pub identity: String,
    /// Nonces of the calls accepted within the validity window.
    pub replay: Arc<ReplayGuard>,
}

impl CliAuth {
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
    /// (its gRPC path) needing `level`, from a client at `peer`. The key files
    /// are read (when they changed) off the async runtime.
    pub(crate) async fn check(
        &self,
        authn: &Authenticated,
        method: &str,
        level: Level,
        peer: Option<IpAddr>,
    ) -> Result<Principal, Status> {
        let key = match authn {
            Authenticated::Signed(call) => call.key,
            Authenticated::Unsigned => {
                return Err(Status::unauthenticated(format!(
                    "{method} needs a signed call: pass --key (or FARM_KEY) with an authorized key"
                )));
            }
        };
        if self.keys.is_empty() {
            return Err(Status::permission_denied(
                "this coordinator authorizes no client keys: start it with --authorized-keys FILE (or --read-keys, --push-keys, --admin-keys), or use `farm up`, which authorizes its user's key",
            ));
        }
        let keys = self.keys.clone();
        let data = ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(key));
        let found = tokio::task::spawn_blocking(move || keys.principal(&data, peer))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "reading CLI key files");
                Status::internal("the coordinator's key files are unreadable")
            })?;
        let fp = fingerprint_ed25519(&key);
        let principal = match found {
            Ok(Ok(p)) => p,
            Ok(Err(Refusal::Unknown)) => {
                tracing::warn!(method, key = %fp, "CLI call with an unknown key");
                return Err(Status::permission_denied(format!(
                    "key {fp} is not authorized on this coordinator"
                )));
            }
            Ok(Err(Refusal::FromRefused)) => {
                tracing::warn!(method, key = %fp, ?peer, "CLI call refused by from=");
                return Err(Status::permission_denied(format!(
                    "key {fp} is not accepted from {} (from= in its entry)",
                    peer.map_or("this address".to_owned(), |p| p.to_string())
                )));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read CLI key file");
                return Err(Status::internal(
                    "the coordinator's key files are unreadable",
                ));
            }
        };
        if let Some(cmd) = &principal.forced_command {
            tracing::warn!(method, key = %fp, "CLI call with a command= key");
            return Err(Status::permission_denied(format!(
                "key {fp} may only run {cmd:?} over SSH (command= in its entry), not CLI calls"
            )));
        }
        if !principal.may(level) {
            tracing::warn!(method, key = %fp, has = %principal.level, needs = %level, "CLI call above the key's level");
            return Err(Status::permission_denied(format!(
                "key {fp} ({}) has the {} level; {method} needs {level} (a key in {})",
                principal.comment,
                principal.level,
                level.flag()
            )));
        }
        Ok(principal)
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
        peer: Option<IpAddr>,
        now: i64,
    ) -> Result<Principal, Status> {
        let authn = auth.authenticate(md, method, now)?;
        let caller = auth.check(&authn, method, level, peer).await?;
        if let Authenticated::Signed(call) = &authn {
            auth.remember(call, now)?;
        }
        Ok(caller)
    }

    /// Key files for seeds 1 (read), 2 (build), 3 (push), 4 (admin).
    fn policy(dir: &std::path::Path) -> CliAuth {
        let file = |name: &str, seed: u8| {
            let p = dir.join(name);
            std::fs::write(&p, format!("{}\n", keypair(seed).1)).unwrap();
            Some(p)
        };
        CliAuth {
            keys: KeyPolicy {
                read: file("read", 1),
                build: file("build", 2),
                push: file("push", 3),
                admin: file("admin", 4),
                extra: Vec::new(),
            },
            identity: ID.into(),
            ..Default::default()
        }
    }

    async fn code(auth: &CliAuth, seed: u8, method: &str, level: Level) -> Option<tonic::Code> {
        let now = 1_700_000_000;
        check_md(auth, &signed(seed, method, now), method, level, None, now)
            .await
            .err()
            .map(|e| e.code())
    }

    #[tokio::test]
    async fn cli_levels() {
        let dir = tempfile::tempdir().unwrap();
        let auth = policy(dir.path());
        use tonic::Code::PermissionDenied as Denied;
        let cases = [
            (methods::STATUS, Level::Read),
            (methods::SUBMIT, Level::Build),
            (methods::UPLOAD_NAR, Level::Build),
            (methods::CANCEL, Level::Admin),
        ];
        for seed in 1..=4u8 {
            for (m, needs) in cases {
                let has = [Level::Read, Level::Build, Level::Push, Level::Admin][seed as usize - 1];
                let want = if has >= needs { None } else { Some(Denied) };
                assert_eq!(
                    code(&auth, seed, m, needs).await,
                    want,
                    "key {seed} calling {m}"
                );
            }
        }
        // unknown key
        assert_eq!(
            code(&auth, 9, methods::STATUS, Level::Read).await,
            Some(Denied)
        );
        let now = 1_700_000_000;
        // signature for another method, stale time, no metadata
        for md in [
            signed(4, methods::SUBMIT, now),
            signed(4, methods::STATUS, now - 1000),
            MetadataMap::new(),
        ] {
            let e = check_md(&auth, &md, methods::STATUS, Level::Read, None, now)
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        }
    }

    #[tokio::test]
    async fn no_key_file_means_nobody() {
        let now = 1_700_000_000;
        let closed = CliAuth::default();
        for md in [MetadataMap::new(), signed(1, methods::STATUS, now)] {
            let e = check_md(&closed, &md, methods::STATUS, Level::Read, None, now)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn from_and_command_options() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin");
        std::fs::write(
            &file,
            format!(
                "from=\"10.0.0.0/8\" {}\ncommand=\"nix-daemon --stdio\" {}\n",
                keypair(1).1,
                keypair(2).1
            ),
        )
        .unwrap();
        let auth = CliAuth {
            keys: KeyPolicy {
                admin: Some(file),
                ..Default::default()
            },
            identity: ID.into(),
            ..Default::default()
        };
        let now = 1_700_000_000;
        let m = methods::STATUS;
        let lan = Some("10.2.3.4".parse().unwrap());
        let wan = Some("127.0.0.1".parse().unwrap());
        assert!(
            check_md(&auth, &signed(1, m, now), m, Level::Read, lan, now)
                .await
                .is_ok()
        );
        let e = check_md(&auth, &signed(1, m, now), m, Level::Read, wan, now)
            .await
            .unwrap_err();
        assert!(e.message().contains("from="), "{e:?}");
        let e = check_md(&auth, &signed(2, m, now), m, Level::Read, wan, now)
            .await
            .unwrap_err();
        assert!(e.message().contains("command="), "{e:?}");
    }

    #[tokio::test]
    async fn signature_is_checked_before_key_files() {
        let dir = tempfile::tempdir().unwrap();
        // A key file that cannot be read: a bad or missing signature must still
        // be refused as such, without touching it.
        let auth = CliAuth {
            keys: KeyPolicy {
                build: Some(dir.path().join("missing")),
                ..Default::default()
            },
            identity: ID.into(),
            ..Default::default()
        };
        let now = 1_700_000_000;
        let m = methods::STATUS;
        let e = check_md(&auth, &MetadataMap::new(), m, Level::Read, None, now)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = check_md(
            &auth,
            &signed(1, methods::SUBMIT, now),
            m,
            Level::Read,
            None,
            now,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // A good signature reaches the file, which is unreadable.
        let e = check_md(&auth, &signed(1, m, now), m, Level::Read, None, now)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
    }

    #[tokio::test]
    async fn extreme_times_are_refused_without_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let auth = policy(dir.path());
        for (time, now) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (i64::MIN, 0)] {
            let e = check_md(
                &auth,
                &signed(1, methods::STATUS, time),
                methods::STATUS,
                Level::Read,
                None,
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
        assert!(auth.enrolled(&k1, None).unwrap().is_some());
        assert!(auth.enrolled(&k2, None).unwrap().is_none());
        // enrolment is re-read
        std::fs::write(&file, format!("{line1}\n{line2}\n")).unwrap();
        assert!(auth.enrolled(&k2, None).unwrap().is_some());

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
