//! [`StoreError`]: everything the storage layer can fail with, one variant per
//! thing a caller can act on. SQLite's result codes are classified once, here,
//! so no caller ever matches on a message.

use std::path::PathBuf;

use rusqlite::ErrorCode;

/// A `Result` with [`StoreError`].
pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// What went wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database was written by a newer Graft; it was left untouched.
    #[error(
        "database {path} has schema version {found}, but this Graft knows versions up to \
         {supported}: it was written by a newer Graft; the file was left untouched \
         (use that newer Graft, or restore a backup)"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` found in the file.
        found: u32,
        /// The newest schema version this build can read and write.
        supported: u32,
    },
    /// The file is not a (readable) Graft database: random bytes, a truncated
    /// file, a damaged page, another application's database.
    #[error("database {path} is corrupt or not a Graft database: {detail}; restore a backup or move the file away")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// A write was refused because the file, its directory or the store is
    /// read-only. Nothing of the submission was applied.
    #[error("storage is read-only: {detail}; nothing was written")]
    ReadOnly {
        /// What SQLite or the file system said.
        detail: String,
    },
    /// The disk (or the store's `max_size_bytes`) is full. Nothing of the
    /// submission was applied.
    #[error("storage is full: {detail}; nothing was written")]
    Full {
        /// What SQLite or the file system said.
        detail: String,
    },
    /// The database could not be opened or created (missing directory,
    /// permissions, lock held by something else …).
    #[error("cannot open database {path}: {detail}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A file-system error outside SQLite (creating the directory, syncing,
    /// renaming a backup).
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done: `creating directory`, `syncing` …
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A write broke a rule of the schema: a duplicate key, a reference to a
    /// sandbox or version that is not stored, a current version being dropped,
    /// a JSON column that is not JSON.
    #[error("{op}: {detail}")]
    Constraint {
        /// The operation that failed (`put_version`, `set_current` …).
        op: &'static str,
        /// What rule it broke.
        detail: String,
    },
    /// A write named a row that does not exist.
    #[error("{op}: {what} is not stored")]
    NotFound {
        /// The operation that failed.
        op: &'static str,
        /// What was missing, e.g. `sandbox \`demo\``.
        what: String,
    },
    /// A value does not fit the storage (a version number above 2^32, a time
    /// that is not finite …).
    #[error("{op}: {detail}")]
    Invalid {
        /// The operation that failed.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The store was shut down; nothing was written.
    #[error("the store is closed; nothing was written")]
    Closed,
    /// The writer thread stopped unexpectedly (a bug); the submission's fate is
    /// unknown only if it was already queued, which the writer reports as this
    /// error before it stops accepting.
    #[error("the store's writer thread stopped: {0}")]
    WriterGone(String),
    /// Any other SQLite error, with what was being done.
    #[error("{context}: {source}")]
    Sqlite {
        /// What was being done.
        context: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
}

impl StoreError {
    /// A stable machine-readable name (`storage_full`, `storage_read_only` …),
    /// for the HTTP API's `error.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NewerSchema { .. } => "storage_newer_schema",
            StoreError::Corrupt { .. } => "storage_corrupt",
            StoreError::ReadOnly { .. } => "storage_read_only",
            StoreError::Full { .. } => "storage_full",
            StoreError::Open { .. } => "storage_open",
            StoreError::Io { .. } => "storage_io",
            StoreError::Constraint { .. } => "storage_constraint",
            StoreError::NotFound { .. } => "storage_not_found",
            StoreError::Invalid { .. } => "storage_invalid",
            StoreError::Closed => "storage_closed",
            StoreError::WriterGone(_) => "storage_writer_gone",
            StoreError::Sqlite { .. } => "storage_error",
        }
    }

    /// What a remote client is told about this error: what failed, in
    /// words, and why, with every absolute path shortened to its last
    /// component (`…/graft.db`): the node's log has the full paths, an API
    /// body does not show the host's directory layout to a remote caller.
    /// Store errors never hold a token or a request's payload.
    ///
    /// ```
    /// use graft::store::StoreError;
    /// let e = StoreError::ReadOnly {
    ///     detail: "the database file /srv/app/.graft/graft.db is not writable (Permission denied)".into(),
    /// };
    /// let m = e.client_message();
    /// assert!(m.starts_with("the node's storage is read-only ("), "{m}");
    /// assert!(m.contains("…/graft.db") && !m.contains("/srv"), "{m}");
    /// ```
    pub fn client_message(&self) -> String {
        let what = match self {
            StoreError::ReadOnly { .. } => "the node's storage is read-only",
            StoreError::Full { .. } => "the node's storage is full",
            StoreError::Corrupt { .. } => "the node's database is corrupt",
            StoreError::NewerSchema { .. } => "the node's database is from a newer Graft",
            StoreError::Open { .. } | StoreError::Io { .. } => "the node's storage failed",
            StoreError::Closed => "the node is shutting down",
            StoreError::WriterGone(_) => "the node's database writer stopped",
            _ => "the node's storage refused the write",
        };
        let why = match self {
            // Their own text would repeat `what` and "nothing was written".
            StoreError::ReadOnly { detail } | StoreError::Full { detail } => detail.clone(),
            other => other.to_string(),
        };
        format!("{what} ({})", shorten_paths(&why))
    }

    /// Classifies a SQLite error met while doing `op` (the operation's name,
    /// also used as the context of unclassified errors).
    pub(crate) fn from_sqlite(
        op: &'static str,
        path: &std::path::Path,
        e: rusqlite::Error,
    ) -> StoreError {
        let code = match &e {
            rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
            _ => None,
        };
        let detail = e.to_string();
        match code {
            Some(ErrorCode::ReadOnly) => StoreError::ReadOnly { detail },
            Some(ErrorCode::DiskFull) => StoreError::Full { detail },
            Some(ErrorCode::DatabaseCorrupt) | Some(ErrorCode::NotADatabase) => {
                StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail,
                }
            }
            Some(ErrorCode::ConstraintViolation) => StoreError::Constraint { op, detail },
            Some(ErrorCode::CannotOpen) | Some(ErrorCode::PermissionDenied) => StoreError::Open {
                path: path.to_path_buf(),
                detail,
            },
            _ => StoreError::Sqlite {
                context: op,
                source: e,
            },
        }
    }
}

/// `text` with each absolute path (a word starting with `/`, after an
/// opening bracket or quote) cut to `…/` and its last component.
fn shorten_paths(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('/') {
        let starts_word = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || "([{'\"`".contains(c));
        out.push_str(&rest[..i]);
        if !starts_word {
            out.push('/');
            rest = &rest[i + 1..];
            continue;
        }
        let path = &rest[i..];
        let end = path
            .find(|c: char| c.is_whitespace() || ")]}'\"`,;".contains(c))
            .unwrap_or(path.len());
        // A trailing `:` or `.` ends the sentence, not the path.
        let end = path[..end].trim_end_matches([':', '.']).len();
        let last = path[..end]
            .rsplit('/')
            .find(|c| !c.is_empty())
            .unwrap_or("");
        out.push_str("…/");
        out.push_str(last);
        rest = &path[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_name_the_reason_but_no_absolute_path() {
        let ro = StoreError::ReadOnly {
            detail: "the data directory /home/ann/app/.graft is not writable (Permission denied (os error 13))".into(),
        };
        let m = ro.client_message();
        assert_eq!(
            m,
            "the node's storage is read-only (the data directory …/.graft \
             is not writable (Permission denied (os error 13)))"
        );
        let io = StoreError::Io {
            what: "writing",
            path: "/var/lib/graft/graft.db".into(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!(
            io.client_message(),
            "the node's storage failed (writing …/graft.db: gone)"
        );
        let full = StoreError::Full {
            detail: "database or disk is full".into(),
        };
        assert!(full
            .client_message()
            .starts_with("the node's storage is full ("));
        // Relative paths and a `/` inside a word are left alone.
        assert_eq!(shorten_paths("a/b and 1/2 (/x/y)."), "a/b and 1/2 (…/y).");
    }
}
