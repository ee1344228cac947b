//! The coordinator's own keys, generated in the state directory on first start
//! and reused afterwards (all secret files mode 0600):
//! - `cache-key.sec` / `cache-key.pub`: the cache signing key, Nix format `name:base64`
//!   (unless `--cache-key-file` names an existing one);
//! - `ssh_host_ed25519_key` / `.pub`: the SSH endpoint's host key, OpenSSH format;
//! - `tls/cert.pem` / `tls/key.pem`: a self-signed TLS certificate for gRPC, when
//!   TLS is on and no `--tls-cert` is given.
//!
//! The enrolled builder, user and admin keys (OpenSSH `authorized_keys` files)
//! are read by `farm_common::keys`, re-exported here; only ed25519 keys take
//! part in the farm's signatures.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use farm_nix::signing::SigningKey;
use ssh_key::{Algorithm, LineEnding, PrivateKey};

use crate::CoordinatorError;
use crate::config::CoordinatorConfig;

/// Write `contents` to `path` atomically with `mode`: a fresh temporary file
/// (created exclusively, mode 0600 from the start, so a secret is never readable
/// by others even for a moment) is written, synced, given `mode`, renamed in
/// place, and the directory synced. Temporary files a crash left behind are removed.
pub(crate) fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
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

/// Read a small text file, refusing anything over [`farm_common::keys::MAX_KEY_FILE`].
pub(crate) fn read_small_file(path: &Path) -> Result<String, CoordinatorError> {
    Ok(farm_common::keys::read_small_file(path)?)
}

/// The cache signing key: `--cache-key-file`, or `DIR/cache-key.sec` (generated
/// with the configured name when missing). Also writes `DIR/cache-key.pub`.
pub(crate) fn cache_signing_key(
    config: &CoordinatorConfig,
) -> Result<SigningKey, CoordinatorError> {
    let key = match &config.cache_key_file {
        Some(file) => {
            SigningKey::read_file(file).map_err(|source| CoordinatorError::SigningKey {
                path: file.clone(),
                source,
            })?
        }
        None => {
            let path = config.state_dir.join("cache-key.sec");
            SigningKey::load_or_generate(&path, &config.cache_key_name())
                .map_err(|source| CoordinatorError::SigningKey { path, source })?
        }
    };
    let public = format!("{}\n", key.verifying_key());
    let pub_path = config.state_dir.join("cache-key.pub");
    if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(public.as_str()) {
        write_file_atomic(&pub_path, public.as_bytes(), 0o644).map_err(|source| {
            CoordinatorError::WriteKey {
                path: pub_path.clone(),
                source,
            }
        })?;
    }
    Ok(key)
}

/// The SSH host key `DIR/ssh_host_ed25519_key` (OpenSSH format), generated when missing.
pub(crate) fn ssh_host_key(state_dir: &Path) -> Result<PrivateKey, CoordinatorError> {
    let path = state_dir.join("ssh_host_ed25519_key");
    let kerr = |source: ssh_key::Error| CoordinatorError::HostKey {
        path: path.clone(),
        source,
    };
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CoordinatorError::WriteKey { path, source }
    };
    if path.exists() {
        let text = read_small_file(&path)?;
        return PrivateKey::from_openssh(text.as_bytes()).map_err(kerr);
    }
    let mut key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).map_err(kerr)?;
    key.set_comment("nix-farm coordinator");
    let text = key.to_openssh(LineEnding::LF).map_err(kerr)?;
    write_file_atomic(&path, text.as_bytes(), 0o600).map_err(werr(&path))?;
    let public = key.public_key().to_openssh().map_err(kerr)?;
    let pub_path = state_dir.join("ssh_host_ed25519_key.pub");
    write_file_atomic(&pub_path, format!("{public}\n").as_bytes(), 0o644)
        .map_err(werr(&pub_path))?;
    Ok(key)
}

/// PEM certificate chain and private key for the gRPC listener.
#[derive(Clone)]
pub(crate) struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub cert_path: PathBuf,
}

/// The TLS certificate: `--tls-cert`/`--tls-key`, or the self-signed one in
/// `DIR/tls/`, generated when missing for `names` (host names and IPs).
pub(crate) fn tls_files(
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
                let ck = rcgen::generate_simple_self_signed(sans)?;
                let werr = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| CoordinatorError::WriteKey { path, source }
                };
                write_file_atomic(&key, ck.key_pair.serialize_pem().as_bytes(), 0o600)
                    .map_err(werr(&key))?;
                write_file_atomic(&cert, ck.cert.pem().as_bytes(), 0o644).map_err(werr(&cert))?;
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

// The authorized_keys parser and the public key helpers are the farm's
// shared ones (one parser for builder enrolment, CLI calls and the SSH
// endpoint).
pub(crate) use farm_common::keys::{
    AuthorizedKey, cached_authorized_keys, fingerprint_ed25519, parse_ed25519_line,
    public_key_line, public_key_line_ed25519,
};

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
}
