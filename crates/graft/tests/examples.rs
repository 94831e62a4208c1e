//! The bundled examples load and serve as documented.

use std::path::Path;

use graft::{block_on, Node, SandboxSpec};
use serde_json::json;

fn example(name: &str) -> SandboxSpec {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    SandboxSpec::from_dir(&dir).unwrap()
}

#[test]
fn counter_example_counts_and_its_test_passes() {
    let node = Node::with_threads(1);
    let sb = node.create_sandbox(example("counter")).unwrap();
    block_on(sb.wait_app_started()).unwrap();
    assert_eq!(
        block_on(sb.call("counter", json!("inc"), None)).unwrap(),
        json!(1)
    );
    block_on(sb.cast("counter", json!({"add": 41}))).unwrap();
    assert_eq!(
        block_on(sb.call("counter", json!("get"), None)).unwrap(),
        json!(42)
    );
    let test = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/counter/test/counter_test.luau"),
    )
    .unwrap();
    assert_eq!(
        block_on(sb.eval(&test)).unwrap(),
        json!({"before": 42, "after": 43})
    );
}
