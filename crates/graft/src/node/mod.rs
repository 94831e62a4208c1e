//! The node: sandboxes scheduled in parallel on a pool of scheduler threads.
//!
//! Invariants:
//! * A sandbox is on the run queue at most once (`scheduled` flag) and is run
//!   by one scheduler thread at a time (its runtime mutex), so its VM is never
//!   touched concurrently. Different sandboxes run in parallel.
//! * Every request from a host is a command queued to the sandbox and run
//!   between time slices; the host waits on a one-shot channel, never on the
//!   VM. A slow handler therefore never blocks a host thread.
//! * A slice lasts at most [`SLICE_MS`](crate::sandbox) of CPU: the VM
//!   interrupt preempts long callbacks, so a spinning sandbox cannot starve
//!   the others.

mod runtime;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use serde_json::Value as Json;

pub use runtime::{ProcessInfo, SandboxInfo, QUIESCE_TIMEOUT_MS};

use crate::clock;
use crate::config::{NodeLimits, SandboxSpec};
use crate::error::{Error, Result};
use crate::sandbox::{self, Event, HostSlot};
use crate::upgrade::{self, Direction, ModuleInfo, ModuleVersion, ReloadOptions, ReloadReport};
use crate::vm::HostFn;
use runtime::Runtime;

type Command = Box<dyn FnOnce(&mut Runtime) + Send>;

/// How long an idle scheduler thread or a waiting host thread polls before sleeping.
const SPIN_MICROS: u64 = 50;

struct Shared {
    id: String,
    inbox: Mutex<VecDeque<Command>>,
    scheduled: AtomicBool,
    runtime: Mutex<Option<Runtime>>,
    node: Weak<NodeInner>,
    known_globals: Vec<String>,
    spec: SandboxSpec,
    host_fns: BTreeMap<String, HostFn>,
}

struct NodeInner {
    sandboxes: RwLock<BTreeMap<String, Arc<Shared>>>,
    queue: Mutex<VecDeque<Arc<Shared>>>,
    queue_cv: Condvar,
    timers: Mutex<BinaryHeap<Reverse<(u64, u64, usize)>>>,
    timer_targets: Mutex<HashMap<u64, Weak<Shared>>>,
    timer_seq: AtomicU64,
    timer_cv: Condvar,
    stopping: AtomicBool,
    threads: usize,
    limits: NodeLimits,
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
        };
        let inner = Arc::new(NodeInner {
            sandboxes: RwLock::new(BTreeMap::new()),
            queue: Mutex::new(VecDeque::new()),
            queue_cv: Condvar::new(),
            timers: Mutex::new(BinaryHeap::new()),
            timer_targets: Mutex::new(HashMap::new()),
            timer_seq: AtomicU64::new(0),
            timer_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            threads,
            limits,
        });
        for i in 0..threads {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name(format!("graft-sched-{i}"))
                .spawn(move || scheduler_loop(weak))
                .expect("cannot start a scheduler thread");
        }
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("graft-timers".into())
            .spawn(move || timer_loop(weak))
            .expect("cannot start the timer thread");
        Node { inner }
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
            let map = self.inner.sandboxes.read().expect("lock");
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
        let runtime = Runtime::new(spec.clone(), host.0.clone(), None, &self.inner.limits)?;
        let shared = Arc::new(Shared {
            id: spec.id.clone(),
            inbox: Mutex::new(VecDeque::new()),
            scheduled: AtomicBool::new(false),
            runtime: Mutex::new(Some(runtime)),
            node: Arc::downgrade(&self.inner),
            known_globals: crate::vm::known_globals(&spec.grants, &host.0),
            spec,
            host_fns: host.0,
        });
        {
            let mut map = self.inner.sandboxes.write().expect("lock");
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
        schedule(&self.inner, &shared);
        Ok(Sandbox { shared })
    }

    /// The sandbox with this id.
    pub fn sandbox(&self, id: &str) -> Result<Sandbox> {
        self.inner
            .sandboxes
            .read()
            .expect("lock")
            .get(id)
            .map(|s| Sandbox { shared: s.clone() })
            .ok_or_else(|| Error::NoSandbox(id.to_owned()))
    }

    /// Ids of all sandboxes, sorted.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.inner
            .sandboxes
            .read()
            .expect("lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Destroys a sandbox at once: its processes are dropped without
    /// `terminate` (use [`Sandbox::stop_app`] first for an orderly stop).
    pub fn destroy(&self, id: &str) -> Result<()> {
        let shared = self
            .inner
            .sandboxes
            .write()
            .expect("lock")
            .remove(id)
            .ok_or_else(|| Error::NoSandbox(id.into()))?;
        // Wait for a running slice to end, then drop the VM.
        let rt = shared.runtime.lock().expect("lock").take();
        drop(rt);
        shared.inbox.lock().expect("lock").clear();
        Ok(())
    }

    /// Reloads the same sources into many sandboxes (SPEC §3 batch). Results
    /// come in input order. With `rolling`, the first failure stops the batch
    /// and the remaining sandboxes report `skipped`.
    pub async fn reload_batch(
        &self,
        ids: &[String],
        sources: &BTreeMap<String, String>,
        opts: &ReloadOptions,
        max_concurrency: usize,
        rolling: bool,
    ) -> Vec<(String, Result<ReloadReport>)> {
        let max_concurrency = if rolling { 1 } else { max_concurrency.max(1) };
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
                            step: "rolling".into(),
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

impl Drop for NodeInner {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// Host functions granted to a sandbox, by dotted name (`"kv.get"` becomes
/// `kv.get` in Luau). Each takes JSON arguments and returns JSON or an error
/// message, which the guest sees as `nil, message`.
///
/// ```
/// let host = graft::HostFunctions::default()
///     .function("kv.get", |args| Ok(serde_json::json!(format!("value of {}", args[0]))));
/// assert!(host.names().any(|n| n == "kv.get"));
/// ```
#[derive(Clone, Default)]
pub struct HostFunctions(BTreeMap<String, HostFn>);

impl HostFunctions {
    /// Adds a host function.
    pub fn function(
        mut self,
        name: &str,
        f: impl Fn(Vec<Json>) -> std::result::Result<Json, String> + Send + Sync + 'static,
    ) -> Self {
        self.0.insert(name.to_owned(), Arc::new(f));
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

    fn submit(&self, cmd: impl FnOnce(&mut Runtime) + Send + 'static) -> Result<()> {
        let node = self
            .shared
            .node
            .upgrade()
            .ok_or_else(|| stopped(&self.shared.id))?;
        if !node
            .sandboxes
            .read()
            .expect("lock")
            .contains_key(&self.shared.id)
        {
            return Err(Error::NoSandbox(self.shared.id.clone()));
        }
        self.shared
            .inbox
            .lock()
            .expect("lock")
            .push_back(Box::new(cmd));
        schedule(&node, &self.shared);
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
        rx.await.map_err(|_| stopped(&self.shared.id))
    }

    async fn ask_slot(
        &self,
        f: impl FnOnce(&mut Runtime, Arc<HostSlot>) + Send + 'static,
    ) -> Result<Json> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        self.submit(move |rt| f(rt, slot))?;
        rx.await.map_err(|_| stopped(&self.shared.id))?
    }

    /// Calls a process (`handle_call`) and waits for its reply. `target` is a
    /// registered name or a pid string `"<module.N>"`. Default timeout 5 s.
    pub async fn call(&self, target: &str, request: Json, timeout_ms: Option<u64>) -> Result<Json> {
        let target = target.to_owned();
        let ms = timeout_ms.unwrap_or(crate::sandbox::natives_default_timeout());
        self.ask_slot(move |rt, slot| rt.host_call(target, request, ms, slot))
            .await
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

    /// Status, process count and memory.
    pub async fn info(&self) -> Result<SandboxInfo> {
        self.ask(|rt| rt.info()).await
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

    /// Events, newest last.
    pub async fn events(&self) -> Result<Vec<Event>> {
        self.ask(|rt| rt.events()).await
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
                let _ = self
                    .submit(move |rt| crate::sandbox::kernel(&rt.vm.lua).event("abort", detail));
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
        rx.await.map_err(|_| stopped(&self.shared.id))?
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
                let kept = h
                    .versions
                    .iter()
                    .map(|v| v.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = tx.send(Err(Error::NoVersion {
                    module: module_name,
                    version,
                    kept,
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
        rx.await.map_err(|_| stopped(&self.shared.id))?
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
        let max_source = self.shared.spec.limits.max_source_bytes;
        let mut histories = BTreeMap::new();
        let mut newest = BTreeMap::new();
        let mut targets = HashMap::new();
        for (name, mut versions) in modules {
            crate::config::validate_module_name(&name)?;
            versions.sort_by_key(|v| v.version);
            versions.dedup_by_key(|v| v.version);
            let Some(last) = versions.last() else {
                return Err(Error::InvalidInput(format!(
                    "module `{name}`: no versions to import"
                )));
            };
            if versions.first().is_some_and(|v| v.version == 0) {
                return Err(Error::InvalidInput(format!(
                    "module `{name}`: versions start at 1"
                )));
            }
            newest.insert(name.clone(), last.source.clone());
            targets.insert(name.clone(), last.version);
            for v in &mut versions {
                if upgrade::checksum(&v.source) != v.checksum {
                    return Err(Error::InvalidInput(format!(
                        "module `{name}` version {}: the source does not match its checksum",
                        v.version
                    )));
                }
                let file = format!("{}.luau", name.replace('.', "/"));
                v.bytecode = Arc::new(crate::vm::compile(&name, &file, &v.source, max_source)?);
            }
            histories.insert(name, versions);
        }
        let rx = self.reload_start(newest, opts, Direction::Up, Some(targets))?;
        let report = rx.await.map_err(|_| stopped(&self.shared.id))??;
        self.ask(move |rt| {
            for (name, versions) in histories {
                let h = rt.engine.modules.entry(name).or_default();
                let newest = versions.last().map(|v| v.version).unwrap_or(h.current);
                h.versions = versions.into_iter().collect();
                h.current = newest;
                h.next = h.versions.iter().map(|v| v.version).max().unwrap_or(newest);
                while h.versions.len() > rt.engine.max_versions
                    && h.versions.front().is_some_and(|v| v.version != h.current)
                {
                    h.versions.pop_front();
                }
            }
        })
        .await?;
        Ok(report)
    }

    /// Stops the app, rebuilds the VM from the modules' current versions and
    /// starts the app again. Version history is kept.
    pub async fn restart(&self) -> Result<()> {
        let _ = with_timeout(self.stop_app(), Duration::from_secs(10)).await;
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| {
            let mut spec = shared.spec.clone();
            spec.modules = rt
                .engine
                .modules
                .iter()
                .filter_map(|(n, h)| h.current().map(|v| (n.clone(), v.source.clone())))
                .collect();
            let history = std::mem::take(&mut rt.engine.modules);
            let limits = match shared.node.upgrade() {
                Some(node) => node.limits.clone(),
                None => {
                    let _ = tx.send(Err(stopped(&shared.id)));
                    return;
                }
            };
            match Runtime::new(
                spec,
                shared.host_fns.clone(),
                Some(history.clone()),
                &limits,
            ) {
                Ok(new_rt) => {
                    *rt = new_rt;
                    let _ = tx.send(Ok(()));
                }
                Err(e) => {
                    rt.engine.modules = history;
                    let _ = tx.send(Err(e));
                }
            }
        })?;
        rx.await.map_err(|_| stopped(&self.shared.id))?
    }
}

fn schedule(node: &NodeInner, shared: &Arc<Shared>) {
    if !shared.scheduled.swap(true, Ordering::AcqRel) {
        node.queue.lock().expect("lock").push_back(shared.clone());
        node.queue_cv.notify_one();
    }
}

fn scheduler_loop(node: Weak<NodeInner>) {
    loop {
        let Some(inner) = node.upgrade() else { return };
        let next = {
            let mut q = inner.queue.lock().expect("lock");
            loop {
                if inner.stopping.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(s) = q.pop_front() {
                    break Some(s);
                }
                // Spin briefly before sleeping: a request that arrives within
                // microseconds is then served without a futex wake-up.
                drop(q);
                let spin_until = std::time::Instant::now() + Duration::from_micros(SPIN_MICROS);
                while std::time::Instant::now() < spin_until {
                    std::thread::yield_now();
                    if !inner.queue.lock().expect("lock").is_empty() {
                        break;
                    }
                }
                q = inner.queue.lock().expect("lock");
                if !q.is_empty() {
                    continue;
                }
                let (guard, _) = inner
                    .queue_cv
                    .wait_timeout(q, Duration::from_millis(200))
                    .expect("lock");
                q = guard;
                if Arc::strong_count(&inner) == 1 {
                    return; // the node was dropped
                }
            }
        };
        if let Some(shared) = next {
            run_sandbox(&inner, &shared);
        }
    }
}

fn run_sandbox(node: &NodeInner, shared: &Arc<Shared>) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_sandbox_slice(node, shared)
    }));
    if ran.is_err() {
        // A bug in Graft, not in guest code: take this sandbox down, keep the node.
        tracing::error!(sandbox = %shared.id, "internal error: the sandbox's scheduler panicked; the sandbox is stopped");
        let mut guard = shared.runtime.lock().unwrap_or_else(|e| e.into_inner());
        *guard = None;
        shared
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        shared.scheduled.store(false, Ordering::Release);
    }
}

fn run_sandbox_slice(node: &NodeInner, shared: &Arc<Shared>) {
    let (more, next_timer) = {
        let mut guard = shared.runtime.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rt) = guard.as_mut() else {
            shared.scheduled.store(false, Ordering::Release);
            return;
        };
        let commands: Vec<Command> = shared.inbox.lock().expect("lock").drain(..).collect();
        sandbox::kernel_memory(&rt.vm.lua, &rt.spec.limits);
        let _scope = sandbox::WatchScope::enter(&rt.vm.lua);
        for cmd in commands {
            cmd(rt);
        }
        // A restart command may have replaced the VM: enforce the current one's limits.
        let _scope = sandbox::WatchScope::enter(&rt.vm.lua);
        rt.run_pending_reloads();
        let more = sandbox::run_slice(&rt.vm.lua);
        rt.poll_app_start();
        rt.check_canary();
        rt.run_pending_reloads();
        let next_timer = sandbox::kernel(&rt.vm.lua).next_timer_at();
        (more, next_timer)
    };
    shared.scheduled.store(false, Ordering::Release);
    // After clearing `scheduled`: a wake-up firing in between must not be
    // swallowed by a flag that is about to be cleared.
    if let Some(at) = next_timer {
        add_wakeup(node, shared, at);
    }
    let inbox_waiting = !shared.inbox.lock().expect("lock").is_empty();
    if more || inbox_waiting {
        schedule(node, shared);
    }
}

fn add_wakeup(node: &NodeInner, shared: &Arc<Shared>, at: u64) {
    let seq = node.timer_seq.fetch_add(1, Ordering::Relaxed);
    let key = Arc::as_ptr(shared) as usize;
    node.timer_targets
        .lock()
        .expect("lock")
        .insert(seq, Arc::downgrade(shared));
    node.timers
        .lock()
        .expect("lock")
        .push(Reverse((at, seq, key)));
    node.timer_cv.notify_one();
}

fn timer_loop(node: Weak<NodeInner>) {
    loop {
        let Some(inner) = node.upgrade() else { return };
        if inner.stopping.load(Ordering::Relaxed) || Arc::strong_count(&inner) == 1 {
            return;
        }
        let mut due = Vec::new();
        {
            let mut timers = inner.timers.lock().expect("lock");
            let now = clock::precise_ms();
            while let Some(Reverse((at, seq, _))) = timers.peek().copied() {
                if at > now {
                    break;
                }
                timers.pop();
                due.push(seq);
            }
            if due.is_empty() {
                let wait = timers
                    .peek()
                    .map(|Reverse((at, _, _))| Duration::from_millis(at.saturating_sub(now).max(1)))
                    .unwrap_or(Duration::from_millis(100))
                    .min(Duration::from_millis(100));
                let _ = inner.timer_cv.wait_timeout(timers, wait).expect("lock");
                continue;
            }
        }
        // Several wake-ups for one sandbox collapse into one schedule.
        let mut targets = inner.timer_targets.lock().expect("lock");
        let sandboxes: Vec<Arc<Shared>> = due
            .iter()
            .filter_map(|s| targets.remove(s))
            .filter_map(|w| w.upgrade())
            .collect();
        drop(targets);
        for s in sandboxes {
            schedule(&inner, &s);
        }
    }
}

/// Runs a future to completion on the current thread (for callers without an
/// async runtime). Graft's futures only wait on channels, so any executor works.
///
/// ```
/// assert_eq!(graft::block_on(async { 7 }), 7);
/// ```
pub fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        // Answers usually come within microseconds: poll a little before
        // parking the thread (a park/unpark round trip costs more than that).
        let spin_until = std::time::Instant::now() + Duration::from_micros(SPIN_MICROS);
        while std::time::Instant::now() < spin_until {
            std::hint::spin_loop();
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
        }
        std::thread::park();
    }
}

/// Waits for a future at most `timeout` (without needing an async runtime's timer).
pub async fn with_timeout<F: Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        let _ = tx.send(());
    });
    let mut fut = pin!(fut);
    let mut rx = pin!(rx);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if rx.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}
