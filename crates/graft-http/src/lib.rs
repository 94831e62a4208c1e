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
//! `{ "error": { "kind", "message", ... } }` with the status of [`status_for`]
//! (library errors) or 400 (malformed JSON, a bad shape, nesting deeper than
//! [`graft::value::MAX_DEPTH`]), 404 (unknown route), 405 (wrong method) and
//! 413 (body over [`MAX_BODY_BYTES`]).
//!
//! Handlers only await the library's futures (which wait on channels), so a
//! slow call never blocks other requests; the two synchronous library calls
//! (creating and destroying a sandbox) run on tokio's blocking pool.

// The OpenAPI document is one big `json!`.
#![recursion_limit = "512"]

mod openapi;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path as UrlPath, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use graft::{Error, Limits, Node, ReloadOptions, Sandbox, SandboxSpec, StateHandler};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

pub use openapi::openapi_document;

/// Largest request body accepted (1 MiB); larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default `timeout_ms` of `call` and `eval`.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// The largest `timeout_ms` accepted (one hour).
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
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
// Errors

/// An error response: a status and `{ "error": { "kind", "message", ... } }`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The `error` object.
    pub error: serde_json::Map<String, Value>,
}

impl ApiError {
    /// An error with a kind and a message.
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> ApiError {
        let mut error = serde_json::Map::new();
        error.insert("kind".into(), json!(kind));
        error.insert("message".into(), json!(message.into()));
        ApiError { status, error }
    }

    fn bad_request(kind: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, kind, message)
    }

    fn with(mut self, key: &str, value: impl serde::Serialize) -> ApiError {
        self.error.insert(
            key.into(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
        self
    }

    /// The body, `{ "error": {...} }`.
    pub fn body(&self) -> Value {
        json!({ "error": self.error })
    }
}

/// The HTTP status of a library error.
///
/// | kind | status |
/// | --- | --- |
/// | `no_sandbox`, `no_process`, `no_module`, `no_version` | 404 |
/// | `sandbox_exists`, `reload_aborted` (but step `check`: 422) | 409 |
/// | `invalid_input`, `compile_error`, `spawn_failed`, `not_plain_data`, `luau_error` | 422 |
/// | `mailbox_full`, `max_processes` | 429 |
/// | `crashed` | 500 (the handler crashed; `reason` says why) |
/// | `sandbox_stopped` | 503 |
/// | `timeout` | 504 |
pub fn status_for(e: &Error) -> StatusCode {
    match e {
        Error::NoSandbox(_)
        | Error::NoProcess(_)
        | Error::NoModule(_)
        | Error::NoVersion { .. } => StatusCode::NOT_FOUND,
        // A failed behaviour check is a check error (SPEC §6: 422).
        Error::ReloadAborted { step, .. } if step == "check" => StatusCode::UNPROCESSABLE_ENTITY,
        Error::SandboxExists(_) | Error::ReloadAborted { .. } => StatusCode::CONFLICT,
        Error::InvalidInput(_)
        | Error::Compile { .. }
        | Error::SpawnFailed { .. }
        | Error::NotPlainData(_)
        | Error::Luau(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::MailboxFull(_) | Error::TooManyProcesses(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Crashed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        Error::SandboxStopped(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::CallTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        Error::CyclicValue(_)
        | Error::ValueTooLarge { .. }
        | Error::LimitOutOfRange { .. }
        | Error::BadArg(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::NodeLimit(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Busy(_) => StatusCode::CONFLICT,
        Error::SandboxFailed { .. } | Error::OutOfMemory(_) => StatusCode::SERVICE_UNAVAILABLE,
        // `Error` is non-exhaustive: a kind this table does not know yet is
        // the server's fault until it is mapped here.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let base = ApiError::new(status_for(&e), e.kind(), e.to_string());
        match e {
            Error::NoSandbox(id) | Error::SandboxExists(id) | Error::SandboxStopped(id) => {
                base.with("sandbox", id)
            }
            Error::NoProcess(p) => base.with("process", p),
            Error::NoModule(m) => base.with("module", m),
            Error::NoVersion {
                module,
                version,
                kept,
            } => {
                let kept: Vec<u32> = kept
                    .split(',')
                    .filter_map(|v| v.trim().parse().ok())
                    .collect();
                base.with("module", module)
                    .with("version", version)
                    .with("kept", kept)
            }
            Error::Compile { diagnostics } => {
                let mut err = base;
                if let Some(d) = diagnostics.first() {
                    err = err
                        .with("module", &d.module)
                        .with("file", &d.file)
                        .with("line", d.line)
                        .with("column", d.column)
                        .with("frame", &d.frame);
                }
                err.with("diagnostics", diagnostics)
            }
            Error::ReloadAborted {
                step,
                module,
                process,
                line,
                column,
                ..
            } => base
                .with("step", step)
                .with("module", module)
                .with("process", process)
                .with("line", line)
                .with("column", column),
            Error::CallTimeout { target, timeout_ms } => {
                base.with("target", target).with("timeout_ms", timeout_ms)
            }
            Error::Crashed { target, reason } => base.with("target", target).with("reason", reason),
            Error::MailboxFull(target) => base.with("target", target),
            Error::TooManyProcesses(n) => base.with("max_processes", n),
            Error::SpawnFailed { module, reason } => {
                base.with("module", module).with("reason", reason)
            }
            Error::ValueTooLarge { limit, .. } => base.with("limit", limit),
            Error::LimitOutOfRange {
                field,
                value,
                min,
                max,
            } => base
                .with("field", field)
                .with("value", value)
                .with("min", min)
                .with("max", max),
            Error::SandboxFailed { id, .. } => base.with("sandbox", id),
            _ => base,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /api/v1/openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /api/v1/openapi.json",
    )
}

// ---------------------------------------------------------------------------
// Request bodies

/// A JSON body: at most [`MAX_BODY_BYTES`], nested at most
/// [`graft::value::MAX_DEPTH`] deep, and of the shape `T`.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                )
                .with("limit_bytes", MAX_BODY_BYTES)
            } else {
                ApiError::new(r.status(), "bad_body", r.body_text())
            }
        })?;
        parse_body(&bytes).map(Body)
    }
}

fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let text = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        bytes
    };
    let value: Value = serde_json::from_slice(text).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            too_deep()
        } else {
            ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
        }
    })?;
    if graft::value::check_json_depth(&value, graft::value::MAX_DEPTH).is_err() {
        return Err(too_deep());
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request("bad_request", format!("bad request body: {e}")))
}

fn too_deep() -> ApiError {
    ApiError::bad_request(
        "too_deep",
        format!(
            "the body is nested more than {} levels deep",
            graft::value::MAX_DEPTH
        ),
    )
    .with("max_depth", graft::value::MAX_DEPTH)
}

/// `Some(None)` for an explicit `null`, `None` when absent (with `#[serde(default)]`).
fn explicit_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

fn check_timeout(timeout_ms: Option<u64>) -> ApiResult<u64> {
    match timeout_ms {
        None => Ok(DEFAULT_TIMEOUT_MS),
        Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(ms),
        Some(ms) => Err(ApiError::bad_request(
            "bad_request",
            format!("timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, not {ms}"),
        )),
    }
}

fn sandbox(node: &Node, id: &str) -> ApiResult<Sandbox> {
    graft::config::validate_sandbox_id(id)
        .map_err(|e| ApiError::bad_request("invalid_input", e.to_string()))?;
    Ok(node.sandbox(id)?)
}

fn timeout_error(what: &str, target: &str, ms: u64) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!("{what} timed out after {ms} ms"),
    )
    .with("target", target)
    .with("timeout_ms", ms)
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

async fn openapi_json() -> Json<Value> {
    Json(openapi_document())
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
    limits: Option<Limits>,
    capabilities: Option<Vec<String>>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::from(Error::InvalidInput(message.into()))
}

/// Builds the spec of a create request (may read a project directory).
fn create_spec(body: CreateBody) -> ApiResult<SandboxSpec> {
    graft::config::validate_sandbox_id(&body.id)?;
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
    if let Some(limits) = body.limits {
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
        let spec = create_spec(body)?;
        Ok(n.create_sandbox(spec)?)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
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
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
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
    timeout_ms: Option<u64>,
}

async fn call(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<CallBody>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let ms = check_timeout(body.timeout_ms)?;
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

/// The reload options shared by every reload-like request.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptionsBody {
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    canary_ms: u64,
    canary_crashes: Option<u32>,
}

impl OptionsBody {
    fn into_options(self) -> ApiResult<ReloadOptions> {
        if self.canary_crashes == Some(0) {
            return Err(ApiError::bad_request(
                "bad_request",
                "canary_crashes must be at least 1",
            ));
        }
        Ok(ReloadOptions {
            extra: self.extra,
            state_handler: self.state_handler.map(StateHandler::Luau),
            dry_run: self.dry_run,
            canary_ms: self.canary_ms,
            canary_crashes: self.canary_crashes.unwrap_or(1),
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
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    canary_ms: u64,
    canary_crashes: Option<u32>,
}

impl ReloadBody {
    fn split(self) -> ApiResult<(BTreeMap<String, String>, ReloadOptions)> {
        if self.modules.is_empty() {
            return Err(invalid(
                "modules is empty: name at least one module and its source",
            ));
        }
        let opts = OptionsBody {
            extra: self.extra,
            state_handler: self.state_handler,
            dry_run: self.dry_run,
            canary_ms: self.canary_ms,
            canary_crashes: self.canary_crashes,
        }
        .into_options()?;
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
    version: u32,
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn rollback(
    State(node): State<Node>,
    UrlPath((id, module)): UrlPath<(String, String)>,
    Body(body): Body<RollbackBody>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    let opts = OptionsBody {
        extra: body.extra,
        state_handler: body.state_handler,
        dry_run: body.dry_run,
        ..Default::default()
    }
    .into_options()?;
    Ok(Json(sb.rollback(&module, body.version, opts).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalBody {
    source: String,
    timeout_ms: Option<u64>,
}

async fn eval(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body<EvalBody>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    let ms = check_timeout(body.timeout_ms)?;
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
    max_concurrency: Option<usize>,
    #[serde(default)]
    rolling: bool,
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    canary_ms: u64,
    canary_crashes: Option<u32>,
}

async fn batch_reload(
    State(node): State<Node>,
    Body(body): Body<BatchBody>,
) -> ApiResult<Json<Value>> {
    if body.max_concurrency == Some(0) {
        return Err(ApiError::bad_request(
            "bad_request",
            "max_concurrency must be at least 1",
        ));
    }
    let max_concurrency = body.max_concurrency.unwrap_or_else(|| node.threads());
    let (ids, rolling) = (body.sandboxes, body.rolling);
    let (sources, opts) = ReloadBody {
        modules: body.modules,
        extra: body.extra,
        state_handler: body.state_handler,
        dry_run: body.dry_run,
        canary_ms: body.canary_ms,
        canary_crashes: body.canary_crashes,
    }
    .split()?;
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
