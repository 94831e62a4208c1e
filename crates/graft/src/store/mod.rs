//! Durable storage of a node: one SQLite database file (SPEC §8).
//!
//! The store keeps what must survive a restart: sandboxes, every kept module
//! version with the current and stable pointers, events, checkpoints of
//! registered processes, API tokens (hashed) and the audit log. The schema is
//! documented in `docs/persistence.md` ("Schema") and in [`schema`].
//!
//! # Durability
//! * WAL mode: a commit appends to `<file>-wal`; readers keep reading the last
//!   committed state while the writer writes, and never block it.
//! * `synchronous=FULL`: every commit fsyncs the log before it returns, so an
//!   acknowledged write survives a process kill (`kill -9`) *and* a power
//!   loss or OS crash (given a disk that honours fsync). `NORMAL` would only
//!   survive a process kill.
//! * `foreign_keys=ON`: a version, pointer or checkpoint cannot outlive or
//!   precede its sandbox; `busy_timeout` lets an outside reader (a backup,
//!   the `sqlite3` shell) hold a lock briefly without failing our writes.
//!
//! # Writing
//! One writer thread owns the only read-write connection. Callers submit a
//! list of [`WriteOp`]s ([`Store::write`] blocks, [`Store::write_async`]
//! returns a future) that commits atomically; the writer drains whatever is
//! queued and commits it in one transaction (group commit: one fsync for
//! many submitters), each submission in its own SAVEPOINT so that one that
//! fails is rolled back alone and reported to its submitter only. The
//! acknowledgement comes after the commit's fsync.
//!
//! # Reading
//! Reads use a small pool of read-only connections: they see the last
//! commit, never wait for the writer and never stall a sandbox.
//!
//! # Invariants
//! * A file this build must refuse (a newer schema, not a Graft database,
//!   truncated) is refused before any read-write connection touches it, and
//!   is left byte-for-byte untouched.
//! * Nothing on a data path panics: every failure is a [`StoreError`].
//! * [`Store::close`] (and drop) stops accepting writes, lets the writer
//!   drain and commit what was queued, folds the log into the file and closes.

mod apply;
mod attach;
mod backup;
mod ephemeral;
mod error;
mod ops;
mod read;
pub mod records;
pub mod schema;
mod writer;

#[cfg(test)]
pub(crate) mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, OpenFlags};

pub use attach::Attached;
pub use error::{StoreError, StoreResult};
pub use ops::{Applied, WriteOp};
// Every record type is part of the store's API.
pub use records::*;
pub use schema::SCHEMA_VERSION;
pub(crate) use writer::writable;
pub use writer::{Receipt, LAZY_WAIT};

use backup::vacuum_into;
use ephemeral::{sweep_dead_ephemeral_dirs, EPHEMERAL_LOCK, EPHEMERAL_PREFIX};
use schema::Migration;
use writer::{Reply, Submission, Writer};

/// How a store is opened.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Events kept per sandbox (SPEC §7's `--max-events`, default 1000); the
    /// oldest beyond it are deleted as new ones are appended.
    pub max_events_per_sandbox: u64,
    /// A cap on the database's size (`PRAGMA max_page_count`): past it, writes
    /// fail with [`StoreError::Full`] as on a full disk. `None`: no cap.
    pub max_size_bytes: Option<u64>,
    /// How long a write or read waits for a lock held by another process
    /// (a backup, the `sqlite3` shell) before failing.
    pub busy_timeout: Duration,
    /// Read connections kept open for reuse.
    pub readers: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_events_per_sandbox: 1000,
            max_size_bytes: None,
            busy_timeout: Duration::from_secs(5),
            readers: 4,
        }
    }
}

/// The node's database. `Send + Sync`: share it in an `Arc`.
pub struct Store {
    path: PathBuf,
    opts: StoreOptions,
    sender: RwLock<Option<mpsc::Sender<Submission>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    /// `Store::in_memory`'s private directory, removed on close.
    ephemeral_dir: Option<PathBuf>,
    /// Why the store could only be opened for reading (every write fails).
    read_only: Option<String>,
    /// The lock on `ephemeral_dir/graft.lock`, held while the store lives:
    /// how another process's sweep knows the directory is in use.
    ephemeral_lock: Option<std::fs::File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("ephemeral", &self.ephemeral_dir.is_some())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database at `path` with default options,
    /// migrating an older schema forward. Creates missing parent directories.
    pub fn open(path: impl AsRef<Path>) -> StoreResult<Store> {
        Store::open_with(path, StoreOptions::default())
    }

    /// [`Store::open`] with options.
    pub fn open_with(path: impl AsRef<Path>, opts: StoreOptions) -> StoreResult<Store> {
        Store::open_inner(path.as_ref(), opts, schema::MIGRATIONS, true, None)
    }

    /// Opens an existing database for reading only, without the node's
    /// lock and without a writer: the way a tool (`graft test
    /// --migrations`) reads kept versions and checkpoints while a node may
    /// be running on the same directory. The file is never created,
    /// migrated or written (every write fails with [`StoreError::ReadOnly`]);
    /// in WAL mode each read sees the last commit made before it began.
    /// A missing file is [`StoreError::Open`]; a newer schema is
    /// [`StoreError::NewerSchema`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use graft::store::Store;
    /// let dir = std::env::temp_dir().join(format!("graft-ro-doc-{}", std::process::id()));
    /// let db = dir.join("graft.db");
    /// drop(Store::open(&db)?); // a node created it earlier
    /// let ro = Store::open_read_only(&db)?;
    /// assert!(ro.sandboxes()?.is_empty());
    /// assert!(ro.read_only_reason().is_some());
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(()) }
    /// ```
    pub fn open_read_only(path: impl AsRef<Path>) -> StoreResult<Store> {
        let path = path.as_ref();
        let supported = schema::MIGRATIONS.last().map_or(0, |m| m.version);
        let header = schema::inspect_file(path)?;
        if header.empty {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                detail: "no Graft database here (missing or empty file)".into(),
            });
        }
        if header.user_version > supported {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: header.user_version,
                supported,
            });
        }
        schema::check_header(path, &header)?;
        schema::check_with_sqlite(path, supported)?;
        Ok(Store {
            path: path.to_path_buf(),
            opts: StoreOptions::default(),
            sender: RwLock::new(None),
            writer: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            ephemeral_dir: None,
            read_only: Some("opened read-only (Store::open_read_only)".into()),
            ephemeral_lock: None,
        })
    }

    /// A store for `--ephemeral` nodes: the same code path on a database in a
    /// fresh private directory under the system's temp directory, without
    /// fsync (`synchronous=OFF`: nothing is meant to survive), deleted on
    /// close. Directories left by ephemeral stores of dead processes (after a
    /// `kill -9`) are removed on the next call.
    pub fn in_memory() -> StoreResult<Store> {
        Store::in_memory_with(StoreOptions::default())
    }

    /// [`Store::in_memory`] with options.
    pub fn in_memory_with(opts: StoreOptions) -> StoreResult<Store> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        sweep_dead_ephemeral_dirs(&base);
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let unique = format!("{pid}-{nanos:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        // Made under a name the sweep ignores, locked, then renamed: a
        // directory the sweep can see always has its lock held by a live
        // store, or by nobody.
        let staging = base.join(format!(".graft-staging-{unique}"));
        let dir = base.join(format!("{EPHEMERAL_PREFIX}{unique}"));
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { what, path, source }
        };
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&staging)
            .map_err(io("creating directory", &staging))?;
        let locked = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(staging.join(EPHEMERAL_LOCK))
            .and_then(|f| match f.try_lock() {
                Ok(()) => Ok(f),
                Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "a fresh lock file is locked by someone else",
                )),
                Err(std::fs::TryLockError::Error(e)) => Err(e),
            })
            .and_then(|f| std::fs::rename(&staging, &dir).map(|()| f));
        let lock = match locked {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(io("locking the ephemeral directory", &staging)(e));
            }
        };
        match Store::open_inner(
            &dir.join("graft.db"),
            opts,
            schema::MIGRATIONS,
            false,
            Some(dir.clone()),
        ) {
            Ok(mut s) => {
                s.ephemeral_lock = Some(lock);
                Ok(s)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    pub(crate) fn open_inner(
        path: &Path,
        opts: StoreOptions,
        migrations: &[Migration],
        durable: bool,
        ephemeral_dir: Option<PathBuf>,
    ) -> StoreResult<Store> {
        let supported = migrations.last().map_or(0, |m| m.version);
        let header = schema::inspect_file(path)?;
        if header.user_version > supported {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: header.user_version,
                supported,
            });
        }
        schema::check_header(path, &header)?;
        if !header.empty {
            schema::check_with_sqlite(path, supported)?;
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                what: "creating directory",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let created = header.empty;
        // An existing database this process cannot write (a read-only file,
        // -wal or -shm in a writable directory): SQLite would open it
        // read-only without a word and every later write would fail, even
        // once the file is writable again. It opens for reading instead, and
        // says why (a node refuses to start on it).
        if !created && header_version_is(path, supported) {
            if let Some(detail) = writer::unwritable_reason(path) {
                tracing::warn!(path = %path.display(), %detail, "storage: database is read-only; writes will fail");
                return Ok(Store::reading_only(path, opts, ephemeral_dir, detail));
            }
        }
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::from_sqlite("opening", path, e))?;
        let setup = configure_writer(&conn, path, &opts, durable)
            .and_then(|()| schema::migrate(&mut conn, path, migrations));
        match setup {
            Ok(_) => {}
            // A read-only file or directory holding a current database: the
            // store opens for reading and every write fails with `ReadOnly`
            // (a node keeps serving reads; its mutating requests fail).
            Err(StoreError::ReadOnly { detail })
                if !created && header_version_is(path, supported) =>
            {
                drop(conn);
                tracing::warn!(path = %path.display(), %detail, "storage: database is read-only; writes will fail");
                return Ok(Store::reading_only(path, opts, ephemeral_dir, detail));
            }
            Err(e) => return Err(e),
        }
        if created && durable {
            // The new file's directory entry must reach the disk too, or a
            // power loss could lose the whole file despite fsynced commits.
            if let Some(dir) = parent {
                sync_dir(dir)?;
            }
        }
        let (tx, rx) = mpsc::channel::<Submission>();
        let writer = Writer {
            conn,
            path: path.to_path_buf(),
            max_events_per_sandbox: opts.max_events_per_sandbox,
            identity: writer::file_identity(path),
        };
        let handle = std::thread::Builder::new()
            .name("graft-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Io {
                what: "starting the writer thread for",
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Store {
            path: path.to_path_buf(),
            opts,
            sender: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            readers: Mutex::new(Vec::new()),
            ephemeral_dir,
            read_only: None,
            ephemeral_lock: None,
        })
    }

    /// A store that only reads (every write fails with `ReadOnly { detail }`).
    fn reading_only(
        path: &Path,
        opts: StoreOptions,
        ephemeral_dir: Option<PathBuf>,
        detail: String,
    ) -> Store {
        Store {
            path: path.to_path_buf(),
            opts,
            sender: RwLock::new(None),
            writer: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            ephemeral_dir,
            read_only: Some(detail),
            ephemeral_lock: None,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this store is ephemeral ([`Store::in_memory`]).
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral_dir.is_some()
    }

    /// Why the store is read-only (its file or directory is not writable),
    /// if it is: reads work, every write fails with [`StoreError::ReadOnly`].
    pub fn read_only_reason(&self) -> Option<&str> {
        self.read_only.as_deref()
    }

    fn submit(&self, ops: Vec<WriteOp>, reply: Reply) -> StoreResult<()> {
        self.submit_as(ops, reply, false)
    }

    fn submit_as(&self, ops: Vec<WriteOp>, reply: Reply, lazy: bool) -> StoreResult<()> {
        if let Some(detail) = &self.read_only {
            return Err(StoreError::ReadOnly {
                detail: detail.clone(),
            });
        }
        let guard = self.sender.read();
        let Some(tx) = guard.as_ref() else {
            return Err(StoreError::Closed);
        };
        tx.send(Submission { ops, reply, lazy })
            .map_err(|_| StoreError::WriterGone("the writer thread is not running".into()))
    }

    /// Commits `ops` atomically (all or none) and returns once they are on
    /// disk, with one [`Applied`] per operation. Blocks the calling thread
    /// for about one fsync (shared with every concurrent submitter).
    pub fn write(&self, ops: Vec<WriteOp>) -> StoreResult<Receipt> {
        if ops.is_empty() {
            return Ok(Receipt::default());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(ops, Reply::Blocking(tx))?;
        rx.recv()
            .map_err(|_| StoreError::WriterGone("the writer stopped before answering".into()))?
    }

    /// [`Store::write`] for async callers: the submission is queued now (so
    /// submissions keep the order of the calls) and the future resolves after
    /// the commit. Dropping the future does not cancel the write.
    pub fn write_async(
        &self,
        ops: Vec<WriteOp>,
    ) -> impl std::future::Future<Output = StoreResult<Receipt>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = if ops.is_empty() {
            let _ = tx.send(Ok(Receipt::default()));
            Ok(())
        } else {
            self.submit(ops, Reply::Async(tx))
        };
        async move {
            queued?;
            rx.await
                .map_err(|_| StoreError::WriterGone("the writer stopped before answering".into()))?
        }
    }

    /// [`Store::write_async`] for writes nobody waits on (an audit row's
    /// completion): the writer holds a group made only of such writes for up
    /// to [`LAZY_WAIT`] so that they share the next waited-on commit (and its
    /// fsync) instead of costing one of their own. The future resolves after
    /// the commit; dropping it does not cancel the write. Order with other
    /// submissions is kept.
    pub fn write_lazy(
        &self,
        ops: Vec<WriteOp>,
    ) -> impl std::future::Future<Output = StoreResult<Receipt>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = if ops.is_empty() {
            let _ = tx.send(Ok(Receipt::default()));
            Ok(())
        } else {
            self.submit_as(ops, Reply::Async(tx), true)
        };
        async move {
            queued?;
            rx.await
                .map_err(|_| StoreError::WriterGone("the writer stopped before answering".into()))?
        }
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Path, &Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let pooled = self.readers.lock().pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| StoreError::from_sqlite("opening a reader", &self.path, e))?;
                c.busy_timeout(self.opts.busy_timeout)
                    .map_err(|e| StoreError::from_sqlite("opening a reader", &self.path, e))?;
                c
            }
        };
        let out = f(&self.path, &conn);
        let mut pool = self.readers.lock();
        if pool.len() < self.opts.readers {
            pool.push(conn);
        }
        out
    }

    /// Everything a restart restores, read in one consistent snapshot.
    pub fn load_all(&self) -> StoreResult<RestoreSnapshot> {
        self.with_reader(read::load_all)
    }

    /// Every stored sandbox, by id.
    pub fn sandboxes(&self) -> StoreResult<Vec<SandboxRecord>> {
        self.with_reader(read::sandboxes)
    }

    /// Events with a sequence number above `after` (0: from the first kept),
    /// of one sandbox or of all, oldest first, at most `limit`.
    pub fn events_since(
        &self,
        after: u64,
        sandbox: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<EventRecord>> {
        self.with_reader(|p, c| read::events_since(p, c, after, sandbox, limit))
    }

    /// What the event log has lost, per sandbox (see [`EventGaps`]).
    pub fn event_gaps(&self) -> StoreResult<EventGaps> {
        self.with_reader(read::event_gaps)
    }

    /// The highest event sequence number ever given (0: none), including
    /// pruned events: the next event gets a higher one.
    pub fn last_event_seq(&self) -> StoreResult<u64> {
        self.with_reader(read::last_event_seq)
    }

    /// The kept versions of a module, oldest first.
    pub fn versions(&self, sandbox: &str, module: &str) -> StoreResult<Vec<VersionRecord>> {
        self.with_reader(|p, c| read::versions(p, c, sandbox, module))
    }

    /// A module's pointers (current, stable, next number).
    pub fn module(&self, sandbox: &str, module: &str) -> StoreResult<Option<ModuleRecord>> {
        self.with_reader(|p, c| read::module(p, c, sandbox, module))
    }

    /// The kept version of a module whose source has this checksum, if any
    /// (a roll-forward re-uses its number).
    pub fn version_by_checksum(
        &self,
        sandbox: &str,
        module: &str,
        checksum: &str,
    ) -> StoreResult<Option<u32>> {
        self.with_reader(|p, c| read::version_by_checksum(p, c, sandbox, module, checksum))
    }

    /// The checkpoints of a sandbox, by registered name.
    pub fn checkpoints(&self, sandbox: &str) -> StoreResult<Vec<CheckpointRecord>> {
        self.with_reader(|p, c| read::checkpoints(p, c, sandbox))
    }

    /// Every token, revoked ones included.
    pub fn tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        self.with_reader(read::tokens)
    }

    /// The token whose secret has this SHA-256, if any (revoked or not). The
    /// lookup is by an index on the hash; the caller compares secrets in
    /// constant time if it holds them.
    pub fn token_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenRecord>> {
        self.with_reader(|p, c| read::token_by_hash(p, c, hash))
    }

    /// Audit rows with an id below `before` (`None`: the newest), newest
    /// first, at most `limit`.
    pub fn audit(&self, before: Option<u64>, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        self.with_reader(|p, c| read::audit_before(p, c, before, limit))
    }

    /// Audit rows matching `query`'s filters, newest first, at most
    /// `query.limit`.
    pub fn audit_query(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        self.with_reader(|p, c| read::audit_query(p, c, query))
    }

    /// Writes a consistent copy of the database to `dest` (which must not
    /// exist) while the node runs: `VACUUM INTO` on a read connection (it
    /// never blocks the writer), fsynced and renamed into place, so `dest`
    /// is either absent or a complete database.
    pub fn backup_to(&self, dest: impl AsRef<Path>) -> StoreResult<()> {
        self.with_reader(|p, c| vacuum_into(p, c, dest.as_ref()))
    }

    /// Backs up the database file `db` (which a node may be using) to
    /// `dest` through a read-only connection, like [`Store::backup_to`]:
    /// the `graft backup` command. Refuses a file this build cannot read.
    pub fn backup_file(db: impl AsRef<Path>, dest: impl AsRef<Path>) -> StoreResult<()> {
        let db = db.as_ref();
        if !db.is_file() {
            return Err(StoreError::Io {
                what: "opening",
                path: db.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no database here"),
            });
        }
        let header = schema::inspect_file(db)?;
        schema::check_header(db, &header)?;
        schema::check_with_sqlite(db, SCHEMA_VERSION)?;
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::from_sqlite("opening", db, e))?;
        vacuum_into(db, &conn, dest.as_ref())
    }

    /// Stops accepting writes, lets the writer commit everything already
    /// queued, folds the log into the database file and closes it. Later
    /// writes fail with [`StoreError::Closed`]; reads keep working on a
    /// durable store. Idempotent; drop calls it.
    pub fn close(&self) {
        drop(self.sender.write().take());
        if let Some(handle) = self.writer.lock().take() {
            if handle.join().is_err() {
                tracing::error!("storage: the writer thread panicked");
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
        self.readers.lock().clear();
        if let Some(dir) = &self.ephemeral_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Whether the schema version SQLite sees (read-only) is `version`.
fn header_version_is(path: &Path, version: u32) -> bool {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|c| c.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)))
    .is_ok_and(|v| v == i64::from(version))
}

fn configure_writer(
    conn: &Connection,
    path: &Path,
    opts: &StoreOptions,
    durable: bool,
) -> StoreResult<()> {
    let err = |e| StoreError::from_sqlite("configuring the database", path, e);
    conn.busy_timeout(opts.busy_timeout).map_err(err)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            detail: format!("could not switch to WAL mode (the journal mode is `{mode}`): is the file or its directory read-only?"),
        });
    }
    conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "OFF" })
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(err)?;
    if let Some(max) = opts.max_size_bytes {
        let page: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(err)?;
        let pages = (max / page.max(512) as u64).max(1);
        conn.pragma_update(
            None,
            "max_page_count",
            i64::try_from(pages).unwrap_or(i64::MAX),
        )
        .map_err(err)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> StoreResult<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|source| StoreError::Io {
                what: "syncing directory",
                path: dir.to_path_buf(),
                source,
            })
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
