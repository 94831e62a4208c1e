//! The paths of SPEC §10 under `/api/v1`: the event stream and the
//! supervision tree. (`GET /metrics` and the dashboard at `/` are outside
//! the JSON API and are described in docs/dashboard.md.)

use serde_json::{json, Map, Value};

use super::{errors, id_param, ok, props, responses};
use crate::live::feed::KEEP_EVENTS;
use crate::live::stream::{MAX_KINDS, MAX_KIND_BYTES};

fn query(name: &str, description: String, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

/// `/events/stream` and `/sandboxes/{id}/tree`.
pub(super) fn paths() -> Map<String, Value> {
    let event = json!({ "type": "object", "required": ["seq", "sandbox", "at_ms", "kind", "detail"], "properties": {
        "seq": { "type": "integer", "minimum": 1, "description": "node-wide, durable, never reused; the SSE id" },
        "sandbox": { "type": "string" }, "at_ms": { "type": "number" },
        "kind": { "type": "string", "examples": ["reload", "unchanged", "abort", "rollback", "canary_rollback", "canary_passed", "crash", "app_stopped", "sandbox_created", "sandbox_deleted", "failed", "log_dropped"] },
        "detail": { "type": "object" } } });
    let filters = json!([
        query("sandbox", "only this sandbox's events; malformed: 400 invalid_input".into(), json!({ "type": "string" })),
        query("kind", format!("only these kinds (repeat or comma-separate; lowercase letters and `_`, at most {MAX_KIND_BYTES} bytes each, at most {MAX_KINDS} kinds): 400 bad_request otherwise"), json!({ "type": "string" })),
        query("after", "events after this seq; not a non-negative integer: 400 bad_request".into(), json!({ "type": "integer", "minimum": 0 })),
        query("tail", format!("the last N events (at most {KEEP_EVENTS}); default 100; with after: at most N events"), json!({ "type": "integer", "minimum": 0, "maximum": KEEP_EVENTS }))
    ]);
    props(json!({
        "/events": {
            "parameters": filters,
            "get": {
                "summary": "One page of node events (at most 1000), oldest first", "operationId": "nodeEvents",
                "responses": responses(("200", ok("events, a gap if some were pruned, and the highest readable seq", json!({ "type": "object", "properties": {
                    "events": { "type": "array", "items": event }, "last_seq": { "type": "integer" },
                    "gap": { "type": ["object", "null"], "properties": { "after": { "type": "integer" }, "up_to": { "type": "integer" } } } } }))), &[400, 500])
            }
        },
        "/events/stream": {
            "parameters": [
                query("sandbox", "only this sandbox's events; malformed: 400 invalid_input".into(), json!({ "type": "string" })),
                query("kind", format!("only these kinds (repeat or comma-separate; lowercase letters and `_`, at most {MAX_KIND_BYTES} bytes each, at most {MAX_KINDS} kinds): 400 bad_request otherwise"), json!({ "type": "string" })),
                query("after", "start after this seq (the Last-Event-ID header wins); not a non-negative integer: 400 bad_request".into(), json!({ "type": "integer", "minimum": 0 })),
                query("tail", format!("start with the last N events (at most {KEEP_EVENTS}); without after/tail/Last-Event-ID only new events are sent"), json!({ "type": "integer", "minimum": 0, "maximum": KEEP_EVENTS })),
                { "name": "Last-Event-ID", "in": "header", "required": false, "description": "resume after this seq, without loss or duplicates while the events are kept (they are durable with a data dir, so also across a restart)", "schema": { "type": "integer", "minimum": 0 } }
            ],
            "get": {
                "summary": "Every node event as Server-Sent Events", "operationId": "eventStream",
                "description": "Each frame: `id:` the event's seq, `data:` the event as JSON (no `event:` field). A reader whose position was pruned first gets `event: gap` with data {\"after\": A, \"up_to\": U} (events A < seq <= U matching its filters may be lost; its id is U). Idle streams get `:keep-alive` comments every 15 s. At most 512 streams are open at once on a node and 128 per token (`Live::set_stream_limits`); one more gets 429 too_many_streams with `limit`.",
                "responses": responses(("200", json!({ "description": "an endless event stream", "content": { "text/event-stream": { "schema": { "type": "string" }, "x-event-data": event } } })), &[400, 429, 500])
            }
        },
        "/sandboxes/{id}/tree": {
            "parameters": [id_param()],
            "get": {
                "summary": "The sandbox's supervision tree", "operationId": "supervisionTree",
                "responses": responses(("200", ok("supervisors and their children in start order", json!({ "type": "object", "properties": {
                    "roots": { "type": "array", "items": { "type": "string" }, "description": "pids of supervisors no other supervisor lists" },
                    "truncated": { "type": "boolean", "description": "more than 1000 supervisors: the rest were left out" },
                    "supervisors": { "type": "array", "items": { "type": "object", "properties": {
                        "pid": { "type": "string" }, "name": { "type": ["string", "null"] }, "module": { "type": "string" },
                        "strategy": { "type": "string" }, "intensity": { "type": "number" }, "period": { "type": "number" },
                        "recent_restarts": { "type": "integer", "description": "restarts within the intensity period" },
                        "children": { "type": "array", "items": { "type": "object", "properties": {
                            "id": {}, "module": { "type": "string" }, "pid": { "type": ["string", "null"] },
                            "running": { "type": "boolean" }, "restart": { "type": "string" }, "supervisor": { "type": "boolean" },
                            "restarts": { "type": "integer", "minimum": 0, "description": "times the supervisor started this child again (after its exit, or a sibling's under one_for_all / rest_for_one)" },
                            "crashes": { "type": "integer", "description": "crash events of this child's module in this sandbox among the kept events" } } } } } } } } }))), &errors(&[]))
            }
        }
    }))
}
