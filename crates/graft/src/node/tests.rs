//! Unit tests of the node: the panic barrier (a failed sandbox, its events,
//! its restart) and reloads that wait across a restart.

use std::collections::BTreeMap;

use super::*;
use crate::config::SandboxSpec;
use crate::upgrade::ReloadOptions;
use serde_json::Value as Json;

const COUNTER: &str = r#"
    return {
      init = function() return 0 end,
      handle_call = function(req, from, n) return n + 1, n + 1 end,
    }
"#;

fn counter(node: &Node, id: &str) -> Sandbox {
    let sb =
        crate::block_on(node.create_sandbox(SandboxSpec::new(id).entry(None).module("c", COUNTER)))
            .expect("sandbox");
    block_on(sb.spawn("c", Json::Null, Some("c"))).expect("spawn");
    sb
}

#[test]
fn events_since_keeps_only_newer_events_running_and_failed() {
    let node = Node::with_threads(1);
    let sb = counter(&node, "since");
    for step in [2, 3, 4] {
        let src = COUNTER.replace("n + 1, n + 1", &format!("n + {step}, n + {step}"));
        block_on(sb.reload([("c".to_owned(), src)].into(), ReloadOptions::default()))
            .expect("reload");
    }
    let all = block_on(sb.events()).expect("events");
    assert!(all.len() >= 3, "{all:?}");
    assert_eq!(block_on(sb.events_since(0)).unwrap().len(), all.len());
    let mid = all[all.len() - 2].seq;
    let newer = block_on(sb.events_since(mid)).unwrap();
    assert_eq!(
        newer.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [all[all.len() - 1].seq]
    );
    assert!(block_on(sb.events_since(u64::MAX)).unwrap().is_empty());

    // A failed sandbox answers from the events it kept, filtered alike.
    let last = all[all.len() - 1].seq;
    sb.submit(|_| panic!("a bug in the runtime"))
        .expect("queued");
    crate::node::blocking::block_on(async {
        while sb.shared.failed.lock().is_none() {
            std::thread::yield_now();
        }
    });
    let after = block_on(sb.events_since(last)).unwrap();
    assert_eq!(
        after.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["failed"]
    );
    assert!(block_on(sb.events_since(u64::MAX)).unwrap().is_empty());
}

#[test]
fn a_panic_inside_the_runtime_fails_only_that_sandbox() {
    let node = Node::with_threads(2);
    let bystander = counter(&node, "bystander");
    let victim = counter(&node, "victim");
    let mut v2 = BTreeMap::new();
    v2.insert(
        "c".to_owned(),
        COUNTER.replace("n + 1, n + 1", "n + 2, n + 2"),
    );
    block_on(victim.reload(v2, ReloadOptions::default())).expect("reload to v2");
    // A waiter queued behind the panic learns why its sandbox stopped.
    let waiting = victim.call("c", Json::Null, None);
    victim
        .submit(|_| panic!("a bug in the runtime"))
        .expect("queued");
    let err = block_on(waiting).expect_err("the call cannot be answered");
    assert_eq!(err.kind(), "sandbox_failed", "{err}");

    let info = block_on(victim.info()).expect("info of a failed sandbox");
    assert_eq!(info.status, "failed");
    let events = block_on(victim.events()).expect("events");
    let last = events.last().expect("a failed event");
    assert_eq!(last.kind, "failed");
    assert!(last.detail["error"]
        .as_str()
        .unwrap_or_default()
        .contains("a bug in the runtime"));
    let err = block_on(victim.call("c", Json::Null, None)).expect_err("refused");
    assert_eq!(err.kind(), "sandbox_failed");

    // The node and the bystander carry on; nothing is poisoned.
    assert_eq!(node.sandbox_ids(), ["bystander", "victim"]);
    assert_eq!(block_on(bystander.call("c", Json::Null, None)).unwrap(), 1);

    // A restart brings it back on its current version with its history.
    block_on(victim.restart()).expect("restart a failed sandbox");
    assert_eq!(block_on(victim.info()).unwrap().status, "running");
    let versions: Vec<u32> = block_on(victim.versions("c"))
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, [1, 2]);
    block_on(victim.spawn("c", Json::Null, Some("c"))).expect("spawn after restart");
    assert_eq!(block_on(victim.call("c", Json::Null, None)).unwrap(), 2);
    let kinds: Vec<String> = block_on(victim.events())
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"failed".to_owned()), "{kinds:?}");

    // And it can be deleted like any other.
    victim.submit(|_| panic!("again")).expect("queued");
    crate::node::blocking::block_on(async {
        while victim.shared.failed.lock().is_none() {
            std::thread::yield_now();
        }
    });
    node.destroy("victim").expect("destroy a failed sandbox");
    assert_eq!(node.sandbox_ids(), ["bystander"]);
}

#[test]
fn a_reload_waiting_on_a_restart_applies_to_the_new_vm() {
    let node = Node::with_threads(1);
    let spinner = r#"
        return {
          init = function() return 0 end,
          handle_cast = function(msg, n) while true do end end,
          handle_call = function(req, from, n) return "v1", n end,
        }
    "#;
    let sb = crate::block_on(
        node.create_sandbox(
            SandboxSpec::new("r")
                .entry(None)
                .module("w", spinner)
                .limits(crate::Limits {
                    handler_ms: 1000,
                    ..crate::Limits::default()
                }),
        ),
    )
    .expect("sandbox");
    block_on(sb.spawn("w", Json::Null, Some("w"))).expect("spawn");
    block_on(sb.cast("w", Json::Null)).expect("cast");
    // `w` is inside a callback: the reload waits for it (quiesce) ...
    let mut v2 = BTreeMap::new();
    v2.insert("w".to_owned(), spinner.replace("\"v1\"", "\"v2\""));
    let mut reload = std::pin::pin!(sb.reload(v2, ReloadOptions::default()));
    let mut polled = false;
    block_on(std::future::poll_fn(|cx| {
        if !polled {
            polled = true;
            assert!(
                std::future::Future::poll(reload.as_mut(), cx).is_pending(),
                "w is busy"
            );
        }
        std::task::Poll::Ready(())
    }));
    // ... and the restart replaces the VM under it: the reload applies
    // to the new VM instead of being dropped.
    block_on(sb.restart()).expect("restart");
    let report = block_on(reload).expect("the reload is applied, not lost");
    assert_eq!(report.modules[0].to, 2);
    block_on(sb.spawn("w", Json::Null, Some("w2"))).expect("spawn");
    assert_eq!(block_on(sb.call("w2", Json::Null, None)).unwrap(), "v2");
}

/// The rebuild's guard closes the old sandbox to requests — every handle,
/// even `info`, which reads without queueing — while the node's own
/// commands still run; dropped without the sandbox being replaced (a
/// rebuild that gave up), it reopens it and the handle answers again.
#[test]
fn a_rebuild_guard_closes_the_sandbox_to_requests_and_its_drop_reopens_it() {
    let node = Node::with_threads(1);
    let sb = counter(&node, "closed");
    assert_eq!(sb.call_blocking("c", Json::Null, None).expect("call"), 1);
    let guard = node.mark_rebuilding(&sb);
    let kind = |r: crate::error::Result<Json>| r.expect_err("refused").kind();
    assert_eq!(
        kind(sb.call_blocking("c", Json::Null, None)),
        "sandbox_rebuilding"
    );
    assert_eq!(
        kind(block_on(sb.call("c", Json::Null, None))),
        "sandbox_rebuilding"
    );
    let info = block_on(sb.info()).map(|i| Json::from(i.status));
    assert_eq!(kind(info), "sandbox_rebuilding");
    assert_eq!(
        node.sandbox("closed").expect_err("marked").kind(),
        "sandbox_rebuilding"
    );
    // The node's own command is taken, and runs.
    let (tx, rx) = std::sync::mpsc::channel();
    sb.submit_as(sandbox::Origin::Node, move |rt| {
        let _ = tx.send(rt.processes().len());
    })
    .expect("taken while closed");
    let running = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("ran");
    assert_eq!(running, 1);
    drop(guard);
    assert_eq!(
        sb.call_blocking("c", Json::Null, None).expect("open again"),
        2
    );
    block_on(sb.info()).expect("info again");
    assert!(node.sandbox("closed").is_ok());
}
