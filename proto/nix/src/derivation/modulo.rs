//! Output paths computed as Nix computes them, from the derivation alone.
//!
//! Nix 2.8's rules (`hashDerivationModulo`, `makeOutputPath`,
//! `makeFixedOutputPath`), restated:
//!
//! - A fixed-output derivation (one output `out` with `hashAlgo` `[r:]ALGO`
//!   and a hash) has output path `makeFixedOutputPath(method, hash, name)`,
//!   and its modulo hash is `sha256("fixed:out:[r:]ALGO:<base16>:<path>")`:
//!   it does not depend on how the content is fetched.
//! - Any other (input-addressed) derivation's modulo hash is the sha256 of its
//!   ATerm with every input derivation path replaced by the base16 of that
//!   input's modulo hash (same wanted outputs). Its output `o` has path
//!   `makeStorePath("output:o", sha256(<that ATerm with output paths and the
//!   env variables named after outputs emptied>), name[-o])`.
//! - Content-addressed (floating), deferred and impure outputs need
//!   experimental features in Nix 2.8; they are refused here.
//!
//! Modulo hashes of input derivations come from the caller (it reads the graph
//! bottom-up and memoises them), so nothing here touches a store.

use std::collections::{BTreeMap, BTreeSet};

use super::{BasicDerivation, Derivation, DerivationError, DerivationOutput};
use crate::hash::{Hash, HashAlgo};
use crate::store_path::StorePath;

/// What kind of derivation this is, by its outputs.
enum Kind {
    /// Its one output `out`, fixed: (recursive, expected hash).
    Fixed(bool, Hash),
    InputAddressed,
}

/// `[r:]ALGO` and the expected hash of a fixed output.
fn fixed_hash(output: &str, o: &DerivationOutput) -> Result<(bool, Hash), DerivationError> {
    let bad = |why: String| DerivationError::BadOutput {
        output: output.to_owned(),
        why,
    };
    let (recursive, algo) = match o.hash_algo.strip_prefix("r:") {
        Some(a) => (true, a),
        None => (false, o.hash_algo.as_str()),
    };
    let algo: HashAlgo = algo
        .parse()
        .map_err(|e| bad(format!("hash algorithm {:?}: {e}", o.hash_algo)))?;
    let hash = Hash::parse_bare(algo, &o.hash)
        .map_err(|e| bad(format!("expected hash {:?}: {e}", o.hash)))?;
    Ok((recursive, hash))
}

/// Nix's `outputPathName`: `name` for `out`, else `name-output`.
fn output_path_name(name: &str, output: &str) -> String {
    if output == "out" {
        name.to_owned()
    } else {
        format!("{name}-{output}")
    }
}

/// `name` is only for messages ("" when unknown: then the builder's name).
fn kind(drv: &Derivation, name: &str) -> Result<Kind, DerivationError> {
    let unsupported = |why: String| DerivationError::Unsupported {
        name: if name.is_empty() {
            drv.env_var("name")
                .map(|n| n.to_string())
                .unwrap_or_default()
        } else {
            name.to_owned()
        },
        why,
    };
    if drv.outputs.is_empty() {
        return Err(DerivationError::BadOutput {
            output: String::new(),
            why: "the derivation has no outputs".into(),
        });
    }
    let mut fixed = Vec::new();
    for (o, out) in &drv.outputs {
        if out.hash_algo.is_empty() {
            if out.path.is_none() {
                return Err(unsupported(format!(
                    "output {o:?} is deferred (no path, no hash)"
                )));
            }
            if !out.hash.is_empty() {
                return Err(DerivationError::BadOutput {
                    output: o.clone(),
                    why: "a hash without a hash algorithm".into(),
                });
            }
        } else if out.hash == "impure" {
            return Err(unsupported(format!("output {o:?} is impure")));
        } else if out.hash.is_empty() {
            return Err(unsupported(format!(
                "output {o:?} is floating content-addressed ({})",
                out.hash_algo
            )));
        } else {
            fixed.push(o);
        }
    }
    if fixed.is_empty() {
        return Ok(Kind::InputAddressed);
    }
    if fixed.len() != drv.outputs.len() {
        return Err(DerivationError::BadOutput {
            output: fixed[0].clone(),
            why: "fixed and input-addressed outputs are mixed".into(),
        });
    }
    if fixed.len() > 1 || fixed[0] != "out" {
        return Err(DerivationError::BadOutput {
            output: fixed[0].clone(),
            why: "a fixed-output derivation has exactly one output, named \"out\"".into(),
        });
    }
    let (recursive, hash) = fixed_hash("out", &drv.outputs["out"])?;
    Ok(Kind::Fixed(recursive, hash))
}

fn fixed_output_path(
    name: &str,
    recursive: bool,
    hash: &Hash,
) -> Result<StorePath, DerivationError> {
    crate::content_address::make_fixed_output_path(name, recursive, hash, &BTreeSet::new(), None)
        .map_err(|e| DerivationError::BadOutput {
            output: "out".into(),
            why: e.to_string(),
        })
}

/// The input derivations as hashDerivationModulo writes them: base16 of each
/// input's modulo hash → the outputs wanted of it.
fn replaced_inputs(
    drv: &Derivation,
    input_modulo: &dyn Fn(&StorePath) -> Option<Hash>,
) -> Result<BTreeMap<String, BTreeSet<String>>, DerivationError> {
    let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, wanted) in &drv.input_drvs {
        let h = input_modulo(path).ok_or_else(|| DerivationError::UnknownInput(path.clone()))?;
        inputs
            .entry(h.to_base16())
            .or_default()
            .extend(wanted.iter().cloned());
    }
    Ok(inputs)
}

/// Nix's `hashDerivationModulo(drv, maskOutputs = false)`: the hash that
/// stands for this derivation where others name it as an input (what a caller
/// memoises and hands back through `input_modulo` for the derivations above).
/// `input_modulo` gives the same for each input derivation; an unknown one is
/// an error.
///
/// A fixed output's hash covers its path; the declared one is used (Nix
/// recomputes it from the name: [`Derivation::check_output_paths`] is what
/// says the two agree, so check a derivation before trusting its hash).
pub fn hash_derivation_modulo(
    drv: &Derivation,
    input_modulo: &dyn Fn(&StorePath) -> Option<Hash>,
) -> Result<Hash, DerivationError> {
    match kind(drv, "")? {
        Kind::Fixed(recursive, hash) => {
            let path =
                drv.outputs["out"]
                    .path
                    .as_ref()
                    .ok_or_else(|| DerivationError::BadOutput {
                        output: "out".into(),
                        why: "a fixed output without a path".into(),
                    })?;
            let s = format!(
                "fixed:out:{}{}:{}:{}",
                if recursive { "r:" } else { "" },
                hash.algo().name(),
                hash.to_base16(),
                path
            );
            Ok(HashAlgo::Sha256.digest(s.as_bytes()))
        }
        Kind::InputAddressed => {
            let inputs = replaced_inputs(drv, input_modulo)?;
            Ok(HashAlgo::Sha256.digest(&drv.unparse(false, Some(&inputs))))
        }
    }
}

impl Derivation {
    /// The output paths Nix gives this derivation (named `name`), whatever
    /// paths it declares.
    pub fn computed_output_paths(
        &self,
        name: &str,
        input_modulo: &dyn Fn(&StorePath) -> Option<Hash>,
    ) -> Result<BTreeMap<String, StorePath>, DerivationError> {
        let bad = |output: &str, e: crate::store_path::StorePathError| DerivationError::BadOutput {
            output: output.to_owned(),
            why: e.to_string(),
        };
        match kind(self, name)? {
            Kind::Fixed(recursive, hash) => {
                let p = fixed_output_path(name, recursive, &hash)?;
                Ok(BTreeMap::from([("out".to_owned(), p)]))
            }
            Kind::InputAddressed => {
                let inputs = replaced_inputs(self, input_modulo)?;
                let masked = HashAlgo::Sha256.digest(&self.unparse(true, Some(&inputs)));
                self.outputs
                    .keys()
                    .map(|o| {
                        let p = StorePath::make(
                            &format!("output:{o}"),
                            &masked,
                            &output_path_name(name, o),
                        )
                        .map_err(|e| bad(o, e))?;
                        Ok((o.clone(), p))
                    })
                    .collect()
            }
        }
    }

    /// That every output's declared path, and the environment variable named
    /// after it (as Nix checks when it writes a derivation), is the computed one.
    pub fn check_output_paths(
        &self,
        name: &str,
        input_modulo: &dyn Fn(&StorePath) -> Option<Hash>,
    ) -> Result<(), DerivationError> {
        let computed = self.computed_output_paths(name, input_modulo)?;
        for (o, want) in &computed {
            let wrong = |declared: String| DerivationError::WrongOutputPath {
                name: name.to_owned(),
                output: o.clone(),
                declared,
                computed: want.clone(),
            };
            let declared = self.outputs[o].path.as_ref();
            if declared != Some(want) {
                return Err(wrong(
                    declared.map_or_else(|| "\"\"".to_owned(), |p| p.to_string()),
                ));
            }
            match self.env_var(o) {
                Some(v) if *v == want.to_string() => {}
                Some(v) => return Err(wrong(format!("{v} (in its environment variable)"))),
                None => return Err(wrong("nothing (no environment variable)".into())),
            }
        }
        Ok(())
    }

    /// The `BasicDerivation` a build hook sends for this derivation: each
    /// input derivation replaced by the paths of the outputs wanted of it
    /// (`input_outputs(drv, output)`), added to the input sources.
    pub fn resolve(
        &self,
        name: &str,
        input_outputs: &dyn Fn(&StorePath, &str) -> Option<StorePath>,
    ) -> Result<BasicDerivation, DerivationError> {
        let mut basic = self.to_basic(name);
        for (drv, wanted) in &self.input_drvs {
            for o in wanted {
                let p =
                    input_outputs(drv, o).ok_or_else(|| DerivationError::UnknownInputOutput {
                        drv: drv.clone(),
                        output: o.clone(),
                    })?;
                basic.input_srcs.insert(p);
            }
        }
        Ok(basic)
    }
}

impl BasicDerivation {
    /// sha256 over a canonical serialisation of every field (the name, then
    /// the ATerm of the derivation with no input derivations), so two builds
    /// can be compared by content.
    pub fn digest(&self) -> Hash {
        let as_drv = Derivation {
            outputs: self.outputs.clone(),
            input_drvs: BTreeMap::new(),
            input_srcs: self.input_srcs.clone(),
            platform: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        };
        let mut h = crate::hash::Hasher::new(HashAlgo::Sha256);
        h.update(b"farm-basic-derivation\0");
        h.update(&(self.name.len() as u64).to_le_bytes());
        h.update(self.name.as_bytes());
        h.update(&as_drv.to_aterm());
        h.finish()
    }
}
