//! `GET /`: the dashboard, plain HTML, CSS and JavaScript embedded in the
//! binary (no build step). It talks only to the public API: JSON reads, the
//! event stream for staying current, and the session endpoints for signing
//! in (with an in-memory bearer token as the fallback).

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The page.
pub const INDEX_HTML: &str = include_str!("../../assets/index.html");
/// Its styles.
pub const APP_CSS: &str = include_str!("../../assets/app.css");
/// Its script.
pub const APP_JS: &str = include_str!("../../assets/app.js");

/// Security headers every asset carries: no framing, no sniffing, and a CSP
/// that allows only this origin's own scripts, styles and API.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

pub(crate) async fn js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}
