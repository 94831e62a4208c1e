//! The test clock (`SandboxSpec::test_clock`): reading it and advancing it
//! one step at a time.
//!
//! # Invariants
//! * The clock only moves when nothing is ready to run, and never past the
//!   next due timer, so every timer fires at its own time, in order.
//! * A sandbox without a test clock refuses both with the same message.

use super::Runtime;
use crate::error::{Error, Result};

impl Runtime {
    /// One step of [`crate::Sandbox::advance_clock`] towards `target`
    /// (timer time): waits while processes have work, else moves the test
    /// clock to the next due timer (the slice after this command fires
    /// it), else to `target`. `Ok(true)` once the clock stands at `target`
    /// with nothing left to run.
    pub fn clock_step(&mut self, target: u64) -> Result<bool> {
        let mut k = self.kernel.borrow();
        if k.test_clock.is_none() {
            return Err(no_test_clock(&self.spec.id));
        }
        if k.has_ready_work() {
            return Ok(false);
        }
        let next = k.next_timer_at();
        let Some(c) = k.test_clock.as_mut() else {
            return Err(no_test_clock(&self.spec.id));
        };
        match next {
            Some(at) if at <= target => {
                c.now_ms = c.now_ms.max(at);
                Ok(false)
            }
            _ => {
                c.now_ms = c.now_ms.max(target);
                Ok(true)
            }
        }
    }

    /// The test clock's reading (timer time), or an error without one.
    pub fn clock_now(&self) -> Result<u64> {
        let k = self.kernel.borrow();
        match &k.test_clock {
            Some(c) => Ok(c.now_ms),
            None => Err(no_test_clock(&self.spec.id)),
        }
    }
}

fn no_test_clock(id: &str) -> Error {
    Error::InvalidInput(format!(
        "sandbox `{id}` has no test clock; create it with `SandboxSpec::test_clock(true)`"
    ))
}
