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
pub mod stream;
pub mod tree;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use graft::Node;

use feed::EventSource;
use metrics::Metrics;

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
    tasks: OnceLock<()>,
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
                tasks: OnceLock::new(),
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
    /// counting task once (needs a tokio runtime). The counting task reads
    /// every event from the first one kept and ends when the API's live
    /// parts are dropped or the log closes.
    pub(crate) fn ensure_tasks(&self) {
        self.inner.tasks.get_or_init(|| {
            tokio::spawn(feed::Relay::run(Arc::downgrade(&self.inner.relay)));
            let source = self.inner.source.clone();
            let metrics = Arc::downgrade(&self.inner.metrics);
            let mut rx = source.subscribe();
            tokio::spawn(async move {
                let mut pos = 0;
                loop {
                    let Some(m) = metrics.upgrade() else { return };
                    loop {
                        let page = source.events_after(pos, &Default::default(), 1024);
                        let Some(last) = page.events.last().map(|e| e.seq) else {
                            break;
                        };
                        for e in &page.events {
                            m.observe(e);
                        }
                        pos = last;
                    }
                    drop(m);
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            });
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
}
