//! `farm keys`: generate a binary cache signing key or an SSH key pair, and
//! rotate a coordinator's cache signing key without leaving anything in the
//! cache unverifiable.
//!
//! Rotation (`farm keys rotate-cache --state-dir DIR`, coordinator stopped):
//! 1. every `<hash>.narinfo` in the local cache directory that carries a valid
//!    signature by the current key gets a second signature by the new key
//!    (written atomically, one file at a time, so an interruption leaves each
//!    narinfo either as it was or with both signatures; rerunning is safe);
//! 2. only then the new key replaces `cache-key.sec`/`cache-key.pub`, the old
//!    one being kept as `cache-key.old.sec`/`.pub`.
//!
//! Clients trust both public keys during the switch; everything old carries
//! both signatures, everything new the new one, so dropping the old key later
//! loses nothing.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use farm_nix::narinfo::NarInfo;
use farm_nix::signing::{SigningKey, VerifyingKey};

use crate::args::{CacheKeyArgs, RotateCacheArgs, SshKeyArgs};
use crate::error::CliError;

/// Largest narinfo file read during rotation.
const MAX_NARINFO: u64 = 1024 * 1024;

/// Write `contents` to `path` atomically with `mode` (temp file, then rename).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CliError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| CliError::io_path("creating", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| CliError::io_path("writing", path, e))
}

/// `FILE.pub` beside `FILE`.
fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Refuse to overwrite an existing key.
fn must_not_exist(path: &Path) -> Result<(), CliError> {
    if path.exists() {
        return Err(CliError::Usage(format!(
            "{} exists already; remove it first or choose another --out",
            path.display()
        )));
    }
    Ok(())
}

/// Generate an OpenSSH ed25519 key pair at `path` (0600) and `path.pub`;
/// returns the public line.
pub fn write_ssh_key(path: &Path, comment: &str) -> Result<String, CliError> {
    let mut key = ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(|e| CliError::Config(format!("generating an SSH key: {e}")))?;
    key.set_comment(comment);
    let private = key
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| CliError::Config(format!("encoding the SSH key: {e}")))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| CliError::Config(format!("encoding the SSH key: {e}")))?;
    write_atomic(path, private.as_bytes(), 0o600)?;
    write_atomic(&pub_path(path), format!("{public}\n").as_bytes(), 0o644)?;
    Ok(public)
}

/// `farm keys ssh`.
pub fn ssh(args: &SshKeyArgs) -> Result<(), CliError> {
    must_not_exist(&args.out)?;
    let comment = args.comment.clone().unwrap_or_else(default_comment);
    let public = write_ssh_key(&args.out, &comment)?;
    eprintln!(
        "wrote {} (private, 0600) and {}",
        args.out.display(),
        pub_path(&args.out).display()
    );
    println!("{public}");
    Ok(())
}

fn default_comment() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "farm".into());
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// `farm keys cache`.
pub fn cache(args: &CacheKeyArgs) -> Result<(), CliError> {
    let key = SigningKey::generate(&args.name)
        .map_err(|e| CliError::Usage(format!("key name {:?}: {e}", args.name)))?;
    let public = key.verifying_key().to_string();
    match &args.out {
        Some(out) => {
            must_not_exist(out)?;
            write_atomic(
                out,
                format!("{}\n", key.to_secret_string()).as_bytes(),
                0o600,
            )?;
            write_atomic(&pub_path(out), format!("{public}\n").as_bytes(), 0o644)?;
            eprintln!(
                "wrote {} (secret, 0600) and {}; trust it with:\n  trusted-public-keys = {public}",
                out.display(),
                pub_path(out).display()
            );
            println!("{public}");
        }
        None => {
            println!("secret: {}", key.to_secret_string());
            println!("public: {public}");
        }
    }
    Ok(())
}

/// The next key name: `host-1` → `host-2`, `host` → `host-2`.
pub fn next_key_name(old: &str) -> String {
    if let Some((base, n)) = old.rsplit_once('-')
        && let Ok(n) = n.parse::<u64>()
    {
        return format!("{base}-{}", n.saturating_add(1));
    }
    format!("{old}-2")
}

/// What a rotation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Narinfos that now carry the new key's signature too.
    pub resigned: usize,
    /// Narinfos that had it already (a rerun).
    pub already: usize,
    /// Narinfos without a valid signature by the old key (left alone).
    pub skipped: Vec<PathBuf>,
}

/// Add `new`'s signature to every narinfo in `cache_dir` that `old` signed.
pub fn resign_narinfos(
    cache_dir: &Path,
    old: &VerifyingKey,
    new: &SigningKey,
) -> Result<RotationReport, CliError> {
    let mut report = RotationReport::default();
    let new_vk = new.verifying_key();
    let entries =
        std::fs::read_dir(cache_dir).map_err(|e| CliError::io_path("reading", cache_dir, e))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CliError::io_path("reading", cache_dir, e))?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "narinfo")
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            files.push(path);
        }
    }
    files.sort();
    for path in files {
        let meta = std::fs::metadata(&path).map_err(|e| CliError::io_path("reading", &path, e))?;
        if meta.len() > MAX_NARINFO {
            report.skipped.push(path);
            continue;
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| CliError::io_path("reading", &path, e))?;
        let Ok(mut ni) = NarInfo::parse(&text) else {
            report.skipped.push(path);
            continue;
        };
        if ni.info.verify_any(std::slice::from_ref(&new_vk)) {
            report.already += 1;
            continue;
        }
        if !ni.info.verify_any(std::slice::from_ref(old)) {
            report.skipped.push(path);
            continue;
        }
        ni.info.sign(new);
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            meta.permissions().mode() & 0o777
        };
        write_atomic(&path, ni.render().as_bytes(), mode)?;
        report.resigned += 1;
    }
    Ok(report)
}

/// Whether something listens at the gRPC address in `STATE/endpoints.json`.
fn coordinator_running(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state_dir.join("endpoints.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let grpc = v.get("grpc")?.as_str()?.to_owned();
    use std::net::ToSocketAddrs;
    let addr = grpc.to_socket_addrs().ok()?.next()?;
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500))
        .ok()
        .map(|_| grpc)
}

/// `farm keys rotate-cache`.
pub fn rotate_cache(args: &RotateCacheArgs) -> Result<(), CliError> {
    let state = &args.state_dir;
    if let Some(addr) = coordinator_running(state) {
        return Err(CliError::Usage(format!(
            "a coordinator is running on {addr} with state in {}: stop it first (it keeps the narinfos in memory and signs with the key it started with)",
            state.display()
        )));
    }
    let sec = state.join("cache-key.sec");
    let old = SigningKey::read_file(&sec).map_err(|e| {
        CliError::Config(format!(
            "{}: {e} (is --state-dir the coordinator's state directory?)",
            sec.display()
        ))
    })?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| next_key_name(old.name()));
    if name == old.name() {
        return Err(CliError::Usage(format!(
            "the new key needs a name other than the current one ({name})"
        )));
    }
    let new = SigningKey::generate(&name)
        .map_err(|e| CliError::Usage(format!("key name {name:?}: {e}")))?;
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| state.join("cache"));
    if !cache_dir.is_dir() {
        return Err(CliError::Usage(format!(
            "{} is not a directory: pass the coordinator's local cache directory with --cache-dir",
            cache_dir.display()
        )));
    }
    let old_vk = old.verifying_key();
    let report = resign_narinfos(&cache_dir, &old_vk, &new)?;
    // Keep the old key, then switch.
    write_atomic(
        &state.join("cache-key.old.sec"),
        format!("{}\n", old.to_secret_string()).as_bytes(),
        0o600,
    )?;
    write_atomic(
        &state.join("cache-key.old.pub"),
        format!("{old_vk}\n").as_bytes(),
        0o644,
    )?;
    write_atomic(
        &sec,
        format!("{}\n", new.to_secret_string()).as_bytes(),
        0o600,
    )?;
    write_atomic(
        &state.join("cache-key.pub"),
        format!("{}\n", new.verifying_key()).as_bytes(),
        0o644,
    )?;
    eprintln!(
        "re-signed {} narinfos ({} had the new signature already); {} left alone (no valid signature by {})",
        report.resigned,
        report.already,
        report.skipped.len(),
        old.name()
    );
    for p in report.skipped.iter().take(10) {
        eprintln!("  left alone: {}", p.display());
    }
    println!(
        "The coordinator signs with {name} from its next start. During the switch, clients trust both keys:\n  trusted-public-keys = {} {old_vk}\nOnce every client trusts {name}, drop {}.",
        new.verifying_key(),
        old.name()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_nix::hash::Hash;
    use farm_nix::path_info::ValidPathInfo;
    use farm_nix::store_path::StorePath;

    #[test]
    fn key_names_increment() {
        assert_eq!(next_key_name("farm.example.org-1"), "farm.example.org-2");
        assert_eq!(next_key_name("farm"), "farm-2");
        assert_eq!(next_key_name("my-farm"), "my-farm-2");
    }

    fn narinfo(path: &str, key: &SigningKey) -> NarInfo {
        let mut info = ValidPathInfo::new(
            StorePath::parse(path).unwrap(),
            Hash::parse_any("sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s").unwrap(),
            120,
        );
        info.sign(key);
        NarInfo {
            info,
            url: "nar/1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: None,
            file_size: None,
        }
    }

    #[test]
    fn rotation_keeps_everything_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let cache = state.join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        let old = SigningKey::generate("farm-1").unwrap();
        let stranger = SigningKey::generate("other-1").unwrap();
        std::fs::write(state.join("cache-key.sec"), old.to_secret_string()).unwrap();
        let a = narinfo("/nix/store/6nl4qigvdbfkgqr6zrfcl7w325ll5079-a", &old);
        let b = narinfo("/nix/store/nlbcvvibdaxfc09nafh29bvw5xb6q6qv-b", &stranger);
        std::fs::write(
            cache.join("6nl4qigvdbfkgqr6zrfcl7w325ll5079.narinfo"),
            a.render(),
        )
        .unwrap();
        std::fs::write(
            cache.join("nlbcvvibdaxfc09nafh29bvw5xb6q6qv.narinfo"),
            b.render(),
        )
        .unwrap();
        std::fs::write(cache.join("junk.narinfo"), "garbage").unwrap();

        rotate_cache(&RotateCacheArgs {
            state_dir: state.to_path_buf(),
            name: None,
            cache_dir: None,
        })
        .unwrap();

        let new = SigningKey::read_file(&state.join("cache-key.sec")).unwrap();
        assert_eq!(new.name(), "farm-2");
        let kept = SigningKey::read_file(&state.join("cache-key.old.sec")).unwrap();
        assert_eq!(kept.to_secret_string(), old.to_secret_string());
        assert_eq!(
            std::fs::read_to_string(state.join("cache-key.pub"))
                .unwrap()
                .trim(),
            new.verifying_key().to_string()
        );
        let text = std::fs::read_to_string(cache.join("6nl4qigvdbfkgqr6zrfcl7w325ll5079.narinfo"))
            .unwrap();
        let ni = NarInfo::parse(&text).unwrap();
        // verifiable under either key alone
        assert!(ni.info.verify_any(&[old.verifying_key()]));
        assert!(ni.info.verify_any(&[new.verifying_key()]));
        assert_eq!(ni.info.sigs.len(), 2);
        // not ours: untouched
        let text = std::fs::read_to_string(cache.join("nlbcvvibdaxfc09nafh29bvw5xb6q6qv.narinfo"))
            .unwrap();
        assert_eq!(text, b.render());

        // a second rotation from farm-2 to farm-3 keeps all three valid for a
        // narinfo that went through both
        rotate_cache(&RotateCacheArgs {
            state_dir: state.to_path_buf(),
            name: None,
            cache_dir: None,
        })
        .unwrap();
        let text = std::fs::read_to_string(cache.join("6nl4qigvdbfkgqr6zrfcl7w325ll5079.narinfo"))
            .unwrap();
        let ni = NarInfo::parse(&text).unwrap();
        assert_eq!(ni.info.sigs.len(), 3);
        let newest = SigningKey::read_file(&state.join("cache-key.sec")).unwrap();
        assert_eq!(newest.name(), "farm-3");
        assert!(ni.info.verify_any(&[newest.verifying_key()]));
    }

    #[test]
    fn resign_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::generate("farm-1").unwrap();
        let new = SigningKey::generate("farm-2").unwrap();
        let a = narinfo("/nix/store/6nl4qigvdbfkgqr6zrfcl7w325ll5079-a", &old);
        std::fs::write(
            dir.path().join("6nl4qigvdbfkgqr6zrfcl7w325ll5079.narinfo"),
            a.render(),
        )
        .unwrap();
        let r1 = resign_narinfos(dir.path(), &old.verifying_key(), &new).unwrap();
        assert_eq!((r1.resigned, r1.already), (1, 0));
        let r2 = resign_narinfos(dir.path(), &old.verifying_key(), &new).unwrap();
        assert_eq!((r2.resigned, r2.already), (0, 1));
    }

    #[test]
    fn generated_keys_parse() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("k");
        cache(&CacheKeyArgs {
            name: "farm-1".into(),
            out: Some(out.clone()),
        })
        .unwrap();
        let sk = SigningKey::read_file(&out).unwrap();
        let vk = VerifyingKey::read_file(&pub_path(&out)).unwrap();
        assert_eq!(sk.verifying_key().to_string(), vk.to_string());
        // refuses to overwrite
        assert!(
            cache(&CacheKeyArgs {
                name: "farm-1".into(),
                out: Some(out),
            })
            .is_err()
        );
        let ssh = dir.path().join("id");
        let line = write_ssh_key(&ssh, "a@b").unwrap();
        assert!(line.starts_with("ssh-ed25519 "));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&ssh).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
