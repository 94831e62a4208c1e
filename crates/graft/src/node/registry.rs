//! Finding sandboxes by id, and marking ids that are being rebuilt.
//!
//! Invariants:
//! * An id being rebuilt with new settings is in `rebuilding` from before
//!   its old sandbox leaves the map until after the new one is in it, so a
//!   lookup gets `Rebuilding` (retryable), never a `NoSandbox` for a
//!   sandbox that exists, and a creation gets `SandboxExists`.
//! * Marking the id and closing the old sandbox to requests are one step
//!   ([`Node::mark_rebuilding`]), taken before its app starts stopping, so
//!   a handle taken before the mark is told the same as a lookup; the
//!   rebuild's checkpoint reads the states and the old app is then stopped
//!   through the guard ([`RebuildGuard::stop_old_app`]): the requests the
//!   closed sandbox takes. Dropping the guard (every
//!   way out of the rebuild) unmarks the id and reopens the old sandbox:
//!   one that was not replaced answers as before.

use std::sync::Arc;
use std::time::Duration;

use super::sandbox::Origin;
use super::{Node, NodeInner, Sandbox};
use crate::error::{Error, Result};

/// While alive, requests to the sandbox `id` get `Rebuilding` — through
/// `Node::sandbox` and on any handle of the old sandbox — and creating it
/// gets `SandboxExists` ([`Node::mark_rebuilding`]).
pub(super) struct RebuildGuard {
    node: Arc<NodeInner>,
    old: Sandbox,
}

impl RebuildGuard {
    /// The sandbox being rebuilt (closed to requests while the guard lives).
    pub(super) fn old(&self) -> &Sandbox {
        &self.old
    }

    /// Stops the old app in order (`terminate` callbacks run), waiting at
    /// most `timeout`: the one request the closed sandbox takes. Whether it
    /// stopped in time or not, the rebuild goes on (the old VM is dropped
    /// next), so the outcome is only logged.
    pub(super) async fn stop_old_app(&self, timeout: Duration) {
        let stop = self
            .old
            .ask_slot_as(Origin::Node, |rt, slot| rt.stop_app(slot));
        match crate::node::with_timeout(stop, timeout).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(sandbox = %self.old.id(), error = %e, "the old app's stop failed")
            }
            None => {
                tracing::warn!(sandbox = %self.old.id(), "the old app did not stop in time; its VM is dropped")
            }
        }
    }
}

impl Drop for RebuildGuard {
    fn drop(&mut self) {
        self.node.rebuilding.lock().remove(self.old.id());
        self.old.reopen();
    }
}

impl Node {
    /// The sandbox with this id. While it is being rebuilt with new
    /// settings ([`Node::reconfigure_sandbox`]) there is none for a moment:
    /// [`Error::Rebuilding`] (retryable), not [`Error::NoSandbox`].
    pub fn sandbox(&self, id: &str) -> Result<Sandbox> {
        // First: while the old app stops and the new one starts and gets
        // its states back, neither answers for the sandbox.
        if self.rebuilding(id) {
            return Err(Error::Rebuilding(id.to_owned()));
        }
        self.inner
            .sandboxes
            .read()
            .get(id)
            .map(|s| Sandbox { shared: s.clone() })
            .ok_or_else(|| Error::NoSandbox(id.to_owned()))
    }

    /// Whether the sandbox `id` is being rebuilt with new settings.
    pub(super) fn rebuilding(&self, id: &str) -> bool {
        self.inner.rebuilding.lock().contains(id)
    }

    /// Marks the id of `old` as being rebuilt and closes `old` to requests
    /// until the guard drops (every way out of `reconfigure_sandbox`, once
    /// the sandbox is back in the map or lost); see the module docs.
    pub(super) fn mark_rebuilding(&self, old: &Sandbox) -> RebuildGuard {
        self.inner.rebuilding.lock().insert(old.id().to_owned());
        old.close_for_rebuild();
        RebuildGuard {
            node: self.inner.clone(),
            old: old.clone(),
        }
    }

    /// Ids of all sandboxes, sorted.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.inner.sandboxes.read().keys().cloned().collect()
    }
}
