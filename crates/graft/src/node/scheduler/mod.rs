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
//!
//! Files: `run_queue.rs` (the queue and who runs next), `worker.rs` (the
//! threads of the pool), `slice.rs` (one slice of a sandbox, behind the
//! panic barrier), `watchdog.rs` (stuck threads: replacement, priority),
//! `timers.rs` (the timer thread). The tuning constants live here, beside
//! the invariants they set.

mod run_queue;
mod slice;
mod timers;
mod watchdog;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use crate::kernel;
use crate::node::NodeInner;

pub(super) use run_queue::{schedule, RunQueue};
pub(super) use slice::{claim_here, hand_back, run_claimed};
pub(super) use worker::Pool;

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

/// Starts the configured scheduler threads, the timer thread and the watchdog.
pub(super) fn start(inner: &Arc<NodeInner>) {
    {
        let mut pool = inner.pool.lock();
        for _ in 0..inner.threads {
            worker::spawn_worker(inner, &mut pool);
        }
    }
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("graft-timers".into())
        .spawn(move || timers::timer_loop(weak))
        .expect("cannot start the timer thread");
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("graft-watchdog".into())
        .spawn(move || watchdog::watchdog_loop(weak))
        .expect("cannot start the watchdog thread");
}
