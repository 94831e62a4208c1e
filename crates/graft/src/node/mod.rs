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

mod batch;
mod blocking;
mod checkpoint;
mod durable;
mod host_functions;
mod host_pool;
mod runtime;
mod sandbox;
mod scheduler;

use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

pub use batch::BatchOptions;
pub use blocking::{block_on, with_timeout};
pub use durable::{
    CheckpointStats, NodeBuilder, SettingsOutcome, DATABASE_FILE, DEFAULT_CHECKPOINT_MS,
};
pub use host_functions::HostFunctions;
pub use runtime::{ProcessInfo, SandboxInfo, QUIESCE_TIMEOUT_MS};
pub use sandbox::{ModuleCoverage, Sandbox, MAX_CLOCK_STEPS};

use crate::config::{NodeLimits, SandboxSpec};
use crate::error::{Error, ReloadStep, Result};
use crate::upgrade::{Direction, ModuleHistory, ReloadReport};
use crate::vm::HostTable;
use runtime::Runtime;
use sandbox::new_runtime;
use scheduler::schedule;

type Command = Box<dyn FnOnce(&mut Runtime) + Send>;

/// How long `info` waits for a running slice before answering `busy`
/// (a slice that yields ends within `SLICE_MS`).
const INFO_WAIT_MS: u64 = crate::kernel::SLICE_MS * 2;

struct Shared {
    id: String,
    inbox: Mutex<VecDeque<Command>>,
    scheduled: AtomicBool,
    /// `None` once destroyed or failed.
    runtime: Mutex<Option<Runtime>>,
    /// Why the sandbox failed (a panic inside the runtime), with what could
    /// be saved to restart it.
    failed: Mutex<Option<Failure>>,
    /// Set by `Node::destroy`: a slice running then drops the VM when it ends.
    destroyed: AtomicBool,
    /// Set (before `destroyed`) when the sandbox is destroyed to be rebuilt
    /// with new settings (`Node::reconfigure_sandbox`): a request that
    /// reached this handle is told so (`Rebuilding`, retryable), not that
    /// the sandbox does not exist.
    replaced: AtomicBool,
    /// What `info` last saw, answered while a long callback holds the VM.
    last_info: Mutex<Option<SandboxInfo>>,
    /// The earliest wake-up registered with the timer thread (`u64::MAX`: none).
    wakeup_at: AtomicU64,
    node: Weak<NodeInner>,
    known_globals: Vec<String>,
    spec: SandboxSpec,
    host_fns: HostTable,
}

/// A sandbox stopped by a panic: the message and its version history (plain
/// Rust data, saved from the dead runtime) so that a restart keeps them.
struct Failure {
    message: String,
    history: BTreeMap<String, ModuleHistory>,
}

impl Shared {
    /// Fails the sandbox after a panic: its VM is dropped, its waiters are
    /// answered (their channels close), and later requests get
    /// `sandbox_failed` until it is restarted or deleted.
    fn fail(&self, message: String) {
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
        self.drop_inbox();
    }

    /// Drops queued commands (their reply channels close: the waiters learn
    /// the sandbox stopped).
    fn drop_inbox(&self) {
        let commands: Vec<Command> = self.inbox.lock().drain(..).collect();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(commands)));
    }

    fn failure_error(&self) -> Option<Error> {
        self.failed.lock().as_ref().map(|f| Error::SandboxFailed {
            id: self.id.clone(),
            message: f.message.clone(),
        })
    }
}

/// Caps out of range clamped into range.
fn clamp_limits(limits: NodeLimits) -> NodeLimits {
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

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    format!("internal error (panic): {}", crate::vm::panic_text(payload))
}

struct NodeInner {
    sandboxes: RwLock<BTreeMap<String, Arc<Shared>>>,
    queue: Mutex<scheduler::RunQueue>,
    queue_cv: Condvar,
    pool: Mutex<scheduler::Pool>,
    timers: Mutex<BinaryHeap<std::cmp::Reverse<(u64, u64, usize)>>>,
    timer_targets: Mutex<HashMap<u64, Weak<Shared>>>,
    timer_seq: AtomicU64,
    timer_cv: Condvar,
    stopping: AtomicBool,
    threads: usize,
    limits: NodeLimits,
    /// Runs blocking host functions, off the scheduler threads.
    host_pool: Arc<host_pool::HostPool>,
    /// Every event of every sandbox, numbered node-wide.
    events: Arc<crate::events::EventLog>,
    /// The database of a durable node.
    store: Option<Arc<crate::store::Store>>,
    /// Ids of sandboxes being rebuilt with new settings, from the committed
    /// new record until the rebuilt sandbox has its states back: requests
    /// get `Rebuilding` (retryable), not the old app stopping nor a 404
    /// while the id is absent from `sandboxes`, and a create gets
    /// `SandboxExists`. Inserted before the old sandbox leaves `sandboxes`,
    /// removed after the new one is in it, so an id is always in one or
    /// the other.
    rebuilding: Mutex<std::collections::HashSet<String>>,
    /// What the checkpointer last wrote, per sandbox.
    checkpoints: durable::Checkpoints,
    /// An exclusive lock on the data directory, held until the node shuts
    /// down or its last handle goes: two nodes on one database would restore
    /// and write the same sandboxes.
    data_lock: Mutex<Option<std::fs::File>>,
    /// Keeps the coarse clock ticking until the node's last thread lets go.
    _clock: crate::clock::ClockGuard,
}

/// While alive, requests to the sandbox `id` get `Rebuilding` and creating
/// it gets `SandboxExists` ([`Node::mark_rebuilding`]).
struct RebuildGuard {
    node: Arc<NodeInner>,
    id: String,
}

impl Drop for RebuildGuard {
    fn drop(&mut self) {
        self.node.rebuilding.lock().remove(&self.id);
    }
}

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

struct Owner(Weak<NodeInner>);

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
    fn assemble(
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

    /// Events of the whole node with `seq > after` that match `filter`,
    /// oldest first, at most `limit`; `gap` says whether some were dropped
    /// before this reader saw them (each sandbox keeps its newest
    /// `max_events`). Sequence numbers are node-wide, durable and never
    /// reused, so a reader resumes from the last `seq` it saw.
    ///
    /// ```
    /// use graft::{EventFilter, Node, SandboxSpec};
    /// let node = Node::new();
    /// graft::block_on(node.create_sandbox(SandboxSpec::new("ev").entry(None).module("m", "return {}"))).unwrap();
    /// let page = node.events_after(0, &EventFilter::default().sandbox("ev"), 100);
    /// assert!(page.gap.is_none());
    /// assert!(page.events.iter().all(|e| e.sandbox == "ev"));
    /// ```
    pub fn events_after(
        &self,
        after: u64,
        filter: &crate::EventFilter,
        limit: usize,
    ) -> crate::EventPage {
        self.inner.events.read(after, filter, limit)
    }

    /// The highest event number readers can see, updated whenever it moves:
    /// wait on it, then read with [`events_after`](Self::events_after).
    /// Every event at or below it is readable (and durable, with a store).
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.events.subscribe()
    }

    /// Creates a sandbox from a spec (compiles and loads every module, then
    /// starts the app if the spec has an entry module).
    ///
    /// The work (compiling, building the VM, with a store the write to
    /// disk) runs on a thread of its own, never on the caller's: the future
    /// waits without blocking an async runtime's worker thread, and
    /// [`block_on`] drives it from plain threads. Dropping the future does
    /// not cancel the creation.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// # graft::block_on(async {
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("demo").entry(None).module("m", "return {}");
    /// let sandbox = node.create_sandbox(spec).await.unwrap();
    /// assert_eq!(sandbox.id(), "demo");
    /// let again = SandboxSpec::new("demo").entry(None).module("m", "return {}");
    /// assert_eq!(node.create_sandbox(again).await.unwrap_err().kind(), "sandbox_exists");
    /// # });
    /// ```
    pub async fn create_sandbox(&self, spec: SandboxSpec) -> Result<Sandbox> {
        self.create_sandbox_with(spec, HostFunctions::default())
            .await
    }

    /// Creates a sandbox with host functions (capabilities) for its guests;
    /// off the caller's thread, as [`Node::create_sandbox`].
    ///
    /// With a store, the sandbox (its record, first versions and a
    /// `sandbox_created` event) is written before this returns; if that
    /// write fails, no sandbox is created.
    ///
    /// ```
    /// use graft::{HostFunctions, Node, SandboxSpec};
    /// let node = Node::new();
    /// let host = HostFunctions::default().function("host.two", |_| Ok(serde_json::json!(2)));
    /// let spec = SandboxSpec::new("h").entry(None).module("m", "return {}");
    /// let sb = graft::block_on(node.create_sandbox_with(spec, host)).unwrap();
    /// let info = graft::block_on(sb.info()).unwrap();
    /// assert!(info.capabilities.iter().any(|c| c == "host.two"));
    /// ```
    pub async fn create_sandbox_with(
        &self,
        spec: SandboxSpec,
        host: HostFunctions,
    ) -> Result<Sandbox> {
        let node = self.clone();
        self.create_off_thread(move || node.create_from(spec, host, None, true))
            .await
    }

    /// [`Node::create_sandbox_with`] that commits the operations of
    /// `attached` (an audit row) in the creation's transaction: both or
    /// neither are stored. Without a store, or for another store, they are
    /// left untaken ([`crate::store::Attached::applied`] stays `None`).
    pub async fn create_sandbox_attached(
        &self,
        spec: SandboxSpec,
        host: HostFunctions,
        attached: &crate::store::Attached,
    ) -> Result<Sandbox> {
        let node = self.clone();
        let attached = attached.clone();
        self.create_off_thread(move || {
            node.create_from_attached(spec, host, None, true, Some(&attached))
        })
        .await
    }

    /// Runs a creation on a thread of its own ([`blocking::unblock`]); a
    /// panic there (outside the runtime's own barrier) is an internal error.
    async fn create_off_thread(
        &self,
        create: impl FnOnce() -> Result<Sandbox> + Send + 'static,
    ) -> Result<Sandbox> {
        blocking::unblock("graft-create", create)
            .await
            .unwrap_or_else(|message| {
                Err(Error::Luau(format!(
                    "internal error while creating a sandbox: {message}"
                )))
            })
    }

    /// Creates a sandbox, fresh or from a restored `history`; `persist`
    /// writes its creation (a restored one is in the store already).
    fn create_from(
        &self,
        spec: SandboxSpec,
        host: HostFunctions,
        history: Option<BTreeMap<String, ModuleHistory>>,
        persist: bool,
    ) -> Result<Sandbox> {
        self.create_from_attached(spec, host, history, persist, None)
    }

    fn create_from_attached(
        &self,
        spec: SandboxSpec,
        host: HostFunctions,
        history: Option<BTreeMap<String, ModuleHistory>>,
        persist: bool,
        attached: Option<&crate::store::Attached>,
    ) -> Result<Sandbox> {
        spec.validate(&self.inner.limits)?;
        if persist {
            if let Some(why) = self.inner.checkpoints.unrestored.lock().get(&spec.id) {
                // Creating it would overwrite the rows of the one the store
                // holds: its kept versions and checkpointed states. A
                // conflict with what is stored, not bad input.
                return Err(Error::Unrestored {
                    id: spec.id.clone(),
                    reason: why.clone(),
                });
            }
        }
        {
            let map = self.inner.sandboxes.read();
            // Being rebuilt: it exists (its rows are stored), just not in
            // the map for a moment; creating it would clash with its rows.
            if map.contains_key(&spec.id) || (persist && self.rebuilding(&spec.id)) {
                return Err(Error::SandboxExists(spec.id.clone()));
            }
            if map.len() >= self.inner.limits.max_sandboxes {
                return Err(Error::NodeLimit(format!(
                    "the node holds {} sandboxes already (max_sandboxes); delete one first",
                    map.len()
                )));
            }
        }
        let runtime = new_runtime(&spec, &host.0, history.as_ref(), &self.inner)?;
        let ops = persist.then(|| durable::creation_ops(&spec, &runtime.engine.modules));
        let shared = Arc::new(Shared {
            id: spec.id.clone(),
            inbox: Mutex::new(VecDeque::new()),
            scheduled: AtomicBool::new(false),
            runtime: Mutex::new(Some(runtime)),
            failed: Mutex::new(None),
            destroyed: AtomicBool::new(false),
            replaced: AtomicBool::new(false),
            last_info: Mutex::new(None),
            wakeup_at: AtomicU64::new(u64::MAX),
            node: Arc::downgrade(&self.inner),
            known_globals: crate::vm::globals_for(&spec.grants, &host.0),
            spec,
            host_fns: host.0,
        });
        {
            let mut map = self.inner.sandboxes.write();
            // A rebuild puts its sandbox back with `persist` false.
            if map.contains_key(&shared.id) || (persist && self.rebuilding(&shared.id)) {
                return Err(Error::SandboxExists(shared.id.clone()));
            }
            if map.len() >= self.inner.limits.max_sandboxes {
                return Err(Error::NodeLimit(format!(
                    "the node holds {} sandboxes already (max_sandboxes); delete one first",
                    map.len()
                )));
            }
            map.insert(shared.id.clone(), shared.clone());
        }
        self.inner.events.sandbox_created(&shared.id);
        if let Some(ops) = ops {
            let detail = serde_json::json!({
                "entry": shared.spec.entry,
                "modules": shared.spec.modules.keys().collect::<Vec<_>>(),
            });
            if let Err(e) =
                self.inner
                    .events
                    .commit_with(&shared.id, ops, "sandbox_created", detail, attached)
            {
                // Not stored, so not created: the id is free again.
                self.inner.sandboxes.write().remove(&shared.id);
                shared.destroyed.store(true, Ordering::Release);
                let rt = shared.runtime.lock().take();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(rt)));
                return Err(e.into());
            }
        }
        schedule(&self.inner, &shared, false);
        Ok(Sandbox { shared })
    }

    /// The sandbox with this id. While it is being rebuilt with new
    /// settings ([`Node::reconfigure_sandbox`]) there is none for a moment:
    /// [`Error::Rebuilding`] (retryable), not [`Error::NoSandbox`].
    pub fn sandbox(&self, id: &str) -> Result<Sandbox> {
        // First: while the old app stops and the new one starts and gets
        // its states back, neither answers for the sandbox.
        if self.rebuilding(id) {
            return Err(Error::Rebuilding(id.to_owned()));
        }
        self.inner
            .sandboxes
            .read()
            .get(id)
            .map(|s| Sandbox { shared: s.clone() })
            .ok_or_else(|| Error::NoSandbox(id.to_owned()))
    }

    /// Whether the sandbox `id` is being rebuilt with new settings.
    fn rebuilding(&self, id: &str) -> bool {
        self.inner.rebuilding.lock().contains(id)
    }

    /// Marks `id` as being rebuilt until the guard drops (every way out of
    /// `reconfigure_sandbox`, once the sandbox is back in the map or lost).
    fn mark_rebuilding(&self, id: &str) -> RebuildGuard {
        self.inner.rebuilding.lock().insert(id.to_owned());
        RebuildGuard {
            node: self.inner.clone(),
            id: id.to_owned(),
        }
    }

    /// Ids of all sandboxes, sorted.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.inner.sandboxes.read().keys().cloned().collect()
    }

    /// Destroys a sandbox at once: its processes are dropped without
    /// `terminate` (use [`Sandbox::stop_app`] first for an orderly stop).
    /// Never waits for a running slice: a sandbox busy in a callback is
    /// dropped by its scheduler thread when the slice ends.
    ///
    /// With a store, the deletion (and a `sandbox_deleted` event) is written
    /// first; if that write fails the sandbox stays as it was.
    pub fn destroy(&self, id: &str) -> Result<()> {
        self.destroy_attached(id, None)
    }

    /// [`Node::destroy`] that commits the operations of `attached` (an
    /// audit row) in the deletion's transaction; see
    /// [`Node::create_sandbox_attached`].
    pub fn destroy_attached(
        &self,
        id: &str,
        attached: Option<&crate::store::Attached>,
    ) -> Result<()> {
        if self.rebuilding(id) {
            return Err(Error::Rebuilding(id.into()));
        }
        if !self.inner.sandboxes.read().contains_key(id) {
            if self.inner.checkpoints.unrestored.lock().contains_key(id) {
                return self.discard_unrestored(id, attached);
            }
            return Err(Error::NoSandbox(id.into()));
        }
        let ops = match &self.inner.store {
            // The events of the deleted sandbox this deletion pushes out of
            // the kept ones go in the same transaction (bounded: at most one
            // sandbox's `max_events` rows, as in memory).
            Some(_) => std::iter::once(crate::store::WriteOp::DeleteSandbox { id: id.to_owned() })
                .chain(
                    self.inner
                        .events
                        .deletion_prunes(id)
                        .into_iter()
                        .map(|sandbox| crate::store::WriteOp::DeleteEvents { sandbox }),
                )
                .collect(),
            None => Vec::new(),
        };
        self.inner.events.commit_with(
            id,
            ops,
            "sandbox_deleted",
            serde_json::json!({}),
            attached,
        )?;
        let shared = self
            .inner
            .sandboxes
            .write()
            .remove(id)
            .ok_or_else(|| Error::NoSandbox(id.into()))?;
        self.inner.events.sandbox_deleted(id);
        shared.destroyed.store(true, Ordering::Release);
        if let Some(mut guard) = shared.runtime.try_lock() {
            let rt = guard.take();
            drop(guard);
            let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(rt)));
            if dropped.is_err() {
                tracing::error!(sandbox = %id, "the sandbox's VM panicked while dropped");
            }
        }
        shared.drop_inbox();
        Ok(())
    }

    /// Deletes the rows of a stored sandbox that failed to restore (asked
    /// for explicitly through `destroy`), with a `sandbox_deleted` event.
    fn discard_unrestored(
        &self,
        id: &str,
        attached: Option<&crate::store::Attached>,
    ) -> Result<()> {
        let ops = vec![crate::store::WriteOp::DeleteSandbox { id: id.to_owned() }];
        self.inner.events.commit_with(
            id,
            ops,
            "sandbox_deleted",
            serde_json::json!({ "unrestored": true }),
            attached,
        )?;
        self.inner.checkpoints.unrestored.lock().remove(id);
        Ok(())
    }

    /// Drops a sandbox from memory only (its rows stay): the first half of
    /// rebuilding it (`reconfigure_sandbox`).
    fn forget_sandbox(&self, id: &str) {
        let Some(shared) = self.inner.sandboxes.write().remove(id) else {
            return;
        };
        shared.replaced.store(true, Ordering::Release);
        shared.destroyed.store(true, Ordering::Release);
        if let Some(mut guard) = shared.runtime.try_lock() {
            let rt = guard.take();
            drop(guard);
            let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(rt)));
            if dropped.is_err() {
                tracing::error!(sandbox = %id, "the sandbox's VM panicked while dropped");
            }
        }
        shared.drop_inbox();
    }

    /// Reloads the same sources into many sandboxes (SPEC §3 batch). Results
    /// come in input order. With [`BatchOptions::rolling`], the first failure
    /// stops the batch and the remaining sandboxes report `skipped`.
    ///
    /// ```
    /// use graft::{BatchOptions, Node, SandboxSpec};
    /// let node = Node::new();
    /// for id in ["a", "b"] {
    ///     graft::block_on(node.create_sandbox(SandboxSpec::new(id).entry(None).module("m", "return { v = 1 }"))).unwrap();
    /// }
    /// let ids = vec!["a".to_string(), "b".to_string()];
    /// let sources = [("m".to_string(), "return { v = 2 }".to_string())].into();
    /// let results = graft::block_on(node.reload_batch(&ids, &sources, &BatchOptions::default().rolling(true)));
    /// assert!(results.iter().all(|(_, r)| r.is_ok()));
    /// ```
    pub async fn reload_batch(
        &self,
        ids: &[String],
        sources: &BTreeMap<String, String>,
        batch: &BatchOptions,
    ) -> Vec<(String, Result<ReloadReport>)> {
        let opts = &batch.reload;
        let rolling = batch.rolling;
        let max_concurrency = if rolling {
            1
        } else {
            batch.max_concurrency.max(1)
        };
        let mut results: Vec<Option<Result<ReloadReport>>> = (0..ids.len()).map(|_| None).collect();
        let mut next = 0;
        let mut stop = false;
        while next < ids.len() && !stop {
            let end = (next + max_concurrency).min(ids.len());
            let mut waits = Vec::new();
            for (i, id) in ids.iter().enumerate().take(end).skip(next) {
                match self.sandbox(id) {
                    Ok(sb) => waits.push((
                        i,
                        Some(sb.reload_start(sources.clone(), opts.clone(), Direction::Up, None)),
                    )),
                    Err(e) => {
                        results[i] = Some(Err(e));
                        waits.push((i, None));
                    }
                }
            }
            for (i, w) in waits {
                if let Some(w) = w {
                    results[i] = Some(match w {
                        Ok(rx) => rx
                            .await
                            .unwrap_or_else(|_| Err(Error::SandboxStopped(ids[i].clone()))),
                        Err(e) => Err(e),
                    });
                }
                if rolling && results[i].as_ref().is_some_and(|r| r.is_err()) {
                    stop = true;
                }
            }
            next = end;
        }
        ids.iter()
            .zip(results)
            .map(|(id, r)| {
                (
                    id.clone(),
                    r.unwrap_or_else(|| {
                        Err(Error::ReloadAborted {
                            step: ReloadStep::Rolling,
                            module: None,
                            process: None,
                            line: None,
                            column: None,
                            message: "skipped: an earlier sandbox in the rolling batch failed"
                                .into(),
                        })
                    }),
                )
            })
            .collect()
    }

    /// Stops every sandbox's app in order (terminate callbacks run), waiting
    /// up to `timeout` per sandbox.
    pub async fn stop_all(&self, timeout: Duration) {
        let ids = self.sandbox_ids();
        for id in ids {
            if let Ok(sb) = self.sandbox(&id) {
                let _ = with_timeout(sb.stop_app(), timeout).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::ReloadOptions;
    use serde_json::Value as Json;

    const COUNTER: &str = r#"
        return {
          init = function() return 0 end,
          handle_call = function(req, from, n) return n + 1, n + 1 end,
        }
    "#;

    fn counter(node: &Node, id: &str) -> Sandbox {
        let sb = crate::block_on(
            node.create_sandbox(SandboxSpec::new(id).entry(None).module("c", COUNTER)),
        )
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
}
