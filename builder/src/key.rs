//! The builder's identity: an ed25519 key in OpenSSH format, generated on first
//! start (mode 0600, with its `.pub` beside it), and the challenge signature that
//! proves it to the coordinator on every connection.
//!
//! Proof layout (see `ChallengeResponse` in farm.proto): an ed25519 signature over
//! the bytes `"nix-farm builder auth v1\n" || nonce || name` (name in UTF-8).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::Signer;
use ssh_key::private::{Ed25519Keypair, KeypairData};
use ssh_key::{LineEnding, PrivateKey};

use crate::error::BuilderError;

/// The bytes a builder signs to answer a challenge (the one definition in
/// `farm_proto::auth`, shared with the coordinator).
pub(crate) use farm_proto::auth::builder_auth_message as challenge_message;

/// The builder's ed25519 key.
#[derive(Clone)]
pub struct BuilderKey {
    signing: ed25519_dalek::SigningKey,
    public_line: String,
    path: PathBuf,
}

impl std::fmt::Debug for BuilderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuilderKey")
            .field("public", &self.public_line)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What `load_or_generate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// The key file existed and was read.
    Loaded,
    /// The key file did not exist and a new key was written.
    Generated,
}

impl BuilderKey {
    /// Read the key at `path`, or generate one there (0600, plus `path.pub`) when
    /// the file does not exist. `comment` goes into a newly generated key.
    pub fn load_or_generate(path: &Path, comment: &str) -> Result<(Self, KeyOrigin), BuilderError> {
        match std::fs::metadata(path) {
            Ok(_) => Ok((Self::load(path)?, KeyOrigin::Loaded)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Self::generate(path, comment)?, KeyOrigin::Generated))
            }
            Err(e) => Err(BuilderError::reading(path, e)),
        }
    }

    /// Read an existing OpenSSH ed25519 private key.
    pub fn load(path: &Path) -> Result<Self, BuilderError> {
        let meta = std::fs::metadata(path).map_err(|e| BuilderError::reading(path, e))?;
        if meta.len() > 64 * 1024 {
            return Err(key_error(path, "file too large for an ed25519 key"));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(key_error(
                path,
                format!(
                    "permissions {:o} are too open; the key must not be readable by others (chmod 600)",
                    meta.permissions().mode() & 0o777
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| BuilderError::reading(path, e))?;
        let private =
            PrivateKey::from_openssh(text.trim()).map_err(|e| key_error(path, e.to_string()))?;
        if private.is_encrypted() {
            return Err(key_error(path, "encrypted keys are not supported"));
        }
        let KeypairData::Ed25519(pair) = private.key_data() else {
            return Err(key_error(
                path,
                format!("{} key, expected ed25519", private.algorithm()),
            ));
        };
        let signing = ed25519_dalek::SigningKey::from_bytes(&pair.private.to_bytes());
        if signing.verifying_key().to_bytes() != pair.public.0 {
            return Err(key_error(
                path,
                "public half does not match the private key",
            ));
        }
        let public_line = private
            .public_key()
            .to_openssh()
            .map_err(|e| key_error(path, e.to_string()))?;
        Ok(BuilderKey {
            signing,
            public_line,
            path: path.to_owned(),
        })
    }

    /// Generate a new key and write it to `path` (0600, created exclusively) and
    /// its public line to `path.pub`.
    pub fn generate(path: &Path, comment: &str) -> Result<Self, BuilderError> {
        let mut rng = rand::rngs::OsRng;
        let signing = ed25519_dalek::SigningKey::generate(&mut rng);
        let pair = Ed25519Keypair::from_seed(&signing.to_bytes());
        let private = PrivateKey::new(KeypairData::Ed25519(pair), comment)
            .map_err(|e| key_error(path, e.to_string()))?;
        let pem = private
            .to_openssh(LineEnding::LF)
            .map_err(|e| key_error(path, e.to_string()))?;
        let public_line = private
            .public_key()
            .to_openssh()
            .map_err(|e| key_error(path, e.to_string()))?;

        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| BuilderError::writing(dir, e))?;
        }
        // Write beside the final name, then rename: a crash never leaves half a key.
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| BuilderError::writing(&tmp, e))?;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| BuilderError::writing(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| BuilderError::writing(path, e))?;

        let pub_path = public_path(path);
        std::fs::write(&pub_path, format!("{public_line}\n"))
            .map_err(|e| BuilderError::writing(&pub_path, e))?;

        Ok(BuilderKey {
            signing,
            public_line,
            path: path.to_owned(),
        })
    }

    /// The OpenSSH public key line (`ssh-ed25519 AAAA… comment`) to enrol.
    pub fn public_line(&self) -> &str {
        &self.public_line
    }

    /// The raw ed25519 public key.
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.signing.verifying_key()
    }

    /// Where the key lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sign a challenge: the 64-byte signature over [`challenge_message`].
    pub fn sign_challenge(&self, nonce: &[u8], name: &str) -> [u8; 64] {
        self.signing
            .sign(&challenge_message(nonce, name))
            .to_bytes()
    }
}

/// `path` with `.pub` appended.
pub(crate) fn public_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

fn key_error(path: &Path, message: impl Into<String>) -> BuilderError {
    BuilderError::Key {
        path: path.to_owned(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    #[test]
    fn generates_with_private_permissions_and_reloads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/builder_ed25519");
        let (k1, origin) = BuilderKey::load_or_generate(&path, "b1@farm").unwrap();
        assert_eq!(origin, KeyOrigin::Generated);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(k1.public_line().starts_with("ssh-ed25519 AAAA"));
        assert!(k1.public_line().ends_with(" b1@farm"));
        let pub_text = std::fs::read_to_string(public_path(&path)).unwrap();
        assert_eq!(pub_text.trim(), k1.public_line());

        let (k2, origin) = BuilderKey::load_or_generate(&path, "ignored").unwrap();
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(k1.public_line(), k2.public_line());
        assert_eq!(k1.verifying_key(), k2.verifying_key());
    }

    #[test]
    fn the_public_line_parses_as_the_same_ed25519_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = BuilderKey::generate(&path, "c").unwrap();
        let parsed = ssh_key::PublicKey::from_openssh(key.public_line()).unwrap();
        let ssh_key::public::KeyData::Ed25519(pk) = parsed.key_data() else {
            panic!("not ed25519")
        };
        assert_eq!(pk.0, key.verifying_key().to_bytes());
    }

    #[test]
    fn challenge_signature_verifies_over_the_documented_message() {
        let dir = tempfile::tempdir().unwrap();
        let key = BuilderKey::generate(&dir.path().join("k"), "c").unwrap();
        let nonce = [7u8; 32];
        let sig = key.sign_challenge(&nonce, "builder-a");
        let mut msg = b"nix-farm builder auth v1\n".to_vec();
        msg.extend_from_slice(&nonce);
        msg.extend_from_slice(b"builder-a");
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        key.verifying_key().verify(&msg, &sig).unwrap();
        // A different name or nonce does not verify.
        let mut other = msg.clone();
        other.push(b'x');
        assert!(key.verifying_key().verify(&other, &sig).is_err());
        let mut other = msg;
        other[b"nix-farm builder auth v1\n".len()] ^= 1;
        assert!(key.verifying_key().verify(&other, &sig).is_err());
    }

    #[test]
    fn refuses_a_key_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        BuilderKey::generate(&path, "c").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = BuilderKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("too open"), "{err}");
    }

    #[test]
    fn refuses_garbage_and_non_ed25519_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            BuilderKey::load(&path),
            Err(BuilderError::Key { .. })
        ));
    }
}
