//! Guest code that runs where the host might not expect it: the
//! `__tostring` of an error object, which mlua's error handler and the
//! kernel's description of a crash call. It may call back into `graft`,
//! yield, raise again or loop; each is an ordinary crash or abort of that
//! process or reload, bounded by `handler_ms`, never a panic of the kernel
//! (borrowed twice), a failed sandbox or a wedged scheduler thread.

use std::collections::BTreeMap;

use graft::{Node, SandboxSpec};
use serde_json::json;

use crate::support::{answer, assert_node_healthy, counter_sandbox};

/// `m`: a server that raises, for `{ op = … }`, an error object whose
/// `__tostring` does that op's trick (in `init` too, and in `code_change`
/// for a state `{ cc = … }`).
const EVIL: &str = r#"
local m = {}
local function obj(f) return setmetatable({}, { __tostring = f }) end
local ACTS = {
  natives = function()
    error(obj(function()
      graft.log.info("in __tostring")
      local me = graft.self()
      if me then
        graft.send(me, "hi")
        graft.send_after(1, me, "t")
        pcall(graft.register, "zz")
      end
      return "E"
    end))
  end,
  call = function()
    error(obj(function() local _, r = pcall(graft.call, "peer", "ping"); return "C " .. tostring(r) end))
  end,
  spawn = function()
    error(obj(function() local _, r = pcall(graft.spawn, "m", nil); return "S " .. tostring(r) end))
  end,
  raise = function() error(obj(function() error(obj(function() return "inner" end)) end)) end,
  yield = function() error(obj(function() coroutine.yield(1); return "Y" end)) end,
  wrap = function()
    coroutine.wrap(function() error(obj(function() graft.log.info("w"); return "W" end)) end)()
  end,
  loop = function() error(obj(function() while true do end end)) end,
  nested = function() return graft.call("peer", { op = "call" }) end,
  nested_natives = function() return graft.call("peer", { op = "natives" }) end,
  nested_loop = function() return graft.call("peer", { op = "loop" }) end,
}
function m.init(args)
  if type(args) == "table" and args.op then ACTS[args.op]() end
  return { cc = type(args) == "table" and args.cc or nil }
end
function m.handle_call(req, from, state)
  if type(req) == "table" then ACTS[req.op]() end
  return "pong", state
end
function m.handle_info(msg, state) return state end
function m.code_change(old, state, extra)
  if state.cc then ACTS[state.cc]() end
  return state
end
return m
"#;

fn evil(node: &Node) -> graft::Sandbox {
    let mut spec = SandboxSpec::new("evil").entry(None).module("m", EVIL);
    spec.limits.handler_ms = 300;
    answer(node.create_sandbox(spec)).expect("create")
}

/// Every trick in a handler, in `init` (spawned by the host) and nested in
/// a caller's callback: the process crashes with an `error` or `timeout`
/// reason (no internal error), and the sandbox goes on running.
#[test]
fn an_error_objects_tostring_is_guest_code_like_any_other() {
    let node = Node::builder().threads(2).ephemeral().open().unwrap();
    let bystander = counter_sandbox(&node, "bystander");
    let sb = evil(&node);
    for op in [
        "natives",
        "call",
        "spawn",
        "raise",
        "yield",
        "wrap",
        "loop",
        "nested",
        "nested_natives",
        "nested_loop",
    ] {
        if answer(sb.call("peer", json!("ping"), Some(2000))).is_err() {
            answer(sb.spawn("m", json!(null), Some("peer"))).expect("peer");
        }
        let name = format!("p_{op}");
        answer(sb.spawn("m", json!(null), Some(&name))).expect("spawn");
        for (how, err) in [
            (
                "call",
                answer(sb.call(name.as_str(), json!({ "op": op }), Some(5000))).map(|_| ()),
            ),
            (
                "init",
                answer(sb.spawn("m", json!({ "op": op }), None)).map(|_| ()),
            ),
        ] {
            let err = err.expect_err("the process raised");
            let text = err.to_string();
            assert!(
                matches!(err.kind(), "crashed" | "spawn_failed"),
                "{op} ({how}): {err:?}"
            );
            assert!(
                !text.contains("internal error") && !text.contains("panic"),
                "{op} ({how}): {text}"
            );
        }
        let info = answer(sb.info()).expect("info");
        assert_eq!(info.status, "running", "{op}");
    }
    assert_node_healthy(&node, &bystander);
    node.shutdown();
}

/// A reload whose `code_change` raises an error object: the reload is
/// aborted at the migration and the sandbox answers. With a `__tostring`
/// that loops, the abort comes once `handler_ms` stops it. (Before: the
/// host described the error after the migration's CPU watch was disarmed,
/// running the guest's `__tostring` unbounded: the reload never answered
/// and the scheduler thread was lost for good — two such sandboxes stop a
/// two-thread node.)
#[test]
fn a_migration_errors_tostring_runs_under_the_cpu_watch() {
    let node = Node::builder().threads(2).ephemeral().open().unwrap();
    let bystander = counter_sandbox(&node, "bystander");
    let sb = evil(&node);
    for (i, op) in ["natives", "call", "raise", "loop"].into_iter().enumerate() {
        let name = format!("cc_{op}");
        answer(sb.spawn("m", json!({ "cc": op }), Some(&name))).expect("spawn");
        let mut src = BTreeMap::new();
        src.insert("m".to_string(), format!("{EVIL}\n-- v{i}\n"));
        let err = answer(sb.reload(src, graft::ReloadOptions::default()))
            .expect_err("the migration raised");
        assert_eq!(err.kind(), "reload_aborted", "{op}: {err}");
        assert!(err.to_string().contains("migration"), "{op}: {err}");
        assert_eq!(
            answer(sb.call(name.as_str(), json!("ping"), None)).expect("ping"),
            "pong"
        );
        answer(sb.eval(&format!("graft.exit(graft.whereis('{name}'), 'kill')"))).expect("kill");
    }
    assert_node_healthy(&node, &bystander);
    node.shutdown();
}
