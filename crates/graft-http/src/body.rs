//! Request bodies: at most [`MAX_BODY_BYTES`] (413), JSON (400
//! `malformed_json`), nested at most [`graft::value::MAX_DEPTH`] deep (400
//! `too_deep`), and of the handler's shape (400 `bad_request`).
//!
//! The nesting is measured on the raw bytes before parsing, in one pass, so
//! the parser never recurses past `MAX_DEPTH + 1` levels and never reaches
//! its own recursion limit.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::errors::{ApiError, ApiResult};

/// Largest request body accepted (1 MiB); larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A JSON body of the shape `T`, checked as the module doc says.
pub(crate) struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                )
                .with("limit_bytes", MAX_BODY_BYTES)
            } else {
                // The body could not be read (a broken stream): the request is malformed.
                ApiError::bad_request("bad_request", r.body_text())
            }
        })?;
        parse(&bytes).map(Body)
    }
}

/// Parses a body (blank counts as `{}`).
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let text = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        bytes
    };
    // Containers nest one level deeper than values: an empty array at
    // depth MAX_DEPTH is allowed. The exact rule is applied on the parsed value.
    if max_nesting(text) > graft::value::MAX_DEPTH + 1 {
        return Err(too_deep());
    }
    let value: Value = serde_json::from_slice(text).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
    })?;
    if graft::value::check_json_depth(&value, graft::value::MAX_DEPTH).is_err() {
        return Err(too_deep());
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request("bad_request", format!("bad request body: {e}")))
}

fn too_deep() -> ApiError {
    ApiError::bad_request(
        "too_deep",
        format!(
            "the body is nested more than {} levels deep",
            graft::value::MAX_DEPTH
        ),
    )
    .with("max_depth", graft::value::MAX_DEPTH)
}

/// The deepest nesting of `[` and `{` outside strings (malformed input
/// gives some number; the parser rejects it afterwards).
fn max_nesting(bytes: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_ignores_brackets_in_strings() {
        assert_eq!(max_nesting(br#"{"a": [1, {"b": "[[[{{"}]}"#), 3);
        assert_eq!(max_nesting(br#"["\"[", []]"#), 2);
        assert_eq!(max_nesting(b"1"), 0);
        assert_eq!(max_nesting(&b"[".repeat(100_000)), 100_000);
    }

    #[test]
    fn depth_is_refused_before_the_parser_recurses() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        let err = parse::<Value>(deep.as_bytes()).unwrap_err();
        assert_eq!(err.error["kind"], "too_deep");
        let edge = "[".repeat(graft::value::MAX_DEPTH) + &"]".repeat(graft::value::MAX_DEPTH);
        assert!(parse::<Value>(edge.as_bytes()).is_ok());
        let err = parse::<Value>(b"{\"a\": ").unwrap_err();
        assert_eq!(err.error["kind"], "malformed_json");
        assert_eq!(parse::<Value>(b"  ").unwrap(), serde_json::json!({}));
    }
}
