//! Unit tests of the static analysis.

use super::*;
use crate::vm::LUAU_SAFE_GLOBALS;

/// The sandbox of most tests: Luau builtins plus a granted `kv`.
fn known(name: &str) -> bool {
    LUAU_SAFE_GLOBALS.contains(&name) || name == "kv"
}

fn run(source: &str) -> SourceAnalysis {
    analyze(source, &known).expect("parser thread")
}

fn kinds(a: &SourceAnalysis) -> Vec<FindingKind> {
    a.findings.iter().map(|f| f.kind.clone()).collect()
}

/// (kind, line, column) of every finding.
fn at(a: &SourceAnalysis) -> Vec<(FindingKind, usize, usize)> {
    a.findings
        .iter()
        .map(|f| (f.kind.clone(), f.line, f.column))
        .collect()
}

fn modules(a: &SourceAnalysis) -> Vec<&str> {
    a.requires.iter().map(|r| r.module.as_str()).collect()
}

#[test]
fn a_clean_server_module_has_no_findings() {
    let a = run(r#"
local counter = {}
function counter.init(args)
  return { count = args.start or 0 }
end
function counter.handle_call(req, from, state)
  if req == "inc" then state.count += 1 end
  graft.log.info("count", state.count)
  return state.count, state
end
return counter
"#);
    assert_eq!(a.findings, vec![]);
    assert_eq!(a.requires, vec![]);
}

#[test]
fn requires_in_all_literal_forms_in_source_order() {
    let a = run("local a = require(\"a\")\nlocal b = require 'b.c'\nlocal c = require [[d]]\n");
    assert_eq!(
        a.requires,
        vec![
            Require {
                module: "a".into(),
                line: 1,
                column: 11
            },
            Require {
                module: "b.c".into(),
                line: 2,
                column: 11
            },
            Require {
                module: "d".into(),
                line: 3,
                column: 11
            },
        ]
    );
    assert_eq!(a.findings, vec![]);
}

#[test]
fn requires_are_deduplicated_keeping_the_first_position() {
    let a = run("local x = require('m')\nlocal y = require('n')\nlocal z = require('m')\n");
    assert_eq!(modules(&a), vec!["m", "n"]);
    assert_eq!((a.requires[0].line, a.requires[0].column), (1, 11));
}

#[test]
fn nested_requires_are_found() {
    let a = run(
        "local M = {}\nfunction M.f()\n  local t = { dep = require('inner').x }\n  return (function() return require('deep') end)()\nend\nreturn M\n",
    );
    assert_eq!(modules(&a), vec!["inner", "deep"]);
    assert_eq!((a.requires[0].line, a.requires[0].column), (3, 21));
    assert_eq!((a.requires[1].line, a.requires[1].column), (4, 29));
    assert_eq!(a.findings, vec![]);
}

#[test]
fn dynamic_require_is_reported() {
    let a = run("local name = 'x'\nlocal m = require(name)\nlocal n = require('a' .. 'b')\nlocal o = require('a', 'b')\nlocal p = require()\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::DynamicRequire, 2, 11),
            (FindingKind::DynamicRequire, 3, 11),
            (FindingKind::DynamicRequire, 4, 11),
            (FindingKind::DynamicRequire, 5, 11),
        ]
    );
    assert!(a.findings[0].message.contains("string literal"));
    assert_eq!(a.requires, vec![]);
}

#[test]
fn aliasing_require_is_a_dynamic_require() {
    let a = run("local r = require\nreturn r('x')\n");
    assert_eq!(at(&a), vec![(FindingKind::DynamicRequire, 1, 11)]);
}

#[test]
fn a_local_named_require_is_not_a_dependency() {
    let a = run("local function require(x) return x end\nlocal m = require('nope')\n");
    assert_eq!(a.requires, vec![]);
    assert_eq!(a.findings, vec![]);
}

#[test]
fn ungranted_global_read_is_reported_at_the_identifier() {
    let a = run("local x = 1\nlocal data = fs.read('/etc/passwd')\n");
    assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 2, 14)]);
    assert_eq!(
        a.findings[0].message,
        "unknown global `fs`: not a Luau builtin, not `graft`, and no capability of that name is granted to this sandbox"
    );
}

#[test]
fn builtins_graft_and_granted_capabilities_are_fine() {
    let a = run("local s = string.format('%d', math.floor(1.5))\nkv.put('k', s)\ngraft.send(graft.self(), s)\nprint(typeof(s), #table.pack(1))\n");
    assert_eq!(a.findings, vec![]);
    // The same module where `kv` is not granted.
    let b = analyze("kv.put('k', 1)\n", &|n| LUAU_SAFE_GLOBALS.contains(&n)).unwrap();
    assert_eq!(at(&b), vec![(FindingKind::UngrantedGlobal, 1, 1)]);
}

#[test]
fn os_is_a_capability_not_a_builtin() {
    assert!(!LUAU_SAFE_GLOBALS.contains(&"os"));
    let a = run("return os.time()\n");
    assert_eq!(kinds(&a), vec![FindingKind::UngrantedGlobal]);
    let b = analyze("return os.time()\n", &|n| n == "os").unwrap();
    assert_eq!(b.findings, vec![]);
}

#[test]
fn every_read_position_is_reported() {
    let a = run("local a = net\nlocal b = net\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::UngrantedGlobal, 1, 11),
            (FindingKind::UngrantedGlobal, 2, 11)
        ]
    );
}

#[test]
fn shadowing_and_scope_end() {
    let a = run("do\n  local fs = {}\n  fs.x = 1\nend\nreturn fs\n");
    assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 5, 8)]);
    // A local shadows a builtin, and an initializer sees the outer name.
    let b = run("local string = string\nlocal x = x\n");
    assert_eq!(at(&b), vec![(FindingKind::UngrantedGlobal, 2, 11)]);
}

#[test]
fn local_function_sees_itself_but_local_assigned_function_does_not() {
    let a = run("local function fact(n)\n  if n <= 1 then return 1 end\n  return n * fact(n - 1)\nend\nlocal fib = function(n) return fib(n - 1) end\n");
    assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 5, 32)]);
}

#[test]
fn later_locals_are_not_visible_earlier() {
    let a = run("local function a() return b() end\nlocal function b() return 1 end\n");
    assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 1, 27)]);
}

#[test]
fn repeat_until_condition_sees_body_locals() {
    let a = run("local n = 0\nrepeat\n  local done = n > 3\n  n += 1\nuntil done\nreturn done\n");
    assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 6, 8)]);
}

#[test]
fn for_variables_are_not_visible_after_the_loop() {
    let a = run(
        "for i = 1, 3 do print(i) end\nfor k, v in pairs({}) do print(k, v) end\nreturn i, k, v\n",
    );
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::UngrantedGlobal, 3, 8),
            (FindingKind::UngrantedGlobal, 3, 11),
            (FindingKind::UngrantedGlobal, 3, 14),
        ]
    );
}

#[test]
fn for_loop_bounds_are_evaluated_outside_the_loop_scope() {
    let a = run("for i = 1, i do end\nfor k in next, k do end\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::UngrantedGlobal, 1, 12),
            (FindingKind::UngrantedGlobal, 2, 16)
        ]
    );
}

#[test]
fn parameters_and_varargs_are_locals_of_the_body_only() {
    let a = run("local function f(a, b, ...)\n  local t = { a, b, ... }\n  return select('#', ...)\nend\nreturn a\n");
    assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 5, 8)]);
}

#[test]
fn methods_get_self_and_plain_functions_do_not() {
    let a = run("local M = {}\nfunction M:get() return self.x end\nfunction M.bad() return self end\nreturn M\n");
    assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 3, 25)]);
}

#[test]
fn global_assignment_forms() {
    let a =
        run("x = 1\nfunction foo() end\nlocal function g()\n  function bar() end\n  y += 1\nend\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::GlobalAssignment, 1, 1),
            (FindingKind::GlobalAssignment, 2, 10),
            (FindingKind::GlobalAssignment, 4, 12),
            (FindingKind::GlobalAssignment, 5, 3),
        ]
    );
    assert_eq!(
        a.findings[0].message,
        "assignment to global `x`: module state must live in locals or process state; write `local x`"
    );
}

#[test]
fn assigning_locals_and_their_fields_is_fine() {
    let a = run("local M, n = {}, 0\nn = 2\nM.count = n\nM['k'] = 1\nfunction M.f() end\nfunction M:g() end\nlocal function h() end\nfunction h() end\n");
    assert_eq!(a.findings, vec![]);
}

#[test]
fn field_of_unknown_global_is_an_ungranted_global() {
    let a = run("cache.x = 1\nfunction store.put() end\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::UngrantedGlobal, 1, 1),
            (FindingKind::UngrantedGlobal, 2, 10)
        ]
    );
}

#[test]
fn modifying_a_builtin_is_forbidden() {
    let a = run("string.foo = 1\nfunction table.bar() end\nfunction string:baz() end\nmath.pi += 1\ngraft.log = nil\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::ForbiddenConstruct, 1, 1),
            (FindingKind::ForbiddenConstruct, 2, 10),
            (FindingKind::ForbiddenConstruct, 3, 10),
            (FindingKind::ForbiddenConstruct, 4, 1),
            (FindingKind::ForbiddenConstruct, 5, 1),
        ]
    );
    assert!(a.findings[0]
        .message
        .contains("modifying the builtin `string`"));
    // Storing into a value returned by a builtin is not modifying it.
    let b = run("local s = setmetatable({}, {})\ngetmetatable(s).x = 1\n");
    assert_eq!(b.findings, vec![]);
}

#[test]
fn forbidden_globals_even_when_the_sandbox_claims_them() {
    let source = "local f = loadstring('x')\nlocal e = getfenv(1)\n_G.x = 1\nlocal t = debug.traceback()\ncollectgarbage()\nlocal p = newproxy()\nload('')\ndofile('a')\nloadfile('b')\nsetfenv(1, {})\nlocal env = _ENV\n";
    let a = analyze(source, &|_| true).unwrap();
    assert_eq!(a.findings.len(), 11, "{a:#?}");
    assert!(a
        .findings
        .iter()
        .all(|f| f.kind == FindingKind::ForbiddenConstruct));
    assert_eq!((a.findings[0].line, a.findings[0].column), (1, 11));
    assert_eq!((a.findings[2].line, a.findings[2].column), (3, 1));
    assert!(a.findings[0].message.contains("`loadstring` is forbidden"));
    assert!(a.findings[2].message.contains("shared by every module"));
    assert!(a.findings[4]
        .message
        .contains("not available in a Graft sandbox"));
}

#[test]
fn forbidden_names_as_locals_or_fields_are_fine() {
    let a = run("local debug = false\nlocal t = { load = 1 }\nt.load = debug\nreturn t.load\n");
    assert_eq!(a.findings, vec![]);
}

#[test]
fn assigning_a_forbidden_global_is_forbidden() {
    let a = run("_G = {}\nfunction setfenv() end\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::ForbiddenConstruct, 1, 1),
            (FindingKind::ForbiddenConstruct, 2, 10)
        ]
    );
}

#[test]
fn syntax_error_is_a_single_finding_with_position() {
    let a = run("local ok = require('a')\nlocal c = = 3\n");
    assert_eq!(a.requires, vec![]);
    assert_eq!(a.findings.len(), 1, "{a:#?}");
    let f = &a.findings[0];
    assert_eq!(f.kind, FindingKind::SyntaxError);
    // full_moon anchors "expected an expression" on the `=` before the gap.
    assert_eq!((f.line, f.column), (2, 9));
    assert_eq!(f.message, "expected an expression");
}

#[test]
fn tokenizer_error_is_a_syntax_error() {
    let a = run("local s = 'unterminated\n");
    assert_eq!(kinds(&a), vec![FindingKind::SyntaxError]);
    assert_eq!(a.findings[0].line, 1);
    assert_eq!(a.findings[0].message, "unclosed string");
}

#[test]
fn type_annotated_module_parses_and_types_are_not_reads() {
    let a = run(r#"
export type Counter = { count: number, owner: Player? }
type Pair<K, V> = { key: K, value: V }
local Dep = require("types.dep")
local M = {}
function M.init<T>(args: { start: number? }, extra: T): Counter
  local c: Counter = { count = args.start or 0, owner = nil }
  local p = ({ key = "k", value = 1 } :: Pair<string, number>)
  local n: SomeUnknownType = 1
  return c
end
function M.view(x: typeof(M), ...: number): (string, ...any)
  return tostring(x), ...
end
return M
"#);
    assert_eq!(a.findings, vec![], "{a:#?}");
    assert_eq!(modules(&a), vec!["types.dep"]);
}

#[test]
fn luau_expressions_and_statements_are_walked() {
    let a = run("local t = {}\nfor i = 1, 10 do\n  if i % 2 == 0 then continue end\n  t[i] = if i > 5 then big else `{i} is {small}`\nend\nt[1] ..= `done`\nreturn t\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::UngrantedGlobal, 4, 24),
            (FindingKind::UngrantedGlobal, 4, 42)
        ]
    );
}

#[test]
fn table_keys_and_call_arguments_are_reads() {
    let a = run("local t = { [k1] = v1, name = v2, v3 }\nt:m(a1)\nt:m{ a2 }\nreturn t[k2]\n");
    let names: Vec<&str> = a
        .findings
        .iter()
        .map(|f| f.message.split('`').nth(1).unwrap_or(""))
        .collect();
    assert_eq!(names, vec!["k1", "v1", "v2", "v3", "a1", "a2", "k2"]);
    assert!(a
        .findings
        .iter()
        .all(|f| f.kind == FindingKind::UngrantedGlobal));
}

#[test]
fn findings_are_ordered_by_position_and_columns_count_characters() {
    let a = run("local s = 'héllo'; local x = zz\nlocal y = aa\n");
    assert_eq!(
        at(&a),
        vec![
            (FindingKind::UngrantedGlobal, 1, 30),
            (FindingKind::UngrantedGlobal, 2, 11)
        ]
    );
}

#[test]
fn safe_globals_list_excludes_forbidden_names() {
    for name in FORBIDDEN_GLOBALS {
        assert!(!LUAU_SAFE_GLOBALS.contains(name), "{name}");
    }
    for name in [
        "pcall",
        "string",
        "buffer",
        "vector",
        "coroutine",
        "utf8",
        "bit32",
    ] {
        assert!(LUAU_SAFE_GLOBALS.contains(&name), "{name}");
    }
}

#[test]
fn findings_keep_the_first_by_position_and_count_the_rest() {
    let source: String = (0..500).map(|i| format!("x{i} = y{i}\n")).collect();
    let a = run(&source);
    assert_eq!(a.findings.len(), MAX_PER_MODULE);
    assert_eq!(a.more, 1000 - MAX_PER_MODULE);
    let positions: Vec<(usize, usize)> = a.findings.iter().map(|f| (f.line, f.column)).collect();
    let expected: Vec<(usize, usize)> = (1..=10).flat_map(|l| [(l, 1), (l, 6)]).collect();
    assert_eq!(positions, expected);
    assert_eq!(a.findings[1].kind, FindingKind::UngrantedGlobal);
    assert!(a.findings[1].message.contains("`y0`"));
}

#[test]
fn findings_out_of_source_order_still_keep_the_first() {
    // A local's initializer is walked before its names, assignment targets
    // before values: the kept set is by position, not by walk order.
    let source = format!("{}local a = b\n", "c = 1\n".repeat(30));
    let a = run(&source);
    assert_eq!(a.findings.len(), MAX_PER_MODULE);
    assert_eq!(a.findings.last().map(|f| f.line), Some(MAX_PER_MODULE));
    assert_eq!(a.more, 31 - MAX_PER_MODULE);
}

#[test]
fn a_shadowing_local_leaves_the_outer_one_in_scope() {
    let a = run("local x = 1\ndo local x = 2 end\nreturn x\n");
    assert_eq!(a.findings, vec![]);
    let b = run("do local x = 2; do local x = 3 end end\nreturn x\n");
    assert_eq!(at(&b), vec![(FindingKind::UngrantedGlobal, 2, 8)]);
}

#[test]
fn thousands_of_locals_are_resolved() {
    let mut source: String = (0..5000).map(|i| format!("local v{i} = {i}\n")).collect();
    source.push_str("return v0 + v4999 + v5000\n");
    let a = run(&source);
    assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 5001, 21)]);
}

#[test]
fn the_deepest_nesting_luau_accepts_is_analysed() {
    // Luau compiles 1000 nested blocks; full_moon needs far more than a
    // default thread stack for them.
    let source = format!("{}{}return {{}}\n", "do ".repeat(1000), "end ".repeat(1000));
    assert!(crate::vm::compile("m", "m.luau", &source, 1 << 20).is_ok());
    assert_eq!(run(&source).findings, vec![]);
    let calls = format!(
        "local f = function() end\nlocal x = {}1{}\nreturn x\n",
        "(".repeat(900),
        ")".repeat(900)
    );
    assert!(crate::vm::compile("m", "m.luau", &calls, 1 << 20).is_ok());
    assert_eq!(run(&calls).findings, vec![]);
}

#[test]
fn small_sources_parsed_inline_fit_a_small_stack() {
    // Chains the nesting estimate does not count; any such source Luau
    // accepts and small enough to be parsed inline must fit 1 MiB.
    let chains: [(&str, &str, &str); 12] = [
        ("local x = 1", " + 1", ""),
        ("local x = 'a'", " .. 'a'", ""),
        ("local x = 2", " ^ 1", ""),
        ("local x = 1", " < 2 == true", ""),
        ("local t = {} local x = t", ".a", ""),
        ("local f = print local x = f", "()", ""),
        ("local t = {} local x = t", ":m()", ""),
        ("local f = print local x = f", "'a'", ""),
        ("local t = {} local x = t", "[1]", ""),
        ("local x: number", " | number", " = 1"),
        ("local x: number", "?", " = 1"),
        ("local x = 1", " and 1 or 2", ""),
    ];
    for (head, link, tail) in chains {
        for n in [100, 400, 1600, 6400] {
            let source = format!("{head}{}{tail}\nreturn x\n", link.repeat(n));
            if !is_shallow(&source) || crate::vm::compile("m", "m.luau", &source, 1 << 20).is_err()
            {
                continue;
            }
            let result = std::thread::Builder::new()
                .stack_size(1 << 20)
                .spawn(move || analyze_here(&source, &|_| true).findings.len())
                .unwrap()
                .join();
            assert!(result.is_ok(), "{link} x{n}");
        }
    }
}
