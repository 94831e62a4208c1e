//! The timer thread: schedules sandboxes whose next timer falls due.
//!
//! Invariants:
//! * At most one wake-up per sandbox and due time is registered
//!   (`Shared::wakeup_at`): a wake-up at or before a later one covers it,
//!   and the slice it starts registers the next.
//! * The thread holds the node only for one round at a time (it upgrades a
//!   weak handle, and ends once it is the last holder or the node stops),
//!   and holds sandboxes weakly: a pending timer never keeps a deleted
//!   sandbox alive.

use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::run_queue::schedule;
use crate::clock;
use crate::node::{NodeInner, Shared};

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

pub(super) fn timer_loop(node: Weak<NodeInner>) {
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
