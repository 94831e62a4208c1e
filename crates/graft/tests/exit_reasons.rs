//! Exit reasons come from signals a guest cannot forge (SPEC §1, §4): the
//! CPU watch's flag, the status and depth of the thread Luau ended. An error
//! whose text (or `__tostring`) reads like a limit — `not enough memory`,
//! `stack overflow`, `timeout: callback ran longer than handler_ms` — is an
//! ordinary `error` exit with that message, while the real limits still
//! give `out_of_memory`, `stack_overflow` and `timeout`. Each on the three
//! paths a callback runs: a handler run by the scheduler, a handler run
//! nested in its caller's callback (`graft.call` to an idle process), and
//! `init` (spawned by the host, and nested by `graft.spawn`).

mod common;
use common::{limits, run};
use std::future::Future;
use std::time::Duration;

use graft::{block_on, with_timeout, Error, ExitReason, Node, Sandbox, SandboxSpec};
use serde_json::{json, Value as Json};

fn wait<F: Future>(fut: F) -> F::Output {
    block_on(with_timeout(fut, Duration::from_secs(10)))
        .expect("the request did not complete within 10 s")
}

/// Raises a spoof or hits a real limit for `op`; `via` and `spawn_via` do it
/// in a nested callee / a nested init and report how that went.
const FAKER: &str = r#"
local m = {}
local function down(n) return 1 + down(n + 1) end
local ACTS = {
  spoof_oom = function() error("not enough memory", 0) end,
  spoof_memory_error = function() error("memory error: not enough memory", 0) end,
  spoof_stack = function() error("stack overflow", 0) end,
  spoof_c_stack = function() error("C stack overflow", 0) end,
  spoof_timeout = function() error("timeout: callback ran longer than handler_ms (1000 ms)", 0) end,
  spoof_table = function() error({ message = "not enough memory", kind = "out_of_memory" }) end,
  spoof_object = function()
    error(setmetatable({}, { __tostring = function() return "stack overflow" end }))
  end,
  -- A real overflow caught, then its message raised again from a shallow frame.
  spoof_rethrow = function()
    local ok, e = pcall(down, 1)
    error(e, 0)
  end,
  real_oom = function()
    local t = {}
    for i = 1, 1e9 do t[i] = i end
  end,
  real_stack = function() return down(1) end,
  real_timeout = function() while true do end end,
}
local function act(op)
  local f = ACTS[op]
  if f then f() end
end
function m.init(args)
  if type(args) == "table" and args.op then act(args.op) end
  return {}
end
function m.handle_call(req, from, state)
  if req.op == "exit_as" then
    graft.exit(req.reason)
    return "ok", state
  elseif req.op == "via" then
    local ok, err = pcall(graft.call, req.target, { op = req.inner })
    return { ok = ok, err = tostring(err) }, state
  elseif req.op == "spawn_via" then
    local ok, err = pcall(graft.spawn, "faker", { op = req.inner })
    return { ok = ok, err = tostring(err) }, state
  end
  act(req.op)
  return "ok", state
end
return m
"#;

/// (op, what a spoof's message must say)
const SPOOFS: &[(&str, &str)] = &[
    ("spoof_oom", "not enough memory"),
    ("spoof_memory_error", "memory error: not enough memory"),
    ("spoof_stack", "stack overflow"),
    ("spoof_c_stack", "C stack overflow"),
    (
        "spoof_timeout",
        "timeout: callback ran longer than handler_ms",
    ),
    ("spoof_table", "table"),
    ("spoof_object", "stack overflow"),
    ("spoof_rethrow", "stack overflow"),
];

/// (op, the kind it must give)
const REAL: &[(&str, &str)] = &[
    ("real_oom", "out_of_memory"),
    ("real_stack", "stack_overflow"),
    ("real_timeout", "timeout"),
];

fn sandbox(node: &Node, id: &str) -> Sandbox {
    let spec = SandboxSpec::new(id)
        .entry(None)
        .module("faker", FAKER)
        .limits(limits(|l| {
            l.memory_bytes = 16 * 1024 * 1024;
            l.handler_ms = 1000;
        }));
    graft::block_on(node.create_sandbox(spec)).expect("sandbox")
}

fn last_crash(sb: &Sandbox) -> Json {
    let events = run(sb.events()).unwrap();
    let crash = events.iter().rev().find(|e| e.kind == "crash");
    crash.expect("a crash event").detail["reason"].clone()
}

#[test]
fn a_handler_run_by_the_scheduler() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "exit-plain");
    for (op, text) in SPOOFS {
        let pid = wait(sb.spawn("faker", json!(null), None)).unwrap();
        match wait(sb.call(&pid, json!({ "op": op }), None)) {
            Err(Error::Crashed {
                reason: ExitReason::Error { message, .. },
                ..
            }) => assert!(message.contains(text), "{op}: {message}"),
            other => panic!("{op}: expected an error exit, got {other:?}"),
        }
        assert_eq!(last_crash(&sb)["kind"], json!("error"), "{op}");
    }
    for (op, kind) in REAL {
        let pid = wait(sb.spawn("faker", json!(null), None)).unwrap();
        match wait(sb.call(&pid, json!({ "op": op }), None)) {
            Err(Error::Crashed { reason, .. }) => assert_eq!(reason.kind(), *kind, "{op}"),
            other => panic!("{op}: expected a crash, got {other:?}"),
        }
        assert_eq!(last_crash(&sb)["kind"], json!(kind), "{op}");
    }
    // The sandbox lives on.
    let pid = wait(sb.spawn("faker", json!(null), None)).unwrap();
    assert_eq!(
        wait(sb.call(&pid, json!({ "op": "none" }), None)).unwrap(),
        json!("ok")
    );
}

#[test]
fn a_handler_run_nested_in_its_caller() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "exit-nested");
    let caller = wait(sb.spawn("faker", json!(null), Some("caller"))).unwrap();
    let cases = SPOOFS.iter().chain(REAL.iter());
    for (i, (op, want)) in cases.enumerate() {
        // Idle, nothing queued: the call runs its handler nested.
        let callee = format!("callee{i}");
        wait(sb.spawn("faker", json!(null), Some(&callee))).unwrap();
        let req = json!({ "op": "via", "target": callee, "inner": op });
        let r = wait(sb.call(&caller, req, None)).unwrap();
        assert_eq!(r["ok"], json!(false), "{op}: {r}");
        let err = r["err"].as_str().unwrap();
        // A spoof's `want` is its message, a real limit's its kind.
        let kind = if op.starts_with("spoof") {
            assert!(
                err.contains("exited before replying: error: "),
                "{op}: {err}"
            );
            "error"
        } else {
            assert!(
                err.ends_with(&format!("exited before replying: {want}")),
                "{op}: {err}"
            );
            want
        };
        assert!(err.contains(want), "{op}: {err}");
        let crash = last_crash(&sb);
        assert_eq!(crash["kind"], json!(kind), "{op}: {crash}");
    }
    // The caller survived every callee.
    assert_eq!(
        wait(sb.call(&caller, json!({ "op": "none" }), None)).unwrap(),
        json!("ok")
    );
}

#[test]
fn init_spawned_by_the_host_and_nested_by_graft_spawn() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "exit-init");
    let caller = wait(sb.spawn("faker", json!(null), Some("caller"))).unwrap();
    let spoofs = SPOOFS.iter().map(|(op, _)| (op, "error"));
    for (op, kind) in spoofs.chain(REAL.iter().map(|(op, k)| (op, *k))) {
        match wait(sb.spawn("faker", json!({ "op": op }), None)) {
            Err(Error::SpawnFailed { reason, .. }) => assert_eq!(reason.kind(), kind, "{op}"),
            other => panic!("{op}: expected SpawnFailed, got {other:?}"),
        }
        let req = json!({ "op": "spawn_via", "inner": op });
        let r = wait(sb.call(&caller, req, None)).unwrap();
        assert_eq!(r["ok"], json!(false), "{op}: {r}");
        let err = r["err"].as_str().unwrap();
        let want = if kind == "error" {
            "init failed: error: ".to_owned()
        } else {
            format!("init failed: {kind}")
        };
        assert!(err.contains(&want), "{op}: {err}");
    }
    assert_eq!(
        wait(sb.call(&caller, json!({ "op": "none" }), None)).unwrap(),
        json!("ok")
    );
}

#[test]
fn graft_exit_cannot_name_a_limit() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "exit-given");
    for limit in ["out_of_memory", "timeout", "stack_overflow"] {
        let pid = wait(sb.spawn("faker", json!(null), None)).unwrap();
        let req = json!({ "op": "exit_as", "reason": limit });
        match wait(sb.call(&pid, req, None)) {
            Err(Error::Crashed { reason, .. }) => assert_eq!(
                reason,
                ExitReason::Other {
                    value: json!(limit)
                },
                "{limit}"
            ),
            other => panic!("{limit}: expected a crash, got {other:?}"),
        }
    }
    // The OTP atoms are the guest's to give.
    let pid = wait(sb.spawn("faker", json!(null), None)).unwrap();
    let req = json!({ "op": "exit_as", "reason": "shutdown" });
    match wait(sb.call(&pid, req, None)) {
        Err(Error::Crashed { reason, .. }) => assert_eq!(reason, ExitReason::Shutdown),
        other => panic!("expected a crash, got {other:?}"),
    }
}
