//! Running the local Nix: evaluate installables to `.drv` paths, compute their
//! closure, read path infos, copy outputs back from the farm's cache.
//! Everything shells out to the `nix`, `nix-store` and `nix-instantiate`
//! commands (Nix 2.8 or later) on `PATH`, so it works on the caller's own store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use farm_nix::hash::Hash;
use farm_nix::store_path::StorePath;
use serde::Deserialize;
use tokio::process::Command;

use crate::error::CliError;

/// Most paths passed to one Nix command.
const ARGV_CHUNK: usize = 500;
/// Most stderr bytes quoted in an error.
const STDERR_TAIL: usize = 4000;

/// Run a command and return its stdout; failing commands become
/// [`CliError::Nix`] quoting the end of stderr.
pub async fn run(mut cmd: Command) -> Result<String, CliError> {
    let desc = describe(&cmd);
    cmd.kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| CliError::Nix {
        command: desc.clone(),
        message: if e.kind() == std::io::ErrorKind::NotFound {
            "not found on PATH: is Nix installed?".into()
        } else {
            e.to_string()
        },
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        let tail = match err.char_indices().rev().nth(STDERR_TAIL) {
            Some((i, _)) => format!("…{}", &err[i..]),
            None => err.to_owned(),
        };
        return Err(CliError::Nix {
            command: desc,
            message: format!("{} ({})", tail, out.status),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| CliError::Nix {
        command: desc,
        message: "printed something that is not UTF-8".into(),
    })
}

fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut s = std.get_program().to_string_lossy().into_owned();
    for (i, a) in std.get_args().enumerate() {
        if i >= 6 {
            s.push_str(" …");
            break;
        }
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Parse store paths printed one per line (`path!output` suffixes dropped).
pub fn parse_paths(stdout: &str, what: &str) -> Result<Vec<StorePath>, CliError> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let p = l.split('!').next().unwrap_or(l);
            StorePath::parse(p).map_err(|e| CliError::Nix {
                command: what.to_owned(),
                message: format!("printed {l:?}, not a store path: {e}"),
            })
        })
        .collect()
}

/// What an installable names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installable {
    /// A store derivation.
    Drv(StorePath),
    /// A Nix expression file or directory, for nix-instantiate.
    File(PathBuf),
    /// A flake reference with an attribute (`.#foo`, `github:o/r#bar`).
    Flake(String),
}

/// Classify an installable argument.
pub fn classify(arg: &str) -> Result<Installable, CliError> {
    // `/nix/store/…drv!out` and `…drv^out` name the derivation too.
    let bare = arg.split(['!', '^']).next().unwrap_or(arg);
    if bare.ends_with(".drv") && bare.starts_with(farm_nix::store_path::STORE_DIR) {
        return StorePath::parse(bare)
            .map(Installable::Drv)
            .map_err(|e| CliError::Usage(format!("{arg}: not a store derivation path: {e}")));
    }
    if arg.contains('#') {
        return Ok(Installable::Flake(arg.to_owned()));
    }
    let path = Path::new(arg);
    if path.exists() {
        return Ok(Installable::File(path.to_path_buf()));
    }
    if arg.contains(':') {
        return Ok(Installable::Flake(arg.to_owned()));
    }
    Err(CliError::Usage(format!(
        "{arg}: not a .drv path, an existing .nix file, or a flake reference (like .#checks.x86_64-linux.foo)"
    )))
}

/// The arguments for `.nix` files.
#[derive(Debug, Clone, Default)]
pub struct EvalArgs {
    pub attrs: Vec<String>,
    /// `(name, expr)` pairs.
    pub args: Vec<(String, String)>,
    /// `(name, string)` pairs.
    pub argstrs: Vec<(String, String)>,
}

/// The `.drv` paths the installables name, in order, duplicates removed.
pub async fn instantiate(
    installables: &[Installable],
    eval: &EvalArgs,
) -> Result<Vec<StorePath>, CliError> {
    let has_file = installables
        .iter()
        .any(|i| matches!(i, Installable::File(_)));
    if !has_file && (!eval.attrs.is_empty() || !eval.args.is_empty() || !eval.argstrs.is_empty()) {
        return Err(CliError::Usage(
            "-A, --arg and --argstr apply to .nix files, and no installable is one".into(),
        ));
    }
    let mut out: Vec<StorePath> = Vec::new();
    for inst in installables {
        let paths = match inst {
            Installable::Drv(p) => vec![p.clone()],
            Installable::File(f) => {
                let mut cmd = Command::new("nix-instantiate");
                cmd.arg(f);
                for a in &eval.attrs {
                    cmd.arg("-A").arg(a);
                }
                for (n, v) in &eval.args {
                    cmd.arg("--arg").arg(n).arg(v);
                }
                for (n, v) in &eval.argstrs {
                    cmd.arg("--argstr").arg(n).arg(v);
                }
                parse_paths(&run(cmd).await?, "nix-instantiate")?
            }
            Installable::Flake(r) => {
                let mut cmd = Command::new("nix");
                cmd.args([
                    "--extra-experimental-features",
                    "nix-command flakes",
                    "path-info",
                    "--derivation",
                ])
                .arg(r);
                parse_paths(&run(cmd).await?, "nix path-info --derivation")?
            }
        };
        for p in paths {
            if !p.name().ends_with(".drv") {
                return Err(CliError::Usage(format!(
                    "{p} is not a derivation (evaluation gave a plain store path)"
                )));
            }
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        return Err(CliError::Usage(
            "the installables name no derivation".into(),
        ));
    }
    Ok(out)
}

/// The closure of `paths` in the local store (`nix-store -qR`).
pub async fn closure(paths: &[StorePath]) -> Result<Vec<StorePath>, CliError> {
    let mut all = Vec::new();
    for chunk in paths.chunks(ARGV_CHUNK) {
        let mut cmd = Command::new("nix-store");
        cmd.arg("--query").arg("--requisites");
        cmd.args(chunk.iter().map(|p| p.to_string()));
        all.extend(parse_paths(
            &run(cmd).await?,
            "nix-store --query --requisites",
        )?);
    }
    all.sort();
    all.dedup();
    Ok(all)
}

/// A local derivation's outputs (`name → path`), as [`drv_outputs`] reads them.
pub type DrvOutputs = BTreeMap<String, StorePath>;
/// A local `.drv` with its outputs.
pub type LocalDrv = (StorePath, DrvOutputs);

/// The closure of the derivations `roots`, found by reading their `.drv`
/// files instead of asking Nix: a `.drv`'s references are exactly its input
/// derivations and its input sources (Nix writes them so), so the walk
/// follows the input derivations itself and asks `nix-store --query
/// --requisites` only about the input sources (none, for many graphs).
/// Returns the closure (sorted, no duplicates) and every `.drv` of it with
/// its outputs, which the results need anyway: one read of each file.
pub async fn drv_closure(roots: &[StorePath]) -> Result<(Vec<StorePath>, Vec<LocalDrv>), CliError> {
    let roots = roots.to_vec();
    let (mut drvs, srcs) = tokio::task::spawn_blocking(move || walk_drvs(&roots))
        .await
        .map_err(|e| CliError::Usage(format!("reading the derivations: {e}")))??;
    let mut all: Vec<StorePath> = drvs.iter().map(|(d, _)| d.clone()).collect();
    if !srcs.is_empty() {
        let src_closure = closure(&srcs).await?;
        // A source may itself be a `.drv` (`builtins.storePath`): Nix gave
        // its closure, the results still want its outputs.
        let seen: std::collections::HashSet<StorePath> = all.iter().cloned().collect();
        let extra: Vec<StorePath> = src_closure
            .iter()
            .filter(|p| p.name().ends_with(".drv") && !seen.contains(*p))
            .cloned()
            .collect();
        if !extra.is_empty() {
            let more = tokio::task::spawn_blocking(move || {
                extra
                    .into_iter()
                    .map(|d| drv_outputs(&d).map(|o| (d, o)))
                    .collect::<Result<Vec<_>, CliError>>()
            })
            .await
            .map_err(|e| CliError::Usage(format!("reading the derivations: {e}")))??;
            drvs.extend(more);
        }
        all.extend(src_closure);
    }
    all.sort();
    all.dedup();
    drvs.sort_by(|a, b| a.0.cmp(&b.0));
    drvs.dedup_by(|a, b| a.0 == b.0);
    Ok((all, drvs))
}

/// Threads reading `.drv` files at once.
const WALK_THREADS: usize = 4;

/// The walk's shared state: what is to be read, what was, what it needs.
#[derive(Default)]
struct Walk {
    todo: Vec<StorePath>,
    seen: std::collections::HashSet<StorePath>,
    /// Files being read now.
    reading: usize,
    drvs: Vec<LocalDrv>,
    srcs: std::collections::BTreeSet<StorePath>,
    error: Option<CliError>,
}

/// Read `roots` and every derivation they need, [`WALK_THREADS`] threads
/// taking files from one list (a graph's layers are often narrow, its
/// closure wide). Returns every `.drv` with its outputs, and the input
/// sources (not derivations) met on the way.
fn walk_drvs(roots: &[StorePath]) -> Result<(Vec<LocalDrv>, Vec<StorePath>), CliError> {
    use std::sync::{Condvar, Mutex};
    let walk = Mutex::new(Walk {
        todo: roots.to_vec(),
        seen: roots.iter().cloned().collect(),
        ..Walk::default()
    });
    let more = Condvar::new();
    let lock = || walk.lock().unwrap_or_else(|e| e.into_inner());
    let worker = || {
        let mut w = lock();
        loop {
            if w.error.is_some() {
                return;
            }
            let Some(p) = w.todo.pop() else {
                if w.reading == 0 {
                    more.notify_all();
                    return;
                }
                w = more.wait(w).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            w.reading += 1;
            drop(w);
            let got = read_drv(&p);
            w = lock();
            w.reading -= 1;
            match got {
                Ok((drv, d)) => {
                    for input in d.input_drvs.keys() {
                        if w.seen.insert(input.clone()) {
                            w.todo.push(input.clone());
                        }
                    }
                    w.srcs.extend(d.input_srcs.iter().cloned());
                    w.drvs.push((drv, d.output_paths()));
                }
                Err(e) => {
                    w.error.get_or_insert(e);
                }
            }
            more.notify_all();
        }
    };
    std::thread::scope(|s| {
        for _ in 1..WALK_THREADS {
            s.spawn(worker);
        }
        worker();
    });
    let w = walk.into_inner().unwrap_or_else(|e| e.into_inner());
    match w.error {
        Some(e) => Err(e),
        None => Ok((w.drvs, w.srcs.into_iter().collect())),
    }
}

/// Read and parse a local `.drv` file.
fn read_drv(drv: &StorePath) -> Result<(StorePath, farm_nix::derivation::Derivation), CliError> {
    use std::io::Read;
    let path = PathBuf::from(drv.to_string());
    let max = farm_nix::derivation::MAX_DRV_SIZE;
    let mut text = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut text))
        .map_err(|e| CliError::io_path("reading", &path, e))?;
    if text.len() > max {
        return Err(CliError::Usage(format!("{drv}: derivation file too large")));
    }
    let d = farm_nix::derivation::Derivation::parse_aterm(&text)
        .map_err(|e| CliError::Usage(format!("{drv}: {e}")))?;
    Ok((drv.clone(), d))
}

/// What `nix path-info --json` says about a path.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathInfoJson {
    path: String,
    #[serde(default)]
    valid: Option<bool>,
    #[serde(default)]
    nar_hash: Option<String>,
    #[serde(default)]
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    #[serde(default)]
    deriver: Option<String>,
    #[serde(default)]
    ca: Option<String>,
    #[serde(default)]
    signatures: Vec<String>,
}

/// A local path's metadata, as the farm's upload needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPathInfo {
    pub path: StorePath,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub ca: Option<String>,
    pub sigs: Vec<String>,
}

/// Parse `nix path-info --json` output.
pub fn parse_path_infos(json: &str) -> Result<Vec<LocalPathInfo>, CliError> {
    let bad = |m: String| CliError::Nix {
        command: "nix path-info --json".into(),
        message: m,
    };
    let raw: Vec<PathInfoJson> =
        serde_json::from_str(json).map_err(|e| bad(format!("unreadable JSON: {e}")))?;
    raw.into_iter()
        .map(|r| {
            let path = StorePath::parse(&r.path).map_err(|e| bad(format!("{}: {e}", r.path)))?;
            if r.valid == Some(false) {
                return Err(bad(format!("{} is not valid in the local store", r.path)));
            }
            let nar_hash = r
                .nar_hash
                .as_deref()
                .ok_or_else(|| bad(format!("{}: no narHash", r.path)))
                .and_then(|h| Hash::parse_any(h).map_err(|e| bad(format!("{}: {e}", r.path))))?;
            let references = r
                .references
                .iter()
                .map(|p| StorePath::parse(p).map_err(|e| bad(format!("{p}: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            let deriver = match r.deriver.as_deref() {
                None | Some("") => None,
                Some(d) => StorePath::parse(d).ok(),
            };
            Ok(LocalPathInfo {
                path,
                nar_hash,
                nar_size: r
                    .nar_size
                    .ok_or_else(|| bad(format!("{}: no narSize", r.path)))?,
                references,
                deriver,
                ca: r.ca.filter(|c| !c.is_empty()),
                sigs: r.signatures,
            })
        })
        .collect()
}

/// Path infos of local store paths (`.drv` files queried as themselves, not
/// as their outputs).
pub async fn path_infos(
    paths: &[StorePath],
) -> Result<BTreeMap<StorePath, LocalPathInfo>, CliError> {
    let (drvs, others): (Vec<&StorePath>, Vec<&StorePath>) =
        paths.iter().partition(|p| p.name().ends_with(".drv"));
    let mut out = BTreeMap::new();
    for (group, derivation) in [(drvs, true), (others, false)] {
        for chunk in group.chunks(ARGV_CHUNK) {
            let mut cmd = Command::new("nix");
            cmd.args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
            ]);
            if derivation {
                cmd.arg("--derivation");
            }
            cmd.args(chunk.iter().map(|p| p.to_string()));
            for info in parse_path_infos(&run(cmd).await?)? {
                out.insert(info.path.clone(), info);
            }
        }
    }
    for p in paths {
        if !out.contains_key(p) {
            return Err(CliError::Nix {
                command: "nix path-info".into(),
                message: format!("no information about {p}"),
            });
        }
    }
    Ok(out)
}

/// `paths` ordered so that every path comes after the paths it references
/// (references outside `paths` are ignored). Ties are broken by path.
pub fn dependency_order(
    paths: &[StorePath],
    infos: &BTreeMap<StorePath, LocalPathInfo>,
) -> Vec<StorePath> {
    use std::collections::{BTreeSet, HashMap};
    let set: BTreeSet<&StorePath> = paths.iter().collect();
    let mut pending: HashMap<&StorePath, usize> = HashMap::new();
    let mut referrers: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    for p in &set {
        let refs: BTreeSet<&StorePath> = infos
            .get(*p)
            .map(|i| {
                i.references
                    .iter()
                    .filter(|r| *r != *p && set.contains(r))
                    .collect()
            })
            .unwrap_or_default();
        pending.insert(p, refs.len());
        for r in refs {
            referrers.entry(r).or_default().push(p);
        }
    }
    let mut ready: BTreeSet<&StorePath> = set.iter().copied().filter(|p| pending[p] == 0).collect();
    let mut out = Vec::with_capacity(set.len());
    while let Some(p) = ready.pop_first() {
        out.push(p.clone());
        for q in referrers.get(p).into_iter().flatten() {
            let n = pending.get_mut(q).expect("every referrer is pending");
            *n -= 1;
            if *n == 0 {
                ready.insert(q);
            }
        }
    }
    // A reference cycle cannot happen in a store; keep any leftovers anyway.
    for p in set {
        if !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

/// `paths` in dependency order ([`dependency_order`]) cut into levels: a
/// path's level is one more than the highest of its references in `paths`
/// (0 without any), so the paths of one level need only earlier levels and
/// can be uploaded at once.
pub fn dependency_levels(
    paths: &[StorePath],
    infos: &BTreeMap<StorePath, LocalPathInfo>,
) -> Vec<Vec<StorePath>> {
    use std::collections::HashMap;
    let ordered = dependency_order(paths, infos);
    let mut level: HashMap<&StorePath, usize> = HashMap::new();
    let mut levels: Vec<Vec<StorePath>> = Vec::new();
    for p in &ordered {
        let l = infos
            .get(p)
            .into_iter()
            .flat_map(|i| i.references.iter())
            .filter(|r| *r != p)
            .filter_map(|r| level.get(r))
            .map(|l| l + 1)
            .max()
            .unwrap_or(0);
        level.insert(p, l);
        if levels.len() <= l {
            levels.resize_with(l + 1, Vec::new);
        }
        levels[l].push(p.clone());
    }
    levels
}

/// Read a local derivation's outputs (`name → path`).
pub fn drv_outputs(drv: &StorePath) -> Result<DrvOutputs, CliError> {
    read_drv(drv).map(|(_, d)| d.output_paths())
}

/// Copy `paths` (and their closures) from a binary cache into the local store.
pub async fn copy_from_cache(
    cache_url: &str,
    public_key: Option<&str>,
    paths: &[StorePath],
) -> Result<(), CliError> {
    for chunk in paths.chunks(ARGV_CHUNK) {
        let mut cmd = Command::new("nix");
        cmd.args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--from",
        ])
        .arg(cache_url);
        if let Some(k) = public_key {
            cmd.args(["--option", "extra-trusted-public-keys", k]);
        }
        cmd.args(chunk.iter().map(|p| p.to_string()));
        run(cmd).await?;
    }
    Ok(())
}

/// Make `link` a GC root pointing at `path` (like nix-build's `result`).
pub async fn add_root(link: &Path, path: &StorePath) -> Result<(), CliError> {
    let mut cmd = Command::new("nix-store");
    cmd.arg("--add-root")
        .arg(link)
        .arg("--realise")
        .arg(path.to_string());
    run(cmd).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::parse(s).unwrap()
    }

    #[test]
    fn classifies_installables() {
        let drv = "/nix/store/fpfzx999brqs5x1w0n2dpyya4v8d43lh-b.drv";
        assert_eq!(classify(drv).unwrap(), Installable::Drv(sp(drv)));
        assert_eq!(
            classify(&format!("{drv}!out")).unwrap(),
            Installable::Drv(sp(drv))
        );
        assert_eq!(
            classify(".#checks.x86_64-linux.foo").unwrap(),
            Installable::Flake(".#checks.x86_64-linux.foo".into())
        );
        assert_eq!(
            classify("github:o/r").unwrap(),
            Installable::Flake("github:o/r".into())
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("default.nix");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(
            classify(f.to_str().unwrap()).unwrap(),
            Installable::File(f.clone())
        );
        let e = classify("no-such-file.nix").unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
    }

    #[test]
    fn parses_nix_path_info_json() {
        // As Nix 2.8 printed it.
        let json = r#"[{"path":"/nix/store/fpfzx999brqs5x1w0n2dpyya4v8d43lh-b.drv","narHash":"sha256-MBZIo+mPws/47tiFRmt3A/wgj3pHzT+iLHSakraMIAw=","narSize":616,"references":["/nix/store/nlbcvvibdaxfc09nafh29bvw5xb6q6qv-a.drv"],"ca":"text:sha256:1mjaki6nlxkqyvl4fz2darnqpy4v042rik05nb8mqpis8cjij7jz","registrationTime":1795638101},{"path":"/nix/store/nlbcvvibdaxfc09nafh29bvw5xb6q6qv-a.drv","narHash":"sha256-cFuO2Xh/Mr6gf8iMzcJIV/1pUWyInIntuV1Q34II3HA=","narSize":456,"references":["/nix/store/6nl4qigvdbfkgqr6zrfcl7w325ll5079-s.txt"],"ca":"text:sha256:1ykpn57l4kdi7rr2q8gqfgdsy5rrissyybpalaw77c0y2xzr16kp","registrationTime":1795638101}]"#;
        let infos = parse_path_infos(json).unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].nar_size, 616);
        assert_eq!(
            infos[0].nar_hash.to_nix32_prefixed(),
            Hash::parse_any("sha256-MBZIo+mPws/47tiFRmt3A/wgj3pHzT+iLHSakraMIAw=")
                .unwrap()
                .to_nix32_prefixed()
        );
        assert_eq!(
            infos[0].references,
            vec![sp("/nix/store/nlbcvvibdaxfc09nafh29bvw5xb6q6qv-a.drv")]
        );
        assert!(infos[0].ca.as_deref().unwrap().starts_with("text:sha256:"));
        assert!(
            parse_path_infos(
                r#"[{"path":"/nix/store/clvrfiq699vwn0pddcx6b2ilqh8i102y-b","valid":false}]"#
            )
            .is_err()
        );
    }

    #[test]
    fn orders_references_first() {
        let s = sp("/nix/store/6nl4qigvdbfkgqr6zrfcl7w325ll5079-s.txt");
        let a = sp("/nix/store/nlbcvvibdaxfc09nafh29bvw5xb6q6qv-a.drv");
        let b = sp("/nix/store/0pfzx999brqs5x1w0n2dpyya4v8d43lh-b.drv");
        let info = |p: &StorePath, refs: Vec<StorePath>| LocalPathInfo {
            path: p.clone(),
            nar_hash: Hash::parse_any("sha256-MBZIo+mPws/47tiFRmt3A/wgj3pHzT+iLHSakraMIAw=")
                .unwrap(),
            nar_size: 1,
            references: refs,
            deriver: None,
            ca: None,
            sigs: vec![],
        };
        let mut infos = BTreeMap::new();
        infos.insert(s.clone(), info(&s, vec![s.clone()]));
        infos.insert(a.clone(), info(&a, vec![s.clone()]));
        infos.insert(b.clone(), info(&b, vec![a.clone(), s.clone()]));
        assert_eq!(
            dependency_order(&[b.clone(), a.clone(), s.clone()], &infos),
            vec![s.clone(), a.clone(), b.clone()]
        );
        // a reference outside the set is ignored
        assert_eq!(
            dependency_order(std::slice::from_ref(&b), &infos),
            vec![b.clone()]
        );

        // Levels (each in path order): s, then a (needs s), then b (needs
        // a); c needs only s, so it shares a's level; d needs nothing in the
        // set, so it shares s's.
        let c = sp("/nix/store/1pfzx999brqs5x1w0n2dpyya4v8d43lh-c.drv");
        let d = sp("/nix/store/2pfzx999brqs5x1w0n2dpyya4v8d43lh-d.drv");
        infos.insert(c.clone(), info(&c, vec![s.clone()]));
        infos.insert(d.clone(), info(&d, vec![]));
        let all = [b.clone(), d.clone(), c.clone(), a.clone(), s.clone()];
        assert_eq!(
            dependency_levels(&all, &infos),
            vec![
                vec![d.clone(), s.clone()],
                vec![c.clone(), a.clone()],
                vec![b.clone()]
            ]
        );
        assert_eq!(
            dependency_levels(std::slice::from_ref(&b), &infos),
            vec![vec![b]]
        );
    }

    #[test]
    fn parses_printed_paths() {
        let out = "/nix/store/fpfzx999brqs5x1w0n2dpyya4v8d43lh-b.drv!dev\n\n";
        assert_eq!(
            parse_paths(out, "x").unwrap(),
            vec![sp("/nix/store/fpfzx999brqs5x1w0n2dpyya4v8d43lh-b.drv")]
        );
        assert!(parse_paths("warning: foo\n", "x").is_err());
    }
}
