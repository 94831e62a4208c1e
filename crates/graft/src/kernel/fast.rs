//! Raw natives for the hot path of calls and spawns between processes of
//! one sandbox.
//!
//! Why raw: an mlua callback costs 100–300 ns on our machines (the state
//! lock, argument conversion into references, error wrapping), and a nested
//! call crosses into Rust twice. These functions read their arguments from
//! the Luau stack directly and push numbers, booleans and light userdata only.
//!
//! Invariants:
//! * They never raise and never unwind: every Rust step runs behind the
//!   panic barrier of [`with_kernel`], and the C-API calls they make cannot
//!   raise (type checks before reads; at most five pushes on the caller's
//!   stack, within the `LUA_MINSTACK` slots Luau guarantees a C function;
//!   `call_run` reserves room on the worker's stack with the protected
//!   `lua_checkstack` before it pushes the job there, and never grows it
//!   after the resume; `yield_done` yields only after `lua_isyieldable`
//!   said it may).
//! * When anything is unusual (not in a callback, callee busy, unknown
//!   module, a limit) they change nothing and return no values; the prelude
//!   then takes the mlua natives (`N.call`, `N.spawn`, `N.nest_done`), which
//!   handle every case and report errors.
//! * Module tables are pushed by the prelude from its `MODS` mirror, indexed
//!   by module index + 1 (kept by the upgrade engine's commit).
//! * This module imports the kernel only; `natives` installs it (never the
//!   other way round).

use std::cell::RefCell;
use std::ffi::c_int;

use mlua::ffi;
use mlua::Lua;

use super::{Kernel, KernelHandle, DEFAULT_CALL_TIMEOUT_MS};
use crate::value::{VmPid, MARK_CLOSED, MARK_DONE};

thread_local! {
    /// The kernel of the slice running on this thread, for these natives:
    /// the identity of its VM ([`vm_identity`]) and the handle.
    /// Set by [`SliceKernel::enter`] for a slice, cleared when it ends.
    static SLICE_KERNEL: RefCell<Option<(usize, KernelHandle)>> = const { RefCell::new(None) };
}

/// Whether this thread can still enter a slice: false in a thread-local's
/// destructor at thread exit once `SLICE_KERNEL` is gone, where
/// [`SliceKernel::enter`] would panic (and the slice's barrier would fail
/// the sandbox for the caller's thread state). A caller then queues.
pub(crate) fn can_enter_slice_here() -> bool {
    SLICE_KERNEL.try_with(|_| ()).is_ok()
}

/// Makes `kh` the kernel these natives look at first on this thread, until
/// dropped (the end of the slice): an mlua app-data lookup takes the VM's
/// lock and costs about as much as the rest of a fast call.
///
/// Invariant: the cached handle is only ever used for the VM whose identity
/// it was created with (`KernelHandle::vm`, the same callbacks address)
/// while that VM is alive, which it is for the whole slice; the cache owns
/// a clone of the handle, so nothing in it can dangle.
pub(crate) struct SliceKernel {
    previous: Option<(usize, KernelHandle)>,
}

impl SliceKernel {
    pub fn enter(kh: &KernelHandle) -> SliceKernel {
        let previous = SLICE_KERNEL.with(|c| c.borrow_mut().replace((kh.vm(), kh.clone())));
        SliceKernel { previous }
    }
}

impl Drop for SliceKernel {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SLICE_KERNEL.with(|c| *c.borrow_mut() = previous);
    }
}

/// The identity of the VM `state` belongs to: its global callbacks, which
/// every thread of one VM shares.
///
/// # Safety
///
/// `state` must be a live thread of a Luau VM.
pub(crate) unsafe fn vm_identity(state: *mut ffi::lua_State) -> usize {
    // SAFETY: `state` is live (the contract); `lua_callbacks` only returns
    // the address of its VM's callbacks, which live as long as the VM.
    unsafe { ffi::lua_callbacks(state) as usize }
}

/// Runs `f` on the kernel of `state`'s VM: the slice's cached one when it is
/// that VM's ([`SliceKernel`]), else from the VM's app data. `None` when
/// the kernel is borrowed already.
///
/// # Safety
///
/// As [`with_kernel`].
unsafe fn on_kernel<R>(state: *mut ffi::lua_State, f: impl FnOnce(&mut Kernel) -> R) -> Option<R> {
    // SAFETY: forwarded contract.
    let vm = unsafe { vm_identity(state) };
    let mut f = Some(f);
    let cached = SLICE_KERNEL.with(|c| {
        let c = c.borrow();
        let (key, kh) = c.as_ref()?;
        if *key != vm {
            return None;
        }
        let mut k = kh.try_borrow()?;
        f.take().map(|f| f(&mut k))
    });
    if cached.is_some() {
        return cached;
    }
    let f = f.take()?;
    // SAFETY: forwarded contract.
    let lua = unsafe { Lua::get_or_init_from_ptr(state) };
    // The app-data borrow is held while `f` runs: `f` runs no Luau code and
    // sets no app data, so nothing needs the container meanwhile.
    let handle = lua.app_data_ref::<KernelHandle>()?;
    let mut k = handle.try_borrow()?;
    Some(f(&mut k))
}

/// Runs `f` on the kernel behind a panic barrier: these functions are called
/// from Luau's C stack, which a panic must never unwind through. A panic is
/// parked in the kernel (`internal_error`) and re-raised by the scheduler at
/// the end of the slice, where it fails the sandbox; here it reads as "no
/// fast path".
///
/// # Safety
///
/// `state` must be a live thread of a VM created by mlua, on the thread
/// running that VM (what Luau passes to a C function it calls).
unsafe fn with_kernel<R>(
    state: *mut ffi::lua_State,
    f: impl FnOnce(&mut Kernel) -> R,
) -> Option<R> {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: per this function's contract.
        unsafe { on_kernel(state, f) }
    }));
    match ran {
        Ok(r) => r,
        Err(payload) => {
            let parked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: per this function's contract, `state` belongs to a
                // live mlua VM, which is what `get_or_init_from_ptr` requires.
                let lua = unsafe { Lua::get_or_init_from_ptr(state) };
                if let Some(handle) = lua.app_data_ref::<KernelHandle>().map(|h| h.clone()) {
                    if let Some(mut k) = handle.try_borrow() {
                        k.internal_error = Some(crate::vm::panic_text(&*payload));
                    }
                }
            }));
            // Nowhere left to report it: never unwind into C.
            if parked.is_err() {
                std::process::abort();
            }
            None
        }
    }
}

/// The UTF-8 text of the string at `idx`, if it is one.
///
/// # Safety
///
/// `state` must be live and `idx` a valid index of its stack. The text
/// borrows the Luau string, which must stay on the stack while it is used.
unsafe fn str_at<'a>(state: *mut ffi::lua_State, idx: c_int) -> Option<&'a str> {
    // SAFETY: `state` and `idx` are valid (the contract); the type check
    // comes first, so `lua_tolstring` neither converts nor raises, and the
    // pointer and length it returns describe the string's bytes, kept alive
    // by the stack slot.
    unsafe {
        if ffi::lua_type(state, idx) != ffi::LUA_TSTRING {
            return None;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(state, idx, &mut len);
        std::str::from_utf8(std::slice::from_raw_parts(p.cast::<u8>(), len)).ok()
    }
}

/// Serial of the process a guest value names: a pid or a registered name.
///
/// # Safety
///
/// `state` must be live and `idx` a valid index of its stack.
unsafe fn target_at(state: *mut ffi::lua_State, idx: c_int, k: &Kernel) -> Option<u64> {
    // SAFETY: `state` and `idx` are valid (the contract); each read matches
    // the type just checked.
    unsafe {
        match ffi::lua_type(state, idx) {
            ffi::LUA_TSTRING => k.names.get(str_at(state, idx)?).copied(),
            ffi::LUA_TLIGHTUSERDATA => {
                let raw = ffi::lua_touserdata(state, idx) as usize as u64;
                let pid = VmPid::from_raw(raw)?;
                k.procs.contains_key(&pid.serial()).then_some(pid.serial())
            }
            _ => None,
        }
    }
}

/// Pushes the three results of a begun nested job.
///
/// # Safety
///
/// `state` must be live with room for three values (a C function has
/// `LUA_MINSTACK`).
unsafe fn push_begun(state: *mut ffi::lua_State, serial: u64, module: u32, pid: VmPid) -> c_int {
    // SAFETY: `state` is live with room (the contract); these pushes
    // allocate nothing, so they cannot raise.
    unsafe {
        ffi::lua_pushnumber(state, serial as f64);
        ffi::lua_pushnumber(state, module as f64 + 1.0);
        ffi::lua_pushlightuserdata(state, pid.raw() as usize as *mut std::ffi::c_void);
    }
    3
}

/// Whether `state` is the worker of the innermost running callback (the
/// watch holds its address). The fast paths nest only there: in a coroutine
/// the callback created, a job must be able to wait, which the full natives
/// arrange. This replaces a lookup of the worker set in the prelude.
fn on_running_worker(state: *mut ffi::lua_State, k: &Kernel) -> bool {
    k.watch.thread.load(std::sync::atomic::Ordering::Relaxed) == state as usize
}

/// `call_run(target, request, worker, MODS)`: a whole nested call of an
/// idle callee, in one native. Begins the callee's `handle_call` on
/// `worker` (a pooled worker coroutine) and resumes it with the job, as the
/// prelude would with `coroutine.resume`. Returns:
/// * nothing: not begun (not on the callback's own worker, callee busy or
///   unknown, a limit); the prelude takes `N.call`;
/// * `(1, reply)`: the handler returned in time and its frame is closed
///   (the worker yielded `CLOSED`);
/// * `(2, serial, alive, mark, value)`: begun but not simply finished, as
///   `coroutine.resume` would have reported it, for `settle_nested`.
///
/// # Safety
///
/// Called by Luau only, as a C function of a VM created by mlua.
pub(crate) unsafe extern "C-unwind" fn call_run(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: Luau passes a live state whose stack holds our arguments
    // (absent ones read as none). `co` is a thread of the same VM, checked
    // by type, kept alive by our stack slot 3, and suspended (a pooled
    // worker) or fresh, which `lua_resume` checks itself. Its stack gets
    // room for the six job values before anything changes, so every push
    // and move below fits; `lua_resume` runs the callee protected and
    // returns its status, so nothing here raises. No Rust value with a
    // destructor is alive while Luau runs.
    unsafe {
        if ffi::lua_type(state, 3) != ffi::LUA_TTHREAD || ffi::lua_type(state, 4) != ffi::LUA_TTABLE
        {
            return 0;
        }
        let co = ffi::lua_tothread(state, 3);
        if co.is_null() || ffi::lua_checkstack(co, 8) == 0 {
            return 0;
        }
        let begun = with_kernel(state, |k| {
            if !on_running_worker(state, k) {
                return None;
            }
            let me = k.current()?;
            let to = target_at(state, 1, k)?;
            if to == me {
                return None;
            }
            let token = k.token();
            let (module, from) =
                k.begin_nested_call(me, to, token, co as usize, DEFAULT_CALL_TIMEOUT_MS)?;
            Some((to, module, from))
        });
        let Some((serial, module, from)) = begun.flatten() else {
            return 0;
        };
        // The job, as the worker reads it: (op, serial, module, request,
        // from, reply_in_vm).
        ffi::lua_pushnumber(co, f64::from(super::process::OP_CALL));
        ffi::lua_pushnumber(co, serial as f64);
        // Module indices are small; an impossible one reads nil, and the
        // callee fails on it like any crash.
        let slot = c_int::try_from(u64::from(module) + 1).unwrap_or(0);
        ffi::lua_rawgeti_(state, 4, slot);
        ffi::lua_xmove(state, co, 1);
        ffi::lua_pushvalue(state, 2);
        ffi::lua_xmove(state, co, 1);
        ffi::lua_pushlightuserdata(co, from.raw() as usize as *mut std::ffi::c_void);
        ffi::lua_pushboolean(co, 1);
        let status = ffi::lua_resume_(co, state, 6);
        nested_outcome(state, co, serial, status)
    }
}

/// What `call_run` returns once the worker `co` of `serial`'s nested job
/// came back from `lua_resume` with `status` (see [`call_run`]).
///
/// # Safety
///
/// `state` and `co` are live threads of one VM, `co` just resumed by
/// `state`, and `state` has room for five values (a C function's
/// `LUA_MINSTACK`).
unsafe fn nested_outcome(
    state: *mut ffi::lua_State,
    co: *mut ffi::lua_State,
    serial: u64,
    status: c_int,
) -> c_int {
    // SAFETY: per the contract; `co`'s stack holds what it yielded (its
    // values since its base) or its error on top. Its stack only shrinks
    // here (`lua_settop` to fewer values, moves off it): a preempted worker
    // yielded from a full Luau frame, where growing it could fail and
    // raise. `state` gets at most five values.
    unsafe {
        let yielded = status == ffi::LUA_YIELD || status == ffi::LUA_OK;
        if yielded && ffi::lua_gettop(co) == 2 && is_marker(co, 1, MARK_CLOSED) {
            ffi::lua_pushnumber(state, 1.0);
            ffi::lua_xmove(co, state, 1);
            ffi::lua_settop(co, 0);
            return 2;
        }
        ffi::lua_pushnumber(state, 2.0);
        ffi::lua_pushnumber(state, serial as f64);
        if yielded {
            // (true, mark, value): the first two values it yielded, nil
            // for those it did not (a preempted worker yields none).
            ffi::lua_pushboolean(state, 1);
            let n = ffi::lua_gettop(co);
            if n > 2 {
                ffi::lua_settop(co, 2);
            }
            let moved = n.clamp(0, 2);
            ffi::lua_xmove(co, state, moved);
            for _ in moved..2 {
                ffi::lua_pushnil(state);
            }
        } else {
            // (false, error): it died; its stack stays for the traceback.
            ffi::lua_pushboolean(state, 0);
            ffi::lua_xmove(co, state, 1);
            ffi::lua_pushnil(state);
        }
        5
    }
}

/// Whether the value at `idx` of `state` is the marker `mark`.
///
/// # Safety
///
/// `state` must be live and `idx` a valid index of its stack.
unsafe fn is_marker(state: *mut ffi::lua_State, idx: c_int, mark: u64) -> bool {
    // SAFETY: per the contract; the read matches the type just checked.
    unsafe {
        ffi::lua_type(state, idx) == ffi::LUA_TLIGHTUSERDATA
            && ffi::lua_touserdata(state, idx) as usize as u64 == mark
    }
}

/// `spawn_fast(module_name, name_or_nil, link, worker)`: creates a process
/// and begins its `init` nested on `worker`. Returns `(serial,
/// module_index, pid)` or nothing (`N.spawn` then explains or queues).
///
/// # Safety
///
/// Called by Luau only, as a C function of a VM created by mlua.
pub(crate) unsafe extern "C-unwind" fn spawn_fast(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: Luau passes a live state whose stack holds our arguments;
    // indices 1 to 4 are valid. The strings read stay on the stack until
    // we return.
    unsafe {
        if ffi::lua_type(state, 4) != ffi::LUA_TTHREAD {
            return 0;
        }
        let Some(module) = str_at(state, 1) else {
            return 0;
        };
        let name = match ffi::lua_type(state, 2) {
            ffi::LUA_TNIL => None,
            _ => match str_at(state, 2) {
                Some(s) => Some(s),
                None => return 0,
            },
        };
        let link = ffi::lua_toboolean(state, 3) != 0;
        let co = ffi::lua_topointer(state, 4) as usize;
        let begun = with_kernel(state, |k| {
            if !on_running_worker(state, k) {
                return None;
            }
            let me = k.current()?;
            let mid = k.module_id(module)?;
            if !k.nesting_left() || k.frozen.contains(&mid) || !k.is_server_module(mid) {
                return None;
            }
            let token = k.token();
            let (child, pid) = k.spawn_nested(me, mid, name, link, token, co).ok()?;
            Some((child, mid, pid))
        });
        match begun.flatten() {
            Some((child, mid, pid)) => push_begun(state, child, mid, pid),
            None => 0,
        }
    }
}

/// `yield_done(serial, result)`: how a worker ends every job. When the job
/// is the innermost nested one and stands, closes it here
/// ([`Kernel::close_nested_fast`]) and yields `(CLOSED, result)`: the
/// prelude that resumed it then has nothing left to ask. Otherwise yields
/// `(DONE, result)` for the worker's resumer (the prelude or the kernel)
/// to settle. Resuming the
/// worker again returns the next job's arguments, as `coroutine.yield` does.
///
/// Closing before the yield is sound because nothing runs on the worker
/// between the two: this function yields as it returns.
///
/// # Safety
///
/// Called by Luau only, as a C function of a VM created by mlua.
pub(crate) unsafe extern "C-unwind" fn yield_done(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: Luau passes a live state; `lua_settop` keeps exactly our two
    // arguments (a C function has `LUA_MINSTACK` slots), the type is checked
    // before the read, one push fits, and `lua_yield` is called only where
    // Luau allows a yield, so it cannot raise.
    unsafe {
        ffi::lua_settop(state, 2);
        if ffi::lua_isyieldable(state) == 0 {
            // Not reachable from the worker's body; without a yield the
            // worker reads no next job and fails visibly.
            return 0;
        }
        let closed = ffi::lua_type(state, 1) == ffi::LUA_TNUMBER && {
            let serial = ffi::lua_tonumber(state, 1) as u64;
            with_kernel(state, |k| k.close_nested_fast(serial)) == Some(true)
        };
        let mark = if closed { MARK_CLOSED } else { MARK_DONE };
        ffi::lua_pushlightuserdata(state, mark as usize as *mut std::ffi::c_void);
        ffi::lua_replace(state, 1);
        ffi::lua_yield(state, 2)
    }
}
