//! Natives of process identity and messaging: `self`, `parent`, `spawn`,
//! `call` (with its nested fast path's `nest_done`), `cast`, `send`.

use mlua::{Lua, MultiValue, Table, Thread, Value};

use super::{badarg, delay_ms, fail, name_arg, ok, outside, set, to_json, MAX_DELAY_MS, R};
use crate::error::Error;
use crate::kernel::{
    kernel, nest_done, Job, NestEnd, NestResult, Timer, Waiter, DEFAULT_CALL_TIMEOUT_MS,
};
use crate::value::VmPid;

pub(super) fn install(lua: &Lua, n: &Table) -> mlua::Result<()> {
    set(lua, n, "self", self_pid)?;
    set(lua, n, "is_pid", |_, v: Value| {
        Ok(VmPid::from_lua(&v).is_some())
    })?;
    set(lua, n, "parent", parent)?;
    set(lua, n, "now", |lua, ()| Ok(kernel(lua).unix_now()))?;
    set(lua, n, "spawn", spawn)?;
    set(lua, n, "call", call)?;
    set(lua, n, "nest_done", nest_done_native)?;
    set(lua, n, "cast", |lua, (target, msg): (Value, Value)| {
        send_like(lua, target, msg, true)
    })?;
    set(lua, n, "send", |lua, (target, msg): (Value, Value)| {
        send_like(lua, target, msg, false)
    })?;
    set(lua, n, "same_data", same_data)
}

fn self_pid(lua: &Lua, (): ()) -> R {
    let k = kernel(lua);
    match k.current().and_then(|s| k.procs.get(&s)) {
        Some(p) => ok(lua, p.pid.to_lua()),
        None => ok(lua, Value::Nil),
    }
}

fn parent(lua: &Lua, (): ()) -> R {
    let k = kernel(lua);
    let parent = k
        .current()
        .and_then(|s| k.procs.get(&s))
        .and_then(|p| p.parent);
    match parent.and_then(|s| k.procs.get(&s)) {
        Some(p) => ok(lua, p.pid.to_lua()),
        None => ok(lua, Value::Nil),
    }
}

/// `spawn(module, args, opts, worker)`: the prelude passes a worker
/// coroutine when the caller runs on its own worker thread. Returns
/// `(serial, module, pid)` when the child's init is to run nested on that
/// worker (then `nest_done`), `(false, token)` to wait, `(nil, message)`.
fn spawn(
    lua: &Lua,
    (module, args, opts, co): (mlua::LuaString, Value, Option<Table>, Option<Thread>),
) -> R {
    let mut k = kernel(lua);
    let Some(me) = k.current() else {
        return outside(lua, "spawn");
    };
    let Some(co) = co else {
        return fail(
            lua,
            "graft.spawn cannot be used inside a coroutine the callback created",
        );
    };
    let Some((mid, table)) = k
        .module_id(&module.to_str()?)
        .and_then(|m| Some((m, k.module_tables[m as usize].clone()?)))
    else {
        return fail(
            lua,
            format!(
                "graft.spawn: no module `{}` in this sandbox",
                module.to_string_lossy()
            ),
        );
    };
    if !k.is_server_module(mid) {
        return fail(
            lua,
            format!(
                "graft.spawn: module `{}` has no `init` function, so it cannot run as a process",
                module.to_string_lossy()
            ),
        );
    }
    let (name, link) = match &opts {
        Some(o) => (
            o.raw_get::<Value>("name")?,
            o.raw_get::<Option<bool>>("link")?.unwrap_or(false),
        ),
        None => (Value::Nil, false),
    };
    let name = match name {
        Value::Nil => None,
        v => match name_arg(&v) {
            Ok(n) => Some(n),
            Err(why) => return badarg(lua, "spawn", why),
        },
    };
    let token = k.token();
    // Nested unless the nesting depth is used up or a pending reload
    // froze the module (a new process is idle otherwise).
    let nest = k.nesting_left() && !k.frozen.contains(&mid);
    if nest {
        let co = co.to_pointer() as usize;
        return match k.spawn_nested(me, mid, name.as_deref(), link, token, co) {
            Ok((child, pid)) => Ok(MultiValue::from_iter([
                Value::Number(child as f64),
                Value::Table(table),
                pid.to_lua(),
            ])),
            Err(e) => fail(lua, format!("graft.spawn: {e}")),
        };
    }
    let args = lua.create_registry_value(args.clone())?;
    let waiter = Waiter::Process { serial: me, token };
    let child = match k.create_process(mid, Some(me), name.as_deref(), Some(args), waiter) {
        Ok(c) => c,
        Err((e, _)) => return fail(lua, format!("graft.spawn: {e}")),
    };
    if link {
        k.link(child, me);
    }
    Ok(MultiValue::from_iter([
        Value::Boolean(false),
        Value::Number(token as f64),
    ]))
}

/// `call(target, request, timeout_ms, worker)`: returns `(serial, module,
/// from)` when the callee is idle and its handler is to run nested on the
/// worker (then `nest_done`), `(false, token)` to wait, `(nil, message)`.
fn call(lua: &Lua, (target, request, timeout, co): (Value, Value, Value, Option<Thread>)) -> R {
    let mut k = kernel(lua);
    let Some(me) = k.current() else {
        return outside(lua, "call");
    };
    let Some(co) = co else {
        return fail(
            lua,
            "graft.call cannot be used inside a coroutine the callback created",
        );
    };
    let ms = match &timeout {
        Value::Nil => DEFAULT_CALL_TIMEOUT_MS,
        t => match delay_ms(t) {
            Ok(ms) => ms,
            Err(got) => {
                return badarg(
                    lua,
                    "call",
                    format_args!("timeout_ms must be an integer from 0 to {MAX_DELAY_MS} ({got})"),
                )
            }
        },
    };
    let Some(to) = k.resolve_value(&target) else {
        let desc = k.describe_value(&target);
        return fail(lua, format!("graft.call: no process {desc}"));
    };
    if to == me {
        return fail(
            lua,
            "graft.call: a process cannot call itself (it would wait for its own reply)",
        );
    }
    let token = k.token();
    // Fast path: an idle callee runs its handler right here, nested; if
    // it replies without waiting itself, the caller never suspends (and
    // no timeout timer is needed: nothing else runs meanwhile).
    if let Some((module, from)) = k.begin_nested_call(me, to, token, co.to_pointer() as usize, ms) {
        let module = k.module_tables.get(module as usize).cloned().flatten();
        return Ok(MultiValue::from_iter([
            Value::Number(to as f64),
            module.map(Value::Table).unwrap_or(Value::Nil),
            from.to_lua(),
        ]));
    }
    let desc = k.describe_value(&target);
    let job = Job::Call {
        request: Some(lua.create_registry_value(request)?),
        from: k.procs.get(&me).map(|p| p.pid),
        waiter: Waiter::Process { serial: me, token },
    };
    if let Err((e, _)) = k.deliver(to, job) {
        return fail(lua, format!("graft.call: {e}"));
    }
    // The token names the timeout timer, so a reply cancels it.
    let at = k.timer_now().saturating_add(ms);
    let timeout = Timer::CallTimeout {
        serial: me,
        token,
        target: desc,
        ms,
    };
    k.add_timer_with_id(token, at, timeout);
    Ok(MultiValue::from_iter([
        Value::Boolean(false),
        Value::Number(token as f64),
    ]))
}

/// `nest_done(serial, end, info, worker)`: closes the nested job begun by
/// `call` or `spawn`. Returns `true` (finished; the result stays in the VM),
/// `(false, token)` to wait, or `(nil, ok, value)` when already answered.
fn nest_done_native(lua: &Lua, (serial, end, info, co): (u64, u8, Value, Option<Thread>)) -> R {
    Ok(
        match nest_done(lua, serial, NestEnd::from_code(end), info, co)? {
            NestResult::Finished => MultiValue::from_iter([Value::Boolean(true)]),
            NestResult::Wait(token) => {
                MultiValue::from_iter([Value::Boolean(false), Value::Number(token as f64)])
            }
            NestResult::Answered(ok, v) => {
                MultiValue::from_iter([Value::Nil, Value::Boolean(ok), v])
            }
        },
    )
}

fn send_like(lua: &Lua, target: Value, msg: Value, cast: bool) -> R {
    let mut k = kernel(lua);
    let what = if cast { "cast" } else { "send" };
    if k.current().is_none() {
        // Messages sent while a module loads or migrates would escape an
        // aborted reload or a dry run: only callbacks may send.
        let mut r = outside(lua, what)?;
        r.push_back(Value::Boolean(true));
        return Ok(r);
    }
    let desc = k.describe_value(&target);
    let Some(to) = k.resolve_value(&target) else {
        return fail(lua, format!("noproc: no process {desc}"));
    };
    let key = lua.create_registry_value(msg)?;
    let job = if cast { Job::Cast(key) } else { Job::Info(key) };
    match k.deliver(to, job) {
        Ok(()) => ok(lua, true),
        Err((Error::MailboxFull(_), _)) => fail(lua, "mailbox_full"),
        Err((e, _)) => fail(lua, format!("graft.{what}: {e}")),
    }
}

/// `same_data(a, b)`: whether two values have the same data (JSON form).
fn same_data(lua: &Lua, (a, b): (Value, Value)) -> mlua::Result<bool> {
    let k = kernel(lua);
    Ok(matches!((to_json(&k, "value", &a), to_json(&k, "value", &b)), (Ok(x), Ok(y)) if x == y))
}
