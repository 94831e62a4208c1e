//! The node's event log as its handle shows it: pages of events and a
//! watermark to wait on.
//!
//! Invariant: both answer from the node-wide log
//! ([`EventLog`](crate::events::EventLog)), so a reader sees the same
//! numbering whether it reads the node or one sandbox, and resumes from the
//! last `seq` it saw.

use super::Node;

impl Node {
    /// Events of the whole node with `seq > after` that match `filter`,
    /// oldest first, at most `limit`; `gap` says whether some were dropped
    /// before this reader saw them (each sandbox keeps its newest
    /// `max_events`). Sequence numbers are node-wide, durable and never
    /// reused, so a reader resumes from the last `seq` it saw.
    ///
    /// ```
    /// use graft::{EventFilter, Node, SandboxSpec};
    /// let node = Node::new();
    /// graft::block_on(node.create_sandbox(SandboxSpec::new("ev").entry(None).module("m", "return {}"))).unwrap();
    /// let page = node.events_after(0, &EventFilter::default().sandbox("ev"), 100);
    /// assert!(page.gap.is_none());
    /// assert!(page.events.iter().all(|e| e.sandbox == "ev"));
    /// ```
    pub fn events_after(
        &self,
        after: u64,
        filter: &crate::EventFilter,
        limit: usize,
    ) -> crate::EventPage {
        self.inner.events.read(after, filter, limit)
    }

    /// How many events of each kind each live sandbox has logged since the
    /// node opened its event log, pruned ones included (see
    /// [`EventCount`](crate::EventCount)): for counters that must not miss
    /// a burst that outran the log's retention.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// graft::block_on(node.create_sandbox(SandboxSpec::new("ev").entry(None).module("m", "return {}"))).unwrap();
    /// let created = node.event_counts().into_iter()
    ///     .find(|c| c.sandbox == "ev" && c.kind == "sandbox_created")
    ///     .map(|c| c.count);
    /// assert_eq!(created, Some(1));
    /// ```
    pub fn event_counts(&self) -> Vec<crate::EventCount> {
        self.inner.events.counts()
    }

    /// The highest event number readable now. Never below a `seq` or a
    /// page's `through` that a read has already returned, which
    /// [`subscribe_events`](Self::subscribe_events)' value may briefly be
    /// (it is raised just after the log's lock is let go): compare a
    /// reader's position with this to tell whether it is past the newest
    /// event.
    ///
    /// ```
    /// use graft::{EventFilter, Node, SandboxSpec};
    /// let node = Node::new();
    /// graft::block_on(node.create_sandbox(SandboxSpec::new("ev").entry(None).module("m", "return {}"))).unwrap();
    /// let page = node.events_after(0, &EventFilter::default(), 100);
    /// assert!(node.newest_event_seq() >= page.through);
    /// ```
    pub fn newest_event_seq(&self) -> u64 {
        self.inner.events.visible()
    }

    /// The highest event number readers can see, updated whenever it moves:
    /// wait on it, then read with [`events_after`](Self::events_after).
    /// Every event at or below it is readable (and durable, with a store).
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.events.subscribe()
    }
}
