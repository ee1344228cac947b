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
//! and tab are written `\"`, `\\`, `\n`, `\r`, `\t`; every other byte is
//! written as is (not necessarily UTF-8: env values, args and the builder are
//! kept as [`ByteString`]s). Input-addressed outputs have empty `hashAlgo`/`hash`;
//! fixed-output ones `sha256` (flat) or `r:sha256` (recursive) and base16.
//!
//! Submodules: [`aterm`] reads and writes the text, [`bytes`] the byte
//! strings, [`modulo`] computes output paths as Nix does (hashDerivationModulo)
//! and resolves a derivation to the `BasicDerivation` a build hook sends.

mod aterm;
pub mod bytes;
pub mod modulo;

use std::collections::{BTreeMap, BTreeSet};

use tokio::io::AsyncRead;

use crate::content_address::make_text_path;
use crate::hash::HashAlgo;
use crate::nar::{NarError, NarEvent, NarLimits, NarReader};
use crate::store_path::{StorePath, StorePathError};

pub use bytes::ByteString;
pub use modulo::hash_derivation_modulo;

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
    #[error("invalid derivation at byte {pos}: the {what} is not UTF-8")]
    NotUtf8 { pos: usize, what: &'static str },
    #[error("derivation output {output:?}: {why}")]
    BadOutput { output: String, why: String },
    #[error(
        "output {output:?} of derivation {name:?} is declared as {declared} but its derivation gives {computed}"
    )]
    WrongOutputPath {
        name: String,
        output: String,
        declared: String,
        computed: StorePath,
    },
    #[error(
        "derivation {name:?} is content-addressed or impure ({why}); Nix 2.8 needs experimental features for those and the farm does not build them"
    )]
    Unsupported { name: String, why: String },
    #[error("the hash of input derivation {0} is not known (it must be read first)")]
    UnknownInput(StorePath),
    #[error("input derivation {drv} has no output {output:?}")]
    UnknownInputOutput { drv: StorePath, output: String },
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
    pub builder: ByteString,
    pub args: Vec<ByteString>,
    pub env: BTreeMap<ByteString, ByteString>,
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
    pub builder: ByteString,
    pub args: Vec<ByteString>,
    pub env: BTreeMap<ByteString, ByteString>,
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
fn features_from_env(env: &BTreeMap<ByteString, ByteString>) -> BTreeSet<String> {
    if let Some(json) = env.get(b"__json".as_slice()) {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else {
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
    env.get(b"requiredSystemFeatures".as_slice())
        .map(|s| {
            s.split(|b| b.is_ascii_whitespace())
                .filter(|f| !f.is_empty())
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect()
        })
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
}

/// The text (bytes, not necessarily UTF-8) of a `.drv` file from the NAR
/// holding it (one regular file of at most [`MAX_DRV_SIZE`] bytes), read to
/// the NAR's end. Not parsed.
pub async fn read_drv<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ReadDrvError> {
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
    Ok(text)
}

impl Derivation {
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
        let inner = HashAlgo::Sha256.digest(&self.to_aterm());
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
        self.env.contains_key(b"__json".as_slice())
    }

    /// The value of environment variable `key`, if it is set.
    pub fn env_var(&self, key: &str) -> Option<&ByteString> {
        self.env.get(key.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &str = r#"Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","hello"),("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])"#;

    #[test]
    fn parses_and_prints_a_minimal_drv() {
        let d = Derivation::parse_aterm(SIMPLE).unwrap();
        assert_eq!(d.to_aterm(), SIMPLE.as_bytes());
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
        d.env
            .insert("raw".into(), b"\xff\x00\xfe\"".as_slice().into());
        d.args.push(b"\x80".as_slice().into());
        d.builder = b"/bin/\xc3".as_slice().into();
        let t = String::from_utf8_lossy(&d.to_aterm()).into_owned();
        assert!(t.contains(r#"("k","a\"b\\c\nd\re\tf✓")"#), "{t}");
        let bytes = d.to_aterm();
        let needle = b"(\"raw\",\"\xff\x00\xfe\\\"\")";
        assert!(bytes.windows(needle.len()).any(|w| w == needle), "{t}");
        let back = Derivation::parse_aterm(&bytes).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.to_aterm(), bytes);
        // names, paths and the platform must be UTF-8
        let e = Derivation::parse_aterm(b"Derive([],[],[],\"\xff\",\"b\",[],[])").unwrap_err();
        assert!(
            matches!(
                e,
                DerivationError::NotUtf8 {
                    what: "platform",
                    ..
                }
            ),
            "{e}"
        );
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
        assert_eq!(
            rt.block_on(read_drv(&mut &nar[..])).unwrap(),
            SIMPLE.as_bytes()
        );

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
        assert_eq!(
            rt.block_on(read_drv(&mut &latin1[..])).unwrap(),
            b"Derive(\xff"
        );
    }
}
