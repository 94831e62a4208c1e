//! Driving a sandbox's test clock ([`SandboxSpec::test_clock`]) by hand.
//!
//! Invariant: advancing is bounded ([`MAX_CLOCK_STEPS`]): processes that
//! keep setting zero-delay timers make it fail, never spin forever.
//!
//! [`SandboxSpec::test_clock`]: crate::SandboxSpec::test_clock

use super::Sandbox;
use crate::error::{Error, Result};

/// The most steps [`Sandbox::advance_clock`] takes (one per due timer or
/// busy slice) before it gives up.
pub const MAX_CLOCK_STEPS: usize = 100_000;

impl Sandbox {
    /// Moves the sandbox's test clock ([`SandboxSpec::test_clock`](crate::SandboxSpec::test_clock)) forward
    /// by `ms`, firing every timer that falls due on the way, in due order
    /// and with the clock standing at each one's due time, and lets the
    /// processes handle what they were sent; returns once nothing is left
    /// to run. A sandbox without a test clock answers `InvalidInput`.
    ///
    /// Bounded: after [`MAX_CLOCK_STEPS`] steps (processes that keep
    /// setting zero-delay timers) it stops with `InvalidInput`.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let spec = SandboxSpec::new("ticker").entry(None).test_clock(true).module("t", r#"
    ///     return {
    ///         init = function() graft.send_after(60000, graft.self(), "tick"); return 0 end,
    ///         handle_info = function(_, n) return n + 1 end,
    ///         handle_call = function(_, _, n) return n, n end,
    ///     }"#);
    /// let node = Node::new();
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// graft::block_on(sb.spawn("t", serde_json::Value::Null, Some("t"))).unwrap();
    /// graft::block_on(sb.advance_clock(60_000)).unwrap();
    /// assert_eq!(graft::block_on(sb.call("t", "n".into(), None)).unwrap(), 1);
    /// ```
    pub async fn advance_clock(&self, ms: u64) -> Result<()> {
        let target = self.ask(|rt| rt.clock_now()).await??.saturating_add(ms);
        for _ in 0..MAX_CLOCK_STEPS {
            if self.ask(move |rt| rt.clock_step(target)).await?? {
                // One more round trip: the slice after the last step has run.
                self.ask(|_| ()).await?;
                return Ok(());
            }
        }
        Err(Error::InvalidInput(format!(
            "sandbox `{}`: the clock did not settle after {MAX_CLOCK_STEPS} steps (timers keep firing)",
            self.shared.id
        )))
    }
}
