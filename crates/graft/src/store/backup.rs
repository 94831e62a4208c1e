//! Backups: a consistent copy of the database (`VACUUM INTO`) published
//! under its final name only once complete.
//!
//! Invariants:
//! * The destination is either absent or a complete, fsynced database: the
//!   copy is written beside it under a name of our own and linked into place.
//! * An existing file is never overwritten, even one that appears while the
//!   copy is being made.

use std::path::Path;

use rusqlite::Connection;

use super::error::{StoreError, StoreResult};
use super::sync_dir;

/// `VACUUM INTO` a temporary file beside `dest`, fsynced and renamed into
/// place, so `dest` is either absent or a complete database.
pub(super) fn vacuum_into(p: &Path, c: &Connection, dest: &Path) -> StoreResult<()> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { what, path, source }
    };
    if dest.exists() {
        return Err(io("backing up to", dest)(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the file exists; choose a new name",
        )));
    }
    let parent = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(io("backing up to", dest)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "its directory does not exist; create it first",
        )));
    }
    // A name of our own: a file the user happens to have at `DEST.partial`
    // is not ours to delete, and two backups to one name do not clobber
    // each other's copy.
    let mut tmp_name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(format!(
        ".{}-{}.partial",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let tmp = dest.with_file_name(tmp_name);
    let tmp_str = tmp.to_str().ok_or_else(|| StoreError::Invalid {
        op: "backup",
        detail: format!("the path {} is not valid UTF-8", tmp.display()),
    })?;
    let result = c
        .execute("VACUUM INTO ?1", [tmp_str])
        .map(|_| ())
        .map_err(|e| match &e {
            // The copy could not be created: the destination is the problem.
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::PermissionDenied
                ) =>
            {
                StoreError::from_sqlite("backing up", dest, e)
            }
            _ => StoreError::from_sqlite("backing up", p, e),
        })
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("syncing", &tmp))
        })
        .and_then(|()| publish_no_clobber(&tmp, dest).map_err(io("renaming the backup to", dest)))
        .and_then(|()| sync_dir(parent));
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Gives `tmp` the name `dest` unless `dest` appeared meanwhile: a hard
/// link fails atomically on an existing name, where a rename would replace
/// it. File systems without hard links fall back to a checked rename.
fn publish_no_clobber(tmp: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(tmp, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the file exists; choose a new name",
        )),
        Err(_) if !dest.exists() => std::fs::rename(tmp, dest),
        Err(e) => Err(e),
    }
}
