//! Seeing the node live (SPEC §10): the node-wide event feed, the SSE
//! stream, the Prometheus metrics and the dashboard.
//!
//! [`Live`] is shared by the routes through an `Extension`, so the router's
//! state stays whatever the rest of the API uses (`Node` today).
//!
//! Invariants: nothing here runs inside a sandbox's thread or holds a
//! sandbox's lock: events are read from the node's event log (see
//! [`feed`]), and one counting task per API reads it for the metrics. The
//! node wakes one relay task per API when it logs an event, never the
//! streams themselves (see [`feed::Relay`]), and streams batch what arrives
//! within [`stream::BATCH_WINDOW`]: the cost of open dashboards falls on the
//! API's threads, not on the sandbox that logged the event.

pub mod dashboard;
pub mod feed;
pub mod metrics;
mod query;
pub mod slots;
pub mod stream;
pub mod tree;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use graft::Node;

use feed::EventSource;
use metrics::Metrics;
pub use slots::StreamLimits;
use slots::StreamSlots;

/// How often an idle event stream sends a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The live parts of one API: its event feed and its metrics.
///
/// ```no_run
/// # fn demo() -> anyhow::Result<()> {
/// use std::sync::Arc;
/// let node = graft::Node::builder().ephemeral().open()?;
/// let store = node.store().expect("an ephemeral node has a database").clone();
/// let trust = Arc::new(graft_http::trust::Trust::new(store, Default::default())?);
/// let live = graft_http::Live::new(node.clone());
/// let app = graft_http::router_with(node, trust.clone(), live.clone());
/// // A second listener for scrapers only (`graft serve --metrics-bind`).
/// let scrape = graft_http::metrics_router(trust, live);
/// # let _ = (app, scrape);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    node: Node,
    /// The relay, as every reader sees it.
    source: Arc<dyn EventSource>,
    relay: Arc<feed::Relay>,
    metrics: Arc<Metrics>,
    /// Whether the relay task runs (see [`Live::ensure_tasks`]).
    relaying: Arc<AtomicBool>,
    /// Whether the metrics' counting task runs.
    counting: Arc<AtomicBool>,
    /// Dropped with the live parts: the tasks hear it and end at once
    /// (they hold nothing that keeps the node alive, but would otherwise
    /// wait for the next event to notice).
    closed: tokio::sync::watch::Sender<()>,
    streams: Arc<StreamSlots>,
    keep_alive: Duration,
    frames: Arc<stream::FrameCache>,
    batch_window: Duration,
}

impl Live {
    /// The live parts for `node`, reading the node's event log. The metrics
    /// start counting events on the first request that needs them (or at
    /// once when built inside a tokio runtime).
    pub fn new(node: Node) -> Live {
        Live::with_keep_alive(node, KEEP_ALIVE)
    }

    /// As [`Live::new`], with another keep-alive interval for event streams.
    pub fn with_keep_alive(node: Node, keep_alive: Duration) -> Live {
        let source: Arc<dyn EventSource> = Arc::new(node.clone());
        Live::with_source(node, source, keep_alive)
    }

    /// The live parts reading events from `source` instead of the node's log
    /// (a fake node in tests).
    pub fn with_source(node: Node, source: Arc<dyn EventSource>, keep_alive: Duration) -> Live {
        let relay = Arc::new(feed::Relay::new(source));
        let live = Live {
            inner: Arc::new(Inner {
                node,
                source: relay.clone(),
                relay,
                metrics: Arc::new(Metrics::default()),
                relaying: Arc::default(),
                counting: Arc::default(),
                closed: tokio::sync::watch::channel(()).0,
                streams: Arc::new(StreamSlots::new(StreamLimits::default())),
                keep_alive,
                frames: Arc::default(),
                batch_window: stream::BATCH_WINDOW,
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            live.ensure_tasks();
        }
        live
    }

    /// Starts the event relay (see [`feed::Relay`]) and the metrics'
    /// counting task in the current tokio runtime, each unless it runs
    /// already; without a runtime it does nothing (the next request starts
    /// them). A task ends with the runtime that runs it, so an embedder that
    /// builds `Live` in one runtime and serves it from another after the
    /// first is gone gets them started again there; the counting task
    /// resumes where the last one stopped ([`Metrics::counted_through`]).
    /// Both end as soon as these live parts are dropped.
    pub(crate) fn ensure_tasks(&self) {
        let inner = &self.inner;
        spawn_unless_running(&inner.relaying, || {
            feed::Relay::run(Arc::downgrade(&inner.relay), inner.closed.subscribe())
        });
        spawn_unless_running(&inner.counting, || {
            count_events(
                Arc::downgrade(&inner.source),
                Arc::downgrade(&inner.metrics),
                inner.closed.subscribe(),
            )
        });
    }

    /// Where events are read from.
    pub fn source(&self) -> Arc<dyn EventSource> {
        self.ensure_tasks();
        self.inner.source.clone()
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The highest event seq readable now (not the relayed value, which
    /// may lag it by a wake-up).
    pub(crate) fn head(&self) -> u64 {
        self.inner.relay.head()
    }
    pub(crate) fn frame_cache(&self) -> Arc<stream::FrameCache> {
        self.inner.frames.clone()
    }
    pub(crate) fn batch_window(&self) -> Duration {
        self.inner.batch_window
    }
    pub(crate) fn keep_alive(&self) -> Duration {
        self.inner.keep_alive
    }

    /// Bounds the event streams open at once (default
    /// [`StreamLimits::default`]); streams already open stay open.
    pub fn set_stream_limits(&self, limits: StreamLimits) {
        self.inner.streams.set_limits(limits);
    }

    /// The bounds on open event streams.
    pub fn stream_limits(&self) -> StreamLimits {
        self.inner.streams.limits()
    }

    pub(crate) fn stream_slots(&self) -> &Arc<StreamSlots> {
        &self.inner.streams
    }
}

/// Clears its flag when the task that holds it ends or is dropped (with
/// its runtime).
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Spawns `task()` on the current runtime unless `flag` says a copy runs.
fn spawn_unless_running<F>(flag: &Arc<AtomicBool>, task: impl FnOnce() -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    if tokio::runtime::Handle::try_current().is_err() || flag.swap(true, Ordering::AcqRel) {
        return;
    }
    let running = Running(flag.clone());
    let task = task();
    tokio::spawn(async move {
        let _running = running;
        task.await;
    });
}

/// The metrics' counting task: reads every event once, from where the last
/// counting task stopped, and waits for more. Holds the source and the
/// metrics weakly, so it keeps neither (nor the node) alive.
async fn count_events(
    source: std::sync::Weak<dyn EventSource>,
    metrics: std::sync::Weak<Metrics>,
    mut closed: tokio::sync::watch::Receiver<()>,
) {
    let Some(mut rx) = source.upgrade().map(|s| s.subscribe()) else {
        return;
    };
    loop {
        {
            let (Some(source), Some(m)) = (source.upgrade(), metrics.upgrade()) else {
                return;
            };
            loop {
                let head = *rx.borrow_and_update();
                let pos = m.counted_through();
                let page = source.events_after(pos, &Default::default(), 1024);
                for e in &page.events {
                    m.observe(e);
                }
                m.set_counted_through(page.through);
                // `through` only grows; one that stands still (nothing
                // past `pos` is readable yet) waits for the next change.
                if page.through >= head || page.through <= pos {
                    break;
                }
            }
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = closed.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay and the counting task run once per runtime, and end as
    /// soon as the live parts are dropped (not at the next event, which on
    /// an idle node may never come).
    #[tokio::test]
    async fn the_tasks_run_once_and_end_when_the_live_parts_are_dropped() {
        let live = Live::new(Node::with_threads(1));
        live.ensure_tasks();
        live.ensure_tasks();
        let flags = [live.inner.relaying.clone(), live.inner.counting.clone()];
        // Three holders each: the inner struct, this test, and one running
        // task (the second `ensure_tasks` spawned nothing).
        for flag in &flags {
            assert!(flag.load(Ordering::Acquire));
            assert_eq!(Arc::strong_count(flag), 3);
        }
        drop(live);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while flags.iter().any(|f| f.load(Ordering::Acquire)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the tasks outlived their live parts"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for flag in &flags {
            assert_eq!(Arc::strong_count(flag), 1, "no task holds it");
        }
    }
}
