//! `GET /health`: liveness, answered without touching any sandbox.

use axum::extract::State;
use axum::Json;
use graft::Node;
use serde_json::{json, Value};

pub(crate) async fn health(State(node): State<Node>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "sandboxes": node.sandbox_ids().len(),
    }))
}
