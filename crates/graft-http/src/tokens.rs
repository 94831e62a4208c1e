//! `/tokens`: create (the secret is in this answer only), list, revoke.
//! Admin only, and only with a token not limited to some sandboxes (the
//! route table says so). Revocation takes effect from the next request.

use std::sync::Arc;

use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft::store::TokenRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::body::Body;
use crate::errors::{invalid, ApiError, ApiResult};
use crate::trust::audit::EffectAudit;
use crate::trust::tokens::TokenError;
use crate::trust::{Role, Trust};

/// A token as listed: never its hash.
pub(crate) fn shown(t: &TokenRecord) -> Value {
    json!({
        "id": t.id,
        "role": t.role,
        "sandboxes": t.sandboxes,
        "label": t.label,
        "created_ms": t.created_ms,
        "revoked_ms": t.revoked_ms,
    })
}

fn api_error(e: TokenError) -> ApiError {
    match e {
        TokenError::Invalid(m) => invalid(m),
        TokenError::NotFound(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "no_token",
            format!(
                "no token with id `{}`",
                crate::trust::middleware::shown(&id)
            ),
        )
        .with("token", id),
        // Failing storage answers like every other write (503/507 with
        // the reason, no host path), not as the server's fault.
        TokenError::Store(s) => ApiError::from(graft::Error::Storage(s)),
        TokenError::Random(_) => ApiError::internal(e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    role: String,
    sandboxes: Option<Vec<String>>,
    label: Option<String>,
}

pub(crate) async fn create(
    State(trust): State<Arc<Trust>>,
    audit: Option<Extension<EffectAudit>>,
    Body(body): Body<CreateBody>,
) -> ApiResult<Response> {
    let attached = EffectAudit::of(audit.as_ref());
    let role = Role::parse(&body.role).ok_or_else(|| {
        invalid(format!(
            "role must be viewer, operator or admin, not `{}`",
            crate::trust::middleware::shown(&body.role)
        ))
    })?;
    let scope = body.sandboxes.as_ref().map_or(0, Vec::len);
    if scope > crate::trust::tokens::MAX_SCOPE {
        return Err(ApiError::from(graft::Error::LimitOutOfRange {
            field: "sandboxes".into(),
            value: scope.to_string(),
            min: 0,
            max: crate::trust::tokens::MAX_SCOPE as u64,
        }));
    }
    let made = tokio::task::spawn_blocking(move || {
        trust.create_token_attached(role, body.sandboxes, body.label, attached.as_ref())
    })
    .await
    .map_err(crate::errors::join_error)?
    .map_err(api_error)?;
    let mut v = shown(&made.record);
    v["token"] = json!(made.secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub(crate) async fn list(State(trust): State<Arc<Trust>>) -> ApiResult<Json<Value>> {
    let tokens = trust
        .tokens()
        .map_err(|e| ApiError::from(graft::Error::Storage(e)))?;
    Ok(Json(Value::Array(tokens.iter().map(shown).collect())))
}

pub(crate) async fn revoke(
    State(trust): State<Arc<Trust>>,
    UrlPath(id): UrlPath<String>,
    audit: Option<Extension<EffectAudit>>,
) -> ApiResult<StatusCode> {
    let attached = EffectAudit::of(audit.as_ref());
    tokio::task::spawn_blocking(move || trust.revoke_token_attached(&id, attached.as_ref()))
        .await
        .map_err(crate::errors::join_error)?
        .map_err(api_error)?;
    Ok(StatusCode::NO_CONTENT)
}
