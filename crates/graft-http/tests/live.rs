//! SPEC §10 through the router: `/metrics` values after real actions, the
//! SSE stream (filters, resume, keep-alive), the supervision tree and the
//! dashboard's assets.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use graft::Node;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::sse::Frames;
use support::{assert_error, counter_v, Api, COUNTER};
use tower::ServiceExt;

/// The API over `node` as an admin sees it: every request gets the admin
/// token (these tests are about the live views, not about trust).
fn authed(node: Node, live: Option<graft_http::Live>) -> Router {
    use graft_http::trust::{RateLimit, Role, Trust, TrustConfig};
    let store = match node.store() {
        Some(s) => s.clone(),
        None => std::sync::Arc::new(graft::store::Store::in_memory().expect("store")),
    };
    let config = TrustConfig {
        auth_failures: RateLimit {
            burst: 1_000_000,
            per_second: 1_000_000.0,
        },
        ..TrustConfig::default()
    };
    let trust = std::sync::Arc::new(Trust::new(store, config).expect("trust"));
    let secret = trust
        .create_token(Role::Admin, None, None)
        .expect("admin")
        .secret;
    let bearer = header::HeaderValue::from_str(&format!("Bearer {secret}")).expect("header");
    let router = match live {
        Some(live) => graft_http::router_with(node, trust, live),
        None => graft_http::router(node, trust),
    };
    support::with_host(router).layer(axum::middleware::map_request(
        move |mut req: Request<Body>| {
            let bearer = bearer.clone();
            async move {
                req.headers_mut().insert(header::AUTHORIZATION, bearer);
                req
            }
        },
    ))
}

/// One sample of the exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the whole Prometheus text exposition; panics on any line that is
/// not a comment, a sample or `# EOF`, so a malformed output fails.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut typed = BTreeMap::new();
    for line in text.lines() {
        if line == "# EOF" || line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            assert!(
                ["counter", "gauge", "histogram", "info"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = if value == "+Inf" {
            f64::INFINITY
        } else {
            value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"))
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").expect("label pair");
            map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
        }
        assert!(
            typed.keys().any(|t| name.starts_with(t.as_str())),
            "sample without TYPE: {line}"
        );
        out.push((name.to_owned(), map, value));
    }
    out
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

async fn scrape(router: &Router) -> (String, Vec<Sample>) {
    let req = Request::get("/metrics").body(Body::empty()).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let samples = parse_exposition(&text);
    (text, samples)
}

/// Scrapes until `ok` holds (the feed polls every 100 ms), or fails.
async fn scrape_until(router: &Router, what: &str, ok: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (text, samples) = scrape(router).await;
        if ok(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "{what} never held:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_move_with_reloads_crashes_refusals_and_requests() {
    let api = Api::new();
    api.counter_app("m").await;
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/m/reload",
            json!({ "modules": { "counter": counter_v(2) } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = api.call("m", "counter", json!("crash")).await;
    assert!(!s.is_success(), "a crash answers an error");
    let samples = scrape_until(&api.as_admin(), "reload and crash counted", |s| {
        value(
            s,
            "graft_reloads_total",
            &[("sandbox", "m"), ("result", "reload")],
        ) == Some(1.0)
            && value(s, "graft_process_crashes_total", &[("sandbox", "m")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        value(
            &samples,
            "graft_reload_duration_seconds_count",
            &[("sandbox", "m")]
        ),
        Some(1.0)
    );
    assert!(
        value(
            &samples,
            "graft_reload_duration_seconds_sum",
            &[("sandbox", "m")]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        value(
            &samples,
            "graft_module_info",
            &[("sandbox", "m"), ("module", "counter"), ("version", "2")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "graft_module_info",
            &[("module", "counter"), ("version", "1")]
        ),
        None,
        "the old version's series is gone"
    );
    // The supervisor restarted the counter: one process each.
    assert_eq!(
        value(&samples, "graft_processes", &[("sandbox", "m")]),
        Some(2.0)
    );
    assert!(
        value(&samples, "graft_sandbox_memory_bytes", &[("sandbox", "m")]).unwrap() > 100_000.0
    );
    assert_eq!(value(&samples, "graft_sandboxes", &[]), Some(1.0));
    assert_eq!(
        value(
            &samples,
            "graft_http_requests_total",
            &[
                ("route", "/api/v1/sandboxes/{id}/reload"),
                ("status", "200")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "graft_http_requests_total",
            &[("route", "/api/v1/sandboxes"), ("status", "201")]
        ),
        Some(1.0)
    );
    // Bounded labels: no pid, no raw path.
    for (name, labels, _) in &samples {
        assert!(!labels.contains_key("pid"), "{name} {labels:?}");
        for v in labels.values() {
            assert!(!v.contains('<') && !v.contains("/m/"), "{name} {labels:?}");
        }
    }
    // An abort counts as a result of its own; an unmatched route is one label.
    let (s, _) = api
        .post(
            "/api/v1/sandboxes/m/reload",
            json!({ "modules": { "counter": "return {" } }),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let _ = api.get("/no/such/path/12345").await;
    let samples = scrape_until(&api.as_admin(), "abort counted", |s| {
        value(
            s,
            "graft_reloads_total",
            &[("sandbox", "m"), ("result", "abort")],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        value(
            &samples,
            "graft_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        Some(1.0)
    );
    // A deleted sandbox's series disappear.
    let (s, _) = api.delete("/api/v1/sandboxes/m").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let samples = scrape_until(&api.as_admin(), "series of a deleted sandbox gone", |s| {
        value(s, "graft_reloads_total", &[("sandbox", "m")]).is_none()
    })
    .await;
    assert_eq!(
        value(&samples, "graft_processes", &[("sandbox", "m")]),
        None
    );
    assert_eq!(
        value(&samples, "graft_module_info", &[("sandbox", "m")]),
        None
    );
}

#[tokio::test]
async fn refused_messages_are_counted_as_mailbox_full() {
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
    let router = api.as_admin();
    let busy = tokio::spawn(async move {
        let body = json!({ "to": "c", "request": { "sleep": 400 } }).to_string();
        let req = Request::post("/api/v1/sandboxes/mb/call")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        router.oneshot(req).await.unwrap().status()
    });
    // Wait until the process is inside the slow callback.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, ps) = api.get("/api/v1/sandboxes/mb/processes").await;
        if ps[0]["status"] == "running" || ps[0]["messages_handled"].as_u64() >= Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "{ps}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut refused = 0;
    while refused < 2 {
        let (s, _) = api
            .post(
                "/api/v1/sandboxes/mb/cast",
                json!({ "to": "c", "message": 1 }),
            )
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
        assert!(Instant::now() < deadline, "no cast was refused");
    }
    assert_eq!(busy.await.unwrap(), StatusCode::OK);
    let (_, samples) = scrape(&api.as_admin()).await;
    assert!(
        value(&samples, "graft_mailbox_full_total", &[("sandbox", "mb")]).unwrap() >= 2.0,
        "{samples:?}"
    );
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn the_stream_follows_reloads_filters_and_resumes_by_last_event_id() {
    let api = Api::new();
    api.counter_app("s1").await;
    api.counter_app("s2").await;
    let mut all = Frames::open(&api.as_admin(), "/api/v1/events/stream?after=0", &[]).await;
    let mut only = Frames::open(
        &api.as_admin(),
        "/api/v1/events/stream?after=0&sandbox=s1&kind=reload,rollback",
        &[],
    )
    .await;
    for (sb, n) in [("s1", 2), ("s2", 3), ("s1", 4)] {
        let (s, v) = api
            .post(
                &format!("/api/v1/sandboxes/{sb}/reload"),
                json!({ "modules": { "counter": counter_v(n) } }),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    // Everything, in seq order, no seq twice.
    let mut seen = Vec::new();
    let mut reload_ids = Vec::new();
    while reload_ids.len() < 3 {
        let (id, kind, e) = all.next_event(WAIT).await.expect("an event in time");
        assert_eq!(kind, "message");
        assert_eq!(e["seq"], id);
        if e["kind"] == "reload" {
            reload_ids.push(id);
        }
        seen.push(id);
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // The filtered stream: s1's two reloads only.
    let (a, _, ea) = only.next_event(WAIT).await.unwrap();
    let (b, _, eb) = only.next_event(WAIT).await.unwrap();
    assert_eq!(
        (ea["sandbox"].as_str(), ea["kind"].as_str()),
        (Some("s1"), Some("reload"))
    );
    assert_eq!(ea["detail"]["modules"][0]["to"], 2);
    assert_eq!(eb["detail"]["modules"][0]["to"], 3);
    assert!(a < b);
    assert!(only.next_event(Duration::from_millis(300)).await.is_none());
    // Resume after the first reload: exactly the later ones, no duplicate.
    let mut resumed = Frames::open(
        &api.as_admin(),
        "/api/v1/events/stream?kind=reload",
        &[("last-event-id", a.to_string())],
    )
    .await;
    // (Sandboxes polled in one round merge in any order between them; each
    // sandbox's own order holds.)
    let later: Vec<u64> = reload_ids.iter().copied().filter(|&id| id > a).collect();
    assert_eq!(later.len(), 2);
    assert!(later.contains(&b));
    for want in later {
        let (id, _, e) = resumed.next_event(WAIT).await.unwrap();
        assert_eq!(id, want);
        assert_eq!(e["kind"], "reload");
    }
    assert!(resumed
        .next_event(Duration::from_millis(300))
        .await
        .is_none());
    // Live: an event after the stream opened arrives.
    let (s, _) = api.call("s2", "counter", json!("crash")).await;
    assert!(!s.is_success());
    let (_, _, crash) = resumed_live(&api.as_admin()).await;
    assert_eq!(crash["kind"], "crash");
}

async fn resumed_live(router: &Router) -> (u64, String, Value) {
    let mut f = Frames::open(router, "/api/v1/events/stream?tail=50&kind=crash", &[]).await;
    f.next_event(WAIT).await.expect("the crash")
}

#[tokio::test]
async fn idle_streams_get_keep_alive_comments() {
    let node = Node::with_threads(1);
    let live = graft_http::Live::with_keep_alive(node.clone(), Duration::from_millis(100));
    let router = authed(node, Some(live));
    let mut f = Frames::open(&router, "/api/v1/events/stream", &[]).await;
    let raw = f.next_raw(WAIT).await.expect("a keep-alive in time");
    assert_eq!(raw.trim_start_matches(':').trim(), "keep-alive");
}

#[tokio::test]
async fn a_stalled_reader_is_told_of_the_gap() {
    let node = Node::with_threads(1);
    // A fake event source that pruned the events a reader wants.
    let feed = std::sync::Arc::new(graft_http::live::feed::Feed::default());
    let live = graft_http::Live::with_source(node.clone(), feed.clone(), Duration::from_secs(15));
    let router = authed(node, Some(live));
    for _ in 0..(graft_http::live::feed::KEEP_EVENTS + 20) {
        feed.push("x", 0.0, "reload", json!({}));
    }
    let mut f = Frames::open(
        &router,
        "/api/v1/events/stream",
        &[("last-event-id", 5.to_string())],
    )
    .await;
    let (id, kind, gap) = f.next_event(WAIT).await.unwrap();
    assert_eq!(kind, "gap");
    assert_eq!(gap, json!({ "after": 5, "up_to": 20 }));
    assert_eq!(id, 20);
    let (next, kind, _) = f.next_event(WAIT).await.unwrap();
    assert_eq!((next, kind.as_str()), (21, "message"));
}

#[tokio::test]
async fn the_stream_refuses_hostile_queries() {
    let api = Api::new();
    for uri in [
        "/api/v1/events/stream?after=-3",
        "/api/v1/events/stream?after=abc",
        "/api/v1/events/stream?kind=DROP%20TABLE",
        "/api/v1/events/stream?sandbox=..%2F..",
        "/api/v1/events/stream?pid=1",
        "/api/v1/events/stream?tail=100000000",
        "/api/v1/events/stream?kind=%ZZ",
        "/api/v1/events/stream?after=1&after=2",
        "/api/v1/events/stream?sandbox=a&sandbox=b",
        "/api/v1/events/stream?tail=1&tail=2",
        "/api/v1/events/stream?kind=",
        "/api/v1/events/stream?kind=,,",
    ] {
        let resp = api.get(uri).await;
        assert_eq!(resp.0.as_u16(), 400, "{uri}: {}", resp.1);
        assert!(resp.1["error"]["message"].as_str().unwrap().len() < 300);
    }
    let req = Request::get("/api/v1/events/stream")
        .header("last-event-id", "not-a-number")
        .body(Body::empty())
        .unwrap();
    let resp = api.as_admin().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let req = Request::get("/api/v1/events/stream")
        .header("last-event-id", "1")
        .header("last-event-id", "2")
        .body(Body::empty())
        .unwrap();
    let resp = api.as_admin().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "two Last-Event-IDs");
    let (s, _) = api
        .raw(Method::POST, "/api/v1/events/stream", Vec::new())
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn the_tree_shows_supervisors_children_and_crashes() {
    let api = Api::new();
    api.counter_app("t").await;
    let (s, _) = api.call("t", "counter", json!("crash")).await;
    assert!(!s.is_success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let tree = loop {
        let (s, tree) = api.get("/api/v1/sandboxes/t/tree").await;
        assert_eq!(s, StatusCode::OK, "{tree}");
        if tree["supervisors"][0]["children"][0]["crashes"] == 1 {
            break tree;
        }
        assert!(Instant::now() < deadline, "{tree}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(tree["roots"].as_array().unwrap().len(), 1);
    let sup = &tree["supervisors"][0];
    assert_eq!(sup["module"], "app");
    assert_eq!(sup["strategy"], "one_for_one");
    assert_eq!(sup["recent_restarts"], 1);
    let child = &sup["children"][0];
    assert_eq!(child["id"], "counter");
    assert_eq!(child["running"], true);
    assert_eq!(child["restarts"], 1, "{tree}");
    // A second crash: the supervisor's own per-child count follows.
    let (s, _) = api.call("t", "counter", json!("crash")).await;
    assert!(!s.is_success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, tree) = api.get("/api/v1/sandboxes/t/tree").await;
        let child = &tree["supervisors"][0]["children"][0];
        if child["restarts"] == 2 && child["running"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "{tree}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tree["truncated"], false);
}

#[tokio::test]
async fn the_tree_refuses_bad_and_unknown_sandboxes() {
    let api = Api::new();
    assert_error(
        &api.get("/api/v1/sandboxes/..%2Fx/tree").await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        &api.get("/api/v1/sandboxes/nope/tree").await,
        StatusCode::NOT_FOUND,
        "no_sandbox",
    );
    let (s, _) = api
        .raw(Method::DELETE, "/api/v1/sandboxes/nope/tree", Vec::new())
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn the_dashboard_is_served_small_and_locked_down() {
    let api = Api::new();
    let mut total = 0;
    for (path, ty) in [
        ("/", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
    ] {
        let resp = api
            .router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(ty));
        assert!(h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("default-src 'self'"));
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
        total += resp.into_body().collect().await.unwrap().to_bytes().len();
    }
    assert!(total < 300 * 1024, "first load is {total} bytes");
    let (s, _) = api.raw(Method::POST, "/", Vec::new()).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let (s, _) = api.get("/assets/../Cargo.toml").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_events_page_lists_node_events_with_filters() {
    let api = Api::new();
    api.counter_app("p1").await;
    api.counter_app("p2").await;
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/p2/reload",
            json!({ "modules": { "counter": counter_v(5) } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, page) = api.get("/api/v1/events?sandbox=p2&kind=reload").await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{page}");
    assert_eq!(events[0]["sandbox"], "p2");
    assert!(page["last_seq"].as_u64().unwrap() >= events[0]["seq"].as_u64().unwrap());
    let (_, all) = api.get("/api/v1/events?after=0").await;
    let seqs: Vec<u64> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]) && seqs.len() >= 3,
        "{all}"
    );
    let kinds: Vec<&str> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"sandbox_created"), "{kinds:?}");
    // A page cut short by its limit resumes after its last event, not at
    // the head (the events after it were not sent).
    let (_, one) = api.get("/api/v1/events?after=0&tail=1").await;
    assert_eq!(one["events"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["last_seq"], one["events"][0]["seq"], "{one}");
    let (_, next) = api
        .get(&format!("/api/v1/events?after={}", one["last_seq"]))
        .await;
    assert_eq!(next["events"][0]["seq"], seqs[1], "{next}");
    // A position past the newest event (another node's, or one from before
    // an ephemeral node restarted) is said to be so, and this log is read
    // from its start.
    let (s, reset) = api.get("/api/v1/events?after=18446744073709551615").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(reset["gap"]["reset"], true, "{reset}");
    assert_eq!(reset["events"][0]["seq"], seqs[0], "{reset}");
    for bad in [
        "/api/v1/events?after=18446744073709551616",
        "/api/v1/events?after=x",
        "/api/v1/events?tail=-1",
        "/api/v1/events?kind=A",
        "/api/v1/events?limit=5",
    ] {
        let (s, v) = api.get(bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_resumes_by_last_event_id_across_a_node_restart() {
    let dir = std::env::temp_dir().join(format!("graft-live-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let open = |dir: &std::path::Path| {
        Node::builder()
            .threads(2)
            .checkpoint_ms(0)
            .data_dir(dir)
            .open()
            .expect("open the node")
    };
    let create = json!({ "id": "d", "modules": { "app": support::APP, "counter": COUNTER } });
    let last = {
        let node = open(&dir);
        let router = authed(node.clone(), None);
        let (s, v) = post(&router, "/api/v1/sandboxes", create).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (s, v) = post(
            &router,
            "/api/v1/sandboxes/d/reload",
            json!({ "modules": { "counter": counter_v(2) } }),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let mut f = Frames::open(&router, "/api/v1/events/stream?kind=reload&after=0", &[]).await;
        let (id, _, _) = f.next_event(WAIT).await.expect("the first reload");
        let n = node.clone();
        tokio::task::spawn_blocking(move || n.shutdown())
            .await
            .unwrap();
        id
    };
    let node = open(&dir);
    let router = authed(node.clone(), None);
    let (s, v) = post(
        &router,
        "/api/v1/sandboxes/d/reload",
        json!({ "modules": { "counter": counter_v(3) } }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut f = Frames::open(
        &router,
        "/api/v1/events/stream?kind=reload",
        &[("last-event-id", last.to_string())],
    )
    .await;
    let (id, kind, e) = f
        .next_event(WAIT)
        .await
        .expect("the reload after the restart");
    assert_eq!(kind, "message");
    assert!(id > last, "{id} after {last}");
    assert_eq!(e["detail"]["modules"][0]["to"], 3, "{e}");
    assert!(
        f.next_event(Duration::from_millis(300)).await.is_none(),
        "no duplicate"
    );
    let n = node.clone();
    tokio::task::spawn_blocking(move || n.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn post(router: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A router over `node` with `live`, and two viewer tokens' secrets.
fn with_two_viewers(node: Node, live: graft_http::Live) -> (Router, String, String) {
    use graft_http::trust::{Role, Trust};
    let store = std::sync::Arc::new(graft::store::Store::in_memory().expect("store"));
    let trust = std::sync::Arc::new(Trust::new(store, Api::test_trust()).expect("trust"));
    let viewer = |t: &Trust| {
        t.create_token(Role::Viewer, None, None)
            .expect("viewer")
            .secret
    };
    let (a, b) = (viewer(&trust), viewer(&trust));
    let router = support::with_host(graft_http::router_with(node, trust, live));
    (router, a, b)
}

/// Opens `/events/stream` as `token`: the answer (holding it keeps the
/// stream, and its slot, open).
async fn open_stream(router: &Router, token: &str) -> axum::response::Response {
    let req = Request::get("/api/v1/events/stream")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    router.clone().oneshot(req).await.unwrap()
}

async fn refused(resp: axum::response::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).expect("a JSON error"),
    )
}

#[tokio::test]
async fn event_streams_are_bounded_in_all_and_per_token() {
    let node = Node::with_threads(1);
    let live = graft_http::Live::new(node.clone());
    let limits = graft_http::live::StreamLimits {
        total: 3,
        per_token: 2,
    };
    live.set_stream_limits(limits);
    assert_eq!(live.stream_limits(), limits);
    let (router, a, b) = with_two_viewers(node, live);
    let a1 = open_stream(&router, &a).await;
    let a2 = open_stream(&router, &a).await;
    assert_eq!((a1.status(), a2.status()), (StatusCode::OK, StatusCode::OK));
    // A third of a's: over the per-token bound, though the node has room.
    let resp = refused(open_stream(&router, &a).await).await;
    assert_error(&resp, StatusCode::TOO_MANY_REQUESTS, "too_many_streams");
    assert_eq!(resp.1["error"]["limit"], 2);
    let b1 = open_stream(&router, &b).await;
    assert_eq!(b1.status(), StatusCode::OK);
    // The node is full: b is refused though b has one of its two.
    let resp = refused(open_stream(&router, &b).await).await;
    assert_error(&resp, StatusCode::TOO_MANY_REQUESTS, "too_many_streams");
    assert_eq!(resp.1["error"]["limit"], 3);
    // A stream whose client leaves gives its slot back.
    drop(a1);
    let b2 = open_stream(&router, &b).await;
    assert_eq!(
        b2.status(),
        StatusCode::OK,
        "a closed stream's slot is free"
    );
    // A refused request is answered, not held: other routes still work.
    let req = Request::get("/api/v1/events?tail=1")
        .header(header::AUTHORIZATION, format!("Bearer {a}"))
        .body(Body::empty())
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop((a2, b1, b2));
}

/// An embedder may build the live parts in one runtime and serve them from
/// another after the first is gone: the relay and the counting task end
/// with their runtime and start again in the next (the stream sees new
/// events, the metrics count them once).
#[test]
fn the_live_tasks_start_again_in_a_second_runtime() {
    let node = Node::with_threads(1);
    let live = graft_http::Live::new(node.clone());
    let api = Api::with_node(node.clone());
    let router = authed(node.clone(), Some(live.clone()));
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let reloads = |samples: &[Sample]| {
        value(
            samples,
            "graft_reloads_total",
            &[("sandbox", "rt"), ("result", "reload")],
        )
    };
    let first = runtime();
    first.block_on(async {
        api.counter_app("rt").await;
        let mut f = Frames::open(&router, "/api/v1/events/stream?after=0&kind=reload", &[]).await;
        let (s, v) = api
            .post(
                "/api/v1/sandboxes/rt/reload",
                json!({ "modules": { "counter": counter_v(2) } }),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        f.next_event(WAIT).await.expect("the first reload");
        scrape_until(&router, "the first reload counted", |s| {
            reloads(s) == Some(1.0)
        })
        .await;
    });
    drop(first);
    let second = runtime();
    second.block_on(async {
        let mut f = Frames::open(&router, "/api/v1/events/stream?kind=reload", &[]).await;
        let (s, v) = api
            .post(
                "/api/v1/sandboxes/rt/reload",
                json!({ "modules": { "counter": counter_v(3) } }),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (_, _, e) = f.next_event(WAIT).await.expect("the relay runs again");
        assert_eq!(e["detail"]["modules"][0]["to"], 3);
        let samples = scrape_until(&router, "the second reload counted", |s| {
            reloads(s) == Some(2.0)
        })
        .await;
        assert_eq!(reloads(&samples), Some(2.0), "each reload counted once");
    });
    drop((router, live, api, second));
}
