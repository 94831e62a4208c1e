//! [`Sandbox`]: a handle to one sandbox. Every method queues a command to
//! the sandbox's inbox and waits for its answer on a channel, so no caller
//! ever holds the VM; a failed or destroyed sandbox answers with an error
//! instead of hanging.
//!
//! Invariants:
//! * A request reaches the VM only as a command run by whoever holds the
//!   sandbox's turn: queued in the inbox, or, for `call_blocking` on an idle
//!   sandbox, run by the caller itself after claiming the turn
//!   ([`Sandbox::run_here`]). The caller waits on a one-shot channel (`ask`,
//!   `ask_slot`), never on the VM's lock.
//! * A closed answer channel is explained ([`Sandbox::gone`]): node
//!   stopped, sandbox failed, destroyed, or replaced by a rebuild
//!   (`Rebuilding`, retryable), in that order of precedence.
//! * A sandbox being rebuilt with new settings is closed to requests from
//!   the moment its old app starts stopping until the rebuild ends
//!   (`Shared::closed`): every request on any handle of it gets
//!   `Rebuilding`, never an answer of the app being stopped (`no_process`
//!   for a process already stopped, `busy` for a reload). The decision is
//!   taken in one place, `Sandbox::closed_to`, which every request goes
//!   through (`info`, which reads without queueing, asks the same flag):
//!   in [`Sandbox::enqueue`] under the inbox lock, in [`Sandbox::run_here`]
//!   while holding the sandbox's turn. A request queued before the close
//!   runs before the rebuild reads the states; one `run_here` admitted
//!   runs in its own slice, where that read, if queued meanwhile, comes
//!   first (its answer is then held back, below); any other is refused. An
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
use super::scheduler::{self, schedule};
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
    /// must wake (`schedule`). With [`Sandbox::run_here`], the one place
    /// that decides whether a request reaches the runtime (module docs).
    pub(super) fn enqueue(&self, cmd: Command, origin: Origin) -> Result<Arc<NodeInner>> {
        let node = self.live_node()?;
        let mut inbox = self.shared.inbox.lock();
        // Under the inbox lock, as the close is: no request slips in behind
        // the rebuild's stop.
        if let Some(e) = self.refusal(origin) {
            return Err(e);
        }
        inbox.push_back(cmd);
        Ok(node)
    }

    /// Runs a request's command on the calling thread when the sandbox is
    /// idle (`Sandbox::call_blocking`): no inbox, no allocation, no
    /// scheduler thread woken. Otherwise queues it like any request.
    ///
    /// Whether the sandbox is closed is asked as [`Sandbox::enqueue`] asks
    /// it, again once this thread holds the sandbox's turn (a first look
    /// before claiming keeps refusals from touching the turn at all). A rebuild that closes the
    /// sandbox after that decision finds the command run, or about to run
    /// in this slice: after the commands queued before the slice began,
    /// which may include the rebuild's read of the states; the answer is
    /// then held back and the caller told `Rebuilding`, as for any call
    /// answered after that read (module docs).
    ///
    /// A failed sandbox needs no look here: its slice finds no runtime,
    /// drops the command unrun, and the caller is told why (`gone`).
    pub(super) fn run_here(&self, cmd: impl FnOnce(&mut Runtime) + Send + 'static) -> Result<()> {
        let node = self.live_node()?;
        if let Some(e) = self.closed_to(Origin::Request) {
            return Err(e);
        }
        if !scheduler::claim_here(&self.shared) {
            let node = self.enqueue(Box::new(cmd), Origin::Request)?;
            schedule(&node, &self.shared, false);
            return Ok(());
        }
        if let Some(e) = self.closed_to(Origin::Request) {
            // A wake-up may have come while the turn was held.
            scheduler::hand_back(&node, &self.shared);
            return Err(e);
        }
        scheduler::run_claimed(&node, &self.shared, cmd);
        Ok(())
    }

    /// The node, if it still runs and this sandbox is not destroyed.
    fn live_node(&self) -> Result<Arc<NodeInner>> {
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
        Ok(node)
    }

    /// Why a request from `origin` may not reach the runtime now, if it may
    /// not: the sandbox is closed for a rebuild, or it failed.
    fn refusal(&self, origin: Origin) -> Option<Error> {
        self.closed_to(origin)
            .or_else(|| self.shared.failure_error())
    }

    /// `Rebuilding` if the sandbox is closed to requests from `origin`.
    fn closed_to(&self, origin: Origin) -> Option<Error> {
        (origin == Origin::Request && self.is_closed())
            .then(|| Error::Rebuilding(self.shared.id.clone()))
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
