//! Finding sandboxes by id, and marking ids that are being rebuilt.
//!
//! Invariant: an id being rebuilt with new settings is in `rebuilding` from
//! before its old sandbox leaves the map until after the new one is in it,
//! so a lookup gets `Rebuilding` (retryable), never a `NoSandbox` for a
//! sandbox that exists, and a creation gets `SandboxExists`.

use std::sync::Arc;

use super::{Node, NodeInner, Sandbox};
use crate::error::{Error, Result};

/// While alive, requests to the sandbox `id` get `Rebuilding` and creating
/// it gets `SandboxExists` ([`Node::mark_rebuilding`]).
pub(super) struct RebuildGuard {
    node: Arc<NodeInner>,
    id: String,
}

impl Drop for RebuildGuard {
    fn drop(&mut self) {
        self.node.rebuilding.lock().remove(&self.id);
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

    /// Marks `id` as being rebuilt until the guard drops (every way out of
    /// `reconfigure_sandbox`, once the sandbox is back in the map or lost).
    pub(super) fn mark_rebuilding(&self, id: &str) -> RebuildGuard {
        self.inner.rebuilding.lock().insert(id.to_owned());
        RebuildGuard {
            node: self.inner.clone(),
            id: id.to_owned(),
        }
    }

    /// Ids of all sandboxes, sorted.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.inner.sandboxes.read().keys().cloned().collect()
    }
}
