//! The schemas of the document: request bodies (with the ranges of
//! [`crate::bounds`]), responses, and the error bodies of every status
//! (from [`crate::KINDS`]).

use graft::NodeLimits;
use serde_json::{json, Map, Value};

use super::{
    id_schema, int, module_schema, nullable, object, props, r, with, EXAMPLE_APP, EXAMPLE_COUNTER,
    PROCESS_NAME_PATTERN,
};
use crate::bounds;
use crate::errors::{kinds_of, KINDS};

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

pub(super) fn requests(node: &NodeLimits) -> Map<String, Value> {
    let timeout = nullable(with(
        int(bounds::timeout_ms()),
        json!({ "default": crate::DEFAULT_TIMEOUT_MS }),
    ));
    let mut s = Map::new();
    s.insert("CreateSandbox".into(), object(&["id", "modules"], props(json!({
        "id": id_schema(),
        "modules": { "oneOf": [r("Sources"), { "type": "string", "description": "server-side path: a project directory (with graft.toml) or a directory of .luau files" }] },
        "entry": with(nullable(module_schema()), json!({ "description": "absent: `app` when there is such a module (or the project's entry); null: no app" })),
        "entry_args": { "description": "what the entry module's `init` receives (plain JSON, default null; at most limits.max_message_bytes)" },
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
    s.insert(
        "CreateToken".into(),
        object(
            &["role"],
            props(json!({
                "role": { "type": "string", "enum": ["viewer", "operator", "admin"] },
                "sandboxes": nullable(json!({ "type": "array", "maxItems": crate::trust::tokens::MAX_SCOPE, "items": id_schema(),
                    "description": "limit the token to these sandboxes (absent or null: all)" })),
                "label": nullable(json!({ "type": "string", "maxLength": crate::trust::tokens::MAX_LABEL_CHARS, "description": "a note; no control characters" })),
            })),
        ),
    );
    s.insert(
        "SignIn".into(),
        object(
            &["token"],
            props(json!({ "token": { "type": "string", "description": "a token (`graft_` and 64 hex digits)" } })),
        ),
    );
    s
}

pub(super) fn responses(node: &NodeLimits) -> Map<String, Value> {
    props(json!({
        "Diagnostic": { "type": "object", "properties": { "kind": { "type": "string" }, "module": { "type": "string" }, "file": { "type": "string" },
            "line": { "type": "integer" }, "column": { "type": "integer" }, "message": { "type": "string" }, "frame": { "type": "string" } } },
        "Sources": sources_schema(),
        "AuditRow": { "type": "object", "properties": {
            "id": { "type": "integer" }, "at_ms": { "type": "number" }, "token_id": { "type": ["string", "null"] }, "role": { "type": ["string", "null"] },
            "method": { "type": "string" }, "route": { "type": "string", "description": "the route pattern, e.g. /api/v1/sandboxes/{id}/eval" },
            "sandbox": { "type": ["string", "null"] }, "outcome": { "type": "string", "description": "`ok`, an error kind, `pending` (still running, or the node stopped first) or `abandoned` (the client left)" },
            "status": { "type": ["integer", "null"] }, "duration_us": { "type": "integer" } } },
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
pub(super) fn errors() -> Map<String, Value> {
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

pub(super) fn examples(node: &NodeLimits) -> Map<String, Value> {
    props(json!({
        "CreateSandbox": { "id": "demo", "modules": { "app": EXAMPLE_APP, "counter": EXAMPLE_COUNTER }, "entry": "app",
                           "limits": limits_example(node), "capabilities": ["clock"] },
        "Call": { "to": "counter", "request": "inc", "timeout_ms": crate::DEFAULT_TIMEOUT_MS },
        "Message": { "to": "counter", "message": 1 },
        "Spawn": { "module": "counter", "args": { "start": 41 }, "name": "worker" },
        "Rollback": { "version": 1, "extra": null, "dry_run": true },
        "Reload": { "modules": { "counter": EXAMPLE_COUNTER }, "extra": { "why": "demo" }, "dry_run": false, "canary_ms": 0, "canary_crashes": 1 },
        "BatchReload": { "sandboxes": ["demo"], "modules": { "counter": EXAMPLE_COUNTER }, "max_concurrency": 1, "rolling": false, "dry_run": true },
        "Eval": { "source": "return 1 + 1", "timeout_ms": 1000 },
        "CreateToken": { "role": "operator", "sandboxes": ["demo"], "label": "deploy bot" },
        "SignIn": { "token": "graft_0000000000000000000000000000000000000000000000000000000000000000" }
    }))
}
