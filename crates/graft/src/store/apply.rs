//! How each write operation is applied inside the writer's transaction:
//! [`apply`] hands an operation to its step, one method of `Step` per
//! operation.
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
use super::ops::{Applied, ApplyCtx, WriteOp};
use super::records::{
    AuditRecord, CheckpointRecord, NewEvent, SandboxRecord, TokenRecord, VersionRecord,
    VersionStatus,
};
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
    let step = Step {
        conn,
        ctx,
        name: op.name(),
    };
    match op {
        WriteOp::PutSandbox(s) => step.put_sandbox(s),
        WriteOp::DeleteSandbox { id } => step.delete_sandbox(id),
        WriteOp::PutVersion(v) => step.put_version(v),
        WriteOp::SetCurrent {
            sandbox,
            module,
            version,
            file,
        } => step.set_current(sandbox, module, *version, file.as_deref()),
        WriteOp::SetVersionStatus {
            sandbox,
            module,
            version,
            status,
        } => step.set_version_status(sandbox, module, *version, *status),
        WriteOp::ReplaceHistory {
            sandbox,
            module,
            versions,
            current,
        } => step.replace_history(sandbox, module, versions, *current),
        WriteOp::DropVersion {
            sandbox,
            module,
            version,
        } => step.drop_version(sandbox, module, *version),
        WriteOp::AppendEvent(ev) => step.append_event(ev),
        WriteOp::DeleteEvents { sandbox } => step.delete_events(sandbox),
        WriteOp::MarkEventGap { sandbox, through } => {
            let through = i64::try_from(*through).map_err(|_| StoreError::Invalid {
                op: "mark_event_gap",
                detail: format!("event seq {through} is out of range"),
            })?;
            step.mark_gap(sandbox, through)
        }
        WriteOp::PutCheckpoints {
            sandbox,
            rows,
            removed,
        } => step.put_checkpoints(sandbox, rows, removed),
        WriteOp::ClearCheckpoints { sandbox } => step.clear_checkpoints(sandbox),
        WriteOp::PutToken(t) => step.put_token(t),
        WriteOp::RevokeToken { id, at_ms } => step.revoke_token(id, *at_ms),
        WriteOp::AppendAudit(a) => step.append_audit(a),
        WriteOp::FinishAudit {
            id,
            outcome,
            status,
            duration_us,
            token_id,
            role,
        } => step.finish_audit(
            *id,
            outcome,
            *status,
            *duration_us,
            token_id.as_deref(),
            role.as_deref(),
        ),
    }
}

/// One operation being applied: the connection inside the writer's
/// transaction, the settings, and the operation's name for its errors. Each
/// operation is one method below, named after it.
struct Step<'a> {
    conn: &'a Connection,
    ctx: ApplyCtx<'a>,
    name: &'static str,
}

impl Step<'_> {
    fn sql_err(&self, e: rusqlite::Error) -> StoreError {
        StoreError::from_sqlite(self.name, self.ctx.path, e)
    }

    fn no_sandbox(&self, sandbox: &str) -> StoreError {
        StoreError::NotFound {
            op: self.name,
            what: format!("sandbox `{sandbox}`"),
        }
    }

    /// Creates or updates a sandbox row.
    fn put_sandbox(&self, s: &SandboxRecord) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        let created = finite(name, "created_ms", s.created_ms)?;
        let caps = json_list(name, &s.capabilities)?;
        conn.prepare_cached(
            "INSERT INTO sandboxes (id, entry, limits, capabilities, source_root, spec, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET entry = excluded.entry, limits = excluded.limits,
               capabilities = excluded.capabilities, source_root = excluded.source_root,
               spec = excluded.spec",
        )
        .and_then(|mut st| {
            st.execute(params![
                s.id,
                s.entry,
                s.limits_json,
                caps,
                s.source_root,
                s.spec_json,
                created
            ])
        })
        .map_err(sql_err)?;
        Ok(Applied::Done)
    }

    /// Deletes a sandbox; its versions and checkpoints go with it (`ON DELETE CASCADE`).
    fn delete_sandbox(&self, id: &str) -> StoreResult<Applied> {
        let conn = self.conn;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        let no_sandbox = |sandbox: &str| self.no_sandbox(sandbox);
        let n = conn
            .prepare_cached("DELETE FROM sandboxes WHERE id = ?1")
            .and_then(|mut st| st.execute(params![id]))
            .map_err(sql_err)?;
        if n == 0 {
            return Err(no_sandbox(id));
        }
        Ok(Applied::Done)
    }

    /// Stores a version once and raises the module's next number above it.
    fn put_version(&self, v: &VersionRecord) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        let no_sandbox = |sandbox: &str| self.no_sandbox(sandbox);
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

    /// Points the module at a stored version; a permanent one becomes stable too.
    fn set_current(
        &self,
        sandbox: &str,
        module: &str,
        version: u32,
        file: Option<&str>,
    ) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        let status = version_status(conn, sandbox, module, version).map_err(sql_err)?;
        let Some(status) = status else {
            return Err(no_version(name, sandbox, module, version));
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

    /// Marks a version canary or permanent; the stable version never becomes a canary.
    fn set_version_status(
        &self,
        sandbox: &str,
        module: &str,
        version: u32,
        status: VersionStatus,
    ) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        if status == VersionStatus::Canary {
            let stable: Option<Option<i64>> = conn
                .prepare_cached("SELECT stable FROM modules WHERE sandbox = ?1 AND module = ?2")
                .and_then(|mut st| {
                    st.query_row(params![sandbox, module], |r| r.get(0))
                        .optional()
                })
                .map_err(sql_err)?;
            if stable.flatten() == Some(i64::from(version)) {
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
            return Err(no_version(name, sandbox, module, version));
        }
        if status == VersionStatus::Permanent {
            conn.prepare_cached("UPDATE modules SET stable = current WHERE sandbox = ?1 AND module = ?2 AND current = ?3")
                .and_then(|mut st| st.execute(params![sandbox, module, version]))
                .map_err(sql_err)?;
        }
        Ok(Applied::Done)
    }

    /// Replaces a module's whole history: unpoint, delete, store each version permanent, point at `current`.
    fn replace_history(
        &self,
        sandbox: &str,
        module: &str,
        versions: &[VersionRecord],
        current: u32,
    ) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let ctx = self.ctx;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        if !versions.iter().any(|v| v.version == current) {
            return Err(no_version(name, sandbox, module, current));
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
                sandbox: sandbox.to_string(),
                module: module.to_string(),
                version: current,
                file: None,
            },
            ctx,
        )
    }

    /// Forgets a version; the foreign keys of `current`/`stable` refuse dropping those.
    fn drop_version(&self, sandbox: &str, module: &str, version: u32) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
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
            return Err(no_version(name, sandbox, module, version));
        }
        Ok(Applied::Done)
    }

    /// Appends an event and prunes the sandbox's oldest beyond the limit.
    fn append_event(&self, ev: &NewEvent) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let ctx = self.ctx;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
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
        .and_then(|mut st| st.execute(params![given, ev.sandbox, ev.kind, ev.payload_json, at]))
        .map_err(sql_err)?;
        let seq = conn.last_insert_rowid();
        // Keeps the newest `max_events_per_sandbox`: one index seek to the
        // cut-off and a range delete, so appending stays O(log n).
        let keep = i64::try_from(ctx.max_events_per_sandbox.max(1)).unwrap_or(i64::MAX);
        let cut: Option<i64> = conn
            .prepare_cached(
                "SELECT seq FROM events WHERE sandbox IS ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2",
            )
            .and_then(|mut st| {
                st.query_row(params![ev.sandbox, keep], |r| r.get(0))
                    .optional()
            })
            .map_err(sql_err)?;
        if let Some(cut) = cut {
            conn.prepare_cached("DELETE FROM events WHERE sandbox IS ?1 AND seq <= ?2")
                .and_then(|mut st| st.execute(params![ev.sandbox, cut]))
                .map_err(sql_err)?;
            if let Some(sandbox) = &ev.sandbox {
                self.mark_gap(sandbox, cut)?;
            }
        }
        Ok(Applied::Event { seq: seq as u64 })
    }

    /// Records that `sandbox` has lost the event numbers up to `through`.
    fn mark_gap(&self, sandbox: &str, through: i64) -> StoreResult<Applied> {
        self.conn
            .prepare_cached(
                "INSERT INTO event_gaps (sandbox, through) VALUES (?1, ?2)
                 ON CONFLICT (sandbox) DO UPDATE SET through = max(through, excluded.through)",
            )
            .and_then(|mut st| st.execute(params![sandbox, through]))
            .map_err(|e| self.sql_err(e))?;
        Ok(Applied::Done)
    }

    /// Forgets every event of a deleted sandbox.
    fn delete_events(&self, sandbox: &str) -> StoreResult<Applied> {
        let conn = self.conn;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        conn.prepare_cached("DELETE FROM events WHERE sandbox = ?1")
            .and_then(|mut st| st.execute(params![sandbox]))
            .map_err(sql_err)?;
        conn.prepare_cached("DELETE FROM event_gaps WHERE sandbox = ?1")
            .and_then(|mut st| st.execute(params![sandbox]))
            .map_err(sql_err)?;
        Ok(Applied::Done)
    }

    /// Writes checkpoints (replacing by name) and forgets those of `removed` names.
    fn put_checkpoints(
        &self,
        sandbox: &str,
        rows: &[CheckpointRecord],
        removed: &[String],
    ) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        let no_sandbox = |sandbox: &str| self.no_sandbox(sandbox);
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

    /// Forgets every checkpoint of a sandbox.
    fn clear_checkpoints(&self, sandbox: &str) -> StoreResult<Applied> {
        let conn = self.conn;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        let n = conn
            .prepare_cached("DELETE FROM checkpoints WHERE sandbox = ?1")
            .and_then(|mut st| st.execute(params![sandbox]))
            .map_err(sql_err)?;
        Ok(Applied::Checkpoints { rows: n })
    }

    /// Stores a new token; an id or secret stored already is a constraint error.
    fn put_token(&self, t: &TokenRecord) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
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

    /// Revokes a token; the first revocation time is kept.
    fn revoke_token(&self, id: &str, at_ms: f64) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        let at = finite(name, "at_ms", at_ms)?;
        let n = conn
            .prepare_cached("UPDATE tokens SET revoked_ms = coalesce(revoked_ms, ?2) WHERE id = ?1")
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

    /// Appends an audit row.
    fn append_audit(&self, a: &AuditRecord) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
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

    /// Completes an audit row appended before its request ran.
    fn finish_audit(
        &self,
        id: u64,
        outcome: &str,
        status: Option<u16>,
        duration_us: u64,
        token_id: Option<&str>,
        role: Option<&str>,
    ) -> StoreResult<Applied> {
        let conn = self.conn;
        let name = self.name;
        let sql_err = |e: rusqlite::Error| self.sql_err(e);
        let duration = i64::try_from(duration_us).map_err(|_| StoreError::Invalid {
            op: name,
            detail: format!("duration_us {duration_us} is out of range"),
        })?;
        let row = i64::try_from(id).map_err(|_| StoreError::Invalid {
            op: name,
            detail: format!("audit id {id} is out of range"),
        })?;
        let n = conn
            .prepare_cached(
                "UPDATE audit SET outcome = ?2, status = ?3, duration_us = ?4,
                   token_id = coalesce(?5, token_id), role = coalesce(?6, role)
                 WHERE id = ?1",
            )
            .and_then(|mut st| st.execute(params![row, outcome, status, duration, token_id, role]))
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
