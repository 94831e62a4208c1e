//! `http_auth`: what authentication costs an HTTP call to one process, over
//! real sockets (SPEC §9; issue goal: an authenticated call at most 5%
//! slower than without auth, "wrk or a Rust load generator, same run").
//!
//! One process, loopback only: a node with a counter process `c`, served by
//! one server runtime (`--serve-threads`, default 2) on three listeners:
//! * `base`: `graft_http::router_without_auth` (no token, no browser rules,
//!   no audit row);
//! * `auth`: `graft_http::router` as a node serves by default (an operator
//!   token; messages are not audited unless the node asks, see
//!   docs/security.md §6);
//! * `audited`: the same with `TrustConfig::audit_messages` (every call's
//!   audit row committed ahead, ephemeral store: no fsync).
//!
//! A load generator like `wrk` on its own single-threaded runtime keeps
//! `--conns` keep-alive HTTP/1.1 connections to each listener, and sends
//! `POST /api/v1/sandboxes/bench/call {"to":"c","request":"inc"}` back to
//! back (closed loop) to one listener at a time, in slices of `--slice-ms`,
//! rotating the order every round so that load drifts hit all alike. Each
//! slice gives a time per call (slice / answered calls); the ratio of a
//! round is `auth / base` (and `audited / base`); the summary is the median
//! over `--rounds` rounds.
//!
//! Usage: `http_auth [--smoke] [--rounds N] [--slice-ms N] [--conns N]
//! [--threads N] [--serve-threads N]`. stdout: JSON lines (`meta`, one per
//! target, `summary`); a call that does not answer 200 fails the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft::{block_on, Node, SandboxSpec};
use graft_http::trust::{Role, Trust, TrustConfig};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// The issue's goal for `auth / base`.
const GOAL_RATIO: f64 = 1.05;
const CALL_PATH: &str = "/api/v1/sandboxes/bench/call";
const CALL_BODY: &str = r#"{"to":"c","request":"inc"}"#;
const COUNTER: &str = r#"
local counter = {}
function counter.init() return { count = 0 } end
function counter.handle_call(req, from, state)
  state.count += 1
  return state.count, state
end
return counter
"#;

struct Opts {
    rounds: usize,
    slice: Duration,
    conns: usize,
    threads: usize,
    serve_threads: usize,
}

fn fail(msg: &str) -> ! {
    eprintln!("http_auth: {msg}");
    std::process::exit(1);
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        rounds: 21,
        slice: Duration::from_millis(250),
        conns: 8,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        serve_threads: 2,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| fail(&format!("{name} needs a number")))
        };
        match a.as_str() {
            "--smoke" => {
                o.rounds = 2;
                o.slice = Duration::from_millis(40);
                o.conns = 2;
            }
            "--rounds" => o.rounds = num("--rounds").clamp(1, 10_000) as usize,
            "--slice-ms" => o.slice = Duration::from_millis(num("--slice-ms").clamp(1, 60_000)),
            "--conns" => o.conns = num("--conns").clamp(1, 1024) as usize,
            "--threads" => o.threads = num("--threads").clamp(1, 64) as usize,
            "--serve-threads" => o.serve_threads = num("--serve-threads").clamp(1, 64) as usize,
            // Cargo passes `--bench` when run through `cargo bench`.
            "--bench" => {}
            other => fail(&format!(
                "unknown argument `{other}`; usage: http_auth [--smoke] [--rounds N] \
                 [--slice-ms N] [--conns N] [--threads N] [--serve-threads N]"
            )),
        }
    }
    o
}

/// One way of serving the node's API (a router behind the one listener,
/// picked by the `x-bench-target` header) and the `Authorization` it needs.
struct Target {
    name: &'static str,
    bearer: String,
}

/// The header that picks the router of a request (see [`serve`]).
const TARGET_HEADER: &str = "x-bench-target";

/// The ways the API is served, in the order of the `x-bench-target` index:
/// `control` is `router_without_auth` again, so its ratio to `base` is the
/// noise floor of the run (two identical routers).
const TARGETS: [&str; 4] = ["base", "auth", "audited", "control"];

/// Serves `node` the ways of [`TARGETS`] (see the module doc) behind one
/// listener, from one runtime. One listener and one set of connections for
/// every target: with a listener each, the connections of one target could
/// land on the server's threads differently from another's, which moved
/// the ratio of two identical routers by up to 5 % between runs.
fn serve(node: &Node, threads: usize) -> (SocketAddr, Vec<Target>, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("http")
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("server runtime: {e}")));
    let mut targets = Vec::new();
    let mut routers = Vec::new();
    for name in TARGETS {
        let store = Arc::new(
            graft::store::Store::in_memory().unwrap_or_else(|e| fail(&format!("store: {e}"))),
        );
        let config = TrustConfig {
            audit_messages: name == "audited",
            ..TrustConfig::default()
        };
        let trust =
            Arc::new(Trust::new(store, config).unwrap_or_else(|e| fail(&format!("trust: {e}"))));
        let token = trust
            .create_token(Role::Operator, None, None)
            .unwrap_or_else(|e| fail(&format!("token: {e}")));
        routers.push(match name {
            "base" | "control" => graft_http::router_without_auth(node.clone(), trust),
            _ => graft_http::router(node.clone(), trust),
        });
        targets.push(Target {
            name,
            bearer: format!("Bearer {}", token.secret),
        });
    }
    let routers: Arc<[axum::Router]> = routers.into();
    // The same work for every target: read one header, clone one router.
    let dispatch = tower::service_fn(move |req: axum::extract::Request| {
        let i = req
            .headers()
            .get(TARGET_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(routers.len() - 1);
        let router = routers[i].clone();
        async move { tower::ServiceExt::oneshot(router, req).await }
    });
    // The outer router adds `ConnectInfo` (the peer, for the failed-auth
    // limit) before the request reaches the router picked.
    let app = axum::Router::new()
        .fallback_service(dispatch)
        .into_make_service_with_connect_info::<SocketAddr>();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap_or_else(|e| fail(&format!("bind 127.0.0.1:0: {e}")));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("local address: {e}")));
    rt.spawn(async move { axum::serve(listener, app).await });
    (addr, targets, rt)
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends calls back to back on one connection until `until`; returns the
/// connection and how many calls were answered.
async fn calls_until(
    mut sender: SendRequest<Full<Bytes>>,
    target: usize,
    bearer: Arc<str>,
    until: Instant,
) -> Result<(SendRequest<Full<Bytes>>, u64), String> {
    let body = Bytes::from_static(CALL_BODY.as_bytes());
    let mut answered = 0;
    while Instant::now() < until {
        let req = Request::post(CALL_PATH)
            .header(HOST, "127.0.0.1")
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, &*bearer)
            .header(TARGET_HEADER, target)
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        if status != StatusCode::OK || !bytes.starts_with(b"{\"reply\":") {
            return Err(format!(
                "{status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            ));
        }
        answered += 1;
    }
    Ok((sender, answered))
}

/// One slice: every connection of a target sends for `slice`; returns the
/// time per answered call.
async fn slice(
    conns: &mut Vec<SendRequest<Full<Bytes>>>,
    target: usize,
    bearer: &Arc<str>,
    slice: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let until = started + slice;
    let tasks: Vec<_> = conns
        .drain(..)
        .map(|c| tokio::spawn(calls_until(c, target, bearer.clone(), until)))
        .collect();
    let mut answered = 0;
    for t in tasks {
        let (c, n) = t.await.map_err(|e| format!("connection task: {e}"))??;
        conns.push(c);
        answered += n;
    }
    if answered == 0 {
        return Err("no call was answered in a slice".into());
    }
    Ok(started.elapsed() / answered as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let o = parse_opts();
    let node = Node::with_threads(o.threads);
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("bench")
                .entry(None)
                .module("counter", COUNTER),
        ),
    )
    .unwrap_or_else(|e| fail(&format!("sandbox: {e}")));
    block_on(sb.spawn("counter", Value::Null, Some("c")))
        .unwrap_or_else(|e| fail(&format!("counter: {e}")));
    let (addr, targets, _server) = serve(&node, o.serve_threads);
    println!(
        "{}",
        json!({
            "meta": "http_auth",
            "rounds": o.rounds,
            "slice_ms": o.slice.as_millis() as u64,
            "conns": o.conns,
            "threads": o.threads,
            "serve_threads": o.serve_threads,
            "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        })
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("load generator runtime: {e}")));
    let per_target: Vec<Vec<Duration>> = rt
        .block_on(async {
            let mut conns = Vec::new();
            for _ in 0..o.conns {
                conns.push(connect(addr).await?);
            }
            let bearers: Vec<Arc<str>> = targets
                .iter()
                .map(|t| Arc::<str>::from(t.bearer.as_str()))
                .collect();
            // Warm up every path (allocator, caches, the store's writer).
            for (i, b) in bearers.iter().enumerate() {
                slice(&mut conns, i, b, o.slice).await?;
            }
            let mut times = vec![Vec::new(); targets.len()];
            for round in 0..o.rounds {
                for k in 0..targets.len() {
                    let i = (round + k) % targets.len();
                    times[i].push(slice(&mut conns, i, &bearers[i], o.slice).await?);
                }
            }
            Ok::<_, String>(times)
        })
        .unwrap_or_else(|e| fail(&e));
    let us = |d: &Duration| d.as_secs_f64() * 1e6;
    for (t, times) in targets.iter().zip(&per_target) {
        println!(
            "{}",
            json!({
                "target": t.name,
                "median_us_per_call": median(times.iter().map(us).collect()),
                "calls_per_s": 1e6 / median(times.iter().map(us).collect()),
            })
        );
    }
    let ratios = |i: usize| -> Vec<f64> {
        per_target[i]
            .iter()
            .zip(&per_target[0])
            .map(|(a, b)| us(a) / us(b))
            .collect()
    };
    let auth = median(ratios(1));
    let audited = median(ratios(2));
    let control = median(ratios(3));
    println!(
        "{}",
        json!({
            "summary": "http_auth",
            "auth_over_base": auth,
            "audited_over_base": audited,
            "control_over_base": control,
            "goal_auth_over_base": GOAL_RATIO,
            "goal_met": auth <= GOAL_RATIO,
        })
    );
}
