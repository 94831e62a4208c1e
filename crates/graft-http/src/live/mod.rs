//! Seeing the node live (SPEC §10): the node-wide event feed, the SSE
//! stream, the Prometheus metrics and the dashboard.
//!
//! [`Live`] is shared by the routes through an `Extension`, so the router's
//! state stays whatever the rest of the API uses (`Node` today).
//!
//! Invariants: nothing here runs inside a sandbox's thread or holds a
//! sandbox: the feed's one poller asks each sandbox for its new events with
//! an ordinary command (bounded by a timeout), and every reader reads the
//! feed (see [`feed`]).

pub mod dashboard;
pub mod feed;
pub mod metrics;
pub mod stream;
pub mod tree;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use graft::Node;

use feed::{EventSource, Feed};
use metrics::Metrics;

/// How often an idle event stream sends a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The live parts of one API: its event feed and its metrics.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// let node = graft::Node::new();
/// let live = graft_http::Live::new(node.clone());
/// let app = graft_http::router_with(node, live.clone());
/// // A second listener for scrapers only (`graft serve --metrics-bind`).
/// let scrape = graft_http::metrics_router(live);
/// # let _ = (app, scrape);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    node: Node,
    feed: Arc<Feed>,
    metrics: Arc<Metrics>,
    polling: OnceLock<()>,
    keep_alive: Duration,
}

impl Live {
    /// The live parts for `node`; the feed starts polling on the first
    /// request that needs it (or at once when built inside a tokio runtime).
    pub fn new(node: Node) -> Live {
        Live::with_keep_alive(node, KEEP_ALIVE)
    }

    /// As [`Live::new`], with another keep-alive interval for event streams.
    pub fn with_keep_alive(node: Node, keep_alive: Duration) -> Live {
        let feed = Arc::new(Feed::default());
        let metrics = Arc::new(Metrics::default());
        let m = metrics.clone();
        feed.on_event(move |e| m.observe(e));
        let live = Live {
            inner: Arc::new(Inner {
                node,
                feed,
                metrics,
                polling: OnceLock::new(),
                keep_alive,
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            live.ensure_polling();
        }
        live
    }

    /// Starts the feed's poller once (needs a tokio runtime).
    pub(crate) fn ensure_polling(&self) {
        self.inner.polling.get_or_init(|| {
            self.inner.feed.spawn_poller(self.inner.node.clone());
        });
    }

    /// Where events are read from.
    pub fn source(&self) -> Arc<dyn EventSource> {
        self.ensure_polling();
        self.inner.feed.clone()
    }

    /// The feed itself (tests push fake events into it).
    pub fn feed(&self) -> &Arc<Feed> {
        &self.inner.feed
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub(crate) fn keep_alive(&self) -> Duration {
        self.inner.keep_alive
    }
}
