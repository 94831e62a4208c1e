//! The node-wide event feed: every sandbox's events, merged into one log
//! with a node-wide sequence number, read by the SSE stream, the metrics and
//! the dashboard.
//!
//! Invariants:
//! * readers never touch a sandbox: they read the feed's own ring
//!   ([`EventSource::events_after`]) and wait on a `watch` channel
//!   ([`EventSource::subscribe`]), so a slow or stalled client cannot delay a
//!   sandbox, and a sandbox is asked for its events only by the one poller;
//! * `seq` is strictly increasing and every event with `seq <=` the value
//!   published on the watch channel is readable until it is pruned;
//! * when events may have been lost the reader is told, never silently:
//!   pruned from the ring, by an [`EventGap`]; evicted from a sandbox's own
//!   log before the poller read them, by an `events_lost` event.
//!
//! This is the seam to the node's own durable event log
//! (`Node::events_after`/`Node::subscribe_events`): the stream and the metrics
//! use only [`EventSource`], so switching is a new implementation of it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use graft::Node;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;

/// Events the feed keeps for readers that resume (`Last-Event-ID`).
pub const KEEP_EVENTS: usize = 10_000;

/// How often the poller asks every sandbox for new events.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long one sandbox may take to answer the poller before the round goes
/// on without it (it is asked again next round).
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// One event of the node: a sandbox event with a node-wide `seq`.
///
/// ```
/// let e = graft_http::NodeEvent { seq: 1, sandbox: "app".into(), at_ms: 0.0,
///     kind: "reload".into(), detail: serde_json::json!({}) };
/// assert_eq!(e.kind, "reload");
/// ```
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeEvent {
    /// Node-wide position, 1, 2, 3 … (the SSE `id`).
    pub seq: u64,
    /// The sandbox it happened in.
    pub sandbox: String,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: f64,
    /// `reload`, `unchanged`, `abort`, `rollback`, `canary_rollback`,
    /// `canary_passed`, `crash`, `app_stopped`, `log_dropped`, supervisor
    /// events, `sandbox_created`, `sandbox_deleted` …
    pub kind: String,
    /// Details, as the sandbox recorded them.
    pub detail: Value,
}

/// Which events a reader wants: one sandbox and/or some kinds (empty: all).
///
/// ```
/// let f = graft_http::EventFilter { sandbox: Some("app".into()), kinds: vec!["crash".into()] };
/// assert!(!f.kinds.is_empty());
/// ```
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Only this sandbox's events.
    pub sandbox: Option<String>,
    /// Only these kinds (empty: every kind).
    pub kinds: Vec<String>,
}

impl EventFilter {
    /// Whether `e` passes the filter.
    pub fn matches(&self, e: &NodeEvent) -> bool {
        self.sandbox.as_deref().is_none_or(|s| s == e.sandbox)
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| *k == e.kind))
    }
}

/// Events that may have been lost: those with `after < seq <= up_to`.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct EventGap {
    /// The last event the reader had.
    pub after: u64,
    /// The last event that may be missing.
    pub up_to: u64,
}

/// One page of events after a position.
#[derive(Clone, Debug, Default)]
pub struct EventPage {
    /// Matching events, oldest first.
    pub events: Vec<NodeEvent>,
    /// Set when events the reader asked for may have been lost.
    pub gap: Option<EventGap>,
}

/// Where the stream and the metrics read node events from.
pub trait EventSource: Send + Sync + 'static {
    /// Up to `limit` events with `seq > after` matching `filter`.
    fn events_after(&self, after: u64, filter: &EventFilter, limit: usize) -> EventPage;
    /// The highest readable `seq`, updated as events arrive.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// The feed's ring and the per-sandbox read positions.
#[derive(Default)]
struct Ring {
    events: VecDeque<NodeEvent>,
    /// The highest `seq` handed out.
    last: u64,
}

impl Ring {
    fn push(&mut self, sandbox: &str, at_ms: f64, kind: &str, detail: Value) -> NodeEvent {
        self.last += 1;
        let e = NodeEvent {
            seq: self.last,
            sandbox: sandbox.to_owned(),
            at_ms,
            kind: kind.to_owned(),
            detail,
        };
        while self.events.len() >= KEEP_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e.clone());
        e
    }

    fn page(&self, after: u64, filter: &EventFilter, limit: usize) -> EventPage {
        let first = self.events.front().map_or(self.last + 1, |e| e.seq);
        let gap = (after + 1 < first && after < self.last).then_some(EventGap {
            after,
            up_to: first - 1,
        });
        // `seq`s are dense in the ring, so the start is an index.
        let start =
            usize::try_from(after.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
        let events = self
            .events
            .iter()
            .skip(start)
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect();
        EventPage { events, gap }
    }
}

/// What the poller remembers of one sandbox: the last event it read.
#[derive(Clone, Copy)]
struct Cursor {
    seq: u64,
    at_ms: f64,
}

/// The in-process feed: polls every sandbox's event log and merges it.
pub struct Feed {
    ring: Mutex<Ring>,
    tx: watch::Sender<u64>,
    cursors: Mutex<HashMap<String, Cursor>>,
    listeners: Mutex<Vec<Box<dyn Fn(&NodeEvent) + Send + Sync>>>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            ring: Mutex::default(),
            tx: watch::channel(0).0,
            cursors: Mutex::default(),
            listeners: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data; keep serving it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Feed {
    /// Calls `f` for every event as it enters the feed (the metrics count
    /// reloads and crashes this way, off any sandbox's thread).
    pub fn on_event(&self, f: impl Fn(&NodeEvent) + Send + Sync + 'static) {
        lock(&self.listeners).push(Box::new(f));
    }

    /// Appends an event (used by the poller, and by tests as a fake node).
    pub fn push(&self, sandbox: &str, at_ms: f64, kind: &str, detail: Value) -> u64 {
        let e = lock(&self.ring).push(sandbox, at_ms, kind, detail);
        for f in lock(&self.listeners).iter() {
            f(&e);
        }
        self.tx.send_replace(e.seq);
        e.seq
    }

    /// One poll round: new events of every sandbox, in each sandbox's order;
    /// `sandbox_created`/`sandbox_deleted` for ids that came and went.
    pub async fn poll(&self, node: &Node) {
        let ids = node.sandbox_ids();
        let known: Vec<String> = lock(&self.cursors).keys().cloned().collect();
        for gone in known.iter().filter(|k| !ids.contains(k)) {
            lock(&self.cursors).remove(gone);
            self.push(gone, graft_now(), "sandbox_deleted", json!({}));
        }
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let Ok(sb) = node.sandbox(&id) else { continue };
            let cursor = lock(&self.cursors).get(&id).copied();
            set.spawn(async move {
                // One event before the cursor too: if it is not the one we
                // read, the sandbox's log restarted or evicted past us.
                let from = cursor.map_or(0, |c| c.seq.saturating_sub(1));
                let got = tokio::time::timeout(POLL_TIMEOUT, sb.events_since(from)).await;
                (id, cursor, got)
            });
        }
        while let Some(joined) = set.join_next().await {
            let Ok((id, cursor, got)) = joined else {
                continue;
            };
            let Ok(Ok(events)) = got else { continue };
            self.merge(&id, cursor, events);
        }
    }

    fn merge(&self, id: &str, cursor: Option<Cursor>, events: Vec<graft::Event>) {
        let mut fresh = events.as_slice();
        match cursor {
            None => {
                self.push(id, graft_now(), "sandbox_created", json!({}));
            }
            Some(c) => {
                let same = |e: &graft::Event| e.seq == c.seq && e.at_ms == c.at_ms;
                match events.iter().position(same) {
                    Some(i) => fresh = &events[i + 1..],
                    None if c.seq > 0 && events.iter().any(|e| e.seq >= c.seq) => {
                        // The sandbox's log restarted (a restart) or dropped
                        // events we had not read: read it from its start.
                        // Said as an event of its own, so no reader misses it.
                        self.push(id, graft_now(), "events_lost", json!({ "reason": "the sandbox's event log restarted or dropped events before they were read" }));
                    }
                    None if c.seq > 0 && events.is_empty() => {
                        // Shorter than before: restarted; nothing new yet.
                        lock(&self.cursors).insert(id.to_owned(), Cursor { seq: 0, at_ms: 0.0 });
                        return;
                    }
                    None => {}
                }
            }
        }
        for e in fresh {
            self.push(id, e.at_ms, &e.kind, e.detail.clone());
        }
        let last = events
            .last()
            .map_or(cursor.unwrap_or(Cursor { seq: 0, at_ms: 0.0 }), |e| {
                Cursor {
                    seq: e.seq,
                    at_ms: e.at_ms,
                }
            });
        lock(&self.cursors).insert(id.to_owned(), last);
    }

    /// Polls `node` every [`POLL_INTERVAL`] until the feed is dropped.
    pub fn spawn_poller(self: &Arc<Self>, node: Node) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(feed) = weak.upgrade() else { return };
                feed.poll(&node).await;
            }
        });
    }
}

fn graft_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

impl EventSource for Feed {
    fn events_after(&self, after: u64, filter: &EventFilter, limit: usize) -> EventPage {
        lock(&self.ring).page(after, filter, limit)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_filter_and_report_pruned_events_as_a_gap() {
        let feed = Feed::default();
        for i in 0..(KEEP_EVENTS + 5) {
            let sb = if i % 2 == 0 { "a" } else { "b" };
            feed.push(sb, 0.0, "reload", json!({ "i": i }));
        }
        let all = EventFilter::default();
        let page = feed.events_after(0, &all, 3);
        assert_eq!(page.gap, Some(EventGap { after: 0, up_to: 5 }));
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![6, 7, 8]
        );
        let page = feed.events_after(10, &all, 2);
        assert_eq!(page.gap, None);
        assert_eq!(page.events[0].seq, 11);
        let only_a = EventFilter {
            sandbox: Some("a".into()),
            kinds: vec![],
        };
        let page = feed.events_after(10, &only_a, 2);
        assert!(page.events.iter().all(|e| e.sandbox == "a"));
        assert_eq!(page.events[0].seq, 11);
        let last = lock(&feed.ring).last;
        let none = feed.events_after(last, &all, 10);
        assert!(none.events.is_empty() && none.gap.is_none());
        assert_eq!(*feed.subscribe().borrow(), (KEEP_EVENTS + 5) as u64);
    }
}
