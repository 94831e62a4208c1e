//! The dashboard's sessions: `POST /session {"token": …}` trades a token for
//! an HttpOnly, SameSite=Strict cookie with its own expiry; `GET /session`
//! says who the caller is; `DELETE /session` signs out.
//!
//! Invariants:
//! * Sessions live in this process's memory, keyed by the SHA-256 of their
//!   secret; a restart signs everyone out. At most [`MAX_SESSIONS`] exist:
//!   expired ones go first, then the one closest to expiry.
//! * A session stands for its token: revoking the token ends the session
//!   at its next request, and the session never outlives `session_ttl`.

use std::collections::HashMap;

use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

use super::tokens::{caller_of, hash_secret, random_hex, SECRET_HEX};
use super::{Caller, Peer, Trust};
use crate::body::Body;
use crate::errors::{ApiError, ApiResult};
use crate::trust::audit::AuthenticatedAs;

/// Sessions kept at once.
const MAX_SESSIONS: usize = 4096;

/// The cookie's name.
pub const COOKIE: &str = "graft_session";

#[derive(Clone, Debug)]
pub(crate) struct Session {
    /// Its token's hash: the session is looked up on every request and by
    /// every open event stream's re-check, so by a key, not by a scan of
    /// the token table.
    token_hash: [u8; 32],
    expires_ms: f64,
}

#[derive(Default)]
pub(crate) struct Sessions {
    by_hash: HashMap<[u8; 32], Session>,
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The value of the `graft_session` cookie, if the request has exactly a
/// well-formed one (64 hex digits).
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    let mut found = None;
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((name, v)) = pair.trim().split_once('=') {
                if name == COOKIE {
                    if found.is_some() {
                        // Two session cookies: refuse rather than pick one.
                        return None;
                    }
                    found = Some(v);
                }
            }
        }
    }
    found.filter(|v| {
        v.len() == SECRET_HEX && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

impl Trust {
    /// The caller a session cookie stands for, if the session and its token live.
    pub(crate) fn caller_for_session(&self, secret: &str) -> Option<Caller> {
        let hash = hash_secret(secret);
        let session = {
            let mut sessions = self.sessions.lock();
            let s = sessions.by_hash.get(&hash)?.clone();
            if s.expires_ms <= now_ms() {
                sessions.by_hash.remove(&hash);
                return None;
            }
            s
        };
        let token = self.token_for_hash(&session.token_hash)?;
        caller_of(&token, Some(session.expires_ms))
    }

    fn open_session(&self, token_hash: [u8; 32]) -> Result<(String, f64), getrandom::Error> {
        let secret = random_hex(SECRET_HEX / 2)?;
        let expires_ms = now_ms() + self.config.session_ttl.as_secs_f64() * 1000.0;
        let mut sessions = self.sessions.lock();
        if sessions.by_hash.len() >= MAX_SESSIONS {
            let now = now_ms();
            sessions.by_hash.retain(|_, s| s.expires_ms > now);
            if sessions.by_hash.len() >= MAX_SESSIONS {
                if let Some(k) = sessions
                    .by_hash
                    .iter()
                    .min_by(|a, b| a.1.expires_ms.total_cmp(&b.1.expires_ms))
                    .map(|(k, _)| *k)
                {
                    sessions.by_hash.remove(&k);
                }
            }
        }
        sessions.by_hash.insert(
            hash_secret(&secret),
            Session {
                token_hash,
                expires_ms,
            },
        );
        Ok((secret, expires_ms))
    }

    fn close_session(&self, secret: &str) {
        self.sessions.lock().by_hash.remove(&hash_secret(secret));
    }

    fn cookie(&self, value: &str, max_age_s: u64) -> Option<HeaderValue> {
        let secure = if self.config.tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{secure}"
        ))
        .ok()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignIn {
    token: String,
}

/// `POST /session`: a token for a cookie. A bad token is 401 and counts as a
/// failed authentication of the peer.
pub(crate) async fn create(
    State(trust): State<Arc<Trust>>,
    Extension(peer): Extension<Peer>,
    Body(body): Body<SignIn>,
) -> ApiResult<Response> {
    if let Err(retry) = trust.limiter.check(peer.0) {
        return Err(super::middleware::rate_limited(retry));
    }
    let Some(caller) = trust.caller_for_token(&body.token) else {
        trust.limiter.failed(peer.0);
        return Err(super::middleware::unauthorized(
            "the token is not valid (malformed, unknown or revoked)",
        ));
    };
    let (secret, _) = trust
        .open_session(hash_secret(&body.token))
        .map_err(|e| ApiError::internal(format!("the OS gave no randomness: {e}")))?;
    let cookie = trust
        .cookie(&secret, trust.config.session_ttl.as_secs())
        .ok_or_else(|| ApiError::internal("cannot build the session cookie"))?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    resp.extensions_mut().insert(AuthenticatedAs(caller));
    Ok(resp)
}

/// `GET /session`: who the caller is.
pub(crate) async fn show(Extension(caller): Extension<Caller>) -> Json<serde_json::Value> {
    Json(json!({
        "token_id": &*caller.token_id,
        "role": caller.role.as_str(),
        "sandboxes": caller.sandboxes.as_deref(),
        "expires_at_ms": caller.session_expires_ms,
    }))
}

/// `DELETE /session`: ends the session of the cookie, if any, and clears it.
pub(crate) async fn delete(State(trust): State<Arc<Trust>>, headers: HeaderMap) -> Response {
    if let Some(secret) = session_cookie(&headers) {
        trust.close_session(secret);
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Some(c) = trust.cookie("", 0) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}
