//! Error answers: `{ "error": { "kind", "message", ... } }` with a status.
//! This is the one place where errors become HTTP answers.
//!
//! Invariants:
//! * [`KINDS`] is the one list of every `(status, kind)` the API can answer
//!   with; the OpenAPI document and the docs are written from it, so a kind
//!   cannot appear in an answer without being documented.
//! * [`status_for`] and `From<graft::Error> for ApiError` are the only code
//!   that turns a library error into a status and a body. They match on the
//!   error's variant, never on its message. The two fields that are still
//!   text in the library (a reload's step, the kept versions) are read by
//!   `reload_step_is_behaviour_check` and `kept_versions` alone.
//! * Errors of the HTTP layer itself (malformed bodies, unknown routes,
//!   timeouts of the safety net) are built here too.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft::error::ReloadStep;
use graft::store::StoreError;
use graft::Error;
use serde_json::{json, Value};

/// An error response: a status and `{ "error": { "kind", "message", ... } }`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The `error` object.
    pub error: serde_json::Map<String, Value>,
}

/// A handler's result.
pub type ApiResult<T> = Result<T, ApiError>;

/// One error kind the API answers with: its status and when it happens.
#[derive(Clone, Copy, Debug)]
pub struct ErrorKind {
    /// The HTTP status.
    pub status: u16,
    /// `error.kind`.
    pub kind: &'static str,
    /// When it happens.
    pub when: &'static str,
}

const fn k(status: u16, kind: &'static str, when: &'static str) -> ErrorKind {
    ErrorKind { status, kind, when }
}

/// Every `(status, kind)` the API answers with. A kind may appear under two
/// statuses (`invalid_input` in a path is 400, in a body 422).
pub const KINDS: &[ErrorKind] = &[
    k(400, "malformed_json", "the body is not JSON"),
    k(400, "bad_request", "wrong shape: a missing or unknown field, a wrong type, a fraction where an integer is expected, an unknown query parameter"),
    k(400, "too_deep", "JSON nested more than 64 levels (`max_depth`)"),
    k(400, "invalid_input", "a sandbox id or module name in the path that does not match its pattern"),
    k(401, "unauthorized", "no token or session, or a malformed, unknown or revoked one, or an expired session"),
    k(403, "forbidden", "the token's role does not allow the route, or the token is limited to other sandboxes"),
    k(403, "forbidden_host", "`Host` is not a loopback name or an `--allow-host` (DNS rebinding)"),
    k(403, "forbidden_origin", "`Origin` is not the node's own (a cross-site request)"),
    k(403, "path_forbidden", "a sandbox from a path outside `--projects-root` (the same answer whether or not the path exists)"),
    k(404, "not_found", "no such route"),
    k(404, "no_sandbox", "unknown sandbox (`sandbox`)"),
    k(404, "no_process", "unknown process (`process`)"),
    k(404, "no_module", "unknown module (`module`)"),
    k(404, "no_token", "unknown token id (`token`)"),
    k(404, "no_version", "a version that is not kept (`module`, `version`, `kept`)"),
    k(405, "method_not_allowed", "the route does not take this method"),
    k(409, "sandbox_exists", "create with an id in use (`sandbox`)"),
    k(409, "reload_aborted", "a reload failed after compile/check; nothing changed (`step`, `module`, `process`, `line`, `column`)"),
    k(409, "busy", "the sandbox cannot take the request now (it is restarting)"),
    k(409, "sandbox_unrestored", "create with the id of a stored sandbox that failed to restore; delete it first (`DELETE`, or `graft run --discard ID`), which loses its data (`sandbox`)"),
    k(413, "body_too_large", "the body is over 1 MiB (`limit_bytes`)"),
    k(415, "unsupported_media_type", "a mutating request whose `Content-Type` is not `application/json`"),
    k(422, "invalid_input", "invalid id, module name, capability or entry; an empty `modules`; a message over `max_message_bytes`; a name already registered"),
    k(422, "compile_error", "syntax or static check error (`module`, `file`, `line`, `column`, `frame`, `diagnostics`)"),
    k(422, "reload_aborted", "a behaviour check failed (step `check`)"),
    k(422, "spawn_failed", "the spawned process's init failed (`module`, `reason`)"),
    k(422, "not_plain_data", "a reply or state with no JSON form"),
    k(422, "luau_error", "an eval chunk raised or was stopped"),
    k(422, "cyclic_value", "a reply, state or message that refers to itself"),
    k(422, "value_too_large", "a value whose JSON form passes `max_value_bytes` (`limit`)"),
    k(422, "limit_out_of_range", "a limit or bounded field outside its range (`field`, `value`, `min`, `max`)"),
    k(422, "badarg", "a bad argument, e.g. a process name that is empty, longer than 64, all digits or `<…>`"),
    k(422, "duplicate_sandbox", "a batch reload naming a sandbox twice (`sandbox`)"),
    k(429, "mailbox_full", "the target's mailbox holds `max_mailbox` messages (`target`)"),
    k(429, "max_processes", "the sandbox has `max_processes` processes (`max_processes`)"),
    k(429, "node_limit", "the node holds `--max-sandboxes` sandboxes"),
    k(429, "too_many_streams", "the node, or this token, has the most event streams open that are allowed (`limit`; default 512 in all, 128 per token)"),
    k(429, "auth_rate_limited", "too many failed authentications from this address (`retry_after_s`)"),
    k(500, "crashed", "the called process exited before replying (`target`, `reason`)"),
    k(500, "internal", "a fault of the server"),
    k(500, "storage_constraint", "the database refused a write that breaks its rules (a bug); nothing was applied"),
    k(500, "storage_invalid", "a value the database cannot hold; nothing was applied"),
    k(500, "storage_corrupt", "the database file is damaged; nothing was applied"),
    k(500, "storage_error", "another database error; nothing was applied"),
    k(500, "storage_newer_schema", "the database is from a newer Graft; nothing was applied"),
    k(500, "storage_not_found", "a stored row the write needs is missing; nothing was applied"),
    k(503, "sandbox_stopped", "the sandbox was destroyed while the request waited (`sandbox`)"),
    k(503, "sandbox_rebuilding", "the sandbox is being rebuilt with new settings (a graft.toml edit) for a moment; try again (`sandbox`)"),
    k(503, "sandbox_failed", "the sandbox was stopped by an internal error; restart or delete it (`sandbox`)"),
    k(503, "audit_unavailable", "the audit row could not be written; nothing was done (`storage`: the store's kind, e.g. `storage_read_only`; the message says why)"),
    k(503, "out_of_memory", "the sandbox's heap is full (`memory_bytes`)"),
    k(503, "storage_read_only", "the data directory cannot be written; nothing was applied"),
    k(503, "storage_io", "the data directory failed (an I/O error); nothing was applied"),
    k(503, "storage_closed", "the node is shutting down; nothing was applied"),
    k(503, "storage_writer_gone", "the database writer stopped; nothing was applied"),
    k(503, "storage_open", "the database could not be opened; nothing was applied"),
    k(507, "storage_full", "the disk (or `max_database_bytes`) is full; nothing was applied"),
    k(504, "timeout", "no answer within `timeout_ms` (`target`, `timeout_ms`)"),
];

/// The kinds answered with `status`, in [`KINDS`] order.
pub fn kinds_of(status: u16) -> Vec<&'static str> {
    KINDS
        .iter()
        .filter(|k| k.status == status)
        .map(|k| k.kind)
        .collect()
}

impl ApiError {
    /// An error with a kind and a message.
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> ApiError {
        let mut error = serde_json::Map::new();
        error.insert("kind".into(), json!(kind));
        error.insert("message".into(), json!(message.into()));
        ApiError { status, error }
    }

    pub(crate) fn bad_request(kind: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, kind, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub(crate) fn with(mut self, key: &str, value: impl serde::Serialize) -> ApiError {
        self.error.insert(
            key.into(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
        self
    }

    /// The body, `{ "error": {...} }`.
    pub fn body(&self) -> Value {
        json!({ "error": self.error })
    }
}

/// The HTTP status of a library error (see [`KINDS`]).
///
/// | kind | status |
/// | --- | --- |
/// | `no_sandbox`, `no_process`, `no_module`, `no_version` | 404 |
/// | `sandbox_exists`, `sandbox_unrestored`, `busy`, `reload_aborted` (but step `check`: 422) | 409 |
/// | `invalid_input`, `compile_error`, `spawn_failed`, `not_plain_data`, `luau_error`, `cyclic_value`, `value_too_large`, `limit_out_of_range`, `badarg` | 422 |
/// | `mailbox_full`, `max_processes`, `node_limit` | 429 |
/// | `crashed` | 500 (the handler crashed; `reason` says why) |
/// | `sandbox_stopped`, `sandbox_rebuilding`, `sandbox_failed`, `out_of_memory` | 503 |
/// | `timeout` | 504 |
pub fn status_for(e: &Error) -> StatusCode {
    match e {
        Error::NoSandbox(_)
        | Error::NoProcess(_)
        | Error::NoModule(_)
        | Error::NoVersion { .. } => StatusCode::NOT_FOUND,
        // A failed behaviour check is a check error (SPEC §6: 422).
        Error::ReloadAborted {
            step: ReloadStep::Check,
            ..
        } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::SandboxExists(_) | Error::ReloadAborted { .. } => StatusCode::CONFLICT,
        Error::InvalidInput(_)
        | Error::Compile { .. }
        | Error::SpawnFailed { .. }
        | Error::NotPlainData(_)
        | Error::Luau(_)
        | Error::Vm(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::MailboxFull(_) | Error::TooManyProcesses(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Crashed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        Error::SandboxStopped(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::CallTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        Error::CyclicValue(_)
        | Error::ValueTooLarge { .. }
        | Error::LimitOutOfRange { .. }
        | Error::BadArg(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::NodeLimit(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Busy(_) | Error::Unrestored { .. } => StatusCode::CONFLICT,
        // Retryable: the sandbox is back in a moment.
        Error::Rebuilding(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::SandboxFailed { .. } | Error::OutOfMemory(_) => StatusCode::SERVICE_UNAVAILABLE,
        // Nothing was applied; whether retrying can help decides the class.
        Error::Storage(s) => match s {
            StoreError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
            StoreError::ReadOnly { .. }
            | StoreError::Io { .. }
            | StoreError::Open { .. }
            | StoreError::Closed
            | StoreError::WriterGone(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
        // `Error` is non-exhaustive: a kind this table does not know yet is
        // the server's fault until it is mapped here.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let message = match &e {
            // No absolute path of the host in a body (the log has them).
            Error::Storage(s) => format!("{}: nothing was applied", s.client_message()),
            _ => e.to_string(),
        };
        let base = ApiError::new(status_for(&e), e.kind(), message);
        match e {
            Error::NoSandbox(id)
            | Error::SandboxExists(id)
            | Error::SandboxStopped(id)
            | Error::Rebuilding(id)
            | Error::Unrestored { id, .. } => base.with("sandbox", id),
            Error::NoProcess(p) => base.with("process", p),
            Error::NoModule(m) => base.with("module", m),
            Error::NoVersion {
                module,
                version,
                kept,
            } => base
                .with("module", module)
                .with("version", version)
                .with("kept", kept),
            Error::Compile { diagnostics } => {
                let mut err = base;
                if let Some(d) = diagnostics.first() {
                    err = err
                        .with("module", &d.module)
                        .with("file", &d.file)
                        .with("line", d.line)
                        .with("column", d.column)
                        .with("frame", &d.frame);
                }
                err.with("diagnostics", diagnostics)
            }
            Error::ReloadAborted {
                step,
                module,
                process,
                line,
                column,
                ..
            } => base
                .with("step", step)
                .with("module", module)
                .with("process", process)
                .with("line", line)
                .with("column", column),
            Error::CallTimeout { target, timeout_ms } => {
                base.with("target", target).with("timeout_ms", timeout_ms)
            }
            Error::Crashed { target, reason } => base.with("target", target).with("reason", reason),
            Error::MailboxFull(target) => base.with("target", target),
            Error::TooManyProcesses(n) => base.with("max_processes", n),
            Error::SpawnFailed { module, reason } => {
                base.with("module", module).with("reason", reason)
            }
            Error::ValueTooLarge { limit, .. } => base.with("limit", limit),
            Error::LimitOutOfRange {
                field,
                value,
                min,
                max,
            } => base
                .with("field", field)
                .with("value", value)
                .with("min", min)
                .with("max", max),
            Error::SandboxFailed { id, .. } => base.with("sandbox", id),
            _ => base,
        }
    }
}

/// The `error.kind` of an error answer, kept in the response's extensions
/// for the audit row.
#[derive(Clone, Debug)]
pub(crate) struct ResponseKind(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self
            .error
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_owned();
        let mut resp = (self.status, Json(self.body())).into_response();
        resp.extensions_mut().insert(ResponseKind(kind));
        resp
    }
}

/// The safety net's timeout: the library did not answer within `ms`
/// (plus a margin, for `call`).
pub(crate) fn timeout_error(what: &str, target: &str, ms: u64) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!("{what} timed out after {ms} ms"),
    )
    .with("target", target)
    .with("timeout_ms", ms)
}

/// An `invalid_input` (422) with this message.
pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::from(Error::InvalidInput(message.into()))
}

/// A task on the blocking pool panicked or was cancelled: a fault of the server.
pub(crate) fn join_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::internal(e.to_string())
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /api/v1/openapi.json",
    )
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /api/v1/openapi.json",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft::ExitReason;

    /// One error of every library kind.
    fn every_library_error() -> Vec<Error> {
        let s = || "x".to_owned();
        vec![
            Error::NoSandbox(s()),
            Error::SandboxExists(s()),
            Error::NoProcess(s()),
            Error::NoModule(s()),
            Error::NoVersion {
                module: s(),
                version: 2,
                kept: vec![1, 3],
            },
            Error::InvalidInput(s()),
            Error::Compile {
                diagnostics: Vec::new(),
            },
            Error::ReloadAborted {
                step: ReloadStep::Migrate,
                module: None,
                process: None,
                line: None,
                column: None,
                message: s(),
            },
            Error::ReloadAborted {
                step: ReloadStep::Check,
                module: None,
                process: None,
                line: None,
                column: None,
                message: s(),
            },
            Error::CallTimeout {
                target: s(),
                timeout_ms: 1,
            },
            Error::Crashed {
                target: s(),
                reason: ExitReason::Killed,
            },
            Error::MailboxFull(s()),
            Error::TooManyProcesses(3),
            Error::SpawnFailed {
                module: s(),
                reason: ExitReason::Killed,
            },
            Error::NotPlainData(s()),
            Error::SandboxStopped(s()),
            Error::Luau(s()),
            Error::Vm(mlua::Error::runtime(s())),
            Error::CyclicValue(s()),
            Error::ValueTooLarge {
                limit: 9,
                what: s(),
            },
            Error::LimitOutOfRange {
                field: s(),
                value: "0".into(),
                min: 1,
                max: 2,
            },
            Error::NodeLimit(s()),
            Error::Busy(s()),
            Error::Rebuilding(s()),
            Error::Unrestored {
                id: s(),
                reason: s(),
            },
            Error::SandboxFailed {
                id: s(),
                message: s(),
            },
            Error::OutOfMemory(s()),
            Error::BadArg(s()),
        ]
    }

    #[test]
    fn every_library_kind_is_listed_with_its_status() {
        for e in every_library_error() {
            let err = ApiError::from(e);
            let kind = err.error["kind"].as_str().unwrap_or_default().to_owned();
            assert!(
                KINDS
                    .iter()
                    .any(|k| k.kind == kind && k.status == err.status.as_u16()),
                "({}, {kind}) is not in KINDS",
                err.status
            );
            // Only a crash is 500: any other library kind falling through to
            // 500 means `status_for` lacks a row.
            assert!(
                err.status != StatusCode::INTERNAL_SERVER_ERROR || kind == "crashed",
                "{kind} falls through to 500"
            );
        }
    }

    #[test]
    fn limit_out_of_range_carries_its_range() {
        let err = ApiError::from(Error::LimitOutOfRange {
            field: "handler_ms".into(),
            value: "0".into(),
            min: 1,
            max: 60_000,
        });
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(err.error["field"], "handler_ms");
        assert_eq!(err.error["value"], "0");
        assert_eq!(err.error["min"], 1);
        assert_eq!(err.error["max"], 60_000);
    }

    /// A sandbox being rebuilt answers a retryable 503 naming it; creating
    /// the id of a sandbox that failed to restore is a 409 conflict whose
    /// message names the ways out.
    #[test]
    fn a_rebuild_is_retryable_and_an_unrestored_id_is_a_conflict() {
        let err = ApiError::from(Error::Rebuilding("shop".into()));
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.error["kind"], "sandbox_rebuilding");
        assert_eq!(err.error["sandbox"], "shop");
        assert!(err.error["message"]
            .as_str()
            .is_some_and(|m| m.contains("try again")));
        let err = ApiError::from(Error::Unrestored {
            id: "shop".into(),
            reason: "version 1 of module `counter` does not compile: line 1:10: …".into(),
        });
        assert_eq!(err.status, StatusCode::CONFLICT);
        assert_eq!(err.error["kind"], "sandbox_unrestored");
        assert_eq!(err.error["sandbox"], "shop");
        let msg = err.error["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("--discard shop") && msg.contains("DELETE /api/v1/sandboxes/shop"),
            "{msg}"
        );
    }

    #[test]
    fn kinds_are_unique_per_status() {
        for (i, a) in KINDS.iter().enumerate() {
            assert!(
                !KINDS[i + 1..]
                    .iter()
                    .any(|b| a.kind == b.kind && a.status == b.status),
                "({}, {}) listed twice",
                a.status,
                a.kind
            );
        }
    }
}
