//! The scheduler threads of the pool, and how one retires.
//!
//! Invariants:
//! * `Pool::serving` counts the threads not marked stuck: the watchdog
//!   subtracts a thread when it marks it, and the thread adds itself back
//!   (or retires) when its slice ends; the watchdog starts replacements
//!   while fewer than `threads` serve.
//! * A thread whose priority was lowered never serves again: an
//!   unprivileged thread cannot raise it back, so it retires after its
//!   slice and a fresh thread takes its place if one is missing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::run_queue::next_sandbox;
use super::slice::run_sandbox;
use crate::clock;
use crate::kernel;
use crate::node::NodeInner;

/// One scheduler thread, as the watchdog sees it.
pub(super) struct Worker {
    /// `coarse_ms + 1` when the running slice started; 0 between slices.
    pub(super) slice_started: AtomicU64,
    /// Set by the watchdog when the slice overran; the thread no longer
    /// counts as serving.
    pub(super) stuck: AtomicBool,
    /// The running slice is a busy sandbox's (it used whole slices before):
    /// waiting fresh work ends it at once rather than after `MIN_SLICE_MS`.
    pub(super) running_busy: AtomicBool,
    /// The interrupt watch of the sandbox this thread runs, so that waiting
    /// fresh work can end the slice early (`preempt_for_fresh_work`).
    pub(super) running: parking_lot::Mutex<Option<Arc<kernel::Watch>>>,
    /// The OS thread id (Linux; 0 until the thread has started).
    pub(super) tid: std::sync::atomic::AtomicI32,
    /// Its OS priority was lowered when it got stuck: it retires after the
    /// slice instead of serving on at that priority.
    pub(super) lowered: AtomicBool,
    /// While stuck and not lowered: coarse ms and the thread's CPU time (ns)
    /// at the watchdog's last look, to tell a spinning slice from one the OS
    /// merely did not run (an overloaded machine stretches every slice).
    pub(super) stuck_probe: parking_lot::Mutex<Option<(u64, u64)>>,
}

/// The scheduler threads alive and how many of them serve.
#[derive(Default)]
pub(crate) struct Pool {
    pub(super) workers: Vec<Arc<Worker>>,
    pub(super) serving: usize,
}

/// Adds a serving scheduler thread to the pool (the caller holds its lock).
/// Returns false if the OS refused a thread (the pool then stays as it is).
pub(super) fn spawn_worker(inner: &Arc<NodeInner>, pool: &mut Pool) -> bool {
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
        run_sandbox(&inner, &shared, Some(&me), None);
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

/// This thread's OS id, for [`lower_priority`](super::watchdog::lower_priority) (0 where there is none).
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
