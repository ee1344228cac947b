//! farm-nix's derivations against real Nix 2.8: `.drv` files that
//! `nix-instantiate` writes in a private store (simple, multi-output,
//! fixed-output flat and recursive with sha256 and sha1, a chain of three
//! input derivations over a fixed-output input, strings holding bytes that
//! are not UTF-8) parse and print back byte for byte, and the output paths
//! farm-nix computes (hashDerivationModulo, bottom-up and memoised) are the
//! ones Nix chose, as the `.drv` declares them and `nix show-derivation`
//! reports them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use farm_nix::derivation::{Derivation, hash_derivation_modulo, name_from_drv_path};
use farm_nix::{Hash, StorePath};
use farm_tests::{Actor, TestLogs, deadline};

/// The hang-guard.
const DEADLINE: Duration = Duration::from_secs(300);

/// The expressions; `@RAW@` becomes a byte 0xff (Nix's lexer takes any byte
/// in a string literal), `./bytes.bin` holds 0xfe 0xff.
const EXPR: &[u8] = br#"
let
  sh = name: attrs: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${name} > $out" ];
  } // attrs);
  fetched = name: algo: mode: sh name {
    outputHashAlgo = algo;
    outputHashMode = mode;
    outputHash = builtins.hashString algo name;
  };
  flat256 = fetched "flat256" "sha256" "flat";
  flat1 = fetched "flat1" "sha1" "flat";
  rec256 = fetched "rec256" "sha256" "recursive";
  rec1 = fetched "rec1" "sha1" "recursive";
  multi = sh "multi" {
    outputs = [ "out" "dev" "lib" ];
    args = [ "-c" "echo > $out; echo > $dev; echo > $lib" ];
  };
  c1 = sh "c1" { src = flat256; s = builtins.toFile "c1-src" "source"; };
  c2 = sh "c2" { dep = c1; fixed = rec1; };
  c3 = sh "c3" { dep = c2; dev = multi.dev; lib = multi.lib; };
  raw = sh "raw" {
    literal = "a@RAW@b";
    fromFile = builtins.readFile ./bytes.bin;
    args = [ "-c" "echo @RAW@ > $out" ];
  };
in { inherit flat256 flat1 rec256 rec1 multi c1 c2 c3 raw; }
"#;

const ATTRS: &[&str] = &[
    "flat256", "flat1", "rec256", "rec1", "multi", "c1", "c2", "c3", "raw",
];

#[test]
fn computed_output_paths_match_real_nix() -> anyhow::Result<()> {
    let logs = TestLogs::new("derivations_real_nix")?;
    deadline(DEADLINE, &logs, |logs| check(&logs))
}

/// Reads `.drv` files from the actor's store, memoising their modulo hashes.
struct Drvs<'a> {
    nix: &'a Actor,
    parsed: BTreeMap<StorePath, Derivation>,
    modulo: BTreeMap<StorePath, Hash>,
}

impl Drvs<'_> {
    fn read(&mut self, p: &StorePath) -> anyhow::Result<Derivation> {
        if let Some(d) = self.parsed.get(p) {
            return Ok(d.clone());
        }
        let bytes = std::fs::read(self.nix.host_path_of(p))?;
        let d = Derivation::parse_aterm(&bytes).with_context(|| format!("{p}"))?;
        ensure!(
            d.to_aterm() == bytes,
            "{p} does not print back byte for byte"
        );
        let name = name_from_drv_path(p)?;
        ensure!(d.drv_path(&name)? == *p, "{p}: text path differs");
        self.parsed.insert(p.clone(), d.clone());
        Ok(d)
    }

    /// The modulo hash of `p`, its inputs' first (depth-first, memoised).
    fn modulo(&mut self, p: &StorePath) -> anyhow::Result<Hash> {
        if let Some(h) = self.modulo.get(p) {
            return Ok(h.clone());
        }
        let d = self.read(p)?;
        for i in d.input_drvs.keys() {
            self.modulo(i)?;
        }
        let name = name_from_drv_path(p)?;
        let memo = &self.modulo;
        d.check_output_paths(&name, &|i| memo.get(i).cloned())
            .with_context(|| format!("{p}"))?;
        let h = hash_derivation_modulo(&d, &|i| memo.get(i).cloned())?;
        self.modulo.insert(p.clone(), h.clone());
        Ok(h)
    }
}

fn check(logs: &TestLogs) -> anyhow::Result<()> {
    let nix = Actor::with_logs("nix", logs)?;
    let dir = nix.root().join("exprs");
    std::fs::create_dir_all(&dir)?;
    let expr = replace(EXPR, b"@RAW@", b"\xff");
    std::fs::write(dir.join("drvs.nix"), &expr)?;
    std::fs::write(dir.join("bytes.bin"), b"\xfe\xff")?;
    let file = dir.join("drvs.nix");
    let file = file.to_str().context("path")?;

    let mut drvs = Drvs {
        nix: &nix,
        parsed: BTreeMap::new(),
        modulo: BTreeMap::new(),
    };
    let mut all = BTreeSet::new();
    for attr in ATTRS {
        let out = nix.run("nix-instantiate", &[file, "-A", attr])?;
        let drv = StorePath::parse(out.trim())?;
        drvs.modulo(&drv)?;
        // what `nix show-derivation` says the outputs are
        let shown = nix.run(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "show-derivation",
                &drv.to_string(),
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&shown)?;
        let outs = v[drv.to_string()]["outputs"]
            .as_object()
            .context("show-derivation outputs")?;
        let d = drvs.read(&drv)?;
        let name = name_from_drv_path(&drv)?;
        let memo = &drvs.modulo;
        let computed = d.computed_output_paths(&name, &|i| memo.get(i).cloned())?;
        ensure!(computed.len() == outs.len(), "{attr}: outputs {outs:?}");
        for (o, p) in &computed {
            ensure!(
                outs[o]["path"].as_str() == Some(p.to_string().as_str()),
                "{attr}: output {o}: farm-nix computed {p}, Nix says {}",
                outs[o]["path"]
            );
        }
        // every .drv of the closure (the input derivations too) round-trips
        let closure = nix.run("nix-store", &["--query", "--requisites", &drv.to_string()])?;
        for line in closure.lines() {
            let p = StorePath::parse(line)?;
            if p.is_derivation() {
                drvs.read(&p)?;
                all.insert(p);
            }
        }
        if *attr == "raw" {
            let bytes = std::fs::read(nix.host_path_of(&drv))?;
            ensure!(
                std::str::from_utf8(&bytes).is_err(),
                "the raw .drv really holds bytes that are not UTF-8"
            );
            ensure!(d.env_var("literal").map(|v| v.as_bytes()) == Some(b"a\xffb".as_slice()));
            ensure!(d.env_var("fromFile").map(|v| v.as_bytes()) == Some(b"\xfe\xff".as_slice()));
            ensure!(d.args[1] == b"echo \xff > $out".as_slice());
        }
    }
    // the chain's fixed-output input stands in by its fixed hash: a c1 whose
    // fixed input is fetched another way (other builder, same hash) keeps its paths
    let c1 = StorePath::parse(nix.run("nix-instantiate", &[file, "-A", "c1"])?.trim())?;
    let flat = drvs.read(&c1)?;
    let (fixed_drv, _) = flat
        .input_drvs
        .iter()
        .next()
        .context("c1 has its fixed-output input")?;
    let mut other = drvs.read(fixed_drv)?;
    other.args = vec!["-c".into(), "fetch it elsewhere".into()];
    let memo = &drvs.modulo;
    if hash_derivation_modulo(&other, &|i| memo.get(i).cloned())? != memo[fixed_drv] {
        bail!("a fixed-output derivation's modulo hash depends on how it fetches");
    }
    ensure!(
        all.len() >= ATTRS.len(),
        "{} derivations checked",
        all.len()
    );
    eprintln!(
        "{} .drv files checked against Nix's own output paths",
        all.len()
    );
    Ok(())
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}
