//! Nix's ed25519 signing keys and signatures.
//!
//! Text formats (as `nix-store --generate-binary-cache-key` writes them):
//! - secret key: `name:base64(64 bytes)`, the 64 bytes being libsodium's secret
//!   key layout `seed(32) || public(32)`;
//! - public key: `name:base64(32 bytes)`;
//! - signature: `name:base64(64 bytes)`, over the UTF-8 bytes of a fingerprint
//!   (see [`crate::path_info::ValidPathInfo::fingerprint`]).
//!
//! The name is everything before the first `:`; it must be non-empty and
//! printable without whitespace. Secret material never appears in `Debug`.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signer;

/// Longest key name accepted.
pub const MAX_KEY_NAME_LEN: usize = 256;
/// Longest key or signature text accepted (name, colon and base64).
pub const MAX_KEY_TEXT_LEN: usize = MAX_KEY_NAME_LEN + 1 + 128;
/// Largest key file read.
const MAX_KEY_FILE_LEN: u64 = 4096;

/// Why a key or key file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("key text is longer than {MAX_KEY_TEXT_LEN} bytes")]
    TooLong,
    #[error("key has no `name:` prefix")]
    MissingName,
    #[error("key name is invalid: {0}")]
    BadName(&'static str),
    #[error("key is not valid base64: {0}")]
    BadBase64(String),
    #[error("{kind} key must be {expected} bytes, got {got}")]
    BadLength {
        kind: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("secret key is corrupt: its public half does not match its seed")]
    Mismatch,
    #[error("public key is not a valid ed25519 point")]
    BadPoint,
    #[error("key file {path} is larger than {MAX_KEY_FILE_LEN} bytes")]
    FileTooLarge { path: PathBuf },
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn check_name(name: &str) -> Result<(), SigningError> {
    if name.is_empty() {
        return Err(SigningError::BadName("empty"));
    }
    if name.len() > MAX_KEY_NAME_LEN {
        return Err(SigningError::BadName("too long"));
    }
    if name.contains(':') {
        return Err(SigningError::BadName("contains ':'"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SigningError::BadName(
            "contains whitespace or non-printable characters",
        ));
    }
    Ok(())
}

/// Split `name:base64` and decode the payload.
fn split_key(s: &str) -> Result<(&str, Vec<u8>), SigningError> {
    if s.len() > MAX_KEY_TEXT_LEN {
        return Err(SigningError::TooLong);
    }
    let (name, data) = s.split_once(':').ok_or(SigningError::MissingName)?;
    check_name(name)?;
    let bytes = B64
        .decode(data)
        .map_err(|e| SigningError::BadBase64(e.to_string()))?;
    Ok((name, bytes))
}

fn read_key_file(path: &Path) -> Result<String, SigningError> {
    let io = |source| SigningError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    let n = std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_KEY_FILE_LEN + 1),
        &mut text,
    )
    .map_err(io)?;
    if n as u64 > MAX_KEY_FILE_LEN {
        return Err(SigningError::FileTooLarge {
            path: path.to_owned(),
        });
    }
    Ok(text.trim().to_owned())
}

/// Write `contents` to `path` atomically: a fresh temporary file in the same
/// directory (created with `create_new` and `mode`), synced, then renamed.
fn write_file_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), SigningError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| SigningError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("path has no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:016x}",
        file_name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// An ed25519 secret key with its Nix name.
#[derive(Clone)]
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// A fresh key from the OS random generator.
    pub fn generate(name: &str) -> Result<SigningKey, SigningError> {
        check_name(name)?;
        Ok(SigningKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
        })
    }

    /// Parse `name:base64(seed || public)`; the public half must match the seed.
    pub fn parse(s: &str) -> Result<SigningKey, SigningError> {
        let (name, bytes) = split_key(s)?;
        let bytes: [u8; 64] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SigningError::BadLength {
                kind: "secret",
                expected: 64,
                got: bytes.len(),
            })?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SigningError::Mismatch)?;
        Ok(SigningKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Read a secret key file (surrounding whitespace ignored).
    pub fn read_file(path: &Path) -> Result<SigningKey, SigningError> {
        SigningKey::parse(&read_key_file(path)?)
    }

    /// Write the secret key to `path`, mode 0600, atomically (a new temporary
    /// file renamed into place; an existing file at `path` is replaced).
    pub fn write_secret_key_file(&self, path: &Path) -> Result<(), SigningError> {
        write_file_atomic(path, &self.to_secret_string(), 0o600)
    }

    /// Read the key at `path`, or generate one named `name` and write it there.
    pub fn load_or_generate(path: &Path, name: &str) -> Result<SigningKey, SigningError> {
        match SigningKey::read_file(path) {
            Err(SigningError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let key = SigningKey::generate(name)?;
                key.write_secret_key_file(path)?;
                Ok(key)
            }
            other => other,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `name:base64(seed || public)`: the secret. Handle with care.
    pub fn to_secret_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.to_keypair_bytes()))
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Sign a fingerprint: `name:base64(signature)`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, B64.encode(sig.to_bytes()))
    }
}

/// Shows the name and the public key only.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .field("public", &B64.encode(self.key.verifying_key().as_bytes()))
            .finish_non_exhaustive()
    }
}

/// An ed25519 public key with its Nix name.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    /// Parse `name:base64(32 bytes)`.
    pub fn parse(s: &str) -> Result<VerifyingKey, SigningError> {
        let (name, bytes) = split_key(s)?;
        let bytes: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SigningError::BadLength {
                kind: "public",
                expected: 32,
                got: bytes.len(),
            })?;
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| SigningError::BadPoint)?;
        Ok(VerifyingKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Read a public key file (surrounding whitespace ignored).
    pub fn read_file(path: &Path) -> Result<VerifyingKey, SigningError> {
        VerifyingKey::parse(&read_key_file(path)?)
    }

    /// Write the public key to `path` (mode 0644), atomically.
    pub fn write_file(&self, path: &Path) -> Result<(), SigningError> {
        write_file_atomic(path, &self.to_string(), 0o644)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` (`name:base64`) is this key's signature of `fingerprint`.
    /// A signature under another name, or malformed, is simply not valid.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        if sig.len() > MAX_KEY_TEXT_LEN {
            return false;
        }
        let Some((name, data)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = B64.decode(data) else {
            return false;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&bytes);
        self.key.verify_strict(fingerprint.as_bytes(), &sig).is_ok()
    }
}

/// `name:base64(public)`.
impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({self})")
    }
}

impl std::str::FromStr for VerifyingKey {
    type Err = SigningError;
    fn from_str(s: &str) -> Result<Self, SigningError> {
        VerifyingKey::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_print_parse_sign_verify() {
        let k = SigningKey::generate("cache.example-1").unwrap();
        let again = SigningKey::parse(&k.to_secret_string()).unwrap();
        assert_eq!(again.to_secret_string(), k.to_secret_string());
        let pk = k.verifying_key();
        assert_eq!(VerifyingKey::parse(&pk.to_string()).unwrap(), pk);
        assert_eq!(pk.name(), "cache.example-1");
        let sig = k.sign("1;fp");
        assert!(sig.starts_with("cache.example-1:"));
        assert!(pk.verify("1;fp", &sig));
        assert!(!pk.verify("1;fq", &sig));
        // same bytes under another name: not valid
        let renamed = sig.replacen("cache.example-1", "other", 1);
        assert!(!pk.verify("1;fp", &renamed));
        // another key of the same name
        let k2 = SigningKey::generate("cache.example-1").unwrap();
        assert!(!k2.verifying_key().verify("1;fp", &sig));
        // deterministic
        assert_eq!(k.sign("1;fp"), sig);
    }

    #[test]
    fn debug_hides_the_secret() {
        let k = SigningKey::generate("n").unwrap();
        let secret = k.to_secret_string();
        let b64 = secret.split_once(':').unwrap().1;
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(b64), "{dbg}");
        // the seed half alone (first 32 bytes) must not show either
        let seed_b64 = B64.encode(&B64.decode(b64).unwrap()[..32]);
        assert!(!dbg.contains(&seed_b64[..40]));
        assert!(dbg.contains(&B64.encode(k.verifying_key().key.as_bytes())));
    }

    #[test]
    fn rejects() {
        let k = SigningKey::generate("n").unwrap();
        let sec = k.to_secret_string();
        let pk = k.verifying_key().to_string();
        assert!(matches!(
            SigningKey::parse("nocolon"),
            Err(SigningError::MissingName)
        ));
        assert!(matches!(
            SigningKey::parse(&sec.replacen("n:", ":", 1)),
            Err(SigningError::BadName(_))
        ));
        assert!(matches!(
            SigningKey::parse(&sec.replacen("n:", "a b:", 1)),
            Err(SigningError::BadName(_))
        ));
        assert!(matches!(
            SigningKey::parse("n:!!!"),
            Err(SigningError::BadBase64(_))
        ));
        assert!(matches!(
            SigningKey::parse(&pk),
            Err(SigningError::BadLength { expected: 64, .. })
        ));
        assert!(matches!(
            VerifyingKey::parse(&sec),
            Err(SigningError::BadLength { expected: 32, .. })
        ));
        assert!(matches!(
            SigningKey::parse(&format!("n:{}", "A".repeat(1000))),
            Err(SigningError::TooLong)
        ));
        // public half that does not match the seed
        let mut bytes = B64.decode(sec.split_once(':').unwrap().1).unwrap();
        bytes[40] ^= 1;
        assert!(matches!(
            SigningKey::parse(&format!("n:{}", B64.encode(&bytes))),
            Err(SigningError::Mismatch)
        ));
        // a y coordinate that is not on the curve (y = 2 is not a valid point)
        let mut bad = [0u8; 32];
        bad[0] = 2;
        assert!(matches!(
            VerifyingKey::parse(&format!("n:{}", B64.encode(bad))),
            Err(SigningError::BadPoint)
        ));
        // malformed signatures are invalid, not panics
        let vk = k.verifying_key();
        for sig in ["", "n", "n:", "n:!!", "n:AAAA", "x:AAAA"] {
            assert!(!vk.verify("fp", sig), "{sig}");
        }
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sec");
        let k = SigningKey::load_or_generate(&path, "farm").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = SigningKey::load_or_generate(&path, "other").unwrap();
        assert_eq!(again.to_secret_string(), k.to_secret_string());
        // surrounding whitespace is ignored
        std::fs::write(&path, format!("\n  {}\n\n", k.to_secret_string())).unwrap();
        assert_eq!(
            SigningKey::read_file(&path).unwrap().to_secret_string(),
            k.to_secret_string()
        );
        let pub_path = dir.path().join("cache.pub");
        k.verifying_key().write_file(&pub_path).unwrap();
        assert_eq!(
            VerifyingKey::read_file(&pub_path).unwrap(),
            k.verifying_key()
        );
        // only the two files: no temporary left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        std::fs::write(&path, "x".repeat(5000)).unwrap();
        assert!(matches!(
            SigningKey::read_file(&path),
            Err(SigningError::FileTooLarge { .. })
        ));
        assert!(matches!(
            SigningKey::read_file(&dir.path().join("missing")),
            Err(SigningError::Io { .. })
        ));
    }
}
