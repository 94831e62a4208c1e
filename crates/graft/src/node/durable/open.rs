//! Opening a node: [`NodeBuilder`] (threads, caps, storage) and `open`,
//! which takes the data directory, opens the store and the event log, and
//! restores what the store holds.
//!
//! # Invariants
//! * A start that is refused (a directory it cannot write or lock, a
//!   database it cannot use) leaves the data directory as it found it and
//!   lets its lock go only once the store is closed.
//! * The events of deleted sandboxes beyond the 16 kept are pruned from the
//!   store at start too (a few sandboxes per transaction), except those of
//!   a sandbox still stored (one a restore failed on).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use super::checkpointer::{start_checkpointer, DEFAULT_CHECKPOINT_MS};
use super::data_dir::{lock_data_dir, read_only_dir, Found, DATABASE_FILE};
use crate::config::{NodeLimits, SandboxSpec};
use crate::error::{Error, Result};
use crate::events::{EventLog, MAX_DELETED_KEPT};
use crate::node::{clamp_limits, HostFunctions, Node};
use crate::store::{Store, StoreOptions, WriteOp};

/// Where a node keeps its truth.
#[derive(Clone, Debug)]
enum Storage {
    /// Nothing is written anywhere (`Node::new`).
    None,
    /// `DIR/graft.db`.
    Dir(PathBuf),
    /// A private temporary database, removed when the node stops.
    Ephemeral,
}

/// Opens a node: threads, caps, and where it keeps its data.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("graft-doc-builder-{}", std::process::id()));
/// let node = graft::Node::builder().threads(2).data_dir(&dir).open().unwrap();
/// graft::block_on(node.create_sandbox(graft::SandboxSpec::new("kept").entry(None).module("m", "return {}"))).unwrap();
/// node.shutdown();
/// drop(node);
/// // The sandbox comes back when the node is opened on the same directory.
/// let node = graft::Node::builder().data_dir(&dir).open().unwrap();
/// assert_eq!(node.sandbox_ids(), vec!["kept".to_string()]);
/// node.shutdown();
/// # drop(node);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Clone)]
#[must_use]
pub struct NodeBuilder {
    threads: Option<usize>,
    limits: NodeLimits,
    storage: Storage,
    checkpoint_ms: u64,
    host: HostFunctions,
    max_database_bytes: Option<u64>,
    /// Settings to restore one sandbox with (`apply_settings`).
    settings: Option<SandboxSpec>,
    /// Whether a failed restore writes a `restore_failed` event.
    record_restore_failures: bool,
}

impl Node {
    /// A builder for a node with storage (see [`NodeBuilder`]).
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            threads: None,
            limits: NodeLimits::default(),
            storage: Storage::None,
            checkpoint_ms: DEFAULT_CHECKPOINT_MS,
            host: HostFunctions::default(),
            max_database_bytes: None,
            settings: None,
            record_restore_failures: true,
        }
    }
}

impl NodeBuilder {
    /// Scheduler threads (default: one per core).
    pub fn threads(mut self, n: usize) -> NodeBuilder {
        self.threads = Some(n);
        self
    }

    /// Node-wide caps (clamped into range).
    pub fn limits(mut self, limits: NodeLimits) -> NodeBuilder {
        self.limits = limits;
        self
    }

    /// Keeps everything in `DIR/graft.db` (created if missing) and restores
    /// what it holds when opened.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> NodeBuilder {
        self.storage = Storage::Dir(dir.into());
        self
    }

    /// Keeps everything in a private temporary database, gone with the node
    /// (events, tokens and audit still work; nothing survives a restart).
    pub fn ephemeral(mut self) -> NodeBuilder {
        self.storage = Storage::Ephemeral;
        self
    }

    /// Interval of periodic checkpoints of registered processes (default
    /// 5000 ms; 0 turns periodic checkpoints off).
    pub fn checkpoint_ms(mut self, ms: u64) -> NodeBuilder {
        self.checkpoint_ms = ms;
        self
    }

    /// A cap on the database's size: past it every write fails with
    /// `storage_full`, as on a full disk (and the request that caused it
    /// fails, changing nothing). Default: no cap.
    pub fn max_database_bytes(mut self, bytes: u64) -> NodeBuilder {
        self.max_database_bytes = Some(bytes);
        self
    }

    /// Restores the stored sandbox `spec.id` (if the store holds it) with
    /// `spec`'s settings — entry, entry args, limits, capabilities, file
    /// names — instead of the stored ones, as
    /// [`Node::reconfigure_sandbox`] would, but without ever starting the
    /// app under the old settings (`graft run DIR` passes its `graft.toml`
    /// this way). Modules of `spec` the sandbox lacks come in as version 1;
    /// the sources of the others are not compared (a reload makes them
    /// live). The new record and a `sandbox_reconfigured` event are written
    /// before the app starts. If the settings are refused or cannot start,
    /// the stored ones are restored (written back, with a
    /// `sandbox_reconfigure_failed` event, if they had been written).
    /// [`Node::take_settings_outcome`] says which happened.
    ///
    /// ```
    /// let dir = std::env::temp_dir().join(format!("graft-doc-settings-{}", std::process::id()));
    /// let spec = graft::SandboxSpec::new("s").entry(None).module("m", "return {}");
    /// let node = graft::Node::builder().data_dir(&dir).open().unwrap();
    /// graft::block_on(node.create_sandbox(spec.clone())).unwrap();
    /// node.shutdown();
    /// drop(node);
    /// let mut bigger = spec;
    /// bigger.limits.max_versions = 3;
    /// let node = graft::Node::builder().data_dir(&dir).apply_settings(bigger).open().unwrap();
    /// assert!(matches!(
    ///     node.take_settings_outcome(),
    ///     Some(graft::SettingsOutcome::Applied(changed)) if changed == ["limits"]
    /// ));
    /// node.shutdown();
    /// # drop(node);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn apply_settings(mut self, spec: SandboxSpec) -> NodeBuilder {
        self.settings = Some(spec);
        self
    }

    /// Whether a sandbox that fails to restore gets a `restore_failed`
    /// event (default: yes). A caller that refuses to go on when a restore
    /// fails (`graft run`, for its project's sandbox) turns it off, so its
    /// refused start writes nothing; [`Node::unrestored`] says what failed
    /// either way.
    ///
    /// ```
    /// let node = graft::Node::builder().ephemeral().record_restore_failures(false).open().unwrap();
    /// assert!(node.unrestored().is_empty());
    /// node.shutdown();
    /// ```
    pub fn record_restore_failures(mut self, record: bool) -> NodeBuilder {
        self.record_restore_failures = record;
        self
    }

    /// Host functions granted to every sandbox restored from the store
    /// (sandboxes created later get theirs from `create_sandbox_with`).
    pub fn host_functions(mut self, host: HostFunctions) -> NodeBuilder {
        self.host = host;
        self
    }

    /// Opens the node: opens (or creates, or migrates) the database, then
    /// restores every stored sandbox. Refuses to start on a database it
    /// cannot use (newer schema, corrupt, unreadable), leaving it untouched.
    pub fn open(self) -> Result<Node> {
        let threads = self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
        let limits = clamp_limits(self.limits);
        let opts = StoreOptions {
            max_events_per_sandbox: limits.max_events as u64,
            max_size_bytes: self.max_database_bytes,
            ..StoreOptions::default()
        };
        // A refused start leaves the data directory as it found it: what
        // the attempt created (the directory, the lock file, SQLite's
        // -wal/-shm beside a database it only read) is removed again.
        let found = match &self.storage {
            Storage::Dir(dir) => Some(Found::look(dir)),
            _ => None,
        };
        let refused = |e: Error, lock: Option<std::fs::File>| {
            if let (Some(found), Storage::Dir(dir)) = (&found, &self.storage) {
                found.restore(dir, lock);
            }
            e
        };
        let data_lock = match &self.storage {
            Storage::Dir(dir) => Some(lock_data_dir(dir).map_err(|e| refused(e, None))?),
            _ => None,
        };
        let opened = match &self.storage {
            Storage::None => Ok(None),
            Storage::Dir(dir) => Store::open_with(dir.join(DATABASE_FILE), opts)
                .map_err(Error::from)
                .and_then(|store| match store.read_only_reason() {
                    // Dropped (its connections closed) before the cleanup.
                    Some(why) => Err(read_only_dir(dir, why)),
                    None => Ok(Some(Arc::new(store))),
                }),
            Storage::Ephemeral => Store::in_memory_with(opts)
                .map(|s| Some(Arc::new(s)))
                .map_err(Error::from),
        };
        let store =
            opened.map_err(|e| refused(e, data_lock.as_ref().and_then(|l| l.try_clone().ok())))?;
        let events = match &store {
            Some(s) => EventLog::durable(limits.max_events, s.clone()),
            None => Ok(EventLog::in_memory(limits.max_events)),
        };
        let events = match events {
            Ok(events) => events,
            Err(e) => {
                if let Some(s) = &store {
                    s.close();
                }
                drop(store);
                return Err(refused(e, data_lock));
            }
        };
        let node = Node::assemble(threads, limits, events, store.clone(), data_lock);
        if let Some(store) = store {
            let snapshot = match store.load_all() {
                Ok(s) => s,
                Err(e) => {
                    // Closes the database and lets the lock go first.
                    node.shutdown();
                    drop(store);
                    drop(node);
                    return Err(refused(e.into(), None));
                }
            };
            let stored: HashSet<String> = snapshot
                .sandboxes
                .iter()
                .map(|s| s.sandbox.id.clone())
                .collect();
            node.restore(
                snapshot.sandboxes,
                &self.host,
                self.settings,
                self.record_restore_failures,
            );
            let live: HashSet<String> = node.sandbox_ids().into_iter().collect();
            let dropped = node.inner.events.absent_are_deleted(&live);
            prune_deleted_events(&store, dropped, &stored);
            if self.checkpoint_ms > 0 {
                start_checkpointer(&node.inner, self.checkpoint_ms);
            }
        }
        Ok(node)
    }
}

/// Deletes from the store the events of deleted sandboxes that memory no
/// longer keeps (left by a node older than this rule, or by deletions that
/// raced): a few sandboxes per transaction, so each commit's work stays
/// bounded. A sandbox still stored (one a restore failed on) keeps its
/// events. A failed write is logged; the next start tries again.
fn prune_deleted_events(store: &Store, dropped: Vec<String>, stored: &HashSet<String>) {
    let doomed: Vec<String> = dropped
        .into_iter()
        .filter(|id| !stored.contains(id))
        .collect();
    for chunk in doomed.chunks(MAX_DELETED_KEPT) {
        let ops = chunk
            .iter()
            .map(|sandbox| WriteOp::DeleteEvents {
                sandbox: sandbox.clone(),
            })
            .collect();
        if let Err(e) = store.write(ops) {
            tracing::warn!(error = %e, "storage: old events of deleted sandboxes not pruned");
            return;
        }
    }
}
