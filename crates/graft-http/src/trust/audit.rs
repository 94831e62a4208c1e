//! The audit log: one row per audited request (SPEC §9), and `GET /audit`.
//!
//! Invariants:
//! * No effect without its row. An allowed request whose effect is a
//!   commit to the node's database (create, reload, rollback, tokens) has
//!   its row, saying `ok`, in that same transaction
//!   ([`graft::store::Attached`]): both or neither are stored. Any other
//!   allowed request has its row committed (fsynced) as `pending` before its
//!   handler runs ([`super::routes::RowCommit`]).
//! * A `pending` row is completed after the answer with the outcome,
//!   status and duration; if the request is dropped mid-way (the client went
//!   away) it is completed as `abandoned`, and if the process dies first it
//!   stays `pending`, which says the effect may have happened. Completions
//!   are not awaited by the answer and ride on the next commit
//!   ([`Store::write_lazy`]).
//! * A denied request, and an allowed one that committed nothing, writes one
//!   complete row.
//! * Rows never hold a secret: the token's public id and role only.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::Json;
use graft::store::{Applied, Attached, AuditQuery, AuditRecord, Store, StoreError, WriteOp};
use serde_json::{json, Value};

use super::{Caller, Trust};
use crate::errors::{ApiError, ApiResult};

/// Rows per page by default, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// Set on a response by a handler that authenticated the caller itself (the
/// sign-in), so that the audit row names the token.
#[derive(Clone, Debug)]
pub(crate) struct AuthenticatedAs(pub Caller);

/// Put in a request's extensions by the middleware when the route's effect
/// is a commit to the node's database: the handler hands it to that commit
/// so that the audit row joins it.
#[derive(Clone, Debug)]
pub(crate) struct EffectAudit(pub Attached);

impl EffectAudit {
    /// The attached rows of an optional extension, for a node operation.
    pub(crate) fn of(ext: Option<&axum::Extension<EffectAudit>>) -> Option<Attached> {
        ext.map(|e| e.0 .0.clone())
    }
}

pub(crate) fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// What a row says before its outcome is known.
pub(crate) struct RowStart<'a> {
    pub caller: Option<&'a Caller>,
    pub method: &'a str,
    pub route: &'a str,
    pub sandbox: Option<String>,
}

impl RowStart<'_> {
    fn record(&self, outcome: &str, status: Option<u16>, duration_us: u64) -> AuditRecord {
        AuditRecord {
            id: 0,
            at_ms: now_ms(),
            token_id: self.caller.map(|c| c.token_id.to_string()),
            role: self.caller.map(|c| c.role.as_str().to_owned()),
            method: self.method.to_owned(),
            route: self.route.to_owned(),
            sandbox: self.sandbox.clone(),
            outcome: outcome.to_owned(),
            status,
            duration_us,
        }
    }
}

/// Writes a complete row (a denied request).
pub(crate) async fn write_denied(
    store: &Store,
    row: RowStart<'_>,
    outcome: &str,
    status: u16,
    duration_us: u64,
) -> Result<(), StoreError> {
    store
        .write_async(vec![WriteOp::AppendAudit(row.record(
            outcome,
            Some(status),
            duration_us,
        ))])
        .await
        .map(|_| ())
}

/// Writes a complete row without waiting for it (an allowed request that
/// committed nothing: no effect depends on it). A failure is logged.
pub(crate) fn write_after(
    store: &Store,
    row: RowStart<'_>,
    outcome: &str,
    status: u16,
    duration_us: u64,
    learnt: Option<&Caller>,
) {
    let mut record = row.record(outcome, Some(status), duration_us);
    if let Some(c) = learnt {
        record.token_id = Some(c.token_id.to_string());
        record.role = Some(c.role.as_str().to_owned());
    }
    report_failure(
        store.write_lazy(vec![WriteOp::AppendAudit(record)]),
        "could not record a request that changed nothing",
    );
}

/// Logs the failure of a write nobody waits on.
fn report_failure(
    write: impl std::future::Future<Output = Result<graft::store::Receipt, StoreError>> + Send + 'static,
    what: &'static str,
) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            if let Err(e) = write.await {
                tracing::warn!(error = %e, "audit: {what}");
            }
        });
    }
}

/// The row of a request whose effect is a database commit: `ok` with the
/// route's success `status`, attached to that commit. Its duration is
/// filled in after the answer ([`finish_attached`]).
pub(crate) fn attach_row(store: &Arc<Store>, row: RowStart<'_>, status: u16) -> Attached {
    Attached::new(
        store,
        vec![WriteOp::AppendAudit(row.record("ok", Some(status), 0))],
    )
}

/// The audit row ids an attachment committed with its effect.
pub(crate) fn attached_row_ids(attached: &Attached) -> Vec<u64> {
    attached
        .applied()
        .unwrap_or_default()
        .iter()
        .filter_map(|a| match a {
            Applied::Audit { id } => Some(*id),
            _ => None,
        })
        .collect()
}

/// Completes a row committed with its effect: the real outcome, status and
/// duration, queued (not awaited).
pub(crate) fn finish_attached(
    store: &Store,
    id: u64,
    outcome: &str,
    status: u16,
    duration_us: u64,
    learnt: Option<&Caller>,
) {
    report_failure(
        store.write_lazy(vec![WriteOp::FinishAudit {
            id,
            outcome: outcome.to_owned(),
            status: Some(status),
            duration_us,
            token_id: learnt.map(|c| c.token_id.to_string()),
            role: learnt.map(|c| c.role.as_str().to_owned()),
        }]),
        "could not complete a row committed with its effect",
    );
}

/// A row committed as `pending`; completing it (or dropping it) queues its
/// outcome.
pub(crate) struct PendingRow {
    store: Arc<Store>,
    id: u64,
    done: bool,
}

/// Commits a `pending` row; the request may run once this returns `Ok`.
pub(crate) async fn begin(store: &Arc<Store>, row: RowStart<'_>) -> Result<PendingRow, StoreError> {
    let receipt = store
        .write_async(vec![WriteOp::AppendAudit(row.record("pending", None, 0))])
        .await?;
    match receipt.applied.first() {
        Some(Applied::Audit { id }) => Ok(PendingRow {
            store: store.clone(),
            id: *id,
            done: false,
        }),
        other => Err(StoreError::Invalid {
            op: "append_audit",
            detail: format!("the store answered {other:?} instead of a row id"),
        }),
    }
}

impl PendingRow {
    /// The row's id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Completes the row. The write is queued now and committed with the
    /// next group; a failure is logged (the row stays `pending`).
    pub(crate) fn finish(
        mut self,
        outcome: &str,
        status: u16,
        duration_us: u64,
        learnt: Option<&Caller>,
    ) {
        self.done = true;
        self.queue(outcome.to_owned(), Some(status), duration_us, learnt);
    }

    fn queue(
        &self,
        outcome: String,
        status: Option<u16>,
        duration_us: u64,
        learnt: Option<&Caller>,
    ) {
        let write = self.store.write_lazy(vec![WriteOp::FinishAudit {
            id: self.id,
            outcome,
            status,
            duration_us,
            token_id: learnt.map(|c| c.token_id.to_string()),
            role: learnt.map(|c| c.role.as_str().to_owned()),
        }]);
        let id = self.id;
        // The write is queued already; awaiting it only reports a failure.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = write.await {
                    tracing::warn!(row = id, error = %e, "audit: could not complete a row; it stays `pending`");
                }
            });
        }
    }
}

impl Drop for PendingRow {
    fn drop(&mut self) {
        if !self.done {
            self.queue("abandoned".into(), None, 0, None);
        }
    }
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request("bad_request", message)
}

/// The filters of `GET /audit`'s query string.
fn query(raw: &str) -> ApiResult<AuditQuery> {
    let mut q = AuditQuery {
        limit: DEFAULT_LIMIT,
        ..AuditQuery::default()
    };
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let text = || -> ApiResult<String> {
            let v = crate::request::percent_decode(v)
                .ok_or_else(|| bad(format!("{k}: not valid percent-encoded UTF-8")))?;
            if v.is_empty() || v.len() > 256 {
                return Err(bad(format!("{k}: 1 to 256 bytes")));
            }
            Ok(v)
        };
        let number = |max: u64| -> ApiResult<u64> {
            v.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(|| {
                bad(format!(
                    "{k} must be an integer from 0 to {max}, not `{}`",
                    crate::trust::middleware::shown(v)
                ))
            })
        };
        match k {
            "token" => q.token_id = Some(text()?),
            "sandbox" => q.sandbox = Some(text()?),
            "outcome" => q.outcome = Some(text()?),
            "since_ms" => q.since_ms = Some(number(1 << 53)? as f64),
            "before" => q.before = Some(number(i64::MAX as u64)?),
            "limit" => {
                let n = number(MAX_LIMIT as u64)?;
                if n == 0 {
                    return Err(bad(format!("limit must be from 1 to {MAX_LIMIT}")));
                }
                q.limit = n as usize;
            }
            _ => {
                return Err(bad(format!(
                    "unknown query parameter `{}` (known: token, sandbox, outcome, since_ms, before, limit)",
                    crate::trust::middleware::shown(k)
                )))
            }
        }
    }
    Ok(q)
}

/// `GET /audit`: rows newest first, filtered; `next_before` pages on.
pub(crate) async fn list(
    State(trust): State<Arc<Trust>>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let q = query(raw.as_deref().unwrap_or(""))?;
    let limit = q.limit;
    let store = trust.store().clone();
    let rows = tokio::task::spawn_blocking(move || store.audit_query(&q))
        .await
        .map_err(crate::errors::join_error)?
        .map_err(|e| ApiError::internal(format!("reading the audit log: {e}")))?;
    let next = if rows.len() == limit {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(json!({ "rows": rows, "next_before": next })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_checked() {
        let q = query("token=tok_1&sandbox=a%2Db&limit=5&since_ms=10&before=7").unwrap();
        assert_eq!(q.token_id.as_deref(), Some("tok_1"));
        assert_eq!(q.sandbox.as_deref(), Some("a-b"));
        assert_eq!((q.limit, q.since_ms, q.before), (5, Some(10.0), Some(7)));
        assert_eq!(query("").unwrap().limit, DEFAULT_LIMIT);
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "before=-1",
            "nope=1",
            "sandbox=%zz",
            "sandbox=",
        ] {
            assert_eq!(query(bad).unwrap_err().status, 400, "{bad}");
        }
    }
}
