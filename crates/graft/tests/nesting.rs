//! Nested callbacks: a `graft.call` to an idle process with an empty mailbox
//! runs the callee's `handle_call` right inside the caller's call (and
//! `graft.spawn` runs the child's `init` there too). These tests drive the
//! edge cases through the public API: replies and state updates, chains
//! deeper than the nesting limit, callees that are preempted, time out,
//! crash, run out of memory or exit, spawns whose `init` fails or nests
//! further, copy semantics and messages a nested callee sends itself.
//!
//! Every request goes through `run`, which gives up after a few seconds, so a
//! runtime that hangs fails a test instead of blocking the whole run.

mod common;
use common::{limits, run, wait_until};
use std::time::{Duration, Instant};

use graft::{Error, Event, ExitReason, Limits, Node, ProcessInfo, Sandbox, SandboxSpec};
use serde_json::{json, Value as Json};

// ---------------------------------------------------------------------------
// helpers

/// A server that does what its request says. Its state keeps a counter `n`,
/// a `log` of the callbacks it ran, an `inbox` of `handle_info` messages and
/// a `data` table to return (so a caller can try to mutate it).
const ACTOR: &str = r#"
local actor = {}

function actor.init(args)
  args = args or {}
  return {
    n = args.start or 0, label = args.label, next = args.next, report = args.report,
    log = {}, inbox = {}, data = { x = 1, list = { 1, 2, 3 } },
  }
end

local function protect(ok, ...)
  if ok then return { ok = true, reply = (...) } end
  return { ok = false, err = tostring((...)) }
end

local function spin(ms)
  local t = os.clock()
  while os.clock() - t < ms / 1000 do end
end

function actor.handle_call(req, from, state)
  local op = req.op
  if op == "ping" then
    return "pong", state
  elseif op == "self" then
    return graft.self(), state
  elseif op == "get" then
    return state, state
  elseif op == "inc" then
    state.n += 1
    table.insert(state.log, "inc")
    return { n = state.n, from = from, me = graft.self() }, state
  elseif op == "call" then
    return protect(pcall(graft.call, req.target, req.req, req.timeout)), state
  elseif op == "calls" then
    local out = {}
    for i, c in req.list do
      out[i] = protect(pcall(graft.call, c.target, c.req))
    end
    return out, state
  elseif op == "call_and_check" then
    -- Calls, then proves the caller still runs Luau code normally afterwards.
    local r = protect(pcall(graft.call, req.target, req.req))
    local t = {}
    for i = 1, 1000 do t[i] = i end
    r.after = #t
    r.me = graft.self()
    return r, state
  elseif op == "chain" then
    state.n += 1
    if state.next ~= nil then
      return graft.call(state.next, { op = "chain", v = req.v + 1, fail = req.fail, spawn = req.spawn }), state
    end
    if req.fail then error(req.fail) end
    if req.spawn then
      -- At this depth the spawn cannot nest: it is queued, then awaited.
      local kid = graft.spawn("actor", { start = 7 }, { name = req.spawn })
      return { v = req.v + 1, kid_n = graft.call(kid, { op = "inc" }).n }, state
    end
    return req.v + 1, state
  elseif op == "spin" then
    if req.unyieldable then
      -- Inside a C function (gsub's replacement callback): cannot yield.
      string.gsub("x", "x", function() spin(req.ms) end)
    else
      spin(req.ms)
    end
    state.n += 1
    return state.n, state
  elseif op == "spin_calls" then
    -- Calls `target` `count` times; each call spins `ms` in the callee.
    local got = {}
    for i = 1, req.count do
      got[i] = graft.call(req.target, { op = "spin", ms = req.ms, unyieldable = req.unyieldable })
    end
    return got, state
  elseif op == "loop" then
    while true do end
  elseif op == "loop_builtin" then
    -- Catastrophic backtracking inside Luau's C pattern matcher: cannot yield.
    return string.find(string.rep("a", 40), string.rep("a*", 40) .. "b"), state
  elseif op == "crash" then
    error(req.msg)
  elseif op == "self_send" then
    table.insert(state.log, "call")
    local ok = graft.send(graft.self(), req.msg)
    return ok, state
  elseif op == "log" then
    return state.log, state
  elseif op == "exit" then
    table.insert(state.log, "exit")
    graft.exit(req.reason)
  elseif op == "exit_caught" then
    local ok = pcall(graft.exit, req.reason)
    return { caught = not ok }, state
  elseif op == "mutate_req" then
    req.x = 99
    table.insert(req.list, "b")
    req.nested.y = "changed by callee"
    state.stored = req
    return state.data, state
  elseif op == "data" then
    return state.data, state
  elseif op == "copy_check" then
    local mine = { op = "mutate_req", x = 1, list = { "a" }, nested = { y = "orig" } }
    local r = graft.call(req.target, mine)
    r.x = "hacked"
    table.insert(r.list, 4)
    local again = graft.call(req.target, { op = "data" })
    return { mine = mine, reply = r, again = again }, state
  elseif op == "oom" then
    local t = {}
    local i = 0
    while true do
      i += 1
      t[i] = string.rep("x", 1000) .. i
    end
  elseif op == "alloc" then
    local n = req.kib
    local t = table.create(n)
    for i = 1, n do t[i] = string.rep("y", 1000) .. i end
    return #t, state
  elseif op == "spawn" then
    return protect(pcall(graft.spawn, req.module, req.args, req.opts)), state
  elseif op == "whereis" then
    return graft.whereis(req.name) ~= nil, state
  end
  error("unknown op " .. tostring(op))
end

function actor.handle_info(msg, state)
  table.insert(state.inbox, msg)
  table.insert(state.log, "info:" .. tostring(msg))
  return state
end

function actor.terminate(reason, state)
  if state.report ~= nil then
    graft.send(state.report, { tag = "TERMINATED", label = state.label, reason = reason })
  end
end

return actor
"#;

/// A module whose `init` fails in the way its args say.
const BAD_INIT: &str = r#"
local m = {}
function m.init(args)
  if args.mode == "error" then
    error("init exploded")
  elseif args.mode == "loop" then
    while true do end
  elseif args.mode == "call_missing" then
    graft.call("nobody_here", { op = "ping" })
  elseif args.mode == "no_state" then
    return nil
  end
  return {}
end
function m.handle_call(req, from, state) return "ok", state end
return m
"#;

/// A module whose `init` calls an existing process and spawns (and links)
/// a child of its own, then calls that child.
const PARENT: &str = r#"
local m = {}
function m.init(args)
  local v = graft.call(args.counter, { op = "inc" })
  local kid = graft.spawn_link("actor", { label = "grandchild", start = 100 + v.n }, { name = args.kid_name })
  local kid_reply = graft.call(kid, { op = "inc" })
  return { seen = v.n, kid = kid, kid_n = kid_reply.n, kid_from_is_me = kid_reply.from == graft.self() }
end
function m.handle_call(req, from, state) return state, state end
return m
"#;

fn sandbox_with(node: &Node, id: &str, l: Limits) -> Sandbox {
    let spec = SandboxSpec::new(id)
        .entry(None)
        .grant("clock")
        .module("actor", ACTOR)
        .module("bad_init", BAD_INIT)
        .module("parent", PARENT)
        .limits(l);
    graft::block_on(node.create_sandbox(spec)).expect("sandbox")
}

fn setup(id: &str) -> (Node, Sandbox) {
    let node = Node::with_threads(2);
    let sb = sandbox_with(&node, id, Limits::default());
    (node, sb)
}

fn spawn(sb: &Sandbox, name: &str, args: Json) -> graft::Pid {
    let mut args = if args.is_null() { json!({}) } else { args };
    args["label"] = json!(name);
    run(sb.spawn("actor", args, Some(name))).unwrap_or_else(|e| panic!("spawn {name}: {e}"))
}

fn call(sb: &Sandbox, target: impl Into<graft::Target>, req: Json) -> Json {
    let target = target.into();
    run(sb.call(&target, req.clone(), Some(4000)))
        .unwrap_or_else(|e| panic!("call {target} {req}: {e}"))
}

fn procs(sb: &Sandbox) -> Vec<ProcessInfo> {
    run(sb.processes()).unwrap()
}

fn info_of(sb: &Sandbox, name: &str) -> Option<ProcessInfo> {
    procs(sb)
        .into_iter()
        .find(|p| p.name.as_deref() == Some(name))
}

fn alive(sb: &Sandbox, name: &str) -> bool {
    info_of(sb, name).is_some()
}

fn wait_gone(sb: &Sandbox, name: &str) {
    wait_until(&format!("{name} to exit"), || {
        (!alive(sb, name)).then_some(())
    });
}

fn crash_events(sb: &Sandbox) -> Vec<Event> {
    run(sb.events())
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "crash")
        .collect()
}

fn as_list(v: Json) -> Vec<Json> {
    match v {
        Json::Array(a) => a,
        Json::Object(m) if m.is_empty() => Vec::new(),
        other => panic!("expected a list, got {other}"),
    }
}

fn err_text(r: &Json) -> String {
    assert_eq!(r["ok"], json!(false), "expected a caught error, got {r}");
    r["err"].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------
// 1. a nested call that replies

#[test]
fn a_nested_call_replies_and_updates_the_callee_state() {
    let (_node, sb) = setup("n-reply");
    let a = spawn(&sb, "a", json!(null));
    let b = spawn(&sb, "b", json!({"start": 10}));
    for i in 1..=3 {
        let r = call(
            &sb,
            "a",
            json!({"op": "call", "target": "b", "req": {"op": "inc"}}),
        );
        assert_eq!(r["ok"], json!(true), "{r}");
        assert_eq!(r["reply"]["n"], json!(10 + i), "{r}");
        assert_eq!(r["reply"]["from"], json!(a), "from is the caller's pid");
        assert_eq!(r["reply"]["me"], json!(b), "graft.self() in the callee");
    }
    // The state change of the nested callback is really stored.
    let r = call(&sb, "b", json!({"op": "inc"}));
    assert_eq!(r["n"], json!(14));
    assert_eq!(r["from"], Json::Null, "the host has no pid");
    let state = run(sb.state("b")).unwrap();
    assert_eq!(state["n"], json!(14));
    assert_eq!(state["log"], json!(["inc", "inc", "inc", "inc"]));
    // Both are idle again, nothing left queued.
    for n in ["a", "b"] {
        let p = info_of(&sb, n).unwrap();
        assert_eq!(p.status, "idle", "{p:?}");
        assert_eq!(p.mailbox_len, 0, "{p:?}");
    }
    assert_eq!(
        info_of(&sb, "b").unwrap().messages_handled,
        5,
        "init + 4 calls"
    );
    // The caller keeps working too.
    let r = call(
        &sb,
        "a",
        json!({"op": "call_and_check", "target": "b", "req": {"op": "ping"}}),
    );
    assert_eq!(
        r,
        json!({"ok": true, "reply": "pong", "after": 1000, "me": a})
    );
}

// ---------------------------------------------------------------------------
// 2. chains deeper than the nesting limit

fn chain(sb: &Sandbox, prefix: &str, len: usize) {
    // Spawned from the last link backwards so each `next` exists.
    for i in (1..=len).rev() {
        let next = if i < len {
            json!(format!("{prefix}{}", i + 1))
        } else {
            Json::Null
        };
        spawn(sb, &format!("{prefix}{i}"), json!({"next": next}));
    }
}

#[test]
fn a_chain_of_nested_calls_deeper_than_the_nesting_limit_completes() {
    let (_node, sb) = setup("n-chain");
    chain(&sb, "c", 12);
    chain(&sb, "d", 30);
    for round in 1..=3 {
        assert_eq!(
            call(&sb, "c1", json!({"op": "chain", "v": 0})),
            json!(12),
            "round {round}: each of 12 links adds 1"
        );
        assert_eq!(
            call(&sb, "d1", json!({"op": "chain", "v": 1000})),
            json!(1030),
            "round {round}: each of 30 links adds 1"
        );
    }
    // Every link ran exactly once per round and is idle again.
    for (prefix, len) in [("c", 12), ("d", 30)] {
        for i in 1..=len {
            let name = format!("{prefix}{i}");
            assert_eq!(run(sb.state(&name)).unwrap()["n"], json!(3), "{name}");
            let p = info_of(&sb, &name).unwrap();
            assert_eq!((p.status.as_str(), p.mailbox_len), ("idle", 0), "{p:?}");
        }
    }
    // The last link (past the nesting limit) spawns and calls a child.
    assert_eq!(
        call(&sb, "c1", json!({"op": "chain", "v": 0, "spawn": "kid"})),
        json!({"v": 12, "kid_n": 8})
    );
    assert_eq!(call(&sb, "kid", json!({"op": "inc"}))["n"], json!(9));
    // A chain started by a guest caller works the same.
    spawn(&sb, "top", json!(null));
    let r = call(
        &sb,
        "top",
        json!({"op": "call", "target": "d1", "req": {"op": "chain", "v": 0}}),
    );
    assert_eq!(r, json!({"ok": true, "reply": 30}));
    assert_eq!(run(sb.info()).unwrap().process_count, 44);
}

#[test]
fn a_crash_at_the_bottom_of_a_deep_chain_fails_every_link_up_to_the_host() {
    let (_node, sb) = setup("n-chain-crash");
    chain(&sb, "e", 12);
    spawn(&sb, "top", json!(null));
    // The last link raises; every link above re-raises (no pcall) and
    // crashes in turn.
    let r = call(
        &sb,
        "top",
        json!({"op": "call", "target": "e1", "req": {"op": "chain", "v": 0, "fail": "bottom fell out"}}),
    );
    let err = err_text(&r);
    assert!(err.contains("exited before replying"), "{err}");
    assert!(
        err.contains("bottom fell out"),
        "the root cause is kept: {err}"
    );
    for i in 1..=12 {
        wait_gone(&sb, &format!("e{i}"));
    }
    assert_eq!(crash_events(&sb).len(), 12);
    assert_eq!(call(&sb, "top", json!({"op": "ping"})), json!("pong"));
}

// ---------------------------------------------------------------------------
// 3. a callee that runs past the time slice

#[test]
fn a_nested_callee_that_spins_past_the_time_slice_still_replies() {
    let (_node, sb) = setup("n-spin");
    spawn(&sb, "a", json!(null));
    spawn(&sb, "b", json!(null));
    spawn(&sb, "d", json!(null));
    // 30 ms: six time slices. The kernel takes the callee over; the caller
    // gets its reply as for a normal call.
    for i in 1..=3 {
        let r = call(
            &sb,
            "a",
            json!({"op": "call", "target": "b", "req": {"op": "spin", "ms": 30}}),
        );
        assert_eq!(r, json!({"ok": true, "reply": i}));
    }
    assert_eq!(call(&sb, "b", json!({"op": "inc"}))["n"], json!(4));

    // While the callee spins, a host call to another process is answered.
    let sb2 = sb.clone();
    let caller = std::thread::spawn(move || {
        run(sb2.call(
            "a",
            json!({"op": "call", "target": "b", "req": {"op": "spin", "ms": 400}}),
            Some(4000),
        ))
    });
    wait_until("a to wait on b while b spins", || {
        let a = info_of(&sb, "a")?;
        let b = info_of(&sb, "b")?;
        (a.status == "waiting" && b.status != "idle").then_some(())
    });
    let t = Instant::now();
    assert_eq!(call(&sb, "d", json!({"op": "ping"})), json!("pong"));
    let d_took = t.elapsed();
    assert!(
        !caller.is_finished(),
        "d answered only after b's 400 ms spin ended ({d_took:?})"
    );
    let r = caller.join().unwrap().unwrap();
    assert_eq!(r, json!({"ok": true, "reply": 5}));
    assert_eq!(run(sb.state("b")).unwrap()["n"], json!(5));
    assert!(crash_events(&sb).is_empty(), "{:?}", crash_events(&sb));
}

/// Makes `count` calls from `a` to `b`, each spinning `ms` in `b`, and
/// expects every reply: the caller itself does almost nothing.
fn many_spinning_calls(handler_ms: u64, count: usize, ms: u64, unyieldable: bool) {
    let node = Node::with_threads(2);
    let sb = sandbox_with(&node, "n-charge", limits(|l| l.handler_ms = handler_ms));
    spawn(&sb, "a", json!(null));
    spawn(&sb, "b", json!(null));
    let r = run(sb.call(
        "a",
        json!({"op": "spin_calls", "target": "b", "count": count, "ms": ms, "unyieldable": unyieldable}),
        Some(4000),
    ));
    let expected: Vec<Json> = (1..=count).map(|i| json!(i)).collect();
    assert_eq!(
        r.unwrap(),
        json!(expected),
        "time spent waiting in graft.call does not count against the caller's handler_ms"
    );
    assert!(crash_events(&sb).is_empty(), "{:?}", crash_events(&sb));
    assert_eq!(run(sb.state("b")).unwrap()["n"], json!(count));
}

#[test]
fn a_few_preempted_nested_callees_do_not_time_out_their_caller() {
    // 10 calls of 20 ms (200 ms of callee time), handler_ms 150.
    many_spinning_calls(150, 10, 20, false);
}

#[test]
fn many_preempted_nested_callees_do_not_time_out_their_caller() {
    // 60 calls of 6 ms (360 ms of callee time), handler_ms 100. Each callee
    // runs nested until the time slice ends (up to 5 ms), then the kernel
    // takes it over; the caller itself runs well under 1 ms per call.
    many_spinning_calls(100, 60, 6, false);
}

#[test]
fn nested_callees_that_cannot_yield_do_not_time_out_their_caller() {
    // 4 calls of 150 ms each inside a C callback (cannot be preempted, so the
    // callee finishes nested), handler_ms 400: each callee stays under its
    // own handler_ms and the caller spends nearly nothing itself, though the
    // calls together take 600 ms. The 250 ms of slack per callee is for
    // loaded machines, where a callee's charged time (wall time on the
    // node's coarse clock) runs well past its 150 ms of spinning.
    many_spinning_calls(400, 4, 150, true);
}

// ---------------------------------------------------------------------------
// 4. a callee that runs past handler_ms

/// `a` calls a fresh callee that runs `op` past handler_ms (200 ms); the
/// callee crashes with `timeout`, `a` catches the error and lives on.
fn callee_timeout_spares_the_caller(id: &str, op: &str) {
    let node = Node::with_threads(2);
    let sb = sandbox_with(&node, id, limits(|l| l.handler_ms = 200));
    let a = spawn(&sb, "a", json!(null));
    for round in 0..2 {
        let name = format!("b{round}");
        let b = spawn(&sb, &name, json!(null));
        let t = Instant::now();
        let r = call(
            &sb,
            "a",
            json!({"op": "call_and_check", "target": name, "req": {"op": op}}),
        );
        let took = t.elapsed();
        let err = err_text(&r);
        assert!(
            err.contains("exited before replying") && err.contains("timeout"),
            "{op}: {err}"
        );
        assert!(
            err.contains(b.as_str()),
            "{op}: the error names the callee: {err}"
        );
        assert_eq!(r["after"], json!(1000), "{op}: the caller ran on: {r}");
        assert_eq!(r["me"], json!(a), "{op}");
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_millis(2000),
            "{op}: took {took:?} (handler_ms 200)"
        );
        wait_gone(&sb, &name);
        let crashes = crash_events(&sb);
        assert_eq!(crashes.len(), round + 1, "{op}: {crashes:?}");
        assert_eq!(crashes[round].detail["process"], json!(b), "{op}");
        assert_eq!(
            crashes[round].detail["reason"]["kind"],
            json!("timeout"),
            "{op}"
        );
        // The caller is alive and works.
        assert_eq!(call(&sb, "a", json!({"op": "ping"})), json!("pong"), "{op}");
        assert_eq!(call(&sb, "a", json!({"op": "inc"}))["n"], json!(round + 1));
    }
    // The caller spent well over handler_ms waiting, yet never timed out.
    assert!(alive(&sb, "a"));
    assert_eq!(run(sb.info()).unwrap().process_count, 1);
}

#[test]
fn a_nested_callee_that_loops_times_out_alone() {
    // A plain loop is preempted at the end of the time slice: the kernel
    // takes the callee over and times it out later.
    callee_timeout_spares_the_caller("n-timeout", "loop");
}

#[test]
fn a_nested_callee_stuck_in_a_builtin_times_out_alone() {
    // Catastrophic backtracking inside string.find cannot yield, so the
    // callee reaches handler_ms while still nested in the caller's callback.
    callee_timeout_spares_the_caller("n-timeout-builtin", "loop_builtin");
}

// ---------------------------------------------------------------------------
// 5. a callee that raises

#[test]
fn a_nested_callee_error_reaches_the_caller_and_the_callee_is_gone() {
    let (_node, sb) = setup("n-crash");
    let a = spawn(&sb, "a", json!(null));
    spawn(&sb, "w", json!(null));
    let b = spawn(&sb, "b", json!({"report": "w"}));
    let r = call(
        &sb,
        "a",
        json!({"op": "call_and_check", "target": "b", "req": {"op": "crash", "msg": "boom"}}),
    );
    let err = err_text(&r);
    assert!(err.contains("boom"), "{err}");
    assert!(
        err.contains("exited before replying") && err.contains(b.as_str()),
        "{err}"
    );
    assert_eq!(r["after"], json!(1000));
    assert_eq!(r["me"], json!(a));
    // No supervisor: b is gone for good; its terminate ran first.
    assert!(!alive(&sb, "b"), "{:?}", procs(&sb));
    assert!(!procs(&sb).iter().any(|p| p.pid == b));
    let w = run(sb.state("w")).unwrap();
    let inbox = as_list(w["inbox"].clone());
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    assert_eq!(inbox[0]["tag"], json!("TERMINATED"));
    assert!(
        inbox[0]["reason"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("boom"),
        "{inbox:?}"
    );
    let crashes = crash_events(&sb);
    assert_eq!(crashes.len(), 1, "{crashes:?}");
    assert_eq!(crashes[0].detail["process"], json!(b));
    // Calling it again fails with no process, from the guest and the host.
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "b", "req": {"op": "ping"}}),
    );
    assert!(err_text(&r).contains("no process"), "{r}");
    assert!(matches!(
        run(sb.call("b", json!({"op": "ping"}), None)),
        Err(Error::NoProcess(_))
    ));
    assert_eq!(call(&sb, "a", json!({"op": "ping"})), json!("pong"));
    // The caller is not linked to the callee: a caller that does not catch
    // the error crashes on its own account.
    spawn(&sb, "b2", json!(null));
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "b2", "req": {"op": "crash", "msg": "boom2"}}),
    );
    assert!(err_text(&r).contains("boom2"), "{r}");
    assert_eq!(procs(&sb).len(), 2, "{:?}", procs(&sb));
}

// ---------------------------------------------------------------------------
// 6. spawn whose init fails

#[test]
fn a_nested_spawn_whose_init_fails_raises_in_the_caller_and_leaves_nothing() {
    let node = Node::with_threads(2);
    let sb = sandbox_with(&node, "n-spawn-fail", limits(|l| l.handler_ms = 200));
    spawn(&sb, "a", json!(null));
    let before = run(sb.info()).unwrap().process_count;
    for (mode, expect) in [
        ("error", "init exploded"),
        ("loop", "timeout"),
        ("call_missing", "no process nobody_here"),
        ("no_state", "init returned no state"),
    ] {
        let r = call(
            &sb,
            "a",
            json!({"op": "spawn", "module": "bad_init", "args": {"mode": mode}, "opts": {"name": "kid"}}),
        );
        let err = err_text(&r);
        assert!(
            err.contains("bad_init: init failed") && err.contains(expect),
            "{mode}: {err}"
        );
        // Nothing is left over: no process, and the name is free.
        assert_eq!(
            run(sb.info()).unwrap().process_count,
            before,
            "{mode}: {:?}",
            procs(&sb)
        );
        assert!(!procs(&sb).iter().any(|p| p.module == "bad_init"), "{mode}");
        assert_eq!(
            call(&sb, "a", json!({"op": "whereis", "name": "kid"})),
            json!(false),
            "{mode}: the name was freed"
        );
    }
    // The caller lives, and the name can be taken by a spawn that works.
    let r = call(
        &sb,
        "a",
        json!({"op": "spawn", "module": "bad_init", "args": {"mode": "fine"}, "opts": {"name": "kid"}}),
    );
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(call(&sb, "kid", json!("x")), json!("ok"));
    assert_eq!(json!(info_of(&sb, "kid").unwrap().pid), r["reply"]);
    // Spawn errors that are not init failures raise too.
    let r = call(
        &sb,
        "a",
        json!({"op": "spawn", "module": "no_such_module", "args": {}}),
    );
    assert!(err_text(&r).contains("no module `no_such_module`"), "{r}");
    let r = call(
        &sb,
        "a",
        json!({"op": "spawn", "module": "bad_init", "args": {}, "opts": {"name": "kid"}}),
    );
    assert!(err_text(&r).contains("registered already"), "{r}");
    assert_eq!(run(sb.info()).unwrap().process_count, before + 1);
    assert_eq!(call(&sb, "a", json!({"op": "ping"})), json!("pong"));
}

// ---------------------------------------------------------------------------
// 7. spawn whose init calls and spawns

#[test]
fn a_nested_spawn_whose_init_calls_and_spawns_returns_a_working_pid() {
    let (_node, sb) = setup("n-spawn-nest");
    let a = spawn(&sb, "a", json!(null));
    spawn(&sb, "counter", json!({"start": 41}));
    let r = call(
        &sb,
        "a",
        json!({"op": "spawn", "module": "parent", "args": {"counter": "counter", "kid_name": "grandchild"}, "opts": {"name": "child"}}),
    );
    assert_eq!(r["ok"], json!(true), "{r}");
    let child = r["reply"].as_str().unwrap().to_owned();
    assert!(child.starts_with("<parent."), "{child}");

    let ps = procs(&sb);
    let child_info = ps
        .iter()
        .find(|p| p.name.as_deref() == Some("child"))
        .unwrap_or_else(|| panic!("no child: {ps:?}"));
    assert_eq!(child_info.pid, child);
    assert_eq!(child_info.status, "idle");
    let grandchild = ps
        .iter()
        .find(|p| p.name.as_deref() == Some("grandchild"))
        .unwrap_or_else(|| panic!("no grandchild: {ps:?}"));
    assert_eq!(grandchild.module, "actor");
    assert_eq!(child_info.links, vec![grandchild.pid.clone()]);
    assert_eq!(grandchild.links, vec![child.clone()]);
    assert!(
        ps.iter()
            .find(|p| p.name.as_deref() == Some("a"))
            .unwrap()
            .links
            .is_empty(),
        "plain spawn: the caller is not linked"
    );

    // The child's state holds what its init saw.
    let state = call(&sb, "child", json!("get"));
    assert_eq!(
        state,
        json!({"seen": 42, "kid": grandchild.pid, "kid_n": 143, "kid_from_is_me": true})
    );
    assert_eq!(call(&sb, "counter", json!({"op": "inc"}))["n"], json!(43));
    assert_eq!(
        call(&sb, "grandchild", json!({"op": "inc"}))["n"],
        json!(144)
    );
    assert_eq!(run(sb.info()).unwrap().process_count, 4);

    // The same from the host: init nests inside the host's spawn too.
    let pid = run(sb.spawn(
        "parent",
        json!({"counter": "counter", "kid_name": "grandchild2"}),
        Some("child2"),
    ))
    .unwrap();
    assert_eq!(call(&sb, &pid, json!("get"))["seen"], json!(44));
    assert!(alive(&sb, "grandchild2"));
    assert_eq!(call(&sb, "a", json!({"op": "self"})), json!(a));
}

// ---------------------------------------------------------------------------
// 8. copy semantics

#[test]
fn nested_requests_and_replies_are_copies() {
    let (_node, sb) = setup("n-copy");
    spawn(&sb, "a", json!(null));
    spawn(&sb, "b", json!(null));
    let out = call(&sb, "a", json!({"op": "copy_check", "target": "b"}));
    assert_eq!(
        out["mine"],
        json!({"op": "mutate_req", "x": 1, "list": ["a"], "nested": {"y": "orig"}}),
        "the caller's request table was not touched by the callee"
    );
    assert_eq!(
        out["reply"],
        json!({"x": "hacked", "list": [1, 2, 3, 4]}),
        "the caller mutated its copy of the reply"
    );
    assert_eq!(
        out["again"],
        json!({"x": 1, "list": [1, 2, 3]}),
        "the callee's state did not change with the caller's copy"
    );
    let state = run(sb.state("b")).unwrap();
    assert_eq!(state["data"], json!({"x": 1, "list": [1, 2, 3]}));
    assert_eq!(
        state["stored"],
        json!({"op": "mutate_req", "x": 99, "list": ["a", "b"], "nested": {"y": "changed by callee"}}),
        "the callee mutated its own copy"
    );
}

// ---------------------------------------------------------------------------
// 9. exits and self-sends during a nested call

#[test]
fn a_message_a_nested_callee_sends_itself_is_handled_after_the_call() {
    let (_node, sb) = setup("n-selfsend");
    spawn(&sb, "a", json!(null));
    spawn(&sb, "b", json!(null));
    // Two calls in one callback: the second must not overtake the message
    // the first one queued (the callee's mailbox is not empty any more).
    let r = call(
        &sb,
        "a",
        json!({"op": "calls", "list": [
            {"target": "b", "req": {"op": "self_send", "msg": "note"}},
            {"target": "b", "req": {"op": "log"}},
        ]}),
    );
    assert_eq!(
        r,
        json!([
            {"ok": true, "reply": true},
            {"ok": true, "reply": ["call", "info:note"]},
        ])
    );
    // And from a single call: the message is handled afterwards.
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "b", "req": {"op": "self_send", "msg": "again"}}),
    );
    assert_eq!(r, json!({"ok": true, "reply": true}));
    let log = wait_until("b to handle its own message", || {
        let log = as_list(call(&sb, "b", json!({"op": "log"})));
        (log.len() == 4).then_some(log)
    });
    assert_eq!(log, vec!["call", "info:note", "call", "info:again"]);
    assert_eq!(
        run(sb.state("b")).unwrap()["inbox"],
        json!(["note", "again"])
    );
    assert_eq!(info_of(&sb, "b").unwrap().mailbox_len, 0);
}

#[test]
fn a_nested_callee_that_exits_answers_its_caller_and_is_gone() {
    let (_node, sb) = setup("n-exit");
    spawn(&sb, "a", json!(null));
    spawn(&sb, "w", json!(null));

    // graft.exit("normal") unwinds the callback: the caller gets an error
    // saying the callee exited; terminate runs with reason normal.
    let b = spawn(&sb, "b", json!({"report": "w"}));
    let r = call(
        &sb,
        "a",
        json!({"op": "call_and_check", "target": "b", "req": {"op": "exit", "reason": "normal"}}),
    );
    let err = err_text(&r);
    assert!(
        err.contains("exited before replying")
            && err.contains("normal")
            && err.contains(b.as_str()),
        "{err}"
    );
    assert_eq!(r["after"], json!(1000));
    wait_gone(&sb, "b");

    // A custom reason is reported the same way.
    let b2 = spawn(&sb, "b2", json!({"report": "w"}));
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "b2", "req": {"op": "exit", "reason": "bored"}}),
    );
    let err = err_text(&r);
    assert!(err.contains("bored") && err.contains(b2.as_str()), "{err}");
    wait_gone(&sb, "b2");

    // Catching the exit does not cancel it, but the callback's reply is
    // still delivered (the process exits once the callback returned).
    spawn(&sb, "b3", json!({"report": "w"}));
    let r = call(
        &sb,
        "a",
        json!({"op": "call", "target": "b3", "req": {"op": "exit_caught", "reason": "normal"}}),
    );
    assert_eq!(r, json!({"ok": true, "reply": {"caught": true}}));
    wait_gone(&sb, "b3");

    let inbox = wait_until("three TERMINATED reports", || {
        let inbox = as_list(run(sb.state("w")).unwrap()["inbox"].clone());
        (inbox.len() >= 3).then_some(inbox)
    });
    let reasons: Vec<(Json, Json)> = inbox
        .iter()
        .map(|m| (m["label"].clone(), m["reason"].clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (json!("b"), json!("normal")),
            (json!("b2"), json!("bored")),
            (json!("b3"), json!("normal")),
        ]
    );
    assert_eq!(call(&sb, "a", json!({"op": "ping"})), json!("pong"));
    assert_eq!(procs(&sb).len(), 2, "{:?}", procs(&sb));
}

// ---------------------------------------------------------------------------
// 10. out of memory in a nested callee

#[test]
fn out_of_memory_in_a_nested_callee_crashes_only_the_callee() {
    let node = Node::with_threads(2);
    let sb = sandbox_with(
        &node,
        "n-oom",
        limits(|l| l.memory_bytes = 16 * 1024 * 1024),
    );
    let a = spawn(&sb, "a", json!(null));
    spawn(&sb, "c", json!(null));
    for round in 0..2 {
        let name = format!("hog{round}");
        let hog = spawn(&sb, &name, json!(null));
        let r = call(
            &sb,
            "a",
            json!({"op": "call_and_check", "target": name, "req": {"op": "oom"}}),
        );
        let err = err_text(&r);
        assert!(
            err.contains("exited before replying") && err.contains("out_of_memory"),
            "round {round}: {err}"
        );
        assert!(err.contains(hog.as_str()), "round {round}: {err}");
        assert_eq!(r["after"], json!(1000), "round {round}: {r}");
        assert_eq!(r["me"], json!(a));
        wait_gone(&sb, &name);
        let crashes = crash_events(&sb);
        assert_eq!(crashes.len(), round + 1, "{crashes:?}");
        assert_eq!(crashes[round].detail["process"], json!(hog));
        assert_eq!(
            crashes[round].detail["reason"]["kind"],
            json!("out_of_memory")
        );
        // The caller survives and makes further (nested) calls that allocate.
        let r = call(
            &sb,
            "a",
            json!({"op": "call", "target": "c", "req": {"op": "alloc", "kib": 2048}}),
        );
        assert_eq!(r, json!({"ok": true, "reply": 2048}), "round {round}");
        let r = call(
            &sb,
            "a",
            json!({"op": "call", "target": "c", "req": {"op": "inc"}}),
        );
        assert_eq!(r["reply"]["n"], json!(round + 1), "round {round}: {r}");
    }
    assert_eq!(run(sb.info()).unwrap().process_count, 2);
    assert_eq!(
        crash_events(&sb)
            .iter()
            .filter(|e| e.detail["process"] == json!(a))
            .count(),
        0
    );
}

// ---------------------------------------------------------------------------
// a host error type check: a nested crash seen from the host

#[test]
fn a_host_call_whose_handler_crashes_in_a_nested_call_reports_the_caller() {
    let (_node, sb) = setup("n-host-crash");
    let a = spawn(&sb, "a", json!(null));
    spawn(&sb, "b", json!(null));
    // a relays without pcall: b's crash becomes a's crash.
    let err = run(sb.call(
        "a",
        json!({"op": "spin_calls", "target": "b", "count": 1, "ms": "not a number"}),
        Some(4000),
    ))
    .unwrap_err();
    match &err {
        Error::Crashed {
            target,
            reason: ExitReason::Error { message, .. },
        } => {
            assert_eq!(target, &a, "the crashed process (the caller)");
            assert!(
                message.contains("exited before replying") && message.contains("arithmetic"),
                "{message}"
            );
        }
        other => panic!("expected Crashed with an error, got {other:?}"),
    }
    wait_gone(&sb, "a");
    wait_gone(&sb, "b");
    assert!(!procs(&sb).iter().any(|p| p.pid == a));
}
