//! The one middleware of the API: browser rules, authentication,
//! authorization and the audit row, in that order, for every routed request,
//! as the route's row in [`super::routes::ROUTES`] says.
//!
//! Invariants:
//! * Nothing reaches a handler unless its row allows the caller; a routed
//!   request without a row needs an unscoped admin ([`super::routes::UNLISTED`]).
//! * Refusals come before any body is read, except for the two routes that
//!   name their sandboxes in the body (create, batch reload), whose body is
//!   read (at most [`crate::MAX_BODY_BYTES`]) and handed on unchanged.
//! * An audited request runs only after its `pending` row is committed, or
//!   with its row attached to the effect's own commit (see
//!   [`super::routes::RowCommit`]).
//! * A request that matched no route is authenticated too ([`routes::UNKNOWN`]):
//!   401 before 404.
//! * No answer quotes a presented credential; query and header text shown in
//!   errors is cut short and escaped.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::audit::{self, AuthenticatedAs, RowStart};
use super::browser::browser_rules;
use super::routes::{self, Access, Route, RowCommit, SandboxAt};
use super::session::session_cookie;
use super::{Caller, Peer, Trust};
use crate::errors::{ApiError, ResponseKind};
use crate::router::AppState;
use crate::MAX_BODY_BYTES;

/// The longest `Authorization` header looked at; longer is refused unread.
const MAX_AUTHORIZATION_BYTES: usize = 512;

/// Text from a request shown in an error: at most 64 characters, escaped.
pub(crate) fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    let mut out = cut.escape_default().to_string();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

pub(crate) fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

pub(crate) fn rate_limited(retry: Duration) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "auth_rate_limited",
        "too many failed authentications from this address; wait and retry",
    )
    .with("retry_after_s", retry.as_secs().max(1))
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// Who the credentials of a request stand for: a bearer token, else the
/// session cookie. A failure takes from the peer's rate limit.
pub(crate) fn authenticate(
    trust: &Trust,
    headers: &HeaderMap,
    peer: Option<std::net::IpAddr>,
) -> Result<Caller, ApiError> {
    trust.limiter.check(peer).map_err(rate_limited)?;
    let result = credentials(trust, headers);
    if result.is_err() {
        trust.limiter.failed(peer);
    }
    result
}

/// Who the credentials of `headers` stand for now, without touching the
/// rate limit: for a long-lived answer (an event stream) that checks again
/// that its token was not revoked and its session did not end.
pub(crate) fn credentials(trust: &Trust, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let mut auths = headers.get_all(header::AUTHORIZATION).iter();
    let first = auths.next();
    if auths.next().is_some() {
        return Err(unauthorized("send one Authorization header, not several"));
    }
    if let Some(value) = first {
        let bytes = value.as_bytes();
        if bytes.len() > MAX_AUTHORIZATION_BYTES {
            return Err(unauthorized(
                "the Authorization header is malformed: expected `Bearer graft_…`",
            ));
        }
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(|| {
                unauthorized("the Authorization header is malformed: expected `Bearer graft_…`")
            })?;
        return trust
            .caller_for_token(token)
            .ok_or_else(|| unauthorized("the token is not valid (malformed, unknown or revoked)"));
    }
    if let Some(secret) = session_cookie(headers) {
        return trust.caller_for_session(secret).ok_or_else(|| {
            unauthorized("the session has expired or was signed out; sign in again")
        });
    }
    Err(unauthorized(
        "this request needs a token: send `Authorization: Bearer graft_…` (graft token create), or sign in",
    ))
}

/// The sandbox(es) a body names (`id`, or `sandboxes`), if it parses.
fn body_sandboxes(bytes: &[u8], at: SandboxAt) -> Option<Vec<String>> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    match at {
        SandboxAt::BodyId => v.get("id")?.as_str().map(|s| vec![s.to_owned()]),
        SandboxAt::BodyList => v
            .get("sandboxes")?
            .as_array()?
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// The middleware itself (see the module doc).
///
/// The common request (see [`allowed_unaudited`]) is decided without
/// awaiting anything and goes straight on; every other one takes the full
/// path, whose future is large (refusals that write audit rows, body scope,
/// the audit row's commit) and so is boxed only when it is needed: moving
/// ~3 KB of future per request cost the common case more than the checks.
pub(crate) async fn enforce(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let (row, listed) = route_row(&req);
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    match allowed_unaudited(&app.trust, row, peer, &req) {
        Some(caller) => {
            drop(app);
            req.extensions_mut().insert(Peer(peer));
            if let Some(caller) = caller {
                req.extensions_mut().insert(caller);
            }
            next.run(req).await
        }
        None => Box::pin(enforce_fully(app, row, listed, peer, req, next, started)).await,
    }
}

/// The row of a request, and whether the table lists its route. No matched
/// path: an unknown route, answered 404 after the caller is authenticated
/// (a probe without credentials learns nothing).
fn route_row(req: &Request) -> (&'static Route, bool) {
    let matched = req.extensions().get::<MatchedPath>();
    match (
        matched.and_then(|p| routes::find(req.method(), p.as_str())),
        matched,
    ) {
        (Some(row), _) => (row, true),
        (None, Some(_)) => (&routes::UNLISTED, false),
        (None, None) => (&routes::UNKNOWN, false),
    }
}

/// The caller of a request that may go on at once (`Some(None)` for a
/// public route): a route whose allowed requests write no audit row, the
/// browser rules met, valid credentials of the role it needs, and nothing
/// to check against a scope (an unscoped caller; no body naming
/// sandboxes). `None` for anything else, which [`enforce_fully`] decides
/// from the start, refusals included: the two cannot disagree on what is
/// refused, and a failed authentication is counted against its peer once.
fn allowed_unaudited(
    trust: &Trust,
    row: &Route,
    peer: Option<std::net::IpAddr>,
    req: &Request,
) -> Option<Option<Caller>> {
    if row.audit.allowed_writes_row(trust.config().audit_messages)
        || matches!(row.sandbox, SandboxAt::BodyId | SandboxAt::BodyList)
    {
        return None;
    }
    browser_rules(trust, req.method(), req.headers()).ok()?;
    let Access::Role(needed) = row.access else {
        return Some(None);
    };
    trust.limiter.check(peer).ok()?;
    let caller = credentials(trust, req.headers()).ok()?;
    (caller.role >= needed && !caller.is_scoped()).then_some(Some(caller))
}

/// Every request [`allowed_unaudited`] does not let through at once: the
/// browser rules, authentication and authorization again, with their
/// refusals and denied rows, then the audit row around the handler.
async fn enforce_fully(
    app: AppState,
    row: &'static Route,
    listed: bool,
    peer: Option<std::net::IpAddr>,
    req: Request,
    next: Next,
    started: Instant,
) -> Response {
    // The route as the audit row names it: the table's own path when it has
    // a row (no copy), else the routed or raw path, cut.
    let route_name: Cow<'static, str> = match req.extensions().get::<MatchedPath>() {
        _ if listed => Cow::Borrowed(row.path),
        Some(p) => Cow::Owned(p.as_str().chars().take(256).collect()),
        None => Cow::Owned(req.uri().path().chars().take(256).collect()),
    };
    // The row can join the effect's transaction only when the audit log is
    // in the node's own database.
    let AppState { node, trust } = app;
    let same_store = node.store().is_some_and(|s| Arc::ptr_eq(s, trust.store()));
    drop(node);
    let method = req.method().clone();
    // The path's sandbox, read now when the request's row will need it if
    // allowed; else only when it is refused (its denied row) or its caller
    // is scoped: most calls never read it.
    let (req, sandbox) = if row.audit.allowed_writes_row(trust.config().audit_messages) {
        path_sandbox(req, row).await
    } else {
        (req, None)
    };
    continue_with(
        trust, row, same_store, route_name, method, peer, sandbox, req, next, started,
    )
    .await
}

/// The sandbox id in the path of a route that names one there, cut.
async fn path_sandbox(req: Request, row: &Route) -> (Request, Option<String>) {
    if row.sandbox != SandboxAt::Path {
        return (req, None);
    }
    let (mut parts, body) = req.into_parts();
    let sandbox = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(params) => params
            .iter()
            .find(|(k, _)| *k == "id")
            .map(|(_, v)| v.chars().take(256).collect()),
        Err(_) => None,
    };
    (Request::from_parts(parts, body), sandbox)
}

/// How an allowed audited request's row is being made durable.
enum Audit {
    /// Not audited.
    No,
    /// Committed `pending` ahead; completed after the answer.
    Ahead(audit::PendingRow),
    /// Attached to the effect's commit.
    WithEffect(graft::store::Attached),
}

/// What the steps of one request share: the route's row and how the
/// request is named in the audit log.
struct Ctx {
    trust: Arc<Trust>,
    row: &'static Route,
    route_name: Cow<'static, str>,
    method: Method,
    started: Instant,
}

impl Ctx {
    /// The request's duration so far, µs.
    fn elapsed_us(&self) -> u64 {
        self.started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64
    }

    /// The start of the request's audit row.
    fn row_start<'a>(
        &'a self,
        caller: Option<&'a Caller>,
        sandbox: &Option<String>,
    ) -> RowStart<'a> {
        RowStart {
            caller,
            method: self.method.as_str(),
            route: &self.route_name,
            sandbox: sandbox.clone(),
        }
    }

    /// [`Ctx::deny`], reading the path's sandbox for the denied row first
    /// if it was not read yet and the row is written.
    async fn refuse(
        &self,
        caller: Option<Caller>,
        sandbox: Option<String>,
        req: Request,
        err: ApiError,
    ) -> Response {
        let writes_row =
            self.row.audit.denied_writes_row() && err.status != StatusCode::TOO_MANY_REQUESTS;
        let sandbox = match sandbox {
            None if writes_row => path_sandbox(req, self.row).await.1,
            known => known,
        };
        self.deny(caller, sandbox, err).await
    }

    /// Refuses the request: writes the denied row when the route's class
    /// asks for one (never for 429s, which would let a flood fill the log),
    /// and answers with the error and its `WWW-Authenticate`/`Retry-After`.
    async fn deny(
        &self,
        caller: Option<Caller>,
        sandbox: Option<String>,
        err: ApiError,
    ) -> Response {
        let status = err.status;
        let kind = err
            .error
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("denied")
            .to_owned();
        let retry = err.error.get("retry_after_s").and_then(Value::as_u64);
        if self.row.audit.denied_writes_row() && status != StatusCode::TOO_MANY_REQUESTS {
            let start = self.row_start(caller.as_ref(), &sandbox);
            let us = self.elapsed_us();
            if let Err(e) =
                audit::write_denied(self.trust.store(), start, &kind, status.as_u16(), us).await
            {
                tracing::warn!(error = %e, "audit: could not record a denied request");
            }
        }
        let mut resp = err.into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"graft\""),
            );
        }
        if let Some(s) = retry {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

#[allow(clippy::too_many_arguments)]
async fn continue_with(
    trust: Arc<Trust>,
    row: &'static Route,
    same_store: bool,
    route_name: Cow<'static, str>,
    method: Method,
    peer: Option<std::net::IpAddr>,
    sandbox: Option<String>,
    req: Request,
    next: Next,
    started: Instant,
) -> Response {
    let ctx = Ctx {
        trust,
        row,
        route_name,
        method,
        started,
    };
    let (caller, sandbox, mut req) = match authorize(&ctx, peer, sandbox, req).await {
        Ok(allowed) => allowed,
        Err(denied) => return denied,
    };
    req.extensions_mut().insert(Peer(peer));
    let audit = match begin_audit(&ctx, same_store, caller.as_ref(), &sandbox, &mut req).await {
        Ok(audit) => audit,
        Err(unavailable) => return unavailable,
    };
    // The handler gets the caller; the audit row's completion needs it
    // only when there is a row (most calls have none: no copy then).
    let kept = match (caller, &audit) {
        (Some(c), Audit::No) => {
            req.extensions_mut().insert(c);
            None
        }
        (Some(c), _) => {
            req.extensions_mut().insert(c.clone());
            Some(c)
        }
        (None, _) => None,
    };
    let resp = next.run(req).await;
    finish_audit(&ctx, audit, kept.as_ref(), &sandbox, &resp);
    resp
}

/// Step 1: browser rules, authentication, the role, and the sandboxes the
/// request touches against the token's scope. Gives the caller, the
/// sandbox(es) for the audit row and the request (its body read and put
/// back for the routes that name sandboxes in it), or the refusal.
async fn authorize(
    ctx: &Ctx,
    peer: Option<std::net::IpAddr>,
    mut sandbox: Option<String>,
    mut req: Request,
) -> Result<(Option<Caller>, Option<String>, Request), Response> {
    if let Err(e) = browser_rules(&ctx.trust, &ctx.method, req.headers()) {
        return Err(ctx.refuse(None, sandbox, req, e).await);
    }
    let caller = match ctx.row.access {
        Access::Public => None,
        Access::Role(needed) => {
            let caller = match authenticate(&ctx.trust, req.headers(), peer) {
                Ok(c) => c,
                Err(e) => return Err(ctx.refuse(None, sandbox, req, e).await),
            };
            if caller.role < needed {
                let e = forbidden(format!(
                    "this needs the {} role; the token `{}` is {}",
                    needed.as_str(),
                    caller.token_id,
                    caller.role.as_str()
                ));
                return Err(ctx.refuse(Some(caller), sandbox, req, e).await);
            }
            Some(caller)
        }
    };
    let scoped = caller.as_ref().is_some_and(Caller::is_scoped);
    if scoped && sandbox.is_none() {
        let (r, s) = path_sandbox(req, ctx.row).await;
        req = r;
        sandbox = s;
    }
    match ctx.row.sandbox {
        SandboxAt::Path => {
            if let (Some(c), Some(id)) = (&caller, &sandbox) {
                if !c.may_see(id) {
                    let e = forbidden(format!(
                        "the token `{}` is not allowed on this sandbox",
                        c.token_id
                    ));
                    return Err(ctx.deny(caller, sandbox, e).await);
                }
            }
        }
        SandboxAt::NodeWide if scoped => {
            let e = forbidden(
                "a token limited to some sandboxes cannot use this node-wide route".into(),
            );
            return Err(ctx.deny(caller, sandbox, e).await);
        }
        SandboxAt::BodyId | SandboxAt::BodyList => {
            let (named, r) = body_scope(ctx, caller.as_ref(), sandbox, req).await?;
            sandbox = named;
            req = r;
        }
        _ => {}
    }
    Ok((caller, sandbox, req))
}

/// The routes that name their sandboxes in the body (create, batch reload):
/// reads the body (at most [`MAX_BODY_BYTES`]), checks every sandbox it
/// names against a scoped token, and puts the body back unchanged.
async fn body_scope(
    ctx: &Ctx,
    caller: Option<&Caller>,
    sandbox: Option<String>,
    req: Request,
) -> Result<(Option<String>, Request), Response> {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            let e = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than {MAX_BODY_BYTES} bytes (or could not be read)"
                ),
            )
            .with("limit_bytes", MAX_BODY_BYTES);
            return Err(ctx.deny(caller.cloned(), sandbox, e).await);
        }
    };
    let named = body_sandboxes(&bytes, ctx.row.sandbox);
    if let Some(c) = caller {
        if c.is_scoped()
            && !named
                .as_ref()
                .is_some_and(|ids| ids.iter().all(|id| c.may_see(id)))
        {
            let e = forbidden(format!(
                "the token `{}` is not allowed on every sandbox this names",
                c.token_id
            ));
            return Err(ctx
                .deny(caller.cloned(), named.map(|n| n.join(",")), e)
                .await);
        }
    }
    let sandbox = named
        .map(|n| n.join(","))
        .map(|s| s.chars().take(1024).collect());
    Ok((sandbox, Request::from_parts(parts, Body::from(bytes))))
}

/// The answer when the audit row cannot be written: nothing runs.
fn audit_unavailable(e: graft::store::StoreError) -> Response {
    tracing::error!(error = %e, "audit: cannot write the audit row; the request is refused");
    // The store's reason (read-only, full, corrupt …) is the caller's
    // to act on; absolute paths are cut to file names (see
    // `StoreError::client_message`), the full text is in the log.
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "audit_unavailable",
        format!(
            "{}: the audit row cannot be written, so nothing was applied",
            e.client_message()
        ),
    )
    .with("storage", e.kind())
    .into_response()
}

/// Step 2: makes an allowed audited request's row durable before it runs:
/// committed `pending` ahead, or attached to the effect's own commit (see
/// [`RowCommit`]). Refuses the request when the row cannot be written.
async fn begin_audit(
    ctx: &Ctx,
    same_store: bool,
    caller: Option<&Caller>,
    sandbox: &Option<String>,
    req: &mut Request,
) -> Result<Audit, Response> {
    let trust = &ctx.trust;
    let start = || ctx.row_start(caller, sandbox);
    let commit = match routes::row_commit(ctx.row) {
        // Another database than the node's (or none): the effect's commit
        // cannot carry the row, so it goes ahead.
        RowCommit::WithEffect(_) | RowCommit::AheadThenWithEffect(_) if !same_store => {
            RowCommit::Ahead
        }
        c => c,
    };
    if !ctx
        .row
        .audit
        .allowed_writes_row(trust.config().audit_messages)
    {
        return Ok(Audit::No);
    }
    Ok(match commit {
        RowCommit::Ahead => match audit::begin(trust.store(), start()).await {
            Ok(p) => Audit::Ahead(p),
            Err(e) => return Err(audit_unavailable(e)),
        },
        RowCommit::WithEffect(status) => {
            let attached = audit::attach_row(trust.store(), start(), status);
            req.extensions_mut()
                .insert(audit::EffectAudit(attached.clone()));
            Audit::WithEffect(attached)
        }
        RowCommit::AheadThenWithEffect(status) => {
            let p = match audit::begin(trust.store(), start()).await {
                Ok(p) => p,
                Err(e) => return Err(audit_unavailable(e)),
            };
            // The deletion's transaction marks the row `ok`.
            let done = graft::store::WriteOp::FinishAudit {
                id: p.id(),
                outcome: "ok".into(),
                status: Some(status),
                duration_us: 0,
                token_id: None,
                role: None,
            };
            let attached = graft::store::Attached::new(trust.store(), vec![done]);
            req.extensions_mut().insert(audit::EffectAudit(attached));
            Audit::Ahead(p)
        }
    })
}

/// Step 3: completes the audit row with the answer's outcome, status,
/// duration and the token a sign-in learnt.
fn finish_audit(
    ctx: &Ctx,
    audit: Audit,
    caller: Option<&Caller>,
    sandbox: &Option<String>,
    resp: &Response,
) {
    let trust = &ctx.trust;
    let status = resp.status();
    let outcome = || {
        if status.is_success() {
            "ok".to_owned()
        } else {
            resp.extensions()
                .get::<ResponseKind>()
                .map(|k| k.0.clone())
                .unwrap_or_else(|| status.as_u16().to_string())
        }
    };
    let learnt = resp.extensions().get::<AuthenticatedAs>().map(|a| &a.0);
    let us = ctx.elapsed_us();
    match audit {
        Audit::No => {}
        Audit::Ahead(p) => p.finish(&outcome(), status.as_u16(), us, learnt),
        Audit::WithEffect(attached) => {
            let ids = audit::attached_row_ids(&attached);
            if ids.is_empty() {
                // Nothing was committed, so no effect: the row comes now.
                audit::write_after(
                    trust.store(),
                    ctx.row_start(caller, sandbox),
                    &outcome(),
                    status.as_u16(),
                    us,
                    learnt,
                );
            }
            for id in ids {
                audit::finish_attached(trust.store(), id, &outcome(), status.as_u16(), us, learnt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_text_is_short_and_escaped() {
        assert_eq!(shown("a\nb"), "a\\nb");
        assert_eq!(shown(&"x".repeat(100)).chars().count(), 65);
    }
}
