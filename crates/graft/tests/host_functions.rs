//! Host functions as an embedder uses them: the caller's context, and
//! blocking host functions that run on the node's pool instead of the
//! scheduler threads (so a slow one holds up only its caller).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft::{block_on, HostFunctions, Limits, Node, NodeLimits, Sandbox, SandboxSpec};
use serde_json::{json, Value as Json};

/// A module calling `ns.f(...)`, for a namespace known when the test writes it.
fn caller_module(call: &str) -> String {
    format!(
        r#"
local m = {{}}
function m.init(_) return {{}} end
function m.handle_call(req, _, state)
  if req == "ping" then return "pong", state end
  local v, err = {call}
  return {{ v = v, err = err }}, state
end
return m
"#
    )
}

fn sandbox(node: &Node, id: &str, module: &str, host: HostFunctions) -> Sandbox {
    sandbox_with(node, id, module, host, Limits::default())
}

fn sandbox_with(
    node: &Node,
    id: &str,
    module: &str,
    host: HostFunctions,
    limits: Limits,
) -> Sandbox {
    let spec = SandboxSpec::new(id)
        .entry(None)
        .limits(limits)
        .module("m", module);
    graft::block_on(node.create_sandbox_with(spec, host)).expect("sandbox")
}

fn spawn(sb: &Sandbox) -> graft::Pid {
    block_on(sb.spawn("m", json!(null), None)).expect("spawn")
}

fn call(sb: &Sandbox, pid: impl Into<graft::Target>, req: Json) -> Json {
    block_on(sb.call(pid, req, None)).expect("call")
}

fn sleeper(ms: u64) -> HostFunctions {
    HostFunctions::default().blocking("io.sleep", move |call| {
        std::thread::sleep(Duration::from_millis(ms));
        Ok(json!(call.pid))
    })
}

#[test]
fn a_blocking_host_function_does_not_hold_up_an_unrelated_sandbox() {
    let node = Node::with_threads(2);
    let slow = sandbox(&node, "slow", &caller_module("io.sleep()"), sleeper(300));
    let fast = sandbox(
        &node,
        "fast",
        &caller_module("nil"),
        HostFunctions::default(),
    );
    let fast_pid = spawn(&fast);
    let sleepers: Vec<graft::Pid> = (0..3).map(|_| spawn(&slow)).collect();
    let pong = spawn(&slow);

    let started = Instant::now();
    let handles: Vec<_> = sleepers
        .iter()
        .map(|pid| {
            let (sb, pid) = (slow.clone(), pid.clone());
            std::thread::spawn(move || (pid.clone(), call(&sb, &pid, json!("sleep"))))
        })
        .collect();
    // Let the three calls reach the host function.
    std::thread::sleep(Duration::from_millis(50));

    let t = Instant::now();
    assert_eq!(call(&fast, &fast_pid, json!("ping")), json!("pong"));
    let unrelated = t.elapsed();
    let t = Instant::now();
    assert_eq!(call(&slow, &pong, json!("ping")), json!("pong"));
    let same_sandbox = t.elapsed();
    // ~300 ms if the host function held a scheduler thread; generous for CI.
    assert!(unrelated < Duration::from_millis(100), "{unrelated:?}");
    assert!(
        same_sandbox < Duration::from_millis(100),
        "{same_sandbox:?}"
    );

    for h in handles {
        let (pid, reply) = h.join().unwrap();
        // The function ran for the process that called it.
        assert_eq!(reply, json!({ "v": pid }));
    }
    let all = started.elapsed();
    // The three ran side by side on the pool, not one after another.
    assert!(all >= Duration::from_millis(300), "{all:?}");
    assert!(all < Duration::from_millis(800), "{all:?}");
}

#[test]
fn host_functions_learn_their_caller() {
    let host = HostFunctions::default()
        .function_with_context("ctx.quick", |call| {
            Ok(json!({ "sandbox": call.sandbox, "pid": call.pid, "args": call.args }))
        })
        .blocking("ctx.slow", |call| {
            Ok(json!({ "sandbox": call.sandbox, "pid": call.pid, "args": call.args }))
        })
        .function("ctx.plain", |args| Ok(json!(args.len())));
    let node = Node::with_threads(2);
    let module = caller_module(
        r#"{ quick = ctx.quick(1, "a"), slow = ctx.slow({ k = true }), plain = ctx.plain(1, 2, 3) }"#,
    );
    let sb = sandbox(&node, "who", &module, host);
    let pid = spawn(&sb);
    let reply = call(&sb, &pid, json!("go"));
    assert_eq!(
        reply,
        json!({ "v": {
            "quick": { "sandbox": "who", "pid": pid, "args": [1, "a"] },
            "slow": { "sandbox": "who", "pid": pid, "args": [{ "k": true }] },
            "plain": 3,
        }})
    );
    assert_eq!(pid.module(), "m", "{pid}");
}

#[test]
fn a_panicking_blocking_host_function_is_an_error_for_its_caller() {
    let host = HostFunctions::default().blocking("x.boom", |_| panic!("kaboom"));
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "boom", &caller_module("x.boom()"), host);
    let pid = spawn(&sb);
    let reply = call(&sb, &pid, json!("go"));
    assert_eq!(reply, json!({ "err": "x.boom: panicked: kaboom" }));
    // The process, the sandbox and the pool thread all live on.
    let reply = call(&sb, &pid, json!("go"));
    assert_eq!(reply, json!({ "err": "x.boom: panicked: kaboom" }));
    assert_eq!(call(&sb, &pid, json!("ping")), json!("pong"));
}

#[test]
fn a_blocking_host_function_that_outlives_handler_ms_times_its_caller_out() {
    let returned = Arc::new(AtomicUsize::new(0));
    let r = returned.clone();
    let host = HostFunctions::default().blocking("io.hang", move |_| {
        std::thread::sleep(Duration::from_millis(600));
        r.fetch_add(1, Ordering::SeqCst);
        Ok(json!("late"))
    });
    let node = Node::with_threads(2);
    let limits = Limits {
        handler_ms: 100,
        ..Limits::default()
    };
    let sb = sandbox_with(&node, "hang", &caller_module("io.hang()"), host, limits);
    let pid = spawn(&sb);
    let t = Instant::now();
    let reply = call(&sb, &pid, json!("go"));
    let took = t.elapsed();
    assert_eq!(
        reply,
        json!({ "err": "io.hang: timeout after 100 ms (handler_ms)" })
    );
    // The timer runs on the node's millisecond clock: allow its rounding.
    assert!(took >= Duration::from_millis(98), "{took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(call(&sb, &pid, json!("ping")), json!("pong"));
    // The late result is dropped: the process is not resumed a second time
    // and its next calls get their own answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while returned.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(returned.load(Ordering::SeqCst), 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(call(&sb, &pid, json!("ping")), json!("pong"));
}

#[test]
fn destroying_a_sandbox_during_a_blocking_call_drops_the_result() {
    let returned = Arc::new(AtomicUsize::new(0));
    let r = returned.clone();
    let host = HostFunctions::default().blocking("io.slow", move |_| {
        std::thread::sleep(Duration::from_millis(200));
        r.fetch_add(1, Ordering::SeqCst);
        Ok(json!("done"))
    });
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "doomed", &caller_module("io.slow()"), host.clone());
    let pid = spawn(&sb);
    let waiter = {
        let sb = sb.clone();
        std::thread::spawn(move || block_on(sb.call(&pid, json!("go"), None)))
    };
    std::thread::sleep(Duration::from_millis(50));
    node.destroy("doomed").unwrap();
    let err = waiter.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            graft::Error::NoSandbox(_) | graft::Error::SandboxStopped(_)
        ),
        "{err:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while returned.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(returned.load(Ordering::SeqCst), 1);
    // A sandbox of the same id starts clean, with its own calls.
    let again = sandbox(&node, "doomed", &caller_module("io.slow()"), host);
    let pid = spawn(&again);
    assert_eq!(call(&again, &pid, json!("go")), json!({ "v": "done" }));
}

#[test]
fn blocking_host_function_arguments_and_results_are_capped() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let host = HostFunctions::default().blocking("io.echo", move |call| {
        c.fetch_add(1, Ordering::SeqCst);
        match call.args.first().and_then(Json::as_u64) {
            Some(n) => Ok(json!("x".repeat(n as usize))),
            None => Ok(json!(null)),
        }
    });
    let node = Node::with_limits(
        2,
        NodeLimits {
            max_value_bytes: 1024,
            ..NodeLimits::default()
        },
    );
    // The big argument is built in the guest: the host's request is capped too.
    let module = caller_module(r#"io.echo(req.n, string.rep("y", req.big or 0))"#);
    let limits = Limits {
        max_message_bytes: 1024,
        ..Limits::default()
    };
    let sb = sandbox_with(&node, "caps", &module, host, limits);
    let pid = spawn(&sb);

    let reply = call(&sb, &pid, json!({ "n": 1, "big": 4096 }));
    let err = reply["err"].as_str().unwrap();
    assert!(err.starts_with("io.echo: value too large"), "{err}");
    assert!(err.contains("argument 2"), "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "not called with a refused argument"
    );

    let reply = call(&sb, &pid, json!({ "n": 4096 }));
    let err = reply["err"].as_str().unwrap();
    assert!(err.starts_with("io.echo: result too large"), "{err}");

    let reply = call(&sb, &pid, json!({ "n": 3 }));
    assert_eq!(reply, json!({ "v": "xxx" }));
}

#[test]
fn blocking_calls_beyond_the_node_cap_queue() {
    let node = Node::with_limits(
        2,
        NodeLimits {
            max_blocking_host_calls: 1,
            ..NodeLimits::default()
        },
    );
    let sb = sandbox(&node, "capped", &caller_module("io.sleep()"), sleeper(150));
    let pids: Vec<graft::Pid> = (0..2).map(|_| spawn(&sb)).collect();
    let t = Instant::now();
    let handles: Vec<_> = pids
        .iter()
        .map(|pid| {
            let (sb, pid) = (sb.clone(), pid.clone());
            std::thread::spawn(move || call(&sb, &pid, json!("go")))
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap()["v"].is_string());
    }
    // One pool thread: the second call waited for the first.
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
}

#[test]
fn a_blocking_host_function_outside_a_process_is_refused() {
    let host = HostFunctions::default().blocking("io.now", |_| Ok(json!(1)));
    let node = Node::with_threads(1);
    // The module body runs at load time, in no process.
    let module = r#"
local v, err = io.now()
local m = {}
function m.init(_) return {} end
function m.handle_call(_, _, s) return { v = v, err = err }, s end
return m
"#;
    let sb = sandbox(&node, "body", module, host);
    let pid = spawn(&sb);
    let reply = call(&sb, &pid, json!("go"));
    let err = reply["err"].as_str().unwrap();
    assert!(
        err.contains("io.now: can only be called from a process"),
        "{err}"
    );
}

#[test]
fn a_blocking_call_in_a_nested_callback_suspends_its_process() {
    let node = Node::with_threads(2);
    // `outer` calls `inner` (run nested inside the caller when idle), whose
    // handler calls the blocking function.
    let module = r#"
local m = {}
function m.init(_) return {} end
function m.handle_call(req, _, state)
  if req.via then
    return graft.call(req.via, { direct = true }), state
  end
  return io.sleep(), state
end
return m
"#;
    let sb = sandbox(&node, "nested", module, sleeper(20));
    let outer = spawn(&sb);
    let inner = block_on(sb.spawn("m", json!(null), Some("inner"))).unwrap();
    assert_eq!(call(&sb, &outer, json!({ "via": "inner" })), json!(inner));
}

/// A handler may wait on a blocking host function inside its own
/// coroutines: the wait is forwarded up to the process's worker and the
/// coroutine gets the answer, never an internal marker. `graft.call` there
/// is refused with a clear error (its nested fast path runs on the worker).
#[test]
fn blocking_host_functions_work_inside_guest_coroutines() {
    let node = Node::with_threads(2);
    let host = HostFunctions::default().blocking("io.echo", |call| {
        std::thread::sleep(Duration::from_millis(5));
        Ok(json!({ "echo": call.args[0].clone() }))
    });
    let module = r#"
local m = {}
function m.init(_) return {} end
function m.handle_call(req, _, state)
  if req == "peer" then return "peer-reply", state end
  if req == "wrap" then
    local f = coroutine.wrap(function(x)
      local v = io.echo(x)
      local y = coroutine.yield(v.echo)
      return y .. "+" .. io.echo("z").echo
    end)
    local first = f("a")
    local second = f("b")
    return { first = first, second = second }, state
  end
  if req == "resume" then
    local co = coroutine.create(function()
      local a = io.echo("c").echo
      local b = io.echo("d").echo
      return a, b
    end)
    local ok, a, b = coroutine.resume(co)
    return { ok = ok, a = a, b = b, status = coroutine.status(co) }, state
  end
  if req == "error" then
    local f = coroutine.wrap(function()
      io.echo("d")
      error("inner failure", 0)
    end)
    local ok, err = pcall(f)
    return { ok = ok, err = err }, state
  end
  if req == "call" then
    local co = coroutine.create(function() return graft.call("peer", "peer") end)
    local ok, err = coroutine.resume(co)
    return { ok = ok, err = err }, state
  end
  if req == "spawn" then
    local co = coroutine.create(function() return graft.spawn("m", nil) end)
    local ok, err = coroutine.resume(co)
    return { ok = ok, err = err }, state
  end
  return nil, state
end
return m
"#;
    let sb = sandbox(&node, "co", module, host);
    block_on(sb.spawn("m", json!(null), Some("peer"))).expect("peer");
    block_on(sb.spawn("m", json!(null), Some("me"))).expect("me");
    let wrap = block_on(sb.call("me", json!("wrap"), None)).expect("wrap");
    assert_eq!(wrap, json!({ "first": "a", "second": "b+z" }));
    let resume = block_on(sb.call("me", json!("resume"), None)).expect("resume");
    assert_eq!(
        resume,
        json!({ "ok": true, "a": "c", "b": "d", "status": "dead" })
    );
    let err = block_on(sb.call("me", json!("error"), None)).expect("error");
    assert_eq!(err, json!({ "ok": false, "err": "inner failure" }));
    let call = block_on(sb.call("me", json!("call"), None)).expect("call");
    assert_eq!(call["ok"], false);
    assert!(
        call["err"]
            .as_str()
            .is_some_and(|e| e.contains("cannot be used inside a coroutine")),
        "{call}"
    );
    // Nor does a spawn (the fast path checks that it runs on the worker).
    let procs_before = block_on(sb.info()).expect("info").process_count;
    let spawn = block_on(sb.call("me", json!("spawn"), None)).expect("spawn");
    assert_eq!(spawn["ok"], false);
    assert!(
        spawn["err"]
            .as_str()
            .is_some_and(|e| e.contains("cannot be used inside a coroutine")),
        "{spawn}"
    );
    assert_eq!(
        block_on(sb.info()).expect("info").process_count,
        procs_before
    );
    // The process is still fine.
    assert_eq!(
        block_on(sb.call("me", json!("peer"), None)).expect("alive"),
        "peer-reply"
    );
}
