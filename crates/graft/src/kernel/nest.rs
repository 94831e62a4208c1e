//! Nested jobs: the fast path of `graft.call` and `graft.spawn` between
//! processes of one sandbox. An idle callee runs its callback at once, on a
//! worker the prelude resumes itself inside the caller's callback; if it
//! finishes without waiting, the caller never suspends.
//!
//! Two native crossings per job (begin, [`nest_done`]); the request, the
//! reply and the state never leave the VM.
//!
//! Invariants:
//! * A job nests only in a process that could run it now without changing
//!   the order of its messages ([`Kernel::nestable`]): idle, nothing
//!   queued, not frozen by a pending reload, and within [`MAX_NESTING`].
//! * Every begun frame is closed exactly once: by [`nest_done`] (or its fast
//!   form [`Kernel::close_nested_fast`]), or, when the calling callback
//!   unwound first, by crashing the orphaned callee.
//! * The time a nested callback runs is charged to it, not to its caller;
//!   while it runs, the caller's worker is exempt from the interrupt.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use mlua::{Lua, Thread, Value};

use super::outcome::{classify_failure, Outcome};
use super::process::{Job, Process, Run, Waiter};
use super::timers::Timer;
use super::watch::WatchSave;
use super::{kernel, Kernel, MAX_NESTING};
use crate::clock;
use crate::value::{ExitReason, VmPid};

/// A job the prelude runs nested on a worker it resumes itself.
pub(crate) struct NestFrame {
    serial: u64,
    wait: NestWait,
    enclosing: WatchSave,
    start: u64,
}

/// Who waits for a nested job if it does not finish at once.
pub(crate) struct NestWait {
    pub caller: u64,
    pub token: u64,
    /// For calls: the caller's timeout, armed only if the caller must wait.
    pub timeout_ms: Option<u64>,
}

/// How the prelude's resume of a nested worker ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum NestEnd {
    /// The callback returned (`DONE`).
    Done = 1,
    /// The callback raised and ended its worker (info from `failure_of`).
    Failed = 2,
    /// The callback waits on a token of its own (`AWAIT`).
    Awaiting = 3,
    /// Preempted, or the guest yielded the worker.
    Preempted = 4,
}

impl NestEnd {
    /// The prelude's code for an end; unknown codes count as failures.
    pub fn from_code(code: u8) -> NestEnd {
        match code {
            1 => NestEnd::Done,
            3 => NestEnd::Awaiting,
            4 => NestEnd::Preempted,
            _ => NestEnd::Failed,
        }
    }
}

/// What the caller of a nested job does next.
pub(crate) enum NestResult {
    /// The job finished and its result stays in the VM.
    Finished,
    /// Already answered (a crash or refusal): `(ok, value)`.
    Answered(bool, Value),
    /// Wait for this token.
    Wait(u64),
}

/// The process's side of [`Kernel::nestable`] (the nesting depth is the
/// kernel's): one rule for the check and for [`Kernel::begin_nested_call`],
/// which holds the callee mutably while it checks.
fn takes_nested_job(p: &Process, frozen: &HashSet<u32>) -> bool {
    p.takes_job_now() && !frozen.contains(&p.pid.module_index())
}

impl Kernel {
    /// Whether `serial` may run a job nested in the current callback, right
    /// now, ahead of its mailbox: it is idle with nothing queued (so order
    /// is kept), no reload froze its module, and the nesting depth allows it.
    pub fn nestable(&self, serial: u64) -> bool {
        self.nesting_left()
            && self
                .procs
                .get(&serial)
                .is_some_and(|p| takes_nested_job(p, &self.frozen))
    }

    /// Whether one more callback may nest on the VM stack.
    pub fn nesting_left(&self) -> bool {
        self.stack.len() < MAX_NESTING
    }

    /// Starts `callee`'s `handle_call` nested in `caller`'s callback on worker
    /// `co` (see [`Kernel::push_nested`]) when the callee is
    /// [`Kernel::nestable`]; `token` is what the caller waits on if it has
    /// to, for up to `timeout_ms`. Looks each process up once (the message
    /// path of `call_run`). Returns the callee's module index and the
    /// caller's pid, or `None` (and changes nothing).
    pub fn begin_nested_call(
        &mut self,
        caller: u64,
        callee: u64,
        token: u64,
        co: usize,
        timeout_ms: u64,
    ) -> Option<(u32, VmPid)> {
        if !self.nesting_left() {
            return None;
        }
        let from = self.procs.get(&caller)?.pid;
        let p = self.procs.get_mut(&callee)?;
        if !takes_nested_job(p, &self.frozen) {
            return None;
        }
        let module = p.pid.module_index();
        p.begin_job(Job::Call {
            request: None,
            from: Some(from),
            waiter: Waiter::Process {
                serial: caller,
                token,
            },
        });
        let wait = NestWait {
            caller,
            token,
            timeout_ms: Some(timeout_ms),
        };
        self.push_nested(callee, co, wait);
        Some((module, from))
    }

    /// Creates a process of `module` whose `init` runs at once, nested in
    /// `caller`'s callback on worker `co` (see [`Kernel::push_nested`]);
    /// `token` is what the caller waits on if the init does not finish at
    /// once. Checks `max_processes` and the name (as
    /// [`Kernel::create_process`]). Returns the child's serial and pid.
    pub fn spawn_nested(
        &mut self,
        caller: u64,
        module: u32,
        name: Option<&str>,
        link: bool,
        token: u64,
        co: usize,
    ) -> Result<(u64, VmPid), crate::Error> {
        self.admit_process(name)?;
        let job = Job::Init {
            args: None,
            waiter: Waiter::Process {
                serial: caller,
                token,
            },
        };
        let (child, pid) = self.insert_process(module, Some(caller), name, Some(job));
        if link {
            self.link(caller, child);
        }
        let wait = NestWait {
            caller,
            token,
            timeout_ms: None,
        };
        self.push_nested(child, co, wait);
        Ok((child, pid))
    }

    /// The bookkeeping of a job of `serial` that began nested in the current
    /// callback, on the worker thread `co` that the prelude resumes itself:
    /// its callback is innermost on the stack, `co` is watched, and the
    /// enclosing callback's watch is saved. `wait` names who waits if the
    /// job does not finish at once. Must be closed by [`nest_done`] (or
    /// [`Kernel::close_nested_fast`]).
    fn push_nested(&mut self, serial: u64, co: usize, wait: NestWait) {
        let now = clock::coarse_ms();
        self.stack.push((serial, now));
        let enclosing = self.watch.save();
        // The caller's worker only runs prelude code until `nest_done`.
        self.watch.exempt.store(enclosing.thread, Ordering::Relaxed);
        self.watch.arm(now + self.limits.handler_ms, co, true);
        self.nested.push(NestFrame {
            serial,
            wait,
            enclosing,
            start: now,
        });
    }

    /// Charges `serial` for the time since `started` that it ran itself
    /// (minus what callbacks nested in it took), and, when it ran nested in
    /// `caller`, excludes all of that time from the caller's charge.
    pub(super) fn charge(&mut self, serial: u64, started: u64, caller: Option<u64>) {
        let elapsed = clock::coarse_ms().saturating_sub(started) as u32;
        if let Some(p) = self.procs.get_mut(&serial) {
            p.charge(elapsed);
        }
        if let Some(p) = caller.and_then(|c| self.procs.get_mut(&c)) {
            p.nested_ms = p.nested_ms.saturating_add(elapsed);
        }
    }

    /// Closes the innermost nested job, `serial`'s, when its callback returned
    /// in time and its result stands: the common case of [`nest_done`]
    /// (reachable from a raw native). Returns whether it did.
    pub fn close_nested_fast(&mut self, serial: u64) -> bool {
        if self.nested.last().is_none_or(|f| f.serial != serial)
            || self.watch.timed_out.load(Ordering::Relaxed)
        {
            return false;
        }
        // One lookup of the callee does the check, its charge and its reset
        // (the message path: `yield_done` after every nested call and init).
        let Some(p) = self.procs.get_mut(&serial) else {
            return false;
        };
        // An init that returned with an abnormal exit pending is a failed
        // spawn: `nest_done` reports it.
        let stands = matches!(p.run, Run::Running)
            && (matches!(p.job, Some(Job::Call { .. }))
                || p.exit_pending.as_deref().is_none_or(|r| r.is_normal()));
        if !stands {
            return false;
        }
        let Some(frame) = self.nested.pop() else {
            return false;
        };
        let elapsed = clock::coarse_ms().saturating_sub(frame.start) as u32;
        p.charge(elapsed);
        p.run = Run::Idle;
        p.job = None;
        // The reply stands; an exit that arrived meanwhile takes effect now.
        let exit = p.exit_pending.take();
        if exit.is_none() && p.mark_queued() {
            self.ready.push_back(serial);
        }
        if let Some(c) = self.procs.get_mut(&frame.wait.caller) {
            c.nested_ms = c.nested_ms.saturating_add(elapsed);
        }
        self.watch.restore(frame.enclosing);
        self.stack.pop();
        if let Some(reason) = exit {
            self.exit_process(serial, *reason, true);
        }
        true
    }

    /// Crashes the processes of nested frames whose calling callback unwound
    /// before closing them (innermost first): those jobs can never finish.
    pub(super) fn crash_orphans(&mut self, lua: &Lua, orphans: Vec<NestFrame>) {
        for frame in orphans.into_iter().rev() {
            let unwound = ExitReason::Error {
                message: "the calling callback was unwound while this callback ran".into(),
                traceback: String::new(),
                module: None,
                line: None,
            };
            self.finish_job(lua, frame.serial, Outcome::Failed(unwound));
        }
    }

    /// Pops the nested frame of `serial` (crashing any orphans above it), or
    /// closes it at once when it finished cleanly (`Ok(None)`). Returns the
    /// frame and whether its callback ran out of time.
    fn pop_nested(
        &mut self,
        lua: &Lua,
        serial: u64,
        end: NestEnd,
    ) -> mlua::Result<Option<(NestFrame, bool)>> {
        let Some(at) = self.nested.iter().rposition(|f| f.serial == serial) else {
            return Err(mlua::Error::runtime("graft: no such nested job is running"));
        };
        // Frames above it belong to callbacks that unwound without closing them
        // (the callee's worker died inside its own nested call's bookkeeping).
        let orphans = self.nested.split_off(at + 1);
        if !orphans.is_empty() {
            let depth = self.stack.len().saturating_sub(orphans.len());
            self.stack.truncate(depth);
            self.crash_orphans(lua, orphans);
        }
        if end == NestEnd::Done && self.close_nested_fast(serial) {
            return Ok(None);
        }
        let Some(frame) = self.nested.pop() else {
            return Err(mlua::Error::runtime("graft: no nested job is running"));
        };
        let timed_out = self.watch.timed_out.load(Ordering::Relaxed);
        self.watch.restore(frame.enclosing);
        self.stack.pop();
        self.charge(serial, frame.start, Some(frame.wait.caller));
        Ok(Some((frame, timed_out)))
    }

    /// After a nested job did not simply finish: what its caller does.
    fn caller_next(&mut self, lua: &Lua, callee: u64, wait: NestWait) -> NestResult {
        if let Some((ok, value)) = self.take_parked(lua, wait.caller, wait.token) {
            return NestResult::Answered(ok, value);
        }
        if let Some(ms) = wait.timeout_ms {
            // As the caller named it, as far as we can tell: its name, else its pid.
            let target = match self.procs.get(&callee) {
                Some(p) => match &p.name {
                    Some(n) => n.to_string(),
                    None => self.pid_string(p.pid),
                },
                None => format!("#{callee}"),
            };
            let now = self.timer_now();
            self.add_timer_with_id(
                wait.token,
                now.saturating_add(ms),
                Timer::CallTimeout {
                    serial: wait.caller,
                    token: wait.token,
                    target,
                    ms,
                },
            );
        }
        NestResult::Wait(wait.token)
    }
}

/// Closes the innermost nested frame: restores the caller's watch and
/// decides what the caller does. `info` is the error info, or the callee's
/// own token for [`NestEnd::Awaiting`]; `thread` is the worker for
/// `Awaiting`/`Preempted` (the kernel keeps it to resume the callee later).
pub(crate) fn nest_done(
    lua: &Lua,
    serial: u64,
    end: NestEnd,
    info: Value,
    thread: Option<Thread>,
) -> mlua::Result<NestResult> {
    let Some((frame, timed_out)) = kernel(lua).pop_nested(lua, serial, end)? else {
        return Ok(NestResult::Finished);
    };
    // Without the kernel borrowed: describing a raised value may run its
    // `__tostring`, which is guest code.
    let outcome = match (end, thread) {
        (NestEnd::Done, _) if timed_out => Outcome::Failed(ExitReason::Timeout),
        (NestEnd::Done, _) => Outcome::Done(Value::Nil),
        (NestEnd::Awaiting, Some(t)) => {
            let token = match info {
                Value::Number(n) => n as u64,
                Value::Integer(n) => n as u64,
                _ => 0,
            };
            Outcome::Suspended(token, t)
        }
        (NestEnd::Preempted, Some(t)) => Outcome::Preempted(t),
        // The reason from typed signals only: the watch's flag and the
        // fault `failure_of` read off the dead worker (see `classify_failure`).
        _ => Outcome::Failed(classify_failure(lua, &info, timed_out)),
    };
    if matches!(outcome, Outcome::Failed(ExitReason::OutOfMemory)) {
        let _ = lua.gc_collect();
    }
    let mut k = kernel(lua);
    k.finish_job(lua, serial, outcome);
    Ok(k.caller_next(lua, serial, frame.wait))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::kernel::testing::{TestKernel, PROBE};

    #[test]
    fn a_call_to_an_idle_process_runs_its_handler_nested() {
        let t = TestKernel::new(&[("probe", PROBE)]);
        let a = t.spawn("probe", Some("a"));
        let b = t.spawn("probe", Some("b"));
        let handled = t.k().procs[&b].messages_handled;
        let r = t.call(
            a,
            json!({ "op": "call", "target": "b", "req": { "op": "ping" } }),
        );
        assert_eq!(r.unwrap(), json!({ "ok": true, "reply": "pong" }));
        let k = t.k();
        assert_eq!(k.procs[&b].messages_handled, handled + 1);
        assert!(
            k.stack.is_empty() && k.nested.is_empty(),
            "every frame closed"
        );
        assert_eq!(
            k.pending_timers(),
            0,
            "a nested call that finished arms no timeout"
        );
        assert!(k
            .procs
            .values()
            .all(|p| p.job.is_none() && p.parked.is_none()));
    }

    #[test]
    fn a_chain_of_nested_calls_unwinds_in_order() {
        let t = TestKernel::new(&[("probe", PROBE)]);
        let a = t.spawn("probe", Some("a"));
        t.spawn("probe", Some("b"));
        t.spawn("probe", Some("c"));
        let inner = json!({ "op": "call", "target": "c", "req": { "op": "ping" } });
        let r = t.call(a, json!({ "op": "call", "target": "b", "req": inner }));
        let want = json!({ "ok": true, "reply": { "ok": true, "reply": "pong" } });
        assert_eq!(r.unwrap(), want);
        assert!(t.k().nested.is_empty());
    }

    #[test]
    fn a_process_cannot_call_itself() {
        let t = TestKernel::new(&[("probe", PROBE)]);
        let a = t.spawn("probe", Some("a"));
        let r = t.call(
            a,
            json!({ "op": "call", "target": "a", "req": { "op": "ping" } }),
        );
        let r = r.unwrap();
        assert_eq!(r["ok"], false);
        assert!(
            r["err"].as_str().unwrap().contains("cannot call itself"),
            "{r}"
        );
        assert!(t.alive(a));
    }

    #[test]
    fn a_call_back_into_a_busy_caller_times_out_instead_of_deadlocking() {
        let t = TestKernel::new(&[("probe", PROBE)]);
        let a = t.spawn("probe", Some("a"));
        let b = t.spawn("probe", Some("b"));
        // a's handler calls b (nested); b's calls a, which is on the stack:
        // queued, so b waits, and a waits for b. b's shorter timeout ends it.
        let back = json!({ "op": "call", "target": "a", "timeout": 30, "req": { "op": "ping" } });
        let r = t.call(
            a,
            json!({ "op": "call", "target": "b", "timeout": 2000, "req": back }),
        );
        let r = r.unwrap();
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["reply"]["ok"], false, "{r}");
        let err = r["reply"]["err"].as_str().unwrap();
        assert!(err.contains("timeout after 30 ms waiting for a"), "{err}");
        // a answered b's stale request afterwards; the late reply was dropped.
        assert!(t.alive(a) && t.alive(b));
        let k = t.k();
        assert!(k.stack.is_empty() && k.nested.is_empty());
        assert_eq!(
            k.pending_timers(),
            0,
            "the caller's own timeout was cancelled"
        );
        assert!(k.procs[&a].mailbox.is_empty());
    }

    #[test]
    fn a_callee_that_crashes_while_nested_fails_the_call_not_the_caller() {
        let t = TestKernel::new(&[("probe", PROBE)]);
        let a = t.spawn("probe", Some("a"));
        let b = t.spawn("probe", Some("b"));
        let r = t.call(
            a,
            json!({ "op": "call", "target": "b", "req": { "op": "crash" } }),
        );
        let r = r.unwrap();
        assert_eq!(r["ok"], false);
        assert!(r["err"].as_str().unwrap().contains("boom"), "{r}");
        assert!(t.alive(a));
        assert!(!t.alive(b));
        assert!(t.k().nested.is_empty());
    }
}
