//! The write operations and how each is applied inside the writer's
//! transaction.
//!
//! Invariants:
//! * An operation either applies completely or returns an error having
//!   changed nothing visible after the writer rolls back to the submission's
//!   savepoint; it never panics on any input (no `unwrap` on data).
//! * Every rule of the schema is enforced by SQLite (keys, references,
//!   `CHECK`s, `json_valid`), and its violation is turned here into an error
//!   that names the row concerned.

use rusqlite::{params, Connection, OptionalExtension};

use super::error::{StoreError, StoreResult};
use super::records::{
    AuditRecord, CheckpointRecord, NewEvent, SandboxRecord, TokenRecord, VersionRecord,
    VersionStatus,
};

/// One write. A submission is a list of these that commit atomically
/// together (all or none), e.g. a reload's version + current pointer + event +
/// audit row.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum WriteOp {
    /// Creates a sandbox, or updates its entry, limits, capabilities, source
    /// root and spec (its versions and checkpoints are kept).
    PutSandbox(SandboxRecord),
    /// Deletes a sandbox with its modules, versions and checkpoints (its
    /// events and audit rows stay). Fails with `NotFound` if absent.
    DeleteSandbox {
        /// The sandbox id.
        id: String,
    },
    /// Stores a new module version (and raises the module's next number above
    /// it). A version number is stored once: storing it again fails.
    PutVersion(VersionRecord),
    /// Makes a stored version current (a reload, rollback or roll-forward).
    /// If the version is permanent it also becomes the stable one.
    SetCurrent {
        /// The sandbox.
        sandbox: String,
        /// The module.
        module: String,
        /// The version, which must be stored.
        version: u32,
        /// The file the module came from, if known (`None` keeps the old one).
        file: Option<String>,
    },
    /// Marks a version permanent (its canary window closed cleanly) or canary.
    /// Making the current version permanent makes it the stable one too.
    SetVersionStatus {
        /// The sandbox.
        sandbox: String,
        /// The module.
        module: String,
        /// The version.
        version: u32,
        /// The new status.
        status: VersionStatus,
    },
    /// Replaces a module's whole kept history (an import): every stored
    /// version of the module is deleted and `versions` stored instead, all
    /// permanent, with `current` (which must be among them) current and
    /// stable. The module's next number stays above every number it had.
    ReplaceHistory {
        /// The sandbox.
        sandbox: String,
        /// The module.
        module: String,
        /// The new history, each record for this sandbox and module.
        versions: Vec<VersionRecord>,
        /// The version that runs.
        current: u32,
    },
    /// Forgets a kept version (history pruning). The current and the stable
    /// version cannot be dropped.
    DropVersion {
        /// The sandbox.
        sandbox: String,
        /// The module.
        module: String,
        /// The version.
        version: u32,
    },
    /// Appends an event (its node-wide sequence number is in the receipt) and
    /// forgets that sandbox's oldest events beyond `max_events_per_sandbox`.
    AppendEvent(NewEvent),
    /// Forgets every event of a sandbox that no longer exists (a node keeps
    /// the events of its 16 most recently deleted sandboxes only). Bounded: a sandbox holds at most
    /// `max_events_per_sandbox` events. Absent events are no error.
    DeleteEvents {
        /// The deleted sandbox.
        sandbox: String,
    },
    /// Writes the last checkpoint of some registered processes of a sandbox
    /// (replacing older ones of the same names) and forgets the checkpoints of
    /// `removed` names (processes gone or unregistered).
    PutCheckpoints {
        /// The sandbox.
        sandbox: String,
        /// Checkpoints to write.
        rows: Vec<CheckpointRecord>,
        /// Registered names whose checkpoint is forgotten.
        removed: Vec<String>,
    },
    /// Forgets every checkpoint of a sandbox (before a full rewrite in the
    /// same submission, or when its app restarts from scratch).
    ClearCheckpoints {
        /// The sandbox.
        sandbox: String,
    },
    /// Stores a new token.
    PutToken(TokenRecord),
    /// Revokes a token (revoking twice keeps the first time). `NotFound` if
    /// absent.
    RevokeToken {
        /// The token id.
        id: String,
        /// Revocation time, ms since the Unix epoch.
        at_ms: f64,
    },
    /// Appends an audit row (its id is in the receipt).
    AppendAudit(AuditRecord),
    /// Completes an audit row appended before its request ran: sets its
    /// outcome, status and duration, and its token and role when given (a
    /// sign-in learns them only while it runs). `NotFound` if absent.
    FinishAudit {
        /// The row id (from the receipt of its `AppendAudit`).
        id: u64,
        /// `ok` or an error kind.
        outcome: String,
        /// The HTTP status.
        status: Option<u16>,
        /// How long the request took, µs.
        duration_us: u64,
        /// The token, if learnt while the request ran (`None` keeps the row's).
        token_id: Option<String>,
        /// Its role, likewise.
        role: Option<String>,
    },
}

impl WriteOp {
    /// The operation's name, used in errors.
    pub fn name(&self) -> &'static str {
        match self {
            WriteOp::PutSandbox(_) => "put_sandbox",
            WriteOp::DeleteSandbox { .. } => "delete_sandbox",
            WriteOp::PutVersion(_) => "put_version",
            WriteOp::SetCurrent { .. } => "set_current",
            WriteOp::SetVersionStatus { .. } => "set_version_status",
            WriteOp::DropVersion { .. } => "drop_version",
            WriteOp::ReplaceHistory { .. } => "replace_history",
            WriteOp::AppendEvent(_) => "append_event",
            WriteOp::DeleteEvents { .. } => "delete_events",
            WriteOp::PutCheckpoints { .. } => "put_checkpoints",
            WriteOp::ClearCheckpoints { .. } => "clear_checkpoints",
            WriteOp::PutToken(_) => "put_token",
            WriteOp::RevokeToken { .. } => "revoke_token",
            WriteOp::AppendAudit(_) => "append_audit",
            WriteOp::FinishAudit { .. } => "finish_audit",
        }
    }
}

/// What one applied operation produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// Done; nothing to report.
    Done,
    /// The event's node-wide sequence number.
    Event {
        /// The sequence number.
        seq: u64,
    },
    /// The audit row's id.
    Audit {
        /// The row id.
        id: u64,
    },
    /// Rows written by `PutCheckpoints` / `ClearCheckpoints`.
    Checkpoints {
        /// Rows written or deleted.
        rows: usize,
    },
}

/// Settings the operations need.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ApplyCtx<'a> {
    pub max_events_per_sandbox: u64,
    pub path: &'a std::path::Path,
}

fn finite(op: &'static str, what: &str, t: f64) -> StoreResult<f64> {
    if t.is_finite() {
        Ok(t)
    } else {
        Err(StoreError::Invalid {
            op,
            detail: format!("{what} is {t}, not a finite time"),
        })
    }
}

fn json_list(op: &'static str, list: &[String]) -> StoreResult<String> {
    serde_json::to_string(list).map_err(|e| StoreError::Invalid {
        op,
        detail: e.to_string(),
    })
}

fn is_foreign_key(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY)
}

fn is_unique(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Applies one operation on `conn`, which is inside the writer's transaction.
pub(crate) fn apply(conn: &Connection, op: &WriteOp, ctx: ApplyCtx<'_>) -> StoreResult<Applied> {
    let name = op.name();
    let sql_err = |e: rusqlite::Error| StoreError::from_sqlite(name, ctx.path, e);
    let no_sandbox = |sandbox: &str| StoreError::NotFound {
        op: name,
        what: format!("sandbox `{sandbox}`"),
    };
    match op {
        WriteOp::PutSandbox(s) => {
            let created = finite(name, "created_ms", s.created_ms)?;
            let caps = json_list(name, &s.capabilities)?;
            conn.prepare_cached(
                "INSERT INTO sandboxes (id, entry, limits, capabilities, source_root, spec, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET entry = excluded.entry, limits = excluded.limits,
                   capabilities = excluded.capabilities, source_root = excluded.source_root,
                   spec = excluded.spec",
            )
            .and_then(|mut st| st.execute(params![s.id, s.entry, s.limits_json, caps, s.source_root, s.spec_json, created]))
            .map_err(sql_err)?;
            Ok(Applied::Done)
        }
        WriteOp::DeleteSandbox { id } => {
            let n = conn
                .prepare_cached("DELETE FROM sandboxes WHERE id = ?1")
                .and_then(|mut st| st.execute(params![id]))
                .map_err(sql_err)?;
            if n == 0 {
                return Err(no_sandbox(id));
            }
            Ok(Applied::Done)
        }
        WriteOp::PutVersion(v) => {
            let created = finite(name, "created_ms", v.created_ms)?;
            let deps = json_list(name, &v.dependencies)?;
            conn.prepare_cached(
                "INSERT INTO module_versions (sandbox, module, version, checksum, source, dependencies, status, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut st| {
                st.execute(params![v.sandbox, v.module, v.version, v.checksum, v.source, deps, v.status.as_str(), created])
            })
            .map_err(|e| {
                if is_foreign_key(&e) {
                    no_sandbox(&v.sandbox)
                } else if is_unique(&e) {
                    StoreError::Constraint {
                        op: name,
                        detail: format!(
                            "version {} of module `{}` in sandbox `{}` is stored already",
                            v.version, v.module, v.sandbox
                        ),
                    }
                } else {
                    sql_err(e)
                }
            })?;
            conn.prepare_cached(
                "INSERT INTO modules (sandbox, module, next_version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sandbox, module) DO UPDATE SET next_version = max(next_version, excluded.next_version)",
            )
            .and_then(|mut st| st.execute(params![v.sandbox, v.module, i64::from(v.version) + 1]))
            .map_err(sql_err)?;
            Ok(Applied::Done)
        }
        WriteOp::SetCurrent {
            sandbox,
            module,
            version,
            file,
        } => {
            let status = version_status(conn, sandbox, module, *version).map_err(sql_err)?;
            let Some(status) = status else {
                return Err(no_version(name, sandbox, module, *version));
            };
            let permanent = status == VersionStatus::Permanent;
            conn.prepare_cached(
                "INSERT INTO modules (sandbox, module, current, stable, next_version, file)
                 VALUES (?1, ?2, ?3, CASE WHEN ?4 THEN ?3 END, ?3 + 1, ?5)
                 ON CONFLICT (sandbox, module) DO UPDATE SET current = excluded.current,
                   stable = CASE WHEN ?4 THEN excluded.current ELSE stable END,
                   file = coalesce(excluded.file, file)",
            )
            .and_then(|mut st| st.execute(params![sandbox, module, version, permanent, file]))
            .map_err(sql_err)?;
            Ok(Applied::Done)
        }
        WriteOp::SetVersionStatus {
            sandbox,
            module,
            version,
            status,
        } => {
            if *status == VersionStatus::Canary {
                let stable: Option<Option<i64>> = conn
                    .prepare_cached("SELECT stable FROM modules WHERE sandbox = ?1 AND module = ?2")
                    .and_then(|mut st| {
                        st.query_row(params![sandbox, module], |r| r.get(0))
                            .optional()
                    })
                    .map_err(sql_err)?;
                if stable.flatten() == Some(i64::from(*version)) {
                    return Err(StoreError::Constraint {
                        op: name,
                        detail: format!(
                            "version {version} of module `{module}` in sandbox `{sandbox}` is the stable version; it cannot become a canary"
                        ),
                    });
                }
            }
            let n = conn
                .prepare_cached("UPDATE module_versions SET status = ?4 WHERE sandbox = ?1 AND module = ?2 AND version = ?3")
                .and_then(|mut st| st.execute(params![sandbox, module, version, status.as_str()]))
                .map_err(sql_err)?;
            if n == 0 {
                return Err(no_version(name, sandbox, module, *version));
            }
            if *status == VersionStatus::Permanent {
                conn.prepare_cached("UPDATE modules SET stable = current WHERE sandbox = ?1 AND module = ?2 AND current = ?3")
                    .and_then(|mut st| st.execute(params![sandbox, module, version]))
                    .map_err(sql_err)?;
            }
            Ok(Applied::Done)
        }
        WriteOp::ReplaceHistory {
            sandbox,
            module,
            versions,
            current,
        } => {
            if !versions.iter().any(|v| v.version == *current) {
                return Err(no_version(name, sandbox, module, *current));
            }
            if let Some(v) = versions
                .iter()
                .find(|v| v.sandbox != *sandbox || v.module != *module)
            {
                return Err(StoreError::Constraint {
                    op: name,
                    detail: format!(
                        "version {} names module `{}` in sandbox `{}`, not `{module}` in `{sandbox}`",
                        v.version, v.module, v.sandbox
                    ),
                });
            }
            // Unpoint first: `current` and `stable` reference kept rows.
            conn.prepare_cached(
                "UPDATE modules SET current = NULL, stable = NULL WHERE sandbox = ?1 AND module = ?2",
            )
            .and_then(|mut st| st.execute(params![sandbox, module]))
            .map_err(sql_err)?;
            conn.prepare_cached("DELETE FROM module_versions WHERE sandbox = ?1 AND module = ?2")
                .and_then(|mut st| st.execute(params![sandbox, module]))
                .map_err(sql_err)?;
            for v in versions {
                let permanent = VersionRecord {
                    status: VersionStatus::Permanent,
                    ..v.clone()
                };
                apply(conn, &WriteOp::PutVersion(permanent), ctx)?;
            }
            apply(
                conn,
                &WriteOp::SetCurrent {
                    sandbox: sandbox.clone(),
                    module: module.clone(),
                    version: *current,
                    file: None,
                },
                ctx,
            )
        }
        WriteOp::DropVersion {
            sandbox,
            module,
            version,
        } => {
            let n = conn
                .prepare_cached("DELETE FROM module_versions WHERE sandbox = ?1 AND module = ?2 AND version = ?3")
                .and_then(|mut st| st.execute(params![sandbox, module, version]))
                .map_err(|e| {
                    if is_foreign_key(&e) {
                        StoreError::Constraint {
                            op: name,
                            detail: format!(
                                "version {version} of module `{module}` in sandbox `{sandbox}` is current or stable; it cannot be dropped"
                            ),
                        }
                    } else {
                        sql_err(e)
                    }
                })?;
            if n == 0 {
                return Err(no_version(name, sandbox, module, *version));
            }
            Ok(Applied::Done)
        }
        WriteOp::AppendEvent(ev) => {
            let at = finite(name, "at_ms", ev.at_ms)?;
            let given = match ev.seq {
                Some(seq) => Some(i64::try_from(seq).map_err(|_| StoreError::Invalid {
                    op: name,
                    detail: format!("event seq {seq} is out of range"),
                })?),
                None => None,
            };
            conn.prepare_cached(
                "INSERT INTO events (seq, sandbox, kind, payload, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![given, ev.sandbox, ev.kind, ev.payload_json, at])
            })
            .map_err(sql_err)?;
            let seq = conn.last_insert_rowid();
            // Keeps the newest `max_events_per_sandbox`: one index seek to the
            // cut-off and a range delete, so appending stays O(log n).
            let keep = i64::try_from(ctx.max_events_per_sandbox.max(1)).unwrap_or(i64::MAX);
            conn.prepare_cached(
                "DELETE FROM events WHERE sandbox IS ?1 AND seq <= (
                   SELECT seq FROM events WHERE sandbox IS ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
            )
            .and_then(|mut st| st.execute(params![ev.sandbox, keep]))
            .map_err(sql_err)?;
            Ok(Applied::Event { seq: seq as u64 })
        }
        WriteOp::DeleteEvents { sandbox } => {
            conn.prepare_cached("DELETE FROM events WHERE sandbox = ?1")
                .and_then(|mut st| st.execute(params![sandbox]))
                .map_err(sql_err)?;
            Ok(Applied::Done)
        }
        WriteOp::PutCheckpoints {
            sandbox,
            rows,
            removed,
        } => {
            let mut put = conn
                .prepare_cached(
                    "INSERT INTO checkpoints (sandbox, name, module, module_version, state, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (sandbox, name) DO UPDATE SET module = excluded.module,
                       module_version = excluded.module_version, state = excluded.state, at_ms = excluded.at_ms",
                )
                .map_err(sql_err)?;
            for c in rows {
                let at = finite(name, "at_ms", c.at_ms)?;
                put.execute(params![
                    sandbox,
                    c.name,
                    c.module,
                    c.module_version,
                    c.state_json,
                    at
                ])
                .map_err(|e| {
                    if is_foreign_key(&e) {
                        return no_sandbox(sandbox);
                    }
                    match sql_err(e) {
                        StoreError::Constraint { op, detail } => StoreError::Constraint {
                            op,
                            detail: format!("checkpoint `{}`: {detail}", c.name),
                        },
                        other => other,
                    }
                })?;
            }
            let mut del = conn
                .prepare_cached("DELETE FROM checkpoints WHERE sandbox = ?1 AND name = ?2")
                .map_err(sql_err)?;
            let mut n = rows.len();
            for r in removed {
                n += del.execute(params![sandbox, r]).map_err(sql_err)?;
            }
            Ok(Applied::Checkpoints { rows: n })
        }
        WriteOp::ClearCheckpoints { sandbox } => {
            let n = conn
                .prepare_cached("DELETE FROM checkpoints WHERE sandbox = ?1")
                .and_then(|mut st| st.execute(params![sandbox]))
                .map_err(sql_err)?;
            Ok(Applied::Checkpoints { rows: n })
        }
        WriteOp::PutToken(t) => {
            let created = finite(name, "created_ms", t.created_ms)?;
            if let Some(r) = t.revoked_ms {
                finite(name, "revoked_ms", r)?;
            }
            let scope = match &t.sandboxes {
                Some(list) => Some(json_list(name, list)?),
                None => None,
            };
            conn.prepare_cached(
                "INSERT INTO tokens (id, hash, role, sandboxes, label, created_ms, revoked_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    t.id,
                    &t.hash[..],
                    t.role,
                    scope,
                    t.label,
                    created,
                    t.revoked_ms
                ])
            })
            .map_err(|e| {
                if is_unique(&e) {
                    StoreError::Constraint {
                        op: name,
                        detail: format!(
                            "a token with id `{}` or the same secret is stored already",
                            t.id
                        ),
                    }
                } else {
                    sql_err(e)
                }
            })?;
            Ok(Applied::Done)
        }
        WriteOp::RevokeToken { id, at_ms } => {
            let at = finite(name, "at_ms", *at_ms)?;
            let n = conn
                .prepare_cached(
                    "UPDATE tokens SET revoked_ms = coalesce(revoked_ms, ?2) WHERE id = ?1",
                )
                .and_then(|mut st| st.execute(params![id, at]))
                .map_err(sql_err)?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    op: name,
                    what: format!("token `{id}`"),
                });
            }
            Ok(Applied::Done)
        }
        WriteOp::AppendAudit(a) => {
            let at = finite(name, "at_ms", a.at_ms)?;
            let duration = i64::try_from(a.duration_us).map_err(|_| StoreError::Invalid {
                op: name,
                detail: format!("duration_us {} is out of range", a.duration_us),
            })?;
            conn.prepare_cached(
                "INSERT INTO audit (at_ms, token_id, role, method, route, sandbox, outcome, status, duration_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut st| {
                st.execute(params![at, a.token_id, a.role, a.method, a.route, a.sandbox, a.outcome, a.status, duration])
            })
            .map_err(sql_err)?;
            Ok(Applied::Audit {
                id: conn.last_insert_rowid() as u64,
            })
        }
        WriteOp::FinishAudit {
            id,
            outcome,
            status,
            duration_us,
            token_id,
            role,
        } => {
            let duration = i64::try_from(*duration_us).map_err(|_| StoreError::Invalid {
                op: name,
                detail: format!("duration_us {duration_us} is out of range"),
            })?;
            let row = i64::try_from(*id).map_err(|_| StoreError::Invalid {
                op: name,
                detail: format!("audit id {id} is out of range"),
            })?;
            let n = conn
                .prepare_cached(
                    "UPDATE audit SET outcome = ?2, status = ?3, duration_us = ?4,
                       token_id = coalesce(?5, token_id), role = coalesce(?6, role)
                     WHERE id = ?1",
                )
                .and_then(|mut st| {
                    st.execute(params![row, outcome, status, duration, token_id, role])
                })
                .map_err(sql_err)?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    op: name,
                    what: format!("audit row {id}"),
                });
            }
            Ok(Applied::Done)
        }
    }
}

fn no_version(op: &'static str, sandbox: &str, module: &str, version: u32) -> StoreError {
    StoreError::NotFound {
        op,
        what: format!("version {version} of module `{module}` in sandbox `{sandbox}`"),
    }
}

fn version_status(
    conn: &Connection,
    sandbox: &str,
    module: &str,
    version: u32,
) -> rusqlite::Result<Option<VersionStatus>> {
    let s: Option<String> = conn
        .prepare_cached("SELECT status FROM module_versions WHERE sandbox = ?1 AND module = ?2 AND version = ?3")?
        .query_row(params![sandbox, module, version], |r| r.get(0))
        .optional()?;
    Ok(s.and_then(|s| VersionStatus::parse(&s)))
}
