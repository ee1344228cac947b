//! `.narinfo` files of binary caches: parse and render.
//!
//! A narinfo is a list of `Key: value` lines, each ending in `\n`, written by
//! Nix in this order:
//!
//! ```text
//! StorePath: /nix/store/<hash>-<name>
//! URL: nar/<filehash>.nar.xz
//! Compression: xz
//! FileHash: sha256:<nix32>          (optional)
//! FileSize: <u64>                   (optional)
//! NarHash: sha256:<nix32>
//! NarSize: <u64>
//! References: <base name> <base name> …   (may be empty)
//! Deriver: <base name>              (optional)
//! Sig: <keyname>:<base64>           (repeatable)
//! CA: fixed:r:sha256:<nix32>        (optional)
//! ```
//!
//! Parsing requires StorePath, URL, NarHash and a non-zero NarSize, rejects
//! duplicated keys and malformed values, and ignores keys it does not know
//! (such as `System`). A missing `Compression` means `bzip2`, as in Nix.

use std::collections::BTreeSet;

use crate::hash::{Hash, HashError};
use crate::path_info::ValidPathInfo;
use crate::store_path::{StorePath, StorePathError};

/// Largest narinfo accepted: room for 100 000 references with the longest
/// names (211 characters) and more. The farm's cache writes none larger and
/// loads every one up to this size.
pub const MAX_NARINFO_SIZE: usize = 32 << 20;
/// Most `Sig` lines accepted.
pub const MAX_SIGS: usize = 256;
/// Longest `URL`, `Compression`, `CA` or `Sig` value accepted.
pub const MAX_VALUE_LEN: usize = 4096;

/// Why a narinfo did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    #[error("narinfo is {size} bytes, more than the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("narinfo line {line} has no `Key: value` form")]
    BadLine { line: usize },
    #[error("narinfo line {line}: {key} appears twice")]
    Duplicate { line: usize, key: String },
    #[error("narinfo has no {0}")]
    Missing(&'static str),
    #[error("narinfo line {line}: {key} {value:?} is invalid: {why}")]
    BadValue {
        line: usize,
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("narinfo line {line}: {key} is not a valid store path: {source}")]
    BadStorePath {
        line: usize,
        key: &'static str,
        #[source]
        source: StorePathError,
    },
    #[error("narinfo line {line}: {key} is not a valid hash: {source}")]
    BadHash {
        line: usize,
        key: &'static str,
        #[source]
        source: HashError,
    },
    #[error("narinfo has more than {MAX_SIGS} signatures")]
    TooManySigs,
}

/// A parsed narinfo: the path's info plus where and how its NAR is stored.
/// `info.registration_time` is 0 and `info.ultimate` false: a narinfo has neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub info: ValidPathInfo,
    /// Relative to the cache root, e.g. `nar/<filehash>.nar.zst`.
    pub url: String,
    /// `none`, `xz`, `zstd`, `bzip2`, …
    pub compression: String,
    /// Hash of the (compressed) file at `url`.
    pub file_hash: Option<Hash>,
    /// Size of the file at `url`.
    pub file_size: Option<u64>,
}

fn short(s: &str) -> String {
    s.chars().take(100).collect()
}

fn parse_u64(line: usize, key: &'static str, value: &str) -> Result<u64, NarInfoError> {
    let bad = |why: &str| NarInfoError::BadValue {
        line,
        key,
        value: short(value),
        why: why.into(),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not a decimal number"));
    }
    value.parse().map_err(|_| bad("out of range"))
}

fn check_text(line: usize, key: &'static str, value: &str) -> Result<(), NarInfoError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(NarInfoError::BadValue {
            line,
            key,
            value: short(value),
            why: format!("longer than {MAX_VALUE_LEN} bytes"),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(NarInfoError::BadValue {
            line,
            key,
            value: short(value),
            why: "contains control characters".into(),
        });
    }
    Ok(())
}

impl NarInfo {
    /// Wrap a path info with the location of its NAR.
    pub fn new(info: ValidPathInfo, url: String, compression: String) -> NarInfo {
        NarInfo {
            info,
            url,
            compression,
            file_hash: None,
            file_size: None,
        }
    }

    /// Parse bytes (must be UTF-8).
    pub fn parse_bytes(b: &[u8]) -> Result<NarInfo, NarInfoError> {
        if b.len() > MAX_NARINFO_SIZE {
            return Err(NarInfoError::TooLarge {
                size: b.len(),
                max: MAX_NARINFO_SIZE,
            });
        }
        let s = std::str::from_utf8(b).map_err(|e| NarInfoError::BadValue {
            line: 1 + b[..e.valid_up_to()].iter().filter(|&&c| c == b'\n').count(),
            key: "text",
            value: String::new(),
            why: "not UTF-8".into(),
        })?;
        NarInfo::parse(s)
    }

    /// Parse the text of a `.narinfo` file.
    pub fn parse(s: &str) -> Result<NarInfo, NarInfoError> {
        if s.len() > MAX_NARINFO_SIZE {
            return Err(NarInfoError::TooLarge {
                size: s.len(),
                max: MAX_NARINFO_SIZE,
            });
        }
        let mut path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = BTreeSet::new();
        let mut ca = None;

        // Every line ends with '\n'; a missing final newline is tolerated.
        let body = s.strip_suffix('\n').unwrap_or(s);
        for (i, raw) in body.split('\n').enumerate() {
            let line = i + 1;
            let (key, value) = raw.split_once(':').ok_or(NarInfoError::BadLine { line })?;
            let value = value.strip_prefix(' ').unwrap_or(value);
            fn set<T>(
                slot: &mut Option<T>,
                v: T,
                line: usize,
                key: &str,
            ) -> Result<(), NarInfoError> {
                if slot.is_some() {
                    return Err(NarInfoError::Duplicate {
                        line,
                        key: key.to_owned(),
                    });
                }
                *slot = Some(v);
                Ok(())
            }
            let store_path = |key: &'static str, v: &str, full: bool| {
                let r = if full {
                    StorePath::parse(v)
                } else {
                    StorePath::from_base_name(v)
                };
                r.map_err(|source| NarInfoError::BadStorePath { line, key, source })
            };
            let hash = |key: &'static str, v: &str| {
                Hash::parse_any(v).map_err(|source| NarInfoError::BadHash { line, key, source })
            };
            match key {
                "StorePath" => set(&mut path, store_path("StorePath", value, true)?, line, key)?,
                "URL" => {
                    check_text(line, "URL", value)?;
                    if value.is_empty() {
                        return Err(NarInfoError::BadValue {
                            line,
                            key: "URL",
                            value: String::new(),
                            why: "empty".into(),
                        });
                    }
                    set(&mut url, value.to_owned(), line, key)?
                }
                "Compression" => {
                    check_text(line, "Compression", value)?;
                    set(&mut compression, value.to_owned(), line, key)?
                }
                "FileHash" => set(&mut file_hash, hash("FileHash", value)?, line, key)?,
                "FileSize" => set(
                    &mut file_size,
                    parse_u64(line, "FileSize", value)?,
                    line,
                    key,
                )?,
                "NarHash" => set(&mut nar_hash, hash("NarHash", value)?, line, key)?,
                "NarSize" => set(&mut nar_size, parse_u64(line, "NarSize", value)?, line, key)?,
                "References" => {
                    let mut refs = BTreeSet::new();
                    for r in value.split(' ').filter(|r| !r.is_empty()) {
                        refs.insert(store_path("References", r, false)?);
                    }
                    set(&mut references, refs, line, key)?
                }
                "Deriver" => {
                    let d = if value == "unknown-deriver" {
                        None
                    } else {
                        Some(store_path("Deriver", value, false)?)
                    };
                    set(&mut deriver, d, line, key)?
                }
                "Sig" => {
                    check_text(line, "Sig", value)?;
                    if !value.contains(':') || value.contains(' ') {
                        return Err(NarInfoError::BadValue {
                            line,
                            key: "Sig",
                            value: short(value),
                            why: "not `keyname:base64`".into(),
                        });
                    }
                    if sigs.len() >= MAX_SIGS {
                        return Err(NarInfoError::TooManySigs);
                    }
                    sigs.insert(value.to_owned());
                }
                "CA" => {
                    check_text(line, "CA", value)?;
                    if !(value.starts_with("fixed:") || value.starts_with("text:")) {
                        return Err(NarInfoError::BadValue {
                            line,
                            key: "CA",
                            value: short(value),
                            why: "not `fixed:…` or `text:…`".into(),
                        });
                    }
                    set(&mut ca, value.to_owned(), line, key)?
                }
                _ => {
                    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
                        return Err(NarInfoError::BadLine { line });
                    }
                }
            }
        }

        let path = path.ok_or(NarInfoError::Missing("StorePath"))?;
        let url = url.ok_or(NarInfoError::Missing("URL"))?;
        let nar_hash = nar_hash.ok_or(NarInfoError::Missing("NarHash"))?;
        let nar_size = nar_size
            .filter(|&n| n != 0)
            .ok_or(NarInfoError::Missing("NarSize (non-zero)"))?;
        Ok(NarInfo {
            info: ValidPathInfo {
                path,
                deriver: deriver.flatten(),
                nar_hash,
                references: references.unwrap_or_default(),
                registration_time: 0,
                nar_size,
                ultimate: false,
                sigs,
                ca,
            },
            url,
            compression: compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
        })
    }

    /// The narinfo text, as Nix writes it. Hashes are printed `sha256:nix32`.
    pub fn render(&self) -> String {
        let i = &self.info;
        let mut s = String::with_capacity(512 + 60 * i.references.len());
        s.push_str(&format!("StorePath: {}\n", i.path));
        s.push_str(&format!("URL: {}\n", self.url));
        s.push_str(&format!("Compression: {}\n", self.compression));
        if let Some(h) = &self.file_hash {
            s.push_str(&format!("FileHash: {}\n", h.to_nix32_prefixed()));
        }
        if let Some(n) = self.file_size {
            s.push_str(&format!("FileSize: {n}\n"));
        }
        s.push_str(&format!("NarHash: {}\n", i.nar_hash.to_nix32_prefixed()));
        s.push_str(&format!("NarSize: {}\n", i.nar_size));
        // Nix writes "References: " even when empty, and needs the space: its
        // parser skips two characters after the colon.
        s.push_str("References: ");
        for (n, r) in i.references.iter().enumerate() {
            if n > 0 {
                s.push(' ');
            }
            s.push_str(&r.base_name());
        }
        s.push('\n');
        if let Some(d) = &i.deriver {
            s.push_str(&format!("Deriver: {}\n", d.base_name()));
        }
        for sig in &i.sigs {
            s.push_str(&format!("Sig: {sig}\n"));
        }
        if let Some(ca) = &i.ca {
            s.push_str(&format!("CA: {ca}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgo;

    const P: &str = "/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-t1";

    fn sample() -> NarInfo {
        let mut info = ValidPathInfo::new(
            StorePath::parse(P).unwrap(),
            HashAlgo::Sha256.digest(b"nar"),
            1234,
        );
        info.references.insert(StorePath::parse(P).unwrap());
        info.references
            .insert(StorePath::parse("/nix/store/0yk6qgfdpnp97aa113k14bn130rvjqab-a").unwrap());
        info.deriver =
            Some(StorePath::parse("/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-t1.drv").unwrap());
        info.sigs.insert("k:c2ln".into());
        let mut n = NarInfo::new(info, "nar/x.nar".into(), "none".into());
        n.file_hash = Some(HashAlgo::Sha256.digest(b"file"));
        n.file_size = Some(1234);
        n
    }

    #[test]
    fn renders_like_nix_and_parses_back() {
        let n = sample();
        let text = n.render();
        let expected = format!(
            "StorePath: {P}\nURL: nar/x.nar\nCompression: none\nFileHash: {}\nFileSize: 1234\n\
             NarHash: {}\nNarSize: 1234\nReferences: 0yk6qgfdpnp97aa113k14bn130rvjqab-a \
             ayk6qgfdpnp97aa113k14bn130rvjqab-t1\nDeriver: 76w21n1f03fs5kw8fnffphx7qrqffw6r-t1.drv\n\
             Sig: k:c2ln\n",
            HashAlgo::Sha256.digest(b"file").to_nix32_prefixed(),
            HashAlgo::Sha256.digest(b"nar").to_nix32_prefixed(),
        );
        assert_eq!(text, expected);
        assert_eq!(NarInfo::parse(&text).unwrap(), n);
        assert_eq!(NarInfo::parse_bytes(text.as_bytes()).unwrap(), n);
        let mut empty = n.clone();
        empty.info.references.clear();
        assert!(empty.render().contains("\nReferences: \n"));
    }

    #[test]
    fn tolerates_what_nix_tolerates() {
        let n = sample();
        let text = n.render();
        // unknown keys, no final newline, unknown-deriver, base16 hashes, no Compression
        let t = text
            .replace("Compression: none\n", "System: x86_64-linux\n")
            .replace(
                "Deriver: 76w21n1f03fs5kw8fnffphx7qrqffw6r-t1.drv",
                "Deriver: unknown-deriver",
            )
            .replace(
                &n.info.nar_hash.to_nix32_prefixed(),
                &n.info.nar_hash.to_base16_prefixed(),
            );
        let t = t.trim_end();
        let p = NarInfo::parse(t).unwrap();
        assert_eq!(p.compression, "bzip2");
        assert_eq!(p.info.deriver, None);
        assert_eq!(p.info.nar_hash, n.info.nar_hash);
        // empty references, with or without the space
        for r in ["References: \n", "References:\n"] {
            let t = text.replace(
                "References: 0yk6qgfdpnp97aa113k14bn130rvjqab-a ayk6qgfdpnp97aa113k14bn130rvjqab-t1\n",
                r,
            );
            assert!(NarInfo::parse(&t).unwrap().info.references.is_empty());
        }
        // a CA field round trips
        let mut n2 = n.clone();
        n2.info.ca = Some(format!("fixed:r:{}", n.info.nar_hash.to_nix32_prefixed()));
        assert_eq!(NarInfo::parse(&n2.render()).unwrap(), n2);
    }

    #[test]
    fn rejects() {
        let text = sample().render();
        let nh = sample().info.nar_hash.to_nix32_prefixed();
        let cases: Vec<(String, &str)> = vec![
            (text.replace("StorePath: ", "StorePath "), "no `Key: value`"),
            (text.clone() + "\n", "no `Key: value`"),
            (format!("{text}URL: again\n"), "appears twice"),
            (format!("{text}NarSize: 1\n"), "appears twice"),
            (
                text.replace(&format!("StorePath: {P}\n"), ""),
                "no StorePath",
            ),
            (text.replace("URL: nar/x.nar\n", ""), "no URL"),
            (
                text.replace("URL: nar/x.nar", "URL: "),
                "URL \"\" is invalid",
            ),
            (text.replace(&format!("NarHash: {nh}\n"), ""), "no NarHash"),
            (text.replace("NarSize: 1234", "NarSize: 0"), "no NarSize"),
            (
                text.replace("NarSize: 1234", "NarSize: +12"),
                "not a decimal",
            ),
            (
                text.replace("NarSize: 1234", "NarSize: 99999999999999999999"),
                "out of range",
            ),
            (
                text.replace("FileSize: 1234", "FileSize: -1"),
                "not a decimal",
            ),
            (text.replace(&nh, "sha256:abc"), "not a valid hash"),
            (text.replace(&nh, "foo:abc"), "not a valid hash"),
            (
                text.replace("StorePath: /nix/store/", "StorePath: /tmp/"),
                "not a valid store path",
            ),
            (
                text.replace(
                    "0yk6qgfdpnp97aa113k14bn130rvjqab-a",
                    "/nix/store/0yk6qgfdpnp97aa113k14bn130rvjqab-a",
                ),
                "not a valid store path",
            ),
            (
                text.replace("Deriver: 76w", "Deriver: 7e"),
                "not a valid store path",
            ),
            (
                text.replace("Sig: k:c2ln", "Sig: nocolon"),
                "keyname:base64",
            ),
            (format!("{text}CA: sha256:abc\n"), "`fixed:"),
            (
                text.replace("URL: nar/x.nar", "URL: nar/x\u{7}.nar"),
                "control characters",
            ),
            (format!("{text}Bad Key: x\n"), "no `Key: value`"),
        ];
        for (t, want) in cases {
            let e = NarInfo::parse(&t).unwrap_err();
            assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
        }
        let many_sigs: String = (0..=MAX_SIGS).map(|i| format!("Sig: k:{i}\n")).collect();
        assert_eq!(
            NarInfo::parse(&(text.clone() + &many_sigs)).unwrap_err(),
            NarInfoError::TooManySigs
        );
        let huge = "x".repeat(MAX_NARINFO_SIZE + 1);
        assert!(matches!(
            NarInfo::parse(&huge),
            Err(NarInfoError::TooLarge { .. })
        ));
        assert!(matches!(
            NarInfo::parse_bytes(b"StorePath: \xff\n"),
            Err(NarInfoError::BadValue { why, .. }) if why == "not UTF-8"
        ));
        assert!(NarInfo::parse("").is_err());
    }
}
