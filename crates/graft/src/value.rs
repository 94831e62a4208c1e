//! Plain data at the boundaries: pids, exit reasons and the JSON ↔ Luau mapping.
//!
//! Messages and states are plain data: nil, booleans, numbers, strings, pids
//! and tables of those. Inside a sandbox a pid is a Luau light userdata (an
//! immediate value: no allocation, compares by value, usable as a table key,
//! and impossible for guest code to forge). At the JSON boundary a pid is a
//! string `"<module.serial>"`.
//!
//! Mapping rules (documented in `docs/guest-api.md`):
//! * JSON objects become tables with string keys; arrays become sequences 1..n.
//! * A table whose keys are exactly `1..n` (n ≥ 1) becomes an array; any other
//!   table becomes an object (number and boolean keys are written as strings);
//!   an empty table becomes `{}`.
//! * Integral numbers within ±2^53 are written as JSON integers; NaN and
//!   infinities are an error.

use std::fmt;

use mlua::{LightUserData, Lua, Table, Value};
use serde_json::{Map, Number, Value as Json};

/// Maximum nesting accepted at the JSON boundary (and inside the VM for
/// messages). Deeper values are rejected rather than risking the native stack.
pub const MAX_DEPTH: usize = 64;

const SERIAL_BITS: u32 = 40;
const SERIAL_MASK: u64 = (1 << SERIAL_BITS) - 1;

/// A process identifier, unique within its sandbox for the sandbox's lifetime
/// (serials are never reused).
///
/// ```
/// let pid = graft::Pid::new(3, 7);
/// assert_eq!(pid.serial(), 7);
/// assert_eq!(pid.module_index(), 3);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(u64);

impl Pid {
    /// Builds a pid from the interned module index and the process serial.
    pub fn new(module_index: u32, serial: u64) -> Pid {
        debug_assert!(serial > 0 && serial <= SERIAL_MASK);
        Pid(((module_index as u64) << SERIAL_BITS) | (serial & SERIAL_MASK))
    }
    /// The process serial: 1, 2, 3 … in spawn order.
    pub fn serial(self) -> u64 {
        self.0 & SERIAL_MASK
    }
    /// The index of the pid's module in its sandbox's module-name table.
    pub fn module_index(self) -> u32 {
        (self.0 >> SERIAL_BITS) as u32
    }
    pub(crate) fn to_lua(self) -> Value {
        Value::LightUserData(LightUserData(self.0 as usize as *mut std::ffi::c_void))
    }
    pub(crate) fn from_lua(v: &Value) -> Option<Pid> {
        match v {
            Value::LightUserData(ud) => Pid::from_raw(ud.0 as usize as u64),
            _ => None,
        }
    }
    /// The pid a light userdata's bits stand for, if they are one.
    pub(crate) fn from_raw(raw: u64) -> Option<Pid> {
        // Job markers live above the pid range (see `vm::MARKER_BASE`).
        (raw & SERIAL_MASK != 0 && raw < crate::vm::MARKER_BASE).then_some(Pid(raw))
    }
    /// The bits of its light userdata.
    pub(crate) fn raw(self) -> u64 {
        self.0
    }
    /// Parses the serial out of `"<module.serial>"` (the module part is informative).
    pub fn parse_serial(s: &str) -> Option<u64> {
        let inner = s.strip_prefix('<')?.strip_suffix('>')?;
        let (_, serial) = inner.rsplit_once('.')?;
        serial.parse().ok().filter(|n| *n > 0 && *n <= SERIAL_MASK)
    }
}

impl fmt::Debug for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pid({}.{})", self.module_index(), self.serial())
    }
}

/// Why a process exited. Atoms travel into Luau as strings; errors as
/// `{ error = message, traceback = text }`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExitReason {
    /// Finished normally: links are not affected.
    Normal,
    /// Stopped by its supervisor or the sandbox.
    Shutdown,
    /// Killed unconditionally (`kill` signal, or a shutdown timeout).
    Killed,
    /// An allocation failed against the sandbox's `memory_bytes`.
    OutOfMemory,
    /// A callback ran past the sandbox's `handler_ms`.
    Timeout,
    /// The Luau stack overflowed (runaway recursion).
    StackOverflow,
    /// A Luau error inside a callback.
    Error {
        /// The error message.
        message: String,
        /// The Luau traceback at the error site (guest frames only).
        traceback: String,
        /// The module whose code raised, where known.
        #[serde(skip_serializing_if = "Option::is_none")]
        module: Option<String>,
        /// The line that raised, where known.
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u32>,
    },
    /// A reason given by `graft.exit(reason)` that is none of the above.
    Other {
        /// The reason as plain data.
        value: Json,
    },
}

impl ExitReason {
    /// True for the reasons that do not take linked processes down.
    pub fn is_normal(&self) -> bool {
        matches!(self, ExitReason::Normal)
    }

    /// The short machine name: `normal`, `error`, `timeout`, …
    pub fn kind(&self) -> &'static str {
        match self {
            ExitReason::Normal => "normal",
            ExitReason::Shutdown => "shutdown",
            ExitReason::Killed => "killed",
            ExitReason::OutOfMemory => "out_of_memory",
            ExitReason::Timeout => "timeout",
            ExitReason::StackOverflow => "stack_overflow",
            ExitReason::Error { .. } => "error",
            ExitReason::Other { .. } => "other",
        }
    }

    /// Reads a reason given by guest code (`graft.exit(reason)`).
    pub(crate) fn from_json(v: Json) -> ExitReason {
        match v.as_str() {
            Some("normal") => ExitReason::Normal,
            Some("shutdown") => ExitReason::Shutdown,
            Some("killed") => ExitReason::Killed,
            Some("out_of_memory") => ExitReason::OutOfMemory,
            Some("timeout") => ExitReason::Timeout,
            Some("stack_overflow") => ExitReason::StackOverflow,
            _ => ExitReason::Other { value: v },
        }
    }

    /// The reason as a Luau value, as `handle_info` sees it in EXIT/DOWN messages.
    pub(crate) fn to_lua(&self, lua: &Lua) -> mlua::Result<Value> {
        Ok(match self {
            ExitReason::Error {
                message, traceback, ..
            } => {
                let t = lua.create_table()?;
                t.raw_set("error", message.as_str())?;
                t.raw_set("traceback", traceback.as_str())?;
                Value::Table(t)
            }
            ExitReason::Other { value } => json_to_lua(lua, value)?,
            other => Value::String(lua.create_string(other.kind())?),
        })
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Error { message, .. } => write!(f, "error: {message}"),
            ExitReason::Other { value } => write!(f, "{value}"),
            other => f.write_str(other.kind()),
        }
    }
}

/// Converts JSON into a fresh Luau value (strings that look like pids stay strings).
pub(crate) fn json_to_lua(lua: &Lua, v: &Json) -> mlua::Result<Value> {
    json_to_lua_at(lua, v, 0)
}

fn json_to_lua_at(lua: &Lua, v: &Json, depth: usize) -> mlua::Result<Value> {
    if depth > MAX_DEPTH {
        return Err(mlua::Error::runtime(format!(
            "JSON is nested more than {MAX_DEPTH} levels deep"
        )));
    }
    Ok(match v {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) if i.unsigned_abs() <= (1 << 53) => Value::Number(i as f64),
            _ => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, json_to_lua_at(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
        Json::Object(map) => {
            let t = lua.create_table_with_capacity(0, map.len())?;
            for (k, item) in map {
                t.raw_set(k.as_str(), json_to_lua_at(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
    })
}

/// Why a Luau value could not become JSON.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotPlainData(pub String);

/// Converts a Luau value to JSON; `pid_name` renders pids.
pub(crate) fn lua_to_json(
    v: &Value,
    pid_name: &dyn Fn(Pid) -> String,
) -> Result<Json, NotPlainData> {
    lua_to_json_at(v, pid_name, 0)
}

fn lua_to_json_at(
    v: &Value,
    pid_name: &dyn Fn(Pid) -> String,
    depth: usize,
) -> Result<Json, NotPlainData> {
    if depth > MAX_DEPTH {
        return Err(NotPlainData(format!(
            "value is nested more than {MAX_DEPTH} levels deep (or contains a cycle)"
        )));
    }
    Ok(match v {
        Value::Nil => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => Json::from(*i),
        Value::Number(n) => number_to_json(*n)?,
        Value::String(s) => Json::String(s.to_string_lossy()),
        Value::Table(t) => table_to_json(t, pid_name, depth)?,
        Value::LightUserData(_) => match Pid::from_lua(v) {
            Some(pid) => Json::String(pid_name(pid)),
            None => return Err(NotPlainData("an internal marker is not plain data".into())),
        },
        other => {
            return Err(NotPlainData(format!(
                "a {} is not plain data (only nil, booleans, numbers, strings, pids and tables of those)",
                other.type_name()
            )))
        }
    })
}

fn number_to_json(n: f64) -> Result<Json, NotPlainData> {
    if n.fract() == 0.0 && n.abs() <= (1u64 << 53) as f64 {
        Ok(Json::from(n as i64))
    } else {
        Number::from_f64(n)
            .map(Json::Number)
            .ok_or_else(|| NotPlainData(format!("the number {n} has no JSON form")))
    }
}

fn table_to_json(
    t: &Table,
    pid_name: &dyn Fn(Pid) -> String,
    depth: usize,
) -> Result<Json, NotPlainData> {
    let len = t.raw_len();
    let mut count = 0usize;
    let mut pairs = Vec::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| NotPlainData(e.to_string()))?;
        count += 1;
        pairs.push((k, v));
    }
    if len > 0 && count == len {
        let mut items = vec![Json::Null; len];
        for (k, v) in pairs {
            let idx = match k {
                Value::Integer(i) => i as usize,
                Value::Number(n) => n as usize,
                _ => unreachable!("a table with raw_len == count has only 1..n keys"),
            };
            items[idx - 1] = lua_to_json_at(&v, pid_name, depth + 1)?;
        }
        return Ok(Json::Array(items));
    }
    let mut map = Map::new();
    for (k, v) in pairs {
        let key = match &k {
            Value::String(s) => s.to_string_lossy(),
            Value::Integer(i) => i.to_string(),
            Value::Number(n) => match number_to_json(*n)? {
                Json::Number(num) => num.to_string(),
                _ => unreachable!(),
            },
            Value::Boolean(b) => b.to_string(),
            Value::LightUserData(_) if Pid::from_lua(&k).is_some() => {
                pid_name(Pid::from_lua(&k).expect("checked"))
            }
            other => {
                return Err(NotPlainData(format!(
                    "a table key of type {} is not plain data",
                    other.type_name()
                )))
            }
        };
        map.insert(key, lua_to_json_at(&v, pid_name, depth + 1)?);
    }
    Ok(Json::Object(map))
}

/// Checks JSON nesting before it reaches a sandbox: `Err(depth)` when deeper than `max`.
pub fn check_json_depth(v: &Json, max: usize) -> Result<(), usize> {
    fn walk(v: &Json, depth: usize, max: usize) -> Result<(), usize> {
        if depth > max {
            return Err(depth);
        }
        match v {
            Json::Array(a) => a.iter().try_for_each(|x| walk(x, depth + 1, max)),
            Json::Object(o) => o.values().try_for_each(|x| walk(x, depth + 1, max)),
            _ => Ok(()),
        }
    }
    walk(v, 0, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: Pid) -> String {
        format!("<m.{}>", p.serial())
    }

    #[test]
    fn pid_round_trips_through_lua_value_and_string() {
        let pid = Pid::new(5, 1234);
        assert_eq!(Pid::from_lua(&pid.to_lua()), Some(pid));
        assert_eq!(Pid::parse_serial("<counter.1234>"), Some(1234));
        assert_eq!(Pid::parse_serial("<chat.room.9>"), Some(9));
        assert_eq!(Pid::parse_serial("counter.9"), None);
        assert_eq!(Pid::parse_serial("<counter.0>"), None);
        assert_eq!(Pid::parse_serial("<counter.x>"), None);
    }

    #[test]
    fn json_round_trip_keeps_arrays_objects_and_numbers() {
        let lua = Lua::new();
        let v = serde_json::json!({"a": [1, 2.5, "x", true], "b": {"c": null}, "e": {}});
        let lv = json_to_lua(&lua, &v).unwrap();
        let back = lua_to_json(&lv, &names).unwrap();
        // null values vanish inside tables (Luau has no null), everything else survives
        assert_eq!(
            back,
            serde_json::json!({"a": [1, 2.5, "x", true], "b": {}, "e": {}})
        );
    }

    #[test]
    fn functions_and_deep_values_are_rejected_with_a_reason() {
        let lua = Lua::new();
        let f: Value = lua.load("return { f = function() end }").eval().unwrap();
        let err = lua_to_json(&f, &names).unwrap_err();
        assert!(err.0.contains("function is not plain data"), "{}", err.0);
        let cyclic: Value = lua.load("local t = {} t.t = t return t").eval().unwrap();
        assert!(lua_to_json(&cyclic, &names)
            .unwrap_err()
            .0
            .contains("nested"));
        let mut deep = serde_json::json!(1);
        for _ in 0..100 {
            deep = serde_json::json!([deep]);
        }
        assert!(json_to_lua(&lua, &deep).is_err());
        assert_eq!(check_json_depth(&deep, 64), Err(65));
    }

    #[test]
    fn exit_reasons_read_from_guest_values() {
        assert_eq!(
            ExitReason::from_json(serde_json::json!("normal")),
            ExitReason::Normal
        );
        assert_eq!(
            ExitReason::from_json(serde_json::json!("shutdown")),
            ExitReason::Shutdown
        );
        let other = ExitReason::from_json(serde_json::json!({"why": "bored"}));
        assert_eq!(other.kind(), "other");
        assert!(!other.is_normal());
    }
}
