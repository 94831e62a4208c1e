//! One slice of a sandbox: the commands of its inbox, then the kernel's
//! run, on a scheduler thread or inline on a blocking caller's thread.
//!
//! Invariants:
//! * Every entry into a sandbox's runtime runs behind a panic barrier: a
//!   panic fails that sandbox (`Shared::fail`), never the thread's loop.
//! * `scheduled` is cleared only at the end of a slice, and the inbox is
//!   looked at after that: a command that arrived meanwhile (its `submit`
//!   saw the flag set and did not queue the sandbox) is never stranded.
//! * No slice runs on top of another on one thread (`IN_SLICE`): a host
//!   function called from a slice would otherwise re-enter Luau's C stack.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::run_queue::schedule;
use super::timers::add_wakeup;
use super::worker::Worker;
use crate::kernel;
use crate::node::runtime::Runtime;
use crate::node::{panic_message, Command, NodeInner, Shared};

thread_local! {
    /// Set while this thread runs a sandbox's slice (scheduler thread or an
    /// inline caller), so that a host function called from that slice never
    /// runs another slice on top of Luau's C stack.
    static IN_SLICE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears [`IN_SLICE`] when the slice ends, unwinding included.
struct InSlice;

impl InSlice {
    fn enter() -> InSlice {
        IN_SLICE.with(|f| f.set(true));
        InSlice
    }
}

impl Drop for InSlice {
    fn drop(&mut self) {
        IN_SLICE.with(|f| f.set(false));
    }
}

/// Claims an idle sandbox's turn for the calling thread (for
/// `Sandbox::call_blocking`), which then runs the slice itself
/// ([`run_claimed`]) or gives the turn back ([`release`]) without waking a
/// scheduler thread. Returns false, having done nothing, when the sandbox
/// is queued or running already (its owner then runs what is queued; a
/// `submit` that saw the flag set relies on that), when this thread is
/// already inside a slice, or when it is exiting and its slice state is
/// gone (a thread-local's destructor).
pub(crate) fn claim_here(shared: &Shared) -> bool {
    !IN_SLICE.with(|f| f.get())
        && kernel::fast::can_enter_slice_here()
        && !shared.scheduled.swap(true, Ordering::AcqRel)
}

/// Runs the slice of a sandbox this thread claimed ([`claim_here`]), with
/// `command` run after whatever was queued before it (so nothing queued
/// earlier is overtaken). The command reaches the runtime without a trip
/// through the inbox (no allocation), and is told it runs first in an idle
/// sandbox (`Runtime::first_inline`) when nothing was queued.
///
/// The slice is the one a scheduler thread would run: same panic barrier,
/// same epilogue (wake-ups registered, re-queued if work remains). Only the
/// watchdog and fresh-work preemption do not see it: it holds the caller's
/// own thread, which waits for the answer anyway, and the interrupt still
/// ends it at `SLICE_MS` or `handler_ms`. If the sandbox failed or was
/// destroyed, `command` is dropped unrun (its reply channel closes).
pub(crate) fn run_claimed(
    node: &NodeInner,
    shared: &Arc<Shared>,
    command: impl FnOnce(&mut Runtime),
) {
    let mut command = Some(command);
    run_sandbox(
        node,
        shared,
        None,
        Some(&mut |rt: &mut Runtime| {
            if let Some(command) = command.take() {
                command(rt);
            }
        }),
    );
}

/// Runs one slice of a sandbox behind the panic barrier. `me`: the scheduler
/// thread running it, `None` for an inline caller, whose own command is
/// `mine` (run once, after the queued ones).
pub(super) fn run_sandbox(
    node: &NodeInner,
    shared: &Arc<Shared>,
    me: Option<&Worker>,
    mine: Option<&mut dyn FnMut(&mut Runtime)>,
) {
    let _in_slice = InSlice::enter();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_sandbox_slice(node, shared, me, mine)
    }));
    if let Err(payload) = ran {
        // A bug in Graft or in a host function, not in guest code: fail this
        // sandbox, keep the node.
        shared.fail(panic_message(&*payload));
        release_stopped(node, shared);
    }
}

/// [`release`] for a slice that found the sandbox failed (or failed it): a
/// restart of the failed sandbox that came while the turn was held
/// (`restart_failed`) found it taken and queued nothing.
fn release_stopped(node: &NodeInner, shared: &Arc<Shared>) {
    release(node, shared);
    if shared.runtime.try_lock().is_none_or(|rt| rt.is_some()) {
        schedule(node, shared, false);
    }
}

/// Gives back a turn claimed with [`claim_here`] without running a slice
/// (the request was refused), to a scheduler thread: while the turn was
/// held, a wake-up (a due timer, a restart's start) saw it taken and queued
/// nothing, and the inbox may be empty, so [`release`] alone could lose it.
pub(crate) fn hand_back(node: &NodeInner, shared: &Arc<Shared>) {
    release(node, shared);
    schedule(node, shared, false);
}

/// Ends a sandbox's turn: clears `scheduled`, then queues it again if
/// commands arrived meanwhile (a `submit` that saw the flag set did not
/// queue it, so this is the only place that can).
pub(crate) fn release(node: &NodeInner, shared: &Arc<Shared>) {
    shared.scheduled.store(false, Ordering::Release);
    if !shared.inbox.lock().is_empty() {
        schedule(node, shared, false);
    }
}

fn run_sandbox_slice(
    node: &NodeInner,
    shared: &Arc<Shared>,
    me: Option<&Worker>,
    mine: Option<&mut dyn FnMut(&mut Runtime)>,
) {
    let (more, next_timer) = {
        let mut guard = shared.runtime.lock();
        if shared.destroyed.load(Ordering::Acquire) {
            // `Node::destroy` found this slice running: the VM goes now.
            let rt = guard.take();
            drop(guard);
            drop(rt);
            shared.drop_inbox();
            release(node, shared);
            return;
        }
        let Some(rt) = guard.as_mut() else {
            // Failed or destroyed: whoever still waits learns it now.
            drop(guard);
            shared.drop_inbox_unless_restarted();
            release_stopped(node, shared);
            return;
        };
        let commands: Vec<Command> = shared.inbox.lock().drain(..).collect();
        kernel::kernel_memory(&rt.vm.lua, &rt.spec.limits);
        let _scope = kernel::WatchScope::enter_watch(rt.kernel.borrow().watch.clone());
        // Only an inline caller's command, with nothing queued before it,
        // may run its handler at once (`Runtime::first_inline`).
        rt.first_inline = me.is_none() && commands.is_empty();
        // The queued commands, then the inline caller's own (`None` here).
        let mut commands = commands
            .into_iter()
            .map(Some)
            .chain(mine.is_some().then_some(None));
        let mut mine = mine;
        for cmd in commands.by_ref() {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cmd {
                Some(queued) => queued(rt),
                None => {
                    if let Some(mine) = mine.as_mut() {
                        mine(rt);
                    }
                }
            }));
            rt.first_inline = false;
            if let Err(payload) = ran {
                // Mark the sandbox failed before the commands behind this one
                // are dropped, so their waiters learn why.
                drop(_scope);
                drop(guard);
                shared.fail(panic_message(&*payload));
                drop(commands);
                release_stopped(node, shared);
                return;
            }
        }
        rt.first_inline = false;
        // A restart command may have replaced the VM: enforce the current one's limits.
        let watch = rt.kernel.borrow().watch.clone();
        if let Some(me) = me {
            *me.running.lock() = Some(watch.clone());
        }
        let _scope = kernel::WatchScope::enter_watch(watch);
        rt.run_pending_reloads();
        let more = kernel::run_slice(&rt.vm.lua, &rt.kernel);
        rt.poll_app_start();
        rt.check_canary();
        rt.run_pending_reloads();
        let mut k = rt.kernel.borrow();
        if let Some(message) = k.internal_error.take() {
            // Caught on Luau's C stack: raised here, where the barrier in
            // `run_sandbox` fails the sandbox.
            drop(k);
            std::panic::resume_unwind(Box::new(message));
        }
        // A test clock's timers fire only when it is advanced
        // (`Sandbox::advance_clock` schedules the sandbox itself).
        let next_timer = match k.test_clock {
            None => k.next_timer_at(),
            Some(_) => None,
        };
        let blocking = std::mem::take(&mut k.blocking_out);
        if !blocking.is_empty() {
            node.host_pool
                .submit(shared, blocking, node.limits.max_value_bytes);
        }
        (more, next_timer)
    };
    shared.scheduled.store(false, Ordering::Release);
    // After clearing `scheduled`: a wake-up firing in between must not be
    // swallowed by a flag that is about to be cleared.
    if let Some(at) = next_timer {
        add_wakeup(node, shared, at);
    }
    if !shared.inbox.lock().is_empty() {
        schedule(node, shared, false);
    } else if more {
        schedule(node, shared, true);
    }
}
