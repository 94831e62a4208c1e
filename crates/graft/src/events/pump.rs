//! The pump thread: writes queued events to the store in batches and
//! publishes them once written.
//!
//! Invariants:
//! * A batch the store refuses is kept and retried (backoff up to
//!   [`RETRY_MAX`]) with what came meanwhile; at most [`MAX_UNWRITTEN`] wait,
//!   the oldest beyond are abandoned (a gap for readers).
//! * Events abandoned unwritten are a gap of their sandbox on disk too: a
//!   `MarkEventGap` per sandbox rides with every write until one lands (the
//!   pump's or a commit point's, `EventLog::unrecorded_gaps`), and no later
//!   number shows before (the log's `unrecorded`), so the gap is stored no
//!   later than the events that make it visible.
//! * The thread holds the log only weakly: it ends when the log is dropped
//!   or its channel closes.

use std::sync::mpsc;
use std::sync::Arc;

use super::log::gap_ops;
use super::{EventLog, NodeEvent, MAX_UNWRITTEN, PUMP_BATCH, RETRY_MAX, RETRY_MIN};
use crate::store::Store;

/// What the pump thread is sent.
pub(super) enum PumpMsg {
    /// An event to write.
    Event(NodeEvent),
    /// A commit just succeeded: the store takes writes again, so events
    /// waiting for it are tried now rather than after the backoff.
    Retry,
}

/// The pump: writes queued events in batches, then publishes them. A batch
/// the store refuses is kept and tried again (with a backoff, together with
/// what came meanwhile) until it is written; see the module invariants.
pub(super) fn pump(rx: mpsc::Receiver<PumpMsg>, store: Arc<Store>, log: std::sync::Weak<EventLog>) {
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
        let gaps = match log.upgrade() {
            Some(log) => log.unrecorded_gaps(),
            None => return,
        };
        let mut ops: Vec<_> = batch.iter().map(EventLog::write_op).collect();
        ops.extend(gap_ops(&gaps));
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
                log.gaps_recorded(&gaps);
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
