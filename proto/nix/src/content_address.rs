//! Content addresses (the `ca` field of a path info) and the store paths Nix
//! computes from them, as Nix 2.8's `makeTextPath` / `makeFixedOutputPath` do:
//!
//! - `text:sha256:H`: one regular file whose sha256 is H; path
//!   `make("text:<ref1>:<ref2>…", H, name)` (references as full paths, in
//!   store-path order). A `.drv` file is such a path, its references being its
//!   input sources and input derivations.
//! - `fixed:r:sha256:H`: H is the NAR's sha256; path
//!   `make("source:<refs>[:self]", H, name)`.
//! - `fixed:ALGO:H` (flat): one regular file whose ALGO hash is H; no
//!   references; path `make("output:out", sha256("fixed:out:ALGO:hex(H):"), name)`.
//! - `fixed:r:ALGO:H` (ALGO not sha256): the NAR's ALGO hash is H; path
//!   `make("output:out", sha256("fixed:out:r:ALGO:hex(H):"), name)`.
//!
//! `make` is [`StorePath::make`] (`makeStorePath`).

use std::collections::BTreeSet;
use std::fmt;

use crate::hash::{Hash, HashAlgo};
use crate::store_path::{StorePath, StorePathError};

/// Why a `ca` field did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("content address {text:?}: {why}")]
pub struct ContentAddressError {
    /// The field (at most 200 characters of it).
    pub text: String,
    /// What is wrong with it.
    pub why: String,
}

/// A parsed `ca` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentAddress {
    /// `text:sha256:…`
    Text(Hash),
    /// `fixed:r:…` (NAR hash) or `fixed:…` (flat file hash).
    Fixed { recursive: bool, hash: Hash },
}

impl ContentAddress {
    /// Parse `text:sha256:…`, `fixed:r:ALGO:…`, `fixed:ALGO:…` (the hash in
    /// any encoding [`Hash::parse_any`] reads).
    pub fn parse(s: &str) -> Result<ContentAddress, ContentAddressError> {
        let bad = |why: &str| ContentAddressError {
            text: s.chars().take(200).collect(),
            why: why.to_owned(),
        };
        if let Some(rest) = s.strip_prefix("text:") {
            let hash = Hash::parse_any(rest).map_err(|e| bad(&e.to_string()))?;
            if hash.algo() != HashAlgo::Sha256 {
                return Err(bad("a text content address must use sha256"));
            }
            return Ok(ContentAddress::Text(hash));
        }
        if let Some(rest) = s.strip_prefix("fixed:") {
            let (recursive, rest) = match rest.strip_prefix("r:") {
                Some(r) => (true, r),
                None => (false, rest),
            };
            if !rest.contains(':') {
                return Err(bad("no hash algorithm"));
            }
            let hash = Hash::parse_any(rest).map_err(|e| bad(&e.to_string()))?;
            return Ok(ContentAddress::Fixed { recursive, hash });
        }
        Err(bad("neither text: nor fixed:"))
    }

    /// The hash the address names.
    pub fn hash(&self) -> &Hash {
        match self {
            ContentAddress::Text(h) | ContentAddress::Fixed { hash: h, .. } => h,
        }
    }

    /// The algorithm a single file's contents must be hashed with, if this
    /// address is about a flat file (`text:` or non-recursive `fixed:`).
    pub fn flat_algo(&self) -> Option<HashAlgo> {
        match self {
            ContentAddress::Text(h) => Some(h.algo()),
            ContentAddress::Fixed {
                recursive: false,
                hash,
            } => Some(hash.algo()),
            ContentAddress::Fixed { .. } => None,
        }
    }

    /// The store path of content with this address, named `name`, with
    /// `references` (which, for a recursive sha256 address, may hold the path
    /// itself: `self_path`, written `:self`).
    pub fn store_path(
        &self,
        name: &str,
        references: &BTreeSet<StorePath>,
        self_path: Option<&StorePath>,
    ) -> Result<StorePath, StorePathError> {
        match self {
            ContentAddress::Text(h) => make_text_path(name, h, references),
            ContentAddress::Fixed { recursive, hash } => {
                make_fixed_output_path(name, *recursive, hash, references, self_path)
            }
        }
    }
}

impl fmt::Display for ContentAddress {
    /// `text:sha256:<nix32>`, `fixed:r:ALGO:<nix32>`, `fixed:ALGO:<nix32>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(h) => write!(f, "text:{}", h.to_nix32_prefixed()),
            ContentAddress::Fixed { recursive, hash } => write!(
                f,
                "fixed:{}{}",
                if *recursive { "r:" } else { "" },
                hash.to_nix32_prefixed()
            ),
        }
    }
}

/// Nix's `makeTextPath(name, sha256, references)`: `make("text:<refs>", hash, name)`.
pub fn make_text_path(
    name: &str,
    hash: &Hash,
    references: &BTreeSet<StorePath>,
) -> Result<StorePath, StorePathError> {
    let mut t = String::from("text");
    for r in references {
        t.push(':');
        t.push_str(&r.to_string());
    }
    StorePath::make(&t, hash, name)
}

/// Nix's `makeFixedOutputPath(method, hash, name, references, hasSelfReference)`.
/// `self_path`, when given and among `references`, is written as `:self`
/// rather than as a reference (recursive sha256 only; elsewhere references
/// do not enter the path).
pub fn make_fixed_output_path(
    name: &str,
    recursive: bool,
    hash: &Hash,
    references: &BTreeSet<StorePath>,
    self_path: Option<&StorePath>,
) -> Result<StorePath, StorePathError> {
    if recursive && hash.algo() == HashAlgo::Sha256 {
        let mut t = String::from("source");
        let mut has_self = false;
        for r in references {
            if Some(r) == self_path {
                has_self = true;
                continue;
            }
            t.push(':');
            t.push_str(&r.to_string());
        }
        if has_self {
            t.push_str(":self");
        }
        StorePath::make(&t, hash, name)
    } else {
        let inner = HashAlgo::Sha256.digest(
            format!(
                "fixed:out:{}{}:",
                if recursive { "r:" } else { "" },
                hash.to_base16_prefixed()
            )
            .as_bytes(),
        );
        StorePath::make("output:out", &inner, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::Derivation;

    const DRVS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/drv");

    /// Every real `.drv` with its store path (the file name Nix gave it).
    fn real_drvs() -> Vec<(StorePath, Vec<u8>)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(DRVS).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if name.ends_with(".drv") {
                let sp = StorePath::parse(&format!("/nix/store/{name}")).unwrap();
                v.push((sp, std::fs::read(&p).unwrap()));
            }
        }
        assert!(v.len() >= 8, "the test data is there");
        v
    }

    fn refs_of(bytes: &[u8]) -> BTreeSet<StorePath> {
        let d = Derivation::parse_aterm(std::str::from_utf8(bytes).unwrap()).unwrap();
        d.input_srcs
            .iter()
            .chain(d.input_drvs.keys())
            .cloned()
            .collect()
    }

    #[test]
    fn text_paths_of_real_drvs() {
        for (path, bytes) in real_drvs() {
            let hash = HashAlgo::Sha256.digest(&bytes);
            let computed = make_text_path(path.name(), &hash, &refs_of(&bytes)).unwrap();
            assert_eq!(computed, path);
            let ca = ContentAddress::parse(&format!("text:{}", hash.to_nix32_prefixed())).unwrap();
            assert_eq!(
                ca.store_path(path.name(), &refs_of(&bytes), None).unwrap(),
                path
            );
        }
    }

    #[test]
    fn fixed_output_paths_of_real_drvs() {
        let mut seen = 0;
        for (_, bytes) in real_drvs() {
            let d = Derivation::parse_aterm(std::str::from_utf8(&bytes).unwrap()).unwrap();
            for o in d.outputs.values() {
                if o.hash.is_empty() {
                    continue;
                }
                let (recursive, algo) = match o.hash_algo.strip_prefix("r:") {
                    Some(a) => (true, a),
                    None => (false, o.hash_algo.as_str()),
                };
                let hash = Hash::parse_bare(algo.parse().unwrap(), &o.hash).unwrap();
                let path = o.path.clone().unwrap();
                let computed =
                    make_fixed_output_path(path.name(), recursive, &hash, &BTreeSet::new(), None)
                        .unwrap();
                assert_eq!(computed, path);
                seen += 1;
            }
        }
        assert!(seen >= 2);
    }

    #[test]
    fn self_references_are_written_as_self() {
        let h = HashAlgo::Sha256.digest(b"tree");
        let other = StorePath::parse("/nix/store/00000000000000000000000000000000-x").unwrap();
        let me = StorePath::parse("/nix/store/11111111111111111111111111111111-me").unwrap();
        let refs = BTreeSet::from([other.clone(), me.clone()]);
        let got = make_fixed_output_path("me", true, &h, &refs, Some(&me)).unwrap();
        let want = StorePath::make(&format!("source:{other}:self"), &h, "me").unwrap();
        assert_eq!(got, want);
        // Not the path itself: an ordinary reference.
        let got = make_fixed_output_path("me", true, &h, &refs, None).unwrap();
        let want = StorePath::make(&format!("source:{other}:{me}"), &h, "me").unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn parses_and_prints() {
        let h = HashAlgo::Sha256.digest(b"x");
        for (text, want) in [
            (
                format!("text:{}", h.to_nix32_prefixed()),
                ContentAddress::Text(h.clone()),
            ),
            (
                format!("fixed:r:{}", h.to_nix32_prefixed()),
                ContentAddress::Fixed {
                    recursive: true,
                    hash: h.clone(),
                },
            ),
            (
                format!("fixed:{}", h.to_nix32_prefixed()),
                ContentAddress::Fixed {
                    recursive: false,
                    hash: h.clone(),
                },
            ),
        ] {
            let ca = ContentAddress::parse(&text).unwrap();
            assert_eq!(ca, want);
            assert_eq!(ca.to_string(), text);
        }
        // base16 is read too
        assert_eq!(
            ContentAddress::parse(&format!("fixed:r:{}", h.to_base16_prefixed())).unwrap(),
            ContentAddress::Fixed {
                recursive: true,
                hash: h.clone(),
            }
        );
        let sha1 = HashAlgo::Sha1.digest(b"x");
        for bad in [
            format!("text:{}", sha1.to_nix32_prefixed()),
            "fixed:r:abc".to_string(),
            "fixed:sha256:abc".to_string(),
            format!("source:{}", h.to_nix32_prefixed()),
            String::new(),
        ] {
            let e = ContentAddress::parse(&bad).unwrap_err();
            assert!(e.to_string().starts_with("content address"), "{e}");
        }
    }
}
