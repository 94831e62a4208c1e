//! The watchdog: marks scheduler threads whose slice overran as stuck,
//! keeps `threads` of them serving, and lowers the priority of a stuck
//! thread that spins.
//!
//! Invariants:
//! * A slice is stuck once the interrupt found it past its end in code that
//!   cannot yield, or after `STUCK_AFTER_MS`; its thread stops counting as
//!   serving and a replacement starts, up to `MAX_EXTRA_THREADS`.
//! * Only a thread seen spinning (at least half of the wall time on a CPU
//!   over `PROBE_MS`) is lowered: one that waits, or that an overloaded
//!   machine did not run, keeps its priority, or its slice would be
//!   stretched into a spurious `handler_ms` timeout.

use std::sync::atomic::Ordering;
use std::sync::Weak;

use super::run_queue::preempt_for_fresh_work;
use super::worker::{spawn_worker, Worker};
use super::{MAX_EXTRA_THREADS, STUCK_AFTER_MS, STUCK_NICE, WATCHDOG_PERIOD};
use crate::clock;
use crate::node::NodeInner;

/// Marks threads whose slice overran as stuck and keeps `threads` of them serving.
pub(super) fn watchdog_loop(node: Weak<NodeInner>) {
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
