//! Hostile values at the boundaries (SPEC §7 rows 1–4): cycles, DAGs of
//! shared subtables whose JSON form explodes, tables with holes, NaN. Each
//! conversion fails with its exact kind in bounded work, and the node, a
//! bystander and the attacked sandbox keep serving.

use std::collections::BTreeMap;

use graft::{Error, HostFunctions, Node, NodeLimits, ReloadOptions, Sandbox, SandboxSpec};
use serde_json::{json, Value as Json};

use crate::support::{answer, assert_node_healthy, counter_sandbox, COUNTER};

/// A server whose `handle_call(req)` runs the Luau `case <req>` of `CASES`
/// and replies with what it returns; its state is set by case `selfish`.
const VALUES: &str = r#"
local CASES = {
  dag = function()
    local t = {} for i = 1, 30 do t = { a = t, b = t } end return t
  end,
  cycle = function() local t = {} t.me = t return t end,
  packed = function() return table.pack(1, nil, 3) end,
  nan = function() return { ok = 1, x = 0/0 } end,
  plain = function() return { n = 1 } end,
}
local values = {}
function values.init(args) return { n = 0 } end
function values.handle_call(req, from, state)
  if req == "selfish" then
    for i = 1, 8 do state["k" .. i] = state end
    return true, state
  end
  return CASES[req](), state
end
return values
"#;

fn attacked(node: &Node) -> Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("victim")
                .entry(None)
                .module("values", VALUES),
        ),
    )
    .expect("victim sandbox");
    answer(sb.spawn("values", json!(null), Some("x"))).expect("spawn values");
    sb
}

/// The node's `max_value_bytes` in most tests: the smallest that accepts
/// the default `max_message_bytes`, so that the tests stay quick on a
/// loaded machine (the default of 8 MiB is tested once).
const CAP: usize = 1024 * 1024;

fn small_cap_node() -> Node {
    let caps = NodeLimits {
        max_value_bytes: CAP,
        ..NodeLimits::default()
    };
    Node::with_limits(2, caps)
}

fn setup() -> (Node, Sandbox, Sandbox) {
    setup_on(small_cap_node())
}

fn setup_on(node: Node) -> (Node, Sandbox, Sandbox) {
    let bystander = counter_sandbox(&node, "bystander");
    let sb = attacked(&node);
    (node, bystander, sb)
}

fn call(sb: &Sandbox, req: &str) -> graft::Result<Json> {
    answer(sb.call("x", json!(req), None))
}

/// The attacked process still answers, with its state intact.
fn still_serves(sb: &Sandbox) {
    assert_eq!(call(sb, "plain").expect("plain reply"), json!({ "n": 1 }));
}

#[test]
fn shared_dag_reply_is_value_too_large() {
    // as seen: the default cap of 8 MiB
    let (node, bystander, sb) = setup_on(Node::with_threads(2));
    match call(&sb, "dag") {
        Err(e @ Error::ValueTooLarge { .. }) => {
            assert_eq!(e.kind(), "value_too_large");
            let Error::ValueTooLarge { limit, what } = e else {
                unreachable!()
            };
            assert_eq!(limit, 8 * 1024 * 1024);
            assert!(what.starts_with("reply (stopped at reply."), "{what}");
        }
        other => panic!("expected value_too_large, got {other:?}"),
    }
    still_serves(&sb);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn cyclic_reply_is_cyclic_value() {
    let (node, bystander, sb) = setup();
    match call(&sb, "cycle") {
        Err(e @ Error::CyclicValue(_)) => {
            assert_eq!(e.kind(), "cyclic_value");
            assert_eq!(e.to_string(), "cyclic value: reply.me → reply");
        }
        other => panic!("expected cyclic_value, got {other:?}"),
    }
    still_serves(&sb);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn table_pack_reply_is_an_object_with_string_keys() {
    let (node, bystander, sb) = setup();
    assert_eq!(
        call(&sb, "packed").expect("a documented form, not a panic"),
        json!({ "1": 1, "3": 3, "n": 3 })
    );
    still_serves(&sb);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn nan_reply_is_not_plain_data_naming_the_field() {
    let (node, bystander, sb) = setup();
    match call(&sb, "nan") {
        Err(e @ Error::NotPlainData(_)) => {
            assert_eq!(e.kind(), "not_plain_data");
            assert!(
                e.to_string()
                    .starts_with("not plain data: reply.x: the number NaN has no JSON form"),
                "{e}"
            );
        }
        other => panic!("expected not_plain_data, got {other:?}"),
    }
    still_serves(&sb);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn state_that_holds_itself_is_cyclic_value_and_listed_promptly() {
    let (node, bystander, sb) = setup();
    assert_eq!(call(&sb, "selfish").expect("selfish"), json!(true));
    // Each table is counted once: the listing answers (within 5 s) with a
    // small figure, not a walk of 8^16 paths.
    let procs = answer(sb.processes()).expect("processes");
    let x = procs
        .iter()
        .find(|p| p.name.as_deref() == Some("x"))
        .expect("x listed");
    assert!(x.memory_bytes < 4096, "{} bytes", x.memory_bytes);
    match answer(sb.state("x")) {
        Err(e @ Error::CyclicValue(_)) => {
            assert_eq!(e.kind(), "cyclic_value");
            let msg = e.to_string();
            assert!(
                msg.starts_with("cyclic value: state.") && msg.ends_with(" → state"),
                "{msg}"
            );
        }
        other => panic!("expected cyclic_value, got {other:?}"),
    }
    assert_node_healthy(&node, &bystander);
}

/// Sends a cyclic message to `counter` and replies with what `graft.send`
/// raised.
const SENDER: &str = r#"
local sender = {}
function sender.init(args) return {} end
function sender.handle_call(req, from, state)
  local m = { list = {} }
  m.list.back = m
  local ok, err = pcall(graft.send, graft.whereis("c"), m)
  return { ok = ok, err = tostring(err) }, state
end
return sender
"#;

#[test]
fn cyclic_message_raises_cyclic_value_in_the_sender() {
    let node = small_cap_node();
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("victim")
                .entry(None)
                .module("counter", COUNTER)
                .module("sender", SENDER),
        ),
    )
    .expect("victim");
    answer(sb.spawn("counter", json!(null), Some("c"))).expect("counter");
    answer(sb.spawn("sender", json!(null), Some("s"))).expect("sender");
    let r = answer(sb.call("s", json!(null), None)).expect("sender replies");
    assert_eq!(r["ok"], json!(false));
    let err = r["err"].as_str().expect("error text");
    assert!(
        err.contains("graft.send: cyclic value: message.list.back → message"),
        "{err}"
    );
    // nothing was delivered, and the receiver still counts from zero
    assert_eq!(
        answer(sb.call("c", json!("inc"), None)).expect("inc"),
        json!(1)
    );
    assert_node_healthy(&node, &bystander);
}

/// Calls `x` of the same sandbox and returns what the call raised.
const CALLER: &str = r#"
local caller = {}
function caller.init(args) return {} end
function caller.handle_call(req, from, state)
  local ok, err = pcall(graft.call, "x", req)
  return { ok = ok, err = tostring(err) }, state
end
return caller
"#;

#[test]
fn cyclic_reply_to_a_process_caller_raises_cyclic_value() {
    let node = small_cap_node();
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("victim")
                .entry(None)
                .module("values", VALUES)
                .module("caller", CALLER),
        ),
    )
    .expect("victim");
    answer(sb.spawn("caller", json!(null), Some("caller"))).expect("caller");
    answer(sb.spawn("values", json!(null), Some("x"))).expect("values");
    let r = answer(sb.call("caller", json!("cycle"), None)).expect("caller replies");
    assert_eq!(r["ok"], json!(false));
    let err = r["err"].as_str().expect("error text");
    assert!(err.contains("cyclic value: reply.me → reply"), "{err}");
    assert_node_healthy(&node, &bystander);
}

/// Hands a host function a 40-level DAG, then a small table.
const HOSTED: &str = r#"
local hosted = {}
function hosted.init(args) return {} end
function hosted.handle_call(req, from, state)
  local arg = { small = true }
  if req == "dag" then
    arg = {} for i = 1, 40 do arg = { a = arg, b = arg } end
  end
  local v, err = host.size(arg)
  return { v = v, err = err }, state
end
return hosted
"#;

#[test]
fn shared_dag_host_function_argument_is_value_too_large() {
    let node = small_cap_node();
    let bystander = counter_sandbox(&node, "bystander");
    let host = HostFunctions::default().function("host.size", |args| {
        Ok(json!(serde_json::to_vec(&args)
            .map_err(|e| e.to_string())?
            .len()))
    });
    let sb = graft::block_on(
        node.create_sandbox_with(
            SandboxSpec::new("victim")
                .entry(None)
                .module("hosted", HOSTED),
            host,
        ),
    )
    .expect("victim");
    answer(sb.spawn("hosted", json!(null), Some("h"))).expect("hosted");
    // A long call timeout: the DAG is big, and the suite runs in parallel on
    // two cores (the default 5 s was passed under that load).
    let r = answer(sb.call("h", json!("dag"), Some(60_000))).expect("the guest gets nil, err");
    let err = r["err"].as_str().expect("error text");
    assert!(
        err.starts_with(&format!(
            "host.size: value too large: its JSON form passed {CAP} bytes"
        )),
        "{err}"
    );
    assert!(err.contains("(stopped at argument 1."), "{err}");
    // the sandbox keeps serving, the host function too
    let r = answer(sb.call("h", json!("small"), None)).expect("small");
    assert_eq!(r, json!({ "v": 16 }));
    assert_node_healthy(&node, &bystander);
}

/// v2 of `values`: a migration that returns a cycle, or a 30-level DAG.
fn values_v2(migration: &str) -> BTreeMap<String, String> {
    let code_change =
        format!("function values.code_change(old, state, extra)\n{migration}\nend\nreturn values");
    let src = VALUES.replacen("return values\n", &code_change, 1);
    BTreeMap::from([("values".to_string(), src)])
}

#[test]
fn migration_returning_a_cycle_aborts_naming_it() {
    let (node, bystander, sb) = setup();
    let cyclic = values_v2("local s = { inner = {} } s.inner.outer = s return s");
    match answer(sb.reload(cyclic, ReloadOptions::default())) {
        Err(e @ Error::ReloadAborted { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("cyclic value: state.inner.outer → state"),
                "{msg}"
            );
        }
        other => panic!("expected reload_aborted, got {other:?}"),
    }
    still_serves(&sb);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn migration_of_a_shared_dag_state_checks_each_table_once() {
    let (node, bystander, sb) = setup();
    // 2^30 paths, 31 tables: accepted (plain data may share) and checked in
    // linear time; reading that state as JSON is then value_too_large.
    let dag = values_v2("local t = {} for i = 1, 30 do t = { a = t, b = t } end return t");
    let report = answer(sb.reload(dag, ReloadOptions::default())).expect("reload");
    assert_eq!(report.processes_migrated, 1);
    match answer(sb.state("x")) {
        Err(e) => assert_eq!(e.kind(), "value_too_large"),
        Ok(v) => panic!(
            "expected value_too_large, got {} bytes",
            v.to_string().len()
        ),
    }
    assert!(answer(sb.processes()).expect("processes").len() == 1);
    assert_node_healthy(&node, &bystander);
}
