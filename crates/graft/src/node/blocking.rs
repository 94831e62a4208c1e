//! Waiting on Graft's futures without an async runtime: [`block_on`], and
//! [`with_timeout`] on one process-wide timer thread (never a thread per wait).
//!
//! Invariants:
//! * The timer thread holds only wakers, never futures: a dropped
//!   [`with_timeout`] removes its entry, so the heap holds live waits only
//!   (plus entries already due, popped on the next turn).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::scheduler::SPIN_MICROS;

/// Runs a future to completion on the current thread (for callers without an
/// async runtime). Graft's futures only wait on channels, so any executor works.
///
/// ```
/// assert_eq!(graft::block_on(async { 7 }), 7);
/// ```
pub fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        // Answers usually come within microseconds: poll a little before
        // parking the thread (a park/unpark round trip costs more than that).
        let spin_until = Instant::now() + Duration::from_micros(SPIN_MICROS);
        while Instant::now() < spin_until {
            std::hint::spin_loop();
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
        }
        std::thread::park();
    }
}

/// Runs blocking work (`f`) on a thread of its own and waits for it without
/// blocking the caller's thread: what the async API does for work that
/// holds a thread for milliseconds (compiling and starting a sandbox,
/// writing its creation to disk).
///
/// A plain thread, not a pool: it works under any executor (or none, under
/// [`block_on`]), it is not held up by blocking host functions hogging the
/// node's host pool, and its cost (tens of µs) is small against the work.
/// The thread ends with `f`; dropping the future does not stop `f` (its
/// result is then dropped). A panic in `f` is returned as `Err(message)`.
/// If no thread can be started, `f` runs on the caller's thread instead.
pub(crate) async fn unblock<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .map_err(|payload| crate::vm::panic_text(&*payload));
        let _ = tx.send(out);
    };
    // The job moves into the thread only if it starts: keep it reachable to
    // run it here otherwise.
    let job = Arc::new(Mutex::new(Some(job)));
    let theirs = job.clone();
    let spawned = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            if let Some(job) = theirs.lock().take() {
                job();
            }
        });
    if spawned.is_err() {
        tracing::warn!("cannot start a `{name}` thread; running the work on the caller's");
        if let Some(job) = job.lock().take() {
            job();
        }
    }
    drop(job);
    rx.await
        .unwrap_or_else(|_| Err("the worker thread ended without an answer".into()))
}

/// Waits for a future at most `timeout`; `None` if it did not finish in time.
/// Works under any executor (the deadline is kept by one shared timer thread).
///
/// ```
/// use std::time::Duration;
/// let slow = std::future::pending::<()>();
/// assert_eq!(graft::block_on(graft::with_timeout(slow, Duration::from_millis(5))), None);
/// assert_eq!(graft::block_on(graft::with_timeout(async { 3 }, Duration::from_secs(1))), Some(3));
/// ```
pub async fn with_timeout<F: Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    let deadline = Instant::now() + timeout;
    let mut alarm = Alarm { deadline, id: None };
    let mut fut = pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if Pin::new(&mut alarm).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Ready once its deadline passed; registered with the timer thread meanwhile.
struct Alarm {
    deadline: Instant,
    id: Option<u64>,
}

impl Future for Alarm {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let timers = timers();
        let id = *self
            .id
            .get_or_insert_with(|| timers.next.fetch_add(1, Ordering::Relaxed));
        let mut state = timers.state.lock();
        if state.wakers.insert(id, cx.waker().clone()).is_none() {
            state.heap.push(Reverse((self.deadline, id)));
            timers.cv.notify_one();
        }
        Poll::Pending
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            timers().state.lock().wakers.remove(&id);
        }
    }
}

struct Timers {
    state: Mutex<TimerState>,
    cv: Condvar,
    next: AtomicU64,
}

#[derive(Default)]
struct TimerState {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    wakers: HashMap<u64, Waker>,
}

fn timers() -> &'static Timers {
    static TIMERS: OnceLock<Timers> = OnceLock::new();
    TIMERS.get_or_init(|| {
        std::thread::Builder::new()
            .name("graft-timeouts".into())
            .spawn(timer_loop)
            .expect("cannot start the timeout thread");
        Timers {
            state: Mutex::new(TimerState::default()),
            cv: Condvar::new(),
            next: AtomicU64::new(0),
        }
    })
}

fn timer_loop() {
    let timers = timers();
    let mut state = timers.state.lock();
    loop {
        let now = Instant::now();
        while let Some(Reverse((at, id))) = state.heap.peek().copied() {
            if at > now {
                break;
            }
            state.heap.pop();
            if let Some(w) = state.wakers.remove(&id) {
                w.wake();
            }
        }
        match state.heap.peek() {
            Some(Reverse((at, _))) => {
                let at = *at;
                timers.cv.wait_until(&mut state, at);
            }
            None => timers.cv.wait(&mut state),
        }
    }
}
