//! Timers: `send_after`, call timeouts, shutdown kills, canary windows, log
//! reports. One heap per sandbox, fired at the start of every time slice.
//!
//! Invariants:
//! * Timer ids and call tokens share one counter ([`Kernel::token`]), so a
//!   call's token names its timeout timer and a reply cancels it.
//! * Cancelling only forgets a timer's data; its heap entry stays until due
//!   (or until a rebuild, when dead entries outnumber live ones), so cancel
//!   is O(1) and a busy caller cannot grow the heap without bound.
//! * Timers due at the same millisecond fire in the order they were set.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use mlua::{Lua, RegistryKey, Value};

use super::process::{HostSlot, Job};
use super::{Kernel, KernelHandle, SerialMap, Target};
use crate::error::Error;
use crate::value::ExitReason;

/// Heap entries kept before dead ones are swept out (see the invariants).
const REBUILD_AFTER: usize = 4096;

/// What happens when a timer fires.
pub(crate) enum Timer {
    SendAfter {
        target: Target,
        message: RegistryKey,
    },
    CallTimeout {
        serial: u64,
        token: u64,
        target: String,
        ms: u64,
    },
    HostCallTimeout {
        slot: Arc<HostSlot>,
        target: String,
        ms: u64,
    },
    /// A blocking host function did not answer within `handler_ms`.
    HostFnTimeout {
        serial: u64,
        token: u64,
        name: Arc<str>,
        ms: u64,
    },
    ShutdownKill {
        serial: u64,
    },
    /// Reports the guest log lines dropped in the window that just ended.
    LogFlush,
    Canary,
    /// Only wakes the sandbox (e.g. at a pending reload's deadline).
    Wake,
}

/// The pending timers of one sandbox, by due time then id.
#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    data: SerialMap<Timer>,
}

impl Timers {
    /// Sets timer `id` (unique: see [`Kernel::token`]) due at `at_ms`.
    pub fn add(&mut self, id: u64, at_ms: u64, timer: Timer) {
        if self.heap.len() > REBUILD_AFTER && self.heap.len() > 2 * self.data.len() {
            let data = &self.data;
            let live: Vec<Reverse<(u64, u64)>> = self
                .heap
                .drain()
                .filter(|Reverse((_, id))| data.contains_key(id))
                .collect();
            self.heap = live.into();
        }
        self.heap.push(Reverse((at_ms, id)));
        self.data.insert(id, timer);
    }

    /// Forgets timer `id`; returns whether it was pending.
    pub fn cancel(&mut self, id: u64) -> bool {
        self.data.remove(&id).is_some()
    }

    /// Whether `id` is a pending `send_after` timer.
    pub fn is_send_after(&self, id: u64) -> bool {
        matches!(self.data.get(&id), Some(Timer::SendAfter { .. }))
    }

    /// Timers pending (every kind).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// When the earliest pending timer is due.
    pub fn next_at(&mut self) -> Option<u64> {
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if self.data.contains_key(&id) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Takes the earliest timer due at or before `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<Timer> {
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if let Some(timer) = self.data.remove(&id) {
                return Some(timer);
            }
        }
        None
    }
}

impl Kernel {
    /// Sets a timer under a fresh id, which it returns.
    pub fn add_timer(&mut self, at_ms: u64, timer: Timer) -> u64 {
        let id = self.token();
        self.add_timer_with_id(id, at_ms, timer);
        id
    }

    /// Sets a timer under an id taken from [`Kernel::token`] (a call's token).
    pub fn add_timer_with_id(&mut self, id: u64, at_ms: u64, timer: Timer) {
        self.timers.add(id, at_ms, timer);
    }

    /// Timers waiting to fire (every kind).
    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Cancels a `send_after` timer (the only kind guest code may cancel).
    pub fn cancel_send_after(&mut self, id: u64) -> bool {
        self.timers.is_send_after(id) && self.timers.cancel(id)
    }

    /// Cancels a timer of any kind; returns whether it was pending.
    pub fn cancel_timer(&mut self, id: u64) -> bool {
        self.timers.cancel(id)
    }

    /// When the earliest live timer is due.
    pub fn next_timer_at(&mut self) -> Option<u64> {
        self.timers.next_at()
    }

    /// Fires every timer due at `now`.
    fn fire_due(&mut self, lua: &Lua, now: u64) {
        while let Some(timer) = self.timers.pop_due(now) {
            self.fire(lua, timer);
        }
    }

    fn fire(&mut self, lua: &Lua, timer: Timer) {
        match timer {
            Timer::SendAfter { target, message } => {
                let serial = match &target {
                    Target::Serial(s) => Some(*s),
                    Target::Name(n) => self.names.get(n.as_str()).copied(),
                };
                if let Some(s) = serial {
                    // A timer message to a full mailbox still arrives: the sender
                    // cannot be told any more, and dropping it would be silent.
                    self.deliver_system(s, Job::Info(message));
                }
            }
            Timer::CallTimeout {
                serial,
                token,
                target,
                ms,
            } => {
                let msg = format!("graft.call: timeout after {ms} ms waiting for {target}");
                // Out of memory even in the kernel's headroom: the caller
                // still fails (with no message) rather than waiting forever.
                let msg = lua.create_string(&msg).map_or(Value::Nil, Value::String);
                self.resume_with(lua, serial, token, false, msg);
            }
            Timer::HostCallTimeout { slot, target, ms } => {
                slot.answer(Err(Error::CallTimeout {
                    target,
                    timeout_ms: ms,
                }));
            }
            Timer::HostFnTimeout {
                serial,
                token,
                name,
                ms,
            } => {
                let msg = format!("{name}: timeout after {ms} ms (handler_ms)");
                let msg = lua.create_string(&msg).map_or(Value::Nil, Value::String);
                self.resume_with(lua, serial, token, false, msg);
            }
            Timer::ShutdownKill { serial } => {
                if self.procs.contains_key(&serial) {
                    self.exit_process(serial, ExitReason::Killed, false);
                }
            }
            Timer::Wake => {}
            Timer::LogFlush => self.report_dropped_log_lines(),
            Timer::Canary => self.canary_expired(),
        }
    }
}

/// Fires every timer that is due.
pub(crate) fn fire_timers(lua: &Lua, kh: &KernelHandle) {
    let mut k = kh.borrow();
    // Most slices have no timer set: skip reading the clock then.
    if k.next_timer_at().is_none() {
        return;
    }
    let now = k.timer_now();
    k.fire_due(lua, now);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial_of(t: Option<Timer>) -> Option<u64> {
        match t {
            Some(Timer::ShutdownKill { serial }) => Some(serial),
            Some(_) => panic!("another kind of timer"),
            None => None,
        }
    }

    #[test]
    fn timers_fire_by_due_time_then_by_order_set() {
        let mut t = Timers::default();
        t.add(1, 30, Timer::ShutdownKill { serial: 1 });
        t.add(2, 10, Timer::ShutdownKill { serial: 2 });
        t.add(3, 20, Timer::ShutdownKill { serial: 3 });
        t.add(4, 10, Timer::ShutdownKill { serial: 4 });
        assert_eq!(t.next_at(), Some(10));
        assert_eq!(serial_of(t.pop_due(5)), None, "nothing is due yet");
        assert_eq!(serial_of(t.pop_due(25)), Some(2));
        assert_eq!(serial_of(t.pop_due(25)), Some(4));
        assert_eq!(serial_of(t.pop_due(25)), Some(3));
        assert_eq!(serial_of(t.pop_due(25)), None);
        assert_eq!(t.next_at(), Some(30));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_cancelled_timer_never_fires_and_only_send_after_is_guest_cancellable() {
        let mut t = Timers::default();
        t.add(1, 10, Timer::ShutdownKill { serial: 1 });
        t.add(2, 20, Timer::Wake);
        assert!(!t.is_send_after(1));
        assert!(t.cancel(1));
        assert!(!t.cancel(1), "a timer is cancelled once");
        assert_eq!(t.next_at(), Some(20), "the dead entry is skipped");
        assert!(matches!(t.pop_due(100), Some(Timer::Wake)));
        assert!(t.pop_due(100).is_none());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn dead_entries_are_swept_so_the_heap_stays_bounded() {
        let mut t = Timers::default();
        for id in 0..(3 * REBUILD_AFTER as u64) {
            t.add(id, 1000 + id, Timer::Wake);
            assert!(t.cancel(id));
        }
        assert!(t.heap.len() <= 2 * REBUILD_AFTER + 2, "{}", t.heap.len());
        assert_eq!(t.next_at(), None);
    }

    #[test]
    fn send_after_delivers_in_due_order_and_cancel_prevents_delivery() {
        use crate::kernel::testing::{TestKernel, PROBE};
        use serde_json::json;

        let t = TestKernel::new(&[("probe", PROBE)]);
        let a = t.spawn("probe", Some("a"));
        let set = |ms: u64, msg: &str| {
            let r = t.call(a, json!({ "op": "send_after", "ms": ms, "msg": msg }));
            r.unwrap()
        };
        let _ = (set(60, "third"), set(20, "first"));
        let cancelled = set(40, "never");
        let _ = set(20, "second");
        assert_eq!(
            t.call(a, json!({ "op": "cancel", "id": cancelled }))
                .unwrap(),
            true
        );
        assert_eq!(
            t.call(a, json!({ "op": "cancel", "id": cancelled }))
                .unwrap(),
            false
        );
        t.run_timers();
        let inbox = t.call(a, json!({ "op": "inbox" })).unwrap();
        assert_eq!(inbox, json!(["first", "second", "third"]));
        assert_eq!(t.k().pending_timers(), 0);
    }
}
