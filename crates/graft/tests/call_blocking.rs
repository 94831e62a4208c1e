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

fn sandbox(node: &Node, id: &str, handler_ms: u64) -> Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new(id)
                .entry(None)
                .module("counter", COUNTER)
                .module("worker", WORKER)
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
