//! Checkpoints of registered processes: what the checkpointer knows, one
//! sandbox's checkpoint, the periodic checkpointer thread, and the node's
//! graceful `shutdown` (a final checkpoint, then the store closes).
//!
//! # Invariants
//! * Only processes whose state may have changed are written (see
//!   `node::checkpoint`); states are read on the sandbox's thread in chunks
//!   and written off it, never from a sandbox's thread.
//! * A state that cannot be checkpointed (not plain data) deletes that
//!   name's older checkpoint, with a `checkpoint_skipped` event, in one
//!   transaction, and only once until the state changes.
//! * The periodic checkpointer holds the node weakly, so it never keeps a
//!   dropped node alive; `shutdown` stops it before the final checkpoint.
//! * A sandbox being rebuilt with new settings is not checkpointed (by the
//!   checkpointer, `Node::checkpoint` or `shutdown`) until the rebuild
//!   ends: the rebuild wrote its states just before the old app stopped
//!   (read in one visit after the sandbox closed, `checkpoint_for_rebuild`),
//!   and those are what the new app gets back. Its states meanwhile are
//!   the stopping app's (processes going away: their names would be
//!   deleted) or the new app's before they are restored (`init` states:
//!   they would overwrite the ones about to be restored).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde_json::json;

use super::settings::SettingsOutcome;
use crate::error::Result;
use crate::node::checkpoint::Revision;
use crate::node::registry::RebuildGuard;
use crate::node::sandbox::Origin;
use crate::node::{Node, NodeInner, Sandbox};
use crate::store::WriteOp;

/// Default interval of periodic checkpoints.
pub const DEFAULT_CHECKPOINT_MS: u64 = 5_000;

/// What the checkpointer knows: per sandbox, the revision of each
/// registered process's state as last written.
#[derive(Default)]
pub(in crate::node) struct Checkpoints {
    pub(super) written: Mutex<HashMap<String, HashMap<String, Revision>>>,
    /// Sandboxes to checkpoint soon (after a committed reload).
    requested: Mutex<VecDeque<String>>,
    wake: Condvar,
    stop: Mutex<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Per sandbox, the registered names whose state could not be
    /// checkpointed (not plain data) and whose old checkpoint was deleted:
    /// the event says so once, not at every round.
    pub(super) skipped: Mutex<HashMap<String, HashSet<String>>>,
    /// Sandboxes a restore left in the store untouched (`restore_failed`),
    /// with why: creating one of these ids is refused (its rows would be
    /// lost); only an explicit [`Node::destroy`] deletes them.
    pub unrestored: Mutex<BTreeMap<String, String>>,
    /// What `NodeBuilder::apply_settings` did at the restore.
    pub settings_outcome: Mutex<Option<SettingsOutcome>>,
}

impl Checkpoints {
    /// Stops the periodic checkpointer (it finishes the sandbox it is at).
    pub fn stop_thread(&self) {
        *self.stop.lock() = true;
        self.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Asks the checkpointer to checkpoint `sandbox` now.
    pub fn request(&self, sandbox: &str) {
        let mut q = self.requested.lock();
        if !q.iter().any(|s| s == sandbox) {
            q.push_back(sandbox.to_owned());
        }
        drop(q);
        let _stop = self.stop.lock();
        self.wake.notify_all();
    }
}

/// How many states a checkpoint wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointStats {
    /// States written.
    pub written: usize,
    /// Checkpoints forgotten (names no longer registered).
    pub removed: usize,
    /// Registered processes whose state is not plain data (not written).
    pub skipped: usize,
    /// Microseconds the snapshots held sandboxes' threads in all (finding
    /// dirty processes, converting their states to JSON); serialising and
    /// writing are not in it.
    pub sandbox_thread_us: u64,
    /// The longest single hold of a sandbox's thread, in microseconds (the
    /// conversion runs in chunks, between which the sandbox runs).
    pub longest_pause_us: u64,
}

impl Node {
    /// Checkpoints the registered processes of every sandbox whose state
    /// changed since their last checkpoint, and waits until it is on disk.
    /// Without a store it does nothing.
    pub fn checkpoint(&self) -> Result<CheckpointStats> {
        let mut total = CheckpointStats::default();
        for id in self.sandbox_ids() {
            let s = checkpoint_sandbox(&self.inner, &id)?;
            total.written += s.written;
            total.removed += s.removed;
            total.skipped += s.skipped;
            total.sandbox_thread_us += s.sandbox_thread_us;
            total.longest_pause_us = total.longest_pause_us.max(s.longest_pause_us);
        }
        Ok(total)
    }

    /// Stops the node gracefully: the periodic checkpointer stops, a final
    /// checkpoint is written, and the database is closed (its log folded in).
    /// Sandboxes keep running until the node is dropped, but nothing more
    /// is written; call it once the surfaces stopped taking requests.
    pub fn shutdown(&self) {
        self.inner.checkpoints.stop_thread();
        if self.inner.store.is_some() {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "the final checkpoint failed");
            }
        }
        self.inner.events.close();
        if let Some(store) = &self.inner.store {
            store.close();
        }
        drop(self.inner.data_lock.lock().take());
    }
}

/// Checkpoints one sandbox's dirty registered processes (see the module
/// docs): nothing for no such sandbox, or one being rebuilt.
pub(super) fn checkpoint_sandbox(node: &Arc<NodeInner>, id: &str) -> Result<CheckpointStats> {
    // Being rebuilt (module docs). A rebuild that starts after this check
    // closes the sandbox: its next read is refused (`Rebuilding`), and
    // nothing is written.
    if node.rebuilding.lock().contains(id) {
        return Ok(CheckpointStats::default());
    }
    let Some(shared) = node.sandboxes.read().get(id).cloned() else {
        return Ok(CheckpointStats::default());
    };
    checkpoint_one(node, &Sandbox { shared }, Origin::Request)
}

/// The rebuild's own checkpoint of the sandbox it is about to stop, read
/// after the sandbox closed to requests (the guard is the proof): every
/// request answered before the close is in it, and none after changes the
/// states it restores.
pub(super) fn checkpoint_for_rebuild(node: &Arc<NodeInner>, guard: &RebuildGuard) -> Result<()> {
    checkpoint_one(node, guard.old(), Origin::Node).map(|_| ())
}

fn checkpoint_one(node: &Arc<NodeInner>, sb: &Sandbox, origin: Origin) -> Result<CheckpointStats> {
    let Some(store) = node.store.clone() else {
        return Ok(CheckpointStats::default());
    };
    let id = sb.id();
    let read = match origin {
        Origin::Request => read_snapshot(node, sb)?,
        Origin::Node => Some(read_for_rebuild(node, sb)?),
    };
    let Some((snapshot, stats)) = read else {
        return Ok(CheckpointStats::default());
    };
    // A state that stopped being plain data: its older checkpoint goes (a
    // restart would bring back a state older than what the process did
    // since), once, with an event saying why.
    let newly_skipped: Vec<&(String, String, Revision)> = {
        let skipped = node.checkpoints.skipped.lock();
        let known = skipped.get(id);
        snapshot
            .skipped
            .iter()
            .filter(|(name, _, _)| !known.is_some_and(|k| k.contains(name)))
            .collect()
    };
    if snapshot.states.is_empty() && snapshot.removed.is_empty() && newly_skipped.is_empty() {
        remember_skipped(node, id, &snapshot.skipped);
        return Ok(stats);
    }
    let rows = snapshot.rows(crate::clock::unix_ms());
    let mut removed = snapshot.removed.clone();
    removed.extend(newly_skipped.iter().map(|(name, _, _)| name.clone()));
    let ops = vec![WriteOp::PutCheckpoints {
        sandbox: id.to_owned(),
        rows,
        removed,
    }];
    if newly_skipped.is_empty() {
        store.write(ops)?;
    } else {
        let names: Vec<serde_json::Value> = newly_skipped
            .iter()
            .map(|(name, why, _)| json!({ "name": name, "why": why }))
            .collect();
        for (name, why, _) in &newly_skipped {
            tracing::warn!(sandbox = %id, %name, %why, "state not checkpointed; its older checkpoint was deleted");
        }
        node.events.commit(
            id,
            ops,
            "checkpoint_skipped",
            json!({
                "processes": names,
                "why": "the state is not plain data; the older checkpoint was deleted, so a restart starts these processes from init",
            }),
        )?;
    }
    {
        let mut all = node.checkpoints.written.lock();
        let mine = all.entry(id.to_owned()).or_default();
        for name in &snapshot.removed {
            mine.remove(name);
        }
        for (name, _, _, _, revision) in &snapshot.states {
            mine.insert(name.clone(), *revision);
        }
    }
    {
        let mut skipped = node.checkpoints.skipped.lock();
        let mine = skipped.entry(id.to_owned()).or_default();
        for name in snapshot
            .removed
            .iter()
            .chain(snapshot.states.iter().map(|s| &s.0))
        {
            mine.remove(name);
        }
    }
    remember_skipped(node, id, &snapshot.skipped);
    Ok(stats)
}

/// The rebuild's read of the sandbox it is about to stop (closed to
/// requests): every dirty state in one visit, after which the old runtime
/// holds its answers to hosts (`Runtime::freeze_for_rebuild`).
fn read_for_rebuild(
    node: &Arc<NodeInner>,
    sb: &Sandbox,
) -> Result<(crate::node::checkpoint::Snapshot, CheckpointStats)> {
    let written = node
        .checkpoints
        .written
        .lock()
        .get(sb.id())
        .cloned()
        .unwrap_or_default();
    let (snapshot, us) = crate::node::block_on(sb.ask_as(Origin::Node, move |rt| {
        let started = std::time::Instant::now();
        let snapshot = rt.freeze_for_rebuild(&written);
        (snapshot, started.elapsed().as_micros() as u64)
    }))?;
    let stats = CheckpointStats {
        written: snapshot.states.len(),
        removed: snapshot.removed.len(),
        skipped: snapshot.skipped.len(),
        sandbox_thread_us: us,
        longest_pause_us: us,
    };
    Ok((snapshot, stats))
}

/// Reads the dirty states of `sb` on its thread, in chunks; `None` when the
/// read was refused because the sandbox is being rebuilt (module docs).
fn read_snapshot(
    node: &Arc<NodeInner>,
    sb: &Sandbox,
) -> Result<Option<(crate::node::checkpoint::Snapshot, CheckpointStats)>> {
    let id = sb.id();
    let written = node
        .checkpoints
        .written
        .lock()
        .get(id)
        .cloned()
        .unwrap_or_default();
    let timed = |started: std::time::Instant| started.elapsed().as_micros() as u64;
    let read = crate::node::block_on(sb.ask(move |rt| {
        let started = std::time::Instant::now();
        (rt.dirty(&written), timed(started))
    }));
    let Some(((dirty, removed), mut longest)) = unless_rebuilding(read)? else {
        return Ok(None);
    };
    let mut on_thread = longest;
    let mut snapshot = crate::node::checkpoint::Snapshot {
        states: Vec::new(),
        removed,
        skipped: Vec::new(),
    };
    // In chunks: the sandbox serves its messages between them.
    for chunk in dirty.chunks(crate::node::checkpoint::CHUNK) {
        let chunk = chunk.to_vec();
        let read = crate::node::block_on(sb.ask(move |rt| {
            let started = std::time::Instant::now();
            (rt.snapshot(&chunk), timed(started))
        }));
        let Some((part, us)) = unless_rebuilding(read)? else {
            return Ok(None);
        };
        on_thread += us;
        longest = longest.max(us);
        snapshot.states.extend(part.states);
        snapshot.skipped.extend(part.skipped);
    }
    let stats = CheckpointStats {
        written: snapshot.states.len(),
        removed: snapshot.removed.len(),
        skipped: snapshot.skipped.len(),
        sandbox_thread_us: on_thread,
        longest_pause_us: longest,
    };
    Ok(Some((snapshot, stats)))
}

/// A read of a sandbox's states, or `None` when it was refused because the
/// sandbox is being rebuilt (not checkpointed: module docs).
fn unless_rebuilding<T>(read: Result<T>) -> Result<Option<T>> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(crate::error::Error::Rebuilding(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records names skipped by a checkpoint (their old row is gone): not
/// dirty again until their state changes, and no second event.
fn remember_skipped(node: &NodeInner, id: &str, skipped: &[(String, String, Revision)]) {
    if skipped.is_empty() {
        return;
    }
    let mut written = node.checkpoints.written.lock();
    let revisions = written.entry(id.to_owned()).or_default();
    let mut all = node.checkpoints.skipped.lock();
    let names = all.entry(id.to_owned()).or_default();
    for (name, _, revision) in skipped {
        revisions.insert(name.clone(), *revision);
        names.insert(name.clone());
    }
}

/// Starts the periodic checkpointer (it holds the node weakly).
pub(super) fn start_checkpointer(node: &Arc<NodeInner>, every_ms: u64) {
    let weak = Arc::downgrade(node);
    let spawned = std::thread::Builder::new()
        .name("graft-checkpoint".into())
        .spawn(move || {
            let mut next = std::time::Instant::now() + Duration::from_millis(every_ms);
            loop {
                let Some(node) = weak.upgrade() else { return };
                let due: Vec<String> = {
                    let cp = &node.checkpoints;
                    let mut stop = cp.stop.lock();
                    while !*stop
                        && cp.requested.lock().is_empty()
                        && std::time::Instant::now() < next
                    {
                        if cp.wake.wait_until(&mut stop, next).timed_out() {
                            break;
                        }
                    }
                    if *stop {
                        return;
                    }
                    if std::time::Instant::now() >= next {
                        next = std::time::Instant::now() + Duration::from_millis(every_ms);
                        cp.requested.lock().clear();
                        node.sandboxes.read().keys().cloned().collect()
                    } else {
                        cp.requested.lock().drain(..).collect()
                    }
                };
                let live: HashSet<String> = node.sandboxes.read().keys().cloned().collect();
                node.checkpoints
                    .written
                    .lock()
                    .retain(|id, _| live.contains(id));
                node.checkpoints
                    .skipped
                    .lock()
                    .retain(|id, _| live.contains(id));
                for id in due {
                    if let Err(e) = checkpoint_sandbox(&node, &id) {
                        tracing::warn!(sandbox = %id, error = %e, "checkpoint failed");
                    }
                }
            }
        });
    match spawned {
        Ok(t) => *node.checkpoints.thread.lock() = Some(t),
        Err(e) => tracing::error!(error = %e, "the checkpointer could not start"),
    }
}
