//! The client verbs: small HTTP/1.1 requests to a node's API (hyper-util's
//! client; hyper is in the tree through axum already), over https through
//! hyper-rustls when the URL says so. Every request carries the token that
//! `datadir::resolve_token` finds.
//!
//! This file holds the [`Client`] and the plumbing every verb shares: one
//! request and its answer ([`Client::request`]), the printing of an error
//! answer ([`Client::send`]), `--json` output, and path-segment encoding.
//! Every verb goes through these, so that all of them bound their wait, name
//! the node they could not reach, and print an API error the same way (exit
//! 1, no second message). The verbs live one file per resource family
//! (`processes`, `modules`, `events`, `tokens`, `audit`); the connection
//! (`transport`, `tls`) and the token (`auth`) have their own files.

mod audit;
mod auth;
mod events;
mod modules;
mod processes;
mod tls;
mod tokens;
mod transport;

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use serde_json::{json, Value};

use crate::datadir::TokenSource;
use crate::{render, Reported};

pub use audit::AuditFilters;
pub use modules::ReloadArgs;

/// How long a request may take when nothing says otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);

pub struct Client {
    base: String,
    json: bool,
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token: Option<(String, TokenSource)>,
}

/// An error answer of the API: its status and `error` object.
struct ApiFailure {
    error: Value,
}

impl Client {
    /// Sends a request; `Ok(Err(..))` is an error answer of the API.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        wait: Duration,
    ) -> Result<std::result::Result<Value, ApiFailure>> {
        let uri = format!("{}/api/v1{path}", self.base);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", "application/json")
            .header("accept", "application/json");
        req = self.authorize(req)?;
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| anyhow!("invalid request to {uri}: {e}"))?;
        let unreachable = |detail: String| {
            anyhow!(
                "cannot reach the Graft node at {}: {detail}; is `graft run` or `graft serve` running?",
                self.base
            )
        };
        let resp = match tokio::time::timeout(wait, self.http.request(req)).await {
            Err(_) => bail!(
                "the Graft node at {} did not answer within {} s",
                self.base,
                wait.as_secs()
            ),
            Ok(Err(e)) => return Err(unreachable(deepest_cause(&e))),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        let bytes = match tokio::time::timeout(wait, resp.into_body().collect()).await {
            Err(_) => bail!(
                "the Graft node at {} did not finish its answer within {} s",
                self.base,
                wait.as_secs()
            ),
            Ok(Err(e)) => return Err(unreachable(deepest_cause(&e))),
            Ok(Ok(b)) => b.to_bytes(),
        };
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| {
                anyhow!(
                    "unexpected answer from {uri} (status {status}): {}; is this a Graft node?",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                )
            })?
        };
        if status.is_success() {
            Ok(Ok(value))
        } else if value["error"].is_object() {
            Ok(Err(ApiFailure {
                error: value["error"].clone(),
            }))
        } else {
            bail!("unexpected answer from {uri} (status {status}): {value}")
        }
    }

    /// A request whose error answer is printed and ends the command with exit 1.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        wait: Duration,
    ) -> Result<Value> {
        self.send_with_files(method, path, body, wait, &|_| None)
            .await
    }

    async fn send_with_files(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        wait: Duration,
        file_of: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Value> {
        match self.request(method, path, body, wait).await? {
            Ok(v) => Ok(v),
            Err(failure) => {
                if self.json {
                    println!(
                        "{}",
                        render::json(&json!({ "error": failure.error }), false)
                    );
                } else {
                    eprint!("{}", render::error(&failure.error, file_of));
                    if failure.error["kind"] == "unauthorized" {
                        eprintln!("{}", self.token_hint());
                    }
                }
                Err(Reported.into())
            }
        }
    }

    /// `v` as JSON: compact with `--json`, else pretty.
    fn print_json(&self, v: &Value) {
        println!("{}", render::json(v, !self.json));
    }

    /// With `--json`, prints `v` and is true; else the caller prints its view.
    fn printed_json(&self, v: &Value) -> bool {
        if self.json {
            println!("{}", render::json(v, false));
        }
        self.json
    }
}

/// Percent-encodes one path segment.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The innermost cause's message (`Connection refused (os error 111)`).
fn deepest_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("<counter.3>"), "%3Ccounter.3%3E");
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
        assert_eq!(seg("chat.room"), "chat.room");
    }
}
