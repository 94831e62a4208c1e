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
//!
//! Layout: this module holds the shared builders and assembles the
//! document; `schemas` holds the request, response and error schemas,
//! `paths` the operations, one function per resource.

mod live;
mod paths;
mod schemas;

use axum::extract::State;
use axum::Json;
use graft::{Node, NodeLimits};
use serde_json::{json, Map, Value};

use crate::bounds::{self, Bound};
use crate::errors::KINDS;

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

/// `?since=` of the events: a query parameter, optional, in the range the
/// handler checks.
fn since_param() -> Value {
    json!({ "name": "since", "in": "query", "required": false,
            "description": "only events with seq > since (default 0: every kept event); negative or above the maximum: 422 limit_out_of_range; not an integer: 400 bad_request",
            "schema": int(bounds::since()), "example": 0 })
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

fn object(required: &[&str], props: Map<String, Value>) -> Value {
    json!({ "type": "object", "required": required, "additionalProperties": false, "properties": props })
}

fn props(pairs: Value) -> Map<String, Value> {
    match pairs {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The request bodies of the operations, each with its example.
pub(crate) struct Requests {
    examples: Map<String, Value>,
}

impl Requests {
    /// The `requestBody` of an operation taking the schema `name`.
    fn body(&self, name: &str) -> Value {
        body(
            r(name),
            self.examples.get(name).cloned().unwrap_or(Value::Null),
        )
    }
}

/// The document for a node with default caps.
pub fn openapi_document() -> Value {
    openapi_document_for(&NodeLimits::default())
}

/// The OpenAPI 3.1 document of the API of a node with caps `node`: every
/// path and method of [`crate::router`] and every constraint it enforces.
pub fn openapi_document_for(node: &NodeLimits) -> Value {
    let req = Requests {
        examples: schemas::examples(node),
    };
    let mut paths = paths::node();
    paths.extend(paths::sandboxes(&req));
    paths.extend(paths::processes(&req));
    paths.extend(paths::modules(&req));
    paths.extend(paths::reload(&req));
    paths.extend(paths::eval_and_events(&req));
    paths.extend(live::paths());
    paths.extend(paths::trust(&req));
    secure(&mut paths);
    let mut schemas = schemas::requests(node);
    schemas.extend(schemas::responses(node));
    schemas.extend(schemas::errors());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Graft node API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Isolated, live-upgradable Luau sandboxes. Errors are { error: { kind, message, ... } }; every kind is listed under its status. Bodies are at most 1 MiB (413) and nested at most 64 deep (400 too_deep); a wrong shape or type is 400, an integer outside its stated range 422 limit_out_of_range. Optional fields may be absent or null (the default); `entry: null` means no app. Unknown routes: 404 not_found; wrong methods: 405 method_not_allowed."
        },
        "servers": [{ "url": "/api/v1" }],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "`Authorization: Bearer graft_…` (a token from `graft token create`, or the node's admin token file)" },
                "session": { "type": "apiKey", "in": "cookie", "name": "graft_session", "description": "the dashboard's session, from `POST /session`" }
            }
        }
    })
}

/// Adds to every operation what the route table says: who may call it
/// (`security`, `x-graft-role`), whether it is audited (`x-graft-audited`),
/// and the answers of the trust middleware (401, 403, 415, 429, 503).
fn secure(paths: &mut Map<String, Value>) {
    use crate::trust::routes::{find, Access, AuditClass};
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let Ok(m) = method.to_uppercase().parse::<axum::http::Method>() else {
                continue;
            };
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            let Some(row) = find(&m, &format!("/api/v1{path}")) else {
                continue;
            };
            let mut statuses: Vec<u16> = vec![403];
            if m != axum::http::Method::GET {
                statuses.push(415);
            }
            match row.access {
                Access::Public => {
                    op.insert("security".into(), json!([]));
                    op.insert("x-graft-role".into(), json!("public"));
                }
                Access::Role(role) => {
                    op.insert(
                        "security".into(),
                        json!([{ "bearer": [] }, { "session": [] }]),
                    );
                    op.insert("x-graft-role".into(), json!(role.as_str()));
                    statuses.extend([401, 429]);
                }
            }
            op.insert("x-graft-audited".into(), json!(row.audit.as_str()));
            if row.audit != AuditClass::Never {
                statuses.push(503);
            }
            let Some(resps) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            for status in statuses {
                let when: Vec<String> = KINDS
                    .iter()
                    .filter(|k| k.status == status)
                    .map(|k| format!("`{}`: {}", k.kind, k.when))
                    .collect();
                resps.insert(
                    status.to_string(),
                    ok(&when.join("; "), r(&format!("Error{status}"))),
                );
            }
        }
    }
}

/// `GET /openapi.json`: the document for this node's caps.
pub(crate) async fn openapi_json(State(node): State<Node>) -> Json<Value> {
    Json(openapi_document_for(node.limits()))
}
