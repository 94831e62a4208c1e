//! The sandbox's app (its root supervisor, started from the entry module):
//! its start, the callers waiting for it, and its orderly stop.
//!
//! # Invariants
//! * Waiters of the app start are answered once its `init` finished, with
//!   the same outcome each; a start that failed before the root process
//!   died is recorded (`app_stopped`) here, later stops by `finalize`.
//! * Entry args obey the sandbox's message limit like any host message.

use std::sync::Arc;

use serde_json::Value as Json;

use super::host::host_value;
use super::Runtime;
use crate::error::{Error, Result};
use crate::kernel::{AppStatus, HostSlot, Waiter};

impl Runtime {
    pub(super) fn start_app(&mut self, entry: &str) -> Result<()> {
        crate::config::check_entry_args(&self.spec.entry_args, self.spec.limits.max_message_bytes)?;
        let lua = &self.vm.lua;
        let args = host_value(lua, &self.spec.entry_args)?;
        let mut k = self.kernel.borrow();
        let mid = k
            .module_id(entry)
            .ok_or_else(|| Error::NoModule(entry.into()))?;
        if !k.is_server_module(mid) {
            return Err(Error::InvalidInput(format!(
                "entry module `{entry}` has no `init` function (it should be a supervisor or a server)"
            )));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        let serial = k
            .create_process(mid, None, None, Some(args), Waiter::Host(slot))
            .map_err(|(e, _)| e)?;
        k.app = Some(serial);
        k.app_status = AppStatus::Running;
        drop(k);
        self.app_start = Some(rx);
        Ok(())
    }

    /// Answers waiters for the app start once its init finished.
    pub fn poll_app_start(&mut self) {
        let Some(rx) = self.app_start.as_mut() else {
            return;
        };
        match rx.try_recv() {
            Ok(result) => {
                self.app_start = None;
                let mut k = self.kernel.borrow();
                // `finalize` records the stop when the root process dies;
                // only a start that failed before that is recorded here.
                if let (Err(e), false) =
                    (&result, matches!(k.app_status, AppStatus::Stopped { .. }))
                {
                    k.app = None;
                    k.app_status = AppStatus::Stopped {
                        reason: e.to_string(),
                    };
                    k.event(
                        "app_stopped",
                        serde_json::json!({ "reason": e.to_string() }),
                    );
                }
                drop(k);
                for w in self.app_waiters.drain(..) {
                    w.answer(
                        result
                            .as_ref()
                            .map(|v| v.clone())
                            .map_err(|e| Error::Luau(e.to_string())),
                    );
                }
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            Err(_) => self.app_start = None,
        }
    }

    pub fn wait_app(&mut self, slot: Arc<HostSlot>) {
        if self.app_start.is_some() {
            self.app_waiters.push(slot);
            return;
        }
        let k = self.kernel.borrow();
        let r = match &k.app_status {
            AppStatus::Stopped { reason } => Err(Error::Luau(format!("app stopped: {reason}"))),
            _ => Ok(k
                .app
                .and_then(|s| k.procs.get(&s))
                .map(|p| Json::String(k.pid_string(p.pid)))
                .unwrap_or(Json::Null)),
        };
        slot.answer(r);
    }

    /// Stops the app in order (terminate callbacks run); answers `slot` when done.
    pub fn stop_app(&mut self, slot: Arc<HostSlot>) {
        let mut k = self.kernel.borrow();
        match k.app {
            Some(serial) => {
                k.app_stop_waiters.push(slot);
                k.exit_process(serial, crate::value::ExitReason::Shutdown, true);
            }
            None => {
                slot.answer(Ok(Json::Null));
            }
        }
    }
}
