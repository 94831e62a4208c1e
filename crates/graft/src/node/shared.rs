//! The state a node shares with its threads and its sandbox handles:
//! [`NodeInner`] (one per node) and [`Shared`] (one per sandbox).
//!
//! Invariants:
//! * A sandbox's VM is reached only through `Shared::runtime`, locked by one
//!   slice at a time; requests go through `inbox` and run between slices, or
//!   (`call_blocking` on an idle sandbox) run in the slice their caller
//!   claimed (`scheduler::claim_here`).
//! * `scheduled` is set while the sandbox is queued or running: it is on the
//!   run queue at most once (see `scheduler`).
//! * A panic inside a runtime fails only its sandbox ([`Shared::fail`]): the
//!   VM is dropped behind a barrier and what a restart needs (the version
//!   history) is saved as plain Rust data, so no lock or thread is poisoned.
//! * Sandbox handles hold the node weakly (`Shared::node`): a handle a host
//!   keeps after the node's last handle went answers `sandbox_stopped`
//!   instead of keeping the node's state (store, event log) alive.

use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex, RwLock};

use super::durable::Checkpoints;
use super::host_pool::HostPool;
use super::runtime::Runtime;
use super::scheduler;
use super::SandboxInfo;
use crate::config::{NodeLimits, SandboxSpec};
use crate::error::Error;
use crate::upgrade::ModuleHistory;
use crate::vm::HostTable;

/// A request queued to a sandbox: run on its runtime between slices.
pub(super) type Command = Box<dyn FnOnce(&mut Runtime) + Send>;

pub(super) struct Shared {
    pub(super) id: String,
    pub(super) inbox: Mutex<VecDeque<Command>>,
    pub(super) scheduled: AtomicBool,
    /// `None` once destroyed or failed.
    pub(super) runtime: Mutex<Option<Runtime>>,
    /// Why the sandbox failed (a panic inside the runtime), with what could
    /// be saved to restart it.
    pub(super) failed: Mutex<Option<Failure>>,
    /// Set by `Node::destroy`: a slice running then drops the VM when it ends.
    pub(super) destroyed: AtomicBool,
    /// Set while the sandbox is rebuilt with new settings, from the moment
    /// its old app starts stopping (`Node::mark_rebuilding`, under the
    /// `inbox` lock): requests on a handle get `Rebuilding`, and only the
    /// node's own commands (the rebuild's stop, a blocking host call's
    /// result) still enter the inbox. Cleared when the rebuild ends;
    /// `replaced` answers for the handle from then on if it was replaced.
    pub(super) closed: AtomicBool,
    /// Set (before `destroyed`) when the sandbox is destroyed to be rebuilt
    /// with new settings (`Node::reconfigure_sandbox`): a request that
    /// reached this handle is told so (`Rebuilding`, retryable), not that
    /// the sandbox does not exist.
    pub(super) replaced: AtomicBool,
    /// What `info` last saw, answered while a long callback holds the VM.
    pub(super) last_info: Mutex<Option<SandboxInfo>>,
    /// The earliest wake-up registered with the timer thread (`u64::MAX`: none).
    pub(super) wakeup_at: AtomicU64,
    pub(super) node: Weak<NodeInner>,
    pub(super) known_globals: Vec<String>,
    pub(super) spec: SandboxSpec,
    pub(super) host_fns: HostTable,
}

/// A sandbox stopped by a panic: the message and its version history (plain
/// Rust data, saved from the dead runtime) so that a restart keeps them.
pub(super) struct Failure {
    pub(super) message: String,
    pub(super) history: BTreeMap<String, ModuleHistory>,
}

impl Shared {
    /// Fails the sandbox after a panic: its VM is dropped, its waiters are
    /// answered (their channels close), and later requests get
    /// `sandbox_failed` until it is restarted or deleted.
    pub(super) fn fail(&self, message: String) {
        tracing::error!(sandbox = %self.id, %message, "internal error: the sandbox failed");
        let rt = self.runtime.lock().take();
        let history = match &rt {
            Some(rt) => rt.engine.modules.clone(),
            None => BTreeMap::new(),
        };
        if let Some(node) = self.node.upgrade() {
            node.events
                .append(&self.id, "failed", serde_json::json!({ "error": message }));
        }
        *self.failed.lock() = Some(Failure { message, history });
        // Dropping the VM drops every waiting host's reply channel.
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(rt)));
        if dropped.is_err() {
            tracing::error!(sandbox = %self.id, "the failed sandbox's VM panicked while dropped");
        }
        self.drop_inbox_unless_restarted();
    }

    /// [`Shared::drop_inbox`] unless the sandbox was restarted meanwhile
    /// (`failed` cleared, under the inbox lock as `enqueue` reads it): a
    /// request admitted after the restart is the new runtime's.
    pub(super) fn drop_inbox_unless_restarted(&self) {
        let commands: Vec<Command> = {
            let mut inbox = self.inbox.lock();
            if self.failed.lock().is_none()
                && !self.destroyed.load(std::sync::atomic::Ordering::Acquire)
            {
                return;
            }
            inbox.drain(..).collect()
        };
        drop_commands(commands);
    }

    /// Drops queued commands (their reply channels close: the waiters learn
    /// the sandbox stopped).
    pub(super) fn drop_inbox(&self) {
        drop_commands(self.inbox.lock().drain(..).collect());
    }

    pub(super) fn failure_error(&self) -> Option<Error> {
        self.failed.lock().as_ref().map(|f| Error::SandboxFailed {
            id: self.id.clone(),
            message: f.message.clone(),
        })
    }
}

/// Drops commands taken out of an inbox behind a panic barrier (a
/// command's captures may panic in their destructors), outside the lock.
fn drop_commands(commands: Vec<Command>) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(commands)));
}

/// The text of a panic payload.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    format!("internal error (panic): {}", crate::vm::panic_text(payload))
}

pub(super) struct NodeInner {
    pub(super) sandboxes: RwLock<BTreeMap<String, Arc<Shared>>>,
    pub(super) queue: Mutex<scheduler::RunQueue>,
    pub(super) queue_cv: Condvar,
    pub(super) pool: Mutex<scheduler::Pool>,
    pub(super) timers: Mutex<BinaryHeap<std::cmp::Reverse<(u64, u64, usize)>>>,
    pub(super) timer_targets: Mutex<HashMap<u64, Weak<Shared>>>,
    pub(super) timer_seq: AtomicU64,
    pub(super) timer_cv: Condvar,
    pub(super) stopping: AtomicBool,
    pub(super) threads: usize,
    pub(super) limits: NodeLimits,
    /// Runs blocking host functions, off the scheduler threads.
    pub(super) host_pool: Arc<HostPool>,
    /// Every event of every sandbox, numbered node-wide.
    pub(super) events: Arc<crate::events::EventLog>,
    /// The database of a durable node.
    pub(super) store: Option<Arc<crate::store::Store>>,
    /// Ids of sandboxes being rebuilt with new settings, from the committed
    /// new record until the rebuilt sandbox has its states back: requests
    /// get `Rebuilding` (retryable), not the old app stopping nor a 404
    /// while the id is absent from `sandboxes`, and a create gets
    /// `SandboxExists`. Inserted before the old sandbox leaves `sandboxes`,
    /// removed after the new one is in it, so an id is always in one or
    /// the other.
    pub(super) rebuilding: Mutex<std::collections::HashSet<String>>,
    /// What the checkpointer last wrote, per sandbox.
    pub(super) checkpoints: Checkpoints,
    /// An exclusive lock on the data directory, held until the node shuts
    /// down or its last handle goes: two nodes on one database would restore
    /// and write the same sandboxes.
    pub(super) data_lock: Mutex<Option<std::fs::File>>,
    /// Keeps the coarse clock ticking until the node's last thread lets go.
    pub(super) _clock: crate::clock::ClockGuard,
}
