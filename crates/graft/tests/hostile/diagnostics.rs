//! Hostile inputs: diagnostics. A source with thousands of errors, or nested
//! deeper than any parser stack, gets a bounded compile error (SPEC §7: at
//! most 20 diagnostics per module, frames of at most 5 lines, at most 64 KiB
//! in all); errors raised by guest code at run time name their module and
//! line in fields.

use std::collections::BTreeMap;

use graft::diagnostic::{MAX_FRAME_LINES, MAX_FRAME_WIDTH, MAX_PER_MODULE, TRUNCATED};
use graft::{Diagnostic, Error, ExitReason, Node, ReloadOptions, ReloadStep, Sandbox, SandboxSpec};
use serde_json::json;

use crate::support::{answer, assert_node_healthy, counter_sandbox};

/// What SPEC §7 allows one error response to weigh.
const RESPONSE_CAP: usize = 64 * 1024;

fn setup() -> (Node, Sandbox, Sandbox) {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let target = graft::block_on(node.create_sandbox(SandboxSpec::new("target").entry(None)))
        .expect("target sandbox");
    (node, bystander, target)
}

fn sources(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect()
}

/// Lines that each assign a global and read an unknown one, with distinct
/// names, until the source reaches `bytes`.
fn global_assignments(bytes: usize) -> String {
    let mut src = String::new();
    let mut i = 0;
    while src.len() < bytes {
        src.push_str(&format!("x{i} = y{i}\n"));
        i += 1;
    }
    src
}

/// The diagnostics of a compile error, after checking every bound on them:
/// per module, per frame, and the size of the error as the HTTP layer sends
/// it (the diagnostics plus the first one's message and frame again).
fn bounded_diagnostics(e: Error) -> Vec<Diagnostic> {
    assert_eq!(e.kind(), "compile_error", "{e}");
    let message = e.to_string();
    let Error::Compile { diagnostics } = e else {
        unreachable!()
    };
    let mut per_module: BTreeMap<&str, usize> = BTreeMap::new();
    for d in diagnostics.iter().filter(|d| d.kind != TRUNCATED) {
        *per_module.entry(d.module.as_str()).or_default() += 1;
        assert!(d.frame.lines().count() <= MAX_FRAME_LINES, "{}", d.frame);
        for line in d.frame.lines() {
            assert!(
                line.chars().count() <= MAX_FRAME_WIDTH + 16,
                "frame line of {} chars",
                line.chars().count()
            );
        }
    }
    for (module, n) in &per_module {
        assert!(*n <= MAX_PER_MODULE, "{module}: {n} diagnostics");
    }
    let first = diagnostics.first().expect("at least one diagnostic");
    let body = json!({ "error": {
        "kind": "compile_error", "message": message, "module": first.module,
        "file": first.file, "line": first.line, "column": first.column,
        "frame": first.frame, "diagnostics": diagnostics,
    }});
    let size = serde_json::to_vec(&body).unwrap().len();
    assert!(size <= RESPONSE_CAP, "error response of {size} bytes");
    diagnostics
}

/// The count a `truncated` note gives (`… and N more problems …`).
fn noted(d: &Diagnostic) -> usize {
    assert_eq!(d.kind, TRUNCATED);
    d.message
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", d.message))
}

#[test]
fn eval_of_40kb_of_errors_on_one_line_is_bounded() {
    let (node, bystander, target) = setup();
    // Each `x=y;` is two problems; one 40 KB line made every frame 40 KB.
    let source = "x=y;".repeat(10_000);
    let e = answer(target.eval(&source)).unwrap_err();
    let diagnostics = bounded_diagnostics(e);
    assert_eq!(diagnostics.len(), MAX_PER_MODULE + 1);
    assert!(diagnostics[..MAX_PER_MODULE]
        .iter()
        .all(|d| d.module == "eval" && d.line == 1));
    assert_eq!(diagnostics[0].column, 1);
    assert_eq!(diagnostics[0].kind, "global_assignment");
    assert_eq!(noted(&diagnostics[MAX_PER_MODULE]), 20_000 - MAX_PER_MODULE);
    // The caret of a problem far into the line is still under its token.
    let last = &diagnostics[MAX_PER_MODULE - 1];
    let lines: Vec<&str> = last.frame.lines().collect();
    let caret = lines[1].chars().position(|c| c == '^').unwrap();
    assert_eq!(lines[0].chars().nth(caret), Some('y'), "{}", last.frame);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn reload_of_40kb_of_global_assignments_is_bounded() {
    let (node, bystander, target) = setup();
    let source = global_assignments(40 * 1024);
    let lines = source.lines().count();
    let e =
        answer(target.reload(sources(&[("g", &source)]), ReloadOptions::default())).unwrap_err();
    let diagnostics = bounded_diagnostics(e);
    assert_eq!(diagnostics.len(), MAX_PER_MODULE + 1);
    assert_eq!(
        noted(&diagnostics[MAX_PER_MODULE]),
        2 * lines - MAX_PER_MODULE
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn reload_of_160kb_of_global_assignments_is_bounded() {
    let (node, bystander, target) = setup();
    let source = global_assignments(160 * 1024);
    let lines = source.lines().count();
    let e =
        answer(target.reload(sources(&[("g", &source)]), ReloadOptions::default())).unwrap_err();
    let diagnostics = bounded_diagnostics(e);
    assert_eq!(diagnostics.len(), MAX_PER_MODULE + 1);
    // The first problems by position: line 1's assignment, then its read.
    assert_eq!(
        (
            diagnostics[0].kind.as_str(),
            diagnostics[0].line,
            diagnostics[0].column
        ),
        ("global_assignment", 1, 1)
    );
    assert_eq!(
        (
            diagnostics[1].kind.as_str(),
            diagnostics[1].line,
            diagnostics[1].column
        ),
        ("ungranted_global", 1, 6)
    );
    assert_eq!(diagnostics[MAX_PER_MODULE - 1].line, MAX_PER_MODULE / 2);
    assert_eq!(
        noted(&diagnostics[MAX_PER_MODULE]),
        2 * lines - MAX_PER_MODULE
    );
    // Nothing was loaded, and the abort event is as bounded as the error.
    assert!(answer(target.modules()).unwrap().is_empty());
    let events = answer(target.events()).unwrap();
    let abort = serde_json::to_vec(&events.last().expect("abort event")).unwrap();
    assert!(
        abort.len() <= RESPONSE_CAP,
        "abort event of {} bytes",
        abort.len()
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn thousands_of_syntax_errors_give_one_diagnostic() {
    let (node, bystander, target) = setup();
    let source = "local = = = )( end until\n".repeat(5_000);
    let e =
        answer(target.reload(sources(&[("s", &source)]), ReloadOptions::default())).unwrap_err();
    let diagnostics = bounded_diagnostics(e);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    let d = &diagnostics[0];
    assert_eq!(
        (d.kind.as_str(), d.module.as_str(), d.line),
        ("syntax", "s", 1)
    );
    assert_eq!(d.column, 7, "{d:?}");
    assert_node_healthy(&node, &bystander);
}

#[test]
fn many_modules_full_of_errors_stay_under_the_response_cap() {
    let (node, bystander, target) = setup();
    // Long names make long messages; 60 modules of 40 problems each.
    let long = "n".repeat(200);
    let source: String = (0..20)
        .map(|i| format!("{long}{i} = {long}x{i}\n"))
        .collect();
    let names: Vec<String> = (0..60).map(|i| format!("m{i:02}")).collect();
    let all: BTreeMap<String, String> = names.iter().map(|n| (n.clone(), source.clone())).collect();
    let e = answer(target.reload(all, ReloadOptions::default())).unwrap_err();
    let diagnostics = bounded_diagnostics(e);
    let last = diagnostics.last().unwrap();
    assert_eq!(last.kind, TRUNCATED, "{last:?}");
    assert!(last.message.contains("capped at"), "{}", last.message);
    let shown = diagnostics.iter().filter(|d| d.kind != TRUNCATED).count();
    let counted: usize = diagnostics
        .iter()
        .filter(|d| d.kind == TRUNCATED)
        .map(noted)
        .sum();
    assert_eq!(shown + counted, 60 * 40, "every problem shown or counted");
    assert_eq!(diagnostics[0].module, "m00");
    assert_node_healthy(&node, &bystander);
}

#[test]
fn nesting_deeper_than_any_stack_is_a_compile_error() {
    let (node, bystander, target) = setup();
    // Each of these once overflowed the stack of the thread that compiled
    // it (full_moon recursing to find a column), aborting the node.
    for deep in ["(", "{", "do ", "function() ", "- ", "if a then 1 else "] {
        let source = format!("local x = {}1\nreturn {{}}\n", deep.repeat(50_000));
        let e = answer(target.reload(sources(&[("deep", &source)]), ReloadOptions::default()))
            .unwrap_err();
        let diagnostics = bounded_diagnostics(e);
        assert_eq!(diagnostics.len(), 1, "{deep}: {diagnostics:?}");
        assert_eq!(diagnostics[0].line, 1, "{deep}");
        // A syntax error first on the line, the depth after it.
        let source = format!("local = 1 {}\n", deep.repeat(50_000));
        let e = answer(target.eval(&source)).unwrap_err();
        assert_eq!(bounded_diagnostics(e).len(), 1, "{deep}");
    }
    assert_node_healthy(&node, &bystander);
}

#[test]
fn the_deepest_nesting_luau_accepts_reloads_and_runs() {
    let (node, bystander, target) = setup();
    // Luau compiles about 1000 nested blocks; checking them takes more
    // stack than a request thread has.
    let source = format!(
        "local m = {{}}\nfunction m.depth() local n = 0\n{}n = 900\n{}return n end\nreturn m\n",
        "do ".repeat(900),
        "end ".repeat(900)
    );
    let report = answer(target.reload(sources(&[("deep", &source)]), ReloadOptions::default()))
        .expect("deep module loads");
    assert_eq!(report.modules[0].to, 1);
    let depth = answer(target.eval("return require('deep').depth()")).unwrap();
    assert_eq!(depth, json!(900));
    assert_node_healthy(&node, &bystander);
}

const CRASHY: &str = r#"local c = {}
function c.init() return { n = 0 } end
function c.handle_call(req, from, state)
  if req == "add" then return state.missing + 1, state end
  if req == "raise" then error("boom") end
  if req == "table" then error({ code = 7 }) end
  if req == "lib" then return require("helper").explode(), state end
  if req == "deep" then
    local function down(n) if n == 0 then error("bottom") end return down(n - 1) + 1 end
    return down(5000), state
  end
  return state.n, state
end
return c
"#;

const HELPER: &str = r#"local h = {}
function h.explode()
  local t = nil
  return t.field
end
return h
"#;

fn crashy(target: &Sandbox) {
    answer(target.reload(
        sources(&[("crashy", CRASHY), ("helper", HELPER)]),
        ReloadOptions::default(),
    ))
    .expect("crashy loads");
}

/// Calls `req` on a fresh `crashy` process and returns the crash reason.
fn crash_reason(target: &Sandbox, req: &str) -> ExitReason {
    let pid = answer(target.spawn("crashy", json!(null), None)).unwrap();
    match answer(target.call(&pid, json!(req), None)) {
        Err(Error::Crashed { reason, .. }) => reason,
        other => panic!("{req}: expected a crash, got {other:?}"),
    }
}

fn assert_clean_traceback(traceback: &str) {
    assert!(!traceback.is_empty());
    for line in traceback.lines() {
        assert!(!line.trim_start().starts_with("[C]"), "{traceback}");
        assert!(!line.starts_with("graft."), "{traceback}");
    }
}

#[test]
fn a_runtime_error_in_a_handler_names_module_and_line() {
    let (node, bystander, target) = setup();
    crashy(&target);
    let ExitReason::Error {
        message,
        traceback,
        module,
        line,
    } = crash_reason(&target, "add")
    else {
        panic!("expected an error exit")
    };
    assert_eq!((module.as_deref(), line), (Some("crashy"), Some(4)));
    // The message stays as Luau wrote it.
    assert!(
        message.starts_with("crashy.luau:4: attempt to perform arithmetic"),
        "{message}"
    );
    assert_clean_traceback(&traceback);
    assert!(traceback.contains("crashy.luau:4"), "{traceback}");

    // `error("boom")` from a C function: the top frame is `[C] function error`.
    let ExitReason::Error {
        traceback,
        module,
        line,
        ..
    } = crash_reason(&target, "raise")
    else {
        panic!("expected an error exit")
    };
    assert_eq!((module.as_deref(), line), (Some("crashy"), Some(5)));
    assert_clean_traceback(&traceback);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn an_error_thousands_of_calls_deep_keeps_a_short_traceback() {
    let (node, bystander, target) = setup();
    crashy(&target);
    let ExitReason::Error {
        module,
        line,
        traceback,
        ..
    } = crash_reason(&target, "deep")
    else {
        panic!("expected an error exit")
    };
    assert_eq!((module.as_deref(), line), (Some("crashy"), Some(9)));
    let frames: Vec<&str> = traceback.lines().collect();
    assert_eq!(
        frames.len(),
        graft::diagnostic::MAX_TRACEBACK_FRAMES + 1,
        "{traceback}"
    );
    assert!(frames[0].starts_with("crashy.luau:9"), "{traceback}");
    assert!(
        frames[frames.len() - 1].ends_with("more frames"),
        "{traceback}"
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn an_error_value_without_position_is_placed_by_the_traceback() {
    let (node, bystander, target) = setup();
    crashy(&target);
    let ExitReason::Error { module, line, .. } = crash_reason(&target, "table") else {
        panic!("expected an error exit")
    };
    assert_eq!((module.as_deref(), line), (Some("crashy"), Some(6)));
    assert_node_healthy(&node, &bystander);
}

#[test]
fn an_error_in_a_required_library_names_the_library() {
    let (node, bystander, target) = setup();
    crashy(&target);
    let ExitReason::Error {
        module,
        line,
        traceback,
        ..
    } = crash_reason(&target, "lib")
    else {
        panic!("expected an error exit")
    };
    assert_eq!((module.as_deref(), line), (Some("helper"), Some(4)));
    assert!(traceback.contains("crashy.luau:7"), "{traceback}");
    assert_clean_traceback(&traceback);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_module_body_error_aborts_evaluate_with_module_and_line() {
    let (node, bystander, target) = setup();
    let e = answer(target.reload(
        sources(&[(
            "m",
            "local m = {}\nlocal z = nil\nlocal y = z.q\nreturn m\n",
        )]),
        ReloadOptions::default(),
    ))
    .unwrap_err();
    assert_eq!(e.kind(), "reload_aborted");
    let Error::ReloadAborted {
        step,
        module,
        line,
        column,
        message,
        ..
    } = e
    else {
        unreachable!()
    };
    assert_eq!(step, ReloadStep::Evaluate);
    assert_eq!(
        (module.as_deref(), line, column),
        (Some("m"), Some(3), None)
    );
    assert_eq!(
        message,
        "module `m` failed while loading: m.luau:3: attempt to index nil with 'q'"
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_megabyte_error_while_loading_is_cut() {
    let (node, bystander, target) = setup();
    let source = "local m = {}\nerror(string.rep('x', 2000000))\nreturn m\n";
    let e =
        answer(target.reload(sources(&[("big", source)]), ReloadOptions::default())).unwrap_err();
    let Error::ReloadAborted { line, message, .. } = e else {
        panic!("expected reload_aborted, got {e:?}")
    };
    assert_eq!(line, Some(2));
    assert!(message.len() < 4200, "{} bytes", message.len());
    assert!(
        message.ends_with("more bytes)"),
        "{}",
        &message[message.len() - 40..]
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_library_error_while_loading_gives_the_line_of_the_call() {
    let (node, bystander, target) = setup();
    answer(target.reload(sources(&[("helper", HELPER)]), ReloadOptions::default())).unwrap();
    let user = "local h = require('helper')\nlocal v = h.explode()\nreturn {}\n";
    let e =
        answer(target.reload(sources(&[("user", user)]), ReloadOptions::default())).unwrap_err();
    let Error::ReloadAborted {
        step,
        module,
        line,
        message,
        ..
    } = e
    else {
        panic!("expected reload_aborted, got {e:?}")
    };
    assert_eq!(step, ReloadStep::Evaluate);
    assert_eq!((module.as_deref(), line), (Some("user"), Some(2)));
    assert!(
        message.contains("helper.luau:4: attempt to index nil"),
        "{message}"
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_failing_code_change_aborts_migrate_with_module_and_line() {
    let (node, bystander, target) = setup();
    answer(target.reload(
        sources(&[("counter", crate::support::COUNTER)]),
        ReloadOptions::default(),
    ))
    .unwrap();
    answer(target.spawn("counter", json!(null), Some("c"))).unwrap();
    let v2 = r#"local counter = {}
function counter.init(args) return { count = 0 } end
function counter.handle_call(req, from, state) return state.count, state end
function counter.code_change(old_vsn, state, extra)
  error("cannot migrate " .. tostring(old_vsn))
end
return counter
"#;
    let e =
        answer(target.reload(sources(&[("counter", v2)]), ReloadOptions::default())).unwrap_err();
    let Error::ReloadAborted {
        step,
        module,
        process,
        line,
        message,
        ..
    } = e
    else {
        panic!("expected reload_aborted, got {e:?}")
    };
    assert_eq!(step, ReloadStep::Migrate);
    assert_eq!((module.as_deref(), line), (Some("counter"), Some(5)));
    assert!(process.is_some());
    assert!(
        message.contains("counter.luau:5: cannot migrate 1"),
        "{message}"
    );
    // Nothing changed: the old code still answers.
    assert_eq!(
        answer(target.call("c", json!("inc"), None)).unwrap(),
        json!(1)
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_failing_state_handler_gives_its_own_line() {
    let (node, bystander, target) = setup();
    let opts = ReloadOptions {
        state_handler: Some(graft::StateHandler::Luau(
            "local x = 1\nerror('no handler today')\n".into(),
        )),
        ..ReloadOptions::default()
    };
    answer(target.reload(
        sources(&[("counter", crate::support::COUNTER)]),
        ReloadOptions::default(),
    ))
    .unwrap();
    answer(target.spawn("counter", json!(null), Some("c"))).unwrap();
    let v2 = crate::support::COUNTER.replace("state.count += 1", "state.count += 2");
    let e = answer(target.reload(sources(&[("counter", &v2)]), opts)).unwrap_err();
    let Error::ReloadAborted {
        step, module, line, ..
    } = e
    else {
        panic!("expected reload_aborted, got {e:?}")
    };
    assert_eq!(
        (step.as_str(), module, line),
        ("state_handler", None, Some(2))
    );
    assert_node_healthy(&node, &bystander);
}
