//! The OpenAPI 3 document served at `/api/v1/openapi.json` (hand-written).

use serde_json::{json, Value};

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn body(schema: Value) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema } } })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn err(description: &str) -> Value {
    ok(description, r("Error"))
}

fn id_param() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "description": "sandbox id `[a-z0-9][a-z0-9_-]{0,63}`",
            "schema": { "type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$" } })
}

fn path_param(name: &str, description: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": { "type": "string" } })
}

/// Common error responses of a route on one sandbox.
fn sandbox_errors(extra: &[(&str, &str)]) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert(
        "400".into(),
        err("malformed request: bad JSON, bad shape, nesting deeper than 64, invalid id"),
    );
    m.insert(
        "404".into(),
        err("unknown sandbox (or process, module, version)"),
    );
    for (code, d) in extra {
        m.insert((*code).into(), err(d));
    }
    m
}

fn responses(success: (&str, Value), errors: serde_json::Map<String, Value>) -> Value {
    let mut m = errors;
    m.insert(success.0.into(), success.1);
    Value::Object(m)
}

/// The OpenAPI 3.0 document of the API: every path and method of [`crate::router`].
pub fn openapi_document() -> Value {
    let reload_options = json!({
        "extra": { "description": "passed to code_change as `extra`" },
        "state_handler": { "type": "string", "description": "Luau source evaluating to function(old_state, old_vsn, new_vsn, extra) -> new_state, used instead of code_change" },
        "dry_run": { "type": "boolean", "default": false },
        "canary_ms": { "type": "integer", "minimum": 0, "default": 0 },
        "canary_crashes": { "type": "integer", "minimum": 1, "default": 1 },
    });
    let mut reload_props = reload_options.as_object().cloned().unwrap_or_default();
    reload_props.insert("modules".into(), r("Sources"));
    let mut batch_props = reload_props.clone();
    batch_props.insert(
        "sandboxes".into(),
        json!({ "type": "array", "items": { "type": "string" } }),
    );
    batch_props.insert("max_concurrency".into(), json!({ "type": "integer", "minimum": 1, "description": "default: the node's scheduler threads" }));
    batch_props.insert("rolling".into(), json!({ "type": "boolean", "default": false, "description": "one at a time; stop at the first failure (the rest report `skipped`)" }));

    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Graft node API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Isolated, live-upgradable Luau sandboxes. Errors are { error: { kind, message, ... } }."
        },
        "servers": [{ "url": "/api/v1" }],
        "paths": {
            "/health": { "get": {
                "summary": "Liveness", "operationId": "health",
                "responses": { "200": ok("the node is up", json!({ "type": "object", "properties": { "status": { "type": "string", "enum": ["ok"] }, "version": { "type": "string" }, "sandboxes": { "type": "integer" } } })) }
            }},
            "/openapi.json": { "get": {
                "summary": "This document", "operationId": "openapi",
                "responses": { "200": ok("OpenAPI 3 document", json!({ "type": "object" })) }
            }},
            "/sandboxes": {
                "get": {
                    "summary": "List sandboxes", "operationId": "listSandboxes",
                    "responses": { "200": ok("every sandbox's info", json!({ "type": "array", "items": r("SandboxInfo") })) }
                },
                "post": {
                    "summary": "Create a sandbox", "operationId": "createSandbox",
                    "requestBody": body(r("CreateSandbox")),
                    "responses": {
                        "201": ok("created; the app (if any) was started", r("SandboxInfo")),
                        "400": err("malformed request"),
                        "409": err("a sandbox with this id exists (kind sandbox_exists)"),
                        "413": err("body over 1 MiB"),
                        "422": err("invalid input or a compile/check error (with module, file, line, column, frame, diagnostics)")
                    }
                }
            },
            "/sandboxes/{id}": {
                "parameters": [id_param()],
                "get": {
                    "summary": "Sandbox info", "operationId": "getSandbox",
                    "responses": responses(("200", ok("info", r("SandboxInfo"))), sandbox_errors(&[]))
                },
                "delete": {
                    "summary": "Destroy a sandbox (its app is stopped in order first, for at most 5 s)", "operationId": "deleteSandbox",
                    "responses": responses(("204", json!({ "description": "destroyed" })), sandbox_errors(&[]))
                }
            },
            "/sandboxes/{id}/restart": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Stop the app, rebuild the VM from the current versions, start the app", "operationId": "restartSandbox",
                    "responses": responses(("200", ok("info after the restart", r("SandboxInfo"))), sandbox_errors(&[("422", "the current modules no longer load")]))
                }
            },
            "/sandboxes/{id}/processes": {
                "parameters": [id_param()],
                "get": {
                    "summary": "Process list", "operationId": "listProcesses",
                    "responses": responses(("200", ok("processes by pid", json!({ "type": "array", "items": r("ProcessInfo") }))), sandbox_errors(&[]))
                }
            },
            "/sandboxes/{id}/processes/{target}/state": {
                "parameters": [id_param(), path_param("target", "registered name or pid `<module.N>` (URL-encoded)")],
                "get": {
                    "summary": "A process's state as JSON", "operationId": "processState",
                    "responses": responses(("200", ok("the state", json!({}))), sandbox_errors(&[("422", "the state is not plain data")]))
                }
            },
            "/sandboxes/{id}/call": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Call a process (handle_call) and wait for its reply", "operationId": "call",
                    "requestBody": body(json!({ "type": "object", "required": ["to"], "additionalProperties": false, "properties": {
                        "to": { "type": "string" }, "request": {}, "timeout_ms": { "type": "integer", "minimum": 1, "maximum": 3600000, "default": 5000 } } })),
                    "responses": responses(("200", ok("the reply", json!({ "type": "object", "properties": { "reply": {} } }))), sandbox_errors(&[
                        ("413", "body over 1 MiB"),
                        ("429", "the target's mailbox is full (mailbox_full)"),
                        ("500", "the handler crashed before replying (kind crashed, with reason)"),
                        ("504", "no reply within timeout_ms (kind timeout)")
                    ]))
                }
            },
            "/sandboxes/{id}/cast": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Cast a message (handle_cast)", "operationId": "cast",
                    "requestBody": body(r("Message")),
                    "responses": responses(("202", ok("queued", json!({ "type": "object" }))), sandbox_errors(&[("429", "mailbox full")]))
                }
            },
            "/sandboxes/{id}/send": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Send a plain message (handle_info)", "operationId": "send",
                    "requestBody": body(r("Message")),
                    "responses": responses(("202", ok("queued", json!({ "type": "object" }))), sandbox_errors(&[("429", "mailbox full")]))
                }
            },
            "/sandboxes/{id}/spawn": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Spawn a process", "operationId": "spawn",
                    "requestBody": body(json!({ "type": "object", "required": ["module"], "additionalProperties": false, "properties": {
                        "module": { "type": "string" }, "args": {}, "name": { "type": "string" } } })),
                    "responses": responses(("201", ok("started (init returned)", json!({ "type": "object", "properties": { "pid": { "type": "string" }, "name": { "type": "string", "nullable": true }, "module": { "type": "string" } } }))),
                        sandbox_errors(&[("422", "init failed (spawn_failed) or the module is not a behaviour"), ("429", "max_processes reached")]))
                }
            },
            "/sandboxes/{id}/modules": {
                "parameters": [id_param()],
                "get": {
                    "summary": "Modules with current version, checksum, dependencies", "operationId": "listModules",
                    "responses": responses(("200", ok("modules", json!({ "type": "array", "items": r("ModuleInfo") }))), sandbox_errors(&[]))
                }
            },
            "/sandboxes/{id}/modules/{module}/versions": {
                "parameters": [id_param(), path_param("module", "module name, e.g. chat.room")],
                "get": {
                    "summary": "Kept versions of a module, oldest first", "operationId": "listVersions",
                    "responses": responses(("200", ok("versions", json!({ "type": "array", "items": r("ModuleVersion") }))), sandbox_errors(&[]))
                }
            },
            "/sandboxes/{id}/modules/{module}/rollback": {
                "parameters": [id_param(), path_param("module", "module name")],
                "post": {
                    "summary": "Reload a kept version; code_change gets { down = current }", "operationId": "rollback",
                    "requestBody": body(json!({ "type": "object", "required": ["version"], "additionalProperties": false, "properties": {
                        "version": { "type": "integer", "minimum": 1 }, "extra": {}, "state_handler": { "type": "string" }, "dry_run": { "type": "boolean" } } })),
                    "responses": responses(("200", ok("the report", r("ReloadReport"))), sandbox_errors(&[("409", "the reload aborted; nothing changed")]))
                }
            },
            "/sandboxes/{id}/reload": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Reload modules as one transaction", "operationId": "reload",
                    "requestBody": body(json!({ "type": "object", "required": ["modules"], "additionalProperties": false, "properties": reload_props })),
                    "responses": responses(("200", ok("the report", r("ReloadReport"))), sandbox_errors(&[
                        ("409", "aborted after compile/check (evaluate, migrate, quiesce …); nothing changed"),
                        ("413", "body over 1 MiB"),
                        ("422", "compile or check error (with module, file, line, column)")
                    ]))
                }
            },
            "/sandboxes/{id}/eval": {
                "parameters": [id_param()],
                "post": {
                    "summary": "Run a Luau chunk as a short-lived process under the sandbox's limits", "operationId": "eval",
                    "requestBody": body(json!({ "type": "object", "required": ["source"], "additionalProperties": false, "properties": {
                        "source": { "type": "string" }, "timeout_ms": { "type": "integer", "minimum": 1, "default": 5000 } } })),
                    "responses": responses(("200", ok("the chunk's return value", json!({ "type": "object", "properties": { "result": {} } }))), sandbox_errors(&[
                        ("422", "compile error or runtime error"), ("500", "the chunk crashed"), ("504", "no result within timeout_ms")
                    ]))
                }
            },
            "/sandboxes/{id}/events": {
                "parameters": [id_param(), { "name": "since", "in": "query", "required": false, "description": "only events with seq > since", "schema": { "type": "integer" } }],
                "get": {
                    "summary": "Reload history and lifecycle events, newest last", "operationId": "events",
                    "responses": responses(("200", ok("events", json!({ "type": "array", "items": r("Event") }))), sandbox_errors(&[]))
                }
            },
            "/reload": {
                "post": {
                    "summary": "Batch reload of the same sources into many sandboxes", "operationId": "batchReload",
                    "requestBody": body(json!({ "type": "object", "required": ["sandboxes", "modules"], "additionalProperties": false, "properties": batch_props })),
                    "responses": {
                        "200": ok("results in input order", json!({ "type": "array", "items": { "type": "object", "properties": {
                            "sandbox": { "type": "string" }, "ok": { "type": "boolean" }, "status": { "type": "integer", "description": "HTTP status the error would have alone" },
                            "result": { "oneOf": [r("ReloadReport"), r("Error")] } } } })),
                        "400": err("malformed request"),
                        "413": err("body over 1 MiB"),
                        "422": err("modules is empty")
                    }
                }
            }
        },
        "components": { "schemas": {
            "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["kind", "message"], "properties": {
                "kind": { "type": "string", "description": "no_sandbox, sandbox_exists, no_process, no_module, no_version, invalid_input, compile_error, reload_aborted, timeout, crashed, mailbox_full, max_processes, spawn_failed, not_plain_data, sandbox_stopped, luau_error, malformed_json, bad_request, too_deep, body_too_large, not_found, method_not_allowed" },
                "message": { "type": "string" },
                "module": { "type": "string" }, "file": { "type": "string" }, "line": { "type": "integer" }, "column": { "type": "integer" },
                "frame": { "type": "string" }, "diagnostics": { "type": "array", "items": r("Diagnostic") },
                "step": { "type": "string" }, "process": { "type": "string" }, "target": { "type": "string" }, "reason": {} } } } },
            "Diagnostic": { "type": "object", "properties": { "kind": { "type": "string" }, "module": { "type": "string" }, "file": { "type": "string" },
                "line": { "type": "integer" }, "column": { "type": "integer" }, "message": { "type": "string" }, "frame": { "type": "string" } } },
            "Sources": { "type": "object", "additionalProperties": { "type": "string" }, "description": "module name -> Luau source" },
            "Limits": { "type": "object", "additionalProperties": false, "properties": {
                "memory_bytes": { "type": "integer" }, "handler_ms": { "type": "integer" }, "max_processes": { "type": "integer" },
                "max_mailbox": { "type": "integer" }, "max_versions": { "type": "integer" }, "max_message_bytes": { "type": "integer" }, "max_source_bytes": { "type": "integer" } } },
            "CreateSandbox": { "type": "object", "required": ["id", "modules"], "additionalProperties": false, "properties": {
                "id": { "type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$" },
                "modules": { "oneOf": [r("Sources"), { "type": "string", "description": "server-side path: a project directory (with graft.toml) or a directory of .luau files" }] },
                "entry": { "type": "string", "nullable": true, "description": "default `app` when there is such a module; null: no app" },
                "limits": r("Limits"),
                "capabilities": { "type": "array", "items": { "type": "string", "enum": ["clock", "random"] } } } },
            "SandboxInfo": { "type": "object", "properties": {
                "id": { "type": "string" }, "status": { "type": "string" }, "app": { "type": "object" }, "entry": { "type": "string", "nullable": true },
                "process_count": { "type": "integer" }, "memory_bytes": { "type": "integer" }, "limits": r("Limits"), "module_count": { "type": "integer" },
                "capabilities": { "type": "array", "items": { "type": "string" } } } },
            "ProcessInfo": { "type": "object", "properties": {
                "pid": { "type": "string" }, "name": { "type": "string", "nullable": true }, "module": { "type": "string" }, "version": { "type": "integer" },
                "status": { "type": "string" }, "mailbox_len": { "type": "integer" }, "memory_bytes": { "type": "integer" },
                "links": { "type": "array", "items": { "type": "string" } }, "trap_exit": { "type": "boolean" }, "messages_handled": { "type": "integer" } } },
            "Message": { "type": "object", "required": ["to"], "additionalProperties": false, "properties": { "to": { "type": "string" }, "message": {} } },
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
        } }
    })
}
