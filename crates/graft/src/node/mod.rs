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

mod blocking;
mod host_pool;
mod runtime;
mod scheduler;

use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use serde_json::Value as Json;

pub use blocking::{block_on, with_timeout};
pub use runtime::{ProcessInfo, SandboxInfo, QUIESCE_TIMEOUT_MS};

use crate::config::{NodeLimits, SandboxSpec};
use crate::error::{Error, ReloadStep, Result};
use crate::kernel::{AppStatus, Event, HostSlot};
use crate::upgrade::{
    self, Direction, ModuleHistory, ModuleInfo, ModuleVersion, ReloadOptions, ReloadReport,
};
use crate::vm::{HostCall, HostEntry, HostTable};
use runtime::Runtime;
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
    /// What `info` last saw, answered while a long callback holds the VM.
    last_info: Mutex<Option<SandboxInfo>>,
    /// The earliest wake-up registered with the timer thread (`u64::MAX`: none).
    wakeup_at: AtomicU64,
    node: Weak<NodeInner>,
    known_globals: Vec<String>,
    spec: SandboxSpec,
    host_fns: HostTable,
}

/// A sandbox stopped by a panic: the message, its version history and events
/// (plain Rust data, saved from the dead runtime) so that a restart keeps them.
struct Failure {
    message: String,
    history: BTreeMap<String, ModuleHistory>,
    events: Vec<Event>,
}

impl Shared {
    /// Fails the sandbox after a panic: its VM is dropped, its waiters are
    /// answered (their channels close), and later requests get
    /// `sandbox_failed` until it is restarted or deleted.
    fn fail(&self, message: String) {
        tracing::error!(sandbox = %self.id, %message, "internal error: the sandbox failed");
        let rt = self.runtime.lock().take();
        let (history, mut events) = match &rt {
            Some(rt) => (rt.engine.modules.clone(), rt.saved_events()),
            None => (BTreeMap::new(), Vec::new()),
        };
        let seq = events.last().map_or(1, |e| e.seq + 1);
        events.push(Event::new(
            seq,
            "failed",
            serde_json::json!({ "error": message }),
        ));
        *self.failed.lock() = Some(Failure {
            message,
            history,
            events,
        });
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
    /// Keeps the coarse clock ticking until the node's last thread lets go.
    _clock: crate::clock::ClockGuard,
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
/// let sandbox = node.create_sandbox(spec).unwrap();
/// let pid = graft::block_on(sandbox.spawn("counter", serde_json::json!({"start": 41}), Some("c"))).unwrap();
/// assert!(pid.starts_with("<counter."));
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
        let threads = threads.max(1);
        let limits = NodeLimits {
            max_sandbox_memory: limits
                .max_sandbox_memory
                .max(crate::config::MIN_SANDBOX_MEMORY),
            max_sandboxes: limits.max_sandboxes.clamp(1, 1 << 20),
            max_value_bytes: limits.max_value_bytes.clamp(1024, 1 << 32),
            max_events: limits.max_events.clamp(1, 1_000_000),
            max_blocking_host_calls: limits.max_blocking_host_calls.clamp(1, 4096),
        };
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

    /// Creates a sandbox from a spec (compiles and loads every module, then
    /// starts the app if the spec has an entry module).
    pub fn create_sandbox(&self, spec: SandboxSpec) -> Result<Sandbox> {
        self.create_sandbox_with(spec, HostFunctions::default())
    }

    /// Creates a sandbox with host functions (capabilities) for its guests.
    pub fn create_sandbox_with(&self, spec: SandboxSpec, host: HostFunctions) -> Result<Sandbox> {
        spec.validate(&self.inner.limits)?;
        {
            let map = self.inner.sandboxes.read();
            if map.contains_key(&spec.id) {
                return Err(Error::SandboxExists(spec.id.clone()));
            }
            if map.len() >= self.inner.limits.max_sandboxes {
                return Err(Error::NodeLimit(format!(
                    "the node holds {} sandboxes already (max_sandboxes); delete one first",
                    map.len()
                )));
            }
        }
        let runtime = new_runtime(&spec, &host.0, None, &self.inner.limits)?;
        let shared = Arc::new(Shared {
            id: spec.id.clone(),
            inbox: Mutex::new(VecDeque::new()),
            scheduled: AtomicBool::new(false),
            runtime: Mutex::new(Some(runtime)),
            failed: Mutex::new(None),
            destroyed: AtomicBool::new(false),
            last_info: Mutex::new(None),
            wakeup_at: AtomicU64::new(u64::MAX),
            node: Arc::downgrade(&self.inner),
            known_globals: crate::vm::globals_for(&spec.grants, &host.0),
            spec,
            host_fns: host.0,
        });
        {
            let mut map = self.inner.sandboxes.write();
            if map.contains_key(&shared.id) {
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
        schedule(&self.inner, &shared, false);
        Ok(Sandbox { shared })
    }

    /// The sandbox with this id.
    pub fn sandbox(&self, id: &str) -> Result<Sandbox> {
        self.inner
            .sandboxes
            .read()
            .get(id)
            .map(|s| Sandbox { shared: s.clone() })
            .ok_or_else(|| Error::NoSandbox(id.to_owned()))
    }

    /// Ids of all sandboxes, sorted.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.inner.sandboxes.read().keys().cloned().collect()
    }

    /// Destroys a sandbox at once: its processes are dropped without
    /// `terminate` (use [`Sandbox::stop_app`] first for an orderly stop).
    /// Never waits for a running slice: a sandbox busy in a callback is
    /// dropped by its scheduler thread when the slice ends.
    pub fn destroy(&self, id: &str) -> Result<()> {
        let shared = self
            .inner
            .sandboxes
            .write()
            .remove(id)
            .ok_or_else(|| Error::NoSandbox(id.into()))?;
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

    /// Reloads the same sources into many sandboxes (SPEC §3 batch). Results
    /// come in input order. With [`BatchOptions::rolling`], the first failure
    /// stops the batch and the remaining sandboxes report `skipped`.
    ///
    /// ```
    /// use graft::{BatchOptions, Node, SandboxSpec};
    /// let node = Node::new();
    /// for id in ["a", "b"] {
    ///     node.create_sandbox(SandboxSpec::new(id).entry(None).module("m", "return { v = 1 }")).unwrap();
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

/// Host functions granted to a sandbox, by dotted name (`"kv.get"` becomes
/// `kv.get` in Luau). Each takes JSON arguments and returns JSON or an error
/// message, which the guest sees as `nil, message`.
///
/// Three shapes:
/// * [`function`](Self::function): arguments only, run on the scheduler
///   thread inside the calling handler. The fast path, for quick functions.
/// * [`function_with_context`](Self::function_with_context): the same, but
///   the function also learns its caller ([`HostCall`]: sandbox id, pid).
/// * [`blocking`](Self::blocking): for functions that wait (I/O, locks,
///   sleeps). The calling process suspends; the function runs on the
///   node's blocking pool, so other processes and sandboxes keep running.
///
/// A panic in any of them is an error for the guest that called it.
///
/// ```
/// let host = graft::HostFunctions::default()
///     .function("kv.get", |args| Ok(serde_json::json!(format!("value of {}", args[0]))))
///     .function_with_context("whoami", |call| {
///         Ok(serde_json::json!({ "sandbox": call.sandbox, "pid": call.pid }))
///     });
/// assert!(host.names().any(|n| n == "kv.get"));
/// assert!(host.names().any(|n| n == "whoami"));
/// ```
#[derive(Clone, Default)]
pub struct HostFunctions(HostTable);

impl HostFunctions {
    /// Adds a quick host function: it runs on the scheduler thread, inside
    /// the calling handler, so it must not wait (see [`blocking`](Self::blocking)).
    pub fn function(
        mut self,
        name: &str,
        f: impl Fn(Vec<Json>) -> std::result::Result<Json, String> + Send + Sync + 'static,
    ) -> Self {
        self.0
            .insert(name.to_owned(), HostEntry::Quick(Arc::new(f)));
        self
    }

    /// Adds a quick host function that receives its caller: the sandbox id
    /// and the calling process's pid (`"<counter.1>"`), with the arguments.
    /// Called outside a process (a module body), the guest gets `nil, message`.
    ///
    /// ```
    /// use graft::{HostFunctions, Node, SandboxSpec};
    /// use serde_json::json;
    /// let host = HostFunctions::default().function_with_context("who.am_i", |call| {
    ///     Ok(json!(format!("{} in {}", call.pid, call.sandbox)))
    /// });
    /// let spec = SandboxSpec::new("ctx").entry(None).module("m", r#"
    ///     local m = {}
    ///     function m.init(_) return {} end
    ///     function m.handle_call(_, _, s) return who.am_i(), s end
    ///     return m
    /// "#);
    /// let node = Node::new();
    /// let sandbox = node.create_sandbox_with(spec, host).unwrap();
    /// let pid = graft::block_on(sandbox.spawn("m", json!(null), None)).unwrap();
    /// let reply = graft::block_on(sandbox.call(&pid, json!(null), None)).unwrap();
    /// assert_eq!(reply, json!(format!("{pid} in ctx")));
    /// ```
    pub fn function_with_context(
        mut self,
        name: &str,
        f: impl for<'a> Fn(HostCall<'a>) -> std::result::Result<Json, String> + Send + Sync + 'static,
    ) -> Self {
        self.0
            .insert(name.to_owned(), HostEntry::WithContext(Arc::new(f)));
        self
    }

    /// Adds a blocking host function. When a guest calls it, the calling
    /// process suspends (as in a `graft.call` that waits) and the function
    /// runs on the node's blocking pool; its result resumes the process.
    /// Other processes of the sandbox, and other sandboxes, keep running.
    ///
    /// Bounds:
    /// * At most [`NodeLimits::max_blocking_host_calls`](crate::NodeLimits::max_blocking_host_calls)
    ///   run at once per node; more calls wait in a queue.
    /// * The caller waits at most its sandbox's `handler_ms` (wall clock),
    ///   then gets `nil, "<name>: timeout after …"`; a late result is
    ///   dropped. A function that never returns keeps its pool thread.
    /// * Arguments and the result are capped at the node's `max_value_bytes`.
    /// * A panic is an error (`nil, "<name>: panicked: …"`) for the caller.
    /// * If the sandbox is destroyed meanwhile, the result is dropped.
    /// * Only a process's callback may call it (a module body gets `nil, message`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use graft::{HostFunctions, Node, SandboxSpec};
    /// use serde_json::json;
    /// let host = HostFunctions::default().blocking("db.fetch", |call| {
    ///     std::thread::sleep(Duration::from_millis(20)); // stands for real I/O
    ///     Ok(json!({ "key": call.args[0], "asked_by": call.pid }))
    /// });
    /// let spec = SandboxSpec::new("db").entry(None).module("m", r#"
    ///     local m = {}
    ///     function m.init(_) return {} end
    ///     function m.handle_call(key, _, s)
    ///         local row, err = db.fetch(key)
    ///         assert(row, err)
    ///         return row.key, s
    ///     end
    ///     return m
    /// "#);
    /// let node = Node::new();
    /// let sandbox = node.create_sandbox_with(spec, host).unwrap();
    /// let pid = graft::block_on(sandbox.spawn("m", json!(null), None)).unwrap();
    /// let reply = graft::block_on(sandbox.call(&pid, json!("k1"), None)).unwrap();
    /// assert_eq!(reply, json!("k1"));
    /// ```
    pub fn blocking(
        mut self,
        name: &str,
        f: impl for<'a> Fn(HostCall<'a>) -> std::result::Result<Json, String> + Send + Sync + 'static,
    ) -> Self {
        self.0
            .insert(name.to_owned(), HostEntry::Blocking(Arc::new(f)));
        self
    }

    /// The registered names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(|s| s.as_str())
    }
}

/// A handle to one sandbox; cheap to clone. Every method queues a request to
/// the sandbox's scheduler and waits for the answer without blocking it.
#[derive(Clone)]
pub struct Sandbox {
    shared: Arc<Shared>,
}

fn stopped(id: &str) -> Error {
    Error::SandboxStopped(id.to_owned())
}

impl Sandbox {
    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Queues a command in the inbox; returns the node, which the caller
    /// must wake (`schedule`) or serve itself (`run_inline`).
    fn enqueue(&self, cmd: Command) -> Result<Arc<NodeInner>> {
        let node = self
            .shared
            .node
            .upgrade()
            .ok_or_else(|| stopped(&self.shared.id))?;
        if node.stopping.load(Ordering::Acquire) {
            return Err(stopped(&self.shared.id));
        }
        if self.shared.destroyed.load(Ordering::Acquire) {
            return Err(Error::NoSandbox(self.shared.id.clone()));
        }
        if let Some(e) = self.shared.failure_error() {
            return Err(e);
        }
        self.shared.inbox.lock().push_back(cmd);
        Ok(node)
    }

    fn submit(&self, cmd: impl FnOnce(&mut Runtime) + Send + 'static) -> Result<()> {
        let node = self.enqueue(Box::new(cmd))?;
        schedule(&node, &self.shared, false);
        Ok(())
    }

    async fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Runtime) -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| {
            let _ = tx.send(f(rt));
        })?;
        rx.await.map_err(|_| self.gone())
    }

    /// Why a request's answer channel closed: the sandbox failed, was
    /// destroyed, or its node stopped.
    fn gone(&self) -> Error {
        let node_stopped = self
            .shared
            .node
            .upgrade()
            .is_none_or(|n| n.stopping.load(Ordering::Acquire));
        if node_stopped {
            return stopped(&self.shared.id);
        }
        if let Some(e) = self.shared.failure_error() {
            return e;
        }
        if self.shared.destroyed.load(Ordering::Acquire) {
            return Error::NoSandbox(self.shared.id.clone());
        }
        stopped(&self.shared.id)
    }

    async fn ask_slot(
        &self,
        f: impl FnOnce(&mut Runtime, Arc<HostSlot>) + Send + 'static,
    ) -> Result<Json> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        self.submit(move |rt| f(rt, slot))?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Calls a process (`handle_call`) and waits for its reply. `target` is a
    /// registered name or a pid string `"<module.N>"`. Default timeout 5 s.
    pub async fn call(&self, target: &str, request: Json, timeout_ms: Option<u64>) -> Result<Json> {
        let target = target.to_owned();
        let ms = timeout_ms.unwrap_or(crate::kernel::DEFAULT_CALL_TIMEOUT_MS);
        self.ask_slot(move |rt, slot| rt.host_call(target, request, ms, slot))
            .await
    }

    /// Calls a process like [`Sandbox::call`], blocking the calling thread
    /// until the reply arrives or `timeout_ms` (default 5 s) passes.
    ///
    /// When the sandbox is idle (neither queued nor running), the handler
    /// runs on the calling thread: no scheduler thread is woken, and the
    /// reply is usually ready when the slice ends. Otherwise the request
    /// queues like [`Sandbox::call`]'s. Requests from one thread keep their
    /// order either way. For threads that may block; in async code use
    /// [`Sandbox::call`], which never holds an executor thread for a slice.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("demo").entry(None).module("echo", r#"
    ///     local echo = {}
    ///     function echo.init() return {} end
    ///     function echo.handle_call(req, from, state) return req, state end
    ///     return echo
    /// "#);
    /// let sandbox = node.create_sandbox(spec).unwrap();
    /// graft::block_on(sandbox.spawn("echo", serde_json::json!({}), Some("e"))).unwrap();
    /// let reply = sandbox.call_blocking("e", serde_json::json!("hi"), None).unwrap();
    /// assert_eq!(reply, serde_json::json!("hi"));
    /// ```
    pub fn call_blocking(
        &self,
        target: &str,
        request: Json,
        timeout_ms: Option<u64>,
    ) -> Result<Json> {
        let target = target.to_owned();
        let ms = timeout_ms.unwrap_or(crate::kernel::DEFAULT_CALL_TIMEOUT_MS);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        let node = self.enqueue(Box::new(move |rt: &mut Runtime| {
            rt.host_call(target, request, ms, slot)
        }))?;
        if !scheduler::run_inline(&node, &self.shared) {
            schedule(&node, &self.shared, false);
        }
        drop(node);
        match rx.try_recv() {
            Ok(answer) => answer,
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                block_on(rx).map_err(|_| self.gone())?
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Err(self.gone()),
        }
    }

    /// Casts a message (`handle_cast`). Fails with `MailboxFull` rather than dropping it.
    pub async fn cast(&self, target: &str, message: Json) -> Result<()> {
        let target = target.to_owned();
        self.ask(move |rt| rt.host_send(&target, &message, true))
            .await?
    }

    /// Sends a plain message (`handle_info`).
    pub async fn send(&self, target: &str, message: Json) -> Result<()> {
        let target = target.to_owned();
        self.ask(move |rt| rt.host_send(&target, &message, false))
            .await?
    }

    /// Spawns a process of `module` with `args`; returns its pid string once `init` succeeded.
    pub async fn spawn(&self, module: &str, args: Json, name: Option<&str>) -> Result<String> {
        let module = module.to_owned();
        let name = name.map(str::to_owned);
        let pid = self
            .ask_slot(move |rt, slot| rt.host_spawn(&module, &args, name.as_deref(), slot))
            .await?;
        Ok(pid.as_str().unwrap_or_default().to_owned())
    }

    /// Runs a Luau chunk as a short-lived process under the sandbox's limits.
    pub async fn eval(&self, source: &str) -> Result<Json> {
        let cx = upgrade::PrepareContext {
            known_globals: &self.shared.known_globals,
            max_source_bytes: self.shared.spec.limits.max_source_bytes,
            files: &BTreeMap::new(),
        };
        let mut sources = BTreeMap::new();
        sources.insert("eval".to_owned(), source.to_owned());
        let prepared = upgrade::prepare(&sources, &cx)?;
        let bytecode = prepared[0].bytecode.clone();
        self.ask_slot(move |rt, slot| rt.host_eval(&bytecode, slot))
            .await
    }

    /// The process list.
    pub async fn processes(&self) -> Result<Vec<ProcessInfo>> {
        self.ask(|rt| rt.processes()).await
    }

    /// A process's state as JSON.
    pub async fn state(&self, target: &str) -> Result<Json> {
        let target = target.to_owned();
        self.ask(move |rt| rt.state(&target)).await?
    }

    /// Status, process count and memory. A failed sandbox answers with
    /// status `failed` (and no processes) until it is restarted or deleted.
    pub async fn info(&self) -> Result<SandboxInfo> {
        if let Some(info) = self.failed_info() {
            return Ok(info);
        }
        if self.shared.destroyed.load(Ordering::Acquire) {
            return Err(Error::NoSandbox(self.shared.id.clone()));
        }
        // Read between slices, without queueing: a listing must answer even
        // while this sandbox is stuck in a long callback.
        let guard = self
            .shared
            .runtime
            .try_lock_for(Duration::from_millis(INFO_WAIT_MS));
        match guard {
            Some(guard) => {
                let info = guard.as_ref().map(|rt| rt.info());
                drop(guard);
                let info = info.ok_or_else(|| self.gone())?;
                *self.shared.last_info.lock() = Some(info.clone());
                Ok(info)
            }
            None => Ok(self.busy_info()),
        }
    }

    /// What `info` says while a callback holds the sandbox: the figures of
    /// the last look, with status `busy`.
    fn busy_info(&self) -> SandboxInfo {
        let last = self.shared.last_info.lock().clone();
        let mut info = last.unwrap_or_else(|| {
            let spec = &self.shared.spec;
            SandboxInfo {
                id: self.shared.id.clone(),
                status: String::new(),
                app: AppStatus::None,
                entry: spec.entry.clone(),
                process_count: 0,
                memory_bytes: 0,
                limits: spec.limits.clone(),
                module_count: spec.modules.len(),
                capabilities: Vec::new(),
                mailbox_full_total: 0,
            }
        });
        info.status = "busy".into();
        info
    }

    fn failed_info(&self) -> Option<SandboxInfo> {
        let failed = self.shared.failed.lock();
        let f = failed.as_ref()?;
        let spec = &self.shared.spec;
        let mut capabilities = spec.grants.clone();
        capabilities.extend(self.shared.host_fns.keys().cloned());
        Some(SandboxInfo {
            id: self.shared.id.clone(),
            status: "failed".into(),
            app: AppStatus::Stopped {
                reason: f.message.clone(),
            },
            entry: spec.entry.clone(),
            process_count: 0,
            memory_bytes: 0,
            limits: spec.limits.clone(),
            module_count: f.history.len(),
            capabilities,
            mailbox_full_total: 0,
        })
    }

    /// Modules with their current version.
    pub async fn modules(&self) -> Result<Vec<ModuleInfo>> {
        self.ask(|rt| rt.modules()).await
    }

    /// Kept versions of a module, oldest first.
    pub async fn versions(&self, module: &str) -> Result<Vec<ModuleVersion>> {
        let module = module.to_owned();
        self.ask(move |rt| rt.versions(&module)).await?
    }

    /// Events, newest last. A failed sandbox keeps the events it had, and
    /// a `failed` event with the internal error.
    pub async fn events(&self) -> Result<Vec<Event>> {
        self.events_since(0).await
    }

    /// The events with `seq > since`, newest last: what happened after the
    /// last event a reader saw (sequence numbers start at 1, so `0` is every
    /// kept event). Events pruned by the node's `max_events` are not
    /// returned, so a reader that fell behind sees a gap in `seq`.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// let sb = node
    ///     .create_sandbox(SandboxSpec::new("ev").entry(None).module("m", "return {}"))
    ///     .unwrap();
    /// let all = graft::block_on(sb.events()).unwrap();
    /// let seen = all.last().map_or(0, |e| e.seq);
    /// let src = [("m".to_string(), "return { v = 2 }".to_string())].into();
    /// graft::block_on(sb.reload(src, Default::default())).unwrap();
    /// let newer = graft::block_on(sb.events_since(seen)).unwrap();
    /// assert!(!newer.is_empty() && newer.iter().all(|e| e.seq > seen));
    /// ```
    pub async fn events_since(&self, since: u64) -> Result<Vec<Event>> {
        if let Some(f) = self.shared.failed.lock().as_ref() {
            return Ok(f.events.iter().filter(|e| e.seq > since).cloned().collect());
        }
        self.ask(move |rt| rt.events_since(since)).await
    }

    /// Waits for the app's `init` to finish; returns the root supervisor's pid.
    pub async fn wait_app_started(&self) -> Result<Json> {
        self.ask_slot(|rt, slot| rt.wait_app(slot)).await
    }

    /// Stops the app in order: supervisors stop children in reverse order and
    /// `terminate` callbacks run. Returns the app's exit reason.
    pub async fn stop_app(&self) -> Result<Json> {
        self.ask_slot(|rt, slot| rt.stop_app(slot)).await
    }

    fn reload_start(
        &self,
        sources: BTreeMap<String, String>,
        opts: ReloadOptions,
        direction: Direction,
        targets: Option<HashMap<String, u32>>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<ReloadReport>>> {
        // Compile and check here, on the caller's thread: the sandbox keeps running.
        let cx = upgrade::PrepareContext {
            known_globals: &self.shared.known_globals,
            max_source_bytes: self.shared.spec.limits.max_source_bytes,
            files: &self.shared.spec.files,
        };
        let prepared = match upgrade::prepare(&sources, &cx) {
            Ok(p) => p,
            Err(e) => {
                let detail = match &e {
                    Error::Compile { diagnostics } => {
                        serde_json::json!({ "modules": sources.keys().collect::<Vec<_>>(), "error": e.to_string(), "diagnostics": diagnostics })
                    }
                    _ => serde_json::json!({ "error": e.to_string() }),
                };
                let _ =
                    self.submit(move |rt| crate::kernel::kernel(&rt.vm.lua).event("abort", detail));
                return Err(e);
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| rt.reload(prepared, opts, direction, targets, tx))?;
        Ok(rx)
    }

    /// Reloads modules from sources as one transaction (SPEC §3).
    ///
    /// ```
    /// use graft::{Node, SandboxSpec, ReloadOptions};
    /// let node = Node::new();
    /// let v1 = "return { init = function() return 1 end, handle_call = function(r, f, s) return s, s end }";
    /// let v2 = "return { init = function() return 1 end, handle_call = function(r, f, s) return s * 10, s end }";
    /// let sb = node.create_sandbox(SandboxSpec::new("up").entry(None).module("m", v1)).unwrap();
    /// graft::block_on(sb.spawn("m", serde_json::json!(null), Some("m"))).unwrap();
    /// let mut sources = std::collections::BTreeMap::new();
    /// sources.insert("m".to_string(), v2.to_string());
    /// let report = graft::block_on(sb.reload(sources, ReloadOptions::default())).unwrap();
    /// assert_eq!(report.modules[0].to, 2);
    /// assert_eq!(graft::block_on(sb.call("m", serde_json::json!(null), None)).unwrap(), 10);
    /// ```
    pub async fn reload(
        &self,
        sources: BTreeMap<String, String>,
        opts: ReloadOptions,
    ) -> Result<ReloadReport> {
        let rx = self.reload_start(sources, opts, Direction::Up, None)?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Rolls `module` back (or forward) to a kept version; `code_change` gets
    /// `{ down = <current version> }`. The target version becomes current.
    pub async fn rollback(
        &self,
        module: &str,
        version: u32,
        opts: ReloadOptions,
    ) -> Result<ReloadReport> {
        let module_name = module.to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| {
            let h = match rt.engine.modules.get(&module_name) {
                Some(h) => h,
                None => {
                    let _ = tx.send(Err(Error::NoModule(module_name)));
                    return;
                }
            };
            let Some(v) = h.get(version).cloned() else {
                let _ = tx.send(Err(Error::NoVersion {
                    module: module_name,
                    version,
                    kept: h.kept(),
                }));
                return;
            };
            if h.current == version {
                let _ = tx.send(Ok(ReloadReport {
                    status: upgrade::ReloadStatus::Unchanged,
                    modules: Vec::new(),
                    processes_migrated: 0,
                    timings: Default::default(),
                }));
                return;
            }
            // Moving to an older version is a downgrade (`{ down = n }`); to a
            // newer kept version, an ordinary upgrade.
            let direction = if version < h.current {
                Direction::Down
            } else {
                Direction::Up
            };
            let mut one = BTreeMap::new();
            one.insert(module_name.clone(), v);
            let prepared = runtime::prepared_from_versions(&one, &rt.engine);
            let mut targets = HashMap::new();
            targets.insert(module_name, version);
            rt.reload(prepared, opts, direction, Some(targets), tx);
        })?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Every kept version of every module (for export/backup).
    pub async fn export(&self) -> Result<BTreeMap<String, Vec<ModuleVersion>>> {
        self.ask(|rt| rt.export()).await
    }

    /// Imports module histories produced by [`Sandbox::export`] (possibly from
    /// another node). Every version's source is checked against its checksum
    /// and recompiled here; the newest imported version of each module goes
    /// live through an ordinary reload (so live processes are migrated), and
    /// then the imported versions replace the module's kept history.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec, ReloadOptions};
    /// let node = Node::new();
    /// let a = node.create_sandbox(SandboxSpec::new("a").entry(None).module("m", "return { v = 1 }")).unwrap();
    /// let mut v2 = std::collections::BTreeMap::new();
    /// v2.insert("m".to_string(), "return { v = 2 }".to_string());
    /// graft::block_on(a.reload(v2, ReloadOptions::default())).unwrap();
    /// let exported = graft::block_on(a.export()).unwrap();
    /// let b = node.create_sandbox(SandboxSpec::new("b").entry(None).module("m", "return { v = 0 }")).unwrap();
    /// graft::block_on(b.import(exported, ReloadOptions::default())).unwrap();
    /// let kept: Vec<u32> = graft::block_on(b.versions("m")).unwrap().iter().map(|v| v.version).collect();
    /// assert_eq!(kept, vec![1, 2]);
    /// ```
    pub async fn import(
        &self,
        modules: BTreeMap<String, Vec<ModuleVersion>>,
        opts: ReloadOptions,
    ) -> Result<ReloadReport> {
        let import = upgrade::prepare_import(
            modules,
            self.shared.spec.limits.max_source_bytes,
            &self.shared.spec.files,
        )?;
        let rx = self.reload_start(import.newest, opts, Direction::Up, Some(import.targets))?;
        let report = rx.await.map_err(|_| self.gone())??;
        let histories = import.histories;
        self.ask(move |rt| {
            for (name, versions) in histories {
                let max = rt.engine.max_versions;
                rt.engine
                    .modules
                    .entry(name)
                    .or_default()
                    .replace(versions, max);
            }
        })
        .await?;
        Ok(report)
    }

    /// Stops the app, rebuilds the VM from the modules' current versions and
    /// starts the app again. Version history is kept.
    pub async fn restart(&self) -> Result<()> {
        if self.shared.failed.lock().is_some() {
            return self.restart_failed();
        }
        let _ = with_timeout(self.stop_app(), Duration::from_secs(10)).await;
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| {
            let history = std::mem::take(&mut rt.engine.modules);
            let Some(node) = shared.node.upgrade() else {
                rt.engine.modules = history;
                let _ = tx.send(Err(stopped(&shared.id)));
                return;
            };
            match new_runtime(&shared.spec, &shared.host_fns, Some(&history), &node.limits) {
                Ok(mut new_rt) => {
                    // Kept across the restart: events, and reloads that were
                    // waiting (they apply to the new VM, never lost).
                    new_rt.adopt(rt);
                    *rt = new_rt;
                    let _ = tx.send(Ok(()));
                }
                Err(e) => {
                    rt.engine.modules = history;
                    let _ = tx.send(Err(e));
                }
            }
        })?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Rebuilds a failed sandbox from its saved version history.
    fn restart_failed(&self) -> Result<()> {
        let node = self
            .shared
            .node
            .upgrade()
            .ok_or_else(|| stopped(&self.shared.id))?;
        let mut failed = self.shared.failed.lock();
        let Some(f) = failed.as_ref() else {
            return Ok(()); // restarted meanwhile
        };
        let history = (!f.history.is_empty()).then_some(&f.history);
        let mut rt = new_runtime(
            &self.shared.spec,
            &self.shared.host_fns,
            history,
            &node.limits,
        )?;
        if let Some(f) = failed.as_mut() {
            rt.restore_events(std::mem::take(&mut f.events));
        }
        *self.shared.runtime.lock() = Some(rt);
        *failed = None;
        drop(failed);
        schedule(&node, &self.shared, false);
        Ok(())
    }
}

/// Builds a sandbox's runtime behind the panic barrier: from `spec`, or from
/// the current versions of `history` when restarting.
fn new_runtime(
    spec: &SandboxSpec,
    host_fns: &HostTable,
    history: Option<&BTreeMap<String, ModuleHistory>>,
    limits: &NodeLimits,
) -> Result<Runtime> {
    let mut spec = spec.clone();
    let spec_id = spec.id.clone();
    if let Some(h) = history {
        spec.modules = h
            .iter()
            .filter_map(|(n, h)| h.current().map(|v| (n.clone(), v.source.clone())))
            .collect();
    }
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Runtime::new(spec, host_fns.clone(), history.cloned(), limits)
    }));
    built.unwrap_or_else(|payload| {
        Err(Error::SandboxFailed {
            id: spec_id.clone(),
            message: panic_message(&*payload),
        })
    })
}

/// How [`Node::reload_batch`] runs: the options of each sandbox's reload,
/// how many sandboxes reload at once, and whether the batch is rolling.
///
/// ```
/// use graft::{BatchOptions, ReloadOptions};
/// let batch = BatchOptions::new(ReloadOptions::default()).max_concurrency(4);
/// assert_eq!(batch.max_concurrency, 4);
/// assert!(!batch.rolling);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BatchOptions {
    /// Applied to every sandbox's reload.
    pub reload: ReloadOptions,
    /// Sandboxes reloading at once (0 counts as 1). Default 8.
    pub max_concurrency: usize,
    /// One sandbox at a time; the first failure stops the batch and the
    /// rest report `skipped`. Default false.
    pub rolling: bool,
}

impl BatchOptions {
    /// A parallel batch (8 at once) with these reload options.
    pub fn new(reload: ReloadOptions) -> BatchOptions {
        BatchOptions {
            reload,
            max_concurrency: 8,
            rolling: false,
        }
    }
    /// Sets how many sandboxes reload at once.
    pub fn max_concurrency(mut self, n: usize) -> BatchOptions {
        self.max_concurrency = n;
        self
    }
    /// Makes the batch rolling (or not).
    pub fn rolling(mut self, rolling: bool) -> BatchOptions {
        self.rolling = rolling;
        self
    }
}

impl Default for BatchOptions {
    fn default() -> BatchOptions {
        BatchOptions::new(ReloadOptions::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COUNTER: &str = r#"
        return {
          init = function() return 0 end,
          handle_call = function(req, from, n) return n + 1, n + 1 end,
        }
    "#;

    fn counter(node: &Node, id: &str) -> Sandbox {
        let sb = node
            .create_sandbox(SandboxSpec::new(id).entry(None).module("c", COUNTER))
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
        let sb = node
            .create_sandbox(
                SandboxSpec::new("r")
                    .entry(None)
                    .module("w", spinner)
                    .limits(crate::Limits {
                        handler_ms: 1000,
                        ..crate::Limits::default()
                    }),
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
