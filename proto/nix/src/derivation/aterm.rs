//! The ATerm text of `.drv` files, read and written byte for byte as Nix
//! does. Strings are bytes: only the escapes are interpreted, so a `.drv`
//! holding bytes that are not UTF-8 reads and prints back unchanged.

use std::collections::{BTreeMap, BTreeSet};

use super::{ByteString, Derivation, DerivationError, DerivationOutput, MAX_DRV_SIZE};
use crate::store_path::StorePath;

impl Derivation {
    /// Parse the ATerm text (any bytes) of a `.drv` file.
    pub fn parse_aterm(text: impl AsRef<[u8]>) -> Result<Derivation, DerivationError> {
        let s = text.as_ref();
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
            let name = p.text("output name")?;
            p.expect(",")?;
            let path = p.optional_path()?;
            p.expect(",")?;
            let hash_algo = p.text("output hash algorithm")?;
            p.expect(",")?;
            let hash = p.text("output hash")?;
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
                let o = p.text("wanted output")?;
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
        let platform = p.text("platform")?;
        p.expect(",")?;
        let builder = p.bytes()?;
        p.expect(",")?;
        let mut args = Vec::new();
        p.list(|p| {
            args.push(p.bytes()?);
            Ok(())
        })?;
        p.expect(",")?;
        let mut env = BTreeMap::new();
        p.list(|p| {
            p.expect("(")?;
            let k = p.bytes()?;
            p.expect(",")?;
            let v = p.bytes()?;
            p.expect(")")?;
            if env.contains_key(&k) {
                return Err(DerivationError::Duplicate {
                    what: "environment variable",
                    key: k.to_str_lossy().into_owned(),
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
    pub fn to_aterm(&self) -> Vec<u8> {
        self.unparse(false, None)
    }

    /// Nix's `Derivation::unparse`: with `mask_outputs`, output paths and the
    /// environment variables named after outputs are written empty; with
    /// `inputs`, those replace the input derivations (hashDerivationModulo
    /// puts hashes, in base16, where the paths were).
    pub(crate) fn unparse(
        &self,
        mask_outputs: bool,
        inputs: Option<&BTreeMap<String, BTreeSet<String>>>,
    ) -> Vec<u8> {
        let mut s = Vec::with_capacity(1024);
        s.extend_from_slice(b"Derive([");
        for (i, (name, o)) in self.outputs.iter().enumerate() {
            if i > 0 {
                s.push(b',');
            }
            s.push(b'(');
            write_string(&mut s, name.as_bytes());
            s.push(b',');
            match &o.path {
                Some(p) if !mask_outputs => write_string(&mut s, p.to_string().as_bytes()),
                _ => s.extend_from_slice(b"\"\""),
            }
            s.push(b',');
            write_string(&mut s, o.hash_algo.as_bytes());
            s.push(b',');
            write_string(&mut s, o.hash.as_bytes());
            s.push(b')');
        }
        s.extend_from_slice(b"],[");
        let input = |s: &mut Vec<u8>, i: usize, key: &[u8], wanted: &BTreeSet<String>| {
            if i > 0 {
                s.push(b',');
            }
            s.push(b'(');
            write_string(s, key);
            s.push(b',');
            write_list(s, wanted.iter().map(String::as_bytes));
            s.push(b')');
        };
        match inputs {
            Some(replaced) => {
                for (i, (key, wanted)) in replaced.iter().enumerate() {
                    input(&mut s, i, key.as_bytes(), wanted);
                }
            }
            None => {
                for (i, (path, wanted)) in self.input_drvs.iter().enumerate() {
                    input(&mut s, i, path.to_string().as_bytes(), wanted);
                }
            }
        }
        s.extend_from_slice(b"],");
        let srcs: Vec<String> = self.input_srcs.iter().map(|p| p.to_string()).collect();
        write_list(&mut s, srcs.iter().map(String::as_bytes));
        s.push(b',');
        write_string(&mut s, self.platform.as_bytes());
        s.push(b',');
        write_string(&mut s, &self.builder);
        s.push(b',');
        write_list(&mut s, self.args.iter().map(|a| a.as_bytes()));
        s.extend_from_slice(b",[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            if i > 0 {
                s.push(b',');
            }
            s.push(b'(');
            write_string(&mut s, k);
            s.push(b',');
            let masked = mask_outputs && k.to_str().is_some_and(|k| self.outputs.contains_key(k));
            write_string(&mut s, if masked { b"" } else { v });
            s.push(b')');
        }
        s.extend_from_slice(b"])");
        s
    }
}

fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &c in s {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c => out.push(c),
        }
    }
    out.push(b'"');
}

fn write_list<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a [u8]>) {
    out.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, item);
    }
    out.push(b']');
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn found(&self) -> String {
        let rest = &self.s[self.pos..];
        if rest.is_empty() {
            return "end of input".into();
        }
        String::from_utf8_lossy(&rest[..rest.len().min(20)]).into_owned()
    }

    fn expect(&mut self, lit: &'static str) -> Result<(), DerivationError> {
        if self.s[self.pos..].starts_with(lit.as_bytes()) {
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
        self.s.get(self.pos).copied()
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

    /// A quoted string, unescaped, as bytes.
    fn bytes(&mut self) -> Result<ByteString, DerivationError> {
        let start = self.pos;
        self.expect("\"")?;
        let mut out = Vec::new();
        let mut run = self.pos;
        loop {
            match self.s.get(self.pos) {
                None => return Err(DerivationError::UnterminatedString { pos: start }),
                Some(b'"') => {
                    out.extend_from_slice(&self.s[run..self.pos]);
                    self.pos += 1;
                    return Ok(ByteString(out));
                }
                Some(b'\\') => {
                    out.extend_from_slice(&self.s[run..self.pos]);
                    let c = match self.s.get(self.pos + 1) {
                        Some(b'"') => b'"',
                        Some(b'\\') => b'\\',
                        Some(b'n') => b'\n',
                        Some(b'r') => b'\r',
                        Some(b't') => b'\t',
                        None => return Err(DerivationError::UnterminatedString { pos: start }),
                        Some(_) => {
                            let end = (self.pos + 2).min(self.s.len());
                            return Err(DerivationError::BadEscape {
                                pos: self.pos,
                                escape: String::from_utf8_lossy(&self.s[self.pos..end])
                                    .into_owned(),
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

    /// A quoted string that must be UTF-8 (names, paths, hashes, the platform).
    fn text(&mut self, what: &'static str) -> Result<String, DerivationError> {
        let pos = self.pos;
        String::from_utf8(self.bytes()?.0).map_err(|_| DerivationError::NotUtf8 { pos, what })
    }

    fn path(&mut self) -> Result<StorePath, DerivationError> {
        let pos = self.pos;
        let s = self.text("store path")?;
        StorePath::parse(&s).map_err(|source| DerivationError::BadStorePath { pos, source })
    }

    fn optional_path(&mut self) -> Result<Option<StorePath>, DerivationError> {
        let pos = self.pos;
        let s = self.text("store path")?;
        if s.is_empty() {
            return Ok(None);
        }
        StorePath::parse(&s)
            .map(Some)
            .map_err(|source| DerivationError::BadStorePath { pos, source })
    }
}
