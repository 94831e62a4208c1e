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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value as Json;

use crate::store::{NewEvent, Store, StoreError, WriteOp};

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

/// What the pump thread is sent.
enum PumpMsg {
    /// An event to write.
    Event(NodeEvent),
    /// A commit just succeeded: the store takes writes again, so events
    /// waiting for it are tried now rather than after the backoff.
    Retry,
}

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

/// Events after a point, and whether some were dropped before they were read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EventPage {
    /// Matching events, oldest first.
    pub events: Vec<NodeEvent>,
    /// Set when events with `after < seq <= up_to` were dropped (each
    /// sandbox keeps its newest `max_events`): some of them may have matched.
    pub gap: Option<EventGap>,
}

/// A range of sequence numbers a reader can no longer read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EventGap {
    /// The reader's position.
    pub after: u64,
    /// The newest dropped sequence number.
    pub up_to: u64,
}

/// One sandbox's kept events, as sequence numbers (the events themselves
/// are in `LogState::by_seq`).
#[derive(Default)]
struct Bucket {
    seqs: VecDeque<u64>,
    /// The newest sequence number dropped from this bucket (0: none).
    pruned_through: u64,
}

struct LogState {
    next_seq: u64,
    /// Numbered, not yet durable (nor tried).
    pending: BTreeSet<u64>,
    /// Numbered, written without success, being retried by the pump.
    failed: BTreeSet<u64>,
    /// The highest number known to be on disk (with a store): nothing above
    /// it is shown, so a restart never gives a shown number again.
    durable: u64,
    /// Whether a store bounds what is shown (`durable`).
    stored: bool,
    /// Durable, waiting for a lower pending number to become durable.
    staged: BTreeMap<u64, NodeEvent>,
    visible: u64,
    by_seq: BTreeMap<u64, NodeEvent>,
    buckets: HashMap<String, Bucket>,
    /// Deleted sandboxes whose buckets are still kept, oldest first.
    deleted: VecDeque<String>,
    /// The newest sequence number dropped from any bucket (0: none).
    pruned_through: u64,
}

/// The node's event log (see the module docs).
pub(crate) struct EventLog {
    state: Mutex<LogState>,
    visible_tx: tokio::sync::watch::Sender<u64>,
    /// Every number at or below it is visible or was tried and failed:
    /// what [`EventLog::settle`] waits for (a failing store does not hold
    /// it up).
    settled_tx: tokio::sync::watch::Sender<u64>,
    store: Option<Arc<Store>>,
    pump: Mutex<Option<mpsc::Sender<PumpMsg>>>,
    pump_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    max_per_sandbox: usize,
}

impl EventLog {
    /// A log kept in memory only.
    pub fn in_memory(max_per_sandbox: usize) -> Arc<EventLog> {
        Arc::new(EventLog::new(max_per_sandbox, None, Vec::new(), 0))
    }

    /// A log written to `store`, starting from the events it holds.
    pub fn durable(max_per_sandbox: usize, store: Arc<Store>) -> crate::Result<Arc<EventLog>> {
        let last = store.last_event_seq()?;
        let kept = store.events_since(0, None, usize::MAX)?;
        let restored = kept
            .into_iter()
            .map(|r| NodeEvent {
                seq: r.seq,
                sandbox: r.sandbox.unwrap_or_default(),
                at_ms: r.at_ms,
                kind: r.kind,
                detail: serde_json::from_str(&r.payload_json).unwrap_or(Json::Null),
            })
            .collect();
        let log = Arc::new(EventLog::new(
            max_per_sandbox,
            Some(store.clone()),
            restored,
            last,
        ));
        let (tx, rx) = mpsc::channel();
        let weak = Arc::downgrade(&log);
        let path = store.path().to_path_buf();
        let thread = std::thread::Builder::new()
            .name("graft-events".into())
            .spawn(move || pump(rx, store, weak))
            .map_err(|source| crate::store::StoreError::Io {
                what: "start the event writer thread",
                path,
                source,
            })?;
        *log.pump.lock() = Some(tx);
        *log.pump_thread.lock() = Some(thread);
        Ok(log)
    }

    fn new(
        max_per_sandbox: usize,
        store: Option<Arc<Store>>,
        restored: Vec<NodeEvent>,
        last_seq: u64,
    ) -> EventLog {
        let mut state = LogState {
            next_seq: last_seq + 1,
            pending: BTreeSet::new(),
            failed: BTreeSet::new(),
            durable: last_seq,
            stored: store.is_some(),
            staged: BTreeMap::new(),
            visible: last_seq,
            by_seq: BTreeMap::new(),
            buckets: HashMap::new(),
            deleted: VecDeque::new(),
            pruned_through: 0,
        };
        let max = max_per_sandbox.max(1);
        // Numbers missing from the database were dropped (pruned, or never
        // written): a reader from before one of them fell into a gap. For a
        // sandbox, the dropped numbers below its oldest kept event may have
        // been its own (per-sandbox pruning drops the oldest first).
        let mut expected = 1;
        let mut missing_through = 0;
        for e in restored {
            if e.seq > expected {
                missing_through = e.seq - 1;
            }
            expected = e.seq + 1;
            if !state.buckets.contains_key(&e.sandbox) {
                state
                    .buckets
                    .entry(e.sandbox.clone())
                    .or_default()
                    .pruned_through = missing_through;
            }
            state.insert(e, max);
        }
        if last_seq >= expected {
            missing_through = last_seq;
        }
        state.pruned_through = state.pruned_through.max(missing_through);
        let (visible_tx, _) = tokio::sync::watch::channel(last_seq);
        let (settled_tx, _) = tokio::sync::watch::channel(last_seq);
        EventLog {
            state: Mutex::new(state),
            visible_tx,
            settled_tx,
            store,
            pump: Mutex::new(None),
            pump_thread: Mutex::new(None),
            max_per_sandbox: max,
        }
    }

    /// Records an event of `sandbox`: readable at once without a store,
    /// within a pump transaction with one.
    pub fn append(&self, sandbox: &str, kind: &str, detail: Json) {
        let event = self.reserve(sandbox, kind, detail);
        let queued = match self.pump.lock().as_ref() {
            Some(tx) => tx.send(PumpMsg::Event(event.clone())).is_ok(),
            None => false,
        };
        if !queued {
            self.publish(vec![event]);
        }
    }

    /// Numbers an event that the caller writes in its own transaction (a
    /// commit point). The caller must then [`publish`](Self::publish) it,
    /// or [`abandon`](Self::abandon) it if the transaction failed; until
    /// then no later event becomes visible.
    pub fn reserve(&self, sandbox: &str, kind: &str, detail: Json) -> NodeEvent {
        let mut st = self.state.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        st.pending.insert(seq);
        NodeEvent {
            seq,
            sandbox: sandbox.to_owned(),
            at_ms: crate::clock::unix_ms(),
            kind: kind.to_owned(),
            detail,
        }
    }

    /// The store row of a reserved event, for the caller's transaction.
    pub fn write_op(event: &NodeEvent) -> WriteOp {
        WriteOp::AppendEvent(NewEvent {
            seq: Some(event.seq),
            sandbox: Some(event.sandbox.clone()),
            kind: event.kind.clone(),
            payload_json: event.detail.to_string(),
            at_ms: event.at_ms,
        })
    }

    /// Writes `ops` and the event in one transaction (a commit point: a
    /// reload, a canary verdict, a sandbox created), then makes the event
    /// readable. Without a store the event is recorded and `ops` dropped.
    /// On a failed write nothing is stored and the event is never shown.
    pub fn commit(
        &self,
        sandbox: &str,
        ops: Vec<WriteOp>,
        kind: &str,
        detail: Json,
    ) -> Result<u64, StoreError> {
        self.commit_with(sandbox, ops, kind, detail, None)
    }

    /// [`EventLog::commit`] that also commits the operations of `attached`
    /// (an audit row) in the same transaction, when they are for this log's
    /// store ([`crate::store::Attached`]).
    pub fn commit_with(
        &self,
        sandbox: &str,
        mut ops: Vec<WriteOp>,
        kind: &str,
        detail: Json,
        attached: Option<&crate::store::Attached>,
    ) -> Result<u64, StoreError> {
        let event = self.reserve(sandbox, kind, detail);
        if let Some(store) = &self.store {
            ops.push(EventLog::write_op(&event));
            if let Err(e) = store.write_attached(ops, attached) {
                self.abandon(event.seq);
                return Err(e);
            }
            // This event is shown only after the waiting ones: have them
            // tried now.
            if !self.state.lock().failed.is_empty() {
                if let Some(tx) = self.pump.lock().as_ref() {
                    let _ = tx.send(PumpMsg::Retry);
                }
            }
        }
        let seq = event.seq;
        self.publish(vec![event]);
        Ok(seq)
    }

    /// The database events are written to, if any.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Makes durable events readable (in number order).
    pub fn publish(&self, events: Vec<NodeEvent>) {
        self.update(|st| {
            for e in events {
                st.pending.remove(&e.seq);
                st.failed.remove(&e.seq);
                st.durable = st.durable.max(e.seq);
                st.staged.insert(e.seq, e);
            }
        });
    }

    /// Gives up a reserved number whose transaction failed. The number is
    /// never shown: the watermark passes it only once a later number is on
    /// disk (a restart numbers on from there).
    pub fn abandon(&self, seq: u64) {
        self.update(|st| {
            st.pending.remove(&seq);
        });
    }

    /// The pump could not write these events: they stay unseen (and hold
    /// back later ones) while it retries.
    fn write_failed(&self, seqs: impl Iterator<Item = u64>) {
        self.update(|st| {
            for seq in seqs {
                if st.pending.remove(&seq) {
                    st.failed.insert(seq);
                }
            }
        });
    }

    /// The pump gave up these events (never written, never shown): readers
    /// that may have wanted them are told by a gap once later events show.
    fn write_abandoned(&self, events: &[NodeEvent]) {
        self.update(|st| {
            for e in events {
                st.pending.remove(&e.seq);
                st.failed.remove(&e.seq);
                let bucket = st.buckets.entry(e.sandbox.clone()).or_default();
                bucket.pruned_through = bucket.pruned_through.max(e.seq);
                st.pruned_through = st.pruned_through.max(e.seq);
            }
        });
    }

    fn update(&self, change: impl FnOnce(&mut LogState)) {
        let (visible, settled) = {
            let mut st = self.state.lock();
            change(&mut st);
            let visible = st.advance(self.max_per_sandbox);
            (visible, st.settled())
        };
        self.visible_tx.send_replace(visible);
        self.settled_tx.send_replace(settled);
    }

    /// The highest number readers may see.
    #[cfg(test)]
    pub fn visible(&self) -> u64 {
        self.state.lock().visible
    }

    /// The highest number given so far.
    pub fn last_assigned(&self) -> u64 {
        self.state.lock().next_seq - 1
    }

    /// Notified with the visible watermark whenever it moves.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.visible_tx.subscribe()
    }

    /// Waits (async) until every event numbered before this call is visible,
    /// or was tried and waits for a failing store (it stays unseen then).
    pub async fn settle(&self) {
        let target = self.last_assigned();
        let mut rx = self.settled_tx.subscribe();
        // The sender lives as long as `self`, so `wait_for` ends.
        let _ = rx.wait_for(|v| *v >= target).await;
    }

    /// Visible events matching `filter` with `seq > after`, oldest first, at
    /// most `limit`, and the gap the reader fell into, if any.
    pub fn read(&self, after: u64, filter: &EventFilter, limit: usize) -> EventPage {
        let st = self.state.lock();
        // A dropped number above the watermark is not shown yet (an event
        // given up unwritten): the gap reaches it once later ones show.
        let pruned = match &filter.sandbox {
            // A sandbox without a bucket may have had one that was dropped:
            // assume the worst.
            Some(id) => st
                .buckets
                .get(id)
                .map_or(st.pruned_through, |b| b.pruned_through),
            None => st.pruned_through,
        }
        .min(st.visible);
        let gap = (pruned > after).then_some(EventGap {
            after,
            up_to: pruned,
        });
        let mut events = Vec::new();
        if after < st.visible && limit > 0 {
            match filter.sandbox.as_ref().and_then(|id| st.buckets.get(id)) {
                // One sandbox: walk its own numbers, not every event.
                Some(bucket) => {
                    let start = bucket.seqs.partition_point(|s| *s <= after);
                    for seq in bucket.seqs.range(start..) {
                        if *seq > st.visible || events.len() >= limit {
                            break;
                        }
                        if let Some(e) = st.by_seq.get(seq).filter(|e| filter.matches(e)) {
                            events.push(e.clone());
                        }
                    }
                }
                None if filter.sandbox.is_some() => {}
                None => {
                    for e in st.by_seq.range(after + 1..=st.visible).map(|(_, e)| e) {
                        if events.len() >= limit {
                            break;
                        }
                        if filter.matches(e) {
                            events.push(e.clone());
                        }
                    }
                }
            }
        }
        EventPage { events, gap }
    }

    /// The deleted sandboxes whose events deleting `sandbox` pushes out of
    /// the kept ones (oldest first): the deletion's transaction deletes
    /// their events from the store too ([`WriteOp::DeleteEvents`]).
    pub fn deletion_prunes(&self, sandbox: &str) -> Vec<String> {
        let st = self.state.lock();
        let kept = st.deleted.iter().filter(|s| *s != sandbox).count() + 1;
        st.deleted
            .iter()
            .filter(|s| *s != sandbox)
            .take(kept.saturating_sub(MAX_DELETED_KEPT))
            .cloned()
            .collect()
    }

    /// Marks `sandbox` deleted: its events stay readable until
    /// [`MAX_DELETED_KEPT`] later deletions.
    pub fn sandbox_deleted(&self, sandbox: &str) {
        let mut st = self.state.lock();
        st.deleted.retain(|s| s != sandbox);
        st.deleted.push_back(sandbox.to_owned());
        while st.deleted.len() > MAX_DELETED_KEPT {
            if let Some(old) = st.deleted.pop_front() {
                st.drop_bucket(&old);
            }
        }
    }

    /// After a restart: every sandbox that has events in the log but is not
    /// in `live` (deleted before the restart, or not restorable) counts as
    /// deleted, the most recently active last, so only [`MAX_DELETED_KEPT`]
    /// of them stay in memory, as before the restart. Without this, every
    /// sandbox ever deleted would come back into memory at each start and
    /// stay there. Returns the sandboxes dropped from memory, whose events
    /// the caller deletes from the store (unless the sandbox is still stored).
    pub fn absent_are_deleted(&self, live: &HashSet<String>) -> Vec<String> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let mut absent: Vec<(u64, String)> = st
            .buckets
            .iter()
            .filter(|(id, _)| !id.is_empty() && !live.contains(*id) && !st.deleted.contains(id))
            .map(|(id, b)| (b.seqs.back().copied().unwrap_or(0), id.clone()))
            .collect();
        absent.sort_unstable();
        st.deleted.extend(absent.into_iter().map(|(_, id)| id));
        let mut dropped = Vec::new();
        while st.deleted.len() > MAX_DELETED_KEPT {
            if let Some(old) = st.deleted.pop_front() {
                st.drop_bucket(&old);
                dropped.push(old);
            }
        }
        dropped
    }

    /// Marks `sandbox` live again (a sandbox re-created with the same id
    /// continues its bucket).
    pub fn sandbox_created(&self, sandbox: &str) {
        self.state.lock().deleted.retain(|s| s != sandbox);
    }

    /// Stops the pump after it wrote what was queued.
    pub fn close(&self) {
        drop(self.pump.lock().take());
        if let Some(t) = self.pump_thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl LogState {
    /// Moves staged events up to the new watermark into the buckets.
    fn advance(&mut self, max: usize) -> u64 {
        let open = match (self.pending.first(), self.failed.first()) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        };
        let mut visible = open.map_or(self.next_seq - 1, |first| first - 1);
        if self.stored {
            visible = visible.min(self.durable);
        }
        // Never backwards: what was shown stays shown.
        let visible = visible.max(self.visible);
        while let Some(entry) = self.staged.first_entry() {
            if *entry.key() > visible {
                break;
            }
            let e = entry.remove();
            self.insert(e, max);
        }
        self.visible = visible;
        visible
    }

    /// Every number at or below this is visible, or was tried and failed.
    fn settled(&self) -> u64 {
        self.pending
            .first()
            .map_or(self.next_seq - 1, |first| first - 1)
    }

    fn insert(&mut self, e: NodeEvent, max: usize) {
        let bucket = self.buckets.entry(e.sandbox.clone()).or_default();
        bucket.seqs.push_back(e.seq);
        let mut dropped = Vec::new();
        while bucket.seqs.len() > max {
            if let Some(old) = bucket.seqs.pop_front() {
                bucket.pruned_through = bucket.pruned_through.max(old);
                dropped.push(old);
            }
        }
        for old in dropped {
            self.by_seq.remove(&old);
            self.pruned_through = self.pruned_through.max(old);
        }
        self.by_seq.insert(e.seq, e);
    }

    fn drop_bucket(&mut self, sandbox: &str) {
        if let Some(bucket) = self.buckets.remove(sandbox) {
            for seq in bucket.seqs {
                self.by_seq.remove(&seq);
                self.pruned_through = self.pruned_through.max(seq);
            }
        }
    }
}

/// The pump: writes queued events in batches, then publishes them. A batch
/// the store refuses is kept and tried again (with a backoff, together with
/// what came meanwhile) until it is written; see the module invariants.
fn pump(rx: mpsc::Receiver<PumpMsg>, store: Arc<Store>, log: std::sync::Weak<EventLog>) {
    let mut waiting: Vec<NodeEvent> = Vec::new();
    let mut delay = RETRY_MIN;
    let mut open = true;
    loop {
        let mut batch = std::mem::take(&mut waiting);
        if batch.is_empty() {
            match rx.recv() {
                Ok(PumpMsg::Event(e)) => batch.push(e),
                Ok(PumpMsg::Retry) => continue,
                Err(_) => return,
            }
        } else if open {
            // Retrying: wait out the backoff, taking new events meanwhile.
            let until = std::time::Instant::now() + delay;
            loop {
                let left = until.saturating_duration_since(std::time::Instant::now());
                match rx.recv_timeout(left) {
                    Ok(PumpMsg::Event(e)) => batch.push(e),
                    Ok(PumpMsg::Retry) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        let limit = batch.len() + PUMP_BATCH;
        while batch.len() < limit {
            match rx.try_recv() {
                Ok(PumpMsg::Event(e)) => batch.push(e),
                Ok(PumpMsg::Retry) => {}
                Err(_) => break,
            }
        }
        let ops = batch.iter().map(EventLog::write_op).collect();
        let result = store.write(ops);
        let Some(log) = log.upgrade() else { return };
        match result {
            Ok(_) => {
                if delay > RETRY_MIN {
                    tracing::info!(
                        events = batch.len(),
                        "storage: events written again; the waiting ones are now readable"
                    );
                }
                delay = RETRY_MIN;
                log.publish(batch);
            }
            Err(e) if !open => {
                tracing::error!(error = %e, events = batch.len(), "storage: events could not be written before the node stopped; they are lost (never shown)");
                log.write_abandoned(&batch);
                return;
            }
            Err(e) => {
                if delay == RETRY_MIN {
                    tracing::error!(error = %e, events = batch.len(), "storage: events could not be written; they wait unseen and are retried until the store takes them");
                }
                delay = (delay * 2).min(RETRY_MAX);
                log.write_failed(batch.iter().map(|e| e.seq));
                if batch.len() > MAX_UNWRITTEN {
                    let dropped: Vec<NodeEvent> =
                        batch.drain(..batch.len() - MAX_UNWRITTEN).collect();
                    tracing::error!(events = dropped.len(), "storage: too many events wait for the store; the oldest are dropped (readers see a gap)");
                    log.write_abandoned(&dropped);
                }
                waiting = batch;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(page: &EventPage) -> Vec<(u64, &str)> {
        page.events
            .iter()
            .map(|e| (e.seq, e.kind.as_str()))
            .collect()
    }

    #[test]
    fn a_reserved_event_holds_back_later_ones_until_published() {
        let log = EventLog::in_memory(10);
        log.append("a", "one", Json::Null);
        let held = log.reserve("a", "commit", Json::Null);
        log.append("a", "three", Json::Null);
        let all = EventFilter::default();
        assert_eq!(kinds(&log.read(0, &all, 100)), vec![(1, "one")]);
        assert_eq!(log.visible(), 1);
        log.publish(vec![held]);
        assert_eq!(
            kinds(&log.read(0, &all, 100)),
            vec![(1, "one"), (2, "commit"), (3, "three")]
        );
    }

    #[test]
    fn an_abandoned_number_is_skipped_and_never_shown() {
        let log = EventLog::in_memory(10);
        let held = log.reserve("a", "commit", Json::Null);
        log.append("a", "after", Json::Null);
        assert!(log.read(0, &EventFilter::default(), 10).events.is_empty());
        log.abandon(held.seq);
        assert_eq!(
            kinds(&log.read(0, &EventFilter::default(), 10)),
            vec![(2, "after")]
        );
    }

    #[test]
    fn each_sandbox_keeps_its_newest_events_and_readers_learn_of_the_gap() {
        let log = EventLog::in_memory(2);
        for i in 0..4 {
            log.append("a", &format!("a{i}"), Json::Null);
        }
        log.append("b", "b0", Json::Null);
        let a = EventFilter::default().sandbox("a");
        let page = log.read(0, &a, 10);
        assert_eq!(kinds(&page), vec![(3, "a2"), (4, "a3")]);
        assert_eq!(page.gap, Some(EventGap { after: 0, up_to: 2 }));
        // A reader already past the dropped ones has no gap.
        assert_eq!(log.read(2, &a, 10).gap, None);
        // `b` lost nothing.
        let b = log.read(0, &EventFilter::default().sandbox("b"), 10);
        assert_eq!((kinds(&b), b.gap), (vec![(5, "b0")], None));
        // The node-wide stream reports the gap too.
        assert_eq!(
            log.read(0, &EventFilter::default(), 10).gap,
            Some(EventGap { after: 0, up_to: 2 })
        );
    }

    #[test]
    fn filters_by_kind_and_limits_the_page() {
        let log = EventLog::in_memory(100);
        for kind in ["crash", "reload", "crash", "crash"] {
            log.append("a", kind, Json::Null);
        }
        let crashes = EventFilter::default().kind("crash");
        assert_eq!(
            kinds(&log.read(0, &crashes, 2)),
            vec![(1, "crash"), (3, "crash")]
        );
        assert_eq!(kinds(&log.read(3, &crashes, 2)), vec![(4, "crash")]);
        assert!(log
            .read(0, &EventFilter::default().sandbox("nope"), 10)
            .events
            .is_empty());
    }

    #[test]
    fn deleted_sandboxes_beyond_the_cap_are_forgotten() {
        let log = EventLog::in_memory(10);
        for i in 0..=MAX_DELETED_KEPT {
            let id = format!("s{i}");
            log.append(&id, "x", Json::Null);
            log.sandbox_deleted(&id);
        }
        let first = log.read(0, &EventFilter::default().sandbox("s0"), 10);
        assert!(first.events.is_empty());
        assert_eq!(first.gap, Some(EventGap { after: 0, up_to: 1 }));
        let last = format!("s{MAX_DELETED_KEPT}");
        assert_eq!(
            log.read(0, &EventFilter::default().sandbox(last), 10)
                .events
                .len(),
            1
        );
    }

    #[test]
    fn a_durable_log_survives_reopening_and_continues_the_numbers() {
        let dir = std::env::temp_dir().join(format!("graft-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("node.db");
        {
            let store = Arc::new(Store::open(&path).expect("open"));
            let log = EventLog::durable(10, store.clone()).expect("log");
            log.append("a", "one", Json::Null);
            let held = log.reserve("a", "commit", serde_json::json!({ "v": 2 }));
            store
                .write(vec![EventLog::write_op(&held)])
                .expect("commit");
            log.publish(vec![held]);
            crate::block_on(log.settle());
            assert_eq!(log.read(0, &EventFilter::default(), 10).events.len(), 2);
            log.close();
            store.close();
        }
        let store = Arc::new(Store::open(&path).expect("reopen"));
        let log = EventLog::durable(10, store.clone()).expect("log");
        let page = log.read(0, &EventFilter::default(), 10);
        assert_eq!(kinds(&page), vec![(1, "one"), (2, "commit")]);
        assert_eq!(page.events[1].detail, serde_json::json!({ "v": 2 }));
        log.append("a", "three", Json::Null);
        crate::block_on(log.settle());
        assert_eq!(log.read(2, &EventFilter::default(), 10).events[0].seq, 3);
        log.close();
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The bug this guards against: an event the store refused was shown
    /// from memory with a number the next start gave to another event, and
    /// a reader resuming from it missed that one without a gap.
    #[test]
    fn a_number_the_store_did_not_take_is_never_shown() {
        let dir = std::env::temp_dir().join(format!("graft-events-ro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("node.db");
        let all = EventFilter::default();
        {
            let store = Arc::new(Store::open(&path).expect("open"));
            let log = EventLog::durable(10, store.clone()).expect("log");
            log.append("a", "one", Json::Null);
            crate::block_on(log.settle());
            log.close();
            store.close();
        }
        {
            // Every write fails, as on a read-only or full disk.
            let store = Arc::new(Store::open_read_only(&path).expect("open read-only"));
            let log = EventLog::durable(10, store.clone()).expect("log");
            log.append("a", "unwritten", Json::Null);
            // Settles (the write was tried) without showing the event.
            crate::block_on(log.settle());
            assert_eq!(kinds(&log.read(0, &all, 10)), vec![(1, "one")]);
            assert_eq!(*log.subscribe().borrow(), 1);
            // A commit point that fails is not shown either, nor passed by
            // the watermark.
            let e = log.commit("a", Vec::new(), "commit", Json::Null);
            assert_eq!(e.map_err(|e| e.kind()), Err("storage_read_only"));
            assert_eq!(*log.subscribe().borrow(), 1);
            assert_eq!(log.read(1, &all, 10), EventPage::default());
            log.close();
            store.close();
        }
        let store = Arc::new(Store::open(&path).expect("reopen"));
        let log = EventLog::durable(10, store.clone()).expect("log");
        log.append("a", "two", Json::Null);
        crate::block_on(log.settle());
        // Number 2 was never shown, so it may go to this event; the reader
        // that saw 1 gets it.
        assert_eq!(kinds(&log.read(1, &all, 10)), vec![(2, "two")]);
        log.close();
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn events_given_up_unwritten_are_a_gap_once_later_ones_show() {
        let log = EventLog::in_memory(10);
        let lost = log.reserve("a", "lost", Json::Null);
        let kept = log.reserve("b", "kept", Json::Null);
        log.write_failed([lost.seq, kept.seq].into_iter());
        let all = EventFilter::default();
        // Waiting: nothing shown, no gap yet (its number is not shown).
        assert_eq!(log.read(0, &all, 10), EventPage::default());
        crate::block_on(log.settle());
        log.write_abandoned(std::slice::from_ref(&lost));
        log.publish(vec![kept]);
        let page = log.read(0, &all, 10);
        assert_eq!(kinds(&page), vec![(2, "kept")]);
        assert_eq!(page.gap, Some(EventGap { after: 0, up_to: 1 }));
        // Also for a reader of `a` only, and none for one past it.
        let a = log.read(0, &EventFilter::default().sandbox("a"), 10);
        assert_eq!(a.gap, Some(EventGap { after: 0, up_to: 1 }));
        assert_eq!(log.read(1, &all, 10).gap, None);
    }
}
