//! The route table: every route of SPEC §6, each to its resource's handler.
//! Unknown routes answer 404 `not_found`, known routes with another method
//! 405 `method_not_allowed`, and no body over [`MAX_BODY_BYTES`] is read.

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use graft::Node;

use crate::errors::{method_not_allowed, not_found};
use crate::live::{dashboard, metrics, stream, tree, Live};
use crate::{eval, events, health, modules, openapi, processes, reload, sandboxes, MAX_BODY_BYTES};

/// The API router for `node`: every route of SPEC §6 under `/api/v1`, the
/// event stream, `/metrics` and the dashboard at `/` (SPEC §10).
pub fn router(node: Node) -> Router {
    let live = Live::new(node.clone());
    router_with(node, live)
}

/// [`router`] with the live parts given, so that another listener (a
/// separate metrics port) can share them.
pub fn router_with(node: Node, live: Live) -> Router {
    Router::new()
        // SPEC §10: seeing it live.
        .route("/", get(dashboard::index))
        .route("/assets/app.css", get(dashboard::css))
        .route("/assets/app.js", get(dashboard::js))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/events", get(stream::page))
        .route("/api/v1/events/stream", get(stream::stream))
        .route("/api/v1/sandboxes/{id}/tree", get(tree::tree))
        .route("/api/v1/health", get(health::health))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route(
            "/api/v1/sandboxes",
            get(sandboxes::list).post(sandboxes::create),
        )
        .route(
            "/api/v1/sandboxes/{id}",
            get(sandboxes::info).delete(sandboxes::destroy),
        )
        .route("/api/v1/sandboxes/{id}/restart", post(sandboxes::restart))
        .route("/api/v1/sandboxes/{id}/processes", get(processes::list))
        .route(
            "/api/v1/sandboxes/{id}/processes/{target}/state",
            get(processes::state),
        )
        .route("/api/v1/sandboxes/{id}/call", post(processes::call))
        .route("/api/v1/sandboxes/{id}/cast", post(processes::cast))
        .route("/api/v1/sandboxes/{id}/send", post(processes::send))
        .route("/api/v1/sandboxes/{id}/spawn", post(processes::spawn))
        .route("/api/v1/sandboxes/{id}/modules", get(modules::list))
        .route(
            "/api/v1/sandboxes/{id}/modules/{module}/versions",
            get(modules::versions),
        )
        .route(
            "/api/v1/sandboxes/{id}/modules/{module}/rollback",
            post(modules::rollback),
        )
        .route("/api/v1/sandboxes/{id}/reload", post(reload::reload))
        .route("/api/v1/sandboxes/{id}/eval", post(eval::eval))
        .route("/api/v1/sandboxes/{id}/events", get(events::events))
        .route("/api/v1/reload", post(reload::batch))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            live.metrics().clone(),
            metrics::track,
        ))
        .layer(axum::Extension(live))
        .with_state(node)
}

/// Only `GET /metrics`, for a listener of its own (`--metrics-bind`).
pub fn metrics_router(live: Live) -> Router {
    let node = live.node().clone();
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .fallback(not_found)
        .layer(axum::Extension(live))
        .with_state(node)
}
