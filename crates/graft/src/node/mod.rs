//! The node: sandboxes scheduled in parallel on a pool of scheduler threads.
//!
//! Invariants:
//! * A sandbox is on the run queue at most once (`scheduled` flag) and is run
//!   by one scheduler thread at a time (its runtime mutex), so its VM is never
//!   touched concurrently. Different sandboxes run in parallel.
//! * Every request from a host is a command queued to the sandbox and run
//!   between time slices; the host waits on a one-shot channel, never on the
//!   VM. A slow handler therefore never blocks an async host thread.
//! * The one exception is `Sandbox::call_blocking`, for threads that may
//!   block: when the sandbox is idle, the caller claims it (`scheduled`,
//!   as a scheduler thread would) and runs the slice holding its command
//!   itself, behind the same panic barrier and with the same epilogue. The
//!   inbox is still drained in order, so requests keep their order.
//! * A slice lasts at most [`SLICE_MS`](crate::kernel) of CPU: the VM
//!   interrupt preempts long callbacks, so a spinning sandbox cannot starve
//!   the others.
//!
//! Files: `shared.rs` (the state the node, its threads and the sandbox
//! handles share), `lifecycle.rs` (starting and stopping a node),
//! `create.rs`, `registry.rs` (id → sandbox), `delete.rs`, `events.rs`,
//! `batch.rs` (work across many sandboxes), `sandbox/` (the [`Sandbox`]
//! handle), `scheduler/` (threads, run queue, watchdog, timers),
//! `runtime.rs` (one sandbox's VM), `durable.rs` and `checkpoint.rs` (the
//! store), `host_pool.rs` and `host_functions.rs` (host functions),
//! `blocking.rs` (`block_on`, `with_timeout`).

mod batch;
mod blocking;
mod checkpoint;
mod create;
mod delete;
mod durable;
mod events;
mod host_functions;
mod host_pool;
mod lifecycle;
mod registry;
mod runtime;
mod sandbox;
mod scheduler;
mod shared;
#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use batch::BatchOptions;
pub use blocking::{block_on, with_timeout};
pub use durable::{
    CheckpointStats, NodeBuilder, SettingsOutcome, DATABASE_FILE, DEFAULT_CHECKPOINT_MS,
};
pub use host_functions::HostFunctions;
pub use runtime::{ProcessInfo, SandboxInfo, QUIESCE_TIMEOUT_MS};
pub use sandbox::{ModuleCoverage, Sandbox, MAX_CLOCK_STEPS};

use crate::config::NodeLimits;
use lifecycle::{clamp_limits, Owner};
use shared::{panic_message, Command, NodeInner, Shared};

/// A Graft node: many sandboxes, scheduled in parallel.
///
/// ```
/// use graft::{Node, SandboxSpec};
/// let node = Node::new();
/// let spec = SandboxSpec::new("demo").entry(None).module("counter", r#"
///     local counter = {}
///     function counter.init(args) return { count = args.start } end
///     function counter.handle_call(req, from, state)
///         state.count += 1
///         return state.count, state
///     end
///     return counter
/// "#);
/// let sandbox = graft::block_on(node.create_sandbox(spec)).unwrap();
/// let pid = graft::block_on(sandbox.spawn("counter", serde_json::json!({"start": 41}), Some("c"))).unwrap();
/// assert_eq!(pid.module(), "counter");
/// let reply = graft::block_on(sandbox.call("c", serde_json::json!("inc"), None)).unwrap();
/// assert_eq!(reply, serde_json::json!(42));
/// ```
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
    /// Shared by every clone of this handle: when the last one goes, the
    /// node's threads stop (they hold the `NodeInner` themselves, so its own
    /// drop would never come while they run).
    _owner: Arc<Owner>,
}

impl Node {
    /// Scheduler threads.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// The node-wide caps.
    pub fn limits(&self) -> &NodeLimits {
        &self.inner.limits
    }

    /// The node's database, if it was opened with one
    /// ([`Node::builder`]`.data_dir(…)` or `.ephemeral()`).
    pub fn store(&self) -> Option<&Arc<crate::store::Store>> {
        self.inner.store.as_ref()
    }
}
