//! The HTTP API of a Graft node (SPEC §6), as an [`axum::Router`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! let node = graft::Node::new();
//! let store = Arc::new(graft::store::Store::in_memory()?);
//! let trust = Arc::new(graft_http::trust::Trust::new(store, Default::default())?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7878").await?;
//! let app = graft_http::router(node, trust);
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! Every route but `GET /health` and the sign-in needs a token (SPEC §9):
//! [`trust`] holds the tokens, the browser rules, the route table and the
//! audit log; [`tls`] serves the router over TLS.
//!
//! Every path is under `/api/v1`; every body is JSON. Errors are
//! `{ "error": { "kind", "message", ... } }` with a status from [`KINDS`]:
//! library errors through [`status_for`]; 400 for a malformed body (bad JSON,
//! a bad shape, nesting deeper than [`graft::value::MAX_DEPTH`]); 422
//! `limit_out_of_range` for an integer outside its [`bounds`]; 404 (unknown
//! route), 405 (wrong method) and 413 (body over [`MAX_BODY_BYTES`]). The
//! OpenAPI document ([`openapi_document_for`]) states every one of these
//! constraints.
//!
//! Handlers only await the library's futures (which wait on channels), so a
//! slow call never blocks other requests; the two synchronous library calls
//! (creating and destroying a sandbox) run on tokio's blocking pool.
//!
//! Layout and invariants:
//! * `router`: the route table, the only place a path is named;
//! * one module per resource, holding its handlers and request bodies:
//!   `sandboxes` (create, info, restart, destroy), `processes` (list, state,
//!   call, cast, send, spawn), `modules` (list, versions, rollback), `reload`
//!   (reload, batch reload, dry runs), `eval`, `events`, `health`;
//! * `live`: SPEC §10, the node-wide event feed, the SSE stream, `/metrics`,
//!   the supervision tree and the embedded dashboard at `/`;
//! * `request`: the checks every handler shares (the sandbox of a path, a
//!   module name in a path), so a malformed path answers alike everywhere;
//! * `body`: how a body is read (size, JSON, depth, shape), and [`bounds`]:
//!   every integer's range. Handlers read bodies only through them;
//! * `errors`: the one place that turns an error into a status and a JSON
//!   body, matching library errors by variant, never by message;
//! * `openapi`: the document, written from the same tables (`bounds`,
//!   [`KINDS`], the route table) the handlers check against;
//! * [`trust`]: tokens, roles, sessions, the browser rules, the one
//!   middleware and its route table, the audit log; `tokens`: the token
//!   endpoints; [`tls`]: serving over rustls.

// The OpenAPI document is built from big `json!`s.
#![recursion_limit = "512"]

mod body;
pub mod bounds;
mod errors;
mod eval;
mod events;
mod health;
pub mod live;
mod modules;
mod openapi;
mod processes;
mod reload;
mod request;
mod router;
mod sandboxes;
pub mod tls;
mod tokens;
pub mod trust;

pub use body::MAX_BODY_BYTES;
pub use errors::{kinds_of, status_for, ApiError, ApiResult, ErrorKind, KINDS};
pub use graft::config::MAX_TIMEOUT_MS;
pub use live::feed::{EventFilter, EventGap, EventPage, EventSource, NodeEvent};
pub use live::Live;
pub use openapi::{openapi_document, openapi_document_for};
#[cfg(feature = "bench-baseline")]
pub use router::router_without_auth;
pub use router::{metrics_router, router, router_with, AppState};

/// Default `timeout_ms` of `call` and `eval`.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;

/// The longest process name, in bytes (the library's rule, stated in the
/// OpenAPI document).
pub const MAX_NAME_BYTES: usize = graft::config::MAX_PROCESS_NAME_BYTES;
