//! Why Luau itself ended a thread: the VM's own signals for the limits it
//! enforces, read from the dead thread, never from the error's text.
//!
//! A guest can raise any value with any text (`error("not enough memory")`),
//! so an exit reason is never classified by what an error says. What a
//! guest cannot produce:
//! * the thread's status: Luau ends a thread with `LUA_ERRMEM` only when an
//!   allocation failed (mlua's `memory_bytes` allocator refused it, or the
//!   stack would pass `MAX_STACK_SIZE`), and with `LUA_ERRERR` only when it
//!   overflowed again while handling a stack overflow; `error` always ends
//!   it with `LUA_ERRRUN`;
//! * the thread's call depth: Luau raises "stack overflow" when a call would
//!   take the depth past [`LUAI_MAXCALLS`], and a dead thread keeps its call
//!   frames. Every frame costs a call, so a guest reaches that depth only by
//!   recursing that deep: what it raises there (a call to `error` is a call
//!   too) ends a thread whose stack is exhausted.
//!
//! Not typed: Luau's "C stack overflow" (more than 200 nested re-entries of
//! the VM: metamethods, `pcall`, library callbacks calling back into Luau)
//! is a plain runtime error whose only mark is its text, and the thread's
//! re-entry count is not readable after it died. It is therefore an ordinary
//! `error` exit whose message says `C stack overflow`. Likewise a limit hit
//! inside a guest's own coroutine reaches the worker as the plain error that
//! `coroutine.resume`/`wrap` hand on, and is an `error` exit.
//!
//! Invariant: [`fault_of`] reads the thread's status and depth only (two C
//! API reads, no allocation, no Luau code), so it is safe on any thread of
//! the VM, dead or alive, and must run before the thread is closed (closing
//! resets both).

use mlua::Thread;

/// Luau's limit on nested calls of one thread (`LUAI_MAXCALLS` in
/// `luaconf.h`; mlua's vendored Luau keeps the default). A thread that died
/// at `LUAI_MAXCALLS - 1` frames has no call left: see the module docs.
pub(crate) const LUAI_MAXCALLS: i32 = 20_000;

/// A limit Luau enforced on a thread that died of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// An allocation failed (`LUA_ERRMEM`).
    OutOfMemory = 1,
    /// The call stack is exhausted (depth at the limit, or `LUA_ERRERR`).
    StackOverflow = 2,
}

impl Fault {
    /// The fault of a code written by [`Fault::code`] (the prelude carries it
    /// as a number in a worker's crash info).
    pub fn from_code(code: i64) -> Option<Fault> {
        match code {
            1 => Some(Fault::OutOfMemory),
            2 => Some(Fault::StackOverflow),
            _ => None,
        }
    }

    /// The number the prelude carries for this fault.
    pub fn code(self) -> i64 {
        self as i64
    }
}

/// The limit Luau enforced on `thread` if it died of one, else `None` (it
/// is alive, finished, or died of an error its code raised).
pub(crate) fn fault_of(thread: &Thread) -> Option<Fault> {
    let state = thread.state();
    // SAFETY: `thread` keeps the Luau thread alive (it is referenced from
    // the registry while the handle exists) and `state` is its pointer; it
    // belongs to the VM running on this thread. `lua_status` and
    // `lua_stackdepth` only read two fields of it: they cannot raise,
    // allocate or run Luau code.
    let (status, depth) = unsafe {
        (
            mlua::ffi::lua_status(state),
            mlua::ffi::lua_stackdepth(state),
        )
    };
    match status {
        mlua::ffi::LUA_ERRMEM => Some(Fault::OutOfMemory),
        mlua::ffi::LUA_ERRERR => Some(Fault::StackOverflow),
        mlua::ffi::LUA_ERRRUN if depth >= LUAI_MAXCALLS - 1 => Some(Fault::StackOverflow),
        _ => None,
    }
}

/// The `fault(co)` native the prelude's `failure_of` calls before closing a
/// dead worker: the code of [`fault_of`], or nil. Not a guest function: the
/// natives table is private to the prelude.
pub(crate) fn fault_native(_: &mlua::Lua, co: Thread) -> mlua::Result<Option<i64>> {
    Ok(fault_of(&co).map(Fault::code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::{Lua, MultiValue};

    fn died(lua: &Lua, src: &str) -> Thread {
        let f = lua.load(src).into_function().unwrap();
        let co = lua.create_thread(f).unwrap();
        assert!(co.resume::<MultiValue>(()).is_err(), "{src} must raise");
        co
    }

    #[test]
    fn an_error_the_code_raised_is_no_fault_whatever_it_says() {
        let lua = Lua::new();
        for src in [
            r#"error("not enough memory", 0)"#,
            r#"error("stack overflow", 0)"#,
            r#"error("C stack overflow", 0)"#,
            r#"error({ message = "not enough memory" })"#,
            r#"error(setmetatable({}, { __tostring = function() return "stack overflow" end }))"#,
        ] {
            assert_eq!(fault_of(&died(&lua, src)), None, "{src}");
        }
    }

    #[test]
    fn deep_recursion_is_a_stack_overflow() {
        let lua = Lua::new();
        let co = died(
            &lua,
            "local function f(n) return 1 + f(n + 1) end return f(1)",
        );
        assert_eq!(fault_of(&co), Some(Fault::StackOverflow));
        // Caught and re-raised from a shallow frame: the guest's own error.
        let co = died(
            &lua,
            r#"local function f(n) return 1 + f(n + 1) end
               local ok, e = pcall(f, 1)
               assert(not ok)
               error(e, 0)"#,
        );
        assert_eq!(fault_of(&co), None);
    }

    #[test]
    fn a_refused_allocation_is_out_of_memory() {
        let lua = Lua::new();
        lua.set_memory_limit(lua.used_memory() + 256 * 1024)
            .unwrap();
        let co = died(&lua, "local t = {} for i = 1, 1e9 do t[i] = i end");
        assert_eq!(fault_of(&co), Some(Fault::OutOfMemory));
        let _ = lua.set_memory_limit(0);
        // The same text raised by the code is not.
        let co = died(&lua, r#"error("not enough memory", 0)"#);
        assert_eq!(fault_of(&co), None);
    }

    #[test]
    fn a_thread_that_did_not_die_has_no_fault() {
        let lua = Lua::new();
        let f = lua
            .load("coroutine.yield(1) return 2")
            .into_function()
            .unwrap();
        let co = lua.create_thread(f).unwrap();
        assert_eq!(fault_of(&co), None);
        co.resume::<MultiValue>(()).unwrap();
        assert_eq!(fault_of(&co), None);
    }

    #[test]
    fn codes_round_trip() {
        for f in [Fault::OutOfMemory, Fault::StackOverflow] {
            assert_eq!(Fault::from_code(f.code()), Some(f));
        }
        assert_eq!(Fault::from_code(0), None);
        assert_eq!(Fault::from_code(-1), None);
    }
}
