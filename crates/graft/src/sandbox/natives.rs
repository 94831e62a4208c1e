//! The Rust side of the `graft` guest API. The prelude wraps these: natives
//! never raise; they return `(value)` or `(nil, message)` and the prelude
//! raises at the guest's call site, so errors point at guest lines.

use mlua::{Lua, MultiValue, Table, Thread, Value};
use serde_json::Value as Json;

use super::log::{line_text, Admit};
use super::{kernel, send_exit_signal, Job, Kernel, NestEnd, NestResult, Target, Timer, Waiter};
use crate::clock;
use crate::error::Error;
use crate::value::{lua_to_json, Pid};

/// Default `graft.call` timeout, as OTP's `gen_server:call/2`.
pub(crate) const DEFAULT_CALL_TIMEOUT_MS: u64 = 5000;

/// The longest delay of a timer or call timeout (as OTP's timers: 2^32 - 1 ms).
pub(crate) const MAX_DELAY_MS: u64 = 4_294_967_295;

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

/// Timers a sandbox may have pending (`send_after`): each costs Rust memory
/// outside the guests' heap, so their number is bounded.
pub(crate) const MAX_PENDING_TIMERS: usize = 100_000;

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

pub(crate) fn install(lua: &Lua, n: &Table) -> mlua::Result<()> {
    macro_rules! native {
        ($name:literal, $f:expr) => {
            n.raw_set($name, lua.create_function($f)?)?;
        };
    }

    // SAFETY: see `fast`: they only read their arguments and push plain values.
    unsafe {
        n.raw_set("call_fast", lua.create_c_function(super::fast::call_fast)?)?;
        n.raw_set(
            "spawn_fast",
            lua.create_c_function(super::fast::spawn_fast)?,
        )?;
        n.raw_set("done_fast", lua.create_c_function(super::fast::done_fast)?)?;
    }

    native!("self", |lua, ()| {
        let k = kernel(lua);
        match k.current().and_then(|s| k.procs.get(&s)) {
            Some(p) => ok(lua, p.pid.to_lua()),
            None => ok(lua, Value::Nil),
        }
    });

    native!("is_pid", |_, v: Value| Ok(Pid::from_lua(&v).is_some()));

    native!("parent", |lua, ()| {
        let k = kernel(lua);
        let parent = k
            .current()
            .and_then(|s| k.procs.get(&s))
            .and_then(|p| p.parent);
        match parent.and_then(|s| k.procs.get(&s)) {
            Some(p) => ok(lua, p.pid.to_lua()),
            None => ok(lua, Value::Nil),
        }
    });

    native!("now", |_, ()| Ok(clock::unix_ms()));

    // `spawn(module, args, opts, worker)`: the prelude passes a worker
    // coroutine when the caller runs on its own worker thread. Returns
    // `(serial, module, pid)` when the child's init is to run nested on that
    // worker (then `nest_done`), `(false, token)` to wait, `(nil, message)`.
    native!("spawn", |lua,
                      (module, args, opts, co): (
        mlua::LuaString,
        Value,
        Option<Table>,
        Option<Thread>
    )| {
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
            return fail(lua, format!("graft.spawn: module `{}` has no `init` function, so it cannot run as a process", module.to_string_lossy()));
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
        let waiter = Waiter::Process { serial: me, token };
        // Nested unless the nesting depth is used up or a pending reload
        // froze the module (a new process is idle otherwise).
        let nest = k.nesting_left() && !k.frozen.contains(&mid);
        let child = if nest {
            k.create_idle_process(mid, Some(me), name.as_deref())
        } else {
            let args = lua.create_registry_value(args.clone())?;
            k.create_process(mid, Some(me), name.as_deref(), Some(args), waiter)
                .map_err(|(e, _)| e)
        };
        let child = match child {
            Ok(c) => c,
            Err(e) => return fail(lua, format!("graft.spawn: {e}")),
        };
        if link {
            k.procs.get_mut(&child).expect("new").links.push(me);
            if let Some(p) = k.procs.get_mut(&me) {
                p.links.push(child);
            }
        }
        if !nest {
            return Ok(MultiValue::from_iter([
                Value::Boolean(false),
                Value::Number(token as f64),
            ]));
        }
        let pid = k.procs.get(&child).expect("new").pid;
        k.begin_nested_init(me, child, token, co.to_pointer() as usize);
        Ok(MultiValue::from_iter([
            Value::Number(child as f64),
            Value::Table(table),
            pid.to_lua(),
        ]))
    });

    // `call(target, request, timeout_ms, worker)`: returns `(serial, module,
    // from)` when the callee is idle and its handler is to run nested on the
    // worker (then `nest_done`), `(false, token)` to wait, `(nil, message)`.
    native!("call", |lua,
                     (target, request, timeout, co): (
        Value,
        Value,
        Value,
        Option<Thread>
    )| {
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
                        format_args!(
                            "timeout_ms must be an integer from 0 to {MAX_DELAY_MS} ({got})"
                        ),
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
        let from = k.procs.get(&me).map(|p| p.pid);
        let waiter = Waiter::Process { serial: me, token };
        // Fast path: an idle callee runs its handler right here, nested; if
        // it replies without waiting itself, the caller never suspends (and
        // no timeout timer is needed: nothing else runs meanwhile).
        if k.nestable(to) {
            let module = k.module_tables[k.procs[&to].pid.module_index() as usize].clone();
            k.begin_nested_call(me, to, token, co.to_pointer() as usize, ms);
            return Ok(MultiValue::from_iter([
                Value::Number(to as f64),
                module.map(Value::Table).unwrap_or(Value::Nil),
                from.map(|p| p.to_lua()).unwrap_or(Value::Nil),
            ]));
        }
        let desc = k.describe_value(&target);
        let job = Job::Call {
            request: Some(lua.create_registry_value(request)?),
            from,
            waiter,
        };
        if let Err((e, _)) = k.deliver(to, job) {
            return fail(lua, format!("graft.call: {e}"));
        }
        // The token names the timeout timer, so a reply cancels it.
        let at = clock::precise_ms().saturating_add(ms);
        k.add_timer_with_id(
            token,
            at,
            Timer::CallTimeout {
                serial: me,
                token,
                target: desc,
                ms,
            },
        );
        Ok(MultiValue::from_iter([
            Value::Boolean(false),
            Value::Number(token as f64),
        ]))
    });

    // `nest_done(serial, end, info, worker)`: closes the nested job begun by `call`
    // or `spawn`. Returns `true` (finished; the result stays in the VM),
    // `(false, token)` to wait, or `(nil, ok, value)` when already answered.
    native!("nest_done", |lua,
                          (serial, end, info, co): (
        u64,
        u8,
        Value,
        Option<Thread>
    )| {
        let end = match end {
            1 => NestEnd::Done,
            2 => NestEnd::Failed,
            3 => NestEnd::Awaiting,
            4 => NestEnd::Preempted,
            _ => NestEnd::Failed,
        };
        Ok(match super::nest_done(lua, serial, end, info, co)? {
            NestResult::Finished => MultiValue::from_iter([Value::Boolean(true)]),
            NestResult::Wait(token) => {
                MultiValue::from_iter([Value::Boolean(false), Value::Number(token as f64)])
            }
            NestResult::Answered(ok, v) => {
                MultiValue::from_iter([Value::Nil, Value::Boolean(ok), v])
            }
        })
    });

    native!("cast", |lua, (target, msg): (Value, Value)| send_like(
        lua, target, msg, true
    ));
    native!("send", |lua, (target, msg): (Value, Value)| send_like(
        lua, target, msg, false
    ));

    native!(
        "send_after",
        |lua, (ms, target, msg): (Value, Value, Value)| {
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
                other => match Pid::from_lua(other) {
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
            let id = k.add_timer(
                clock::precise_ms().saturating_add(ms),
                Timer::SendAfter { target, message },
            );
            ok(lua, id as f64)
        }
    );

    native!("cancel_timer", |lua, id: f64| Ok(
        kernel(lua).cancel_send_after(id as u64)
    ));

    native!("register", |lua, name: Value| {
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
        let p = k.procs.get_mut(&me).expect("current");
        if let Some(old) = &p.name {
            return fail(
                lua,
                format!("graft.register: this process is registered as `{old}` already"),
            );
        }
        p.name = Some(name.as_str().into());
        k.names.insert(name.into(), me);
        ok(lua, true)
    });

    native!("unregister", |lua, name: String| {
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
    });

    native!("whereis", |lua, name: String| {
        let k = kernel(lua);
        match k.names.get(name.as_str()).and_then(|s| k.procs.get(s)) {
            Some(p) => ok(lua, p.pid.to_lua()),
            None => ok(lua, Value::Nil),
        }
    });

    native!("link", |lua, target: Value| {
        let mut k = kernel(lua);
        let Some(me) = k.current() else {
            return outside(lua, "link");
        };
        let Some(to) = k.resolve_value(&target).filter(|s| *s != me) else {
            let trap = k.procs.get(&me).is_some_and(|p| p.trap_exit);
            if let (true, Some(pid)) = (trap, Pid::from_lua(&target)) {
                // OTP: linking to a dead process while trapping exits delivers EXIT noproc
                let t = lua.create_table()?;
                t.raw_set("tag", "EXIT")?;
                t.raw_set("from", pid.to_lua())?;
                t.raw_set("reason", "noproc")?;
                let key = lua.create_registry_value(t)?;
                k.deliver_system(me, Job::Info(key));
                return ok(lua, true);
            }
            return fail(
                lua,
                format!(
                    "graft.link: no process {} (noproc)",
                    k.describe_value(&target)
                ),
            );
        };
        if !k.procs[&me].links.contains(&to) {
            k.procs.get_mut(&me).expect("current").links.push(to);
            k.procs.get_mut(&to).expect("resolved").links.push(me);
        }
        ok(lua, true)
    });

    native!("unlink", |lua, target: Value| {
        let mut k = kernel(lua);
        let Some(me) = k.current() else {
            return outside(lua, "unlink");
        };
        if let Some(to) = k.resolve_value(&target) {
            if let Some(p) = k.procs.get_mut(&me) {
                p.links.retain(|s| *s != to);
            }
            if let Some(p) = k.procs.get_mut(&to) {
                p.links.retain(|s| *s != me);
            }
        }
        ok(lua, true)
    });

    native!("monitor", |lua, target: Value| {
        let mut k = kernel(lua);
        let Some(me) = k.current() else {
            return outside(lua, "monitor");
        };
        let mref = k.token();
        match k.resolve_value(&target) {
            Some(to) => k
                .procs
                .get_mut(&to)
                .expect("resolved")
                .monitored_by
                .push((mref, me)),
            None => {
                // OTP: monitoring a dead process delivers DOWN noproc at once.
                let t = lua.create_table()?;
                t.raw_set("tag", "DOWN")?;
                t.raw_set("ref", mref as f64)?;
                t.raw_set("pid", target)?;
                t.raw_set("reason", "noproc")?;
                let key = lua.create_registry_value(t)?;
                k.deliver_system(me, Job::Info(key));
            }
        }
        ok(lua, mref as f64)
    });

    native!("demonitor", |lua, mref: f64| {
        let mut k = kernel(lua);
        let mref = mref as u64;
        let mut found = false;
        for p in k.procs.values_mut() {
            let before = p.monitored_by.len();
            p.monitored_by.retain(|(r, _)| *r != mref);
            if p.monitored_by.len() != before {
                found = true;
                break;
            }
        }
        Ok(found)
    });

    native!("trap_exit", |lua, flag: bool| {
        let mut k = kernel(lua);
        let Some(me) = k.current() else {
            return outside(lua, "trap_exit");
        };
        let p = k.procs.get_mut(&me).expect("current");
        let old = p.trap_exit;
        p.trap_exit = flag;
        ok(lua, old)
    });

    native!("exit", |lua, reason: Value| {
        let mut k = kernel(lua);
        let Some(me) = k.current() else {
            return outside(lua, "exit");
        };
        let reason = match to_json(&k, "reason", &reason) {
            Ok(j) => crate::value::ExitReason::from_json(j),
            Err(e) => return fail(lua, format!("graft.exit: {e}")),
        };
        k.procs.get_mut(&me).expect("current").exit_pending =
            Some(Box::new(super::truncate_reason(reason)));
        ok(lua, true)
    });

    native!("signal", |lua, (target, reason): (Value, Value)| {
        let mut k = kernel(lua);
        let Some(me) = k.current() else {
            return outside(lua, "exit");
        };
        let from = k.procs[&me].pid;
        let reason = match to_json(&k, "reason", &reason) {
            Ok(j) => j,
            Err(e) => return fail(lua, format!("graft.exit: {e}")),
        };
        match k.resolve_value(&target) {
            Some(to) => {
                send_exit_signal(lua, &mut k, to, from, reason);
                ok(lua, true)
            }
            None => ok(lua, false),
        }
    });

    // Lines past the sandbox's budget are counted, not written (see `log`).
    native!("log", |lua, (level, msg): (String, mlua::LuaString)| {
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
    });

    native!("shutdown_child", |lua, (target, mode): (Value, Value)| {
        let mut k = kernel(lua);
        let Some(me) = k.current() else {
            return outside(lua, "shutdown_child");
        };
        let Some(child) = k.resolve_value(&target) else {
            return ok(lua, Value::Nil);
        };
        // Unlink first (as OTP's supervisor does) so no stray EXIT arrives.
        if let Some(p) = k.procs.get_mut(&me) {
            p.links.retain(|s| *s != child);
        }
        let token = k.token();
        let c = k.procs.get_mut(&child).expect("resolved");
        c.links.retain(|s| *s != me);
        c.shutdown_waiters.push((me, token));
        match mode {
            Value::String(s) if s.to_str().is_ok_and(|s| &*s == "brutal_kill") => {
                k.exit_process(child, crate::value::ExitReason::Killed, false);
            }
            Value::Number(ms) => {
                k.exit_process(child, crate::value::ExitReason::Shutdown, true);
                // `as` saturates (NaN is 0): a huge shutdown time waits forever.
                k.add_timer(
                    clock::precise_ms().saturating_add(ms.max(0.0) as u64),
                    Timer::ShutdownKill { serial: child },
                );
            }
            Value::Integer(ms) => {
                k.exit_process(child, crate::value::ExitReason::Shutdown, true);
                k.add_timer(
                    clock::precise_ms().saturating_add(ms.max(0) as u64),
                    Timer::ShutdownKill { serial: child },
                );
            }
            _ => k.exit_process(child, crate::value::ExitReason::Shutdown, true), // infinity
        }
        ok(lua, token as f64)
    });

    native!("sup_event", |lua, kind: String| {
        let mut k = kernel(lua);
        let who = k
            .current()
            .and_then(|s| k.procs.get(&s))
            .map(|p| k.pid_string(p.pid))
            .unwrap_or_default();
        k.event(&kind, serde_json::json!({ "supervisor": who }));
        tracing::warn!(sandbox = %k.id, supervisor = %who, "{kind}");
        Ok(())
    });

    // For the supervisor's spec check: `nil`, or why a child's name is refused.
    native!("name_problem", |lua, name: Value| match name_arg(&name) {
        Ok(_) => ok(lua, Value::Nil),
        Err(why) => ok(lua, format!("badarg: {why}")),
    });

    native!("same_data", |lua, (a, b): (Value, Value)| {
        let k = kernel(lua);
        Ok(matches!((to_json(&k, "value", &a), to_json(&k, "value", &b)), (Ok(x), Ok(y)) if x == y))
    });

    Ok(())
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
        Err((crate::error::Error::MailboxFull(_), _)) => fail(lua, "mailbox_full"),
        Err((e, _)) => fail(lua, format!("graft.{what}: {e}")),
    }
}
