//! Hostile inputs against the node's caps and the limits' ranges (SPEC §7):
//! every limit out of range is `limit_out_of_range` naming the field, and the
//! node refuses more sandboxes than `max_sandboxes`.

use graft::{Error, Limits, Node, NodeLimits, SandboxSpec};
use serde_json::json;

use crate::support::{answer, assert_node_healthy, counter_sandbox, COUNTER};

const MB: usize = 1024 * 1024;

fn refused_field(node: &Node, limits: Limits) -> (String, u64, u64) {
    let spec = SandboxSpec::new("bad")
        .entry(None)
        .module("counter", COUNTER)
        .limits(limits);
    match graft::block_on(node.create_sandbox(spec)) {
        Err(Error::LimitOutOfRange {
            field, min, max, ..
        }) => (field, min, max),
        Err(other) => panic!("expected limit_out_of_range, got {other:?}"),
        Ok(_) => panic!("limits out of range were accepted"),
    }
}

#[test]
fn limits_out_of_range_name_the_field_and_the_range() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let cases: Vec<(Limits, &str, u64, u64)> = vec![
        (
            Limits {
                memory_bytes: 2 << 30,
                ..Limits::default()
            },
            "memory_bytes",
            2 * MB as u64,
            1 << 30,
        ),
        (
            Limits {
                memory_bytes: MB,
                ..Limits::default()
            },
            "memory_bytes",
            2 * MB as u64,
            1 << 30,
        ),
        (
            Limits {
                handler_ms: 0,
                ..Limits::default()
            },
            "handler_ms",
            1,
            60_000,
        ),
        (
            Limits {
                handler_ms: 60_001,
                ..Limits::default()
            },
            "handler_ms",
            1,
            60_000,
        ),
        (
            Limits {
                max_processes: 1 << 21,
                ..Limits::default()
            },
            "max_processes",
            1,
            1 << 20,
        ),
        (
            Limits {
                max_mailbox: 2_000_000,
                ..Limits::default()
            },
            "max_mailbox",
            1,
            1_000_000,
        ),
        (
            Limits {
                max_versions: 0,
                ..Limits::default()
            },
            "max_versions",
            1,
            1000,
        ),
    ];
    for (limits, field, min, max) in cases {
        assert_eq!(refused_field(&node, limits), (field.to_owned(), min, max));
    }
    assert_eq!(node.sandbox_ids(), ["bystander"]);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn the_smallest_memory_limit_still_runs_a_process() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("tiny")
                .entry(None)
                .module("counter", COUNTER)
                .limits(Limits {
                    memory_bytes: graft::config::MIN_SANDBOX_MEMORY,
                    ..Limits::default()
                }),
        ),
    )
    .expect("a 2 MiB sandbox");
    answer(sb.spawn("counter", json!(null), Some("c"))).expect("spawn in 2 MiB");
    assert_eq!(answer(sb.call("c", json!("inc"), None)).unwrap(), json!(1));
    assert_node_healthy(&node, &bystander);
}

#[test]
fn the_node_refuses_more_sandboxes_than_its_cap() {
    let caps = NodeLimits {
        max_sandboxes: 3,
        ..NodeLimits::default()
    };
    let node = Node::with_limits(2, caps);
    let bystander = counter_sandbox(&node, "bystander");
    for i in 0..2 {
        graft::block_on(node.create_sandbox(SandboxSpec::new(format!("s{i}")).entry(None)))
            .expect("under the cap");
    }
    let err = graft::block_on(node.create_sandbox(SandboxSpec::new("one-too-many").entry(None)))
        .expect_err("over the cap");
    assert_eq!(err.kind(), "node_limit", "{err}");
    node.destroy("s0").expect("destroy");
    graft::block_on(node.create_sandbox(SandboxSpec::new("again").entry(None)))
        .expect("room again after a delete");
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_sandbox_cannot_ask_for_more_memory_than_the_node_allows() {
    let caps = NodeLimits {
        max_sandbox_memory: 16 * MB,
        ..NodeLimits::default()
    };
    let node = Node::with_limits(2, caps);
    let bystander = counter_sandbox(&node, "bystander");
    let (field, _, max) = refused_field(
        &node,
        Limits {
            memory_bytes: 32 * MB,
            ..Limits::default()
        },
    );
    assert_eq!((field.as_str(), max), ("memory_bytes", 16 * MB as u64));
    assert_node_healthy(&node, &bystander);
}
