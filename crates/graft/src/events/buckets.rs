//! The log's memory: each sandbox's kept events (its bucket) and the
//! watermark arithmetic.
//!
//! Invariants:
//! * `visible` never goes backwards, never passes a number pending or failed,
//!   and with a store never passes `durable` nor a number given up unwritten
//!   whose gap is not on disk yet (`unrecorded`): a gap is stored no later
//!   than the events that show past it.
//! * An event is in `by_seq` exactly when its number is in its sandbox's
//!   bucket; each bucket holds at most `max` numbers, and every number
//!   dropped from one is at or below `pruned_through`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::NodeEvent;

/// One sandbox's kept events, as sequence numbers (the events themselves
/// are in `LogState::by_seq`).
#[derive(Default)]
pub(super) struct Bucket {
    pub(super) seqs: VecDeque<u64>,
    /// The newest sequence number dropped from this bucket (0: none).
    pub(super) pruned_through: u64,
    /// Events of each kind made readable in this bucket since the log was
    /// opened (restored ones included), pruned or not: what counters read,
    /// so a burst that outruns a reader is still counted.
    pub(super) counts: HashMap<String, u64>,
}

pub(super) struct LogState {
    pub(super) next_seq: u64,
    /// Numbered, not yet durable (nor tried).
    pub(super) pending: BTreeSet<u64>,
    /// Numbered, written without success, being retried by the pump.
    pub(super) failed: BTreeSet<u64>,
    /// The highest number known to be on disk (with a store): nothing above
    /// it is shown, so a restart never gives a shown number again.
    pub(super) durable: u64,
    /// Whether a store bounds what is shown (`durable`).
    pub(super) stored: bool,
    /// Durable, waiting for a lower pending number to become durable.
    pub(super) staged: BTreeMap<u64, NodeEvent>,
    pub(super) visible: u64,
    pub(super) by_seq: BTreeMap<u64, NodeEvent>,
    pub(super) buckets: HashMap<String, Bucket>,
    /// Deleted sandboxes whose buckets are still kept, oldest first.
    pub(super) deleted: VecDeque<String>,
    /// The newest sequence number dropped from any bucket (0: none).
    pub(super) pruned_through: u64,
    /// With a store: per sandbox, the (lowest, highest) numbers given up
    /// unwritten whose gap is not on disk yet (`WriteOp::MarkEventGap`
    /// rides with the next write, the pump's or a commit's).
    pub(super) unrecorded: BTreeMap<String, (u64, u64)>,
}

impl LogState {
    /// Moves staged events up to the new watermark into the buckets.
    pub(super) fn advance(&mut self, max: usize) -> u64 {
        let unrecorded = self.unrecorded.values().map(|(low, _)| *low).min();
        let open = [
            self.pending.first().copied(),
            self.failed.first().copied(),
            unrecorded,
        ]
        .into_iter()
        .flatten()
        .min();
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
    pub(super) fn settled(&self) -> u64 {
        self.pending
            .first()
            .map_or(self.next_seq - 1, |first| first - 1)
    }

    pub(super) fn insert(&mut self, e: NodeEvent, max: usize) {
        let bucket = self.buckets.entry(e.sandbox.clone()).or_default();
        bucket.seqs.push_back(e.seq);
        match bucket.counts.get_mut(&e.kind) {
            Some(n) => *n += 1,
            None => {
                bucket.counts.insert(e.kind.clone(), 1);
            }
        }
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

    pub(super) fn drop_bucket(&mut self, sandbox: &str) {
        if let Some(bucket) = self.buckets.remove(sandbox) {
            for seq in bucket.seqs {
                self.by_seq.remove(&seq);
                self.pruned_through = self.pruned_through.max(seq);
            }
        }
    }
}
