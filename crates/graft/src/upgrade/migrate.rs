//! Step 5 of the reload transaction: state migrations, run on copies.
//!
//! Invariant: a migration writes only into its own side tables (one per
//! module: the serials and the new states); [`Migration::commit`] is the
//! only place they reach the live states, at the commit point.

use std::collections::BTreeSet;

use mlua::{Buffer, Function, Table, Value};
use serde_json::Value as Json;

use super::guest::{aborted, chunk_of, failure_in, guest_text, line_in};
use super::{module_kind, Direction, Engine, Request, RustStateHandler, StateHandler};
use crate::error::{Error, ReloadStep, Result};
use crate::kernel::kernel;
use crate::vm::Vm;

/// The migrated states of a reload, not yet live.
pub(super) struct Migration {
    /// Per module: the serials migrated (see [`serial_buffer`]) and the
    /// side table of new states.
    pending: Vec<(Buffer, Table)>,
    /// Processes whose state was migrated.
    pub processes: usize,
}

impl Migration {
    /// Stores the new states into the live state slots (prelude's
    /// `commit_states`): the first store of the commit point.
    pub(super) fn commit(&self, vm: &Vm) -> Result<()> {
        for (serials, states) in &self.pending {
            vm.commit_states
                .call::<()>((serials.clone(), states.clone()))?;
        }
        Ok(())
    }
}

/// One module's processes to migrate.
struct Batch<'t> {
    name: &'t str,
    table: &'t Table,
    serials: Vec<u64>,
    old_vsn: Value,
    new_vsn: u32,
}

impl Engine {
    /// Migrates the states of processes whose module source changed, on
    /// copies, with the request's state handler or the module's
    /// `code_change`. The first failure aborts the reload.
    pub(super) fn migrate_all(
        &self,
        rq: &Request<'_>,
        new_tables: &[(String, Table)],
        changed_names: &BTreeSet<String>,
    ) -> Result<Migration> {
        let handler_fn = match &rq.opts.state_handler {
            Some(StateHandler::Luau(src)) => Some(load_state_handler(rq.vm, src)?),
            _ => None,
        };
        let mut migration = Migration {
            pending: Vec::new(),
            processes: 0,
        };
        for (name, table) in new_tables {
            if !changed_names.contains(name) {
                continue;
            }
            let Some(batch) = self.batch(rq, name, table)? else {
                continue;
            };
            if let Some(done) = migrate_batch(rq, &batch, handler_fn.as_ref())? {
                migration.processes += batch.serials.len();
                migration.pending.push(done);
            }
        }
        Ok(migration)
    }

    /// The live processes of `name`, with the version numbers their
    /// migration sees; `None` when there is nothing to migrate.
    fn batch<'t>(
        &self,
        rq: &Request<'_>,
        name: &'t str,
        table: &'t Table,
    ) -> Result<Option<Batch<'t>>> {
        let lua = &rq.vm.lua;
        let (serials, old_vsn) = {
            let k = kernel(lua);
            let mid = k.module_id(name).expect("interned");
            let mut serials: Vec<u64> = k
                .procs
                .values()
                .filter(|p| p.pid.module_index() == mid)
                .map(|p| p.pid.serial())
                .collect();
            serials.sort_unstable();
            (serials, k.module_versions[mid as usize])
        };
        if serials.is_empty() || old_vsn == 0 {
            return Ok(None);
        }
        let old_vsn = match rq.direction {
            Direction::Up => Value::Number(old_vsn as f64),
            Direction::Down => {
                let t = lua.create_table()?;
                t.raw_set("down", old_vsn)?;
                Value::Table(t)
            }
        };
        Ok(Some(Batch {
            name,
            table,
            serials,
            old_vsn,
            new_vsn: match rq.by_name.get(name) {
                Some(p) => self.target_version(p, rq.target_versions),
                None => self.modules.get(name).map_or(1, |h| h.next + 1),
            },
        }))
    }
}

/// The serials of a batch as the prelude's `migrate_all` and
/// `commit_states` read them: a Luau buffer of little-endian f64s. One
/// allocation, where a table of 10,000 serials cost 10,000 protected stores
/// (about 1 ms, a sixth of such a reload).
fn serial_buffer(lua: &mlua::Lua, serials: &[u64]) -> mlua::Result<Buffer> {
    let bytes: Vec<u8> = serials
        .iter()
        .flat_map(|s| (*s as f64).to_le_bytes())
        .collect();
    lua.create_buffer(bytes)
}

/// Migrates one module's processes into a side table: `Some((serials,
/// states))`, or `None` when the module keeps its states as they are
/// (supervisors, or no handler and no `code_change`).
fn migrate_batch(
    rq: &Request<'_>,
    b: &Batch<'_>,
    handler_fn: Option<&Function>,
) -> Result<Option<(Buffer, Table)>> {
    let (vm, opts) = (rq.vm, rq.opts);
    let lua = &vm.lua;
    let out = lua.create_table_with_capacity(b.serials.len() + 1, 0)?;
    // Built before the commit point, so the commit allocates nothing.
    let serial_table = serial_buffer(lua, &b.serials)?;
    let is_supervisor = module_kind(b.table) == "supervisor";
    let code_change: Option<Function> = b.table.raw_get("code_change").ok().flatten();
    let luau = |f: &Function, is_handler: bool| {
        let args = LuauMigration {
            serial_table: &serial_table,
            old_vsn: &b.old_vsn,
            new_vsn: b.new_vsn,
            extra: &opts.extra,
            is_handler,
            out: &out,
        };
        migrate_with_luau(vm, f, args)
    };
    let result = match (&opts.state_handler, handler_fn, code_change) {
        (Some(StateHandler::Rust(f)), _, _) if !is_supervisor => {
            migrate_with_rust(vm, f, &b.serials, &b.old_vsn, b.new_vsn, &opts.extra, &out)
        }
        (_, Some(f), _) if !is_supervisor => luau(f, true),
        (_, _, Some(f)) if !is_supervisor => luau(&f, false),
        _ => return Ok(None), // no migration: states are kept as they are
    };
    if let Err((index, message)) = result {
        return Err(migration_failed(rq, b, index, &message));
    }
    Ok(Some((serial_table, out)))
}

/// The `migrate` abort of process `index` of `b`.
fn migration_failed(rq: &Request<'_>, b: &Batch<'_>, index: usize, message: &str) -> Error {
    let k = kernel(&rq.vm.lua);
    let process = b
        .serials
        .get(index)
        .and_then(|s| k.procs.get(s))
        .map(|p| k.pid_string(p.pid));
    // A state handler's errors are in its own source, not the module's.
    let line = line_in(&chunk_of(b.name, &rq.by_name), message, "");
    let message = guest_text(message);
    Error::ReloadAborted {
        step: ReloadStep::Migrate,
        module: Some(b.name.to_owned()),
        process: process.clone(),
        line,
        column: None,
        message: format!(
            "state migration of {} ({} of {}) failed: {message}",
            process.unwrap_or_default(),
            index + 1,
            b.serials.len()
        ),
    }
}

/// Evaluates a Luau state handler's source to its function.
fn load_state_handler(vm: &Vm, src: &str) -> Result<Function> {
    const CHUNK: &str = "state_handler";
    let bytecode = super::prepare::compile_source(CHUNK, "state_handler.luau", src, 1 << 20)?;
    // Lines are in the handler's source: there is no module.
    let abort =
        |message: String, line: Option<u32>| aborted(ReloadStep::StateHandler, None, line, message);
    let chunk = vm
        .load_guest(CHUNK, &bytecode)
        .map_err(|e| abort(e.to_string(), None))?;
    let watch = kernel(&vm.lua).watch.clone();
    watch.arm_for_host_code();
    let r = chunk.call::<Value>(());
    watch.disarm_host_code();
    match r {
        Ok(Value::Function(f)) => Ok(f),
        Ok(other) => Err(abort(
            format!(
                "state_handler must evaluate to a function(old_state, old_vsn, new_vsn, extra), got a {}",
                other.type_name()
            ),
            None,
        )),
        Err(e) => {
            let (message, line) = failure_in(&e, CHUNK);
            Err(abort(message, line))
        }
    }
}

/// The arguments of prelude's `migrate_all` besides the function.
struct LuauMigration<'a> {
    serial_table: &'a Buffer,
    old_vsn: &'a Value,
    new_vsn: u32,
    extra: &'a Json,
    /// Whether `f` is the request's state handler (else `code_change`).
    is_handler: bool,
    out: &'a Table,
}

/// Runs `f` over every process in the VM (prelude's `migrate_all`), under the
/// sandbox's CPU budget. `Err((index, message))` names the first failure.
fn migrate_with_luau(
    vm: &Vm,
    f: &Function,
    a: LuauMigration<'_>,
) -> std::result::Result<(), (usize, String)> {
    let lua = &vm.lua;
    let extra = crate::value::json_to_lua(lua, a.extra).map_err(|e| (0, e.to_string()))?;
    let watch = kernel(lua).watch.clone();
    watch.arm_for_host_code();
    let r = vm.migrate_all.call::<f64>((
        f.clone(),
        a.serial_table.clone(),
        a.old_vsn.clone(),
        a.new_vsn,
        extra,
        a.is_handler,
        a.out.clone(),
    ));
    let timed_out = watch.disarm_host_code();
    match r {
        Ok(0.0) => Ok(()),
        Ok(i) => {
            let msg: Value = a.out.raw_get(1).unwrap_or(Value::Nil);
            let text = match msg {
                Value::String(s) => s.to_string_lossy(),
                // `migrate_all` gives text; never run a guest `__tostring`
                // here, where no CPU watch is armed.
                other => format!("a {} was raised", other.type_name()),
            };
            let text = if timed_out {
                format!("timeout ({text})")
            } else {
                text
            };
            Err((i as usize - 1, text))
        }
        Err(e) if timed_out => Err((0, format!("migration ran past handler_ms: {e}"))),
        Err(e) => Err((0, e.to_string())),
    }
}

/// Runs a Rust state handler over `serials`, converting each state to JSON
/// and back. `Err((index, message))` names the first failure.
fn migrate_with_rust(
    vm: &Vm,
    f: &RustStateHandler,
    serials: &[u64],
    old_vsn: &Value,
    new_vsn: u32,
    extra: &Json,
    out: &Table,
) -> std::result::Result<(), (usize, String)> {
    let lua = &vm.lua;
    let cap = kernel(lua).max_value_bytes;
    let old_vsn_json =
        crate::value::lua_to_json(old_vsn, "old_vsn", cap, &|p| format!("<{}>", p.serial()))
            .map_err(|e| (0, e.to_string()))?;
    for (i, serial) in serials.iter().enumerate() {
        let state: Value = vm.states.raw_get(*serial).map_err(|e| (i, e.to_string()))?;
        let json = {
            let k = kernel(lua);
            crate::value::lua_to_json(&state, "state", cap, &|p| k.pid_string(p))
                .map_err(|e| (i, e.to_string()))?
        };
        let new_state = f(json, old_vsn_json.clone(), new_vsn, extra).map_err(|e| (i, e))?;
        if new_state.is_null() {
            return Err((i, "returned no state".into()));
        }
        let v = crate::value::json_to_lua(lua, &new_state).map_err(|e| (i, e.to_string()))?;
        out.raw_set(i + 2, v).map_err(|e| (i, e.to_string()))?;
    }
    Ok(())
}
