//! The Luau VM of one sandbox: creation, the guest environment, compilation.
//!
//! Invariants:
//! * Only bytecode produced by `compile` in this process is ever loaded
//!   (Luau does not verify bytecode).
//! * Guest chunks run with one shared, read-only environment (`GLOBALS`) that
//!   holds exactly the safe builtins, `graft`, `require` and the capabilities
//!   granted to the sandbox: an ungranted name does not exist.
//! * The prelude's private tables (process states, job markers, worker
//!   threads) are reachable only from Rust and from the prelude itself.
//! * The builtin libraries and the string metatable are read-only: every
//!   process, the prelude and the supervisor share them.
//!
//! Layout: `compile` (source → bytecode), `env` (the guest environment,
//! host functions), `fault` (the limits Luau enforced on a dead thread, read
//! from its status and depth, never from an error's text), `parse` (bounded full_moon parsing, shared with the
//! static analysis of [`crate::upgrade`]). This layer imports only
//! `error`, `diagnostic` and `value`: the kernel and the upgrade engine build
//! on it, never the reverse.

mod api;
pub(crate) mod compile;
pub(crate) mod env;
mod fault;
pub(crate) mod parse;

use std::collections::BTreeMap;
use std::sync::Arc;

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaOptions, StdLib, Table, Value};

pub(crate) use crate::value::{marker, marker_of, MARK_AWAIT, MARK_CLOSED, MARK_DONE};
pub use api::{definitions, ApiItem, GRAFT_API};
pub(crate) use compile::compile;
pub use compile::{coverage_enabled, enable_coverage, COMPILE_TIMEOUT};
pub(crate) use env::{
    call_guarded, globals_for, BlockingStart, CallerOf, HostEntry, HostTable, StartBlocking,
    OUTSIDE_PROCESS,
};
pub(crate) use env::{panic_text, PidText};
pub use env::{ContextHostFn, HostCall, HostFn, LUAU_SAFE_GLOBALS};
pub(crate) use fault::{fault_of, Fault};

const PRELUDE: &str = include_str!("prelude.luau");
const SUPERVISOR: &str = include_str!("../supervision/supervisor.luau");

/// Handles into the prelude, kept by the sandbox runtime.
pub(crate) struct Vm {
    pub lua: Lua,
    pub worker: Function,
    pub failure_of: Function,
    pub migrate_all: Function,
    pub commit_states: Function,
    pub validate_supervisor: Function,
    pub states: Table,
    /// The prelude's mirror of current module tables, by module index + 1.
    pub modules: Table,
    pub globals: Table,
    pub set_view: Function,
}

/// A sandbox's host functions and the kernel hooks they need: who is
/// calling, and how a blocking call is handed to the node.
pub(crate) struct HostHooks<'a> {
    pub fns: &'a HostTable,
    pub caller: CallerOf,
    pub start_blocking: StartBlocking,
}

impl Vm {
    /// Creates the VM: libraries, prelude, guest environment, supervisor.
    /// `install_natives` fills the natives table the prelude receives.
    /// `max_value_bytes` caps the JSON form of a host function's argument.
    pub fn new(
        grants: &[String],
        host: HostHooks<'_>,
        max_message_bytes: usize,
        max_value_bytes: usize,
        install_natives: impl FnOnce(&Lua, &Table) -> mlua::Result<()>,
        pid_text: PidText,
    ) -> mlua::Result<Vm> {
        let lua = Lua::new_with(libraries(), LuaOptions::new())?;
        // Everything built here lives as long as the VM: collecting while
        // building would only trace it (a quarter of creation time).
        lua.gc_stop();
        env::freeze_builtins(&lua)?;
        let real = trusted_globals(&lua)?;

        let natives = lua.create_table()?;
        natives.raw_set("DONE", marker(MARK_DONE))?;
        natives.raw_set("AWAIT", marker(MARK_AWAIT))?;
        natives.raw_set("CLOSED", marker(MARK_CLOSED))?;
        natives.raw_set("max_message_bytes", max_message_bytes as f64)?;
        natives.raw_set("fault", lua.create_function(fault::fault_native)?)?;
        install_natives(&lua, &natives)?;

        let prelude: Table =
            load_trusted(&lua, "=graft.prelude", PRELUDE, &real)?.call(natives.clone())?;
        let view_fns = require_view(&lua, &real)?;
        let host = env::HostFunctionsIn {
            fns: host.fns,
            caller: host.caller,
            start_blocking: host.start_blocking,
            pid_text,
            max_value_bytes,
        };
        let globals = env::guest_globals(
            &lua,
            &real,
            &prelude,
            view_fns.raw_get::<Function>("require")?,
            grants,
            host,
        )?;
        start_supervisor(&lua, &real, &prelude, natives)?;

        lua.gc_restart();
        Ok(Vm {
            worker: prelude.raw_get("worker")?,
            failure_of: prelude.raw_get("failure_of")?,
            migrate_all: prelude.raw_get("migrate_all")?,
            commit_states: prelude.raw_get("commit_states")?,
            validate_supervisor: prelude.raw_get("validate_supervisor")?,
            states: prelude.raw_get("states")?,
            modules: prelude.raw_get("modules")?,
            set_view: view_fns.raw_get("set_view")?,
            globals,
            lua,
        })
    }

    /// Loads bytecode compiled by [`compile`] as a function in the guest environment.
    pub fn load_guest(&self, chunk_name: &str, bytecode: &[u8]) -> mlua::Result<Function> {
        load_in(
            &self.lua,
            &format!("={chunk_name}"),
            bytecode,
            &self.globals,
        )
    }
}

/// Loads `bytecode` as a function whose environment is `env`, with `env`
/// installed as the loading thread's globals meanwhile: Luau resolves a
/// chunk's imports (`graft.call`, `string.format`) once, at load, against
/// those globals when they are safeenv, and otherwise looks each one up
/// every time it runs. `env` is safeenv and never changes afterwards (the
/// guest globals are read-only), so the resolved values stay right. The
/// real globals are put back before this returns, error or not.
fn load_in(lua: &Lua, name: &str, bytecode: &[u8], env: &Table) -> mlua::Result<Function> {
    let real = lua.globals();
    lua.set_globals(env.clone())?;
    let loaded = lua
        .load(bytecode)
        .set_name(name)
        .set_mode(ChunkMode::Binary)
        .set_environment(env.clone())
        .into_function();
    lua.set_globals(real)?;
    loaded
}

/// The Luau libraries a sandbox's VM opens (the guest sees a subset, see
/// [`env`]).
fn libraries() -> StdLib {
    StdLib::COROUTINE
        | StdLib::TABLE
        | StdLib::STRING
        | StdLib::UTF8
        | StdLib::BIT
        | StdLib::MATH
        | StdLib::BUFFER
        | StdLib::VECTOR
        | StdLib::OS
        | StdLib::DEBUG
}

/// The environment of trusted code (prelude, `require`): a copy of the real
/// globals marked safeenv, so its builtin calls are fast calls. The real
/// globals stay unmarked: Luau resolves imports against them when a chunk
/// loads, and a safeenv mark there would pre-resolve guest imports such as
/// `math.random` to the real builtins.
fn trusted_globals(lua: &Lua) -> mlua::Result<Table> {
    let real = lua.create_table()?;
    for pair in lua.globals().pairs::<Value, Value>() {
        let (k, v) = pair?;
        real.raw_set(k, v)?;
    }
    real.set_safeenv(true);
    Ok(real)
}

/// `require(name)` and `set_view(table)`: `require` resolves through the
/// view the upgrade engine sets.
fn require_view(lua: &Lua, real: &Table) -> mlua::Result<Table> {
    load_trusted(
        lua,
        "=graft.require",
        "local view = {}\n\
         local function require(name)\n\
           if type(name) ~= 'string' then error('require expects a module name', 2) end\n\
           local m = view[name]\n\
           if m == nil then error(\"module '\" .. name .. \"' not found\", 2) end\n\
           return m\n\
         end\n\
         return { require = require, set_view = function(v) view = v end }",
        real,
    )?
    .call(())
}

/// Loads the built-in supervisor behaviour (in its own copy of the real
/// globals) and hands it to the prelude.
fn start_supervisor(lua: &Lua, real: &Table, prelude: &Table, natives: Table) -> mlua::Result<()> {
    let graft: Table = prelude.raw_get("graft")?;
    let supervisor_env = lua.create_table()?;
    for pair in real.pairs::<Value, Value>() {
        let (k, v) = pair?;
        supervisor_env.raw_set(k, v)?;
    }
    supervisor_env.set_safeenv(true);
    let supervisor: Table = load_trusted(lua, "=graft.supervisor", SUPERVISOR, &supervisor_env)?
        .call((
            graft,
            natives,
            prelude.raw_get::<Function>("await_shutdown")?,
        ))?;
    prelude
        .raw_get::<Function>("set_supervisor")?
        .call::<()>(supervisor)
}

fn load_trusted(
    lua: &Lua,
    name: &str,
    source: &'static str,
    env: &Table,
) -> mlua::Result<Function> {
    // Trusted sources are constants: compile each once per process.
    static CACHE: std::sync::Mutex<BTreeMap<usize, Arc<Vec<u8>>>> =
        std::sync::Mutex::new(BTreeMap::new());
    let key = source.as_ptr() as usize;
    let cached = CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    let bytecode = match cached {
        Some(b) => b,
        None => {
            let b = Arc::new(compile::trusted_compiler().compile(source)?);
            CACHE
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, b.clone());
            b
        }
    };
    load_in(lua, name, &bytecode[..], env)
}
