//! The paths of the document, one function per resource (as the handlers
//! are one module per resource). Each states its operations' bodies (by
//! reference to the schemas of `schemas`) and every error status it can
//! answer with.

use serde_json::{json, Map, Value};

use super::{
    errors, id_param, module_param, ok, param, props, r, responses, since_param, Requests,
};

/// `/health` and `/openapi.json`.
pub(super) fn node() -> Map<String, Value> {
    props(json!({
        "/health": { "get": {
            "summary": "Liveness", "operationId": "health",
            "responses": { "200": ok("the node is up", json!({ "type": "object", "properties": { "status": { "type": "string", "enum": ["ok"] }, "version": { "type": "string" }, "sandboxes": { "type": "integer" } } })) }
        }},
        "/openapi.json": { "get": {
            "summary": "This document", "operationId": "openapi",
            "responses": { "200": ok("OpenAPI 3.1 document", json!({ "type": "object" })) }
        }}
    }))
}

/// `/sandboxes`, `/sandboxes/{id}` and its restart.
pub(super) fn sandboxes(req: &Requests) -> Map<String, Value> {
    props(json!({
        "/sandboxes": {
            "get": {
                "summary": "List sandboxes", "operationId": "listSandboxes",
                "responses": { "200": ok("every sandbox's info", json!({ "type": "array", "items": r("SandboxInfo") })) }
            },
            "post": {
                "summary": "Create a sandbox", "operationId": "createSandbox",
                "requestBody": req.body("CreateSandbox"),
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
        }
    }))
}

/// The processes of a sandbox and the messages sent to them.
pub(super) fn processes(req: &Requests) -> Map<String, Value> {
    props(json!({
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
                "requestBody": req.body("Call"),
                "responses": responses(("200", ok("the reply", json!({ "type": "object", "properties": { "reply": {} } }))), &errors(&[413, 422, 429, 504]))
            }
        },
        "/sandboxes/{id}/cast": {
            "parameters": [id_param()],
            "post": {
                "summary": "Cast a message (handle_cast)", "operationId": "cast",
                "requestBody": req.body("Message"),
                "responses": responses(("202", ok("queued", json!({ "type": "object" }))), &errors(&[413, 422, 429]))
            }
        },
        "/sandboxes/{id}/send": {
            "parameters": [id_param()],
            "post": {
                "summary": "Send a plain message (handle_info)", "operationId": "send",
                "requestBody": req.body("Message"),
                "responses": responses(("202", ok("queued", json!({ "type": "object" }))), &errors(&[413, 422, 429]))
            }
        },
        "/sandboxes/{id}/spawn": {
            "parameters": [id_param()],
            "post": {
                "summary": "Spawn a process", "operationId": "spawn",
                "requestBody": req.body("Spawn"),
                "responses": responses(("201", ok("started (init returned)", json!({ "type": "object", "properties": { "pid": { "type": "string" }, "name": { "type": ["string", "null"] }, "module": { "type": "string" } } }))),
                    &errors(&[413, 422, 429]))
            }
        }
    }))
}

/// Modules, their versions, and rollback.
pub(super) fn modules(req: &Requests) -> Map<String, Value> {
    props(json!({
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
                "requestBody": req.body("Rollback"),
                "responses": responses(("200", ok("the report", r("ReloadReport"))), &errors(&[409, 413, 422]))
            }
        }
    }))
}

/// A reload of one sandbox and a batch reload.
pub(super) fn reload(req: &Requests) -> Map<String, Value> {
    props(json!({
        "/sandboxes/{id}/reload": {
            "parameters": [id_param()],
            "post": {
                "summary": "Reload modules as one transaction", "operationId": "reload",
                "requestBody": req.body("Reload"),
                "responses": responses(("200", ok("the report", r("ReloadReport"))), &errors(&[409, 413, 422]))
            }
        },
        "/reload": {
            "post": {
                "summary": "Batch reload of the same sources into many sandboxes", "operationId": "batchReload",
                "requestBody": req.body("BatchReload"),
                "responses": responses(("200", ok("results in input order", json!({ "type": "array", "items": { "type": "object", "properties": {
                        "sandbox": { "type": "string" }, "ok": { "type": "boolean" }, "status": { "type": "integer", "description": "HTTP status the error would have alone" },
                        "result": { "oneOf": [r("ReloadReport"), r("Error")] } } } }))), &[400, 413, 422, 500])
            }
        }
    }))
}

/// Eval and the events of a sandbox.
pub(super) fn eval_and_events(req: &Requests) -> Map<String, Value> {
    props(json!({
        "/sandboxes/{id}/eval": {
            "parameters": [id_param()],
            "post": {
                "summary": "Run a Luau chunk as a short-lived process under the sandbox's limits", "operationId": "eval",
                "requestBody": req.body("Eval"),
                "responses": responses(("200", ok("the chunk's return value", json!({ "type": "object", "properties": { "result": {} } }))), &errors(&[413, 422, 429, 504]))
            }
        },
        "/sandboxes/{id}/events": {
            "parameters": [id_param(), since_param()],
            "get": {
                "summary": "Reload history and lifecycle events, newest last", "operationId": "events",
                "responses": responses(("200", ok("events", json!({ "type": "array", "items": r("Event") }))), &errors(&[422]))
            }
        }
    }))
}

/// Tokens, the audit log and the dashboard's session (SPEC §9).
pub(super) fn trust(req: &Requests) -> Map<String, Value> {
    let token = json!({ "type": "object", "properties": {
        "id": { "type": "string" }, "role": { "type": "string", "enum": ["viewer", "operator", "admin"] },
        "sandboxes": { "type": ["array", "null"], "items": { "type": "string" } },
        "label": { "type": ["string", "null"] }, "created_ms": { "type": "number" }, "revoked_ms": { "type": ["number", "null"] } } });
    let query = |name: &str, description: &str, schema: Value| json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema });
    props(json!({
        "/tokens": {
            "get": {
                "summary": "Every token (never its secret or hash)", "operationId": "listTokens",
                "responses": responses(("200", ok("tokens, oldest first", json!({ "type": "array", "items": token.clone() }))), &[500])
            },
            "post": {
                "summary": "Create a token; its secret is in this answer only", "operationId": "createToken",
                "requestBody": req.body("CreateToken"),
                "responses": responses(("201", ok("the token, with `token`: the secret", token.clone())), &[400, 413, 422, 500])
            }
        },
        "/tokens/{token}": {
            "parameters": [param("token", "the token's id (`tok_…`), not its secret", json!({ "type": "string" }), "tok_0123456789ab")],
            "delete": {
                "summary": "Revoke a token (refused from the next request on)", "operationId": "revokeToken",
                "responses": responses(("204", json!({ "description": "revoked" })), &[404, 500])
            }
        },
        "/audit": {
            "parameters": [
                query("token", "only rows of this token id", json!({ "type": "string", "maxLength": 256 })),
                query("sandbox", "only rows of this sandbox", json!({ "type": "string", "maxLength": 256 })),
                query("outcome", "only rows with this outcome (`ok`, `pending`, `abandoned`, an error kind)", json!({ "type": "string", "maxLength": 256 })),
                query("since_ms", "only rows at or after this time (ms since the Unix epoch)", json!({ "type": "integer", "minimum": 0 })),
                query("before", "only rows with a smaller id (the `next_before` of the previous page)", json!({ "type": "integer", "minimum": 0 })),
                query("limit", "rows per page (default 100)", json!({ "type": "integer", "minimum": 1, "maximum": 1000 }))
            ],
            "get": {
                "summary": "The audit log, newest first", "operationId": "audit",
                "responses": responses(("200", ok("a page of rows", json!({ "type": "object", "properties": {
                    "rows": { "type": "array", "items": r("AuditRow") },
                    "next_before": { "type": ["integer", "null"], "description": "pass as `before` for the next page; null: no more" } } }))), &[400, 500])
            }
        },
        "/session": {
            "post": {
                "summary": "Sign in: a token for an HttpOnly, SameSite=Strict session cookie", "operationId": "signIn",
                "requestBody": req.body("SignIn"),
                "responses": responses(("204", json!({ "description": "signed in; `Set-Cookie: graft_session=…`" })), &[400, 401, 413, 429, 500])
            },
            "get": {
                "summary": "Who the caller is", "operationId": "session",
                "responses": responses(("200", ok("the caller", json!({ "type": "object", "properties": {
                    "token_id": { "type": "string" }, "role": { "type": "string" },
                    "sandboxes": { "type": ["array", "null"], "items": { "type": "string" } },
                    "expires_at_ms": { "type": ["number", "null"], "description": "the session's expiry; null for a bearer token" } } }))), &[])
            },
            "delete": {
                "summary": "Sign out: ends the session and clears the cookie", "operationId": "signOut",
                "responses": responses(("204", json!({ "description": "signed out" })), &[])
            }
        }
    }))
}
