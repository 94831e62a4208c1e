//! Checkpoints of registered processes' states (SPEC §8): taken on the
//! sandbox's thread at a message boundary, written off it; restored after a
//! restart, migrated with `code_change` when the module version moved.
//!
//! # Invariants
//! * A snapshot is taken between callbacks (the runtime runs commands only
//!   between slices), so a state is never half-updated.
//! * Only *dirty* processes are snapshotted: one whose (serial, messages
//!   handled, module version) changed since its last checkpoint. A state
//!   changes only in a callback or a migration, and both move that key.
//! * What runs on the sandbox's thread is finding the dirty processes and
//!   the JSON conversion of their states, in chunks of [`CHUNK`] so that a
//!   checkpoint of many processes never holds the thread for long;
//!   serialising to text and the write happen on the checkpointer's thread.
//! * A state that cannot be checkpointed (not plain data) deletes that
//!   name's older checkpoint, with a `checkpoint_skipped` event, in one
//!   transaction: a restart must not bring back a state older than what the
//!   process went on to do; it restarts from `init` instead.
//! * Supervisors are never checkpointed: their state is their children's
//!   pids, which a restart cannot bring back; `init` rebuilds it.
//! * Restoring runs guest code (`code_change`) under the sandbox's
//!   `handler_ms`, like a migration; a failure keeps the state `init` gave
//!   and is reported as an event, never as a failed start.

use std::collections::HashMap;

use mlua::{Function, Value};
use serde_json::Value as Json;

use super::runtime::Runtime;
use crate::kernel::kernel;
use crate::store::CheckpointRecord;
use crate::value::{json_to_lua, lua_to_json};

/// States converted per visit to the sandbox's thread.
pub(crate) const CHUNK: usize = 1024;

/// What identifies a state's revision: (serial, messages handled, version).
pub(crate) type Revision = (u64, u64, u32);

/// States of registered processes that changed since the last checkpoint.
pub(crate) struct Snapshot {
    /// (name, module, module version, state, revision).
    pub states: Vec<(String, String, u32, Json, Revision)>,
    /// Names checkpointed before that are no longer registered.
    pub removed: Vec<String>,
    /// Registered processes whose state is not plain data: (name, why,
    /// revision). Their older checkpoint is deleted (see `durable`).
    pub skipped: Vec<(String, String, Revision)>,
}

impl Snapshot {
    /// The store rows (serialising here, off the sandbox's thread).
    pub fn rows(&self, at_ms: f64) -> Vec<CheckpointRecord> {
        self.states
            .iter()
            .map(|(name, module, version, state, _)| CheckpointRecord {
                name: name.clone(),
                module: module.clone(),
                module_version: *version,
                state_json: state.to_string(),
                at_ms,
            })
            .collect()
    }
}

impl Runtime {
    /// The registered processes whose revision differs from `written` (all
    /// of them when `written` is empty), and the names no longer registered.
    /// Cheap: no state is read, so the sandbox's thread is held briefly.
    pub fn dirty(&self, written: &HashMap<String, Revision>) -> (Vec<(String, u64)>, Vec<String>) {
        let k = kernel(&self.vm.lua);
        let mut dirty = Vec::new();
        let mut live = std::collections::HashSet::with_capacity(k.names.len());
        // Whether each module is a supervisor, asked of Luau once per module
        // rather than once per process (this pass holds the sandbox's thread).
        let supervisor: Vec<bool> = k
            .module_tables
            .iter()
            .map(|t| t.as_ref().is_some_and(is_supervisor))
            .collect();
        for (name, serial) in &k.names {
            let Some(p) = k.procs.get(serial) else {
                continue;
            };
            if supervisor
                .get(p.pid.module_index() as usize)
                .copied()
                .unwrap_or(false)
            {
                // Rebuilt by its `init`; an old checkpoint of it is removed.
                continue;
            }
            live.insert(&**name);
            let revision = (*serial, p.messages_handled as u64, p.version);
            if written.get(&**name) != Some(&revision) {
                dirty.push((name.to_string(), *serial));
            }
        }
        let removed = written
            .keys()
            .filter(|n| !live.contains(n.as_str()))
            .cloned()
            .collect();
        (dirty, removed)
    }

    /// Snapshots the states of `procs` (name, serial) that are still
    /// registered under that name; each state as of now, a message boundary.
    pub fn snapshot(&self, procs: &[(String, u64)]) -> Snapshot {
        let lua = &self.vm.lua;
        let k = kernel(lua);
        let mut states = Vec::new();
        let mut skipped = Vec::new();
        for (name, serial) in procs {
            if k.names.get(name.as_str()) != Some(serial) {
                continue; // unregistered or re-registered since: the next round sees it
            }
            let Some(p) = k.procs.get(serial) else {
                continue;
            };
            let revision = (*serial, p.messages_handled as u64, p.version);
            let module = k
                .module_names
                .get(p.pid.module_index() as usize)
                .map(|m| m.to_string())
                .unwrap_or_default();
            let state: Value = k.states.raw_get(*serial).unwrap_or(Value::Nil);
            match lua_to_json(&state, "state", k.max_value_bytes, &|pid| k.pid_string(pid)) {
                Ok(json) => states.push((name.clone(), module, p.version, json, revision)),
                Err(e) => skipped.push((name.clone(), e.to_string(), revision)),
            }
        }
        Snapshot {
            states,
            removed: Vec::new(),
            skipped,
        }
    }

    /// The rebuild's read (see `durable::checkpointer`): every dirty state
    /// in one visit, not in chunks, and from then on this runtime holds its
    /// answers to hosts (`Kernel::held_answers`): what the old app does
    /// after this read is not in the states the rebuilt sandbox gets back,
    /// so no caller is told it succeeded. [`Runtime::thaw`] gives them if
    /// the rebuild is called off; otherwise they drop with the VM.
    pub fn freeze_for_rebuild(&mut self, written: &HashMap<String, Revision>) -> Snapshot {
        let (dirty, removed) = self.dirty(written);
        let mut snapshot = self.snapshot(&dirty);
        snapshot.removed = removed;
        kernel(&self.vm.lua)
            .held_answers
            .get_or_insert_with(Vec::new);
        snapshot
    }

    /// Gives the answers held since [`Runtime::freeze_for_rebuild`] (the
    /// rebuild was called off: the old app goes on, effects included).
    pub fn thaw(&mut self) {
        let held = kernel(&self.vm.lua).held_answers.take();
        for (slot, answer) in held.into_iter().flatten() {
            slot.answer(answer);
        }
    }

    /// Gives each registered process named in `rows` its checkpointed state,
    /// migrated by its module's `code_change(old_vsn, state, nil)` when the
    /// version moved. Returns the revisions now matching the store, and the
    /// rows that could not be restored, with why.
    pub fn restore_checkpoints(
        &mut self,
        rows: Vec<CheckpointRecord>,
    ) -> (HashMap<String, Revision>, Vec<(String, String)>) {
        let mut restored = HashMap::new();
        let mut failed = Vec::new();
        for row in rows {
            match self.restore_one(&row) {
                Ok(Some(revision)) => {
                    restored.insert(row.name, revision);
                }
                Ok(None) => {}
                Err(why) => failed.push((row.name, why)),
            }
        }
        (restored, failed)
    }

    /// `Ok(Some(revision))` if the state was put back unchanged (it matches
    /// the store), `Ok(None)` if it was migrated (so it is dirty).
    fn restore_one(&mut self, row: &CheckpointRecord) -> Result<Option<Revision>, String> {
        let lua = self.vm.lua.clone();
        let (serial, version, table, watch) = {
            let k = kernel(&lua);
            let serial = *k
                .names
                .get(row.name.as_str())
                .ok_or("no process has this name after the restart")?;
            let p = k.procs.get(&serial).ok_or("the process is gone")?;
            let module = k
                .module_names
                .get(p.pid.module_index() as usize)
                .map(|m| m.to_string())
                .unwrap_or_default();
            if module != row.module {
                return Err(format!(
                    "the name now belongs to a process of `{module}`, not `{}`",
                    row.module
                ));
            }
            let table = k
                .module_tables
                .get(p.pid.module_index() as usize)
                .cloned()
                .flatten();
            (serial, p.version, table, k.watch.clone())
        };
        if table.as_ref().is_some_and(is_supervisor) {
            // A supervisor's state holds its children's pids, which a
            // restart cannot bring back: it keeps the state its `init` just
            // built (as OTP's supervisors do). Reported as matching the
            // store, so the next checkpoint removes the row.
            let k = kernel(&lua);
            let handled = k
                .procs
                .get(&serial)
                .map_or(0, |p| p.messages_handled as u64);
            return Ok(Some((serial, handled, version)));
        }
        let json: Json = serde_json::from_str(&row.state_json)
            .map_err(|e| format!("the checkpoint is not valid JSON: {e}"))?;
        let mut state = json_to_lua(&lua, &json).map_err(|e| e.to_string())?;
        let migrated = row.module_version != version;
        if migrated {
            let code_change: Option<Function> = table
                .as_ref()
                .and_then(|t| t.raw_get("code_change").ok())
                .flatten();
            if let Some(f) = code_change {
                // A checkpoint from a newer version than the one running
                // (a rollback committed after it, or a canary rolled back by
                // the restart) is a downgrade: `code_change` is told so as a
                // rollback tells it, `{ down = <old version> }`.
                let old_vsn = if row.module_version > version {
                    let t = lua
                        .create_table()
                        .and_then(|t| t.raw_set("down", row.module_version).map(|()| t))
                        .map_err(|e| format!("could not describe the old version: {e}"))?;
                    Value::Table(t)
                } else {
                    Value::Number(f64::from(row.module_version))
                };
                watch.arm_for_host_code();
                let result = f.call::<Value>((old_vsn, state, Value::Nil));
                let timed_out = watch.disarm_host_code();
                state = match result {
                    Ok(v) => v,
                    Err(_) if timed_out => {
                        return Err(format!(
                            "code_change from version {} ran out of time",
                            row.module_version
                        ))
                    }
                    Err(e) => {
                        return Err(format!(
                            "code_change from version {} failed: {}",
                            row.module_version,
                            e.to_string().lines().next().unwrap_or_default()
                        ))
                    }
                };
            }
        }
        let k = kernel(&lua);
        k.states
            .raw_set(serial, state)
            .map_err(|e| format!("could not store the state: {e}"))?;
        let handled = k
            .procs
            .get(&serial)
            .map_or(0, |p| p.messages_handled as u64);
        Ok((!migrated).then_some((serial, handled, version)))
    }
}

/// Whether a module is a supervisor (`behaviour = "supervisor"`): its
/// state is its children's pids and specs, rebuilt by `init`, never
/// checkpointed.
fn is_supervisor(t: &mlua::Table) -> bool {
    matches!(
        t.raw_get::<Value>("behaviour"),
        Ok(Value::String(s)) if s.to_str().is_ok_and(|s| &*s == "supervisor")
    )
}
