//! The [`EventLog`]: numbers events, makes them visible in order once
//! durable, and serves readers (see the invariants of the parent module).
//!
//! Invariants:
//! * Every number is given once (`next_seq` only grows) and every event
//!   given a number ends visible, abandoned (a gap) or lost with the node,
//!   never shown out of order.
//! * The state's lock is never held while writing to the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value as Json;

use super::buckets::LogState;
use super::pump::{pump, PumpMsg};
use super::{EventCount, EventFilter, EventGap, EventPage, NodeEvent, MAX_DELETED_KEPT, MAX_SCAN};
use crate::store::{EventGaps, NewEvent, Store, StoreError, WriteOp};

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
        Arc::new(EventLog::new(
            max_per_sandbox,
            None,
            Vec::new(),
            EventGaps::default(),
            0,
        ))
    }

    /// A log written to `store`, starting from the events it holds.
    pub fn durable(max_per_sandbox: usize, store: Arc<Store>) -> crate::Result<Arc<EventLog>> {
        let last = store.last_event_seq()?;
        let gaps = store.event_gaps()?;
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
            gaps,
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
        gaps: EventGaps,
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
            unrecorded: BTreeMap::new(),
        };
        let max = max_per_sandbox.max(1);
        // Numbers missing from the database were dropped (pruned, or never
        // written): a reader of every sandbox from before one of them fell
        // into a gap. A reader of one sandbox did only if it was that
        // sandbox's, which the database records (`gaps`); a number never
        // written was never shown, so no reader missed it.
        // A sandbox with a recorded gap gets its bucket even without a
        // kept event (all it logged was given up unwritten), so its next
        // event does not open one that forgot the gap.
        for (sandbox, through) in gaps.through {
            state.buckets.entry(sandbox).or_default().pruned_through = through;
        }
        let mut expected = 1;
        let mut missing_through = 0;
        for e in restored {
            if e.seq > expected {
                missing_through = e.seq - 1;
            }
            expected = e.seq + 1;
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
            // Gaps not on disk yet go first (a `DeleteEvents` after them
            // wins): this event may show past them.
            let gaps = self.unrecorded_gaps();
            ops.splice(0..0, gap_ops(&gaps));
            ops.push(EventLog::write_op(&event));
            if let Err(e) = store.write_attached(ops, attached) {
                self.abandon(event.seq);
                return Err(e);
            }
            self.gaps_recorded(&gaps);
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
    pub(super) fn write_failed(&self, seqs: impl Iterator<Item = u64>) {
        self.update(|st| {
            for seq in seqs {
                if st.pending.remove(&seq) {
                    st.failed.insert(seq);
                }
            }
        });
    }

    /// The pump gave up these events (never written, never shown): readers
    /// that may have wanted them are told by a gap once later events show —
    /// with a store, once the gap is on disk too ([`EventLog::gaps_recorded`]).
    pub(super) fn write_abandoned(&self, events: &[NodeEvent]) {
        self.update(|st| {
            for e in events {
                st.pending.remove(&e.seq);
                st.failed.remove(&e.seq);
                let bucket = st.buckets.entry(e.sandbox.clone()).or_default();
                bucket.pruned_through = bucket.pruned_through.max(e.seq);
                st.pruned_through = st.pruned_through.max(e.seq);
                if st.stored {
                    let (low, high) = st
                        .unrecorded
                        .entry(e.sandbox.clone())
                        .or_insert((e.seq, e.seq));
                    *low = (*low).min(e.seq);
                    *high = (*high).max(e.seq);
                }
            }
        });
    }

    /// The gaps given up unwritten and not on disk yet: (sandbox, highest
    /// number), for the next write to carry ([`gap_ops`]).
    pub(super) fn unrecorded_gaps(&self) -> Vec<(String, u64)> {
        let st = self.state.lock();
        st.unrecorded
            .iter()
            .map(|(sandbox, (_, high))| (sandbox.clone(), *high))
            .collect()
    }

    /// A write carrying these gaps landed: events may show past them.
    pub(super) fn gaps_recorded(&self, gaps: &[(String, u64)]) {
        if gaps.is_empty() {
            return;
        }
        self.update(|st| {
            for (sandbox, through) in gaps {
                // One given up since the snapshot waits for the next write.
                if st
                    .unrecorded
                    .get(sandbox)
                    .is_some_and(|(_, high)| high <= through)
                {
                    st.unrecorded.remove(sandbox);
                }
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
        // Two threads may publish in either order after the lock: the
        // watermarks only ever move up.
        let raise = |to: u64| move |v: &mut u64| (to > *v).then(|| *v = to).is_some();
        self.visible_tx.send_if_modified(raise(visible));
        self.settled_tx.send_if_modified(raise(settled));
    }

    /// The highest number readers may see, read under the lock: never below
    /// a number a read has returned (the watch channel is raised after the
    /// lock is released, so its value may lag this).
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
        // Stops at `limit` matches or MAX_SCAN rejections, whichever first;
        // `through` is then the last number looked at.
        let mut through = if limit == 0 {
            after
        } else {
            st.visible.max(after)
        };
        let mut rejected = 0;
        let mut take = |e: &NodeEvent, events: &mut Vec<NodeEvent>| -> bool {
            if filter.matches(e) {
                events.push(e.clone());
            } else {
                rejected += 1;
            }
            events.len() >= limit || rejected >= MAX_SCAN
        };
        if after < st.visible && limit > 0 {
            match filter.sandbox.as_ref().and_then(|id| st.buckets.get(id)) {
                // One sandbox: walk its own numbers, not every event.
                Some(bucket) => {
                    let start = bucket.seqs.partition_point(|s| *s <= after);
                    for seq in bucket.seqs.range(start..) {
                        if *seq > st.visible {
                            break;
                        }
                        let Some(e) = st.by_seq.get(seq) else {
                            continue;
                        };
                        if take(e, &mut events) {
                            through = *seq;
                            break;
                        }
                    }
                }
                None if filter.sandbox.is_some() => {}
                None => {
                    for (seq, e) in st.by_seq.range(after + 1..=st.visible) {
                        if take(e, &mut events) {
                            through = *seq;
                            break;
                        }
                    }
                }
            }
        }
        EventPage {
            events,
            gap,
            through,
        }
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
        // A sandbox created again with this id counts from zero (its kept
        // events stay readable in the bucket it continues).
        if let Some(bucket) = st.buckets.get_mut(sandbox) {
            bucket.counts.clear();
        }
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

    /// Events of each kind per sandbox made readable since the log was
    /// opened (see [`EventCount`]); deleted sandboxes and node-wide events
    /// (no sandbox) are left out.
    pub fn counts(&self) -> Vec<EventCount> {
        let st = self.state.lock();
        let mut out = Vec::new();
        for (sandbox, bucket) in &st.buckets {
            if sandbox.is_empty() || st.deleted.contains(sandbox) {
                continue;
            }
            for (kind, &count) in &bucket.counts {
                out.push(EventCount {
                    sandbox: sandbox.clone(),
                    kind: kind.clone(),
                    count,
                });
            }
        }
        out
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

/// The store operations recording `gaps` ([`EventLog::unrecorded_gaps`]).
pub(super) fn gap_ops(gaps: &[(String, u64)]) -> Vec<WriteOp> {
    gaps.iter()
        .map(|(sandbox, through)| WriteOp::MarkEventGap {
            sandbox: sandbox.clone(),
            through: *through,
        })
        .collect()
}
