//! Who may do what: the four access levels and the key files that grant them.
//!
//! | level | key file            | may                                                          |
//! |-------|---------------------|--------------------------------------------------------------|
//! | read  | `--read-keys`       | status, logs, watch, machines; query and fetch from the cache |
//! | build | `--authorized-keys` | also submit `.drv` builds and build-hook builds (unverified ones as its own claim builds); upload inputs as its own unsigned claims |
//! | push  | `--push-keys`       | also signed uploads, signed hook outputs, named jobs        |
//! | admin | `--admin-keys`      | also drain, cancel; includes push                             |
//!
//! A key's level is the highest file whose entry for it admits the client's
//! address (`from=`, see [`farm_common::key_options`]): the files are tried
//! from admin down to read, so an admin entry limited to the LAN still lets
//! the same key build from elsewhere when it is in `--authorized-keys` too.
//! There is no open mode: a coordinator with no key files accepts no client,
//! on loopback too (`farm up` generates and authorizes its user's key, as an
//! [`KeyPolicy::extra`] entry at admin level rather than a file).
//!
//! The files are re-read when they change (a `stat` per check), so keys are
//! added and removed without a restart; a file that cannot be read or has a
//! malformed line refuses every key (logged with the file and line) rather
//! than being half-used.

use std::net::IpAddr;
use std::path::PathBuf;

use farm_common::keys::{AuthorizedKey, cached_authorized_keys};
use ssh_key::public::KeyData;

use crate::CoordinatorError;

/// What a client may do; each level includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Status, logs, watch, machines, cache queries and downloads.
    Read,
    /// Also builds (`.drv` submissions, build-hook builds) and unsigned uploads.
    Build,
    /// Also signed uploads and signed hook-build outputs.
    Push,
    /// Also drain, cancel.
    Admin,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Build => "build",
            Level::Push => "push",
            Level::Admin => "admin",
        }
    }

    /// The flag whose file grants this level.
    pub fn flag(self) -> &'static str {
        match self {
            Level::Read => "--read-keys",
            Level::Build => "--authorized-keys",
            Level::Push => "--push-keys",
            Level::Admin => "--admin-keys",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated client: its key's identity and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `SHA256:…` of the key (or `relay:NAME` for the stdio relay).
    pub fingerprint: String,
    /// The comment of the granting entry (often user@host).
    pub comment: String,
    pub level: Level,
    /// `command=` of the granting entry: the only program it may run over SSH.
    pub forced_command: Option<String>,
}

impl Principal {
    /// Whether this client may do what `needed` allows.
    pub fn may(&self, needed: Level) -> bool {
        self.level >= needed
    }
}

/// The key files, one per level, and keys granted by the program itself.
#[derive(Debug, Clone, Default)]
pub struct KeyPolicy {
    pub read: Option<PathBuf>,
    pub build: Option<PathBuf>,
    pub push: Option<PathBuf>,
    pub admin: Option<PathBuf>,
    /// Keys granted a level without a file (`farm up`: its generated client
    /// key and its user's `~/.ssh` keys, at admin). Checked like a file's
    /// entries at that level, before the files of the same level.
    pub extra: Vec<(Level, AuthorizedKey)>,
}

/// Why a key was not granted anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No file lists the key.
    Unknown,
    /// Listed, but every entry's `from=` refuses this address.
    FromRefused,
}

impl KeyPolicy {
    /// Whether no key file is configured (then nobody is accepted).
    pub fn is_empty(&self) -> bool {
        self.files().next().is_none() && self.extra.is_empty()
    }

    /// The configured files, highest level first.
    fn files(&self) -> impl Iterator<Item = (Level, &PathBuf)> {
        [
            (Level::Admin, &self.admin),
            (Level::Push, &self.push),
            (Level::Build, &self.build),
            (Level::Read, &self.read),
        ]
        .into_iter()
        .filter_map(|(l, f)| f.as_ref().map(|f| (l, f)))
    }

    /// The principal `key` is at a client connecting from `peer` (`None`: not
    /// an IP client). Blocking (a `stat` per file, a parse when one changed):
    /// call it off the async runtime. Any configured file that cannot be read
    /// or parsed is an error: a typo must not silently change levels.
    pub fn principal(
        &self,
        key: &KeyData,
        peer: Option<IpAddr>,
    ) -> Result<Result<Principal, Refusal>, CoordinatorError> {
        let mut listed = false;
        let mut found: Option<(Level, AuthorizedKey)> = None;
        let mut consider = |level: Level, entries: &mut dyn Iterator<Item = &AuthorizedKey>| {
            if found.is_some() {
                return;
            }
            for e in entries.filter(|e| e.matches(key)) {
                listed = true;
                if e.admits(peer) {
                    found = Some((level, e.clone()));
                    return;
                }
            }
        };
        for level in [Level::Admin, Level::Push, Level::Build, Level::Read] {
            consider(
                level,
                &mut self
                    .extra
                    .iter()
                    .filter(|(l, _)| *l == level)
                    .map(|(_, e)| e),
            );
            let file = match level {
                Level::Admin => &self.admin,
                Level::Push => &self.push,
                Level::Build => &self.build,
                Level::Read => &self.read,
            };
            if let Some(file) = file {
                // Read even after a match: a broken file is an error whatever matched.
                let entries = cached_authorized_keys(file)?;
                consider(level, &mut entries.iter());
            }
        }
        Ok(match found {
            Some((level, entry)) => Ok(Principal {
                fingerprint: entry.fingerprint(),
                comment: entry.comment().to_owned(),
                level,
                forced_command: entry.options().command.clone(),
            }),
            None if listed => Err(Refusal::FromRefused),
            None => Err(Refusal::Unknown),
        })
    }

    /// Read every configured file once (at startup): a broken one is an error now.
    pub fn check_files(&self) -> Result<(), CoordinatorError> {
        for (_, f) in self.files() {
            cached_authorized_keys(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8, comment: &str, options: &str) -> (KeyData, String) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let data = KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(
            sk.verifying_key().to_bytes(),
        ));
        let mut pk = ssh_key::PublicKey::from(data.clone());
        pk.set_comment(comment);
        let line = pk.to_openssh().unwrap();
        let line = if options.is_empty() {
            line
        } else {
            format!("{options} {line}")
        };
        (data, line)
    }

    #[test]
    fn the_highest_admitting_entry_decides() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_admin) = key(1, "alice", r#"from="10.0.0.0/8""#);
        let (_, a_build) = key(1, "alice-anywhere", "");
        let (b, b_push) = key(2, "bob", "");
        let (c, c_read) = key(3, "carol", r#"command="nix-store --serve""#);
        let (d, _) = key(4, "dave", "");
        let (e, e_lan) = key(5, "eve", r#"from="192.168.0.0/16""#);
        let w = |name: &str, lines: &[&String]| {
            let p = dir.path().join(name);
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            std::fs::write(&p, text).unwrap();
            p
        };
        let policy = KeyPolicy {
            admin: Some(w("admin", &[&a_admin])),
            push: Some(w("push", &[&b_push])),
            build: Some(w("build", &[&a_build, &e_lan])),
            read: Some(w("read", &[&c_read])),
            extra: Vec::new(),
        };
        let lan: IpAddr = "10.1.1.1".parse().unwrap();
        let wan: IpAddr = "203.0.113.9".parse().unwrap();
        let p = policy.principal(&a, Some(lan)).unwrap().unwrap();
        assert_eq!((p.level, p.comment.as_str()), (Level::Admin, "alice"));
        let p = policy.principal(&a, Some(wan)).unwrap().unwrap();
        assert_eq!(
            (p.level, p.comment.as_str()),
            (Level::Build, "alice-anywhere")
        );
        assert_eq!(
            policy.principal(&b, None).unwrap().unwrap().level,
            Level::Push
        );
        let p = policy.principal(&c, None).unwrap().unwrap();
        assert_eq!(p.level, Level::Read);
        assert_eq!(p.forced_command.as_deref(), Some("nix-store --serve"));
        assert_eq!(
            policy.principal(&d, Some(lan)).unwrap(),
            Err(Refusal::Unknown)
        );
        assert_eq!(
            policy.principal(&e, Some(lan)).unwrap(),
            Err(Refusal::FromRefused)
        );
        assert!(p.may(Level::Read) && !p.may(Level::Build));
        // A broken file is an error, even when a higher file matched.
        std::fs::write(policy.read.as_ref().unwrap(), "junk\n").unwrap();
        assert!(policy.principal(&a, Some(lan)).is_err());
        assert!(policy.check_files().is_err());
        assert!(KeyPolicy::default().is_empty());
    }

    #[test]
    fn extra_keys_count_like_a_file_at_their_level() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_line) = key(1, "alice-file", "");
        let (b, _) = key(2, "bob", "");
        let (c, _) = key(3, "carol", "");
        let build = dir.path().join("build");
        std::fs::write(&build, format!("{a_line}\n")).unwrap();
        let policy = KeyPolicy {
            build: Some(build.clone()),
            extra: vec![
                (Level::Admin, AuthorizedKey::new(a.clone(), "alice-up")),
                (Level::Read, AuthorizedKey::new(b.clone(), "bob-up")),
            ],
            ..KeyPolicy::default()
        };
        assert!(!policy.is_empty());
        assert!(
            !KeyPolicy {
                extra: policy.extra.clone(),
                ..KeyPolicy::default()
            }
            .is_empty()
        );
        // The admin extra wins over the build file's entry for the same key.
        let p = policy.principal(&a, None).unwrap().unwrap();
        assert_eq!((p.level, p.comment.as_str()), (Level::Admin, "alice-up"));
        let p = policy.principal(&b, None).unwrap().unwrap();
        assert_eq!((p.level, p.comment.as_str()), (Level::Read, "bob-up"));
        assert_eq!(policy.principal(&c, None).unwrap(), Err(Refusal::Unknown));
        // A broken file is still an error, even when an extra key matched.
        std::fs::write(&build, "junk\n").unwrap();
        assert!(policy.principal(&a, None).is_err());
    }
}
