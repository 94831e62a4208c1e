//! Luau values for assertion messages: a bounded literal form ([`show`]),
//! structural equality ([`deep_eq`]) and a path-by-path table diff
//! ([`diff`]).
//!
//! Bounds, whatever the test builds: [`show`] writes at most
//! [`MAX_SHOWN`] characters and [`MAX_DEPTH`] levels; [`deep_eq`] and
//! [`diff`] descend at most [`MAX_DEPTH`] levels (deeper tables compare by
//! identity) and stop at cycles; [`diff`] reports at most [`MAX_DIFF_LINES`]
//! differences.

use std::collections::HashSet;
use std::fmt::Write as _;

use mlua::{Table, Value};

/// Characters of one shown value, at most.
pub const MAX_SHOWN: usize = 2000;
/// Table levels shown, compared and diffed.
pub const MAX_DEPTH: usize = 32;
/// Differences listed by [`diff`].
pub const MAX_DIFF_LINES: usize = 20;
/// Bytes of one difference line, at most (its path can hold keys of any
/// length, 32 levels deep).
pub const MAX_DIFF_LINE: usize = 4 * MAX_SHOWN;

/// `v` as Luau-like literal text: strings quoted and escaped, tables with
/// their keys sorted (`{ a = 1, [2] = "x" }`), cut at [`MAX_SHOWN`].
pub fn show(v: &Value) -> String {
    let mut out = String::new();
    let mut seen = HashSet::new();
    write_value(&mut out, v, 0, &mut seen);
    if out.len() > MAX_SHOWN {
        let mut cut = MAX_SHOWN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(" …");
    }
    out
}

fn write_value(out: &mut String, v: &Value, depth: usize, seen: &mut HashSet<usize>) {
    if out.len() > MAX_SHOWN {
        return;
    }
    match v {
        Value::Nil => out.push_str("nil"),
        Value::Boolean(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Number(n) => write_number(out, *n),
        Value::String(s) => {
            let _ = write!(out, "{:?}", s.to_string_lossy());
        }
        Value::Table(t) => {
            let id = t.to_pointer() as usize;
            if depth >= MAX_DEPTH || !seen.insert(id) {
                out.push_str("{ … }");
                return;
            }
            let entries = sorted_entries(t);
            if entries.is_empty() {
                out.push_str("{}");
            } else {
                out.push_str("{ ");
                for (i, (k, val)) in entries.iter().enumerate() {
                    if out.len() > MAX_SHOWN {
                        break;
                    }
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_key(out, k, i + 1);
                    write_value(out, val, depth + 1, seen);
                }
                out.push_str(" }");
            }
            seen.remove(&id);
        }
        other => {
            let _ = write!(out, "<{}>", other.type_name());
        }
    }
}

fn write_number(out: &mut String, n: f64) {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        let _ = write!(out, "{}", n as i64);
    } else {
        let _ = write!(out, "{n}");
    }
}

/// `name = `, `[3] = ` or nothing for the array part in order.
fn write_key(out: &mut String, k: &Value, position: usize) {
    match k {
        Value::Number(n) if *n == position as f64 => {}
        Value::Integer(i) if *i == position as i64 => {}
        Value::String(s) => {
            let s = s.to_string_lossy();
            if is_identifier(&s) {
                let _ = write!(out, "{s} = ");
            } else {
                let _ = write!(out, "[{s:?}] = ");
            }
        }
        other => {
            out.push('[');
            let mut seen = HashSet::new();
            write_value(out, other, MAX_DEPTH, &mut seen);
            out.push_str("] = ");
        }
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A table's entries, numbers first (ascending), then strings, then the rest.
fn sorted_entries(t: &Table) -> Vec<(Value, Value)> {
    let mut entries: Vec<(Value, Value)> =
        t.pairs::<Value, Value>().filter_map(|p| p.ok()).collect();
    entries.sort_by(|(a, _), (b, _)| {
        key_order(a)
            .partial_cmp(&key_order(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    entries
}

fn key_order(k: &Value) -> (u8, f64, String) {
    match k {
        Value::Integer(i) => (0, *i as f64, String::new()),
        Value::Number(n) => (0, *n, String::new()),
        Value::String(s) => (1, 0.0, s.to_string_lossy()),
        other => (2, 0.0, other.type_name().to_string()),
    }
}

fn number_of(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    }
}

/// Plain equality: what Luau's `rawequal` says, numbers by value.
pub fn shallow_eq(a: &Value, b: &Value) -> bool {
    match (number_of(a), number_of(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Structural equality: tables are equal when they have the same keys with
/// deep-equal values (metatables ignored); anything else by [`shallow_eq`].
pub fn deep_eq(a: &Value, b: &Value) -> bool {
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    compare(a, b, "", 0, &mut lines, &mut seen, 1);
    lines.is_empty()
}

/// Where `actual` differs from `expected`, one line per difference:
/// `.count: expected 2, got 3`, `[2]: missing (expected "x")`,
/// `.extra: unexpected true`. At most [`MAX_DIFF_LINES`], then `…`.
pub fn diff(expected: &Value, actual: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    compare(
        expected,
        actual,
        "",
        0,
        &mut lines,
        &mut seen,
        MAX_DIFF_LINES + 1,
    );
    if lines.len() > MAX_DIFF_LINES {
        lines.truncate(MAX_DIFF_LINES);
        lines.push("…".into());
    }
    lines
        .into_iter()
        .map(|l| super::report::clip(&l, MAX_DIFF_LINE))
        .collect()
}

fn path_of(parent: &str, k: &Value) -> String {
    match k {
        Value::String(s) if is_identifier(&s.to_string_lossy()) => {
            format!("{parent}.{}", s.to_string_lossy())
        }
        other => format!("{parent}[{}]", show(other)),
    }
}

fn compare(
    expected: &Value,
    actual: &Value,
    path: &str,
    depth: usize,
    lines: &mut Vec<String>,
    seen: &mut HashSet<(usize, usize)>,
    limit: usize,
) {
    if lines.len() >= limit {
        return;
    }
    let shown_path = if path.is_empty() { "value" } else { path };
    match (expected, actual) {
        (Value::Table(e), Value::Table(a)) => {
            if e == a || depth >= MAX_DEPTH {
                if e != a {
                    lines.push(format!(
                        "{shown_path}: tables nested deeper than {MAX_DEPTH} levels differ"
                    ));
                }
                return;
            }
            let pair = (e.to_pointer() as usize, a.to_pointer() as usize);
            if !seen.insert(pair) {
                return;
            }
            for (k, ev) in sorted_entries(e) {
                let av: Value = a.raw_get(k.clone()).unwrap_or(Value::Nil);
                let p = path_of(path, &k);
                if av.is_nil() {
                    lines.push(format!("{p}: missing (expected {})", show(&ev)));
                } else {
                    compare(&ev, &av, &p, depth + 1, lines, seen, limit);
                }
                if lines.len() >= limit {
                    return;
                }
            }
            for (k, av) in sorted_entries(a) {
                let ev: Value = e.raw_get(k.clone()).unwrap_or(Value::Nil);
                if ev.is_nil() {
                    lines.push(format!("{}: unexpected {}", path_of(path, &k), show(&av)));
                    if lines.len() >= limit {
                        return;
                    }
                }
            }
        }
        _ => {
            if !shallow_eq(expected, actual) {
                lines.push(format!(
                    "{shown_path}: expected {}, got {}",
                    show(expected),
                    show(actual)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Lua;

    fn eval(lua: &Lua, code: &str) -> Value {
        lua.load(code).eval().unwrap()
    }

    #[test]
    fn shows_sorted_literals_and_bounds_cycles() {
        let lua = Lua::new();
        let v = eval(
            &lua,
            r#"return { b = 2, a = "x", 10, 20, ["not id"] = true }"#,
        );
        assert_eq!(show(&v), r#"{ 10, 20, a = "x", b = 2, ["not id"] = true }"#);
        let cyc = eval(&lua, "local t = { n = 1 }; t.self = t; return t");
        assert_eq!(show(&cyc), "{ n = 1, self = { … } }");
        let big = eval(
            &lua,
            "local t = {}; for i = 1, 10000 do t[i] = i end; return t",
        );
        assert!(show(&big).chars().count() <= MAX_SHOWN + 2);
    }

    #[test]
    fn deep_equality_and_diff_name_paths() {
        let lua = Lua::new();
        let a = eval(&lua, "return { count = 2, items = { 1, 2 }, name = 'x' }");
        let b = eval(
            &lua,
            "return { count = 3, items = { 1 }, extra = true, name = 'x' }",
        );
        assert!(!deep_eq(&a, &b));
        assert!(deep_eq(
            &a,
            &eval(&lua, "return { name = 'x', items = { 1, 2 }, count = 2 }")
        ));
        assert_eq!(
            diff(&a, &b),
            vec![
                ".count: expected 2, got 3",
                ".items[2]: missing (expected 2)",
                ".extra: unexpected true",
            ]
        );
        let cyc1 = eval(&lua, "local t = {}; t.t = t; return t");
        let cyc2 = eval(&lua, "local t = {}; t.t = t; return t");
        assert!(deep_eq(&cyc1, &cyc2), "cycles terminate");
        let wide_a = eval(
            &lua,
            "local t = {}; for i = 1, 100 do t[i] = i end; return t",
        );
        let wide_b = eval(
            &lua,
            "local t = {}; for i = 1, 100 do t[i] = -i end; return t",
        );
        assert_eq!(diff(&wide_a, &wide_b).len(), MAX_DIFF_LINES + 1);
    }

    #[test]
    fn diffs_of_long_keys_deep_cycles_stay_bounded() {
        let lua = Lua::new();
        // 31 levels of 100 KB identifier keys: each path is 3 MB unbounded.
        let build = "local v = ...; local t = {}; local x = t; \
            for i = 1, 31 do local k = string.rep('k', 100000) .. i; x[k] = {}; x = x[k] end; \
            x.v = v; return t";
        let a: Value = lua.load(build).call(1).unwrap();
        let b: Value = lua.load(build).call(2).unwrap();
        let lines = diff(&a, &b);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].len() <= MAX_DIFF_LINE + 64, "{}", lines[0].len());
        // Crossed cycles of different shapes terminate with a finite diff.
        let c1 = eval(
            &lua,
            "local a, b = {}, {}; a.next = b; b.next = a; return a",
        );
        let c2 = eval(
            &lua,
            "local c, d = {}, {}; c.next = d; d.next = c; d.v = 1; return c",
        );
        assert!(!deep_eq(&c1, &c2));
        assert_eq!(diff(&c1, &c2), vec![".next.v: unexpected 1"]);
    }
}
