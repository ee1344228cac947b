//! Store paths: `/nix/store/<32 nix32 chars>-<name>`, validated as Nix does, and
//! the `makeStorePath` computation for paths Nix derives from a hash.

use std::fmt;
use std::str::FromStr;

use crate::hash::{Hash, HashAlgo, compress};
use crate::nixbase32;

/// The store directory every actor of the farm uses.
pub const STORE_DIR: &str = "/nix/store";
/// Characters in a store path's hash part.
pub const HASH_PART_LEN: usize = 32;
/// The longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// Why a store path did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("path {0:?} is not in the Nix store {STORE_DIR}")]
    NotInStore(String),
    #[error("store path base name {0:?} is too short")]
    TooShort(String),
    #[error("store path hash part {0:?} is not valid nix32")]
    BadHashPart(String),
    #[error("store path name {0:?} is invalid: {1}")]
    BadName(String, &'static str),
}

/// A store path, kept as its digest (20 bytes) and its name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // Order by the printed hash part first, as Nix's sets do.
    hash_part: String,
    name: String,
}

/// Check a store path name against Nix's rules.
pub fn validate_name(name: &str) -> Result<(), StorePathError> {
    let bad = |why| {
        Err(StorePathError::BadName(
            name.chars().take(240).collect(),
            why,
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 211 characters");
    }
    if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
        return bad("reserved name");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
    {
        return bad("contains a character outside [A-Za-z0-9+-._?=]");
    }
    Ok(())
}

impl StorePath {
    /// Parse a full path `/nix/store/…`.
    pub fn parse(path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.chars().take(300).collect()))?;
        StorePath::from_base_name(base)
    }

    /// Parse a base name `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        if base.len() < HASH_PART_LEN + 2 || base.as_bytes()[HASH_PART_LEN] != b'-' {
            return Err(StorePathError::TooShort(base.chars().take(300).collect()));
        }
        let (hash_part, name) = (&base[..HASH_PART_LEN], &base[HASH_PART_LEN + 1..]);
        StorePath::from_parts(hash_part, name)
    }

    /// Build from a hash part (32 nix32 characters) and a name.
    pub fn from_parts(hash_part: &str, name: &str) -> Result<StorePath, StorePathError> {
        if hash_part.len() != HASH_PART_LEN || nixbase32::decode(hash_part).is_err() {
            return Err(StorePathError::BadHashPart(
                hash_part.chars().take(64).collect(),
            ));
        }
        validate_name(name)?;
        Ok(StorePath {
            hash_part: hash_part.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Build from a 20-byte digest and a name.
    pub fn from_digest(digest: &[u8; 20], name: &str) -> Result<StorePath, StorePathError> {
        StorePath::from_parts(&nixbase32::encode(digest), name)
    }

    /// `makeStorePath`: `type:sha256:<base16 of inner>:/nix/store:name`, hashed
    /// with sha256 and folded to 20 bytes.
    pub fn make(path_type: &str, inner: &Hash, name: &str) -> Result<StorePath, StorePathError> {
        validate_name(name)?;
        let s = format!(
            "{path_type}:{}:{STORE_DIR}:{name}",
            inner.to_base16_prefixed()
        );
        let h = HashAlgo::Sha256.digest(s.as_bytes());
        let folded: [u8; 20] = compress(h.digest(), 20).try_into().expect("20 bytes");
        StorePath::from_digest(&folded, name)
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.hash_part
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part, self.name)
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn full_path(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash_part, self.name)
    }

    /// Whether this is a derivation (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash_part, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, StorePathError> {
        StorePath::parse(s)
    }
}

impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StorePath::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let p = StorePath::parse("/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-t1").unwrap();
        assert_eq!(p.hash_part(), "ayk6qgfdpnp97aa113k14bn130rvjqab");
        assert_eq!(p.name(), "t1");
        assert_eq!(
            p.to_string(),
            "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-t1"
        );
        assert_eq!(p.base_name(), "ayk6qgfdpnp97aa113k14bn130rvjqab-t1");
        assert!(!p.is_derivation());
    }

    #[test]
    fn rejects() {
        for bad in [
            "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab",
            "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqae-t1",
            "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-t 1",
            "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-..",
            "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-t1/sub",
            "/tmp/ayk6qgfdpnp97aa113k14bn130rvjqab-t1",
            "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-",
        ] {
            assert!(StorePath::parse(bad).is_err(), "{bad}");
        }
        let long = format!(
            "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-{}",
            "a".repeat(212)
        );
        assert!(StorePath::parse(&long).is_err());
    }

    /// Paths computed here (and by `content_address`) are the ones a real
    /// Nix 2.8 store gives: added files and trees (`source`), flat
    /// fixed-output paths, and text files with and without references.
    #[test]
    fn paths_match_real_nix() {
        use crate::content_address::{make_fixed_output_path, make_text_path};
        use farm_testkit::Actor;
        use farm_testkit::host::nix_dump;
        let store = Actor::new("store-path").expect("a private store");
        let src = tempfile::tempdir().unwrap();
        let file = src.path().join("hello.txt");
        std::fs::write(&file, "hello\n").unwrap();
        let tree = src.path().join("a-tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/x"), "x").unwrap();
        std::os::unix::fs::symlink("sub/x", tree.join("link")).unwrap();

        let added = store
            .run(
                "nix-store",
                &["--add", file.to_str().unwrap(), tree.to_str().unwrap()],
            )
            .unwrap()
            .trim()
            .to_string();
        let added: Vec<&str> = added.lines().collect();
        for (fs_path, printed) in [&file, &tree].into_iter().zip(&added) {
            let nar_hash = HashAlgo::Sha256.digest(&nix_dump(fs_path));
            let name = fs_path.file_name().unwrap().to_str().unwrap();
            let want = StorePath::make("source", &nar_hash, name).unwrap();
            assert_eq!(*printed, want.to_string());
            assert_eq!(StorePath::parse(printed).unwrap(), want);
        }
        assert_eq!(added.len(), 2);

        let flat = store
            .run(
                "nix-store",
                &["--add-fixed", "sha256", file.to_str().unwrap()],
            )
            .unwrap()
            .trim()
            .to_string();
        let content = HashAlgo::Sha256.digest(b"hello\n");
        let inner = HashAlgo::Sha256
            .digest(format!("fixed:out:sha256:{}:", content.to_base16()).as_bytes());
        assert_eq!(
            flat,
            StorePath::make("output:out", &inner, "hello.txt")
                .unwrap()
                .to_string()
        );
        let computed =
            make_fixed_output_path("hello.txt", false, &content, &Default::default(), None);
        assert_eq!(flat, computed.unwrap().to_string());

        let text = store
            .run(
                "nix-instantiate",
                &[
                    "--eval",
                    "--read-write-mode",
                    "-E",
                    "let a = builtins.toFile \"a\" \"x\"; in builtins.toFile \"b\" \"see ${a}\"",
                ],
            )
            .unwrap()
            .trim()
            .to_string();
        let a = StorePath::make("text", &HashAlgo::Sha256.digest(b"x"), "a").unwrap();
        let b = StorePath::make(
            &format!("text:{a}"),
            &HashAlgo::Sha256.digest(format!("see {a}").as_bytes()),
            "b",
        )
        .unwrap();
        assert_eq!(text, format!("\"{b}\""));
        let a2 = make_text_path("a", &HashAlgo::Sha256.digest(b"x"), &Default::default()).unwrap();
        let b2 = make_text_path(
            "b",
            &HashAlgo::Sha256.digest(format!("see {a}").as_bytes()),
            &[a2.clone()].into(),
        )
        .unwrap();
        assert_eq!((a2, b2), (a, b));
    }

    #[test]
    fn make_text_path_like_nix() {
        // `nix-instantiate --eval` of builtins.toFile "hello" "hello world\n" in Nix 2.8 is
        // /nix/store/w774qnkz4835p5mc4ph97yvci4fg4f5a-hello (a "text" path without references).
        let inner = HashAlgo::Sha256.digest(b"hello world\n");
        let p = StorePath::make("text", &inner, "hello").unwrap();
        assert_eq!(
            p.to_string(),
            "/nix/store/w774qnkz4835p5mc4ph97yvci4fg4f5a-hello"
        );
    }
}
