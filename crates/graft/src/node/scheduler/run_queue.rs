//! The run queue: which sandbox a free scheduler thread runs next, and the
//! preemption that keeps fresh work from waiting a whole slice.
//!
//! Invariants:
//! * A sandbox is queued at most once: [`schedule`] queues it only when it
//!   sets `Shared::scheduled`, which the end of its slice clears.
//! * Fresh work (host commands, timers, messages) goes before busy
//!   sandboxes, but a busy sandbox that waited `BUSY_MAX_WAIT_MS` goes
//!   first and keeps at least `MIN_SLICE_MS`: the guarantee is by time, so
//!   a stream of requests cannot starve a busy sandbox, and fresh work that
//!   finds no free thread ends a running slice at its next safepoint rather
//!   than waiting a whole `SLICE_MS` (code that cannot yield ignores that;
//!   the watchdog covers it).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{BUSY_MAX_WAIT_MS, MIN_SLICE_MS, SPIN_MICROS};
use crate::clock;
use crate::node::{NodeInner, Shared};

/// The run queue: fresh work first, then sandboxes that used their slice.
#[derive(Default)]
pub(crate) struct RunQueue {
    pub(super) fresh: VecDeque<Arc<Shared>>,
    /// With the coarse ms at which each was queued, oldest first.
    pub(super) busy: VecDeque<(Arc<Shared>, u64)>,
    /// Scheduler threads waiting in `next_sandbox` for work.
    pub(super) idle: usize,
}

impl RunQueue {
    /// The next sandbox to run at coarse ms `now`, and whether fresh work
    /// may end its slice at once: true for a busy sandbox taken because no
    /// fresh work waited; a busy one served because it waited
    /// [`BUSY_MAX_WAIT_MS`] keeps at least `MIN_SLICE_MS`, so a stream of
    /// fresh work cannot starve it.
    pub(super) fn pop(&mut self, now: u64) -> Option<(Arc<Shared>, bool)> {
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

/// Queues a sandbox for a slice (no-op if it is queued or running already).
/// `busy`: it used its whole slice and goes behind fresh work.
pub(crate) fn schedule(node: &NodeInner, shared: &Arc<Shared>, busy: bool) {
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
pub(super) fn preempt_for_fresh_work(node: &NodeInner) {
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

/// Waits for the next sandbox to run; `None` when the node stops.
pub(super) fn next_sandbox(inner: &NodeInner) -> Option<(Arc<Shared>, bool)> {
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
