//! `GET /api/v1/sandboxes/{id}/tree`: the sandbox's supervision tree.
//!
//! Built from the public API: the process list names the supervisors (by
//! their module's kind), each supervisor's state names its children in
//! start order. Roots are supervisors no other supervisor lists. A child is
//! `running` exactly when its pid is set (the supervisor's invariant). Each
//! child's `restarts` is the supervisor's own count of the times it started
//! that child again (after its exit, or a sibling's under `one_for_all` /
//! `rest_for_one`); its `crashes` counts the `crash` events of its module in this sandbox
//! among the events the feed keeps; each supervisor's `recent_restarts` is
//! the restarts within its intensity period.
//!
//! Bounded: at most [`MAX_SUPERVISORS`] supervisors are read (the answer
//! says `truncated`), and the children of one come from its state, which the
//! library already bounds.

use std::collections::{HashMap, HashSet};

use axum::extract::{Path as UrlPath, State};
use axum::{Extension, Json};
use graft::Node;
use serde_json::{json, Value};

use super::feed::EventFilter;
use super::Live;
use crate::errors::ApiResult;
use crate::request::sandbox;

/// Supervisors read per request at most.
pub const MAX_SUPERVISORS: usize = 1_000;

pub(crate) async fn tree(
    State(node): State<Node>,
    Extension(live): Extension<Live>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let kinds: HashMap<String, String> = sb
        .modules()
        .await?
        .into_iter()
        .map(|m| (m.name, m.kind))
        .collect();
    let procs = sb.processes().await?;
    let crashes = crash_counts(&live, &id);
    let mut supervisors = Vec::new();
    let mut listed: HashSet<String> = HashSet::new();
    let sups: Vec<_> = procs
        .iter()
        .filter(|p| kinds.get(&p.module).is_some_and(|k| k == "supervisor"))
        .collect();
    let truncated = sups.len() > MAX_SUPERVISORS;
    for p in sups.into_iter().take(MAX_SUPERVISORS) {
        // A supervisor that exits meanwhile is left out, not an error.
        let Ok(state) = sb.state(&p.pid).await else {
            continue;
        };
        let children: Vec<Value> = state["children"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        let pid = c["pid"].as_str().map(str::to_owned);
                        if let Some(pid) = &pid {
                            listed.insert(pid.clone());
                        }
                        let module = c["module"].as_str().unwrap_or_default();
                        json!({
                            "id": c["id"],
                            "module": module,
                            "pid": pid,
                            "running": pid.is_some(),
                            "restart": c["restart"],
                            "restarts": c["restarts"].as_f64().map_or(0, |n| n.max(0.0) as u64),
                            "supervisor": kinds.get(module).is_some_and(|k| k == "supervisor"),
                            "crashes": crashes.get(module).copied().unwrap_or(0),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let recent = state["restarts"].as_array().map_or(0, Vec::len);
        supervisors.push(json!({
            "pid": p.pid,
            "name": p.name,
            "module": p.module,
            "strategy": state["strategy"],
            "intensity": state["intensity"],
            "period": state["period"],
            "recent_restarts": recent,
            "children": children,
        }));
    }
    let roots: Vec<&Value> = supervisors
        .iter()
        .filter(|s| !s["pid"].as_str().is_some_and(|p| listed.contains(p)))
        .map(|s| &s["pid"])
        .collect();
    Ok(Json(json!({
        "roots": roots,
        "supervisors": supervisors,
        "truncated": truncated,
    })))
}

/// `crash` events per module of sandbox `id`, among the kept events.
fn crash_counts(live: &Live, id: &str) -> HashMap<String, u64> {
    let filter = EventFilter::default().sandbox(id).kind("crash");
    let page = live
        .source()
        .events_after(0, &filter, super::feed::KEEP_EVENTS);
    let mut out = HashMap::new();
    for e in page.events {
        if let Some(m) = e.detail["module"].as_str() {
            *out.entry(m.to_owned()).or_insert(0) += 1;
        }
    }
    out
}
