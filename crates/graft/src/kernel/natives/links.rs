//! Natives of links, monitors and exits (OTP semantics), and the ones the
//! built-in supervisor uses: `link`, `unlink`, `monitor`, `demonitor`,
//! `trap_exit`, `exit`, `signal`, `shutdown_child`, `sup_event`.

use mlua::{Lua, Table, Value};

use super::{fail, ok, outside, set, to_json, R};
use crate::kernel::{kernel, truncate_reason, Job, Timer};
use crate::value::{ExitReason, VmPid};

pub(super) fn install(lua: &Lua, n: &Table) -> mlua::Result<()> {
    set(lua, n, "link", link)?;
    set(lua, n, "unlink", unlink)?;
    set(lua, n, "monitor", monitor)?;
    set(lua, n, "demonitor", demonitor)?;
    set(lua, n, "trap_exit", trap_exit)?;
    set(lua, n, "exit", exit)?;
    set(lua, n, "signal", signal)?;
    set(lua, n, "shutdown_child", shutdown_child)?;
    set(lua, n, "sup_event", sup_event)
}

fn link(lua: &Lua, target: Value) -> R {
    let mut k = kernel(lua);
    let Some(me) = k.current() else {
        return outside(lua, "link");
    };
    let Some(to) = k.resolve_value(&target).filter(|s| *s != me) else {
        let trap = k.procs.get(&me).is_some_and(|p| p.trap_exit);
        if let (true, Some(pid)) = (trap, VmPid::from_lua(&target)) {
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
    k.link(me, to);
    ok(lua, true)
}

fn unlink(lua: &Lua, target: Value) -> R {
    let mut k = kernel(lua);
    let Some(me) = k.current() else {
        return outside(lua, "unlink");
    };
    if let Some(to) = k.resolve_value(&target) {
        if let Some(p) = k.procs.get_mut(&me) {
            p.unlink(to);
        }
        if let Some(p) = k.procs.get_mut(&to) {
            p.unlink(me);
        }
    }
    ok(lua, true)
}

fn monitor(lua: &Lua, target: Value) -> R {
    let mut k = kernel(lua);
    let Some(me) = k.current() else {
        return outside(lua, "monitor");
    };
    let mref = k.token();
    match k.resolve_value(&target).and_then(|to| k.procs.get_mut(&to)) {
        Some(p) => p.relations_mut().monitored_by.push((mref, me)),
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
}

fn demonitor(lua: &Lua, mref: f64) -> mlua::Result<bool> {
    let mut k = kernel(lua);
    let mref = mref as u64;
    for r in k.procs.values_mut().filter_map(|p| p.relations.as_mut()) {
        let before = r.monitored_by.len();
        r.monitored_by.retain(|(m, _)| *m != mref);
        if r.monitored_by.len() != before {
            return Ok(true);
        }
    }
    Ok(false)
}

fn trap_exit(lua: &Lua, flag: bool) -> R {
    let mut k = kernel(lua);
    let Some(p) = k.current().and_then(|me| k.procs.get_mut(&me)) else {
        return outside(lua, "trap_exit");
    };
    let old = p.trap_exit;
    p.trap_exit = flag;
    ok(lua, old)
}

/// `exit(reason)`: the calling process exits once its callback unwinds.
fn exit(lua: &Lua, reason: Value) -> R {
    let mut k = kernel(lua);
    let Some(me) = k.current() else {
        return outside(lua, "exit");
    };
    let reason = match to_json(&k, "reason", &reason) {
        Ok(j) => ExitReason::from_json(j),
        Err(e) => return fail(lua, format!("graft.exit: {e}")),
    };
    if let Some(p) = k.procs.get_mut(&me) {
        p.exit_pending = Some(Box::new(truncate_reason(reason)));
    }
    ok(lua, true)
}

/// `signal(pid, reason)`: an exit signal to another process (OTP `exit/2`).
fn signal(lua: &Lua, (target, reason): (Value, Value)) -> R {
    let mut k = kernel(lua);
    let Some(from) = k.current().and_then(|me| k.procs.get(&me)).map(|p| p.pid) else {
        return outside(lua, "exit");
    };
    let reason = match to_json(&k, "reason", &reason) {
        Ok(j) => j,
        Err(e) => return fail(lua, format!("graft.exit: {e}")),
    };
    match k.resolve_value(&target) {
        Some(to) => {
            k.send_exit_signal(lua, to, from, reason);
            ok(lua, true)
        }
        None => ok(lua, false),
    }
}

/// `shutdown_child(child, mode)`: stops a child as OTP's supervisor does
/// (`brutal_kill`, a timeout in ms, or `infinity`); returns the token the
/// supervisor waits on until the child is gone.
fn shutdown_child(lua: &Lua, (target, mode): (Value, Value)) -> R {
    let mut k = kernel(lua);
    let Some(me) = k.current() else {
        return outside(lua, "shutdown_child");
    };
    let Some(child) = k.resolve_value(&target) else {
        return ok(lua, Value::Nil);
    };
    // Unlink first (as OTP's supervisor does) so no stray EXIT arrives.
    if let Some(p) = k.procs.get_mut(&me) {
        p.unlink(child);
    }
    let token = k.token();
    let Some(c) = k.procs.get_mut(&child) else {
        return ok(lua, Value::Nil);
    };
    c.unlink(me);
    c.relations_mut().shutdown_waiters.push((me, token));
    // `as` saturates (NaN is 0): a huge shutdown time waits forever.
    let kill_after = match mode {
        Value::String(s) if s.to_str().is_ok_and(|s| &*s == "brutal_kill") => {
            k.exit_process(child, ExitReason::Killed, false);
            return ok(lua, token as f64);
        }
        Value::Number(ms) => Some(ms.max(0.0) as u64),
        Value::Integer(ms) => Some(ms.max(0) as u64),
        _ => None, // infinity
    };
    k.exit_process(child, ExitReason::Shutdown, true);
    if let Some(ms) = kill_after {
        let now = k.timer_now();
        k.add_timer(
            now.saturating_add(ms),
            Timer::ShutdownKill { serial: child },
        );
    }
    ok(lua, token as f64)
}

fn sup_event(lua: &Lua, kind: String) -> mlua::Result<()> {
    let mut k = kernel(lua);
    let who = k
        .current()
        .and_then(|s| k.procs.get(&s))
        .map(|p| k.pid_string(p.pid))
        .unwrap_or_default();
    k.event(&kind, serde_json::json!({ "supervisor": who }));
    tracing::warn!(sandbox = %k.id, supervisor = %who, "{kind}");
    Ok(())
}
