//! The reads the node needs, on read-only connections of their own.
//!
//! Invariants:
//! * A read never takes the writer's connection or lock: in WAL mode a reader
//!   sees the last commit made before its read transaction began and never
//!   blocks, nor is blocked by, the writer.
//! * A read of several tables ([`load_all`]) runs in one read transaction, so
//!   it sees one consistent state.
//! * A stored value that cannot be decoded (a version number out of range, a
//!   JSON list that is not one) is reported as `Corrupt`, never a panic.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::error::{StoreError, StoreResult};
use super::records::{
    AuditQuery, AuditRecord, CheckpointRecord, EventGaps, EventRecord, ModuleRecord,
    ModuleSnapshot, RestoreSnapshot, SandboxRecord, SandboxSnapshot, TokenRecord, VersionRecord,
    VersionStatus,
};

fn bad(path: &Path, detail: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

fn u32_col(path: &Path, what: &str, v: i64) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| bad(path, format!("{what} {v} is out of range")))
}

fn list(path: &Path, what: &str, json: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(json)
        .map_err(|e| bad(path, format!("{what} is not a list of strings: {e}")))
}

/// Collects rows mapped by `raw` (SQLite access only) and then decoded by
/// `decode` (which may fail as `Corrupt`).
fn collect<R, T>(
    path: &Path,
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    raw: impl FnMut(&Row<'_>) -> rusqlite::Result<R>,
    mut decode: impl FnMut(R) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let err = |e| StoreError::from_sqlite("reading", path, e);
    let mut st = conn.prepare_cached(sql).map_err(err)?;
    let rows = st.query_map(params, raw).map_err(err)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(decode(r.map_err(err)?)?);
    }
    Ok(out)
}

type RawSandbox = (
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    String,
    f64,
);
const SANDBOX_COLS: &str = "id, entry, limits, capabilities, source_root, spec, created_ms";
/// A row as a tuple of its columns (rusqlite converts tuples of `FromSql`).
fn row_tuple<T>(r: &Row<'_>) -> rusqlite::Result<T>
where
    T: for<'a> TryFrom<&'a Row<'a>, Error = rusqlite::Error>,
{
    T::try_from(r)
}
fn sandbox(path: &Path, r: RawSandbox) -> StoreResult<SandboxRecord> {
    Ok(SandboxRecord {
        capabilities: list(path, "capabilities", &r.3)?,
        id: r.0,
        entry: r.1,
        limits_json: r.2,
        source_root: r.4,
        spec_json: r.5,
        created_ms: r.6,
    })
}

type RawVersion = (String, String, i64, String, String, String, String, f64);
const VERSION_COLS: &str =
    "sandbox, module, version, checksum, source, dependencies, status, created_ms";
fn version(path: &Path, r: RawVersion) -> StoreResult<VersionRecord> {
    Ok(VersionRecord {
        version: u32_col(path, "version", r.2)?,
        dependencies: list(path, "dependencies", &r.5)?,
        status: VersionStatus::parse(&r.6)
            .ok_or_else(|| bad(path, format!("version status `{}`", r.6)))?,
        sandbox: r.0,
        module: r.1,
        checksum: r.3,
        source: r.4,
        created_ms: r.7,
    })
}

type RawModule = (
    String,
    String,
    Option<i64>,
    Option<i64>,
    i64,
    Option<String>,
);
fn decode_module(path: &Path, r: RawModule) -> StoreResult<ModuleRecord> {
    Ok(ModuleRecord {
        current: r
            .2
            .map(|v| u32_col(path, "current version", v))
            .transpose()?,
        stable: r
            .3
            .map(|v| u32_col(path, "stable version", v))
            .transpose()?,
        next_version: u32_col(path, "next version", r.4)?,
        sandbox: r.0,
        module: r.1,
        file: r.5,
    })
}

type RawCheckpoint = (String, String, i64, String, f64);
fn raw_checkpoint(r: &Row<'_>) -> rusqlite::Result<(String, RawCheckpoint)> {
    Ok((
        r.get(0)?,
        (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?),
    ))
}
fn checkpoint(path: &Path, r: RawCheckpoint) -> StoreResult<CheckpointRecord> {
    Ok(CheckpointRecord {
        module_version: u32_col(path, "checkpoint module version", r.2)?,
        name: r.0,
        module: r.1,
        state_json: r.3,
        at_ms: r.4,
    })
}

fn raw_event(r: &Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        seq: r.get::<_, i64>(0)? as u64,
        sandbox: r.get(1)?,
        kind: r.get(2)?,
        payload_json: r.get(3)?,
        at_ms: r.get(4)?,
    })
}

type RawToken = (
    String,
    Vec<u8>,
    String,
    Option<String>,
    Option<String>,
    f64,
    Option<f64>,
);
const TOKEN_COLS: &str = "id, hash, role, sandboxes, label, created_ms, revoked_ms";
fn token(path: &Path, r: RawToken) -> StoreResult<TokenRecord> {
    let hash: [u8; 32] = r.1.as_slice().try_into().map_err(|_| {
        bad(
            path,
            format!("token `{}` has a hash of {} bytes", r.0, r.1.len()),
        )
    })?;
    Ok(TokenRecord {
        sandboxes: r
            .3
            .as_deref()
            .map(|s| list(path, "token sandboxes", s))
            .transpose()?,
        id: r.0,
        hash,
        role: r.2,
        label: r.4,
        created_ms: r.5,
        revoked_ms: r.6,
    })
}

fn raw_audit(r: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.get::<_, i64>(0)? as u64,
        at_ms: r.get(1)?,
        token_id: r.get(2)?,
        role: r.get(3)?,
        method: r.get(4)?,
        route: r.get(5)?,
        sandbox: r.get(6)?,
        outcome: r.get(7)?,
        status: r
            .get::<_, Option<i64>>(8)?
            .and_then(|s| u16::try_from(s).ok()),
        duration_us: r.get::<_, i64>(9)?.max(0) as u64,
    })
}

/// Every stored sandbox with its modules, versions and checkpoints, in one
/// read transaction.
pub(crate) fn load_all(path: &Path, conn: &Connection) -> StoreResult<RestoreSnapshot> {
    let err = |e| StoreError::from_sqlite("reading", path, e);
    // A read transaction: every SELECT below sees the same commit.
    conn.execute_batch("BEGIN DEFERRED").map_err(err)?;
    let result = load_all_in_tx(path, conn);
    let _ = conn.execute_batch("COMMIT");
    result
}

fn load_all_in_tx(path: &Path, conn: &Connection) -> StoreResult<RestoreSnapshot> {
    let sandboxes = collect(
        path,
        conn,
        &format!("SELECT {SANDBOX_COLS} FROM sandboxes ORDER BY id"),
        [],
        row_tuple,
        |r| sandbox(path, r),
    )?;
    let mut index: HashMap<String, usize> = HashMap::with_capacity(sandboxes.len());
    let mut out: Vec<SandboxSnapshot> = Vec::with_capacity(sandboxes.len());
    for s in sandboxes {
        index.insert(s.id.clone(), out.len());
        out.push(SandboxSnapshot {
            sandbox: s,
            modules: Vec::new(),
            checkpoints: Vec::new(),
        });
    }
    let modules = collect(
        path,
        conn,
        "SELECT sandbox, module, current, stable, next_version, file FROM modules ORDER BY sandbox, module",
        [],
        row_tuple,
        |r| decode_module(path, r),
    )?;
    let mut module_index: HashMap<(String, String), (usize, usize)> =
        HashMap::with_capacity(modules.len());
    for m in modules {
        let Some(&si) = index.get(&m.sandbox) else {
            continue;
        };
        let mi = out[si].modules.len();
        module_index.insert((m.sandbox.clone(), m.module.clone()), (si, mi));
        out[si].modules.push(ModuleSnapshot {
            module: m,
            versions: Vec::new(),
        });
    }
    let versions = collect(
        path,
        conn,
        &format!("SELECT {VERSION_COLS} FROM module_versions ORDER BY sandbox, module, version"),
        [],
        row_tuple,
        |r| version(path, r),
    )?;
    for v in versions {
        // A version stored before any pointer of its module (PutVersion
        // creates the pointer row in the same operation, so this is only a
        // guard): kept under a module record without a current version.
        let key = (v.sandbox.clone(), v.module.clone());
        let (si, mi) = match module_index.get(&key) {
            Some(&at) => at,
            None => {
                let Some(&si) = index.get(&v.sandbox) else {
                    continue;
                };
                let mi = out[si].modules.len();
                out[si].modules.push(ModuleSnapshot {
                    module: ModuleRecord {
                        sandbox: v.sandbox.clone(),
                        module: v.module.clone(),
                        current: None,
                        stable: None,
                        next_version: v.version.saturating_add(1),
                        file: None,
                    },
                    versions: Vec::new(),
                });
                module_index.insert(key, (si, mi));
                (si, mi)
            }
        };
        out[si].modules[mi].versions.push(v);
    }
    let checkpoints = collect(
        path,
        conn,
        "SELECT sandbox, name, module, module_version, state, at_ms FROM checkpoints ORDER BY sandbox, name",
        [],
        raw_checkpoint,
        |(sb, r)| Ok((sb, checkpoint(path, r)?)),
    )?;
    for (sb, c) in checkpoints {
        if let Some(&si) = index.get(&sb) {
            out[si].checkpoints.push(c);
        }
    }
    Ok(RestoreSnapshot {
        sandboxes: out,
        last_event_seq: last_event_seq(path, conn)?,
    })
}

pub(crate) fn last_event_seq(path: &Path, conn: &Connection) -> StoreResult<u64> {
    // sqlite_sequence keeps the highest seq ever given, even after pruning.
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| StoreError::from_sqlite("reading", path, e))?;
    Ok(seq.unwrap_or(0).max(0) as u64)
}

/// The recorded per-sandbox gaps of the event log (`event_gaps`).
pub(crate) fn event_gaps(path: &Path, conn: &Connection) -> StoreResult<EventGaps> {
    let err = |e| StoreError::from_sqlite("reading", path, e);
    let mut st = conn
        .prepare("SELECT sandbox, through FROM event_gaps")
        .map_err(err)?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(err)?;
    let mut through = std::collections::HashMap::new();
    for row in rows {
        let (sandbox, seq) = row.map_err(err)?;
        through.insert(sandbox, seq.max(0) as u64);
    }
    Ok(EventGaps { through })
}

pub(crate) fn events_since(
    path: &Path,
    conn: &Connection,
    after: u64,
    sandbox: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<EventRecord>> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    match sandbox {
        Some(sb) => collect(
            path,
            conn,
            "SELECT seq, sandbox, kind, payload, at_ms FROM events WHERE sandbox = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            params![sb, after, limit],
            raw_event,
            Ok,
        ),
        None => collect(
            path,
            conn,
            "SELECT seq, sandbox, kind, payload, at_ms FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after, limit],
            raw_event,
            Ok,
        ),
    }
}

pub(crate) fn sandboxes(path: &Path, conn: &Connection) -> StoreResult<Vec<SandboxRecord>> {
    collect(
        path,
        conn,
        &format!("SELECT {SANDBOX_COLS} FROM sandboxes ORDER BY id"),
        [],
        row_tuple,
        |r| sandbox(path, r),
    )
}

pub(crate) fn versions(
    path: &Path,
    conn: &Connection,
    sb: &str,
    m: &str,
) -> StoreResult<Vec<VersionRecord>> {
    collect(
        path,
        conn,
        &format!("SELECT {VERSION_COLS} FROM module_versions WHERE sandbox = ?1 AND module = ?2 ORDER BY version"),
        params![sb, m],
        row_tuple,
        |r| version(path, r),
    )
}

pub(crate) fn module(
    path: &Path,
    conn: &Connection,
    sb: &str,
    m: &str,
) -> StoreResult<Option<ModuleRecord>> {
    let mut v = collect(
        path,
        conn,
        "SELECT sandbox, module, current, stable, next_version, file FROM modules WHERE sandbox = ?1 AND module = ?2",
        params![sb, m],
        row_tuple,
        |r| decode_module(path, r),
    )?;
    Ok(v.pop())
}

pub(crate) fn version_by_checksum(
    path: &Path,
    conn: &Connection,
    sb: &str,
    m: &str,
    checksum: &str,
) -> StoreResult<Option<u32>> {
    let v: Option<i64> = conn
        .prepare_cached(
            "SELECT version FROM module_versions WHERE sandbox = ?1 AND module = ?2 AND checksum = ?3 ORDER BY version DESC LIMIT 1",
        )
        .and_then(|mut st| st.query_row(params![sb, m, checksum], |r| r.get(0)).optional())
        .map_err(|e| StoreError::from_sqlite("reading", path, e))?;
    v.map(|v| u32_col(path, "version", v)).transpose()
}

pub(crate) fn checkpoints(
    path: &Path,
    conn: &Connection,
    sb: &str,
) -> StoreResult<Vec<CheckpointRecord>> {
    collect(
        path,
        conn,
        "SELECT sandbox, name, module, module_version, state, at_ms FROM checkpoints WHERE sandbox = ?1 ORDER BY name",
        params![sb],
        raw_checkpoint,
        |(_, r)| checkpoint(path, r),
    )
}

pub(crate) fn tokens(path: &Path, conn: &Connection) -> StoreResult<Vec<TokenRecord>> {
    collect(
        path,
        conn,
        &format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created_ms, id"),
        [],
        row_tuple,
        |r| token(path, r),
    )
}

pub(crate) fn token_by_hash(
    path: &Path,
    conn: &Connection,
    hash: &[u8; 32],
) -> StoreResult<Option<TokenRecord>> {
    let mut v = collect(
        path,
        conn,
        &format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash = ?1"),
        params![&hash[..]],
        row_tuple,
        |r| token(path, r),
    )?;
    Ok(v.pop())
}

pub(crate) fn audit_before(
    path: &Path,
    conn: &Connection,
    before: Option<u64>,
    limit: usize,
) -> StoreResult<Vec<AuditRecord>> {
    let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    collect(
        path,
        conn,
        "SELECT id, at_ms, token_id, role, method, route, sandbox, outcome, status, duration_us
         FROM audit WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        params![before, limit],
        raw_audit,
        Ok,
    )
}

/// Audit rows matching `q`, newest first (see [`AuditQuery`]).
pub(crate) fn audit_query(
    path: &Path,
    conn: &Connection,
    q: &AuditQuery,
) -> StoreResult<Vec<AuditRecord>> {
    let before = q
        .before
        .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    // Absent filters are NULL and match every row (`?n IS NULL OR …`), so
    // one cached statement serves every combination.
    collect(
        path,
        conn,
        "SELECT id, at_ms, token_id, role, method, route, sandbox, outcome, status, duration_us
         FROM audit
         WHERE id < ?1
           AND (?2 IS NULL OR token_id = ?2)
           AND (?3 IS NULL OR sandbox = ?3)
           AND (?4 IS NULL OR outcome = ?4)
           AND (?5 IS NULL OR at_ms >= ?5)
         ORDER BY id DESC LIMIT ?6",
        params![before, q.token_id, q.sandbox, q.outcome, q.since_ms, limit],
        raw_audit,
        Ok,
    )
}
