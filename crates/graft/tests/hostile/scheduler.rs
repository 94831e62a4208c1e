//! Hostile inputs against the scheduler: code that holds a thread in a
//! context Luau cannot yield from, and host functions that panic.

use std::time::{Duration, Instant};

use graft::{HostFunctions, Limits, Node, SandboxSpec};
use serde_json::json;

use crate::support::{answer, assert_node_healthy, counter_sandbox};

/// Spinners that Luau cannot preempt with a yield: the busy loop runs inside
/// a C call (a sort comparator, a gsub callback) or a wrapped coroutine.
const SPINNERS: &str = r#"
local spin = {}
function spin.init() return {} end
function spin.handle_cast(how, state)
  if how == "sort" then
    local t = {}
    for i = 1, 100 do t[i] = i end
    table.sort(t, function(a, b) while true do end end)
  elseif how == "gsub" then
    string.gsub(string.rep("x", 100), "x", function() while true do end end)
  elseif how == "wrap" then
    coroutine.wrap(function() while true do end end)()
  else
    while true do end
  end
  return state
end
return spin
"#;

fn spinner(node: &Node, id: &str, handler_ms: u64) -> graft::Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new(id)
                .entry(None)
                .module("spin", SPINNERS)
                .limits(Limits {
                    handler_ms,
                    ..Limits::default()
                }),
        ),
    )
    .expect("spinner sandbox");
    answer(sb.spawn("spin", json!(null), Some("s"))).expect("spawn spinner");
    sb
}

fn median_call_ms(sb: &graft::Sandbox, calls: usize) -> f64 {
    let mut times: Vec<f64> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            answer(sb.call("c", json!("inc"), None)).expect("bystander call");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

#[test]
fn unyieldable_spinners_do_not_starve_a_bystander() {
    // More spinners than scheduler threads, each stuck in code that cannot
    // yield for up to 20 s: the pool must still serve the bystander.
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let kinds = ["sort", "gsub", "wrap", "sort", "gsub"];
    let spinners: Vec<_> = kinds
        .iter()
        .enumerate()
        .map(|(i, how)| {
            let sb = spinner(&node, &format!("spin{i}"), 20_000);
            answer(sb.cast("s", json!(how))).expect("cast to spinner");
            sb
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50)); // every spinner is in its loop
    let median = median_call_ms(&bystander, 20);
    assert!(
        median < 50.0,
        "bystander median call latency {median:.1} ms"
    );
    // A host command to another sandbox is served too (a plain cast).
    answer(bystander.cast("c", json!("inc"))).expect("cast to bystander");
    assert_node_healthy(&node, &bystander);
    // Deleting a spinning sandbox does not wait for its loop.
    let t = Instant::now();
    for sb in &spinners {
        node.destroy(sb.id()).expect("destroy spinner");
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "destroy waited {:?}",
        t.elapsed()
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_stuck_callback_still_ends_at_handler_ms() {
    let node = Node::with_threads(1);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = spinner(&node, "spin", 200);
    answer(sb.cast("s", json!("sort"))).expect("cast");
    crate::common::wait_until("the spinner to time out", || {
        let events = answer(sb.events()).ok()?;
        events
            .iter()
            .find(|e| e.kind == "crash")
            .map(|e| e.detail["reason"]["kind"].clone())
    });
    let events = answer(sb.events()).expect("events");
    let crash = events
        .iter()
        .find(|e| e.kind == "crash")
        .expect("crash event");
    assert_eq!(crash.detail["reason"]["kind"], "timeout", "{crash:?}");
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_panicking_host_function_is_an_error_for_its_caller() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let host = HostFunctions::default().function("emit", |args| {
        if args.first() == Some(&json!("boom")) {
            panic!("the embedder's bug");
        }
        Ok(json!("sent"))
    });
    let sb = graft::block_on(
        node.create_sandbox_with(
            SandboxSpec::new("plugin")
                .entry(None)
                .module(
                    "p",
                    r#"
                return {
                  init = function() return {} end,
                  handle_call = function(req, from, state)
                    local ok, err = emit(req)
                    return { ok = ok, err = err }, state
                  end,
                }
                "#,
                )
                // The panic hook prints a backtrace (slow in a debug build under
                // load): keep it inside the callback's budget.
                .limits(Limits {
                    handler_ms: 30_000,
                    ..Limits::default()
                }),
            host,
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("p", json!(null), Some("p"))).expect("spawn");
    let reply = answer(sb.call("p", json!("boom"), None)).expect("call survives the panic");
    assert_eq!(
        reply["err"],
        json!("emit: panicked: the embedder's bug"),
        "{reply}"
    );
    let reply = answer(sb.call("p", json!("fine"), None)).expect("later call");
    assert_eq!(reply["ok"], json!("sent"));
    let info = answer(sb.info()).expect("info");
    assert_eq!(info.status, "running");
    node.destroy("plugin").expect("destroy after a host panic");
    assert_node_healthy(&node, &bystander);
}

/// A handler that spends a while in a sort comparator (which cannot yield),
/// then loops in its own code, which can.
const SORT_THEN_LOOP: &str = r#"
local m = {}
function m.init() return { n = 0 } end
function m.handle_cast(_, state)
  local t = { 3, 1, 2 }
  local first = true
  table.sort(t, function(a, b)
    if first then
      first = false
      for _ = 1, 3000000 do end -- longer than a time slice
    end
    return a < b
  end)
  while true do end
end
function m.handle_call(_, _, state)
  state.n += 1
  return state.n, state
end
return m
"#;

#[test]
fn code_that_could_not_yield_yields_once_it_can() {
    // One scheduler thread, one sandbox: the slice ends in the comparator,
    // which cannot yield. Once the comparator returns, the handler's own
    // loop must yield at its next safepoint, so that a sibling process of
    // the same sandbox answers long before the handler's `handler_ms`; it
    // used to run on until that deadline.
    let node = Node::with_threads(1);
    let sb = answer(
        node.create_sandbox(
            SandboxSpec::new("mixed")
                .entry(None)
                .module("m", SORT_THEN_LOOP)
                .limits(Limits {
                    handler_ms: 20_000,
                    ..Limits::default()
                }),
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("m", json!(null), Some("spinner"))).expect("spawn spinner");
    answer(sb.spawn("m", json!(null), Some("sibling"))).expect("spawn sibling");
    answer(sb.cast("spinner", json!("go"))).expect("cast");
    std::thread::sleep(Duration::from_millis(100));
    // 5 s: generous for a loaded machine, far below the 20 s deadline.
    let reply = graft::block_on(sb.call("sibling", json!("inc"), Some(5_000)));
    assert_eq!(
        reply.expect("the sibling answers before the spinner's handler_ms"),
        json!(1)
    );
    let events = answer(sb.events()).expect("events");
    assert!(
        !events.iter().any(|e| e.kind == "crash"),
        "the spinner has not reached handler_ms yet: {events:?}"
    );
}
