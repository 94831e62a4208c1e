//! The harness shared by the HTTP tests: a router over a node, driven with
//! `tower::ServiceExt::oneshot` (no sockets), and a counter app.

// Each test target uses a different part of the harness.
#![allow(dead_code)]

pub mod sse;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use std::sync::Arc;

use axum::Router;
use graft::{Node, NodeLimits};
use graft_http::trust::{Role, Trust, TrustConfig};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// A counter server: `inc`, `crash`, `{ sleep = ms }`; casts add, `{ set = n }` sets.
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

/// A supervisor of one counter registered as `counter`.
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

/// The counter with another increment (a new version).
pub fn counter_v(n: i64) -> String {
    COUNTER.replace("state.count += 1", &format!("state.count += {n}"))
}

/// A router over a node whose trust lives in an ephemeral store, with a
/// known admin token that every helper request carries.
pub struct Api {
    pub router: Router,
    pub node: Node,
    pub trust: Arc<Trust>,
    /// The admin token's secret.
    pub admin: String,
}

impl Api {
    pub fn new() -> Api {
        Api::with_limits(NodeLimits::default())
    }

    /// A router over a node with these caps.
    pub fn with_limits(limits: NodeLimits) -> Api {
        Api::with_node(Node::with_limits(2, limits))
    }

    /// The default test trust settings: tests send many refused requests
    /// from one (unnamed) peer, so only the rate-limit test keeps the
    /// default limit.
    pub fn test_trust() -> TrustConfig {
        TrustConfig {
            auth_failures: graft_http::trust::RateLimit {
                burst: 1_000_000,
                per_second: 1_000_000.0,
            },
            ..TrustConfig::default()
        }
    }

    /// A router over this node (its own database holds the tokens when it
    /// has one; else a private in-memory one).
    pub fn with_node(node: Node) -> Api {
        Api::with_node_and(node, Api::test_trust())
    }

    /// A router over a node with these caps and trust settings.
    pub fn with(limits: NodeLimits, config: TrustConfig) -> Api {
        Api::with_node_and(Node::with_limits(2, limits), config)
    }

    pub fn with_node_and(node: Node, config: TrustConfig) -> Api {
        let store = match node.store() {
            Some(s) => s.clone(),
            None => Arc::new(graft::store::Store::in_memory().expect("ephemeral store")),
        };
        let trust = Arc::new(Trust::new(store, config).expect("trust"));
        let admin = trust
            .create_token(Role::Admin, None, None)
            .expect("admin token")
            .secret;
        Api {
            router: with_host(graft_http::router(node.clone(), trust.clone())),
            node,
            trust,
            admin,
        }
    }

    /// The router with the admin token added to every request that has
    /// none (for tests about something else than trust).
    #[allow(dead_code)] // not every test binary uses it
    pub fn as_admin(&self) -> Router {
        let bearer = axum::http::HeaderValue::from_str(&self.bearer()).expect("header");
        self.router.clone().layer(axum::middleware::map_request(
            move |mut req: axum::http::Request<axum::body::Body>| {
                let bearer = bearer.clone();
                async move {
                    req.headers_mut()
                        .entry(axum::http::header::AUTHORIZATION)
                        .or_insert(bearer);
                    req
                }
            },
        ))
    }

    /// `Bearer <admin token>`.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.admin)
    }

    /// A new token's secret.
    pub fn token(&self, role: Role, sandboxes: Option<Vec<String>>) -> String {
        self.trust
            .create_token(role, sandboxes, None)
            .expect("token")
            .secret
    }

    /// A request with any headers; the answer's status, headers and JSON.
    pub async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let kind = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if kind.starts_with("text/event-stream") {
            // An event stream never ends: its status and headers are the answer.
            return (status, headers, Value::Null);
        }
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else if !kind.starts_with("application/json") && status.is_success() {
            // The dashboard's page and assets, the metrics text.
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
        };
        (status, headers, value)
    }

    /// A JSON request with this bearer token (`None`: no Authorization).
    pub async fn as_token(
        &self,
        token: Option<&str>,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (s, _, v) = self.send(req.body(Body::from(body)).unwrap()).await;
        (s, v)
    }

    pub async fn raw(&self, method: Method, uri: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, self.bearer())
            .body(Body::from(body))
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("{uri}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
            })
        };
        (status, value)
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.raw(Method::GET, uri, Vec::new()).await
    }

    pub async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.raw(Method::POST, uri, serde_json::to_vec(&body).unwrap())
            .await
    }

    pub async fn delete(&self, uri: &str) -> (StatusCode, Value) {
        self.raw(Method::DELETE, uri, Vec::new()).await
    }

    /// Creates sandbox `id` with the counter app; answers once the app runs.
    pub async fn counter_app(&self, id: &str) {
        let (s, v) = self
            .post(
                "/api/v1/sandboxes",
                json!({ "id": id, "modules": { "app": APP, "counter": COUNTER } }),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }

    pub async fn call(&self, id: &str, to: &str, request: Value) -> (StatusCode, Value) {
        self.post(
            &format!("/api/v1/sandboxes/{id}/call"),
            json!({ "to": to, "request": request }),
        )
        .await
    }
}

/// `router` with `Host: localhost` added to every request that has none:
/// the node refuses requests without a Host (a real client always sends
/// one; `oneshot` requests have none unless the test sets it).
pub fn with_host(router: Router) -> Router {
    router.layer(axum::middleware::map_request(
        |mut req: axum::http::Request<axum::body::Body>| async move {
            if !req.headers().contains_key(header::HOST) {
                req.headers_mut().insert(
                    header::HOST,
                    axum::http::HeaderValue::from_static("localhost"),
                );
            }
            req
        },
    ))
}

#[track_caller]
/// An error answer with this status and kind, a message, and a (status,
/// kind) pair that `graft_http::KINDS` documents.
pub fn assert_error(resp: &(StatusCode, Value), status: StatusCode, kind: &str) {
    assert_eq!(resp.0, status, "{}", resp.1);
    assert_eq!(resp.1["error"]["kind"], json!(kind), "{}", resp.1);
    assert!(
        graft_http::KINDS
            .iter()
            .any(|k| k.kind == kind && k.status == status.as_u16()),
        "({status}, {kind}) is not documented in graft_http::KINDS"
    );
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        resp.1
    );
}

/// `[[[…1…]]]`, `depth` arrays deep.
pub fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}
