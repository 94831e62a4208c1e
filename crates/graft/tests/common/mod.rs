//! Helpers shared by the integration tests (each test file is its own crate,
//! so not every helper is used everywhere).
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use graft::{block_on, with_timeout, Limits};

/// Runs a sandbox request to completion; a sandbox that does not answer
/// within 5 s fails the test instead of hanging it.
pub fn run<F: Future>(fut: F) -> F::Output {
    block_on(with_timeout(fut, Duration::from_secs(5)))
        .expect("the sandbox did not answer within 5 s")
}

/// Polls `probe` until it returns `Some` (at most 3 s).
pub fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Default limits with `edit` applied.
pub fn limits(edit: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    edit(&mut l);
    l
}
