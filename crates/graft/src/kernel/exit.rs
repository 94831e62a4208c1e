//! Exits: how a process ends and who learns of it (links, monitors, the
//! processes and hosts waiting on it), and the exit reasons themselves (cut
//! to a bounded size; the module and line where guest code raised).
//!
//! Invariants:
//! * Exits are processed from a work list ([`Kernel::exit_process`] queues,
//!   [`drain_exits`] drains), never recursively, so a long chain of links
//!   cannot overflow the native stack.
//! * A process whose callback is on the VM stack is not removed: its exit is
//!   parked (`exit_pending`) and takes effect when the callback returns.
//! * Every waiter of a dead process is answered once: callers, spawners,
//!   `shutdown_child` callers, hosts waiting for the app to stop.
//! * Processing an exit never runs Luau code (it only creates messages and
//!   answers), so it runs with the kernel borrowed throughout.

use mlua::{Lua, RegistryKey, Table, Value};
use serde_json::Value as Json;

use super::process::{Job, Run};
use super::{AppStatus, Kernel, KernelHandle};
use crate::error::Error;
use crate::value::{ExitReason, VmPid};

/// Processes queued exits until none is left.
pub(crate) fn drain_exits(lua: &Lua, kh: &KernelHandle) {
    let collect = {
        let mut k = kh.borrow();
        while let Some((serial, reason, run_terminate)) = k.exits.pop_front() {
            k.begin_exit(lua, serial, reason, run_terminate);
        }
        std::mem::take(&mut k.crashed_since_collect).then_some(k.limits.memory_bytes)
    };
    // A crashed process's garbage (its state, and whatever the failed
    // callback allocated) is only reclaimable once it is finalized: collect
    // then, so a restarted process does not meet a heap still full of its
    // predecessor (Luau does not collect when an allocation fails). One
    // collection covers every crash drained together, and a sandbox far
    // below its limit skips it.
    if let Some(limit) = collect {
        if lua.used_memory() > limit / 2 {
            let _ = lua.gc_collect();
        }
    }
}

impl Kernel {
    fn begin_exit(&mut self, lua: &Lua, serial: u64, reason: ExitReason, run_terminate: bool) {
        let on_stack = self.is_on_stack(serial);
        let Some(p) = self.procs.get_mut(&serial) else {
            return;
        };
        if on_stack {
            // Its callback is running: the exit takes effect when it returns.
            if p.exit_pending.is_none() || matches!(reason, ExitReason::Killed) {
                p.exit_pending = Some(Box::new(reason));
            }
            return;
        }
        if p.dying.is_some() {
            if matches!(reason, ExitReason::Killed) {
                // kill during terminate: stop at once
                self.abandon_job(lua, serial, &ExitReason::Killed);
                self.finalize(lua, serial, ExitReason::Killed);
            }
            return;
        }
        self.abandon_job(lua, serial, &reason);
        let Some(p) = self.procs.get_mut(&serial) else {
            return;
        };
        let has_state = p.job.is_none() && !matches!(p.system.as_deref(), Some(Job::Init { .. }));
        if run_terminate && !matches!(reason, ExitReason::Killed) && has_state {
            p.dying = Some(Box::new(reason.clone()));
            p.system = Some(Box::new(Job::Terminate(Box::new(reason))));
            p.run = Run::Idle;
            self.wake(serial);
        } else {
            self.finalize(lua, serial, reason);
        }
    }

    /// Drops a suspended or queued callback of a process that is exiting.
    pub(super) fn abandon_job(&mut self, lua: &Lua, serial: u64, reason: &ExitReason) {
        let Some(p) = self.procs.get_mut(&serial) else {
            return;
        };
        if matches!(p.run, Run::Suspended { .. } | Run::Resumable { .. }) {
            p.run = Run::Idle;
        }
        let system = match p.system.take().map(|b| *b) {
            Some(Job::Init { args, waiter }) => Some(Job::Init { args, waiter }),
            other => {
                p.system = other.map(Box::new);
                None
            }
        };
        let job = p.job.take();
        let pid = p.pid;
        let target = self.pid_string(pid);
        for job in [job, system].into_iter().flatten() {
            match job {
                Job::Call { waiter, .. } => {
                    let crashed = Error::Crashed {
                        target: target.clone(),
                        reason: reason.clone(),
                    };
                    self.answer(lua, waiter, Err(crashed))
                }
                Job::Init { waiter, .. } => {
                    let failed = Error::SpawnFailed {
                        module: self.module_name(serial),
                        reason: reason.clone(),
                    };
                    self.answer(lua, waiter, Err(failed))
                }
                Job::Eval { waiter, .. } => self.answer(lua, waiter, Err(eval_error(reason))),
                _ => {}
            }
        }
    }

    /// Removes a dead process and tells everyone who needs to know.
    pub(super) fn finalize(&mut self, lua: &Lua, serial: u64, reason: ExitReason) {
        self.abandon_job(lua, serial, &reason);
        let Some(p) = self.procs.remove(&serial).map(|b| *b) else {
            return;
        };
        if let Some(n) = &p.name {
            self.names.remove(n);
        }
        let _ = self.states.raw_set(serial, Value::Nil);
        let abnormal = !matches!(reason, ExitReason::Normal | ExitReason::Shutdown);
        if abnormal {
            self.crashed_since_collect = true;
        }
        let target = self.pid_string(p.pid);
        let relations = p.relations.map(|r| *r).unwrap_or_default();
        let mut waiters = relations.crashed_callers;
        for job in p.mailbox {
            match job {
                Job::Call { waiter, .. } | Job::Init { waiter, .. } | Job::Eval { waiter, .. } => {
                    waiters.push(waiter)
                }
                _ => {}
            }
        }
        let reason_lua = reason.to_lua(lua).unwrap_or(Value::Nil);
        for l in relations.links {
            self.link_signal(lua, l, p.pid, &reason, &reason_lua, serial);
        }
        for (mref, watcher) in relations.monitored_by {
            if let Ok(key) = down_message(lua, mref, p.pid, &reason_lua) {
                self.deliver_system(watcher, Job::Info(key));
            }
        }
        for (s, token) in relations.shutdown_waiters {
            self.resume_with(lua, s, token, true, Value::Boolean(true));
        }
        if self.app == Some(serial) {
            self.app_stopped(&reason);
        }
        if abnormal {
            if let Some(c) = self.canary.as_mut() {
                c.note_exit(p.pid.module_index(), p.version, &reason);
            }
        }
        for w in waiters {
            let crashed = Error::Crashed {
                target: target.clone(),
                reason: reason.clone(),
            };
            self.answer(lua, w, Err(crashed));
        }
    }

    /// The root supervisor exited with `reason`.
    fn app_stopped(&mut self, reason: &ExitReason) {
        self.app = None;
        self.app_status = AppStatus::Stopped {
            reason: reason.to_string(),
        };
        self.event("app_stopped", serde_json::json!({ "reason": reason }));
        if matches!(reason, ExitReason::Normal | ExitReason::Shutdown) {
            tracing::info!(sandbox = %self.id, %reason, "app stopped");
        } else {
            tracing::warn!(sandbox = %self.id, %reason, "app stopped");
        }
        for w in std::mem::take(&mut self.app_stop_waiters) {
            w.answer(Ok(Json::String(reason.to_string())));
        }
    }

    /// Delivers a dying process's exit to a linked process (OTP link semantics).
    fn link_signal(
        &mut self,
        lua: &Lua,
        to: u64,
        from: VmPid,
        reason: &ExitReason,
        reason_lua: &Value,
        from_serial: u64,
    ) {
        let Some(t) = self.procs.get_mut(&to) else {
            return;
        };
        t.unlink(from_serial);
        if t.trap_exit {
            if let Ok(key) = exit_message(lua, from, reason_lua) {
                self.deliver_system(to, Job::Info(key));
            }
        } else if !reason.is_normal() {
            self.exit_process(to, reason.clone(), true);
        }
    }

    /// `graft.exit(pid, reason)`: an exit signal from `from` (OTP `exit/2`).
    pub(crate) fn send_exit_signal(&mut self, lua: &Lua, to: u64, from: VmPid, reason: Json) {
        let is_kill = reason.as_str() == Some("kill");
        let reason = if is_kill {
            ExitReason::Killed
        } else {
            ExitReason::from_json(reason)
        };
        let Some(t) = self.procs.get(&to) else { return };
        if is_kill {
            self.exit_process(to, ExitReason::Killed, false);
        } else if t.trap_exit {
            let reason_lua = reason.to_lua(lua).unwrap_or(Value::Nil);
            if let Ok(key) = exit_message(lua, from, &reason_lua) {
                self.deliver_system(to, Job::Info(key));
            }
        } else if !reason.is_normal() || to == from.serial() {
            self.exit_process(to, reason, true);
        }
    }

    /// The name of `serial`'s module ("" if it is gone).
    pub(super) fn module_name(&self, serial: u64) -> String {
        self.procs
            .get(&serial)
            .map(|p| self.module_names[p.pid.module_index() as usize].to_string())
            .unwrap_or_default()
    }
}

/// The error an `eval` waiter gets when its process stopped with `reason`.
pub(super) fn eval_error(reason: &ExitReason) -> Error {
    match reason {
        ExitReason::Error { message, .. } => Error::Luau(message.clone()),
        other => Error::Luau(format!("eval stopped: {other}")),
    }
}

fn down_message(lua: &Lua, mref: u64, pid: VmPid, reason: &Value) -> mlua::Result<RegistryKey> {
    let t = lua.create_table()?;
    t.raw_set("tag", "DOWN")?;
    t.raw_set("ref", mref as f64)?;
    t.raw_set("pid", pid.to_lua())?;
    t.raw_set("reason", reason.clone())?;
    lua.create_registry_value(t)
}

fn exit_message(lua: &Lua, from: VmPid, reason: &Value) -> mlua::Result<RegistryKey> {
    let t = lua.create_table()?;
    t.raw_set("tag", "EXIT")?;
    t.raw_set("from", from.to_lua())?;
    t.raw_set("reason", reason.clone())?;
    lua.create_registry_value(t)
}

/// Registry key of the table mapping chunk names (a module's file, as its
/// code was loaded under) to module names, so a runtime error's position
/// can name its module.
const CHUNK_MODULES: &str = "graft.chunk_modules";

/// Records that code loaded under `chunk` belongs to `module`. Best effort:
/// without it, errors in that chunk carry no module and line.
pub(crate) fn remember_chunk(lua: &Lua, chunk: &str, module: &str) {
    let table = match lua.named_registry_value::<Option<Table>>(CHUNK_MODULES) {
        Ok(Some(t)) => t,
        _ => match lua.create_table() {
            Ok(t) if lua.set_named_registry_value(CHUNK_MODULES, &t).is_ok() => t,
            _ => return,
        },
    };
    let _ = table.raw_set(chunk, module);
}

fn module_of_chunk(lua: &Lua, chunk: &str) -> Option<String> {
    let table = lua
        .named_registry_value::<Option<Table>>(CHUNK_MODULES)
        .ok()??;
    match table.raw_get::<Value>(chunk).ok()? {
        Value::String(s) => Some(s.to_string_lossy()),
        _ => None,
    }
}

/// Where guest code raised an error: the module and line of the message's
/// `file:LINE:` prefix, else of the innermost guest frame of `traceback`
/// (e.g. for `error({ code = 1 })`, whose value has no position).
pub(crate) fn raise_site(
    lua: &Lua,
    message: &str,
    traceback: &[&str],
) -> (Option<String>, Option<u32>) {
    let at_message = crate::diagnostic::error_position(message);
    let frames = traceback
        .iter()
        .filter_map(|f| crate::diagnostic::frame_position(f));
    for (chunk, line) in at_message.into_iter().chain(frames) {
        if let Some(module) = module_of_chunk(lua, chunk) {
            return (Some(module), Some(line));
        }
    }
    (None, None)
}

/// Bytes of a crash message or traceback kept in events, exit reasons and errors.
pub(crate) const MAX_SHOWN_BYTES: usize = 4096;

/// Room for the note `… (N more bytes)`: a message that fits in
/// [`MAX_SHOWN_BYTES`] plus this is kept, so cutting twice changes nothing.
const NOTE_BYTES: usize = 40;

/// Cuts `s` to [`MAX_SHOWN_BYTES`] (at a character boundary) and says how
/// much was cut: `… (N more bytes)`.
pub(crate) fn truncate_message(mut s: String) -> String {
    if s.len() <= MAX_SHOWN_BYTES + NOTE_BYTES {
        return s;
    }
    let mut cut = MAX_SHOWN_BYTES;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let more = s.len() - cut;
    s.truncate(cut);
    s.push_str(&format!("… ({more} more bytes)"));
    s
}

/// An exit reason with its texts cut by [`truncate_message`]. A reason is
/// kept in events and copied into every error, DOWN and EXIT message it
/// causes, outside the sandbox's memory limit. A `graft.exit` reason whose
/// JSON form is longer becomes that JSON text, cut.
pub(crate) fn truncate_reason(reason: ExitReason) -> ExitReason {
    match reason {
        ExitReason::Error {
            message,
            traceback,
            module,
            line,
        } => ExitReason::Error {
            message: truncate_message(message),
            traceback: truncate_message(traceback),
            module,
            line,
        },
        ExitReason::Other { value } if json_longer_than(&value, MAX_SHOWN_BYTES) => {
            let text = serde_json::to_string(&value).unwrap_or_default();
            ExitReason::Other {
                value: Json::String(truncate_message(text)),
            }
        }
        other => other,
    }
}

/// Whether `v`'s JSON text is longer than `max` bytes; stops counting there.
fn json_longer_than(v: &Json, max: usize) -> bool {
    struct Count(usize, usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            if self.0 > self.1 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(Count(0, max), v).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testing::{TestKernel, PROBE};
    use serde_json::json;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(truncate_message("short".into()), "short");
        let s = format!("{}é{}", "a".repeat(MAX_SHOWN_BYTES - 1), "b".repeat(99));
        let cut = truncate_message(s);
        assert_eq!(
            cut,
            format!("{}… (101 more bytes)", "a".repeat(MAX_SHOWN_BYTES - 1))
        );
        assert_eq!(truncate_message(cut.clone()), cut);
        let huge = truncate_message("x".repeat(1 << 24));
        assert_eq!(truncate_message(huge.clone()), huge);
    }

    #[test]
    fn long_exit_reasons_are_cut() {
        let big = "x".repeat(3 * MAX_SHOWN_BYTES);
        let r = truncate_reason(ExitReason::Error {
            message: big.clone(),
            traceback: big.clone(),
            module: None,
            line: None,
        });
        let ExitReason::Error {
            message, traceback, ..
        } = r
        else {
            panic!("still an error")
        };
        assert!(message.ends_with("… (8192 more bytes)"));
        assert_eq!(message, traceback);
        let r = truncate_reason(ExitReason::Other {
            value: serde_json::json!({ "why": big }),
        });
        let ExitReason::Other {
            value: Json::String(text),
        } = r
        else {
            panic!("a long reason becomes its cut JSON text")
        };
        assert!(text.starts_with("{\"why\":\"xxx"), "{}", &text[..20]);
        let small = ExitReason::Other {
            value: serde_json::json!({ "why": "x" }),
        };
        assert_eq!(truncate_reason(small.clone()), small);
    }

    /// `a` and `b` are probes registered under their names.
    fn pair() -> (TestKernel, u64, u64) {
        let t = TestKernel::new(&[("probe", PROBE)]);
        let a = t.spawn("probe", Some("a"));
        let b = t.spawn("probe", Some("b"));
        (t, a, b)
    }

    fn crash(t: &TestKernel, serial: u64) -> ExitReason {
        match t.call(serial, json!({ "op": "crash" })) {
            Err(Error::Crashed { reason, .. }) => reason,
            other => panic!("the call did not crash the process: {other:?}"),
        }
    }

    #[test]
    fn a_crash_kills_the_linked_process_and_frees_both_names() {
        let (t, a, b) = pair();
        t.call(a, json!({ "op": "link", "target": "b" })).unwrap();
        assert!(t.k().procs[&b].links().contains(&a), "links go both ways");
        let reason = crash(&t, b);
        assert!(matches!(&reason, ExitReason::Error { message, .. } if message.contains("boom")));
        assert!(!t.alive(b));
        assert!(!t.alive(a), "the linked process died with the same reason");
        assert!(t.k().names.is_empty());
        let log = t.k().events.clone();
        let crashes = log
            .read(0, &crate::EventFilter::default().kind("crash"), 100)
            .events
            .len();
        assert_eq!(crashes, 1, "only the process that raised crashed by itself");
    }

    #[test]
    fn a_normal_exit_does_not_kill_a_linked_process() {
        let (t, a, b) = pair();
        t.call(a, json!({ "op": "link", "target": "b" })).unwrap();
        t.k().exit_process(b, ExitReason::Normal, true);
        t.settle();
        assert!(!t.alive(b));
        assert!(t.alive(a));
        assert!(t.k().procs[&a].links().is_empty(), "the dead link is gone");
    }

    #[test]
    fn a_monitor_gets_down_with_the_reason_and_survives() {
        let (t, a, b) = pair();
        let mref = t
            .call(a, json!({ "op": "monitor", "target": "b" }))
            .unwrap();
        crash(&t, b);
        assert!(t.alive(a));
        let inbox = t.call(a, json!({ "op": "inbox" })).unwrap();
        let down = &inbox[0];
        assert_eq!(down["tag"], "DOWN");
        assert_eq!(down["ref"], mref);
        assert_eq!(down["pid"], "<probe.2>");
        assert!(
            down["reason"]["error"].as_str().unwrap().contains("boom"),
            "{down}"
        );
        assert_eq!(inbox.as_array().unwrap().len(), 1);
    }

    #[test]
    fn trap_exit_turns_a_linked_crash_into_an_exit_message() {
        let (t, a, b) = pair();
        assert_eq!(
            t.call(a, json!({ "op": "trap", "flag": true })).unwrap(),
            false
        );
        t.call(a, json!({ "op": "link", "target": "b" })).unwrap();
        crash(&t, b);
        assert!(t.alive(a), "a trapping process survives");
        let inbox = t.call(a, json!({ "op": "inbox" })).unwrap();
        assert_eq!(inbox[0]["tag"], "EXIT");
        assert_eq!(inbox[0]["from"], "<probe.2>");
        assert!(inbox[0]["reason"]["error"]
            .as_str()
            .unwrap()
            .contains("boom"));
    }

    #[test]
    fn a_kill_signal_is_not_trapped() {
        let (t, a, b) = pair();
        t.call(a, json!({ "op": "trap", "flag": true })).unwrap();
        let from = t.k().procs[&b].pid;
        t.k().send_exit_signal(t.lua(), a, from, json!("kill"));
        t.settle();
        assert!(!t.alive(a));
        assert!(t.alive(b), "no link: the sender lives on");
    }
}
