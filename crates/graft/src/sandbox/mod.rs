//! The sandbox kernel: processes, mailboxes, links, monitors, timers and the
//! scheduler that runs callbacks on pooled Luau threads.
//!
//! Invariants:
//! * The kernel lives in the VM's app data; Rust borrows it only for short
//!   stretches that never run Luau code, so natives can borrow it too.
//! * At most one callback per process is on the VM stack or suspended: a
//!   process's next message starts only after its current job finished.
//! * A mailbox preserves arrival order, so messages from one sender are
//!   handled in the order sent. System messages (EXIT/DOWN) ignore
//!   `max_mailbox`; user messages past it are refused, never dropped.
//! * Exits are processed from a work list, never recursively, so a long chain
//!   of links cannot overflow the native stack.

pub(crate) mod fast;
mod log;
mod natives;
pub(crate) mod process;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use mlua::{AppDataRefMut, Function, Lua, MultiValue, RegistryKey, Table, Thread, Value};
use serde::Serialize;
use serde_json::Value as Json;

use crate::clock;
use crate::config::{Limits, NodeLimits};
use crate::error::Error;
use crate::value::{lua_to_json, ExitReason, Pid};
use crate::vm::{self, Vm, MARK_AWAIT, MARK_DONE};

pub(crate) use process::{HostSlot, Job, Process, Run, Waiter};

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

/// Shared with the VM interrupt: everything it needs, as atomics.
pub(crate) struct Watch {
    /// Coarse ms after which the interrupt looks closer (min of the two below).
    check_at: AtomicU64,
    /// Coarse ms at which the running callback exceeds `handler_ms`.
    deadline: AtomicU64,
    /// Coarse ms at which the current time slice ends.
    slice_end: AtomicU64,
    /// Set once the running callback is past its deadline: the interrupt keeps
    /// raising, so a guest `pcall` cannot swallow the timeout.
    timed_out: AtomicBool,
    /// The Luau thread of the innermost running callback (as a pointer).
    thread: AtomicUsize,
    /// Whether to yield at the end of the slice (off during reload steps).
    preemptible: AtomicBool,
    /// The caller's worker while the prelude runs a nested job itself: that
    /// thread only runs prelude code until it closes the nested frame, so the
    /// interrupt leaves it alone (a callee's timeout is the callee's).
    exempt: AtomicUsize,
    handler_ms: u64,
}

/// What a callback had armed, restored when a nested one ends.
#[derive(Clone, Copy)]
pub(crate) struct WatchSave {
    deadline: u64,
    thread: usize,
    preemptible: bool,
    exempt: usize,
    saved_at: u64,
}

impl Watch {
    fn new(handler_ms: u64) -> Watch {
        Watch {
            check_at: AtomicU64::new(u64::MAX),
            deadline: AtomicU64::new(u64::MAX),
            slice_end: AtomicU64::new(u64::MAX),
            timed_out: AtomicBool::new(false),
            thread: AtomicUsize::new(0),
            preemptible: AtomicBool::new(false),
            exempt: AtomicUsize::new(0),
            handler_ms,
        }
    }
    fn arm(&self, deadline: u64, thread: usize, preemptible: bool) {
        self.deadline.store(deadline, Ordering::Relaxed);
        self.thread.store(thread, Ordering::Relaxed);
        self.timed_out.store(false, Ordering::Relaxed);
        self.preemptible.store(preemptible, Ordering::Relaxed);
        let slice = if preemptible {
            self.slice_end.load(Ordering::Relaxed)
        } else {
            u64::MAX
        };
        self.check_at.store(deadline.min(slice), Ordering::Relaxed);
    }
    /// What the enclosing callback had armed, to restore after a nested one.
    fn save(&self) -> WatchSave {
        WatchSave {
            deadline: self.deadline.load(Ordering::Relaxed),
            thread: self.thread.load(Ordering::Relaxed),
            preemptible: self.preemptible.load(Ordering::Relaxed),
            exempt: self.exempt.load(Ordering::Relaxed),
            saved_at: clock::coarse_ms(),
        }
    }
    /// Re-arms the enclosing callback; the time the nested one ran does not
    /// count against the enclosing callback's `handler_ms`.
    fn restore(&self, saved: WatchSave) {
        self.exempt.store(saved.exempt, Ordering::Relaxed);
        if saved.thread == 0 && saved.deadline == u64::MAX {
            self.disarm();
            return;
        }
        let nested = clock::coarse_ms().saturating_sub(saved.saved_at);
        self.arm(
            saved.deadline.saturating_add(nested),
            saved.thread,
            saved.preemptible,
        );
    }
    fn disarm(&self) {
        self.check_at.store(u64::MAX, Ordering::Relaxed);
        self.deadline.store(u64::MAX, Ordering::Relaxed);
        self.thread.store(0, Ordering::Relaxed);
    }
    /// Bounds CPU time of trusted-but-guest-driven code run outside a process
    /// (module evaluation, migrations) by `handler_ms`.
    pub fn arm_for_host_code(&self) {
        self.arm(clock::coarse_ms() + self.handler_ms, 0, false);
    }
    /// Bounds a candidate module's body (run by a reload, a dry run, a
    /// sandbox's creation) by [`MODULE_BODY_MS`]: a slow or looping body must
    /// not stall the live processes for a whole `handler_ms`.
    pub fn arm_for_module_body(&self) {
        let ms = self.handler_ms.min(MODULE_BODY_MS);
        self.arm(clock::coarse_ms() + ms, 0, false);
    }
    /// Ends the running time slice at the next safepoint (the scheduler
    /// calls this when fresh work waits and no thread is free). Harmless
    /// between slices: the next slice then ends after its first callback.
    pub(crate) fn end_slice_early(&self) {
        self.slice_end.store(0, Ordering::Relaxed);
        self.check_at.store(0, Ordering::Relaxed);
    }
    pub fn disarm_host_code(&self) -> bool {
        let t = self.timed_out.load(Ordering::Relaxed);
        self.disarm();
        t
    }
}

thread_local! {
    /// The watch of the sandbox whose VM this thread is running. The VM
    /// interrupt runs at every Luau call, return and loop back-edge, so it
    /// reads its limits through this raw pointer (one thread-local load)
    /// rather than through mlua's callback machinery; a sandbox is only ever
    /// run by one thread at a time. The [`WatchScope`] that set it keeps the
    /// watch alive.
    static WATCH: std::cell::Cell<*const Watch> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// Makes `watch` the one the interrupt enforces on this thread until dropped.
pub(crate) struct WatchScope {
    _watch: Arc<Watch>,
    previous: *const Watch,
}

impl WatchScope {
    pub fn enter(lua: &Lua) -> WatchScope {
        let watch = kernel(lua).watch.clone();
        let previous = WATCH.with(|w| w.replace(Arc::as_ptr(&watch)));
        WatchScope {
            _watch: watch,
            previous,
        }
    }
}

impl Drop for WatchScope {
    fn drop(&mut self) {
        WATCH.with(|w| w.set(self.previous));
    }
}

unsafe extern "C-unwind" fn interrupt(state: *mut mlua::ffi::lua_State, gc: std::ffi::c_int) {
    if gc >= 0 {
        return; // GC safepoints: nothing to enforce
    }
    enum Act {
        Continue,
        Timeout(u64),
        Yield,
    }
    let watch = WATCH.with(|w| w.get());
    if watch.is_null() {
        return;
    }
    // SAFETY: set by a live `WatchScope` on this thread, which owns an Arc.
    let watch = &*watch;
    let act = {
        let now = clock::coarse_ms();
        if now < watch.check_at.load(Ordering::Relaxed)
            || state as usize == watch.exempt.load(Ordering::Relaxed)
        {
            Act::Continue
        } else {
            let deadline = watch.deadline.load(Ordering::Relaxed);
            if now >= deadline || watch.timed_out.load(Ordering::Relaxed) {
                watch.timed_out.store(true, Ordering::Relaxed);
                Act::Timeout(watch.handler_ms)
            } else {
                watch.check_at.store(deadline, Ordering::Relaxed);
                if watch.preemptible.load(Ordering::Relaxed)
                    && now >= watch.slice_end.load(Ordering::Relaxed)
                    && state as usize == watch.thread.load(Ordering::Relaxed)
                {
                    Act::Yield
                } else {
                    Act::Continue
                }
            }
        }
    };
    match act {
        Act::Continue => {}
        // Raised again at every safepoint once past the deadline, so a
        // guest `pcall` cannot swallow it.
        Act::Timeout(ms) => {
            let msg = format!("timeout: callback ran longer than handler_ms ({ms} ms)");
            mlua::ffi::lua_pushlstring(state, msg.as_ptr().cast(), msg.len());
            drop(msg);
            mlua::ffi::lua_error(state);
        }
        Act::Yield => {
            if mlua::ffi::lua_isyieldable(state) != 0 {
                mlua::ffi::lua_yield(state, 0);
            }
        }
    }
}

fn install_interrupt(lua: &Lua) {
    // SAFETY: lua_callbacks is shared by every thread of this VM; setting the
    // interrupt pointer is what mlua's own `set_interrupt` does.
    unsafe {
        let _ = lua.exec_raw::<()>((), |state| {
            (*mlua::ffi::lua_callbacks(state)).interrupt = Some(interrupt);
        });
    }
}

/// A sandbox event: reloads, rollbacks, aborts, crashes, app stops.
#[derive(Clone, Debug, Serialize)]
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

pub(crate) enum Timer {
    SendAfter {
        target: Target,
        message: RegistryKey,
    },
    CallTimeout {
        serial: u64,
        token: u64,
        target: String,
        ms: u64,
    },
    HostCallTimeout {
        slot: Arc<HostSlot>,
        target: String,
        ms: u64,
    },
    ShutdownKill {
        serial: u64,
    },
    /// Reports the guest log lines dropped in the window that just ended.
    LogFlush,
    Canary,
    /// Only wakes the sandbox (e.g. at a pending reload's deadline).
    Wake,
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
    /// Serials whose callback is on the VM stack, innermost last.
    stack: Vec<(u64, u64)>,
    /// Nested jobs the prelude runs itself, innermost last (a subset of `stack`).
    nested: Vec<NestFrame>,
    timers: BinaryHeap<Reverse<(u64, u64)>>,
    timer_data: SerialMap<Timer>,
    pool: Vec<Thread>,
    pub worker: Function,
    /// The prelude's `failure_of(worker, error)`: the crash info of a dead worker.
    pub failure_of: Function,
    pub states: Table,
    pub watch: Arc<Watch>,
    exits: VecDeque<(u64, ExitReason, bool)>,
    pub events: VecDeque<Event>,
    next_event: u64,
    pub app: Option<u64>,
    pub app_status: AppStatus,
    /// Modules a pending reload waits on: their processes start no new job.
    pub frozen: HashSet<u32>,
    /// Crashes of processes of these modules are counted for a canary.
    pub canary: Option<crate::upgrade::CanaryWatch>,
    /// Hosts waiting for the app to stop (graceful shutdown).
    pub app_stop_waiters: Vec<Arc<HostSlot>>,
    /// The node's cap on a value's JSON form (replies, states, events).
    pub max_value_bytes: usize,
    /// Events kept (the node's `max_events`).
    pub max_events: usize,
    /// A process crashed since the last collection (see `collect_after_crashes`).
    crashed_since_collect: bool,
    /// A panic caught where it could not unwind (a raw native on Luau's C
    /// stack); the scheduler re-raises it at the end of the slice.
    pub internal_error: Option<String>,
    /// The guest log's line budget.
    pub log_gate: log::LogGate,
}

/// The text of a panic payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Bytes of a crash message or traceback kept in events, exit reasons and errors.
pub(crate) const MAX_SHOWN_BYTES: usize = 4096;

/// Room for the note `… (N more bytes)`: a message that fits in
/// [`MAX_SHOWN_BYTES`] plus this is kept, so cutting twice changes nothing.
const NOTE_BYTES: usize = 40;

/// Cuts `s` to [`MAX_SHOWN_BYTES`] (at a character boundary) and says how
/// much was cut: `… (N more bytes)`.
pub(crate) fn truncate_message(mut s: String) -> String {
    if s.len() <= MAX_SHOWN_BYTES + NOTE_BYTES {
        return s;
    }
    let mut cut = MAX_SHOWN_BYTES;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let more = s.len() - cut;
    s.truncate(cut);
    s.push_str(&format!("… ({more} more bytes)"));
    s
}

/// An exit reason with its texts cut by [`truncate_message`]. A reason is
/// kept in events and copied into every error, DOWN and EXIT message it
/// causes, outside the sandbox's memory limit. A `graft.exit` reason whose
/// JSON form is longer becomes that JSON text, cut.
pub(crate) fn truncate_reason(reason: ExitReason) -> ExitReason {
    match reason {
        ExitReason::Error {
            message,
            traceback,
            module,
            line,
        } => ExitReason::Error {
            message: truncate_message(message),
            traceback: truncate_message(traceback),
            module,
            line,
        },
        ExitReason::Other { value } if json_longer_than(&value, MAX_SHOWN_BYTES) => {
            let text = serde_json::to_string(&value).unwrap_or_default();
            ExitReason::Other {
                value: Json::String(truncate_message(text)),
            }
        }
        other => other,
    }
}

/// Whether `v`'s JSON text is longer than `max` bytes; stops counting there.
fn json_longer_than(v: &Json, max: usize) -> bool {
    struct Count(usize, usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            if self.0 > self.1 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(Count(0, max), v).is_err()
}

#[cfg(test)]
mod truncate_tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(truncate_message("short".into()), "short");
        let s = format!("{}é{}", "a".repeat(MAX_SHOWN_BYTES - 1), "b".repeat(99));
        let cut = truncate_message(s);
        assert_eq!(
            cut,
            format!("{}… (101 more bytes)", "a".repeat(MAX_SHOWN_BYTES - 1))
        );
        assert_eq!(truncate_message(cut.clone()), cut);
        let huge = truncate_message("x".repeat(1 << 24));
        assert_eq!(truncate_message(huge.clone()), huge);
    }

    #[test]
    fn long_exit_reasons_are_cut() {
        let big = "x".repeat(3 * MAX_SHOWN_BYTES);
        let r = truncate_reason(ExitReason::Error {
            message: big.clone(),
            traceback: big.clone(),
            module: None,
            line: None,
        });
        let ExitReason::Error {
            message, traceback, ..
        } = r
        else {
            panic!("still an error")
        };
        assert!(message.ends_with("… (8192 more bytes)"));
        assert_eq!(message, traceback);
        let r = truncate_reason(ExitReason::Other {
            value: serde_json::json!({ "why": big }),
        });
        let ExitReason::Other {
            value: Json::String(text),
        } = r
        else {
            panic!("a long reason becomes its cut JSON text")
        };
        assert!(text.starts_with("{\"why\":\"xxx"), "{}", &text[..20]);
        let small = ExitReason::Other {
            value: serde_json::json!({ "why": "x" }),
        };
        assert_eq!(truncate_reason(small.clone()), small);
    }
}

pub(crate) fn kernel(lua: &Lua) -> AppDataRefMut<'_, Kernel> {
    lua.app_data_mut::<Kernel>()
        .expect("sandbox kernel missing")
}

/// The outcome of a finished job, routed after the kernel borrow is released.
enum Outcome {
    Done(Value),
    Failed(ExitReason),
    Suspended(u64, Thread),
    Preempted(Thread),
}

impl Event {
    /// An event stamped now.
    pub(crate) fn new(seq: u64, kind: &str, detail: Json) -> Event {
        Event {
            seq,
            at_ms: clock::unix_ms(),
            kind: kind.into(),
            detail,
        }
    }
}

impl Kernel {
    /// Continues the event numbering after events restored from an earlier runtime.
    pub fn set_event_seq(&mut self, seq: u64) {
        self.next_event = seq;
    }

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

    pub fn module_id(&self, name: &str) -> Option<u32> {
        self.module_index.get(name).copied()
    }

    pub fn pid_string(&self, pid: Pid) -> String {
        let module = self
            .module_names
            .get(pid.module_index() as usize)
            .map(|s| &**s)
            .unwrap_or("?");
        format!("<{module}.{}>", pid.serial())
    }

    pub fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Records an event; the oldest beyond `max_events` are forgotten.
    pub fn event(&mut self, kind: &str, detail: Json) {
        self.next_event += 1;
        while self.events.len() >= self.max_events.max(1) {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            seq: self.next_event,
            at_ms: clock::unix_ms(),
            kind: kind.into(),
            detail,
        });
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
        let serial = Pid::parse_serial(target).or_else(|| target.parse().ok())?;
        self.procs.contains_key(&serial).then_some(serial)
    }

    /// Resolves a guest-side target: a pid or a registered name.
    pub fn resolve_value(&self, v: &Value) -> Option<u64> {
        match v {
            Value::String(s) => self.names.get(&*s.to_str().ok()?).copied(),
            other => Pid::from_lua(other)
                .map(|p| p.serial())
                .filter(|s| self.procs.contains_key(s)),
        }
    }

    pub fn describe_value(&self, v: &Value) -> String {
        match v {
            Value::String(s) => s.to_string_lossy(),
            other => match Pid::from_lua(other) {
                Some(p) => self.pid_string(p),
                None => format!("a {}", other.type_name()),
            },
        }
    }

    /// Marks a process runnable if it has something to run (an idle process
    /// with an empty mailbox stays off the run queue).
    pub fn wake(&mut self, serial: u64) {
        if let Some(p) = self.procs.get_mut(&serial) {
            let has_work = match p.run {
                Run::Idle => p.system.is_some() || !p.mailbox.is_empty(),
                Run::Resumable { .. } => true,
                Run::Running | Run::Suspended { .. } => false,
            };
            if !p.queued && has_work {
                p.queued = true;
                self.ready.push_back(serial);
            }
        }
    }

    /// Queues a user message; `Err` names why it was refused and hands the
    /// job back (it owns registry keys the caller may still answer through).
    #[allow(clippy::result_large_err)]
    pub fn deliver(&mut self, serial: u64, job: Job) -> Result<(), (Error, Job)> {
        let max = self.limits.max_mailbox;
        let Some(p) = self.procs.get(&serial) else {
            return Err((Error::NoProcess(format!("#{serial}")), job));
        };
        if p.dying.is_some() {
            return Err((Error::NoProcess(self.pid_string(p.pid)), job));
        }
        if p.mailbox.len() >= max {
            return Err((Error::MailboxFull(self.pid_string(p.pid)), job));
        }
        self.procs
            .get_mut(&serial)
            .expect("checked")
            .mailbox
            .push_back(job);
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

    pub fn new_serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
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
        if self.procs.len() >= self.limits.max_processes {
            return Err((Error::TooManyProcesses(self.limits.max_processes), waiter));
        }
        if let Some(n) = name {
            if let Err(e) = crate::config::validate_process_name(n) {
                return Err((e, waiter));
            }
            if self.names.contains_key(n) {
                return Err((
                    Error::InvalidInput(format!("the name `{n}` is registered already")),
                    waiter,
                ));
            }
        }
        let serial = self.new_serial();
        let pid = Pid::new(module, serial);
        let mut p = Process::new(pid, parent, self.module_versions[module as usize]);
        if let Some(n) = name {
            p.name = Some(n.into());
            self.names.insert(n.into(), serial);
        }
        p.system = Some(Box::new(Job::Init { args, waiter }));
        self.procs.insert(serial, Box::new(p));
        self.wake(serial);
        Ok(serial)
    }

    /// Creates a process record with no job queued: its init is about to run
    /// nested ([`Kernel::begin_nested`]). Checks `max_processes` and the name.
    pub fn create_idle_process(
        &mut self,
        module: u32,
        parent: Option<u64>,
        name: Option<&str>,
    ) -> Result<u64, Error> {
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
        let serial = self.new_serial();
        let pid = Pid::new(module, serial);
        let mut p = Process::new(pid, parent, self.module_versions[module as usize]);
        if let Some(n) = name {
            p.name = Some(n.into());
            self.names.insert(n.into(), serial);
        }
        self.procs.insert(serial, Box::new(p));
        Ok(serial)
    }

    /// Timer ids and tokens share one counter, so a call's token can name
    /// its timeout timer (cancelled when the reply arrives).
    pub fn add_timer(&mut self, at_ms: u64, timer: Timer) -> u64 {
        let id = self.token();
        self.add_timer_with_id(id, at_ms, timer);
        id
    }

    pub fn add_timer_with_id(&mut self, id: u64, at_ms: u64, timer: Timer) {
        // Cancelled timers stay in the heap until due; rebuild it when they
        // outnumber the live ones so a busy caller cannot grow it unbounded.
        if self.timers.len() > 4096 && self.timers.len() > 2 * self.timer_data.len() {
            let live: Vec<Reverse<(u64, u64)>> = self
                .timers
                .drain()
                .filter(|Reverse((_, id))| self.timer_data.contains_key(id))
                .collect();
            self.timers = live.into();
        }
        self.timers.push(Reverse((at_ms, id)));
        self.timer_data.insert(id, timer);
    }

    /// Timers waiting to fire (every kind).
    pub fn pending_timers(&self) -> usize {
        self.timer_data.len()
    }

    /// Cancels a `send_after` timer (the only kind guest code may cancel).
    pub fn cancel_send_after(&mut self, id: u64) -> bool {
        if matches!(self.timer_data.get(&id), Some(Timer::SendAfter { .. })) {
            return self.cancel_timer(id);
        }
        false
    }

    pub fn cancel_timer(&mut self, id: u64) -> bool {
        self.timer_data.remove(&id).is_some()
    }

    /// When the earliest live timer is due.
    pub fn next_timer_at(&mut self) -> Option<u64> {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if self.timer_data.contains_key(&id) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// Whether `serial` may run a job nested in the current callback, right
    /// now, ahead of its mailbox: it is idle with nothing queued (so order
    /// is kept), no reload froze its module, and the nesting depth allows it.
    pub fn nestable(&self, serial: u64) -> bool {
        let Some(p) = self.procs.get(&serial) else {
            return false;
        };
        self.nesting_left()
            && matches!(p.run, Run::Idle)
            && p.job.is_none()
            && p.dying.is_none()
            && p.system.is_none()
            && p.mailbox.is_empty()
            && !self.frozen.contains(&p.pid.module_index())
    }

    /// Starts `callee`'s `handle_call` nested in `caller`'s callback on worker
    /// `co` (see [`Kernel::begin_nested`]); `token` is what the caller waits
    /// on if it has to, for up to `timeout_ms`. Returns the caller's pid.
    pub fn begin_nested_call(
        &mut self,
        caller: u64,
        callee: u64,
        token: u64,
        co: usize,
        timeout_ms: u64,
    ) -> Option<Pid> {
        let from = self.procs.get(&caller).map(|p| p.pid);
        let job = Job::Call {
            request: None,
            from,
            waiter: Waiter::Process {
                serial: caller,
                token,
            },
        };
        let wait = NestWait {
            caller,
            token,
            timeout_ms: Some(timeout_ms),
        };
        self.begin_nested(callee, job, co, wait);
        from
    }

    /// Starts the `init` of a process just created idle, nested in `caller`'s
    /// callback on worker `co` (see [`Kernel::begin_nested`]).
    pub fn begin_nested_init(&mut self, caller: u64, child: u64, token: u64, co: usize) {
        let job = Job::Init {
            args: None,
            waiter: Waiter::Process {
                serial: caller,
                token,
            },
        };
        let wait = NestWait {
            caller,
            token,
            timeout_ms: None,
        };
        self.begin_nested(child, job, co, wait);
    }

    /// Starts `job` of `serial` nested in the current callback, on the worker
    /// thread `co` that the prelude resumes itself. `caller`/`token` name who
    /// waits if the job does not finish at once. Must be closed by [`nest_done`].
    fn begin_nested(&mut self, serial: u64, job: Job, co: usize, wait: NestWait) {
        let now = clock::coarse_ms();
        let p = self.procs.get_mut(&serial).expect("nestable");
        p.job = Some(job);
        p.run = Run::Running;
        p.used_ms = 0;
        p.nested_ms = 0;
        p.messages_handled += 1;
        self.stack.push((serial, now));
        let enclosing = self.watch.save();
        // The caller's worker only runs prelude code until `nest_done`.
        self.watch.exempt.store(enclosing.thread, Ordering::Relaxed);
        self.watch.arm(now + self.limits.handler_ms, co, true);
        self.nested.push(NestFrame {
            serial,
            wait,
            enclosing,
            start: now,
        });
    }

    /// Charges `serial` for the time since `started` that it ran itself
    /// (minus what callbacks nested in it took), and, when it ran nested in
    /// `caller`, excludes all of that time from the caller's charge.
    fn charge(&mut self, serial: u64, started: u64, caller: Option<u64>) {
        let elapsed = clock::coarse_ms().saturating_sub(started) as u32;
        if let Some(p) = self.procs.get_mut(&serial) {
            let own = elapsed.saturating_sub(std::mem::take(&mut p.nested_ms));
            p.used_ms = p.used_ms.saturating_add(own);
        }
        if let Some(p) = caller.and_then(|c| self.procs.get_mut(&c)) {
            p.nested_ms = p.nested_ms.saturating_add(elapsed);
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

    /// Closes the innermost nested job, `serial`'s, when its callback returned
    /// in time and its result stands: the common case of [`nest_done`]
    /// (reachable from a raw native). Returns whether it did.
    pub fn close_nested_fast(&mut self, serial: u64) -> bool {
        let finished = self.nested.last().is_some_and(|f| f.serial == serial)
            && !self.watch.timed_out.load(Ordering::Relaxed)
            && self.procs.get(&serial).is_some_and(|p| {
                // An init that returned with an abnormal exit pending is a
                // failed spawn: `nest_done` reports it.
                matches!(p.run, Run::Running)
                    && (matches!(p.job, Some(Job::Call { .. }))
                        || p.exit_pending.as_deref().is_none_or(|r| r.is_normal()))
            });
        if !finished {
            return false;
        }
        let Some(frame) = self.nested.pop() else {
            return false;
        };
        self.watch.restore(frame.enclosing);
        self.stack.pop();
        self.charge(serial, frame.start, Some(frame.wait.caller));
        let Some(p) = self.procs.get_mut(&serial) else {
            return true;
        };
        p.run = Run::Idle;
        p.job = None;
        // The reply stands; an exit that arrived meanwhile takes effect now.
        match p.exit_pending.take().map(|b| *b) {
            Some(reason) => self.exit_process(serial, reason, true),
            None => self.wake(serial),
        }
        true
    }

    /// Whether one more callback may nest on the VM stack.
    pub fn nesting_left(&self) -> bool {
        self.stack.len() < MAX_NESTING
    }

    pub fn is_on_stack(&self, serial: u64) -> bool {
        self.stack.iter().any(|(s, _)| *s == serial)
    }

    pub fn current(&self) -> Option<u64> {
        self.stack.last().map(|(s, _)| *s)
    }

    /// Asks a process to exit. `run_terminate`: whether its `terminate` runs first.
    pub fn exit_process(&mut self, serial: u64, reason: ExitReason, run_terminate: bool) {
        self.exits
            .push_back((serial, truncate_reason(reason), run_terminate));
    }

    pub fn has_work(&self) -> bool {
        !self.ready.is_empty() || !self.exits.is_empty()
    }

    pub fn take_thread(&mut self) -> Option<Thread> {
        self.pool.pop()
    }
}

/// Creates a sandbox's kernel and VM. Natives are installed into the prelude.
pub(crate) fn new_vm(
    id: &str,
    limits: &Limits,
    node: &NodeLimits,
    grants: &[String],
    host_fns: &std::collections::BTreeMap<String, vm::HostFn>,
) -> mlua::Result<Vm> {
    let vm = Vm::new(
        grants,
        host_fns,
        limits.max_message_bytes,
        node.max_value_bytes,
        natives::install,
        |lua, pid| kernel(lua).pid_string(pid),
    )?;
    let watch = Arc::new(Watch::new(limits.handler_ms));

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
        timers: BinaryHeap::new(),
        timer_data: SerialMap::default(),
        pool: Vec::new(),
        worker: vm.worker.clone(),
        failure_of: vm.failure_of.clone(),
        states: vm.states.clone(),
        watch,
        exits: VecDeque::new(),
        events: VecDeque::new(),
        next_event: 0,
        app: None,
        app_status: AppStatus::None,
        frozen: HashSet::new(),
        canary: None,
        app_stop_waiters: Vec::new(),
        max_value_bytes: node.max_value_bytes,
        max_events: node.max_events,
        crashed_since_collect: false,
        internal_error: None,
        log_gate: log::LogGate::default(),
    };
    vm.lua.set_app_data(k);
    install_interrupt(&vm.lua);
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

pub(crate) fn guest_memory(lua: &Lua, limits: &Limits) {
    let _ = lua.set_memory_limit(limits.memory_bytes);
}

pub(crate) fn kernel_memory(lua: &Lua, limits: &Limits) {
    let _ = lua.set_memory_limit(limits.memory_bytes + KERNEL_HEADROOM);
}

/// Runs the sandbox until it has no runnable process or its slice ends.
/// Returns whether work remains.
pub(crate) fn run_slice(lua: &Lua) -> bool {
    let started = clock::coarse_ms();
    {
        let k = kernel(lua);
        // 0: the scheduler asked for this slice to end early (see
        // `Watch::end_slice_early`) before it began; keep that request.
        let _ = k.watch.slice_end.compare_exchange(
            u64::MAX,
            started + SLICE_MS,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    fire_timers(lua);
    drain_exits(lua);
    let mut budget = 10_000u32;
    loop {
        let next = kernel(lua).ready.pop_front();
        let Some(serial) = next else { break };
        run_process(lua, serial);
        drain_exits(lua);
        budget -= 1;
        let slice_end = kernel(lua).watch.slice_end.load(Ordering::Relaxed);
        if budget == 0 || clock::coarse_ms() >= slice_end.min(started + SLICE_MS) {
            break;
        }
    }
    lua.expire_registry_values();
    let k = kernel(lua);
    k.watch.slice_end.store(u64::MAX, Ordering::Relaxed);
    k.has_work()
}

/// Fires every timer that is due.
pub(crate) fn fire_timers(lua: &Lua) {
    let now = clock::precise_ms();
    loop {
        let mut k = kernel(lua);
        let Some(Reverse((at, id))) = k.timers.peek().copied() else {
            return;
        };
        if at > now {
            return;
        }
        k.timers.pop();
        let Some(timer) = k.timer_data.remove(&id) else {
            continue;
        };
        match timer {
            Timer::SendAfter { target, message } => {
                let serial = match &target {
                    Target::Serial(s) => Some(*s),
                    Target::Name(n) => k.names.get(n.as_str()).copied(),
                };
                if let Some(s) = serial {
                    // A timer message to a full mailbox still arrives: the sender
                    // cannot be told any more, and dropping it would be silent.
                    k.deliver_system(s, Job::Info(message));
                }
            }
            Timer::CallTimeout {
                serial,
                token,
                target,
                ms,
            } => {
                drop(k);
                let msg = format!("graft.call: timeout after {ms} ms waiting for {target}");
                resume_with(
                    lua,
                    serial,
                    token,
                    false,
                    Value::String(lua.create_string(&msg).expect("oom")),
                );
            }
            Timer::HostCallTimeout { slot, target, ms } => {
                slot.answer(Err(Error::CallTimeout {
                    target,
                    timeout_ms: ms,
                }));
            }
            Timer::ShutdownKill { serial } => {
                if k.procs.contains_key(&serial) {
                    k.exit_process(serial, ExitReason::Killed, false);
                }
            }
            Timer::Wake => {}
            Timer::LogFlush => k.report_dropped_log_lines(),
            Timer::Canary => {
                drop(k);
                crate::upgrade::canary_expired(lua);
            }
        }
    }
}

/// Wakes a process suspended on `token` with `(ok, value)`; stale tokens are ignored.
pub(crate) fn resume_with(lua: &Lua, serial: u64, token: u64, ok: bool, value: Value) {
    let key = match lua.create_registry_value(value) {
        Ok(k) => k,
        Err(_) => return,
    };
    let mut k = kernel(lua);
    // A call's token names its timeout timer: the answer cancels it.
    k.cancel_timer(token);
    let Some(p) = k.procs.get_mut(&serial) else {
        return;
    };
    match std::mem::replace(&mut p.run, Run::Idle) {
        Run::Suspended { thread, token: t } if t == token => {
            p.run = Run::Resumable {
                thread,
                resume: Some((ok, key)),
            };
            k.wake(serial);
        }
        other => {
            // Not waiting yet (preempted before it could) or a stale answer:
            // park it; a later wait on another token discards it.
            p.run = other;
            p.parked = Some(Box::new((token, ok, key)));
        }
    }
}

/// Takes an answer parked for `serial` under `token` (set by a nested job
/// that finished before its caller had to wait).
pub(crate) fn take_parked(lua: &Lua, serial: u64, token: u64) -> Option<(bool, Value)> {
    let key = {
        let mut k = kernel(lua);
        let p = k.procs.get_mut(&serial)?;
        match p.parked.take() {
            Some(b) if b.0 == token => {
                let (_, ok, key) = *b;
                (ok, key)
            }
            other => {
                p.parked = other;
                return None;
            }
        }
    };
    let value: Value = lua.registry_value(&key.1).ok()?;
    let _ = lua.remove_registry_value(key.1);
    Some((key.0, value))
}

/// Routes a job's result to whoever waits for it.
pub(crate) fn answer(lua: &Lua, waiter: Waiter, result: Result<Value, Error>) {
    match waiter {
        Waiter::Host(slot) => {
            if slot.is_answered() {
                return;
            }
            let r = match result {
                Ok(v) => {
                    let k = kernel(lua);
                    lua_to_json(&v, "reply", k.max_value_bytes, &|p| k.pid_string(p))
                        .map_err(Error::from)
                }
                Err(e) => Err(e),
            };
            slot.answer(r);
        }
        Waiter::Process { serial, token } => match result {
            Ok(v) => resume_with(lua, serial, token, true, v),
            Err(e) => {
                let msg = lua.create_string(e.to_string()).expect("oom");
                resume_with(lua, serial, token, false, Value::String(msg))
            }
        },
    }
}

/// Runs (or resumes) the next piece of work of one process.
pub(crate) fn run_process(lua: &Lua, serial: u64) {
    let (thread, args) = {
        let mut k = kernel(lua);
        let frozen_blocked = {
            let Some(p) = k.procs.get(&serial) else {
                return;
            };
            // A call from a process that is itself waiting still runs:
            // its caller may be one of the processes the reload waits for.
            matches!(p.run, Run::Idle)
                && p.system.is_none()
                && !k.frozen.is_empty()
                && k.frozen.contains(&p.pid.module_index())
                && !matches!(
                    p.mailbox.front(),
                    Some(Job::Call {
                        waiter: Waiter::Process { .. },
                        ..
                    })
                )
        };
        let Some(p) = k.procs.get_mut(&serial) else {
            return;
        };
        p.queued = false;
        if frozen_blocked {
            return; // woken again when the reload finishes
        }
        match std::mem::replace(&mut p.run, Run::Running) {
            Run::Resumable { thread, resume } => {
                let thread: Thread = lua.registry_value(&thread).expect("suspended thread");
                let args = match resume {
                    Some((ok, key)) => {
                        let v: Value = lua.registry_value(&key).expect("resume value");
                        let _ = lua.remove_registry_value(key);
                        MultiValue::from_iter([Value::Boolean(ok), v])
                    }
                    None => MultiValue::new(),
                };
                (thread, args)
            }
            Run::Idle => {
                let job = match p.system.take() {
                    Some(j) => Some(*j),
                    None => p.mailbox.pop_front(),
                };
                let Some(job) = job else {
                    p.run = Run::Idle;
                    return;
                };
                let module = p.pid.module_index();
                p.used_ms = 0;
                p.nested_ms = 0;
                let op = job.op();
                let (a, b, c) = match job_args(lua, &k, &job) {
                    Ok(v) => v,
                    Err(e) => {
                        let p = k.procs.get_mut(&serial).expect("live");
                        p.job = Some(job);
                        p.run = Run::Idle;
                        drop(k);
                        finish_job(
                            lua,
                            serial,
                            Outcome::Failed(ExitReason::Error {
                                message: e,
                                traceback: String::new(),
                                module: None,
                                line: None,
                            }),
                        );
                        return;
                    }
                };
                let module_value = match &job {
                    Job::Eval { chunk, .. } => {
                        lua.registry_value::<Value>(chunk).expect("eval chunk")
                    }
                    _ => k.module_tables[module as usize]
                        .clone()
                        .map(Value::Table)
                        .unwrap_or(Value::Nil),
                };
                let p = k.procs.get_mut(&serial).expect("live");
                p.job = Some(job);
                p.messages_handled += 1;
                let thread = match k.take_thread() {
                    Some(t) => t,
                    None => lua
                        .create_thread(k.worker.clone())
                        .expect("cannot create a worker thread"),
                };
                let args = MultiValue::from_iter([
                    Value::Number(op as f64),
                    Value::Number(serial as f64),
                    module_value,
                    a,
                    b,
                    c,
                ]);
                (thread, args)
            }
            other => {
                p.run = other;
                return;
            }
        }
    };
    let outcome = resume(lua, serial, &thread, args);
    finish_job(lua, serial, outcome);
}

/// The arguments of a job's callback: (a, b, c) as the prelude expects them.
fn job_args(lua: &Lua, k: &Kernel, job: &Job) -> Result<(Value, Value, Value), String> {
    let get = |key: &Option<RegistryKey>| match key {
        Some(key) => lua.registry_value::<Value>(key).map_err(|e| e.to_string()),
        None => Ok(Value::Nil),
    };
    let get_msg = |key: &RegistryKey| lua.registry_value::<Value>(key).map_err(|e| e.to_string());
    Ok(match job {
        Job::Init { args, .. } => (get(args)?, Value::Nil, Value::Nil),
        Job::Call {
            request,
            from,
            waiter,
            ..
        } => (
            get(request)?,
            from.map(|p| p.to_lua()).unwrap_or(Value::Nil),
            // replies to processes are copied in the VM; hosts get JSON anyway
            Value::Boolean(matches!(waiter, Waiter::Process { .. })),
        ),
        Job::Cast(m) | Job::Info(m) => (get_msg(m)?, Value::Nil, Value::Nil),
        Job::Terminate(reason) => (
            reason.to_lua(lua).map_err(|e| e.to_string())?,
            Value::Nil,
            Value::Nil,
        ),
        Job::Eval { .. } => {
            let _ = k;
            (Value::Nil, Value::Nil, Value::Nil)
        }
    })
}

/// Resumes a worker thread for `serial` with the interrupt armed.
fn resume(lua: &Lua, serial: u64, thread: &Thread, args: MultiValue) -> Outcome {
    let (limits, watch, used, depth, nested_depth) = {
        let mut k = kernel(lua);
        let used = k.procs.get(&serial).map(|p| p.used_ms).unwrap_or(0);
        let now = clock::coarse_ms();
        let depths = (k.stack.len(), k.nested.len());
        k.stack.push((serial, now));
        (k.limits.clone(), k.watch.clone(), used, depths.0, depths.1)
    };
    let start = clock::coarse_ms();
    let deadline = start + limits.handler_ms.saturating_sub(used as u64);
    let enclosing = watch.save();
    watch.exempt.store(0, Ordering::Relaxed);
    watch.arm(deadline, thread.to_pointer() as usize, true);
    guest_memory(lua, &limits);
    let result = thread.resume::<MultiValue>(args);
    let timed_out = watch.timed_out.load(Ordering::Relaxed);
    watch.restore(enclosing);
    if enclosing.thread == 0 {
        kernel_memory(lua, &limits);
    }
    let mut k = kernel(lua);
    k.stack.truncate(depth);
    let orphans = k.nested.split_off(nested_depth);
    if !orphans.is_empty() {
        drop(k);
        crash_orphans(lua, orphans);
        k = kernel(lua);
    }
    k.charge(serial, start, None);
    let outcome = match result {
        Ok(values) => {
            let mut it = values.into_iter();
            let first = it.next();
            match first.as_ref().and_then(vm::marker_of) {
                Some(MARK_DONE) if !timed_out => {
                    k.pool_return(thread.clone());
                    Outcome::Done(it.next().unwrap_or(Value::Nil))
                }
                Some(MARK_DONE) => {
                    // Returned, but past its deadline.
                    k.pool_return(thread.clone());
                    Outcome::Failed(ExitReason::Timeout)
                }
                Some(MARK_AWAIT) => {
                    let token = match it.next() {
                        Some(Value::Number(n)) => n as u64,
                        Some(Value::Integer(n)) => n as u64,
                        _ => 0,
                    };
                    Outcome::Suspended(token, thread.clone())
                }
                // No marker: preempted by the interrupt, or the guest yielded at
                // top level. Either way the callback continues later.
                _ => Outcome::Preempted(thread.clone()),
            }
        }
        Err(e) => {
            // The callback raised and ended its worker; the worker's stack
            // still shows where.
            let failure_of = k.failure_of.clone();
            drop(k);
            let message = match &e {
                mlua::Error::RuntimeError(m) => m
                    .split_once("\nstack traceback:")
                    .map_or(m.as_str(), |(head, _)| head)
                    .to_owned(),
                other => other.to_string(),
            };
            let info = failure_of
                .call::<Value>((thread.clone(), message))
                .unwrap_or(Value::Nil);
            k = kernel(lua);
            match info {
                Value::Table(_) if !matches!(e, mlua::Error::MemoryError(_)) => {
                    Outcome::Failed(classify_failure(lua, &info, timed_out))
                }
                _ => Outcome::Failed(classify_error(lua, &e, timed_out)),
            }
        }
    };
    if matches!(outcome, Outcome::Failed(ExitReason::OutOfMemory)) {
        // Luau does not collect when an allocation fails; without a full
        // collection the garbage of the crashed callback would keep the
        // sandbox at its limit.
        drop(k);
        let _ = lua.gc_collect();
    }
    outcome
}

/// A job the prelude runs nested on a worker it resumes itself: the fast
/// path of `graft.call` and `graft.spawn` between processes of one sandbox.
/// Two native crossings per job (begin, [`nest_done`]); the request, the
/// reply and the state never leave the VM.
pub(crate) struct NestFrame {
    serial: u64,
    wait: NestWait,
    enclosing: WatchSave,
    start: u64,
}

/// Who waits for a nested job if it does not finish at once.
pub(crate) struct NestWait {
    pub caller: u64,
    pub token: u64,
    /// For calls: the caller's timeout, armed only if the caller must wait.
    pub timeout_ms: Option<u64>,
}

/// How the prelude's resume of a nested worker ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NestEnd {
    /// The callback returned (`DONE`).
    Done = 1,
    /// The callback raised and ended its worker (info from `failure_of`).
    Failed = 2,
    /// The callback waits on a token of its own (`AWAIT`).
    Awaiting = 3,
    /// Preempted, or the guest yielded the worker.
    Preempted = 4,
}

/// What the caller of a nested job does next.
pub(crate) enum NestResult {
    /// The job finished and its result stays in the VM.
    Finished,
    /// Already answered (a crash or refusal): `(ok, value)`.
    Answered(bool, Value),
    /// Wait for this token.
    Wait(u64),
}

/// Crashes the processes of nested frames whose calling callback unwound
/// before closing them (innermost first): those jobs can never finish.
fn crash_orphans(lua: &Lua, orphans: Vec<NestFrame>) {
    for frame in orphans.into_iter().rev() {
        finish_job(
            lua,
            frame.serial,
            Outcome::Failed(ExitReason::Error {
                message: "the calling callback was unwound while this callback ran".into(),
                traceback: String::new(),
                module: None,
                line: None,
            }),
        );
    }
}

/// Closes the innermost nested frame: restores the caller's watch and
/// decides what the caller does. `info` is the error info, or the callee's
/// own token for [`NestEnd::Awaiting`]; `thread` is the worker for
/// `Awaiting`/`Preempted` (the kernel keeps it to resume the callee later).
pub(crate) fn nest_done(
    lua: &Lua,
    serial: u64,
    end: NestEnd,
    info: Value,
    thread: Option<Thread>,
) -> mlua::Result<NestResult> {
    let mut k = kernel(lua);
    let Some(at) = k.nested.iter().rposition(|f| f.serial == serial) else {
        return Err(mlua::Error::runtime("graft: no such nested job is running"));
    };
    // Frames above it belong to callbacks that unwound without closing them
    // (the callee's worker died inside its own nested call's bookkeeping).
    let orphans = k.nested.split_off(at + 1);
    if !orphans.is_empty() {
        let depth = k.stack.len() - orphans.len();
        k.stack.truncate(depth);
        drop(k);
        crash_orphans(lua, orphans);
        k = kernel(lua);
    }
    if end == NestEnd::Done && k.close_nested_fast(serial) {
        return Ok(NestResult::Finished);
    }
    let Some(frame) = k.nested.pop() else {
        return Err(mlua::Error::runtime("graft: no nested job is running"));
    };
    let timed_out = k.watch.timed_out.load(Ordering::Relaxed);
    k.watch.restore(frame.enclosing);
    k.stack.pop();
    k.charge(serial, frame.start, Some(frame.wait.caller));
    drop(k);
    let outcome = match (end, thread) {
        (NestEnd::Done, _) if timed_out => Outcome::Failed(ExitReason::Timeout),
        (NestEnd::Done, _) => Outcome::Done(Value::Nil),
        (NestEnd::Awaiting, Some(t)) => {
            let token = match info {
                Value::Number(n) => n as u64,
                Value::Integer(n) => n as u64,
                _ => 0,
            };
            Outcome::Suspended(token, t)
        }
        (NestEnd::Preempted, Some(t)) => Outcome::Preempted(t),
        _ => Outcome::Failed(classify_failure(lua, &info, timed_out)),
    };
    if matches!(outcome, Outcome::Failed(ExitReason::OutOfMemory)) {
        let _ = lua.gc_collect();
    }
    finish_job(lua, serial, outcome);
    let wait = frame.wait;
    if let Some((ok, value)) = take_parked(lua, wait.caller, wait.token) {
        return Ok(NestResult::Answered(ok, value));
    }
    if let Some(ms) = wait.timeout_ms {
        let mut k = kernel(lua);
        // As the caller named it, as far as we can tell: its name, else its pid.
        let target = match k.procs.get(&serial) {
            Some(p) => match &p.name {
                Some(n) => n.to_string(),
                None => k.pid_string(p.pid),
            },
            None => format!("#{serial}"),
        };
        k.add_timer_with_id(
            wait.token,
            clock::precise_ms().saturating_add(ms),
            Timer::CallTimeout {
                serial: wait.caller,
                token: wait.token,
                target,
                ms,
            },
        );
    }
    Ok(NestResult::Wait(wait.token))
}

impl Kernel {
    fn pool_return(&mut self, thread: Thread) {
        if self.pool.len() < POOL_MAX {
            self.pool.push(thread);
        }
    }
}

fn classify_message(message: &str, timed_out: bool) -> Option<ExitReason> {
    if timed_out || message.contains("timeout: callback ran longer than handler_ms") {
        Some(ExitReason::Timeout)
    } else if message.contains("not enough memory") || message.contains("memory error") {
        Some(ExitReason::OutOfMemory)
    } else if message.contains("stack overflow") || message.contains("C stack overflow") {
        Some(ExitReason::StackOverflow)
    } else {
        None
    }
}

/// The exit reason of a callback that raised, from `failure_of`'s info: the
/// message as raised, the guest frames of the traceback, and the module and
/// line where guest code raised it.
fn classify_failure(lua: &Lua, info: &Value, timed_out: bool) -> ExitReason {
    let (message, traceback) = match info {
        Value::Table(t) => {
            let msg: Value = t.raw_get("message").unwrap_or(Value::Nil);
            let tb: String = t.raw_get("traceback").unwrap_or_default();
            let msg = match msg {
                Value::String(s) => s.to_string_lossy(),
                Value::Error(e) => e.to_string(),
                other => lua_value_text(&other),
            };
            (msg, tb)
        }
        Value::String(s) => (s.to_string_lossy(), String::new()),
        other => (lua_value_text(other), String::new()),
    };
    if let Some(reason) = classify_message(&message, timed_out) {
        return reason;
    }
    let frames = crate::diagnostic::guest_frames(&traceback);
    let (module, line) = crate::upgrade::raise_site(lua, &message, &frames);
    ExitReason::Error {
        traceback: crate::diagnostic::traceback_text(&frames),
        message,
        module,
        line,
    }
}

fn lua_value_text(v: &Value) -> String {
    match v {
        Value::UserData(_) | Value::Error(_) => v.to_string().unwrap_or_else(|_| "userdata".into()),
        other => other
            .to_string()
            .unwrap_or_else(|_| format!("a {}", other.type_name())),
    }
}

fn classify_error(lua: &Lua, e: &mlua::Error, timed_out: bool) -> ExitReason {
    if matches!(e, mlua::Error::MemoryError(_)) {
        return ExitReason::OutOfMemory;
    }
    let message = e.to_string();
    if let Some(reason) = classify_message(&message, timed_out) {
        return reason;
    }
    let (module, line) = crate::upgrade::raise_site(lua, &message, &[]);
    ExitReason::Error {
        message,
        traceback: String::new(),
        module,
        line,
    }
}

/// Acts on a job's outcome: routes replies, handles crashes and exits.
fn finish_job(lua: &Lua, serial: u64, outcome: Outcome) {
    match outcome {
        Outcome::Suspended(token, thread) => {
            let key = lua.create_registry_value(thread).expect("registry");
            let mut k = kernel(lua);
            if let Some(p) = k.procs.get_mut(&serial) {
                p.run = Run::Suspended { thread: key, token };
                // An exit that arrived while the callback ran takes effect now.
                if let Some(reason) = p.exit_pending.take().map(|b| *b) {
                    k.exit_process(serial, reason, true);
                } else if let Some((t, ok, value)) = p.parked.take().map(|b| *b) {
                    if t == token {
                        let Run::Suspended { thread, .. } =
                            std::mem::replace(&mut p.run, Run::Idle)
                        else {
                            unreachable!("set above")
                        };
                        p.run = Run::Resumable {
                            thread,
                            resume: Some((ok, value)),
                        };
                        k.wake(serial);
                    }
                }
            }
        }
        Outcome::Preempted(thread) => {
            let key = lua.create_registry_value(thread).expect("registry");
            let mut k = kernel(lua);
            if let Some(p) = k.procs.get_mut(&serial) {
                p.run = Run::Resumable {
                    thread: key,
                    resume: None,
                };
                if let Some(reason) = p.exit_pending.take().map(|b| *b) {
                    k.exit_process(serial, reason, true);
                } else {
                    k.wake(serial);
                }
            }
        }
        Outcome::Done(value) => {
            let (job, pending) = {
                let mut k = kernel(lua);
                let Some(p) = k.procs.get_mut(&serial) else {
                    return;
                };
                p.run = Run::Idle;
                let job = p.job.take();
                let pending = p.exit_pending.take().map(|b| *b);
                (job, pending)
            };
            match job {
                Some(Job::Call { waiter, .. }) => answer(lua, waiter, Ok(value)),
                Some(Job::Init { waiter, .. }) => {
                    let pid = kernel(lua).procs.get(&serial).map(|p| p.pid);
                    match (&pending, pid) {
                        (Some(reason), _) if !reason.is_normal() => {
                            let module = module_of(lua, serial);
                            answer(
                                lua,
                                waiter,
                                Err(Error::SpawnFailed {
                                    module,
                                    reason: reason.clone(),
                                }),
                            );
                        }
                        (_, Some(pid)) => answer(lua, waiter, Ok(pid.to_lua())),
                        _ => {}
                    }
                }
                Some(Job::Eval { waiter, .. }) => {
                    answer(lua, waiter, Ok(value));
                    kernel(lua).exit_process(serial, ExitReason::Normal, false);
                }
                Some(Job::Terminate(reason)) => {
                    finalize(lua, serial, reason);
                    return;
                }
                _ => {}
            }
            let mut k = kernel(lua);
            if let Some(reason) = pending {
                k.exit_process(serial, reason, true);
            } else {
                k.wake(serial);
            }
        }
        Outcome::Failed(crash) => {
            let (job, pending) = {
                let mut k = kernel(lua);
                let Some(p) = k.procs.get_mut(&serial) else {
                    return;
                };
                p.run = Run::Idle;
                (p.job.take(), p.exit_pending.take().map(|b| *b))
            };
            // graft.exit(reason) raises to unwind the guest: its reason wins.
            let reason = truncate_reason(pending.unwrap_or(crash));
            let target = {
                let k = kernel(lua);
                k.procs
                    .get(&serial)
                    .map(|p| k.pid_string(p.pid))
                    .unwrap_or_default()
            };
            match job {
                Some(Job::Init { waiter, .. }) => {
                    let module = module_of(lua, serial);
                    answer(
                        lua,
                        waiter,
                        Err(Error::SpawnFailed {
                            module,
                            reason: reason.clone(),
                        }),
                    );
                    finalize(lua, serial, reason);
                    return;
                }
                Some(Job::Terminate(original)) => {
                    finalize(lua, serial, original);
                    return;
                }
                Some(Job::Call { waiter, .. }) => {
                    // Answered once the process is gone (after `terminate`),
                    // as OTP's call monitor would: its name is free by then.
                    if let Some(p) = kernel(lua).procs.get_mut(&serial) {
                        p.crashed_callers.push(waiter);
                    }
                }
                Some(Job::Eval { waiter, .. }) => {
                    answer(lua, waiter, Err(eval_error(&reason)));
                    finalize(lua, serial, ExitReason::Normal);
                    return;
                }
                _ => {}
            }
            if !reason.is_normal() && !matches!(reason, ExitReason::Shutdown) {
                let mut k = kernel(lua);
                let module = module_name(&k, serial);
                k.event(
                    "crash",
                    serde_json::json!({ "process": target, "module": module, "reason": reason }),
                );
                tracing::warn!(sandbox = %k.id, process = %target, %reason, "process crashed");
            }
            kernel(lua).exit_process(serial, reason, true);
        }
    }
}

fn eval_error(reason: &ExitReason) -> Error {
    match reason {
        ExitReason::Error { message, .. } => Error::Luau(message.clone()),
        other => Error::Luau(format!("eval stopped: {other}")),
    }
}

fn module_name(k: &Kernel, serial: u64) -> String {
    k.procs
        .get(&serial)
        .map(|p| k.module_names[p.pid.module_index() as usize].to_string())
        .unwrap_or_default()
}

fn module_of(lua: &Lua, serial: u64) -> String {
    module_name(&kernel(lua), serial)
}

/// Processes queued exits until none is left.
pub(crate) fn drain_exits(lua: &Lua) {
    loop {
        let next = kernel(lua).exits.pop_front();
        let Some((serial, reason, run_terminate)) = next else {
            break;
        };
        begin_exit(lua, serial, reason, run_terminate);
    }
    collect_after_crashes(lua);
}

/// A crashed process's garbage (its state, and whatever the failed callback
/// allocated) is only reclaimable once it is finalized: collect then, so a
/// restarted process does not meet a heap still full of its predecessor
/// (Luau does not collect when an allocation fails). One collection covers
/// every crash drained together, and a sandbox far below its limit skips it.
fn collect_after_crashes(lua: &Lua) {
    let limit = {
        let mut k = kernel(lua);
        if !std::mem::take(&mut k.crashed_since_collect) {
            return;
        }
        k.limits.memory_bytes
    };
    if lua.used_memory() > limit / 2 {
        let _ = lua.gc_collect();
    }
}

fn begin_exit(lua: &Lua, serial: u64, reason: ExitReason, run_terminate: bool) {
    let mut k = kernel(lua);
    let on_stack = k.is_on_stack(serial);
    let Some(p) = k.procs.get_mut(&serial) else {
        return;
    };
    if on_stack {
        // Its callback is running: the exit takes effect when it returns.
        if p.exit_pending.is_none() || matches!(reason, ExitReason::Killed) {
            p.exit_pending = Some(Box::new(reason));
        }
        return;
    }
    if p.dying.is_some() {
        if matches!(reason, ExitReason::Killed) {
            // kill during terminate: stop at once
            let original = p.dying.clone().map(|b| *b).unwrap_or(ExitReason::Killed);
            let _ = original;
            drop(k);
            abandon_job(lua, serial, &ExitReason::Killed);
            finalize(lua, serial, ExitReason::Killed);
        }
        return;
    }
    drop(k);
    abandon_job(lua, serial, &reason);
    let mut k = kernel(lua);
    let p = k.procs.get_mut(&serial).expect("live");
    let has_state = p.job.is_none() && !matches!(p.system.as_deref(), Some(Job::Init { .. }));
    if run_terminate && !matches!(reason, ExitReason::Killed) && has_state {
        p.dying = Some(Box::new(reason.clone()));
        p.system = Some(Box::new(Job::Terminate(reason)));
        p.run = Run::Idle;
        k.wake(serial);
    } else {
        drop(k);
        finalize(lua, serial, reason);
    }
}

/// Drops a suspended or queued callback of a process that is exiting.
fn abandon_job(lua: &Lua, serial: u64, reason: &ExitReason) {
    let (job, system) = {
        let mut k = kernel(lua);
        let Some(p) = k.procs.get_mut(&serial) else {
            return;
        };
        if matches!(p.run, Run::Suspended { .. } | Run::Resumable { .. }) {
            p.run = Run::Idle;
        }
        let system = match p.system.take().map(|b| *b) {
            Some(Job::Init { args, waiter }) => Some(Job::Init { args, waiter }),
            other => {
                p.system = other.map(Box::new);
                None
            }
        };
        (p.job.take(), system)
    };
    let target = {
        let k = kernel(lua);
        k.procs
            .get(&serial)
            .map(|p| k.pid_string(p.pid))
            .unwrap_or_default()
    };
    for job in [job, system].into_iter().flatten() {
        match job {
            Job::Call { waiter, .. } => answer(
                lua,
                waiter,
                Err(Error::Crashed {
                    target: target.clone(),
                    reason: reason.clone(),
                }),
            ),
            Job::Init { waiter, .. } => {
                let module = module_of(lua, serial);
                answer(
                    lua,
                    waiter,
                    Err(Error::SpawnFailed {
                        module,
                        reason: reason.clone(),
                    }),
                )
            }
            Job::Eval { waiter, .. } => answer(lua, waiter, Err(eval_error(reason))),
            _ => {}
        }
    }
}

/// Removes a dead process and tells everyone who needs to know.
fn finalize(lua: &Lua, serial: u64, reason: ExitReason) {
    abandon_job(lua, serial, &reason);
    let mut k = kernel(lua);
    let Some(p) = k.procs.remove(&serial).map(|b| *b) else {
        return;
    };
    if let Some(n) = &p.name {
        k.names.remove(n);
    }
    let _ = k.states.raw_set(serial, Value::Nil);
    if !matches!(reason, ExitReason::Normal | ExitReason::Shutdown) {
        k.crashed_since_collect = true;
    }
    let target = k.pid_string(p.pid);
    let mut waiters = p.crashed_callers;
    for job in p.mailbox {
        match job {
            Job::Call { waiter, .. } => waiters.push(waiter),
            Job::Init { waiter, .. } | Job::Eval { waiter, .. } => waiters.push(waiter),
            _ => {}
        }
    }
    let reason_lua = reason.to_lua(lua).unwrap_or(Value::Nil);
    for l in p.links {
        link_signal(lua, &mut k, l, p.pid, &reason, &reason_lua, serial);
    }
    for (mref, watcher) in p.monitored_by {
        if let Ok(key) = down_message(lua, mref, p.pid, &reason_lua) {
            k.deliver_system(watcher, Job::Info(key));
        }
    }
    for (s, token) in p.shutdown_waiters {
        drop(k);
        resume_with(lua, s, token, true, Value::Boolean(true));
        k = kernel(lua);
    }
    if k.app == Some(serial) {
        k.app = None;
        k.app_status = AppStatus::Stopped {
            reason: reason.to_string(),
        };
        k.event("app_stopped", serde_json::json!({ "reason": reason }));
        if matches!(reason, ExitReason::Normal | ExitReason::Shutdown) {
            tracing::info!(sandbox = %k.id, %reason, "app stopped");
        } else {
            tracing::warn!(sandbox = %k.id, %reason, "app stopped");
        }
        for w in std::mem::take(&mut k.app_stop_waiters) {
            w.answer(Ok(Json::String(reason.to_string())));
        }
    }
    if !matches!(reason, ExitReason::Normal | ExitReason::Shutdown) {
        if let Some(c) = k.canary.as_mut() {
            c.note_exit(p.pid.module_index(), p.version, &reason);
        }
    }
    drop(k);
    for w in waiters {
        answer(
            lua,
            w,
            Err(Error::Crashed {
                target: target.clone(),
                reason: reason.clone(),
            }),
        );
    }
}

fn down_message(lua: &Lua, mref: u64, pid: Pid, reason: &Value) -> mlua::Result<RegistryKey> {
    let t = lua.create_table()?;
    t.raw_set("tag", "DOWN")?;
    t.raw_set("ref", mref as f64)?;
    t.raw_set("pid", pid.to_lua())?;
    t.raw_set("reason", reason.clone())?;
    lua.create_registry_value(t)
}

fn exit_message(lua: &Lua, from: Pid, reason: &Value) -> mlua::Result<RegistryKey> {
    let t = lua.create_table()?;
    t.raw_set("tag", "EXIT")?;
    t.raw_set("from", from.to_lua())?;
    t.raw_set("reason", reason.clone())?;
    lua.create_registry_value(t)
}

/// Delivers a dying process's exit to a linked process (OTP link semantics).
fn link_signal(
    lua: &Lua,
    k: &mut Kernel,
    to: u64,
    from: Pid,
    reason: &ExitReason,
    reason_lua: &Value,
    from_serial: u64,
) {
    let Some(t) = k.procs.get_mut(&to) else {
        return;
    };
    t.links.retain(|s| *s != from_serial);
    if t.trap_exit {
        if let Ok(key) = exit_message(lua, from, reason_lua) {
            k.deliver_system(to, Job::Info(key));
        }
    } else if !reason.is_normal() {
        k.exit_process(to, reason.clone(), true);
    }
}

/// `graft.exit(pid, reason)`: an exit signal from `from` (OTP `exit/2`).
pub(crate) fn send_exit_signal(lua: &Lua, k: &mut Kernel, to: u64, from: Pid, reason: Json) {
    let is_kill = reason.as_str() == Some("kill");
    let reason = if is_kill {
        ExitReason::Killed
    } else {
        ExitReason::from_json(reason)
    };
    let Some(t) = k.procs.get(&to) else { return };
    if is_kill {
        k.exit_process(to, ExitReason::Killed, false);
    } else if t.trap_exit {
        let reason_lua = reason.to_lua(lua).unwrap_or(Value::Nil);
        if let Ok(key) = exit_message(lua, from, &reason_lua) {
            k.deliver_system(to, Job::Info(key));
        }
    } else if !reason.is_normal() || to == from.serial() {
        k.exit_process(to, reason, true);
    }
}

/// The default call timeout (ms), shared by host and guest calls.
pub(crate) fn natives_default_timeout() -> u64 {
    natives::DEFAULT_CALL_TIMEOUT_MS
}
