//! Natives of guest timers: `send_after` and `cancel_timer`.

use mlua::{Lua, Table, Value};

use super::MAX_PENDING_TIMERS;
use super::{badarg, delay_ms, fail, name_arg, ok, outside, set, MAX_DELAY_MS, R};
use crate::kernel::{kernel, Target, Timer};
use crate::value::VmPid;

pub(super) fn install(lua: &Lua, n: &Table) -> mlua::Result<()> {
    set(lua, n, "send_after", send_after)?;
    set(lua, n, "cancel_timer", |lua, id: f64| {
        Ok(kernel(lua).cancel_send_after(id as u64))
    })
}

/// `send_after(ms, target, message)`: the timer's id, or `(nil, message)`.
fn send_after(lua: &Lua, (ms, target, msg): (Value, Value, Value)) -> R {
    let mut k = kernel(lua);
    if k.current().is_none() {
        return outside(lua, "send_after");
    }
    let ms = match delay_ms(&ms) {
        Ok(ms) => ms,
        Err(got) => {
            return badarg(
                lua,
                "send_after",
                format_args!("ms must be an integer from 0 to {MAX_DELAY_MS} ({got})"),
            )
        }
    };
    if k.pending_timers() >= MAX_PENDING_TIMERS {
        return fail(
            lua,
            format!(
                "graft.send_after: this sandbox has {MAX_PENDING_TIMERS} timers pending already; cancel some first"
            ),
        );
    }
    let target = match &target {
        // Kept in Rust until the timer fires: only a name that can be
        // registered (at most 64 bytes …) is worth keeping.
        Value::String(_) => match name_arg(&target) {
            Ok(name) => Target::Name(name),
            Err(why) => return badarg(lua, "send_after", why),
        },
        other => match VmPid::from_lua(other) {
            Some(p) => Target::Serial(p.serial()),
            None => {
                return fail(
                    lua,
                    "graft.send_after: the target must be a pid or a registered name",
                )
            }
        },
    };
    let message = lua.create_registry_value(msg)?;
    let now = k.timer_now();
    let id = k.add_timer(now.saturating_add(ms), Timer::SendAfter { target, message });
    ok(lua, id as f64)
}
