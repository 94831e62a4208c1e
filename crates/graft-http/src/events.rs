//! `/sandboxes/{id}/events`: reload history and lifecycle events, newest
//! last; `?since=N` keeps those with `seq > N` ([`crate::bounds::since`]:
//! a negative or too large `N` is 422 `limit_out_of_range`, anything but an
//! integer 400). Any other query parameter is 400 `bad_request`.

use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::Json;
use graft::Node;
use serde_json::{Number, Value};

use crate::bounds;
use crate::errors::{ApiError, ApiResult};
use crate::request::sandbox;

pub(crate) async fn events(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let since = since(query.as_deref().unwrap_or(""))?;
    let events = sb.events_since(since).await?;
    Ok(Json(serde_json::to_value(events).unwrap_or(Value::Null)))
}

/// The `since` of a query string (0 when absent; the last one wins).
fn since(query: &str) -> Result<u64, ApiError> {
    let mut since = 0u64;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => {
                // Parsed as a JSON number so that `-1` and `1e30` are out of
                // range like in a body, not shape errors.
                let n: Number = v.parse().map_err(|_| {
                    ApiError::bad_request(
                        "bad_request",
                        format!("since must be an event number, not `{v}`"),
                    )
                })?;
                since = bounds::since().check(&n)?;
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
