//! The node's scheduler: a pool of OS threads that run sandboxes' time slices,
//! the timer thread that wakes sandboxes, and the watchdog that keeps the
//! pool serving when a sandbox holds a thread too long.
//!
//! Invariants:
//! * A sandbox is on the run queue at most once (`Shared::scheduled`) and is
//!   run by one thread at a time (its runtime mutex), so its VM is never
//!   touched concurrently. Different sandboxes run in parallel.
//! * At least `threads` scheduler threads are *serving*: not inside a slice
//!   that overran. A callback in a context Luau cannot yield from (a
//!   `table.sort` comparator, a `gsub` callback, `coroutine.wrap`) keeps its
//!   slice running until it returns or hits `handler_ms`. The watchdog marks
//!   such a thread stuck (at its first look after the interrupt found the
//!   slice over and the code unable to yield, or after `STUCK_AFTER_MS`)
//!   and starts a replacement; the stuck thread retires
//!   when its slice ends if enough threads serve by then. A stuck sandbox so
//!   holds one OS thread, for at most its `handler_ms`, never the queue.
//! * Threads beyond `threads` are capped ([`MAX_EXTRA_THREADS`]): past the
//!   cap, stuck sandboxes share the pool like any others.
//! * A stuck thread that spins (it uses the CPU, see `probe_stuck`) runs at
//!   a lower OS priority ([`STUCK_NICE`], Linux) for the rest of its life,
//!   and retires when its slice ends (a fresh thread replaces it if needed):
//!   runaway code shares the cores with the serving threads, so it must not
//!   take them from the requests they serve. An unprivileged thread cannot
//!   raise its priority back, hence retirement.
//! * Work that arrives from outside (host commands, timers, messages) is
//!   *fresh* and served before sandboxes that used their whole slice
//!   (*busy*); a busy sandbox that has waited [`BUSY_MAX_WAIT_MS`] is served
//!   first, so busy sandboxes are never starved by a stream of fresh work.
//!   The guarantee is by time, not by turns: fresh work arrives at the rate
//!   of requests, and a turn-based share let every fourth request's thread
//!   go to a spinner, protected for a while, exactly when fresh work waited.
//! * Every entry into a sandbox's runtime runs behind a panic barrier: a
//!   panic fails that sandbox (see `Shared::fail`), never the thread's loop.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::clock;
use crate::kernel;

use super::{Command, NodeInner, Shared};

/// How long an idle scheduler thread polls before sleeping.
pub(super) const SPIN_MICROS: u64 = 50;
/// A slice still running this long after it started is stuck in code the
/// interrupt cannot yield (a yieldable slice ends at `SLICE_MS`).
pub(super) const STUCK_AFTER_MS: u64 = kernel::SLICE_MS + 3;
/// How often the watchdog looks at the running slices.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(2);
/// The nice value a stuck thread gets (weight 15 against 1024 at nice 0):
/// it still reaches its `handler_ms` timeout, in wall-clock time, while the
/// serving threads get the cores when they have work.
const STUCK_NICE: i32 = 19;
/// Scheduler threads the watchdog may add beyond the configured ones.
pub(super) const MAX_EXTRA_THREADS: usize = 64;
/// A busy sandbox queued this long (coarse ms) is served before fresh work.
const BUSY_MAX_WAIT_MS: u64 = 4 * kernel::SLICE_MS;
/// A slice that has run this long (coarse ms) is ended early when fresh work
/// waits and no thread is free: fresh work then waits about this long for a
/// thread instead of a whole [`kernel::SLICE_MS`].
const MIN_SLICE_MS: u64 = 1;

/// The run queue: fresh work first, then sandboxes that used their slice.
#[derive(Default)]
pub(super) struct RunQueue {
    fresh: VecDeque<Arc<Shared>>,
    /// With the coarse ms at which each was queued, oldest first.
    busy: VecDeque<(Arc<Shared>, u64)>,
    /// Scheduler threads waiting in `next_sandbox` for work.
    idle: usize,
}

impl RunQueue {
    /// The next sandbox to run at coarse ms `now`, and whether fresh work
    /// may end its slice at once: true for a busy sandbox taken because no
    /// fresh work waited; a busy one served because it waited
    /// [`BUSY_MAX_WAIT_MS`] keeps at least `MIN_SLICE_MS`, so a stream of
    /// fresh work cannot starve it.
    fn pop(&mut self, now: u64) -> Option<(Arc<Shared>, bool)> {
        let starving = self
            .busy
            .front()
            .is_some_and(|(_, queued)| now.saturating_sub(*queued) >= BUSY_MAX_WAIT_MS);
        if starving {
            return self.busy.pop_front().map(|(s, _)| (s, false));
        }
        match self.fresh.pop_front() {
            Some(s) => Some((s, false)),
            None => self.busy.pop_front().map(|(s, _)| (s, true)),
        }
    }
    pub(super) fn is_empty(&self) -> bool {
        self.fresh.is_empty() && self.busy.is_empty()
    }
}

/// One scheduler thread, as the watchdog sees it.
pub(super) struct Worker {
    /// `coarse_ms + 1` when the running slice started; 0 between slices.
    slice_started: AtomicU64,
    /// Set by the watchdog when the slice overran; the thread no longer
    /// counts as serving.
    stuck: AtomicBool,
    /// The running slice is a busy sandbox's (it used whole slices before):
    /// waiting fresh work ends it at once rather than after `MIN_SLICE_MS`.
    running_busy: AtomicBool,
    /// The interrupt watch of the sandbox this thread runs, so that waiting
    /// fresh work can end the slice early (`preempt_for_fresh_work`).
    running: parking_lot::Mutex<Option<Arc<kernel::Watch>>>,
    /// The OS thread id (Linux; 0 until the thread has started).
    tid: std::sync::atomic::AtomicI32,
    /// Its OS priority was lowered when it got stuck: it retires after the
    /// slice instead of serving on at that priority.
    lowered: AtomicBool,
    /// While stuck and not lowered: coarse ms and the thread's CPU time (ns)
    /// at the watchdog's last look, to tell a spinning slice from one the OS
    /// merely did not run (an overloaded machine stretches every slice).
    stuck_probe: parking_lot::Mutex<Option<(u64, u64)>>,
}

/// The scheduler threads alive and how many of them serve.
#[derive(Default)]
pub(super) struct Pool {
    workers: Vec<Arc<Worker>>,
    serving: usize,
}

/// Queues a sandbox for a slice (no-op if it is queued or running already).
/// `busy`: it used its whole slice and goes behind fresh work.
pub(super) fn schedule(node: &NodeInner, shared: &Arc<Shared>, busy: bool) {
    if !shared.scheduled.swap(true, Ordering::AcqRel) {
        let mut q = node.queue.lock();
        if busy {
            q.busy.push_back((shared.clone(), clock::coarse_ms()));
        } else {
            q.fresh.push_back(shared.clone());
        }
        let unserved = !busy && q.fresh.len() > q.idle;
        drop(q);
        node.queue_cv.notify_one();
        if unserved {
            preempt_for_fresh_work(node);
        }
    }
}

/// Fresh work waits and every thread runs a slice: ends one slice at its
/// next safepoint, so a host command or a timer waits about a millisecond,
/// not a whole slice, behind sandboxes that loop. A busy sandbox's slice (it
/// used whole slices before) ends at once; when every slice is still within
/// its [`MIN_SLICE_MS`], the one whose minimum ends first is told to end
/// then, rather than waiting for the watchdog's next look. A slice in code
/// Luau cannot yield from ignores the request; the watchdog covers those.
fn preempt_for_fresh_work(node: &NodeInner) {
    let pool = node.pool.lock();
    let chosen = pool
        .workers
        .iter()
        .filter(|w| !w.stuck.load(Ordering::Relaxed))
        .filter_map(|w| {
            // `slice_started` is the coarse ms the slice began, plus one.
            let started = w.slice_started.load(Ordering::Relaxed).checked_sub(1)?;
            let end_at = if w.running_busy.load(Ordering::Relaxed) {
                0
            } else {
                started + MIN_SLICE_MS
            };
            Some((end_at, w))
        })
        .min_by_key(|(end_at, _)| *end_at);
    if let Some((end_at, worker)) = chosen {
        if let Some(watch) = worker.running.lock().as_ref() {
            watch.end_slice_at(end_at);
        }
    }
}

/// Starts the configured scheduler threads, the timer thread and the watchdog.
pub(super) fn start(inner: &Arc<NodeInner>) {
    {
        let mut pool = inner.pool.lock();
        for _ in 0..inner.threads {
            spawn_worker(inner, &mut pool);
        }
    }
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("graft-timers".into())
        .spawn(move || timer_loop(weak))
        .expect("cannot start the timer thread");
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("graft-watchdog".into())
        .spawn(move || watchdog_loop(weak))
        .expect("cannot start the watchdog thread");
}

/// Adds a serving scheduler thread to the pool (the caller holds its lock).
/// Returns false if the OS refused a thread (the pool then stays as it is).
fn spawn_worker(inner: &Arc<NodeInner>, pool: &mut Pool) -> bool {
    let worker = Arc::new(Worker {
        slice_started: AtomicU64::new(0),
        stuck: AtomicBool::new(false),
        running: parking_lot::Mutex::new(None),
        running_busy: AtomicBool::new(false),
        tid: std::sync::atomic::AtomicI32::new(0),
        lowered: AtomicBool::new(false),
        stuck_probe: parking_lot::Mutex::new(None),
    });
    let weak = Arc::downgrade(inner);
    let me = worker.clone();
    let n = pool.workers.len();
    let started = std::thread::Builder::new()
        .name(format!("graft-sched-{n}"))
        .spawn(move || scheduler_loop(weak, me));
    if started.is_err() {
        tracing::error!("cannot start a scheduler thread; the pool stays at {n}");
        return false;
    }
    pool.workers.push(worker);
    pool.serving += 1;
    true
}

fn scheduler_loop(node: Weak<NodeInner>, me: Arc<Worker>) {
    me.tid.store(os_thread_id(), Ordering::Relaxed);
    loop {
        let Some(inner) = node.upgrade() else { return };
        let Some((shared, busy)) = next_sandbox(&inner) else {
            return;
        };
        me.running_busy.store(busy, Ordering::Relaxed);
        me.slice_started
            .store(clock::coarse_ms() + 1, Ordering::Relaxed);
        run_sandbox(&inner, &shared, Some(&me));
        *me.running.lock() = None;
        me.slice_started.store(0, Ordering::Relaxed);
        if me.stuck.load(Ordering::Relaxed) && retire_if_spare(&inner, &me) {
            return;
        }
    }
}

/// Called by a thread whose slice overran, once it ends: it serves again,
/// unless the watchdog's replacement made it one too many or its priority
/// was lowered (a fresh thread then takes its place if one is missing).
fn retire_if_spare(inner: &Arc<NodeInner>, me: &Arc<Worker>) -> bool {
    let mut pool = inner.pool.lock();
    me.stuck.store(false, Ordering::Relaxed);
    *me.stuck_probe.lock() = None;
    if pool.serving >= inner.threads || me.lowered.load(Ordering::Relaxed) {
        pool.workers.retain(|w| !Arc::ptr_eq(w, me));
        if pool.serving < inner.threads && !inner.stopping.load(Ordering::Relaxed) {
            spawn_worker(inner, &mut pool);
        }
        return true;
    }
    pool.serving += 1;
    false
}

/// This thread's OS id, for [`lower_priority`] (0 where there is none).
fn os_thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions and cannot fail.
        unsafe { libc::gettid() }
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// How long the watchdog watches a stuck thread before judging it.
const PROBE_MS: u64 = 4;

/// Decides, at the watchdog's look at coarse ms `now`, whether a stuck
/// thread spins: it used at least half of the time since the last look on a
/// CPU. Only a spinning thread gets a lower priority; one that waits (a
/// blocking host function) or that the OS did not run (an overloaded
/// machine) keeps its own, since lowering it would only stretch its slice
/// into a spurious `handler_ms` timeout.
fn probe_stuck(worker: &Worker, now: u64) {
    if worker.lowered.load(Ordering::Relaxed) {
        return;
    }
    let Some(cpu) = thread_cpu_ns(worker.tid.load(Ordering::Relaxed)) else {
        return;
    };
    let mut probe = worker.stuck_probe.lock();
    match *probe {
        Some((at, before)) if now >= at + PROBE_MS => {
            let wall_ns = (now - at).saturating_mul(1_000_000);
            if cpu.saturating_sub(before) >= wall_ns / 2 && lower_priority(worker) {
                worker.lowered.store(true, Ordering::Relaxed);
                *probe = None;
            } else {
                *probe = Some((now, cpu));
            }
        }
        Some(_) => {}
        None => *probe = Some((now, cpu)),
    }
}

/// CPU time a thread of this process has used, in ns (Linux: the first
/// field of its `schedstat`); `None` elsewhere or once it has exited.
fn thread_cpu_ns(tid: i32) -> Option<u64> {
    if tid <= 0 || !cfg!(target_os = "linux") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Lowers a stuck scheduler thread's OS priority to [`STUCK_NICE`]. Returns
/// whether it was lowered (not on other systems, or if the OS refused).
fn lower_priority(worker: &Worker) -> bool {
    #[cfg(target_os = "linux")]
    {
        let tid = worker.tid.load(Ordering::Relaxed);
        if tid <= 0 {
            return false;
        }
        // SAFETY: plain syscall on a thread id of this process (Linux
        // applies PRIO_PROCESS to the one thread); raising a nice value
        // needs no privilege, and a thread that already exited only makes
        // it fail with ESRCH.
        let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, STUCK_NICE) };
        done == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = worker;
        false
    }
}

/// Waits for the next sandbox to run; `None` when the node stops.
fn next_sandbox(inner: &NodeInner) -> Option<(Arc<Shared>, bool)> {
    let mut q = inner.queue.lock();
    if inner.stopping.load(Ordering::Relaxed) {
        return None;
    }
    if let Some(s) = q.pop(clock::coarse_ms()) {
        return Some(s);
    }
    q.idle += 1;
    let next = loop {
        if inner.stopping.load(Ordering::Relaxed) {
            break None;
        }
        if let Some(s) = q.pop(clock::coarse_ms()) {
            break Some(s);
        }
        // Spin briefly before sleeping: a request that arrives within
        // microseconds is then served without a futex wake-up.
        drop(q);
        let spin_until = std::time::Instant::now() + Duration::from_micros(SPIN_MICROS);
        while std::time::Instant::now() < spin_until {
            std::thread::yield_now();
            if !inner.queue.lock().is_empty() {
                break;
            }
        }
        q = inner.queue.lock();
        if !q.is_empty() {
            continue;
        }
        inner.queue_cv.wait_for(&mut q, Duration::from_millis(200));
    };
    q.idle -= 1;
    next
}

thread_local! {
    /// Set while this thread runs a sandbox's slice (scheduler thread or an
    /// inline caller), so that a host function called from that slice never
    /// runs another slice on top of Luau's C stack.
    static IN_SLICE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears [`IN_SLICE`] when the slice ends, unwinding included.
struct InSlice;

impl InSlice {
    fn enter() -> InSlice {
        IN_SLICE.with(|f| f.set(true));
        InSlice
    }
}

impl Drop for InSlice {
    fn drop(&mut self) {
        IN_SLICE.with(|f| f.set(false));
    }
}

/// Runs a slice of an idle sandbox on the calling thread (for
/// `Sandbox::call_blocking`): the caller's command, already in the inbox,
/// runs without waking a scheduler thread. Returns false, having done
/// nothing, when the sandbox is queued or running already (its owner then
/// runs the command; a `submit` that saw the flag set relies on that) or
/// when this thread is already inside a slice.
///
/// The slice is the one a scheduler thread would run: same panic barrier,
/// same epilogue (wake-ups registered, re-queued if work remains). Only the
/// watchdog and fresh-work preemption do not see it: it holds the caller's
/// own thread, which waits for the answer anyway, and the interrupt still
/// ends it at `SLICE_MS` or `handler_ms`.
pub(super) fn run_inline(node: &NodeInner, shared: &Arc<Shared>) -> bool {
    if IN_SLICE.with(|f| f.get()) || shared.scheduled.swap(true, Ordering::AcqRel) {
        return false;
    }
    run_sandbox(node, shared, None);
    true
}

/// Runs one slice of a sandbox behind the panic barrier. `me`: the scheduler
/// thread running it, `None` for an inline caller.
fn run_sandbox(node: &NodeInner, shared: &Arc<Shared>, me: Option<&Worker>) {
    let _in_slice = InSlice::enter();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_sandbox_slice(node, shared, me)
    }));
    if let Err(payload) = ran {
        // A bug in Graft or in a host function, not in guest code: fail this
        // sandbox, keep the node.
        shared.fail(super::panic_message(&*payload));
        release(node, shared);
    }
}

/// Ends a sandbox's turn: clears `scheduled`, then queues it again if
/// commands arrived meanwhile (a `submit` that saw the flag set did not
/// queue it, so this is the only place that can).
fn release(node: &NodeInner, shared: &Arc<Shared>) {
    shared.scheduled.store(false, Ordering::Release);
    if !shared.inbox.lock().is_empty() {
        schedule(node, shared, false);
    }
}

fn run_sandbox_slice(node: &NodeInner, shared: &Arc<Shared>, me: Option<&Worker>) {
    let (more, next_timer) = {
        let mut guard = shared.runtime.lock();
        if shared.destroyed.load(Ordering::Acquire) {
            // `Node::destroy` found this slice running: the VM goes now.
            let rt = guard.take();
            drop(guard);
            drop(rt);
            shared.drop_inbox();
            release(node, shared);
            return;
        }
        let Some(rt) = guard.as_mut() else {
            // Failed or destroyed: whoever still waits learns it now.
            drop(guard);
            shared.drop_inbox();
            release(node, shared);
            return;
        };
        let commands: Vec<Command> = shared.inbox.lock().drain(..).collect();
        kernel::kernel_memory(&rt.vm.lua, &rt.spec.limits);
        let _scope = kernel::WatchScope::enter(&rt.vm.lua);
        let mut commands = commands.into_iter();
        for cmd in commands.by_ref() {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd(rt)));
            if let Err(payload) = ran {
                // Mark the sandbox failed before the commands behind this one
                // are dropped, so their waiters learn why.
                drop(_scope);
                drop(guard);
                shared.fail(super::panic_message(&*payload));
                drop(commands);
                release(node, shared);
                return;
            }
        }
        // A restart command may have replaced the VM: enforce the current one's limits.
        let _scope = kernel::WatchScope::enter(&rt.vm.lua);
        if let Some(me) = me {
            *me.running.lock() = Some(kernel::kernel(&rt.vm.lua).watch.clone());
        }
        rt.run_pending_reloads();
        let more = kernel::run_slice(&rt.vm.lua);
        rt.poll_app_start();
        rt.check_canary();
        rt.run_pending_reloads();
        let mut k = kernel::kernel(&rt.vm.lua);
        if let Some(message) = k.internal_error.take() {
            // Caught on Luau's C stack: raised here, where the barrier in
            // `run_sandbox` fails the sandbox.
            drop(k);
            std::panic::resume_unwind(Box::new(message));
        }
        // A test clock's timers fire only when it is advanced
        // (`Sandbox::advance_clock` schedules the sandbox itself).
        let next_timer = match k.test_clock {
            None => k.next_timer_at(),
            Some(_) => None,
        };
        let blocking = std::mem::take(&mut k.blocking_out);
        if !blocking.is_empty() {
            node.host_pool
                .submit(shared, blocking, node.limits.max_value_bytes);
        }
        (more, next_timer)
    };
    shared.scheduled.store(false, Ordering::Release);
    // After clearing `scheduled`: a wake-up firing in between must not be
    // swallowed by a flag that is about to be cleared.
    if let Some(at) = next_timer {
        add_wakeup(node, shared, at);
    }
    if !shared.inbox.lock().is_empty() {
        schedule(node, shared, false);
    } else if more {
        schedule(node, shared, true);
    }
}

/// Marks threads whose slice overran as stuck and keeps `threads` of them serving.
fn watchdog_loop(node: Weak<NodeInner>) {
    loop {
        std::thread::sleep(WATCHDOG_PERIOD);
        let Some(inner) = node.upgrade() else { return };
        if inner.stopping.load(Ordering::Relaxed) {
            return;
        }
        let now = clock::coarse_ms();
        let mut pool = inner.pool.lock();
        let mut newly_stuck = 0;
        for w in &pool.workers {
            let started = w.slice_started.load(Ordering::Relaxed);
            // A slice the interrupt found past its end in code that cannot
            // yield is stuck now: waiting for `STUCK_AFTER_MS` would only
            // keep fresh work queued behind it.
            let overran = started != 0
                && (now + 1 >= started + STUCK_AFTER_MS
                    || w.running
                        .lock()
                        .as_ref()
                        .is_some_and(|watch| watch.cannot_yield()));
            if overran && !w.stuck.swap(true, Ordering::Relaxed) {
                newly_stuck += 1;
            }
            if started != 0 && w.stuck.load(Ordering::Relaxed) {
                probe_stuck(w, now);
            }
        }
        pool.serving -= newly_stuck;
        while pool.serving < inner.threads
            && pool.workers.len() < inner.threads + MAX_EXTRA_THREADS
            && spawn_worker(&inner, &mut pool)
        {}
        drop(pool);
        // Fresh work queued while every slice was younger than
        // `MIN_SLICE_MS` found nothing to end; look again now.
        let unserved = {
            let q = inner.queue.lock();
            q.fresh.len() > q.idle
        };
        if unserved {
            preempt_for_fresh_work(&inner);
        }
    }
}

/// Asks the timer thread to schedule `shared` at `at` (precise ms).
/// At most one entry per sandbox and due time: a wake-up at or before `at`
/// already registered covers it (the slice it starts registers the next).
pub(super) fn add_wakeup(node: &NodeInner, shared: &Arc<Shared>, at: u64) {
    if shared.wakeup_at.fetch_min(at, Ordering::AcqRel) <= at {
        return;
    }
    let seq = node.timer_seq.fetch_add(1, Ordering::Relaxed);
    let key = Arc::as_ptr(shared) as usize;
    node.timer_targets
        .lock()
        .insert(seq, Arc::downgrade(shared));
    node.timers.lock().push(Reverse((at, seq, key)));
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
            let mut timers = inner.timers.lock();
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
                inner.timer_cv.wait_for(&mut timers, wait);
                continue;
            }
        }
        // Several wake-ups for one sandbox collapse into one schedule.
        let sandboxes: Vec<Arc<Shared>> = {
            let mut targets = inner.timer_targets.lock();
            due.iter()
                .filter_map(|s| targets.remove(s))
                .filter_map(|w| w.upgrade())
                .collect()
        };
        for s in sandboxes {
            s.wakeup_at.store(u64::MAX, Ordering::Release);
            schedule(&inner, &s, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_work_goes_first_until_a_busy_sandbox_waited_too_long() {
        let node = crate::Node::with_threads(1);
        let mk = |id: &str| {
            crate::block_on(node.create_sandbox(crate::SandboxSpec::new(id).entry(None)))
                .expect("sandbox")
                .shared
        };
        let (a, b) = (mk("a"), mk("b"));
        let mut q = RunQueue::default();
        for _ in 0..8 {
            q.fresh.push_back(a.clone());
        }
        q.busy.push_back((b.clone(), 100));
        // Before the busy sandbox waited BUSY_MAX_WAIT_MS, every turn is fresh.
        for now in [100, 100 + BUSY_MAX_WAIT_MS - 1] {
            let (s, preemptible) = q.pop(now).expect("queued");
            assert!(Arc::ptr_eq(&s, &a) && !preemptible);
        }
        // Then it goes first, protected for MIN_SLICE_MS (not preemptible at once).
        let (s, preemptible) = q.pop(100 + BUSY_MAX_WAIT_MS).expect("queued");
        assert!(Arc::ptr_eq(&s, &b) && !preemptible);
        // Busy work taken when nothing fresh waits may be ended at once.
        q.fresh.clear();
        q.busy.push_back((b.clone(), 200));
        let (s, preemptible) = q.pop(200).expect("queued");
        assert!(Arc::ptr_eq(&s, &b) && preemptible);
        assert!(q.pop(200).is_none());
    }

    /// A sandbox with nothing queued and nothing running.
    fn idle(node: &crate::Node, id: &str) -> crate::Sandbox {
        crate::block_on(node.create_sandbox(crate::SandboxSpec::new(id).entry(None)))
            .expect("sandbox")
    }

    #[test]
    fn an_idle_sandbox_runs_on_the_calling_thread() {
        let node = crate::Node::with_threads(1);
        let sb = idle(&node, "idle");
        // A new sandbox may still be queued for its first slices (start-up
        // timers): a command the owner ran instead is received, and we retry.
        for _ in 0..1000 {
            let (tx, rx) = std::sync::mpsc::channel();
            let inner = sb
                .enqueue(Box::new(move |_| {
                    tx.send(std::thread::current().id()).expect("receiver");
                }))
                .expect("queued");
            if run_inline(&inner, &sb.shared) {
                assert_eq!(rx.try_recv(), Ok(std::thread::current().id()));
                return;
            }
            rx.recv_timeout(Duration::from_secs(5))
                .expect("the owner ran it");
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the sandbox never became idle");
    }

    #[test]
    fn a_scheduled_sandbox_is_left_to_its_owner() {
        let node = crate::Node::with_threads(1);
        let sb = idle(&node, "owned");
        // As if a scheduler thread had claimed it: run_inline must not touch it.
        sb.shared.scheduled.store(true, Ordering::Release);
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = sb
            .enqueue(Box::new(move |_| {
                tx.send(std::thread::current().id()).expect("receiver");
            }))
            .expect("queued");
        assert!(!run_inline(&inner, &sb.shared));
        assert_eq!(sb.shared.inbox.lock().len(), 1, "the command still waits");
        // The owner's release finds the command and queues the sandbox.
        release(&inner, &sb.shared);
        let ran_on = rx.recv_timeout(Duration::from_secs(5)).expect("ran");
        assert_ne!(ran_on, std::thread::current().id());
    }

    #[test]
    fn a_panic_in_an_inline_slice_fails_only_that_sandbox() {
        let node = crate::Node::with_threads(1);
        let victim = idle(&node, "victim");
        let bystander = idle(&node, "bystander");
        victim
            .enqueue(Box::new(|_| panic!("a bug in the runtime")))
            .expect("queued");
        // The call runs inline behind the panicking command: the barrier
        // fails the sandbox and the call learns why.
        let err = victim
            .call_blocking("anyone", serde_json::json!(null), None)
            .expect_err("the sandbox failed");
        assert_eq!(err.kind(), "sandbox_failed", "{err}");
        // Under load a scheduler thread may have taken the command first (the
        // sandbox's creation scheduled it); it releases the sandbox itself.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while victim.shared.scheduled.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "released");
            std::thread::sleep(Duration::from_millis(1));
        }
        let err = victim
            .call_blocking("anyone", serde_json::json!(null), None)
            .expect_err("still failed");
        assert_eq!(err.kind(), "sandbox_failed");
        let err = bystander
            .call_blocking("anyone", serde_json::json!(null), None)
            .expect_err("no such process");
        assert_eq!(err.kind(), "no_process", "{err}");
    }

    /// The nice value of a thread of this process.
    #[cfg(target_os = "linux")]
    fn nice_of(tid: i32) -> i32 {
        // SAFETY: plain syscall; errno is reset first because -1 is a valid
        // answer.
        unsafe {
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
        }
    }

    /// Waits up to `within` for `done` on the node's pool.
    #[cfg(target_os = "linux")]
    fn wait_pool(node: &crate::Node, within: Duration, done: impl Fn(&Pool) -> bool) -> bool {
        let until = std::time::Instant::now() + within;
        while std::time::Instant::now() < until {
            if done(&node.inner.pool.lock()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_stuck_spinning_gets_a_lower_priority_then_retires() {
        let node = crate::Node::with_threads(1);
        let src = r#"
            local m = {}
            function m.init() return {} end
            function m.handle_cast(_, state)
              local t = {}
              for i = 1, 50 do t[i] = i end
              table.sort(t, function(a, b) while true do end end)
              return state
            end
            function m.handle_call(req, _, state) return req, state end
            return m
        "#;
        let sb = crate::block_on(
            node.create_sandbox(
                crate::SandboxSpec::new("sorter")
                    .entry(None)
                    .module("m", src)
                    .limits(crate::Limits {
                        // Long enough for the watchdog to see it spin on a
                        // loaded machine; the test waits for the timeout.
                        handler_ms: 2_000,
                        ..crate::Limits::default()
                    }),
            ),
        )
        .expect("sandbox");
        crate::block_on(sb.spawn("m", serde_json::Value::Null, Some("s"))).expect("spawn");
        crate::block_on(sb.cast("s", serde_json::json!("go"))).expect("cast");
        let lowered = wait_pool(&node, Duration::from_secs(3), |pool| {
            pool.workers.iter().any(|w| {
                w.lowered.load(Ordering::Relaxed)
                    && nice_of(w.tid.load(Ordering::Relaxed)) == STUCK_NICE
            })
        });
        assert!(lowered, "the spinning thread was not lowered");
        // The callback times out, the lowered thread retires, and the pool
        // serves at normal priority again.
        let retired = wait_pool(&node, Duration::from_secs(10), |pool| {
            pool.serving == 1
                && pool.workers.iter().all(|w| {
                    !w.lowered.load(Ordering::Relaxed)
                        && nice_of(w.tid.load(Ordering::Relaxed)) == 0
                })
        });
        assert!(retired, "a lowered thread still serves");
        let echo = crate::block_on(sb.call("s", serde_json::json!("again"), Some(2_000)));
        assert!(echo.is_err(), "s exited with its timeout: {echo:?}");
        crate::block_on(sb.spawn("m", serde_json::Value::Null, Some("t"))).expect("respawn");
        let echo = crate::block_on(sb.call("t", serde_json::json!("hi"), Some(2_000)));
        assert_eq!(echo.expect("served"), serde_json::json!("hi"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_stuck_waiting_keeps_its_priority() {
        let node = crate::Node::with_threads(1);
        let host = crate::HostFunctions::default().function("nap", |_| {
            std::thread::sleep(Duration::from_millis(150));
            Ok(serde_json::Value::Null)
        });
        let src = r#"
            local m = {}
            function m.init() return {} end
            function m.handle_call(req, _, state) nap() return req, state end
            return m
        "#;
        let sb = crate::block_on(
            node.create_sandbox_with(
                crate::SandboxSpec::new("napper")
                    .entry(None)
                    .module("m", src),
                host,
            ),
        )
        .expect("sandbox");
        crate::block_on(sb.spawn("m", serde_json::Value::Null, Some("n"))).expect("spawn");
        let probed = std::sync::Arc::new(AtomicBool::new(false));
        let watcher = {
            let node = node.clone();
            let probed = probed.clone();
            std::thread::spawn(move || {
                // Seen stuck and probed by the watchdog, but never lowered.
                wait_pool(&node, Duration::from_secs(2), |pool| {
                    let seen = pool.workers.iter().any(|w| w.stuck_probe.lock().is_some());
                    if seen {
                        probed.store(true, Ordering::Relaxed);
                    }
                    pool.workers
                        .iter()
                        .any(|w| w.lowered.load(Ordering::Relaxed))
                })
            })
        };
        let r = crate::block_on(sb.call("n", serde_json::json!("x"), Some(5_000)));
        assert_eq!(r.expect("answered"), serde_json::json!("x"));
        let lowered = watcher.join().expect("watcher");
        assert!(
            probed.load(Ordering::Relaxed),
            "the watchdog never probed the stuck thread"
        );
        assert!(!lowered, "a waiting thread was lowered");
    }
}
