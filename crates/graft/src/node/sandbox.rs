//! [`Sandbox`]: a handle to one sandbox. Every method queues a command to
//! the sandbox's inbox and waits for its answer on a channel, so no caller
//! ever holds the VM; a failed or destroyed sandbox answers with an error
//! instead of hanging.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;

use super::runtime::{self, Runtime};
use super::scheduler::{self, schedule};
use super::{block_on, panic_message, with_timeout, Command, NodeInner, Shared, INFO_WAIT_MS};
use super::{ProcessInfo, SandboxInfo};
use crate::config::SandboxSpec;
use crate::error::{Error, Result};
use crate::kernel::{AppStatus, Event, HostSlot};
use crate::pid::{Pid, Target};
use crate::upgrade::{
    self, Direction, ModuleHistory, ModuleInfo, ModuleVersion, ReloadOptions, ReloadReport,
};
use crate::vm::HostTable;

/// A handle to one sandbox; cheap to clone. Every method queues a request to
/// the sandbox's scheduler and waits for the answer without blocking it.
#[derive(Clone)]
pub struct Sandbox {
    pub(super) shared: Arc<Shared>,
}

/// Shows the sandbox id (so `Result<Sandbox>` can be unwrapped in tests).
impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.shared.id)
            .finish()
    }
}

pub(super) fn stopped(id: &str) -> Error {
    Error::SandboxStopped(id.to_owned())
}

/// Statement coverage of one evaluated module version ([`Sandbox::coverage`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModuleCoverage {
    /// Module name.
    pub module: String,
    /// SHA-256 of the version's source ([`crate::upgrade::checksum`]).
    pub checksum: String,
    /// Line (1-based) → times a statement on it ran, for every line where
    /// a statement starts.
    pub lines: std::collections::BTreeMap<u32, u64>,
}

/// The most steps [`Sandbox::advance_clock`] takes (one per due timer or
/// busy slice) before it gives up.
pub const MAX_CLOCK_STEPS: usize = 100_000;

impl Sandbox {
    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Whether this sandbox was destroyed (deleted, or replaced by a
    /// rebuild with new settings, `Node::reconfigure_sandbox`): this handle
    /// answers nothing any more; `Node::sandbox` gives the current one.
    ///
    /// ```
    /// let node = graft::Node::new();
    /// let spec = graft::SandboxSpec::new("d").entry(None).module("m", "return {}");
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// assert!(!sb.is_destroyed());
    /// node.destroy("d").unwrap();
    /// assert!(sb.is_destroyed());
    /// ```
    pub fn is_destroyed(&self) -> bool {
        self.shared.destroyed.load(Ordering::Acquire)
    }

    /// Queues a command in the inbox; returns the node, which the caller
    /// must wake (`schedule`) or serve itself (`run_inline`).
    pub(super) fn enqueue(&self, cmd: Command) -> Result<Arc<NodeInner>> {
        let node = self
            .shared
            .node
            .upgrade()
            .ok_or_else(|| stopped(&self.shared.id))?;
        if node.stopping.load(Ordering::Acquire) {
            return Err(stopped(&self.shared.id));
        }
        if self.shared.destroyed.load(Ordering::Acquire) {
            return Err(self.destroyed_error());
        }
        if let Some(e) = self.shared.failure_error() {
            return Err(e);
        }
        self.shared.inbox.lock().push_back(cmd);
        Ok(node)
    }

    pub(super) fn submit(&self, cmd: impl FnOnce(&mut Runtime) + Send + 'static) -> Result<()> {
        let node = self.enqueue(Box::new(cmd))?;
        schedule(&node, &self.shared, false);
        Ok(())
    }

    pub(super) async fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Runtime) -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| {
            let _ = tx.send(f(rt));
        })?;
        rx.await.map_err(|_| self.gone())
    }

    /// A committed reload changed states: the checkpointer writes this
    /// sandbox's registered processes soon.
    fn after_commit(&self, result: Result<ReloadReport>) -> Result<ReloadReport> {
        if let (Ok(r), Some(node)) = (&result, self.shared.node.upgrade()) {
            if r.status == upgrade::ReloadStatus::Reloaded && node.store.is_some() {
                node.checkpoints.request(&self.shared.id);
            }
        }
        result
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
            return self.destroyed_error();
        }
        stopped(&self.shared.id)
    }

    /// What a request to a destroyed sandbox gets: `Rebuilding` (try again;
    /// `Node::sandbox` gives the rebuilt one) when it was replaced by a
    /// rebuild with new settings, else `NoSandbox`.
    fn destroyed_error(&self) -> Error {
        if self.shared.replaced.load(Ordering::Acquire) {
            Error::Rebuilding(self.shared.id.clone())
        } else {
            Error::NoSandbox(self.shared.id.clone())
        }
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
    /// [`Pid`](crate::Pid) or a registered name (any [`Target`]); one that
    /// addresses no process fails with [`Error::NoProcess`]. Default timeout 5 s.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("demo").entry(None).module("echo", r#"
    ///     return { init = function() return {} end,
    ///              handle_call = function(req, from, s) return req, s end }
    /// "#);
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let pid = graft::block_on(sb.spawn("echo", serde_json::json!(null), Some("e"))).unwrap();
    /// // By pid or by name.
    /// assert_eq!(graft::block_on(sb.call(&pid, "a".into(), None)).unwrap(), "a");
    /// assert_eq!(graft::block_on(sb.call("e", "b".into(), None)).unwrap(), "b");
    /// let err = graft::block_on(sb.call("nobody", "c".into(), None)).unwrap_err();
    /// assert_eq!(err.kind(), "no_process");
    /// ```
    pub async fn call(
        &self,
        target: impl Into<Target>,
        request: Json,
        timeout_ms: Option<u64>,
    ) -> Result<Json> {
        let target = target.into();
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
    /// let sandbox = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// graft::block_on(sandbox.spawn("echo", serde_json::json!({}), Some("e"))).unwrap();
    /// let reply = sandbox.call_blocking("e", serde_json::json!("hi"), None).unwrap();
    /// assert_eq!(reply, serde_json::json!("hi"));
    /// ```
    pub fn call_blocking(
        &self,
        target: impl Into<Target>,
        request: Json,
        timeout_ms: Option<u64>,
    ) -> Result<Json> {
        let target = target.into();
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
    pub async fn cast(&self, target: impl Into<Target>, message: Json) -> Result<()> {
        let target = target.into();
        self.ask(move |rt| rt.host_send(&target, &message, true))
            .await?
    }

    /// Sends a plain message (`handle_info`).
    pub async fn send(&self, target: impl Into<Target>, message: Json) -> Result<()> {
        let target = target.into();
        self.ask(move |rt| rt.host_send(&target, &message, false))
            .await?
    }

    /// Spawns a process of `module` with `args`; returns its pid once `init` succeeded.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("demo").entry(None)
    ///     .module("w", "return { init = function(args) return args end }");
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let pid = graft::block_on(sb.spawn("w", serde_json::json!({}), None)).unwrap();
    /// assert_eq!(pid.module(), "w");
    /// assert_eq!(pid.to_string(), format!("<w.{}>", pid.serial()));
    /// ```
    pub async fn spawn(&self, module: &str, args: Json, name: Option<&str>) -> Result<Pid> {
        let module = module.to_owned();
        let name = name.map(str::to_owned);
        let pid = self
            .ask_slot(move |rt, slot| rt.host_spawn(&module, &args, name.as_deref(), slot))
            .await?;
        // The kernel answers with the pid's text; module names are checked
        // when modules load, so it always parses (an error, never a panic,
        // if that ever broke).
        let text = pid.as_str().unwrap_or_default();
        text.parse::<Pid>().map_err(|e| {
            Error::Luau(format!(
                "internal error: spawn answered `{}`, not a pid: {e}",
                text.escape_debug()
            ))
        })
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

    /// A process's state as JSON. `target` as for [`Sandbox::call`].
    pub async fn state(&self, target: impl Into<Target>) -> Result<Json> {
        let target = target.into();
        self.ask(move |rt| rt.state(&target)).await?
    }

    /// Status, process count and memory. A failed sandbox answers with
    /// status `failed` (and no processes) until it is restarted or deleted.
    pub async fn info(&self) -> Result<SandboxInfo> {
        if let Some(info) = self.failed_info() {
            return Ok(info);
        }
        if self.shared.destroyed.load(Ordering::Acquire) {
            return Err(self.destroyed_error());
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

    /// Moves the sandbox's test clock ([`SandboxSpec::test_clock`]) forward
    /// by `ms`, firing every timer that falls due on the way, in due order
    /// and with the clock standing at each one's due time, and lets the
    /// processes handle what they were sent; returns once nothing is left
    /// to run. A sandbox without a test clock answers `InvalidInput`.
    ///
    /// Bounded: after [`MAX_CLOCK_STEPS`] steps (processes that keep
    /// setting zero-delay timers) it stops with `InvalidInput`.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let spec = SandboxSpec::new("ticker").entry(None).test_clock(true).module("t", r#"
    ///     return {
    ///         init = function() graft.send_after(60000, graft.self(), "tick"); return 0 end,
    ///         handle_info = function(_, n) return n + 1 end,
    ///         handle_call = function(_, _, n) return n, n end,
    ///     }"#);
    /// let node = Node::new();
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// graft::block_on(sb.spawn("t", serde_json::Value::Null, Some("t"))).unwrap();
    /// graft::block_on(sb.advance_clock(60_000)).unwrap();
    /// assert_eq!(graft::block_on(sb.call("t", "n".into(), None)).unwrap(), 1);
    /// ```
    pub async fn advance_clock(&self, ms: u64) -> Result<()> {
        let target = self.ask(|rt| rt.clock_now()).await??.saturating_add(ms);
        for _ in 0..MAX_CLOCK_STEPS {
            if self.ask(move |rt| rt.clock_step(target)).await?? {
                // One more round trip: the slice after the last step has run.
                self.ask(|_| ()).await?;
                return Ok(());
            }
        }
        Err(Error::InvalidInput(format!(
            "sandbox `{}`: the clock did not settle after {MAX_CLOCK_STEPS} steps (timers keep firing)",
            self.shared.id
        )))
    }

    /// Statement coverage of every module version evaluated in this
    /// sandbox: line → hits, for lines where a statement starts. Empty
    /// unless [`crate::vm::enable_coverage`] was called before the
    /// sandbox's modules were compiled (`graft test --coverage`).
    ///
    /// ```
    /// graft::vm::enable_coverage();
    /// let node = graft::Node::new();
    /// let spec = graft::SandboxSpec::new("cov").entry(None)
    ///     .module("m", "local m = {}\nfunction m.f()\n  return 1\nend\nreturn m");
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let cov = graft::block_on(sb.coverage()).unwrap();
    /// assert_eq!(cov[0].module, "m");
    /// assert_eq!(cov[0].lines.get(&1), Some(&1), "the body ran line 1 once");
    /// assert_eq!(cov[0].lines.get(&3).copied(), Some(0), "m.f never ran");
    /// ```
    pub async fn coverage(&self) -> Result<Vec<ModuleCoverage>> {
        self.ask(|rt| rt.coverage()).await
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
    /// let spec = SandboxSpec::new("ev").entry(None).module("m", "return {}");
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let all = graft::block_on(sb.events()).unwrap();
    /// let seen = all.last().map_or(0, |e| e.seq);
    /// let src = [("m".to_string(), "return { v = 2 }".to_string())].into();
    /// graft::block_on(sb.reload(src, Default::default())).unwrap();
    /// let newer = graft::block_on(sb.events_since(seen)).unwrap();
    /// assert!(!newer.is_empty() && newer.iter().all(|e| e.seq > seen));
    /// ```
    pub async fn events_since(&self, since: u64) -> Result<Vec<Event>> {
        let node = self
            .shared
            .node
            .upgrade()
            .ok_or_else(|| stopped(&self.shared.id))?;
        // Commands queued before this call (an `abort` event of a reload
        // that failed to compile) run first, as they did before the log
        // moved out of the sandbox. A failed sandbox answers nothing here.
        let _ = self.ask(|_| ()).await;
        node.events.settle().await;
        let filter = crate::EventFilter::default().sandbox(self.shared.id.clone());
        let page = node.events.read(since, &filter, usize::MAX);
        Ok(page
            .events
            .into_iter()
            .map(|e| Event {
                seq: e.seq,
                at_ms: e.at_ms,
                kind: e.kind,
                detail: e.detail,
            })
            .collect())
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

    pub(super) fn reload_start(
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
    /// let sb = graft::block_on(node.create_sandbox(SandboxSpec::new("up").entry(None).module("m", v1))).unwrap();
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
        let result = rx.await.map_err(|_| self.gone())?;
        self.after_commit(result)
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
        let result = rx.await.map_err(|_| self.gone())?;
        self.after_commit(result)
    }

    /// Every kept version of every module (for export/backup).
    pub async fn export(&self) -> Result<BTreeMap<String, Vec<ModuleVersion>>> {
        self.ask(|rt| rt.export()).await
    }

    /// Imports module histories produced by [`Sandbox::export`] (possibly from
    /// another node). Every version's source is checked against its checksum
    /// and recompiled here; the newest imported version of each module goes
    /// live through an ordinary reload (so live processes are migrated), and
    /// then the imported versions replace the module's kept history, in
    /// memory and (on a durable node) on disk in one transaction, all of them
    /// permanent. The two steps are two commits: a crash between them
    /// restores the state after the reload, before the history was replaced
    /// (the import was not acknowledged).
    ///
    /// ```
    /// use graft::{Node, SandboxSpec, ReloadOptions};
    /// let node = Node::new();
    /// let a = graft::block_on(node.create_sandbox(SandboxSpec::new("a").entry(None).module("m", "return { v = 1 }"))).unwrap();
    /// let mut v2 = std::collections::BTreeMap::new();
    /// v2.insert("m".to_string(), "return { v = 2 }".to_string());
    /// graft::block_on(a.reload(v2, ReloadOptions::default())).unwrap();
    /// let exported = graft::block_on(a.export()).unwrap();
    /// let b = graft::block_on(node.create_sandbox(SandboxSpec::new("b").entry(None).module("m", "return { v = 0 }"))).unwrap();
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
        self.ask(move |rt| rt.replace_histories(histories))
            .await??;
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
            match new_runtime(&shared.spec, &shared.host_fns, Some(&history), &node) {
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
        let rt = new_runtime(&self.shared.spec, &self.shared.host_fns, history, &node)?;
        *self.shared.runtime.lock() = Some(rt);
        *failed = None;
        drop(failed);
        schedule(&node, &self.shared, false);
        Ok(())
    }
}

/// Builds a sandbox's runtime behind the panic barrier: from `spec`, or from
/// the current versions of `history` when restarting.
pub(super) fn new_runtime(
    spec: &SandboxSpec,
    host_fns: &HostTable,
    history: Option<&BTreeMap<String, ModuleHistory>>,
    node: &NodeInner,
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
        Runtime::new(
            spec,
            host_fns.clone(),
            history.cloned(),
            &node.limits,
            node.events.clone(),
        )
    }));
    built.unwrap_or_else(|payload| {
        Err(Error::SandboxFailed {
            id: spec_id.clone(),
            message: panic_message(&*payload),
        })
    })
}
