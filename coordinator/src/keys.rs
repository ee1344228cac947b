//! The coordinator's own keys, generated in the state directory on first start
//! and reused afterwards (all secret files mode 0600):
//! - `cache-key.sec` / `cache-key.pub`: the cache signing key, Nix format `name:base64`
//!   (unless `--cache-key-file` names an existing one);
//! - `ssh_host_ed25519_key` / `.pub`: the SSH endpoint's host key, OpenSSH format;
//! - `tls/cert.pem` / `tls/key.pem`: a self-signed TLS certificate for gRPC, when
//!   TLS is on and no `--tls-cert` is given.
//!
//! Also reads OpenSSH `authorized_keys` files (the enrolled builder, user and
//! admin keys); only ed25519 keys take part in the farm's signatures.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use farm_nix::signing::SigningKey;
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};

use crate::CoordinatorError;
use crate::config::CoordinatorConfig;

/// Largest key or authorized_keys file read.
const MAX_KEY_FILE: u64 = 4 * 1024 * 1024;

/// Write `contents` to `path` atomically with `mode`: a fresh temporary file
/// (created exclusively, mode 0600 from the start, so a secret is never readable
/// by others even for a moment) is written, synced, given `mode`, renamed in
/// place, and the directory synced. Temporary files a crash left behind are removed.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{base}.tmp");
    // Leftovers of an interrupted write of this file (ours are unique per call).
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let tmp = dir.join(format!(
        "{prefix}{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Read a small text file, refusing anything over [`MAX_KEY_FILE`].
pub fn read_small_file(path: &Path) -> Result<String, CoordinatorError> {
    let err = |e: std::io::Error| CoordinatorError::Key(format!("{}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.len() > MAX_KEY_FILE {
        return Err(CoordinatorError::Key(format!(
            "{}: file too large",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(err)
}

/// The cache signing key: `--cache-key-file`, or `DIR/cache-key.sec` (generated
/// with the configured name when missing). Also writes `DIR/cache-key.pub`.
pub fn cache_signing_key(config: &CoordinatorConfig) -> Result<SigningKey, CoordinatorError> {
    let key = match &config.cache_key_file {
        Some(file) => SigningKey::read_file(file)
            .map_err(|e| CoordinatorError::Key(format!("{}: {e}", file.display())))?,
        None => {
            let path = config.state_dir.join("cache-key.sec");
            SigningKey::load_or_generate(&path, &config.cache_key_name())
                .map_err(|e| CoordinatorError::Key(format!("{}: {e}", path.display())))?
        }
    };
    let public = format!("{}\n", key.verifying_key());
    let pub_path = config.state_dir.join("cache-key.pub");
    if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(public.as_str()) {
        write_file_atomic(&pub_path, public.as_bytes(), 0o644)
            .map_err(|e| CoordinatorError::Key(format!("{}: {e}", pub_path.display())))?;
    }
    Ok(key)
}

/// The SSH host key `DIR/ssh_host_ed25519_key` (OpenSSH format), generated when missing.
pub fn ssh_host_key(state_dir: &Path) -> Result<PrivateKey, CoordinatorError> {
    let path = state_dir.join("ssh_host_ed25519_key");
    let kerr = |e: String| CoordinatorError::Key(format!("{}: {e}", path.display()));
    if path.exists() {
        let text = read_small_file(&path)?;
        return PrivateKey::from_openssh(text.as_bytes()).map_err(|e| kerr(e.to_string()));
    }
    let mut key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519)
        .map_err(|e| kerr(e.to_string()))?;
    key.set_comment("nix-farm coordinator");
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| kerr(e.to_string()))?;
    write_file_atomic(&path, text.as_bytes(), 0o600).map_err(|e| kerr(e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| kerr(e.to_string()))?;
    let pub_path = state_dir.join("ssh_host_ed25519_key.pub");
    write_file_atomic(&pub_path, format!("{public}\n").as_bytes(), 0o644)
        .map_err(|e| kerr(e.to_string()))?;
    Ok(key)
}

/// `ssh-ed25519 AAAA…` without the comment.
pub fn public_key_line(key: &PublicKey) -> String {
    let mut k = key.clone();
    k.set_comment("");
    k.to_openssh().unwrap_or_default().trim().to_owned()
}

/// `ssh-ed25519 AAAA…` of raw ed25519 public key bytes.
pub fn public_key_line_ed25519(key: &[u8; 32]) -> String {
    let pk = PublicKey::from(ssh_key::public::KeyData::Ed25519(
        ssh_key::public::Ed25519PublicKey(*key),
    ));
    public_key_line(&pk)
}

/// PEM certificate chain and private key for the gRPC listener.
#[derive(Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub cert_path: PathBuf,
}

/// The TLS certificate: `--tls-cert`/`--tls-key`, or the self-signed one in
/// `DIR/tls/`, generated when missing for `names` (host names and IPs).
pub fn tls_files(
    config: &CoordinatorConfig,
    names: &[String],
) -> Result<TlsFiles, CoordinatorError> {
    let (cert_path, key_path) = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = config.state_dir.join("tls");
            let cert = dir.join("cert.pem");
            let key = dir.join("key.pem");
            if !cert.exists() || !key.exists() {
                let mut sans: Vec<String> =
                    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
                for n in names {
                    if !sans.contains(n) {
                        sans.push(n.clone());
                    }
                }
                let ck = rcgen::generate_simple_self_signed(sans).map_err(|e| {
                    CoordinatorError::Key(format!("generating TLS certificate: {e}"))
                })?;
                let kerr =
                    |e: std::io::Error| CoordinatorError::Key(format!("{}: {e}", dir.display()));
                write_file_atomic(&key, ck.key_pair.serialize_pem().as_bytes(), 0o600)
                    .map_err(kerr)?;
                write_file_atomic(&cert, ck.cert.pem().as_bytes(), 0o644).map_err(kerr)?;
            }
            (cert, key)
        }
    };
    Ok(TlsFiles {
        cert_pem: read_small_file(&cert_path)?.into_bytes(),
        key_pem: read_small_file(&key_path)?.into_bytes(),
        cert_path,
    })
}

/// An enrolled ed25519 key.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    pub key: [u8; 32],
    pub comment: String,
}

impl std::fmt::Debug for AuthorizedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", fingerprint_ed25519(&self.key), self.comment)
    }
}

/// The ed25519 public key bytes of an OpenSSH public key line, if it is one.
pub fn parse_ed25519_line(line: &str) -> Result<[u8; 32], CoordinatorError> {
    if line.len() > 16 * 1024 {
        return Err(CoordinatorError::Key("public key line too long".into()));
    }
    let key = PublicKey::from_openssh(line.trim())
        .map_err(|e| CoordinatorError::Key(format!("not an OpenSSH public key: {e}")))?;
    key.key_data().ed25519().map(|k| k.0).ok_or_else(|| {
        CoordinatorError::Key(format!(
            "only ssh-ed25519 keys are supported, not {}",
            key.algorithm()
        ))
    })
}

/// `SHA256:…` fingerprint of an ed25519 public key, as `ssh-keygen -l` prints it.
pub fn fingerprint_ed25519(key: &[u8; 32]) -> String {
    let data = ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(*key));
    data.fingerprint(HashAlg::Sha256).to_string()
}

/// Parse authorized_keys text: ed25519 entries are returned, other key types are
/// skipped (with a warning); a malformed line is an error naming its number.
pub fn parse_authorized_keys(text: &str) -> Result<Vec<AuthorizedKey>, CoordinatorError> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry = line
            .parse::<ssh_key::authorized_keys::Entry>()
            .map_err(|e| CoordinatorError::Key(format!("authorized_keys line {}: {e}", n + 1)))?;
        let pk = entry.public_key();
        match pk.key_data().ed25519() {
            Some(k) => keys.push(AuthorizedKey {
                key: k.0,
                comment: pk.comment().to_owned(),
            }),
            None => tracing::warn!(
                line = n + 1,
                algorithm = %pk.algorithm(),
                "authorized_keys: skipping non-ed25519 key"
            ),
        }
    }
    Ok(keys)
}

/// Read and parse an authorized_keys file.
pub fn read_authorized_keys(path: &Path) -> Result<Vec<AuthorizedKey>, CoordinatorError> {
    parse_authorized_keys(&read_small_file(path)?)
        .map_err(|e| CoordinatorError::Key(format!("{}: {e}", path.display())))
}

/// What identifies a version of a key file without reading it.
type FileStamp = (std::time::SystemTime, u64, u64);

/// Parsed authorized_keys files by path, with the stamp they were read at.
type KeyFileCache =
    std::collections::HashMap<PathBuf, (FileStamp, std::sync::Arc<Vec<AuthorizedKey>>)>;

static KEY_FILES: std::sync::Mutex<Option<KeyFileCache>> = std::sync::Mutex::new(None);

/// As [`read_authorized_keys`], but re-reads and re-parses the file only when its
/// modification time, length or inode changed (a `stat` per call otherwise).
/// Blocking: call it off the async runtime.
pub fn cached_authorized_keys(
    path: &Path,
) -> Result<std::sync::Arc<Vec<AuthorizedKey>>, CoordinatorError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| CoordinatorError::Key(format!("{}: {e}", path.display())))?;
    let stamp: FileStamp = (
        meta.modified()
            .map_err(|e| CoordinatorError::Key(format!("{}: {e}", path.display())))?,
        meta.len(),
        meta.ino(),
    );
    {
        let cache = KEY_FILES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, keys)) = cache.as_ref().and_then(|c| c.get(path))
            && *s == stamp
        {
            return Ok(keys.clone());
        }
    }
    let keys = std::sync::Arc::new(read_authorized_keys(path)?);
    let mut cache = KEY_FILES.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    if cache.len() > 64 {
        cache.clear();
    }
    cache.insert(path.to_path_buf(), (stamp, keys.clone()));
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CoordinatorConfig::new(dir.path());
        config.cache_key_name = Some("farm-test-1".into());
        let k1 = cache_signing_key(&config).unwrap();
        let k2 = cache_signing_key(&config).unwrap();
        assert_eq!(k1.to_secret_string(), k2.to_secret_string());
        assert!(k1.verifying_key().to_string().starts_with("farm-test-1:"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("cache-key.sec"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        let h1 = ssh_host_key(dir.path()).unwrap();
        let h2 = ssh_host_key(dir.path()).unwrap();
        assert_eq!(h1.public_key(), h2.public_key());
        assert!(public_key_line(h1.public_key()).starts_with("ssh-ed25519 AAAA"));

        let t1 = tls_files(&config, &["farm.example".into()]).unwrap();
        let t2 = tls_files(&config, &[]).unwrap();
        assert_eq!(t1.cert_pem, t2.cert_pem);
        assert!(String::from_utf8_lossy(&t1.cert_pem).contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn atomic_writes_are_private_and_clean_up() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        // a leftover of a crashed write
        std::fs::write(dir.path().join(".secret.tmp1234"), b"old").unwrap();
        write_file_atomic(&path, b"one", 0o600).unwrap();
        write_file_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        write_file_atomic(&path, b"three", 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["secret".to_string()]);
    }

    #[test]
    fn key_files_are_cached_by_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let a = ssh_host_key(&dir.path().join("a")).unwrap();
        let b = ssh_host_key(&dir.path().join("b")).unwrap();
        let line_a = public_key_line(a.public_key());
        let line_b = public_key_line(b.public_key());
        assert_eq!(line_a.len(), line_b.len());
        let file = dir.path().join("keys");
        std::fs::write(&file, format!("{line_a}\n")).unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let first = cached_authorized_keys(&file).unwrap();
        assert_eq!(first[0].key, parse_ed25519_line(&line_a).unwrap());
        // Same length, same mtime, same inode: the cached parse is used.
        {
            let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            f.write_all(format!("{line_b}\n").as_bytes()).unwrap();
            f.set_modified(mtime).unwrap();
        }
        let second = cached_authorized_keys(&file).unwrap();
        assert_eq!(second[0].key, parse_ed25519_line(&line_a).unwrap());
        // A new mtime: read again.
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime + std::time::Duration::from_secs(5))
            .unwrap();
        let third = cached_authorized_keys(&file).unwrap();
        assert_eq!(third[0].key, parse_ed25519_line(&line_b).unwrap());
    }

    #[test]
    fn authorized_keys_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let a = ssh_host_key(dir.path()).unwrap();
        let line = a.public_key().to_openssh().unwrap();
        let text = format!(
            "# comment\n\n{line}\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDCd5dkzGmO7Ce3ml1eq2u9D2f5nzDj6dhsPObcFv5fG0TtqMXGmpBoKi1CqbFB2RxPzfDqtn2aCT+qXD5+QR/rW6l6fk1kBf2ZbLPdrd0I89gkq5awUU3w5gPJQ58dJN4IQ1gQCl4kDgjYiuBaM3/8qVGGVo3mmx7UOdhPWh2fMQ== rsa\n"
        );
        let keys = parse_authorized_keys(&text).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key, parse_ed25519_line(&line).unwrap());
        assert!(parse_authorized_keys("ssh-ed25519 notbase64!!\n").is_err());
        assert!(fingerprint_ed25519(&keys[0].key).starts_with("SHA256:"));
    }
}
