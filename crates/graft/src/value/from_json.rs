//! JSON → Luau: fresh tables for every object and array, depth-checked.

use mlua::{Lua, Value};
use serde_json::Value as Json;

use super::MAX_DEPTH;

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
