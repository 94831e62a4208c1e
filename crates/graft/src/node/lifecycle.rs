//! Starting a node and stopping it: the constructors, and [`Owner`], whose
//! drop (the last [`Node`] handle going) stops the node's threads.
//!
//! Invariants:
//! * The node's threads hold the `NodeInner` themselves, so its own drop
//!   would never come while they run: the stop is tied to the last handle
//!   (`Owner`), not to `NodeInner`.
//! * The data directory is released last: queued events are written and the
//!   store is closed first, so a node opened on the same directory right
//!   after never shares it with this one's writers.
//! * Caps out of range are clamped, never refused, here ([`clamp_limits`]);
//!   [`NodeLimits::validate`] is the way to refuse them.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex, RwLock};

use super::{durable, host_pool, scheduler, Node, NodeInner, Shared};
use crate::config::NodeLimits;

/// Caps out of range clamped into range.
pub(super) fn clamp_limits(limits: NodeLimits) -> NodeLimits {
    NodeLimits {
        max_sandbox_memory: limits
            .max_sandbox_memory
            .max(crate::config::MIN_SANDBOX_MEMORY),
        max_sandboxes: limits.max_sandboxes.clamp(1, 1 << 20),
        max_value_bytes: limits.max_value_bytes.clamp(1024, 1 << 32),
        max_events: limits.max_events.clamp(1, 1_000_000),
        max_blocking_host_calls: limits.max_blocking_host_calls.clamp(1, 4096),
    }
}

pub(super) struct Owner(Weak<NodeInner>);

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.stopping.store(true, Ordering::SeqCst);
            inner.checkpoints.stop_thread();
            // Take each lock once so no thread is between its check of
            // `stopping` and its wait when the notification goes out.
            drop(inner.queue.lock());
            inner.queue_cv.notify_all();
            drop(inner.timers.lock());
            inner.timer_cv.notify_all();
            inner.host_pool.stop();
            // Drop the VMs now (a slice still running keeps its own until it
            // ends): hosts still waiting on them get `sandbox_stopped`.
            let all: Vec<Arc<Shared>> = std::mem::take(&mut *inner.sandboxes.write())
                .into_values()
                .collect();
            for shared in all {
                if let Some(mut guard) = shared.runtime.try_lock() {
                    let rt = guard.take();
                    drop(guard);
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(rt)));
                }
                shared.drop_inbox();
            }
            // Only then is the directory free: events still queued are
            // written and the store is closed first, so a node opened on the
            // same directory right after never shares it with this one's
            // writers (a VM a slice still holds gets `storage_closed`).
            inner.events.close();
            if let Some(store) = &inner.store {
                store.close();
            }
            drop(inner.data_lock.lock().take());
        }
    }
}

impl Default for Node {
    fn default() -> Self {
        Node::new()
    }
}

impl Node {
    /// A node with one scheduler thread per core.
    pub fn new() -> Node {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Node::with_threads(n)
    }

    /// A node with `threads` scheduler threads (at least 1).
    pub fn with_threads(threads: usize) -> Node {
        Node::with_limits(threads, NodeLimits::default())
    }

    /// A node with `threads` scheduler threads (at least 1) and node-wide
    /// caps. Caps out of range are clamped into range (see [`NodeLimits::validate`]
    /// to refuse them instead).
    pub fn with_limits(threads: usize, limits: NodeLimits) -> Node {
        let limits = clamp_limits(limits);
        let events = crate::events::EventLog::in_memory(limits.max_events);
        Node::assemble(threads, limits, events, None, None)
    }

    /// A node around an event log (and store), its threads started.
    pub(super) fn assemble(
        threads: usize,
        limits: NodeLimits,
        events: Arc<crate::events::EventLog>,
        store: Option<Arc<crate::store::Store>>,
        data_lock: Option<std::fs::File>,
    ) -> Node {
        let threads = threads.max(1);
        let inner = Arc::new(NodeInner {
            sandboxes: RwLock::new(BTreeMap::new()),
            queue: Mutex::new(scheduler::RunQueue::default()),
            queue_cv: Condvar::new(),
            pool: Mutex::new(scheduler::Pool::default()),
            timers: Mutex::new(BinaryHeap::new()),
            timer_targets: Mutex::new(HashMap::new()),
            timer_seq: AtomicU64::new(0),
            timer_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            threads,
            host_pool: Arc::new(host_pool::HostPool::new(limits.max_blocking_host_calls)),
            events,
            store,
            rebuilding: Mutex::new(std::collections::HashSet::new()),
            checkpoints: durable::Checkpoints::default(),
            data_lock: Mutex::new(data_lock),
            limits,
            _clock: crate::clock::ClockGuard::acquire(),
        });
        scheduler::start(&inner);
        let owner = Arc::new(Owner(Arc::downgrade(&inner)));
        Node {
            inner,
            _owner: owner,
        }
    }
}
