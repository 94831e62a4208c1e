//! The query of `GET /api/v1/events` and `/events/stream` (and the
//! `Last-Event-ID` header): where to start, which sandbox, which kinds.
//!
//! Invariants: every value a client sends is bounded before it is kept
//! (kinds: how many and how long; numbers: `u64` or a 400), an unknown or
//! repeated parameter is a 400 that names it, and an error message quotes
//! at most 64 characters of what was sent.

use axum::http::HeaderMap;

use super::feed::KEEP_EVENTS;
use crate::errors::ApiError;

/// Kinds one `?kind=` filter may name at most.
pub const MAX_KINDS: usize = 32;
/// The longest kind name accepted in a filter, in bytes.
pub const MAX_KIND_BYTES: usize = 64;

/// Where a stream starts and what it keeps.
#[derive(Debug, PartialEq)]
pub(crate) struct Start {
    pub after: Option<u64>,
    pub tail: Option<u64>,
    pub filter_sandbox: Option<String>,
    pub kinds: Vec<String>,
}

/// Parses the query string (and the `Last-Event-ID` header, which wins).
pub(crate) fn parse(query: &str, headers: &HeaderMap) -> Result<Start, ApiError> {
    let mut start = Start {
        after: None,
        tail: None,
        filter_sandbox: None,
        kinds: Vec::new(),
    };
    let number = |name: &str, v: &str| -> Result<u64, ApiError> {
        v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                "bad_request",
                format!(
                    "{name} must be a non-negative integer event number, not `{}`",
                    clip(v)
                ),
            )
        })
    };
    // `kind` may repeat (its values add up); a second `after`, `tail` or
    // `sandbox` is refused, not silently resolved one way or the other.
    let mut seen: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = crate::request::percent_decode(v).ok_or_else(|| {
            ApiError::bad_request(
                "bad_request",
                format!("{}: not valid percent-encoded UTF-8", clip(k)),
            )
        })?;
        if matches!(k, "after" | "tail" | "sandbox") {
            if seen.contains(&k) {
                return Err(ApiError::bad_request(
                    "bad_request",
                    format!("`{k}` is given twice; give it once"),
                ));
            }
            seen.push(k);
        }
        match k {
            "after" => start.after = Some(number("after", &v)?),
            "tail" => {
                let n = number("tail", &v)?;
                if n > KEEP_EVENTS as u64 {
                    return Err(ApiError::bad_request(
                        "bad_request",
                        format!("tail must be at most {KEEP_EVENTS} (the events kept), not {n}"),
                    ));
                }
                start.tail = Some(n);
            }
            "sandbox" => {
                crate::request::sandbox_name(&v)?;
                start.filter_sandbox = Some(v);
            }
            "kind" => {
                if v.split(',').all(str::is_empty) {
                    // `kind=` would otherwise mean every kind: the opposite
                    // of a filter, and most likely a client's bug.
                    return Err(ApiError::bad_request(
                        "bad_request",
                        "`kind=` names no kind; leave it out for every kind",
                    ));
                }
                for kind in v.split(',').filter(|k| !k.is_empty()) {
                    let ok = kind.len() <= MAX_KIND_BYTES
                        && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                    if !ok {
                        return Err(ApiError::bad_request(
                            "bad_request",
                            format!(
                                "kind `{}` is not an event kind (lowercase letters and `_`, at most {MAX_KIND_BYTES} bytes)",
                                clip(kind)
                            ),
                        ));
                    }
                    if start.kinds.len() >= MAX_KINDS {
                        return Err(ApiError::bad_request(
                            "bad_request",
                            format!("at most {MAX_KINDS} kinds in one filter"),
                        ));
                    }
                    start.kinds.push(kind.to_owned());
                }
            }
            _ => {
                return Err(ApiError::bad_request(
                    "bad_request",
                    format!(
                        "unknown query parameter `{}` (known: sandbox, kind, after, tail)",
                        clip(pair)
                    ),
                ))
            }
        }
    }
    let mut ids = headers.get_all("last-event-id").iter();
    if let Some(h) = ids.next() {
        if ids.next().is_some() {
            return Err(ApiError::bad_request(
                "bad_request",
                "Last-Event-ID is given twice; send one",
            ));
        }
        let v = h.to_str().unwrap_or("");
        start.after = Some(number("Last-Event-ID", v.trim())?);
    }
    Ok(start)
}

/// At most 64 characters of what a client sent, for an error message.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
