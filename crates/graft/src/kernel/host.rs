//! Blocking host function calls: the kernel's half. A call suspends the
//! calling process on a fresh token (as a `graft.call` that waits does); the
//! node runs the function on its blocking pool and answers through the
//! sandbox's inbox ([`Kernel::blocking_done`]).
//!
//! Invariants:
//! * A call's token names its timeout timer: an answer first cancels it, so
//!   an answer after the timeout (or for a process that is gone) is dropped,
//!   never delivered to a later wait.
//! * A call carries its VM's epoch: an answer meant for a VM that a restart
//!   replaced is dropped, even if the new VM reuses the token.
//! * Starting a call never runs Luau code and never blocks: it only queues
//!   the call in [`Kernel::blocking_out`], which the node drains after the
//!   slice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mlua::{Lua, Value};
use serde_json::Value as Json;

use super::timers::Timer;
use super::{kernel, Kernel};
use crate::vm::{BlockingStart, ContextHostFn, OUTSIDE_PROCESS};

/// A blocking host function call for the node's pool to run.
pub(crate) struct BlockingCall {
    /// The function, as registered.
    pub f: ContextHostFn,
    /// Its `"kv.get"`-style name (in errors and logs).
    pub name: Arc<str>,
    /// The calling sandbox's id.
    pub sandbox: Arc<str>,
    /// The calling process's pid text (`<module.N>`).
    pub pid: String,
    pub args: Vec<Json>,
    /// Where the answer goes: the process, its token, its VM.
    pub serial: u64,
    pub token: u64,
    pub epoch: u64,
}

/// A number per VM ever created in this program (see the invariants).
pub(crate) fn next_epoch() -> u64 {
    static EPOCH: AtomicU64 = AtomicU64::new(0);
    EPOCH.fetch_add(1, Ordering::Relaxed) + 1
}

/// The caller's context: the sandbox id and the current process's pid text.
pub(crate) fn caller_of(lua: &Lua) -> Option<(Arc<str>, String)> {
    let k = kernel(lua);
    let serial = k.current()?;
    let pid = k.procs.get(&serial)?.pid;
    Some((k.id.clone(), k.pid_string(pid)))
}

/// Queues a blocking call for the current process and returns its token.
/// The wait is bounded by the sandbox's `handler_ms` (wall clock): a host
/// function that never returns fails its caller with a timeout.
pub(crate) fn start_blocking(lua: &Lua, start: BlockingStart) -> Result<u64, String> {
    let mut k = kernel(lua);
    let serial = k.current().ok_or_else(|| OUTSIDE_PROCESS.to_owned())?;
    let pid = match k.procs.get(&serial) {
        Some(p) => p.pid,
        None => return Err(OUTSIDE_PROCESS.to_owned()),
    };
    let token = k.token();
    let ms = k.limits.handler_ms;
    let at = k.timer_now().saturating_add(ms);
    let timeout = Timer::HostFnTimeout {
        serial,
        token,
        name: start.name.clone(),
        ms,
    };
    k.add_timer_with_id(token, at, timeout);
    let call = BlockingCall {
        f: start.f,
        name: start.name,
        sandbox: k.id.clone(),
        pid: k.pid_string(pid),
        args: start.args,
        serial,
        token,
        epoch: k.epoch,
    };
    k.blocking_out.push(call);
    Ok(token)
}

impl Kernel {
    /// Resumes the process that made a blocking call with its result
    /// (`Err`: the message its guest sees after the function's name).
    pub(crate) fn blocking_done(
        &mut self,
        lua: &Lua,
        call: (u64, u64, u64),
        name: &str,
        result: Result<Json, String>,
    ) {
        let (serial, token, epoch) = call;
        // Timed out, or the process is gone: nobody waits any more.
        if epoch != self.epoch || !self.cancel_timer(token) {
            return;
        }
        let (ok, value) = match result.map(|v| crate::value::json_to_lua(lua, &v)) {
            Ok(Ok(v)) => (true, v),
            Ok(Err(e)) => (false, message(lua, &format!("{name}: {e}"))),
            Err(msg) => (false, message(lua, &format!("{name}: {msg}"))),
        };
        self.resume_with(lua, serial, token, ok, value);
    }
}

/// A message for the guest; `nil` if even the kernel's headroom is full
/// (the caller still fails rather than waiting forever).
pub(crate) fn message(lua: &Lua, text: &str) -> Value {
    lua.create_string(text).map_or(Value::Nil, Value::String)
}
