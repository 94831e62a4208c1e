//! Natives of the name registry: `register`, `unregister`, `whereis`, and
//! the supervisor's name check.

use mlua::{Lua, Table, Value};

use super::{badarg, fail, name_arg, ok, outside, set, R};
use crate::kernel::kernel;

pub(super) fn install(lua: &Lua, n: &Table) -> mlua::Result<()> {
    set(lua, n, "register", register)?;
    set(lua, n, "unregister", unregister)?;
    set(lua, n, "whereis", whereis)?;
    // For the supervisor's spec check: `nil`, or why a child's name is refused.
    set(lua, n, "name_problem", |lua, name: Value| {
        match name_arg(&name) {
            Ok(_) => ok(lua, Value::Nil),
            Err(why) => ok(lua, format!("badarg: {why}")),
        }
    })
}

fn register(lua: &Lua, name: Value) -> R {
    let mut k = kernel(lua);
    let Some(me) = k.current() else {
        return outside(lua, "register");
    };
    let name = match name_arg(&name) {
        Ok(n) => n,
        Err(why) => return badarg(lua, "register", why),
    };
    if let Some(&other) = k.names.get(name.as_str()) {
        if other != me {
            return fail(
                lua,
                format!("graft.register: the name `{name}` is registered already"),
            );
        }
        return ok(lua, true);
    }
    let Some(p) = k.procs.get_mut(&me) else {
        return outside(lua, "register");
    };
    if let Some(old) = &p.name {
        return fail(
            lua,
            format!("graft.register: this process is registered as `{old}` already"),
        );
    }
    p.name = Some(name.as_str().into());
    k.names.insert(name.into(), me);
    ok(lua, true)
}

fn unregister(lua: &Lua, name: String) -> mlua::Result<bool> {
    let mut k = kernel(lua);
    match k.names.remove(name.as_str()) {
        Some(s) => {
            if let Some(p) = k.procs.get_mut(&s) {
                p.name = None;
            }
            Ok(true)
        }
        None => Ok(false),
    }
}

fn whereis(lua: &Lua, name: String) -> R {
    let k = kernel(lua);
    match k.names.get(name.as_str()).and_then(|s| k.procs.get(s)) {
        Some(p) => ok(lua, p.pid.to_lua()),
        None => ok(lua, Value::Nil),
    }
}
