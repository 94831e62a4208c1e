//! Rebuilding every stored sandbox when a durable node opens: its
//! settings, its kept versions (recompiled), its app, and its registered
//! processes' checkpointed states.
//!
//! # Invariants
//! * A restart brings back each module's last *permanent* version: a canary
//!   still open when the node stopped is rolled back, durably, with a
//!   `canary_rollback` event, before the sandbox runs.
//! * Registered processes get their last checkpointed state; anonymous ones
//!   start from `init`. Pids inside a restored state come back as their text
//!   (`"<module.N>"`), which addresses nothing: serials restart at 1.
//! * Stored bytecode is never loaded: every kept version is recompiled and
//!   checked against its checksum.
//! * A stored sandbox that fails to restore keeps its rows untouched
//!   (`Node::unrestored`); the reason names module and version, never the
//!   host's paths.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::settings::SettingsOutcome;
use crate::config::{Limits, SandboxSpec};
use crate::error::{Error, Result};
use crate::node::{HostFunctions, Node, Sandbox};
use crate::store::{ModuleSnapshot, SandboxSnapshot, WriteOp};
use crate::upgrade::{ModuleHistory, ModuleVersion};

impl Node {
    /// The sandboxes the store holds that could not be restored at open, and
    /// why (a `restore_failed` event says it too), sorted by id. Their rows
    /// stay untouched: creating a sandbox with one of these ids is refused,
    /// and [`Node::destroy`] deletes them (their kept versions and
    /// checkpointed states are then lost).
    ///
    /// ```
    /// let node = graft::Node::builder().ephemeral().open().unwrap();
    /// assert!(node.unrestored().is_empty());
    /// node.shutdown();
    /// ```
    pub fn unrestored(&self) -> Vec<(String, String)> {
        self.inner
            .checkpoints
            .unrestored
            .lock()
            .iter()
            .map(|(id, why)| (id.clone(), why.clone()))
            .collect()
    }

    /// Restores stored sandboxes (see the module docs). A sandbox that
    /// cannot be restored is logged and left in the store, untouched.
    pub(super) fn restore(
        &self,
        sandboxes: Vec<SandboxSnapshot>,
        host: &HostFunctions,
        mut settings: Option<SandboxSpec>,
        record_failures: bool,
    ) {
        let mut started = Vec::new();
        for snap in sandboxes {
            let id = snap.sandbox.id.clone();
            let mine = settings
                .as_ref()
                .is_some_and(|s| s.id == id)
                .then(|| settings.take())
                .flatten();
            match self.restore_sandbox(&snap, host, mine) {
                Ok(sb) => started.push((sb, snap.checkpoints)),
                Err(e) => {
                    if record_failures {
                        tracing::error!(sandbox = %id, error = %e, "the sandbox could not be restored");
                    }
                    self.inner
                        .checkpoints
                        .unrestored
                        .lock()
                        .insert(id.clone(), e.to_string());
                    if !record_failures {
                        continue;
                    }
                    self.inner.events.append(
                        &id,
                        "restore_failed",
                        json!({ "error": e.to_string() }),
                    );
                }
            }
        }
        self.restore_started(started);
    }

    /// Waits for each restored app's `init`, then gives registered
    /// processes their checkpointed states (see the module docs).
    pub(super) fn restore_started(
        &self,
        started: Vec<(Sandbox, Vec<crate::store::CheckpointRecord>)>,
    ) {
        // Apps start in parallel; `open` returns once each app's `init`
        // finished (or failed), so a restored node answers like it did.
        for (sb, rows) in started {
            if sb.shared.spec.entry.is_some() {
                let _ = crate::node::block_on(crate::node::with_timeout(
                    sb.wait_app_started(),
                    Duration::from_secs(10),
                ));
            }
            if rows.is_empty() {
                continue;
            }
            let restored = crate::node::block_on(sb.ask(move |rt| rt.restore_checkpoints(rows)));
            match restored {
                Ok((revisions, failed)) => {
                    self.inner
                        .checkpoints
                        .written
                        .lock()
                        .insert(sb.id().to_owned(), revisions);
                    for (name, why) in failed {
                        self.inner.events.append(
                            sb.id(),
                            "checkpoint_not_restored",
                            json!({ "name": name, "why": why }),
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(sandbox = %sb.id(), error = %e, "checkpoints not restored")
                }
            }
        }
    }

    fn restore_sandbox(
        &self,
        snap: &SandboxSnapshot,
        host: &HostFunctions,
        settings: Option<SandboxSpec>,
    ) -> Result<Sandbox> {
        let rec = &snap.sandbox;
        let limits: Limits = serde_json::from_str(&rec.limits_json)
            .map_err(|e| Error::InvalidInput(format!("stored limits: {e}")))?;
        let extra: serde_json::Value = serde_json::from_str(&rec.spec_json).unwrap_or_default();
        let mut spec = SandboxSpec::new(rec.id.clone()).entry(rec.entry.as_deref());
        spec.limits = limits;
        spec.grants = rec.capabilities.clone();
        spec.entry_args = extra.get("entry_args").cloned().unwrap_or_default();
        if let Some(files) = extra.get("files").and_then(|f| f.as_object()) {
            for (m, path) in files {
                if let Some(p) = path.as_str() {
                    spec.files.insert(m.clone(), PathBuf::from(p));
                }
            }
        }
        let mut history = BTreeMap::new();
        let mut rolled_back = Vec::new();
        let mut ops = Vec::new();
        for m in &snap.modules {
            let h = module_history(m, spec.limits.max_source_bytes)?;
            if m.canary_open() {
                rolled_back.push(json!({
                    "module": m.module.module,
                    "from": m.module.current,
                    "to": h.current,
                }));
                ops.push(WriteOp::SetCurrent {
                    sandbox: rec.id.clone(),
                    module: m.module.module.clone(),
                    version: h.current,
                    file: None,
                });
            }
            spec.modules.insert(
                m.module.module.clone(),
                h.current().map(|v| v.source.clone()).unwrap_or_default(),
            );
            history.insert(m.module.module.clone(), h);
        }
        if !ops.is_empty() {
            // Durable before the sandbox runs the old version again.
            self.inner.events.commit(
                &rec.id,
                ops,
                "canary_rollback",
                json!({
                    "why": "the node stopped while the canary window was open",
                    "modules": rolled_back,
                }),
            )?;
        }
        if let Some(new) = settings {
            let outcome = match self.restore_with_settings(&spec, new, &history, host) {
                Ok(Some((sb, changed))) => {
                    *self.inner.checkpoints.settings_outcome.lock() =
                        Some(SettingsOutcome::Applied(changed));
                    return Ok(sb);
                }
                Ok(None) => SettingsOutcome::Unchanged,
                Err(e) => SettingsOutcome::Refused(e),
            };
            let sb = self.create_from(spec, host.clone(), Some(history), false)?;
            *self.inner.checkpoints.settings_outcome.lock() = Some(outcome);
            return Ok(sb);
        }
        self.create_from(spec, host.clone(), Some(history), false)
    }
}

/// A module's kept versions, recompiled here (stored bytecode is never
/// loaded), with its last permanent version current.
fn module_history(m: &ModuleSnapshot, max_source_bytes: usize) -> Result<ModuleHistory> {
    let name = &m.module.module;
    let current = m
        .restore_version()
        .map(|v| v.version)
        .ok_or_else(|| Error::InvalidInput(format!("module `{name}` has no permanent version")))?;
    let file = m
        .module
        .file
        .clone()
        .unwrap_or_else(|| format!("{name}.luau"));
    let mut versions = VecDeque::new();
    for v in &m.versions {
        if crate::upgrade::checksum(&v.source) != v.checksum {
            return Err(Error::InvalidInput(format!(
                "version {} of `{name}` does not match its checksum (the database was altered)",
                v.version
            )));
        }
        // Named by module and version, not by the file it was saved from:
        // the reason is shown to API clients (`restore_failed`, a create
        // refused `sandbox_unrestored`), who have no business with the
        // host's paths, and the file may hold another version by now.
        let bytecode = crate::vm::compile(name, &file, &v.source, max_source_bytes)
            .map_err(|e| restore_compile_error(name, v.version, e))?;
        versions.push_back(ModuleVersion {
            version: v.version,
            checksum: v.checksum.clone(),
            source: v.source.clone(),
            bytecode: Arc::new(bytecode),
            loaded_at_ms: v.created_ms,
            dependencies: v.dependencies.clone(),
        });
    }
    Ok(ModuleHistory {
        versions,
        current,
        next: m.module.next_version.saturating_sub(1),
        file,
    })
}

/// Why a kept version does not compile at a restore (a source a newer
/// Graft accepted, a limit lowered since …), naming the module and the
/// version, with the line and column but without the stored file path.
fn restore_compile_error(module: &str, version: u32, e: Error) -> Error {
    let why = match &e {
        Error::Compile { diagnostics } => match diagnostics.first() {
            Some(d) if d.line > 0 => format!("line {}:{}: {}", d.line, d.column, d.message),
            Some(d) => d.message.clone(),
            None => e.to_string(),
        },
        _ => e.to_string(),
    };
    Error::InvalidInput(format!(
        "version {version} of module `{module}` does not compile: {why}"
    ))
}
