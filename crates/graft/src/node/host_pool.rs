//! The node's pool for blocking host functions: threads apart from the
//! scheduler threads, so a host function that waits on I/O holds up only
//! the process that called it, never another process or sandbox.
//!
//! Invariants:
//! * At most `cap` calls run at once ([`NodeLimits::max_blocking_host_calls`]);
//!   calls beyond wait in a FIFO queue. A call that never returns keeps its
//!   thread (it is counted against the cap for good): its caller still fails
//!   with a timeout after `handler_ms`.
//! * Threads start on demand, one per call that finds none idle, up to the
//!   cap, and stay until the node stops. Stopping drops the queued calls;
//!   a thread inside a host function ends when the function returns.
//! * A result reaches its process only as a command in its sandbox's inbox:
//!   if the sandbox is gone (destroyed, failed, node stopped) the result is
//!   dropped, with nothing to clean up.
//! * A panic in a host function is caught: it is an error for its caller,
//!   and the thread lives on.
//!
//! [`NodeLimits::max_blocking_host_calls`]: crate::NodeLimits::max_blocking_host_calls

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex};

use super::sandbox::Origin;
use super::{Sandbox, Shared};
use crate::kernel::{self, BlockingCall};
use crate::vm::{call_guarded, HostCall};

/// A call waiting for a thread, with the sandbox its result goes to.
struct Task {
    call: BlockingCall,
    sandbox: Weak<Shared>,
    /// The cap on the result's JSON form (the node's `max_value_bytes`).
    max_value_bytes: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Task>,
    threads: usize,
    /// Threads waiting for a call (a notified one counts until it wakes).
    idle: usize,
    stopping: bool,
}

/// The pool; the node holds it, its threads hold an `Arc` too.
pub(super) struct HostPool {
    state: Mutex<State>,
    cv: Condvar,
    cap: usize,
}

impl HostPool {
    pub(super) fn new(cap: usize) -> HostPool {
        HostPool {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            cap: cap.max(1),
        }
    }

    /// Queues the calls a slice of `sandbox` started.
    pub(super) fn submit(
        self: &Arc<Self>,
        sandbox: &Arc<Shared>,
        calls: Vec<BlockingCall>,
        max_value_bytes: usize,
    ) {
        let mut st = self.state.lock();
        if st.stopping {
            return;
        }
        for call in calls {
            st.queue.push_back(Task {
                call,
                sandbox: Arc::downgrade(sandbox),
                max_value_bytes,
            });
            if st.idle >= st.queue.len() {
                self.cv.notify_one();
            } else if st.threads < self.cap {
                st.threads += 1;
                let pool = self.clone();
                let spawned = std::thread::Builder::new()
                    .name("graft-host".into())
                    .spawn(move || pool.run());
                if spawned.is_err() {
                    // The queue waits for a running thread instead.
                    st.threads -= 1;
                    tracing::error!("cannot start a blocking host function thread");
                }
            }
        }
    }

    /// Stops the pool: queued calls are dropped, idle threads end.
    pub(super) fn stop(&self) {
        let queued: Vec<Task> = {
            let mut st = self.state.lock();
            st.stopping = true;
            st.queue.drain(..).collect()
        };
        self.cv.notify_all();
        drop(queued);
    }

    fn run(self: Arc<Self>) {
        loop {
            let task = {
                let mut st = self.state.lock();
                loop {
                    if st.stopping {
                        st.threads -= 1;
                        return;
                    }
                    if let Some(t) = st.queue.pop_front() {
                        break t;
                    }
                    st.idle += 1;
                    self.cv.wait(&mut st);
                    st.idle -= 1;
                }
            };
            run_task(task);
        }
    }
}

/// Runs one call and queues its result to the calling sandbox.
fn run_task(task: Task) {
    let Task {
        call,
        sandbox,
        max_value_bytes,
    } = task;
    // Not worth running for a sandbox already gone.
    if sandbox.upgrade().is_none() {
        return;
    }
    let BlockingCall {
        f,
        name,
        sandbox: sandbox_id,
        pid,
        args,
        serial,
        token,
        epoch,
    } = call;
    let result = call_guarded(&name, || {
        f(HostCall {
            sandbox: &sandbox_id,
            pid: &pid,
            args,
        })
    })
    .and_then(|v| {
        let bytes = crate::value::json_len(&v);
        if bytes > max_value_bytes {
            Err(format!(
                "result too large: {bytes} bytes as JSON (max_value_bytes {max_value_bytes})"
            ))
        } else {
            Ok(v)
        }
    });
    let Some(shared) = sandbox.upgrade() else {
        return;
    };
    // Refused if the sandbox was destroyed or failed meanwhile, or the node
    // stops: the result is dropped with the command. Taken while the
    // sandbox is closed for a rebuild: the caller may be a `terminate` the
    // rebuild's stop waits for.
    let _ = Sandbox { shared }.submit_as(Origin::Node, move |rt| {
        let lua = &rt.vm.lua;
        kernel::kernel(lua).blocking_done(lua, (serial, token, epoch), &name, result);
    });
}
