//! A sandbox's life: its app's start and orderly stop, restarts (also of a
//! failed sandbox), and building its runtime.
//!
//! Invariants:
//! * A runtime is built behind a panic barrier ([`new_runtime`]): a panic
//!   there is a `SandboxFailed` error, never an unwinding caller.
//! * A restart keeps the version history, the events and the reloads that
//!   were waiting (they apply to the new VM, never lost); a failed
//!   sandbox is rebuilt from the history saved when it failed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value as Json;

use super::{stopped, Sandbox};
use crate::config::SandboxSpec;
use crate::error::{Error, Result};
use crate::node::runtime::Runtime;
use crate::node::scheduler::schedule;
use crate::node::{panic_message, with_timeout, NodeInner};
use crate::upgrade::ModuleHistory;
use crate::vm::HostTable;

impl Sandbox {
    /// Waits for the app's `init` to finish; returns the root supervisor's pid.
    pub async fn wait_app_started(&self) -> Result<Json> {
        self.ask_slot(|rt, slot| rt.wait_app(slot)).await
    }

    /// Stops the app in order: supervisors stop children in reverse order and
    /// `terminate` callbacks run. Returns the app's exit reason.
    pub async fn stop_app(&self) -> Result<Json> {
        self.ask_slot(|rt, slot| rt.stop_app(slot)).await
    }

    /// Stops the app, rebuilds the VM from the modules' current versions and
    /// starts the app again. Version history is kept.
    pub async fn restart(&self) -> Result<()> {
        if self.shared.failed.lock().is_some() {
            return self.restart_failed();
        }
        let _ = with_timeout(self.stop_app(), Duration::from_secs(10)).await;
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| {
            let history = std::mem::take(&mut rt.engine.modules);
            let Some(node) = shared.node.upgrade() else {
                rt.engine.modules = history;
                let _ = tx.send(Err(stopped(&shared.id)));
                return;
            };
            match new_runtime(&shared.spec, &shared.host_fns, Some(&history), &node) {
                Ok(mut new_rt) => {
                    // Kept across the restart: events, and reloads that were
                    // waiting (they apply to the new VM, never lost).
                    new_rt.adopt(rt);
                    *rt = new_rt;
                    let _ = tx.send(Ok(()));
                }
                Err(e) => {
                    rt.engine.modules = history;
                    let _ = tx.send(Err(e));
                }
            }
        })?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Rebuilds a failed sandbox from its saved version history.
    fn restart_failed(&self) -> Result<()> {
        let node = self
            .shared
            .node
            .upgrade()
            .ok_or_else(|| stopped(&self.shared.id))?;
        let mut failed = self.shared.failed.lock();
        let Some(f) = failed.as_ref() else {
            return Ok(()); // restarted meanwhile
        };
        let history = (!f.history.is_empty()).then_some(&f.history);
        let rt = new_runtime(&self.shared.spec, &self.shared.host_fns, history, &node)?;
        *self.shared.runtime.lock() = Some(rt);
        *failed = None;
        drop(failed);
        schedule(&node, &self.shared, false);
        Ok(())
    }
}

/// Builds a sandbox's runtime behind the panic barrier: from `spec`, or from
/// the current versions of `history` when restarting.
pub(crate) fn new_runtime(
    spec: &SandboxSpec,
    host_fns: &HostTable,
    history: Option<&BTreeMap<String, ModuleHistory>>,
    node: &NodeInner,
) -> Result<Runtime> {
    let mut spec = spec.clone();
    let spec_id = spec.id.clone();
    if let Some(h) = history {
        spec.modules = h
            .iter()
            .filter_map(|(n, h)| h.current().map(|v| (n.clone(), v.source.clone())))
            .collect();
    }
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Runtime::new(
            spec,
            host_fns.clone(),
            history.cloned(),
            &node.limits,
            node.events.clone(),
        )
    }));
    built.unwrap_or_else(|payload| {
        Err(Error::SandboxFailed {
            id: spec_id.clone(),
            message: panic_message(&*payload),
        })
    })
}
