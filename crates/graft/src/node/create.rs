//! Creating sandboxes: from a spec (fresh), or from a restored history
//! (restore and rebuilds, in `durable`).
//!
//! Invariants:
//! * The work runs off the caller's thread ([`blocking::unblock`]): an
//!   async caller's worker thread never compiles or writes to disk.
//! * An id is taken once: it is checked against the map, the ids being
//!   rebuilt and the node's `max_sandboxes` before the VM is built, and
//!   again under the map's write lock before it goes in.
//! * With a store, a created sandbox is a stored one: if the creation's
//!   write fails, the sandbox leaves the map again and its VM is dropped.
//! * A stored sandbox that failed to restore keeps its id: creating it
//!   would overwrite its rows (`Unrestored`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::sandbox::new_runtime;
use super::scheduler::schedule;
use super::{blocking, durable, HostFunctions, Node, Sandbox, Shared};
use crate::config::SandboxSpec;
use crate::error::{Error, Result};
use crate::upgrade::ModuleHistory;

impl Node {
    /// Creates a sandbox from a spec (compiles and loads every module, then
    /// starts the app if the spec has an entry module).
    ///
    /// The work (compiling, building the VM, with a store the write to
    /// disk) runs on a thread of its own, never on the caller's: the future
    /// waits without blocking an async runtime's worker thread, and
    /// [`block_on`](crate::block_on) drives it from plain threads. Dropping the future does
    /// not cancel the creation.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// # graft::block_on(async {
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("demo").entry(None).module("m", "return {}");
    /// let sandbox = node.create_sandbox(spec).await.unwrap();
    /// assert_eq!(sandbox.id(), "demo");
    /// let again = SandboxSpec::new("demo").entry(None).module("m", "return {}");
    /// assert_eq!(node.create_sandbox(again).await.unwrap_err().kind(), "sandbox_exists");
    /// # });
    /// ```
    pub async fn create_sandbox(&self, spec: SandboxSpec) -> Result<Sandbox> {
        self.create_sandbox_with(spec, HostFunctions::default())
            .await
    }

    /// Creates a sandbox with host functions (capabilities) for its guests;
    /// off the caller's thread, as [`Node::create_sandbox`].
    ///
    /// With a store, the sandbox (its record, first versions and a
    /// `sandbox_created` event) is written before this returns; if that
    /// write fails, no sandbox is created.
    ///
    /// ```
    /// use graft::{HostFunctions, Node, SandboxSpec};
    /// let node = Node::new();
    /// let host = HostFunctions::default().function("host.two", |_| Ok(serde_json::json!(2)));
    /// let spec = SandboxSpec::new("h").entry(None).module("m", "return {}");
    /// let sb = graft::block_on(node.create_sandbox_with(spec, host)).unwrap();
    /// let info = graft::block_on(sb.info()).unwrap();
    /// assert!(info.capabilities.iter().any(|c| c == "host.two"));
    /// ```
    pub async fn create_sandbox_with(
        &self,
        spec: SandboxSpec,
        host: HostFunctions,
    ) -> Result<Sandbox> {
        let node = self.clone();
        self.create_off_thread(move || node.create_from(spec, host, None, true))
            .await
    }

    /// [`Node::create_sandbox_with`] that commits the operations of
    /// `attached` (an audit row) in the creation's transaction: both or
    /// neither are stored. Without a store, or for another store, they are
    /// left untaken ([`crate::store::Attached::applied`] stays `None`).
    pub async fn create_sandbox_attached(
        &self,
        spec: SandboxSpec,
        host: HostFunctions,
        attached: &crate::store::Attached,
    ) -> Result<Sandbox> {
        let node = self.clone();
        let attached = attached.clone();
        self.create_off_thread(move || {
            node.create_from_attached(spec, host, None, true, Some(&attached))
        })
        .await
    }

    /// Runs a creation on a thread of its own ([`blocking::unblock`]); a
    /// panic there (outside the runtime's own barrier) is an internal error.
    async fn create_off_thread(
        &self,
        create: impl FnOnce() -> Result<Sandbox> + Send + 'static,
    ) -> Result<Sandbox> {
        blocking::unblock("graft-create", create)
            .await
            .unwrap_or_else(|message| {
                Err(Error::Luau(format!(
                    "internal error while creating a sandbox: {message}"
                )))
            })
    }

    /// Creates a sandbox, fresh or from a restored `history`; `persist`
    /// writes its creation (a restored one is in the store already).
    pub(super) fn create_from(
        &self,
        spec: SandboxSpec,
        host: HostFunctions,
        history: Option<BTreeMap<String, ModuleHistory>>,
        persist: bool,
    ) -> Result<Sandbox> {
        self.create_from_attached(spec, host, history, persist, None)
    }

    fn create_from_attached(
        &self,
        spec: SandboxSpec,
        host: HostFunctions,
        history: Option<BTreeMap<String, ModuleHistory>>,
        persist: bool,
        attached: Option<&crate::store::Attached>,
    ) -> Result<Sandbox> {
        spec.validate(&self.inner.limits)?;
        if persist {
            if let Some(why) = self.inner.checkpoints.unrestored.lock().get(&spec.id) {
                // Creating it would overwrite the rows of the one the store
                // holds: its kept versions and checkpointed states. A
                // conflict with what is stored, not bad input.
                return Err(Error::Unrestored {
                    id: spec.id.clone(),
                    reason: why.clone(),
                });
            }
        }
        {
            let map = self.inner.sandboxes.read();
            // Being rebuilt: it exists (its rows are stored), just not in
            // the map for a moment; creating it would clash with its rows.
            if map.contains_key(&spec.id) || (persist && self.rebuilding(&spec.id)) {
                return Err(Error::SandboxExists(spec.id.clone()));
            }
            if map.len() >= self.inner.limits.max_sandboxes {
                return Err(Error::NodeLimit(format!(
                    "the node holds {} sandboxes already (max_sandboxes); delete one first",
                    map.len()
                )));
            }
        }
        let runtime = new_runtime(&spec, &host.0, history.as_ref(), &self.inner)?;
        let ops = persist.then(|| durable::creation_ops(&spec, &runtime.engine.modules));
        let shared = Arc::new(Shared {
            id: spec.id.clone(),
            inbox: Mutex::new(VecDeque::new()),
            scheduled: AtomicBool::new(false),
            runtime: Mutex::new(Some(runtime)),
            failed: Mutex::new(None),
            destroyed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            replaced: AtomicBool::new(false),
            last_info: Mutex::new(None),
            wakeup_at: AtomicU64::new(u64::MAX),
            node: Arc::downgrade(&self.inner),
            known_globals: crate::vm::globals_for(&spec.grants, &host.0),
            spec,
            host_fns: host.0,
        });
        {
            let mut map = self.inner.sandboxes.write();
            // A rebuild puts its sandbox back with `persist` false.
            if map.contains_key(&shared.id) || (persist && self.rebuilding(&shared.id)) {
                return Err(Error::SandboxExists(shared.id.clone()));
            }
            if map.len() >= self.inner.limits.max_sandboxes {
                return Err(Error::NodeLimit(format!(
                    "the node holds {} sandboxes already (max_sandboxes); delete one first",
                    map.len()
                )));
            }
            map.insert(shared.id.clone(), shared.clone());
        }
        self.inner.events.sandbox_created(&shared.id);
        if let Some(ops) = ops {
            let detail = serde_json::json!({
                "entry": shared.spec.entry,
                "modules": shared.spec.modules.keys().collect::<Vec<_>>(),
            });
            if let Err(e) =
                self.inner
                    .events
                    .commit_with(&shared.id, ops, "sandbox_created", detail, attached)
            {
                // Not stored, so not created: the id is free again.
                self.inner.sandboxes.write().remove(&shared.id);
                shared.destroyed.store(true, Ordering::Release);
                let rt = shared.runtime.lock().take();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(rt)));
                return Err(e.into());
            }
        }
        schedule(&self.inner, &shared, false);
        Ok(Sandbox { shared })
    }
}
