//! The test library: the `t` argument every test function receives.
//!
//! A test function runs in a *driver* VM of its own (plain Luau, the test
//! file compiled here), not inside the project's sandbox: the sandbox stays
//! exactly as `graft run` builds it, and the test talks to it through the
//! same host API an embedding app uses (`t.call` is `Sandbox::call`, …).
//! That is also what lets `t.advance` move the sandbox's test clock and
//! wait for its timers to fire: it happens between the sandbox's slices,
//! never inside one of its callbacks.
//!
//! Invariants:
//! * Every wait on the sandbox is bounded by the test's deadline (real
//!   time), whatever the test clock says; past the deadline the driver's
//!   interrupt raises at every safepoint, so `pcall` cannot swallow it.
//! * Values cross into the sandbox as JSON, with the sandbox's own bounds.
//! * Assertion failures carry their file:line (the caller's frame) and
//!   reach the runner as an [`Assertion`], not as text to parse.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use graft::{ReloadOptions, Sandbox};
use mlua::{Function, Lua, LuaSerdeExt, MultiValue, Table, Value};
use serde_json::Value as Json;

use super::values::{deep_eq, diff, shallow_eq, show};

/// The largest file `t.source` reads.
pub const MAX_SOURCE_FILE: u64 = 1 << 20;

/// An assertion that did not hold, with where and what.
#[derive(Debug, Clone)]
pub struct Assertion {
    /// `file:line` of the failing assertion's call.
    pub location: Option<String>,
    /// `eq`, `deep_eq`, … and the test's own message, if any.
    pub message: String,
    /// The expected value, shown.
    pub expected: Option<String>,
    /// The actual value, shown.
    pub actual: Option<String>,
    /// Paths where tables differ (`deep_eq`).
    pub diff: Vec<String>,
}

impl std::fmt::Display for Assertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Assertion {}

/// What a test's sandbox operations need.
#[derive(Clone)]
pub struct Context {
    /// The test's own sandbox.
    pub sandbox: Sandbox,
    /// When the test's time runs out (real time).
    pub deadline: Instant,
    /// The project directory (`t.source` reads under it).
    pub root: PathBuf,
    /// Set when the deadline passed; the runner reports `timeout`.
    pub timed_out: Arc<AtomicBool>,
}

/// A fresh driver VM: Luau's safe libraries, read-only globals, a memory
/// limit and an interrupt that raises `timeout` at every safepoint once
/// `deadline` passed.
pub fn driver_vm(
    memory_bytes: usize,
    deadline: Instant,
    timed_out: Arc<AtomicBool>,
) -> mlua::Result<Lua> {
    let lua = Lua::new();
    lua.sandbox(true)?;
    lua.set_memory_limit(memory_bytes)?;
    lua.set_interrupt(move |lua| {
        if Instant::now() >= deadline {
            timed_out.store(true, Ordering::Relaxed);
            // Where the test was when its time ran out (level 0: the
            // running Luau function).
            let at = lua
                .inspect_stack(0, |d| {
                    let line = d.current_line()?;
                    let src = d.source();
                    Some(format!("{}:{line}", src.short_src.as_deref()?))
                })
                .flatten();
            return Err(mlua::Error::runtime(match at {
                Some(at) => format!("{TIMEOUT_MESSAGE} (at {at})"),
                None => TIMEOUT_MESSAGE.to_string(),
            }));
        }
        Ok(mlua::VmState::Continue)
    });
    Ok(lua)
}

/// The message of a test that ran out of time.
pub const TIMEOUT_MESSAGE: &str = "timeout: the test ran longer than its time limit";

/// `file:line` of the Luau frame calling the current Rust function.
fn caller(lua: &Lua) -> Option<String> {
    lua.inspect_stack(1, |d| {
        let line = d.current_line()?;
        let src = d.source();
        let file = src.short_src.as_deref().unwrap_or("?").to_string();
        Some(format!("{file}:{line}"))
    })
    .flatten()
}

fn fail(
    lua: &Lua,
    message: String,
    expected: Option<String>,
    actual: Option<String>,
    diff: Vec<String>,
) -> mlua::Error {
    mlua::Error::external(Assertion {
        location: caller(lua),
        message,
        expected,
        actual,
        diff,
    })
}

fn with_note(what: &str, note: &Option<String>) -> String {
    match note {
        Some(n) => format!("{what}: {n}"),
        None => what.to_string(),
    }
}

fn to_json(lua: &Lua, v: Value, what: &str) -> mlua::Result<Json> {
    lua.from_value::<Json>(v)
        .map_err(|e| mlua::Error::runtime(format!("{what}: not plain data ({e})")))
}

fn to_lua(lua: &Lua, v: &Json) -> mlua::Result<Value> {
    let opts = mlua::serde::SerializeOptions::new()
        .set_array_metatable(false)
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    lua.to_value_with(v, opts)
}

impl Context {
    /// Runs `fut` on this thread until it answers or the test's time runs out.
    fn wait<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = graft::Result<T>>,
    ) -> mlua::Result<T> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        match graft::block_on(graft::with_timeout(fut, remaining)) {
            None => {
                self.timed_out.store(true, Ordering::Relaxed);
                Err(mlua::Error::runtime(format!(
                    "{TIMEOUT_MESSAGE} (waiting for {what})"
                )))
            }
            Some(Err(e)) => Err(mlua::Error::runtime(format!("{what}: {e}"))),
            Some(Ok(v)) => Ok(v),
        }
    }
}

/// Reads `path` under `root`: relative, no `..`, at most [`MAX_SOURCE_FILE`].
fn read_under(root: &Path, path: &str) -> Result<String, String> {
    let p = Path::new(path);
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "t.source(\"{path}\"): give a path relative to the project, without `..`"
        ));
    }
    let full = root.join(p);
    let meta = std::fs::metadata(&full).map_err(|e| format!("t.source(\"{path}\"): {e}"))?;
    if meta.len() > MAX_SOURCE_FILE {
        return Err(format!(
            "t.source(\"{path}\"): larger than {MAX_SOURCE_FILE} bytes"
        ));
    }
    std::fs::read_to_string(&full).map_err(|e| format!("t.source(\"{path}\"): {e}"))
}

fn opt_u64(t: &Option<Table>, key: &str) -> mlua::Result<Option<u64>> {
    match t {
        None => Ok(None),
        Some(t) => match t.get::<Value>(key)? {
            Value::Nil => Ok(None),
            Value::Integer(i) if i >= 0 => Ok(Some(i as u64)),
            Value::Number(n) if n >= 0.0 && n.is_finite() => Ok(Some(n as u64)),
            other => Err(mlua::Error::runtime(format!(
                "`{key}` must be a non-negative number, not {}",
                show(&other)
            ))),
        },
    }
}

fn reload_options(lua: &Lua, opts: Option<Table>) -> mlua::Result<ReloadOptions> {
    let mut o = ReloadOptions::default();
    if let Some(t) = &opts {
        o.extra = to_json(lua, t.get::<Value>("extra")?, "extra")?;
        o.dry_run = t.get::<Option<bool>>("dry_run")?.unwrap_or(false);
    }
    o.canary_ms = opt_u64(&opts, "canary_ms")?.unwrap_or(0);
    o.canary_crashes = opt_u64(&opts, "canary_crashes")?
        .map(|n| n.min(u32::MAX as u64) as u32)
        .unwrap_or(0);
    Ok(o)
}

/// One key of the test library: name, Luau type, doc. [`install`] checks
/// that `t` has exactly these keys; `graft types` declares them.
pub struct TestItem {
    /// The key (`call`).
    pub name: &'static str,
    /// Its Luau type.
    pub ty: &'static str,
    /// Hover text.
    pub doc: &'static str,
}

macro_rules! item {
    ($name:literal, $ty:literal, $doc:literal) => {
        TestItem {
            name: $name,
            ty: $ty,
            doc: $doc,
        }
    };
}

/// Every key of `t`, sorted by name.
pub const TEST_API: &[TestItem] = &[
    item!("advance", "(ms: number) -> ()", "Moves the sandbox's test clock forward by `ms`, firing every timer due on the way (in order) and letting processes handle them."),
    item!("call", "(target: string, request: any, timeout_ms: number?) -> any", "Calls a process of the sandbox (registered name or pid string) and returns its reply; raises if the call fails."),
    item!("cast", "(target: string, msg: any) -> ()", "Casts `msg` to a process (`handle_cast`)."),
    item!("deep_eq", "(actual: any, expected: any, message: string?) -> ()", "Asserts structural equality of tables (metatables ignored); a failure lists the paths that differ."),
    item!("eq", "(actual: any, expected: any, message: string?) -> ()", "Asserts `actual == expected` (numbers by value)."),
    item!("eval", "(code: string) -> any", "Runs a Luau chunk inside the sandbox as a short-lived process and returns its result (use it for `require`d library code)."),
    item!("fail", "(message: string?) -> ()", "Fails the test here."),
    item!("matches", "(s: any, pattern: string, message: string?) -> ()", "Asserts that `s` is a string matching the Luau `pattern`."),
    item!("ok", "(v: any, message: string?) -> ()", "Asserts that `v` is neither nil nor false."),
    item!("processes", "() -> { any }", "The sandbox's processes: `{ pid, name, module, version, status, ... }`."),
    item!("raises", "(f: () -> ...any, pattern: string?, message: string?) -> string", "Asserts that `f` raises (an error matching `pattern`, if given); returns the error message."),
    item!("reload", "(module: string, source: string, opts: ReloadOptions?) -> any", "Reloads `module` with a new source (one transaction, `code_change` runs); returns the reload report."),
    item!("rollback", "(module: string, version: number, opts: ReloadOptions?) -> any", "Makes a kept version of `module` current again (`code_change` gets `{ down = n }`)."),
    item!("send", "(target: string, msg: any) -> ()", "Sends `msg` to a process (`handle_info`)."),
    item!("source", "(path: string) -> string", "Reads a file of the project (a relative path, at most 1 MiB), e.g. the next version of a module."),
    item!("start", "(module: string, args: any?, name: string?) -> string", "Starts a process of `module`; returns its pid string."),
    item!("state", "(target: string) -> any", "A process's state."),
    item!("versions", "(module: string) -> { number }", "The kept version numbers of `module`, oldest first."),
];

/// The test library's luau-lsp declarations (for `graft.d.luau`).
pub fn definitions() -> String {
    let mut out = String::from(
        "--- `t.reload` / `t.rollback` options.\n\
         type ReloadOptions = { extra: any?, dry_run: boolean?, canary_ms: number?, canary_crashes: number? }\n\n\
         --- The test library: the argument of every test function (`graft test`).\n\
         declare class GraftTest\n",
    );
    for item in TEST_API {
        out.push_str(&format!(
            "\t--- {}\n\t{}: {}\n",
            item.doc, item.name, item.ty
        ));
    }
    out.push_str("end\n");
    out
}

/// Builds the `t` table for one test.
pub fn install(lua: &Lua, cx: Context) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    install_process_calls(lua, &t, &cx)?;
    install_upgrades(lua, &t, &cx)?;
    install_assertions(lua, &t)?;
    // `graft types` declares TEST_API: `t` must hold exactly that.
    let mut keys: Vec<String> = t
        .pairs::<String, Value>()
        .filter_map(|p| p.ok().map(|(k, _)| k))
        .collect();
    keys.sort();
    let declared: Vec<&str> = TEST_API.iter().map(|i| i.name).collect();
    if keys != declared {
        return Err(mlua::Error::runtime(format!(
            "the test library's keys {keys:?} differ from TEST_API {declared:?}"
        )));
    }
    t.set_readonly(true);
    Ok(t)
}

/// `t.start`, `t.call`, `t.cast`, `t.send`, `t.state`, `t.eval`,
/// `t.processes`: the test's sandbox as an embedder drives it.
fn install_process_calls(lua: &Lua, t: &Table, cx: &Context) -> mlua::Result<()> {
    let c = cx.clone();
    t.set(
        "start",
        lua.create_function(
            move |lua, (module, args, name): (String, Value, Option<String>)| {
                let args = to_json(lua, args, "t.start args")?;
                c.wait(
                    &format!("t.start(\"{module}\")"),
                    c.sandbox.spawn(&module, args, name.as_deref()),
                )
                .map(|pid| pid.to_string())
            },
        )?,
    )?;
    let c = cx.clone();
    t.set(
        "call",
        lua.create_function(
            move |lua, (target, request, timeout): (String, Value, Option<u64>)| {
                let request = to_json(lua, request, "t.call request")?;
                let reply = c.wait(
                    &format!("t.call(\"{target}\")"),
                    c.sandbox.call(&target, request, timeout),
                )?;
                to_lua(lua, &reply)
            },
        )?,
    )?;
    let c = cx.clone();
    t.set(
        "cast",
        lua.create_function(move |lua, (target, msg): (String, Value)| {
            let msg = to_json(lua, msg, "t.cast message")?;
            c.wait(
                &format!("t.cast(\"{target}\")"),
                c.sandbox.cast(&target, msg),
            )
        })?,
    )?;
    let c = cx.clone();
    t.set(
        "send",
        lua.create_function(move |lua, (target, msg): (String, Value)| {
            let msg = to_json(lua, msg, "t.send message")?;
            c.wait(
                &format!("t.send(\"{target}\")"),
                c.sandbox.send(&target, msg),
            )
        })?,
    )?;
    let c = cx.clone();
    t.set(
        "state",
        lua.create_function(move |lua, target: String| {
            let state = c.wait(&format!("t.state(\"{target}\")"), c.sandbox.state(&target))?;
            to_lua(lua, &state)
        })?,
    )?;
    let c = cx.clone();
    t.set(
        "eval",
        lua.create_function(move |lua, code: String| {
            let v = c.wait("t.eval", c.sandbox.eval(&code))?;
            to_lua(lua, &v)
        })?,
    )?;
    let c = cx.clone();
    t.set(
        "processes",
        lua.create_function(move |lua, ()| {
            let list = c.wait("t.processes", c.sandbox.processes())?;
            let json = serde_json::to_value(list).map_err(mlua::Error::external)?;
            to_lua(lua, &json)
        })?,
    )?;
    Ok(())
}

/// `t.reload`, `t.rollback`, `t.versions`, `t.advance` (the test clock) and
/// `t.source` (a file under the project root).
fn install_upgrades(lua: &Lua, t: &Table, cx: &Context) -> mlua::Result<()> {
    let c = cx.clone();
    t.set(
        "reload",
        lua.create_function(
            move |lua, (module, source, opts): (String, String, Option<Table>)| {
                let opts = reload_options(lua, opts)?;
                let sources = std::iter::once((module.clone(), source)).collect();
                let report = c.wait(
                    &format!("t.reload(\"{module}\")"),
                    c.sandbox.reload(sources, opts),
                )?;
                let json = serde_json::to_value(report).map_err(mlua::Error::external)?;
                to_lua(lua, &json)
            },
        )?,
    )?;
    let c = cx.clone();
    t.set(
        "rollback",
        lua.create_function(
            move |lua, (module, version, opts): (String, u32, Option<Table>)| {
                let opts = reload_options(lua, opts)?;
                let report = c.wait(
                    &format!("t.rollback(\"{module}\", {version})"),
                    c.sandbox.rollback(&module, version, opts),
                )?;
                let json = serde_json::to_value(report).map_err(mlua::Error::external)?;
                to_lua(lua, &json)
            },
        )?,
    )?;
    let c = cx.clone();
    t.set(
        "versions",
        lua.create_function(move |lua, module: String| {
            let kept = c.wait(
                &format!("t.versions(\"{module}\")"),
                c.sandbox.versions(&module),
            )?;
            let numbers: Vec<u32> = kept.iter().map(|v| v.version).collect();
            to_lua(lua, &serde_json::json!(numbers))
        })?,
    )?;
    let c = cx.clone();
    t.set(
        "advance",
        lua.create_function(move |_, ms: f64| {
            if !(ms.is_finite() && ms >= 0.0) {
                return Err(mlua::Error::runtime(
                    "t.advance(ms): ms must be a non-negative number",
                ));
            }
            c.wait(
                &format!("t.advance({ms})"),
                c.sandbox.advance_clock(ms as u64),
            )
        })?,
    )?;
    let root = cx.root.clone();
    t.set(
        "source",
        lua.create_function(move |_, path: String| {
            read_under(&root, &path).map_err(mlua::Error::runtime)
        })?,
    )?;
    Ok(())
}

fn install_assertions(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "eq",
        lua.create_function(
            |lua, (actual, expected, note): (Value, Value, Option<String>)| {
                if shallow_eq(&actual, &expected) {
                    return Ok(());
                }
                let diff = match (&expected, &actual) {
                    (Value::Table(_), Value::Table(_)) if deep_eq(&expected, &actual) => {
                        vec!["the tables are equal but not the same table; use t.deep_eq".into()]
                    }
                    _ => Vec::new(),
                };
                Err(fail(
                    lua,
                    with_note("eq", &note),
                    Some(show(&expected)),
                    Some(show(&actual)),
                    diff,
                ))
            },
        )?,
    )?;
    t.set(
        "deep_eq",
        lua.create_function(
            |lua, (actual, expected, note): (Value, Value, Option<String>)| {
                if deep_eq(&actual, &expected) {
                    return Ok(());
                }
                Err(fail(
                    lua,
                    with_note("deep_eq", &note),
                    Some(show(&expected)),
                    Some(show(&actual)),
                    diff(&expected, &actual),
                ))
            },
        )?,
    )?;
    t.set(
        "ok",
        lua.create_function(|lua, (v, note): (Value, Option<String>)| {
            if !matches!(v, Value::Nil | Value::Boolean(false)) {
                return Ok(());
            }
            Err(fail(
                lua,
                with_note("ok", &note),
                Some("a truthy value".into()),
                Some(show(&v)),
                vec![],
            ))
        })?,
    )?;
    install_pattern_assertions(lua, t)
}

/// `t.matches` (a Luau pattern), `t.raises` (an error, optionally matching a
/// pattern) and `t.fail`.
fn install_pattern_assertions(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "matches",
        lua.create_function(|lua, (s, pattern, note): (Value, String, Option<String>)| {
            let text = match &s {
                Value::String(s) => s.to_string_lossy(),
                other => {
                    return Err(fail(
                        lua,
                        with_note("matches", &note),
                        Some(format!("a string matching {pattern:?}")),
                        Some(show(other)),
                        vec![],
                    ))
                }
            };
            if find(lua, &text, &pattern)? {
                return Ok(());
            }
            Err(fail(
                lua,
                with_note("matches", &note),
                Some(format!("a string matching {pattern:?}")),
                Some(show(&s)),
                vec![],
            ))
        })?,
    )?;
    t.set(
        "raises",
        lua.create_function(
            |lua, (f, pattern, note): (Function, Option<String>, Option<String>)| {
                match f.call::<MultiValue>(()) {
                    Ok(_) => Err(fail(
                        lua,
                        with_note("raises", &note),
                        Some(match &pattern {
                            Some(p) => format!("an error matching {p:?}"),
                            None => "an error".into(),
                        }),
                        Some("no error".into()),
                        vec![],
                    )),
                    Err(e) => {
                        // Out of time or memory is the runner's, not the test's to catch.
                        if is_fatal(&e) {
                            return Err(e);
                        }
                        let message = error_text(&e);
                        if let Some(p) = &pattern {
                            if !find(lua, &message, p)? {
                                return Err(fail(
                                    lua,
                                    with_note("raises", &note),
                                    Some(format!("an error matching {p:?}")),
                                    Some(show(&Value::String(lua.create_string(&message)?))),
                                    vec![],
                                ));
                            }
                        }
                        Ok(message)
                    }
                }
            },
        )?,
    )?;
    t.set(
        "fail",
        lua.create_function(|lua, note: Option<String>| -> mlua::Result<()> {
            Err(fail(lua, with_note("fail", &note), None, None, vec![]))
        })?,
    )?;
    Ok(())
}

/// `string.find(text, pattern)` with Luau's own patterns.
fn find(lua: &Lua, text: &str, pattern: &str) -> mlua::Result<bool> {
    let string: Table = lua.globals().get("string")?;
    let find: Function = string.get("find")?;
    let found: Value = find.call((text, pattern))?;
    Ok(!found.is_nil())
}

/// Whether `e` is out of time or memory (somewhere in its chain).
pub fn is_fatal(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::RuntimeError(m) => m.starts_with(TIMEOUT_MESSAGE),
        mlua::Error::CallbackError { cause, .. } => is_fatal(cause),
        mlua::Error::WithContext { cause, .. } => is_fatal(cause),
        _ => false,
    }
}

/// The assertion inside `e`'s chain, if it is one.
pub fn assertion_of(e: &mlua::Error) -> Option<&Assertion> {
    match e {
        mlua::Error::ExternalError(inner) => inner.downcast_ref::<Assertion>(),
        mlua::Error::CallbackError { cause, .. } => assertion_of(cause),
        mlua::Error::WithContext { cause, .. } => assertion_of(cause),
        _ => None,
    }
}

/// The error's message without mlua's traceback decoration.
pub fn error_text(e: &mlua::Error) -> String {
    match e {
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::MemoryError(m) => format!("out_of_memory: {m}"),
        mlua::Error::CallbackError { cause, .. } => error_text(cause),
        mlua::Error::WithContext { cause, .. } => error_text(cause),
        mlua::Error::ExternalError(inner) => inner.to_string(),
        other => other.to_string(),
    }
}
