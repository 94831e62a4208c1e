//! What trust costs per request (SPEC §9 target: an authenticated call to
//! one process at most 5% slower than without auth): one request through
//! the router (`tower::ServiceExt::oneshot`, no sockets) with the trust
//! middleware and without it (`graft_http::router_without_auth`), measured
//! in the same run, interleaved in rounds so that load changes hit both
//! alike. Reported as ratios (auth / baseline, median of the rounds).
//!
//! * `GET …/processes` (viewer; not audited): authentication, browser rules
//!   and the role check alone.
//! * `POST …/call` (operator) as a node runs by default: messages to
//!   processes are not audited unless the node asks (`--audit-messages`,
//!   docs/security.md §6), so this is the SPEC's target: authentication,
//!   browser rules and the role check on a call.
//! * `POST …/call` with `--audit-messages`: the above plus the audit row,
//!   committed before the handler runs (a call's effect is not in the
//!   database, so the row goes ahead), its completion queued after the
//!   answer. Once with the audit log in a durable database under the target
//!   directory (a real fsync per group commit), once in an ephemeral one
//!   (no fsync).
//! * Each with one client (latency) and 16 concurrent clients in a closed
//!   loop (throughput; group commit shares a transaction and its fsync).
//! * The audit row's commit alone, without HTTP: where the difference goes.
//!
//! `cargo bench -p graft-bench --bench trust --profile dev` (the dev profile
//! is optimized in this workspace)

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::Router;
use graft::store::{AuditRecord, Store, WriteOp};
use graft::{Node, SandboxSpec};
use graft_http::trust::{Role, Trust, TrustConfig};
use tower::ServiceExt;

const COUNTER: &str = "local c = {}\nfunction c.init() return 0 end\nfunction c.handle_call(r, f, s) return s + 1, s + 1 end\nfunction c.handle_cast(m, s) return s end\nfunction c.handle_info(m, s) return s end\nreturn c\n";

struct Setup {
    auth: Router,
    baseline: Router,
    viewer: String,
    operator: String,
    store: Arc<Store>,
}

/// A row as the middleware writes it before an audited call runs.
fn row() -> WriteOp {
    WriteOp::AppendAudit(AuditRecord {
        id: 0,
        at_ms: 1.7e12,
        token_id: Some("tok_000000000000".into()),
        role: Some("operator".into()),
        method: "POST".into(),
        route: "/api/v1/sandboxes/{id}/call".into(),
        sandbox: Some("demo".into()),
        outcome: "pending".into(),
        status: None,
        duration_us: 0,
    })
}

/// Its completion.
fn finish(id: u64) -> WriteOp {
    WriteOp::FinishAudit {
        id,
        outcome: "ok".into(),
        status: Some(200),
        duration_us: 40,
        token_id: None,
        role: None,
    }
}

fn setup(node: &Node, store: Store, audit_messages: bool) -> Setup {
    let store = Arc::new(store);
    let config = TrustConfig {
        audit_messages,
        ..TrustConfig::default()
    };
    let trust = Arc::new(Trust::new(store.clone(), config).expect("trust"));
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
        store,
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

/// Mean time of one request over `n` requests sent by `clients` clients,
/// each sending its next request when its last one is answered (closed
/// loop). With one client: the latency; with more: the inverse of the
/// throughput.
async fn run(
    router: &Router,
    make: &(dyn Fn() -> Request<Body> + Sync),
    n: usize,
    clients: usize,
) -> Duration {
    let started = Instant::now();
    let per = n.div_ceil(clients);
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let reqs: Vec<Request<Body>> = (0..per).map(|_| make()).collect();
        let r = router.clone();
        tasks.push(tokio::spawn(async move {
            for req in reqs {
                let resp = r.clone().oneshot(req).await.expect("infallible");
                assert!(resp.status().is_success(), "{}", resp.status());
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    started.elapsed() / (per * clients) as u32
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
    if !selected(name) {
        return;
    }
    // Warm up both paths (connections in the reader pool, caches).
    run(&s.baseline, make_base, n / 10 + 1, inflight).await;
    run(&s.auth, make_auth, n / 10 + 1, inflight).await;
    let mut ratios = Vec::new();
    let (mut base_sum, mut auth_sum) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        // Alternate which goes first, so that a drift in load within a
        // round does not favour one side.
        let (b, a) = if round % 2 == 0 {
            let b = run(&s.baseline, make_base, n, inflight).await;
            (b, run(&s.auth, make_auth, n, inflight).await)
        } else {
            let a = run(&s.auth, make_auth, n, inflight).await;
            (run(&s.baseline, make_base, n, inflight).await, a)
        };
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

/// Whether `name` matches the filter given on the command line (the first
/// argument that is not a flag), like criterion's: `… -- default` runs only
/// the lines whose name contains `default`.
fn selected(name: &str) -> bool {
    match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        Some(filter) => name.contains(&filter),
        None => true,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (n, rounds) = if full { (10_000, 15) } else { (20, 1) };
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
    let sb = graft::block_on(node.create_sandbox(spec)).expect("sandbox");
    graft::block_on(sb.spawn("counter", serde_json::Value::Null, Some("c"))).expect("spawn");

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("trust-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let durable = setup(
        &node,
        Store::open(dir.join("graft.db")).expect("store"),
        true,
    );
    let ephemeral = setup(&node, Store::in_memory().expect("store"), true);
    let default = setup(&node, Store::in_memory().expect("store"), false);

    rt.block_on(async {
        let ps = "/api/v1/sandboxes/demo/processes";
        let call = "/api/v1/sandboxes/demo/call";
        let body = r#"{"to":"c","request":"inc"}"#;
        let s = &ephemeral;
        let d = &durable;
        let o = &default;
        let n_durable = if full { n / 10 } else { n };
        for clients in [1, 16] {
            compare(
                &format!("GET processes (viewer, not audited) x{clients}"),
                s,
                &|| request(Method::GET, ps, "", ""),
                &|| request(Method::GET, ps, &s.viewer, ""),
                n,
                clients,
                rounds,
            )
            .await;
            compare(
                &format!("POST call (operator, default) x{clients}"),
                o,
                &|| request(Method::POST, call, "", body),
                &|| request(Method::POST, call, &o.operator, body),
                n,
                clients,
                rounds,
            )
            .await;
            compare(
                &format!("POST call (audited, no fsync) x{clients}"),
                s,
                &|| request(Method::POST, call, "", body),
                &|| request(Method::POST, call, &s.operator, body),
                n,
                clients,
                rounds,
            )
            .await;
            compare(
                &format!("POST call (audited, fsync) x{clients}"),
                d,
                &|| request(Method::POST, call, "", body),
                &|| request(Method::POST, call, &d.operator, body),
                n_durable,
                clients,
                rounds,
            )
            .await;
        }
        // Where an audited call's extra time goes: the write-ahead row's
        // commit alone (a round trip to the store's writer thread and one
        // transaction), and the same with its completion queued lazily.
        if !selected("audit row alone") {
            return;
        }
        for (name, store) in [
            ("no fsync", &s.store),
            ("fsync", &d.store),
            ("no fsync, again", &s.store),
            ("fsync, again", &d.store),
        ] {
            let count = if name.starts_with("fsync") {
                n_durable
            } else {
                n
            };
            let t = Instant::now();
            for _ in 0..count {
                store.write_async(vec![row()]).await.expect("audit row");
            }
            let ahead = t.elapsed() / count as u32;
            let t = Instant::now();
            for _ in 0..count {
                let r = store.write_async(vec![row()]).await.expect("audit row");
                if let Some(graft::store::Applied::Audit { id }) = r.applied.first() {
                    drop(store.write_lazy(vec![finish(*id)]));
                }
            }
            let both = t.elapsed() / count as u32;
            println!(
                "audit row alone ({name}): write-ahead commit {ahead:>9.1?}; with its lazy completion {both:>9.1?}"
            );
        }
    });
    drop(durable);
    let _ = std::fs::remove_dir_all(&dir);
}
