//! Trust (SPEC §9) through the router: every route against every role (from
//! the route table, and from the OpenAPI document), scoped, revoked and
//! malformed tokens, browser rules, sessions, path sandboxes, the audit log
//! (and what happens when it cannot be written), and the rate limit of
//! failed authentication.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use graft::NodeLimits;
use graft_http::trust::routes::{Access, Route, ROUTES};
use graft_http::trust::{RateLimit, Role, TrustConfig};
use serde_json::{json, Value};
use support::{assert_error, Api, COUNTER};

/// The concrete URI and a plausible body for a route, on sandbox `demo`.
fn request_for(row: &Route, api: &Api, n: usize) -> (String, Option<Value>) {
    let uri = row
        .path
        .replace("{id}", "demo")
        .replace("{target}", "counter")
        .replace("{module}", "counter")
        .replace("{token}", "tok_000000000000");
    let body = match (row.method, row.path.rsplit('/').next().unwrap_or("")) {
        ("POST", "sandboxes") => {
            Some(json!({ "id": format!("made-{n}"), "modules": { "counter": COUNTER } }))
        }
        ("POST", "call") => Some(json!({ "to": "counter", "request": "inc" })),
        ("POST", "cast" | "send") => Some(json!({ "to": "counter", "message": 1 })),
        ("POST", "spawn") => Some(json!({ "module": "counter" })),
        ("POST", "rollback") => Some(json!({ "version": 1, "dry_run": true })),
        ("POST", "reload") if row.path.contains("{id}") => {
            Some(json!({ "modules": { "counter": COUNTER }, "dry_run": true }))
        }
        ("POST", "reload") => Some(
            json!({ "sandboxes": ["demo"], "modules": { "counter": COUNTER }, "dry_run": true }),
        ),
        ("POST", "eval") => Some(json!({ "source": "return 1" })),
        ("POST", "tokens") => Some(json!({ "role": "viewer" })),
        ("POST", "session") => Some(json!({ "token": api.admin })),
        ("POST", "restart") => Some(json!({})),
        _ => None,
    };
    (uri, body)
}

fn method(row: &Route) -> Method {
    row.method.parse().expect("a method")
}

/// A node with the counter app in sandbox `demo`.
async fn demo() -> Api {
    let api = Api::new();
    api.counter_app("demo").await;
    api
}

/// Checks one route for one caller (`None`: no token) against its row.
async fn probe(api: &Api, row: &Route, role: Option<Role>, n: usize) {
    let (uri, body) = request_for(row, api, n);
    let token = role.map(|r| api.token(r, None));
    let (status, v) = api
        .as_token(token.as_deref(), method(row), &uri, body)
        .await;
    let what = format!("{} {} as {:?}: {status} {v}", row.method, row.path, role);
    match (row.access, role) {
        (Access::Public, _) => assert_ne!(status, StatusCode::FORBIDDEN, "{what}"),
        (Access::Role(_), None) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
            assert_eq!(v["error"]["kind"], "unauthorized", "{what}");
        }
        (Access::Role(needed), Some(r)) if r < needed => {
            assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
            assert_eq!(v["error"]["kind"], "forbidden", "{what}");
        }
        (Access::Role(_), Some(_)) => {
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{what}"
            );
        }
    }
}

#[tokio::test]
async fn every_role_against_every_route_of_the_table() {
    let api = demo().await;
    let mut n = 0;
    // Destructive routes last, so the others find `demo`.
    let mut rows: Vec<&Route> = ROUTES.iter().collect();
    rows.sort_by_key(|r| r.method == "DELETE" && r.path.contains("{id}"));
    for row in rows {
        for role in [
            None,
            Some(Role::Viewer),
            Some(Role::Operator),
            Some(Role::Admin),
        ] {
            n += 1;
            probe(&api, row, role, n).await;
        }
    }
}

#[tokio::test]
async fn every_route_of_the_openapi_document_is_protected_as_the_table_says() {
    let api = demo().await;
    let (s, doc) = api.get("/api/v1/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    let mut seen = Vec::new();
    let mut n = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (m, op) in item.as_object().unwrap() {
            let Ok(method) = m.to_uppercase().parse::<Method>() else {
                continue;
            };
            if !matches!(
                method,
                Method::GET | Method::POST | Method::DELETE | Method::PUT | Method::PATCH
            ) {
                continue;
            }
            let full = format!("/api/v1{path}");
            let row = graft_http::trust::routes::find(&method, &full).unwrap_or_else(|| {
                panic!("{m} {full} is documented but has no row in the route table")
            });
            // The document states what the table says.
            let role = match row.access {
                Access::Public => "public".to_owned(),
                Access::Role(r) => r.as_str().to_owned(),
            };
            assert_eq!(op["x-graft-role"], json!(role), "{m} {full}");
            assert_eq!(
                op["x-graft-audited"],
                json!(row.audit.as_str()),
                "{m} {full}"
            );
            if row.method == "DELETE" && row.path.contains("{id}") {
                continue; // probed last, below
            }
            for role in [
                None,
                Some(Role::Viewer),
                Some(Role::Operator),
                Some(Role::Admin),
            ] {
                n += 1;
                probe(&api, row, role, n).await;
            }
            seen.push((row.method, row.path));
        }
    }
    let delete =
        graft_http::trust::routes::find(&Method::DELETE, "/api/v1/sandboxes/{id}").unwrap();
    for role in [
        None,
        Some(Role::Viewer),
        Some(Role::Operator),
        Some(Role::Admin),
    ] {
        probe(&api, delete, role, 0).await;
    }
    seen.push((delete.method, delete.path));
    // The document describes the API under /api/v1; the dashboard's page
    // and assets and /metrics are outside it (the role test above covers
    // them from the table).
    for row in ROUTES.iter().filter(|r| r.path.starts_with("/api/v1/")) {
        assert!(
            seen.contains(&(row.method, row.path)),
            "{} {} is in the route table but not in the OpenAPI document",
            row.method,
            row.path
        );
    }
}

#[tokio::test]
async fn a_scoped_token_sees_and_touches_only_its_sandboxes() {
    let api = demo().await;
    api.counter_app("other").await;
    let scoped = api.token(Role::Admin, Some(vec!["demo".into()]));
    let t = Some(scoped.as_str());
    let (s, list) = api
        .as_token(t, Method::GET, "/api/v1/sandboxes", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["demo"]);
    let (s, v) = api
        .as_token(
            t,
            Method::POST,
            "/api/v1/sandboxes/demo/call",
            Some(json!({ "to": "counter", "request": "inc" })),
        )
        .await;
    assert_eq!((s, &v["reply"]), (StatusCode::OK, &json!(1)));
    for (m, uri, body) in [
        (Method::GET, "/api/v1/sandboxes/other", None),
        (
            Method::POST,
            "/api/v1/sandboxes/other/call",
            Some(json!({ "to": "counter", "request": "inc" })),
        ),
        (Method::DELETE, "/api/v1/sandboxes/other", None),
        (
            Method::POST,
            "/api/v1/sandboxes",
            Some(json!({ "id": "third", "modules": { "counter": COUNTER } })),
        ),
        (
            Method::POST,
            "/api/v1/reload",
            Some(json!({ "sandboxes": ["demo", "other"], "modules": { "counter": COUNTER } })),
        ),
        (Method::GET, "/api/v1/tokens", None),
        (Method::GET, "/api/v1/audit", None),
        (
            Method::POST,
            "/api/v1/tokens",
            Some(json!({ "role": "admin" })),
        ),
    ] {
        let resp = api.as_token(t, m.clone(), uri, body).await;
        assert_error(&resp, StatusCode::FORBIDDEN, "forbidden");
    }
    // Nothing of it happened.
    let (_, v) = api.call("other", "counter", json!("inc")).await;
    assert_eq!(v["reply"], 1);
    assert_eq!(
        api.get("/api/v1/sandboxes/third").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.trust.tokens().unwrap().len(), 2);
    // A create inside its scope works.
    let scoped_new = api.token(Role::Admin, Some(vec!["mine".into()]));
    let (s, v) = api
        .as_token(
            Some(&scoped_new),
            Method::POST,
            "/api/v1/sandboxes",
            Some(json!({ "id": "mine", "modules": { "counter": COUNTER } })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_tokens_are_401_and_never_echoed() {
    let api = demo().await;
    let viewer = api.token(Role::Viewer, None);
    let unknown = graft_http::trust::generate_token().unwrap();
    let long = format!("Bearer graft_{}", "a".repeat(10_000));
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "none"),
        (Some(format!("Bearer {unknown}")), "unknown"),
        (
            Some(format!("Bearer {}", &viewer[..viewer.len() - 1])),
            "truncated",
        ),
        (
            Some(format!("Bearer {}", viewer.to_uppercase())),
            "upper case",
        ),
        (Some(format!("Basic {viewer}")), "basic"),
        (Some(viewer.clone()), "no scheme"),
        (Some(long.clone()), "oversized"),
        (Some("Bearer graft_\u{ff}".into()), "not ascii"),
    ];
    for (auth, what) in cases {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri("/api/v1/sandboxes");
        if let Some(a) = &auth {
            req = req.header(header::AUTHORIZATION, a.as_bytes());
        }
        let (s, headers, v) = api.send(req.body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {v}");
        assert_eq!(v["error"]["kind"], "unauthorized", "{what}");
        assert!(headers.contains_key(header::WWW_AUTHENTICATE), "{what}");
        let text = v.to_string();
        assert!(
            !text.contains(&viewer[6..20])
                && !text.contains(&unknown[6..20])
                && !text.contains("aaaaaaaa"),
            "{what} echoed: {text}"
        );
    }
    // Two Authorization headers, one of them valid: refused.
    let req = Request::builder()
        .uri("/api/v1/sandboxes")
        .header(header::AUTHORIZATION, format!("Bearer {viewer}"))
        .header(header::AUTHORIZATION, format!("Bearer {unknown}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.send(req).await.0, StatusCode::UNAUTHORIZED);
    // The scheme is case-insensitive (RFC 9110).
    let req = Request::builder()
        .uri("/api/v1/sandboxes")
        .header(header::AUTHORIZATION, format!("bearer {viewer}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.send(req).await.0, StatusCode::OK);
    // Revoked: refused from the next request on.
    let id = api
        .trust
        .tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.role == "viewer")
        .unwrap()
        .id;
    let (s, _) = api.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api
        .as_token(Some(&viewer), Method::GET, "/api/v1/sandboxes", None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The secret is nowhere in the database file.
    let db = std::fs::read(api.trust.store().path()).unwrap_or_default();
    let wal = std::fs::read(api.trust.store().path().with_extension("db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(!bytes.windows(viewer.len()).any(|w| w == viewer.as_bytes()));
        assert!(!bytes
            .windows(api.admin.len())
            .any(|w| w == api.admin.as_bytes()));
    }
}

#[tokio::test]
async fn tokens_are_created_listed_and_revoked_over_http() {
    let api = Api::new();
    let (s, v) = api
        .post(
            "/api/v1/tokens",
            json!({ "role": "operator", "sandboxes": ["demo"], "label": "ci bot" }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let secret = v["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("graft_") && secret.len() == 70);
    assert_eq!(v["role"], "operator");
    let (s, list) = api.get("/api/v1/tokens").await;
    assert_eq!(s, StatusCode::OK);
    let text = list.to_string();
    assert!(!text.contains(&secret) && !text.contains("hash"), "{text}");
    assert_eq!(list.as_array().unwrap().len(), 2);
    for bad in [
        json!({ "role": "root" }),
        json!({ "role": "viewer", "sandboxes": ["Bad Id"] }),
        json!({ "role": "viewer", "label": "x".repeat(129) }),
        json!({ "role": "viewer", "label": "a\u{1b}[31m" }),
    ] {
        assert_error(
            &api.post("/api/v1/tokens", bad).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
        );
    }
    assert_error(
        &api.post("/api/v1/tokens", json!({ "role": "viewer", "admin": true }))
            .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &api.delete("/api/v1/tokens/tok_nope").await,
        StatusCode::NOT_FOUND,
        "no_token",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_under_concurrent_requests_holds_from_the_next_request() {
    let api = Arc::new(demo().await);
    let op = api.token(Role::Operator, None);
    let id = api
        .trust
        .tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.role == "operator")
        .unwrap()
        .id;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (api, op, stop) = (api.clone(), op.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (s, _) = api
                    .as_token(
                        Some(&op),
                        Method::GET,
                        "/api/v1/sandboxes/demo/processes",
                        None,
                    )
                    .await;
                statuses.push(s);
                tokio::task::yield_now().await;
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, _) = api.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Every request that starts after the revocation answered is refused.
    for _ in 0..20 {
        let (s, _) = api
            .as_token(
                Some(&op),
                Method::GET,
                "/api/v1/sandboxes/demo/processes",
                None,
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let statuses = w.await.unwrap();
        // Each worker saw only OK, then only 401: never OK after a 401.
        let first_refused = statuses
            .iter()
            .position(|s| *s == StatusCode::UNAUTHORIZED)
            .unwrap_or(statuses.len());
        assert!(
            statuses[..first_refused]
                .iter()
                .all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        assert!(
            statuses[first_refused..]
                .iter()
                .all(|s| *s == StatusCode::UNAUTHORIZED),
            "{statuses:?}"
        );
    }
}

/// A request with browser-like headers and the admin token.
fn browser(api: &Api, m: Method, uri: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut req = Request::builder()
        .method(m)
        .uri(uri)
        .header(header::AUTHORIZATION, api.bearer());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Body::from(body.to_owned())).unwrap()
}

/// Headers of a refused request, and the status and kind it gets.
type Refusal<'a> = (&'a [(&'a str, &'a str)], StatusCode, &'a str);

#[tokio::test]
async fn cross_site_origin_rebinding_host_and_text_plain_are_refused_without_effect() {
    let api = demo().await;
    let call = json!({ "to": "counter", "request": "inc" }).to_string();
    let uri = "/api/v1/sandboxes/demo/call";
    let refusals: &[Refusal] = &[
        (
            &[
                ("host", "127.0.0.1:7878"),
                ("origin", "https://evil.example"),
                ("content-type", "application/json"),
            ],
            StatusCode::FORBIDDEN,
            "forbidden_origin",
        ),
        (
            &[
                ("host", "127.0.0.1:7878"),
                ("origin", "null"),
                ("content-type", "application/json"),
            ],
            StatusCode::FORBIDDEN,
            "forbidden_origin",
        ),
        (
            &[
                ("host", "127.0.0.1:7878"),
                ("origin", "http://127.0.0.1:9999"),
                ("content-type", "application/json"),
            ],
            StatusCode::FORBIDDEN,
            "forbidden_origin",
        ),
        (
            &[
                ("origin", "http://127.0.0.1:7878"),
                ("content-type", "application/json"),
            ],
            StatusCode::FORBIDDEN,
            "forbidden_origin",
        ),
        (
            &[
                ("host", "rebind.evil.example:7878"),
                ("content-type", "application/json"),
            ],
            StatusCode::FORBIDDEN,
            "forbidden_host",
        ),
        (
            &[
                ("host", "localhost.evil.example"),
                ("content-type", "application/json"),
            ],
            StatusCode::FORBIDDEN,
            "forbidden_host",
        ),
        (
            &[("host", "127.0.0.1:7878"), ("content-type", "text/plain")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            &[
                ("host", "127.0.0.1:7878"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            &[("host", "127.0.0.1:7878")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ];
    for (headers, status, kind) in refusals {
        let (s, _, v) = api
            .send(browser(&api, Method::POST, uri, headers, &call))
            .await;
        assert_eq!(
            (s, v["error"]["kind"].as_str()),
            (*status, Some(*kind)),
            "{headers:?}: {v}"
        );
    }
    // No call went through: the next one is the first.
    let ok: &[(&str, &str)] = &[
        ("host", "localhost:7878"),
        ("origin", "http://localhost:7878"),
        ("content-type", "application/json; charset=utf-8"),
    ];
    let (s, _, v) = api.send(browser(&api, Method::POST, uri, ok, &call)).await;
    assert_eq!((s, &v["reply"]), (StatusCode::OK, &json!(1)), "{v}");
    // A GET needs no content type; an allowed host is accepted.
    let api2 = Api::with(
        NodeLimits::default(),
        TrustConfig {
            allow_hosts: vec!["graft.example".into()],
            ..TrustConfig::default()
        },
    );
    let (s, _, v) = api2
        .send(browser(
            &api2,
            Method::GET,
            "/api/v1/sandboxes",
            &[("host", "graft.example:443")],
            "",
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

fn cookie_of(headers: &axum::http::HeaderMap) -> String {
    headers[header::SET_COOKIE].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn sessions_are_http_only_strict_cookies_that_end() {
    let api = Api::with(
        NodeLimits::default(),
        TrustConfig {
            session_ttl: Duration::from_millis(300),
            ..TrustConfig::default()
        },
    );
    api.counter_app("demo").await;
    let viewer = api.token(Role::Viewer, None);
    let sign_in = |token: &str| {
        Request::builder()
            .method(Method::POST)
            .uri("/api/v1/session")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({ "token": token }).to_string()))
            .unwrap()
    };
    let (s, headers, _) = api.send(sign_in(&viewer)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let set = cookie_of(&headers);
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains(&viewer), "{set}");
    let value = set.split(';').next().unwrap().to_owned(); // graft_session=…
    let with_cookie = |cookie: &str, uri: &str| {
        Request::builder()
            .uri(uri)
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap()
    };
    let (s, _, who) = api.send(with_cookie(&value, "/api/v1/session")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(who["role"], "viewer");
    assert!(who["expires_at_ms"].as_f64().is_some());
    // The session has the token's role: a viewer cannot eval.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/sandboxes/demo/eval")
        .header(header::COOKIE, &value)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"source":"return 1"}"#))
        .unwrap();
    assert_eq!(api.send(req).await.0, StatusCode::FORBIDDEN);
    // Tampered, duplicated or foreign cookies are refused.
    let mut flipped = value.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    for bad in [
        flipped.as_str(),
        "graft_session=zz",
        &format!("{value}; {value}"),
        "graft_session=",
    ] {
        let (s, _, _) = api.send(with_cookie(bad, "/api/v1/sandboxes")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad}");
    }
    // A bad token gets no session.
    let (s, headers, v) = api.send(sign_in("graft_nope")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(!headers.contains_key(header::SET_COOKIE));
    // The session ends on its own.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        api.send(with_cookie(&value, "/api/v1/session")).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Signing out ends it at once; revoking the token ends it too.
    let (_, headers, _) = api.send(sign_in(&viewer)).await;
    let value = cookie_of(&headers).split(';').next().unwrap().to_owned();
    let out = Request::builder()
        .method(Method::DELETE)
        .uri("/api/v1/session")
        .header(header::COOKIE, &value)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::empty())
        .unwrap();
    let (s, headers, _) = api.send(out).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(cookie_of(&headers).contains("Max-Age=0"));
    assert_eq!(
        api.send(with_cookie(&value, "/api/v1/session")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (_, headers, _) = api.send(sign_in(&viewer)).await;
    let value = cookie_of(&headers).split(';').next().unwrap().to_owned();
    let id = api
        .trust
        .tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.role == "viewer")
        .unwrap()
        .id;
    api.trust.revoke_token(&id).unwrap();
    assert_eq!(
        api.send(with_cookie(&value, "/api/v1/session")).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("graft-trust-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir.canonicalize().unwrap())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn path_sandboxes_only_under_the_projects_root_and_probes_learn_nothing() {
    let scratch = Scratch::new("roots");
    let root = scratch.0.join("root");
    let outside = scratch.0.join("outside");
    for d in [
        root.join("ok/src"),
        outside.join("secret/src"),
        root.join("leaky/src"),
    ] {
        std::fs::create_dir_all(&d).unwrap();
    }
    std::fs::write(root.join("ok/src/counter.luau"), COUNTER).unwrap();
    std::fs::write(outside.join("secret/src/counter.luau"), COUNTER).unwrap();
    std::fs::write(outside.join("file.txt"), "x").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(
            outside.join("secret/src/counter.luau"),
            root.join("leaky/src/counter.luau"),
        )
        .unwrap();
    }
    let api = Api::with(
        NodeLimits::default(),
        TrustConfig {
            projects_roots: vec![root.clone()],
            ..TrustConfig::default()
        },
    );
    let create = |id: &str, path: PathBuf| json!({ "id": id, "modules": path.to_string_lossy() });
    let mut answers = Vec::new();
    for (i, path) in [
        outside.join("secret"),
        outside.join("missing"),
        outside.join("file.txt"),
        root.join("../outside/secret"),
        root.join("link/secret"),
        PathBuf::from("/etc"),
        PathBuf::from("/nonexistent/deep/path"),
    ]
    .into_iter()
    .enumerate()
    {
        let resp = api
            .post("/api/v1/sandboxes", create(&format!("p{i}"), path.clone()))
            .await;
        assert_error(&resp, StatusCode::FORBIDDEN, "path_forbidden");
        answers.push(resp.1.to_string());
        assert!(
            !resp.1.to_string().contains("outside"),
            "{path:?}: {}",
            resp.1
        );
    }
    answers.dedup();
    assert_eq!(answers.len(), 1, "the answers differ: {answers:?}");
    // A module file that links out of the root is never read (the loader
    // does not follow links): the project has no module.
    let resp = api
        .post("/api/v1/sandboxes", create("leaky", root.join("leaky")))
        .await;
    assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    let (s, v) = api
        .post("/api/v1/sandboxes", create("ok", root.join("ok")))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // A node with no projects root refuses every path.
    let closed = Api::new();
    let resp = closed
        .post("/api/v1/sandboxes", create("ok", root.join("ok")))
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "path_forbidden");
}

async fn audit_rows(api: &Api, query: &str) -> Vec<Value> {
    // Completions are queued after the answer: wait until none is pending.
    for _ in 0..200 {
        let (s, v) = api.get(&format!("/api/v1/audit?{query}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let rows = v["rows"].as_array().unwrap().clone();
        if rows.iter().all(|r| r["outcome"] != "pending") {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("audit rows stay pending");
}

#[tokio::test]
async fn audit_rows_for_allowed_and_denied_requests() {
    let api = demo().await;
    let viewer = api.token(Role::Viewer, None);
    let viewer_id = api
        .trust
        .tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.role == "viewer")
        .unwrap()
        .id;
    // An allowed message writes no row (messages are not audited unless
    // the node asks, see `messages_are_audited_when_the_node_asks`); a
    // refused one does.
    assert_eq!(
        api.call("demo", "counter", json!("inc")).await.0,
        StatusCode::OK
    );
    let refused = api
        .as_token(
            Some(&viewer),
            Method::POST,
            "/api/v1/sandboxes/demo/call",
            Some(json!({ "to": "counter", "request": "inc" })),
        )
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "forbidden");
    api.as_token(
        Some(&viewer),
        Method::POST,
        "/api/v1/sandboxes/demo/eval",
        Some(json!({ "source": "return 1" })),
    )
    .await;
    api.as_token(
        None,
        Method::GET,
        "/api/v1/sandboxes/demo/processes/counter/state",
        None,
    )
    .await;
    api.get("/api/v1/sandboxes/demo/processes/counter/state")
        .await;
    // Reads other than state are not audited.
    api.get("/api/v1/sandboxes/demo/processes").await;

    let rows = audit_rows(&api, "sandbox=demo").await;
    let summary: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["route"].as_str().unwrap().into(),
                r["outcome"].as_str().unwrap().into(),
                r["role"].as_str().unwrap_or("-").into(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        summary,
        vec![
            s(
                "/api/v1/sandboxes/{id}/processes/{target}/state",
                "ok",
                "admin"
            ),
            s(
                "/api/v1/sandboxes/{id}/processes/{target}/state",
                "unauthorized",
                "-"
            ),
            s("/api/v1/sandboxes/{id}/eval", "forbidden", "viewer"),
            s("/api/v1/sandboxes/{id}/call", "forbidden", "viewer"),
            s("/api/v1/sandboxes", "ok", "admin"),
        ],
        "{rows:#?}"
    );
    let call = &rows[3];
    assert_eq!(call["method"], "POST");
    assert_eq!(call["status"], 403);
    assert!(call["duration_us"].as_u64().unwrap() > 0);
    assert!(call["at_ms"].as_f64().unwrap() > 1.6e12);
    // Filters and paging.
    let by_viewer = audit_rows(&api, &format!("token={viewer_id}")).await;
    assert_eq!(by_viewer.len(), 2);
    assert_eq!(audit_rows(&api, "outcome=unauthorized").await.len(), 1);
    let (_, page) = api.get("/api/v1/audit?limit=2").await;
    let before = page["next_before"].as_u64().unwrap();
    let (_, next) = api
        .get(&format!("/api/v1/audit?limit=2&before={before}"))
        .await;
    assert!(next["rows"][0]["id"].as_u64().unwrap() < before);
    assert_error(
        &api.get("/api/v1/audit?limit=0").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &api.get("/api/v1/audit?who=me").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    // No row holds a secret.
    let all = api.get("/api/v1/audit?limit=1000").await.1.to_string();
    assert!(!all.contains(&viewer) && !all.contains(&api.admin));
}

#[tokio::test]
async fn when_the_audit_log_cannot_be_written_nothing_is_done() {
    let api = demo().await;
    assert_eq!(
        api.call("demo", "counter", json!("inc")).await.1["reply"],
        1
    );
    api.trust.store().close();
    for (m, uri, body) in [
        (
            Method::POST,
            "/api/v1/sandboxes/demo/eval",
            Some(json!({ "source": "return 1" })),
        ),
        (Method::DELETE, "/api/v1/sandboxes/demo", None),
        (
            Method::POST,
            "/api/v1/sandboxes",
            Some(json!({ "id": "new", "modules": { "counter": COUNTER } })),
        ),
        (
            Method::GET,
            "/api/v1/sandboxes/demo/processes/counter/state",
            None,
        ),
    ] {
        let resp = api.as_token(Some(&api.admin), m.clone(), uri, body).await;
        assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable");
        // The store's own reason, for the caller to act on.
        let err = &resp.1["error"];
        assert_eq!(err["storage"], "storage_closed", "{err}");
        let msg = err["message"].as_str().unwrap();
        assert!(
            msg.starts_with("the node is shutting down (the store is closed")
                && msg.ends_with("the audit row cannot be written, so nothing was applied"),
            "{msg}"
        );
        assert!(!msg.contains(&api.admin), "{msg}");
    }
    // Unaudited reads still answer, and show that nothing changed.
    let (s, list) = api.get("/api/v1/sandboxes").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let sb = api.node.sandbox("demo").unwrap();
    let state = sb.state("counter").await.unwrap();
    assert_eq!(state["count"], 1);
    // A token cannot be minted either: the storage's answer (503, the
    // reason), not the server's fault, and no host path in the body.
    let (s, v) = api
        .as_token(
            Some(&api.admin),
            Method::POST,
            "/api/v1/tokens",
            Some(json!({ "role": "viewer" })),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_ne!(v["error"]["kind"], "internal", "{v}");
    let path = api.trust.store().path().to_string_lossy().into_owned();
    assert!(path.is_empty() || !v.to_string().contains(&path), "{v}");
    // Messages are the application's traffic, not audited by default: a
    // failing store stops the node's administration, not the application.
    assert_eq!(
        api.call("demo", "counter", json!("inc")).await.1["reply"],
        2
    );
}

#[tokio::test]
async fn messages_are_audited_when_the_node_asks() {
    let api = Api::with(
        NodeLimits::default(),
        TrustConfig {
            audit_messages: true,
            ..Api::test_trust()
        },
    );
    api.counter_app("demo").await;
    assert_eq!(
        api.call("demo", "counter", json!("inc")).await.1["reply"],
        1
    );
    let (s, _) = api
        .post(
            "/api/v1/sandboxes/demo/cast",
            json!({ "to": "counter", "message": "inc" }),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let rows = audit_rows(&api, "sandbox=demo").await;
    let routes: Vec<(&str, &str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["route"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        routes,
        vec![
            ("/api/v1/sandboxes/{id}/cast", "ok", 202),
            ("/api/v1/sandboxes/{id}/call", "ok", 200),
            ("/api/v1/sandboxes", "ok", 201),
        ]
    );
    // Audited messages fail closed like every audited request.
    api.trust.store().close();
    let resp = api
        .as_token(
            Some(&api.admin),
            Method::POST,
            "/api/v1/sandboxes/demo/call",
            Some(json!({ "to": "counter", "request": "inc" })),
        )
        .await;
    assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable");
    let state = api
        .node
        .sandbox("demo")
        .unwrap()
        .state("counter")
        .await
        .unwrap();
    assert_eq!(state["count"], 1, "the refused call was not delivered");
}

fn from_peer(ip: [u8; 4], token: &str) -> Request<Body> {
    Request::builder()
        .uri("/api/v1/sandboxes")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .extension(ConnectInfo(SocketAddr::from((ip, 40000))))
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn failed_authentication_is_rate_limited_per_peer() {
    let api = Api::with(
        NodeLimits::default(),
        TrustConfig {
            auth_failures: RateLimit {
                burst: 5,
                per_second: 0.0,
            },
            ..TrustConfig::default()
        },
    );
    let bad = graft_http::trust::generate_token().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let (s, headers, v) = api.send(from_peer([10, 0, 0, 1], &bad)).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(v["error"]["kind"], "auth_rate_limited");
            assert!(headers.contains_key(header::RETRY_AFTER));
        }
        statuses.push(s.as_u16());
    }
    assert_eq!(statuses, [vec![401; 5], vec![429; 7]].concat());
    // Once limited, even a valid token from that peer waits …
    assert_eq!(
        api.send(from_peer([10, 0, 0, 1], &api.admin)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // … while other peers are not affected.
    assert_eq!(
        api.send(from_peer([10, 0, 0, 2], &api.admin)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.send(from_peer([10, 0, 0, 2], &bad)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_request_without_host_is_refused_like_a_foreign_host() {
    let api = demo().await;
    // The router itself, without the helper that adds `Host: localhost`.
    let bare = graft_http::router(api.node.clone(), api.trust.clone());
    for (m, uri, body) in [
        (Method::GET, "/api/v1/sandboxes", ""),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/call",
            r#"{"to":"counter","request":"inc"}"#,
        ),
        (Method::GET, "/api/v1/no/such/route", ""),
    ] {
        let req = Request::builder()
            .method(m.clone())
            .version(axum::http::Version::HTTP_10)
            .uri(uri)
            .header(header::AUTHORIZATION, api.bearer())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        let resp = tower::ServiceExt::oneshot(bare.clone(), req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{m} {uri}");
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["kind"], "forbidden_host", "{v}");
        assert!(!v.to_string().contains(&api.admin));
    }
    // The call above did nothing: the counter is still at 0.
    let state = api
        .node
        .sandbox("demo")
        .unwrap()
        .state("counter")
        .await
        .unwrap();
    assert_eq!(state["count"], 0);
}

#[tokio::test]
async fn unknown_routes_are_401_before_404() {
    let api = demo().await;
    let viewer = api.token(Role::Viewer, None);
    for (m, uri) in [
        (Method::GET, "/api/v1/no/such/route"),
        (Method::GET, "/api/v1/sandboxes/demo/secrets"),
        (Method::POST, "/admin"),
        (Method::GET, "/assets/nope.js"),
    ] {
        // Without credentials, or with bad ones: 401, as for a real route.
        let (s, v) = api.as_token(None, m.clone(), uri, None).await;
        assert_error(&(s, v), StatusCode::UNAUTHORIZED, "unauthorized");
        let bad = graft_http::trust::generate_token().unwrap();
        let (s, v) = api.as_token(Some(&bad), m.clone(), uri, None).await;
        assert_error(&(s, v), StatusCode::UNAUTHORIZED, "unauthorized");
        // With a valid token of any role: 404.
        let (s, v) = api.as_token(Some(&viewer), m.clone(), uri, None).await;
        assert_error(&(s, v), StatusCode::NOT_FOUND, "not_found");
    }
    // A known path with another method is 401 unauthenticated, then 405.
    let (s, v) = api
        .as_token(None, Method::PUT, "/api/v1/sandboxes", None)
        .await;
    assert_error(&(s, v), StatusCode::UNAUTHORIZED, "unauthorized");
    let (s, _) = api
        .as_token(Some(&api.admin), Method::PUT, "/api/v1/sandboxes", None)
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
}

/// A node whose audit log is in its own (ephemeral) database, with the
/// counter app in `demo`: the audit row of a durable effect joins the
/// effect's transaction.
async fn durable_demo() -> Api {
    durable_demo_with(Api::test_trust()).await
}

async fn durable_demo_with(config: TrustConfig) -> Api {
    let node = graft::Node::builder()
        .threads(2)
        .ephemeral()
        .open()
        .expect("node");
    let api = Api::with_node_and(node, config);
    api.counter_app("demo").await;
    api
}

/// Runs `sql` on the node's database from a second connection (a trigger
/// that makes some inserts fail).
fn sql(api: &Api, sql: &str) {
    let conn = rusqlite::Connection::open(api.trust.store().path()).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(sql).unwrap();
}

const AUDIT_FAILS: &str = "CREATE TRIGGER test_audit_fails BEFORE INSERT ON audit \
     BEGIN SELECT RAISE(ABORT, 'the test refuses audit rows'); END;";

async fn current_version(api: &Api, module: &str) -> u32 {
    let mods = api.node.sandbox("demo").unwrap().modules().await.unwrap();
    mods.iter().find(|m| m.name == module).unwrap().version
}

#[tokio::test]
async fn an_audit_row_that_cannot_be_written_leaves_no_effect_of_any_kind() {
    // Messages audited too, so that every route that can be audited is.
    let api = durable_demo_with(TrustConfig {
        audit_messages: true,
        ..Api::test_trust()
    })
    .await;
    let store = api.trust.store().clone();
    // A second version to roll back from, and a token to revoke.
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/demo/reload",
            json!({ "modules": { "counter": support::counter_v(2) } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let victim = api.token(Role::Viewer, None);
    let victim_id = api
        .trust
        .tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.role == "viewer")
        .unwrap()
        .id;
    let tokens_before = store.tokens().unwrap().len();
    let audit_before = store.audit(None, 1000).unwrap().len();
    api.call("demo", "counter", json!("inc")).await;
    let processes = |v: Value| v.as_array().map(Vec::len).unwrap();
    let processes_before = processes(api.get("/api/v1/sandboxes/demo/processes").await.1);

    sql(&api, AUDIT_FAILS);
    let attempts: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            "/api/v1/sandboxes".into(),
            Some(json!({ "id": "new", "modules": { "counter": COUNTER } })),
        ),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/reload".into(),
            Some(json!({ "modules": { "counter": support::counter_v(3) } })),
        ),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/modules/counter/rollback".into(),
            Some(json!({ "version": 1 })),
        ),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            Some(json!({ "role": "admin" })),
        ),
        (Method::DELETE, format!("/api/v1/tokens/{victim_id}"), None),
        (Method::DELETE, "/api/v1/sandboxes/demo".into(), None),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/call".into(),
            Some(json!({ "to": "counter", "request": "inc" })),
        ),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/eval".into(),
            Some(json!({ "source": "return 1" })),
        ),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/cast".into(),
            Some(json!({ "to": "counter", "message": 5 })),
        ),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/send".into(),
            Some(json!({ "to": "counter", "message": { "set": 100 } })),
        ),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/spawn".into(),
            Some(json!({ "module": "counter" })),
        ),
        (
            Method::POST,
            "/api/v1/sandboxes/demo/restart".into(),
            Some(json!({})),
        ),
        (
            Method::GET,
            "/api/v1/sandboxes/demo/processes/counter/state".into(),
            None,
        ),
    ];
    for (m, uri, body) in attempts {
        let (s, v) = api.as_token(Some(&api.admin), m.clone(), &uri, body).await;
        assert!(s.is_server_error(), "{m} {uri}: {s} {v}");
        assert!(!v.to_string().contains(&api.admin), "{v}");
    }
    // Nothing happened, in memory or in the database.
    assert_eq!(api.node.sandbox_ids(), vec!["demo".to_owned()]);
    let stored: Vec<String> = store
        .sandboxes()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(stored, vec!["demo".to_owned()]);
    assert_eq!(current_version(&api, "counter").await, 2);
    assert_eq!(
        store.module("demo", "counter").unwrap().unwrap().current,
        Some(2)
    );
    assert_eq!(store.versions("demo", "counter").unwrap().len(), 2);
    assert_eq!(store.tokens().unwrap().len(), tokens_before);
    assert_eq!(api.trust.tokens().unwrap().len(), tokens_before);
    let (s, _) = api
        .as_token(Some(&victim), Method::GET, "/api/v1/sandboxes", None)
        .await;
    assert_eq!(s, StatusCode::OK, "the revocation did not happen");
    let state = api
        .node
        .sandbox("demo")
        .unwrap()
        .state("counter")
        .await
        .unwrap();
    // One call, before the trigger, by version 2 (which adds 2); no cast,
    // send or restart reached it.
    assert_eq!(state["count"], 2);
    assert_eq!(
        processes(api.get("/api/v1/sandboxes/demo/processes").await.1),
        processes_before
    );
    // And no row was added.
    assert_eq!(store.audit(None, 1000).unwrap().len(), audit_before + 1);
}

#[tokio::test]
async fn a_reload_and_its_audit_row_commit_together() {
    let api = durable_demo().await;
    let store = api.trust.store().clone();
    let reloads = |store: &graft::store::Store| -> Vec<(String, Option<u16>)> {
        store
            .audit_query(&graft::store::AuditQuery {
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .filter(|r| r.route == "/api/v1/sandboxes/{id}/reload")
            .map(|r| (r.outcome, r.status))
            .collect()
    };
    // The version row cannot be written: no `ok` row either.
    sql(
        &api,
        "CREATE TRIGGER test_versions_fail BEFORE INSERT ON module_versions \
         BEGIN SELECT RAISE(ABORT, 'the test refuses versions'); END;",
    );
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/demo/reload",
            json!({ "modules": { "counter": support::counter_v(2) } }),
        )
        .await;
    assert!(s.is_server_error(), "{s} {v}");
    assert_eq!(current_version(&api, "counter").await, 1);
    assert_eq!(store.versions("demo", "counter").unwrap().len(), 1);
    // The failure's own row comes after the answer (lazily).
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = reloads(&store);
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_ne!(rows[0].0, "ok", "{rows:?}");
    assert_eq!(rows[0].1, Some(s.as_u16()));

    // With versions writable, the row and the version are both there as
    // soon as the answer is: they are one transaction.
    sql(&api, "DROP TRIGGER test_versions_fail;");
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/demo/reload",
            json!({ "modules": { "counter": support::counter_v(2) } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(store.versions("demo", "counter").unwrap().len(), 2);
    let rows = reloads(&store);
    assert_eq!(rows[0], ("ok".to_owned(), Some(200)), "{rows:?}");
    // And a reload refused by the audit log stores no version.
    sql(&api, AUDIT_FAILS);
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/demo/reload",
            json!({ "modules": { "counter": support::counter_v(3) } }),
        )
        .await;
    assert!(s.is_server_error(), "{s} {v}");
    assert_eq!(store.versions("demo", "counter").unwrap().len(), 2);
    assert_eq!(current_version(&api, "counter").await, 2);
}

/// A request with exactly these headers (no token unless given).
fn with_headers(m: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::builder().method(m).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn public_routes_keep_the_browser_rules() {
    let api = demo().await;
    for uri in ["/api/v1/health", "/"] {
        let own = with_headers(Method::GET, uri, &[("host", "127.0.0.1:7878")]);
        assert_eq!(api.send(own).await.0, StatusCode::OK, "{uri}");
        let rebound = with_headers(Method::GET, uri, &[("host", "evil.example")]);
        let (s, _, v) = api.send(rebound).await;
        assert_error(&(s, v), StatusCode::FORBIDDEN, "forbidden_host");
        let cross = with_headers(
            Method::GET,
            uri,
            &[
                ("host", "127.0.0.1:7878"),
                ("origin", "http://evil.example"),
            ],
        );
        let (s, _, v) = api.send(cross).await;
        assert_error(&(s, v), StatusCode::FORBIDDEN, "forbidden_origin");
    }
}

#[tokio::test]
async fn head_is_its_get_route_with_the_same_role_and_audit_row() {
    let api = demo().await;
    let viewer = api.token(Role::Viewer, None);
    let state = "/api/v1/sandboxes/demo/processes/counter/state";
    // A viewer may list sandboxes (GET), so HEAD too; it may not read
    // process state either way.
    let (s, _) = api
        .as_token(Some(&viewer), Method::HEAD, "/api/v1/sandboxes", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api.as_token(Some(&viewer), Method::HEAD, state, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = api
        .as_token(Some(&api.admin), Method::HEAD, state, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    // Both state reads are in the audit log, as HEAD, allowed and denied.
    let rows = audit_rows(&api, "sandbox=demo").await;
    let heads: Vec<(&str, &str, &str)> = rows
        .iter()
        .filter(|r| r["method"] == "HEAD")
        .map(|r| {
            (
                r["route"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
                r["role"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    let route = "/api/v1/sandboxes/{id}/processes/{target}/state";
    assert_eq!(
        heads,
        [(route, "ok", "admin"), (route, "forbidden", "viewer")],
        "{rows:#?}"
    );
}

#[tokio::test]
async fn a_scoped_callers_refusal_is_audited_with_its_role() {
    let api = demo().await;
    api.counter_app("other").await;
    let scoped = api.token(Role::Operator, Some(vec!["demo".into()]));
    let (s, v) = api
        .as_token(
            Some(&scoped),
            Method::POST,
            "/api/v1/sandboxes/other/call",
            Some(json!({ "to": "counter", "request": "inc" })),
        )
        .await;
    assert_error(&(s, v), StatusCode::FORBIDDEN, "forbidden");
    let rows = audit_rows(&api, "sandbox=other&outcome=forbidden").await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["role"], "operator");
    assert_eq!(rows[0]["route"], "/api/v1/sandboxes/{id}/call");
    assert_eq!(rows[0]["status"], 403);
    // The refused call had no effect: the counter was never called.
    let (_, v) = api.call("other", "counter", json!("inc")).await;
    assert_eq!(v["reply"], 1);
}
