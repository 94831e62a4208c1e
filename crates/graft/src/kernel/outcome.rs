//! The outcome of a callback: what the kernel does when a job returned,
//! raised, waits, or was preempted, and the exit reason of one that raised.
//!
//! Invariants:
//! * A job's waiter is answered exactly once: here when the job finished,
//!   by [`Kernel::finalize`] when the process died first.
//! * An exit that arrived while the callback ran (`exit_pending`) takes
//!   effect as soon as the callback is off the VM stack; `graft.exit`'s
//!   reason wins over the error it raised to unwind the guest.
//! * Routing an outcome never runs Luau code, so it holds the kernel borrow.

use mlua::{Lua, Thread, Value};

use super::exit::{eval_error, raise_site};
use super::process::{Job, Run};
use super::{truncate_reason, Kernel, KernelHandle};
use crate::error::Error;
use crate::value::ExitReason;
use crate::vm::Fault;

/// The outcome of a finished stretch of a callback.
pub(super) enum Outcome {
    /// It returned this value.
    Done(Value),
    /// It raised (or ran out of time or memory).
    Failed(ExitReason),
    /// It waits for this token (a reply, a child's init, a shutdown).
    Suspended(u64, Thread),
    /// The interrupt preempted it (or the guest yielded): it continues later.
    Preempted(Thread),
}

/// Acts on a job's outcome: routes replies, handles crashes and exits.
pub(super) fn finish_job(lua: &Lua, kh: &KernelHandle, serial: u64, outcome: Outcome) {
    kh.borrow().finish_job(lua, serial, outcome);
}

impl Kernel {
    /// Acts on a job's outcome: routes replies, handles crashes and exits.
    pub(super) fn finish_job(&mut self, lua: &Lua, serial: u64, outcome: Outcome) {
        match outcome {
            Outcome::Suspended(token, thread) => self.job_suspended(lua, serial, token, thread),
            Outcome::Preempted(thread) => self.job_preempted(lua, serial, thread),
            Outcome::Done(value) => self.job_done(lua, serial, value),
            Outcome::Failed(crash) => self.job_failed(lua, serial, crash),
        }
    }

    fn job_suspended(&mut self, lua: &Lua, serial: u64, token: u64, thread: Thread) {
        let Ok(key) = lua.create_registry_value(thread) else {
            // No memory left even to keep the callback: it cannot continue.
            return self.job_failed(lua, serial, ExitReason::OutOfMemory);
        };
        let Some(p) = self.procs.get_mut(&serial) else {
            return;
        };
        // An exit that arrived while the callback ran takes effect now.
        if let Some(reason) = p.exit_pending.take().map(|b| *b) {
            p.run = Run::Suspended { thread: key, token };
            self.exit_process(serial, reason, true);
            return;
        }
        match p.parked.take().map(|b| *b) {
            // Answered before it could wait (a nested job finished first).
            Some((t, ok, value)) if t == token => {
                p.run = Run::Resumable {
                    thread: key,
                    resume: Some((ok, value)),
                };
                self.wake(serial);
            }
            _ => p.run = Run::Suspended { thread: key, token },
        }
    }

    fn job_preempted(&mut self, lua: &Lua, serial: u64, thread: Thread) {
        let Ok(key) = lua.create_registry_value(thread) else {
            return self.job_failed(lua, serial, ExitReason::OutOfMemory);
        };
        let Some(p) = self.procs.get_mut(&serial) else {
            return;
        };
        p.run = Run::Resumable {
            thread: key,
            resume: None,
        };
        match p.exit_pending.take().map(|b| *b) {
            Some(reason) => self.exit_process(serial, reason, true),
            None => self.wake(serial),
        }
    }

    /// Takes the finished job of `serial` and its pending exit, leaving it idle.
    fn take_finished(&mut self, serial: u64) -> Option<(Option<Job>, Option<ExitReason>)> {
        let p = self.procs.get_mut(&serial)?;
        p.run = Run::Idle;
        Some((p.job.take(), p.exit_pending.take().map(|b| *b)))
    }

    fn job_done(&mut self, lua: &Lua, serial: u64, value: Value) {
        let Some((job, pending)) = self.take_finished(serial) else {
            return;
        };
        match job {
            Some(Job::Call { waiter, .. }) => self.answer(lua, waiter, Ok(value)),
            Some(Job::Init { waiter, .. }) => {
                let pid = self.procs.get(&serial).map(|p| p.pid);
                match (&pending, pid) {
                    (Some(reason), _) if !reason.is_normal() => {
                        let failed = Error::SpawnFailed {
                            module: self.module_name(serial),
                            reason: reason.clone(),
                        };
                        self.answer(lua, waiter, Err(failed));
                    }
                    (_, Some(pid)) => self.answer(lua, waiter, Ok(pid.to_lua())),
                    _ => {}
                }
            }
            Some(Job::Eval { waiter, .. }) => {
                self.answer(lua, waiter, Ok(value));
                self.exit_process(serial, ExitReason::Normal, false);
            }
            Some(Job::Terminate(reason)) => return self.finalize(lua, serial, *reason),
            _ => {}
        }
        match pending {
            Some(reason) => self.exit_process(serial, reason, true),
            None => self.wake(serial),
        }
    }

    fn job_failed(&mut self, lua: &Lua, serial: u64, crash: ExitReason) {
        let Some((job, pending)) = self.take_finished(serial) else {
            return;
        };
        // graft.exit(reason) raises to unwind the guest: its reason wins.
        let reason = truncate_reason(pending.unwrap_or(crash));
        match job {
            Some(Job::Init { waiter, .. }) => {
                let failed = Error::SpawnFailed {
                    module: self.module_name(serial),
                    reason: reason.clone(),
                };
                self.answer(lua, waiter, Err(failed));
                return self.finalize(lua, serial, reason);
            }
            Some(Job::Terminate(original)) => return self.finalize(lua, serial, *original),
            Some(Job::Call { waiter, .. }) => {
                // Answered once the process is gone (after `terminate`),
                // as OTP's call monitor would: its name is free by then.
                if let Some(p) = self.procs.get_mut(&serial) {
                    p.relations_mut().crashed_callers.push(waiter);
                }
            }
            Some(Job::Eval { waiter, .. }) => {
                self.answer(lua, waiter, Err(eval_error(&reason)));
                return self.finalize(lua, serial, ExitReason::Normal);
            }
            _ => {}
        }
        if !reason.is_normal() && !matches!(reason, ExitReason::Shutdown) {
            self.report_crash(serial, &reason);
        }
        self.exit_process(serial, reason, true);
    }

    /// A `crash` event and a log line for a process that crashed.
    fn report_crash(&mut self, serial: u64, reason: &ExitReason) {
        let target = self
            .procs
            .get(&serial)
            .map(|p| self.pid_string(p.pid))
            .unwrap_or_default();
        let module = self.module_name(serial);
        self.event(
            "crash",
            serde_json::json!({ "process": target, "module": module, "reason": reason }),
        );
        tracing::warn!(sandbox = %self.id, process = %target, %reason, "process crashed");
    }
}

/// The exit reason of a callback that raised, from `failure_of`'s info: the
/// message as raised, the guest frames of the traceback, the module and line
/// where guest code raised it, and the limit Luau enforced (`fault`) if it
/// died of one.
///
/// The reason is never read from the message's text: a guest may raise any
/// text. `timed_out` is the CPU watch's flag, `fault` the VM's (see
/// [`crate::vm::Fault`]); an error value that is a Rust memory error (a
/// native's allocation refused) is out of memory too. Anything else is an
/// ordinary `error`, whatever it says.
pub(super) fn classify_failure(lua: &Lua, info: &Value, timed_out: bool) -> ExitReason {
    if timed_out {
        return ExitReason::Timeout;
    }
    let (message, traceback) = match info {
        Value::Table(t) => {
            let fault = match t.raw_get::<Value>("fault") {
                Ok(Value::Integer(n)) => Fault::from_code(n),
                Ok(Value::Number(n)) => Fault::from_code(n as i64),
                _ => None,
            };
            if let Some(reason) = fault.map(fault_reason) {
                return reason;
            }
            let msg: Value = t.raw_get("message").unwrap_or(Value::Nil);
            let tb: String = t.raw_get("traceback").unwrap_or_default();
            let msg = match msg {
                Value::String(s) => s.to_string_lossy(),
                Value::Error(e) if is_memory_error(&e) => return ExitReason::OutOfMemory,
                Value::Error(e) => e.to_string(),
                other => lua_value_text(&other),
            };
            (msg, tb)
        }
        Value::String(s) => (s.to_string_lossy(), String::new()),
        other => (lua_value_text(other), String::new()),
    };
    let frames = crate::diagnostic::guest_frames(&traceback);
    let (module, line) = raise_site(lua, &message, &frames);
    ExitReason::Error {
        traceback: crate::diagnostic::traceback_text(&frames),
        message,
        module,
        line,
    }
}

/// The exit reason of a limit Luau enforced.
fn fault_reason(fault: Fault) -> ExitReason {
    match fault {
        Fault::OutOfMemory => ExitReason::OutOfMemory,
        Fault::StackOverflow => ExitReason::StackOverflow,
    }
}

/// Whether `e` is, or wraps (a native's error carried through Luau), mlua's
/// memory error: an allocation the sandbox's allocator refused. Guest code
/// cannot make one; it can only hand on one that really happened.
fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

fn lua_value_text(v: &Value) -> String {
    match v {
        Value::UserData(_) | Value::Error(_) => v.to_string().unwrap_or_else(|_| "userdata".into()),
        other => other
            .to_string()
            .unwrap_or_else(|_| format!("a {}", other.type_name())),
    }
}

/// The exit reason of a callback whose worker died without crash info
/// (`failure_of` itself failed): only the typed signals count, as in
/// [`classify_failure`], here the thread's `fault` and the error's variant.
pub(super) fn classify_error(
    lua: &Lua,
    e: &mlua::Error,
    fault: Option<Fault>,
    timed_out: bool,
) -> ExitReason {
    if timed_out {
        return ExitReason::Timeout;
    }
    if let Some(reason) = fault.map(fault_reason) {
        return reason;
    }
    if is_memory_error(e) {
        return ExitReason::OutOfMemory;
    }
    let message = e.to_string();
    let (module, line) = raise_site(lua, &message, &[]);
    ExitReason::Error {
        message,
        traceback: String::new(),
        module,
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(lua: &Lua, message: Value, fault: Option<Fault>) -> Value {
        let t = lua.create_table().unwrap();
        t.raw_set("message", message).unwrap();
        t.raw_set("traceback", "").unwrap();
        t.raw_set("fault", fault.map(Fault::code)).unwrap();
        Value::Table(t)
    }

    #[test]
    fn the_text_of_an_error_never_makes_it_a_limit() {
        let lua = Lua::new();
        for text in [
            "not enough memory",
            "memory error: not enough memory",
            "stack overflow",
            "C stack overflow",
            "timeout: callback ran longer than handler_ms (5 ms)",
        ] {
            let s = Value::String(lua.create_string(text).unwrap());
            let reason = classify_failure(&lua, &info(&lua, s, None), false);
            assert_eq!(reason.kind(), "error", "{text}");
            assert!(reason.to_string().contains(text), "{reason}");
            let e = mlua::Error::runtime(text);
            assert_eq!(classify_error(&lua, &e, None, false).kind(), "error");
        }
    }

    #[test]
    fn the_typed_signals_decide() {
        let lua = Lua::new();
        let s = || Value::String(lua.create_string("boom").unwrap());
        let t = |fault| classify_failure(&lua, &info(&lua, s(), fault), false);
        assert_eq!(t(Some(Fault::OutOfMemory)), ExitReason::OutOfMemory);
        assert_eq!(t(Some(Fault::StackOverflow)), ExitReason::StackOverflow);
        assert_eq!(t(None).kind(), "error");
        // The watch's flag wins: a callback past its deadline timed out.
        let timed = classify_failure(&lua, &info(&lua, s(), Some(Fault::OutOfMemory)), true);
        assert_eq!(timed, ExitReason::Timeout);
        // A native's refused allocation, carried through Luau as an error value.
        let oom = mlua::Error::CallbackError {
            traceback: String::new(),
            cause: std::sync::Arc::new(mlua::Error::MemoryError("not enough memory".into())),
        };
        let v = Value::Error(Box::new(oom.clone()));
        assert_eq!(
            classify_failure(&lua, &info(&lua, v, None), false),
            ExitReason::OutOfMemory
        );
        assert_eq!(
            classify_error(&lua, &oom, None, false),
            ExitReason::OutOfMemory
        );
        let e = mlua::Error::runtime("x");
        assert_eq!(
            classify_error(&lua, &e, Some(Fault::StackOverflow), false),
            ExitReason::StackOverflow
        );
        assert_eq!(classify_error(&lua, &e, None, true), ExitReason::Timeout);
    }
}
