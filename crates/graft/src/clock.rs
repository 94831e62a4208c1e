//! Node clocks.
//!
//! `coarse_ms` is read by the VM interrupt, which runs at every Luau loop
//! back-edge and call: it must cost one relaxed atomic load, so a ticker
//! thread (`graft-clock`) advances it every millisecond. `precise_ms` is for
//! timers.
//!
//! Invariants:
//! * the ticker runs while at least one [`ClockGuard`] lives and is joined
//!   when the last one goes. Each node holds one in the state its threads
//!   share, so the clock ticks until the node's last thread has let go; the
//!   kernel test harness, which runs Luau without a node, holds one too.
//!   With no guard alive `coarse_ms` stands still: nothing that reads it
//!   runs then.
//! * Both clocks count from one epoch, fixed at first use for the life of
//!   the process, so restarting the ticker never moves them back. The ticker
//!   only raises `COARSE` (`fetch_max`): one that is winding down cannot
//!   undo a tick of one started after it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static EPOCH: OnceLock<Instant> = OnceLock::new();
static COARSE: AtomicU64 = AtomicU64::new(0);
static TICKER: Mutex<Ticker> = Mutex::new(Ticker {
    users: 0,
    running: None,
});

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Brings `COARSE` up to now.
fn advance() {
    COARSE.fetch_max(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
}

struct Ticker {
    /// Live [`ClockGuard`]s.
    users: usize,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

fn ticker() -> std::sync::MutexGuard<'static, Ticker> {
    // The lock is never held across code that can panic with the count
    // half-updated, so a poisoned lock still holds a consistent count.
    TICKER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the `graft-clock` ticker running while it lives (see the module
/// invariants).
pub(crate) struct ClockGuard(());

impl ClockGuard {
    /// Starts the ticker if no other guard is alive.
    pub(crate) fn acquire() -> ClockGuard {
        let mut t = ticker();
        if t.users == 0 {
            // Readings right after a pause must be current, not the value
            // the clock stopped at.
            advance();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let thread = std::thread::Builder::new()
                .name("graft-clock".into())
                .spawn(move || {
                    while !flag.load(Ordering::Acquire) {
                        std::thread::park_timeout(Duration::from_millis(1));
                        advance();
                    }
                })
                .expect("cannot start the clock thread");
            t.running = Some(Running { stop, thread });
        }
        t.users += 1;
        ClockGuard(())
    }
}

impl Drop for ClockGuard {
    fn drop(&mut self) {
        let last = {
            let mut t = ticker();
            t.users -= 1;
            if t.users == 0 {
                t.running.take()
            } else {
                None
            }
        };
        // Joined outside the lock: a node created meanwhile starts its own
        // ticker rather than waiting for this one to wind down.
        if let Some(r) = last {
            r.stop.store(true, Ordering::Release);
            r.thread.thread().unpark();
            let _ = r.thread.join();
        }
    }
}

/// Milliseconds since the clock's epoch, to within about a millisecond
/// while a node is alive.
#[inline]
pub(crate) fn coarse_ms() -> u64 {
    COARSE.load(Ordering::Relaxed)
}

/// Milliseconds since the clock's epoch, exact.
pub(crate) fn precise_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Wall-clock milliseconds since the Unix epoch (what `graft.now()` returns).
pub(crate) fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Other tests hold guards concurrently, so this checks what holds
    /// whatever they do: readings move forward while a guard lives and
    /// never move back across a stop and restart.
    #[test]
    fn coarse_time_advances_under_a_guard_and_never_goes_back() {
        let first = ClockGuard::acquire();
        let before = coarse_ms();
        let deadline = Instant::now() + Duration::from_secs(5);
        while coarse_ms() < before + 3 {
            assert!(Instant::now() < deadline, "the clock does not tick");
            std::thread::sleep(Duration::from_millis(1));
        }
        let seen = coarse_ms();
        drop(first);
        std::thread::sleep(Duration::from_millis(5));
        let again = ClockGuard::acquire();
        let restarted = coarse_ms();
        assert!(restarted >= seen, "{restarted} < {seen}");
        assert!(restarted <= precise_ms());
        drop(again);
    }
}
