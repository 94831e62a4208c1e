//! `/sandboxes/{id}/eval`: a Luau chunk run as a short-lived process under
//! the sandbox's limits; 504 `timeout` when it does not return within
//! `timeout_ms`.

use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::Json;
use graft::Node;
use serde::Deserialize;
use serde_json::{json, Number, Value};

use crate::body::Body;
use crate::bounds;
use crate::errors::{timeout_error, ApiResult};
use crate::request::sandbox;
use crate::DEFAULT_TIMEOUT_MS;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EvalBody {
    source: String,
    timeout_ms: Option<Number>,
}

pub(crate) async fn eval(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<EvalBody>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let ms = bounds::timeout_ms().check_or(body.timeout_ms.as_ref(), DEFAULT_TIMEOUT_MS)?;
    let result = tokio::time::timeout(Duration::from_millis(ms), sb.eval(&body.source))
        .await
        .map_err(|_| timeout_error("eval", "eval", ms))??;
    Ok(Json(json!({ "result": result })))
}
