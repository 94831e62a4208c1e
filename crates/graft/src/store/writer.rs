//! The writer thread: the only owner of the read-write connection, and the
//! group commit.
//!
//! Invariants:
//! * Submissions are applied in the order they were queued; each one commits
//!   atomically (all its operations or none).
//! * A submission is acknowledged only after the transaction that holds it
//!   committed (with `synchronous=FULL`: after the write-ahead log was
//!   fsync'ed), or with the error that kept it out.
//! * One failing submission fails alone: each runs inside its own SAVEPOINT
//!   of the group's transaction and is rolled back to it on error. If the
//!   group as a whole cannot commit (disk full at commit, an I/O error, SQLite
//!   rolling the transaction back by itself), every submission that had not
//!   failed on its own is retried in a transaction of its own, so an error is
//!   always reported to the submission that caused it.
//! * The thread ends when every sender is gone, after draining what was
//!   queued; it then checkpoints the log into the database and closes.

use std::path::PathBuf;
use std::sync::mpsc;

use rusqlite::Connection;

use super::apply::apply;
use super::error::{StoreError, StoreResult};
use super::ops::{Applied, ApplyCtx, WriteOp};

/// At most this many submissions share one transaction: bounds the time a
/// submitter waits behind others and the size of one WAL commit.
pub(crate) const MAX_GROUP: usize = 1024;

/// How long a group made only of lazy submissions ([`Store::write_lazy`](super::Store::write_lazy))
/// waits for a waited-on one to share its commit.
pub const LAZY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// The result of a committed submission: one [`Applied`] per operation, in
/// order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Receipt {
    /// What each operation produced.
    pub applied: Vec<Applied>,
}

impl Receipt {
    /// The sequence numbers of the events appended, in order.
    pub fn event_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.applied.iter().filter_map(|a| match a {
            Applied::Event { seq } => Some(*seq),
            _ => None,
        })
    }
}

pub(crate) enum Reply {
    Blocking(mpsc::SyncSender<StoreResult<Receipt>>),
    Async(tokio::sync::oneshot::Sender<StoreResult<Receipt>>),
}

impl Reply {
    fn send(self, r: StoreResult<Receipt>) {
        // A submitter that stopped waiting (a dropped future) is not an error
        // of the store: its write stands.
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(r);
            }
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

pub(crate) struct Submission {
    pub ops: Vec<WriteOp>,
    pub reply: Reply,
    /// Nobody waits on it: it may wait for company (see [`LAZY_WAIT`]).
    pub lazy: bool,
}

pub(crate) struct Writer {
    pub conn: Connection,
    pub path: PathBuf,
    pub max_events_per_sandbox: u64,
    /// The database file's (device, inode) when it was opened: a file
    /// deleted or replaced under a running node (`git clean`, `rm -r`) would
    /// otherwise take every later commit with it, acknowledged but gone.
    pub identity: Option<(u64, u64)>,
}

/// Whether this process may write `path` (faccessat(2) with `W_OK` for the
/// effective user: its permissions, and `EROFS` on a read-only mount).
pub(crate) fn writable(path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        let rc =
            unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Why the database at `path` cannot be written by this process, if so: its
/// directory, the file itself, or its `-wal` / `-shm` companions (when they
/// exist) are not writable. SQLite would silently open a read-only file
/// read-only, or go on writing through handles opened earlier, so this is
/// asked before a store opens for writing and before each commit.
pub(crate) fn unwritable_reason(path: &std::path::Path) -> Option<String> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let companion = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let (wal, shm) = (companion("-wal"), companion("-shm"));
    let checks: [(&str, &std::path::Path); 4] = [
        ("data directory", dir),
        ("database file", path),
        ("database's write-ahead log", &wal),
        ("database's shared-memory file", &shm),
    ];
    for (what, p) in checks {
        match writable(p) {
            Ok(()) => {}
            // A companion file that does not exist yet is created by SQLite
            // in the (writable) directory.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && p != dir => {}
            Err(e) => return Some(format!("the {what} {} is not writable ({e})", p.display())),
        }
    }
    None
}

/// The (device, inode) of `path`, where the platform has them.
pub(crate) fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

impl Writer {
    pub(crate) fn run(self, rx: mpsc::Receiver<Submission>) {
        while let Ok(first) = rx.recv() {
            let mut group = Vec::with_capacity(16);
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(s) => group.push(s),
                    Err(_) => break,
                }
            }
            if group.iter().all(|s| s.lazy) {
                // Nobody waits on these: let the next waited-on write carry
                // them (one commit, one fsync) unless none comes soon.
                if let Ok(s) = rx.recv_timeout(LAZY_WAIT) {
                    group.push(s);
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(s) => group.push(s),
                            Err(_) => break,
                        }
                    }
                }
            }
            let results = match (self.moved_away(), self.unwritable()) {
                (Some(why), _) => group
                    .iter()
                    .map(|_| {
                        Err(StoreError::Io {
                            what: "writing",
                            path: self.path.clone(),
                            source: std::io::Error::new(std::io::ErrorKind::NotFound, why),
                        })
                    })
                    .collect(),
                (None, Some(detail)) => group
                    .iter()
                    .map(|_| {
                        Err(StoreError::ReadOnly {
                            detail: detail.clone(),
                        })
                    })
                    .collect(),
                (None, None) => self.commit_group(&group),
            };
            for (s, r) in group.into_iter().zip(results) {
                s.reply.send(r);
            }
        }
        // Folds the log into the database so a clean stop leaves one file
        // (SQLite also deletes the -wal when the last connection closes).
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %e, "storage: final checkpoint failed; the log is replayed on next open");
        }
        if let Err((_, e)) = self.conn.close() {
            tracing::warn!(error = %e, "storage: closing the database failed");
        }
    }

    /// Why the database file is no longer the one this store opened, if so.
    fn moved_away(&self) -> Option<&'static str> {
        let opened = self.identity?;
        match file_identity(&self.path) {
            Some(now) if now == opened => None,
            Some(_) => Some("the database file was replaced while the node ran; nothing was written (restart the node)"),
            None => Some("the database file was deleted while the node ran; nothing was written (restart the node)"),
        }
    }

    /// Why the database can no longer be written, if its file or directory
    /// stopped being writable for this process (a `chmod`, a read-only
    /// remount). SQLite would go on writing through the file handles it
    /// opened before, so the data directory's owner could not stop a node
    /// from writing: this makes a read-only data directory fail each write
    /// (and the request behind it) with nothing applied, and writes resume
    /// once it is writable again.
    fn unwritable(&self) -> Option<String> {
        unwritable_reason(&self.path)
            .map(|why| format!("{why}; the node keeps running, make it writable again to write"))
    }

    fn ctx(&self) -> ApplyCtx<'_> {
        ApplyCtx {
            max_events_per_sandbox: self.max_events_per_sandbox,
            path: &self.path,
        }
    }

    fn err(&self, what: &'static str, e: rusqlite::Error) -> StoreError {
        StoreError::from_sqlite(what, &self.path, e)
    }

    /// Commits a group in one transaction; see the module invariants.
    fn commit_group(&self, group: &[Submission]) -> Vec<StoreResult<Receipt>> {
        let mut results: Vec<Option<StoreResult<Receipt>>> =
            (0..group.len()).map(|_| None).collect();
        let group_ok = self.conn.execute_batch("BEGIN IMMEDIATE").is_ok() && {
            let mut intact = true;
            for (i, sub) in group.iter().enumerate() {
                match self.apply_in_savepoint(&sub.ops) {
                    Ok(r) => results[i] = Some(Ok(r)),
                    Err(e) => {
                        results[i] = Some(Err(e));
                        if self.conn.is_autocommit() {
                            // SQLite rolled the whole transaction back (e.g.
                            // SQLITE_FULL): the others are retried alone.
                            intact = false;
                            break;
                        }
                    }
                }
            }
            intact && self.conn.execute_batch("COMMIT").is_ok()
        };
        if group_ok {
            return results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(StoreError::WriterGone("lost result".into()))))
                .collect();
        }
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        group
            .iter()
            .zip(results)
            .map(|(sub, r)| match r {
                Some(Err(e)) => Err(e),
                _ => self.commit_alone(&sub.ops),
            })
            .collect()
    }

    fn apply_in_savepoint(&self, ops: &[WriteOp]) -> StoreResult<Receipt> {
        self.conn
            .execute_batch("SAVEPOINT submission")
            .map_err(|e| self.err("starting a submission", e))?;
        let mut applied = Vec::with_capacity(ops.len());
        let mut failure = None;
        for op in ops {
            match apply(&self.conn, op, self.ctx()) {
                Ok(a) => applied.push(a),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if self.conn.is_autocommit() {
            return Err(
                failure.unwrap_or_else(|| StoreError::WriterGone("transaction rolled back".into()))
            );
        }
        match failure {
            None => {
                self.conn
                    .execute_batch("RELEASE submission")
                    .map_err(|e| self.err("ending a submission", e))?;
                Ok(Receipt { applied })
            }
            Some(e) => {
                if let Err(re) = self
                    .conn
                    .execute_batch("ROLLBACK TO submission; RELEASE submission")
                {
                    tracing::warn!(error = %re, "storage: rolling back a failed submission failed");
                }
                Err(e)
            }
        }
    }

    fn commit_alone(&self, ops: &[WriteOp]) -> StoreResult<Receipt> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err("beginning a transaction", e))?;
        let mut applied = Vec::with_capacity(ops.len());
        for op in ops {
            match apply(&self.conn, op, self.ctx()) {
                Ok(a) => applied.push(a),
                Err(e) => {
                    if !self.conn.is_autocommit() {
                        let _ = self.conn.execute_batch("ROLLBACK");
                    }
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            return Err(self.err("committing", e));
        }
        Ok(Receipt { applied })
    }
}
