//! The node's event log: every event of every sandbox, numbered node-wide.
//!
//! An event (a reload, a crash, a canary verdict …) gets the next sequence
//! number of its node when it happens. With a [`Store`] the event is written
//! to the database by a pump thread (many events per transaction); events of
//! a commit point (a reload's `reload` event) are written by the commit's own
//! transaction instead ([`EventLog::reserve`] / [`EventLog::publish`]).
//!
//! # Invariants
//! * **A number shown is never given to another event, also across
//!   restarts.** Shown means an event's `seq`, the visible watermark
//!   ([`EventLog::subscribe`], `last_seq` of the API) or a gap's `up_to`.
//!   With a store, nothing is shown above the highest number on disk, and a
//!   restarted node numbers on from the highest number the database ever
//!   held (SQLite's `AUTOINCREMENT` counter, kept through pruning). So a
//!   number given while the store was failing (an event not written, a
//!   commit that failed) is shown to no one, and a restart may give it again.
//! * Readers see an event only once it is durable (with a store) and only
//!   once every event with a lower number is visible too: the *visible*
//!   watermark never passes a number still being written, or one whose
//!   write failed and is being retried. So a reader that resumes after `seq`
//!   never misses an event that is later shown with a lower number, and a
//!   `kill -9` never takes back an event a reader saw.
//! * A resuming reader that may have missed events is told by a gap: events
//!   pruned from memory, numbers the database no longer holds after a
//!   restart, and events given up after failing to be written
//!   ([`MAX_UNWRITTEN`]) all count as dropped.
//! * Memory is bounded: each sandbox keeps its newest `max_events` events;
//!   a deleted sandbox's events stay readable until [`MAX_DELETED_KEPT`]
//!   newer deletions push them out. What was dropped is remembered as a
//!   number (`pruned_through`), which is how a reader learns of a gap.
//! * The database keeps the same: the deletion that pushes a deleted
//!   sandbox out of the kept ones deletes its events in the deletion's own
//!   transaction ([`EventLog::deletion_prunes`]), so create/delete churn does
//!   not grow the file. After a restart, every number at or below the last
//!   one given that the database no longer holds counts as dropped (an
//!   event pruned, or a number whose write never landed), so a reader
//!   resuming from before it is told of the gap rather than skipping it.
//! * Appending never blocks on the disk and never fails: a write that fails
//!   (disk full, read-only) is logged and retried with a backoff
//!   ([`RETRY_MAX`]) until the store takes it; meanwhile those events and
//!   every later one wait, unseen, and appear in order once written. At most
//!   [`MAX_UNWRITTEN`] wait (the oldest beyond are dropped, as a gap); what
//!   still waits when the node stops is lost, never shown. The commit
//!   points that must be durable write synchronously.
//! * Nothing here runs guest code or holds a sandbox's VM.
//!
//! # Files
//! This file holds the public types (what a reader gets); `log.rs` the
//! [`EventLog`] (numbering, visibility, reading); `buckets.rs` the per-sandbox
//! memory and the watermark arithmetic; `pump.rs` the thread that writes
//! events to the store.

use serde::Serialize;
use serde_json::Value as Json;

mod buckets;
mod log;
mod pump;
#[cfg(test)]
mod tests;

pub(crate) use log::EventLog;

/// Deleted sandboxes whose events stay readable in memory.
pub const MAX_DELETED_KEPT: usize = 16;

/// Events a pump transaction writes at most.
const PUMP_BATCH: usize = 1024;

/// Events kept waiting for a failing store at most; the oldest beyond are
/// dropped (readers learn of them as a gap).
pub const MAX_UNWRITTEN: usize = 16_384;

/// The longest wait between two tries of a failed event write.
pub const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// The first wait after a failed event write (doubled up to [`RETRY_MAX`]).
const RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(50);

/// One event of the node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeEvent {
    /// Node-wide sequence number (1, 2, 3 …, never reused, also across
    /// restarts of a durable node).
    pub seq: u64,
    /// The sandbox it belongs to.
    pub sandbox: String,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: f64,
    /// `reload`, `unchanged`, `abort`, `rollback`, `canary_passed`,
    /// `canary_rollback`, `crash`, `restart`, `sandbox_created` …
    pub kind: String,
    /// Details (module, versions, timings, reason …).
    pub detail: Json,
}

/// Which events a reader wants.
///
/// ```
/// let f = graft::EventFilter::default().sandbox("shop").kind("crash");
/// assert_eq!(f.sandbox.as_deref(), Some("shop"));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct EventFilter {
    /// Only this sandbox's events (`None`: all).
    pub sandbox: Option<String>,
    /// Only these kinds (empty: all).
    pub kinds: Vec<String>,
}

impl EventFilter {
    /// Only `id`'s events.
    pub fn sandbox(mut self, id: impl Into<String>) -> EventFilter {
        self.sandbox = Some(id.into());
        self
    }

    /// Also events of `kind` (the first call narrows to that kind).
    pub fn kind(mut self, kind: impl Into<String>) -> EventFilter {
        self.kinds.push(kind.into());
        self
    }

    fn matches(&self, e: &NodeEvent) -> bool {
        self.sandbox.as_deref().is_none_or(|s| s == e.sandbox)
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
    }
}

/// Events a read examines and rejects at most (a `kind` filter over a long
/// log) before it answers with what it found: the log's lock is held while
/// reading, so a filter that matches nothing must not walk every kept event
/// at once. A reader resumes after [`EventPage::through`].
pub const MAX_SCAN: usize = 4_096;

/// How many events of one kind a sandbox has logged since the node opened
/// its log (the kept events it restored from its data dir included), also
/// those pruned since: what a counter (Prometheus' `graft_reloads_total`,
/// `graft_process_crashes_total`) reads, so that a burst of events that
/// outruns the log's retention is still counted. See
/// [`Node::event_counts`](crate::Node::event_counts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EventCount {
    /// The sandbox.
    pub sandbox: String,
    /// The event kind (`reload`, `crash`, …).
    pub kind: String,
    /// Events of that kind.
    pub count: u64,
}

/// Events after a point, and whether some were dropped before they were read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EventPage {
    /// Matching events, oldest first.
    pub events: Vec<NodeEvent>,
    /// Set when events with `after < seq <= up_to` were dropped (each
    /// sandbox keeps its newest `max_events`): some of them may have matched.
    pub gap: Option<EventGap>,
    /// Where to resume: every matching event with `seq <= through` is in
    /// `events` or inside `gap`. It is below the visible watermark when the
    /// page stopped early (its `limit`, or [`MAX_SCAN`] rejected events);
    /// read again from here. Never below the `after` asked for.
    pub through: u64,
}

/// A range of sequence numbers a reader can no longer read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EventGap {
    /// The reader's position.
    pub after: u64,
    /// The newest dropped sequence number.
    pub up_to: u64,
}
