//! Node clocks.
//!
//! `coarse_ms` is read by the VM interrupt, which runs at every Luau loop
//! back-edge and call: it must cost one relaxed atomic load, so a ticker
//! thread advances it every millisecond. `precise_ms` is for timers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static START: OnceLock<Instant> = OnceLock::new();
static COARSE: AtomicU64 = AtomicU64::new(0);

fn start() -> Instant {
    *START.get_or_init(|| {
        let started = Instant::now();
        std::thread::Builder::new()
            .name("graft-clock".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(1));
                COARSE.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            })
            .expect("cannot start the clock thread");
        started
    })
}

/// Milliseconds since the node started, to within about a millisecond.
#[inline]
pub fn coarse_ms() -> u64 {
    start();
    COARSE.load(Ordering::Relaxed)
}

/// Milliseconds since the node started, exact.
pub fn precise_ms() -> u64 {
    start().elapsed().as_millis() as u64
}

/// The instant of a `precise_ms` value.
pub fn instant_of(ms: u64) -> Instant {
    start() + Duration::from_millis(ms)
}

/// Wall-clock milliseconds since the Unix epoch (what `graft.now()` returns).
pub fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
