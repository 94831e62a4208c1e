//! What every hostile test checks after the attack: the node still lists its
//! sandboxes, a bystander sandbox still answers calls, and the attacked
//! sandbox still answers `info` (unless the test deleted it).
#![allow(dead_code)]

use std::time::Duration;

use graft::{block_on, with_timeout, Node, Sandbox, SandboxSpec};
use serde_json::json;

/// A counter server every bystander runs.
pub const COUNTER: &str = r#"
local counter = {}
function counter.init(args) return { count = 0 } end
function counter.handle_call(req, from, state)
  if req == "inc" then state.count += 1 end
  return state.count, state
end
function counter.handle_cast(msg, state)
  if msg == "inc" then state.count += 1 end
  return state
end
return counter
"#;

/// A sandbox `id` with one registered counter process `c`.
pub fn counter_sandbox(node: &Node, id: &str) -> Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new(id)
                .entry(None)
                .module("counter", COUNTER)
                .limits(graft::Limits {
                    memory_bytes: 8 << 20,
                    ..graft::Limits::default()
                }),
        ),
    )
    .expect("bystander sandbox");
    answer(sb.spawn("counter", json!(null), Some("c"))).expect("spawn bystander counter");
    sb
}

/// Waits at most 30 s for a sandbox request (a hang fails the test). Not a
/// speed check: the suite runs its tests in parallel on CI's two cores, where
/// a megabyte conversion can take seconds.
pub fn answer<F: std::future::Future>(fut: F) -> F::Output {
    block_on(with_timeout(fut, Duration::from_secs(30))).expect("no answer within 30 s")
}

/// The node answers listings, `bystander` answers a call and its process
/// list, and every listed sandbox answers `info` (`busy` while a callback
/// holds it, never a hang).
pub fn assert_node_healthy(node: &Node, bystander: &Sandbox) {
    let ids = node.sandbox_ids();
    assert!(
        ids.iter().any(|i| i == bystander.id()),
        "bystander listed: {ids:?}"
    );
    let before = answer(bystander.call("c", json!("get"), None)).expect("bystander call");
    let after = answer(bystander.call("c", json!("inc"), None)).expect("bystander inc");
    assert_eq!(
        after,
        json!(before.as_i64().unwrap_or(0) + 1),
        "bystander counts"
    );
    for id in ids {
        let sb = node.sandbox(&id).expect("listed sandbox");
        let info = answer(sb.info()).expect("info of a listed sandbox");
        assert_eq!(info.id, id);
    }
    answer(bystander.processes()).expect("bystander process list");
}
