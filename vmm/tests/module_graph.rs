//! The layering of vmm/src stays a tree of arrows pointing down: no module reaches, through
//! `crate::` paths, a module that reaches it back, whether modules are taken one file at a
//! time or by their top-level name (`kernel`, `run`, `syscalls`, ...).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name (`kernel::process`) -> the source without comments and tests.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>, root: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out, root);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(root).unwrap().with_extension("");
                let mut name = relative.to_string_lossy().replace('/', "::");
                if let Some(parent) = name.strip_suffix("::mod") {
                    name = parent.to_string();
                }
                let source = std::fs::read_to_string(&path).unwrap();
                let code = source.split("#[cfg(test)]").next().unwrap_or("");
                let code: String = code
                    .lines()
                    .map(|l| l.split("//").next().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join("\n");
                out.insert(name, code);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &mut out, &root);
    out.remove("lib");
    out
}

/// The `crate::a::b::c` paths in `code`, as their segments.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        paths.push(
            path.split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        );
    }
    paths
}

/// Arrows between modules; `top` collapses each module to its first segment.
fn graph(top: bool) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let name = |m: &str| -> String {
        if top {
            m.split("::").next().unwrap_or(m).to_string()
        } else {
            m.to_string()
        }
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in &modules {
        for path in crate_paths(code) {
            // The longest prefix that names a module.
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            if let Some(target) = target {
                let (from, to) = (name(module), name(&target));
                if from != to {
                    graph.entry(from).or_default().insert(to);
                }
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![start.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap();
        for next in graph.get(last).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_string());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn vmm_modules_import_each_other_in_no_cycle() {
    for top in [false, true] {
        let graph = graph(top);
        assert!(graph.len() > 10, "the graph looks empty: {graph:?}");
        for module in graph.keys() {
            if let Some(cycle) = cycle_through(&graph, module) {
                panic!("an import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_state_in_kernel_uses_no_handler() {
    let graph = graph(true);
    for below in ["kernel", "memory", "kvm", "sandbox"] {
        for above in ["syscalls", "run", "persist", "builder"] {
            assert!(
                !graph.get(below).is_some_and(|to| to.contains(above)),
                "{below} imports {above}"
            );
        }
    }
}
