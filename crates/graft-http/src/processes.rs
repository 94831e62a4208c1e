//! `/sandboxes/{id}/processes`, `call`, `cast`, `send`, `spawn`: the
//! processes of a sandbox and the messages sent to them.
//!
//! `call` waits for the reply at most `timeout_ms` ([`crate::bounds`]): the
//! library times the call out itself, and a safety net 2 s later answers
//! 504 `timeout` should it not. `cast` and `send` answer 202 once the
//! message is queued, not handled.

use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft::Node;
use serde::Deserialize;
use serde_json::{json, Number, Value};

use crate::body::Body;
use crate::bounds;
use crate::errors::{timeout_error, ApiResult};
use crate::request::sandbox;
use crate::DEFAULT_TIMEOUT_MS;

pub(crate) async fn list(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    Ok(Json(sb.processes().await?).into_response())
}

pub(crate) async fn state(
    State(node): State<Node>,
    UrlPath((id, target)): UrlPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    Ok(Json(sb.state(&target).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallBody {
    to: String,
    #[serde(default)]
    request: Value,
    timeout_ms: Option<Number>,
}

pub(crate) async fn call(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<CallBody>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let ms = bounds::timeout_ms().check_or(body.timeout_ms.as_ref(), DEFAULT_TIMEOUT_MS)?;
    // The library times the call out itself; this is a safety net.
    let reply = tokio::time::timeout(
        Duration::from_millis(ms + 2_000),
        sb.call(&body.to, body.request, Some(ms)),
    )
    .await
    .map_err(|_| timeout_error("call", &body.to, ms))??;
    Ok(Json(json!({ "reply": reply })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessageBody {
    to: String,
    #[serde(default)]
    message: Value,
}

pub(crate) async fn cast(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<MessageBody>,
) -> ApiResult<Response> {
    queue_message(&node, &id, body, true).await
}

pub(crate) async fn send(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<MessageBody>,
) -> ApiResult<Response> {
    queue_message(&node, &id, body, false).await
}

/// `cast` (handle_cast) or `send` (handle_info): both answer 202 once queued.
async fn queue_message(
    node: &Node,
    id: &str,
    body: MessageBody,
    cast: bool,
) -> ApiResult<Response> {
    let sb = sandbox(node, id)?;
    if cast {
        sb.cast(&body.to, body.message).await?;
    } else {
        sb.send(&body.to, body.message).await?;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "status": "queued", "to": body.to })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpawnBody {
    module: String,
    #[serde(default)]
    args: Value,
    name: Option<String>,
}

pub(crate) async fn spawn(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<SpawnBody>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    graft::config::validate_module_name(&body.module)?;
    if let Some(name) = &body.name {
        graft::config::validate_process_name(name)?;
    }
    let pid = sb
        .spawn(&body.module, body.args, body.name.as_deref())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "pid": pid, "name": body.name, "module": body.module })),
    )
        .into_response())
}
