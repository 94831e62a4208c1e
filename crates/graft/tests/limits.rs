//! Limits and isolation (SPEC §1, §2, §4): memory, CPU time, recursion,
//! process and mailbox caps, message size, isolation between sandboxes,
//! fairness of the scheduler, and clear errors for hostile inputs.
//!
//! Every request goes through `wait`, which gives up after a few seconds, so a
//! runtime that hangs fails a test instead of blocking the whole run.

mod common;
use common::limits;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft::{
    block_on, with_timeout, Error, Event, ExitReason, HostFunctions, Node, ReloadStep, Sandbox,
    SandboxSpec,
};
use serde_json::{json, Value as Json};

/// Waits for a request, failing the test if it takes longer than 5 s.
fn wait<F: Future>(fut: F) -> F::Output {
    block_on(with_timeout(fut, Duration::from_secs(5)))
        .expect("the request did not complete within 5 s")
}

fn node() -> Node {
    Node::with_threads(2)
}

/// A spec with no app (processes are spawned by the test).
fn spec(id: &str) -> SandboxSpec {
    SandboxSpec::new(id).entry(None)
}

/// The exit reason of a call that must have crashed its target.
fn crashed(r: graft::Result<Json>) -> ExitReason {
    match r {
        Err(Error::Crashed { reason, .. }) => reason,
        other => panic!("expected Error::Crashed, got {other:?}"),
    }
}

fn crash_events(sb: &Sandbox) -> Vec<Event> {
    wait(sb.events())
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "crash")
        .collect()
}

/// Polls `f` until it returns true (then true) or `ms` elapse (then false).
fn eventually(ms: u64, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_millis(ms);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn compile_diagnostics(r: graft::Result<Sandbox>) -> Vec<graft::Diagnostic> {
    match r {
        Err(Error::Compile { diagnostics }) => diagnostics,
        Err(other) => panic!("expected Error::Compile, got {other:?}"),
        Ok(_) => panic!("expected Error::Compile, got a sandbox"),
    }
}

fn reload_one(sb: &Sandbox, module: &str, source: &str) -> graft::Result<graft::ReloadReport> {
    let mut sources = std::collections::BTreeMap::new();
    sources.insert(module.to_owned(), source.to_owned());
    wait(sb.reload(sources, graft::ReloadOptions::default()))
}

const COUNTER: &str = r#"
local counter = {}
function counter.init(args) return { n = 0 } end
function counter.handle_call(req, from, state)
  if req == "inc" then state.n += 1 end
  if type(req) == "table" and req.note then
    -- allocates req.note bytes (a string kept in the state)
    state.note = string.rep("n", req.note) .. state.n
    return #state.note, state
  end
  return state.n, state
end
return counter
"#;

/// Allocates on request: unbounded table growth, unbounded string growth, or
/// a bounded amount that is released when the callback returns.
const HOG: &str = r#"
local hog = {}
function hog.init(args)
  if args and args.grow_in_init then
    local t = {}
    local i = 0
    while true do
      i += 1
      t[i] = string.rep("i", 1000) .. i
    end
  end
  return {}
end
function hog.handle_call(req, from, state)
  if req == "grow_table" then
    local t = {}
    local i = 0
    while true do
      i += 1
      t[i] = string.rep("x", 1000) .. i
    end
  elseif req == "grow_string" then
    local s = "x"
    while true do
      s = s .. s
    end
  elseif type(req) == "table" and req.alloc then
    local n = req.alloc // 1024
    local t = table.create(n)
    for i = 1, n do
      t[i] = string.rep("y", 1000) .. i
    end
    return #t, state
  end
  return "ok", state
end
return hog
"#;

const MB: usize = 1024 * 1024;

// ---------------------------------------------------------------- memory_bytes

#[test]
fn unbounded_table_growth_crashes_only_that_process_with_out_of_memory() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("oom")
                .module("hog", HOG)
                .module("counter", COUNTER)
                .limits(limits(|l| l.memory_bytes = 16 * MB)),
        ),
    )
    .unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    let hog = wait(sb.spawn("hog", json!(null), Some("hog"))).unwrap();
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));

    let reason = crashed(wait(sb.call("hog", json!("grow_table"), None)));
    assert_eq!(reason, ExitReason::OutOfMemory);

    // The crash is an event naming the process and the reason.
    let crashes = crash_events(&sb);
    assert_eq!(crashes.len(), 1, "{crashes:?}");
    assert_eq!(crashes[0].detail["process"], json!(hog));
    assert_eq!(
        crashes[0].detail["reason"]["kind"],
        json!("out_of_memory"),
        "{:?}",
        crashes[0]
    );

    // Only the hog died: it is gone, the counter kept its state and answers.
    assert!(matches!(
        wait(sb.call("hog", json!("x"), None)),
        Err(Error::NoProcess(_))
    ));
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(2));
    // ... and can still allocate: the sandbox lives, not just its idle processes.
    let note = wait(sb.call("c", json!({"note": 64 * 1024}), None));
    assert_eq!(
        note.unwrap(),
        json!(64 * 1024 + 1),
        "a 64 KiB allocation (0.4% of the limit) after another process's OOM"
    );
    let info = wait(sb.info()).unwrap();
    assert_eq!(info.process_count, 1);
    assert_eq!(info.status, "running");
}

#[test]
fn unbounded_string_growth_crashes_with_out_of_memory() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("oom-str")
                .module("hog", HOG)
                .module("counter", COUNTER)
                .limits(limits(|l| l.memory_bytes = 16 * MB)),
        ),
    )
    .unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    wait(sb.spawn("hog", json!(null), Some("hog"))).unwrap();
    assert_eq!(
        crashed(wait(sb.call("hog", json!("grow_string"), None))),
        ExitReason::OutOfMemory
    );
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
}

#[test]
fn out_of_memory_in_init_fails_the_spawn_with_out_of_memory() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("oom-init")
                .module("hog", HOG)
                .module("counter", COUNTER)
                .limits(limits(|l| l.memory_bytes = 16 * MB)),
        ),
    )
    .unwrap();
    match wait(sb.spawn("hog", json!({"grow_in_init": true}), Some("hog"))) {
        Err(Error::SpawnFailed { module, reason }) => {
            assert_eq!(module, "hog");
            assert_eq!(reason, ExitReason::OutOfMemory);
        }
        other => panic!("expected SpawnFailed(out_of_memory), got {other:?}"),
    }
    assert_eq!(wait(sb.info()).unwrap().process_count, 0);
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
}

#[test]
fn memory_of_a_crashed_process_is_reclaimed() {
    let limit = 16 * MB;
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("oom-reclaim")
                .module("hog", HOG)
                .limits(limits(|l| l.memory_bytes = limit)),
        ),
    )
    .unwrap();
    let baseline = wait(sb.info()).unwrap().memory_bytes;
    assert!(
        baseline < limit / 4,
        "an empty sandbox uses {baseline} bytes"
    );
    // Before any crash, a 6 MiB allocation fits (twice in a row).
    wait(sb.spawn("hog", json!(null), Some("warmup"))).unwrap();
    for _ in 0..2 {
        assert_eq!(
            wait(sb.call("warmup", json!({"alloc": 6 * MB}), None)).unwrap(),
            json!(6 * MB / 1024)
        );
    }
    assert_eq!(
        crashed(wait(sb.call("warmup", json!("grow_string"), None))),
        ExitReason::OutOfMemory
    );

    for round in 0..3 {
        let pid = wait(sb.spawn("hog", json!(null), None)).unwrap();
        let reason = crashed(wait(sb.call(&pid, json!("grow_table"), None)));
        assert_eq!(reason, ExitReason::OutOfMemory, "round {round}");
        // A fresh process can allocate a large share of the limit again: the
        // crashed process's memory did not stay pinned.
        let pid = wait(sb.spawn("hog", json!(null), None)).unwrap();
        let got = wait(sb.call(&pid, json!({"alloc": 6 * MB}), None));
        assert_eq!(
            got.unwrap(),
            json!(6 * MB / 1024),
            "round {round}: a 6 MiB allocation after an OOM crash"
        );
        // End it with another OOM (string growth this time).
        assert_eq!(
            crashed(wait(sb.call(&pid, json!("grow_string"), None))),
            ExitReason::OutOfMemory
        );
    }
    assert!(eventually(500, || wait(sb.info()).unwrap().process_count == 0));
    // With the garbage of six crashed allocations behind it, the heap is not
    // stuck at the limit: churn a little and the reported usage comes down.
    let pid = wait(sb.spawn("hog", json!(null), None)).unwrap();
    let mut last = usize::MAX;
    let came_down = eventually(1500, || {
        let _ = wait(sb.call(&pid, json!({"alloc": MB}), None));
        last = wait(sb.info()).unwrap().memory_bytes;
        last < limit / 2
    });
    assert!(
        came_down,
        "SandboxInfo.memory_bytes stayed at {last} (limit {limit}, baseline {baseline})"
    );
}

// ---------------------------------------------------------------- handler_ms

const SPINNER: &str = r#"
local m = {}
function m.init(args) return { spins = 0 } end
function m.handle_call(req, from, state)
  if req == "loop" then
    while true do end
  elseif req == "pcall_loop" then
    while true do
      pcall(function() while true do end end)
    end
  elseif req == "pcall_return" then
    local ok, err = pcall(function() while true do end end)
    return { swallowed = true, err = tostring(err) }, state
  elseif req == "xpcall_handler_loop" then
    local ok = xpcall(function() while true do end end, function(e) while true do end end)
    return { swallowed = true }, state
  elseif req == "coroutine_loop" then
    local co = coroutine.create(function() while true do end end)
    local ok, err = coroutine.resume(co)
    return { swallowed = true, err = tostring(err) }, state
  elseif req == "recursion_loop" then
    local function f(n) if n > 100 then return 0 end return f(n + 1) end
    while true do f(0) end
  end
  return "ok", state
end
function m.handle_cast(msg, state)
  if msg == "go" then while true do end end
  return state
end
return m
"#;

fn timeout_sandbox(node: &Node, id: &str, handler_ms: u64) -> Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            spec(id)
                .module("spinner", SPINNER)
                .module("counter", COUNTER)
                .limits(limits(|l| l.handler_ms = handler_ms)),
        ),
    )
    .unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    sb
}

#[test]
fn an_infinite_loop_crashes_with_timeout_and_siblings_keep_answering() {
    let node = node();
    let sb = timeout_sandbox(&node, "loop", 100);
    let pid = wait(sb.spawn("spinner", json!(null), Some("spin"))).unwrap();
    let started = Instant::now();
    let reason = crashed(wait(sb.call("spin", json!("loop"), None)));
    let took = started.elapsed();
    assert_eq!(reason, ExitReason::Timeout);
    assert!(
        took >= Duration::from_millis(90),
        "interrupted after {took:?}, before handler_ms (100 ms)"
    );
    assert!(
        took < Duration::from_millis(1000),
        "interrupted only after {took:?} (handler_ms 100)"
    );

    let crashes = crash_events(&sb);
    assert_eq!(crashes.len(), 1, "{crashes:?}");
    assert_eq!(crashes[0].detail["process"], json!(pid));
    assert_eq!(crashes[0].detail["reason"]["kind"], json!("timeout"));
    assert!(matches!(
        wait(sb.call("spin", json!("x"), None)),
        Err(Error::NoProcess(_))
    ));
    for i in 1..=3 {
        assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(i));
    }
}

#[test]
fn a_timeout_cannot_be_swallowed_by_pcall_xpcall_or_coroutines() {
    let node = node();
    let sb = timeout_sandbox(&node, "swallow", 100);
    for req in [
        "pcall_loop",
        "pcall_return",
        "xpcall_handler_loop",
        "coroutine_loop",
        "recursion_loop",
    ] {
        let pid = wait(sb.spawn("spinner", json!(null), None)).unwrap();
        let started = Instant::now();
        let r = wait(sb.call(&pid, json!(req), None));
        let took = started.elapsed();
        match r {
            Err(Error::Crashed { reason, .. }) => assert_eq!(reason, ExitReason::Timeout, "{req}"),
            other => panic!("{req}: expected a timeout crash, got {other:?}"),
        }
        assert!(
            took < Duration::from_millis(1000),
            "{req}: interrupted only after {took:?}"
        );
        assert!(
            matches!(
                wait(sb.call(&pid, json!("x"), None)),
                Err(Error::NoProcess(_))
            ),
            "{req}: the process survived"
        );
    }
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
    assert_eq!(crash_events(&sb).len(), 5);
}

#[test]
fn a_cast_handler_that_loops_times_out_and_the_sandbox_keeps_working() {
    let node = node();
    let sb = timeout_sandbox(&node, "cast-loop", 50);
    wait(sb.spawn("spinner", json!(null), Some("spin"))).unwrap();
    wait(sb.cast("spin", json!("go"))).unwrap();
    // While it spins (and after it was killed), the counter answers.
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
    assert!(
        eventually(1000, || crash_events(&sb)
            .iter()
            .any(|e| e.detail["reason"]["kind"] == json!("timeout"))),
        "no timeout crash event: {:?}",
        wait(sb.events()).unwrap()
    );
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(2));
    assert_eq!(wait(sb.info()).unwrap().process_count, 1);
}

#[test]
fn long_running_builtins_are_interrupted_too() {
    // Catastrophic backtracking runs inside Luau's C pattern matcher; the
    // handler_ms budget still applies to it.
    let node = node();
    let sb = timeout_sandbox(&node, "builtin-loop", 100);
    let src = "local m = {}\nfunction m.init() return {} end\nfunction m.handle_call(r, f, s)\n  return string.find(string.rep('a', 40), string.rep('a*', 40) .. 'b'), s\nend\nreturn m\n";
    let started = Instant::now();
    let e = wait(sb.eval("return string.find(string.rep('a', 40), string.rep('a*', 40) .. 'b')"))
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "took {:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("timeout"), "{e}");
    let mut sources = std::collections::BTreeMap::new();
    sources.insert("matcher".to_string(), src.to_string());
    wait(sb.reload(sources, graft::ReloadOptions::default())).unwrap();
    wait(sb.spawn("matcher", json!(null), Some("matcher"))).unwrap();
    let started = Instant::now();
    assert_eq!(
        crashed(wait(sb.call("matcher", json!(null), None))),
        ExitReason::Timeout
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
}

// ---------------------------------------------------------------- recursion

const RECURSER: &str = r#"
local m = {}
local function down(n) return 1 + down(n + 1) end
function m.init(args) return {} end
function m.handle_call(req, from, state)
  if req == "recurse" then
    return down(1), state
  elseif req == "index_loop" then
    local t = setmetatable({}, { __index = function(t, k) return t[k] end })
    return t.x, state
  elseif req == "pcall_recurse" then
    local ok, err = pcall(down, 1)
    return { ok = ok, err = tostring(err) }, state
  end
  return "ok", state
end
return m
"#;

#[test]
fn unbounded_recursion_crashes_with_stack_overflow_and_the_sandbox_lives() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("rec")
                .module("rec", RECURSER)
                .module("counter", COUNTER),
        ),
    )
    .unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    let pid = wait(sb.spawn("rec", json!(null), None)).unwrap();
    let started = Instant::now();
    let reason = crashed(wait(sb.call(&pid, json!("recurse"), None)));
    assert_eq!(reason, ExitReason::StackOverflow);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        crash_events(&sb).last().unwrap().detail["reason"]["kind"],
        json!("stack_overflow")
    );
    // Recursion through a metamethod exhausts Luau's C stack (200 nested
    // re-entries) first. Luau marks that only by its text, which a guest can
    // raise too, so it is an ordinary error that says what happened.
    let pid = wait(sb.spawn("rec", json!(null), None)).unwrap();
    match crashed(wait(sb.call(&pid, json!("index_loop"), None))) {
        ExitReason::Error { message, .. } => {
            assert!(message.contains("C stack overflow"), "{message}")
        }
        other => panic!("expected an error exit, got {other:?}"),
    }
    // A guest may catch its own stack overflow: the error says what happened.
    let pid = wait(sb.spawn("rec", json!(null), None)).unwrap();
    let r = wait(sb.call(&pid, json!("pcall_recurse"), None)).unwrap();
    assert_eq!(r["ok"], json!(false));
    assert!(r["err"].as_str().unwrap().contains("stack overflow"), "{r}");
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
}

// ---------------------------------------------------------------- max_processes

const WORKER: &str = r#"
local m = {}
function m.init(args) return {} end
function m.handle_call(req, from, state)
  if req == "spawn_two" then
    local ok1, r1 = pcall(graft.spawn, "worker", {})
    local ok2, r2 = pcall(graft.spawn, "worker", {})
    return { ok1 = ok1, ok2 = ok2, err2 = tostring(r2) }, state
  elseif req == "spawn_unknown" then
    local ok, err = pcall(graft.spawn, "nope", {})
    return { ok = ok, err = tostring(err) }, state
  end
  return "pong", state
end
function m.handle_cast(msg, state)
  if msg == "die" then error("told to die") end
  return state
end
return m
"#;

#[test]
fn spawning_past_max_processes_fails_for_host_and_guest() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("maxp")
                .module("worker", WORKER)
                .limits(limits(|l| l.max_processes = 3)),
        ),
    )
    .unwrap();
    for name in ["a", "b", "c"] {
        wait(sb.spawn("worker", json!(null), Some(name))).unwrap();
    }
    match wait(sb.spawn("worker", json!(null), Some("d"))) {
        Err(Error::TooManyProcesses(3)) => {}
        other => panic!("expected TooManyProcesses(3), got {other:?}"),
    }
    let e = wait(sb.spawn("worker", json!(null), None)).unwrap_err();
    assert_eq!(e.kind(), "max_processes");
    assert!(e.to_string().contains("max_processes (3)"), "{e}");
    // eval runs as a process too, under the same cap.
    assert!(matches!(
        wait(sb.eval("return 1")),
        Err(Error::TooManyProcesses(3))
    ));
    assert_eq!(wait(sb.info()).unwrap().process_count, 3);

    // Free one slot: a guest spawn takes it, the next one raises a clear error.
    wait(sb.cast("c", json!("die"))).unwrap();
    assert!(eventually(1000, || wait(sb.info()).unwrap().process_count == 2));
    let r = wait(sb.call("a", json!("spawn_two"), None)).unwrap();
    assert_eq!(r["ok1"], json!(true), "{r}");
    assert_eq!(r["ok2"], json!(false), "{r}");
    assert!(r["err2"].as_str().unwrap().contains("max_processes"), "{r}");
    assert_eq!(wait(sb.info()).unwrap().process_count, 3);
    assert!(matches!(
        wait(sb.spawn("worker", json!(null), None)),
        Err(Error::TooManyProcesses(3))
    ));
    // The processes that exist keep answering.
    assert_eq!(
        wait(sb.call("b", json!("ping"), None)).unwrap(),
        json!("pong")
    );
}

// ---------------------------------------------------------------- max_mailbox

/// Spins ~300 ms on "spin" (so its mailbox fills), counts everything else.
const BUSY: &str = r#"
local m = {}
function m.init(args) return { casts = 0, infos = 0, seen = {} } end
function m.handle_cast(msg, state)
  if msg == "spin" then
    local until_ms = graft.now() + 300
    while graft.now() < until_ms do end
  else
    state.casts += 1
    table.insert(state.seen, msg)
  end
  return state
end
function m.handle_info(msg, state)
  state.infos += 1
  table.insert(state.seen, msg)
  return state
end
function m.handle_call(req, from, state) return state.casts, state end
return m
"#;

const SENDER: &str = r#"
local m = {}
function m.init(args) return {} end
function m.handle_call(req, from, state)
  local accepted, first_err, ok_on_fail = 0, nil, nil
  for i = 1, req.n do
    local ok, err
    if req.cast then ok, err = graft.cast(req.to, 100 + i) else ok, err = graft.send(req.to, 100 + i) end
    if ok == true then
      accepted += 1
    elseif first_err == nil then
      first_err = err
      ok_on_fail = tostring(ok)
    end
  end
  return { accepted = accepted, err = first_err, ok_on_fail = ok_on_fail }, state
end
return m
"#;

/// Makes `busy` start spinning and waits until its mailbox is empty again.
fn start_spinning(sb: &Sandbox) {
    wait(sb.cast("busy", json!("spin"))).unwrap();
    let picked_up = eventually(1000, || {
        wait(sb.processes())
            .unwrap()
            .iter()
            .any(|p| p.name.as_deref() == Some("busy") && p.mailbox_len == 0 && p.status != "idle")
    });
    assert!(
        picked_up,
        "the spin message was not picked up: {:?}",
        wait(sb.processes()).unwrap()
    );
}

fn busy_state(sb: &Sandbox) -> Json {
    wait(sb.state("busy")).unwrap()
}

#[test]
fn host_cast_past_max_mailbox_is_refused_and_nothing_is_dropped() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("mbox")
                .module("busy", BUSY)
                .limits(limits(|l| l.max_mailbox = 5)),
        ),
    )
    .unwrap();
    wait(sb.spawn("busy", json!(null), Some("busy"))).unwrap();
    start_spinning(&sb);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..10 {
        match wait(sb.cast("busy", json!(i))) {
            Ok(()) => accepted.push(i),
            Err(Error::MailboxFull(who)) => {
                assert!(who.contains("busy"), "{who}");
                refused += 1;
            }
            Err(other) => panic!("cast {i}: expected MailboxFull, got {other:?}"),
        }
    }
    assert_eq!(
        accepted,
        vec![0, 1, 2, 3, 4],
        "the first max_mailbox casts are accepted"
    );
    assert_eq!(refused, 5);
    let e = wait(sb.send("busy", json!("info"))).unwrap_err();
    assert_eq!(e.kind(), "mailbox_full", "{e}");
    assert!(e.to_string().contains("max_mailbox"), "{e}");

    // Every accepted message is handled, in order; none of the refused ones.
    assert!(
        eventually(1500, || busy_state(&sb)["casts"] == json!(5)),
        "{}",
        busy_state(&sb)
    );
    std::thread::sleep(Duration::from_millis(20));
    let state = busy_state(&sb);
    assert_eq!(state["casts"], json!(5), "{state}");
    assert_eq!(state["infos"], json!(0), "{state}");
    assert_eq!(state["seen"], json!([0, 1, 2, 3, 4]), "{state}");
    // Drained: the mailbox takes messages again.
    wait(sb.cast("busy", json!(99))).unwrap();
    assert_eq!(
        wait(sb.call("busy", json!("count"), None)).unwrap(),
        json!(6)
    );
}

#[test]
fn guest_send_and_cast_past_max_mailbox_return_nil_mailbox_full() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("mbox-guest")
                .module("busy", BUSY)
                .module("sender", SENDER)
                .limits(limits(|l| l.max_mailbox = 5)),
        ),
    )
    .unwrap();
    wait(sb.spawn("busy", json!(null), Some("busy"))).unwrap();
    wait(sb.spawn("sender", json!(null), Some("sender"))).unwrap();

    start_spinning(&sb);
    let r = wait(sb.call("sender", json!({"to": "busy", "n": 12}), None)).unwrap();
    assert_eq!(r["accepted"], json!(5), "{r}");
    assert_eq!(r["err"], json!("mailbox_full"), "{r}");
    assert_eq!(r["ok_on_fail"], json!("nil"), "{r}");
    assert!(
        eventually(1500, || busy_state(&sb)["infos"] == json!(5)),
        "{}",
        busy_state(&sb)
    );

    start_spinning(&sb);
    let r = wait(sb.call("sender", json!({"to": "busy", "n": 8, "cast": true}), None)).unwrap();
    assert_eq!(r["accepted"], json!(5), "{r}");
    assert_eq!(r["err"], json!("mailbox_full"), "{r}");
    assert!(
        eventually(1500, || busy_state(&sb)["casts"] == json!(5)),
        "{}",
        busy_state(&sb)
    );
    std::thread::sleep(Duration::from_millis(20));
    let state = busy_state(&sb);
    assert_eq!(state["infos"], json!(5), "{state}");
    assert_eq!(state["casts"], json!(5), "{state}");
    assert_eq!(
        state["seen"],
        json!([101, 102, 103, 104, 105, 101, 102, 103, 104, 105]),
        "{state}"
    );
}

// ---------------------------------------------------------------- max_message_bytes

const PROBE: &str = r#"
local m = {}
function m.init(args) return {} end
local function try(f, ...)
  local ok, err = pcall(f, ...)
  return { ok = ok, err = tostring(err) }
end
function m.handle_call(req, from, state)
  if req == "big_string" then
    return try(graft.send, "echo", string.rep("x", 4096)), state
  elseif req == "big_table" then
    local t = {}
    for i = 1, 200 do t[i] = i end
    return try(graft.cast, "echo", t), state
  elseif req == "big_call" then
    return try(graft.call, "echo", string.rep("x", 4096)), state
  elseif req == "cycle" then
    local t = { name = "loop" }
    t.self = t
    return try(graft.send, "echo", t), state
  elseif req == "function" then
    return try(graft.send, "echo", { f = function() end }), state
  elseif req == "function_call" then
    return try(graft.call, "echo", { f = print }), state
  elseif req == "small" then
    return try(graft.send, "echo", "hi"), state
  end
  return "?", state
end
return m
"#;

const ECHO: &str = r#"
local m = {}
function m.init(args) return { got = 0 } end
function m.handle_call(req, from, state)
  if req == "give_function" then return function() end, state end
  if req == "give_big" then return string.rep("z", 4096), state end
  return req, state
end
function m.handle_cast(msg, state) state.got += 1 return state end
function m.handle_info(msg, state) state.got += 1 return state end
return m
"#;

fn message_sandbox(node: &Node, id: &str) -> Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            spec(id)
                .module("probe", PROBE)
                .module("echo", ECHO)
                .limits(limits(|l| l.max_message_bytes = 1024)),
        ),
    )
    .unwrap();
    wait(sb.spawn("probe", json!(null), Some("probe"))).unwrap();
    wait(sb.spawn("echo", json!(null), Some("echo"))).unwrap();
    sb
}

#[test]
fn guest_messages_over_max_message_bytes_or_cyclic_are_refused() {
    let node = node();
    let sb = message_sandbox(&node, "msg-guest");
    for req in ["big_string", "big_table", "big_call"] {
        let r = wait(sb.call("probe", json!(req), None)).unwrap();
        assert_eq!(r["ok"], json!(false), "{req}: {r}");
        assert!(
            r["err"]
                .as_str()
                .unwrap()
                .contains("max_message_bytes (1024)"),
            "{req}: {r}"
        );
    }
    let r = wait(sb.call("probe", json!("cycle"), None)).unwrap();
    assert_eq!(r["ok"], json!(false), "a cyclic table was sent: {r}");
    let r = wait(sb.call("probe", json!("small"), None)).unwrap();
    assert_eq!(r["ok"], json!(true), "{r}");
    // Only the small message arrived; the sender and receiver both live.
    assert!(eventually(500, || wait(sb.state("echo")).unwrap()["got"] == json!(1)));
    assert_eq!(wait(sb.state("echo")).unwrap()["got"], json!(1));
    assert_eq!(wait(sb.info()).unwrap().process_count, 2);
}

#[test]
fn a_cyclic_message_is_refused_with_an_error_naming_the_cycle() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(spec("cycle").module("probe", PROBE).module("echo", ECHO)),
    )
    .unwrap();
    wait(sb.spawn("probe", json!(null), Some("probe"))).unwrap();
    wait(sb.spawn("echo", json!(null), Some("echo"))).unwrap();
    let started = Instant::now();
    let r = wait(sb.call("probe", json!("cycle"), None)).unwrap();
    assert_eq!(r["ok"], json!(false), "{r}");
    assert!(
        r["err"]
            .as_str()
            .unwrap()
            .contains("cyclic value: message.self → message"),
        "{r}"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(wait(sb.state("echo")).unwrap()["got"], json!(0));
    assert_eq!(
        wait(sb.call("probe", json!("small"), None)).unwrap()["ok"],
        json!(true)
    );
}

#[test]
fn host_messages_over_max_message_bytes_are_refused() {
    let node = node();
    let sb = message_sandbox(&node, "msg-host");
    let big = json!("x".repeat(4096));
    let cast = wait(sb.cast("echo", big.clone()));
    assert!(
        cast.is_err(),
        "a 4 KiB cast was accepted with max_message_bytes = 1024"
    );
    assert!(cast.unwrap_err().to_string().contains("max_message_bytes"));
    let call = wait(sb.call("echo", big, None));
    assert!(
        call.is_err(),
        "a 4 KiB call was accepted with max_message_bytes = 1024: {call:?}"
    );
    assert!(call.unwrap_err().to_string().contains("max_message_bytes"));
    assert_eq!(wait(sb.state("echo")).unwrap()["got"], json!(0));
}

// ---------------------------------------------------------------- plain data

#[test]
fn functions_are_not_plain_data_in_messages_or_replies() {
    let node = node();
    let sb = message_sandbox(&node, "fn-msg");
    for req in ["function", "function_call"] {
        let r = wait(sb.call("probe", json!(req), None)).unwrap();
        assert_eq!(r["ok"], json!(false), "{req}: {r}");
        assert!(
            r["err"]
                .as_str()
                .unwrap()
                .contains("function is not plain data"),
            "{req}: {r}"
        );
    }
    match wait(sb.call("echo", json!("give_function"), None)) {
        Err(Error::NotPlainData(msg)) => assert!(msg.contains("function"), "{msg}"),
        other => panic!("expected NotPlainData, got {other:?}"),
    }
    // The process that replied with a function is still alive and answering.
    assert_eq!(
        wait(sb.call("echo", json!("same"), None)).unwrap(),
        json!("same")
    );
    assert_eq!(wait(sb.info()).unwrap().process_count, 2);
}

// ---------------------------------------------------------------- isolation

const CRASHLOOP_APP: &str = r#"
return {
  behaviour = "supervisor",
  init = function(args)
    return {
      strategy = "one_for_one", intensity = 1000000, period = 1,
      children = { { id = "crasher", module = "crasher", name = "crasher" } },
    }
  end,
}
"#;

const CRASHER: &str = r#"
return {
  init = function(args)
    graft.send(graft.self(), "boom")
    return {}
  end,
  handle_info = function(msg, state) error("crash loop: " .. msg) end,
}
"#;

#[test]
fn one_sandbox_oom_loop_or_crash_loop_does_not_affect_another() {
    let node = node();
    let oom = graft::block_on(
        node.create_sandbox(
            spec("iso-oom")
                .module("hog", HOG)
                .module("counter", COUNTER)
                .limits(limits(|l| l.memory_bytes = 16 * MB)),
        ),
    )
    .unwrap();
    wait(oom.spawn("counter", json!(null), Some("c"))).unwrap();
    let spin = timeout_sandbox(&node, "iso-loop", 150);
    let crashloop = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("iso-crash")
                .module("app", CRASHLOOP_APP)
                .module("crasher", CRASHER),
        ),
    )
    .unwrap();
    let good =
        graft::block_on(node.create_sandbox(spec("iso-good").module("counter", COUNTER))).unwrap();
    wait(good.spawn("counter", json!(null), Some("c"))).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let oom_thread = {
        let (sb, stop) = (oom.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut ooms = 0;
            while !stop.load(Ordering::Relaxed) {
                wait(sb.spawn("hog", json!(null), None))
                    .map(|pid| {
                        if crashed(wait(sb.call(&pid, json!("grow_table"), None)))
                            == ExitReason::OutOfMemory
                        {
                            ooms += 1;
                        }
                    })
                    .unwrap();
            }
            ooms
        })
    };
    let loop_thread = {
        let (sb, stop) = (spin.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut timeouts = 0;
            while !stop.load(Ordering::Relaxed) {
                let pid = wait(sb.spawn("spinner", json!(null), None)).unwrap();
                if crashed(wait(sb.call(&pid, json!("loop"), None))) == ExitReason::Timeout {
                    timeouts += 1;
                }
            }
            timeouts
        })
    };

    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(700) {
        n += 1;
        let t = Instant::now();
        assert_eq!(wait(good.call("c", json!("inc"), None)).unwrap(), json!(n));
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let ooms = oom_thread.join().unwrap();
    let timeouts = loop_thread.join().unwrap();
    assert!(ooms >= 1, "no OOM happened during the test");
    assert!(timeouts >= 1, "no timeout happened during the test");
    assert!(
        crash_events(&crashloop).len() >= 10,
        "the crash loop did not run: {:?}",
        wait(crashloop.events()).unwrap()
    );
    assert!(
        worst < Duration::from_millis(250),
        "the healthy sandbox took {worst:?} to answer a call ({n} calls)"
    );

    // The troubled sandboxes live on too.
    assert_eq!(wait(oom.call("c", json!("inc"), None)).unwrap(), json!(1));
    assert_eq!(wait(spin.call("c", json!("inc"), None)).unwrap(), json!(1));
    assert!(wait(crashloop.info()).is_ok());

    // Destroying them does not disturb the healthy one.
    for id in ["iso-oom", "iso-loop", "iso-crash"] {
        node.destroy(id).unwrap();
    }
    assert!(matches!(
        wait(spin.call("c", json!("inc"), None)),
        Err(Error::NoSandbox(_))
    ));
    assert_eq!(node.sandbox_ids(), vec!["iso-good".to_string()]);
    assert_eq!(
        wait(good.call("c", json!("inc"), None)).unwrap(),
        json!(n + 1)
    );
}

// ---------------------------------------------------------------- fairness

#[test]
fn spinning_sandboxes_do_not_delay_a_third_sandbox() {
    let node = Node::with_threads(2);
    let mut spinners = Vec::new();
    for id in ["fair-a", "fair-b"] {
        let sb = timeout_sandbox(&node, id, 3000);
        wait(sb.spawn("spinner", json!(null), Some("spin"))).unwrap();
        wait(sb.cast("spin", json!("go"))).unwrap();
        spinners.push(sb);
    }
    let quick = graft::block_on(node.create_sandbox(spec("fair-quick").module("counter", COUNTER)))
        .unwrap();
    wait(quick.spawn("counter", json!(null), Some("c"))).unwrap();
    let started = Instant::now();
    // Both spinners are inside their callbacks.
    for sb in &spinners {
        let busy = eventually(500, || {
            wait(sb.processes()).unwrap().iter().any(|p| {
                p.name.as_deref() == Some("spin") && p.status != "idle" && p.messages_handled == 2
            })
        });
        assert!(
            busy,
            "{} is not spinning: {:?}",
            sb.id(),
            wait(sb.processes()).unwrap()
        );
    }

    let mut worst = Duration::ZERO;
    for i in 1..=20 {
        let t = Instant::now();
        assert_eq!(wait(quick.call("c", json!("inc"), None)).unwrap(), json!(i));
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Inside a spinning sandbox, the other process is not starved either.
    let mut worst_same = Duration::ZERO;
    for i in 1..=5 {
        let t = Instant::now();
        assert_eq!(
            wait(spinners[0].call("c", json!("inc"), None)).unwrap(),
            json!(i)
        );
        worst_same = worst_same.max(t.elapsed());
    }
    // The measurement was made under load: the spinners were still spinning.
    assert!(started.elapsed() < Duration::from_millis(2500));
    for sb in &spinners {
        assert!(
            crash_events(sb).is_empty(),
            "{} stopped spinning early",
            sb.id()
        );
    }
    assert!(
        worst < Duration::from_millis(250),
        "a call to an idle sandbox took {worst:?} while two others spin"
    );
    assert!(
        worst_same < Duration::from_millis(250),
        "a call next to a spinning process took {worst_same:?}"
    );
}

// ---------------------------------------------------------------- hostile inputs

#[test]
fn a_syntax_error_is_a_compile_error_naming_the_line() {
    let node = node();
    let src = "local m = {}\nfunction m.init() return {} end\nlocal x = = 1\nreturn m\n";
    let diags = compile_diagnostics(graft::block_on(
        node.create_sandbox(spec("syntax").module("bad", src)),
    ));
    let d = &diags[0];
    assert_eq!(d.module, "bad");
    assert_eq!(d.line, 3, "{d:?}");
    assert!(d.column >= 1, "{d:?}");
    assert!(d.frame.contains("local x = = 1"), "{}", d.frame);
    let err = graft::block_on(node.create_sandbox(spec("syntax").module("bad", src)))
        .err()
        .unwrap();
    assert_eq!(err.kind(), "compile_error");
    assert!(err.to_string().contains(":3:"), "{err}");
    assert!(
        node.sandbox_ids().is_empty(),
        "a sandbox that failed to compile was registered"
    );

    // In a reload, the running code is untouched.
    let sb =
        graft::block_on(node.create_sandbox(spec("syntax-ok").module("counter", COUNTER))).unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    let e = reload_one(&sb, "counter", "return {\n  init = function() return {} end,\n  handle_call = function(r, f, s) return end end,\n}").unwrap_err();
    match &e {
        Error::Compile { diagnostics } => assert_eq!(diagnostics[0].line, 3, "{diagnostics:?}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
    assert_eq!(wait(sb.versions("counter")).unwrap().len(), 1);
}

#[test]
fn sources_over_max_source_bytes_are_refused() {
    let node = node();
    let small = limits(|l| l.max_source_bytes = 1024);
    let padded = format!("{}\n{COUNTER}", "-- padding\n".repeat(200));
    let diags = compile_diagnostics(graft::block_on(
        node.create_sandbox(
            spec("big-src")
                .module("counter", &padded)
                .limits(small.clone()),
        ),
    ));
    assert_eq!(diags[0].kind, "too_large", "{diags:?}");
    assert!(diags[0].message.contains("max_source_bytes"), "{diags:?}");
    let sb = graft::block_on(
        node.create_sandbox(spec("big-src").module("counter", COUNTER).limits(small)),
    )
    .unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    let e = reload_one(&sb, "counter", &padded).unwrap_err();
    assert!(e.to_string().contains("max_source_bytes"), "{e}");
    let e = wait(sb.eval(&format!("{}return 1", "-- padding\n".repeat(200)))).unwrap_err();
    assert!(e.to_string().contains("max_source_bytes"), "{e}");
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
    assert_eq!(wait(sb.modules()).unwrap()[0].version, 1);
}

#[test]
fn a_module_that_does_not_return_a_table_is_refused() {
    let node = node();
    for (src, what) in [
        ("return 42", "number"),
        ("return 4.5", "number"),
        ("local x = 1", "nil"),
        ("return 'module'", "string"),
    ] {
        let err =
            graft::block_on(node.create_sandbox(spec("nontable").module("m", src))).expect_err(src);
        match &err {
            Error::ReloadAborted {
                step,
                module,
                message,
                ..
            } => {
                assert_eq!(*step, ReloadStep::Evaluate, "{src}");
                assert_eq!(module.as_deref(), Some("m"), "{src}");
                // (mlua calls an integral number an "integer"; either reads fine.)
                let said = message.contains(&format!("returned a {what} instead of a table"))
                    || (what == "number"
                        && message.contains("returned a integer instead of a table"));
                assert!(said, "{src}: {message}");
            }
            other => panic!("{src}: expected ReloadAborted, got {other:?}"),
        }
    }
    let sb = graft::block_on(node.create_sandbox(spec("nontable-ok").module("counter", COUNTER)))
        .unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    let e = reload_one(&sb, "counter", "return 42").unwrap_err();
    assert_eq!(e.kind(), "reload_aborted", "{e}");
    assert!(e.to_string().contains("instead of a table"), "{e}");
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
    assert_eq!(wait(sb.modules()).unwrap()[0].version, 1);
}

#[test]
fn a_module_that_errors_or_runs_away_while_loading_is_refused() {
    let node = node();
    let err = graft::block_on(node.create_sandbox(
        spec("loaderr").module("m", "local x = 1\nerror('kaboom at load')\nreturn {}"),
    ))
    .err()
    .unwrap();
    assert_eq!(err.kind(), "reload_aborted", "{err}");
    assert!(err.to_string().contains("kaboom at load"), "{err}");

    let fast = limits(|l| l.handler_ms = 100);
    let started = Instant::now();
    let err = graft::block_on(
        node.create_sandbox(
            spec("loadloop")
                .module("m", "while true do end\nreturn {}")
                .limits(fast.clone()),
        ),
    )
    .err()
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("within 100 ms"), "{err}");

    let sb =
        graft::block_on(
            node.create_sandbox(spec("loaderr-ok").module("counter", COUNTER).limits(limits(
                |l| {
                    l.handler_ms = 100;
                    l.memory_bytes = 16 * MB;
                },
            ))),
        )
        .unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    for (round, bad) in [
        "error('kaboom in reload')\nreturn {}",
        "while true do end\nreturn {}",
        "local t = {}\nlocal i = 0\nwhile true do i += 1; t[i] = string.rep('m', 1000) .. i end\nreturn {}",
    ]
    .into_iter()
    .enumerate()
    {
        let e = reload_one(&sb, "counter", bad).unwrap_err();
        assert_eq!(e.kind(), "reload_aborted", "{bad}: {e}");
        // The old code still runs, with its state intact.
        let n = round as u64 + 1;
        assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap_or_else(|e| panic!("after `{bad}`: {e}")), json!(n));
        assert_eq!(wait(sb.state("c")).unwrap(), json!({ "n": n }));
        assert_eq!(wait(sb.modules()).unwrap()[0].version, 1);
    }
}

#[test]
fn a_server_without_handle_call_gives_the_caller_a_readable_error() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("nocall")
                .module(
                    "mute",
                    "return { init = function(args) return { hits = 0 } end }",
                )
                .module("counter", COUNTER),
        ),
    )
    .unwrap();
    wait(sb.spawn("counter", json!(null), Some("c"))).unwrap();
    let pid = wait(sb.spawn("mute", json!(null), Some("mute"))).unwrap();
    let reason = crashed(wait(sb.call("mute", json!("hello"), None)));
    match &reason {
        ExitReason::Error { message, .. } => assert!(message.contains("handle_call"), "{message}"),
        other => panic!("expected an error reason, got {other:?}"),
    }
    let crash = crash_events(&sb).pop().expect("a crash event");
    assert_eq!(crash.detail["process"], json!(pid));
    assert!(
        crash.detail["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("handle_call"),
        "{crash:?}"
    );
    // Casting to a server without handle_cast is just as readable.
    wait(sb.spawn("mute", json!(null), Some("mute2"))).unwrap();
    wait(sb.cast("mute2", json!("hello"))).unwrap();
    assert!(eventually(1000, || crash_events(&sb).len() == 2));
    let crash = crash_events(&sb).pop().unwrap();
    assert!(
        crash.detail["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("handle_cast"),
        "{crash:?}"
    );
    assert_eq!(wait(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
}

#[test]
fn unknown_processes_and_modules_are_clear_errors() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox(
            spec("unknown")
                .module("worker", WORKER)
                .module("lib", "return { helper = function() return 1 end }"),
        ),
    )
    .unwrap();
    wait(sb.spawn("worker", json!(null), Some("w"))).unwrap();
    for target in ["ghost", "<worker.999>", "999", ""] {
        match wait(sb.call(target, json!("x"), None)) {
            Err(Error::NoProcess(t)) => assert_eq!(t, target),
            other => panic!("call {target:?}: expected NoProcess, got {other:?}"),
        }
        assert!(
            matches!(wait(sb.cast(target, json!("x"))), Err(Error::NoProcess(_))),
            "cast {target:?}"
        );
        assert!(
            matches!(wait(sb.send(target, json!("x"))), Err(Error::NoProcess(_))),
            "send {target:?}"
        );
        assert!(
            matches!(wait(sb.state(target)), Err(Error::NoProcess(_))),
            "state {target:?}"
        );
    }
    match wait(sb.spawn("nope", json!(null), None)) {
        Err(Error::NoModule(m)) => assert_eq!(m, "nope"),
        other => panic!("expected NoModule, got {other:?}"),
    }
    let e = wait(sb.spawn("lib", json!(null), None)).unwrap_err();
    assert!(e.to_string().contains("init"), "{e}");
    let r = wait(sb.call("w", json!("spawn_unknown"), None)).unwrap();
    assert_eq!(r["ok"], json!(false), "{r}");
    assert!(
        r["err"].as_str().unwrap().contains("no module `nope`"),
        "{r}"
    );
    // Nothing was created by the failed spawns.
    assert_eq!(wait(sb.info()).unwrap().process_count, 1);
    // Another node-level lookup.
    assert!(matches!(node.sandbox("nope"), Err(Error::NoSandbox(_))));
}

#[test]
fn sandbox_ids_outside_the_pattern_and_duplicates_are_refused() {
    let node = node();
    let long = "a".repeat(65);
    for id in [
        "",
        "Bad",
        "-lead",
        "_lead",
        "a b",
        "a/b",
        "a.b",
        "é",
        "a\n",
        long.as_str(),
    ] {
        match graft::block_on(node.create_sandbox(spec(id).module("counter", COUNTER))) {
            Err(Error::InvalidInput(msg)) => {
                assert!(msg.contains("invalid sandbox id"), "{id:?}: {msg}")
            }
            Err(other) => panic!("{id:?}: expected InvalidInput, got {other:?}"),
            Ok(_) => panic!("{id:?}: a sandbox id outside [a-z0-9][a-z0-9_-]{{0,63}} was accepted"),
        }
    }
    assert!(node.sandbox_ids().is_empty());
    let max = "z".repeat(64);
    for id in ["a", "0", "a-b_c9", max.as_str()] {
        graft::block_on(node.create_sandbox(spec(id).module("counter", COUNTER)))
            .unwrap_or_else(|e| panic!("{id:?}: {e}"));
    }

    let first = node.sandbox("a").unwrap();
    wait(first.spawn("counter", json!(null), Some("c"))).unwrap();
    assert_eq!(wait(first.call("c", json!("inc"), None)).unwrap(), json!(1));
    match graft::block_on(node.create_sandbox(spec("a").module("other", COUNTER))) {
        Err(Error::SandboxExists(id)) => assert_eq!(id, "a"),
        Err(other) => panic!("expected SandboxExists, got {other:?}"),
        Ok(_) => panic!("a duplicate sandbox id was accepted"),
    }
    // The existing sandbox is untouched by the refused duplicate.
    assert_eq!(wait(first.call("c", json!("inc"), None)).unwrap(), json!(2));
    assert_eq!(
        wait(first.modules())
            .unwrap()
            .iter()
            .map(|m| m.name.clone())
            .collect::<Vec<_>>(),
        vec!["counter"]
    );

    // Other malformed specs: unknown capability, impossible limits.
    let e =
        graft::block_on(node.create_sandbox(spec("caps").module("counter", COUNTER).grant("fs")))
            .err()
            .unwrap();
    assert!(
        matches!(&e, Error::InvalidInput(m) if m.contains("fs")),
        "{e:?}"
    );
    let e = graft::block_on(
        node.create_sandbox(
            spec("lims")
                .module("counter", COUNTER)
                .limits(limits(|l| l.memory_bytes = 0)),
        ),
    )
    .err()
    .unwrap();
    assert!(
        matches!(&e, Error::LimitOutOfRange { field, .. } if field == "memory_bytes"),
        "{e:?}"
    );
    let e = graft::block_on(
        node.create_sandbox(
            spec("lims")
                .module("counter", COUNTER)
                .limits(limits(|l| l.handler_ms = 0)),
        ),
    )
    .err()
    .unwrap();
    assert!(
        matches!(&e, Error::LimitOutOfRange { field, .. } if field == "handler_ms"),
        "{e:?}"
    );
}

/// Whether `text` names `name` as a whole word (`os` in "`os` is not granted",
/// not in "position").
fn names(text: &str, name: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(name).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// How a sandbox refuses a module that uses something it was not granted.
#[derive(Debug)]
enum Refusal {
    /// At load time (static analysis): the diagnostic mentioning the name.
    Compile(graft::Diagnostic),
    /// At run time: the crash message of the callback that used it.
    Runtime(String),
}

/// Loads `src` (a server whose `handle_call` uses an ungranted `name`) and
/// calls it once; returns how the use was refused. Accepts both a load-time
/// refusal (SPEC §2, once static analysis is wired in) and a run-time one.
fn refusal(node: &Node, id: &str, src: &str, name: &str, host: HostFunctions) -> Refusal {
    match graft::block_on(node.create_sandbox_with(spec(id).module("m", src), host)) {
        Err(Error::Compile { diagnostics }) => Refusal::Compile(
            diagnostics
                .into_iter()
                .find(|d| names(&d.message, name))
                .unwrap_or_else(|| panic!("{name}: no diagnostic names it")),
        ),
        Err(other) => panic!("{name}: expected a compile error or a sandbox, got {other:?}"),
        Ok(sb) => {
            wait(sb.spawn("m", json!(null), Some("m"))).unwrap();
            let reason = crashed(wait(sb.call("m", json!("go"), None)));
            node.destroy(id).unwrap();
            match reason {
                ExitReason::Error { message, .. } => Refusal::Runtime(message),
                other => panic!("{name}: expected an error, got {other:?}"),
            }
        }
    }
}

/// A server whose `handle_call` (line 4) evaluates `expr`.
fn server_using(expr: &str) -> String {
    format!("local m = {{}}\nfunction m.init() return {{}} end\nfunction m.handle_call(r, f, s)\n  return {expr}, s\nend\nreturn m\n")
}

/// Asserts the refusal names `name` and points at line 4 of the module.
fn assert_clear_refusal(r: &Refusal, name: &str) {
    match r {
        Refusal::Compile(d) => {
            assert_eq!(d.kind, "ungranted_global", "{name}: {d:?}");
            assert_eq!((d.line, d.column), (4, 10), "{name}: {d:?}");
        }
        Refusal::Runtime(message) => {
            assert!(
                message.contains(":4:"),
                "{name}: the error has no line: {message}"
            );
            assert!(
                names(message, name),
                "{name}: the run-time error does not name `{name}`: {message}"
            );
        }
    }
}

#[test]
fn ungranted_os_and_io_are_refused_with_an_error_naming_them() {
    let node = node();
    for (name, expr) in [("os", "os.time()"), ("io", "io.write('x')")] {
        let r = refusal(
            &node,
            "ungranted",
            &server_using(expr),
            name,
            HostFunctions::default(),
        );
        assert_clear_refusal(&r, name);
    }
    // Granted, `os` exists.
    let sb = graft::block_on(
        node.create_sandbox(
            spec("clock")
                .grant("clock")
                .module("m", server_using("os.time()")),
        ),
    )
    .unwrap();
    wait(sb.spawn("m", json!(null), Some("m"))).unwrap();
    assert!(
        wait(sb.call("m", json!(null), None))
            .unwrap()
            .as_f64()
            .unwrap()
            > 1.6e9
    );
}

#[test]
fn ungranted_globals_in_eval_and_reload_are_refused_and_running_code_is_untouched() {
    let node = node();
    let plain =
        graft::block_on(node.create_sandbox(spec("noclock").module("counter", COUNTER))).unwrap();
    wait(plain.spawn("counter", json!(null), Some("c"))).unwrap();
    let e = wait(plain.eval("return os.time()")).unwrap_err();
    assert!(
        names(&e.to_string(), "os"),
        "eval: the error does not name `os`: {e}"
    );
    match reload_one(
        &plain,
        "counter",
        &COUNTER.replace("return state.n, state", "return os.clock(), state"),
    ) {
        Err(e) => assert!(names(&e.to_string(), "os"), "reload: {e}"),
        Ok(report) => {
            // Accepted for now (no static analysis): the use fails at run time
            // and the error must say what is missing.
            assert_eq!(report.status, graft::ReloadStatus::Reloaded);
            match crashed(wait(plain.call("c", json!("inc"), None))) {
                ExitReason::Error { message, .. } => {
                    assert!(
                        names(&message, "os"),
                        "the run-time error does not name `os`: {message}"
                    )
                }
                other => panic!("expected an error, got {other:?}"),
            }
        }
    }
}

#[test]
fn escape_hatches_do_not_exist_in_the_sandbox() {
    let node = node();
    for name in [
        "getfenv",
        "setfenv",
        "loadstring",
        "load",
        "dofile",
        "loadfile",
        "debug",
        "_G",
        "collectgarbage",
        "newproxy",
        "io",
        "os",
        "gcinfo",
        "require_internal",
    ] {
        let src = server_using(&format!("type({name})"));
        match graft::block_on(node.create_sandbox(spec("escape").module("m", &src))) {
            Err(Error::Compile { diagnostics }) => {
                assert!(
                    diagnostics.iter().any(|d| names(&d.message, name)),
                    "{name}: {diagnostics:?}"
                );
            }
            Err(other) => panic!("{name}: expected a compile error or a sandbox, got {other:?}"),
            Ok(sb) => {
                wait(sb.spawn("m", json!(null), Some("m"))).unwrap();
                assert_eq!(
                    wait(sb.call("m", json!(null), None)).unwrap(),
                    json!("nil"),
                    "`{name}` exists in the sandbox"
                );
                node.destroy("escape").unwrap();
            }
        }
    }
}

#[test]
fn math_random_needs_the_random_grant() {
    let node = node();
    let r = refusal(
        &node,
        "norandom",
        &server_using("math.random()"),
        "random",
        HostFunctions::default(),
    );
    match &r {
        Refusal::Compile(d) => assert_eq!(d.line, 4, "{d:?}"),
        Refusal::Runtime(message) => {
            assert!(message.contains(":4:"), "{message}");
            assert!(
                message.contains("math.random") || names(message, "random"),
                "the error does not name `math.random`: {message}"
            );
        }
    }
    let sb = graft::block_on(
        node.create_sandbox(
            spec("random")
                .grant("random")
                .module("m", server_using("math.random()")),
        ),
    )
    .unwrap();
    wait(sb.spawn("m", json!(null), Some("m"))).unwrap();
    let x = wait(sb.call("m", json!(null), None))
        .unwrap()
        .as_f64()
        .unwrap();
    assert!((0.0..1.0).contains(&x), "{x}");
}

const USES_HOST: &str = r#"
local m = {}
function m.init(args) return {} end
function m.handle_call(req, from, state)
  if req == "get" then
    local v, err = kv.get("answer")
    return { v = v, err = err }, state
  elseif req == "fail" then
    local v, err = kv.get("missing")
    return { v = v, err = err }, state
  elseif req == "greet" then
    return greet("ada"), state
  elseif req == "greet_self" then
    return greet(graft.self()), state
  end
  return "?", state
end
return m
"#;

fn kv_and_greet() -> HostFunctions {
    HostFunctions::default()
        .function("kv.get", |args| {
            match args.first().and_then(|a| a.as_str()) {
                Some("answer") => Ok(json!({"value": 42})),
                Some(other) => Err(format!("no key {other}")),
                None => Err("expected a key".into()),
            }
        })
        .function("greet", |args| {
            Ok(json!(format!("hello, {}", args[0].as_str().unwrap_or("?"))))
        })
}

#[test]
fn granted_host_functions_are_callable_from_luau() {
    let node = node();
    let sb = graft::block_on(
        node.create_sandbox_with(spec("host").module("m", USES_HOST), kv_and_greet()),
    )
    .unwrap();
    wait(sb.spawn("m", json!(null), Some("m"))).unwrap();
    assert_eq!(
        wait(sb.call("m", json!("get"), None)).unwrap(),
        json!({"v": {"value": 42}})
    );
    assert_eq!(
        wait(sb.call("m", json!("fail"), None)).unwrap(),
        json!({"err": "kv.get: no key missing"})
    );
    assert_eq!(
        wait(sb.call("m", json!("greet"), None)).unwrap(),
        json!("hello, ada")
    );
    // Pids reach host functions as the same `<module.N>` strings the API shows.
    let listed = wait(sb.processes()).unwrap();
    let pid = &listed
        .iter()
        .find(|p| p.name.as_deref() == Some("m"))
        .unwrap()
        .pid;
    assert_eq!(
        wait(sb.call("m", json!("greet_self"), None)).unwrap(),
        json!(format!("hello, {pid}"))
    );
    assert_eq!(pid.module(), "m", "{pid}");
    let info = wait(sb.info()).unwrap();
    assert!(
        info.capabilities.contains(&"kv.get".to_string()),
        "{:?}",
        info.capabilities
    );
    assert!(
        info.capabilities.contains(&"greet".to_string()),
        "{:?}",
        info.capabilities
    );
}

#[test]
fn ungranted_host_functions_are_refused_with_an_error_naming_them() {
    let node = node();
    // Not registered for this sandbox at all.
    for (name, expr) in [("kv", "kv.get('answer')"), ("greet", "greet('ada')")] {
        let r = refusal(
            &node,
            "nohost",
            &server_using(expr),
            name,
            HostFunctions::default(),
        );
        assert_clear_refusal(&r, name);
    }
    // Registered for another sandbox of the same node: still absent here.
    let _granted = graft::block_on(
        node.create_sandbox_with(spec("granted").module("m", USES_HOST), kv_and_greet()),
    )
    .unwrap();
    let r = refusal(
        &node,
        "sibling",
        &server_using("greet('x')"),
        "greet",
        HostFunctions::default(),
    );
    assert_clear_refusal(&r, "greet");
    // A function of a granted namespace that was not registered does not exist.
    let r = refusal(
        &node,
        "partial",
        &server_using("kv.put('k', 1)"),
        "put",
        kv_and_greet(),
    );
    match &r {
        Refusal::Compile(d) => assert_eq!(d.line, 4, "{d:?}"),
        Refusal::Runtime(message) => {
            assert!(message.contains(":4:"), "{message}");
            assert!(
                message.contains("kv.put") || names(message, "put"),
                "the error does not name `kv.put`: {message}"
            );
        }
    }
}

#[test]
fn entry_args_reach_init_and_oversize_args_are_refused() {
    use graft::{Node, SandboxSpec};
    let app = r#"return {
        init = function(args) return { args = args } end,
        handle_call = function(_, _, s) return s.args, s end,
    }"#;
    let node = Node::with_threads(1);
    let args = serde_json::json!({ "port": 8080, "names": ["a", "b"] });
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("args")
                .module("app", app)
                .entry_args(args.clone()),
        ),
    )
    .unwrap();
    graft::block_on(sb.wait_app_started()).unwrap();
    let procs = graft::block_on(sb.processes()).unwrap();
    let pid = procs
        .iter()
        .find(|p| p.module == "app")
        .unwrap()
        .pid
        .clone();
    assert_eq!(
        graft::block_on(sb.call(&pid, serde_json::json!(0), None)).unwrap(),
        args
    );
    // Bigger than max_message_bytes: refused like any message, nothing created.
    let limits = graft::Limits {
        max_message_bytes: 1024,
        ..Default::default()
    };
    let big = serde_json::json!("x".repeat(4096));
    let err = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("bigargs")
                .module("app", app)
                .limits(limits)
                .entry_args(big),
        ),
    )
    .expect_err("oversize entry args are refused");
    assert_eq!(err.kind(), "invalid_input", "{err}");
    assert!(err.to_string().contains("max_message_bytes"), "{err}");
    assert!(node.sandbox("bigargs").is_err());
}
