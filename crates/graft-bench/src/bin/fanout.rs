//! `fanout`: what SSE clients of `GET /api/v1/events/stream` cost a reload
//! of a large sandbox (SPEC §10), against a baseline in the same run, and
//! whether every client receives every event.
//!
//! One process hosts everything, on loopback only: a node (`--threads`
//! scheduler threads, default 2) served by `graft_http::router` on
//! `127.0.0.1:0` (its own tokio runtime, `--serve-threads`, default 2), a
//! sandbox with `--procs` (10,000) server processes, and the SSE clients
//! (their own one-worker tokio runtime: like a browser, each client
//! parses the stream itself). The clients share the machine's cores with
//! the node, so the figure is an upper bound on what they cost a node whose
//! clients are elsewhere.
//!
//! The run alternates blocks of `--reloads` (40) reloads (each a new revision of
//! the module, timed from the reload call to its answer, through the
//! library API): `without` (no client connected) and `with` (`--clients`
//! (100) streams connected, each from the last event before the block, so
//! that none can miss one by connecting late), `--rounds` (8) times, so that
//! a drift of the machine's load hits both sides alike. After each `with`
//! block every client must have received, in order and once each, every
//! event the node logged during the block (read back from the node's log),
//! and no `gap` frame; otherwise the run fails.
//!
//! Usage: `fanout [--smoke] [--clients N] [--procs N] [--reloads N]
//! [--rounds N] [--threads N] [--serve-threads N]`. stdout: JSON lines
//! (`meta`, one per block, `summary` with the p50 ratio and the goal ≤ 1.05);
//! stderr: progress. Exit status 1 if a client missed an event.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graft::{block_on, EventFilter, Node, ReloadOptions, Sandbox, SandboxSpec};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// The issue's goal: reload time with the clients ≤ 1.05 × without.
const GOAL_RATIO: f64 = 1.05;
/// How long the clients get to receive a block's events once it ended.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the clients get to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

const SERVER: &str = r#"
local s = {}
function s.init(args) return { n = 0, tag = "x" } end
function s.handle_call(req, from, state) state.n += 1; return state.n, state end
function s.handle_cast(msg, state) state.n += 1; return state end
return s
"#;

struct Opts {
    clients: usize,
    procs: usize,
    reloads: usize,
    rounds: usize,
    threads: usize,
    serve_threads: usize,
    smoke: bool,
}

fn fail(msg: &str) -> ! {
    eprintln!("fanout: {msg}");
    std::process::exit(1)
}

fn opts() -> Opts {
    let mut o = Opts {
        clients: 100,
        procs: 10_000,
        reloads: 40,
        rounds: 8,
        threads: 2,
        serve_threads: 2,
        smoke: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let num = || -> usize {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| fail(&format!("{} needs a number", args[i])))
        };
        match args[i].as_str() {
            "--smoke" => {
                o.smoke = true;
                i += 1;
                continue;
            }
            "--clients" => o.clients = num(),
            "--procs" => o.procs = num(),
            "--reloads" => o.reloads = num(),
            "--rounds" => o.rounds = num(),
            "--threads" => o.threads = num(),
            "--serve-threads" => o.serve_threads = num(),
            other => fail(&format!(
                "unknown argument `{other}` (known: --smoke --clients --procs --reloads --rounds --threads --serve-threads)"
            )),
        }
        i += 2;
    }
    if o.smoke {
        o.clients = 5;
        o.procs = 100;
        o.reloads = 3;
        o.rounds = 1;
    }
    o
}

/// Serves the node's API on 127.0.0.1:0 from its own runtime; the address,
/// a viewer's `Bearer …` header and the runtime (dropping it stops it).
fn serve(node: &Node, threads: usize) -> (SocketAddr, String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("http")
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("server runtime: {e}")));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap_or_else(|e| fail(&format!("bind 127.0.0.1:0: {e}")));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("local address: {e}")));
    let store =
        Arc::new(graft::store::Store::in_memory().unwrap_or_else(|e| fail(&format!("store: {e}"))));
    let trust = Arc::new(
        graft_http::trust::Trust::new(store, Default::default())
            .unwrap_or_else(|e| fail(&format!("trust: {e}"))),
    );
    let token = trust
        .create_token(graft_http::trust::Role::Viewer, None, None)
        .unwrap_or_else(|e| fail(&format!("token: {e}")));
    let app = rt.block_on(async {
        graft_http::router(node.clone(), trust).into_make_service_with_connect_info::<SocketAddr>()
    });
    rt.spawn(async move { axum::serve(listener, app).await });
    (addr, format!("Bearer {}", token.secret), rt)
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Ids of the data frames, in arrival order.
    ids: Mutex<Vec<u64>>,
    /// `event: gap` frames.
    gaps: AtomicUsize,
    /// The highest id so far (polled by the main thread).
    high: AtomicU64,
    /// Set once the stream's answer (200) arrived.
    connected: AtomicUsize,
    /// Why the client stopped early, if it did.
    error: Mutex<Option<String>>,
}

/// Reads `GET /api/v1/events/stream?after={after}` until the runtime stops.
async fn client(addr: SocketAddr, bearer: String, after: u64, seen: Arc<Seen>) {
    if let Err(e) = read_stream(addr, &bearer, after, &seen).await {
        *seen.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

async fn read_stream(
    addr: SocketAddr,
    bearer: &str,
    after: u64,
    seen: &Seen,
) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(format!("/api/v1/events/stream?after={after}"))
        .header(HOST, "127.0.0.1")
        .header(ACCEPT, "text/event-stream")
        .header(AUTHORIZATION, bearer)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("stream answered {}", resp.status()));
    }
    seen.connected.store(1, Ordering::SeqCst);
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(cut) = buf.windows(2).position(|w| w == b"\n\n") {
            let text = String::from_utf8_lossy(&buf[..cut]).into_owned();
            buf.drain(..cut + 2);
            let (mut id, mut gap, mut has_data) = (None, false, false);
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse::<u64>().ok();
                } else if line.strip_prefix("event:").map(str::trim) == Some("gap") {
                    gap = true;
                } else if line.starts_with("data:") {
                    has_data = true;
                }
            }
            if gap {
                seen.gaps.fetch_add(1, Ordering::SeqCst);
            } else if let (Some(id), true) = (id, has_data) {
                seen.ids.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                seen.high.fetch_max(id, Ordering::SeqCst);
            }
        }
    }
    Err("the stream ended".into())
}

fn source(rev: usize) -> String {
    format!("{SERVER}\n-- revision {rev}\n")
}

/// Times `n` reloads (revisions from `*rev` on); milliseconds each.
fn reloads(sb: &Sandbox, rev: &mut usize, n: usize) -> Vec<f64> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        *rev += 1;
        let mut m = BTreeMap::new();
        m.insert("s".to_string(), source(*rev));
        let t = Instant::now();
        block_on(sb.reload(m, ReloadOptions::default()))
            .unwrap_or_else(|e| fail(&format!("reload {rev}: {e}")));
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn stats(ms: &[f64]) -> (f64, f64, f64) {
    let mut s = ms.to_vec();
    s.sort_by(f64::total_cmp);
    let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
    (percentile(&s, 0.5), percentile(&s, 0.9), mean)
}

/// Every event the node logged with `after < seq <= up_to`.
fn logged(node: &Node, after: u64, up_to: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut pos = after;
    while pos < up_to {
        let page = node.events_after(pos, &EventFilter::default(), 1000);
        if let Some(g) = page.gap {
            fail(&format!(
                "the node pruned events {}..={} during the run",
                g.after + 1,
                g.up_to
            ));
        }
        let Some(last) = page.events.last().map(|e| e.seq) else {
            break;
        };
        out.extend(page.events.iter().map(|e| e.seq).filter(|&s| s <= up_to));
        pos = last;
    }
    out
}

/// What the rounds run against: the node, its API served on loopback, and
/// the sandbox of `--procs` processes whose module is reloaded. Fields drop
/// in this order (the sandbox before the node).
struct Bench {
    sb: Sandbox,
    addr: SocketAddr,
    bearer: String,
    server: tokio::runtime::Runtime,
    node: Node,
    /// The module's revision reloaded last.
    rev: usize,
}

/// Starts the node, its API and the sandbox, warms the reload up, and
/// prints the `meta` line.
fn setup(o: &Opts) -> Bench {
    let node = Node::with_threads(o.threads);
    let (addr, bearer, server) = serve(&node, o.serve_threads);
    let sb = graft::block_on(
        node.create_sandbox(SandboxSpec::new("fan").entry(None).module("s", source(0))),
    )
    .unwrap_or_else(|e| fail(&format!("create: {e}")));
    for i in 0..o.procs {
        block_on(sb.spawn("s", json!(null), None))
            .unwrap_or_else(|e| fail(&format!("spawn {i}: {e}")));
    }
    let mut rev = 0;
    // Warm-up: the first reloads pay for allocations the rest re-use.
    reloads(&sb, &mut rev, 3.min(o.reloads));
    println!(
        "{}",
        json!({ "workload": "fanout", "kind": "meta", "clients": o.clients, "processes": o.procs,
                "reloads_per_block": o.reloads, "rounds": o.rounds, "threads": o.threads,
                "serve_threads": o.serve_threads, "smoke": o.smoke })
    );
    Bench {
        sb,
        addr,
        bearer,
        server,
        node,
        rev,
    }
}

/// What one round measured.
struct Round {
    /// Reload times without clients, then with them (ms).
    without: Vec<f64>,
    with: Vec<f64>,
    /// Events delivered, summed over the clients.
    delivered: usize,
}

/// One round: a block of reloads without clients, then one with them, each
/// printed as a `block` line; fails the run if a client missed an event.
fn run_round(o: &Opts, b: &mut Bench, round: usize) -> Round {
    let without = reloads(&b.sb, &mut b.rev, o.reloads);
    let (p50, p90, mean) = stats(&without);
    println!(
        "{}",
        json!({ "workload": "fanout", "kind": "block", "round": round, "clients": 0,
                "p50_ms": p50, "p90_ms": p90, "mean_ms": mean })
    );

    // The clients, each from the last event before the block.
    let start = *b.node.subscribe_events().borrow();
    let (rt, seen) = connect_clients(o, b, start);
    eprintln!("round {round}: {} clients connected", o.clients);

    let with = reloads(&b.sb, &mut b.rev, o.reloads);
    let (p50, p90, mean) = stats(&with);
    let end = *b.node.subscribe_events().borrow();
    let expected = logged(&b.node, start, end);
    let reload_events = b
        .node
        .events_after(start, &EventFilter::default().kind("reload"), 1000)
        .events
        .len();
    if reload_events < o.reloads {
        fail(&format!(
            "{reload_events} reload events logged for {} reloads",
            o.reloads
        ));
    }
    await_delivery(o, &seen, end);
    check_delivery(&seen, end, &expected);
    println!(
        "{}",
        json!({ "workload": "fanout", "kind": "block", "round": round, "clients": o.clients,
                "p50_ms": p50, "p90_ms": p90, "mean_ms": mean,
                "events": expected.len(), "every_client_got_every_event": true })
    );
    // Ending the clients closes their connections; the server's
    // streams end on their next write.
    rt.shutdown_timeout(Duration::from_secs(5));
    Round {
        without,
        with,
        delivered: expected.len() * o.clients,
    }
}

/// Starts `--clients` stream readers from event `start` on their own
/// runtime, and returns once every one is connected (so none misses an
/// event of the block by connecting late).
fn connect_clients(o: &Opts, b: &Bench, start: u64) -> (tokio::runtime::Runtime, Vec<Arc<Seen>>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sse-clients")
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("client runtime: {e}")));
    let seen: Vec<Arc<Seen>> = (0..o.clients).map(|_| Arc::default()).collect();
    for s in &seen {
        rt.spawn(client(b.addr, b.bearer.clone(), start, s.clone()));
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while seen.iter().any(|s| s.connected.load(Ordering::SeqCst) == 0) {
        if let Some(e) = seen
            .iter()
            .find_map(|s| s.error.lock().unwrap_or_else(|p| p.into_inner()).clone())
        {
            fail(&format!("a client failed to connect: {e}"));
        }
        if Instant::now() > deadline {
            fail("the clients did not all connect in time");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (rt, seen)
}

/// Waits until every client has received event `end`.
fn await_delivery(o: &Opts, seen: &[Arc<Seen>], end: u64) {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while seen.iter().any(|s| s.high.load(Ordering::SeqCst) < end) {
        if Instant::now() > deadline {
            let behind = seen
                .iter()
                .filter(|s| s.high.load(Ordering::SeqCst) < end)
                .count();
            fail(&format!(
                "{behind} of {} clients had not received event {end} after {DELIVERY_TIMEOUT:?}",
                o.clients
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every client got exactly the `expected` events up to `end`, in order,
/// and no `gap` frame.
fn check_delivery(seen: &[Arc<Seen>], end: u64, expected: &[u64]) {
    for (n, s) in seen.iter().enumerate() {
        let got: Vec<u64> = s
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .filter(|&id| id <= end)
            .collect();
        if got != expected || s.gaps.load(Ordering::SeqCst) > 0 {
            fail(&format!(
                "client {n} received {} events ({} gap frames), expected {} ({:?}…)",
                got.len(),
                s.gaps.load(Ordering::SeqCst),
                expected.len(),
                &expected[..expected.len().min(5)]
            ));
        }
    }
}

/// Prints the `summary` line: both sides' figures, their ratio and the goal.
fn report(o: &Opts, without: &[f64], with: &[f64], delivered_events: usize) {
    let (b50, b90, bmean) = stats(without);
    let (c50, c90, cmean) = stats(with);
    let ratio = if b50 > 0.0 { c50 / b50 } else { 0.0 };
    println!(
        "{}",
        json!({ "workload": "fanout", "kind": "summary", "clients": o.clients, "processes": o.procs,
                "reloads_each": without.len(),
                "without_p50_ms": b50, "without_p90_ms": b90, "without_mean_ms": bmean,
                "with_p50_ms": c50, "with_p90_ms": c90, "with_mean_ms": cmean,
                "ratio_p50": ratio, "ratio_mean": if bmean > 0.0 { cmean / bmean } else { 0.0 },
                "goal_ratio": GOAL_RATIO, "met": ratio <= GOAL_RATIO,
                "events_delivered": delivered_events, "every_client_got_every_event": true })
    );
}

fn main() {
    let o = opts();
    let mut bench = setup(&o);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut delivered_events = 0usize;
    for round in 0..o.rounds {
        let r = run_round(&o, &mut bench, round);
        without.extend(r.without);
        with.extend(r.with);
        delivered_events += r.delivered;
    }
    report(&o, &without, &with, delivered_events);
    drop(bench.server);
}
