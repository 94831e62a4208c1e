//! [`Sandbox`]: a handle to one sandbox. Every method queues a command to
//! the sandbox's inbox and waits for its answer on a channel, so no caller
//! ever holds the VM; a failed or destroyed sandbox answers with an error
//! instead of hanging.
//!
//! Invariants:
//! * A request reaches the VM only as a command in the inbox, run between
//!   slices by whoever holds the sandbox's turn; the caller waits on a
//!   one-shot channel (`ask`, `ask_slot`), never on the VM's lock.
//! * A closed answer channel is explained ([`Sandbox::gone`]): node
//!   stopped, sandbox failed, destroyed, or replaced by a rebuild
//!   (`Rebuilding`, retryable), in that order of precedence.
//! * A sandbox being rebuilt with new settings is closed to requests from
//!   the moment its old app starts stopping until the rebuild ends
//!   (`Shared::closed`): every request on any handle of it gets
//!   `Rebuilding`, never an answer of the app being stopped (`no_process`
//!   for a process already stopped, `busy` for a reload). The decision is
//!   taken in one place, [`Sandbox::enqueue`], which every request goes
//!   through (`info`, which reads without queueing, asks the same flag),
//!   and there under the inbox lock: a request is either queued before the
//!   close, so it runs before the rebuild reads the states, or refused. An
//!   answer the old app gives after that read is held back (its effect is
//!   not in what the rebuilt sandbox gets back) and the caller is told
//!   `Rebuilding` when the old VM goes (`Runtime::freeze_for_rebuild`). Commands are
//!   requests unless their caller names [`Origin::Node`]: only the
//!   rebuild's own read of the states (its checkpoint) and stop
//!   (`RebuildGuard::stop_old_app`) and the results of blocking host calls
//!   the runtime made do, so a command added later is
//!   refused while closed unless it says it is the node's own. A rebuild
//!   that ends without replacing the sandbox reopens it (the guard's
//!   drop), so its handles answer as before.
//!
//! Files: `processes.rs` (calls, casts, spawns, eval), `inspect.rs` (info,
//! modules, coverage, events), `code.rs` (reload, rollback, export,
//! import), `lifecycle.rs` (the app's start and stop, restart, building a
//! runtime), `test_clock.rs` (advancing a test clock).

mod code;
mod inspect;
mod lifecycle;
mod processes;
mod test_clock;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value as Json;

use super::runtime::Runtime;
use super::scheduler::schedule;
use super::{Command, NodeInner, Shared};
use crate::error::{Error, Result};
use crate::kernel::HostSlot;

pub use inspect::ModuleCoverage;
pub(super) use lifecycle::new_runtime;
pub use test_clock::MAX_CLOCK_STEPS;

/// A handle to one sandbox; cheap to clone. Every method queues a request to
/// the sandbox's scheduler and waits for the answer without blocking it.
#[derive(Clone)]
pub struct Sandbox {
    pub(super) shared: Arc<Shared>,
}

/// Shows the sandbox id (so `Result<Sandbox>` can be unwrapped in tests).
impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.shared.id)
            .finish()
    }
}

/// Who queues a command: it decides whether a sandbox closed for a rebuild
/// (`Shared::closed`) takes it. Every caller of [`Sandbox::enqueue`] names
/// one, so none is let through by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::node) enum Origin {
    /// A request on a handle (the API, an embedder, the checkpointer):
    /// refused with `Rebuilding` while the sandbox is closed.
    Request,
    /// The node finishing work the runtime itself started or needs: the
    /// rebuild reading the states and stopping the old app, a blocking host
    /// call's result (the stopping app's `terminate` may wait for one).
    /// Taken while closed.
    Node,
}

pub(super) fn stopped(id: &str) -> Error {
    Error::SandboxStopped(id.to_owned())
}

impl Sandbox {
    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Whether this sandbox was destroyed (deleted, or replaced by a
    /// rebuild with new settings, `Node::reconfigure_sandbox`): this handle
    /// answers nothing any more; `Node::sandbox` gives the current one.
    ///
    /// ```
    /// let node = graft::Node::new();
    /// let spec = graft::SandboxSpec::new("d").entry(None).module("m", "return {}");
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// assert!(!sb.is_destroyed());
    /// node.destroy("d").unwrap();
    /// assert!(sb.is_destroyed());
    /// ```
    pub fn is_destroyed(&self) -> bool {
        self.shared.destroyed.load(Ordering::Acquire)
    }

    /// Queues a command in the inbox; returns the node, which the caller
    /// must wake (`schedule`) or serve itself (`run_inline`). The one place
    /// that decides whether a request reaches the runtime (module docs).
    pub(super) fn enqueue(&self, cmd: Command, origin: Origin) -> Result<Arc<NodeInner>> {
        let node = self
            .shared
            .node
            .upgrade()
            .ok_or_else(|| stopped(&self.shared.id))?;
        if node.stopping.load(Ordering::Acquire) {
            return Err(stopped(&self.shared.id));
        }
        if self.shared.destroyed.load(Ordering::Acquire) {
            return Err(self.destroyed_error());
        }
        let mut inbox = self.shared.inbox.lock();
        // Under the inbox lock, as the close is: no request slips in behind
        // the rebuild's stop.
        if origin == Origin::Request && self.is_closed() {
            return Err(Error::Rebuilding(self.shared.id.clone()));
        }
        if let Some(e) = self.shared.failure_error() {
            return Err(e);
        }
        inbox.push_back(cmd);
        Ok(node)
    }

    /// Whether the sandbox is closed to requests for a rebuild.
    pub(super) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Closes the sandbox to requests for a rebuild (module docs): taken
    /// with the inbox lock, so every request is queued before the close
    /// (and runs before whatever the rebuild queues next) or refused.
    /// Only `Node::mark_rebuilding` calls it; its guard reopens.
    pub(in crate::node) fn close_for_rebuild(&self) {
        let _inbox = self.shared.inbox.lock();
        self.shared.closed.store(true, Ordering::Release);
    }

    /// Takes requests again (the rebuild ended; a replaced handle answers
    /// `Rebuilding` through `replaced` instead).
    pub(in crate::node) fn reopen(&self) {
        self.shared.closed.store(false, Ordering::Release);
    }

    pub(super) fn submit(&self, cmd: impl FnOnce(&mut Runtime) + Send + 'static) -> Result<()> {
        self.submit_as(Origin::Request, cmd)
    }

    pub(in crate::node) fn submit_as(
        &self,
        origin: Origin,
        cmd: impl FnOnce(&mut Runtime) + Send + 'static,
    ) -> Result<()> {
        let node = self.enqueue(Box::new(cmd), origin)?;
        schedule(&node, &self.shared, false);
        Ok(())
    }

    pub(super) async fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Runtime) -> T + Send + 'static,
    ) -> Result<T> {
        self.ask_as(Origin::Request, f).await
    }

    pub(in crate::node) async fn ask_as<T: Send + 'static>(
        &self,
        origin: Origin,
        f: impl FnOnce(&mut Runtime) -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit_as(origin, move |rt| {
            let _ = tx.send(f(rt));
        })?;
        rx.await.map_err(|_| self.gone())
    }

    /// Why a request's answer channel closed: the sandbox failed, was
    /// destroyed, or its node stopped.
    fn gone(&self) -> Error {
        let node_stopped = self
            .shared
            .node
            .upgrade()
            .is_none_or(|n| n.stopping.load(Ordering::Acquire));
        if node_stopped {
            return stopped(&self.shared.id);
        }
        if let Some(e) = self.shared.failure_error() {
            return e;
        }
        if self.shared.destroyed.load(Ordering::Acquire) {
            return self.destroyed_error();
        }
        stopped(&self.shared.id)
    }

    /// What a request to a destroyed sandbox gets: `Rebuilding` (try again;
    /// `Node::sandbox` gives the rebuilt one) when it was replaced by a
    /// rebuild with new settings, else `NoSandbox`.
    fn destroyed_error(&self) -> Error {
        if self.shared.replaced.load(Ordering::Acquire) {
            Error::Rebuilding(self.shared.id.clone())
        } else {
            Error::NoSandbox(self.shared.id.clone())
        }
    }

    async fn ask_slot(
        &self,
        f: impl FnOnce(&mut Runtime, Arc<HostSlot>) + Send + 'static,
    ) -> Result<Json> {
        self.ask_slot_as(Origin::Request, f).await
    }

    pub(in crate::node) async fn ask_slot_as(
        &self,
        origin: Origin,
        f: impl FnOnce(&mut Runtime, Arc<HostSlot>) + Send + 'static,
    ) -> Result<Json> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        self.submit_as(origin, move |rt| f(rt, slot))?;
        rx.await.map_err(|_| self.gone())?
    }
}
