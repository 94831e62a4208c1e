//! The one table of who may call what: every routed method and path, the
//! role it needs, whether it is audited, and where its sandbox is named.
//!
//! The middleware reads nothing else to decide; handlers check no roles.
//! Tests walk this table (every role against every route) and the OpenAPI
//! document (every documented operation has a row here), so a route added
//! without a row is caught; at run time such a route needs an unscoped
//! admin and is not audited (refused rather than open).
//!
//! Add a route: a row here, its handler in `router.rs`, its operation in the
//! OpenAPI document.

use axum::http::Method;

use super::Role;

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone (the handler may authenticate itself: the sign-in).
    Public,
    /// A token (or session) with at least this role.
    Role(Role),
}

/// Where a route names its sandbox (for scoped tokens and the audit row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxAt {
    /// It concerns no one sandbox.
    None,
    /// The path's `{id}`.
    Path,
    /// The body's `id` (create).
    BodyId,
    /// The body's `sandboxes` list (batch reload): every one must be in scope.
    BodyList,
    /// It concerns the whole node: a token limited to some sandboxes is refused.
    NodeWide,
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// The HTTP method, upper case.
    pub method: &'static str,
    /// The path as routed (`/api/v1/sandboxes/{id}`).
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Which requests write an audit row.
    pub audit: AuditClass,
    /// Where its sandbox is named.
    pub sandbox: SandboxAt,
}

const fn r(
    method: &'static str,
    path: &'static str,
    access: Access,
    audit: AuditClass,
    sandbox: SandboxAt,
) -> Route {
    Route {
        method,
        path,
        access,
        audit,
        sandbox,
    }
}

use Access::{Public, Role as R};
use SandboxAt::{BodyId, BodyList, NodeWide, Path};

const VIEWER: Access = R(Role::Viewer);
const OPERATOR: Access = R(Role::Operator);
const ADMIN: Access = R(Role::Admin);
const AUDIT: AuditClass = AuditClass::Always;
const NO_AUDIT: AuditClass = AuditClass::Never;
const MESSAGE: AuditClass = AuditClass::Message;

/// Which requests of a route write an audit row.
///
/// The audit log answers "who changed this node, and who read what it
/// keeps": code, configuration, processes' state, tokens. Messages to
/// processes (call, cast, send) are the application's own traffic: a
/// service answers them at its request rate, so one row each would grow the
/// database by that rate, and one write-ahead commit each would put the
/// node's storage on every message's path (a full disk would stop the
/// application, not only its administration). They are counted in
/// `graft_http_requests_total{route,status}`; their rows are written only
/// when the node asks for it ([`TrustConfig::audit_messages`],
/// `--audit-messages`). A *refused* message is always recorded.
///
/// [`TrustConfig::audit_messages`]: super::TrustConfig::audit_messages
///
/// ```
/// use graft_http::trust::routes::AuditClass;
/// assert!(AuditClass::Always.allowed_writes_row(false));
/// assert!(!AuditClass::Message.allowed_writes_row(false));
/// assert!(AuditClass::Message.allowed_writes_row(true));
/// assert!(AuditClass::Message.denied_writes_row());
/// assert!(!AuditClass::Never.denied_writes_row());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditClass {
    /// No row (reads other than process state).
    Never,
    /// Every request, allowed or denied (mutations of the node, `eval`,
    /// state reads, tokens, sessions).
    Always,
    /// A message to a process: a denied request always writes a row; an
    /// allowed one only when messages are audited.
    Message,
}

impl AuditClass {
    /// Whether an allowed request writes a row (before it runs, failing
    /// closed), given whether the node audits messages.
    pub fn allowed_writes_row(self, audit_messages: bool) -> bool {
        match self {
            AuditClass::Never => false,
            AuditClass::Always => true,
            AuditClass::Message => audit_messages,
        }
    }

    /// Whether a refused request writes a row.
    pub fn denied_writes_row(self) -> bool {
        self != AuditClass::Never
    }

    /// The name the OpenAPI document gives it (`x-graft-audited`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditClass::Never => "never",
            AuditClass::Always => "always",
            AuditClass::Message => "with_audit_messages",
        }
    }
}

/// Every route of the API (SPEC §6, §9). Roles follow SPEC §9: viewers read
/// everything but process state; operators call, cast, send, spawn, reload,
/// roll back and restart; admins also create and delete sandboxes, eval,
/// read state, and manage tokens and the audit log. Audited: every request
/// that changes the node, every eval and every state read; messages to
/// processes as [`AuditClass::Message`] says.
pub const ROUTES: &[Route] = &[
    r("GET", "/api/v1/health", Public, NO_AUDIT, SandboxAt::None),
    r(
        "GET",
        "/api/v1/openapi.json",
        VIEWER,
        NO_AUDIT,
        SandboxAt::None,
    ),
    r(
        "GET",
        "/api/v1/sandboxes",
        VIEWER,
        NO_AUDIT,
        SandboxAt::None,
    ),
    r("POST", "/api/v1/sandboxes", ADMIN, AUDIT, BodyId),
    r("GET", "/api/v1/sandboxes/{id}", VIEWER, NO_AUDIT, Path),
    r("DELETE", "/api/v1/sandboxes/{id}", ADMIN, AUDIT, Path),
    r(
        "POST",
        "/api/v1/sandboxes/{id}/restart",
        OPERATOR,
        AUDIT,
        Path,
    ),
    r(
        "GET",
        "/api/v1/sandboxes/{id}/processes",
        VIEWER,
        NO_AUDIT,
        Path,
    ),
    r(
        "GET",
        "/api/v1/sandboxes/{id}/processes/{target}/state",
        ADMIN,
        AUDIT,
        Path,
    ),
    r(
        "POST",
        "/api/v1/sandboxes/{id}/call",
        OPERATOR,
        MESSAGE,
        Path,
    ),
    r(
        "POST",
        "/api/v1/sandboxes/{id}/cast",
        OPERATOR,
        MESSAGE,
        Path,
    ),
    r(
        "POST",
        "/api/v1/sandboxes/{id}/send",
        OPERATOR,
        MESSAGE,
        Path,
    ),
    r(
        "POST",
        "/api/v1/sandboxes/{id}/spawn",
        OPERATOR,
        AUDIT,
        Path,
    ),
    r(
        "GET",
        "/api/v1/sandboxes/{id}/modules",
        VIEWER,
        NO_AUDIT,
        Path,
    ),
    r(
        "GET",
        "/api/v1/sandboxes/{id}/modules/{module}/versions",
        VIEWER,
        NO_AUDIT,
        Path,
    ),
    r(
        "POST",
        "/api/v1/sandboxes/{id}/modules/{module}/rollback",
        OPERATOR,
        AUDIT,
        Path,
    ),
    r(
        "POST",
        "/api/v1/sandboxes/{id}/reload",
        OPERATOR,
        AUDIT,
        Path,
    ),
    r("POST", "/api/v1/sandboxes/{id}/eval", ADMIN, AUDIT, Path),
    r(
        "GET",
        "/api/v1/sandboxes/{id}/events",
        VIEWER,
        NO_AUDIT,
        Path,
    ),
    r("POST", "/api/v1/reload", OPERATOR, AUDIT, BodyList),
    r("GET", "/api/v1/tokens", ADMIN, NO_AUDIT, NodeWide),
    r("POST", "/api/v1/tokens", ADMIN, AUDIT, NodeWide),
    r("DELETE", "/api/v1/tokens/{token}", ADMIN, AUDIT, NodeWide),
    r("GET", "/api/v1/audit", ADMIN, NO_AUDIT, NodeWide),
    r("POST", "/api/v1/session", Public, AUDIT, SandboxAt::None),
    r("GET", "/api/v1/session", VIEWER, NO_AUDIT, SandboxAt::None),
    r("DELETE", "/api/v1/session", Public, AUDIT, SandboxAt::None),
    // SPEC §10. The dashboard's page and assets hold no data (it signs in
    // through `/api/v1/session`). The node-wide views refuse scoped tokens
    // rather than filter them.
    r("GET", "/", Public, NO_AUDIT, SandboxAt::None),
    r("GET", "/assets/app.css", Public, NO_AUDIT, SandboxAt::None),
    r("GET", "/assets/app.js", Public, NO_AUDIT, SandboxAt::None),
    r("GET", "/metrics", VIEWER, NO_AUDIT, NodeWide),
    r("GET", "/api/v1/events", VIEWER, NO_AUDIT, NodeWide),
    r("GET", "/api/v1/events/stream", VIEWER, NO_AUDIT, NodeWide),
    r("GET", "/api/v1/sandboxes/{id}/tree", VIEWER, NO_AUDIT, Path),
];

/// How an audited route's row is made durable relative to its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowCommit {
    /// The effect is not written to the database (a call, an eval, a state
    /// read, a sign-in): the row is committed `pending` before the handler
    /// runs, and completed after (fails closed).
    Ahead,
    /// The effect is one commit to the node's database (create, reload,
    /// rollback, token create and revoke): the row, already saying `ok`
    /// with this status, joins that transaction, so both or neither are
    /// stored. A request that commits nothing gets its row after the answer.
    WithEffect(u16),
    /// Both: steps in memory come before the commit (a delete stops the app
    /// first), so the row is committed `pending` ahead, and its `ok` with
    /// this status joins the deletion's transaction.
    AheadThenWithEffect(u16),
}

/// How the row of audited route `row` is committed (see [`RowCommit`]). A
/// batch reload is one transaction per sandbox, so its one row goes ahead.
///
/// ```
/// use graft_http::trust::routes::{find, row_commit, RowCommit};
/// let create = find(&axum::http::Method::POST, "/api/v1/sandboxes").unwrap();
/// assert_eq!(row_commit(create), RowCommit::WithEffect(201));
/// ```
pub fn row_commit(row: &Route) -> RowCommit {
    match (row.method, row.path) {
        ("POST", "/api/v1/sandboxes") | ("POST", "/api/v1/tokens") => RowCommit::WithEffect(201),
        ("POST", "/api/v1/sandboxes/{id}/reload")
        | ("POST", "/api/v1/sandboxes/{id}/modules/{module}/rollback") => {
            RowCommit::WithEffect(200)
        }
        ("DELETE", "/api/v1/tokens/{token}") => RowCommit::WithEffect(204),
        ("DELETE", "/api/v1/sandboxes/{id}") => RowCommit::AheadThenWithEffect(204),
        _ => RowCommit::Ahead,
    }
}

/// What a request that matched no route gets: any valid credentials, then
/// 404 (a caller without them gets 401 and learns nothing of which paths
/// exist). Not audited.
pub const UNKNOWN: Route = r("*", "*", VIEWER, NO_AUDIT, SandboxAt::None);

/// What a routed request not in the table gets (a wrong method on a known
/// path, or a route added without a row): an unscoped admin, not audited.
pub const UNLISTED: Route = r("*", "*", ADMIN, NO_AUDIT, NodeWide);

/// The row of `method` on the routed path `path`, if any. `HEAD` has the
/// row of `GET`: axum answers it with the `GET` handler (body dropped), so
/// it is that request, with its role and its audit row (an audited state
/// read must not go unrecorded because it was asked as `HEAD`).
///
/// ```
/// use graft_http::trust::routes::{find, Access};
/// use graft_http::trust::Role;
/// let row = find(&axum::http::Method::POST, "/api/v1/sandboxes/{id}/eval").unwrap();
/// assert_eq!(row.access, Access::Role(Role::Admin));
/// assert_eq!(row.audit, graft_http::trust::routes::AuditClass::Always);
/// let head = find(&axum::http::Method::HEAD, "/api/v1/sandboxes/{id}/processes/{target}/state");
/// assert_eq!(head.unwrap().method, "GET");
/// ```
pub fn find(method: &Method, path: &str) -> Option<&'static Route> {
    let method = if *method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES.iter().find(|r| r.path == path && r.method == method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_unique_and_mutations_are_audited() {
        for (i, a) in ROUTES.iter().enumerate() {
            assert!(
                !ROUTES[i + 1..]
                    .iter()
                    .any(|b| a.method == b.method && a.path == b.path),
                "{} {} listed twice",
                a.method,
                a.path
            );
            if a.method != "GET" {
                assert!(
                    a.audit.denied_writes_row() && a.audit.allowed_writes_row(true),
                    "{} {} mutates but is not audited",
                    a.method,
                    a.path
                );
            }
            if a.path.contains("{id}") {
                assert_eq!(a.sandbox, Path, "{} {}", a.method, a.path);
            }
        }
        let state = find(
            &Method::GET,
            "/api/v1/sandboxes/{id}/processes/{target}/state",
        );
        assert!(state.is_some_and(|r| r.audit == AuditClass::Always && r.access == ADMIN));
        // Only messages to processes are left to the node's choice.
        for r in ROUTES.iter().filter(|r| r.audit == AuditClass::Message) {
            assert_eq!(r.method, "POST");
            assert!(
                ["call", "cast", "send"]
                    .iter()
                    .any(|m| r.path == format!("/api/v1/sandboxes/{{id}}/{m}")),
                "{} is not a message",
                r.path
            );
        }
    }
}
