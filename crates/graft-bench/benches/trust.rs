//! What trust costs per request (SPEC §9 target: an authenticated call to
//! one process at most 5% slower than without auth): one request through
//! the router (`tower::ServiceExt::oneshot`, no sockets) with the trust
//! middleware and without it (`graft_http::router_without_auth`), measured
//! in the same run, interleaved in rounds so that load changes hit both
//! alike. Reported as ratios (auth / baseline, median of the rounds).
//!
//! * `GET …/processes` (viewer; not audited): authentication, browser rules
//!   and the role check alone.
//! * `POST …/call` (operator; audited): the above plus the audit row, which
//!   is committed before the handler runs. Once with the audit log in a
//!   durable database under the target directory (a real fsync per group
//!   commit), once in an ephemeral one (no fsync), sequential and with 8
//!   requests in flight (group commit shares the fsync).
//!
//! `cargo bench -p graft-bench --bench trust`

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::Router;
use graft::store::Store;
use graft::{Node, SandboxSpec};
use graft_http::trust::{Role, Trust};
use tower::ServiceExt;

const COUNTER: &str = "local c = {}\nfunction c.init() return 0 end\nfunction c.handle_call(r, f, s) return s + 1, s + 1 end\nfunction c.handle_cast(m, s) return s end\nfunction c.handle_info(m, s) return s end\nreturn c\n";

struct Setup {
    auth: Router,
    baseline: Router,
    viewer: String,
    operator: String,
}

fn setup(node: &Node, store: Store) -> Setup {
    let trust = Arc::new(Trust::new(Arc::new(store), Default::default()).expect("trust"));
    let viewer = trust
        .create_token(Role::Viewer, None, None)
        .expect("token")
        .secret;
    let operator = trust
        .create_token(Role::Operator, None, None)
        .expect("token")
        .secret;
    Setup {
        auth: graft_http::router(node.clone(), trust.clone()),
        baseline: graft_http::router_without_auth(node.clone(), trust),
        viewer,
        operator,
    }
}

fn request(method: Method, uri: &str, token: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "127.0.0.1:7878")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::from(body.to_owned()))
        .expect("request")
}

/// Mean time of one request over `n`, `inflight` at a time.
async fn run(
    router: &Router,
    make: &(dyn Fn() -> Request<Body> + Sync),
    n: usize,
    inflight: usize,
) -> Duration {
    let started = Instant::now();
    let mut left = n;
    while left > 0 {
        let batch = left.min(inflight);
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            let r = router.clone();
            let req = make();
            tasks.push(tokio::spawn(async move {
                let resp = r.oneshot(req).await.expect("infallible");
                assert!(resp.status().is_success(), "{}", resp.status());
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        left -= batch;
    }
    started.elapsed() / n as u32
}

/// Rounds of baseline then auth; prints both means and the median ratio.
async fn compare(
    name: &str,
    s: &Setup,
    make_base: &(dyn Fn() -> Request<Body> + Sync),
    make_auth: &(dyn Fn() -> Request<Body> + Sync),
    n: usize,
    inflight: usize,
    rounds: usize,
) {
    // Warm up both paths (connections in the reader pool, caches).
    run(&s.baseline, make_base, n / 10 + 1, inflight).await;
    run(&s.auth, make_auth, n / 10 + 1, inflight).await;
    let mut ratios = Vec::new();
    let (mut base_sum, mut auth_sum) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let b = run(&s.baseline, make_base, n, inflight).await;
        let a = run(&s.auth, make_auth, n, inflight).await;
        base_sum += b;
        auth_sum += a;
        ratios.push(a.as_secs_f64() / b.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "{name:<46} baseline {:>9.1?}  auth {:>9.1?}  ratio {median:.3} (rounds: {})",
        base_sum / rounds as u32,
        auth_sum / rounds as u32,
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (n, rounds) = if full { (4000, 7) } else { (20, 1) };
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average: {}", load.trim());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let node = Node::with_threads(1);
    let mut spec = SandboxSpec::new("demo").module("counter", COUNTER);
    spec.entry = None;
    let sb = node.create_sandbox(spec).expect("sandbox");
    graft::block_on(sb.spawn("counter", serde_json::Value::Null, Some("c"))).expect("spawn");

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("trust-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let durable = setup(&node, Store::open(dir.join("graft.db")).expect("store"));
    let ephemeral = setup(&node, Store::in_memory().expect("store"));

    rt.block_on(async {
        let ps = "/api/v1/sandboxes/demo/processes";
        let call = "/api/v1/sandboxes/demo/call";
        let body = r#"{"to":"c","request":"inc"}"#;
        let s = &ephemeral;
        compare(
            "GET processes (viewer, not audited)",
            s,
            &|| request(Method::GET, ps, "", ""),
            &|| request(Method::GET, ps, &s.viewer, ""),
            n,
            1,
            rounds,
        )
        .await;
        compare(
            "POST call (operator, audited, no fsync)",
            s,
            &|| request(Method::POST, call, "", body),
            &|| request(Method::POST, call, &s.operator, body),
            n,
            1,
            rounds,
        )
        .await;
        let d = &durable;
        let n_durable = if full { n / 8 } else { n };
        compare(
            "POST call (operator, audited, fsync)",
            d,
            &|| request(Method::POST, call, "", body),
            &|| request(Method::POST, call, &d.operator, body),
            n_durable,
            1,
            rounds,
        )
        .await;
        compare(
            "POST call x8 in flight (audited, fsync)",
            d,
            &|| request(Method::POST, call, "", body),
            &|| request(Method::POST, call, &d.operator, body),
            n_durable,
            8,
            rounds,
        )
        .await;
    });
    drop(durable);
    let _ = std::fs::remove_dir_all(&dir);
}
