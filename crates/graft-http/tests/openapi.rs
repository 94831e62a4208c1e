//! The OpenAPI document agrees with the server: it states the limits of
//! SPEC §7 with their exact bounds, and requests generated from it (its
//! examples, and those examples pushed past each stated bound) get the answer
//! it promises.

mod support;

use axum::http::{Method, StatusCode};
use graft::config::{
    MAX_CANARY_MS, MAX_HANDLER_MS, MAX_MAILBOX, MAX_PROCESSES, MAX_TIMEOUT_MS, MIN_SANDBOX_MEMORY,
};
use graft::NodeLimits;
use serde_json::{json, Value};
use support::Api;

/// Small caps, so that the document's node-dependent bounds are visibly the node's.
fn caps() -> NodeLimits {
    NodeLimits {
        max_sandbox_memory: 256 << 20,
        max_sandboxes: 4,
        max_value_bytes: 1 << 20,
        max_events: 100,
        ..NodeLimits::default()
    }
}

async fn document(api: &Api) -> Value {
    let (s, doc) = api.get("/api/v1/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    doc
}

#[track_caller]
fn assert_range(schema: &Value, min: u64, max: u64) {
    assert_eq!(schema["minimum"], json!(min), "{schema}");
    assert_eq!(schema["maximum"], json!(max), "{schema}");
    let types = &schema["type"];
    assert!(
        types == "integer"
            || types
                .as_array()
                .is_some_and(|t| t.contains(&json!("integer"))),
        "{schema}"
    );
}

#[tokio::test]
async fn every_limit_of_spec_7_is_stated_with_its_bounds() {
    let api = Api::with_limits(caps());
    let doc = document(&api).await;
    let schemas = &doc["components"]["schemas"];
    let limits = &schemas["Limits"]["properties"];
    assert_range(
        &limits["memory_bytes"],
        MIN_SANDBOX_MEMORY as u64,
        caps().max_sandbox_memory as u64,
    );
    assert_range(&limits["handler_ms"], 1, MAX_HANDLER_MS);
    assert_range(&limits["max_processes"], 1, MAX_PROCESSES);
    assert_range(&limits["max_mailbox"], 1, MAX_MAILBOX);
    assert_eq!(schemas["Limits"]["additionalProperties"], false);
    for op in ["Call", "Eval"] {
        assert_range(&schemas[op]["properties"]["timeout_ms"], 1, MAX_TIMEOUT_MS);
    }
    for op in ["Reload", "BatchReload"] {
        let p = &schemas[op]["properties"];
        assert_range(&p["canary_ms"], 0, MAX_CANARY_MS);
        assert_range(
            &p["canary_crashes"],
            1,
            graft_http::bounds::MAX_CANARY_CRASHES,
        );
    }
    let batch = &schemas["BatchReload"]["properties"];
    assert_range(&batch["max_concurrency"], 1, caps().max_sandboxes as u64);
    assert_eq!(batch["sandboxes"]["maxItems"], caps().max_sandboxes);
    assert_eq!(batch["sandboxes"]["uniqueItems"], true);
    let id = "^[a-z0-9][a-z0-9_-]{0,63}$";
    assert_eq!(schemas["CreateSandbox"]["properties"]["id"]["pattern"], id);
    assert_eq!(batch["sandboxes"]["items"]["pattern"], id);
    assert!(schemas["Sources"]["propertyNames"]["pattern"].is_string());
    // the default document is the default caps'
    let default = graft_http::openapi_document();
    assert_range(
        &default["components"]["schemas"]["Limits"]["properties"]["memory_bytes"],
        MIN_SANDBOX_MEMORY as u64,
        NodeLimits::default().max_sandbox_memory as u64,
    );
}

#[tokio::test]
async fn every_error_answer_lists_the_kinds_of_its_status() {
    let api = Api::new();
    let doc = document(&api).await;
    let schemas = &doc["components"]["schemas"];
    let all = schemas["Error"]["properties"]["error"]["properties"]["kind"]["enum"].clone();
    for k in graft_http::KINDS {
        assert!(
            all.as_array().unwrap().contains(&json!(k.kind)),
            "{}",
            k.kind
        );
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(responses) = op["responses"].as_object() else {
                continue;
            };
            for (status, resp) in responses {
                let code: u16 = status.parse().unwrap();
                if code < 400 {
                    continue;
                }
                let schema = &resp["content"]["application/json"]["schema"]["$ref"];
                let name = format!("#/components/schemas/Error{code}");
                assert_eq!(schema, &json!(name), "{method} {path} {status}");
                let kinds = &schemas[format!("Error{code}")]["properties"]["error"]["properties"]
                    ["kind"]["enum"];
                assert_eq!(
                    kinds,
                    &json!(graft_http::kinds_of(code)),
                    "{method} {path} {status}"
                );
            }
        }
    }
}

#[test]
fn every_kind_is_in_the_docs() {
    let docs = include_str!("../../../docs/http-and-cli.md");
    for k in graft_http::KINDS {
        assert!(
            docs.contains(&format!("`{}`", k.kind)),
            "docs/http-and-cli.md does not mention `{}`",
            k.kind
        );
    }
}

// ---------------------------------------------------------------------------
// Requests generated from the document

/// One step into a body: a property, or the first item of an array.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    First,
}

/// A constraint stated at some place in a request body.
#[derive(Debug)]
enum Rule {
    Int { min: u64, max: u64 },
    MinLength(u64),
    MaxLength(u64),
    MaxItems(u64),
    UniqueItems,
    KeyMaxLength(u64),
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

fn has_type(schema: &Value, t: &str) -> bool {
    match &schema["type"] {
        Value::String(s) => s == t,
        Value::Array(a) => a.contains(&json!(t)),
        _ => false,
    }
}

/// Every constraint a body schema states, with where it applies.
fn rules(doc: &Value, schema: &Value, at: &[Seg], out: &mut Vec<(Vec<Seg>, Rule)>) {
    let schema = resolve(doc, schema);
    for alt in ["anyOf", "oneOf"] {
        for branch in schema[alt].as_array().into_iter().flatten() {
            rules(doc, branch, at, out);
        }
    }
    let num = |k: &str| schema[k].as_u64();
    let mut here = Vec::new();
    let mut push = |rule| here.push((at.to_vec(), rule));
    if has_type(schema, "integer") {
        if let (Some(min), Some(max)) = (num("minimum"), num("maximum")) {
            push(Rule::Int { min, max });
        }
    }
    if has_type(schema, "string") {
        if let Some(n) = num("minLength").filter(|n| *n > 0) {
            push(Rule::MinLength(n));
        }
        if let Some(n) = num("maxLength") {
            push(Rule::MaxLength(n));
        }
    }
    if has_type(schema, "array") {
        if let Some(n) = num("maxItems") {
            push(Rule::MaxItems(n));
        }
        if schema["uniqueItems"] == true {
            push(Rule::UniqueItems);
        }
    }
    if has_type(schema, "object") {
        if let Some(n) = resolve(doc, &schema["propertyNames"])["maxLength"].as_u64() {
            push(Rule::KeyMaxLength(n));
        }
    }
    out.append(&mut here);
    if has_type(schema, "array") {
        let mut inner = at.to_vec();
        inner.push(Seg::First);
        rules(doc, &schema["items"], &inner, out);
    }
    if has_type(schema, "object") {
        for (k, sub) in schema["properties"].as_object().into_iter().flatten() {
            let mut inner = at.to_vec();
            inner.push(Seg::Key(k.clone()));
            rules(doc, sub, &inner, out);
        }
    }
}

/// The place `at` in `body`, made if missing.
fn place<'a>(body: &'a mut Value, at: &[Seg]) -> &'a mut Value {
    let mut cur = body;
    for seg in at {
        cur = match seg {
            Seg::Key(k) => {
                if !cur.is_object() {
                    *cur = json!({});
                }
                cur.as_object_mut()
                    .unwrap()
                    .entry(k.clone())
                    .or_insert(Value::Null)
            }
            Seg::First => {
                if cur.as_array().is_none_or(|a| a.is_empty()) {
                    *cur = json!([Value::Null]);
                }
                &mut cur.as_array_mut().unwrap()[0]
            }
        };
    }
    cur
}

fn with_value(example: &Value, at: &[Seg], v: Value) -> Value {
    let mut body = example.clone();
    *place(&mut body, at) = v;
    body
}

/// Bodies that break `rule` (each must be refused with 422), and bodies at
/// its edges (each must pass the shape and range checks).
fn violations_and_edges(example: &Value, at: &[Seg], rule: &Rule) -> (Vec<Value>, Vec<Value>) {
    let current = {
        let mut e = example.clone();
        place(&mut e, at).clone()
    };
    let long = |n: u64| json!("a".repeat(n as usize + 1));
    match *rule {
        Rule::Int { min, max } => {
            let below = if min == 0 { json!(-1) } else { json!(min - 1) };
            (
                vec![
                    with_value(example, at, below),
                    with_value(example, at, json!(max + 1)),
                ],
                vec![
                    with_value(example, at, json!(min)),
                    with_value(example, at, json!(max)),
                ],
            )
        }
        Rule::MinLength(n) => {
            let short = "a".repeat(n as usize - 1);
            (vec![with_value(example, at, json!(short))], vec![])
        }
        Rule::MaxLength(n) => (vec![with_value(example, at, long(n))], vec![]),
        Rule::MaxItems(n) => {
            let first = current[0].as_str().unwrap_or("x").to_owned();
            let items: Vec<Value> = (0..=n).map(|i| json!(format!("{first}-{i}"))).collect();
            (vec![with_value(example, at, json!(items))], vec![])
        }
        Rule::UniqueItems => {
            let first = current[0].clone();
            (vec![with_value(example, at, json!([first, first]))], vec![])
        }
        Rule::KeyMaxLength(n) => {
            let mut v = current.clone();
            let any = v.as_object().and_then(|m| m.values().next().cloned());
            let key = "a".repeat(n as usize + 1);
            v.as_object_mut()
                .unwrap()
                .insert(key, any.unwrap_or(Value::Null));
            (vec![with_value(example, at, v)], vec![])
        }
    }
}

/// The example with every optional field absent, and with every nullable
/// field `null`: both valid by the document.
fn lean_variants(doc: &Value, schema: &Value, example: &Value) -> Vec<Value> {
    let schema = resolve(doc, schema);
    let required: Vec<&Value> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let mut absent = example.clone();
    let mut nulls = example.clone();
    for (k, sub) in schema["properties"].as_object().into_iter().flatten() {
        if required.contains(&&json!(k)) {
            continue;
        }
        absent.as_object_mut().unwrap().remove(k);
        let sub = resolve(doc, sub);
        let nullable = has_type(sub, "null")
            || sub["anyOf"]
                .as_array()
                .is_some_and(|a| a.contains(&json!({ "type": "null" })));
        if nullable {
            nulls[k] = Value::Null;
        }
    }
    vec![absent, nulls]
}

struct Operation {
    method: Method,
    uri: String,
    /// The body's schema and example (`None`: no body).
    body: Option<(Value, Value)>,
    responses: Value,
}

/// Every operation, path parameters filled with their examples: the
/// creating one first, the destroying one last.
fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let mut uri = format!("/api/v1{path}");
        let params = item["parameters"].as_array().into_iter().flatten();
        for p in params.filter(|p| p["in"] == "path") {
            let example = p["example"]
                .as_str()
                .expect("path parameters have examples");
            uri = uri.replace(&format!("{{{}}}", p["name"].as_str().unwrap()), example);
        }
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let media = &op["requestBody"]["content"]["application/json"];
            out.push(Operation {
                method: method.to_uppercase().parse().unwrap(),
                uri: uri.clone(),
                body: (!media.is_null())
                    .then(|| (media["schema"].clone(), media["example"].clone())),
                responses: op["responses"].clone(),
            });
        }
    }
    out.sort_by_key(|op| match (&op.method, op.uri.as_str()) {
        (&Method::POST, "/api/v1/sandboxes") => 0,
        (&Method::DELETE, _) => 2,
        _ => 1,
    });
    out
}

async fn send(api: &Api, op: &Operation, body: &Value) -> (StatusCode, Value) {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).unwrap()
    };
    let resp = api.raw(op.method.clone(), &op.uri, bytes).await;
    let status = resp.0.as_str().to_owned();
    assert!(
        resp.0.is_success() || op.responses.get(&status).is_some(),
        "{} {} answered {status}, which the document does not list: {}",
        op.method,
        op.uri,
        resp.1
    );
    resp
}

/// Sends the example, the lean variants and every violation and edge of
/// one operation with a body; the number of violations checked.
async fn exercise(
    api: &Api,
    doc: &Value,
    op: &Operation,
    schema: &Value,
    example: &Value,
) -> usize {
    let what = format!("{} {}", op.method, op.uri);
    let (s, v) = send(api, op, example).await;
    assert!(s.is_success(), "{what}: the example was refused: {s} {v}");
    for body in lean_variants(doc, schema, example) {
        let (s, v) = send(api, op, &body).await;
        assert!(
            s != StatusCode::BAD_REQUEST && s != StatusCode::UNPROCESSABLE_ENTITY,
            "{what}: valid by the document but refused: {body}\n{s} {v}"
        );
    }
    let mut found = Vec::new();
    rules(doc, schema, &[], &mut found);
    let mut checked = 0;
    for (at, rule) in &found {
        let (bad, edges) = violations_and_edges(example, at, rule);
        for body in bad {
            let resp = send(api, op, &body).await;
            assert_refused(&what, at, rule, &resp);
            checked += 1;
        }
        for body in edges {
            let (s, v) = send(api, op, &body).await;
            assert!(
                s != StatusCode::BAD_REQUEST && s != StatusCode::UNPROCESSABLE_ENTITY,
                "{what}: {rule:?} at {at:?}: an edge value was refused: {s} {v}"
            );
        }
    }
    checked
}

#[track_caller]
fn assert_refused(what: &str, at: &[Seg], rule: &Rule, resp: &(StatusCode, Value)) {
    let e = &resp.1["error"];
    assert_eq!(
        resp.0,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{what}: {rule:?} at {at:?} broken but not refused: {}",
        resp.1
    );
    let kind = e["kind"].as_str().unwrap();
    assert!(graft_http::kinds_of(422).contains(&kind), "{kind}");
    let Some(Seg::Key(field)) = at.last() else {
        return;
    };
    match rule {
        Rule::Int { min, max } => {
            assert_eq!(kind, "limit_out_of_range", "{what}: {}", resp.1);
            assert_eq!(
                (&e["field"], &e["min"], &e["max"]),
                (&json!(field), &json!(min), &json!(max)),
                "{what}: {}",
                resp.1
            );
        }
        Rule::MaxItems(n) => {
            assert_eq!(kind, "limit_out_of_range", "{what}: {}", resp.1);
            assert_eq!((&e["field"], &e["max"]), (&json!(field), &json!(n)));
        }
        Rule::UniqueItems => assert_eq!(kind, "duplicate_sandbox", "{}", resp.1),
        _ => {}
    }
}

#[tokio::test]
async fn requests_generated_from_the_document_get_the_answers_it_promises() {
    let api = Api::with_limits(caps());
    let doc = document(&api).await;
    let ops = operations(&doc);
    assert_eq!(ops.iter().filter(|op| op.body.is_some()).count(), 11);
    let mut checked = 0;
    // An event stream never ends: tests/live.rs reads it frame by frame.
    for op in ops.iter().filter(|op| !op.uri.contains("/events/stream")) {
        match &op.body {
            // The sign-in's example token is a placeholder: sign in with a live one.
            Some((schema, _)) if op.uri == "/api/v1/session" => {
                let example = json!({ "token": api.admin });
                checked += exercise(&api, &doc, op, schema, &example).await;
            }
            Some((schema, example)) => checked += exercise(&api, &doc, op, schema, example).await,
            None if op.method == Method::DELETE => {}
            None => {
                let (s, v) = send(&api, op, &Value::Null).await;
                assert!(s.is_success(), "{} {}: {s} {v}", op.method, op.uri);
            }
        }
    }
    // every limit, timeout, canary, batch, length and name rule was exercised
    assert!(checked >= 40, "only {checked} violations generated");
    // the node is intact: the example sandbox still answers, then goes
    let (s, v) = api.call("demo", "counter", json!("inc")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for op in ops.iter().filter(|op| op.method == Method::DELETE) {
        let (s, v) = send(&api, op, &Value::Null).await;
        if op.uri.starts_with("/api/v1/tokens/") {
            // The example id names no token.
            assert_eq!(s, StatusCode::NOT_FOUND, "{} {}: {v}", op.method, op.uri);
            continue;
        }
        assert_eq!(s, StatusCode::NO_CONTENT, "{} {}: {v}", op.method, op.uri);
    }
    assert_eq!(api.node.sandbox_ids(), Vec::<String>::new());
}
