//! `/sandboxes` and `/sandboxes/{id}`: list, create, info, restart, destroy.
//!
//! Creating and destroying run on tokio's blocking pool (they build or drop
//! a VM, and create may read a project directory). Create and restart
//! answer once the app's `init` ran or [`APP_WAIT`] passed, so a failed
//! start shows in the answer's `app`; destroy stops the app in order first
//! (terminate callbacks run), for at most [`APP_WAIT`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft::{Node, SandboxSpec};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::body::Body;
use crate::bounds;
use crate::errors::{invalid, join_error, ApiError, ApiResult};
use crate::request::sandbox;
use crate::trust::audit::EffectAudit;
use crate::trust::{projects, Caller, Trust};

/// How long `DELETE /sandboxes/{id}` waits for the app to stop, and create/restart for it to start.
const APP_WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn list(
    State(node): State<Node>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Value>> {
    let mut out = Vec::new();
    // A token limited to some sandboxes does not see the others.
    for id in node
        .sandbox_ids()
        .into_iter()
        .filter(|id| caller.may_see(id))
    {
        // A sandbox destroyed meanwhile is simply not listed.
        if let Ok(sb) = node.sandbox(&id) {
            if let Ok(info) = sb.info().await {
                out.push(serde_json::to_value(info).unwrap_or(Value::Null));
            }
        }
    }
    Ok(Json(Value::Array(out)))
}

/// `Some(None)` for an explicit `null`, `None` when absent (with `#[serde(default)]`).
fn explicit_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    id: String,
    modules: Value,
    #[serde(default, deserialize_with = "explicit_null")]
    entry: Option<Option<String>>,
    /// The entry module's `init` argument (default `null`).
    entry_args: Option<Value>,
    limits: Option<serde_json::Map<String, Value>>,
    capabilities: Option<Vec<String>>,
}

/// The limits of a create request, checked against the node's caps.
fn create_limits(
    limits: Option<serde_json::Map<String, Value>>,
    node: &graft::NodeLimits,
) -> ApiResult<Option<graft::Limits>> {
    let Some(mut map) = limits else {
        return Ok(None);
    };
    bounds::check_limits(&mut map, node)?;
    serde_json::from_value(Value::Object(map))
        .map(Some)
        .map_err(|e| ApiError::bad_request("bad_request", format!("bad request body: limits: {e}")))
}

/// Builds the spec of a create request (may read a project directory).
fn create_spec(
    body: CreateBody,
    node: &graft::NodeLimits,
    roots: &[PathBuf],
) -> ApiResult<SandboxSpec> {
    graft::config::validate_sandbox_id(&body.id)?;
    let limits = create_limits(body.limits, node)?;
    // A path is checked (symlinks resolved) before anything under it is
    // looked at, with one answer for every refusal.
    if let Value::String(p) = &body.modules {
        projects::check_project(roots, Path::new(p))?;
    }
    let from_project =
        matches!(&body.modules, Value::String(p) if Path::new(p).join("graft.toml").is_file());
    let mut spec = match body.modules {
        Value::Object(map) => {
            let mut spec = SandboxSpec::new(body.id.clone());
            for (name, source) in map {
                let Value::String(source) = source else {
                    return Err(ApiError::bad_request(
                        "bad_request",
                        format!("modules.{name} must be a string of Luau source"),
                    ));
                };
                spec.modules.insert(name, source);
            }
            spec
        }
        Value::String(path) => spec_from_path(Path::new(&path), &body.id)?,
        _ => {
            return Err(ApiError::bad_request(
                "bad_request",
                "modules must be an object {name: source} or a path (string) to a project or source directory",
            ))
        }
    };
    spec.id = body.id;
    if spec.modules.is_empty() {
        return Err(invalid("a sandbox needs at least one module"));
    }
    match body.entry {
        Some(entry) => spec.entry = entry,
        // No entry given: `app` when there is one (a project's graft.toml says otherwise).
        None if !from_project && !spec.modules.contains_key("app") => spec.entry = None,
        None => {}
    }
    if let Some(args) = body.entry_args {
        spec.entry_args = args;
    }
    if let Some(limits) = limits {
        spec.limits = limits;
    }
    if let Some(caps) = body.capabilities {
        spec.grants = caps;
    }
    Ok(spec)
}

/// A project directory (with `graft.toml`), or a directory of `.luau` files
/// (its `src/` when it has one).
fn spec_from_path(path: &Path, id: &str) -> ApiResult<SandboxSpec> {
    if path.join("graft.toml").is_file() {
        return Ok(SandboxSpec::from_dir(path)?);
    }
    let src: PathBuf = if path.join("src").is_dir() {
        path.join("src")
    } else {
        path.to_owned()
    };
    if !src.is_dir() {
        return Err(invalid(format!(
            "modules: `{}` is not a directory",
            path.display()
        )));
    }
    let mut spec = SandboxSpec::new(id);
    for (name, file) in graft::config::module_files(&src)? {
        let source = std::fs::read_to_string(&file)
            .map_err(|e| invalid(format!("cannot read {}: {e}", file.display())))?;
        spec.modules.insert(name.clone(), source);
        spec.files.insert(name, file);
    }
    Ok(spec)
}

pub(crate) async fn create(
    State(node): State<Node>,
    State(trust): State<Arc<Trust>>,
    audit: Option<Extension<EffectAudit>>,
    Body(body): Body<CreateBody>,
) -> ApiResult<Response> {
    let limits = node.limits().clone();
    let attached = EffectAudit::of(audit.as_ref()).unwrap_or_default();
    // Reading a project's files blocks: off the async workers. The creation
    // itself runs off them inside `create_sandbox_attached`.
    let spec = tokio::task::spawn_blocking(move || create_spec(body, &limits, trust.roots()))
        .await
        .map_err(join_error)??;
    // The audit row commits with the creation (SPEC §9).
    let sb = node
        .create_sandbox_attached(spec, Default::default(), &attached)
        .await?;
    // Answer once the app's init ran (a failed start shows in `app`).
    let _ = tokio::time::timeout(APP_WAIT, sb.wait_app_started()).await;
    let info = sb.info().await?;
    let location = format!("/api/v1/sandboxes/{}", sb.id());
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(info),
    )
        .into_response())
}

pub(crate) async fn info(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    Ok(Json(sb.info().await?).into_response())
}

pub(crate) async fn destroy(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    audit: Option<Extension<EffectAudit>>,
) -> ApiResult<StatusCode> {
    // A stored sandbox that failed to restore has no VM: deleting it
    // deletes its rows (the only way to free its id).
    let stored_only = node.unrestored().iter().any(|(u, _)| *u == id);
    let attached = EffectAudit::of(audit.as_ref());
    if !stored_only {
        let sb = sandbox(&node, &id)?;
        // An orderly stop first, so terminate callbacks run; then drop the VM.
        let _ = tokio::time::timeout(APP_WAIT, sb.stop_app()).await;
    }
    tokio::task::spawn_blocking(move || node.destroy_attached(&id, attached.as_ref()))
        .await
        .map_err(join_error)??;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn restart(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    sb.restart().await?;
    let _ = tokio::time::timeout(APP_WAIT, sb.wait_app_started()).await;
    Ok(Json(sb.info().await?).into_response())
}
