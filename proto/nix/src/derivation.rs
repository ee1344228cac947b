//! Derivations: the ATerm text of `.drv` files, parsed and printed byte for
//! byte as Nix does, and the `BasicDerivation` that build protocols carry.
//!
//! ATerm layout (Nix 2.8, every list in sorted order as Nix writes it):
//!
//! ```text
//! Derive([("out","/nix/store/…-name","",""),…],          outputs: (name, path, hashAlgo, hash)
//!        [("/nix/store/…-dep.drv",["out"]),…],          input derivations with wanted outputs
//!        ["/nix/store/…-src",…],                        input sources
//!        "x86_64-linux","/bin/sh",["arg",…],            platform, builder, args
//!        [("name","value"),…])                          environment
//! ```
//!
//! Strings are double-quoted; inside them `"`, `\`, newline, carriage return
//! and tab are written `\"`, `\\`, `\n`, `\r`, `\t`; every other character is
//! written as is. Input-addressed outputs have empty `hashAlgo`/`hash`;
//! fixed-output ones `sha256` (flat) or `r:sha256` (recursive) and base16.

use std::collections::{BTreeMap, BTreeSet};

use tokio::io::AsyncRead;

use crate::content_address::make_text_path;
use crate::hash::HashAlgo;
use crate::nar::{NarError, NarEvent, NarLimits, NarReader};
use crate::store_path::{StorePath, StorePathError};

/// Largest `.drv` text accepted, wherever one is read (the cache, the SSH
/// endpoint, a builder's job, the CLI). A job carries the whole ATerm in one
/// gRPC message of at most 32 MiB, so the limit stays well below that; real
/// derivations are kilobytes, the largest seen a few megabytes.
pub const MAX_DRV_SIZE: usize = 16 << 20;

/// Why a derivation did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DerivationError {
    #[error("derivation is {size} bytes, more than the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("invalid derivation at byte {pos}: expected {expected}, found {found:?}")]
    Syntax {
        pos: usize,
        expected: &'static str,
        found: String,
    },
    #[error("invalid derivation at byte {pos}: unterminated string")]
    UnterminatedString { pos: usize },
    #[error("invalid derivation at byte {pos}: unknown string escape {escape:?}")]
    BadEscape { pos: usize, escape: String },
    #[error("invalid derivation at byte {pos}: {source}")]
    BadStorePath {
        pos: usize,
        #[source]
        source: StorePathError,
    },
    #[error("invalid derivation: {what} {key:?} appears twice")]
    Duplicate { what: &'static str, key: String },
    #[error("invalid derivation: output name {0:?} is invalid")]
    BadOutputName(String),
    #[error("invalid derivation at byte {pos}: trailing data after the derivation")]
    TrailingData { pos: usize },
    #[error("{0} is not a derivation path (no .drv suffix)")]
    NotADerivationPath(String),
}

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DerivationOutput {
    /// `None` where the ATerm has `""` (content-addressed, not yet known).
    pub path: Option<StorePath>,
    /// `""` (input-addressed), `sha256` (fixed, flat), `r:sha256` (fixed, recursive)…
    pub hash_algo: String,
    /// base16 of the expected hash for fixed outputs, else `""`.
    pub hash: String,
}

impl DerivationOutput {
    /// Whether the output is fixed-output (its content hash is known in advance).
    pub fn is_fixed(&self) -> bool {
        !self.hash.is_empty()
    }
}

/// A derivation as stored in a `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// A derivation without its input derivations, as the serve and worker
/// protocols' `BuildDerivation` send it. The name comes from the `.drv` path.
/// Its `input_srcs` are expected to hold every input path the build needs (the
/// caller adds the outputs of the input derivations, see [`Derivation::to_basic`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    pub name: String,
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// The derivation name of a `.drv` store path: its name without `.drv`.
pub fn name_from_drv_path(path: &StorePath) -> Result<String, DerivationError> {
    path.name()
        .strip_suffix(".drv")
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| DerivationError::NotADerivationPath(path.to_string()))
}

/// `requiredSystemFeatures` from an environment: a space-separated variable,
/// or with structured attrs the `requiredSystemFeatures` array in `__json`.
/// Elements that are not strings (which Nix would reject) are skipped.
fn features_from_env(env: &BTreeMap<String, String>) -> BTreeSet<String> {
    if let Some(json) = env.get("__json") {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
            return BTreeSet::new();
        };
        return value
            .get("requiredSystemFeatures")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
    }
    env.get("requiredSystemFeatures")
        .map(|s| s.split_ascii_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn known_output_paths(outputs: &BTreeMap<String, DerivationOutput>) -> BTreeMap<String, StorePath> {
    outputs
        .iter()
        .filter_map(|(name, o)| o.path.clone().map(|p| (name.clone(), p)))
        .collect()
}

/// Why a `.drv` file could not be read from its NAR.
#[derive(Debug, thiserror::Error)]
pub enum ReadDrvError {
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("not a regular file")]
    NotRegular,
    #[error("truncated")]
    Truncated,
    #[error("not UTF-8")]
    NotUtf8,
}

/// The text of a `.drv` file from the NAR holding it (one regular file of at
/// most [`MAX_DRV_SIZE`] bytes), read to the NAR's end. Not parsed.
pub async fn read_drv<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, ReadDrvError> {
    let limits = NarLimits {
        max_total_size: MAX_DRV_SIZE as u64 + 4096,
        max_file_size: MAX_DRV_SIZE as u64,
        ..NarLimits::default()
    };
    let mut sink = tokio::io::sink();
    let mut nar = NarReader::new(r, &mut sink, &limits);
    let size = match nar.next_event().await? {
        Some(NarEvent::Regular { size, .. }) => size,
        _ => return Err(ReadDrvError::NotRegular),
    };
    // The reader refused anything larger than `max_file_size` already.
    let mut text = vec![0u8; size as usize];
    let mut got = 0;
    while got < text.len() {
        let n = nar.read_contents(&mut text[got..]).await?;
        if n == 0 {
            return Err(ReadDrvError::Truncated);
        }
        got += n;
    }
    nar.finish().await?;
    String::from_utf8(text).map_err(|_| ReadDrvError::NotUtf8)
}

impl Derivation {
    /// Parse the ATerm text of a `.drv` file.
    pub fn parse_aterm(s: &str) -> Result<Derivation, DerivationError> {
        if s.len() > MAX_DRV_SIZE {
            return Err(DerivationError::TooLarge {
                size: s.len(),
                max: MAX_DRV_SIZE,
            });
        }
        let mut p = Parser { s, pos: 0 };
        p.expect("Derive(")?;

        let mut outputs = BTreeMap::new();
        p.list(|p| {
            p.expect("(")?;
            let name = p.string()?;
            p.expect(",")?;
            let path = p.optional_path()?;
            p.expect(",")?;
            let hash_algo = p.string()?;
            p.expect(",")?;
            let hash = p.string()?;
            p.expect(")")?;
            if name.is_empty() || crate::store_path::validate_name(&name).is_err() {
                return Err(DerivationError::BadOutputName(name));
            }
            let out = DerivationOutput {
                path,
                hash_algo,
                hash,
            };
            if outputs.insert(name.clone(), out).is_some() {
                return Err(DerivationError::Duplicate {
                    what: "output",
                    key: name,
                });
            }
            Ok(())
        })?;
        p.expect(",")?;

        let mut input_drvs = BTreeMap::new();
        p.list(|p| {
            p.expect("(")?;
            let path = p.path()?;
            p.expect(",")?;
            let mut wanted = BTreeSet::new();
            p.list(|p| {
                let o = p.string()?;
                if !wanted.insert(o.clone()) {
                    return Err(DerivationError::Duplicate {
                        what: "wanted output",
                        key: o,
                    });
                }
                Ok(())
            })?;
            p.expect(")")?;
            if input_drvs.contains_key(&path) {
                return Err(DerivationError::Duplicate {
                    what: "input derivation",
                    key: path.to_string(),
                });
            }
            input_drvs.insert(path, wanted);
            Ok(())
        })?;
        p.expect(",")?;

        let mut input_srcs = BTreeSet::new();
        p.list(|p| {
            let path = p.path()?;
            if !input_srcs.insert(path.clone()) {
                return Err(DerivationError::Duplicate {
                    what: "input source",
                    key: path.to_string(),
                });
            }
            Ok(())
        })?;
        p.expect(",")?;
        let platform = p.string()?;
        p.expect(",")?;
        let builder = p.string()?;
        p.expect(",")?;
        let mut args = Vec::new();
        p.list(|p| {
            args.push(p.string()?);
            Ok(())
        })?;
        p.expect(",")?;
        let mut env = BTreeMap::new();
        p.list(|p| {
            p.expect("(")?;
            let k = p.string()?;
            p.expect(",")?;
            let v = p.string()?;
            p.expect(")")?;
            if env.contains_key(&k) {
                return Err(DerivationError::Duplicate {
                    what: "environment variable",
                    key: k,
                });
            }
            env.insert(k, v);
            Ok(())
        })?;
        p.expect(")")?;
        if p.pos != s.len() {
            return Err(DerivationError::TrailingData { pos: p.pos });
        }
        Ok(Derivation {
            outputs,
            input_drvs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    /// The ATerm text, exactly as Nix writes it.
    pub fn to_aterm(&self) -> String {
        let mut s = String::with_capacity(1024);
        s.push_str("Derive([");
        for (i, (name, o)) in self.outputs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            write_string(&mut s, name);
            s.push(',');
            match &o.path {
                Some(p) => write_string(&mut s, &p.to_string()),
                None => s.push_str("\"\""),
            }
            s.push(',');
            write_string(&mut s, &o.hash_algo);
            s.push(',');
            write_string(&mut s, &o.hash);
            s.push(')');
        }
        s.push_str("],[");
        for (i, (path, wanted)) in self.input_drvs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            write_string(&mut s, &path.to_string());
            s.push(',');
            write_list(&mut s, wanted.iter().map(String::as_str));
            s.push(')');
        }
        s.push_str("],");
        let srcs: Vec<String> = self.input_srcs.iter().map(|p| p.to_string()).collect();
        write_list(&mut s, srcs.iter().map(String::as_str));
        s.push(',');
        write_string(&mut s, &self.platform);
        s.push(',');
        write_string(&mut s, &self.builder);
        s.push(',');
        write_list(&mut s, self.args.iter().map(String::as_str));
        s.push_str(",[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            write_string(&mut s, k);
            s.push(',');
            write_string(&mut s, v);
            s.push(')');
        }
        s.push_str("])");
        s
    }

    /// The store path Nix gives this derivation's `.drv` file for derivation
    /// name `name`: a `text` path over the ATerm whose references are the input
    /// sources and input derivations.
    pub fn drv_path(&self, name: &str) -> Result<StorePath, StorePathError> {
        let refs: BTreeSet<StorePath> = self
            .input_srcs
            .iter()
            .chain(self.input_drvs.keys())
            .cloned()
            .collect();
        let inner = HashAlgo::Sha256.digest(self.to_aterm().as_bytes());
        make_text_path(&format!("{name}.drv"), &inner, &refs)
    }

    /// The derivation without its input derivations. `input_srcs` holds only
    /// this derivation's input sources; a caller sending it to a builder adds the
    /// closure of the inputs (outputs of the input derivations included).
    pub fn to_basic(&self, name: &str) -> BasicDerivation {
        BasicDerivation {
            name: name.to_owned(),
            outputs: self.outputs.clone(),
            input_srcs: self.input_srcs.clone(),
            platform: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        }
    }

    /// The system features the build needs (`requiredSystemFeatures`, from
    /// the environment or from structured attrs).
    pub fn required_system_features(&self) -> BTreeSet<String> {
        features_from_env(&self.env)
    }

    /// Output name → path, for outputs whose path is known.
    pub fn output_paths(&self) -> BTreeMap<String, StorePath> {
        known_output_paths(&self.outputs)
    }

    /// Whether this is a fixed-output derivation (a single fixed `out`).
    pub fn is_fixed_output(&self) -> bool {
        self.outputs.len() == 1 && self.outputs.get("out").is_some_and(|o| o.is_fixed())
    }

    /// Whether `__structuredAttrs` is on (the environment holds `__json`).
    pub fn has_structured_attrs(&self) -> bool {
        self.env.contains_key("__json")
    }
}

impl BasicDerivation {
    /// See [`Derivation::required_system_features`].
    pub fn required_system_features(&self) -> BTreeSet<String> {
        features_from_env(&self.env)
    }

    /// Output name → path, for outputs whose path is known.
    pub fn output_paths(&self) -> BTreeMap<String, StorePath> {
        known_output_paths(&self.outputs)
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_list<'a>(out: &mut String, items: impl Iterator<Item = &'a str>) {
    out.push('[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, item);
    }
    out.push(']');
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn found(&self) -> String {
        let rest = &self.s[self.pos..];
        if rest.is_empty() {
            return "end of input".into();
        }
        rest.chars().take(20).collect()
    }

    fn expect(&mut self, lit: &'static str) -> Result<(), DerivationError> {
        if self.s[self.pos..].starts_with(lit) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(DerivationError::Syntax {
                pos: self.pos,
                expected: lit,
                found: self.found(),
            })
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    /// `[item,item,…]`
    fn list(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), DerivationError>,
    ) -> Result<(), DerivationError> {
        self.expect("[")?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => {
                    return Err(DerivationError::Syntax {
                        pos: self.pos,
                        expected: "',' or ']'",
                        found: self.found(),
                    });
                }
            }
        }
    }

    fn string(&mut self) -> Result<String, DerivationError> {
        let start = self.pos;
        self.expect("\"")?;
        let bytes = self.s.as_bytes();
        let mut out = String::new();
        let mut run = self.pos;
        loop {
            match bytes.get(self.pos) {
                None => return Err(DerivationError::UnterminatedString { pos: start }),
                Some(b'"') => {
                    out.push_str(&self.s[run..self.pos]);
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    out.push_str(&self.s[run..self.pos]);
                    let c = match bytes.get(self.pos + 1) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        None => return Err(DerivationError::UnterminatedString { pos: start }),
                        Some(_) => {
                            return Err(DerivationError::BadEscape {
                                pos: self.pos,
                                escape: self.s[self.pos..].chars().take(2).collect(),
                            });
                        }
                    };
                    out.push(c);
                    self.pos += 2;
                    run = self.pos;
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn path(&mut self) -> Result<StorePath, DerivationError> {
        let pos = self.pos;
        let s = self.string()?;
        StorePath::parse(&s).map_err(|source| DerivationError::BadStorePath { pos, source })
    }

    fn optional_path(&mut self) -> Result<Option<StorePath>, DerivationError> {
        let pos = self.pos;
        let s = self.string()?;
        if s.is_empty() {
            return Ok(None);
        }
        StorePath::parse(&s)
            .map(Some)
            .map_err(|source| DerivationError::BadStorePath { pos, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &str = r#"Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","hello"),("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])"#;

    #[test]
    fn parses_and_prints_a_minimal_drv() {
        let d = Derivation::parse_aterm(SIMPLE).unwrap();
        assert_eq!(d.to_aterm(), SIMPLE);
        assert_eq!(d.platform, "x86_64-linux");
        assert_eq!(d.args, ["-c", "echo hi > $out"]);
        // nix-instantiate named this derivation /nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv
        assert_eq!(
            d.drv_path("hello").unwrap().to_string(),
            "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
        );
        let b = d.to_basic("hello");
        assert_eq!(b.name, "hello");
        assert_eq!(b.outputs, d.outputs);
        assert_eq!(
            d.output_paths()["out"].to_string(),
            "/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"
        );
        assert!(d.required_system_features().is_empty());
        assert!(!d.is_fixed_output());
    }

    #[test]
    fn escapes() {
        let mut d = Derivation::default();
        d.env.insert("k".into(), "a\"b\\c\nd\re\tf✓".into());
        let t = d.to_aterm();
        assert!(t.contains(r#"("k","a\"b\\c\nd\re\tf✓")"#), "{t}");
        assert_eq!(Derivation::parse_aterm(&t).unwrap(), d);
    }

    #[test]
    fn features() {
        let mut env = BTreeMap::new();
        env.insert(
            "requiredSystemFeatures".into(),
            " kvm  big-parallel ".into(),
        );
        let want: BTreeSet<String> = ["big-parallel".to_string(), "kvm".to_string()].into();
        assert_eq!(features_from_env(&env), want);
        env.insert(
            "__json".into(),
            r#"{"requiredSystemFeatures":["nixos-test",3,"kvm"]}"#.into(),
        );
        let want: BTreeSet<String> = ["kvm".to_string(), "nixos-test".to_string()].into();
        assert_eq!(features_from_env(&env), want);
        env.insert("__json".into(), "{not json".into());
        assert!(features_from_env(&env).is_empty());
    }

    #[test]
    fn drv_names() {
        let p = StorePath::parse("/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv").unwrap();
        assert_eq!(name_from_drv_path(&p).unwrap(), "hello");
        let p = StorePath::parse("/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello").unwrap();
        assert!(matches!(
            name_from_drv_path(&p),
            Err(DerivationError::NotADerivationPath(_))
        ));
        let p = StorePath::parse("/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-.drv").unwrap();
        assert!(name_from_drv_path(&p).is_err());
    }

    #[test]
    fn rejects() {
        type Check = fn(&DerivationError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, DerivationError::Syntax { pos: 0, .. })),
            ("garbage", |e| {
                matches!(e, DerivationError::Syntax { pos: 0, .. })
            }),
            ("Derive(", |e| {
                matches!(e, DerivationError::Syntax { pos: 7, .. })
            }),
            ("Derive([(\"out", |e| {
                matches!(e, DerivationError::UnterminatedString { .. })
            }),
            ("Derive([(\"o\\", |e| {
                matches!(e, DerivationError::UnterminatedString { .. })
            }),
            ("Derive([(\"o\\x\"", |e| {
                matches!(e, DerivationError::BadEscape { .. })
            }),
            (
                r#"Derive([("out","/tmp/x","","")],[],[],"s","b",[],[])"#,
                |e| matches!(e, DerivationError::BadStorePath { .. }),
            ),
            (r#"Derive([("o u t","","","")],[],[],"s","b",[],[])"#, |e| {
                matches!(e, DerivationError::BadOutputName(_))
            }),
            (
                r#"Derive([("out","","",""),("out","","","")],[],[],"s","b",[],[])"#,
                |e| matches!(e, DerivationError::Duplicate { what: "output", .. }),
            ),
            (
                r#"Derive([],[],[],"s","b",[],[("a","1"),("a","2")])"#,
                |e| matches!(e, DerivationError::Duplicate { .. }),
            ),
            (
                r#"Derive([],[],["/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-a","/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-a"],"s","b",[],[])"#,
                |e| matches!(e, DerivationError::Duplicate { .. }),
            ),
            (
                r#"Derive([],[("/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-a.drv",["out","out"])],[],"s","b",[],[])"#,
                |e| matches!(e, DerivationError::Duplicate { .. }),
            ),
            (r#"Derive([],[],[],"s","b",[],[])x"#, |e| {
                matches!(e, DerivationError::TrailingData { .. })
            }),
            (r#"Derive([],[],[],"s","b",["a" "b"],[])"#, |e| {
                matches!(e, DerivationError::Syntax { .. })
            }),
            (r#"Derive([],[],[],"s","b",["a",],[])"#, |e| {
                matches!(e, DerivationError::Syntax { .. })
            }),
            (r#"Derive ([],[],[],"s","b",[],[])"#, |e| {
                matches!(e, DerivationError::Syntax { .. })
            }),
        ];
        for (text, ok) in cases {
            let e = Derivation::parse_aterm(text).unwrap_err();
            assert!(ok(&e), "{text}: {e}");
            // the message is readable and short
            assert!(e.to_string().len() < 300, "{e}");
        }
        let huge = format!("Derive({}", " ".repeat(MAX_DRV_SIZE));
        assert!(matches!(
            Derivation::parse_aterm(&huge),
            Err(DerivationError::TooLarge { .. })
        ));
        // the minimal valid one still parses
        Derivation::parse_aterm(r#"Derive([],[],[],"s","b",[],[])"#).unwrap();
    }

    /// A `.drv` comes back from its NAR as it went in; anything else that is
    /// not one small regular file is refused with the reason.
    #[test]
    fn read_drv_from_its_nar() {
        let rt = farm_testkit::host::rt();
        let nar = crate::nar::nar_of_bytes(SIMPLE.as_bytes());
        assert_eq!(rt.block_on(read_drv(&mut &nar[..])).unwrap(), SIMPLE);

        let tmp = tempfile::tempdir().unwrap();
        let dir = farm_testkit::host::nix_dump(tmp.path());
        let e = rt.block_on(read_drv(&mut &dir[..])).unwrap_err();
        assert!(matches!(e, ReadDrvError::NotRegular), "{e}");

        let e = rt
            .block_on(read_drv(&mut &nar[..nar.len() - 20]))
            .unwrap_err();
        assert!(matches!(e, ReadDrvError::Nar(_)), "{e}");

        let big = crate::nar::nar_of_bytes(&vec![b' '; MAX_DRV_SIZE + 1]);
        let e = rt.block_on(read_drv(&mut &big[..])).unwrap_err();
        assert!(
            matches!(e, ReadDrvError::Nar(NarError::FileTooLarge { .. })),
            "{e}"
        );
        let at_limit = crate::nar::nar_of_bytes(&vec![b' '; MAX_DRV_SIZE]);
        rt.block_on(read_drv(&mut &at_limit[..])).unwrap();

        let latin1 = crate::nar::nar_of_bytes(b"Derive(\xff");
        let e = rt.block_on(read_drv(&mut &latin1[..])).unwrap_err();
        assert!(matches!(e, ReadDrvError::NotUtf8), "{e}");
    }
}
