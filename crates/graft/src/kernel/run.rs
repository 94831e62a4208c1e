//! Running processes: a time slice of a sandbox, and one stretch of a
//! process's callback (start a job or continue a suspended one) on a pooled
//! worker thread with the CPU watch armed.
//!
//! Invariants:
//! * The kernel is never borrowed while guest code runs: a stretch is
//!   prepared with it borrowed, runs without it, and is settled with it
//!   borrowed again ([`finish_job`]).
//! * At most one callback per process is on the VM stack or suspended: a
//!   process's next message starts only after its current job finished.
//! * A process whose module a pending reload froze starts no new job, except
//!   a call from another process (which may be what the reload waits for).

use std::sync::atomic::Ordering;

use mlua::{Lua, RegistryKey, Thread, Value};

use super::exit::drain_exits;
use super::outcome::{classify_error, classify_failure, finish_job, Outcome};
use super::process::{Job, Run, Waiter};
use super::timers::fire_timers;
use super::{guest_memory, kernel, kernel_memory, Kernel, KernelHandle, POOL_MAX, SLICE_MS};
use crate::clock;
use crate::value::ExitReason;
use crate::vm::{self, MARK_AWAIT, MARK_CLOSED, MARK_DONE};

/// Runs the sandbox until it has no runnable process or its slice ends.
/// Returns whether work remains. `kh`: the handle on `lua`'s kernel.
pub(crate) fn run_slice(lua: &Lua, kh: &KernelHandle) -> bool {
    let started = clock::coarse_ms();
    {
        let mut k = kh.borrow();
        if k.nothing_to_run() {
            // The common end of a host call run at once ([`call_now`]):
            // nothing to set up or settle. A request to end this slice
            // early is answered by that.
            k.watch.end_slice();
            return false;
        }
        k.watch.begin_slice(started);
    }
    let _fast = super::fast::SliceKernel::enter(kh);
    fire_timers(lua, kh);
    drain_exits(lua, kh);
    let mut budget = 10_000u32;
    loop {
        let next = kh.borrow().ready.pop_front();
        let Some(serial) = next else { break };
        run_process(lua, kh, serial);
        drain_exits(lua, kh);
        budget -= 1;
        let slice_end = kh.borrow().watch.slice_end.load(Ordering::Relaxed);
        if budget == 0 || clock::coarse_ms() >= slice_end.min(started + SLICE_MS) {
            break;
        }
    }
    lua.expire_registry_values();
    let k = kh.borrow();
    k.watch.end_slice();
    k.has_work()
}

/// Runs a host's call to `serial` at once, on this thread, when `serial`
/// could take it now without reordering anything ([`Kernel::nestable`]:
/// idle, nothing queued, not frozen by a reload): the fast path of a
/// blocking host call to an idle sandbox. The request goes straight onto
/// the worker's arguments (never through the registry), and the outcome is
/// settled as a slice would ([`finish_job`]): a reply answers `slot`, a
/// crash queues the caller as the process's crashed caller, a suspended
/// or preempted callback continues in the next slices.
///
/// `Err` hands the request back and changes nothing (the caller queues
/// the call instead). The slice's limit (`SLICE_MS`) applies as in [`run_slice`], so
/// a long callback is preempted and continued there.
pub(crate) fn call_now(
    lua: &Lua,
    kh: &KernelHandle,
    serial: u64,
    request: Value,
    slot: &std::sync::Arc<super::HostSlot>,
) -> Result<CallNow, Value> {
    let (thread, args) = {
        let mut k = kh.borrow();
        if !k.can_call_now(serial) {
            return Err(request);
        }
        let Some(module) = k.procs.get(&serial).map(|p| p.pid.module_index()) else {
            return Err(request);
        };
        if k.module_tables[module as usize].is_none() {
            return Err(request);
        }
        let Ok(thread) = k.worker_thread(lua) else {
            return Err(request);
        };
        let job = Job::Call {
            request: None,
            from: None,
            waiter: Waiter::Host(slot.clone()),
        };
        let Some(p) = k.procs.get_mut(&serial) else {
            return Err(request);
        };
        p.begin_job(job);
        k.watch.begin_slice(clock::coarse_ms());
        // The module by its index in the prelude's mirror, kept with
        // `module_tables` at every commit; a host gets JSON, so the reply
        // is not copied in the VM.
        let args = ResumeArgs::start(
            super::process::OP_CALL_AT,
            serial,
            Value::Number(f64::from(module) + 1.0),
            [request, Value::Nil, Value::Boolean(false)],
        );
        (thread, args)
    };
    // Nested calls and spawns in the callback find this kernel at once.
    let fast = super::fast::SliceKernel::enter(kh);
    let outcome = resume(lua, kh, serial, thread, args);
    drop(fast);
    let finished = matches!(outcome, Outcome::Done(_));
    // The exits a crash queued are drained by the slice that follows.
    {
        let mut k = kh.borrow();
        k.finish_job(lua, serial, outcome);
        k.watch.end_slice();
    }
    // What the callback dropped (a cancelled timer's message, say) is
    // released now: the slice that follows may have nothing to run.
    lua.expire_registry_values();
    Ok(if finished {
        CallNow::Finished
    } else {
        CallNow::Pending
    })
}

/// How [`call_now`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallNow {
    /// The callback returned: its reply answered the slot (or is held for
    /// it by a rebuild). No timeout is needed.
    Finished,
    /// The callback waits, was preempted, or crashed: the slot is answered
    /// later (a reply, the crash once the process is gone), and the call's
    /// timeout must be armed.
    Pending,
}

impl Kernel {
    /// Whether a slice would find nothing to do: no process ready, no exit
    /// to apply, no garbage of a crash to collect, no timer due.
    fn nothing_to_run(&mut self) -> bool {
        !self.has_work()
            && !self.crashed_since_collect
            && self.next_timer_at().is_none_or(|at| at > self.timer_now())
    }

    /// Whether a host's call to `serial` may run at once ([`call_now`]): it
    /// could run nested now ([`Kernel::nestable`]), and no exit waits to be
    /// applied and no timer is due (a slice applies those before any
    /// message: a due kill of a linked process must not be overtaken).
    fn can_call_now(&mut self, serial: u64) -> bool {
        self.exits.is_empty()
            && self.nestable(serial)
            && self.next_timer_at().is_none_or(|at| at > self.timer_now())
    }
}

/// What a process does next, decided with the kernel borrowed.
enum Stretch {
    /// Resume this worker with these arguments.
    Run(Thread, ResumeArgs),
    /// The job cannot start (its arguments are unreadable, no worker).
    Fail(ExitReason),
    /// Nothing to run now.
    Nothing,
}

/// Runs (or resumes) the next piece of work of one process.
pub(crate) fn run_process(lua: &Lua, kh: &KernelHandle, serial: u64) {
    let stretch = kh.borrow().next_stretch(lua, serial);
    let outcome = match stretch {
        Stretch::Run(thread, args) => resume(lua, kh, serial, thread, args),
        Stretch::Fail(reason) => Outcome::Failed(reason),
        Stretch::Nothing => return,
    };
    finish_job(lua, kh, serial, outcome);
}

/// The failure of a job that could not start.
fn cannot_start(message: String) -> ExitReason {
    ExitReason::Error {
        message,
        traceback: String::new(),
        module: None,
        line: None,
    }
}

impl Kernel {
    /// Whether `serial` waits for a pending reload before its next job.
    fn frozen_blocked(&self, serial: u64) -> bool {
        let Some(p) = self.procs.get(&serial) else {
            return false;
        };
        // A call from a process that is itself waiting still runs:
        // its caller may be one of the processes the reload waits for.
        matches!(p.run, Run::Idle)
            && p.system.is_none()
            && !self.frozen.is_empty()
            && self.frozen.contains(&p.pid.module_index())
            && !matches!(
                p.mailbox.front(),
                Some(Job::Call {
                    waiter: Waiter::Process { .. },
                    ..
                })
            )
    }

    /// Takes `serial` off the run queue and prepares its next stretch.
    fn next_stretch(&mut self, lua: &Lua, serial: u64) -> Stretch {
        let frozen_blocked = self.frozen_blocked(serial);
        let Some(p) = self.procs.get_mut(&serial) else {
            return Stretch::Nothing;
        };
        p.queued = false;
        if frozen_blocked {
            return Stretch::Nothing; // woken again when the reload finishes
        }
        match std::mem::replace(&mut p.run, Run::Running) {
            Run::Resumable { thread, resume } => continue_stretch(lua, &thread, resume),
            Run::Idle => self.start_job(lua, serial),
            other => {
                p.run = other;
                Stretch::Nothing
            }
        }
    }

    /// Starts the next job of an idle process (`run` already `Running`).
    fn start_job(&mut self, lua: &Lua, serial: u64) -> Stretch {
        let Some(p) = self.procs.get_mut(&serial) else {
            return Stretch::Nothing;
        };
        let job = match p.system.take() {
            Some(j) => Some(*j),
            None => p.mailbox.pop_front(),
        };
        let Some(job) = job else {
            p.run = Run::Idle;
            return Stretch::Nothing;
        };
        let module = p.pid.module_index();
        p.used_ms = 0;
        p.nested_ms = 0;
        let op = job.op();
        let table = self.module_tables[module as usize].clone();
        let args = job_args(lua, table.map(Value::Table), &job);
        let Some(p) = self.procs.get_mut(&serial) else {
            return Stretch::Nothing;
        };
        p.job = Some(job);
        let [module_value, a, b, c] = match args {
            Ok(args) => args,
            Err(e) => return Stretch::Fail(cannot_start(e)),
        };
        p.messages_handled += 1;
        let Ok(thread) = self.worker_thread(lua) else {
            return Stretch::Fail(ExitReason::OutOfMemory);
        };
        Stretch::Run(
            thread,
            ResumeArgs::start(op, serial, module_value, [a, b, c]),
        )
    }

    /// Marks `serial`'s callback as on the VM stack; returns the CPU it used
    /// before and the depths to restore when it comes off.
    fn enter_stretch(&mut self, serial: u64) -> (u32, usize, usize) {
        let used = self.procs.get(&serial).map(|p| p.used_ms).unwrap_or(0);
        let depths = (self.stack.len(), self.nested.len());
        self.stack.push((serial, clock::coarse_ms()));
        (used, depths.0, depths.1)
    }

    /// Takes `serial`'s callback off the VM stack and charges its time.
    fn leave_stretch(&mut self, lua: &Lua, serial: u64, start: u64, depths: (usize, usize)) {
        self.stack.truncate(depths.0);
        let orphans = self.nested.split_off(depths.1);
        if !orphans.is_empty() {
            self.crash_orphans(lua, orphans);
        }
        self.charge(serial, start, None);
    }

    /// The outcome of a worker that yielded back to the kernel.
    fn yielded(&mut self, thread: Thread, values: (Value, Value), timed_out: bool) -> Outcome {
        let (first, second) = values;
        match vm::marker_of(&first) {
            // CLOSED: a worker closed its own nested frame before yielding
            // (`yield_done`). Only nested jobs do, and the prelude resumes
            // those, not the kernel; were one to come here, its job is over
            // all the same, so it is not mistaken for a preempted one.
            Some(MARK_DONE | MARK_CLOSED) => {
                self.pool_return(thread);
                if timed_out {
                    // Returned, but past its deadline.
                    Outcome::Failed(ExitReason::Timeout)
                } else {
                    Outcome::Done(second)
                }
            }
            Some(MARK_AWAIT) => {
                let token = match second {
                    Value::Number(n) => n as u64,
                    Value::Integer(n) => n as u64,
                    _ => 0,
                };
                Outcome::Suspended(token, thread)
            }
            // No marker: preempted by the interrupt, or the guest yielded at
            // top level. Either way the callback continues later.
            _ => Outcome::Preempted(thread),
        }
    }

    /// A worker coroutine for a job: a pooled one, else a new one.
    fn worker_thread(&mut self, lua: &Lua) -> mlua::Result<Thread> {
        match self.pool.pop() {
            Some(t) => Ok(t),
            None => lua.create_thread(self.worker.clone()),
        }
    }

    fn pool_return(&mut self, thread: Thread) {
        if self.pool.len() < POOL_MAX {
            self.pool.push(thread);
        }
    }
}

/// Continues a suspended or preempted callback.
fn continue_stretch(
    lua: &Lua,
    thread: &RegistryKey,
    resume: Option<(bool, RegistryKey)>,
) -> Stretch {
    let Ok(thread) = lua.registry_value::<Thread>(thread) else {
        return Stretch::Fail(cannot_start("graft: the suspended callback is lost".into()));
    };
    let args = match resume {
        Some((ok, key)) => {
            let v: Value = lua.registry_value(&key).unwrap_or(Value::Nil);
            let _ = lua.remove_registry_value(key);
            ResumeArgs::Answer(ok, v)
        }
        None => ResumeArgs::Continue,
    };
    Stretch::Run(thread, args)
}

/// The callback's arguments as the prelude expects them: the module (or the
/// eval chunk), then (a, b, c).
fn job_args(lua: &Lua, module: Option<Value>, job: &Job) -> Result<[Value; 4], String> {
    let get = |key: &RegistryKey| lua.registry_value::<Value>(key).map_err(|e| e.to_string());
    let get_opt = |key: &Option<RegistryKey>| key.as_ref().map_or(Ok(Value::Nil), get);
    let module = module.unwrap_or(Value::Nil);
    Ok(match job {
        Job::Init { args, .. } => [module, get_opt(args)?, Value::Nil, Value::Nil],
        Job::Call {
            request,
            from,
            waiter,
        } => [
            module,
            get_opt(request)?,
            from.map(|p| p.to_lua()).unwrap_or(Value::Nil),
            // replies to processes are copied in the VM; hosts get JSON anyway
            Value::Boolean(matches!(waiter, Waiter::Process { .. })),
        ],
        Job::Cast(m) | Job::Info(m) => [module, get(m)?, Value::Nil, Value::Nil],
        Job::Terminate(reason) => {
            let reason = reason.to_lua(lua).map_err(|e| e.to_string())?;
            [module, reason, Value::Nil, Value::Nil]
        }
        Job::Eval { chunk, .. } => [get(chunk)?, Value::Nil, Value::Nil, Value::Nil],
    })
}

/// What a worker is resumed with: fixed shapes, pushed without building a
/// `MultiValue` (a heap allocation per resume).
pub(super) enum ResumeArgs {
    /// A new job: `(op, serial, module, a, b, c)` for the prelude's worker.
    Start([Value; 6]),
    /// The answer a suspended callback waited for: `(ok, value)`.
    Answer(bool, Value),
    /// A preempted callback goes on where it stopped.
    Continue,
}

impl ResumeArgs {
    fn start(op: u8, serial: u64, module: Value, [a, b, c]: [Value; 3]) -> ResumeArgs {
        ResumeArgs::Start([
            Value::Number(op as f64),
            Value::Number(serial as f64),
            module,
            a,
            b,
            c,
        ])
    }
}

/// Resumes `thread` with `args`; what it yields is at most two values (a
/// marker and its value), read without a `MultiValue` either.
fn resume_with(thread: &Thread, args: ResumeArgs) -> mlua::Result<(Value, Value)> {
    match args {
        ResumeArgs::Start([op, serial, module, a, b, c]) => {
            thread.resume((op, serial, module, a, b, c))
        }
        ResumeArgs::Answer(ok, v) => thread.resume((ok, v)),
        ResumeArgs::Continue => thread.resume(()),
    }
}

/// Resumes a worker thread for `serial` with the interrupt armed.
/// Takes the worker: it goes back to the pool or into the process's
/// record without a clone (a clone and its drop each take the VM's lock).
fn resume(lua: &Lua, kh: &KernelHandle, serial: u64, thread: Thread, args: ResumeArgs) -> Outcome {
    let (used, depth, nested_depth, limits, watch) = {
        let mut k = kh.borrow();
        let (used, depth, nested_depth) = k.enter_stretch(serial);
        (used, depth, nested_depth, k.limits.clone(), k.watch.clone())
    };
    let start = clock::coarse_ms();
    let deadline = start + limits.handler_ms.saturating_sub(used as u64);
    let enclosing = watch.save();
    watch.exempt.store(0, Ordering::Relaxed);
    watch.arm(deadline, thread.to_pointer() as usize, true);
    guest_memory(lua, &limits);
    let result = resume_with(&thread, args);
    let timed_out = watch.timed_out.load(Ordering::Relaxed);
    watch.restore(enclosing);
    if enclosing.thread == 0 {
        kernel_memory(lua, &limits);
    }
    let yielded = {
        let mut k = kh.borrow();
        k.leave_stretch(lua, serial, start, (depth, nested_depth));
        match result {
            Ok(values) => Ok(k.yielded(thread, values, timed_out)),
            Err(e) => Err((thread, e)),
        }
    };
    let outcome = match yielded {
        Ok(outcome) => outcome,
        Err((thread, e)) => Outcome::Failed(raised(lua, &thread, &e, timed_out)),
    };
    if matches!(outcome, Outcome::Failed(ExitReason::OutOfMemory)) {
        // Luau does not collect when an allocation fails; without a full
        // collection the garbage of the crashed callback would keep the
        // sandbox at its limit.
        let _ = lua.gc_collect();
    }
    outcome
}

/// The exit reason of a callback that raised and ended its worker. Runs Luau
/// code (the prelude's `failure_of`, maybe a guest `__tostring`), so the
/// kernel is not borrowed. The reason comes from typed signals only (see
/// [`classify_failure`]): the watch's `timed_out`, the dead worker's fault,
/// the error's variant; never from the message's text.
fn raised(lua: &Lua, thread: &Thread, e: &mlua::Error, timed_out: bool) -> ExitReason {
    // Read before `failure_of` closes the worker, which resets its status;
    // also the answer if `failure_of` cannot run (no memory for its table).
    let fault = vm::fault_of(thread);
    let failure_of = kernel(lua).failure_of.clone();
    let message = match e {
        mlua::Error::RuntimeError(m) => m
            .split_once("\nstack traceback:")
            .map_or(m.as_str(), |(head, _)| head)
            .to_owned(),
        other => other.to_string(),
    };
    // The worker's stack still shows where it raised.
    let info = failure_of
        .call::<Value>((thread.clone(), message))
        .unwrap_or(Value::Nil);
    match info {
        Value::Table(_) if fault.is_none() => classify_failure(lua, &info, timed_out),
        _ => classify_error(lua, e, fault, timed_out),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::{call_now, CallNow};
    use crate::kernel::testing::{TestKernel, PROBE};
    use crate::kernel::{HostSlot, Timer};

    fn request(t: &TestKernel, op: &str) -> mlua::Value {
        crate::value::json_to_lua(t.lua(), &json!({ "op": op })).unwrap()
    }

    #[test]
    fn a_host_call_runs_at_once_only_when_nothing_must_come_first() {
        let t = TestKernel::new(&[("probe", PROBE)]);
        let a = t.spawn("probe", Some("a"));
        let b = t.spawn("probe", Some("b"));
        let kh = crate::kernel::kernel_handle(t.lua());
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        let r = call_now(t.lua(), &kh, a, request(&t, "ping"), &slot);
        assert_eq!(r.ok(), Some(CallNow::Finished));
        assert_eq!(rx.try_recv().unwrap().unwrap(), json!("pong"));

        // A timer already due (here: a kill of another process) is applied
        // by the slice first, so the call must not run ahead of it.
        let now = t.k().timer_now();
        t.k().add_timer(now, Timer::ShutdownKill { serial: b });
        assert!(!t.k().can_call_now(a));
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        let r = call_now(t.lua(), &kh, a, request(&t, "ping"), &slot);
        assert!(r.is_err(), "the request is handed back");
        assert!(!slot.is_answered(), "nothing ran");
        t.settle();
        assert!(
            t.k().can_call_now(a),
            "the timer fired: a may run at once again"
        );

        // A crash is pending (answered once the process is gone), not finished.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let slot: Arc<HostSlot> = HostSlot::new(tx);
        let r = call_now(t.lua(), &kh, a, request(&t, "crash"), &slot);
        assert_eq!(r.ok(), Some(CallNow::Pending));
    }
}
