//! Every endpoint and every error status of the HTTP API, through
//! `tower::ServiceExt::oneshot` (no sockets).

mod support;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::{assert_error, counter_v, nested, Api, APP, COUNTER};
use tower::ServiceExt;

#[tokio::test]
async fn health() {
    let api = Api::new();
    let (s, v) = api.get("/api/v1/health").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "ok");
}

#[tokio::test]
async fn openapi_lists_every_path_and_method() {
    let api = Api::new();
    let (s, doc) = api.get("/api/v1/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let expected: &[(&str, &[&str])] = &[
        ("/health", &["get"]),
        ("/openapi.json", &["get"]),
        ("/sandboxes", &["get", "post"]),
        ("/sandboxes/{id}", &["get", "delete"]),
        ("/sandboxes/{id}/restart", &["post"]),
        ("/sandboxes/{id}/processes", &["get"]),
        ("/sandboxes/{id}/processes/{target}/state", &["get"]),
        ("/sandboxes/{id}/call", &["post"]),
        ("/sandboxes/{id}/cast", &["post"]),
        ("/sandboxes/{id}/send", &["post"]),
        ("/sandboxes/{id}/spawn", &["post"]),
        ("/sandboxes/{id}/modules", &["get"]),
        ("/sandboxes/{id}/modules/{module}/versions", &["get"]),
        ("/sandboxes/{id}/modules/{module}/rollback", &["post"]),
        ("/sandboxes/{id}/reload", &["post"]),
        ("/sandboxes/{id}/eval", &["post"]),
        ("/sandboxes/{id}/events", &["get"]),
        ("/reload", &["post"]),
        ("/tokens", &["get", "post"]),
        ("/tokens/{token}", &["delete"]),
        ("/audit", &["get"]),
        ("/session", &["get", "post", "delete"]),
        ("/events", &["get"]),
        ("/events/stream", &["get"]),
        ("/sandboxes/{id}/tree", &["get"]),
    ];
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(
        paths.len(),
        expected.len(),
        "{:?}",
        paths.keys().collect::<Vec<_>>()
    );
    for (path, methods) in expected {
        let item = paths.get(*path).unwrap_or_else(|| panic!("{path} missing"));
        for m in *methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing");
            assert!(
                item[*m]["responses"].is_object(),
                "{m} {path} has no responses"
            );
        }
        for m in ["get", "post", "put", "delete", "patch"] {
            if item.get(m).is_some() {
                assert!(methods.contains(&m), "{m} {path} documented but not routed");
            }
        }
    }
    // every $ref resolves
    let text = doc.to_string();
    for part in text.split("#/components/schemas/").skip(1) {
        let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
        assert!(
            doc["components"]["schemas"].get(&name).is_some(),
            "dangling $ref {name}"
        );
    }
}

#[tokio::test]
async fn unknown_route_and_wrong_method() {
    let api = Api::new();
    assert_error(
        &api.get("/api/v1/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.delete("/api/v1/health").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn create_list_info_delete() {
    let api = Api::new();
    let (s, v) = api.get("/api/v1/sandboxes").await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));

    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/sandboxes")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, api.bearer())
        .body(Body::from(
            json!({ "id": "one", "modules": { "app": APP, "counter": COUNTER } }).to_string(),
        ))
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()[header::LOCATION], "/api/v1/sandboxes/one");
    let info: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(info["id"], "one");
    assert_eq!(info["status"], "running");
    assert_eq!(info["entry"], "app");
    assert_eq!(info["app"]["state"], "running");
    assert_eq!(info["module_count"], 2);
    assert_eq!(info["process_count"], 2, "{info}");

    // no `app` module and no entry: no app
    let (s, v) = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "two", "modules": { "counter": COUNTER } }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["entry"], Value::Null);
    assert_eq!(v["app"]["state"], "none");

    let (s, v) = api.get("/api/v1/sandboxes").await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["one", "two"]);

    let (s, v) = api.get("/api/v1/sandboxes/one").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["id"], "one");
    assert_eq!(v["limits"]["max_versions"], 10);

    let (s, v) = api.delete("/api/v1/sandboxes/one").await;
    assert_eq!((s, v), (StatusCode::NO_CONTENT, Value::Null));
    assert_error(
        &api.get("/api/v1/sandboxes/one").await,
        StatusCode::NOT_FOUND,
        "no_sandbox",
    );
    let gone = api.delete("/api/v1/sandboxes/one").await;
    assert_error(&gone, StatusCode::NOT_FOUND, "no_sandbox");
    assert_eq!(gone.1["error"]["sandbox"], "one");
    assert_eq!(api.node.sandbox_ids(), ["two"]);
}

#[tokio::test]
async fn create_errors() {
    let api = Api::new();
    api.counter_app("dup").await;
    let dup = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "dup", "modules": { "counter": COUNTER } }),
        )
        .await;
    assert_error(&dup, StatusCode::CONFLICT, "sandbox_exists");

    let bad_id = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "Bad/Id", "modules": { "counter": COUNTER } }),
        )
        .await;
    assert_error(&bad_id, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    assert!(bad_id.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid sandbox id"));

    // a compile error names module, line and column
    let broken = "local m = {}\nfunction m.init() return {} end\nlocal x = = 1\nreturn m\n";
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "broken", "modules": { "m": broken } }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "compile_error");
    let e = &resp.1["error"];
    assert_eq!(e["module"], "m");
    assert_eq!(e["line"], 3, "{e}");
    assert!(e["column"].as_u64().unwrap() >= 1, "{e}");
    assert!(e["frame"].as_str().unwrap().contains('^'), "{e}");
    assert!(!e["diagnostics"].as_array().unwrap().is_empty());
    assert!(
        api.node.sandbox_ids() == ["dup"],
        "a failed create leaves nothing behind"
    );

    let entry = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "e", "modules": { "counter": COUNTER }, "entry": "main" }),
        )
        .await;
    assert_error(&entry, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    let limits = api
        .post("/api/v1/sandboxes", json!({ "id": "l", "modules": { "counter": COUNTER }, "limits": { "memory_bytes": 10 } }))
        .await;
    assert_error(
        &limits,
        StatusCode::UNPROCESSABLE_ENTITY,
        "limit_out_of_range",
    );
    assert_eq!(limits.1["error"]["field"], "memory_bytes");
    let empty = api
        .post("/api/v1/sandboxes", json!({ "id": "n", "modules": {} }))
        .await;
    assert_error(&empty, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    let nodir = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "n", "modules": "/definitely/not/here" }),
        )
        .await;
    // A path outside --projects-root (here: the node has none) is refused
    // before anything is looked at (tests/trust.rs has the rest).
    assert_error(&nodir, StatusCode::FORBIDDEN, "path_forbidden");

    // malformed and badly shaped bodies are 400
    let resp = api
        .raw(Method::POST, "/api/v1/sandboxes", b"{\"id\": ".to_vec())
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "malformed_json");
    let resp = api
        .post("/api/v1/sandboxes", json!({ "modules": {} }))
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing field `id`"),
        "{}",
        resp.1
    );
    let resp = api
        .post("/api/v1/sandboxes", json!({ "id": "x", "modules": 5 }))
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "x", "modules": { "m": 5 } }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "x", "modules": { "counter": COUNTER }, "limits": { "handler": 5 } }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "x", "modules": { "counter": COUNTER }, "bogus": 1 }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");

    // nesting deeper than 64 is refused before it reaches a sandbox
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "x", "modules": nested(70) }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "too_deep");
    let resp = api
        .raw(
            Method::POST,
            "/api/v1/sandboxes",
            "[".repeat(5000).into_bytes(),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "too_deep");

    // bodies over 1 MiB are 413
    let big = "x".repeat(graft_http::MAX_BODY_BYTES + 10);
    let resp = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "big", "modules": { "m": big } }),
        )
        .await;
    assert_error(&resp, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
}

#[tokio::test]
async fn create_from_a_path() {
    let dir = std::env::temp_dir().join(format!("graft-http-path-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("src/lib")).unwrap();
    let api = Api::with(
        graft::NodeLimits::default(),
        graft_http::trust::TrustConfig {
            projects_roots: vec![dir.clone()],
            ..Default::default()
        },
    );
    std::fs::write(dir.join("src/app.luau"), APP).unwrap();
    std::fs::write(dir.join("src/counter.luau"), COUNTER).unwrap();
    std::fs::write(
        dir.join("src/lib/util.luau"),
        "return { twice = function(x) return 2 * x end }",
    )
    .unwrap();
    let (s, v) = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "fromdir", "modules": dir.to_str().unwrap() }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["module_count"], 3);
    assert_eq!(v["entry"], "app");
    let (_, mods) = api.get("/api/v1/sandboxes/fromdir/modules").await;
    let names: Vec<&str> = mods
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app", "counter", "lib.util"]);

    // a project directory: graft.toml gives entry and limits, the body the id
    std::fs::write(
        dir.join("graft.toml"),
        "[sandbox]\nid = \"ignored\"\n[limits]\nhandler_ms = 250\n",
    )
    .unwrap();
    let (s, v) = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "project", "modules": dir.to_str().unwrap() }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["id"], "project");
    assert_eq!(v["limits"]["handler_ms"], 250);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn path_ids_are_validated_and_unknown_sandboxes_are_404_everywhere() {
    let api = Api::new();
    assert_error(
        &api.get("/api/v1/sandboxes/NOPE").await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    let gets = [
        "",
        "/processes",
        "/processes/counter/state",
        "/modules",
        "/modules/counter/versions",
        "/events",
    ];
    for suffix in gets {
        let resp = api.get(&format!("/api/v1/sandboxes/ghost{suffix}")).await;
        assert_error(&resp, StatusCode::NOT_FOUND, "no_sandbox");
    }
    let posts = [
        ("/restart", json!({})),
        ("/call", json!({ "to": "counter" })),
        ("/cast", json!({ "to": "counter", "message": 1 })),
        ("/send", json!({ "to": "counter", "message": 1 })),
        ("/spawn", json!({ "module": "counter" })),
        ("/reload", json!({ "modules": { "counter": COUNTER } })),
        ("/modules/counter/rollback", json!({ "version": 1 })),
        ("/eval", json!({ "source": "return 1" })),
    ];
    for (suffix, body) in posts {
        let resp = api
            .post(&format!("/api/v1/sandboxes/ghost{suffix}"), body)
            .await;
        assert_error(&resp, StatusCode::NOT_FOUND, "no_sandbox");
    }
}

#[tokio::test]
async fn restart_keeps_versions_and_resets_state() {
    let api = Api::new();
    api.counter_app("r").await;
    assert_eq!(api.call("r", "counter", json!("inc")).await.1["reply"], 1);
    let (s, _) = api
        .post(
            "/api/v1/sandboxes/r/reload",
            json!({ "modules": { "counter": counter_v(5) } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = api.post("/api/v1/sandboxes/r/restart", json!(null)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["app"]["state"], "running");
    assert_eq!(
        api.call("r", "counter", json!("inc")).await.1["reply"],
        5,
        "fresh state, current code"
    );
    let (_, versions) = api
        .get("/api/v1/sandboxes/r/modules/counter/versions")
        .await;
    assert_eq!(
        versions.as_array().unwrap().len(),
        2,
        "history survives a restart"
    );
}

#[tokio::test]
async fn processes_and_state() {
    let api = Api::new();
    api.counter_app("p").await;
    api.call("p", "counter", json!("inc")).await;
    let (s, ps) = api.get("/api/v1/sandboxes/p/processes").await;
    assert_eq!(s, StatusCode::OK);
    let ps = ps.as_array().unwrap();
    assert_eq!(ps.len(), 2);
    let counter = ps.iter().find(|p| p["name"] == "counter").unwrap();
    for field in [
        "pid",
        "name",
        "module",
        "version",
        "status",
        "mailbox_len",
        "memory_bytes",
    ] {
        assert!(counter.get(field).is_some(), "{field} missing: {counter}");
    }
    assert_eq!(counter["module"], "counter");
    assert_eq!(counter["version"], 1);
    assert_eq!(counter["mailbox_len"], 0);
    let pid = counter["pid"].as_str().unwrap().to_owned();
    assert!(pid.starts_with("<counter."), "{pid}");

    let (s, st) = api.get("/api/v1/sandboxes/p/processes/counter/state").await;
    assert_eq!((s, st), (StatusCode::OK, json!({ "count": 1 })));
    let encoded = pid.replace('<', "%3C").replace('>', "%3E");
    let (s, st) = api
        .get(&format!("/api/v1/sandboxes/p/processes/{encoded}/state"))
        .await;
    assert_eq!((s, st), (StatusCode::OK, json!({ "count": 1 })));

    let resp = api.get("/api/v1/sandboxes/p/processes/nobody/state").await;
    assert_error(&resp, StatusCode::NOT_FOUND, "no_process");
    assert_eq!(resp.1["error"]["process"], "nobody");
}

#[tokio::test]
async fn call_cast_send() {
    let api = Api::new();
    api.counter_app("c").await;
    let (s, v) = api.call("c", "counter", json!("inc")).await;
    assert_eq!((s, v), (StatusCode::OK, json!({ "reply": 1 })));

    let (s, v) = api
        .post(
            "/api/v1/sandboxes/c/cast",
            json!({ "to": "counter", "message": 10 }),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/c/send",
            json!({ "to": "counter", "message": { "set": 100 } }),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // messages from one sender arrive in order: cast, send, then this call
    assert_eq!(api.call("c", "counter", json!("inc")).await.1["reply"], 101);

    // errors
    assert_error(
        &api.call("c", "nobody", json!("inc")).await,
        StatusCode::NOT_FOUND,
        "no_process",
    );
    let cast = api
        .post(
            "/api/v1/sandboxes/c/cast",
            json!({ "to": "nobody", "message": 1 }),
        )
        .await;
    assert_error(&cast, StatusCode::NOT_FOUND, "no_process");
    let send = api
        .post(
            "/api/v1/sandboxes/c/send",
            json!({ "to": "nobody", "message": 1 }),
        )
        .await;
    assert_error(&send, StatusCode::NOT_FOUND, "no_process");
    let resp = api
        .post("/api/v1/sandboxes/c/call", json!({ "request": 1 }))
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    let resp = api
        .post("/api/v1/sandboxes/c/cast", json!({ "message": 1 }))
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    let resp = api
        .post(
            "/api/v1/sandboxes/c/call",
            json!({ "to": "counter", "timeout_ms": 0 }),
        )
        .await;
    assert_error(
        &resp,
        StatusCode::UNPROCESSABLE_ENTITY,
        "limit_out_of_range",
    );
    let resp = api
        .post(
            "/api/v1/sandboxes/c/call",
            json!({ "to": "counter", "request": nested(65) }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "too_deep");
    let resp = api
        .raw(
            Method::POST,
            "/api/v1/sandboxes/c/call",
            b"not json".to_vec(),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "malformed_json");
    let resp = api
        .post(
            "/api/v1/sandboxes/c/call",
            json!({ "to": "counter", "request": "x".repeat(2 << 20) }),
        )
        .await;
    assert_error(&resp, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");

    // a handler crash answers with the crash reason
    let resp = api.call("c", "counter", json!("crash")).await;
    assert_error(&resp, StatusCode::INTERNAL_SERVER_ERROR, "crashed");
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("boom"),
        "{}",
        resp.1
    );
    assert_eq!(resp.1["error"]["reason"]["kind"], "error", "{}", resp.1);
    assert!(resp.1["error"]["target"].is_string(), "{}", resp.1);
}

#[tokio::test]
async fn call_timeout_is_504_and_a_slow_call_blocks_nothing() {
    let api = Api::new();
    api.counter_app("slow").await;
    api.counter_app("fast").await;
    let resp = api
        .post(
            "/api/v1/sandboxes/slow/call",
            json!({ "to": "counter", "request": { "sleep": 400 }, "timeout_ms": 50 }),
        )
        .await;
    assert_error(&resp, StatusCode::GATEWAY_TIMEOUT, "timeout");
    assert_eq!(resp.1["error"]["timeout_ms"], 50);

    // while a 600 ms call runs, other requests (same sandbox too) answer at once
    let slow = {
        let router = api.router.clone();
        let bearer = api.bearer();
        tokio::spawn(async move {
            let body = json!({ "to": "counter", "request": { "sleep": 600 }, "timeout_ms": 5000 })
                .to_string();
            let req = Request::builder()
                .method(Method::POST)
                .uri("/api/v1/sandboxes/slow/call")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::AUTHORIZATION, bearer)
                .body(Body::from(body))
                .unwrap();
            let started = Instant::now();
            let resp = router.oneshot(req).await.unwrap();
            (resp.status(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert_eq!(api.get("/api/v1/health").await.0, StatusCode::OK);
    assert_eq!(
        api.call("fast", "counter", json!("inc")).await.1["reply"],
        1
    );
    assert_eq!(api.get("/api/v1/sandboxes/slow").await.0, StatusCode::OK);
    let quick = started.elapsed();
    let (status, slow_took) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(slow_took >= Duration::from_millis(500), "{slow_took:?}");
    assert!(
        quick < Duration::from_millis(400),
        "other requests waited {quick:?}"
    );
}

#[tokio::test]
async fn full_mailbox_is_429() {
    let api = Api::new();
    let (s, v) = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "mb", "modules": { "counter": COUNTER }, "limits": { "max_mailbox": 2 } }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, _) = api
        .post(
            "/api/v1/sandboxes/mb/spawn",
            json!({ "module": "counter", "args": {}, "name": "c" }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let busy = {
        let router = api.router.clone();
        let bearer = api.bearer();
        tokio::spawn(async move {
            let body = json!({ "to": "c", "request": { "sleep": 300 } }).to_string();
            let req = Request::builder()
                .method(Method::POST)
                .uri("/api/v1/sandboxes/mb/call")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::AUTHORIZATION, bearer)
                .body(Body::from(body))
                .unwrap();
            router.oneshot(req).await.unwrap().status()
        })
    };
    // wait until the process is inside the slow callback
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, ps) = api.get("/api/v1/sandboxes/mb/processes").await;
        if ps[0]["status"] == "running" || ps[0]["messages_handled"].as_u64() >= Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "{ps}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let resp = api
            .post(
                "/api/v1/sandboxes/mb/cast",
                json!({ "to": "c", "message": 1 }),
            )
            .await;
        if resp.0 != StatusCode::ACCEPTED {
            assert_error(&resp, StatusCode::TOO_MANY_REQUESTS, "mailbox_full");
        }
        statuses.push(resp.0);
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    assert_eq!(busy.await.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn spawn() {
    let api = Api::new();
    let (s, v) = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "sp", "modules": { "counter": COUNTER, "lib": "return { x = 1 }" }, "limits": { "max_processes": 2 } }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/sp/spawn",
            json!({ "module": "counter", "args": { "start": 7 }, "name": "c7" }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["pid"].as_str().unwrap().starts_with("<counter."), "{v}");
    assert_eq!(v["name"], "c7");
    assert_eq!(api.call("sp", "c7", json!("get")).await.1["reply"], 7);

    let resp = api
        .post("/api/v1/sandboxes/sp/spawn", json!({ "module": "nope" }))
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "no_module");
    let resp = api
        .post("/api/v1/sandboxes/sp/spawn", json!({ "module": "lib" }))
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    let resp = api
        .post(
            "/api/v1/sandboxes/sp/spawn",
            json!({ "module": "counter", "args": { "fail": true } }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "spawn_failed");
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refusing to start"),
        "{}",
        resp.1
    );
    let resp = api
        .post("/api/v1/sandboxes/sp/spawn", json!({ "args": {} }))
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");

    let (s, _) = api
        .post(
            "/api/v1/sandboxes/sp/spawn",
            json!({ "module": "counter", "args": {} }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let resp = api
        .post(
            "/api/v1/sandboxes/sp/spawn",
            json!({ "module": "counter", "args": {} }),
        )
        .await;
    assert_error(&resp, StatusCode::TOO_MANY_REQUESTS, "max_processes");
}

#[tokio::test]
async fn modules_and_versions() {
    let api = Api::new();
    let util = "return { twice = function(x) return 2 * x end }";
    let user = "local util = require(\"util\")\nreturn { init = function() return 0 end, handle_call = function(r, f, s) return util.twice(r), s end }";
    let (s, v) = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "m", "modules": { "util": util, "user": user } }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, mods) = api.get("/api/v1/sandboxes/m/modules").await;
    assert_eq!(s, StatusCode::OK);
    let user_info = mods
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "user")
        .unwrap();
    assert_eq!(user_info["version"], 1);
    assert_eq!(user_info["dependencies"], json!(["util"]));
    assert_eq!(user_info["checksum"].as_str().unwrap().len(), 64);

    api.post(
        "/api/v1/sandboxes/m/reload",
        json!({ "modules": { "util": "return { twice = function(x) return 3 * x end }" } }),
    )
    .await;
    let (s, vs) = api.get("/api/v1/sandboxes/m/modules/util/versions").await;
    assert_eq!(s, StatusCode::OK);
    let vs = vs.as_array().unwrap();
    assert_eq!(vs.len(), 2);
    assert_eq!(vs[0]["version"], 1);
    assert_eq!(vs[0]["current"], false);
    assert_eq!(vs[1]["version"], 2);
    assert_eq!(vs[1]["current"], true);
    assert!(vs[1]["source"].as_str().unwrap().contains("3 * x"));

    let resp = api.get("/api/v1/sandboxes/m/modules/nope/versions").await;
    assert_error(&resp, StatusCode::NOT_FOUND, "no_module");
    assert_eq!(resp.1["error"]["module"], "nope");
}

#[tokio::test]
async fn reload() {
    let api = Api::new();
    api.counter_app("rl").await;
    api.call("rl", "counter", json!("inc")).await;

    let (s, rep) = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": { "counter": counter_v(10) } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rep}");
    assert_eq!(rep["status"], "reloaded");
    assert_eq!(
        rep["modules"],
        json!([{ "name": "counter", "from": 1, "to": 2 }])
    );
    assert_eq!(
        rep["processes_migrated"], 0,
        "no code_change: the state is kept as is"
    );
    for t in ["compile_us", "swap_us"] {
        assert!(rep["timings"][t].is_u64(), "{rep}");
    }
    assert_eq!(
        api.call("rl", "counter", json!("inc")).await.1["reply"],
        11,
        "state kept, new code"
    );

    let (s, rep) = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": { "counter": counter_v(10) } }),
        )
        .await;
    assert_eq!((s, &rep["status"]), (StatusCode::OK, &json!("unchanged")));

    let (s, rep) = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": { "counter": counter_v(1000) }, "dry_run": true }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rep}");
    assert_eq!(rep["status"], "dry_run");
    assert_eq!(
        rep["modules"],
        json!([{ "name": "counter", "from": 2, "to": 3 }])
    );
    assert_eq!(
        api.call("rl", "counter", json!("inc")).await.1["reply"],
        21,
        "a dry run changes nothing"
    );

    // a state handler instead of code_change
    let handler = "return function(old, old_vsn, new_vsn, extra) return { count = old.count + extra.bonus } end";
    let (s, rep) = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": { "counter": counter_v(2) }, "state_handler": handler, "extra": { "bonus": 100 } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rep}");
    assert_eq!(rep["processes_migrated"], 1, "{rep}");
    assert_eq!(
        api.call("rl", "counter", json!("get")).await.1["reply"],
        121
    );

    // a compile error: 422 with module, line, column; old code still runs
    let broken = counter_v(3).replacen("return counter", "return counter +", 1);
    let resp = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": { "counter": broken } }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "compile_error");
    assert_eq!(resp.1["error"]["module"], "counter");
    assert!(resp.1["error"]["line"].as_u64().unwrap() > 1, "{}", resp.1);
    assert!(resp.1["error"]["column"].as_u64().is_some(), "{}", resp.1);
    assert_eq!(
        api.call("rl", "counter", json!("inc")).await.1["reply"],
        123
    );

    // a check error (an ungranted capability) is 422 too, at the identifier
    let check = counter_v(3).replacen("state.count += 3", "state.count += fs.read(\"x\")", 1);
    let resp = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": { "counter": check } }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "compile_error");
    assert_eq!(
        resp.1["error"]["diagnostics"][0]["kind"], "ungranted_global",
        "{}",
        resp.1
    );
    let line = check.lines().position(|l| l.contains("fs.read")).unwrap() + 1;
    assert_eq!(resp.1["error"]["line"], line, "{}", resp.1);
    assert!(
        resp.1["error"]["column"].as_u64().unwrap() > 1,
        "{}",
        resp.1
    );

    // a failing migration aborts the whole reload: 409, nothing changed
    let bad_migration = counter_v(4).replacen(
        "return counter\n",
        "function counter.code_change(old, state, extra) error(\"no way\") end\nreturn counter\n",
        1,
    );
    let resp = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": { "counter": bad_migration } }),
        )
        .await;
    assert_error(&resp, StatusCode::CONFLICT, "reload_aborted");
    assert!(resp.1["error"]["step"].is_string(), "{}", resp.1);
    assert_eq!(
        api.call("rl", "counter", json!("inc")).await.1["reply"],
        125
    );

    let resp = api
        .post("/api/v1/sandboxes/rl/reload", json!({ "modules": {} }))
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    let resp = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": ["counter"] }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    let resp = api
        .post(
            "/api/v1/sandboxes/rl/reload",
            json!({ "modules": { "counter": COUNTER }, "canary_crashes": 0 }),
        )
        .await;
    assert_error(
        &resp,
        StatusCode::UNPROCESSABLE_ENTITY,
        "limit_out_of_range",
    );
}

#[tokio::test]
async fn rollback() {
    let api = Api::new();
    api.counter_app("rb").await;
    api.post(
        "/api/v1/sandboxes/rb/reload",
        json!({ "modules": { "counter": counter_v(10) } }),
    )
    .await;
    assert_eq!(api.call("rb", "counter", json!("inc")).await.1["reply"], 10);
    let (s, rep) = api
        .post(
            "/api/v1/sandboxes/rb/modules/counter/rollback",
            json!({ "version": 1 }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rep}");
    assert_eq!(rep["status"], "reloaded");
    assert_eq!(
        rep["modules"],
        json!([{ "name": "counter", "from": 2, "to": 1 }])
    );
    assert_eq!(api.call("rb", "counter", json!("inc")).await.1["reply"], 11);

    let resp = api
        .post(
            "/api/v1/sandboxes/rb/modules/counter/rollback",
            json!({ "version": 9 }),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "no_version");
    assert_eq!(resp.1["error"]["kept"], json!([1, 2]));
    let resp = api
        .post(
            "/api/v1/sandboxes/rb/modules/nope/rollback",
            json!({ "version": 1 }),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "no_module");
    let resp = api
        .post(
            "/api/v1/sandboxes/rb/modules/counter/rollback",
            json!({ "version": "one" }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    let resp = api
        .raw(
            Method::POST,
            "/api/v1/sandboxes/rb/modules/counter/rollback",
            Vec::new(),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn eval() {
    let api = Api::new();
    api.counter_app("ev").await;
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/ev/eval",
            json!({ "source": "return 6 * 7" }),
        )
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({ "result": 42 })));
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/ev/eval",
            json!({ "source": "return { n = graft.call(\"counter\", \"inc\") }" }),
        )
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({ "result": { "n": 1 } })));

    let resp = api
        .post(
            "/api/v1/sandboxes/ev/eval",
            json!({ "source": "return = 1" }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "compile_error");
    assert_eq!(resp.1["error"]["line"], 1);
    let resp = api
        .post(
            "/api/v1/sandboxes/ev/eval",
            json!({ "source": "local t = graft.now() while graft.now() - t < 300 do end return 1", "timeout_ms": 30 }),
        )
        .await;
    assert_error(&resp, StatusCode::GATEWAY_TIMEOUT, "timeout");
    let resp = api
        .post(
            "/api/v1/sandboxes/ev/eval",
            json!({ "source": "error(\"kaputt\")" }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "luau_error");
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kaputt"),
        "{}",
        resp.1
    );
    let resp = api
        .post("/api/v1/sandboxes/ev/eval", json!({ "code": "return 1" }))
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn events() {
    let api = Api::new();
    api.counter_app("evs").await;
    api.post(
        "/api/v1/sandboxes/evs/reload",
        json!({ "modules": { "counter": counter_v(2) } }),
    )
    .await;
    api.post(
        "/api/v1/sandboxes/evs/reload",
        json!({ "modules": { "counter": "return = 1" } }),
    )
    .await;
    let (s, evs) = api.get("/api/v1/sandboxes/evs/events").await;
    assert_eq!(s, StatusCode::OK);
    let evs = evs.as_array().unwrap();
    let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let reload = kinds
        .iter()
        .position(|k| *k == "reload")
        .expect("a reload event");
    let abort = kinds
        .iter()
        .position(|k| *k == "abort")
        .expect("an abort event");
    assert!(reload < abort, "newest last: {kinds:?}");
    assert!(
        evs[reload]["detail"]["timings"]["swap_us"].is_u64(),
        "{}",
        evs[reload]
    );
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // a canary that trips rolls back by itself, and says so in the events
    let (s, rep) = api
        .post(
            "/api/v1/sandboxes/evs/reload",
            json!({ "modules": { "counter": counter_v(3) }, "canary_ms": 5000, "canary_crashes": 1 }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rep}");
    assert_error(
        &api.call("evs", "counter", json!("crash")).await,
        StatusCode::INTERNAL_SERVER_ERROR,
        "crashed",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let evs = loop {
        let (_, evs) = api.get("/api/v1/sandboxes/evs/events").await;
        if evs
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "canary_rollback")
        {
            break evs;
        }
        assert!(Instant::now() < deadline, "no canary rollback: {evs}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (_, mods) = api.get("/api/v1/sandboxes/evs/modules").await;
    let counter = mods
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "counter")
        .unwrap()
        .clone();
    assert_eq!(counter["version"], 2, "rolled back to v2: {counter}");

    let seqs: Vec<u64> = evs
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let last = seqs[seqs.len() - 1];
    let (s, newer) = api
        .get(&format!("/api/v1/sandboxes/evs/events?since={}", last - 1))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(newer.as_array().unwrap().len(), 1);
    assert_error(
        &api.get("/api/v1/sandboxes/evs/events?since=x").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
}

#[tokio::test]
async fn batch_reload() {
    let api = Api::new();
    for id in ["b1", "b2", "b3"] {
        api.counter_app(id).await;
    }
    let (s, out) = api
        .post(
            "/api/v1/reload",
            json!({ "sandboxes": ["b3", "ghost", "b1"], "modules": { "counter": counter_v(7) }, "max_concurrency": 2 }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    let out = out.as_array().unwrap();
    let order: Vec<&str> = out.iter().map(|r| r["sandbox"].as_str().unwrap()).collect();
    assert_eq!(order, ["b3", "ghost", "b1"], "input order");
    assert_eq!(out[0]["result"]["status"], "reloaded");
    assert_eq!(
        out[0]["result"]["modules"],
        json!([{ "name": "counter", "from": 1, "to": 2 }])
    );
    assert_eq!(out[1]["result"]["error"]["kind"], "no_sandbox");
    assert_eq!(out[1]["ok"], false);
    assert_eq!(out[1]["status"], 404);
    assert_eq!(out[2]["result"]["status"], "reloaded");
    assert_eq!(api.call("b1", "counter", json!("inc")).await.1["reply"], 7);
    assert_eq!(
        api.call("b2", "counter", json!("inc")).await.1["reply"],
        1,
        "b2 was not named"
    );

    // rolling: stop at the first failure, the rest are skipped
    let (s, out) = api
        .post("/api/v1/reload", json!({ "sandboxes": ["b2", "ghost", "b3"], "modules": { "counter": counter_v(9) }, "rolling": true }))
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(out[0]["result"]["status"], "reloaded");
    assert_eq!(out[1]["result"]["error"]["kind"], "no_sandbox");
    assert_eq!(out[2]["ok"], false);
    assert!(
        out[2]["result"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("skipped"),
        "{}",
        out[2]
    );
    assert_eq!(
        api.call("b3", "counter", json!("inc")).await.1["reply"],
        7,
        "b3 kept v2 (7 per inc)"
    );

    // a compile error is reported per sandbox
    let (s, out) = api
        .post(
            "/api/v1/reload",
            json!({ "sandboxes": ["b1"], "modules": { "counter": "return = 1" } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(out[0]["result"]["error"]["kind"], "compile_error");
    assert_eq!(out[0]["result"]["error"]["line"], 1);

    let resp = api
        .post(
            "/api/v1/reload",
            json!({ "modules": { "counter": COUNTER } }),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
    let resp = api
        .post(
            "/api/v1/reload",
            json!({ "sandboxes": ["b1"], "modules": { "counter": COUNTER }, "max_concurrency": 0 }),
        )
        .await;
    assert_error(
        &resp,
        StatusCode::UNPROCESSABLE_ENTITY,
        "limit_out_of_range",
    );
    let resp = api
        .post(
            "/api/v1/reload",
            json!({ "sandboxes": ["b1"], "modules": {} }),
        )
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
}

#[tokio::test]
async fn entry_args_reach_the_apps_init() {
    let api = Api::new();
    let app = r#"return {
        init = function(args) graft.register("app") return { args = args } end,
        handle_call = function(_, _, s) return s.args, s end,
    }"#;
    let args = json!({ "port": 8080, "tags": ["a", "b"] });
    let (s, v) = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": "withargs", "modules": { "app": app }, "entry_args": args }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = api.call("withargs", "app", json!(0)).await;
    assert_eq!((s, v), (StatusCode::OK, json!({ "reply": args })));

    // Hostile: args over the sandbox's max_message_bytes are refused and
    // nothing is created.
    let big = json!({
        "id": "bigargs",
        "modules": { "app": app },
        "entry_args": "x".repeat(8192),
        "limits": { "max_message_bytes": 4096 },
    });
    let resp = api.post("/api/v1/sandboxes", big).await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    let (s, _) = api.get("/api/v1/sandboxes/bigargs").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
