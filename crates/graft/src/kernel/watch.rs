//! Two watches over guest code: the CPU watch the VM interrupt enforces
//! (`handler_ms` per callback, the end of a time slice), and the canary watch
//! that counts crashes of freshly upgraded processes.
//!
//! Both live in the kernel because the kernel sees what they watch (every
//! safepoint, every exit). The upgrade engine arms them; it imports this
//! module, never the other way round.
//!
//! Invariants:
//! * The interrupt never panics and never unwinds Rust frames: it reads
//!   atomics through a pointer a live [`WatchScope`] keeps valid, and raises
//!   (`lua_error`) only after every Rust value it made is dropped.
//! * Once a callback is past its deadline the interrupt raises at every
//!   safepoint, so a guest `pcall` cannot swallow the timeout.
//! * A canary counts only abnormal exits of processes that run an upgraded
//!   version; the node runtime performs the rollback, after the slice.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use mlua::Lua;

use super::{kernel, Kernel, MODULE_BODY_MS};
use crate::clock;
use crate::value::ExitReason;

/// How often (coarse ms) a callback that keeps running offers its core to
/// the OS's other runnable threads (`sched_yield`). A scheduler thread that
/// runs Luau for a whole slice otherwise holds its core for as long as the
/// OS's own time slice (milliseconds), while the thread that would parse
/// the next HTTP request, or write an answer, waits for it: a sandbox
/// that loops must not add the OS's slice to everyone else's latency.
/// Costs one syscall per millisecond of guest CPU time.
const OS_YIELD_MS: u64 = 1;

/// Shared with the VM interrupt: everything it needs, as atomics.
pub(crate) struct Watch {
    /// Coarse ms after which the interrupt looks closer (min of the two below).
    pub(super) check_at: AtomicU64,
    /// Coarse ms at which the running callback exceeds `handler_ms`.
    pub(super) deadline: AtomicU64,
    /// Coarse ms at which the current time slice ends.
    pub(super) slice_end: AtomicU64,
    /// Set once the running callback is past its deadline: the interrupt keeps
    /// raising, so a guest `pcall` cannot swallow the timeout.
    pub(super) timed_out: AtomicBool,
    /// The Luau thread of the innermost running callback (as a pointer).
    pub(super) thread: AtomicUsize,
    /// Whether to yield at the end of the slice (off during reload steps).
    pub(super) preemptible: AtomicBool,
    /// The caller's worker while the prelude runs a nested job itself: that
    /// thread only runs prelude code until it closes the nested frame, so the
    /// interrupt leaves it alone (a callee's timeout is the callee's).
    pub(super) exempt: AtomicUsize,
    /// Set when the interrupt found the slice over but the running code in
    /// a context Luau cannot yield from (a `table.sort` comparator, a
    /// `gsub` callback, a `coroutine.wrap` body): the slice will not end
    /// before that code returns, so the scheduler need not wait to see it
    /// overrun before it serves others with another thread. Cleared when a
    /// slice starts.
    pub(super) cannot_yield: AtomicBool,
    /// Coarse ms at which the running code next offers its core to the OS
    /// (see [`OS_YIELD_MS`]).
    pub(super) os_yield_at: AtomicU64,
    pub(super) handler_ms: u64,
}

/// What a callback had armed, restored when a nested one ends.
#[derive(Clone, Copy)]
pub(crate) struct WatchSave {
    pub(super) deadline: u64,
    pub(super) thread: usize,
    pub(super) preemptible: bool,
    pub(super) exempt: usize,
    pub(super) saved_at: u64,
}

impl Watch {
    pub(super) fn new(handler_ms: u64) -> Watch {
        Watch {
            check_at: AtomicU64::new(u64::MAX),
            deadline: AtomicU64::new(u64::MAX),
            slice_end: AtomicU64::new(u64::MAX),
            timed_out: AtomicBool::new(false),
            thread: AtomicUsize::new(0),
            preemptible: AtomicBool::new(false),
            exempt: AtomicUsize::new(0),
            cannot_yield: AtomicBool::new(false),
            os_yield_at: AtomicU64::new(u64::MAX),
            handler_ms,
        }
    }
    pub(super) fn arm(&self, deadline: u64, thread: usize, preemptible: bool) {
        self.deadline.store(deadline, Ordering::Relaxed);
        self.thread.store(thread, Ordering::Relaxed);
        self.timed_out.store(false, Ordering::Relaxed);
        self.preemptible.store(preemptible, Ordering::Relaxed);
        let slice = if preemptible {
            self.slice_end.load(Ordering::Relaxed)
        } else {
            u64::MAX
        };
        let os_yield = clock::coarse_ms().saturating_add(OS_YIELD_MS);
        self.os_yield_at.store(os_yield, Ordering::Relaxed);
        self.check_at
            .store(deadline.min(slice).min(os_yield), Ordering::Relaxed);
    }
    /// What the enclosing callback had armed, to restore after a nested one.
    pub(super) fn save(&self) -> WatchSave {
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
    pub(super) fn restore(&self, saved: WatchSave) {
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
    /// Starts a time slice at coarse ms `now`: it ends at `now +
    /// SLICE_MS`, unless the scheduler already asked for it to end early
    /// (`slice_end` 0, see [`Watch::end_slice_at`]), a request it keeps.
    pub(super) fn begin_slice(&self, now: u64) {
        let _ = self.slice_end.compare_exchange(
            u64::MAX,
            now + super::SLICE_MS,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.cannot_yield.store(false, Ordering::Relaxed);
    }
    /// Ends a time slice: the watchdog must not judge what runs next in this
    /// sandbox (reloads, the canary check) by this slice's flags.
    pub(super) fn end_slice(&self) {
        self.slice_end.store(u64::MAX, Ordering::Relaxed);
        self.cannot_yield.store(false, Ordering::Relaxed);
    }
    pub(super) fn disarm(&self) {
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
    /// Ends the running time slice at the first safepoint at or after coarse
    /// ms `at` (0: the next one), unless it ends sooner anyway. The scheduler
    /// calls this when fresh work waits and no thread is free. `fetch_min`:
    /// a later request never extends an earlier one. Harmless between
    /// slices: the next slice then ends after its first callback.
    pub(crate) fn end_slice_at(&self, at: u64) {
        self.slice_end.fetch_min(at, Ordering::Relaxed);
        self.check_at.fetch_min(at, Ordering::Relaxed);
    }
    /// Whether the running slice is past its end in code that cannot yield
    /// (see [`Watch::cannot_yield`]): it holds its thread until that code
    /// returns or reaches `handler_ms`.
    pub(crate) fn cannot_yield(&self) -> bool {
        self.cannot_yield.load(Ordering::Relaxed)
    }
    /// Ends a stretch armed by [`Watch::arm_for_host_code`] or
    /// [`Watch::arm_for_module_body`]; returns whether it ran out of time.
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
    /// Enters `lua`'s watch on this thread (the sandbox is about to run here).
    pub fn enter(lua: &Lua) -> WatchScope {
        WatchScope::enter_watch(kernel(lua).watch.clone())
    }

    /// Enters `watch` on this thread (for a caller holding the kernel).
    pub fn enter_watch(watch: Arc<Watch>) -> WatchScope {
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

/// What the interrupt does at a safepoint.
enum Act {
    Continue,
    /// Offer the core to the OS's other runnable threads, then continue.
    OsYield,
    Timeout(u64),
    /// Yield to the scheduler (the slice is over) where Luau can; where it
    /// cannot, offer the core to the OS if the flag says so.
    Yield(bool),
}

/// Decides what the interrupt does on thread `state` at `now`. Plain atomics:
/// nothing here can panic, so the interrupt needs no unwind barrier.
fn decide(watch: &Watch, state: usize, now: u64) -> Act {
    if now < watch.check_at.load(Ordering::Relaxed) || state == watch.exempt.load(Ordering::Relaxed)
    {
        return Act::Continue;
    }
    let deadline = watch.deadline.load(Ordering::Relaxed);
    if now >= deadline || watch.timed_out.load(Ordering::Relaxed) {
        watch.timed_out.store(true, Ordering::Relaxed);
        return Act::Timeout(watch.handler_ms);
    }
    let os_yield = now >= watch.os_yield_at.load(Ordering::Relaxed);
    if os_yield {
        watch
            .os_yield_at
            .store(now.saturating_add(OS_YIELD_MS), Ordering::Relaxed);
    }
    if watch.preemptible.load(Ordering::Relaxed) && now >= watch.slice_end.load(Ordering::Relaxed) {
        // `check_at` stays due: code that cannot yield here (see below and
        // the interrupt) yields at the first safepoint where it can, not
        // only at its deadline.
        if state == watch.thread.load(Ordering::Relaxed) {
            return Act::Yield(os_yield);
        }
        // A coroutine inside the callback: only the callback's own thread
        // may yield to the scheduler.
        watch.cannot_yield.store(true, Ordering::Relaxed);
    } else {
        let mut next = deadline.min(watch.os_yield_at.load(Ordering::Relaxed));
        if watch.preemptible.load(Ordering::Relaxed) {
            next = next.min(watch.slice_end.load(Ordering::Relaxed));
        }
        watch.check_at.store(next, Ordering::Relaxed);
    }
    if os_yield {
        Act::OsYield
    } else {
        Act::Continue
    }
}

/// The VM interrupt (every Luau call, return and loop back-edge).
///
/// # Safety
///
/// Called by Luau only, with `state` a live thread of a VM whose interrupt
/// was set by [`install_interrupt`], on the thread running that VM.
unsafe extern "C-unwind" fn interrupt(state: *mut mlua::ffi::lua_State, gc: std::ffi::c_int) {
    if gc >= 0 {
        return; // GC safepoints: nothing to enforce
    }
    // `try_with`: during thread teardown there is no watch to enforce.
    let watch = WATCH.try_with(|w| w.get()).unwrap_or(std::ptr::null());
    if watch.is_null() {
        return;
    }
    // SAFETY: a non-null pointer was set by a `WatchScope` still alive on
    // this thread (its drop resets it), and that scope owns an `Arc` of it.
    let watch = unsafe { &*watch };
    match decide(watch, state as usize, clock::coarse_ms()) {
        Act::Continue => {}
        // `sched_yield`: returns at once when nothing else waits for the
        // core; cannot fail or unwind.
        Act::OsYield => std::thread::yield_now(),
        // Raised again at every safepoint once past the deadline, so a
        // guest `pcall` cannot swallow it.
        Act::Timeout(ms) => {
            let msg = format!("timeout: callback ran longer than handler_ms ({ms} ms)");
            // SAFETY: `state` is live (see the contract); the string is
            // copied by Luau before `msg` is dropped, and `lua_error` runs
            // when no Rust value with a destructor is left in this frame.
            unsafe {
                mlua::ffi::lua_pushlstring(state, msg.as_ptr().cast(), msg.len());
                drop(msg);
                mlua::ffi::lua_error(state);
            }
        }
        Act::Yield(os_yield) => {
            // SAFETY: `state` is live; yielding from an interrupt is allowed
            // where Luau reports the thread yieldable.
            unsafe {
                if mlua::ffi::lua_isyieldable(state) != 0 {
                    // It could yield after all: not stuck (any earlier
                    // coroutine or comparator has returned).
                    watch.cannot_yield.store(false, Ordering::Relaxed);
                    mlua::ffi::lua_yield(state, 0);
                } else {
                    watch.cannot_yield.store(true, Ordering::Relaxed);
                    if os_yield {
                        std::thread::yield_now();
                    }
                }
            }
        }
    }
}

/// Sets the VM interrupt that enforces the CPU watch.
pub(super) fn install_interrupt(lua: &Lua) {
    // SAFETY: `exec_raw` hands us the VM's main state, live for the call;
    // lua_callbacks is shared by every thread of this VM, and setting the
    // interrupt pointer is what mlua's own `set_interrupt` does. `interrupt`
    // upholds its contract: it is only ever called by this VM's Luau.
    unsafe {
        let _ = lua.exec_raw::<()>((), |state| {
            (*mlua::ffi::lua_callbacks(state)).interrupt = Some(interrupt);
        });
    }
}

/// What a canary watches and what it would roll back to.
#[derive(Clone, Debug)]
pub(crate) struct CanaryWatch {
    /// (module index, upgraded version, version to roll back to, module name)
    pub modules: Vec<(u32, u32, u32, String)>,
    pub crashes_allowed: u32,
    pub crashes: u32,
    pub last_reason: Option<String>,
    pub timer: u64,
}

impl CanaryWatch {
    /// Counts an abnormal exit of a process running an upgraded version.
    pub fn note_exit(&mut self, module: u32, version: u32, reason: &ExitReason) {
        if self
            .modules
            .iter()
            .any(|(m, v, _, _)| *m == module && *v == version)
        {
            self.crashes += 1;
            self.last_reason = Some(reason.to_string());
        }
    }
    /// Whether enough crashes happened to roll back.
    pub fn tripped(&self) -> bool {
        self.crashes >= self.crashes_allowed.max(1)
    }
}

impl Kernel {
    /// The canary window closed without enough crashes: the upgrade stands.
    pub(super) fn canary_expired(&mut self) {
        if let Some(c) = self.canary.take() {
            let modules: Vec<&String> = c.modules.iter().map(|m| &m.3).collect();
            let detail = serde_json::json!({ "modules": modules, "crashes": c.crashes });
            // The verdict and the versions becoming permanent are one write.
            let ops = match self.events.store() {
                Some(_) => c
                    .modules
                    .iter()
                    .map(|(_, to, _, name)| crate::store::WriteOp::SetVersionStatus {
                        sandbox: self.id.to_string(),
                        module: name.clone(),
                        version: *to,
                        status: crate::store::VersionStatus::Permanent,
                    })
                    .collect(),
                None => Vec::new(),
            };
            if let Err(e) = self.events.commit(&self.id, ops, "canary_passed", detail) {
                tracing::error!(sandbox = %self.id, error = %e, "the canary verdict could not be stored: a restart will roll the upgrade back");
                self.event(
                    "canary_passed_not_stored",
                    serde_json::json!({ "modules": modules, "error": e.to_string() }),
                );
            }
        }
    }
}
