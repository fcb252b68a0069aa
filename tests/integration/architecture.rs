//! The engine's layering (documented in `src/lib.rs`): each module of `src/` imports only from
//! its own layer or the layers below, and the modules' imports form no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first; a module may use `crate::x` only for `x` in its own layer or an earlier one.
const LAYERS: &[(&str, &[&str])] = &[
    ("core", &["hash", "key", "lock", "cache", "materialize"]),
    ("spec", &["spec"]),
    ("plan", &["dag", "fingerprint", "freshness", "project", "summary"]),
    (
        "run",
        &["scheduler", "events", "executor", "remote", "journal", "ui", "maintenance", "kinds"],
    ),
    ("cli", &["cli", "experiments"]),
];

/// Top-level module → the top-level modules its non-test code names as `crate::x`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let module = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        // Unit tests may reach anywhere; comments are not imports.
        let code = text.split("#[cfg(test)]").next().unwrap();
        let used = out.entry(module.clone()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let name: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name != module && !name.is_empty() {
                    used.insert(name);
                }
            }
        }
    }
    out
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules)| modules.contains(&module))
}

#[test]
fn every_engine_module_belongs_to_a_layer() {
    let unplaced: Vec<String> = imports().into_keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(unplaced.is_empty(), "add these modules to LAYERS and src/lib.rs: {unplaced:?}");
}

#[test]
fn modules_import_only_from_their_own_layer_or_below() {
    let mut wrong = Vec::new();
    for (module, used) in imports() {
        let Some(own) = layer_of(&module) else { continue };
        for dep in used {
            if layer_of(&dep).is_some_and(|l| l > own) {
                let (from, to) = (LAYERS[own].0, LAYERS[layer_of(&dep).unwrap()].0);
                wrong.push(format!("{module} ({from}) imports {dep} ({to})"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

#[test]
fn no_two_modules_depend_on_each_other_even_indirectly() {
    let graph = imports();
    // Depth-first search for a back edge, reporting the cycle it closes.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for dep in graph.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(dep, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let cycle = visit(module, &graph, &mut Vec::new(), &mut done);
        assert!(cycle.is_none(), "import cycle: {}", cycle.unwrap().join(" → "));
    }
}
