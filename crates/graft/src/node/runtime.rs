//! One sandbox's runtime: its VM, kernel and upgrade engine, driven by the
//! node's scheduler threads. Every method runs on the scheduler thread that
//! holds the sandbox, between time slices, so it has the VM to itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use mlua::{Lua, Value};
use serde::Serialize;
use serde_json::Value as Json;

use crate::clock;
use crate::config::{Limits, NodeLimits, SandboxSpec};
use crate::error::{Error, ReloadStep, Result};
use crate::events::EventLog;
use crate::kernel::{
    self, kernel, AppStatus, CanaryWatch, HostSlot, Job, Timer, Waiter, EVAL_MODULE,
};
use crate::pid::{Pid, Target};
use crate::upgrade::{
    Applied, Direction, Engine, ModuleInfo, ModuleVersion, PreparedModule, ReloadOptions,
    ReloadReport, ReloadStatus,
};
use crate::value::{estimate_size, json_to_lua, lua_to_json, VmPid};
use crate::vm::{HostTable, Vm};

/// How long a reload waits for busy processes to finish their callbacks.
pub const QUIESCE_TIMEOUT_MS: u64 = 5000;

/// Table entries the memory estimate of one process reads at most.
const ESTIMATE_ENTRIES: usize = 100_000;
/// Table entries the memory estimates of one process listing read at most
/// (later processes get lower bounds once it is spent).
const ESTIMATE_LISTING_ENTRIES: usize = 4_000_000;

/// One row of the process list (SPEC §6).
#[derive(Clone, Debug, Serialize)]
pub struct ProcessInfo {
    /// Its pid; serialized as `"<module.serial>"`.
    pub pid: Pid,
    /// Registered name, if any.
    pub name: Option<String>,
    /// The behaviour module.
    pub module: String,
    /// The module version its state belongs to.
    pub version: u32,
    /// `idle`, `runnable`, `running`, `waiting` or `exiting`.
    pub status: String,
    /// Messages waiting.
    pub mailbox_len: usize,
    /// Estimated bytes: the process record plus its state's tables and
    /// strings, each table counted once however often it is referenced.
    /// The estimate reads at most 100,000 table entries per process and
    /// 4,000,000 per listing; past either the figure is a lower bound.
    pub memory_bytes: usize,
    /// Linked pids.
    pub links: Vec<Pid>,
    /// Whether it traps exits.
    pub trap_exit: bool,
    /// Callbacks run so far.
    pub messages_handled: u64,
}

/// A sandbox summary.
#[derive(Clone, Debug, Serialize)]
pub struct SandboxInfo {
    /// Sandbox id.
    pub id: String,
    /// `running`, or `app_stopped` once the root supervisor exited.
    pub status: String,
    /// The app (root supervisor) state.
    pub app: AppStatus,
    /// Entry module.
    pub entry: Option<String>,
    /// Live processes.
    pub process_count: usize,
    /// Bytes used by the sandbox's Luau heap.
    pub memory_bytes: usize,
    /// Its limits.
    pub limits: Limits,
    /// Number of modules.
    pub module_count: usize,
    /// Capabilities granted (built-in and host functions).
    pub capabilities: Vec<String>,
    /// Messages refused so far because the target's mailbox was full (since
    /// the sandbox's VM was built; a restart starts again at 0).
    pub mailbox_full_total: u64,
}

struct PendingReload {
    prepared: Vec<PreparedModule>,
    opts: ReloadOptions,
    direction: Direction,
    targets: Option<HashMap<String, u32>>,
    frozen: Vec<u32>,
    deadline: u64,
    reply: tokio::sync::oneshot::Sender<Result<ReloadReport>>,
}

pub(crate) struct Runtime {
    pub vm: Vm,
    pub engine: Engine,
    pub spec: SandboxSpec,
    pub host_fns: HostTable,
    pending: VecDeque<PendingReload>,
    app_waiters: Vec<Arc<HostSlot>>,
    app_start: Option<tokio::sync::oneshot::Receiver<Result<Json>>>,
    /// Set while `Node::reconfigure_sandbox` rebuilds this sandbox from a
    /// snapshot of its histories: a reload or import after the snapshot
    /// would commit to a VM about to be dropped, so it is refused instead.
    retiring: bool,
}

impl Runtime {
    /// Takes this runtime out of service for a rebuild: from now on reloads
    /// and imports are refused (`busy`). Refused itself (false) while a
    /// reload waits in the queue, since it may still commit.
    pub(super) fn begin_retire(&mut self) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        self.retiring = true;
        true
    }

    /// Puts a runtime whose rebuild did not happen back in service.
    pub(super) fn end_retire(&mut self) {
        self.retiring = false;
    }

    fn retiring_error(&self) -> Error {
        Error::Busy(format!(
            "sandbox `{}` is being rebuilt with new settings (graft.toml changed); send the reload again",
            self.spec.id
        ))
    }

    /// Replaces modules' kept histories (the second step of an import): in
    /// memory, then on disk in one transaction with an `import` event. A
    /// failed write restores the histories as they were.
    pub(super) fn replace_histories(
        &mut self,
        histories: BTreeMap<String, Vec<ModuleVersion>>,
    ) -> Result<()> {
        if self.retiring {
            return Err(self.retiring_error());
        }
        let max = self.engine.max_versions;
        let before = self.engine.modules.clone();
        let names: Vec<String> = histories.keys().cloned().collect();
        for (name, versions) in histories {
            self.engine
                .modules
                .entry(name)
                .or_default()
                .replace(versions, max);
        }
        let (log, sandbox) = {
            let k = kernel(&self.vm.lua);
            (k.events.clone(), k.id.to_string())
        };
        let mut ops = Vec::new();
        let mut kept = serde_json::Map::new();
        for name in &names {
            let Some(h) = self.engine.modules.get(name) else {
                continue;
            };
            kept.insert(name.clone(), serde_json::json!(h.kept()));
            ops.push(crate::store::WriteOp::ReplaceHistory {
                sandbox: sandbox.clone(),
                module: name.clone(),
                versions: h
                    .versions
                    .iter()
                    .map(|v| v.record(&sandbox, name, crate::store::VersionStatus::Permanent))
                    .collect(),
                current: h.current,
            });
        }
        if let Err(e) = log.commit(&sandbox, ops, "import", Json::Object(kept)) {
            self.engine.modules = before;
            return Err(e.into());
        }
        Ok(())
    }

    /// Builds the VM, loads every module (as version 1) and queues the app start.
    pub fn new(
        spec: SandboxSpec,
        host_fns: HostTable,
        history: Option<BTreeMap<String, crate::upgrade::ModuleHistory>>,
        node: &NodeLimits,
        events: Arc<EventLog>,
    ) -> Result<Runtime> {
        spec.validate(node)?;
        let vm = kernel::new_vm(
            &spec.id,
            &spec.limits,
            node,
            &spec.grants,
            &host_fns,
            events,
        )
        .map_err(|e| Error::Luau(e.to_string()))?;
        let engine = Engine::new(&vm.lua, spec.limits.max_versions)
            .map_err(|e| Error::Luau(e.to_string()))?;
        if spec.test_clock {
            kernel(&vm.lua).test_clock = Some(kernel::TestClock::starting_now());
        }
        let mut rt = Runtime {
            vm,
            engine,
            spec,
            host_fns,
            pending: VecDeque::new(),
            app_waiters: Vec::new(),
            app_start: None,
            retiring: false,
        };
        let globals = crate::vm::globals_for(&rt.spec.grants, &rt.host_fns);
        let cx = crate::upgrade::PrepareContext {
            known_globals: &globals,
            max_source_bytes: rt.spec.limits.max_source_bytes,
            files: &rt.spec.files,
        };
        let prepared = crate::upgrade::prepare(&rt.spec.modules, &cx)?;
        let targets = history
            .as_ref()
            .map(|h| h.iter().map(|(n, m)| (n.clone(), m.current)).collect());
        kernel::kernel_memory(&rt.vm.lua, &rt.spec.limits);
        let _scope = kernel::WatchScope::enter(&rt.vm.lua);
        match rt.engine.apply(
            &rt.vm,
            prepared,
            &ReloadOptions::default(),
            Direction::Up,
            targets.as_ref(),
        )? {
            Applied::Done(_) => {}
            Applied::Busy(_) => unreachable!("a new sandbox has no processes"),
        }
        if let Some(h) = history {
            // A restart keeps the version history.
            rt.engine.modules = h;
        }
        rt.engine.persist = true;
        if let Some(entry) = rt.spec.entry.clone() {
            rt.start_app(&entry)?;
        }
        Ok(rt)
    }

    fn lua(&self) -> &Lua {
        &self.vm.lua
    }

    fn start_app(&mut self, entry: &str) -> Result<()> {
        crate::config::check_entry_args(&self.spec.entry_args, self.spec.limits.max_message_bytes)?;
        let lua = &self.vm.lua;
        let args = host_value(lua, &self.spec.entry_args)?;
        let mut k = kernel(lua);
        let mid = k
            .module_id(entry)
            .ok_or_else(|| Error::NoModule(entry.into()))?;
        if !k.is_server_module(mid) {
            return Err(Error::InvalidInput(format!(
                "entry module `{entry}` has no `init` function (it should be a supervisor or a server)"
            )));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        let serial = k
            .create_process(mid, None, None, Some(args), Waiter::Host(slot))
            .map_err(|(e, _)| e)?;
        k.app = Some(serial);
        k.app_status = AppStatus::Running;
        drop(k);
        self.app_start = Some(rx);
        Ok(())
    }

    /// Answers waiters for the app start once its init finished.
    pub fn poll_app_start(&mut self) {
        let Some(rx) = self.app_start.as_mut() else {
            return;
        };
        match rx.try_recv() {
            Ok(result) => {
                self.app_start = None;
                let mut k = kernel(&self.vm.lua);
                // `finalize` records the stop when the root process dies;
                // only a start that failed before that is recorded here.
                if let (Err(e), false) =
                    (&result, matches!(k.app_status, AppStatus::Stopped { .. }))
                {
                    k.app = None;
                    k.app_status = AppStatus::Stopped {
                        reason: e.to_string(),
                    };
                    k.event(
                        "app_stopped",
                        serde_json::json!({ "reason": e.to_string() }),
                    );
                }
                drop(k);
                for w in self.app_waiters.drain(..) {
                    w.answer(
                        result
                            .as_ref()
                            .map(|v| v.clone())
                            .map_err(|e| Error::Luau(e.to_string())),
                    );
                }
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            Err(_) => self.app_start = None,
        }
    }

    pub fn wait_app(&mut self, slot: Arc<HostSlot>) {
        if self.app_start.is_some() {
            self.app_waiters.push(slot);
            return;
        }
        let k = kernel(&self.vm.lua);
        let r = match &k.app_status {
            AppStatus::Stopped { reason } => Err(Error::Luau(format!("app stopped: {reason}"))),
            _ => Ok(k
                .app
                .and_then(|s| k.procs.get(&s))
                .map(|p| Json::String(k.pid_string(p.pid)))
                .unwrap_or(Json::Null)),
        };
        slot.answer(r);
    }

    /// The serial a host-side target addresses. A pid addresses its serial
    /// (its module part is informative); text resolves as it always has
    /// (`Kernel::resolve_str`). For a pid's text both agree: names never
    /// start with `<`, so the name lookup could not have found it.
    fn resolve(&self, target: &Target) -> Result<u64> {
        let k = kernel(self.lua());
        let serial = match target.as_pid() {
            Some(pid) => Some(pid.serial()).filter(|s| k.procs.contains_key(s)),
            None => k.resolve_str(target.as_str()),
        };
        serial.ok_or_else(|| Error::NoProcess(target.as_str().to_owned()))
    }

    /// Host messages obey `max_message_bytes` like guest messages (measured as JSON).
    fn check_size(&self, v: &Json) -> Result<()> {
        let max = self.spec.limits.max_message_bytes;
        let size = crate::value::json_len(v);
        if size > max {
            return Err(Error::InvalidInput(format!(
                "message is {size} bytes as JSON; this sandbox's max_message_bytes is {max}"
            )));
        }
        Ok(())
    }

    pub fn host_call(
        &mut self,
        target: Target,
        request: Json,
        timeout_ms: u64,
        slot: Arc<HostSlot>,
    ) {
        let r = (|| -> Result<()> {
            self.check_size(&request)?;
            let serial = self.resolve(&target)?;
            let lua = self.lua();
            let key = host_value(lua, &request)?;
            let mut k = kernel(lua);
            let job = Job::Call {
                request: Some(key),
                from: None,
                waiter: Waiter::Host(slot.clone()),
            };
            k.deliver(serial, job).map_err(|(e, _)| e)?;
            let at = k.timer_now().saturating_add(timeout_ms);
            let timer = k.add_timer(
                at,
                Timer::HostCallTimeout {
                    slot: slot.clone(),
                    target: target.as_str().to_owned(),
                    ms: timeout_ms,
                },
            );
            slot.set_timer(timer);
            Ok(())
        })();
        if let Err(e) = r {
            slot.answer(Err(e));
        }
    }

    pub fn host_send(&mut self, target: &Target, message: &Json, cast: bool) -> Result<()> {
        self.check_size(message)?;
        let serial = self.resolve(target)?;
        let lua = self.lua();
        let key = host_value(lua, message)?;
        let job = if cast { Job::Cast(key) } else { Job::Info(key) };
        kernel(lua).deliver(serial, job).map_err(|(e, _)| e)
    }

    pub fn host_spawn(
        &mut self,
        module: &str,
        args: &Json,
        name: Option<&str>,
        slot: Arc<HostSlot>,
    ) {
        let r = (|| -> Result<()> {
            if let Some(n) = name {
                crate::config::validate_process_name(n)?;
            }
            let lua = self.lua();
            let k = kernel(lua);
            let mid = k
                .module_id(module)
                .filter(|m| k.module_tables[*m as usize].is_some() && *m != 0)
                .ok_or_else(|| Error::NoModule(module.to_owned()))?;
            if !k.is_server_module(mid) {
                return Err(Error::InvalidInput(format!(
                    "module `{module}` has no `init` function, so it cannot run as a process"
                )));
            }
            drop(k);
            let key = host_value(lua, args)?;
            kernel(lua)
                .create_process(mid, None, name, Some(key), Waiter::Host(slot.clone()))
                .map_err(|(e, _)| e)?;
            Ok(())
        })();
        if let Err(e) = r {
            slot.answer(Err(e));
        }
    }

    pub fn host_eval(&mut self, bytecode: &[u8], slot: Arc<HostSlot>) {
        let r = (|| -> Result<()> {
            let f = self
                .vm
                .load_guest("eval", bytecode)
                .map_err(|e| Error::Luau(e.to_string()))?;
            let lua = self.lua();
            let chunk = lua
                .create_registry_value(f)
                .map_err(|e| Error::Luau(e.to_string()))?;
            let mut k = kernel(lua);
            if k.procs.len() >= k.limits.max_processes {
                return Err(Error::TooManyProcesses(k.limits.max_processes));
            }
            let serial = k.new_serial();
            let mid = k.module_id(EVAL_MODULE).expect("interned at start");
            let mut p = crate::kernel::Process::new(VmPid::new(mid, serial), None, 0);
            p.system = Some(Box::new(Job::Eval {
                chunk,
                waiter: Waiter::Host(slot.clone()),
            }));
            k.procs.insert(serial, Box::new(p));
            // eval processes have no init, so their state slot is a placeholder
            let _ = k.states.raw_set(serial, false);
            k.wake(serial);
            Ok(())
        })();
        if let Err(e) = r {
            slot.answer(Err(e));
        }
    }

    pub fn processes(&self) -> Vec<ProcessInfo> {
        let lua = self.lua();
        let k = kernel(lua);
        let mut budget = ESTIMATE_LISTING_ENTRIES;
        let mut out: Vec<ProcessInfo> = k
            .procs
            .values()
            .map(|p| {
                let state: Value = k.states.raw_get(p.pid.serial()).unwrap_or(Value::Nil);
                let (state_bytes, read) = estimate_size(&state, budget.min(ESTIMATE_ENTRIES));
                budget = budget.saturating_sub(read);
                ProcessInfo {
                    pid: k.api_pid(p.pid),
                    name: p.name.as_ref().map(|n| n.to_string()),
                    module: k.module_names[p.pid.module_index() as usize].to_string(),
                    version: p.version,
                    status: p.status().into(),
                    mailbox_len: p.mailbox.len(),
                    memory_bytes: std::mem::size_of::<crate::kernel::Process>() + state_bytes,
                    links: p
                        .links
                        .iter()
                        .filter_map(|s| k.procs.get(s))
                        .map(|l| k.api_pid(l.pid))
                        .collect(),
                    trap_exit: p.trap_exit,
                    messages_handled: p.messages_handled as u64,
                }
            })
            .collect();
        out.sort_by_key(|p| p.pid.serial());
        out
    }

    pub fn state(&self, target: &Target) -> Result<Json> {
        let serial = self.resolve(target)?;
        let lua = self.lua();
        let k = kernel(lua);
        let state: Value = k
            .states
            .raw_get(serial)
            .map_err(|e| Error::Luau(e.to_string()))?;
        Ok(lua_to_json(&state, "state", k.max_value_bytes, &|p| {
            k.pid_string(p)
        })?)
    }

    pub fn info(&self) -> SandboxInfo {
        let k = kernel(self.lua());
        let status = match k.app_status {
            AppStatus::Stopped { .. } => "app_stopped",
            _ => "running",
        };
        let mut capabilities = self.spec.grants.clone();
        capabilities.extend(self.host_fns.keys().cloned());
        SandboxInfo {
            id: self.spec.id.clone(),
            status: status.into(),
            app: k.app_status.clone(),
            entry: self.spec.entry.clone(),
            process_count: k.procs.len(),
            memory_bytes: self.lua().used_memory(),
            limits: self.spec.limits.clone(),
            module_count: self.engine.modules.len(),
            capabilities,
            mailbox_full_total: k.mailbox_full,
        }
    }

    /// One step of [`crate::Sandbox::advance_clock`] towards `target`
    /// (timer time): waits while processes have work, else moves the test
    /// clock to the next due timer (the slice after this command fires
    /// it), else to `target`. `Ok(true)` once the clock stands at `target`
    /// with nothing left to run.
    pub fn clock_step(&mut self, target: u64) -> Result<bool> {
        let mut k = kernel(self.lua());
        if k.test_clock.is_none() {
            return Err(no_test_clock(&self.spec.id));
        }
        if k.has_ready_work() {
            return Ok(false);
        }
        let next = k.next_timer_at();
        let Some(c) = k.test_clock.as_mut() else {
            return Err(no_test_clock(&self.spec.id));
        };
        match next {
            Some(at) if at <= target => {
                c.now_ms = c.now_ms.max(at);
                Ok(false)
            }
            _ => {
                c.now_ms = c.now_ms.max(target);
                Ok(true)
            }
        }
    }

    /// Line hits of every module chunk evaluated in this VM (empty unless
    /// [`crate::vm::enable_coverage`] was called).
    pub fn coverage(&self) -> Vec<crate::node::ModuleCoverage> {
        let chunks = kernel(self.lua()).coverage_chunks.clone();
        chunks
            .into_iter()
            .map(|(module, checksum, f)| {
                let mut lines = BTreeMap::new();
                f.coverage(|info| {
                    for (line, &hits) in info.hits.iter().enumerate() {
                        // -1: no statement starts on this line.
                        if hits >= 0 {
                            *lines.entry(line as u32).or_insert(0u64) += hits as u64;
                        }
                    }
                });
                crate::node::ModuleCoverage {
                    module: module.to_string(),
                    checksum,
                    lines,
                }
            })
            .collect()
    }

    /// The test clock's reading (timer time), or an error without one.
    pub fn clock_now(&self) -> Result<u64> {
        let k = kernel(self.lua());
        match &k.test_clock {
            Some(c) => Ok(c.now_ms),
            None => Err(no_test_clock(&self.spec.id)),
        }
    }

    pub fn modules(&self) -> Vec<ModuleInfo> {
        self.engine.list(&self.vm)
    }

    pub fn versions(&self, module: &str) -> Result<Vec<ModuleVersion>> {
        let h = self
            .engine
            .modules
            .get(module)
            .ok_or_else(|| Error::NoModule(module.into()))?;
        Ok(h.versions.iter().cloned().collect())
    }

    /// Takes over what a restarted runtime of the same sandbox must not
    /// lose: the reloads still waiting to apply (its events are in the
    /// node's log already).
    pub fn adopt(&mut self, old: &mut Runtime) {
        self.pending.extend(old.pending.drain(..).map(|mut r| {
            // Its frozen modules belonged to the old kernel.
            r.frozen.clear();
            r
        }));
    }

    /// Starts a reload; the reply comes when it committed, aborted or timed out.
    pub fn reload(
        &mut self,
        prepared: Vec<PreparedModule>,
        opts: ReloadOptions,
        direction: Direction,
        targets: Option<HashMap<String, u32>>,
        reply: tokio::sync::oneshot::Sender<Result<ReloadReport>>,
    ) {
        if self.retiring {
            let _ = reply.send(Err(self.retiring_error()));
            return;
        }
        self.pending.push_back(PendingReload {
            prepared,
            opts,
            direction,
            targets,
            frozen: Vec::new(),
            deadline: clock::precise_ms() + QUIESCE_TIMEOUT_MS,
            reply,
        });
        self.run_pending_reloads();
    }

    /// Tries queued reloads in order; a busy one keeps its place (later ones wait).
    pub fn run_pending_reloads(&mut self) {
        while let Some(mut r) = self.pending.pop_front() {
            kernel::kernel_memory(self.lua(), &self.spec.limits);
            let result = self.engine.apply(
                &self.vm,
                r.prepared.clone(),
                &r.opts,
                r.direction,
                r.targets.as_ref(),
            );
            match result {
                Ok(Applied::Busy(modules)) if clock::precise_ms() < r.deadline => {
                    let mut k = kernel(self.lua());
                    for m in &modules {
                        k.frozen.insert(*m);
                    }
                    if r.frozen.is_empty() {
                        // Wake at the deadline even if nothing else happens
                        // (in timer time: a test clock moves only when
                        // advanced, and commands still reach this check).
                        let at = k
                            .timer_now()
                            .saturating_add(r.deadline.saturating_sub(clock::precise_ms()));
                        k.add_timer(at, Timer::Wake);
                    }
                    r.frozen = modules;
                    drop(k);
                    self.pending.push_front(r);
                    return;
                }
                Ok(Applied::Busy(_)) => {
                    self.unfreeze(&r.frozen);
                    let e = Error::ReloadAborted {
                        step: ReloadStep::Quiesce,
                        module: None,
                        process: None,
                        line: None,
                        column: None,
                        message: format!(
                            "processes of the changed modules were still inside callbacks after {QUIESCE_TIMEOUT_MS} ms"
                        ),
                    };
                    self.record_abort(&e, &r.prepared);
                    let _ = r.reply.send(Err(e));
                }
                Ok(Applied::Done(report)) => {
                    self.unfreeze(&r.frozen);
                    self.record(&report);
                    if report.status == ReloadStatus::DryRun {
                        // The dry run's module tables and state copies are garbage now.
                        let _ = self.lua().gc_collect();
                    }
                    if report.status == ReloadStatus::Reloaded {
                        self.end_canary_touched_by(&report, &r.opts, r.direction);
                    }
                    if report.status == ReloadStatus::Reloaded && r.opts.canary_ms > 0 {
                        self.arm_canary(&report, &r.opts);
                    }
                    let _ = r.reply.send(Ok(report));
                }
                Err(e) => {
                    self.unfreeze(&r.frozen);
                    self.record_abort(&e, &r.prepared);
                    // What the aborted candidate allocated is garbage now.
                    let _ = self.lua().gc_collect();
                    let _ = r.reply.send(Err(e));
                }
            }
        }
    }

    fn unfreeze(&mut self, modules: &[u32]) {
        if modules.is_empty() {
            return;
        }
        let mut k = kernel(self.lua());
        for m in modules {
            k.frozen.remove(m);
        }
        let wake: Vec<u64> = k
            .procs
            .values()
            .filter(|p| {
                modules.contains(&p.pid.module_index())
                    && (!p.mailbox.is_empty() || p.system.is_some())
            })
            .map(|p| p.pid.serial())
            .collect();
        for s in wake {
            k.wake(s);
        }
    }

    /// Records a reload that did not commit (a committed one was recorded
    /// by its commit point, in the same transaction).
    fn record(&mut self, report: &ReloadReport) {
        let kind = match report.status {
            ReloadStatus::Unchanged => "unchanged",
            ReloadStatus::DryRun => "dry_run",
            ReloadStatus::Reloaded => return,
        };
        kernel(self.lua()).event(kind, serde_json::to_value(report).unwrap_or(Json::Null));
    }

    fn record_abort(&mut self, e: &Error, prepared: &[PreparedModule]) {
        let modules: Vec<&str> = prepared.iter().map(|p| p.name.as_str()).collect();
        let detail = match e {
            Error::Compile { diagnostics } => {
                serde_json::json!({ "modules": modules, "error": e.to_string(), "diagnostics": diagnostics })
            }
            Error::ReloadAborted {
                step,
                module,
                process,
                message,
                line,
                column,
            } => serde_json::json!({
                "modules": modules, "step": step, "module": module, "process": process, "error": message,
                "line": line, "column": column
            }),
            // Events are read by viewers: the storage's reason without the
            // host's paths (the node's log has them).
            Error::Storage(s) => serde_json::json!({
                "modules": modules,
                "error": format!("{}: nothing was applied", s.client_message()),
            }),
            other => serde_json::json!({ "modules": modules, "error": other.to_string() }),
        };
        kernel(self.lua()).event("abort", detail);
    }

    /// A reload or rollback of a module under a canary window ends that
    /// window: the version it watched is no longer the one running, so it
    /// can neither pass nor trip. So does a reload that opens a window of
    /// its own (one window per sandbox). The commit that ended it already
    /// made the watched versions that stay running permanent, by the same
    /// rule (`upgrade::ends_window`), so memory and disk agree.
    fn end_canary_touched_by(
        &mut self,
        report: &ReloadReport,
        opts: &ReloadOptions,
        direction: Direction,
    ) {
        let mut k = kernel(self.lua());
        let ends = k
            .canary
            .as_ref()
            .is_some_and(|c| crate::upgrade::ends_window(c, report, opts));
        if !ends {
            return;
        }
        if let Some(c) = k.canary.take() {
            k.cancel_timer(c.timer);
            let modules: Vec<&String> = c.modules.iter().map(|m| &m.3).collect();
            let touched = c
                .modules
                .iter()
                .any(|(_, _, _, name)| report.modules.iter().any(|m| m.name == *name));
            let why = match (touched, direction) {
                (true, Direction::Up) => "a reload replaced a version under watch",
                (true, Direction::Down) => "a rollback replaced a version under watch",
                (false, _) => "a new canary window replaced it",
            };
            // What the commit made permanent: the watched versions that were
            // running, except those it rolled back.
            let kept: Vec<serde_json::Value> = c
                .modules
                .iter()
                .filter(|(_, to, _, name)| {
                    if report.modules.iter().any(|m| m.name == *name) {
                        matches!(direction, Direction::Up)
                    } else {
                        self.engine
                            .modules
                            .get(name)
                            .is_some_and(|h| h.current == *to)
                    }
                })
                .map(|(_, to, _, name)| serde_json::json!({ "module": name, "version": to }))
                .collect();
            k.event(
                "canary_ended",
                serde_json::json!({ "modules": modules, "why": why, "permanent": kept }),
            );
        }
    }

    fn arm_canary(&mut self, report: &ReloadReport, opts: &ReloadOptions) {
        let mut k = kernel(self.lua());
        let modules: Vec<(u32, u32, u32, String)> = report
            .modules
            .iter()
            .filter(|c| c.from > 0)
            .filter_map(|c| {
                k.module_id(&c.name)
                    .map(|m| (m, c.to, c.from, c.name.clone()))
            })
            .collect();
        if modules.is_empty() {
            return;
        }
        if let Some(old) = k.canary.take() {
            k.cancel_timer(old.timer);
        }
        let now = k.timer_now();
        let timer = k.add_timer(now + opts.canary_ms, Timer::Canary);
        k.canary = Some(CanaryWatch {
            modules,
            crashes_allowed: opts.canary_crashes.max(1),
            crashes: 0,
            last_reason: None,
            timer,
        });
    }

    /// Rolls a tripped canary back. Called after every time slice.
    pub fn check_canary(&mut self) {
        let tripped = {
            let mut k = kernel(self.lua());
            match k.canary.as_ref() {
                Some(c) if c.tripped() => {
                    let c = k.canary.take().expect("checked");
                    k.cancel_timer(c.timer);
                    Some(c)
                }
                _ => None,
            }
        };
        let Some(c) = tripped else { return };
        let mut sources = BTreeMap::new();
        let mut targets = HashMap::new();
        for (_, _, back_to, name) in &c.modules {
            if let Some(v) = self.engine.modules.get(name).and_then(|h| h.get(*back_to)) {
                sources.insert(name.clone(), v.clone());
                targets.insert(name.clone(), *back_to);
            }
        }
        let prepared = prepared_from_versions(&sources, &self.engine);
        let reason = c.last_reason.clone().unwrap_or_default();
        let result = self.engine.apply(
            &self.vm,
            prepared,
            &ReloadOptions::default(),
            Direction::Down,
            Some(&targets),
        );
        let mut k = kernel(self.lua());
        match result {
            Ok(Applied::Done(report)) => {
                k.event(
                    "canary_rollback",
                    serde_json::json!({
                        "why": format!("{} crash(es) of upgraded processes within the canary window; last: {reason}", c.crashes),
                        "crashes": c.crashes,
                        "report": report,
                    }),
                );
                tracing::warn!(sandbox = %k.id, crashes = c.crashes, "canary tripped: rolled back");
            }
            Ok(Applied::Busy(_)) => {
                // Try again after the next slice: keep the tripped watch.
                k.canary = Some(c);
            }
            Err(e) => k.event(
                "canary_rollback_failed",
                serde_json::json!({ "error": e.to_string() }),
            ),
        }
    }

    /// Stops the app in order (terminate callbacks run); answers `slot` when done.
    pub fn stop_app(&mut self, slot: Arc<HostSlot>) {
        let mut k = kernel(self.lua());
        match k.app {
            Some(serial) => {
                k.app_stop_waiters.push(slot);
                k.exit_process(serial, crate::value::ExitReason::Shutdown, true);
            }
            None => {
                slot.answer(Ok(Json::Null));
            }
        }
    }

    pub fn export(&self) -> BTreeMap<String, Vec<ModuleVersion>> {
        self.engine
            .modules
            .iter()
            .map(|(n, h)| (n.clone(), h.versions.iter().cloned().collect()))
            .collect()
    }
}

/// A host's JSON value as a Luau value held in the registry. A full heap is
/// collected once before the conversion is refused, and a refusal for memory
/// is `out_of_memory`, not the input's fault.
fn host_value(lua: &Lua, v: &Json) -> Result<mlua::RegistryKey> {
    let convert = || json_to_lua(lua, v).and_then(|v| lua.create_registry_value(v));
    let first = match convert() {
        Err(mlua::Error::MemoryError(_)) => {
            let _ = lua.gc_collect();
            convert()
        }
        other => other,
    };
    first.map_err(|e| match e {
        mlua::Error::MemoryError(_) => Error::OutOfMemory(format!(
            "the sandbox's heap ({} bytes used) cannot hold this value",
            lua.used_memory()
        )),
        other => Error::InvalidInput(other.to_string()),
    })
}

/// Rebuilds prepared modules from kept versions (our own bytecode; no recompile).
pub(crate) fn prepared_from_versions(
    versions: &BTreeMap<String, ModuleVersion>,
    engine: &Engine,
) -> Vec<PreparedModule> {
    versions
        .iter()
        .map(|(name, v)| PreparedModule {
            name: name.clone(),
            file: engine
                .modules
                .get(name)
                .map(|h| h.file.clone())
                .unwrap_or_default(),
            source: v.source.clone(),
            checksum: v.checksum.clone(),
            bytecode: v.bytecode.clone(),
            dependencies: v.dependencies.clone(),
            compile_us: 0,
        })
        .collect()
}

fn no_test_clock(id: &str) -> Error {
    Error::InvalidInput(format!(
        "sandbox `{id}` has no test clock; create it with `SandboxSpec::test_clock(true)`"
    ))
}
