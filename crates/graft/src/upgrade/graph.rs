//! The require graph of a reload: missing modules, cycles, the modules a
//! change affects and the order they are evaluated in.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::analysis;

/// The first `require(...)` of `module` in `source`: (line, column), 1-based.
pub(super) fn require_position(source: &str, module: &str) -> (usize, usize) {
    let known = |_: &str| true;
    analysis::analyze(source, &known)
        .ok()
        .and_then(|a| a.requires.into_iter().find(|r| r.module == module))
        .map(|r| (r.line, r.column))
        .unwrap_or((0, 0))
}

/// `changed` and, transitively, every module requiring one of them.
pub(super) fn affected_by(
    deps: &BTreeMap<String, Vec<String>>,
    changed: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut affected = changed.clone();
    loop {
        let more: Vec<String> = deps
            .iter()
            .filter(|(n, ds)| !affected.contains(*n) && ds.iter().any(|d| affected.contains(d)))
            .map(|(n, _)| n.clone())
            .collect();
        if more.is_empty() {
            return affected;
        }
        affected.extend(more);
    }
}

/// A cycle in the require graph as a path `a -> b -> a`, if any.
pub(crate) fn find_cycle(deps: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        n: &str,
        deps: &BTreeMap<String, Vec<String>>,
        marks: &mut HashMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n).copied().unwrap_or(Mark::New) {
            Mark::Done => return None,
            Mark::Active => {
                let start = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            Mark::New => {}
        }
        marks.insert(n.to_owned(), Mark::Active);
        path.push(n.to_owned());
        for d in deps.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, deps, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(n.to_owned(), Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for n in deps.keys() {
        if let Some(c) = visit(n, deps, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// `subset` in dependency order (dependencies first). Assumes no cycle.
pub(super) fn topo_order(
    deps: &BTreeMap<String, Vec<String>>,
    subset: &BTreeSet<String>,
) -> Vec<String> {
    fn visit(
        n: &str,
        deps: &BTreeMap<String, Vec<String>>,
        subset: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(n.to_owned()) {
            return;
        }
        for d in deps.get(n).into_iter().flatten() {
            visit(d, deps, subset, seen, out);
        }
        if subset.contains(n) {
            out.push(n.to_owned());
        }
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for n in subset {
        visit(n, deps, subset, &mut seen, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, ds)| (n.to_string(), ds.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    #[test]
    fn cycles_are_reported_as_a_path() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]);
        assert_eq!(find_cycle(&g).unwrap(), vec!["a", "b", "c", "a"]);
        let g = graph(&[("a", &["b"]), ("b", &[]), ("c", &["a", "b"])]);
        assert_eq!(find_cycle(&g), None);
        let g = graph(&[("a", &["a"])]);
        assert_eq!(find_cycle(&g).unwrap(), vec!["a", "a"]);
    }

    #[test]
    fn topo_order_puts_dependencies_first() {
        let g = graph(&[
            ("app", &["counter", "util"]),
            ("counter", &["util"]),
            ("util", &[]),
        ]);
        let all: BTreeSet<String> = ["app", "counter", "util"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(topo_order(&g, &all), vec!["util", "counter", "app"]);
        let some: BTreeSet<String> = ["app", "util"].iter().map(|s| s.to_string()).collect();
        assert_eq!(topo_order(&g, &some), vec!["util", "app"]);
    }

    #[test]
    fn dependants_of_a_change_are_affected_transitively() {
        let g = graph(&[
            ("app", &["counter"]),
            ("counter", &["util"]),
            ("util", &[]),
            ("other", &[]),
        ]);
        let changed: BTreeSet<String> = ["util".to_string()].into();
        let affected: Vec<String> = affected_by(&g, &changed).into_iter().collect();
        assert_eq!(affected, ["app", "counter", "util"]);
    }
}
