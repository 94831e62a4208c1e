//! The data directory of a durable node: its lock file, and what a refused
//! start removes again.
//!
//! # Invariants
//! * A node refuses to start on a data directory it cannot write (the
//!   database must take every acknowledged change).
//! * Two nodes never hold one directory's lock at once: the lock is taken on
//!   the file at `graft.lock` *now* (a lock on an unlinked file locks
//!   nothing), and a refused start unlinks the lock file only while it still
//!   holds it.
//! * A refused start leaves the directory as it found it: only what that
//!   start created (the directory, the lock file, SQLite's `-wal`/`-shm`
//!   beside a database it only read) is removed.

use crate::error::{Error, Result};

/// The database file inside a data directory.
pub const DATABASE_FILE: &str = "graft.db";

/// The error of a node opened on a data directory it cannot write.
pub(super) fn read_only_dir(dir: &std::path::Path, why: &str) -> Error {
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
pub(super) struct Found {
    dir: bool,
    lock: bool,
    wal: bool,
    shm: bool,
}

impl Found {
    pub(super) fn look(dir: &std::path::Path) -> Found {
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
    pub(super) fn restore(&self, dir: &std::path::Path, lock: Option<std::fs::File>) {
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
pub(super) fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
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
