//! Who may use the Nix endpoint: the keys in the coordinator's level files
//! ([`crate::access::KeyPolicy`]: `--read-keys`, `--authorized-keys`,
//! `--push-keys`, `--admin-keys`), OpenSSH authorized_keys format, any key
//! type (ed25519, RSA, ECDSA: what Nix users have). The files are parsed by
//! the farm's one parser (`farm_common::keys`, as the gRPC CLI check does)
//! and re-read when they change, so adding or removing a key needs no
//! restart; the user name a client logs in with does not matter, the key
//! decides, with its entry's `from=` and `command=`. A file that cannot be
//! read or has a malformed line refuses every key (logged with the file and
//! line) rather than being half-used.

use std::net::IpAddr;

use farm_common::keys::parse_public_key_line;

use crate::access::{KeyPolicy, Refusal};
use crate::nix_endpoint::ssh::{ClientIdentity, KeyAuthorizer};

/// Authorizes the keys the level files list.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthorizedKeysFiles {
    pub policy: KeyPolicy,
}

impl AuthorizedKeysFiles {
    pub(crate) fn new(policy: KeyPolicy) -> AuthorizedKeysFiles {
        AuthorizedKeysFiles { policy }
    }
}

impl KeyAuthorizer for AuthorizedKeysFiles {
    /// Blocking, briefly: a `stat` per file, a parse when one changed.
    fn authorize(&self, public_key: &str, peer: Option<IpAddr>) -> Option<ClientIdentity> {
        let offered = parse_public_key_line(public_key).ok()?;
        match self.policy.principal(offered.key_data(), peer) {
            Ok(Ok(p)) => Some(ClientIdentity {
                public_key: public_key.trim().to_owned(),
                fingerprint: p.fingerprint,
                comment: p.comment,
                level: p.level,
                forced_command: p.forced_command,
            }),
            Ok(Err(Refusal::FromRefused)) => {
                tracing::warn!(
                    ?peer,
                    "ssh key refused: its from= does not admit this address"
                );
                None
            }
            Ok(Err(Refusal::Unknown)) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the authorized keys; refusing the SSH key");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Level;

    fn build(file: &std::path::Path) -> KeyPolicy {
        KeyPolicy {
            build: Some(file.to_path_buf()),
            ..Default::default()
        }
    }

    #[test]
    fn the_key_decides_and_the_file_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("authorized_keys");
        let mut rng = rand::rngs::OsRng;
        let a = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap();
        let b = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap();
        let line = |k: &ssh_key::PrivateKey| k.public_key().to_openssh().unwrap();
        std::fs::write(
            &file,
            format!(
                "# comment line\nrestrict,command=\"nix-daemon --stdio\" {} alice@laptop\n",
                line(&a)
            ),
        )
        .unwrap();
        let auth = AuthorizedKeysFiles::new(build(&file));
        let id = auth.authorize(&line(&a), None).expect("a is authorized");
        assert_eq!(id.comment, "alice@laptop");
        assert_eq!(id.level, Level::Build);
        assert_eq!(id.forced_command.as_deref(), Some("nix-daemon --stdio"));
        assert!(id.fingerprint.starts_with("SHA256:"));
        assert!(auth.authorize(&line(&b), None).is_none());
        assert!(auth.authorize("garbage", None).is_none());
        std::fs::write(&file, format!("{} bob\n", line(&b))).unwrap();
        assert!(auth.authorize(&line(&a), None).is_none());
        assert_eq!(auth.authorize(&line(&b), None).unwrap().comment, "bob");
    }

    /// Stricter than before the parsers became one: a malformed line, or a
    /// missing file, refuses every key instead of being skipped.
    #[test]
    fn a_broken_or_missing_file_refuses_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("authorized_keys");
        let mut rng = rand::rngs::OsRng;
        let a = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap();
        let line = a.public_key().to_openssh().unwrap();
        std::fs::write(&file, format!("{line}\nnot a key\n")).unwrap();
        let auth = AuthorizedKeysFiles::new(build(&file));
        assert!(auth.authorize(&line, None).is_none());
        std::fs::write(&file, format!("{line}\n")).unwrap();
        assert!(auth.authorize(&line, None).is_some());
        let auth = AuthorizedKeysFiles::new(KeyPolicy {
            read: Some(dir.path().join("missing")),
            build: Some(file),
            ..Default::default()
        });
        assert!(auth.authorize(&line, None).is_none());
    }

    #[test]
    fn rsa_and_ecdsa_keys_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("authorized_keys");
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDCd5dkzGmO7Ce3ml1eq2u9D2f5nzDj6dhsPObcFv5fG0TtqMXGmpBoKi1CqbFB2RxPzfDqtn2aCT+qXD5+QR/rW6l6fk1kBf2ZbLPdrd0I89gkq5awUU3w5gPJQ58dJN4IQ1gQCl4kDgjYiuBaM3/8qVGGVo3mmx7UOdhPWh2fMQ==";
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMqtkO1icyyoLCZ2GB9YLlon2klvlGIP1nfgh5M/jm/DB4+vFblzl8uoThVtrM7I8nGoLz0XVIV8TNfSPNX8/ww=";
        std::fs::write(&file, format!("{rsa} r@h\n{ecdsa} e@h\n")).unwrap();
        let auth = AuthorizedKeysFiles::new(build(&file));
        assert_eq!(auth.authorize(rsa, None).unwrap().comment, "r@h");
        assert_eq!(auth.authorize(ecdsa, None).unwrap().comment, "e@h");
    }
}
