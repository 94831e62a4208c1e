//! The Rust side of the `graft` guest API. The prelude wraps these: natives
//! never raise; they return `(value)` or `(nil, message)` and the prelude
//! raises at the guest's call site, so errors point at guest lines.
//!
//! One file per group: `process` (identity, spawn, call, send), `registry`
//! (names), `links` (links, monitors, exits, supervision), `timers`; the
//! guest log is here. The raw natives of `fast` are installed here too.
//!
//! Invariants:
//! * A native borrows the kernel only while it runs and runs no Luau code,
//!   so the borrow never overlaps another.
//! * Every native outside a process callback (a module loading or
//!   migrating) refuses what would escape an aborted reload or a dry run.
//! * Panics in mlua natives are caught by mlua at the callback boundary and
//!   raised as Luau errors; raw natives have their own barrier (see `fast`).

mod links;
mod process;
mod registry;
mod timers;

use mlua::{Lua, MultiValue, Table, Value};
use serde_json::Value as Json;

use super::log::{line_text, Admit};
use super::{kernel, Kernel, Timer};
use crate::clock;
use crate::error::Error;
use crate::value::lua_to_json;

/// The longest delay of a timer or call timeout (as OTP's timers: 2^32 - 1 ms).
pub(crate) const MAX_DELAY_MS: u64 = 4_294_967_295;

/// Timers a sandbox may have pending (`send_after`): each costs Rust memory
/// outside the guests' heap, so their number is bounded.
pub(crate) const MAX_PENDING_TIMERS: usize = 100_000;

/// What a native returns: `(value)` or `(nil, message)`.
type R = mlua::Result<MultiValue>;

fn ok(lua: &Lua, v: impl mlua::IntoLua) -> R {
    Ok(MultiValue::from_iter([v.into_lua(lua)?]))
}

fn fail(lua: &Lua, msg: impl AsRef<str>) -> R {
    Ok(MultiValue::from_iter([
        Value::Nil,
        Value::String(lua.create_string(msg.as_ref())?),
    ]))
}

fn outside(lua: &Lua, what: &str) -> R {
    fail(lua, format!("graft.{what} can only be used inside a process callback (not while a module loads or migrates)"))
}

/// A `badarg` error of `graft.<what>`, returned like any native failure.
fn badarg(lua: &Lua, what: &str, why: impl std::fmt::Display) -> R {
    fail(lua, format!("badarg: graft.{what}: {why}"))
}

/// A guest-given delay in ms: an integral number from 0 to [`MAX_DELAY_MS`].
/// Anything else (negative, NaN, fractional, huge, not a number) is refused
/// rather than wrapped or saturated into a different delay.
fn delay_ms(v: &Value) -> Result<u64, String> {
    let n = match v {
        Value::Number(n) => *n,
        Value::Integer(i) => *i as f64,
        other => return Err(format!("got a {}", other.type_name())),
    };
    if (0.0..=MAX_DELAY_MS as f64).contains(&n) && n.fract() == 0.0 {
        Ok(n as u64)
    } else {
        Err(format!("got {n}"))
    }
}

/// A guest-given process name, checked by [`crate::config::validate_process_name`].
fn name_arg(v: &Value) -> Result<String, String> {
    let Value::String(s) = v else {
        return Err(format!("a name must be a string, got a {}", v.type_name()));
    };
    let name = s
        .to_str()
        .map_err(|_| "a name must be UTF-8 text".to_owned())?;
    match crate::config::validate_process_name(&name) {
        Ok(()) => Ok(name.to_owned()),
        Err(Error::BadArg(why)) => Err(why),
        Err(other) => Err(other.to_string()),
    }
}

fn to_json(k: &Kernel, what: &str, v: &Value) -> Result<Json, String> {
    lua_to_json(v, what, k.max_value_bytes, &|p| k.pid_string(p)).map_err(|e| e.to_string())
}

/// Sets `n[name]` to a native.
fn set<A, Ret>(
    lua: &Lua,
    n: &Table,
    name: &str,
    f: impl Fn(&Lua, A) -> mlua::Result<Ret> + mlua::MaybeSend + 'static,
) -> mlua::Result<()>
where
    A: mlua::FromLuaMulti,
    Ret: mlua::IntoLuaMulti,
{
    n.raw_set(name, lua.create_function(f)?)
}

/// Installs every native into the prelude's native table `n`.
pub(crate) fn install(lua: &Lua, n: &Table) -> mlua::Result<()> {
    install_fast(lua, n)?;
    process::install(lua, n)?;
    registry::install(lua, n)?;
    links::install(lua, n)?;
    timers::install(lua, n)?;
    set(lua, n, "log", log)
}

fn install_fast(lua: &Lua, n: &Table) -> mlua::Result<()> {
    // SAFETY: `create_c_function` requires functions that follow the Lua C
    // API protocol; `fast`'s functions do (see their `# Safety` and the
    // module's invariants: they never raise or unwind, read their
    // arguments after type checks, and push at most five values).
    unsafe {
        n.raw_set("call_run", lua.create_c_function(super::fast::call_run)?)?;
        n.raw_set(
            "spawn_fast",
            lua.create_c_function(super::fast::spawn_fast)?,
        )?;
        n.raw_set(
            "yield_done",
            lua.create_c_function(super::fast::yield_done)?,
        )?;
    }
    Ok(())
}

/// `log(level, message)`. Lines past the sandbox's budget are counted, not
/// written (see `log`).
fn log(lua: &Lua, (level, msg): (String, mlua::LuaString)) -> mlua::Result<()> {
    let mut k = kernel(lua);
    match k.log_gate.admit(clock::precise_ms()) {
        Admit::Write => {}
        Admit::Drop(None) => return Ok(()),
        Admit::Drop(Some(at)) => {
            k.add_timer(at, Timer::LogFlush);
            return Ok(());
        }
    }
    let msg = line_text(&msg.as_bytes());
    let who = k
        .current()
        .and_then(|s| k.procs.get(&s))
        .map(|p| k.pid_string(p.pid))
        .unwrap_or_default();
    match level.as_str() {
        "error" => tracing::error!(sandbox = %k.id, process = %who, "{msg}"),
        "warn" => tracing::warn!(sandbox = %k.id, process = %who, "{msg}"),
        _ => tracing::info!(sandbox = %k.id, process = %who, "{msg}"),
    }
    Ok(())
}
