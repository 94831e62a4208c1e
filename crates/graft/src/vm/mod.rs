//! The Luau VM of one sandbox: creation, the guest environment, compilation.
//!
//! Invariants:
//! * Only bytecode produced by [`compile`] in this process is ever loaded
//!   (Luau does not verify bytecode).
//! * Guest chunks run with one shared, read-only environment (`GLOBALS`) that
//!   holds exactly the safe builtins, `graft`, `require` and the capabilities
//!   granted to the sandbox: an ungranted name does not exist.
//! * The prelude's private tables (process states, job markers, worker
//!   threads) are reachable only from Rust and from the prelude itself.
//! * The builtin libraries and the string metatable are read-only: every
//!   process, the prelude and the supervisor share them.

use std::collections::BTreeMap;
use std::sync::Arc;

use mlua::chunk::{ChunkMode, Compiler};
use mlua::{Function, LightUserData, Lua, LuaOptions, StdLib, Table, Value};

use crate::diagnostic::Diagnostic;
use crate::error::{Error, Result};

/// Job markers and other internal light userdata live at and above this value;
/// pids stay below it.
pub(crate) const MARKER_BASE: u64 = 1 << 62;
pub(crate) const MARK_DONE: u64 = MARKER_BASE + 1;
pub(crate) const MARK_AWAIT: u64 = MARKER_BASE + 3;

pub(crate) fn marker(v: u64) -> Value {
    Value::LightUserData(LightUserData(v as usize as *mut std::ffi::c_void))
}

pub(crate) fn marker_of(v: &Value) -> Option<u64> {
    match v {
        Value::LightUserData(ud) if (ud.0 as usize as u64) >= MARKER_BASE => {
            Some(ud.0 as usize as u64)
        }
        _ => None,
    }
}

const PRELUDE: &str = include_str!("prelude.luau");
const SUPERVISOR: &str = include_str!("../supervision/supervisor.luau");

/// Globals every sandbox gets: the Luau builtins the static analysis accepts
/// ([`LUAU_SAFE_GLOBALS`](crate::upgrade::analysis::LUAU_SAFE_GLOBALS)) plus
/// Graft's own `graft` and `require`. `os` and `math.random` are capabilities.
pub fn safe_globals() -> impl Iterator<Item = &'static str> {
    crate::upgrade::analysis::LUAU_SAFE_GLOBALS
        .iter()
        .copied()
        .chain(["graft", "require"])
}

/// A host function an embedding app grants to a sandbox: JSON arguments in,
/// JSON result (or an error message) out. It runs on the sandbox's scheduler
/// thread, inside the calling handler: keep it quick.
pub type HostFn = Arc<
    dyn Fn(Vec<serde_json::Value>) -> std::result::Result<serde_json::Value, String> + Send + Sync,
>;

/// How a pid reads in JSON handed to the host (`"<module.N>"`); the sandbox
/// layer supplies it, since module names live in its kernel.
pub(crate) type PidText = fn(&Lua, crate::value::Pid) -> String;

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

/// The text of a panic payload (a host function's, or one caught on Luau's
/// C stack).
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Compiler settings shared by every compile: keep line info for tracebacks.
fn compiler() -> Compiler {
    // `math.random` is a capability: its table slot may hold a stub, so the
    // compiler must not turn calls to it into the builtin fast call.
    Compiler::new()
        .set_optimization_level(1)
        .set_debug_level(1)
        .set_disabled_builtins(["math.random", "math.randomseed"])
}

/// Compiles a module's source to bytecode (pure: no VM involved, so it can run
/// on any thread). Errors carry module, file, line, column and a code frame.
pub fn compile(module: &str, file: &str, source: &str, max_source_bytes: usize) -> Result<Vec<u8>> {
    if source.len() > max_source_bytes {
        return Err(Error::Compile {
            diagnostics: vec![Diagnostic::new(
                "too_large",
                module,
                file,
                "",
                0,
                0,
                format!(
                    "source is {} bytes; the sandbox accepts at most {max_source_bytes} (limits.max_source_bytes)",
                    source.len()
                ),
            )],
        });
    }
    match compile_bounded(source, module, file)? {
        Ok(bytecode) => Ok(bytecode),
        Err(e) => {
            let text = e.to_string();
            let (line, message) = parse_luau_error(&text);
            // Luau reports lines only; full_moon finds the column when it
            // agrees (and the source is shallow enough to parse again).
            let column = crate::upgrade::analysis::syntax_error_column(source, line).unwrap_or(1);
            Err(Error::Compile {
                diagnostics: vec![Diagnostic::new(
                    "syntax", module, file, source, line, column, message,
                )],
            })
        }
    }
}

/// Sources up to this size compile inline (microseconds); bigger ones compile
/// on a helper thread under [`COMPILE_TIMEOUT`].
const INLINE_COMPILE_BYTES: usize = 64 * 1024;
/// Wall-clock limit for compiling one module. Compiler memory is bounded by
/// `max_source_bytes` (it grows linearly with the source).
pub const COMPILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn compile_bounded(source: &str, module: &str, file: &str) -> Result<mlua::Result<Vec<u8>>> {
    if source.len() <= INLINE_COMPILE_BYTES {
        return Ok(compiler().compile(source));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = source.to_owned();
    std::thread::Builder::new()
        .name("graft-compile".into())
        .spawn(move || {
            let _ = tx.send(compiler().compile(&owned));
        })
        .map_err(|e| Error::Luau(format!("cannot start a compile thread: {e}")))?;
    rx.recv_timeout(COMPILE_TIMEOUT)
        .map_err(|_| Error::Compile {
            diagnostics: vec![Diagnostic::new(
                "too_slow",
                module,
                file,
                "",
                0,
                0,
                format!(
                    "compiling took longer than {} s; split the module",
                    COMPILE_TIMEOUT.as_secs()
                ),
            )],
        })
}

/// Splits `...:LINE: message` from a Luau compile error.
fn parse_luau_error(text: &str) -> (usize, String) {
    let text = text.strip_prefix("syntax error: ").unwrap_or(text);
    // Luau's compiler says `LINE: message`; a chunk name may precede it.
    let text = text.strip_prefix(':').unwrap_or(text);
    if let Some((line, msg)) = text.split_once(':') {
        if let Ok(n) = line.trim().parse::<usize>() {
            return (n, msg.trim().to_owned());
        }
    }
    (1, text.trim().to_owned())
}

impl Vm {
    /// Creates the VM: libraries, prelude, guest environment, supervisor.
    /// `install_natives` fills the natives table the prelude receives.
    /// `max_value_bytes` caps the JSON form of a host function's argument.
    pub fn new(
        grants: &[String],
        host_fns: &BTreeMap<String, HostFn>,
        max_message_bytes: usize,
        max_value_bytes: usize,
        install_natives: impl FnOnce(&Lua, &Table) -> mlua::Result<()>,
        pid_text: PidText,
    ) -> mlua::Result<Vm> {
        let libs = StdLib::COROUTINE
            | StdLib::TABLE
            | StdLib::STRING
            | StdLib::UTF8
            | StdLib::BIT
            | StdLib::MATH
            | StdLib::BUFFER
            | StdLib::VECTOR
            | StdLib::OS
            | StdLib::DEBUG;
        let lua = Lua::new_with(libs, LuaOptions::new())?;
        // Everything built here lives as long as the VM: collecting while
        // building would only trace it (a quarter of creation time).
        lua.gc_stop();
        freeze_builtins(&lua)?;
        let globals_of_lua = lua.globals();
        // Trusted code (prelude, supervisor) runs in a copy of the real
        // globals marked safeenv, so its builtin calls are fast calls. The
        // real globals stay unmarked: Luau resolves imports against them when
        // a chunk loads, and a safeenv mark there would pre-resolve guest
        // imports such as `math.random` to the real builtins.
        let real = lua.create_table()?;
        for pair in globals_of_lua.pairs::<Value, Value>() {
            let (k, v) = pair?;
            real.raw_set(k, v)?;
        }
        real.set_safeenv(true);

        let natives = lua.create_table()?;
        natives.raw_set("DONE", marker(MARK_DONE))?;
        natives.raw_set("AWAIT", marker(MARK_AWAIT))?;
        natives.raw_set("max_message_bytes", max_message_bytes as f64)?;
        install_natives(&lua, &natives)?;

        let prelude: Table =
            load_trusted(&lua, "=graft.prelude", PRELUDE, &real)?.call(natives.clone())?;
        let graft: Table = prelude.raw_get("graft")?;

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
        // math without random unless granted: a copy, since the real one is shared.
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
        globals.raw_set("math", guest_math)?;
        if grants.iter().any(|g| g == "clock") {
            let os: Table = real.raw_get("os")?;
            let guest_os = lua.create_table()?;
            for f in ["time", "clock", "date", "difftime"] {
                guest_os.raw_set(f, os.raw_get::<Value>(f)?)?;
            }
            guest_os.set_readonly(true);
            globals.raw_set("os", guest_os)?;
        }
        install_host_functions(&lua, &globals, host_fns, pid_text, max_value_bytes)?;

        // `require(name)` resolves through the view the upgrade engine sets.
        let view_fns: Table = load_trusted(
            &lua,
            "=graft.require",
            "local view = {}\n\
             local function require(name)\n\
               if type(name) ~= 'string' then error('require expects a module name', 2) end\n\
               local m = view[name]\n\
               if m == nil then error(\"module '\" .. name .. \"' not found\", 2) end\n\
               return m\n\
             end\n\
             return { require = require, set_view = function(v) view = v end }",
            &real,
        )?
        .call(())?;
        globals.raw_set("require", view_fns.raw_get::<Function>("require")?)?;
        globals.set_readonly(true);
        globals.set_safeenv(true);

        let supervisor_env = lua.create_table()?;
        for pair in real.pairs::<Value, Value>() {
            let (k, v) = pair?;
            supervisor_env.raw_set(k, v)?;
        }
        supervisor_env.set_safeenv(true);
        let supervisor: Table =
            load_trusted(&lua, "=graft.supervisor", SUPERVISOR, &supervisor_env)?.call((
                graft,
                natives,
                prelude.raw_get::<Function>("await_shutdown")?,
            ))?;
        prelude
            .raw_get::<Function>("set_supervisor")?
            .call::<()>(supervisor)?;

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
        self.lua
            .load(bytecode)
            .set_name(format!("={chunk_name}"))
            .set_mode(ChunkMode::Binary)
            .set_environment(self.globals.clone())
            .into_function()
    }
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
fn freeze_builtins(lua: &Lua) -> mlua::Result<()> {
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
            let b = Arc::new(compiler().compile(source)?);
            CACHE
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, b.clone());
            b
        }
    };
    lua.load(&bytecode[..])
        .set_name(name)
        .set_mode(ChunkMode::Binary)
        .set_environment(env.clone())
        .into_function()
}

/// Exposes `"kv.get"`-style host functions as `kv.get` in the guest globals.
fn install_host_functions(
    lua: &Lua,
    globals: &Table,
    host_fns: &BTreeMap<String, HostFn>,
    pid_text: PidText,
    max_value_bytes: usize,
) -> mlua::Result<()> {
    let mut namespaces: BTreeMap<&str, Table> = BTreeMap::new();
    for (name, f) in host_fns {
        let f = f.clone();
        let display = name.clone();
        let name_for_log = name.clone();
        let func = lua.create_function(move |lua, args: mlua::MultiValue| {
            let mut json_args = Vec::with_capacity(args.len());
            for (i, a) in args.iter().enumerate() {
                let what = format!("argument {}", i + 1);
                match crate::value::lua_to_json(a, &what, max_value_bytes, &|p| pid_text(lua, p)) {
                    Ok(j) => json_args.push(j),
                    Err(e) => return Ok((Value::Nil, Some(format!("{display}: {e}")))),
                }
            }
            // A host function is the embedder's code: a panic in it is an
            // error for the guest that called it, never an unwind through
            // the VM's C stack.
            let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(json_args)));
            match called {
                Ok(Ok(v)) => Ok((crate::value::json_to_lua(lua, &v)?, None)),
                Ok(Err(msg)) => Ok((Value::Nil, Some(format!("{display}: {msg}")))),
                Err(payload) => {
                    let why = panic_text(&*payload);
                    let name: &str = &name_for_log;
                    tracing::error!(
                        function = name,
                        panic = why.as_str(),
                        "a host function panicked"
                    );
                    Ok((Value::Nil, Some(format!("{display}: panicked: {why}"))))
                }
            }
        })?;
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

/// Names a module may use as globals in a sandbox with these grants and host functions.
pub fn known_globals(grants: &[String], host_fns: &BTreeMap<String, HostFn>) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_errors_name_the_line_and_keep_a_frame() {
        let err = compile(
            "m",
            "src/m.luau",
            "local a = 1\nlocal b = 2\nlocal c = = 3\n",
            1 << 20,
        )
        .unwrap_err();
        let Error::Compile { diagnostics } = err else {
            panic!("expected a compile error")
        };
        let d = &diagnostics[0];
        assert_eq!(d.line, 3, "{d:?}");
        assert_eq!(d.module, "m");
        assert!(d.frame.contains("local c = = 3"), "{}", d.frame);
    }

    #[test]
    fn large_sources_compile_on_a_helper_thread_with_the_same_diagnostics() {
        let mut src = String::from("local t = {}\n");
        for i in 0..5000 {
            src.push_str(&format!("t[{i}] = {i} * 2 -- padding padding\n"));
        }
        assert!(src.len() > INLINE_COMPILE_BYTES);
        assert!(compile("big", "big.luau", &format!("{src}return t"), 1 << 22).is_ok());
        let err = compile(
            "big",
            "big.luau",
            &format!("{src}local = 1\nreturn t"),
            1 << 22,
        )
        .unwrap_err();
        let Error::Compile { diagnostics } = err else {
            panic!("expected a compile error")
        };
        assert_eq!(diagnostics[0].line, 5002);
    }

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

    #[test]
    fn oversize_sources_are_refused_before_compiling() {
        let err = compile("m", "m.luau", &"-- x\n".repeat(100), 64).unwrap_err();
        assert!(err.to_string().contains("max_source_bytes"), "{err}");
    }

    #[test]
    fn luau_error_text_is_split_into_line_and_message() {
        assert_eq!(
            parse_luau_error(":3: Expected identifier"),
            (3, "Expected identifier".into())
        );
        assert_eq!(
            parse_luau_error("syntax error: 7: Expected 'end'"),
            (7, "Expected 'end'".into())
        );
        assert_eq!(parse_luau_error("weird"), (1, "weird".into()));
    }
}
