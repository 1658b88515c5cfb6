//! The module boundaries ARCHITECTURE.md promises, checked on the source: which top-level module
//! of `src/` uses which (from `crate::…` and `super::…` paths), and which modules name the
//! crates that only one module may know. A new cycle or a forbidden edge fails here, with the
//! file and line that made it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Each module of `src/` and the layer it sits in: a module may use only modules of lower
/// layers. Every module must be listed (a new one fails the test until it is placed), and the
/// order is the layer picture of ARCHITECTURE.md, bottom first.
const LAYERS: &[&[&str]] = &[
    &["error", "pool", "testing"],
    &["sys", "config"],
    &["metrics", "dirs", "layer"],
    &["overlay"],
    &["store"],
    &["snapshot"],
    &["grpc"],
    &["server", "cli"],
    &["lib", "main"],
];

/// Edges the layers would allow but the design does not: the gRPC side reaches the store and
/// the directories only through the snapshot rules.
const FORBIDDEN: &[(&str, &str)] = &[("grpc", "store"), ("grpc", "dirs"), ("cli", "store")];

/// External crates only one module may name, and that module.
const CONFINED: &[(&str, &[&str])] = &[
    ("tonic::", &["grpc", "error"]),
    ("tonic_health::", &["grpc"]),
    ("containerd_snapshots::", &["grpc"]),
    ("containerd_client::", &["grpc"]),
    ("tar::", &["layer"]),
    ("flate2::", &["layer"]),
    ("zstd::", &["layer"]),
    ("redb::", &["store", "error"]),
    // testing.rs is compiled for unit tests only, which bind-mount to set up their cases.
    ("nix::mount", &["sys", "testing"]),
    ("SYS_fsopen", &["sys"]),
    ("SYS_open_tree", &["sys"]),
];

struct Use {
    from: String,
    to: String,
    at: String,
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to, and how many modules deep it is
/// (`src/store/layout.rs` is store, 1 deep; `src/store/mod.rs` and `src/error.rs` are 0 deep).
fn module_of(src: &Path, file: &Path) -> (String, usize) {
    let rel: Vec<String> = file
        .strip_prefix(src)
        .unwrap()
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let top = rel[0].trim_end_matches(".rs").to_string();
    let depth = rel.len() - 1 - usize::from(rel.last().is_some_and(|f| f == "mod.rs"));
    (top, depth)
}

/// The first identifiers of a path list after `crate::` (`a` of `crate::a::b`, `a` and `c` of
/// `crate::{a::b, c}`).
fn heads(rest: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest)]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
    };
    let (mut depth, mut item, mut out) = (0, String::new(), Vec::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(ident(&item));
                item.clear();
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            item.push(c);
        }
    }
    out.push(ident(&item));
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

/// Every use of another top-level module, in the lines of code only: comments are skipped, a
/// `use` spread over several lines is joined, and a file's unit tests (from `#[cfg(test)]`
/// before `mod tests`) are left out, since what a test sets up is not the module's own doing.
fn uses(src: &Path) -> (Vec<Use>, BTreeMap<String, Vec<String>>) {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut found = Vec::new();
    let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        let (module, depth) = module_of(src, &file);
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text
            .find("#[cfg(test)]\nmod tests")
            .map_or(&text[..], |end| &text[..end]);
        let mut code = String::new();
        let mut lines = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                continue;
            }
            code.push_str(line);
            code.push(' ');
            lines.push((code.len(), n + 1));
        }
        let line_of = |pos: usize| {
            let n = lines.iter().find(|(end, _)| pos < *end).map_or(0, |l| l.1);
            format!("{}:{n}", file.display())
        };
        let mut roots = vec!["crate::"];
        // `super::` of a module's top file (x.rs, x/mod.rs) is the crate root.
        if depth == 0 {
            roots.push("super::");
        }
        for root in roots {
            for (pos, _) in code.match_indices(root) {
                let before = code[..pos].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                for to in heads(&code[pos + root.len()..]) {
                    if to != module && to != "self" {
                        found.push(Use {
                            from: module.clone(),
                            to,
                            at: line_of(pos),
                        });
                    }
                }
            }
        }
        for (name, _) in CONFINED {
            if let Some(pos) = code.find(name) {
                names
                    .entry(name.to_string())
                    .or_default()
                    .push(format!("{module} ({})", line_of(pos)));
            }
        }
    }
    (found, names)
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// A cycle among `edges`, if any, as the modules along it.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut c = path[i..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for to in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(to, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|m| visit(m, edges, &mut Vec::new(), &mut done))
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (found, names) = uses(&src);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for u in &found {
        edges
            .entry(u.from.clone())
            .or_default()
            .insert(u.to.clone());
        match (layer(&u.from), layer(&u.to)) {
            _ if FORBIDDEN.contains(&(u.from.as_str(), u.to.as_str())) => {
                problems.push(format!("{} must not use {} ({})", u.from, u.to, u.at))
            }
            (Some(from), Some(to)) if to < from => {}
            (None, _) => problems.push(format!("module {} is not in LAYERS", u.from)),
            (_, None) => problems.push(format!("module {} is not in LAYERS", u.to)),
            _ => problems.push(format!("{} uses {} at {}", u.from, u.to, u.at)),
        }
    }
    for (name, allowed) in CONFINED {
        for user in names.get(*name).into_iter().flatten() {
            if !allowed.iter().any(|m| user.starts_with(&format!("{m} "))) {
                problems.push(format!("{name} is named outside {allowed:?}: {user}"));
            }
        }
    }
    let graph: Vec<String> = edges
        .iter()
        .map(|(from, to)| {
            format!(
                "{from} -> {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    eprintln!("architecture: module graph\n  {}", graph.join("\n  "));
    if let Some(c) = cycle(&edges) {
        problems.push(format!("cycle: {}", c.join(" -> ")));
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
