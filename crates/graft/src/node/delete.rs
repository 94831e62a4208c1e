//! Deleting sandboxes, and dropping one from memory to rebuild it.
//!
//! Invariants:
//! * With a store, the deletion is written first: if the write fails the
//!   sandbox stays as it was.
//! * Deleting never waits for a running slice: the sandbox is marked
//!   `destroyed` and the slice drops its VM when it ends; an idle VM is
//!   dropped at once, behind a panic barrier.
//! * Queued requests are dropped, so their waiters learn the sandbox is
//!   gone; a handle of a sandbox dropped to be rebuilt says `Rebuilding`.

use std::sync::atomic::Ordering;

use super::Node;
use crate::error::{Error, Result};

impl Node {
    /// Destroys a sandbox at once: its processes are dropped without
    /// `terminate` (use [`Sandbox::stop_app`](crate::Sandbox::stop_app) first for an orderly stop).
    /// Never waits for a running slice: a sandbox busy in a callback is
    /// dropped by its scheduler thread when the slice ends.
    ///
    /// With a store, the deletion (and a `sandbox_deleted` event) is written
    /// first; if that write fails the sandbox stays as it was.
    pub fn destroy(&self, id: &str) -> Result<()> {
        self.destroy_attached(id, None)
    }

    /// [`Node::destroy`] that commits the operations of `attached` (an
    /// audit row) in the deletion's transaction; see
    /// [`Node::create_sandbox_attached`].
    pub fn destroy_attached(
        &self,
        id: &str,
        attached: Option<&crate::store::Attached>,
    ) -> Result<()> {
        if self.rebuilding(id) {
            return Err(Error::Rebuilding(id.into()));
        }
        if !self.inner.sandboxes.read().contains_key(id) {
            if self.inner.checkpoints.unrestored.lock().contains_key(id) {
                return self.discard_unrestored(id, attached);
            }
            return Err(Error::NoSandbox(id.into()));
        }
        let ops = match &self.inner.store {
            // The events of the deleted sandbox this deletion pushes out of
            // the kept ones go in the same transaction (bounded: at most one
            // sandbox's `max_events` rows, as in memory).
            Some(_) => std::iter::once(crate::store::WriteOp::DeleteSandbox { id: id.to_owned() })
                .chain(
                    self.inner
                        .events
                        .deletion_prunes(id)
                        .into_iter()
                        .map(|sandbox| crate::store::WriteOp::DeleteEvents { sandbox }),
                )
                .collect(),
            None => Vec::new(),
        };
        self.inner.events.commit_with(
            id,
            ops,
            "sandbox_deleted",
            serde_json::json!({}),
            attached,
        )?;
        let shared = self
            .inner
            .sandboxes
            .write()
            .remove(id)
            .ok_or_else(|| Error::NoSandbox(id.into()))?;
        self.inner.events.sandbox_deleted(id);
        shared.destroyed.store(true, Ordering::Release);
        if let Some(mut guard) = shared.runtime.try_lock() {
            let rt = guard.take();
            drop(guard);
            let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(rt)));
            if dropped.is_err() {
                tracing::error!(sandbox = %id, "the sandbox's VM panicked while dropped");
            }
        }
        shared.drop_inbox();
        Ok(())
    }

    /// Deletes the rows of a stored sandbox that failed to restore (asked
    /// for explicitly through `destroy`), with a `sandbox_deleted` event.
    fn discard_unrestored(
        &self,
        id: &str,
        attached: Option<&crate::store::Attached>,
    ) -> Result<()> {
        let ops = vec![crate::store::WriteOp::DeleteSandbox { id: id.to_owned() }];
        self.inner.events.commit_with(
            id,
            ops,
            "sandbox_deleted",
            serde_json::json!({ "unrestored": true }),
            attached,
        )?;
        self.inner.checkpoints.unrestored.lock().remove(id);
        Ok(())
    }

    /// Drops a sandbox from memory only (its rows stay): the first half of
    /// rebuilding it (`reconfigure_sandbox`).
    pub(super) fn forget_sandbox(&self, id: &str) {
        let Some(shared) = self.inner.sandboxes.write().remove(id) else {
            return;
        };
        shared.replaced.store(true, Ordering::Release);
        shared.destroyed.store(true, Ordering::Release);
        if let Some(mut guard) = shared.runtime.try_lock() {
            let rt = guard.take();
            drop(guard);
            let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(rt)));
            if dropped.is_err() {
                tracing::error!(sandbox = %id, "the sandbox's VM panicked while dropped");
            }
        }
        shared.drop_inbox();
    }
}
