//! The module layering of the coordinator and the builder, checked over their
//! sources: no module cycle (a file reaching, through `crate::`/`super::`/
//! `self::` paths, a module that reaches back to it), and the coordinator's
//! layers pointing down only: `domain` names neither tonic, axum, russh nor
//! the wire messages, and knows none of the layers above it; `api` and
//! `nix_endpoint` do not call each other; `cache` knows nothing above it.
//!
//! Test code (`tests.rs`, `*_tests.rs`, and whatever follows a
//! `#[cfg(test)]` line) is left out: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A crate's modules (`a::b`, the root is ``) and, per module, the modules
/// its non-test code names.
struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
    /// Non-test source per module, for the name checks.
    source: BTreeMap<String, String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if stem == "main" && parts.is_empty() {
        return None; // the binary is its own crate
    }
    if stem == "tests" || stem.ends_with("_tests") {
        return None;
    }
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    Some(parts.join("::"))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments and without the items marked `#[cfg(test)]`
/// (a `mod x;` line, or the item up to its matching closing brace).
fn non_test(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[cfg(test)]") {
            // Skip the item: attributes, then up to `;` or the brace that closes it.
            let mut depth: i64 = 0;
            let mut opened = false;
            for item in lines.by_ref() {
                let it = item.trim_start();
                if it.starts_with("//") || (!opened && it.starts_with("#[")) {
                    continue;
                }
                for c in it.chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if (opened && depth <= 0) || (!opened && it.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether `text` names `word` as a whole identifier path segment.
fn names(text: &str, word: &str) -> bool {
    let b = text.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    text.match_indices(word).any(|(i, _)| {
        let end = i + word.len();
        (i == 0 || !ident(b[i - 1])) && (end >= b.len() || !ident(b[end]))
    })
}

/// Every path expression starting at `start` (`crate`, `super`, `self`), as its segments.
fn paths(text: &str, start: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find(start) {
        let at = i + pos;
        i = at + start.len();
        let before_ok =
            at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if !before_ok || !text[i..].starts_with("::") {
            continue;
        }
        // Segments: idents separated by `::`, stopping at anything else
        // (a `{` group is expanded one level).
        let rest = &text[i..];
        let mut segs = Vec::new();
        let mut j = 0;
        let rb = rest.as_bytes();
        while rest[j..].starts_with("::") {
            j += 2;
            if rest[j..].starts_with('{') {
                let end = rest[j..].find('}').map(|e| j + e).unwrap_or(rest.len());
                for item in rest[j + 1..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        let mut p = segs.clone();
                        p.push(name);
                        out.push(p);
                    }
                }
                break;
            }
            let s = j;
            while j < rb.len() && (rb[j].is_ascii_alphanumeric() || rb[j] == b'_') {
                j += 1;
            }
            if s == j {
                break;
            }
            segs.push(rest[s..j].to_owned());
        }
        out.push(segs);
    }
    out
}

fn graph(crate_dir: &str) -> Graph {
    let src = workspace().join(crate_dir).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut modules = BTreeMap::new();
    for f in &all {
        if let Some(m) = module_of(&src, f) {
            modules.insert(m, non_test(&std::fs::read_to_string(f).unwrap()));
        }
    }
    assert!(
        modules.len() > 5,
        "no sources found under {}",
        src.display()
    );
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    // The longest known module that is a prefix of `segs`.
    let resolve = |segs: &[String]| -> Option<String> {
        (0..=segs.len()).rev().find_map(|n| {
            let m = segs[..n].join("::");
            known.contains(&m).then_some(m)
        })
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &modules {
        let here: Vec<String> = if m.is_empty() {
            vec![]
        } else {
            m.split("::").map(str::to_owned).collect()
        };
        let mut to = BTreeSet::new();
        for p in paths(text, "crate") {
            if let Some(t) = resolve(&p) {
                to.insert(t);
            }
        }
        for (start, up) in [("super", 1usize), ("self", 0)] {
            for p in paths(text, start) {
                if here.len() < up {
                    continue;
                }
                let mut full = here[..here.len() - up].to_vec();
                let mut rest = p.as_slice();
                // `super::super::…`
                while rest.first().is_some_and(|s| s == "super") && !full.is_empty() {
                    full.pop();
                    rest = &rest[1..];
                }
                full.extend(rest.iter().cloned());
                if let Some(t) = resolve(&full) {
                    to.insert(t);
                }
            }
        }
        to.remove(m);
        edges.insert(m.clone(), to);
    }
    Graph {
        edges,
        source: modules,
    }
}

/// The child of `parent` whose subtree holds `m` (`parent` itself is not one).
fn child_of<'a>(parent: &str, m: &'a str) -> Option<&'a str> {
    let rest = if parent.is_empty() {
        m
    } else {
        m.strip_prefix(parent)?.strip_prefix("::")?
    };
    let first = rest.split("::").next().filter(|s| !s.is_empty())?;
    let len = if parent.is_empty() {
        0
    } else {
        parent.len() + 2
    } + first.len();
    Some(&m[..len])
}

/// Module cycles, each as the path that closes it. Checked among the
/// children of every module (the crate root's included): a child stands for
/// its whole subtree, so `a::x -> b` and `b -> a::y` make `a <-> b` a cycle
/// even when no single file closes it. A parent naming its own children (its
/// re-exports, its facade) is not a sibling edge.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let parents: BTreeSet<String> = g
        .edges
        .keys()
        .map(|m| {
            m.rsplit_once("::")
                .map(|(p, _)| p.to_owned())
                .unwrap_or_default()
        })
        .collect();
    for parent in &parents {
        // Sibling edges under `parent`.
        let mut sib: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (m, to) in &g.edges {
            let Some(from) = child_of(parent, m) else {
                continue;
            };
            for t in to {
                if let Some(target) = child_of(parent, t)
                    && target != from
                {
                    sib.entry(from.to_owned())
                        .or_default()
                        .insert(target.to_owned());
                }
            }
        }
        for start in sib.keys() {
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            let mut seen = BTreeSet::new();
            while let Some((at, path)) = stack.pop() {
                for next in sib.get(&at).into_iter().flatten() {
                    if next == start {
                        let mut c = path.clone();
                        c.push(next.clone());
                        found.push(c);
                    } else if seen.insert(next.clone()) {
                        let mut p = path.clone();
                        p.push(next.clone());
                        stack.push((next.clone(), p));
                    }
                }
            }
        }
    }
    // Report each cycle once.
    let mut uniq = BTreeMap::new();
    for c in found {
        let key: BTreeSet<String> = c.iter().cloned().collect();
        uniq.entry(key).or_insert(c);
    }
    uniq.into_values().collect()
}

fn in_layer(m: &str, layer: &str) -> bool {
    m == layer || m.starts_with(&format!("{layer}::"))
}

fn layer_violations(g: &Graph) -> Vec<String> {
    let mut bad = Vec::new();
    // (layer, layers it must not name)
    let rules: &[(&str, &[&str])] = &[
        ("domain", &["api", "nix_endpoint", "server"]),
        ("cache", &["domain", "api", "nix_endpoint", "server"]),
        ("api", &["nix_endpoint", "server"]),
        ("nix_endpoint", &["api", "server"]),
    ];
    for (m, to) in &g.edges {
        for (layer, forbidden) in rules {
            if !in_layer(m, layer) {
                continue;
            }
            for t in to {
                if forbidden.iter().any(|f| in_layer(t, f)) {
                    bad.push(format!(
                        "{m} names {t} ({layer} must not know {forbidden:?})"
                    ));
                }
            }
        }
    }
    for (m, text) in &g.source {
        if in_layer(m, "domain") {
            // farm_proto whole: the domain has no use for the wire crate at all.
            for name in ["tonic", "axum", "russh", "farm_proto", "prost"] {
                if names(text, name) {
                    bad.push(format!("{m} names {name} (the domain knows no transport)"));
                }
            }
        }
    }
    bad
}

#[test]
fn the_checker_sees_a_cycle_and_a_layer_breach() {
    // The checks must be able to fail: a made-up graph with both faults.
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    edges.insert(
        "domain::x".to_owned(),
        BTreeSet::from(["api::grpc".to_owned()]),
    );
    edges.insert("api::grpc".to_owned(), BTreeSet::new());
    // A cycle only through subtrees: p::a::x -> p::b, p::b -> p::a.
    edges.insert("p::a::x".to_owned(), BTreeSet::from(["p::b".to_owned()]));
    edges.insert("p::b".to_owned(), BTreeSet::from(["p::a".to_owned()]));
    edges.insert("p::a".to_owned(), BTreeSet::new());
    let mut source = BTreeMap::new();
    source.insert(
        "domain::x".to_owned(),
        "fn f() -> tonic::Status { todo!() }".to_owned(),
    );
    let g = Graph { edges, source };
    let c = cycles(&g);
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(c.iter().any(|c| c.contains(&"p::a".to_owned())), "{c:?}");
    let v = layer_violations(&g);
    assert!(v.iter().any(|l| l.contains("names api::grpc")), "{v:?}");
    assert!(v.iter().any(|l| l.contains("names tonic")), "{v:?}");
    // A `#[cfg(test)]` item is left out, and only that item.
    let src = "#[cfg(test)]\nimpl X {\n    fn t() { tonic::x(); }\n}\nfn f() { crate::api::y(); }\n#[cfg(test)]\nmod tests;\nuse farm_proto::{v1};\n";
    let kept = non_test(src);
    assert!(!kept.contains("tonic"), "{kept}");
    assert!(kept.contains("crate::api::y"), "{kept}");
    assert!(
        names(&kept, "farm_proto") && !names("my_farm_proto_x", "farm_proto"),
        "{kept}"
    );
    // And the path reader resolves groups and `super`.
    let p = paths(
        "use crate::domain::{coordinator::Coordinator, state};",
        "crate",
    );
    assert!(
        p.contains(&vec!["domain".to_owned(), "coordinator".to_owned()]),
        "{p:?}"
    );
    assert!(
        p.contains(&vec!["domain".to_owned(), "state".to_owned()]),
        "{p:?}"
    );
}

#[test]
fn coordinator_has_no_module_cycle_and_its_layers_point_down() {
    let g = graph("coordinator");
    for layer in ["domain", "api", "nix_endpoint", "cache"] {
        assert!(
            g.edges.contains_key(layer),
            "no {layer} module: {:?}",
            g.edges.keys()
        );
    }
    let c = cycles(&g);
    let v = layer_violations(&g);
    assert!(
        c.is_empty() && v.is_empty(),
        "module cycles:\n{}\nlayer breaches:\n{}",
        c.iter()
            .map(|c| c.join(" -> "))
            .collect::<Vec<_>>()
            .join("\n"),
        v.join("\n")
    );
}

#[test]
fn builder_has_no_module_cycle() {
    let g = graph("builder");
    let c = cycles(&g);
    assert!(
        c.is_empty(),
        "module cycles:\n{}",
        c.iter()
            .map(|c| c.join(" -> "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
