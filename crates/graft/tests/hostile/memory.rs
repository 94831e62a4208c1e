//! Hostile inputs against a sandbox's memory: crashes that leave garbage,
//! candidates whose module bodies over-allocate or loop, host values that
//! do not fit.

use std::collections::BTreeMap;

use graft::{Limits, Node, ReloadOptions, SandboxSpec};
use serde_json::json;

use crate::support::{answer, assert_node_healthy, counter_sandbox};

const MB: usize = 1024 * 1024;

/// `fill` keeps ~1.5 MiB in the state; `crash` raises; `bomb` grows forever.
const HOG: &str = r#"
local hog = {}
function hog.init() return {} end
function hog.handle_call(req, from, state)
  if req == "fill" then
    local t = table.create(96 * 1024, 0)
    for i = 1, #t do t[i] = i end
    state.big = t
    return "filled", state
  elseif req == "crash" then
    error("plain crash")
  elseif req == "bomb" then
    local t = {}
    local i = 0
    while true do i += 1; t[i] = string.rep("x", 64) .. i end
  end
  return "?", state
end
function hog.handle_cast(msg, state) return state end
return hog
"#;

fn hog_sandbox(node: &Node, id: &str, memory_bytes: usize) -> graft::Sandbox {
    graft::block_on(
        node.create_sandbox(
            SandboxSpec::new(id)
                .entry(None)
                .module("hog", HOG)
                .limits(Limits {
                    memory_bytes,
                    ..Limits::default()
                }),
        ),
    )
    .expect("hog sandbox")
}

#[test]
fn memory_of_a_crashed_process_is_given_back() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = hog_sandbox(&node, "hog", 4 * MB);
    for (round, how) in ["crash", "bomb", "crash", "bomb"].iter().enumerate() {
        let name = format!("h{round}");
        answer(sb.spawn("hog", json!(null), Some(&name))).expect("spawn");
        // Work that fits a clean 4 MiB sandbox fits after every crash too.
        assert_eq!(
            answer(sb.call(&name, json!("fill"), None)).expect("fill fits"),
            json!("filled"),
            "round {round}"
        );
        let err = answer(sb.call(&name, json!(how), None)).expect_err("crashes");
        let expected = if *how == "bomb" {
            "out_of_memory"
        } else {
            "error"
        };
        match &err {
            graft::Error::Crashed { reason, .. } => assert_eq!(reason.kind(), expected, "{err}"),
            other => panic!("expected a crash, got {other:?}"),
        }
        let info = answer(sb.info()).expect("info");
        assert_eq!(info.process_count, 0);
        assert!(
            info.memory_bytes < 3 * MB,
            "round {round}: {} bytes still counted with no process",
            info.memory_bytes
        );
    }
    assert_node_healthy(&node, &bystander);
}

#[test]
fn an_over_allocating_dry_run_leaves_the_sandbox_usable() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = hog_sandbox(&node, "hog", 8 * MB);
    answer(sb.spawn("hog", json!(null), Some("h"))).expect("spawn");
    let before = answer(sb.info()).expect("info").memory_bytes;
    let mut sources = BTreeMap::new();
    sources.insert(
        "other".to_owned(),
        "local t = {} for i = 1, 1e9 do t[i] = string.rep('y', 100) .. i end return {}".to_owned(),
    );
    let opts = ReloadOptions {
        dry_run: true,
        ..ReloadOptions::default()
    };
    let err = answer(sb.reload(sources, opts)).expect_err("the body cannot fit");
    assert_eq!(err.kind(), "reload_aborted", "{err}");
    let after = answer(sb.info()).expect("info").memory_bytes;
    assert!(
        after < before + MB,
        "{before} → {after} bytes after an aborted dry run"
    );
    // The live process still has room to work.
    assert_eq!(
        answer(sb.call("h", json!("fill"), None)).unwrap(),
        json!("filled")
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_looping_module_body_is_cut_short_not_given_handler_ms() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("slow")
                .entry(None)
                .module("hog", HOG)
                .limits(Limits {
                    handler_ms: 10_000,
                    ..Limits::default()
                }),
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("hog", json!(null), Some("h"))).expect("spawn");
    let mut sources = BTreeMap::new();
    sources.insert("other".to_owned(), "while true do end return {}".to_owned());
    let opts = ReloadOptions {
        dry_run: true,
        ..ReloadOptions::default()
    };
    // `answer` allows 5 s: far less than the sandbox's 10 s handler_ms.
    let err = answer(sb.reload(sources, opts)).expect_err("the body never returns");
    match &err {
        graft::Error::ReloadAborted { step, message, .. } => {
            assert_eq!(*step, graft::ReloadStep::Evaluate);
            assert!(message.contains("100 ms"), "{message}");
        }
        other => panic!("expected reload_aborted, got {other:?}"),
    }
    assert_eq!(
        answer(sb.call("h", json!("fill"), None)).unwrap(),
        json!("filled")
    );
    assert_node_healthy(&node, &bystander);
}

#[test]
fn host_values_that_do_not_fit_are_out_of_memory() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("full")
                .entry(None)
                .module(
                    "sink",
                    r#"
                    return {
                      init = function() return {} end,
                      handle_cast = function(msg, state)
                        if msg == "hold" then while true do end end
                        return state
                      end,
                    }
                    "#,
                )
                .limits(Limits {
                    memory_bytes: 2 * MB,
                    handler_ms: 5_000,
                    max_message_bytes: MB,
                    ..Limits::default()
                }),
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("sink", json!(null), Some("s"))).expect("spawn");
    answer(sb.cast("s", json!("hold"))).expect("hold");
    // Messages pile up in the mailbox of the busy process until the heap
    // (limit plus the kernel's headroom) cannot take the next one.
    let chunk = "z".repeat(900 * 1024);
    let mut refused = None;
    for i in 0..40 {
        if let Err(e) = answer(sb.cast("s", json!(format!("{i}{chunk}")))) {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("the heap filled up");
    assert_eq!(err.kind(), "out_of_memory", "{err}");
    assert_node_healthy(&node, &bystander);
}
