//! The checks of the `api_body` fuzz target: arbitrary bytes as the body of
//! a POST to one endpoint of the HTTP API (picked by the first byte), driven
//! in-process through `tower::ServiceExt::oneshot` (SPEC §6, §7).
//!
//! This file uses only crates `graft-http` depends on (or has as
//! dev-dependencies), so a regression test there can include it with
//! `#[path]` and replay saved inputs through exactly these checks.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use graft::{Node, NodeLimits};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The id of the sandbox every per-sandbox endpoint targets.
pub const SANDBOX: &str = "fz";

/// The endpoints, indexed by the first input byte (modulo their number).
pub const ENDPOINTS: &[&str] = &[
    "/api/v1/sandboxes",
    "/api/v1/sandboxes/fz/call",
    "/api/v1/sandboxes/fz/cast",
    "/api/v1/sandboxes/fz/send",
    "/api/v1/sandboxes/fz/spawn",
    "/api/v1/sandboxes/fz/reload",
    "/api/v1/sandboxes/fz/modules/counter/rollback",
    "/api/v1/sandboxes/fz/eval",
    "/api/v1/reload",
];

/// Any single request taking longer than this is a hang. Above the API's own
/// waits (5 s for an app to start or stop) plus the 1 s handler limit.
pub const BOUND: Duration = Duration::from_secs(30);

/// The counter of `crates/graft-http/tests/api.rs`.
pub const COUNTER: &str = r#"
local counter = {}
function counter.init(args)
  if args and args.fail then error("refusing to start") end
  return { count = (args and args.start) or 0 }
end
function counter.handle_call(req, from, state)
  if req == "inc" then
    state.count += 1
  elseif req == "crash" then
    error("boom")
  elseif type(req) == "table" and req.sleep then
    local t0 = graft.now()
    while graft.now() - t0 < req.sleep do end
  end
  return state.count, state
end
function counter.handle_cast(msg, state)
  if type(msg) == "number" then state.count += msg end
  return state
end
function counter.handle_info(msg, state)
  if type(msg) == "table" and msg.set then state.count = msg.set end
  return state
end
return counter
"#;

/// A supervisor app keeping `counter` registered as `counter`.
pub const APP: &str = r#"
return {
  behaviour = "supervisor",
  init = function(args)
    return {
      strategy = "one_for_one", intensity = 5, period = 5,
      children = {
        { id = "counter", module = "counter", args = { start = 0 }, name = "counter" },
      },
    }
  end,
}
"#;

/// Node caps that keep fuzzed sandboxes few; the default sandbox limits
/// (64 MiB heap, 1 MiB messages) stay valid so fuzzed creates can succeed.
pub fn node_limits() -> NodeLimits {
    NodeLimits {
        max_sandbox_memory: 64 * 1024 * 1024,
        max_sandboxes: 4,
        max_value_bytes: 1024 * 1024,
        max_events: 100,
        ..NodeLimits::default()
    }
}

/// A node with small caps, its router, and a current-thread tokio runtime.
pub struct Harness {
    node: Node,
    router: Router,
    rt: tokio::runtime::Runtime,
    /// `Bearer <admin token>` of the harness's node.
    bearer: String,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    /// The node holds sandbox `fz` (the counter app, 50 ms handlers).
    pub fn new() -> Harness {
        let node = Node::with_limits(2, node_limits());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
        let store = std::sync::Arc::new(
            graft::store::Store::in_memory().unwrap_or_else(|e| panic!("store: {e}")),
        );
        let trust = std::sync::Arc::new(
            graft_http::trust::Trust::new(store, Default::default())
                .unwrap_or_else(|e| panic!("trust: {e}")),
        );
        let admin = trust
            .create_token(graft_http::trust::Role::Admin, None, None)
            .unwrap_or_else(|e| panic!("token: {e}"));
        let h = Harness {
            router: graft_http::router(node.clone(), trust),
            node,
            rt,
            bearer: format!("Bearer {}", admin.secret),
        };
        h.reset();
        h
    }

    /// Sends the input to its endpoint and checks the answer and the node.
    pub fn check(&self, data: &[u8]) {
        let Some((&selector, body)) = data.split_first() else {
            return;
        };
        let uri = ENDPOINTS[usize::from(selector) % ENDPOINTS.len()];
        let (status, value) = self.request(Method::POST, uri, body.to_vec());
        assert_documented(uri, status, &value);
        let (list, sandboxes) = self.request(Method::GET, "/api/v1/sandboxes", Vec::new());
        assert_eq!(list, StatusCode::OK, "GET /api/v1/sandboxes: {sandboxes}");
        assert!(sandboxes.is_array(), "sandbox list: {sandboxes}");
        // A request that did something may have changed `fz` (new code, new
        // processes, new sandboxes): start the next input from scratch.
        if status.is_success() || status.is_server_error() {
            self.reset();
        }
    }

    /// One request through the router, bounded by [`BOUND`]; the body must
    /// be JSON (or empty).
    pub fn request(&self, method: Method, uri: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, &self.bearer)
            .body(Body::from(body))
            .unwrap_or_else(|e| panic!("request {uri}: {e}"));
        let router = self.router.clone();
        let answer = self.rt.block_on(async move {
            let fut = async move {
                let resp = match router.oneshot(req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                };
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok::<_, axum::Error>((status, bytes))
            };
            tokio::time::timeout(BOUND, fut).await
        });
        let (status, bytes) = answer
            .unwrap_or_else(|_| panic!("hang: {uri} did not answer within {BOUND:?}"))
            .unwrap_or_else(|e| panic!("{uri}: the response failed: {e}"));
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{uri}: {status} body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, value)
    }

    /// Deletes every sandbox and creates `fz` afresh.
    fn reset(&self) {
        for id in self.node.sandbox_ids() {
            let uri = format!("/api/v1/sandboxes/{id}");
            let (status, v) = self.request(Method::DELETE, &uri, Vec::new());
            assert!(
                status == StatusCode::NO_CONTENT || status == StatusCode::NOT_FOUND,
                "DELETE {uri}: {status} {v}"
            );
        }
        let body = json!({
            "id": SANDBOX,
            "modules": { "app": APP, "counter": COUNTER },
            "limits": { "handler_ms": 50, "memory_bytes": 8 * 1024 * 1024, "max_processes": 64 },
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let (status, v) = self.request(Method::POST, "/api/v1/sandboxes", bytes);
        assert_eq!(status, StatusCode::CREATED, "create {SANDBOX}: {v}");
    }
}

/// 5xx only as documented (500 `crashed`, 503 stopped/failed/out of memory,
/// 504 `timeout`); every failure is `{ "error": { "kind", "message" } }`.
pub fn assert_documented(uri: &str, status: StatusCode, value: &Value) {
    if status.is_success() {
        return;
    }
    let kind = value["error"]["kind"].as_str().unwrap_or_else(|| {
        panic!("{uri}: {status} without error.kind: {value}");
    });
    assert!(
        !kind.is_empty(),
        "{uri}: {status} with an empty kind: {value}"
    );
    assert!(
        value["error"]["message"].is_string(),
        "{uri}: {status} without error.message: {value}"
    );
    let documented = match status.as_u16() {
        500 => kind == "crashed",
        503 => matches!(kind, "sandbox_stopped" | "sandbox_failed" | "out_of_memory"),
        504 => kind == "timeout",
        s => s < 500,
    };
    assert!(documented, "{uri}: undocumented {status} `{kind}`: {value}");
}
