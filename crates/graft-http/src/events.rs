//! `/sandboxes/{id}/events`: reload history and lifecycle events, newest
//! last; `?since=N` keeps those with `seq > N`. Any other query parameter
//! is 400 `bad_request`.

use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::Json;
use graft::Node;
use serde_json::Value;

use crate::errors::{ApiError, ApiResult};
use crate::request::sandbox;

pub(crate) async fn events(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let since = since(query.as_deref().unwrap_or(""))?;
    let events: Vec<_> = sb
        .events()
        .await?
        .into_iter()
        .filter(|e| e.seq > since)
        .collect();
    Ok(Json(serde_json::to_value(events).unwrap_or(Value::Null)))
}

/// The `since` of a query string (0 when absent; the last one wins).
fn since(query: &str) -> Result<u64, ApiError> {
    let mut since = 0u64;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = v.parse().map_err(|_| {
                    ApiError::bad_request(
                        "bad_request",
                        format!("since must be an event number, not `{v}`"),
                    )
                })?
            }
            _ => {
                return Err(ApiError::bad_request(
                    "bad_request",
                    format!("unknown query parameter `{pair}` (known: since)"),
                ))
            }
        }
    }
    Ok(since)
}
