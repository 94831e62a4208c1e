//! The OpenAPI 3.1 document served at `/api/v1/openapi.json`.
//!
//! It states every constraint the server enforces, so that a client generated
//! from it, or a schema-driven fuzzer, agrees with the server: integer ranges
//! come from [`crate::bounds`] (the table the handlers check), id and name
//! patterns from `graft::config`'s rules, error answers from [`crate::KINDS`].
//! A body valid by this document passes the server's shape and range checks;
//! a body outside a stated range is refused with 422 `limit_out_of_range`.
//! Absent and `null` optional fields mean the default (only `entry: null`
//! has a meaning of its own: no app). 3.1 rather than 3.0 because module
//! names are object keys, which only JSON Schema 2020-12's `propertyNames`
//! can constrain.

use graft::NodeLimits;
use serde_json::{json, Map, Value};

use crate::bounds::{self, Bound};
use crate::error::{kinds_of, KINDS};

/// Sandbox ids (`graft::config::validate_sandbox_id`).
const SANDBOX_ID_PATTERN: &str = "^[a-z0-9][a-z0-9_-]{0,63}$";
/// Module names: dot-separated identifiers (`graft::config::validate_module_name`).
const MODULE_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*(\\.[A-Za-z_][A-Za-z0-9_]*)*$";
/// Process names: not all digits, not starting with `<` (they would read as
/// a serial or a pid).
const PROCESS_NAME_PATTERN: &str = "^(?![0-9]+$)[^<]";

/// The example project of the document (and of its tests): an app that
/// supervises a counter registered as `counter`.
const EXAMPLE_APP: &str = "return {\n  behaviour = \"supervisor\",\n  init = function()\n    return { strategy = \"one_for_one\", intensity = 5, period = 5,\n      children = { { id = \"counter\", module = \"counter\", name = \"counter\" } } }\n  end,\n}\n";
const EXAMPLE_COUNTER: &str = "local counter = {}\nfunction counter.init(args)\n  return { count = (args and args.start) or 0 }\nend\nfunction counter.handle_call(request, from, state)\n  state.count += 1\n  return state.count, state\nend\nfunction counter.handle_cast(message, state)\n  return state\nend\nfunction counter.handle_info(message, state)\n  return state\nend\nreturn counter\n";

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// An integer schema stating `b`'s range.
fn int(b: Bound) -> Value {
    json!({ "type": "integer", "minimum": b.min, "maximum": b.max })
}

/// `schema` or `null` (absent and `null` mean the default).
fn nullable(schema: Value) -> Value {
    match schema {
        Value::Object(mut m) if m.get("type").is_some_and(Value::is_string) => {
            let t = m.remove("type").unwrap_or(Value::Null);
            m.insert("type".into(), json!([t, "null"]));
            Value::Object(m)
        }
        other => json!({ "anyOf": [other, { "type": "null" }] }),
    }
}

/// `schema` with extra keywords (`default`, `description`, …).
fn with(schema: Value, extra: Value) -> Value {
    match (schema, extra) {
        (Value::Object(mut m), Value::Object(e)) => {
            m.extend(e);
            Value::Object(m)
        }
        (s, _) => s,
    }
}

fn id_schema() -> Value {
    json!({ "type": "string", "pattern": SANDBOX_ID_PATTERN, "minLength": 1, "maxLength": 64 })
}

fn module_schema() -> Value {
    json!({ "type": "string", "pattern": MODULE_NAME_PATTERN, "minLength": 1, "maxLength": 128 })
}

fn body(schema: Value, example: Value) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema, "example": example } } })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn param(name: &str, description: &str, schema: Value, example: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description,
            "schema": schema, "example": example })
}

fn id_param() -> Value {
    param(
        "id",
        "sandbox id; malformed: 400 invalid_input",
        id_schema(),
        "demo",
    )
}

fn module_param() -> Value {
    param(
        "module",
        "module name, e.g. chat.room; malformed: 400 invalid_input",
        module_schema(),
        "counter",
    )
}

/// The answers of an operation: its success and the error statuses it can
/// give, each with the kinds of that status.
fn responses(success: (&str, Value), errors: &[u16]) -> Value {
    let mut m = Map::new();
    m.insert(success.0.into(), success.1);
    for status in errors {
        let when: Vec<String> = KINDS
            .iter()
            .filter(|k| k.status == *status)
            .map(|k| format!("`{}`: {}", k.kind, k.when))
            .collect();
        m.insert(
            status.to_string(),
            ok(&when.join("; "), r(&format!("Error{status}"))),
        );
    }
    Value::Object(m)
}

/// Error statuses of every route on one sandbox: a malformed id, an unknown
/// sandbox, one stopped meanwhile or failed, a server fault.
const ON_SANDBOX: [u16; 4] = [400, 404, 500, 503];

fn errors(extra: &[u16]) -> Vec<u16> {
    let mut v: Vec<u16> = ON_SANDBOX.iter().chain(extra).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The error body with `kind` one of `kinds`.
fn error_schema(kinds: &[&str]) -> Value {
    let opt_str = json!({ "type": ["string", "null"] });
    let opt_int = json!({ "type": ["integer", "null"] });
    json!({ "type": "object", "required": ["error"], "properties": { "error": {
        "type": "object", "required": ["kind", "message"], "properties": {
            "kind": { "type": "string", "enum": kinds },
            "message": { "type": "string" },
            "sandbox": { "type": "string" }, "process": opt_str, "target": { "type": "string" },
            "module": opt_str, "file": { "type": "string" }, "line": opt_int, "column": opt_int,
            "frame": { "type": "string" }, "diagnostics": { "type": "array", "items": r("Diagnostic") },
            "version": { "type": "integer" }, "kept": { "type": "array", "items": { "type": "integer" } },
            "step": { "type": "string" }, "reason": { "type": "object", "description": "an exit reason: { kind, message?, traceback? }" },
            "timeout_ms": { "type": "integer" }, "max_processes": { "type": "integer" },
            "limit": { "type": "integer", "description": "value_too_large: the max_value_bytes passed" },
            "field": { "type": "string", "description": "limit_out_of_range: the field" },
            "value": { "type": "string", "description": "limit_out_of_range: the value given, as text" },
            "min": { "type": "integer" }, "max": { "type": "integer" },
            "limit_bytes": { "type": "integer" }, "max_depth": { "type": "integer" }
        } } } })
}

/// The limits of a sandbox, each with its range under the node's caps.
fn limits_schema(node: &NodeLimits) -> Value {
    let props: Map<String, Value> = bounds::limits(node)
        .into_iter()
        .map(|b| (b.field.to_owned(), int(b)))
        .collect();
    json!({ "type": "object", "additionalProperties": false, "properties": props,
            "description": "absent fields keep their defaults" })
}

/// The defaults, brought into the node's ranges.
fn limits_example(node: &NodeLimits) -> Value {
    let defaults = serde_json::to_value(graft::Limits::default()).unwrap_or(Value::Null);
    let m: Map<String, Value> = bounds::limits(node)
        .into_iter()
        .map(|b| {
            let v = defaults[b.field].as_u64().unwrap_or(b.min);
            (b.field.to_owned(), json!(v.clamp(b.min, b.max)))
        })
        .collect();
    Value::Object(m)
}

fn sources_schema() -> Value {
    json!({ "type": "object", "propertyNames": module_schema(), "additionalProperties": { "type": "string" },
            "description": "module name -> Luau source" })
}

/// `extra`, `state_handler`, `dry_run` (every reload-like request).
fn reload_options() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "extra".into(),
        json!({ "description": "any JSON, passed to code_change as `extra`" }),
    );
    m.insert("state_handler".into(), nullable(json!({ "type": "string", "description": "Luau source evaluating to function(old_state, old_vsn, new_vsn, extra) -> new_state, used instead of code_change" })));
    m.insert(
        "dry_run".into(),
        nullable(json!({ "type": "boolean", "default": false })),
    );
    m
}

/// [`reload_options`] plus the canary.
fn canary_options() -> Map<String, Value> {
    let mut m = reload_options();
    m.insert(
        "canary_ms".into(),
        nullable(with(
            int(bounds::canary_ms()),
            json!({ "default": 0, "description": "watch the upgraded processes this long; 0: no canary" }),
        )),
    );
    m.insert(
        "canary_crashes".into(),
        nullable(with(
            int(bounds::canary_crashes()),
            json!({ "default": 1, "description": "crashes within canary_ms that roll back" }),
        )),
    );
    m
}

fn object(required: &[&str], props: Map<String, Value>) -> Value {
    json!({ "type": "object", "required": required, "additionalProperties": false, "properties": props })
}

fn props(pairs: Value) -> Map<String, Value> {
    match pairs {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn request_schemas(node: &NodeLimits) -> Map<String, Value> {
    let timeout = nullable(with(
        int(bounds::timeout_ms()),
        json!({ "default": crate::DEFAULT_TIMEOUT_MS }),
    ));
    let mut s = Map::new();
    s.insert("CreateSandbox".into(), object(&["id", "modules"], props(json!({
        "id": id_schema(),
        "modules": { "oneOf": [r("Sources"), { "type": "string", "description": "server-side path: a project directory (with graft.toml) or a directory of .luau files" }] },
        "entry": with(nullable(module_schema()), json!({ "description": "absent: `app` when there is such a module (or the project's entry); null: no app" })),
        "limits": nullable(r("Limits")),
        "capabilities": nullable(json!({ "type": "array", "items": { "type": "string", "enum": graft::config::BUILTIN_CAPABILITIES } })),
    }))));
    s.insert(
        "Call".into(),
        object(
            &["to"],
            props(json!({
                "to": { "type": "string", "description": "registered name, pid `<module.N>` or serial" },
                "request": { "description": "any JSON" },
                "timeout_ms": timeout,
            })),
        ),
    );
    s.insert(
        "Message".into(),
        object(
            &["to"],
            props(json!({ "to": { "type": "string" }, "message": { "description": "any JSON" } })),
        ),
    );
    s.insert("Spawn".into(), object(&["module"], props(json!({
        "module": module_schema(),
        "args": { "description": "any JSON, passed to init" },
        "name": nullable(json!({ "type": "string", "minLength": 1, "maxLength": crate::MAX_NAME_BYTES, "pattern": PROCESS_NAME_PATTERN,
                                 "description": "register the process under this name: 1-64 bytes, not all digits, not starting with `<` (else 422 badarg)" })),
    }))));
    let mut rollback = reload_options();
    rollback.insert("version".into(), int(bounds::version()));
    s.insert("Rollback".into(), object(&["version"], rollback));
    let mut reload = canary_options();
    reload.insert("modules".into(), r("Sources"));
    s.insert("Reload".into(), object(&["modules"], reload.clone()));
    let mut batch = reload;
    batch.insert("sandboxes".into(), json!({ "type": "array", "items": id_schema(), "uniqueItems": true,
        "maxItems": bounds::batch_size(node).max, "description": "each at most once (else 422 duplicate_sandbox)" }));
    batch.insert(
        "max_concurrency".into(),
        nullable(with(
            int(bounds::max_concurrency(node)),
            json!({ "description": "default: the node's scheduler threads" }),
        )),
    );
    batch.insert("rolling".into(), nullable(json!({ "type": "boolean", "default": false, "description": "one at a time; stop at the first failure (the rest report `skipped`)" })));
    s.insert(
        "BatchReload".into(),
        object(&["sandboxes", "modules"], batch),
    );
    s.insert(
        "Eval".into(),
        object(
            &["source"],
            props(json!({ "source": { "type": "string" }, "timeout_ms": timeout })),
        ),
    );
    s
}

fn response_schemas(node: &NodeLimits) -> Map<String, Value> {
    props(json!({
        "Diagnostic": { "type": "object", "properties": { "kind": { "type": "string" }, "module": { "type": "string" }, "file": { "type": "string" },
            "line": { "type": "integer" }, "column": { "type": "integer" }, "message": { "type": "string" }, "frame": { "type": "string" } } },
        "Sources": sources_schema(),
        "Limits": limits_schema(node),
        "SandboxInfo": { "type": "object", "properties": {
            "id": { "type": "string" }, "status": { "type": "string" }, "app": { "type": "object" }, "entry": { "type": ["string", "null"] },
            "process_count": { "type": "integer" }, "memory_bytes": { "type": "integer" }, "limits": r("Limits"), "module_count": { "type": "integer" },
            "capabilities": { "type": "array", "items": { "type": "string" } } } },
        "ProcessInfo": { "type": "object", "properties": {
            "pid": { "type": "string" }, "name": { "type": ["string", "null"] }, "module": { "type": "string" }, "version": { "type": "integer" },
            "status": { "type": "string" }, "mailbox_len": { "type": "integer" }, "memory_bytes": { "type": "integer" },
            "links": { "type": "array", "items": { "type": "string" } }, "trap_exit": { "type": "boolean" }, "messages_handled": { "type": "integer" } } },
        "ModuleInfo": { "type": "object", "properties": {
            "name": { "type": "string" }, "version": { "type": "integer" }, "checksum": { "type": "string" },
            "dependencies": { "type": "array", "items": { "type": "string" } }, "kept": { "type": "array", "items": { "type": "integer" } }, "kind": { "type": "string" } } },
        "ModuleVersion": { "type": "object", "properties": {
            "version": { "type": "integer" }, "checksum": { "type": "string" }, "source": { "type": "string" }, "loaded_at_ms": { "type": "number" },
            "dependencies": { "type": "array", "items": { "type": "string" } }, "current": { "type": "boolean" } } },
        "ReloadReport": { "type": "object", "properties": {
            "status": { "type": "string", "enum": ["reloaded", "unchanged", "dry_run"] },
            "modules": { "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "from": { "type": "integer" }, "to": { "type": "integer" } } } },
            "processes_migrated": { "type": "integer" },
            "timings": { "type": "object", "properties": { "compile_us": { "type": "integer" }, "evaluate_us": { "type": "integer" }, "migrate_us": { "type": "integer" }, "swap_us": { "type": "integer" } } } } },
        "Event": { "type": "object", "properties": { "seq": { "type": "integer" }, "at_ms": { "type": "number" }, "kind": { "type": "string" }, "detail": {} } }
    }))
}

/// `Error` (every kind) and `Error400`, `Error404`, … (the kinds of one status).
fn error_schemas() -> Map<String, Value> {
    let mut m = Map::new();
    let all: Vec<&str> = KINDS.iter().fold(Vec::new(), |mut v, k| {
        if !v.contains(&k.kind) {
            v.push(k.kind);
        }
        v
    });
    m.insert("Error".into(), error_schema(&all));
    let mut statuses: Vec<u16> = KINDS.iter().map(|k| k.status).collect();
    statuses.dedup();
    for status in statuses {
        m.insert(format!("Error{status}"), error_schema(&kinds_of(status)));
    }
    m
}

fn examples(node: &NodeLimits) -> Map<String, Value> {
    props(json!({
        "CreateSandbox": { "id": "demo", "modules": { "app": EXAMPLE_APP, "counter": EXAMPLE_COUNTER }, "entry": "app",
                           "limits": limits_example(node), "capabilities": ["clock"] },
        "Call": { "to": "counter", "request": "inc", "timeout_ms": crate::DEFAULT_TIMEOUT_MS },
        "Message": { "to": "counter", "message": 1 },
        "Spawn": { "module": "counter", "args": { "start": 41 }, "name": "worker" },
        "Rollback": { "version": 1, "extra": null, "dry_run": true },
        "Reload": { "modules": { "counter": EXAMPLE_COUNTER }, "extra": { "why": "demo" }, "dry_run": false, "canary_ms": 0, "canary_crashes": 1 },
        "BatchReload": { "sandboxes": ["demo"], "modules": { "counter": EXAMPLE_COUNTER }, "max_concurrency": 1, "rolling": false, "dry_run": true },
        "Eval": { "source": "return 1 + 1", "timeout_ms": 1000 }
    }))
}

/// The document for a node with default caps.
pub fn openapi_document() -> Value {
    openapi_document_for(&NodeLimits::default())
}

/// The OpenAPI 3.1 document of the API of a node with caps `node`: every
/// path and method of [`crate::router`] and every constraint it enforces.
pub fn openapi_document_for(node: &NodeLimits) -> Value {
    let ex = examples(node);
    let req = |name: &str| body(r(name), ex.get(name).cloned().unwrap_or(Value::Null));
    let report = ok("the report", r("ReloadReport"));
    let mut schemas = request_schemas(node);
    schemas.extend(response_schemas(node));
    schemas.extend(error_schemas());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Graft node API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Isolated, live-upgradable Luau sandboxes. Errors are { error: { kind, message, ... } }; every kind is listed under its status. Bodies are at most 1 MiB (413) and nested at most 64 deep (400 too_deep); a wrong shape or type is 400, an integer outside its stated range 422 limit_out_of_range. Optional fields may be absent or null (the default); `entry: null` means no app. Unknown routes: 404 not_found; wrong methods: 405 method_not_allowed."
        },
        "servers": [{ "url": "/api/v1" }],
        "paths": {
            "/health": { "get": {
                "summary": "Liveness", "operationId": "health",
                "responses": { "200": ok("the node is up", json!({ "type": "object", "properties": { "status": { "type": "string", "enum": ["ok"] }, "version": { "type": "string" }, "sandboxes": { "type": "integer" } } })) }
            }},
            "/openapi.json": { "get": {
                "summary": "This document", "operationId": "openapi",
                "responses": { "200": ok("OpenAPI 3.1 document", json!({ "type": "object" })) }
            }},
            "/sandboxes": {
                "get": {
                    "summary": "List sandboxes", "operationId": "listSandboxes",
                    "responses": { "200": ok("every sandbox's info", json!({ "type": "array", "items": r("SandboxInfo") })) }
                },
                "post": {
                    "summary": "Create a sandbox", "operationId": "createSandbox",
                    "requestBody": req("CreateSandbox"),
                    "responses": responses(("201", ok("created; the app (if any) was started", r("SandboxInfo"))), &[400, 409, 413, 422, 429, 500, 503])
                }
            },
            "/sandboxes/{id}": {
                "parameters": [id_param()],
                "get": {
                    "summary": "Sandbox info", "operationId": "getSandbox",
                    "responses": responses(("200", ok("info", r("SandboxInfo"))), &errors(&[]))
                },
                "delete": {
                    "summary": "Destroy a sandbox (its app is stopped in order first, for at most 5 s)", "operationId": "deleteSandbox",
                    "responses": responses(("204", json!({ "description": "destroyed" })), &errors(&[]))
                }
            },
            "/sandboxes/{id}/restart": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Stop the app, rebuild the VM from the current versions, start the app", "operationId": "restartSandbox",
                    "responses": responses(("200", ok("info after the restart", r("SandboxInfo"))), &errors(&[409, 422]))
                }
            },
            "/sandboxes/{id}/processes": {
                "parameters": [id_param()],
                "get": {
                    "summary": "Process list", "operationId": "listProcesses",
                    "responses": responses(("200", ok("processes by pid", json!({ "type": "array", "items": r("ProcessInfo") }))), &errors(&[]))
                }
            },
            "/sandboxes/{id}/processes/{target}/state": {
                "parameters": [id_param(), param("target", "registered name or pid `<module.N>` (URL-encoded)", json!({ "type": "string" }), "counter")],
                "get": {
                    "summary": "A process's state as JSON", "operationId": "processState",
                    "responses": responses(("200", ok("the state", json!({}))), &errors(&[422]))
                }
            },
            "/sandboxes/{id}/call": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Call a process (handle_call) and wait for its reply", "operationId": "call",
                    "requestBody": req("Call"),
                    "responses": responses(("200", ok("the reply", json!({ "type": "object", "properties": { "reply": {} } }))), &errors(&[413, 422, 429, 504]))
                }
            },
            "/sandboxes/{id}/cast": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Cast a message (handle_cast)", "operationId": "cast",
                    "requestBody": req("Message"),
                    "responses": responses(("202", ok("queued", json!({ "type": "object" }))), &errors(&[413, 422, 429]))
                }
            },
            "/sandboxes/{id}/send": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Send a plain message (handle_info)", "operationId": "send",
                    "requestBody": req("Message"),
                    "responses": responses(("202", ok("queued", json!({ "type": "object" }))), &errors(&[413, 422, 429]))
                }
            },
            "/sandboxes/{id}/spawn": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Spawn a process", "operationId": "spawn",
                    "requestBody": req("Spawn"),
                    "responses": responses(("201", ok("started (init returned)", json!({ "type": "object", "properties": { "pid": { "type": "string" }, "name": { "type": ["string", "null"] }, "module": { "type": "string" } } }))),
                        &errors(&[413, 422, 429]))
                }
            },
            "/sandboxes/{id}/modules": {
                "parameters": [id_param()],
                "get": {
                    "summary": "Modules with current version, checksum, dependencies", "operationId": "listModules",
                    "responses": responses(("200", ok("modules", json!({ "type": "array", "items": r("ModuleInfo") }))), &errors(&[]))
                }
            },
            "/sandboxes/{id}/modules/{module}/versions": {
                "parameters": [id_param(), module_param()],
                "get": {
                    "summary": "Kept versions of a module, oldest first", "operationId": "listVersions",
                    "responses": responses(("200", ok("versions", json!({ "type": "array", "items": r("ModuleVersion") }))), &errors(&[]))
                }
            },
            "/sandboxes/{id}/modules/{module}/rollback": {
                "parameters": [id_param(), module_param()],
                "post": {
                    "summary": "Reload a kept version; code_change gets { down = current }", "operationId": "rollback",
                    "requestBody": req("Rollback"),
                    "responses": responses(("200", report.clone()), &errors(&[409, 413, 422]))
                }
            },
            "/sandboxes/{id}/reload": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Reload modules as one transaction", "operationId": "reload",
                    "requestBody": req("Reload"),
                    "responses": responses(("200", report), &errors(&[409, 413, 422]))
                }
            },
            "/sandboxes/{id}/eval": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Run a Luau chunk as a short-lived process under the sandbox's limits", "operationId": "eval",
                    "requestBody": req("Eval"),
                    "responses": responses(("200", ok("the chunk's return value", json!({ "type": "object", "properties": { "result": {} } }))), &errors(&[413, 422, 429, 504]))
                }
            },
            "/sandboxes/{id}/events": {
                "parameters": [id_param(), { "name": "since", "in": "query", "required": false, "description": "only events with seq > since", "schema": { "type": "integer", "minimum": 0 } }],
                "get": {
                    "summary": "Reload history and lifecycle events, newest last", "operationId": "events",
                    "responses": responses(("200", ok("events", json!({ "type": "array", "items": r("Event") }))), &errors(&[]))
                }
            },
            "/reload": {
                "post": {
                    "summary": "Batch reload of the same sources into many sandboxes", "operationId": "batchReload",
                    "requestBody": req("BatchReload"),
                    "responses": responses(("200", ok("results in input order", json!({ "type": "array", "items": { "type": "object", "properties": {
                            "sandbox": { "type": "string" }, "ok": { "type": "boolean" }, "status": { "type": "integer", "description": "HTTP status the error would have alone" },
                            "result": { "oneOf": [r("ReloadReport"), r("Error")] } } } }))), &[400, 413, 422, 500])
                }
            }
        },
        "components": { "schemas": schemas }
    })
}
