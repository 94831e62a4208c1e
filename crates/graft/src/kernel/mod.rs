//! The kernel of a sandbox: processes, mailboxes, links, monitors, timers and
//! the scheduler that runs callbacks on pooled Luau threads.
//!
//! Layout (each file imports only the ones listed before it, besides this
//! hub, which holds [`Kernel`] and the operations every part shares):
//! * `cell`: where the kernel lives and how it is borrowed;
//! * `process`: process records, jobs, waiters; `log`: the guest log budget;
//! * `watch`: the CPU watch (the VM interrupt) and the canary watch;
//! * `timers`: the timer heap and what a due timer does;
//! * `reply`: answering a waiter (a host slot or a suspended process);
//! * `host`: blocking host function calls (started here, run by the node);
//! * `exit`: exits, links, monitors, exit reasons and where guest code raised;
//! * `outcome`: what a finished stretch of a callback leads to;
//! * `nest`: nested jobs (the fast path of calls and spawns between processes);
//! * `run`: time slices and running one stretch of a process;
//! * `fast`: the raw C-API natives of the nested fast path;
//! * `natives`: the `graft` guest API, one file per group.
//!
//! `reply` and `outcome` are not in the layout the reshape issue sketched:
//! answering and routing outcomes sit below both `exit` and `nest`, and
//! keeping them apart is what lets every sibling import in one direction.
//!
//! Invariants:
//! * The kernel lives in the VM's app data behind a [`KernelHandle`]; Rust
//!   borrows it ([`kernel`], or a handle taken once per slice on the hot
//!   path) only for stretches that never run Luau code (creating values is
//!   fine), so natives can borrow it too. Functions that run Luau code (resuming a
//!   worker, the prelude's `failure_of`, a collection) take the `Lua` and
//!   borrow the kernel in scoped steps around it.
//! * At most one callback per process is on the VM stack or suspended: a
//!   process's next message starts only after its current job finished.
//! * A mailbox preserves arrival order, so messages from one sender are
//!   handled in the order sent. System messages (EXIT/DOWN) ignore
//!   `max_mailbox`; user messages past it are refused, never dropped.
//! * Exits are processed from a work list, never recursively (see `exit`).
//! * The kernel imports nothing from the upgrade engine or the node: they
//!   drive it, it does not call back into them.

mod cell;
mod exit;
pub(crate) mod fast;
mod host;
mod log;
mod natives;
mod nest;
mod outcome;
pub(crate) mod process;
mod reply;
mod run;
#[cfg(test)]
mod testing;
mod timers;
mod watch;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use mlua::{Function, Lua, RegistryKey, Table, Thread, Value};
use serde::Serialize;
use serde_json::Value as Json;

use crate::clock;
use crate::config::{Limits, NodeLimits};
use crate::error::Error;
use crate::value::{ExitReason, VmPid};
use crate::vm::{self, Vm};

use cell::KernelCell;
pub(crate) use cell::{KernelGuard, KernelRef};
pub(crate) use exit::{remember_chunk, truncate_reason};
pub(crate) use host::BlockingCall;
pub(crate) use nest::{nest_done, NestEnd, NestResult};
pub(crate) use process::{HostSlot, Job, Process, Run, Waiter};
pub(crate) use run::{call_now, run_slice, CallNow};
pub(crate) use timers::Timer;
pub(crate) use watch::{CanaryWatch, Watch, WatchScope};

/// Maps keyed by serials and ids: small integers that need no DoS-resistant
/// hashing, on the hottest paths (every message looks up its process).
pub(crate) type SerialMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<SerialHasher>>;

/// Multiplicative (Fibonacci) hashing of a u64: one multiply.
#[derive(Default, Clone, Copy)]
pub(crate) struct SerialHasher(u64);

impl std::hash::Hasher for SerialHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Callbacks may run nested (a call to an idle process runs its handler at
/// once, inside the caller's `graft.call`) up to this depth.
pub(crate) const MAX_NESTING: usize = 8;

/// A thread pool bigger than this keeps no more idle worker threads.
const POOL_MAX: usize = 256;
/// CPU a module body may take when a reload evaluates it.
pub const MODULE_BODY_MS: u64 = 100;
/// Time slice of a sandbox before it yields its scheduler thread.
pub(crate) const SLICE_MS: u64 = 5;
/// Default `graft.call` timeout (and a host call's), as OTP's `gen_server:call/2`.
pub(crate) const DEFAULT_CALL_TIMEOUT_MS: u64 = 5000;

/// A sandbox event: reloads, rollbacks, aborts, crashes, app stops.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Position in the sandbox's event log (1, 2, 3 …).
    pub seq: u64,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: f64,
    /// `reload`, `unchanged`, `abort`, `rollback`, `canary_rollback`, `crash`, `app_stopped` …
    pub kind: String,
    /// Details (module, versions, timings, reason …).
    pub detail: Json,
}

/// A message destination resolved when delivered (names resolve late, like OTP).
#[derive(Clone)]
pub(crate) enum Target {
    Serial(u64),
    Name(String),
}

/// Why the app (root supervisor) is not running.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AppStatus {
    /// No entry module configured.
    None,
    /// The root supervisor is running.
    Running,
    /// The root supervisor exited.
    Stopped {
        /// Its exit reason.
        reason: String,
    },
}

/// The scheduler state of one sandbox, kept in its VM's app data.
pub(crate) struct Kernel {
    pub id: Arc<str>,
    pub limits: Limits,
    /// Boxed: a map slot is a pointer, so table growth moves 16-byte
    /// entries and spare capacity costs 16 bytes, not a whole record.
    pub procs: SerialMap<Box<Process>>,
    pub names: HashMap<Box<str>, u64>,
    pub ready: VecDeque<u64>,
    next_serial: u64,
    next_token: u64,
    pub module_names: Vec<Arc<str>>,
    module_index: HashMap<Arc<str>, u32>,
    /// Current module tables by module index (None: not loaded / library).
    pub module_tables: Vec<Option<Table>>,
    /// Whether each module's current table exports `init` (by module index).
    module_servers: Vec<bool>,
    /// Current version number by module index.
    pub module_versions: Vec<u32>,
    /// Serials whose callback is on the VM stack (and since when), innermost last.
    stack: Vec<(u64, u64)>,
    /// Nested jobs the prelude runs itself, innermost last (a subset of `stack`).
    nested: Vec<nest::NestFrame>,
    timers: timers::Timers,
    pool: Vec<Thread>,
    pub worker: Function,
    /// The prelude's `failure_of(worker, error)`: the crash info of a dead worker.
    pub failure_of: Function,
    pub states: Table,
    pub watch: Arc<Watch>,
    exits: VecDeque<(u64, ExitReason, bool)>,
    /// The node's event log (events are numbered node-wide).
    pub events: Arc<crate::events::EventLog>,
    /// User messages refused by a full mailbox (read by `info`; counted on
    /// the refusal path only).
    pub mailbox_full: u64,
    pub app: Option<u64>,
    pub app_status: AppStatus,
    /// Modules a pending reload waits on: their processes start no new job.
    pub frozen: HashSet<u32>,
    /// Crashes of processes of these modules are counted for a canary.
    pub canary: Option<CanaryWatch>,
    /// Hosts waiting for the app to stop (graceful shutdown).
    pub app_stop_waiters: Vec<Arc<HostSlot>>,
    /// `Some` once a rebuild read the states it restores: answers to hosts
    /// are held here (`reply`), given if the rebuild is called off, dropped
    /// with the VM (the caller is told `Rebuilding`) if it goes on.
    pub held_answers: Option<Vec<HeldAnswer>>,
    /// The node's cap on a value's JSON form (replies, states, events).
    pub max_value_bytes: usize,
    /// A process crashed since the last collection (see `drain_exits`).
    pub(super) crashed_since_collect: bool,
    /// A panic caught where it could not unwind (a raw native on Luau's C
    /// stack); the scheduler re-raises it at the end of the slice.
    pub internal_error: Option<String>,
    /// The guest log's line budget.
    pub log_gate: log::LogGate,
    /// Blocking host calls started since the node last drained them.
    pub blocking_out: Vec<host::BlockingCall>,
    /// Which VM this is, for answers that outlive it (see `host`).
    epoch: u64,
    /// A manual clock (`graft test`): when set, the sandbox's timers and
    /// `graft.now()` read it instead of the node's clock, and only
    /// `Sandbox::advance_clock` moves it. `None` in production.
    pub test_clock: Option<TestClock>,
    /// Evaluated module chunks (module, source checksum, chunk), kept only
    /// when [`crate::vm::enable_coverage`] was called, at most
    /// [`MAX_COVERAGE_CHUNKS`].
    pub coverage_chunks: Vec<(Arc<str>, String, Function)>,
}

/// An answer to a host held back by a rebuild (`Kernel::held_answers`).
pub(crate) type HeldAnswer = (Arc<HostSlot>, Result<Json, Error>);

/// Module chunks a sandbox keeps for coverage, at most (one per evaluated
/// module version; reloads past it are not counted).
pub(crate) const MAX_COVERAGE_CHUNKS: usize = 4096;

/// The manual clock of a sandbox created with [`crate::SandboxSpec::test_clock`].
///
/// Invariant: `now_ms` only grows. Callback deadlines (`handler_ms`) and
/// slice ends stay on the node's real clock, so a guest that loops still
/// times out while the test clock stands still.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TestClock {
    /// Timer time, in the units of [`clock::precise_ms`] (it starts there).
    pub now_ms: u64,
    /// `graft.now()` at `start_ms`.
    unix_base: f64,
    start_ms: u64,
}

impl TestClock {
    /// A manual clock standing at the current real time.
    pub fn starting_now() -> TestClock {
        let now = clock::precise_ms();
        TestClock {
            now_ms: now,
            unix_base: clock::unix_ms(),
            start_ms: now,
        }
    }
}

/// Where a VM's kernel lives: in the VM's app data (so natives, which get
/// only the `Lua`, find it) and in the hands of whoever drives the VM (the
/// runtime, a slice), who borrow it without the app data's lookup.
///
/// The borrow is exclusive and checked, never waited for: a VM is driven by
/// one thread at a time (see [`cell`] for why that holds and what the check
/// costs), and a second borrow on the same thread is a bug that
/// [`KernelHandle::borrow`] reports by panicking, as a `RefCell` would.
#[derive(Clone)]
pub(crate) struct KernelHandle(Arc<KernelCell>);

impl KernelHandle {
    /// `vm`: the identity of the kernel's VM (`fast::vm_identity`).
    fn new(kernel: Kernel, vm: usize) -> KernelHandle {
        KernelHandle(Arc::new(KernelCell::new(kernel, vm)))
    }

    /// The identity of the kernel's VM (`fast::vm_identity`).
    #[inline]
    pub fn vm(&self) -> usize {
        self.0.vm()
    }

    /// Borrows the kernel. Panics if it is borrowed already: every borrow is
    /// short and never spans Luau code (see the module invariants), so that
    /// is a bug in the kernel, not something a guest can do.
    #[inline]
    #[track_caller]
    pub fn borrow(&self) -> KernelRef<'_> {
        match self.0.try_borrow() {
            Some(k) => k,
            None => borrowed_twice(),
        }
    }

    /// Borrows the kernel unless it is borrowed already.
    #[inline]
    pub fn try_borrow(&self) -> Option<KernelRef<'_>> {
        self.0.try_borrow()
    }

    /// Like [`KernelHandle::borrow`], for a borrow that outlives `self`.
    #[track_caller]
    fn borrow_owned(&self) -> KernelGuard {
        match KernelCell::try_borrow_arc(&self.0) {
            Some(k) => k,
            None => borrowed_twice(),
        }
    }
}

#[cold]
#[track_caller]
fn borrowed_twice() -> ! {
    panic!("the sandbox kernel is borrowed twice")
}

/// The handle on the kernel of the sandbox whose VM `lua` is: one app-data
/// lookup, for callers that borrow it several times.
pub(crate) fn kernel_handle(lua: &Lua) -> KernelHandle {
    lua.app_data_ref::<KernelHandle>()
        .expect("sandbox kernel missing")
        .clone()
}

/// The kernel of the sandbox whose VM `lua` is. Panics if it is borrowed
/// already (see [`KernelHandle::borrow`]). On hot paths, borrow through a
/// [`KernelHandle`] taken once instead.
#[track_caller]
pub(crate) fn kernel(lua: &Lua) -> KernelGuard {
    // The guard takes its own clone of the handle: borrowed from the app
    // data here, not cloned twice.
    lua.app_data_ref::<KernelHandle>()
        .expect("sandbox kernel missing")
        .borrow_owned()
}

impl Kernel {
    /// Now, in timer time: the node's precise clock, or the test clock
    /// when the sandbox has one. Every timer of the sandbox is set and
    /// fired against this.
    #[inline]
    pub fn timer_now(&self) -> u64 {
        match &self.test_clock {
            None => clock::precise_ms(),
            Some(c) => c.now_ms,
        }
    }

    /// What `graft.now()` returns: wall-clock ms, or the test clock's.
    pub fn unix_now(&self) -> f64 {
        match &self.test_clock {
            None => clock::unix_ms(),
            Some(c) => c.unix_base + (c.now_ms - c.start_ms) as f64,
        }
    }

    /// Whether processes or exits wait to run (the next slice has work).
    pub fn has_ready_work(&self) -> bool {
        !self.ready.is_empty() || !self.exits.is_empty()
    }

    /// The index of module `name`, given one if it has none yet.
    pub fn intern_module(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.module_index.get(name) {
            return i;
        }
        let i = self.module_names.len() as u32;
        let name: Arc<str> = Arc::from(name);
        self.module_names.push(name.clone());
        self.module_index.insert(name, i);
        self.module_tables.push(None);
        self.module_servers.push(false);
        self.module_versions.push(0);
        i
    }

    /// The index of module `name`, if it has one.
    pub fn module_id(&self, name: &str) -> Option<u32> {
        self.module_index.get(name).copied()
    }

    /// A pid as the API shows it: `<module.N>`.
    pub fn pid_string(&self, pid: VmPid) -> String {
        let module = self
            .module_names
            .get(pid.module_index() as usize)
            .map(|s| &**s)
            .unwrap_or("?");
        format!("<{module}.{}>", pid.serial())
    }

    /// A pid as the API hands it out ([`crate::Pid`]): the same text as
    /// [`Kernel::pid_string`].
    pub fn api_pid(&self, pid: VmPid) -> crate::Pid {
        let module = self
            .module_names
            .get(pid.module_index() as usize)
            .map(|s| &**s)
            .unwrap_or("?");
        crate::Pid::from_parts(module, pid.serial())
    }

    /// A fresh token (also a fresh timer id and monitor ref).
    pub fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Records an event in the node's log (each sandbox keeps its newest
    /// `max_events` there).
    pub fn event(&mut self, kind: &str, detail: Json) {
        self.events.append(&self.id, kind, detail);
    }

    /// The lines the guest log dropped since the last report, as a log line
    /// and a `log_dropped` event.
    fn report_dropped_log_lines(&mut self) {
        let dropped = self.log_gate.take_dropped();
        if dropped > 0 {
            tracing::warn!(sandbox = %self.id, "{dropped} lines dropped");
            self.event("log_dropped", serde_json::json!({ "dropped": dropped }));
        }
    }

    /// Resolves a host-side target: a registered name, `"<module.N>"`, or a bare serial.
    pub fn resolve_str(&self, target: &str) -> Option<u64> {
        if let Some(&s) = self.names.get(target) {
            return Some(s);
        }
        let serial = VmPid::parse_serial(target).or_else(|| target.parse().ok())?;
        self.procs.contains_key(&serial).then_some(serial)
    }

    /// Resolves a guest-side target: a pid or a registered name.
    pub fn resolve_value(&self, v: &Value) -> Option<u64> {
        match v {
            Value::String(s) => self.names.get(&*s.to_str().ok()?).copied(),
            other => VmPid::from_lua(other)
                .map(|p| p.serial())
                .filter(|s| self.procs.contains_key(s)),
        }
    }

    /// A guest-side target as error messages name it.
    pub fn describe_value(&self, v: &Value) -> String {
        match v {
            Value::String(s) => s.to_string_lossy(),
            other => match VmPid::from_lua(other) {
                Some(p) => self.pid_string(p),
                None => format!("a {}", other.type_name()),
            },
        }
    }

    /// Marks a process runnable if it has something to run (an idle process
    /// with an empty mailbox stays off the run queue).
    pub fn wake(&mut self, serial: u64) {
        if self.procs.get_mut(&serial).is_some_and(|p| p.mark_queued()) {
            self.ready.push_back(serial);
        }
    }

    /// Queues a user message; `Err` names why it was refused and hands the
    /// job back (it owns registry keys the caller may still answer through).
    #[allow(clippy::result_large_err)]
    pub fn deliver(&mut self, serial: u64, job: Job) -> Result<(), (Error, Job)> {
        let max = self.limits.max_mailbox;
        let Some(p) = self.procs.get_mut(&serial) else {
            return Err((Error::NoProcess(format!("#{serial}")), job));
        };
        if p.dying.is_some() {
            let pid = p.pid;
            return Err((Error::NoProcess(self.pid_string(pid)), job));
        }
        if p.mailbox.len() >= max {
            let pid = p.pid;
            self.mailbox_full += 1;
            return Err((Error::MailboxFull(self.pid_string(pid)), job));
        }
        p.mailbox.push_back(job);
        self.wake(serial);
        Ok(())
    }

    /// Queues a system message (EXIT, DOWN): never refused while the process lives.
    fn deliver_system(&mut self, serial: u64, job: Job) {
        if let Some(p) = self.procs.get_mut(&serial) {
            if p.dying.is_none() {
                p.mailbox.push_back(job);
                self.wake(serial);
            }
        }
    }

    /// A fresh process serial.
    pub fn new_serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    /// Whether one more process may start under `name`: `max_processes`,
    /// the name's form, and that it is free.
    fn admit_process(&self, name: Option<&str>) -> Result<(), Error> {
        if self.procs.len() >= self.limits.max_processes {
            return Err(Error::TooManyProcesses(self.limits.max_processes));
        }
        if let Some(n) = name {
            crate::config::validate_process_name(n)?;
            if self.names.contains_key(n) {
                return Err(Error::InvalidInput(format!(
                    "the name `{n}` is registered already"
                )));
            }
        }
        Ok(())
    }

    /// Adds the record of a process admitted by [`Kernel::admit_process`],
    /// already running `job` if one is given (a nested init). Returns its
    /// serial and pid.
    fn insert_process(
        &mut self,
        module: u32,
        parent: Option<u64>,
        name: Option<&str>,
        job: Option<Job>,
    ) -> (u64, VmPid) {
        let serial = self.new_serial();
        let pid = VmPid::new(module, serial);
        let mut p = Process::new(pid, parent, self.module_versions[module as usize]);
        if let Some(n) = name {
            p.name = Some(n.into());
            self.names.insert(n.into(), serial);
        }
        if let Some(job) = job {
            p.begin_job(job);
        }
        self.procs.insert(serial, Box::new(p));
        (serial, pid)
    }

    /// Creates a process record and queues its init job. Checks
    /// `max_processes` and the name; `Err` hands the waiter back.
    #[allow(clippy::result_large_err)] // the waiter comes back on a cold path
    pub fn create_process(
        &mut self,
        module: u32,
        parent: Option<u64>,
        name: Option<&str>,
        args: Option<RegistryKey>,
        waiter: Waiter,
    ) -> Result<u64, (Error, Waiter)> {
        if let Err(e) = self.admit_process(name) {
            return Err((e, waiter));
        }
        let (serial, _) = self.insert_process(module, parent, name, None);
        if let Some(p) = self.procs.get_mut(&serial) {
            p.system = Some(Box::new(Job::Init { args, waiter }));
        }
        self.wake(serial);
        Ok(serial)
    }

    /// Links two processes (both directions; once).
    pub fn link(&mut self, a: u64, b: u64) {
        for (from, to) in [(a, b), (b, a)] {
            if let Some(p) = self.procs.get_mut(&from) {
                if !p.links().contains(&to) {
                    p.relations_mut().links.push(to);
                }
            }
        }
    }

    /// Whether a module can run as a process (its current table exports `init`).
    pub fn is_server_module(&self, module: u32) -> bool {
        self.module_servers
            .get(module as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Installs the current table of a module (at a reload's commit).
    pub fn set_module_table(&mut self, module: u32, table: Table) {
        let is_server = matches!(table.raw_get::<Value>("init"), Ok(Value::Function(_)));
        self.module_servers[module as usize] = is_server;
        self.module_tables[module as usize] = Some(table);
    }

    /// Whether `serial`'s callback is on the VM stack.
    pub fn is_on_stack(&self, serial: u64) -> bool {
        self.stack.iter().any(|(s, _)| *s == serial)
    }

    /// The process whose callback runs innermost, if any.
    pub fn current(&self) -> Option<u64> {
        self.stack.last().map(|(s, _)| *s)
    }

    /// Asks a process to exit. `run_terminate`: whether its `terminate` runs first.
    pub fn exit_process(&mut self, serial: u64, reason: ExitReason, run_terminate: bool) {
        self.exits
            .push_back((serial, truncate_reason(reason), run_terminate));
    }

    /// Whether a process is runnable or an exit is queued.
    pub fn has_work(&self) -> bool {
        !self.ready.is_empty() || !self.exits.is_empty()
    }
}

/// Creates a sandbox's kernel and VM. Natives are installed into the prelude.
pub(crate) fn new_vm(
    id: &str,
    limits: &Limits,
    node: &NodeLimits,
    grants: &[String],
    host_fns: &vm::HostTable,
    events: Arc<crate::events::EventLog>,
) -> mlua::Result<Vm> {
    let host = vm::HostHooks {
        fns: host_fns,
        caller: host::caller_of,
        start_blocking: host::start_blocking,
    };
    let vm = Vm::new(
        grants,
        host,
        limits.max_message_bytes,
        node.max_value_bytes,
        natives::install,
        |lua, pid| kernel(lua).pid_string(pid),
    )?;
    // The VM's identity, read from a first worker (which then starts the pool).
    let first_worker = vm.lua.create_thread(vm.worker.clone())?;
    // SAFETY: the thread is alive (held here) and belongs to the VM just made.
    let vm_id = unsafe { fast::vm_identity(first_worker.state()) };
    let k = Kernel {
        id: Arc::from(id),
        limits: limits.clone(),
        procs: SerialMap::default(),
        names: HashMap::new(),
        ready: VecDeque::new(),
        next_serial: 0,
        next_token: 0,
        module_names: Vec::new(),
        module_index: HashMap::new(),
        module_tables: Vec::new(),
        module_servers: Vec::new(),
        module_versions: Vec::new(),
        stack: Vec::new(),
        nested: Vec::new(),
        timers: timers::Timers::default(),
        pool: vec![first_worker],
        worker: vm.worker.clone(),
        failure_of: vm.failure_of.clone(),
        states: vm.states.clone(),
        watch: Arc::new(Watch::new(limits.handler_ms)),
        exits: VecDeque::new(),
        events,
        mailbox_full: 0,
        app: None,
        app_status: AppStatus::None,
        frozen: HashSet::new(),
        canary: None,
        app_stop_waiters: Vec::new(),
        max_value_bytes: node.max_value_bytes,
        crashed_since_collect: false,
        internal_error: None,
        log_gate: log::LogGate::default(),
        blocking_out: Vec::new(),
        epoch: host::next_epoch(),
        test_clock: None,
        coverage_chunks: Vec::new(),
        held_answers: None,
    };
    vm.lua.set_app_data(KernelHandle::new(k, vm_id));
    watch::install_interrupt(&vm.lua);
    // Guest code may allocate up to the limit; the kernel's own bookkeeping
    // (EXIT messages, host values) has headroom so it never fails half-way.
    vm.lua.set_memory_limit(limits.memory_bytes)?;
    // Module index 0 is `$eval` (short-lived eval processes): a real module
    // never has index 0.
    kernel(&vm.lua).intern_module(EVAL_MODULE);
    Ok(vm)
}

/// The pseudo-module of `eval` processes.
pub(crate) const EVAL_MODULE: &str = "$eval";

/// Headroom above `memory_bytes` for the kernel's own allocations.
const KERNEL_HEADROOM: usize = 4 * 1024 * 1024;

/// Guest code runs under the sandbox's own memory limit.
pub(crate) fn guest_memory(lua: &Lua, limits: &Limits) {
    let _ = lua.set_memory_limit(limits.memory_bytes);
}

/// The kernel's bookkeeping runs with [`KERNEL_HEADROOM`] above it.
pub(crate) fn kernel_memory(lua: &Lua, limits: &Limits) {
    let _ = lua.set_memory_limit(limits.memory_bytes + KERNEL_HEADROOM);
}
