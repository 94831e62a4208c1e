//! The `graft-clock` ticker lives as long as the nodes that need it: the
//! last node dropped stops it and the next one created starts it again.
//! Alone in its test binary, because every node in the process counts.

use std::time::{Duration, Instant};

use graft::{block_on, Node, SandboxSpec};
use serde_json::json;

/// Threads of this process named `graft-clock`.
fn clock_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "graft-clock")
        .count()
}

/// Waits up to 10 s for `n` clock threads (a node's threads let go of it
/// shortly after the last handle is dropped).
fn wait_for_clock_threads(n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while clock_threads() != n {
        assert!(
            Instant::now() < deadline,
            "{} graft-clock threads, expected {n}",
            clock_threads()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A node whose sandbox has run a 30 ms handler (its slices are timed by
/// the coarse clock).
fn busy_node() -> Node {
    let node = Node::with_threads(1);
    let spec = SandboxSpec::new("c").entry(None).module(
        "spin",
        r#"
        return {
          init = function() return 0 end,
          handle_call = function(ms, from, n)
            local t = graft.now()
            while graft.now() - t < ms do end
            return n + 1, n + 1
          end,
        }
    "#,
    );
    let sb = graft::block_on(node.create_sandbox(spec)).expect("sandbox");
    block_on(sb.spawn("spin", json!(null), Some("spin"))).expect("spawn");
    assert_eq!(block_on(sb.call("spin", json!(30), None)).unwrap(), 1);
    node
}

#[test]
fn the_clock_thread_follows_the_live_nodes() {
    wait_for_clock_threads(0);
    let a = busy_node();
    let b = busy_node();
    wait_for_clock_threads(1);
    drop(a);
    // b still needs it.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(clock_threads(), 1);
    drop(b);
    wait_for_clock_threads(0);

    // A new node starts it again, and its sandboxes run as before.
    let c = busy_node();
    wait_for_clock_threads(1);
    drop(c);
    wait_for_clock_threads(0);
}
