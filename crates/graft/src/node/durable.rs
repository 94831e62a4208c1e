//! The durable node (SPEC §8): opening a node on a database, writing a
//! sandbox's creation and deletion, restoring everything on start, and the
//! checkpointer.
//!
//! # Invariants
//! * Every change the API acknowledges is in the store first: a sandbox's
//!   creation (its record, its first versions, their current pointers and a
//!   `sandbox_created` event) and deletion are one transaction each, written
//!   before the call returns; reloads write theirs at their commit point
//!   (`upgrade::persist`). A failed write changes nothing, in memory either.
//! * A restart brings back each module's last *permanent* version: a canary
//!   still open when the node stopped is rolled back, durably, with a
//!   `canary_rollback` event, before the sandbox runs.
//! * Registered processes get their last checkpointed state; anonymous ones
//!   start from `init`. Pids inside a restored state come back as their text
//!   (`"<module.N>"`), which addresses nothing: serials restart at 1.
//! * The checkpointer only writes processes whose state may have changed
//!   (see `checkpoint`), never from a sandbox's thread. A state it cannot
//!   checkpoint (not plain data) deletes that name's older checkpoint, with
//!   a `checkpoint_skipped` event, in one transaction.
//! * A sandbox's settings change (`reconfigure_sandbox`, used by `graft run`
//!   for an edited graft.toml) only through one transaction holding the new
//!   record, the modules it adds and a `sandbox_reconfigured` event, written
//!   before the sandbox is rebuilt; never while a canary window is open.
//! * A stored sandbox that fails to restore keeps its rows untouched
//!   (`Node::unrestored`): no creation writes over them; only an explicit
//!   `destroy` deletes them.
//! * `NodeBuilder::apply_settings` restores one sandbox with new settings
//!   through the same one transaction as `reconfigure_sandbox`, before its
//!   app first starts: the app never runs under the settings it replaces.
//! * The events of deleted sandboxes beyond the 16 kept are deleted from
//!   the store too, by the deletion that pushes them out (same transaction).
//! * A node refuses to start on a data directory it cannot write. The data
//!   directory's lock is released only once the store is closed (by
//!   `shutdown`, or when the last handle goes), so a node opened on the same
//!   directory never shares it with a previous node's writers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde_json::json;

use super::checkpoint::Revision;
use super::{clamp_limits, HostFunctions, Node, NodeInner, Sandbox};
use crate::config::{Limits, NodeLimits, SandboxSpec};
use crate::error::{Error, Result};
use crate::events::{EventLog, MAX_DELETED_KEPT};
use crate::store::{
    ModuleSnapshot, SandboxRecord, SandboxSnapshot, Store, StoreOptions, VersionStatus, WriteOp,
};
use crate::upgrade::{ModuleHistory, ModuleVersion};

/// The database file inside a data directory.
pub const DATABASE_FILE: &str = "graft.db";

/// Default interval of periodic checkpoints.
pub const DEFAULT_CHECKPOINT_MS: u64 = 5_000;

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

/// The error of a node opened on a data directory it cannot write.
fn read_only_dir(dir: &std::path::Path, why: &str) -> Error {
    Error::Storage(crate::store::StoreError::ReadOnly {
        detail: format!(
            "the data directory {} or its database is read-only ({why}); a node writes its database there, so it does not start: make the directory and its files writable, or pass another --data DIR",
            dir.display()
        ),
    })
}

/// The name of the lock file in a data directory.
pub const LOCK_FILE: &str = "graft.lock";

/// What a data directory held before a node tried to open it.
struct Found {
    dir: bool,
    lock: bool,
    wal: bool,
    shm: bool,
}

impl Found {
    fn look(dir: &std::path::Path) -> Found {
        let db = dir.join(DATABASE_FILE);
        Found {
            dir: dir.exists(),
            lock: dir.join(LOCK_FILE).exists(),
            wal: sidecar(&db, "-wal").exists(),
            shm: sidecar(&db, "-shm").exists(),
        }
    }

    /// Removes what a refused start created (every connection to the
    /// database is closed by now). `lock`: the lock, still held, so that no
    /// other node starts on the directory while its lock file goes.
    fn restore(&self, dir: &std::path::Path, lock: Option<std::fs::File>) {
        let db = dir.join(DATABASE_FILE);
        // SQLite's files beside a database this start only read (a
        // read-only file, a newer schema): they were not there before, so
        // nothing of anyone's is in them.
        for (existed, suffix) in [(self.wal, "-wal"), (self.shm, "-shm")] {
            if !existed {
                let _ = std::fs::remove_file(sidecar(&db, suffix));
            }
        }
        if !self.lock {
            // Unlinked while still locked: a node that opened it meanwhile
            // finds the file gone once it gets the lock and starts over
            // (`lock_data_dir`), so two nodes never hold two lock files.
            let _ = std::fs::remove_file(dir.join(LOCK_FILE));
        }
        drop(lock);
        if !self.dir {
            // Only if empty: `remove_dir` never deletes a file.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `graft.db-wal` from `graft.db` and `-wal`.
fn sidecar(db: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    std::path::PathBuf::from(name)
}

/// Takes the data directory's lock (created with the directory if missing),
/// or says which directory is in use.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    let io = |what: &'static str, source: std::io::Error| {
        Error::Storage(crate::store::StoreError::Io {
            what,
            path: dir.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(|e| io("creating the data directory", e))?;
    // A node must write its database: a read-only data directory is refused
    // at start with a clear message (at run time, a directory that turns
    // read-only fails each write instead; see `store::writer`).
    if let Err(e) = crate::store::writable(dir) {
        return Err(read_only_dir(dir, &e.to_string()));
    }
    let path = dir.join(LOCK_FILE);
    // A refused start removes the lock file it created (`Found::restore`):
    // a lock taken on a file no longer at `path` locks nothing, so it is
    // taken again on the file there now.
    for _ in 0..8 {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening the lock file in", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(io(
                "locking",
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another graft node uses this data directory; stop it or pass another --data",
                ),
            )),
            Err(std::fs::TryLockError::Error(e)) => return Err(io("locking", e)),
        }
        if same_file(&file, &path) {
            return Ok(file);
        }
    }
    Err(io(
        "locking",
        std::io::Error::other("the lock file keeps being removed; is another graft node starting?"),
    ))
}

/// Whether `file` is the file at `path` now.
fn same_file(file: &std::fs::File, path: &std::path::Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// What the checkpointer knows: per sandbox, the revision of each
/// registered process's state as last written.
#[derive(Default)]
pub(super) struct Checkpoints {
    written: Mutex<HashMap<String, HashMap<String, Revision>>>,
    /// Sandboxes to checkpoint soon (after a committed reload).
    requested: Mutex<VecDeque<String>>,
    wake: Condvar,
    stop: Mutex<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Per sandbox, the registered names whose state could not be
    /// checkpointed (not plain data) and whose old checkpoint was deleted:
    /// the event says so once, not at every round.
    skipped: Mutex<HashMap<String, HashSet<String>>>,
    /// Sandboxes a restore left in the store untouched (`restore_failed`),
    /// with why: creating one of these ids is refused (its rows would be
    /// lost); only an explicit [`Node::destroy`] deletes them.
    pub unrestored: Mutex<BTreeMap<String, String>>,
    /// What `NodeBuilder::apply_settings` did at the restore.
    pub settings_outcome: Mutex<Option<SettingsOutcome>>,
}

/// What [`NodeBuilder::apply_settings`] did when the node restored the
/// sandbox (see [`Node::take_settings_outcome`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum SettingsOutcome {
    /// The stored settings were the same: restored as stored.
    Unchanged,
    /// Restored with the new settings; which of them changed (`entry`,
    /// `entry_args`, `limits`, `capabilities`).
    Applied(Vec<&'static str>),
    /// The new settings were refused or could not start: the sandbox was
    /// restored with its stored settings, which stay stored.
    Refused(Error),
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

    /// The sandboxes the store holds that could not be restored at open, and
    /// why (a `restore_failed` event says it too), sorted by id. Their rows
    /// stay untouched: creating a sandbox with one of these ids is refused,
    /// and [`Node::destroy`] deletes them (their kept versions and
    /// checkpointed states are then lost).
    ///
    /// ```
    /// let node = graft::Node::builder().ephemeral().open().unwrap();
    /// assert!(node.unrestored().is_empty());
    /// node.shutdown();
    /// ```
    pub fn unrestored(&self) -> Vec<(String, String)> {
        self.inner
            .checkpoints
            .unrestored
            .lock()
            .iter()
            .map(|(id, why)| (id.clone(), why.clone()))
            .collect()
    }

    /// What [`NodeBuilder::apply_settings`] did, once (`None` when it was
    /// not used, the store did not hold that sandbox, or its restore
    /// failed). See the builder's example.
    pub fn take_settings_outcome(&self) -> Option<SettingsOutcome> {
        self.inner.checkpoints.settings_outcome.lock().take()
    }

    /// Restores stored sandboxes (see the module docs). A sandbox that
    /// cannot be restored is logged and left in the store, untouched.
    fn restore(
        &self,
        sandboxes: Vec<SandboxSnapshot>,
        host: &HostFunctions,
        mut settings: Option<SandboxSpec>,
        record_failures: bool,
    ) {
        let mut started = Vec::new();
        for snap in sandboxes {
            let id = snap.sandbox.id.clone();
            let mine = settings
                .as_ref()
                .is_some_and(|s| s.id == id)
                .then(|| settings.take())
                .flatten();
            match self.restore_sandbox(&snap, host, mine) {
                Ok(sb) => started.push((sb, snap.checkpoints)),
                Err(e) => {
                    if record_failures {
                        tracing::error!(sandbox = %id, error = %e, "the sandbox could not be restored");
                    }
                    self.inner
                        .checkpoints
                        .unrestored
                        .lock()
                        .insert(id.clone(), e.to_string());
                    if !record_failures {
                        continue;
                    }
                    self.inner.events.append(
                        &id,
                        "restore_failed",
                        json!({ "error": e.to_string() }),
                    );
                }
            }
        }
        self.restore_started(started);
    }

    /// Waits for each restored app's `init`, then gives registered
    /// processes their checkpointed states (see the module docs).
    fn restore_started(&self, started: Vec<(Sandbox, Vec<crate::store::CheckpointRecord>)>) {
        // Apps start in parallel; `open` returns once each app's `init`
        // finished (or failed), so a restored node answers like it did.
        for (sb, rows) in started {
            if sb.shared.spec.entry.is_some() {
                let _ = super::block_on(super::with_timeout(
                    sb.wait_app_started(),
                    Duration::from_secs(10),
                ));
            }
            if rows.is_empty() {
                continue;
            }
            let restored = super::block_on(sb.ask(move |rt| rt.restore_checkpoints(rows)));
            match restored {
                Ok((revisions, failed)) => {
                    self.inner
                        .checkpoints
                        .written
                        .lock()
                        .insert(sb.id().to_owned(), revisions);
                    for (name, why) in failed {
                        self.inner.events.append(
                            sb.id(),
                            "checkpoint_not_restored",
                            json!({ "name": name, "why": why }),
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(sandbox = %sb.id(), error = %e, "checkpoints not restored")
                }
            }
        }
    }

    fn restore_sandbox(
        &self,
        snap: &SandboxSnapshot,
        host: &HostFunctions,
        settings: Option<SandboxSpec>,
    ) -> Result<Sandbox> {
        let rec = &snap.sandbox;
        let limits: Limits = serde_json::from_str(&rec.limits_json)
            .map_err(|e| Error::InvalidInput(format!("stored limits: {e}")))?;
        let extra: serde_json::Value = serde_json::from_str(&rec.spec_json).unwrap_or_default();
        let mut spec = SandboxSpec::new(rec.id.clone()).entry(rec.entry.as_deref());
        spec.limits = limits;
        spec.grants = rec.capabilities.clone();
        spec.entry_args = extra.get("entry_args").cloned().unwrap_or_default();
        if let Some(files) = extra.get("files").and_then(|f| f.as_object()) {
            for (m, path) in files {
                if let Some(p) = path.as_str() {
                    spec.files.insert(m.clone(), PathBuf::from(p));
                }
            }
        }
        let mut history = BTreeMap::new();
        let mut rolled_back = Vec::new();
        let mut ops = Vec::new();
        for m in &snap.modules {
            let h = module_history(m, spec.limits.max_source_bytes)?;
            if m.canary_open() {
                rolled_back.push(json!({
                    "module": m.module.module,
                    "from": m.module.current,
                    "to": h.current,
                }));
                ops.push(WriteOp::SetCurrent {
                    sandbox: rec.id.clone(),
                    module: m.module.module.clone(),
                    version: h.current,
                    file: None,
                });
            }
            spec.modules.insert(
                m.module.module.clone(),
                h.current().map(|v| v.source.clone()).unwrap_or_default(),
            );
            history.insert(m.module.module.clone(), h);
        }
        if !ops.is_empty() {
            // Durable before the sandbox runs the old version again.
            self.inner.events.commit(
                &rec.id,
                ops,
                "canary_rollback",
                json!({
                    "why": "the node stopped while the canary window was open",
                    "modules": rolled_back,
                }),
            )?;
        }
        if let Some(new) = settings {
            let outcome = match self.restore_with_settings(&spec, new, &history, host) {
                Ok(Some((sb, changed))) => {
                    *self.inner.checkpoints.settings_outcome.lock() =
                        Some(SettingsOutcome::Applied(changed));
                    return Ok(sb);
                }
                Ok(None) => SettingsOutcome::Unchanged,
                Err(e) => SettingsOutcome::Refused(e),
            };
            let sb = self.create_from(spec, host.clone(), Some(history), false)?;
            *self.inner.checkpoints.settings_outcome.lock() = Some(outcome);
            return Ok(sb);
        }
        self.create_from(spec, host.clone(), Some(history), false)
    }

    /// Restores a sandbox with new settings (`NodeBuilder::apply_settings`):
    /// `None` when they equal the stored ones. On an error the stored record
    /// is what the store holds (written back if the new one was written).
    fn restore_with_settings(
        &self,
        stored: &SandboxSpec,
        new: SandboxSpec,
        history: &BTreeMap<String, ModuleHistory>,
        host: &HostFunctions,
    ) -> Result<Option<(Sandbox, Vec<&'static str>)>> {
        let changed = settings_changed(stored, &new);
        if changed.is_empty() {
            return Ok(None);
        }
        new.validate(&self.inner.limits)?;
        let (ops, histories, new_spec) = settings_plan(new, history.clone(), &host.0)?;
        self.inner.events.commit(
            &stored.id,
            ops,
            "sandbox_reconfigured",
            json!({
                "changed": changed,
                "entry": new_spec.entry,
                "previous_entry": stored.entry,
                "when": "restore",
            }),
        )?;
        match self.create_from(new_spec, host.clone(), Some(histories), false) {
            Ok(sb) => Ok(Some((sb, changed))),
            Err(e) => {
                self.inner.events.commit(
                    &stored.id,
                    vec![WriteOp::PutSandbox(sandbox_record(stored))],
                    "sandbox_reconfigure_failed",
                    json!({ "changed": changed, "error": e.to_string() }),
                )?;
                Err(e)
            }
        }
    }
}

/// What giving a sandbox `spec`'s settings writes and loads: the new record,
/// the modules of `spec` it does not have yet (version 1, permanent), the
/// histories with those added, and the spec to build (its modules: each
/// history's current source).
fn settings_plan(
    spec: SandboxSpec,
    mut histories: BTreeMap<String, ModuleHistory>,
    host_fns: &crate::vm::HostTable,
) -> Result<(Vec<WriteOp>, BTreeMap<String, ModuleHistory>, SandboxSpec)> {
    let added: BTreeMap<String, String> = spec
        .modules
        .iter()
        .filter(|(name, _)| !histories.contains_key(*name))
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    let globals = crate::vm::globals_for(&spec.grants, host_fns);
    let prepared = crate::upgrade::prepare(
        &added,
        &crate::upgrade::PrepareContext {
            known_globals: &globals,
            max_source_bytes: spec.limits.max_source_bytes,
            files: &spec.files,
        },
    )?;
    let mut ops = vec![WriteOp::PutSandbox(sandbox_record(&spec))];
    for p in prepared {
        let v = ModuleVersion {
            version: 1,
            checksum: p.checksum,
            source: p.source,
            bytecode: p.bytecode,
            loaded_at_ms: crate::clock::unix_ms(),
            dependencies: p.dependencies,
        };
        ops.push(WriteOp::PutVersion(v.record(
            &spec.id,
            &p.name,
            VersionStatus::Permanent,
        )));
        ops.push(WriteOp::SetCurrent {
            sandbox: spec.id.clone(),
            module: p.name.clone(),
            version: 1,
            file: Some(p.file.clone()),
        });
        histories.insert(
            p.name,
            ModuleHistory {
                versions: VecDeque::from([v]),
                current: 1,
                next: 1,
                file: p.file,
            },
        );
    }
    let mut new_spec = spec;
    new_spec.modules = histories
        .iter()
        .filter_map(|(n, h)| h.current().map(|v| (n.clone(), v.source.clone())))
        .collect();
    Ok((ops, histories, new_spec))
}

/// A module's kept versions, recompiled here (stored bytecode is never
/// loaded), with its last permanent version current.
fn module_history(m: &ModuleSnapshot, max_source_bytes: usize) -> Result<ModuleHistory> {
    let name = &m.module.module;
    let current = m
        .restore_version()
        .map(|v| v.version)
        .ok_or_else(|| Error::InvalidInput(format!("module `{name}` has no permanent version")))?;
    let file = m
        .module
        .file
        .clone()
        .unwrap_or_else(|| format!("{name}.luau"));
    let mut versions = VecDeque::new();
    for v in &m.versions {
        if crate::upgrade::checksum(&v.source) != v.checksum {
            return Err(Error::InvalidInput(format!(
                "version {} of `{name}` does not match its checksum (the database was altered)",
                v.version
            )));
        }
        // Named by module and version, not by the file it was saved from:
        // the reason is shown to API clients (`restore_failed`, a create
        // refused `sandbox_unrestored`), who have no business with the
        // host's paths, and the file may hold another version by now.
        let bytecode = crate::vm::compile(name, &file, &v.source, max_source_bytes)
            .map_err(|e| restore_compile_error(name, v.version, e))?;
        versions.push_back(ModuleVersion {
            version: v.version,
            checksum: v.checksum.clone(),
            source: v.source.clone(),
            bytecode: Arc::new(bytecode),
            loaded_at_ms: v.created_ms,
            dependencies: v.dependencies.clone(),
        });
    }
    Ok(ModuleHistory {
        versions,
        current,
        next: m.module.next_version.saturating_sub(1),
        file,
    })
}

/// Why a kept version does not compile at a restore (a source a newer
/// Graft accepted, a limit lowered since …), naming the module and the
/// version, with the line and column but without the stored file path.
fn restore_compile_error(module: &str, version: u32, e: Error) -> Error {
    let why = match &e {
        Error::Compile { diagnostics } => match diagnostics.first() {
            Some(d) if d.line > 0 => format!("line {}:{}: {}", d.line, d.column, d.message),
            Some(d) => d.message.clone(),
            None => e.to_string(),
        },
        _ => e.to_string(),
    };
    Error::InvalidInput(format!(
        "version {version} of module `{module}` does not compile: {why}"
    ))
}

/// The rows of a new sandbox: its record, its first versions (permanent)
/// and their current pointers.
pub(super) fn creation_ops(
    spec: &SandboxSpec,
    modules: &BTreeMap<String, ModuleHistory>,
) -> Vec<WriteOp> {
    let mut ops = vec![WriteOp::PutSandbox(sandbox_record(spec))];
    for (name, h) in modules {
        for v in &h.versions {
            ops.push(WriteOp::PutVersion(v.record(
                &spec.id,
                name,
                VersionStatus::Permanent,
            )));
        }
        ops.push(WriteOp::SetCurrent {
            sandbox: spec.id.clone(),
            module: name.clone(),
            version: h.current,
            file: Some(h.file.clone()),
        });
    }
    ops
}

/// A sandbox's stored record (entry, limits, capabilities, entry args, files).
fn sandbox_record(spec: &SandboxSpec) -> SandboxRecord {
    let files: serde_json::Map<String, serde_json::Value> = spec
        .files
        .iter()
        .map(|(m, p)| (m.clone(), json!(p.to_string_lossy())))
        .collect();
    SandboxRecord {
        id: spec.id.clone(),
        entry: spec.entry.clone(),
        limits_json: serde_json::to_string(&spec.limits).unwrap_or_else(|_| "{}".into()),
        capabilities: spec.grants.clone(),
        source_root: None,
        spec_json: json!({ "entry_args": spec.entry_args, "files": files }).to_string(),
        created_ms: crate::clock::unix_ms(),
    }
}

/// What differs between a sandbox's settings and `spec`'s.
fn settings_changed(old: &SandboxSpec, new: &SandboxSpec) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.entry != new.entry {
        changed.push("entry");
    }
    if old.entry_args != new.entry_args {
        changed.push("entry_args");
    }
    if old.limits != new.limits {
        changed.push("limits");
    }
    if old.grants != new.grants {
        changed.push("capabilities");
    }
    // `files` (the paths diagnostics name) alone is no reason to restart an
    // app: `graft run .` and `graft run /abs/dir` differ only there.
    changed
}

impl Node {
    /// Gives a sandbox new settings — entry, entry args, limits,
    /// capabilities (and file names, with them) — keeping its versions, and writes them
    /// durably (`graft run DIR` applies its `graft.toml` this way when the
    /// node restored the project's sandbox). Returns `None` when nothing
    /// differs (modules are not compared: a reload makes sources live).
    ///
    /// The sandbox is rebuilt: the current version of each module is loaded
    /// under the new settings, modules of `spec` it does not have yet are
    /// added as version 1, the app is restarted (the old one stops in order,
    /// `terminate` callbacks run) from the new entry, and every registered
    /// process gets its checkpointed state back by name, as after a restart
    /// (a name the new app does not register, or registers for another
    /// module, keeps its `init` state: `checkpoint_not_restored`). The new
    /// record, the added modules and a `sandbox_reconfigured` event are one
    /// transaction, written before anything changes; if it fails, nothing
    /// did. Refused while a canary window is open (wait for its verdict).
    ///
    /// ```
    /// let node = graft::Node::builder().ephemeral().open().unwrap();
    /// let spec = graft::SandboxSpec::new("s").entry(None).module("m", "return {}");
    /// graft::block_on(node.create_sandbox(spec.clone())).unwrap();
    /// assert!(node.reconfigure_sandbox(spec.clone()).unwrap().is_none());
    /// let mut bigger = spec;
    /// bigger.limits.max_versions = 3;
    /// let sb = node.reconfigure_sandbox(bigger).unwrap();
    /// assert!(sb.is_some(), "rebuilt with the new limits");
    /// node.shutdown();
    /// ```
    pub fn reconfigure_sandbox(&self, spec: SandboxSpec) -> Result<Option<Sandbox>> {
        let old = self.sandbox(&spec.id)?;
        let changed = settings_changed(&old.shared.spec, &spec);
        if changed.is_empty() {
            return Ok(None);
        }
        spec.validate(&self.inner.limits)?;
        // The histories the new sandbox is built from, taken in the same
        // job that stops this runtime taking reloads: a reload acknowledged
        // before it is in them, one sent after it is refused (`busy`).
        let (histories, window_open, retired) = super::block_on(old.ask(|rt| {
            let open = crate::kernel::kernel(&rt.vm.lua).canary.is_some();
            let retired = !open && rt.begin_retire();
            (rt.engine.modules.clone(), open, retired)
        }))?;
        if window_open {
            return Err(Error::InvalidInput(format!(
                "sandbox `{}` has a canary window open; change its settings after the verdict",
                spec.id
            )));
        }
        if !retired {
            return Err(Error::Busy(format!(
                "sandbox `{}` has a reload in progress; change its settings again once it is done",
                spec.id
            )));
        }
        // What to rebuild if the new settings cannot start.
        let old_histories = histories.clone();
        let planned = (|| {
            let (mut ops, histories, new_spec) =
                settings_plan(spec, histories, &old.shared.host_fns)?;
            // The states as of now, so the new app gets them back.
            checkpoint_sandbox(&self.inner, &new_spec.id)?;
            if self.inner.store.is_none() {
                ops.clear();
            }
            self.inner.events.commit(
                &new_spec.id,
                ops,
                "sandbox_reconfigured",
                json!({ "changed": changed, "entry": new_spec.entry }),
            )?;
            Ok::<_, Error>((histories, new_spec))
        })();
        let (histories, new_spec) = match planned {
            Ok(p) => p,
            Err(e) => {
                // Nothing changed: the old runtime takes reloads again.
                let _ = super::block_on(old.ask(|rt| rt.end_retire()));
                return Err(e);
            }
        };
        // From here until the rebuilt sandbox has its states back (or this
        // returns), requests get `Rebuilding` (503, retryable) instead of
        // the old app stopping or a missing sandbox, and a create gets
        // `SandboxExists`.
        let _rebuilding = self.mark_rebuilding(&new_spec.id);
        // Stop the old app in order, then let the old VM go (memory only:
        // its rows are the sandbox's).
        if old.shared.spec.entry.is_some() {
            let _ = super::block_on(super::with_timeout(old.stop_app(), Duration::from_secs(10)));
        }
        let id = new_spec.id.clone();
        let host = HostFunctions(old.shared.host_fns.clone());
        let old_spec = old.shared.spec.clone();
        self.forget_sandbox(&id);
        drop(old);
        let sb = match self.create_from(new_spec, host.clone(), Some(histories), false) {
            Ok(sb) => sb,
            Err(e) => {
                // The new settings cannot start (e.g. entry args larger than
                // the new message limit): put the old record back, on disk
                // before memory, so no later start restores settings that
                // fail. The modules it added stay stored, unused.
                let back = match self.inner.store {
                    Some(_) => vec![WriteOp::PutSandbox(sandbox_record(&old_spec))],
                    None => Vec::new(),
                };
                self.inner.events.commit(
                    &id,
                    back,
                    "sandbox_reconfigure_failed",
                    json!({ "changed": changed, "error": e.to_string() }),
                )?;
                let sb = self.create_from(old_spec, host, Some(old_histories), false)?;
                if let Some(store) = &self.inner.store {
                    let rows = store.checkpoints(&id)?;
                    self.restore_started(vec![(sb, rows)]);
                }
                return Err(e);
            }
        };
        self.inner.checkpoints.written.lock().remove(&id);
        self.inner.checkpoints.skipped.lock().remove(&id);
        if let Some(store) = &self.inner.store {
            let rows = store.checkpoints(&id)?;
            self.restore_started(vec![(sb.clone(), rows)]);
        }
        Ok(Some(sb))
    }
}

/// Checkpoints one sandbox's dirty registered processes (see the module docs).
fn checkpoint_sandbox(node: &Arc<NodeInner>, id: &str) -> Result<CheckpointStats> {
    let Some(store) = node.store.clone() else {
        return Ok(CheckpointStats::default());
    };
    let Some(shared) = node.sandboxes.read().get(id).cloned() else {
        return Ok(CheckpointStats::default());
    };
    let sb = Sandbox { shared };
    let written = node
        .checkpoints
        .written
        .lock()
        .get(id)
        .cloned()
        .unwrap_or_default();
    let timed = |started: std::time::Instant| started.elapsed().as_micros() as u64;
    let ((dirty, removed), mut longest) = super::block_on(sb.ask(move |rt| {
        let started = std::time::Instant::now();
        (rt.dirty(&written), timed(started))
    }))?;
    let mut on_thread = longest;
    let mut snapshot = super::checkpoint::Snapshot {
        states: Vec::new(),
        removed,
        skipped: Vec::new(),
    };
    // In chunks: the sandbox serves its messages between them.
    for chunk in dirty.chunks(super::checkpoint::CHUNK) {
        let chunk = chunk.to_vec();
        let (part, us) = super::block_on(sb.ask(move |rt| {
            let started = std::time::Instant::now();
            (rt.snapshot(&chunk), timed(started))
        }))?;
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
fn start_checkpointer(node: &Arc<NodeInner>, every_ms: u64) {
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
