//! OpenSSH public keys and `authorized_keys` files: the one parser behind the
//! coordinator's `--builder-keys`, `--authorized-keys` and `--admin-keys`, used
//! by the gRPC checks (builder enrolment, CLI calls) and the SSH Nix endpoint
//! alike.
//!
//! A file is a list of typed keys ([`AuthorizedKey`]) of any algorithm OpenSSH
//! writes (ed25519, RSA, ECDSA, …): the SSH endpoint accepts them all, the
//! farm's own signatures (builder challenge, CLI calls) only ed25519 ones.
//! Blank lines and `#` comments are skipped; an options prefix
//! (`restrict,from="10.0.0.0/8" ssh-ed25519 …`) is parsed and kept with the
//! key ([`crate::key_options`]: each option is honoured or refused); any other
//! line that is not a key is an error naming the file and line, so a typo
//! never silently drops a key (or, worse, reads as "nobody").
//!
//! Files are re-read when they change ([`cached_authorized_keys`]: a `stat`
//! per check, a parse when the modification time, length or inode moved), so
//! keys can be added and removed without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ssh_key::public::{Ed25519PublicKey, KeyData};
use ssh_key::{HashAlg, PublicKey};

use crate::Error;
use crate::key_options::KeyOptions;

/// Largest key or authorized_keys file read.
pub const MAX_KEY_FILE: u64 = 4 * 1024 * 1024;
/// Longest single public key line accepted (far above a 16k-bit RSA key).
pub const MAX_KEY_LINE: usize = 16 * 1024;

/// One entry of an authorized_keys file.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    key: KeyData,
    comment: String,
    options: KeyOptions,
}

impl std::fmt::Debug for AuthorizedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.fingerprint(), self.comment)
    }
}

impl AuthorizedKey {
    /// A key with the comment it is known by.
    pub fn new(key: KeyData, comment: impl Into<String>) -> Self {
        AuthorizedKey {
            key,
            comment: comment.into(),
            options: KeyOptions::default(),
        }
    }

    /// The entry's options (`from=`, `command=`, …).
    pub fn options(&self) -> &KeyOptions {
        &self.options
    }

    /// Whether a client at `peer` may use this entry (its `from=`).
    pub fn admits(&self, peer: Option<std::net::IpAddr>) -> bool {
        self.options.admits(peer)
    }

    /// The key itself.
    pub fn key_data(&self) -> &KeyData {
        &self.key
    }

    /// The raw ed25519 public key, when it is one (the only kind the farm's
    /// own signatures use).
    pub fn ed25519(&self) -> Option<[u8; 32]> {
        self.key.ed25519().map(|k| k.0)
    }

    /// The entry's comment (often `user@host`).
    pub fn comment(&self) -> &str {
        &self.comment
    }

    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(HashAlg::Sha256).to_string()
    }

    /// Whether `offered` is this key (comments do not matter).
    pub fn matches(&self, offered: &KeyData) -> bool {
        &self.key == offered
    }
}

/// Parse authorized_keys text. `path` only names the file in errors.
pub fn parse_authorized_keys(text: &str, path: Option<&Path>) -> Result<Vec<AuthorizedKey>, Error> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |message: String| Error::BadLine {
            path: path.map(Path::to_path_buf),
            line: n + 1,
            message,
        };
        if line.len() > MAX_KEY_LINE {
            return Err(bad("line too long for a public key".into()));
        }
        let (pk, options) = parse_entry(line).map_err(bad)?;
        let mut key = AuthorizedKey::new(pk.key_data().clone(), pk.comment());
        key.options = options;
        keys.push(key);
    }
    Ok(keys)
}

/// One non-comment line: `[options] ALGORITHM BASE64 [comment]`; the options
/// are parsed ([`KeyOptions::parse`]), an unsupported one is an error.
fn parse_entry(line: &str) -> Result<(PublicKey, KeyOptions), String> {
    if let Ok(pk) = PublicKey::from_openssh(line) {
        return Ok((pk, KeyOptions::default()));
    }
    let Some((options, rest)) = split_options(line) else {
        return Err("not an OpenSSH public key".into());
    };
    let pk = PublicKey::from_openssh(rest.trim_start())
        .map_err(|e| format!("not an OpenSSH public key after the options {options:?}: {e}"))?;
    Ok((pk, KeyOptions::parse(options)?))
}

/// Split an options prefix off at the first blank outside double quotes
/// (inside them `\"` is a literal quote, as in OpenSSH).
fn split_options(line: &str) -> Option<(&str, &str)> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Some((&line[..i], &line[i..])),
            _ => {}
        }
    }
    None
}

/// Read a small text file (a key or a key list), refusing one over [`MAX_KEY_FILE`].
pub fn read_small_file(path: &Path) -> Result<String, Error> {
    let err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(err)?.len();
    if len > MAX_KEY_FILE {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            len,
            max: MAX_KEY_FILE,
        });
    }
    std::fs::read_to_string(path).map_err(err)
}

/// Read and parse an authorized_keys file (blocking).
pub fn read_authorized_keys(path: &Path) -> Result<Vec<AuthorizedKey>, Error> {
    parse_authorized_keys(&read_small_file(path)?, Some(path))
}

/// What identifies a version of a key file without reading it.
type FileStamp = (std::time::SystemTime, u64, u64);

/// Parsed files by path, with the stamp they were read at.
type KeyFileCache = HashMap<PathBuf, (FileStamp, Arc<Vec<AuthorizedKey>>)>;

static KEY_FILES: Mutex<Option<KeyFileCache>> = Mutex::new(None);

/// As [`read_authorized_keys`], but re-reads and re-parses the file only when
/// its modification time, length or inode changed (a `stat` per call
/// otherwise). A file that turned malformed is an error until it is fixed,
/// never the last good version. Blocking: call it off the async runtime.
pub fn cached_authorized_keys(path: &Path) -> Result<Arc<Vec<AuthorizedKey>>, Error> {
    use std::os::unix::fs::MetadataExt;
    let err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    let stamp: FileStamp = (meta.modified().map_err(err)?, meta.len(), meta.ino());
    {
        // The map is only ever replaced whole-entry, so a poisoned lock holds
        // nothing half-written.
        let cache = KEY_FILES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, keys)) = cache.as_ref().and_then(|c| c.get(path))
            && *s == stamp
        {
            return Ok(keys.clone());
        }
    }
    let keys = Arc::new(read_authorized_keys(path)?);
    let mut cache = KEY_FILES.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    if cache.len() > 64 {
        cache.clear();
    }
    cache.insert(path.to_path_buf(), (stamp, keys.clone()));
    Ok(keys)
}

/// The first entry of `files` (in order) that `found` accepts. Every file up
/// to the match is read; an unreadable or malformed one is an error.
pub fn find_in_files(
    files: &[PathBuf],
    found: impl Fn(&AuthorizedKey) -> bool,
) -> Result<Option<AuthorizedKey>, Error> {
    for f in files {
        if let Some(k) = cached_authorized_keys(f)?.iter().find(|k| found(k)) {
            return Ok(Some(k.clone()));
        }
    }
    Ok(None)
}

/// A single OpenSSH public key line (`ssh-ed25519 AAAA… comment`), any algorithm.
pub fn parse_public_key_line(line: &str) -> Result<PublicKey, Error> {
    if line.len() > MAX_KEY_LINE {
        return Err(Error::PublicKey("public key line too long".into()));
    }
    PublicKey::from_openssh(line.trim())
        .map_err(|e| Error::PublicKey(format!("not an OpenSSH public key: {e}")))
}

/// The ed25519 public key bytes of an OpenSSH public key line; any other
/// algorithm is refused.
pub fn parse_ed25519_line(line: &str) -> Result<[u8; 32], Error> {
    let key = parse_public_key_line(line)?;
    key.key_data().ed25519().map(|k| k.0).ok_or_else(|| {
        Error::PublicKey(format!(
            "only ssh-ed25519 keys are supported, not {}",
            key.algorithm()
        ))
    })
}

/// `SHA256:…` fingerprint of an ed25519 public key, as `ssh-keygen -l` prints it.
pub fn fingerprint_ed25519(key: &[u8; 32]) -> String {
    KeyData::Ed25519(Ed25519PublicKey(*key))
        .fingerprint(HashAlg::Sha256)
        .to_string()
}

/// `ssh-ed25519 AAAA…` (no comment) of raw ed25519 public key bytes.
pub fn public_key_line_ed25519(key: &[u8; 32]) -> String {
    public_key_line(&PublicKey::from(KeyData::Ed25519(Ed25519PublicKey(*key))))
}

/// `ALGORITHM AAAA…` without the comment.
pub fn public_key_line(key: &PublicKey) -> String {
    let mut k = key.clone();
    k.set_comment("");
    k.to_openssh().unwrap_or_default().trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDCd5dkzGmO7Ce3ml1eq2u9D2f5nzDj6dhsPObcFv5fG0TtqMXGmpBoKi1CqbFB2RxPzfDqtn2aCT+qXD5+QR/rW6l6fk1kBf2ZbLPdrd0I89gkq5awUU3w5gPJQ58dJN4IQ1gQCl4kDgjYiuBaM3/8qVGGVo3mmx7UOdhPWh2fMQ== rsa@host";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMqtkO1icyyoLCZ2GB9YLlon2klvlGIP1nfgh5M/jm/DB4+vFblzl8uoThVtrM7I8nGoLz0XVIV8TNfSPNX8/ww= ecdsa@host";

    fn ed25519_line(seed: u8, comment: &str) -> (String, [u8; 32]) {
        let raw = [seed; 32];
        let sk = ed25519_dalek::SigningKey::from_bytes(&raw);
        let pk = sk.verifying_key().to_bytes();
        let mut k = PublicKey::from(KeyData::Ed25519(Ed25519PublicKey(pk)));
        k.set_comment(comment);
        (k.to_openssh().unwrap(), pk)
    }

    #[test]
    fn every_key_type_with_comments_and_options() {
        let (ed, raw) = ed25519_line(1, "alice@laptop");
        let text = format!(
            "# the farm's users\n\n   \n{ed}\n{RSA}\n  {ECDSA}\nrestrict,command=\"nix-daemon --stdio --say \\\"hi there\\\"\" {}\nfrom=\"10.0.0.0/8\",no-pty\t{}\n",
            ed25519_line(2, "bob").0,
            ed25519_line(4, "carol with spaces").0,
        );
        let keys = parse_authorized_keys(&text, None).unwrap();
        assert_eq!(keys.len(), 5);
        assert_eq!(keys[4].comment(), "carol with spaces");
        assert_eq!(keys[0].ed25519(), Some(raw));
        assert_eq!(keys[0].comment(), "alice@laptop");
        assert!(keys[0].fingerprint().starts_with("SHA256:"));
        assert_eq!(keys[1].ed25519(), None);
        assert_eq!(
            keys[1].key_data().algorithm(),
            ssh_key::Algorithm::Rsa { hash: None }
        );
        assert_eq!(keys[1].comment(), "rsa@host");
        assert!(matches!(
            keys[2].key_data().algorithm(),
            ssh_key::Algorithm::Ecdsa { .. }
        ));
        assert_eq!(keys[2].comment(), "ecdsa@host");
        assert_eq!(keys[3].comment(), "bob");
        assert_eq!(keys[3].ed25519(), Some(ed25519_line(2, "").1));
        // matching is by key, not comment
        let offered = parse_public_key_line(RSA).unwrap();
        assert!(keys[1].matches(offered.key_data()));
        assert!(!keys[0].matches(offered.key_data()));
    }

    #[test]
    fn a_malformed_line_is_an_error_naming_file_and_line() {
        let (ed, _) = ed25519_line(1, "a");
        let text = format!("# ok\n{ed}\n\nssh-ed25519 notbase64!! x\n{RSA}\n");
        let e = parse_authorized_keys(&text, Some(Path::new("/etc/farm/users"))).unwrap_err();
        assert!(matches!(e, Error::BadLine { line: 4, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/farm/users: line 4: "), "{msg}");
        let e = parse_authorized_keys("not a key\n", None).unwrap_err();
        assert!(e.to_string().starts_with("line 1: "), "{e}");
        // Options followed by garbage, and an unterminated quote.
        let e = parse_authorized_keys(&format!("{ed}\nrestrict,command=\"x\" junk\n"), None)
            .unwrap_err();
        assert!(e.to_string().starts_with("line 2: "), "{e}");
        let e = parse_authorized_keys(&format!("command=\"x {ed}\n"), None).unwrap_err();
        assert!(e.to_string().starts_with("line 1: "), "{e}");
        let long = format!("ssh-ed25519 {}\n", "A".repeat(MAX_KEY_LINE));
        assert!(matches!(
            parse_authorized_keys(&long, None),
            Err(Error::BadLine { line: 1, .. })
        ));
    }

    #[test]
    fn single_lines() {
        let (ed, raw) = ed25519_line(3, "c");
        assert_eq!(parse_ed25519_line(&ed).unwrap(), raw);
        let e = parse_ed25519_line(RSA).unwrap_err();
        assert!(e.to_string().contains("only ssh-ed25519"), "{e}");
        assert!(parse_ed25519_line("garbage").is_err());
        assert!(parse_public_key_line(ECDSA).is_ok());
        assert_eq!(
            public_key_line_ed25519(&raw),
            ed.trim_end_matches(" c").to_owned()
        );
        assert!(fingerprint_ed25519(&raw).starts_with("SHA256:"));
    }

    #[test]
    fn files_are_reread_when_they_change_and_errors_name_the_file() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        let (a, ka) = ed25519_line(1, "a");
        let (b, kb) = ed25519_line(2, "b");
        assert_eq!(a.len(), b.len());
        std::fs::write(&file, format!("{a}\n")).unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        assert_eq!(
            cached_authorized_keys(&file).unwrap()[0].ed25519(),
            Some(ka)
        );
        // Same length, mtime and inode: the cached parse is used.
        {
            let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            f.write_all(format!("{b}\n").as_bytes()).unwrap();
            f.set_modified(mtime).unwrap();
        }
        assert_eq!(
            cached_authorized_keys(&file).unwrap()[0].ed25519(),
            Some(ka)
        );
        // A new mtime: read again.
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            cached_authorized_keys(&file).unwrap()[0].ed25519(),
            Some(kb)
        );
        // Broken: an error naming the file and line, not the last good version.
        std::fs::write(&file, format!("{b}\nbroken line\n")).unwrap();
        let e = cached_authorized_keys(&file).unwrap_err();
        assert_eq!(e.to_string().split(": ").nth(1), Some("line 2"), "{e}");
        assert!(e.to_string().starts_with(&file.display().to_string()));
        // Missing file.
        let e = cached_authorized_keys(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        // find_in_files: in order, stopping at the first match.
        let other = dir.path().join("other");
        std::fs::write(&other, format!("{a}\n")).unwrap();
        let found =
            find_in_files(std::slice::from_ref(&other), |k| k.ed25519() == Some(ka)).unwrap();
        assert_eq!(found.unwrap().comment(), "a");
        assert!(find_in_files(&[other.clone(), file.clone()], |k| k.ed25519() == Some(ka)).is_ok());
        assert!(find_in_files(&[file, other], |k| k.ed25519() == Some(ka)).is_err());
    }
}
