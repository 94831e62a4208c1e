//! Process semantics as OTP defines them: links, exit signals, trapping,
//! monitors, calls (timeouts, nesting, crashes), copying of messages,
//! timers, the name registry, error reasons, plain-data checks and `eval`.
//!
//! Most tests drive `probe` processes: servers that do what a request says
//! (link, monitor, trap, signal, call …) and keep every message they get in
//! `state.inbox`, so the host can read what arrived and in which order.

mod common;
use common::{run, wait_until};
use std::time::{Duration, Instant};

use graft::{Error, ExitReason, Node, Sandbox, SandboxSpec};
use serde_json::{json, Value as Json};

// ---------------------------------------------------------------------------
// helpers

const PROBE: &str = r#"
local probe = {}

local function resolve(t)
  if type(t) == "string" then
    local p = graft.whereis(t)
    if p == nil then error("test setup: no process named " .. t) end
    return p
  end
  return t
end

function probe.init(args)
  args = args or {}
  if args.trap then graft.trap_exit(true) end
  if args.link then graft.link(resolve(args.link)) end
  return {
    inbox = {}, casts = {}, saved = {}, label = args.label, report = args.report,
    data = { x = 1, list = { 1, 2, 3 } },
  }
end

local function protect(ok, ...)
  if ok then return { ok = true, reply = (...) } end
  return { ok = false, err = tostring((...)) }
end

function probe.handle_call(req, from, state)
  local op = req.op
  if op == "ping" then
    return "pong", state
  elseif op == "self" then
    return graft.self(), state
  elseif op == "trap" then
    return graft.trap_exit(req.flag), state
  elseif op == "link" then
    return graft.link(resolve(req.target)), state
  elseif op == "unlink" then
    return graft.unlink(resolve(req.target)), state
  elseif op == "monitor" then
    return graft.monitor(resolve(req.target)), state
  elseif op == "demonitor" then
    return graft.demonitor(req.ref), state
  elseif op == "save" then
    state.saved[req.target] = resolve(req.target)
    return true, state
  elseif op == "monitor_saved" then
    return graft.monitor(state.saved[req.target]), state
  elseif op == "link_saved" then
    return protect(pcall(graft.link, state.saved[req.target])), state
  elseif op == "signal" then
    return graft.exit(resolve(req.target), req.reason), state
  elseif op == "spawn_link" then
    return graft.spawn_link("probe", req.args, { name = req.name }), state
  elseif op == "crash" then
    error(req.msg)
  elseif op == "inbox" then
    return state.inbox, state
  elseif op == "casts" then
    return state.casts, state
  elseif op == "data" then
    return state.data, state
  elseif op == "store" then
    state.stored = req.value
    return true, state
  elseif op == "spin" then
    local t = graft.now()
    while graft.now() - t < req.ms do end
    return "spun", state
  elseif op == "call" then
    return protect(pcall(graft.call, req.target, req.req, req.timeout)), state
  elseif op == "relay" then
    return { via = state.label, reply = graft.call(req.to, req.req, 5000) }, state
  elseif op == "send_then_mutate" then
    local t = { v = 1, nested = { x = 1 }, list = { "a" } }
    local sent = graft.send(req.target, t)
    local cast = graft.cast(req.target, t)
    t.v = 2
    t.nested.x = 99
    table.insert(t.list, "b")
    return { sent = sent, cast = cast, mine = t }, state
  elseif op == "call_then_mutate" then
    local value = { v = 1, nested = { x = 1 } }
    graft.call(req.target, { op = "store", value = value })
    value.v = 2
    value.nested.x = 99
    return value, state
  elseif op == "mutate_reply" then
    local r = graft.call(req.target, { op = "data" })
    r.x = 99
    table.insert(r.list, 4)
    local again = graft.call(req.target, { op = "data" })
    return { mutated = r, again = again }, state
  elseif op == "send_after" then
    local target = req.target
    if target == nil then target = graft.self() end
    return graft.send_after(req.ms, target, req.msg), state
  elseif op == "cancel_timer" then
    return graft.cancel_timer(req.id), state
  elseif op == "register" then
    return protect(pcall(graft.register, req.name)), state
  elseif op == "unregister" then
    return graft.unregister(req.name), state
  elseif op == "whereis" then
    local p = graft.whereis(req.name)
    return { found = p ~= nil, is_me = p == graft.self() }, state
  elseif op == "reply_fn" then
    return { f = function() end }, state
  end
  error("unknown op " .. tostring(op))
end

function probe.handle_cast(msg, state)
  if type(msg) == "table" and msg.op == "crash" then error(msg.msg) end
  if type(msg) == "table" and msg.op == "exit" then graft.exit(msg.reason) end
  table.insert(state.casts, msg)
  return state
end

function probe.handle_info(msg, state)
  table.insert(state.inbox, msg)
  return state
end

function probe.terminate(reason, state)
  if state.report ~= nil then
    graft.send(state.report, { tag = "TERMINATED", label = state.label, reason = reason })
  end
end

return probe
"#;

/// Line numbers matter: the error is on line 5, called from line 10.
const FAULTY: &str = r#"local faulty = {}
function faulty.init() return {} end
local function check(req)
  if req == "bad" then
    error("bad request: " .. req)
  end
  return "fine"
end
function faulty.handle_call(req, from, state)
  return check(req), state
end
return faulty
"#;

fn sandbox(node: &Node, id: &str) -> Sandbox {
    let spec = SandboxSpec::new(id)
        .entry(None)
        .module("probe", PROBE)
        .module("faulty", FAULTY);
    graft::block_on(node.create_sandbox(spec)).expect("sandbox")
}

fn setup() -> (Node, Sandbox) {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "procs");
    (node, sb)
}

fn spawn(sb: &Sandbox, name: &str, args: Json) -> graft::Pid {
    let mut args = args;
    if args.is_null() {
        args = json!({});
    }
    args["label"] = json!(name);
    run(sb.spawn("probe", args, Some(name))).unwrap_or_else(|e| panic!("spawn {name}: {e}"))
}

fn call(sb: &Sandbox, target: impl Into<graft::Target>, req: Json) -> Json {
    let target = target.into();
    run(sb.call(&target, req.clone(), Some(3000)))
        .unwrap_or_else(|e| panic!("call {target} {req}: {e}"))
}

fn as_list(v: Json) -> Vec<Json> {
    match v {
        Json::Array(a) => a,
        Json::Object(m) if m.is_empty() => Vec::new(),
        other => panic!("expected a list, got {other}"),
    }
}

fn inbox(sb: &Sandbox, name: &str) -> Vec<Json> {
    as_list(call(sb, name, json!({"op": "inbox"})))
}

/// Waits until `name`'s inbox holds at least `n` messages.
fn wait_inbox(sb: &Sandbox, name: &str, n: usize) -> Vec<Json> {
    wait_until(&format!("{n} message(s) in {name}'s inbox"), || {
        let m = inbox(sb, name);
        (m.len() >= n).then_some(m)
    })
}

fn alive(sb: &Sandbox, name: &str) -> bool {
    run(sb.processes())
        .unwrap()
        .iter()
        .any(|p| p.name.as_deref() == Some(name))
}

fn wait_gone(sb: &Sandbox, name: &str) {
    wait_until(&format!("{name} to exit"), || {
        (!alive(sb, name)).then_some(())
    });
}

fn down_for<'a>(msgs: &'a [Json], pid: &graft::Pid) -> &'a Json {
    msgs.iter()
        .find(|m| m["tag"] == "DOWN" && m["pid"] == pid.as_str())
        .unwrap_or_else(|| panic!("no DOWN for {pid} in {msgs:?}"))
}

/// Proves that nothing else is queued before a marker: sends `marker` and
/// waits for it, returning the whole inbox.
fn inbox_after_marker(sb: &Sandbox, name: &str) -> Vec<Json> {
    run(sb.send(name, json!("marker"))).unwrap();
    wait_until("the marker", || {
        let m = inbox(sb, name);
        m.contains(&json!("marker")).then_some(m)
    })
}

// ---------------------------------------------------------------------------
// links

#[test]
fn a_linked_process_dies_with_the_same_abnormal_reason() {
    let (_node, sb) = setup();
    spawn(&sb, "w", json!(null));
    for (i, (how, expect_error)) in [
        (json!({"op": "crash", "msg": "boom"}), true),
        (json!({"op": "exit", "reason": "custom_reason"}), false),
        (json!({"op": "exit", "reason": {"why": "bored"}}), false),
    ]
    .into_iter()
    .enumerate()
    {
        let b = spawn(&sb, &format!("b{i}"), json!(null));
        let a = spawn(&sb, &format!("a{i}"), json!({"link": format!("b{i}")}));
        call(
            &sb,
            "w",
            json!({"op": "monitor", "target": format!("a{i}")}),
        );
        call(
            &sb,
            "w",
            json!({"op": "monitor", "target": format!("b{i}")}),
        );
        let before = inbox(&sb, "w").len();
        run(sb.cast(&format!("b{i}"), how.clone())).unwrap();
        let msgs = wait_inbox(&sb, "w", before + 2);
        let down_b = down_for(&msgs, &b);
        let down_a = down_for(&msgs, &a);
        if expect_error {
            assert!(
                down_b["reason"]["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("boom"),
                "{down_b}"
            );
        } else {
            assert_eq!(down_b["reason"], how["reason"], "{down_b}");
        }
        assert_eq!(
            down_a["reason"], down_b["reason"],
            "the linked process exits with the same reason"
        );
        assert!(!alive(&sb, &format!("a{i}")) && !alive(&sb, &format!("b{i}")));
    }
    assert!(alive(&sb, "w"), "a monitor does not kill the watcher");
}

#[test]
fn spawn_link_links_both_ways() {
    let (_node, sb) = setup();
    spawn(&sb, "w", json!(null));
    spawn(&sb, "parent", json!(null));
    let child = call(
        &sb,
        "parent",
        json!({"op": "spawn_link", "name": "child", "args": {"label": "child"}}),
    );
    let procs = run(sb.processes()).unwrap();
    let parent = procs
        .iter()
        .find(|p| p.name.as_deref() == Some("parent"))
        .unwrap();
    assert_eq!(parent.links, vec![child.as_str().unwrap().to_owned()]);
    call(&sb, "w", json!({"op": "monitor", "target": "parent"}));
    run(sb.cast("child", json!({"op": "crash", "msg": "child failed"}))).unwrap();
    let msgs = wait_inbox(&sb, "w", 1);
    assert!(
        msgs[0]["reason"]["error"]
            .as_str()
            .unwrap()
            .contains("child failed"),
        "{msgs:?}"
    );
    assert!(!alive(&sb, "parent"));
}

#[test]
fn a_normal_exit_does_not_propagate_but_shutdown_does() {
    let (_node, sb) = setup();
    spawn(&sb, "w", json!(null));
    let b = spawn(&sb, "b", json!(null));
    spawn(&sb, "a", json!({"link": "b"}));
    call(&sb, "w", json!({"op": "monitor", "target": "b"}));
    run(sb.cast("b", json!({"op": "exit", "reason": "normal"}))).unwrap();
    let msgs = wait_inbox(&sb, "w", 1);
    assert_eq!(down_for(&msgs, &b)["reason"], json!("normal"));
    assert_eq!(
        call(&sb, "a", json!({"op": "ping"})),
        json!("pong"),
        "a survives a normal exit of its link"
    );
    let procs = run(sb.processes()).unwrap();
    assert!(
        procs
            .iter()
            .find(|p| p.name.as_deref() == Some("a"))
            .unwrap()
            .links
            .is_empty(),
        "the link is gone"
    );

    // `shutdown` is not normal: it takes a non-trapping linked process down
    let b2 = spawn(&sb, "b2", json!(null));
    let a2 = spawn(&sb, "a2", json!({"link": "b2"}));
    call(&sb, "w", json!({"op": "monitor", "target": "a2"}));
    run(sb.cast("b2", json!({"op": "exit", "reason": "shutdown"}))).unwrap();
    wait_gone(&sb, "a2");
    let msgs = wait_inbox(&sb, "w", 2);
    assert_eq!(down_for(&msgs, &a2)["reason"], json!("shutdown"));
    assert!(!alive(&sb, "b2"), "{b2} exited");
}

#[test]
fn a_trapping_process_gets_exit_messages_and_survives() {
    let (_node, sb) = setup();
    let b = spawn(&sb, "b", json!(null));
    let c = spawn(&sb, "c", json!(null));
    spawn(&sb, "a", json!({"trap": true, "link": "b"}));
    call(&sb, "a", json!({"op": "link", "target": "c"}));
    run(sb.cast("b", json!({"op": "crash", "msg": "boom"}))).unwrap();
    let msgs = wait_inbox(&sb, "a", 1);
    assert_eq!(msgs[0]["tag"], "EXIT", "{msgs:?}");
    assert_eq!(msgs[0]["from"], json!(b));
    assert!(
        msgs[0]["reason"]["error"]
            .as_str()
            .unwrap()
            .contains("boom"),
        "{msgs:?}"
    );
    assert!(msgs[0]["reason"]["traceback"].is_string(), "{msgs:?}");
    // a trapping process is told about normal exits too
    run(sb.cast("c", json!({"op": "exit", "reason": "normal"}))).unwrap();
    let msgs = wait_inbox(&sb, "a", 2);
    assert_eq!(
        msgs[1],
        json!({"tag": "EXIT", "from": c, "reason": "normal"})
    );
    assert_eq!(call(&sb, "a", json!({"op": "ping"})), json!("pong"));

    // trap_exit(false) returns the old flag; from then on a linked crash kills
    assert_eq!(
        call(&sb, "a", json!({"op": "trap", "flag": false})),
        json!(true)
    );
    spawn(&sb, "d", json!({"link": "a"}));
    run(sb.cast("d", json!({"op": "crash", "msg": "again"}))).unwrap();
    wait_gone(&sb, "a");
}

#[test]
fn kill_is_untrappable_and_propagates_as_killed() {
    let (_node, sb) = setup();
    spawn(&sb, "w", json!(null));
    let a = spawn(&sb, "a", json!({"trap": true, "report": "w"}));
    let c = spawn(&sb, "c", json!({"link": "a"}));
    spawn(&sb, "d", json!({"trap": true, "link": "a"}));
    call(&sb, "w", json!({"op": "monitor", "target": "a"}));
    call(&sb, "w", json!({"op": "monitor", "target": "c"}));
    assert_eq!(
        call(
            &sb,
            "w",
            json!({"op": "signal", "target": "a", "reason": "kill"})
        ),
        json!(true)
    );
    let msgs = wait_inbox(&sb, "w", 2);
    assert_eq!(
        down_for(&msgs, &a)["reason"],
        json!("killed"),
        "a trapping process is killed anyway"
    );
    assert_eq!(
        down_for(&msgs, &c)["reason"],
        json!("killed"),
        "links see `killed`, not `kill`"
    );
    // a trapping link gets the EXIT message and survives
    let d_msgs = wait_inbox(&sb, "d", 1);
    assert_eq!(
        d_msgs,
        vec![json!({"tag": "EXIT", "from": a, "reason": "killed"})]
    );
    assert!(alive(&sb, "d"));
    // terminate does not run on kill
    let all = inbox_after_marker(&sb, "w");
    assert!(
        !all.iter().any(|m| m["tag"] == "TERMINATED"),
        "terminate ran for a killed process: {all:?}"
    );
}

#[test]
fn other_exit_signals_follow_exit_2() {
    let (_node, sb) = setup();
    let w = spawn(&sb, "w", json!(null));
    spawn(&sb, "t", json!({"trap": true}));
    spawn(&sb, "n", json!(null));
    let s = spawn(&sb, "s", json!({"report": "w"}));
    call(&sb, "w", json!({"op": "monitor", "target": "s"}));

    // trapped: becomes a message from the sender; normal too
    call(
        &sb,
        "w",
        json!({"op": "signal", "target": "t", "reason": "bye"}),
    );
    call(
        &sb,
        "w",
        json!({"op": "signal", "target": "t", "reason": "normal"}),
    );
    let msgs = wait_inbox(&sb, "t", 2);
    assert_eq!(
        msgs,
        vec![
            json!({"tag": "EXIT", "from": w, "reason": "bye"}),
            json!({"tag": "EXIT", "from": w, "reason": "normal"})
        ]
    );
    assert!(alive(&sb, "t"));

    // `normal` to a non-trapping process is ignored
    call(
        &sb,
        "w",
        json!({"op": "signal", "target": "n", "reason": "normal"}),
    );
    assert_eq!(call(&sb, "n", json!({"op": "ping"})), json!("pong"));
    assert!(inbox(&sb, "n").is_empty());

    // anything else kills it, and terminate runs with that reason
    call(
        &sb,
        "w",
        json!({"op": "signal", "target": "s", "reason": "shutdown"}),
    );
    let msgs = wait_inbox(&sb, "w", 2);
    assert_eq!(down_for(&msgs, &s)["reason"], json!("shutdown"));
    let term = msgs
        .iter()
        .find(|m| m["tag"] == "TERMINATED")
        .expect("terminate ran");
    assert_eq!(term["reason"], json!("shutdown"));
    assert_eq!(term["label"], json!("s"));
}

#[test]
fn linking_to_a_dead_process_fails_with_noproc_or_traps_it() {
    let (_node, sb) = setup();
    spawn(&sb, "dead", json!(null));
    spawn(&sb, "a", json!(null));
    spawn(&sb, "t", json!({"trap": true}));
    call(&sb, "a", json!({"op": "save", "target": "dead"}));
    call(&sb, "t", json!({"op": "save", "target": "dead"}));
    run(sb.cast("dead", json!({"op": "exit", "reason": "normal"}))).unwrap();
    wait_gone(&sb, "dead");
    let r = call(&sb, "a", json!({"op": "link_saved", "target": "dead"}));
    assert_eq!(r["ok"], json!(false), "{r}");
    assert!(r["err"].as_str().unwrap().contains("noproc"), "{r}");
    let r = call(&sb, "t", json!({"op": "link_saved", "target": "dead"}));
    assert_eq!(r["ok"], json!(true), "{r}");
    let msgs = wait_inbox(&sb, "t", 1);
    assert_eq!(msgs[0]["tag"], "EXIT");
    assert_eq!(msgs[0]["reason"], "noproc");
}

#[test]
fn unlink_stops_exit_propagation() {
    let (_node, sb) = setup();
    let b = spawn(&sb, "b", json!(null));
    let a = spawn(&sb, "a", json!(null));
    call(&sb, "a", json!({"op": "link", "target": "b"}));
    let links = |name: &str| {
        run(sb.processes())
            .unwrap()
            .into_iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap()
            .links
    };
    assert_eq!(links("a"), vec![b.clone()]);
    assert_eq!(links("b"), vec![a.clone()]);
    assert_eq!(
        call(&sb, "a", json!({"op": "unlink", "target": "b"})),
        json!(true)
    );
    assert!(
        links("a").is_empty() && links("b").is_empty(),
        "unlink removes both directions"
    );
    run(sb.cast("b", json!({"op": "crash", "msg": "boom"}))).unwrap();
    wait_gone(&sb, "b");
    assert_eq!(call(&sb, "a", json!({"op": "ping"})), json!("pong"));
    assert!(inbox(&sb, "a").is_empty());
}

// ---------------------------------------------------------------------------
// monitors

#[test]
fn a_monitor_gets_down_with_the_reason() {
    let (_node, sb) = setup();
    spawn(&sb, "w", json!(null));
    let b = spawn(&sb, "b", json!(null));
    let r1 = call(&sb, "w", json!({"op": "monitor", "target": "b"}));
    let r2 = call(&sb, "w", json!({"op": "monitor", "target": "b"}));
    assert!(
        r1.is_number() && r2.is_number() && r1 != r2,
        "refs {r1} {r2}"
    );
    run(sb.cast("b", json!({"op": "crash", "msg": "boom"}))).unwrap();
    let msgs = wait_inbox(&sb, "w", 2);
    let refs: Vec<&Json> = msgs.iter().map(|m| &m["ref"]).collect();
    assert!(
        refs.contains(&&r1) && refs.contains(&&r2),
        "one DOWN per monitor: {msgs:?}"
    );
    for m in &msgs {
        assert_eq!(m["tag"], "DOWN");
        assert_eq!(m["pid"], json!(b));
        let reason = &m["reason"];
        assert!(
            reason["error"].as_str().unwrap().contains("boom"),
            "{reason}"
        );
        assert!(reason["traceback"].is_string(), "{reason}");
    }
    assert_eq!(
        call(&sb, "w", json!({"op": "ping"})),
        json!("pong"),
        "the watcher is not linked"
    );
}

#[test]
fn monitoring_a_dead_pid_gives_down_noproc() {
    let (_node, sb) = setup();
    spawn(&sb, "w", json!(null));
    let gone = spawn(&sb, "gone", json!(null));
    call(&sb, "w", json!({"op": "save", "target": "gone"}));
    run(sb.cast("gone", json!({"op": "exit", "reason": "normal"}))).unwrap();
    wait_gone(&sb, "gone");
    let r = call(&sb, "w", json!({"op": "monitor_saved", "target": "gone"}));
    let msgs = wait_inbox(&sb, "w", 1);
    assert_eq!(
        msgs,
        vec![json!({"tag": "DOWN", "ref": r, "pid": gone, "reason": "noproc"})]
    );
}

#[test]
fn demonitor_stops_down_messages() {
    let (_node, sb) = setup();
    spawn(&sb, "w", json!(null));
    spawn(&sb, "b", json!(null));
    let r = call(&sb, "w", json!({"op": "monitor", "target": "b"}));
    assert_eq!(
        call(&sb, "w", json!({"op": "demonitor", "ref": r})),
        json!(true)
    );
    assert_eq!(
        call(&sb, "w", json!({"op": "demonitor", "ref": r})),
        json!(false),
        "a second demonitor finds nothing"
    );
    run(sb.cast("b", json!({"op": "crash", "msg": "boom"}))).unwrap();
    wait_gone(&sb, "b");
    assert_eq!(
        inbox_after_marker(&sb, "w"),
        vec![json!("marker")],
        "no DOWN after demonitor"
    );
}

// ---------------------------------------------------------------------------
// calls

#[test]
fn a_guest_call_times_out_with_an_error_and_the_late_reply_is_dropped() {
    let (_node, sb) = setup();
    spawn(&sb, "a", json!(null));
    spawn(&sb, "slow", json!(null));
    let t = Instant::now();
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "slow", "req": {"op": "spin", "ms": 300}, "timeout": 50}),
    );
    let took = t.elapsed();
    assert_eq!(r["ok"], json!(false), "{r}");
    let err = r["err"].as_str().unwrap();
    assert!(err.contains("timeout") && err.contains("50 ms"), "{err}");
    assert!(
        took < Duration::from_millis(250),
        "the caller gave up after 50 ms, not {took:?}"
    );
    assert!(took >= Duration::from_millis(45), "{took:?}");
    // once slow is done, a new call gets its own reply, not the stale "spun"
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "slow", "req": {"op": "ping"}, "timeout": 2000}),
    );
    assert_eq!(r, json!({"ok": true, "reply": "pong"}));
    assert!(
        inbox(&sb, "a").is_empty(),
        "the late reply does not leak into the mailbox"
    );
}

#[test]
fn a_host_call_times_out_with_call_timeout() {
    let (_node, sb) = setup();
    spawn(&sb, "slow", json!(null));
    let t = Instant::now();
    let err = run(sb.call("slow", json!({"op": "spin", "ms": 300}), Some(50))).unwrap_err();
    let took = t.elapsed();
    match &err {
        Error::CallTimeout { target, timeout_ms } => {
            assert_eq!(target, "slow");
            assert_eq!(*timeout_ms, 50);
        }
        other => panic!("expected CallTimeout, got {other:?}"),
    }
    assert_eq!(err.kind(), "timeout");
    assert!(took < Duration::from_millis(250), "{took:?}");
    // the process lives on and answers later calls
    assert_eq!(
        run(sb.call("slow", json!({"op": "ping"}), Some(2000))).unwrap(),
        json!("pong")
    );
}

#[test]
fn nested_calls_wait_while_the_sandbox_serves_other_processes() {
    let (_node, sb) = setup();
    for n in ["a", "b", "c", "d"] {
        spawn(&sb, n, json!(null));
    }
    let req = json!({"op": "relay", "to": "b", "req": {"op": "relay", "to": "c", "req": {"op": "spin", "ms": 300}}});
    let sb2 = sb.clone();
    let caller = std::thread::spawn(move || {
        let t = Instant::now();
        let r = run(sb2.call("a", req, Some(3000)));
        (r, t.elapsed())
    });
    wait_until("a and b to wait on their calls", || {
        let ps = run(sb.processes()).unwrap();
        let status = |n: &str| {
            ps.iter()
                .find(|p| p.name.as_deref() == Some(n))
                .map(|p| p.status.clone())
        };
        (status("a").as_deref() == Some("waiting") && status("b").as_deref() == Some("waiting"))
            .then_some(())
    });
    let t = Instant::now();
    assert_eq!(call(&sb, "d", json!({"op": "ping"})), json!("pong"));
    let d_took = t.elapsed();
    assert!(
        !caller.is_finished(),
        "d answered while a's call was still pending"
    );
    assert!(
        d_took < Duration::from_millis(150),
        "d answered in {d_took:?}"
    );
    let (r, took) = caller.join().unwrap();
    assert_eq!(
        r.unwrap(),
        json!({"via": "a", "reply": {"via": "b", "reply": "spun"}})
    );
    assert!(took >= Duration::from_millis(290), "{took:?}");
}

#[test]
fn a_call_to_a_crashing_handler_returns_the_crash_reason() {
    let (_node, sb) = setup();
    let p = spawn(&sb, "p", json!(null));
    let err = run(sb.call("p", json!({"op": "crash", "msg": "kaput"}), Some(2000))).unwrap_err();
    match &err {
        Error::Crashed {
            reason: ExitReason::Error { message, .. },
            ..
        } => assert!(message.contains("kaput"), "{message}"),
        other => panic!("expected Crashed with an error reason, got {other:?}"),
    }
    assert_eq!(err.kind(), "crashed");
    assert!(
        err.to_string().contains(p.as_str()),
        "the error names the process: {err}"
    );
    wait_gone(&sb, "p");

    // a guest caller gets an error carrying the reason, and is not linked to the callee
    spawn(&sb, "a", json!(null));
    spawn(&sb, "q", json!(null));
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "q", "req": {"op": "crash", "msg": "kaput2"}, "timeout": 2000}),
    );
    assert_eq!(r["ok"], json!(false));
    assert!(r["err"].as_str().unwrap().contains("kaput2"), "{r}");
    assert_eq!(call(&sb, "a", json!({"op": "ping"})), json!("pong"));
    wait_gone(&sb, "q");
}

#[test]
fn calls_to_missing_processes_or_self_raise_and_sends_report_noproc() {
    let (_node, sb) = setup();
    spawn(&sb, "a", json!(null));
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "nobody", "req": "x"}),
    );
    assert_eq!(r["ok"], json!(false));
    assert!(
        r["err"].as_str().unwrap().contains("no process nobody"),
        "{r}"
    );
    let r = call(&sb, "a", json!({"op": "call", "target": "a", "req": "x"}));
    assert_eq!(r["ok"], json!(false));
    assert!(
        r["err"].as_str().unwrap().contains("cannot call itself"),
        "{r}"
    );
    let r = run(sb.eval(
        r#"
        local ok1, e1 = graft.send("nobody", 1)
        local ok2, e2 = graft.cast("nobody", 1)
        local ok3 = graft.send("a", "hello")
        return { ok1 = ok1 == nil, e1 = e1, ok2 = ok2 == nil, e2 = e2, ok3 = ok3 }
        "#,
    ))
    .unwrap();
    assert_eq!(
        r,
        json!({"ok1": true, "e1": "noproc: no process nobody", "ok2": true, "e2": "noproc: no process nobody", "ok3": true})
    );
    assert_eq!(wait_inbox(&sb, "a", 1), vec![json!("hello")]);
    assert!(matches!(
        run(sb.call("nobody", json!(1), None)),
        Err(Error::NoProcess(_))
    ));
    assert!(matches!(
        run(sb.send("nobody", json!(1))),
        Err(Error::NoProcess(_))
    ));
}

// ---------------------------------------------------------------------------
// copying

#[test]
fn sent_messages_are_copies() {
    let (_node, sb) = setup();
    spawn(&sb, "s", json!(null));
    spawn(&sb, "r", json!(null));
    let out = call(&sb, "s", json!({"op": "send_then_mutate", "target": "r"}));
    assert_eq!(out["sent"], json!(true));
    assert_eq!(out["cast"], json!(true));
    assert_eq!(
        out["mine"],
        json!({"v": 2, "nested": {"x": 99}, "list": ["a", "b"]}),
        "the sender's table changed"
    );
    let original = json!({"v": 1, "nested": {"x": 1}, "list": ["a"]});
    assert_eq!(
        wait_inbox(&sb, "r", 1),
        vec![original.clone()],
        "send delivered the value at send time"
    );
    assert_eq!(
        as_list(call(&sb, "r", json!({"op": "casts"}))),
        vec![original],
        "cast too"
    );

    // a call request is copied as well
    let mine = call(&sb, "s", json!({"op": "call_then_mutate", "target": "r"}));
    assert_eq!(mine, json!({"v": 2, "nested": {"x": 99}}));
    assert_eq!(
        run(sb.state("r")).unwrap()["stored"],
        json!({"v": 1, "nested": {"x": 1}})
    );
}

#[test]
fn replies_are_copies() {
    let (_node, sb) = setup();
    spawn(&sb, "caller", json!(null));
    spawn(&sb, "owner", json!(null));
    let out = call(
        &sb,
        "caller",
        json!({"op": "mutate_reply", "target": "owner"}),
    );
    assert_eq!(out["mutated"], json!({"x": 99, "list": [1, 2, 3, 4]}));
    assert_eq!(
        out["again"],
        json!({"x": 1, "list": [1, 2, 3]}),
        "the callee's state is untouched"
    );
    assert_eq!(
        run(sb.state("owner")).unwrap()["data"],
        json!({"x": 1, "list": [1, 2, 3]})
    );
}

#[test]
fn non_plain_messages_are_refused_with_a_clear_error() {
    let (_node, sb) = setup();
    spawn(&sb, "r", json!(null));
    let r = run(sb.eval(
        r#"
        local f = function() end
        local out = {}
        local ok, e = pcall(graft.send, "r", { f = f })
        out.send = { ok = ok, e = tostring(e) }
        ok, e = pcall(graft.cast, "r", { deep = { deeper = { f } } })
        out.cast = { ok = ok, e = tostring(e) }
        ok, e = pcall(graft.call, "r", { op = "store", value = f })
        out.call = { ok = ok, e = tostring(e) }
        ok, e = pcall(graft.spawn, "probe", { label = f })
        out.spawn = { ok = ok, e = tostring(e) }
        ok, e = pcall(graft.send, "r", setmetatable({}, {}))
        out.meta = { ok = ok, e = tostring(e) }
        return out
        "#,
    ))
    .unwrap();
    for (what, needle) in [
        ("send", "function is not plain data"),
        ("cast", "function is not plain data"),
        ("call", "function is not plain data"),
        ("spawn", "function is not plain data"),
        ("meta", "metatable is not plain data"),
    ] {
        assert_eq!(r[what]["ok"], json!(false), "{what}: {r}");
        let e = r[what]["e"].as_str().unwrap();
        let api = if what == "meta" { "send" } else { what };
        assert!(
            e.contains(needle) && e.contains(&format!("graft.{api}")),
            "{what}: {e}"
        );
    }
    assert_eq!(
        inbox_after_marker(&sb, "r"),
        vec![json!("marker")],
        "nothing was delivered"
    );
    assert_eq!(
        as_list(call(&sb, "r", json!({"op": "casts"}))),
        Vec::<Json>::new()
    );
    assert!(run(sb.state("r")).unwrap().get("stored").is_none());

    // a reply holding a function is refused too (host and guest callers)
    let err = run(sb.call("r", json!({"op": "reply_fn"}), Some(2000))).unwrap_err();
    assert!(
        err.to_string().contains("function is not plain data"),
        "{err}"
    );
    spawn(&sb, "c", json!(null));
    spawn(&sb, "r2", json!(null));
    let r = call(
        &sb,
        "c",
        json!({"op": "call", "target": "r2", "req": {"op": "reply_fn"}}),
    );
    assert_eq!(r["ok"], json!(false));
    assert!(
        r["err"]
            .as_str()
            .unwrap()
            .contains("function is not plain data"),
        "{r}"
    );
}

// ---------------------------------------------------------------------------
// timers, names, errors, eval

#[test]
fn send_after_delivers_and_cancel_timer_prevents_delivery() {
    let (_node, sb) = setup();
    spawn(&sb, "a", json!(null));
    spawn(&sb, "named", json!(null));
    let t = Instant::now();
    let id = call(
        &sb,
        "a",
        json!({"op": "send_after", "ms": 60, "msg": "tick"}),
    );
    assert!(id.is_number(), "{id}");
    call(
        &sb,
        "a",
        json!({"op": "send_after", "ms": 30, "target": "named", "msg": {"to": "named"}}),
    );
    let cancelled = call(
        &sb,
        "a",
        json!({"op": "send_after", "ms": 40, "msg": "cancelled"}),
    );
    assert_eq!(
        call(&sb, "a", json!({"op": "cancel_timer", "id": cancelled})),
        json!(true)
    );
    assert_eq!(
        call(&sb, "a", json!({"op": "cancel_timer", "id": cancelled})),
        json!(false),
        "already cancelled"
    );
    assert!(
        inbox(&sb, "a").is_empty(),
        "nothing arrives before its time"
    );
    let msgs = wait_inbox(&sb, "a", 1);
    let took = t.elapsed();
    assert_eq!(msgs, vec![json!("tick")], "only the live timer fired");
    assert!(
        took >= Duration::from_millis(59),
        "delivered after {took:?}"
    );
    assert!(
        took < Duration::from_millis(500),
        "delivered after {took:?}"
    );
    assert_eq!(
        wait_inbox(&sb, "named", 1),
        vec![json!({"to": "named"})],
        "timers resolve names"
    );
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(inbox(&sb, "a"), vec![json!("tick")]);
}

#[test]
fn register_whereis_and_unregister() {
    let (_node, sb) = setup();
    let p = spawn(&sb, "p", json!(null));
    let q_pid = spawn(&sb, "q", json!(null));
    assert_eq!(
        call(&sb, "p", json!({"op": "register", "name": "alpha"}))["ok"],
        json!(false),
        "p has a name already"
    );
    assert_eq!(
        run(sb.eval(r#"return graft.whereis("p")"#)).unwrap(),
        json!(p)
    );
    assert_eq!(
        run(sb.eval(r#"return graft.whereis("alpha")"#)).unwrap(),
        Json::Null
    );

    let r = call(&sb, "q", json!({"op": "unregister", "name": "q"}));
    assert_eq!(r, json!(true));
    assert_eq!(
        call(&sb, "p", json!({"op": "unregister", "name": "nope"})),
        json!(false)
    );
    assert_eq!(
        call(&sb, &q_pid, json!({"op": "register", "name": "alpha"})),
        json!({"ok": true, "reply": true})
    );
    assert_eq!(
        call(&sb, "alpha", json!({"op": "whereis", "name": "alpha"})),
        json!({"found": true, "is_me": true})
    );
    assert_eq!(
        run(sb.eval(r#"return graft.whereis("alpha")"#)).unwrap(),
        json!(q_pid)
    );

    // a taken name is refused
    let r = call(&sb, "p", json!({"op": "unregister", "name": "p"}));
    assert_eq!(r, json!(true));
    let r = call(&sb, &p, json!({"op": "register", "name": "alpha"}));
    assert_eq!(r["ok"], json!(false));
    assert!(
        r["err"].as_str().unwrap().contains("registered already"),
        "{r}"
    );

    // a dead process's name is free again
    run(sb.cast("alpha", json!({"op": "exit", "reason": "normal"}))).unwrap();
    wait_until("alpha to be unregistered", || {
        (run(sb.eval(r#"return graft.whereis("alpha")"#)).unwrap() == Json::Null).then_some(())
    });
    assert!(matches!(
        run(sb.call("alpha", json!({"op": "ping"}), None)),
        Err(Error::NoProcess(_))
    ));
    assert_eq!(
        call(&sb, &p, json!({"op": "register", "name": "alpha"})),
        json!({"ok": true, "reply": true})
    );
    assert_eq!(call(&sb, "alpha", json!({"op": "ping"})), json!("pong"));
    // spawning under a taken name fails
    assert!(run(sb.spawn("probe", json!({}), Some("alpha"))).is_err());
}

#[test]
fn a_handle_call_error_carries_the_message_and_a_traceback_with_the_line() {
    let (_node, sb) = setup();
    spawn(&sb, "w", json!(null));
    run(sb.spawn("faulty", json!(null), Some("faulty"))).expect("faulty starts");
    assert_eq!(
        run(sb.call("faulty", json!("good"), None)).unwrap(),
        json!("fine")
    );
    call(&sb, "w", json!({"op": "monitor", "target": "faulty"}));
    let err = run(sb.call("faulty", json!("bad"), None)).unwrap_err();
    let Error::Crashed {
        reason: ExitReason::Error {
            message, traceback, ..
        },
        ..
    } = &err
    else {
        panic!("expected a crash with an error reason, got {err:?}");
    };
    assert!(
        message.contains("faulty.luau:5: bad request: bad"),
        "message: {message}"
    );
    assert!(
        traceback.contains("faulty.luau:5"),
        "traceback: {traceback}"
    );
    assert!(
        traceback.contains("faulty.luau:10"),
        "traceback shows the caller line: {traceback}"
    );
    assert!(
        !traceback.contains("graft.prelude"),
        "runtime frames are hidden: {traceback}"
    );
    // monitors see the same reason as a table { error, traceback }
    let msgs = wait_inbox(&sb, "w", 1);
    assert_eq!(msgs[0]["reason"]["error"], json!(message));
    assert_eq!(msgs[0]["reason"]["traceback"], json!(traceback));
    let crash = run(sb.events())
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "crash")
        .expect("crash event");
    assert!(
        crash.detail.to_string().contains("bad request"),
        "{:?}",
        crash.detail
    );
}

#[test]
fn eval_returns_results_and_reports_errors() {
    let (_node, sb) = setup();
    let p = spawn(&sb, "p", json!(null));
    assert_eq!(run(sb.eval("return 40 + 2")).unwrap(), json!(42));
    assert_eq!(
        run(sb.eval(r#"return { a = 1, list = { "x", "y" }, nested = { ok = true } }"#)).unwrap(),
        json!({"a": 1, "list": ["x", "y"], "nested": {"ok": true}})
    );
    assert_eq!(run(sb.eval("return nil")).unwrap(), Json::Null);
    assert_eq!(
        run(sb.eval(r#"return graft.whereis("p")"#)).unwrap(),
        json!(p)
    );
    assert_eq!(
        run(sb.eval(r#"return graft.call("p", { op = "ping" })"#)).unwrap(),
        json!("pong"),
        "eval can call processes"
    );

    let err = run(sb.eval(r#"error("nope")"#)).unwrap_err();
    assert!(
        matches!(err, Error::Luau(_)) && err.to_string().contains("nope"),
        "{err:?}"
    );
    let err = run(sb.eval("return function() end")).unwrap_err();
    assert!(err.to_string().contains("not plain data"), "{err}");
    let err = run(sb.eval("return 1 +")).unwrap_err();
    assert!(matches!(err, Error::Compile { .. }), "{err:?}");
    // eval processes do not linger
    wait_until("eval processes to exit", || {
        (run(sb.processes()).unwrap().len() == 1).then_some(())
    });
}

// ---------------------------------------------------------------------------
// robustness under preemption and idle timers

const ECHO: &str =
    "return { init = function() return 0 end, handle_call = function(r, f, s) return r, s end }";

/// `n` back-to-back guest calls (or spawns): each must get its own answer,
/// even when the caller's time slice ends between sending and waiting.
const LOOPER: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(req, from, state)
    for i = 1, req.n do
      if req.op == "call" then
        local ok, r = pcall(graft.call, "echo", i, 300)
        if not ok or r ~= i then return { lost_at = i, err = tostring(r) }, state end
      else
        local p = graft.spawn("echo", nil)
        graft.exit(p, "kill")
      end
    end
    return req.n, state
  end,
}
"#;

fn looper_sandbox(node: &Node) -> Sandbox {
    let spec = SandboxSpec::new("loops")
        .entry(None)
        .module("looper", LOOPER)
        .module("echo", ECHO);
    let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    run(sb.spawn("looper", json!(null), Some("looper"))).unwrap();
    run(sb.spawn("echo", json!(null), Some("echo"))).unwrap();
    sb
}

#[test]
fn back_to_back_calls_never_lose_a_reply() {
    let node = Node::with_threads(2);
    let sb = looper_sandbox(&node);
    for _ in 0..2 {
        let r = run(sb.call("looper", json!({"op": "call", "n": 5000}), Some(4000)));
        assert_eq!(r.unwrap(), json!(5000), "every call got its reply");
    }
}

#[test]
fn back_to_back_spawns_never_hang() {
    let node = Node::with_threads(2);
    let sb = looper_sandbox(&node);
    for _ in 0..2 {
        let r = run(sb.call("looper", json!({"op": "spawn", "n": 1500}), Some(4000)));
        assert_eq!(r.unwrap(), json!(1500), "every spawn returned");
    }
}

#[test]
fn timers_wake_an_idle_sandbox() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let got = Arc::new(AtomicUsize::new(0));
    let counter = got.clone();
    let host = graft::HostFunctions::default().function("rec.got", move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(Json::Null)
    });
    let ticker = r#"
return {
  init = function() return {} end,
  handle_call = function(n, from, state)
    for i = 1, n do graft.send_after(i % 20, graft.self(), i) end
    return n, state
  end,
  handle_info = function(msg, state) rec.got() return state end,
}"#;
    let node = Node::with_threads(2);
    let spec = SandboxSpec::new("ticks")
        .entry(None)
        .module("ticker", ticker);
    let sb = graft::block_on(node.create_sandbox_with(spec, host)).unwrap();
    run(sb.spawn("ticker", json!(null), Some("t"))).unwrap();
    for round in 0..5 {
        got.store(0, Ordering::SeqCst);
        run(sb.call("t", json!(300), None)).unwrap();
        // no request to the sandbox from here on: only its timers can wake it
        let t = Instant::now();
        while got.load(Ordering::SeqCst) < 300 && t.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let n = got.load(Ordering::SeqCst);
        assert_eq!(
            n,
            300,
            "round {round}: only {n} of 300 timers (due within 20 ms) fired after {:?}",
            t.elapsed()
        );
    }
}

// ---------------------------------------------------------------------------
// host-side targets: `graft::Target` reads text as the runtime always did

const COUNTING_ECHO: &str = r#"
return {
  init = function() return 0 end,
  handle_call = function(req, from, n)
    if req == "n" then return n, n end
    return req, n
  end,
  handle_cast = function(msg, n) return n + 1 end,
  handle_info = function(msg, n) return n + 10 end,
}
"#;

#[test]
fn every_target_form_the_api_read_still_reaches_the_process() {
    let node = Node::with_threads(1);
    let spec = SandboxSpec::new("targets")
        .entry(None)
        .module("echo", COUNTING_ECHO);
    let sb = run(node.create_sandbox(spec)).expect("sandbox");
    let pid = run(sb.spawn("echo", json!(null), Some("e"))).expect("spawn");
    assert_eq!(pid.module(), "echo");
    let text = pid.to_string();
    let serial = pid.serial().to_string();
    // Forms that are not a pid's text but that the runtime has always
    // resolved: a bare serial, a zero-padded serial, another module part.
    let padded = format!("<echo.0{}>", pid.serial());
    let other_module = format!("<other.{}>", pid.serial());
    let targets = [
        graft::Target::from(&pid),
        graft::Target::from(pid.clone()),
        graft::Target::from(text.as_str()),
        graft::Target::from("e"),
        graft::Target::from(serial.as_str()),
        graft::Target::from(padded.as_str()),
        graft::Target::from(other_module.as_str()),
    ];
    for (i, t) in targets.iter().enumerate() {
        assert_eq!(run(sb.call(t, json!("hi"), None)).unwrap(), "hi", "{t:?}");
        run(sb.cast(t, json!(1))).expect("cast");
        run(sb.send(t, json!(1))).expect("send");
        // A call after them is handled after them (one mailbox, in order).
        let n = json!(11 * (i + 1));
        assert_eq!(run(sb.call(t, json!("n"), None)).unwrap(), n, "{t:?}");
        assert_eq!(run(sb.state(t)).unwrap(), n, "{t:?}");
    }
    // The listing carries the same pid, and its JSON is the text it was.
    let listed = run(sb.processes()).expect("processes");
    assert_eq!(listed[0].pid, pid);
    assert_eq!(
        serde_json::to_value(&listed[0]).unwrap()["pid"],
        json!(text)
    );
}

#[test]
fn targets_that_address_nothing_are_refused_at_the_call_with_no_process() {
    let node = Node::with_threads(1);
    let spec = SandboxSpec::new("nobody")
        .entry(None)
        .module("echo", COUNTING_ECHO);
    let sb = run(node.create_sandbox(spec)).expect("sandbox");
    let pid = run(sb.spawn("echo", json!(null), None)).expect("spawn");
    let absent = format!("<echo.{}>", pid.serial() + 1);
    let huge = "x".repeat(1 << 20);
    for bad in [
        "",
        "nobody",
        "<echo.0>",
        absent.as_str(),
        "99",
        "+99",
        "<",
        "\u{1b}[2J",
        "nl\n",
        huge.as_str(),
    ] {
        let shown: String = bad.chars().take(20).collect();
        for err in [
            run(sb.call(bad, json!(1), Some(500))).unwrap_err(),
            run(sb.cast(bad, json!(1))).unwrap_err(),
            run(sb.send(bad, json!(1))).unwrap_err(),
            run(sb.state(bad)).unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::NoProcess(t) if t == bad),
                "{shown:?}: {err:.80}"
            );
        }
    }
    // A pid outlives its sandbox as a value; calls through it are refused.
    run(sb.call(&pid, json!(1), None)).expect("alive");
    node.destroy("nobody").expect("destroy");
    let err = run(sb.call(&pid, json!(1), None)).unwrap_err();
    assert_eq!(err.kind(), "no_sandbox", "{err}");
}
