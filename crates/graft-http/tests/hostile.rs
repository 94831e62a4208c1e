//! Hostile requests (SPEC §7): each is answered with its exact status and
//! kind, and afterwards the node still lists its sandboxes and a bystander
//! sandbox still answers calls.

mod support;

use axum::http::{Method, StatusCode};
use graft::config::{
    MAX_CANARY_MS, MAX_HANDLER_MS, MAX_MAILBOX, MAX_PROCESSES, MAX_TIMEOUT_MS, MIN_SANDBOX_MEMORY,
};
use graft::NodeLimits;
use serde_json::{json, Value};
use support::{assert_error, counter_v, Api, COUNTER};

const BYSTANDER: &str = "bystander";

/// A router over a node with a 1 GiB memory cap and room for 3 sandboxes,
/// with the bystander's counter app running.
async fn node() -> Api {
    let api = Api::with_limits(NodeLimits {
        max_sandboxes: 3,
        max_sandbox_memory: 1 << 30,
        ..NodeLimits::default()
    });
    api.counter_app(BYSTANDER).await;
    api
}

/// The node lists its sandboxes and the bystander answers.
async fn assert_healthy(api: &Api) {
    let (s, list) = api.get("/api/v1/sandboxes").await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|sb| sb["id"] == BYSTANDER),
        "{list}"
    );
    let (s, v) = api.call(BYSTANDER, "counter", json!("inc")).await;
    assert_eq!(s, StatusCode::OK, "the bystander stopped answering: {v}");
    assert!(v["reply"].is_u64(), "{v}");
}

#[track_caller]
fn assert_out_of_range(resp: &(StatusCode, Value), field: &str, min: u64, max: u64) {
    assert_error(resp, StatusCode::UNPROCESSABLE_ENTITY, "limit_out_of_range");
    let e = &resp.1["error"];
    assert_eq!(e["field"], field, "{e}");
    assert_eq!(e["min"], min, "{e}");
    assert_eq!(e["max"], max, "{e}");
    assert!(e["value"].is_string(), "{e}");
}

/// Creates a sandbox with one limit set; it must be refused with its range.
async fn refused_limit(api: &Api, field: &str, value: Value, min: u64, max: u64) {
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "victim", "modules": { "counter": COUNTER }, "limits": { field: value } }),
        )
        .await;
    assert_out_of_range(&resp, field, min, max);
    assert_eq!(resp.1["error"]["value"], json!(value.to_string()));
    assert!(api.node.sandbox("victim").is_err(), "nothing was created");
    assert_healthy(api).await;
}

#[tokio::test]
async fn more_sandboxes_than_max_sandboxes_is_429_node_limit() {
    let api = node().await;
    for id in ["second", "third"] {
        api.counter_app(id).await;
    }
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "fourth", "modules": { "counter": COUNTER } }),
        )
        .await;
    assert_error(&resp, StatusCode::TOO_MANY_REQUESTS, "node_limit");
    assert_eq!(api.node.sandbox_ids().len(), 3);
    assert_healthy(&api).await;
    // room again once one is gone
    assert_eq!(
        api.delete("/api/v1/sandboxes/third").await.0,
        StatusCode::NO_CONTENT
    );
    api.counter_app("fourth").await;
    assert_healthy(&api).await;
}

#[tokio::test]
async fn memory_bytes_over_the_node_cap_is_limit_out_of_range() {
    let api = node().await;
    refused_limit(
        &api,
        "memory_bytes",
        json!(2_000_000_000u64),
        MIN_SANDBOX_MEMORY as u64,
        1 << 30,
    )
    .await;
}

#[tokio::test]
async fn memory_bytes_below_2_mib_is_limit_out_of_range() {
    let api = node().await;
    refused_limit(
        &api,
        "memory_bytes",
        json!(MIN_SANDBOX_MEMORY - 1),
        MIN_SANDBOX_MEMORY as u64,
        1 << 30,
    )
    .await;
}

#[tokio::test]
async fn handler_ms_zero_is_limit_out_of_range() {
    let api = node().await;
    refused_limit(&api, "handler_ms", json!(0), 1, MAX_HANDLER_MS).await;
}

#[tokio::test]
async fn handler_ms_over_a_minute_is_limit_out_of_range() {
    let api = node().await;
    refused_limit(&api, "handler_ms", json!(60_001), 1, MAX_HANDLER_MS).await;
}

#[tokio::test]
async fn max_processes_2_pow_21_is_limit_out_of_range() {
    let api = node().await;
    refused_limit(&api, "max_processes", json!(1u64 << 21), 1, MAX_PROCESSES).await;
}

#[tokio::test]
async fn max_mailbox_two_million_is_limit_out_of_range() {
    let api = node().await;
    refused_limit(&api, "max_mailbox", json!(2_000_000), 1, MAX_MAILBOX).await;
}

#[tokio::test]
async fn negative_and_huge_limits_are_limit_out_of_range_not_shape_errors() {
    let api = node().await;
    refused_limit(&api, "max_mailbox", json!(-1), 1, MAX_MAILBOX).await;
    refused_limit(&api, "max_mailbox", json!(1e30), 1, MAX_MAILBOX).await;
    // a fraction is a wrong type
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "victim", "modules": { "counter": COUNTER }, "limits": { "handler_ms": 2.5 } }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    assert_healthy(&api).await;
}

#[tokio::test]
async fn timeout_ms_over_five_minutes_is_limit_out_of_range() {
    let api = node().await;
    let url = format!("/api/v1/sandboxes/{BYSTANDER}");
    let call = api
        .post(
            &format!("{url}/call"),
            json!({ "to": "counter", "request": "inc", "timeout_ms": MAX_TIMEOUT_MS + 1 }),
        )
        .await;
    assert_out_of_range(&call, "timeout_ms", 1, MAX_TIMEOUT_MS);
    let eval = api
        .post(
            &format!("{url}/eval"),
            json!({ "source": "return 1", "timeout_ms": 3_600_000 }),
        )
        .await;
    assert_out_of_range(&eval, "timeout_ms", 1, MAX_TIMEOUT_MS);
    let (s, v) = api
        .post(
            &format!("{url}/call"),
            json!({ "to": "counter", "request": "inc", "timeout_ms": MAX_TIMEOUT_MS }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "the largest timeout is accepted: {v}");
    assert_healthy(&api).await;
}

#[tokio::test]
async fn timeout_ms_null_is_the_default_as_the_document_says() {
    let api = node().await;
    let doc = graft_http::openapi_document();
    let schema = &doc["components"]["schemas"]["Call"]["properties"]["timeout_ms"];
    assert_eq!(schema["type"], json!(["integer", "null"]), "{schema}");
    assert_eq!(schema["default"], graft_http::DEFAULT_TIMEOUT_MS);
    let (s, v) = api
        .post(
            &format!("/api/v1/sandboxes/{BYSTANDER}/call"),
            json!({ "to": "counter", "request": "inc", "timeout_ms": null }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_healthy(&api).await;
}

#[tokio::test]
async fn canary_ms_over_an_hour_is_limit_out_of_range() {
    let api = node().await;
    let resp = api
        .post(
            &format!("/api/v1/sandboxes/{BYSTANDER}/reload"),
            json!({ "modules": { "counter": counter_v(2) }, "canary_ms": MAX_CANARY_MS + 1 }),
        )
        .await;
    assert_out_of_range(&resp, "canary_ms", 0, MAX_CANARY_MS);
    let (_, v) = api.call(BYSTANDER, "counter", json!("inc")).await;
    let (_, w) = api.call(BYSTANDER, "counter", json!("inc")).await;
    assert_eq!(
        w["reply"].as_u64().unwrap() - v["reply"].as_u64().unwrap(),
        1,
        "nothing was reloaded"
    );
    assert_healthy(&api).await;
}

#[tokio::test]
async fn canary_crashes_zero_or_huge_is_limit_out_of_range() {
    let api = node().await;
    let max = graft_http::bounds::MAX_CANARY_CRASHES;
    for crashes in [json!(0), json!(max + 1), json!(1u64 << 40), json!(-3)] {
        let resp = api
            .post(
                &format!("/api/v1/sandboxes/{BYSTANDER}/reload"),
                json!({ "modules": { "counter": counter_v(2) }, "canary_ms": 100, "canary_crashes": crashes }),
            )
            .await;
        assert_out_of_range(&resp, "canary_crashes", 1, max);
        let batch = api
            .post(
                "/api/v1/reload",
                json!({ "sandboxes": [BYSTANDER], "modules": { "counter": counter_v(2) }, "canary_crashes": crashes }),
            )
            .await;
        assert_out_of_range(&batch, "canary_crashes", 1, max);
    }
    assert_healthy(&api).await;
}

#[tokio::test]
async fn a_batch_naming_a_sandbox_twice_is_422_duplicate_sandbox() {
    let api = node().await;
    api.counter_app("other").await;
    let resp = api
        .post(
            "/api/v1/reload",
            json!({ "sandboxes": ["other", BYSTANDER, "other"], "modules": { "counter": counter_v(5) } }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "duplicate_sandbox");
    assert_eq!(resp.1["error"]["sandbox"], "other");
    // refused as a whole: nothing was reloaded anywhere
    for id in ["other", BYSTANDER] {
        let (s, v) = api
            .get(&format!("/api/v1/sandboxes/{id}/modules/counter/versions"))
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v.as_array().unwrap().len(), 1, "{id}: {v}");
    }
    assert_healthy(&api).await;
}

#[tokio::test]
async fn a_batch_over_max_sandboxes_is_limit_out_of_range() {
    let api = node().await;
    let ids: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    let resp = api
        .post(
            "/api/v1/reload",
            json!({ "sandboxes": ids, "modules": { "counter": COUNTER } }),
        )
        .await;
    assert_out_of_range(&resp, "sandboxes", 0, 3);
    assert_healthy(&api).await;
}

#[tokio::test]
async fn a_batch_with_a_malformed_id_is_invalid_input() {
    let api = node().await;
    let resp = api
        .post(
            "/api/v1/reload",
            json!({ "sandboxes": [BYSTANDER, "../etc"], "modules": { "counter": COUNTER } }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    let resp = api
        .post(
            "/api/v1/reload",
            json!({ "sandboxes": [BYSTANDER], "modules": { "bad name": COUNTER } }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    assert_healthy(&api).await;
}

#[tokio::test]
async fn max_concurrency_out_of_range_is_limit_out_of_range() {
    let api = node().await;
    for n in [json!(0), json!(4), json!(u64::MAX)] {
        let resp = api
            .post(
                "/api/v1/reload",
                json!({ "sandboxes": [BYSTANDER], "modules": { "counter": COUNTER }, "max_concurrency": n }),
            )
            .await;
        assert_out_of_range(&resp, "max_concurrency", 1, 3);
    }
    assert_healthy(&api).await;
}

#[tokio::test]
async fn a_rollback_version_past_u32_is_limit_out_of_range() {
    let api = node().await;
    let resp = api
        .post(
            &format!("/api/v1/sandboxes/{BYSTANDER}/modules/counter/rollback"),
            json!({ "version": 1u64 << 32 }),
        )
        .await;
    assert_out_of_range(&resp, "version", 1, u64::from(u32::MAX));
    assert_healthy(&api).await;
}

#[tokio::test]
async fn events_since_out_of_range_is_422_and_not_a_number_is_400() {
    let api = node().await;
    let events = |q: &str| format!("/api/v1/sandboxes/{BYSTANDER}/events?since={q}");
    let max = (1u64 << 53) - 1;
    for huge in [
        u64::MAX.to_string(),
        (max + 1).to_string(),
        "-1".into(),
        "-9223372036854775809".into(),
        "1e30".into(),
        "99999999999999999999999999".into(),
    ] {
        assert_out_of_range(&api.get(&events(&huge)).await, "since", 0, max);
    }
    for junk in ["", "x", "1.5", "0x10", "%31", "1;2", "null"] {
        assert_error(
            &api.get(&events(junk)).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
    assert_error(
        &api.get(&format!("/api/v1/sandboxes/{BYSTANDER}/events?after=1"))
            .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    // At the bound: a valid question with an empty answer.
    let (s, none) = api.get(&events(&max.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{none}");
    assert_eq!(none, json!([]));
    let (s, all) = api.get(&events("0")).await;
    assert_eq!(s, StatusCode::OK, "{all}");
    let (_, plain) = api
        .get(&format!("/api/v1/sandboxes/{BYSTANDER}/events"))
        .await;
    assert_eq!(all, plain);
    assert_healthy(&api).await;
}

#[tokio::test]
async fn spawn_names_that_read_as_pids_or_serials_are_badarg() {
    let api = node().await;
    let long = "n".repeat(65);
    for name in ["", "42", "<counter.1>", long.as_str()] {
        let resp = api
            .post(
                &format!("/api/v1/sandboxes/{BYSTANDER}/spawn"),
                json!({ "module": "counter", "name": name }),
            )
            .await;
        assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "badarg");
    }
    let resp = api
        .post(
            &format!("/api/v1/sandboxes/{BYSTANDER}/spawn"),
            json!({ "module": "not a module" }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    assert_healthy(&api).await;
}

#[tokio::test]
async fn a_malformed_module_in_the_path_is_400() {
    let api = node().await;
    let resp = api
        .get(&format!(
            "/api/v1/sandboxes/{BYSTANDER}/modules/a%20b/versions"
        ))
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_input");
    assert_healthy(&api).await;
}

#[tokio::test]
async fn a_deeply_nested_body_is_400_too_deep() {
    let api = node().await;
    let url = format!("/api/v1/sandboxes/{BYSTANDER}/call");
    // a million brackets: refused before the parser recurses
    let brackets = format!(
        "{{\"to\": \"counter\", \"request\": {}",
        "[".repeat(1_000_000)
    );
    let resp = api.raw(Method::POST, &url, brackets.into_bytes()).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "too_deep");
    assert_eq!(resp.1["error"]["max_depth"], graft::value::MAX_DEPTH);
    // well-formed objects, one level too deep
    let mut deep = json!(1);
    for _ in 0..graft::value::MAX_DEPTH {
        deep = json!({ "a": deep });
    }
    let resp = api
        .post(&url, json!({ "to": "counter", "request": deep }))
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "too_deep");
    // brackets inside strings are text, not nesting
    let resp = api
        .post(
            &url,
            json!({ "to": "counter", "request": "[".repeat(10_000) }),
        )
        .await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    assert_healthy(&api).await;
}

#[tokio::test]
async fn an_oversize_body_is_413() {
    let api = node().await;
    let big = vec![b' '; graft_http::MAX_BODY_BYTES + 1];
    let resp = api
        .raw(
            Method::POST,
            &format!("/api/v1/sandboxes/{BYSTANDER}/cast"),
            big,
        )
        .await;
    assert_error(&resp, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    assert_eq!(resp.1["error"]["limit_bytes"], graft_http::MAX_BODY_BYTES);
    assert_healthy(&api).await;
}

#[tokio::test]
async fn a_full_database_is_507_and_the_running_version_stays() {
    let node = graft::Node::builder()
        .threads(2)
        .ephemeral()
        .checkpoint_ms(0)
        .max_database_bytes(256 * 1024)
        .open()
        .expect("node");
    let api = Api::with_node(node);
    api.counter_app(BYSTANDER).await;
    api.counter_app("full").await;
    let huge = format!("{}\n-- {}", counter_v(5), "x".repeat(400 * 1024));
    let resp = api
        .post(
            "/api/v1/sandboxes/full/reload",
            json!({ "modules": { "counter": huge } }),
        )
        .await;
    assert_eq!(resp.0, StatusCode::INSUFFICIENT_STORAGE, "{}", resp.1);
    assert_eq!(resp.1["error"]["kind"], "storage_full", "{}", resp.1);
    // Nothing was applied: still version 1, counting by 1.
    let (_, modules) = api.get("/api/v1/sandboxes/full/modules").await;
    assert_eq!(modules[0]["version"], 1, "{modules}");
    let first = api.call("full", "counter", json!("inc")).await;
    let second = api.call("full", "counter", json!("inc")).await;
    assert_eq!(
        second.1["reply"].as_i64().unwrap() - first.1["reply"].as_i64().unwrap(),
        1,
        "{first:?} {second:?}"
    );
    assert_healthy(&api).await;
}
