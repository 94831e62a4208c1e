//! `Sandbox::call_blocking`: the synchronous host call that runs the handler
//! on the caller's thread when the sandbox is idle. It must answer exactly
//! like `Sandbox::call` whichever thread ends up running the handler: when
//! the sandbox is busy, after earlier requests, under a looping handler, and
//! from many threads at once.

mod common;
use common::{limits, run};
use std::time::{Duration, Instant};

use graft::{Error, ExitReason, Node, Sandbox, SandboxSpec};
use serde_json::json;

const COUNTER: &str = r#"
local m = {}
function m.init(args) return { count = 0 } end
function m.handle_call(req, from, state)
  if req == "inc" then state.count += 1 end
  return state.count, state
end
function m.handle_cast(msg, state)
  state.count += msg
  return state
end
return m
"#;

/// `spin` keeps its sandbox busy for `ms` (yielding at every slice end);
/// `loop` never returns.
const WORKER: &str = r#"
local m = {}
function m.init(args) return {} end
function m.handle_call(req, from, state)
  if req == "loop" then while true do end end
  return "ok", state
end
function m.handle_cast(ms, state)
  local t0 = graft.now()
  while graft.now() - t0 < ms do end
  return state
end
return m
"#;

/// For the handler-runs-now path: a callback that crashes, one that spins
/// past a slice, and a pair that wait on each other (`a` calls `b`, which
/// calls `a` back: both wait until `b`'s 3 s call times out).
const EDGES: &str = r#"
local m = {}
function m.init(args) return {} end
function m.handle_call(req, from, state)
  if req == "crash" then error("boom") end
  if req == "spin" then
    local t0 = graft.now()
    while graft.now() - t0 < 30 do end
    return "spun", state
  end
  if req == "sort" then
    -- 300 ms where the callback cannot be preempted (a comparator), then
    -- a few safepoints where it is.
    local t, t0 = { 3, 1, 2 }, graft.now()
    table.sort(t, function(x, y)
      while graft.now() - t0 < 300 do end
      return x < y
    end)
    for _ = 1, 100 do graft.now() end
    return "sorted", state
  end
  if req == "wait" then return graft.call("b", "back", 3000), state end
  if req == "back" then return graft.call("a", "ping", 3000), state end
  return "pong", state
end
return m
"#;

fn sandbox(node: &Node, id: &str, handler_ms: u64) -> Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new(id)
                .entry(None)
                .module("counter", COUNTER)
                .module("worker", WORKER)
                .module("edges", EDGES)
                .limits(limits(|l| l.handler_ms = handler_ms)),
        ),
    )
    .expect("sandbox");
    run(sb.spawn("counter", json!(null), Some("c"))).expect("spawn counter");
    sb
}

#[test]
fn call_blocking_answers_like_call() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "happy", 1000);
    for i in 1..=100 {
        assert_eq!(sb.call_blocking("c", json!("inc"), None).unwrap(), json!(i));
    }
    assert_eq!(run(sb.call("c", json!("get"), None)).unwrap(), json!(100));
    assert!(matches!(
        sb.call_blocking("nobody", json!("inc"), None),
        Err(Error::NoProcess(_))
    ));
    node.destroy("happy").unwrap();
    assert!(matches!(
        sb.call_blocking("c", json!("inc"), None),
        Err(Error::NoSandbox(_))
    ));
}

#[test]
fn a_cast_then_a_call_blocking_sees_the_cast() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "order", 1000);
    for i in 1..=50 {
        run(sb.cast("c", json!(10))).unwrap();
        assert_eq!(
            sb.call_blocking("c", json!("get"), None).unwrap(),
            json!(10 * i)
        );
    }
}

#[test]
fn call_blocking_on_a_busy_sandbox_queues_and_still_answers() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "busy", 1000);
    run(sb.spawn("worker", json!(null), Some("w"))).unwrap();
    // `w` keeps the sandbox scheduled for ~200 ms, over many slices: the
    // calls below find it queued or running and take the queue.
    run(sb.cast("w", json!(200))).unwrap();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(150) {
        n += 1;
        assert_eq!(sb.call_blocking("c", json!("inc"), None).unwrap(), json!(n));
    }
    assert_eq!(
        sb.call_blocking("w", json!("x"), None).unwrap(),
        json!("ok")
    );
}

#[test]
fn a_looping_handler_times_out_and_the_node_keeps_serving() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "loop", 100);
    let bystander = sandbox(&node, "bystander", 1000);
    run(sb.spawn("worker", json!(null), Some("w"))).unwrap();
    let started = Instant::now();
    match sb.call_blocking("w", json!("loop"), None) {
        Err(Error::Crashed { reason, .. }) => assert_eq!(reason, ExitReason::Timeout),
        other => panic!("expected a timeout crash, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // A call timeout shorter than the handler's: the caller stops waiting.
    run(sb.spawn("worker", json!(null), Some("w2"))).unwrap();
    run(sb.cast("w2", json!(300))).unwrap();
    let r = sb.call_blocking("w2", json!("x"), Some(50));
    assert!(matches!(r, Err(Error::CallTimeout { .. })), "{r:?}");
    assert_eq!(sb.call_blocking("c", json!("inc"), None).unwrap(), json!(1));
    assert_eq!(
        bystander.call_blocking("c", json!("inc"), None).unwrap(),
        json!(1)
    );
}

#[test]
fn concurrent_call_blocking_from_eight_threads_counts_every_call() {
    const THREADS: usize = 8;
    const CALLS: usize = 500;
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "many", 1000);
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let sb = sb.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                for _ in 0..CALLS {
                    let n = sb.call_blocking("c", json!("inc"), None).unwrap();
                    let n = n.as_u64().unwrap();
                    assert!(n > last, "one thread's calls are answered in order");
                    last = n;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("caller thread");
    }
    assert_eq!(
        sb.call_blocking("c", json!("get"), None).unwrap(),
        json!(THREADS * CALLS)
    );
}

// The tests below call an idle sandbox, so the handler runs at once on the
// calling thread; each checks an outcome other than a plain reply.

#[test]
fn a_crash_in_a_handler_run_at_once_answers_crashed_and_spares_the_rest() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "crash", 1000);
    run(sb.spawn("edges", json!(null), Some("e"))).unwrap();
    match sb.call_blocking("e", json!("crash"), None) {
        Err(Error::Crashed { reason, .. }) => {
            assert!(matches!(reason, ExitReason::Error { .. }), "{reason:?}")
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    assert!(matches!(
        sb.call_blocking("e", json!("ping"), None),
        Err(Error::NoProcess(_))
    ));
    run(sb.spawn("edges", json!(null), Some("e"))).unwrap();
    assert_eq!(
        sb.call_blocking("e", json!("ping"), None).unwrap(),
        json!("pong")
    );
    assert_eq!(sb.call_blocking("c", json!("inc"), None).unwrap(), json!(1));
}

#[test]
fn a_handler_run_at_once_that_outlasts_its_slice_finishes_later() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "spin", 1000);
    run(sb.spawn("edges", json!(null), Some("e"))).unwrap();
    for _ in 0..3 {
        assert_eq!(
            sb.call_blocking("e", json!("spin"), None).unwrap(),
            json!("spun")
        );
    }
}

#[test]
fn a_handler_run_at_once_that_waits_still_times_out_its_caller() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "wait", 1000);
    run(sb.spawn("edges", json!(null), Some("a"))).unwrap();
    run(sb.spawn("edges", json!(null), Some("b"))).unwrap();
    // `a` suspends in its call to `b`: the caller's own 100 ms timeout
    // must still be armed although the handler started on this thread.
    let started = Instant::now();
    let r = sb.call_blocking("a", json!("wait"), Some(100));
    assert!(matches!(r, Err(Error::CallTimeout { .. })), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered by the caller's timeout, not by `b`'s 3 s one: {:?}",
        started.elapsed()
    );
    assert_eq!(sb.call_blocking("c", json!("inc"), None).unwrap(), json!(1));
}

#[test]
fn the_timeout_of_a_call_run_at_once_counts_from_the_call() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "sort", 1000);
    run(sb.spawn("edges", json!(null), Some("e"))).unwrap();
    // The callback holds its thread 300 ms in a comparator; the caller asked
    // for 100 ms: it is told so when the callback first stops, not given the
    // reply because the 100 ms were counted from there.
    let r = sb.call_blocking("e", json!("sort"), Some(100));
    assert!(matches!(r, Err(Error::CallTimeout { .. })), "{r:?}");
    assert_eq!(
        sb.call_blocking("e", json!("ping"), None).unwrap(),
        json!("pong")
    );
}

/// A `call_blocking` from a thread-local's destructor, after the thread's
/// own slice state is gone, queues instead of running here, and answers:
/// the caller's exiting thread must not fail the sandbox.
#[test]
fn call_blocking_at_thread_exit_answers_and_leaves_the_sandbox_working() {
    use std::cell::RefCell;
    use std::sync::mpsc;
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "exit", 1000);
    type Pending = Option<(Sandbox, mpsc::Sender<graft::Result<serde_json::Value>>)>;
    struct CallOnExit(RefCell<Pending>);
    impl Drop for CallOnExit {
        fn drop(&mut self) {
            if let Some((sb, tx)) = self.0.borrow_mut().take() {
                let _ = tx.send(sb.call_blocking("c", json!("inc"), None));
            }
        }
    }
    thread_local!(static ON_EXIT: CallOnExit = const { CallOnExit(RefCell::new(None)) });
    let (tx, rx) = mpsc::channel();
    let sb2 = sb.clone();
    std::thread::spawn(move || {
        // Registered first, so destroyed after the slice's own state
        // (destructors run in reverse order of registration on Linux).
        ON_EXIT.with(|c| *c.0.borrow_mut() = Some((sb2.clone(), tx)));
        assert_eq!(
            sb2.call_blocking("c", json!("inc"), None).unwrap(),
            json!(1)
        );
    })
    .join()
    .expect("the thread exits");
    let at_exit = rx.recv_timeout(Duration::from_secs(5)).expect("answered");
    assert_eq!(at_exit.expect("the call at exit"), json!(2));
    assert_eq!(sb.call_blocking("c", json!("inc"), None).unwrap(), json!(3));
}

/// A module whose replies name its version (`tag`); `code_change` fails
/// when the reload's `extra` asks it to.
fn tagged(tag: &str) -> String {
    format!(
        r#"
local m = {{}}
function m.init(a) return {{ n = 0 }} end
function m.handle_call(req, from, s)
  if req == "boom" then error("{tag} boom") end
  s.n += 1
  return "{tag}", s
end
function m.code_change(old, s, extra)
  if extra and extra.fail then error("no") end
  return s
end
return m
"#
    )
}

/// Asks `target` with `call_blocking` on an idle sandbox (the handler run
/// at once, its module found by index in the prelude's mirror) and with a
/// queued `call` (the module table from the kernel); both must answer alike.
fn both_ways(sb: &Sandbox, target: &str, req: serde_json::Value) -> String {
    std::thread::sleep(Duration::from_millis(5));
    let show = |r: graft::Result<serde_json::Value>| match r {
        Ok(v) => v.to_string(),
        Err(e) => format!(
            "{}: {}",
            e.kind(),
            e.to_string().lines().next().unwrap_or("")
        ),
    };
    let inline = show(sb.call_blocking(target, req.clone(), Some(2000)));
    let queued = show(run(sb.call(target, req, Some(2000))));
    assert_eq!(inline, queued, "call_blocking and call disagree");
    inline
}

fn sources(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect()
}

#[test]
fn call_blocking_runs_the_version_a_queued_call_runs_after_every_kind_of_commit() {
    use graft::ReloadOptions;
    let node = Node::with_threads(1);
    let spec = SandboxSpec::new("versions")
        .entry(None)
        .module("a", tagged("a1"));
    let sb = run(node.create_sandbox(spec)).unwrap();
    run(sb.spawn("a", json!(null), Some("a"))).unwrap();
    assert_eq!(both_ways(&sb, "a", json!("x")), "\"a1\"");
    run(sb.reload(sources(&[("a", &tagged("a2"))]), ReloadOptions::default())).unwrap();
    assert_eq!(both_ways(&sb, "a", json!("x")), "\"a2\"");
    // A module added by a reload (a new index), then a reload aborted in
    // its migration: nothing of it is seen.
    run(sb.reload(sources(&[("b", &tagged("b1"))]), ReloadOptions::default())).unwrap();
    run(sb.spawn("b", json!(null), Some("b"))).unwrap();
    assert_eq!(both_ways(&sb, "b", json!("x")), "\"b1\"");
    let failing = ReloadOptions {
        extra: json!({ "fail": true }),
        ..Default::default()
    };
    let new = sources(&[("a", &tagged("a3")), ("b", &tagged("b2"))]);
    assert!(run(sb.reload(new, failing)).is_err());
    assert_eq!(both_ways(&sb, "a", json!("x")), "\"a2\"");
    assert_eq!(both_ways(&sb, "b", json!("x")), "\"b1\"");
    let dry = ReloadOptions {
        dry_run: true,
        ..Default::default()
    };
    run(sb.reload(sources(&[("a", &tagged("a9"))]), dry)).unwrap();
    assert_eq!(both_ways(&sb, "a", json!("x")), "\"a2\"");
    run(sb.rollback("a", 1, ReloadOptions::default())).unwrap();
    assert_eq!(both_ways(&sb, "a", json!("x")), "\"a1\"");
    // A canary rollback, tripped by a crash in the new version.
    let canary = ReloadOptions {
        canary_ms: 2000,
        canary_crashes: 1,
        ..Default::default()
    };
    run(sb.reload(sources(&[("a", &tagged("a4"))]), canary)).unwrap();
    run(sb.spawn("a", json!(null), Some("spare"))).unwrap();
    assert!(sb.call_blocking("a", json!("boom"), Some(2000)).is_err());
    let deadline = Instant::now() + Duration::from_secs(5);
    while run(sb.modules())
        .unwrap()
        .iter()
        .find(|m| m.name == "a")
        .map(|m| m.version)
        != Some(1)
    {
        assert!(Instant::now() < deadline, "no canary rollback");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(both_ways(&sb, "spare", json!("x")), "\"a1\"");
    // A module without handle_call, and a restart (versions kept).
    let no_call = "local m = {} function m.init() return {} end return m";
    run(sb.reload(sources(&[("n", no_call)]), ReloadOptions::default())).unwrap();
    run(sb.spawn("n", json!(null), Some("n"))).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let err = sb
        .call_blocking("n", json!("x"), Some(2000))
        .expect_err("no handle_call");
    assert!(err.to_string().contains("no handle_call"), "{err}");
    run(sb.restart()).unwrap();
    run(sb.spawn("a", json!(null), Some("after"))).unwrap();
    assert_eq!(both_ways(&sb, "after", json!("x")), "\"a1\"");
}
