//! Giving a sandbox new settings — entry, entry args, limits, capabilities
//! — while keeping its versions: at run time (`Node::reconfigure_sandbox`)
//! or at the restore (`NodeBuilder::apply_settings`).
//!
//! # Invariants
//! * Settings change only through one transaction holding the new record,
//!   the modules it adds and a `sandbox_reconfigured` event, written before
//!   the sandbox is rebuilt; never while a canary window is open.
//! * Settings that cannot start put the old record back, on disk before
//!   memory, so no later start restores settings that fail.
//! * With `apply_settings` the app never runs under the settings it
//!   replaces: the new ones are written before the app first starts.
//! * A live rebuild (`reconfigure_sandbox`) marks the id and closes the old
//!   sandbox to requests in one step before it reads the states the new app
//!   gets back, and from that read holds the old app's answers (every
//!   success answered is in those states); it stops the old app through
//!   that guard (`RebuildGuard`, in `registry`): from
//!   then on every request — a lookup, or a handle of the old sandbox taken
//!   before — gets `Rebuilding` until the rebuilt sandbox has its states
//!   back, and none is checkpointed meanwhile. Every way out drops the
//!   guard; a sandbox it did not replace takes requests again.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde_json::json;

use super::checkpointer::checkpoint_for_rebuild;
use super::records::sandbox_record;
use crate::config::SandboxSpec;
use crate::error::{Error, Result};
use crate::node::registry::RebuildGuard;
use crate::node::{HostFunctions, Node, Sandbox};
use crate::store::{VersionStatus, WriteOp};
use crate::upgrade::{ModuleHistory, ModuleVersion};

/// What [`NodeBuilder::apply_settings`](super::NodeBuilder::apply_settings) did when the node restored the
/// sandbox (see [`Node::take_settings_outcome`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum SettingsOutcome {
    /// The stored settings were the same: restored as stored.
    Unchanged,
    /// Restored with the new settings; which of them changed (`entry`,
    /// `entry_args`, `limits`, `capabilities`).
    Applied(Vec<&'static str>),
    /// The new settings were refused or could not start: the sandbox was
    /// restored with its stored settings, which stay stored.
    Refused(Error),
}

impl Node {
    /// What [`NodeBuilder::apply_settings`](super::NodeBuilder::apply_settings) did, once (`None` when it was
    /// not used, the store did not hold that sandbox, or its restore
    /// failed). See the builder's example.
    pub fn take_settings_outcome(&self) -> Option<SettingsOutcome> {
        self.inner.checkpoints.settings_outcome.lock().take()
    }

    /// Restores a sandbox with new settings (`NodeBuilder::apply_settings`):
    /// `None` when they equal the stored ones. On an error the stored record
    /// is what the store holds (written back if the new one was written).
    pub(super) fn restore_with_settings(
        &self,
        stored: &SandboxSpec,
        new: SandboxSpec,
        history: &BTreeMap<String, ModuleHistory>,
        host: &HostFunctions,
    ) -> Result<Option<(Sandbox, Vec<&'static str>)>> {
        let changed = settings_changed(stored, &new);
        if changed.is_empty() {
            return Ok(None);
        }
        new.validate(&self.inner.limits)?;
        let (ops, histories, new_spec) = settings_plan(new, history.clone(), &host.0)?;
        self.inner.events.commit(
            &stored.id,
            ops,
            "sandbox_reconfigured",
            json!({
                "changed": changed,
                "entry": new_spec.entry,
                "previous_entry": stored.entry,
                "when": "restore",
            }),
        )?;
        match self.create_from(new_spec, host.clone(), Some(histories), false) {
            Ok(sb) => Ok(Some((sb, changed))),
            Err(e) => {
                self.inner.events.commit(
                    &stored.id,
                    vec![WriteOp::PutSandbox(sandbox_record(stored))],
                    "sandbox_reconfigure_failed",
                    json!({ "changed": changed, "error": e.to_string() }),
                )?;
                Err(e)
            }
        }
    }
}

/// What giving a sandbox `spec`'s settings writes and loads: the new record,
/// the modules of `spec` it does not have yet (version 1, permanent), the
/// histories with those added, and the spec to build (its modules: each
/// history's current source).
fn settings_plan(
    spec: SandboxSpec,
    mut histories: BTreeMap<String, ModuleHistory>,
    host_fns: &crate::vm::HostTable,
) -> Result<(Vec<WriteOp>, BTreeMap<String, ModuleHistory>, SandboxSpec)> {
    let added: BTreeMap<String, String> = spec
        .modules
        .iter()
        .filter(|(name, _)| !histories.contains_key(*name))
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    let globals = crate::vm::globals_for(&spec.grants, host_fns);
    let prepared = crate::upgrade::prepare(
        &added,
        &crate::upgrade::PrepareContext {
            known_globals: &globals,
            max_source_bytes: spec.limits.max_source_bytes,
            files: &spec.files,
        },
    )?;
    let mut ops = vec![WriteOp::PutSandbox(sandbox_record(&spec))];
    for p in prepared {
        let v = ModuleVersion {
            version: 1,
            checksum: p.checksum,
            source: p.source,
            bytecode: p.bytecode,
            loaded_at_ms: crate::clock::unix_ms(),
            dependencies: p.dependencies,
        };
        ops.push(WriteOp::PutVersion(v.record(
            &spec.id,
            &p.name,
            VersionStatus::Permanent,
        )));
        ops.push(WriteOp::SetCurrent {
            sandbox: spec.id.clone(),
            module: p.name.clone(),
            version: 1,
            file: Some(p.file.clone()),
        });
        histories.insert(
            p.name,
            ModuleHistory {
                versions: VecDeque::from([v]),
                current: 1,
                next: 1,
                file: p.file,
            },
        );
    }
    let mut new_spec = spec;
    new_spec.modules = histories
        .iter()
        .filter_map(|(n, h)| h.current().map(|v| (n.clone(), v.source.clone())))
        .collect();
    Ok((ops, histories, new_spec))
}

/// What differs between a sandbox's settings and `spec`'s.
fn settings_changed(old: &SandboxSpec, new: &SandboxSpec) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.entry != new.entry {
        changed.push("entry");
    }
    if old.entry_args != new.entry_args {
        changed.push("entry_args");
    }
    if old.limits != new.limits {
        changed.push("limits");
    }
    if old.grants != new.grants {
        changed.push("capabilities");
    }
    // `files` (the paths diagnostics name) alone is no reason to restart an
    // app: `graft run .` and `graft run /abs/dir` differ only there.
    changed
}

impl Node {
    /// Gives a sandbox new settings — entry, entry args, limits,
    /// capabilities (and file names, with them) — keeping its versions, and writes them
    /// durably (`graft run DIR` applies its `graft.toml` this way when the
    /// node restored the project's sandbox). Returns `None` when nothing
    /// differs (modules are not compared: a reload makes sources live).
    ///
    /// The sandbox is rebuilt: the current version of each module is loaded
    /// under the new settings, modules of `spec` it does not have yet are
    /// added as version 1, the app is restarted (the old one stops in order,
    /// `terminate` callbacks run) from the new entry, and every registered
    /// process gets its checkpointed state back by name, as after a restart
    /// (a name the new app does not register, or registers for another
    /// module, keeps its `init` state: `checkpoint_not_restored`). The new
    /// record, the added modules and a `sandbox_reconfigured` event are one
    /// transaction, written before anything changes; if it fails, nothing
    /// did. Refused while a canary window is open (wait for its verdict).
    ///
    /// ```
    /// let node = graft::Node::builder().ephemeral().open().unwrap();
    /// let spec = graft::SandboxSpec::new("s").entry(None).module("m", "return {}");
    /// graft::block_on(node.create_sandbox(spec.clone())).unwrap();
    /// assert!(node.reconfigure_sandbox(spec.clone()).unwrap().is_none());
    /// let mut bigger = spec;
    /// bigger.limits.max_versions = 3;
    /// let sb = node.reconfigure_sandbox(bigger).unwrap();
    /// assert!(sb.is_some(), "rebuilt with the new limits");
    /// node.shutdown();
    /// ```
    pub fn reconfigure_sandbox(&self, spec: SandboxSpec) -> Result<Option<Sandbox>> {
        let old = self.sandbox(&spec.id)?;
        let changed = settings_changed(&old.shared.spec, &spec);
        if changed.is_empty() {
            return Ok(None);
        }
        spec.validate(&self.inner.limits)?;
        // The histories the new sandbox is built from, taken in the same
        // job that stops this runtime taking reloads: a reload acknowledged
        // before it is in them, one sent after it is refused (`busy`).
        let (histories, window_open, retired) = crate::node::block_on(old.ask(|rt| {
            let open = crate::kernel::kernel(&rt.vm.lua).canary.is_some();
            let retired = !open && rt.begin_retire();
            (rt.engine.modules.clone(), open, retired)
        }))?;
        if window_open {
            return Err(Error::InvalidInput(format!(
                "sandbox `{}` has a canary window open; change its settings after the verdict",
                spec.id
            )));
        }
        if !retired {
            return Err(Error::Busy(format!(
                "sandbox `{}` has a reload in progress; change its settings again once it is done",
                spec.id
            )));
        }
        // What to rebuild if the new settings cannot start.
        let old_histories = histories.clone();
        let planned = settings_plan(spec, histories, &old.shared.host_fns).and_then(
            |(ops, histories, new_spec)| {
                let guard = self.close_and_commit(&old, ops, &new_spec, &changed)?;
                Ok((guard, histories, new_spec))
            },
        );
        let (rebuilding, histories, new_spec) = match planned {
            Ok(p) => p,
            Err(e) => {
                // Nothing changed (the guard, if taken, is gone: the old
                // sandbox takes requests again): the old runtime gives the
                // answers it held since the read, and takes reloads again.
                let _ = crate::node::block_on(old.ask(|rt| {
                    rt.thaw();
                    rt.end_retire()
                }));
                return Err(e);
            }
        };
        // Stop the old app in order (through the guard: the old sandbox
        // takes no other request now), then let the old VM go (memory
        // only: its rows are the sandbox's).
        if old.shared.spec.entry.is_some() {
            crate::node::block_on(rebuilding.stop_old_app(Duration::from_secs(10)));
        }
        let id = new_spec.id.clone();
        let host = HostFunctions(old.shared.host_fns.clone());
        let old_spec = old.shared.spec.clone();
        self.forget_sandbox(&id);
        drop(old);
        let sb = match self.create_from(new_spec, host.clone(), Some(histories), false) {
            Ok(sb) => sb,
            Err(e) => {
                // The new settings cannot start (e.g. entry args larger than
                // the new message limit): put the old record back, on disk
                // before memory, so no later start restores settings that
                // fail. The modules it added stay stored, unused.
                let back = match self.inner.store {
                    Some(_) => vec![WriteOp::PutSandbox(sandbox_record(&old_spec))],
                    None => Vec::new(),
                };
                self.inner.events.commit(
                    &id,
                    back,
                    "sandbox_reconfigure_failed",
                    json!({ "changed": changed, "error": e.to_string() }),
                )?;
                let sb = self.create_from(old_spec, host, Some(old_histories), false)?;
                if let Some(store) = &self.inner.store {
                    let rows = store.checkpoints(&id)?;
                    self.restore_started(vec![(sb, rows)]);
                }
                return Err(e);
            }
        };
        self.inner.checkpoints.written.lock().remove(&id);
        self.inner.checkpoints.skipped.lock().remove(&id);
        if let Some(store) = &self.inner.store {
            let rows = store.checkpoints(&id)?;
            self.restore_started(vec![(sb.clone(), rows)]);
        }
        Ok(Some(sb))
    }

    /// Closes the old sandbox for its rebuild, then checkpoints it and
    /// commits the new settings (`ops`) with a `sandbox_reconfigured`
    /// event. From the close until the rebuilt sandbox has its states back,
    /// requests get `Rebuilding` (503, retryable) instead of the old app
    /// stopping or a missing sandbox — also on a handle of the old sandbox
    /// taken before — and a create gets `SandboxExists`. The states are read
    /// after the close, so every request answered before it is in what the
    /// new app gets back, and none after changes it. On an error the guard
    /// is dropped (the sandbox takes requests again) and nothing changed.
    fn close_and_commit(
        &self,
        old: &Sandbox,
        mut ops: Vec<WriteOp>,
        new_spec: &SandboxSpec,
        changed: &[&'static str],
    ) -> Result<RebuildGuard> {
        let guard = self.mark_rebuilding(old);
        checkpoint_for_rebuild(&self.inner, &guard)?;
        if self.inner.store.is_none() {
            ops.clear();
        }
        self.inner.events.commit(
            &new_spec.id,
            ops,
            "sandbox_reconfigured",
            json!({ "changed": changed, "entry": new_spec.entry }),
        )?;
        Ok(guard)
    }
}
