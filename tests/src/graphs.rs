//! The Nix expressions the end-to-end tests build, all `/bin/sh`
//! derivations (no nixpkgs): the witness prelude (`mk`, `gate`), graphs
//! from bindings, the per-client graphs of the concurrency and fault
//! scenarios, the layered graphs of the endpoint tests, the CLI tests'
//! chain; and queries of a client's store about them.

use std::path::Path;

use farm_nix::store_path::StorePath;

use crate::actor::Actor;

/// A Nix expression prelude: `mk NAME SCRIPT DEPS` makes a `/bin/sh` derivation
/// that records itself in the witness file, `gate FILE` waits for a file.
pub fn prelude(witness: &Path) -> String {
    let w = witness.display();
    format!(
        r#"
  witness = "{w}";
  mkWith = attrs: name: script: deps: derivation ({{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      echo "${{name}} $NIX_BUILD_TOP" >> ${{witness}}/built.log
      ${{script}}
    '' ];
    deps = deps;
  }} // attrs);
  mk = mkWith {{}};
  gate = file: ''
    echo $$ > ${{witness}}/${{file}}.pid
    echo "$NIX_BUILD_TOP" >> ${{witness}}/${{file}}.started
    while [ ! -e ${{witness}}/${{file}} ]; do /bin/sleep 0.1; done
  '';
"#
    )
}

/// A graph of `/bin/sh` derivations as one Nix file, and what it holds.
pub struct Graph {
    /// The expression (evaluates to a list of the roots).
    pub nix: String,
    /// Every derivation name in it.
    pub names: Vec<String>,
}

/// A Nix string literal of `s`.
pub fn lit(s: &str) -> String {
    farm_testkit::nix_string(s)
}

/// Builds the Nix text of a graph from `(binding, expression)` pairs and roots.
pub fn graph_nix(witness: &Path, bindings: &[(String, String)], roots: &[&str]) -> String {
    let mut nix = String::from("let\n");
    nix.push_str(&prelude(witness));
    for (name, expr) in bindings {
        nix.push_str(&format!("  {name} = {expr};\n"));
    }
    nix.push_str("in [ ");
    for r in roots {
        nix.push_str(r);
        nix.push(' ');
    }
    nix.push_str("]\n");
    nix
}

/// Derivations every client graph shares, and how many each has in all.
pub const SHARED_BY_ALL: usize = 4;
pub const GRAPH_SIZE: usize = 20;
/// Client-own derivations of a graph: all but the shared ones, the two
/// pair-shared ones and the top.
const OWN: usize = GRAPH_SIZE - SHARED_BY_ALL - 2 - 1;

/// Client `i`'s graph (of `n` clients) in round `salt`: one top derivation
/// over [`GRAPH_SIZE`] `- 1` others — [`SHARED_BY_ALL`] shared by every
/// client, `pair-i` and `pair-(i+1 mod n)` each shared with one neighbour,
/// and the client's own — each sleeping `sleep` seconds. Each build appends
/// `start NAME BUILD_TOP` to `WITNESS/runs.log` when it starts and `done …`
/// right before it ends. The top waits for `WITNESS/<gate>` when given.
/// Returns the Nix file's text and the derivation names.
pub fn client_graph(
    witness: &Path,
    salt: &str,
    i: usize,
    n: usize,
    sleep: f32,
    gate: Option<&str>,
) -> (String, Vec<String>) {
    let w = witness.display();
    let mut nix = format!(
        r#"let
  mk = name: deps: script: derivation {{
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      echo "start ${{name}} $NIX_BUILD_TOP" >> {w}/runs.log
      ${{script}}
      echo "${{name}} $deps" > $out
      echo "done ${{name}} $NIX_BUILD_TOP" >> {w}/runs.log
    '' ];
  }};
  nap = "/bin/sleep {sleep}";
"#
    );
    let mut names = Vec::new();
    let mut bind = |var: String, name: String, deps: Vec<String>, script: String| {
        nix.push_str(&format!(
            "  {var} = mk {} [ {} ] {script};\n",
            lit(&name),
            deps.join(" ")
        ));
        names.push(name);
        var
    };
    let g: Vec<String> = (0..SHARED_BY_ALL)
        .map(|k| {
            let deps = match k {
                0 | 1 => vec![],
                2 => vec!["g0".to_owned()],
                _ => vec![format!("g{}", k - 2), format!("g{}", k - 1)],
            };
            bind(
                format!("g{k}"),
                format!("{salt}shared-{k}"),
                deps,
                "nap".into(),
            )
        })
        .collect();
    let pairs: Vec<String> = [i, (i + 1) % n]
        .into_iter()
        .enumerate()
        .map(|(j, k)| {
            bind(
                format!("p{j}"),
                format!("{salt}pair-{k}"),
                vec![g[k % SHARED_BY_ALL].clone()],
                "nap".into(),
            )
        })
        .collect();
    let mut own: Vec<String> = Vec::new();
    for j in 0..OWN {
        let deps = match j {
            0 => vec![g[SHARED_BY_ALL - 1].clone(), pairs[0].clone()],
            1 => vec![pairs[1].clone()],
            _ => {
                let mut d = vec![own[j - 2].clone()];
                if j >= 3 {
                    d.push(own[j - 3].clone());
                }
                d
            }
        };
        let var = bind(
            format!("u{j}"),
            format!("{salt}c{i}-u{j}"),
            deps,
            "nap".into(),
        );
        own.push(var);
    }
    let script = match gate {
        Some(file) => lit(&format!(
            "while [ ! -e {w}/{file} ]; do /bin/sleep 0.1; done"
        )),
        None => "nap".to_owned(),
    };
    let all: Vec<String> = g.iter().chain(&pairs).chain(&own).cloned().collect();
    bind("top".into(), format!("{salt}c{i}-top"), all, script);
    nix.push_str("in top\n");
    (nix, names)
}

/// A layered graph: `width` leaves, then `depth` layers where node j depends on
/// nodes j and j+1 of the layer below, then one `top` over the last layer; all
/// built with `/bin/sh`. `salt` makes the paths unique to a test.
pub fn layered_graph_nix(salt: &str, width: usize, depth: usize) -> String {
    let mut s = String::from(
        "let\n  mk = name: script: derivation {\n    inherit name;\n    system = \"x86_64-linux\";\n    builder = \"/bin/sh\";\n    args = [ \"-c\" script ];\n  };\n",
    );
    for j in 0..width {
        s.push_str(&format!(
            "  l0n{j} = mk \"{salt}-l0n{j}\" \"echo L0N{j}-{salt} > $out\";\n"
        ));
    }
    for k in 1..=depth {
        for j in 0..width {
            let a = format!("l{}n{}", k - 1, j);
            let b = format!("l{}n{}", k - 1, (j + 1) % width);
            s.push_str(&format!(
                "  l{k}n{j} = mk \"{salt}-l{k}n{j}\" \"/bin/cat ${{{a}}} ${{{b}}} > $out; echo L{k}N{j} >> $out; echo building L{k}N{j} >&2\";\n"
            ));
        }
    }
    let last: Vec<String> = (0..width).map(|j| format!("${{l{depth}n{j}}}")).collect();
    s.push_str(&format!(
        "in mk \"{salt}-top\" \"/bin/cat {} > $out\"\n",
        last.join(" ")
    ));
    s
}

/// The benchmark's layered graph (issue 13): the shape of
/// [`layered_graph_nix`] (`width` leaves, `depth` layers, each node needing
/// two of the layer below, one top), but every derivation writes a few
/// lines (its name and its inputs' paths, not their contents, so outputs
/// stay small at any depth), after sleeping `sleep` seconds (the host's
/// `/bin/sleep`; none when 0).
pub fn layered_graph_nix_sleeping(salt: &str, width: usize, depth: usize, sleep: f32) -> String {
    let nap = if sleep > 0.0 {
        format!("/bin/sleep {sleep}; ")
    } else {
        String::new()
    };
    let mut s = String::from(
        "let\n  mk = name: script: derivation {\n    inherit name;\n    system = \"x86_64-linux\";\n    builder = \"/bin/sh\";\n    args = [ \"-c\" script ];\n  };\n",
    );
    for j in 0..width {
        s.push_str(&format!(
            "  l0n{j} = mk \"{salt}-l0n{j}\" \"{nap}echo L0N{j}-{salt} > $out\";\n"
        ));
    }
    for k in 1..=depth {
        for j in 0..width {
            let a = format!("l{}n{}", k - 1, j);
            let b = format!("l{}n{}", k - 1, (j + 1) % width);
            s.push_str(&format!(
                "  l{k}n{j} = mk \"{salt}-l{k}n{j}\" \"{nap}echo L{k}N{j} ${{{a}}} ${{{b}}} > $out\";\n"
            ));
        }
    }
    let last: Vec<String> = (0..width).map(|j| format!("${{l{depth}n{j}}}")).collect();
    s.push_str(&format!(
        "in mk \"{salt}-top\" \"{nap}echo top {} > $out\"\n",
        last.join(" ")
    ));
    s
}

/// What `top` of [`layered_graph_nix`] contains.
pub fn layered_graph_expected(salt: &str, width: usize, depth: usize) -> String {
    let mut layer: Vec<String> = (0..width).map(|j| format!("L0N{j}-{salt}\n")).collect();
    for k in 1..=depth {
        layer = (0..width)
            .map(|j| format!("{}{}L{k}N{j}\n", layer[j], layer[(j + 1) % width]))
            .collect();
    }
    layer.concat()
}

/// Every `.drv` in the closure of `drv` (itself included), from the client's store.
pub fn drv_closure(client: &Actor, drv: &StorePath) -> anyhow::Result<Vec<StorePath>> {
    Ok(client
        .closure(drv)?
        .into_iter()
        .filter(|p| p.name().ends_with(".drv"))
        .collect())
}

/// The output paths of derivations (`nix-store -q --outputs`).
pub fn outputs_of(client: &Actor, drvs: &[StorePath]) -> anyhow::Result<Vec<StorePath>> {
    let mut args = vec!["-q".to_string(), "--outputs".into()];
    args.extend(drvs.iter().map(|d| d.to_string()));
    client
        .run("nix-store", &args)?
        .lines()
        .map(|l| Ok(StorePath::parse(l.trim())?))
        .collect()
}

/// A `.nix` file of `n` derivations in layers (each depends on up to two of
/// the previous), each sleeping `sleep` seconds (with the host's `/bin/sleep`: builds have no `PATH`); attribute `all` depends on all.
/// `salt` makes the outputs unique to this test run.
pub fn graph_expr(n: usize, sleep: f32, salt: &str, failing: Option<usize>) -> String {
    let mut s = String::from(
        "let\n  mk = name: deps: script: derivation {\n    inherit name;\n    system = builtins.currentSystem;\n    builder = \"/bin/sh\";\n    args = [ \"-c\" script ];\n    deps = deps;\n  };\n",
    );
    for i in 0..n {
        let deps: Vec<String> = [i.checked_sub(1), i.checked_sub(7)]
            .into_iter()
            .flatten()
            .map(|d| format!("d{d}"))
            .collect();
        let script = if failing == Some(i) {
            format!("echo d{i} says this build is doomed; exit 3")
        } else {
            format!("echo building d{i} {salt}; /bin/sleep {sleep}; echo d{i} {salt} $deps > $out")
        };
        s.push_str(&format!(
            "  d{i} = mk \"d{i}\" [ {} ] {};\n",
            deps.join(" "),
            farm_testkit::nix_string(&script)
        ));
    }
    s.push_str("  all = [ ");
    for i in 0..n {
        s.push_str(&format!("d{i} "));
    }
    s.push_str("];\nin { inherit all; ");
    for i in 0..n {
        s.push_str(&format!("d{i} = d{i}; "));
    }
    s.push_str("}\n");
    s
}
