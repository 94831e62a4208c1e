//! The HTTP API of a Graft node (SPEC §6), as an [`axum::Router`].
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let node = graft::Node::new();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7878").await?;
//! axum::serve(listener, graft_http::router(node)).await
//! # }
//! ```
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

// The OpenAPI document is built from big `json!`s.
#![recursion_limit = "512"]

mod body;
pub mod bounds;
mod error;
mod openapi;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path as UrlPath, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use graft::{Error, Node, ReloadOptions, Sandbox, SandboxSpec, StateHandler};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Number, Value};

use body::Body;
pub use body::MAX_BODY_BYTES;
pub use error::{kinds_of, status_for, ApiError, ApiResult, ErrorKind, KINDS};
use error::{method_not_allowed, not_found};
pub use graft::config::MAX_TIMEOUT_MS;
pub use openapi::{openapi_document, openapi_document_for};

/// Default `timeout_ms` of `call` and `eval`.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// How long `DELETE /sandboxes/{id}` waits for the app to stop, and create/restart for it to start.
const APP_WAIT: Duration = Duration::from_secs(5);

/// The API router for `node`: every route of SPEC §6 under `/api/v1`.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route(
            "/api/v1/sandboxes",
            get(list_sandboxes).post(create_sandbox),
        )
        .route(
            "/api/v1/sandboxes/{id}",
            get(sandbox_info).delete(destroy_sandbox),
        )
        .route("/api/v1/sandboxes/{id}/restart", post(restart_sandbox))
        .route("/api/v1/sandboxes/{id}/processes", get(processes))
        .route(
            "/api/v1/sandboxes/{id}/processes/{target}/state",
            get(process_state),
        )
        .route("/api/v1/sandboxes/{id}/call", post(call))
        .route("/api/v1/sandboxes/{id}/cast", post(cast))
        .route("/api/v1/sandboxes/{id}/send", post(send))
        .route("/api/v1/sandboxes/{id}/spawn", post(spawn))
        .route("/api/v1/sandboxes/{id}/modules", get(modules))
        .route(
            "/api/v1/sandboxes/{id}/modules/{module}/versions",
            get(versions),
        )
        .route(
            "/api/v1/sandboxes/{id}/modules/{module}/rollback",
            post(rollback),
        )
        .route("/api/v1/sandboxes/{id}/reload", post(reload))
        .route("/api/v1/sandboxes/{id}/eval", post(eval))
        .route("/api/v1/sandboxes/{id}/events", get(events))
        .route("/api/v1/reload", post(batch_reload))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(node)
}

// ---------------------------------------------------------------------------
// Request checks

/// `Some(None)` for an explicit `null`, `None` when absent (with `#[serde(default)]`).
fn explicit_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

fn sandbox(node: &Node, id: &str) -> ApiResult<Sandbox> {
    graft::config::validate_sandbox_id(id)
        .map_err(|e| ApiError::bad_request("invalid_input", e.to_string()))?;
    Ok(node.sandbox(id)?)
}

/// A module name in the path: malformed is 400, like a bad sandbox id.
fn module_param(module: &str) -> ApiResult<()> {
    graft::config::validate_module_name(module)
        .map_err(|e| ApiError::bad_request("invalid_input", e.to_string()))
}

/// The longest process name, in bytes (the library's rule, stated in the
/// OpenAPI document).
pub const MAX_NAME_BYTES: usize = graft::config::MAX_PROCESS_NAME_BYTES;

fn timeout_error(what: &str, target: &str, ms: u64) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!("{what} timed out after {ms} ms"),
    )
    .with("target", target)
    .with("timeout_ms", ms)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::from(Error::InvalidInput(message.into()))
}

fn join_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::internal(e.to_string())
}

// ---------------------------------------------------------------------------
// Handlers

async fn health(State(node): State<Node>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "sandboxes": node.sandbox_ids().len(),
    }))
}

async fn openapi_json(State(node): State<Node>) -> Json<Value> {
    Json(openapi_document_for(node.limits()))
}

async fn list_sandboxes(State(node): State<Node>) -> ApiResult<Json<Value>> {
    let mut out = Vec::new();
    for id in node.sandbox_ids() {
        // A sandbox destroyed meanwhile is simply not listed.
        if let Ok(sb) = node.sandbox(&id) {
            if let Ok(info) = sb.info().await {
                out.push(serde_json::to_value(info).unwrap_or(Value::Null));
            }
        }
    }
    Ok(Json(Value::Array(out)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    id: String,
    modules: Value,
    #[serde(default, deserialize_with = "explicit_null")]
    entry: Option<Option<String>>,
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
fn create_spec(body: CreateBody, node: &graft::NodeLimits) -> ApiResult<SandboxSpec> {
    graft::config::validate_sandbox_id(&body.id)?;
    let limits = create_limits(body.limits, node)?;
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

async fn create_sandbox(
    State(node): State<Node>,
    Body(body): Body<CreateBody>,
) -> ApiResult<Response> {
    let n = node.clone();
    let sb = tokio::task::spawn_blocking(move || -> ApiResult<Sandbox> {
        let spec = create_spec(body, n.limits())?;
        Ok(n.create_sandbox(spec)?)
    })
    .await
    .map_err(join_error)??;
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

async fn sandbox_info(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    Ok(Json(sb.info().await?).into_response())
}

async fn destroy_sandbox(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    let sb = sandbox(&node, &id)?;
    // An orderly stop first, so terminate callbacks run; then drop the VM.
    let _ = tokio::time::timeout(APP_WAIT, sb.stop_app()).await;
    tokio::task::spawn_blocking(move || node.destroy(&id))
        .await
        .map_err(join_error)??;
    Ok(StatusCode::NO_CONTENT)
}

async fn restart_sandbox(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    sb.restart().await?;
    let _ = tokio::time::timeout(APP_WAIT, sb.wait_app_started()).await;
    Ok(Json(sb.info().await?).into_response())
}

async fn processes(State(node): State<Node>, UrlPath(id): UrlPath<String>) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    Ok(Json(sb.processes().await?).into_response())
}

async fn process_state(
    State(node): State<Node>,
    UrlPath((id, target)): UrlPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    Ok(Json(sb.state(&target).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    to: String,
    #[serde(default)]
    request: Value,
    timeout_ms: Option<Number>,
}

async fn call(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<CallBody>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let ms = bounds::timeout_ms().check_or(body.timeout_ms.as_ref(), DEFAULT_TIMEOUT_MS)?;
    // The library times the call out itself; this is a safety net.
    let reply = tokio::time::timeout(
        Duration::from_millis(ms + 2_000),
        sb.call(&body.to, body.request, Some(ms)),
    )
    .await
    .map_err(|_| timeout_error("call", &body.to, ms))??;
    Ok(Json(json!({ "reply": reply })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    to: String,
    #[serde(default)]
    message: Value,
}

async fn cast(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<MessageBody>,
) -> ApiResult<Response> {
    queue_message(&node, &id, body, true).await
}

async fn send(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<MessageBody>,
) -> ApiResult<Response> {
    queue_message(&node, &id, body, false).await
}

/// `cast` (handle_cast) or `send` (handle_info): both answer 202 once queued.
async fn queue_message(
    node: &Node,
    id: &str,
    body: MessageBody,
    cast: bool,
) -> ApiResult<Response> {
    let sb = sandbox(node, id)?;
    if cast {
        sb.cast(&body.to, body.message).await?;
    } else {
        sb.send(&body.to, body.message).await?;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "status": "queued", "to": body.to })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnBody {
    module: String,
    #[serde(default)]
    args: Value,
    name: Option<String>,
}

async fn spawn(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<SpawnBody>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    graft::config::validate_module_name(&body.module)?;
    if let Some(name) = &body.name {
        graft::config::validate_process_name(name)?;
    }
    let pid = sb
        .spawn(&body.module, body.args, body.name.as_deref())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "pid": pid, "name": body.name, "module": body.module })),
    )
        .into_response())
}

async fn modules(State(node): State<Node>, UrlPath(id): UrlPath<String>) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    Ok(Json(sb.modules().await?).into_response())
}

async fn versions(
    State(node): State<Node>,
    UrlPath((id, module)): UrlPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    module_param(&module)?;
    let versions = sb.versions(&module).await?;
    let current = sb
        .modules()
        .await?
        .into_iter()
        .find(|m| m.name == module)
        .map(|m| m.version);
    let out = versions
        .into_iter()
        .map(|v| {
            let mut o = serde_json::to_value(&v).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut o {
                map.insert("current".into(), json!(Some(v.version) == current));
            }
            o
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

/// The reload options shared by every reload-like request; absent and
/// `null` both mean the default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptionsBody {
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    dry_run: Option<bool>,
    canary_ms: Option<Number>,
    canary_crashes: Option<Number>,
}

impl OptionsBody {
    fn into_options(self) -> ApiResult<ReloadOptions> {
        let canary_ms = bounds::canary_ms().check_or(self.canary_ms.as_ref(), 0)?;
        let crashes = bounds::canary_crashes().check_or(self.canary_crashes.as_ref(), 1)?;
        Ok(ReloadOptions {
            extra: self.extra,
            state_handler: self.state_handler.map(StateHandler::Luau),
            dry_run: self.dry_run.unwrap_or(false),
            canary_ms,
            // In range: MAX_CANARY_CRASHES fits a u32.
            canary_crashes: u32::try_from(crashes).unwrap_or(u32::MAX),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadBody {
    modules: BTreeMap<String, String>,
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    dry_run: Option<bool>,
    canary_ms: Option<Number>,
    canary_crashes: Option<Number>,
}

impl ReloadBody {
    fn split(self) -> ApiResult<(BTreeMap<String, String>, ReloadOptions)> {
        let opts = OptionsBody {
            extra: self.extra,
            state_handler: self.state_handler,
            dry_run: self.dry_run,
            canary_ms: self.canary_ms,
            canary_crashes: self.canary_crashes,
        }
        .into_options()?;
        if self.modules.is_empty() {
            return Err(invalid(
                "modules is empty: name at least one module and its source",
            ));
        }
        Ok((self.modules, opts))
    }
}

async fn reload(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<ReloadBody>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    let (sources, opts) = body.split()?;
    Ok(Json(sb.reload(sources, opts).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: Number,
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    dry_run: Option<bool>,
}

async fn rollback(
    State(node): State<Node>,
    UrlPath((id, module)): UrlPath<(String, String)>,
    Body(body): Body<RollbackBody>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    module_param(&module)?;
    let version = bounds::version().check(&body.version)?;
    let opts = OptionsBody {
        extra: body.extra,
        state_handler: body.state_handler,
        dry_run: body.dry_run,
        ..Default::default()
    }
    .into_options()?;
    // In range: the bound's maximum is u32::MAX.
    let version = u32::try_from(version).unwrap_or(u32::MAX);
    Ok(Json(sb.rollback(&module, version, opts).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalBody {
    source: String,
    timeout_ms: Option<Number>,
}

async fn eval(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<EvalBody>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let ms = bounds::timeout_ms().check_or(body.timeout_ms.as_ref(), DEFAULT_TIMEOUT_MS)?;
    let result = tokio::time::timeout(Duration::from_millis(ms), sb.eval(&body.source))
        .await
        .map_err(|_| timeout_error("eval", "eval", ms))??;
    Ok(Json(json!({ "result": result })))
}

async fn events(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let mut since = 0u64;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = v.parse().map_err(|_| {
                    ApiError::bad_request(
                        "bad_request",
                        format!("since must be an event number, not `{v}`"),
                    )
                })?
            }
            _ => {
                return Err(ApiError::bad_request(
                    "bad_request",
                    format!("unknown query parameter `{pair}` (known: since)"),
                ))
            }
        }
    }
    let events: Vec<_> = sb
        .events()
        .await?
        .into_iter()
        .filter(|e| e.seq > since)
        .collect();
    Ok(Json(serde_json::to_value(events).unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    sandboxes: Vec<String>,
    modules: BTreeMap<String, String>,
    max_concurrency: Option<Number>,
    rolling: Option<bool>,
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    dry_run: Option<bool>,
    canary_ms: Option<Number>,
    canary_crashes: Option<Number>,
}

/// Checks the sandboxes of a batch: at most `max_sandboxes`, each a valid id,
/// none twice (a sandbox reloaded twice at once would race with itself).
fn check_batch_ids(ids: &[String], node: &graft::NodeLimits) -> ApiResult<()> {
    bounds::batch_size(node).check_count(ids.len())?;
    let mut seen = BTreeSet::new();
    for id in ids {
        graft::config::validate_sandbox_id(id)?;
        if !seen.insert(id.as_str()) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "duplicate_sandbox",
                format!("sandbox `{id}` is named twice in the batch; name each sandbox once"),
            )
            .with("sandbox", id));
        }
    }
    Ok(())
}

async fn batch_reload(
    State(node): State<Node>,
    Body(body): Body<BatchBody>,
) -> ApiResult<Json<Value>> {
    let default_concurrency = node.threads() as u64;
    let max_concurrency = bounds::max_concurrency(node.limits())
        .check_or(body.max_concurrency.as_ref(), default_concurrency)?;
    check_batch_ids(&body.sandboxes, node.limits())?;
    // Batch sources go to every sandbox: a bad name would fail each one alike.
    for name in body.modules.keys() {
        graft::config::validate_module_name(name)?;
    }
    let (ids, rolling) = (body.sandboxes, body.rolling.unwrap_or(false));
    let (sources, opts) = ReloadBody {
        modules: body.modules,
        extra: body.extra,
        state_handler: body.state_handler,
        dry_run: body.dry_run,
        canary_ms: body.canary_ms,
        canary_crashes: body.canary_crashes,
    }
    .split()?;
    // In range: at most max_sandboxes, a usize.
    let max_concurrency = usize::try_from(max_concurrency).unwrap_or(usize::MAX);
    let results = node
        .reload_batch(&ids, &sources, &opts, max_concurrency, rolling)
        .await;
    let out = results
        .into_iter()
        .map(|(sandbox, result)| match result {
            Ok(report) => json!({ "sandbox": sandbox, "ok": true, "result": report }),
            Err(e) => {
                let err = ApiError::from(e);
                json!({ "sandbox": sandbox, "ok": false, "status": err.status.as_u16(), "result": err.body() })
            }
        })
        .collect();
    Ok(Json(Value::Array(out)))
}
