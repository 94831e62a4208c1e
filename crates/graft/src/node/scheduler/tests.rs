//! Unit tests of the scheduler: the run queue's order, inline slices, and
//! the watchdog's handling of stuck threads (Linux).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::run_queue::RunQueue;
use super::slice::{claim_here, hand_back, release, run_claimed};
use super::worker::Pool;
use super::{BUSY_MAX_WAIT_MS, STUCK_NICE};
use crate::node::sandbox::Origin;

#[test]
fn fresh_work_goes_first_until_a_busy_sandbox_waited_too_long() {
    let node = crate::Node::with_threads(1);
    let mk = |id: &str| {
        crate::block_on(node.create_sandbox(crate::SandboxSpec::new(id).entry(None)))
            .expect("sandbox")
            .shared
    };
    let (a, b) = (mk("a"), mk("b"));
    let mut q = RunQueue::default();
    for _ in 0..8 {
        q.fresh.push_back(a.clone());
    }
    q.busy.push_back((b.clone(), 100));
    // Before the busy sandbox waited BUSY_MAX_WAIT_MS, every turn is fresh.
    for now in [100, 100 + BUSY_MAX_WAIT_MS - 1] {
        let (s, preemptible) = q.pop(now).expect("queued");
        assert!(Arc::ptr_eq(&s, &a) && !preemptible);
    }
    // Then it goes first, protected for MIN_SLICE_MS (not preemptible at once).
    let (s, preemptible) = q.pop(100 + BUSY_MAX_WAIT_MS).expect("queued");
    assert!(Arc::ptr_eq(&s, &b) && !preemptible);
    // Busy work taken when nothing fresh waits may be ended at once.
    q.fresh.clear();
    q.busy.push_back((b.clone(), 200));
    let (s, preemptible) = q.pop(200).expect("queued");
    assert!(Arc::ptr_eq(&s, &b) && preemptible);
    assert!(q.pop(200).is_none());
}

/// A sandbox with nothing queued and nothing running.
fn idle(node: &crate::Node, id: &str) -> crate::Sandbox {
    crate::block_on(node.create_sandbox(crate::SandboxSpec::new(id).entry(None))).expect("sandbox")
}

/// Claims `sb`'s turn for this thread, waiting out the slices its creation
/// may have queued (start-up timers).
fn claim(sb: &crate::Sandbox) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !claim_here(&sb.shared) {
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox never became idle"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn an_idle_sandbox_runs_on_the_calling_thread() {
    let node = crate::Node::with_threads(1);
    let sb = idle(&node, "idle");
    claim(&sb);
    let mut ran_on = None;
    let mut first = None;
    run_claimed(&node.inner, &sb.shared, |rt| {
        ran_on = Some(std::thread::current().id());
        first = Some(rt.first_inline);
    });
    assert_eq!(ran_on, Some(std::thread::current().id()));
    assert_eq!(first, Some(true), "nothing was queued before it");
    assert!(
        !sb.shared.scheduled.load(Ordering::Acquire),
        "the turn is given back"
    );
}

#[test]
fn an_inline_command_runs_after_what_was_queued_before_it() {
    let node = crate::Node::with_threads(1);
    let sb = idle(&node, "fifo");
    claim(&sb);
    // Queued while this thread holds the turn: nobody else may run it.
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let queued = order.clone();
    sb.enqueue(
        Box::new(move |rt| queued.lock().push(("queued", rt.first_inline))),
        Origin::Request,
    )
    .expect("queued");
    run_claimed(&node.inner, &sb.shared, |rt| {
        order.lock().push(("mine", rt.first_inline))
    });
    // Neither may run a handler at once: the queued one is not the
    // caller's, and the caller's came after other work.
    assert_eq!(*order.lock(), [("queued", false), ("mine", false)]);
}

#[test]
fn a_scheduled_sandbox_is_left_to_its_owner() {
    let node = crate::Node::with_threads(1);
    let sb = idle(&node, "owned");
    // Claim it as a scheduler thread would: run_here must only queue.
    // Its creation may have queued start-up slices; a plain store could
    // land while a scheduler thread still owns it, and that thread's
    // release would then hand the sandbox to this thread.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sb
        .shared
        .scheduled
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the owner released it"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!claim_here(&sb.shared));
    let (tx, rx) = std::sync::mpsc::channel();
    sb.run_here(move |_| {
        tx.send(std::thread::current().id()).expect("receiver");
    })
    .expect("queued");
    assert!(rx.try_recv().is_err(), "nothing ran it");
    assert!(
        !sb.shared.inbox.lock().is_empty(),
        "the command still waits"
    );
    // The owner's release finds the command and queues the sandbox.
    release(&node.inner, &sb.shared);
    let ran_on = rx.recv_timeout(Duration::from_secs(5)).expect("ran");
    assert_ne!(ran_on, std::thread::current().id());
}

#[test]
fn an_inline_request_to_a_sandbox_closed_for_a_rebuild_is_refused() {
    let node = crate::Node::with_threads(1);
    let sb = idle(&node, "closed");
    claim(&sb);
    release(&node.inner, &sb.shared);
    sb.close_for_rebuild();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let err = sb
        .run_here(move |_| flag.store(true, Ordering::Release))
        .expect_err("closed");
    assert_eq!(err.kind(), "sandbox_rebuilding", "{err}");
    assert!(!ran.load(Ordering::Acquire), "the command never ran");
    assert!(
        !sb.shared.scheduled.load(Ordering::Acquire),
        "the claimed turn is given back"
    );
    sb.reopen();
    let err = sb
        .call_blocking("nobody", serde_json::json!(null), None)
        .expect_err("no such process");
    assert_eq!(err.kind(), "no_process", "{err}");
}

/// A module whose process ticks every millisecond on a timer, counting its
/// ticks through the host function `tick`.
fn ticking(id: &str) -> (crate::SandboxSpec, crate::HostFunctions, Arc<AtomicU64>) {
    let ticks = Arc::new(AtomicU64::new(0));
    let counter = ticks.clone();
    let host = crate::HostFunctions::default().function("tick", move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(serde_json::Value::Null)
    });
    let src = r#"
        local m = {}
        function m.init() graft.send_after(1, graft.self(), "t") return {} end
        function m.handle_info(_, s) tick() graft.send_after(1, graft.self(), "t") return s end
        return m
    "#;
    (crate::SandboxSpec::new(id).module("app", src), host, ticks)
}

/// A sandbox with no entry app and one ticking process ([`ticking`]).
fn ticker(node: &crate::Node) -> (crate::Sandbox, Arc<AtomicU64>) {
    let (spec, host, ticks) = ticking("ticker");
    let sb = crate::block_on(node.create_sandbox_with(spec.entry(None), host)).expect("sandbox");
    crate::block_on(sb.spawn("app", serde_json::Value::Null, None)).expect("spawn");
    (sb, ticks)
}

/// Waits up to `within` for `ticks` to pass `above`.
fn ticks_past(ticks: &AtomicU64, above: u64, within: Duration) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if ticks.load(Ordering::Relaxed) > above {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn a_turn_given_back_unused_keeps_the_timers_that_came_meanwhile() {
    let node = crate::Node::with_threads(1);
    let (sb, ticks) = ticker(&node);
    assert!(ticks_past(&ticks, 0, Duration::from_secs(5)), "it ticks");
    // Hold the turn past the next tick's due time, as a refused inline
    // request does between its claim and its refusal: the timer thread
    // finds the sandbox taken and queues nothing.
    claim(&sb);
    std::thread::sleep(Duration::from_millis(30));
    let before = ticks.load(Ordering::Relaxed);
    hand_back(&node.inner, &sb.shared);
    // Nothing else would run the sandbox again: no request, no new timer.
    assert!(
        ticks_past(&ticks, before, Duration::from_secs(2)),
        "the timer that came while the turn was held was lost"
    );
}

#[test]
fn a_panic_in_an_inline_slice_fails_only_that_sandbox() {
    let node = crate::Node::with_threads(1);
    let victim = idle(&node, "victim");
    let bystander = idle(&node, "bystander");
    victim
        .enqueue(
            Box::new(|_| panic!("a bug in the runtime")),
            Origin::Request,
        )
        .expect("queued");
    // The call runs inline behind the panicking command: the barrier
    // fails the sandbox and the call learns why.
    let err = victim
        .call_blocking("anyone", serde_json::json!(null), None)
        .expect_err("the sandbox failed");
    assert_eq!(err.kind(), "sandbox_failed", "{err}");
    // Under load a scheduler thread may have taken the command first (the
    // sandbox's creation scheduled it); it releases the sandbox itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while victim.shared.scheduled.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "released");
        std::thread::sleep(Duration::from_millis(1));
    }
    let err = victim
        .call_blocking("anyone", serde_json::json!(null), None)
        .expect_err("still failed");
    assert_eq!(err.kind(), "sandbox_failed");
    let err = bystander
        .call_blocking("anyone", serde_json::json!(null), None)
        .expect_err("no such process");
    assert_eq!(err.kind(), "no_process", "{err}");
}

/// The nice value of a thread of this process.
#[cfg(target_os = "linux")]
fn nice_of(tid: i32) -> i32 {
    // SAFETY: plain syscall; errno is reset first because -1 is a valid
    // answer.
    unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
    }
}

/// Waits up to `within` for `done` on the node's pool.
#[cfg(target_os = "linux")]
fn wait_pool(node: &crate::Node, within: Duration, done: impl Fn(&Pool) -> bool) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if done(&node.inner.pool.lock()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[cfg(target_os = "linux")]
#[test]
fn a_thread_stuck_spinning_gets_a_lower_priority_then_retires() {
    let node = crate::Node::with_threads(1);
    let src = r#"
        local m = {}
        function m.init() return {} end
        function m.handle_cast(_, state)
          local t = {}
          for i = 1, 50 do t[i] = i end
          table.sort(t, function(a, b) while true do end end)
          return state
        end
        function m.handle_call(req, _, state) return req, state end
        return m
    "#;
    let sb = crate::block_on(
        node.create_sandbox(
            crate::SandboxSpec::new("sorter")
                .entry(None)
                .module("m", src)
                .limits(crate::Limits {
                    // Long enough for the watchdog to see it spin on a
                    // loaded machine; the test waits for the timeout.
                    handler_ms: 2_000,
                    ..crate::Limits::default()
                }),
        ),
    )
    .expect("sandbox");
    crate::block_on(sb.spawn("m", serde_json::Value::Null, Some("s"))).expect("spawn");
    crate::block_on(sb.cast("s", serde_json::json!("go"))).expect("cast");
    let lowered = wait_pool(&node, Duration::from_secs(3), |pool| {
        pool.workers.iter().any(|w| {
            w.lowered.load(Ordering::Relaxed)
                && nice_of(w.tid.load(Ordering::Relaxed)) == STUCK_NICE
        })
    });
    assert!(lowered, "the spinning thread was not lowered");
    // The callback times out, the lowered thread retires, and the pool
    // serves at normal priority again.
    let retired = wait_pool(&node, Duration::from_secs(10), |pool| {
        pool.serving == 1
            && pool.workers.iter().all(|w| {
                !w.lowered.load(Ordering::Relaxed) && nice_of(w.tid.load(Ordering::Relaxed)) == 0
            })
    });
    assert!(retired, "a lowered thread still serves");
    let echo = crate::block_on(sb.call("s", serde_json::json!("again"), Some(2_000)));
    assert!(echo.is_err(), "s exited with its timeout: {echo:?}");
    crate::block_on(sb.spawn("m", serde_json::Value::Null, Some("t"))).expect("respawn");
    let echo = crate::block_on(sb.call("t", serde_json::json!("hi"), Some(2_000)));
    assert_eq!(echo.expect("served"), serde_json::json!("hi"));
}

#[cfg(target_os = "linux")]
#[test]
fn a_thread_stuck_waiting_keeps_its_priority() {
    let node = crate::Node::with_threads(1);
    let host = crate::HostFunctions::default().function("nap", |_| {
        std::thread::sleep(Duration::from_millis(150));
        Ok(serde_json::Value::Null)
    });
    let src = r#"
        local m = {}
        function m.init() return {} end
        function m.handle_call(req, _, state) nap() return req, state end
        return m
    "#;
    let sb = crate::block_on(
        node.create_sandbox_with(
            crate::SandboxSpec::new("napper")
                .entry(None)
                .module("m", src),
            host,
        ),
    )
    .expect("sandbox");
    crate::block_on(sb.spawn("m", serde_json::Value::Null, Some("n"))).expect("spawn");
    let probed = std::sync::Arc::new(AtomicBool::new(false));
    let watcher = {
        let node = node.clone();
        let probed = probed.clone();
        std::thread::spawn(move || {
            // Seen stuck and probed by the watchdog, but never lowered.
            wait_pool(&node, Duration::from_secs(2), |pool| {
                let seen = pool.workers.iter().any(|w| w.stuck_probe.lock().is_some());
                if seen {
                    probed.store(true, Ordering::Relaxed);
                }
                pool.workers
                    .iter()
                    .any(|w| w.lowered.load(Ordering::Relaxed))
            })
        })
    };
    let r = crate::block_on(sb.call("n", serde_json::json!("x"), Some(5_000)));
    assert_eq!(r.expect("answered"), serde_json::json!("x"));
    let lowered = watcher.join().expect("watcher");
    assert!(
        probed.load(Ordering::Relaxed),
        "the watchdog never probed the stuck thread"
    );
    assert!(!lowered, "a waiting thread was lowered");
}

/// Fails `sb` with a panicking command (a bug in the runtime) and waits
/// until the slice that failed it gave its turn back.
fn fail_and_settle(sb: &crate::Sandbox) {
    sb.submit(|_| panic!("a bug in the runtime"))
        .expect("queued");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sb.shared.failed.lock().is_none() || sb.shared.scheduled.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "never failed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A restart that lands while a slice holds a failed sandbox's turn.
#[test]
fn a_restart_while_a_slice_holds_a_failed_sandboxs_turn_is_not_lost() {
    let node = crate::Node::with_threads(1);
    // The entry app ticks: after a restart, only a slice starts it again.
    let (spec, host, ticks) = ticking("phoenix");
    let sb = crate::block_on(node.create_sandbox_with(spec, host)).expect("sandbox");
    assert!(ticks_past(&ticks, 0, Duration::from_secs(5)), "it ticks");
    // A bug fails the sandbox (its runtime is gone).
    fail_and_settle(&sb);
    // Stale wake-ups run out.
    std::thread::sleep(Duration::from_millis(50));
    // A scheduler thread starts a slice of the failed sandbox (a stale timer
    // wake-up does this): it finds no runtime and is held, by the inbox
    // lock, in `drop_inbox`, between seeing the sandbox failed and `release`.
    let inbox = sb.shared.inbox.lock();
    super::schedule(&node.inner, &sb.shared, false);
    std::thread::sleep(Duration::from_millis(100));
    // The host restarts the sandbox meanwhile: `restart_failed` installs the
    // runtime and schedules it, which finds the turn taken.
    crate::block_on(sb.restart()).expect("restarted");
    drop(inbox);
    let before = ticks.load(Ordering::Relaxed);
    assert!(
        ticks_past(&ticks, before, Duration::from_secs(2)),
        "the restarted app never ran: its start was swallowed by the failed branch's release"
    );
}

/// The same window must not drop a request made to the restarted sandbox.
#[test]
fn a_request_to_a_sandbox_restarted_during_a_failed_slice_is_answered() {
    let node = crate::Node::with_threads(1);
    let sb = idle(&node, "phoenix2");
    fail_and_settle(&sb);
    let inbox = sb.shared.inbox.lock();
    // A request (after the restart below) waits for the inbox lock first...
    let asker = {
        let sb = sb.clone();
        std::thread::spawn(move || crate::block_on(sb.ask(|_| 42)))
    };
    std::thread::sleep(Duration::from_millis(100));
    // ...then a slice of the failed sandbox, held in its failed branch.
    super::schedule(&node.inner, &sb.shared, false);
    std::thread::sleep(Duration::from_millis(100));
    crate::block_on(sb.restart()).expect("restarted");
    drop(inbox);
    let answer = asker.join().expect("asker");
    assert_eq!(
        answer.expect("the restarted sandbox answers"),
        42,
        "the failed branch's drop_inbox dropped a request made to the restarted sandbox"
    );
}
