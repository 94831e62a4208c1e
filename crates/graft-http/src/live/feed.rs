//! Where node events are read from: the node's own durable event log
//! ([`graft::Node::events_after`], [`graft::Node::subscribe_events`]) behind
//! one small trait, [`EventSource`], so the stream, the metrics and the
//! supervision tree can also run on an in-memory [`Feed`] (tests use it as
//! a fake node: it can be made to prune events at will).
//!
//! Invariants every source keeps:
//! * readers never touch a sandbox: they read the log and wait on a `watch`
//!   channel, so a slow or stalled client cannot delay a sandbox;
//! * `seq` is strictly increasing and every event with `seq <=` the value
//!   published on the watch channel is readable until it is pruned;
//! * when events a reader asked for may have been lost, the page says so
//!   with an [`EventGap`], never silently.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use graft::Node;
use serde_json::Value;
use tokio::sync::watch;

pub use graft::{EventFilter, EventGap, EventPage, NodeEvent};

/// Events an in-memory [`Feed`] keeps.
pub const KEEP_EVENTS: usize = 10_000;

/// Whether `e` passes `filter` (the library keeps its own check private).
pub fn matches(filter: &EventFilter, e: &NodeEvent) -> bool {
    filter.sandbox.as_deref().is_none_or(|s| s == e.sandbox)
        && (filter.kinds.is_empty() || filter.kinds.contains(&e.kind))
}

/// Where the stream and the metrics read node events from.
pub trait EventSource: Send + Sync + 'static {
    /// Up to `limit` events with `seq > after` matching `filter`.
    fn events_after(&self, after: u64, filter: &EventFilter, limit: usize) -> EventPage;
    /// The highest readable `seq`, updated as events arrive.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// The highest readable `seq` now, never below one a read returned
    /// (a source whose watch value may lag its reads overrides this).
    fn newest(&self) -> u64 {
        *self.subscribe().borrow()
    }
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
        let gap = (after.saturating_add(1) < first && after < self.last).then_some(EventGap {
            after,
            up_to: first - 1,
        });
        // `seq`s are dense in the ring, so the start is an index.
        let start =
            usize::try_from(after.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
        let mut events = Vec::new();
        let mut through = if limit == 0 {
            after
        } else {
            self.last.max(after)
        };
        let mut rejected = 0;
        let scan = if limit == 0 { 0 } else { usize::MAX };
        for e in self.events.iter().skip(start).take(scan) {
            if matches(filter, e) {
                events.push(e.clone());
            } else {
                rejected += 1;
            }
            if events.len() >= limit || rejected >= graft::MAX_SCAN {
                through = e.seq;
                break;
            }
        }
        EventPage {
            events,
            gap,
            through,
        }
    }
}

/// An in-memory event log: a fake node for tests, and a source for an
/// embedding that has no node log to read.
pub struct Feed {
    ring: Mutex<Ring>,
    tx: watch::Sender<u64>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            ring: Mutex::default(),
            tx: watch::channel(0).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data; keep serving it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Feed {
    /// Appends an event; answers its seq.
    ///
    /// ```
    /// use graft_http::EventSource;
    /// let feed = graft_http::live::feed::Feed::default();
    /// let seq = feed.push("app", 0.0, "reload", serde_json::json!({}));
    /// assert_eq!(feed.events_after(0, &Default::default(), 10).events[0].seq, seq);
    /// ```
    pub fn push(&self, sandbox: &str, at_ms: f64, kind: &str, detail: Value) -> u64 {
        let seq = lock(&self.ring).push(sandbox, at_ms, kind, detail).seq;
        self.tx.send_replace(seq);
        seq
    }
}

/// A source whose readers are woken by one task of the API's runtime rather
/// than by whoever logged the event: the node logs events on the thread of
/// the sandbox that made them (a reload, a crash), and waking a hundred
/// event streams from there is work taken from that sandbox. The relay
/// task takes one wake-up from the node and passes it on to every reader
/// from a worker thread of the API's own runtime.
///
/// Invariant: the value readers see never runs ahead of the inner source's
/// (the relay copies it), so every event up to it is readable.
pub struct Relay {
    inner: std::sync::Arc<dyn EventSource>,
    tx: watch::Sender<u64>,
}

impl Relay {
    /// Relays `inner`; the relay task starts with [`Relay::run`].
    pub fn new(inner: std::sync::Arc<dyn EventSource>) -> Relay {
        let head = *inner.subscribe().borrow();
        Relay {
            inner,
            tx: watch::channel(head).0,
        }
    }

    /// The inner source's highest readable `seq` now (the relayed value
    /// may lag it by a wake-up, the inner watch by a lock release).
    pub fn head(&self) -> u64 {
        self.inner.newest()
    }

    /// The relay task: passes every change of the inner source on until the
    /// inner source closes, the relay is dropped (`relay` is weak, so the
    /// task does not keep it alive) or `closed` fires (the API's live parts
    /// were dropped: the task must not wait for the next event to end).
    pub async fn run(relay: std::sync::Weak<Relay>, mut closed: watch::Receiver<()>) {
        let Some(mut rx) = relay.upgrade().map(|r| r.inner.subscribe()) else {
            return;
        };
        loop {
            let head = *rx.borrow_and_update();
            match relay.upgrade() {
                Some(r) => {
                    r.tx.send_if_modified(|v| (head > *v).then(|| *v = head).is_some());
                }
                None => return,
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = closed.changed() => return,
            }
        }
    }
}

impl EventSource for Relay {
    fn events_after(&self, after: u64, filter: &EventFilter, limit: usize) -> EventPage {
        self.inner.events_after(after, filter, limit)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    fn newest(&self) -> u64 {
        self.head()
    }
}

/// The node's own event log.
impl EventSource for Node {
    fn events_after(&self, after: u64, filter: &EventFilter, limit: usize) -> EventPage {
        Node::events_after(self, after, filter, limit)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.subscribe_events()
    }

    fn newest(&self) -> u64 {
        self.newest_event_seq()
    }
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
    use serde_json::json;

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
        let only_a = EventFilter::default().sandbox("a");
        let page = feed.events_after(10, &only_a, 2);
        assert!(page.events.iter().all(|e| e.sandbox == "a"));
        assert_eq!(page.events[0].seq, 11);
        let last = lock(&feed.ring).last;
        let none = feed.events_after(last, &all, 10);
        assert!(none.events.is_empty() && none.gap.is_none());
        assert_eq!(*feed.subscribe().borrow(), (KEEP_EVENTS + 5) as u64);
    }
}
