//! The guest environment: the one shared, read-only global table every
//! guest chunk runs in.
//!
//! Invariants:
//! * The table holds exactly the safe builtins ([`LUAU_SAFE_GLOBALS`]),
//!   `graft`, `require` and the capabilities granted to the sandbox: an
//!   ungranted name does not exist (the static analysis refuses reads of it
//!   before a reload, this table refuses them at run time).
//! * The builtin libraries and the string metatable are read-only: every
//!   process, the prelude and the supervisor share them.
//! * A host function is called behind a panic barrier: the embedder's panic
//!   becomes an error for the calling guest, never an unwind through Luau's
//!   C stack.

use std::collections::BTreeMap;
use std::sync::Arc;

use mlua::{Function, Lua, Table, Value};

/// The Luau builtins a Graft sandbox exposes to every module, without any
/// grant.
///
/// Deliberately absent:
/// * `os`: in Luau it holds only `time`, `clock`, `date` and `difftime`, i.e.
///   the wall clock, which is a capability (granted as `clock`); it is known
///   only where granted.
/// * `collectgarbage`, `newproxy`, `getfenv`, `setfenv`, `loadstring`,
///   `load`, `dofile`, `loadfile`, `debug`, `_G`, `_ENV`: forbidden
///   constructs, refused by the static analysis
///   ([`crate::upgrade::analysis::analyze`]) even if the predicate accepts them.
/// * `gcinfo`: it reports the heap shared by every process of the sandbox,
///   so the sandbox does not install it.
/// * `graft` and `require`: provided by Graft itself, not Luau; the analysis
///   accepts them whatever the caller's predicate says.
///
/// `math` is listed although `math.random` is itself a capability: the
/// analysis works on global names, and the VM removes the field when
/// randomness is not granted.
pub const LUAU_SAFE_GLOBALS: &[&str] = &[
    "assert",
    "error",
    "ipairs",
    "next",
    "pairs",
    "pcall",
    "xpcall",
    "print",
    "rawequal",
    "rawget",
    "rawlen",
    "rawset",
    "select",
    "setmetatable",
    "getmetatable",
    "tonumber",
    "tostring",
    "type",
    "typeof",
    "unpack",
    "bit32",
    "buffer",
    "coroutine",
    "math",
    "string",
    "table",
    "utf8",
    "vector",
];

/// Globals every sandbox gets: the Luau builtins the static analysis accepts
/// ([`LUAU_SAFE_GLOBALS`]) plus Graft's own `graft` and `require`. `os` and
/// `math.random` are capabilities.
pub fn safe_globals() -> impl Iterator<Item = &'static str> {
    LUAU_SAFE_GLOBALS
        .iter()
        .copied()
        .chain(["graft", "require"])
}

/// A host function an embedding app grants to a sandbox: JSON arguments in,
/// JSON result (or an error message) out. Registered with
/// [`HostFunctions::function`](crate::HostFunctions::function), it runs on
/// the sandbox's scheduler thread, inside the calling handler: keep it quick
/// (register slow ones with [`HostFunctions::blocking`](crate::HostFunctions::blocking)).
pub type HostFn = Arc<
    dyn Fn(Vec<serde_json::Value>) -> std::result::Result<serde_json::Value, String> + Send + Sync,
>;

/// A host function that also receives its caller ([`HostCall`]); see
/// [`HostFunctions::function_with_context`](crate::HostFunctions::function_with_context)
/// and [`HostFunctions::blocking`](crate::HostFunctions::blocking).
pub type ContextHostFn = Arc<
    dyn for<'a> Fn(HostCall<'a>) -> std::result::Result<serde_json::Value, String> + Send + Sync,
>;

/// One call of a host function, with who made it.
#[derive(Debug)]
pub struct HostCall<'a> {
    /// The calling sandbox's id.
    pub sandbox: &'a str,
    /// The calling process's pid as the API shows it (`"<counter.1>"`).
    pub pid: &'a str,
    /// The arguments, converted to JSON.
    pub args: Vec<serde_json::Value>,
}

/// A registered host function and how it runs.
#[derive(Clone)]
pub(crate) enum HostEntry {
    /// Today's fast path: no caller context, on the scheduler thread.
    Quick(HostFn),
    /// On the scheduler thread, with the caller's context.
    WithContext(ContextHostFn),
    /// On the node's blocking pool; the calling process suspends meanwhile.
    Blocking(ContextHostFn),
}

/// Host functions by `"kv.get"`-style name.
pub(crate) type HostTable = BTreeMap<String, HostEntry>;

/// A blocking host function call the kernel hands to the node's pool.
pub(crate) struct BlockingStart {
    pub name: Arc<str>,
    pub f: ContextHostFn,
    pub args: Vec<serde_json::Value>,
}

/// Who is calling: the sandbox id and the current process's pid text
/// (`None` outside a process, e.g. in a module body); the kernel supplies it.
pub(crate) type CallerOf = fn(&Lua) -> Option<(Arc<str>, String)>;

/// Queues a blocking call for the current process and returns the token it
/// will be answered under (or why it cannot start); the kernel supplies it.
pub(crate) type StartBlocking = fn(&Lua, BlockingStart) -> std::result::Result<u64, String>;

/// How a pid reads in JSON handed to the host (`"<module.N>"`); the sandbox
/// layer supplies it, since module names live in its kernel.
pub(crate) type PidText = fn(&Lua, crate::value::VmPid) -> String;

/// Builds the guest globals from the trusted copy of the real globals
/// (`real`), the prelude's exports and the sandbox's grants, with `require`
/// as given. The table is returned read-only and marked safeenv.
pub(super) fn guest_globals(
    lua: &Lua,
    real: &Table,
    prelude: &Table,
    require: Function,
    grants: &[String],
    host: HostFunctionsIn<'_>,
) -> mlua::Result<Table> {
    let graft = graft_table(lua, &prelude.raw_get::<Table>("graft")?)?;
    let globals = lua.create_table()?;
    for name in safe_globals() {
        let v: Value = real.raw_get(name)?;
        if !v.is_nil() {
            globals.raw_set(name, v)?;
        }
    }
    globals.raw_set("graft", graft.clone())?;
    globals.raw_set("coroutine", prelude.raw_get::<Value>("coroutine")?)?;
    let log: Table = graft.raw_get("log")?;
    globals.raw_set("print", log.raw_get::<Function>("info")?)?;
    globals.raw_set("math", guest_math(lua, real, grants)?)?;
    if grants.iter().any(|g| g == "clock") {
        globals.raw_set("os", guest_os(lua, real)?)?;
    }
    let blocking_host: Function = prelude.raw_get("blocking_host")?;
    install_host_functions(lua, &globals, host, &blocking_host)?;
    globals.raw_set("require", require)?;
    globals.set_readonly(true);
    globals.set_safeenv(true);
    Ok(globals)
}

/// The guests' `graft`: exactly the keys of [`super::GRAFT_API`], taken
/// from the prelude's table, read-only. A key in one and not the other is
/// an error (no VM is built), so the definitions `graft types` writes
/// always describe what guests get.
fn graft_table(lua: &Lua, from_prelude: &Table) -> mlua::Result<Table> {
    let graft = lua.create_table()?;
    for item in super::GRAFT_API {
        let v: Value = from_prelude.raw_get(item.name)?;
        if v.is_nil() {
            return Err(mlua::Error::runtime(format!(
                "vm::GRAFT_API declares `graft.{}` but the prelude does not define it",
                item.name
            )));
        }
        graft.raw_set(item.name, v)?;
    }
    for pair in from_prelude.pairs::<Value, Value>() {
        let (k, _) = pair?;
        let declared = match &k {
            Value::String(s) => super::GRAFT_API
                .iter()
                .any(|i| s.as_bytes() == i.name.as_bytes()),
            _ => false,
        };
        if !declared {
            return Err(mlua::Error::runtime(format!(
                "the prelude defines `graft.{}` but vm::GRAFT_API does not declare it",
                k.to_string().unwrap_or_default()
            )));
        }
    }
    graft.set_readonly(true);
    Ok(graft)
}

/// The host functions of a sandbox and how their arguments cross into JSON.
pub(crate) struct HostFunctionsIn<'a> {
    /// `"kv.get"`-style names to functions.
    pub fns: &'a HostTable,
    /// The caller's context, for functions that take it.
    pub caller: CallerOf,
    /// Hands a blocking call to the node.
    pub start_blocking: StartBlocking,
    /// How pids read in their arguments.
    pub pid_text: PidText,
    /// The cap on one argument's JSON form.
    pub max_value_bytes: usize,
}

/// `math` without `random`/`randomseed` unless granted: a copy, since the
/// real one is shared with trusted code.
fn guest_math(lua: &Lua, real: &Table, grants: &[String]) -> mlua::Result<Table> {
    let math: Table = real.raw_get("math")?;
    let guest_math = lua.create_table()?;
    for pair in math.pairs::<Value, Value>() {
        let (k, v) = pair?;
        guest_math.raw_set(k, v)?;
    }
    if !grants.iter().any(|g| g == "random") {
        for f in ["random", "randomseed"] {
            let msg = format!(
                "math.{f} needs the `random` capability (graft.toml: [capabilities] grant = [\"random\"])"
            );
            let stub = lua.create_function(move |_, ()| -> mlua::Result<()> {
                Err(mlua::Error::runtime(msg.clone()))
            })?;
            guest_math.raw_set(f, stub)?;
        }
    }
    guest_math.set_readonly(true);
    Ok(guest_math)
}

/// The wall-clock part of `os`, for sandboxes granted `clock`.
fn guest_os(lua: &Lua, real: &Table) -> mlua::Result<Table> {
    let os: Table = real.raw_get("os")?;
    let guest_os = lua.create_table()?;
    for f in ["time", "clock", "date", "difftime"] {
        guest_os.raw_set(f, os.raw_get::<Value>(f)?)?;
    }
    guest_os.set_readonly(true);
    Ok(guest_os)
}

/// The builtin libraries, frozen in every VM.
const BUILTIN_LIBRARIES: [&str; 10] = [
    "string",
    "table",
    "math",
    "bit32",
    "buffer",
    "utf8",
    "vector",
    "coroutine",
    "os",
    "debug",
];

/// Makes the builtin libraries and the string metatable read-only. They are
/// shared by every process of the sandbox (and by the prelude and the
/// supervisor): a write through any alias (`local s = string`, `rawset`,
/// `getmetatable("").__index`) would change them for all of them. The
/// static analysis only sees writes through the global names.
pub(super) fn freeze_builtins(lua: &Lua) -> mlua::Result<()> {
    let globals = lua.globals();
    for name in BUILTIN_LIBRARIES {
        if let Value::Table(t) = globals.raw_get::<Value>(name)? {
            t.set_readonly(true);
        }
    }
    // Luau freezes the vector metatable itself; strings' is ours to freeze.
    if let Some(meta) = lua.type_metatable::<mlua::LuaString>() {
        meta.set_readonly(true);
    }
    Ok(())
}

/// Exposes `"kv.get"`-style host functions as `kv.get` in the guest globals.
/// A blocking one is the prelude's `blocking_host` wrapper around a native
/// that starts the call: only Luau code can suspend the calling handler.
fn install_host_functions(
    lua: &Lua,
    globals: &Table,
    host: HostFunctionsIn<'_>,
    blocking_host: &Function,
) -> mlua::Result<()> {
    let HostFunctionsIn {
        fns: host_fns,
        caller,
        start_blocking,
        pid_text,
        max_value_bytes,
    } = host;
    let mut namespaces: BTreeMap<&str, Table> = BTreeMap::new();
    for (name, entry) in host_fns {
        let entry = entry.clone();
        let display: Arc<str> = Arc::from(name.as_str());
        let func = lua.create_function(move |lua, args: mlua::MultiValue| {
            let mut json_args = Vec::with_capacity(args.len());
            for (i, a) in args.iter().enumerate() {
                let what = format!("argument {}", i + 1);
                match crate::value::lua_to_json(a, &what, max_value_bytes, &|p| pid_text(lua, p)) {
                    Ok(j) => json_args.push(j),
                    Err(e) => return Ok((Value::Nil, Some(format!("{display}: {e}")))),
                }
            }
            let called = match &entry {
                HostEntry::Quick(f) => call_guarded(&display, || f(json_args)),
                HostEntry::WithContext(f) => {
                    let Some((sandbox, pid)) = caller(lua) else {
                        return Ok((Value::Nil, Some(format!("{display}: {OUTSIDE_PROCESS}"))));
                    };
                    call_guarded(&display, || {
                        f(HostCall {
                            sandbox: &sandbox,
                            pid: &pid,
                            args: json_args,
                        })
                    })
                }
                HostEntry::Blocking(f) => {
                    let start = BlockingStart {
                        name: display.clone(),
                        f: f.clone(),
                        args: json_args,
                    };
                    // The token goes to the prelude's wrapper, which awaits it.
                    return match start_blocking(lua, start) {
                        Ok(token) => Ok((Value::Number(token as f64), None)),
                        Err(msg) => Ok((Value::Nil, Some(format!("{display}: {msg}")))),
                    };
                }
            };
            match called {
                Ok(v) => Ok((crate::value::json_to_lua(lua, &v)?, None)),
                Err(msg) => Ok((Value::Nil, Some(format!("{display}: {msg}")))),
            }
        })?;
        let func = if matches!(host_fns[name], HostEntry::Blocking(_)) {
            blocking_host.call::<Function>(func)?
        } else {
            func
        };
        match name.split_once('.') {
            Some((ns, field)) => {
                let t = match namespaces.get(ns) {
                    Some(t) => t.clone(),
                    None => {
                        let t = lua.create_table()?;
                        namespaces.insert(ns, t.clone());
                        t
                    }
                };
                t.raw_set(field, func)?;
            }
            None => globals.raw_set(name.as_str(), func)?,
        }
    }
    for (ns, t) in namespaces {
        // A missing function in a granted namespace is named in the error.
        let meta = lua.create_table()?;
        let ns_name = ns.to_owned();
        let missing =
            lua.create_function(move |_, (_t, key): (Table, String)| -> mlua::Result<()> {
                Err(mlua::Error::runtime(format!(
                    "`{ns_name}.{key}` is not a host function granted to this sandbox"
                )))
            })?;
        meta.raw_set("__index", missing)?;
        t.set_metatable(Some(meta))?;
        t.set_readonly(true);
        globals.raw_set(ns, t)?;
    }
    Ok(())
}

/// Why a host function that needs its caller cannot run: no process is.
pub(crate) const OUTSIDE_PROCESS: &str = "can only be called from a process's callback";

/// Runs a host function behind a panic barrier: the embedder's panic is an
/// error (`panicked: …`) for the guest that called it, never an unwind
/// through the VM's C stack (or the death of a blocking pool thread).
pub(crate) fn call_guarded(
    name: &str,
    f: impl FnOnce() -> std::result::Result<serde_json::Value, String>,
) -> std::result::Result<serde_json::Value, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let why = panic_text(&*payload);
            tracing::error!(
                function = name,
                panic = why.as_str(),
                "a host function panicked"
            );
            Err(format!("panicked: {why}"))
        }
    }
}

/// Names a module may use as globals in a sandbox with these grants and host
/// functions, for any map of host functions (the node keeps every kind in
/// one [`HostTable`]).
pub(crate) fn globals_for<V>(grants: &[String], host_fns: &BTreeMap<String, V>) -> Vec<String> {
    let mut names: Vec<String> = safe_globals().map(str::to_owned).collect();
    if grants.iter().any(|g| g == "clock") {
        names.push("os".into());
    }
    for name in host_fns.keys() {
        let top = name.split('.').next().unwrap_or(name);
        if !names.iter().any(|n| n == top) {
            names.push(top.to_owned());
        }
    }
    names
}

/// The text of a panic's payload (`&str` or `String`), for logs and errors.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use mlua::{LuaOptions, StdLib};

    use super::*;

    #[test]
    fn builtins_and_the_string_metatable_are_frozen() {
        let lua = Lua::new_with(StdLib::STRING | StdLib::UTF8, LuaOptions::new()).unwrap();
        freeze_builtins(&lua).unwrap();
        for lib in ["string", "utf8"] {
            let t: Table = lua.globals().get(lib).unwrap();
            assert!(t.is_readonly(), "{lib}");
        }
        let meta = lua.type_metatable::<mlua::LuaString>().unwrap();
        assert!(meta.is_readonly());
        let err = lua
            .load("local s = string; s.upper = function() end")
            .exec()
            .unwrap_err();
        assert!(err.to_string().contains("readonly"), "{err}");
    }
}
