//! Answers: routing a job's result to whoever waits for it (a host's slot or
//! a process suspended on a token).
//!
//! Invariants:
//! * An answer is given at most once: a host slot is emptied by the first
//!   answer; a process token is consumed by the first resume, and stale or
//!   early answers are parked, never delivered to a later wait.
//! * Answering never runs Luau code: it only creates values, so it runs
//!   with the kernel borrowed.
//! * While a rebuild holds answers (`Kernel::held_answers`), a host's
//!   answer is kept, not sent: the old app's effects after the rebuild read
//!   its states are not in the rebuilt sandbox (see `node::durable`).

use mlua::{Lua, Value};

use super::process::{Run, Waiter};
use super::Kernel;
use crate::error::Error;
use crate::value::lua_to_json;

impl Kernel {
    /// Wakes a process suspended on `token` with `(ok, value)`; stale tokens are ignored.
    pub(crate) fn resume_with(
        &mut self,
        lua: &Lua,
        serial: u64,
        token: u64,
        ok: bool,
        value: Value,
    ) {
        let Ok(key) = lua.create_registry_value(value) else {
            return;
        };
        // A call's token names its timeout timer: the answer cancels it.
        self.cancel_timer(token);
        let Some(p) = self.procs.get_mut(&serial) else {
            return;
        };
        match std::mem::replace(&mut p.run, Run::Idle) {
            Run::Suspended { thread, token: t } if t == token => {
                p.run = Run::Resumable {
                    thread,
                    resume: Some((ok, key)),
                };
                self.wake(serial);
            }
            other => {
                // Not waiting yet (preempted before it could) or a stale answer:
                // park it; a later wait on another token discards it.
                p.run = other;
                p.parked = Some(Box::new((token, ok, key)));
            }
        }
    }

    /// Takes an answer parked for `serial` under `token` (set by a nested job
    /// that finished before its caller had to wait).
    pub(crate) fn take_parked(
        &mut self,
        lua: &Lua,
        serial: u64,
        token: u64,
    ) -> Option<(bool, Value)> {
        let p = self.procs.get_mut(&serial)?;
        let (ok, key) = match p.parked.take() {
            Some(b) if b.0 == token => {
                let (_, ok, key) = *b;
                (ok, key)
            }
            other => {
                p.parked = other;
                return None;
            }
        };
        let value: Value = lua.registry_value(&key).ok()?;
        let _ = lua.remove_registry_value(key);
        Some((ok, value))
    }

    /// Routes a job's result to whoever waits for it.
    pub(crate) fn answer(&mut self, lua: &Lua, waiter: Waiter, result: Result<Value, Error>) {
        match waiter {
            Waiter::Host(slot) => {
                if slot.is_answered() {
                    return;
                }
                let r = result.and_then(|v| {
                    lua_to_json(&v, "reply", self.max_value_bytes, &|p| self.pid_string(p))
                        .map_err(Error::from)
                });
                let timer = slot.timer();
                match self.held_answers.as_mut() {
                    Some(held) => held.push((slot, r)),
                    None => {
                        slot.answer(r);
                    }
                }
                if timer != 0 {
                    self.cancel_timer(timer);
                }
            }
            Waiter::Process { serial, token } => match result {
                Ok(v) => self.resume_with(lua, serial, token, true, v),
                Err(e) => {
                    // Out of memory even in the kernel's headroom: the caller
                    // still fails, with no message, rather than waiting forever.
                    let msg = lua
                        .create_string(e.to_string())
                        .map_or(Value::Nil, Value::String);
                    self.resume_with(lua, serial, token, false, msg)
                }
            },
        }
    }
}
