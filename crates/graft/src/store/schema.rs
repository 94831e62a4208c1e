//! The schema, its forward migrations, and the checks made before SQLite may
//! touch a file.
//!
//! Invariants:
//! * `PRAGMA user_version` is the number of the last migration applied; each
//!   migration runs in its own transaction together with the `user_version`
//!   bump, so a crash leaves the file at one version or the next, never
//!   between.
//! * Migrations only ever add (tables, columns with defaults, indexes): a
//!   database is never rewritten, so a migration costs no time proportional
//!   to its size; the one exception, version 2, reads the events table
//!   once, in number order, to seed its new table.
//! * A file is inspected with plain reads ([`inspect_file`]) and, if it may
//!   hold a write-ahead log, with a read-only SQLite connection before any
//!   read-write connection opens it: a file that this build must refuse (newer
//!   schema, not a database, truncated) is left byte-for-byte as it was.

use std::io::Read;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::error::{StoreError, StoreResult};

/// `PRAGMA application_id` of a Graft database ("GRFT"): tells a Graft
/// database from another application's SQLite file.
pub const APPLICATION_ID: u32 = 0x4752_4654;

/// One forward migration: the SQL that takes a database from `version - 1` to
/// `version`.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// The schema version after this migration (1, 2, 3 … without holes).
    pub version: u32,
    /// What it does, for logs.
    pub name: &'static str,
    /// The statements; run in one transaction with the `user_version` bump.
    pub sql: &'static str,
}

/// Every migration of this build, oldest first. Append, never edit: a file
/// at version N has run exactly the first N of these.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "sandboxes, module versions, events, checkpoints, tokens, audit",
        sql: V1,
    },
    Migration {
        version: 2,
        name: "the event numbers each sandbox has lost",
        sql: V2,
    },
];

/// The newest schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Per-sandbox gaps of the event log, so that after a restart a reader of one
/// sandbox is told of its own lost events only (before: of any sandbox's).
///
/// The one migration that reads data: the events an older Graft kept do not
/// say whose were pruned, so each sandbox's row starts at the highest missing
/// number below its oldest kept event (what that Graft told its readers).
/// Once, in one pass over the events in number order (an older Graft
/// may have left many sandboxes' events: its deleted ones' too).
const V2: &str = r#"
-- The highest event number each sandbox has lost: pruned beyond
-- max_events_per_sandbox (in the pruning's transaction), or dropped unwritten
-- while the store refused writes (with the next write that lands). A row
-- goes when its sandbox's events do (DeleteEvents), so deleted sandboxes
-- leave nothing behind.
CREATE TABLE event_gaps (
    sandbox TEXT PRIMARY KEY NOT NULL,
    through INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

INSERT INTO event_gaps (sandbox, through)
-- In one pass over the events in number order (window functions, so the
-- cost grows with the events, not with events × sandboxes): `edge` is the
-- missing number just below an event, if any; `through` the highest edge
-- so far; a sandbox's row is `through` at its oldest kept event.
SELECT sandbox, through FROM (
    SELECT sandbox,
           MAX(edge) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS through,
           ROW_NUMBER() OVER (PARTITION BY sandbox ORDER BY seq) AS nth
    FROM (
        SELECT sandbox, seq,
               CASE WHEN seq > 1 AND seq - 1 > coalesce(lag(seq) OVER (ORDER BY seq), 0)
                    THEN seq - 1 END AS edge
        FROM events
    )
)
WHERE nth = 1 AND sandbox IS NOT NULL AND through IS NOT NULL;
"#;

const V1: &str = r#"
PRAGMA application_id = 1196574292;

-- One row per live sandbox. Deleting it deletes its modules, versions and
-- checkpoints (ON DELETE CASCADE); its events and audit rows stay (they name
-- the sandbox by id, without a reference).
CREATE TABLE sandboxes (
    id           TEXT PRIMARY KEY NOT NULL,
    entry        TEXT,
    limits       TEXT NOT NULL CHECK (json_valid(limits)),
    capabilities TEXT NOT NULL CHECK (json_valid(capabilities)),
    source_root  TEXT,
    spec         TEXT NOT NULL CHECK (json_valid(spec)),
    created_ms   REAL NOT NULL
) STRICT;

-- Every kept version of every module.
CREATE TABLE module_versions (
    sandbox      TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    module       TEXT NOT NULL,
    version      INTEGER NOT NULL CHECK (version >= 1),
    checksum     TEXT NOT NULL,
    source       TEXT NOT NULL,
    dependencies TEXT NOT NULL CHECK (json_valid(dependencies)),
    status       TEXT NOT NULL CHECK (status IN ('permanent', 'canary')),
    created_ms   REAL NOT NULL,
    PRIMARY KEY (sandbox, module, version)
) STRICT, WITHOUT ROWID;
CREATE INDEX module_versions_by_checksum ON module_versions (sandbox, module, checksum);

-- Per module: the current version, the stable one (the last current version
-- that was permanent: what a restart restores), and the next number to mint
-- (monotonic even when the newest versions are dropped). `current` and
-- `stable` reference stored versions, so neither can be dropped.
CREATE TABLE modules (
    sandbox      TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    module       TEXT NOT NULL,
    current      INTEGER,
    stable       INTEGER,
    next_version INTEGER NOT NULL CHECK (next_version >= 1),
    file         TEXT,
    PRIMARY KEY (sandbox, module),
    FOREIGN KEY (sandbox, module, current) REFERENCES module_versions (sandbox, module, version),
    FOREIGN KEY (sandbox, module, stable) REFERENCES module_versions (sandbox, module, version)
) STRICT, WITHOUT ROWID;

-- Events; `seq` is node-wide, never reused (AUTOINCREMENT), and is the SSE id.
-- At most `max_events_per_sandbox` are kept per sandbox (NULL: node events).
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox TEXT,
    kind    TEXT NOT NULL,
    payload TEXT NOT NULL CHECK (json_valid(payload)),
    at_ms   REAL NOT NULL
) STRICT;
CREATE INDEX events_by_sandbox ON events (sandbox, seq);

-- The last checkpoint of each registered process.
CREATE TABLE checkpoints (
    sandbox        TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    module         TEXT NOT NULL,
    module_version INTEGER NOT NULL,
    state          TEXT NOT NULL CHECK (json_valid(state)),
    at_ms          REAL NOT NULL,
    PRIMARY KEY (sandbox, name)
) STRICT, WITHOUT ROWID;

-- API tokens: only the SHA-256 of the secret is stored.
CREATE TABLE tokens (
    id         TEXT PRIMARY KEY NOT NULL,
    hash       BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    sandboxes  TEXT CHECK (sandboxes IS NULL OR json_valid(sandboxes)),
    label      TEXT,
    created_ms REAL NOT NULL,
    revoked_ms REAL
) STRICT;

-- One row per audited request.
CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       REAL NOT NULL,
    token_id    TEXT,
    role        TEXT,
    method      TEXT NOT NULL,
    route       TEXT NOT NULL,
    sandbox     TEXT,
    outcome     TEXT NOT NULL,
    status      INTEGER,
    duration_us INTEGER NOT NULL
) STRICT;
CREATE INDEX audit_by_time ON audit (at_ms);
CREATE INDEX audit_by_sandbox ON audit (sandbox, id);
"#;

/// What the plain bytes of a database file say, read without SQLite.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FileHeader {
    /// The file is absent or empty: a new database.
    pub empty: bool,
    pub user_version: u32,
    pub application_id: u32,
}

/// Reads a database file's header with plain file reads: refuses random
/// bytes and files shorter than their header says, and reports the schema
/// version recorded at the last checkpoint (a newer one may sit in the
/// write-ahead log; [`check_with_sqlite`] sees that).
pub(crate) fn inspect_file(path: &Path) -> StoreResult<FileHeader> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileHeader {
                empty: true,
                ..FileHeader::default()
            })
        }
        Err(e) => {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })
        }
    };
    let len = file
        .metadata()
        .map_err(|source| StoreError::Io {
            what: "reading metadata of",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if len == 0 {
        return Ok(FileHeader {
            empty: true,
            ..FileHeader::default()
        });
    }
    let mut header = [0u8; 100];
    if len < 100 {
        return Err(corrupt(format!(
            "the file has only {len} bytes, less than a SQLite header"
        )));
    }
    file.read_exact(&mut header)
        .map_err(|source| StoreError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })?;
    if &header[..16] != b"SQLite format 3\0" {
        return Err(corrupt(
            "the file does not start with a SQLite header".into(),
        ));
    }
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536u64,
        n if n >= 512 && n.is_power_of_two() => u64::from(n),
        n => return Err(corrupt(format!("invalid page size {n} in the header"))),
    };
    // The in-header page count is valid when the "version-valid-for" number
    // equals the change counter (every SQLite since 3.7.0 keeps it so). A
    // checkpoint interrupted by a crash (page 1 copied from the write-ahead
    // log, the pages past the old end not yet) leaves the file shorter than
    // that count while the log beside it still holds those pages, and
    // opening replays it: only without a log is a short file truncated.
    let pages = u64::from(be32(28));
    if be32(92) == be32(24) && pages > 0 && len < pages * page_size && !has_wal(path) {
        return Err(corrupt(format!(
            "the file is truncated: its header counts {pages} pages of {page_size} bytes ({} bytes) but it has {len}",
            pages * page_size
        )));
    }
    Ok(FileHeader {
        empty: false,
        user_version: be32(60),
        application_id: be32(68),
    })
}

/// Whether a non-empty write-ahead log lies beside the database at `path`.
fn has_wal(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).is_ok_and(|m| m.len() > 0)
}

/// Refuses a header that this build must not open read-write.
pub(crate) fn check_header(path: &Path, h: &FileHeader) -> StoreResult<()> {
    if h.empty {
        return Ok(());
    }
    if h.application_id != 0 && h.application_id != APPLICATION_ID {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!(
                "its application id is {:#010x}, not Graft's",
                h.application_id
            ),
        });
    }
    if h.user_version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: h.user_version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Opens the file read-only and checks what SQLite sees (including a
/// write-ahead log left by a crash): the schema version, the application id,
/// and that a version-0 file holds no foreign tables. A read-only connection
/// never writes the database file.
pub(crate) fn check_with_sqlite(path: &Path, supported: u32) -> StoreResult<()> {
    let err = |e| {
        match StoreError::from_sqlite("checking the database", path, e) {
        // SQLite reads a WAL database only if it can use (or create) the
        // `-shm` file beside it.
        StoreError::ReadOnly { detail } => StoreError::ReadOnly {
            detail: format!(
                "{detail}: cannot read {} because its directory is not writable and it has no -shm file; \
                 make the directory writable",
                path.display()
            ),
        },
        other => other,
    }
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    let user_version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    let application_id: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(err)?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    let header = FileHeader {
        empty: false,
        user_version: u32::try_from(user_version).unwrap_or(u32::MAX),
        application_id: application_id as u32,
    };
    if header.user_version > supported {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: header.user_version,
            supported,
        });
    }
    check_header(path, &header)?;
    if header.user_version == 0 && tables > 0 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("it holds {tables} tables but no Graft schema version"),
        });
    }
    Ok(())
}

/// Applies every migration in `migrations` newer than the file's version,
/// each in its own transaction. Returns the version reached.
pub(crate) fn migrate(
    conn: &mut Connection,
    path: &Path,
    migrations: &[Migration],
) -> StoreResult<u32> {
    let err = |e| StoreError::from_sqlite("migrating the schema", path, e);
    let mut current: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
        .map_err(err)?
        .try_into()
        .unwrap_or(u32::MAX);
    let newest = migrations.last().map_or(0, |m| m.version);
    if current > newest {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: current,
            supported: newest,
        });
    }
    let start = current;
    for m in migrations.iter().filter(|m| m.version > start) {
        if m.version != current + 1 {
            return Err(StoreError::Invalid {
                op: "migrating the schema",
                detail: format!("migration {} follows version {current}: migrations must be numbered without holes", m.version),
            });
        }
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(m.sql).map_err(err)?;
        tx.pragma_update(None, "user_version", i64::from(m.version))
            .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "storage schema migrated"
        );
        current = m.version;
    }
    Ok(current)
}
