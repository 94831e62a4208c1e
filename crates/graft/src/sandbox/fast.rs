//! Raw natives for the hot path of calls and spawns between processes of
//! one sandbox.
//!
//! Why raw: an mlua callback costs 100–300 ns on our machines (the state
//! lock, argument conversion into references, error wrapping), and a nested
//! call crosses into Rust twice. These functions read their arguments from
//! the Luau stack directly and push numbers, booleans and light userdata only.
//!
//! Invariants:
//! * They never raise and never panic. When anything is unusual (not in a
//!   callback, callee busy, unknown module, a limit) they change nothing and
//!   return no values; the prelude then takes the mlua natives (`N.call`,
//!   `N.spawn`, `N.nest_done`), which handle every case and report errors.
//! * Module tables are pushed by the prelude from its `MODS` mirror, indexed
//!   by module index + 1 (kept by the upgrade engine's commit).

use std::ffi::c_int;

use mlua::ffi;
use mlua::Lua;

use super::natives::DEFAULT_CALL_TIMEOUT_MS;
use super::Kernel;
use crate::value::Pid;

/// Runs `f` on the kernel behind a panic barrier: these functions are called
/// from Luau's C stack, which a panic must never unwind through. A panic is
/// parked in the kernel (`internal_error`) and re-raised by the scheduler at
/// the end of the slice, where it fails the sandbox; here it reads as "no
/// fast path".
unsafe fn with_kernel<R>(
    state: *mut ffi::lua_State,
    f: impl FnOnce(&mut Kernel) -> R,
) -> Option<R> {
    // SAFETY: natives run inside a VM created by mlua, which owns the state.
    let lua = Lua::get_or_init_from_ptr(state);
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut k = lua.try_app_data_mut::<Kernel>().ok()??;
        Some(f(&mut k))
    }));
    match ran {
        Ok(r) => r,
        Err(payload) => {
            if let Ok(Some(mut k)) = lua.try_app_data_mut::<Kernel>() {
                k.internal_error = Some(super::panic_text(&*payload));
            }
            None
        }
    }
}

/// Serial of the process a guest value names: a pid or a registered name.
unsafe fn target_at(state: *mut ffi::lua_State, idx: c_int, k: &Kernel) -> Option<u64> {
    match ffi::lua_type(state, idx) {
        ffi::LUA_TSTRING => {
            let mut len = 0usize;
            let p = ffi::lua_tolstring(state, idx, &mut len);
            let bytes = std::slice::from_raw_parts(p.cast::<u8>(), len);
            k.names.get(std::str::from_utf8(bytes).ok()?).copied()
        }
        ffi::LUA_TLIGHTUSERDATA => {
            let raw = ffi::lua_touserdata(state, idx) as usize as u64;
            let pid = Pid::from_raw(raw)?;
            k.procs.contains_key(&pid.serial()).then_some(pid.serial())
        }
        _ => None,
    }
}

unsafe fn push_pid(state: *mut ffi::lua_State, pid: Pid) {
    ffi::lua_pushlightuserdata(state, pid.raw() as usize as *mut std::ffi::c_void);
}

/// `call_fast(target, worker)`: begins a nested `handle_call` of an idle
/// callee on `worker`. Returns `(serial, module_index, from)` or nothing.
pub(crate) unsafe extern "C-unwind" fn call_fast(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_type(state, 2) != ffi::LUA_TTHREAD {
        return 0;
    }
    let co = ffi::lua_topointer(state, 2) as usize;
    let begun = with_kernel(state, |k| {
        let me = k.current()?;
        let to = target_at(state, 1, k)?;
        if to == me || !k.nestable(to) {
            return None;
        }
        let module = k.procs.get(&to)?.pid.module_index();
        let token = k.token();
        let from = k.begin_nested_call(me, to, token, co, DEFAULT_CALL_TIMEOUT_MS)?;
        Some((to, module, from))
    });
    match begun.flatten() {
        Some((to, module, from)) => {
            ffi::lua_pushnumber(state, to as f64);
            ffi::lua_pushnumber(state, module as f64 + 1.0);
            push_pid(state, from);
            3
        }
        None => 0,
    }
}

/// `spawn_fast(module_name, name_or_nil, link, worker)`: creates a process
/// and begins its `init` nested on `worker`. Returns `(serial,
/// module_index, pid)` or nothing (`N.spawn` then explains or queues).
pub(crate) unsafe extern "C-unwind" fn spawn_fast(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_type(state, 1) != ffi::LUA_TSTRING || ffi::lua_type(state, 4) != ffi::LUA_TTHREAD {
        return 0;
    }
    let name = match ffi::lua_type(state, 2) {
        ffi::LUA_TNIL => None,
        ffi::LUA_TSTRING => {
            let mut len = 0usize;
            let p = ffi::lua_tolstring(state, 2, &mut len);
            match std::str::from_utf8(std::slice::from_raw_parts(p.cast::<u8>(), len)) {
                Ok(s) => Some(s),
                Err(_) => return 0,
            }
        }
        _ => return 0,
    };
    let link = ffi::lua_toboolean(state, 3) != 0;
    let co = ffi::lua_topointer(state, 4) as usize;
    let mut len = 0usize;
    let p = ffi::lua_tolstring(state, 1, &mut len);
    let Ok(module) = std::str::from_utf8(std::slice::from_raw_parts(p.cast::<u8>(), len)) else {
        return 0;
    };
    let begun = with_kernel(state, |k| {
        let me = k.current()?;
        let mid = k.module_id(module)?;
        if !k.nesting_left() || k.frozen.contains(&mid) || !k.is_server_module(mid) {
            return None;
        }
        let child = k.create_idle_process(mid, Some(me), name).ok()?;
        if link {
            k.procs.get_mut(&child)?.links.push(me);
            k.procs.get_mut(&me)?.links.push(child);
        }
        let pid = k.procs.get(&child)?.pid;
        let token = k.token();
        k.begin_nested_init(me, child, token, co);
        Some((child, mid, pid))
    });
    match begun.flatten() {
        Some((child, mid, pid)) => {
            ffi::lua_pushnumber(state, child as f64);
            ffi::lua_pushnumber(state, mid as f64 + 1.0);
            push_pid(state, pid);
            3
        }
        None => 0,
    }
}

/// `done_fast(serial)`: closes the nested job of `serial` when it is the
/// innermost, its callback returned in time and nothing else needs deciding.
/// Returns `true`, or nothing (then `N.nest_done` closes it).
pub(crate) unsafe extern "C-unwind" fn done_fast(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_type(state, 1) != ffi::LUA_TNUMBER {
        return 0;
    }
    let serial = ffi::lua_tonumber(state, 1) as u64;
    let closed = with_kernel(state, |k| k.close_nested_fast(serial));
    if closed == Some(true) {
        ffi::lua_pushboolean(state, 1);
        1
    } else {
        0
    }
}
