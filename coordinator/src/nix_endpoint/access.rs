//! Who may use the Nix endpoint: the keys in the coordinator's
//! `--authorized-keys` (and `--admin-keys`) files, OpenSSH authorized_keys
//! format, any key type. The files are re-read on every connection, so adding
//! or removing a key needs no restart; the user name a client logs in with
//! does not matter, the key decides.

use std::path::PathBuf;

use ssh_key::{AuthorizedKeys, HashAlg, PublicKey};

use crate::nix_endpoint::ssh::{ClientIdentity, KeyAuthorizer};

/// Largest authorized_keys file read.
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// Authorizes the keys listed in some authorized_keys files.
#[derive(Debug, Clone, Default)]
pub struct AuthorizedKeysFiles {
    pub files: Vec<PathBuf>,
}

impl AuthorizedKeysFiles {
    pub fn new(files: Vec<PathBuf>) -> AuthorizedKeysFiles {
        AuthorizedKeysFiles { files }
    }

    fn read(path: &PathBuf) -> Option<String> {
        match std::fs::metadata(path) {
            Ok(m) if m.len() > MAX_FILE => {
                tracing::error!(file = %path.display(), "authorized keys file too large; ignored");
                None
            }
            Ok(_) => match std::fs::read_to_string(path) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read authorized keys");
                    None
                }
            },
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read authorized keys");
                None
            }
        }
    }
}

impl KeyAuthorizer for AuthorizedKeysFiles {
    fn authorize(&self, public_key: &str) -> Option<ClientIdentity> {
        let offered = PublicKey::from_openssh(public_key).ok()?;
        for path in &self.files {
            let Some(text) = Self::read(path) else {
                continue;
            };
            for (n, entry) in AuthorizedKeys::new(&text).enumerate() {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::debug!(file = %path.display(), entry = n + 1, error = %e, "unparsable authorized key skipped");
                        continue;
                    }
                };
                let key = entry.public_key();
                if key.key_data() == offered.key_data() {
                    return Some(ClientIdentity {
                        public_key: public_key.trim().to_owned(),
                        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
                        comment: key.comment().to_owned(),
                    });
                }
            }
        }
        None
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
                "# comment line\nnot a key\nrestrict,command=\"x\" {} alice@laptop\n",
                line(&a)
            ),
        )
        .unwrap();
        let auth = AuthorizedKeysFiles::new(vec![dir.path().join("missing"), file.clone()]);
        let id = auth.authorize(&line(&a)).expect("a is authorized");
        assert_eq!(id.comment, "alice@laptop");
        assert!(id.fingerprint.starts_with("SHA256:"));
        assert!(auth.authorize(&line(&b)).is_none());
        assert!(auth.authorize("garbage").is_none());
        std::fs::write(&file, format!("{} bob\n", line(&b))).unwrap();
        assert!(auth.authorize(&line(&a)).is_none());
        assert_eq!(auth.authorize(&line(&b)).unwrap().comment, "bob");
    }
}
