//! Who may use the Nix endpoint: the keys in the coordinator's
//! `--authorized-keys` (and `--admin-keys`) files, OpenSSH authorized_keys
//! format, any key type (ed25519, RSA, ECDSA: what Nix users have). The files
//! are parsed by the farm's one parser (`farm_common::keys`, as the gRPC CLI
//! check does) and re-read when they change, so adding or removing a key needs
//! no restart; the user name a client logs in with does not matter, the key
//! decides. A file that cannot be read or has a malformed line refuses every
//! key (logged with the file and line) rather than being half-used.

use std::path::PathBuf;

use farm_common::keys::{find_in_files, parse_public_key_line};

use crate::nix_endpoint::ssh::{ClientIdentity, KeyAuthorizer};

/// Authorizes the keys listed in some authorized_keys files.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthorizedKeysFiles {
    pub files: Vec<PathBuf>,
}

impl AuthorizedKeysFiles {
    pub(crate) fn new(files: Vec<PathBuf>) -> AuthorizedKeysFiles {
        AuthorizedKeysFiles { files }
    }
}

impl KeyAuthorizer for AuthorizedKeysFiles {
    /// Blocking, briefly: a `stat` per file, a parse when one changed.
    fn authorize(&self, public_key: &str) -> Option<ClientIdentity> {
        let offered = parse_public_key_line(public_key).ok()?;
        match find_in_files(&self.files, |k| k.matches(offered.key_data())) {
            Ok(found) => found.map(|key| ClientIdentity {
                public_key: public_key.trim().to_owned(),
                fingerprint: key.fingerprint(),
                comment: key.comment().to_owned(),
            }),
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
                "# comment line\nrestrict,command=\"x\" {} alice@laptop\n",
                line(&a)
            ),
        )
        .unwrap();
        let auth = AuthorizedKeysFiles::new(vec![file.clone()]);
        let id = auth.authorize(&line(&a)).expect("a is authorized");
        assert_eq!(id.comment, "alice@laptop");
        assert!(id.fingerprint.starts_with("SHA256:"));
        assert!(auth.authorize(&line(&b)).is_none());
        assert!(auth.authorize("garbage").is_none());
        std::fs::write(&file, format!("{} bob\n", line(&b))).unwrap();
        assert!(auth.authorize(&line(&a)).is_none());
        assert_eq!(auth.authorize(&line(&b)).unwrap().comment, "bob");
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
        let auth = AuthorizedKeysFiles::new(vec![file.clone()]);
        assert!(auth.authorize(&line).is_none());
        std::fs::write(&file, format!("{line}\n")).unwrap();
        assert!(auth.authorize(&line).is_some());
        let auth = AuthorizedKeysFiles::new(vec![dir.path().join("missing"), file]);
        assert!(auth.authorize(&line).is_none());
    }

    #[test]
    fn rsa_and_ecdsa_keys_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("authorized_keys");
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDCd5dkzGmO7Ce3ml1eq2u9D2f5nzDj6dhsPObcFv5fG0TtqMXGmpBoKi1CqbFB2RxPzfDqtn2aCT+qXD5+QR/rW6l6fk1kBf2ZbLPdrd0I89gkq5awUU3w5gPJQ58dJN4IQ1gQCl4kDgjYiuBaM3/8qVGGVo3mmx7UOdhPWh2fMQ==";
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMqtkO1icyyoLCZ2GB9YLlon2klvlGIP1nfgh5M/jm/DB4+vFblzl8uoThVtrM7I8nGoLz0XVIV8TNfSPNX8/ww=";
        std::fs::write(&file, format!("{rsa} r@h\n{ecdsa} e@h\n")).unwrap();
        let auth = AuthorizedKeysFiles::new(vec![file]);
        assert_eq!(auth.authorize(rsa).unwrap().comment, "r@h");
        assert_eq!(auth.authorize(ecdsa).unwrap().comment, "e@h");
    }
}
