//! `http_spin`: a bystander sandbox's HTTP call latency while other
//! sandboxes spin forever (SPEC §7, "a busy loop anywhere").
//!
//! One process hosts everything, on loopback only:
//! * a node (`--threads` scheduler threads, default one per core) served by
//!   `graft_http::router` on `127.0.0.1:0` (a tokio runtime of
//!   `--serve-threads` workers, default 2), in-process rather than the
//!   `graft serve` binary so one run owns every thread it measures;
//! * a bystander sandbox with a registered counter process `c`;
//! * a load generator like `wrk`: `--conns` keep-alive HTTP/1.1 connections
//!   on its own single-threaded tokio runtime, each sending
//!   `POST /api/v1/sandboxes/bystander/call {"to":"c","request":"inc"}` as
//!   soon as its previous answer arrived (closed loop, so queueing inside
//!   the node shows up as latency, not as a lower send rate);
//! * for the second phase, `--spinners` sandboxes (default 4) whose process
//!   loops forever, alternately in plain Luau (`while true do end`, which the
//!   interrupt can yield) and inside a C call Luau cannot yield from (a
//!   `table.sort` comparator, a `gsub` callback; `--kinds loop,sort,...`
//!   chooses them one by one), with `handler_ms` at its
//!   maximum (60 000). A keeper thread per spinner re-spawns and re-casts
//!   after each timeout, so runs longer than a minute keep spinning.
//!
//! Phases, in one run: `baseline` (no spinners), then `spin`. Each phase
//! warms up for `--warmup-ms`, then records every request's latency (send to
//! whole body read) for `--duration-ms` or `--max-requests`, whichever ends
//! first. A request that does not answer 200 with a reply fails the run.
//!
//! Usage: `http_spin [--smoke] [--conns N] [--duration-ms N] [--warmup-ms N]
//! [--max-requests N] [--spinners N | --kinds K,...] [--threads N]
//! [--serve-threads N] [--handler-ms N] [--no-auth]`.
//! stdout: JSON lines (`meta`, one per phase, `summary` with the ratio of the
//! p99s and the goal p99 ≤ 5 ms while spinning); stderr: progress.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft::{block_on, HostFunctions, Limits, Node, Sandbox, SandboxSpec};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// The issue's goal for the bystander's p99 while sandboxes spin.
const GOAL_P99_US: f64 = 5_000.0;
/// Default `handler_ms` of the spinners: the largest a sandbox may have.
const SPIN_HANDLER_MS: u64 = 60_000;
/// How long to wait for every spinner to report that it loops.
const SPIN_START_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_PATH: &str = "/api/v1/sandboxes/bystander/call";
const CALL_BODY: &str = r#"{"to":"c","request":"inc"}"#;

const COUNTER: &str = r#"
local counter = {}
function counter.init() return { count = 0 } end
function counter.handle_call(req, from, state)
  if req == "inc" then state.count += 1 end
  return state.count, state
end
return counter
"#;

/// Tells the host it starts looping (`spinning`), then never returns on its
/// own: `loop` can be preempted between slices, `sort` and `gsub` cannot.
const SPINNER: &str = r#"
local spin = {}
function spin.init() return {} end
function spin.handle_cast(how, state)
  spinning(how)
  if how == "sort" then
    local t = {}
    for i = 1, 100 do t[i] = i end
    table.sort(t, function(a, b) while true do end end)
  elseif how == "gsub" then
    string.gsub(string.rep("x", 100), "x", function() while true do end end)
  else
    while true do end
  end
  return state
end
function spin.handle_call(req, from, state) return req, state end
return spin
"#;

/// Spinner kinds, in the order spinners are created.
const KINDS: [&str; 4] = ["loop", "sort", "loop", "gsub"];

struct Opts {
    smoke: bool,
    conns: usize,
    duration: Duration,
    warmup: Duration,
    max_requests: u64,
    /// One entry per spinner: `loop`, `sort` or `gsub`.
    kinds: Vec<&'static str>,
    threads: usize,
    serve_threads: usize,
    /// The spinners' `handler_ms` (lower it to see the keepers re-cast).
    handler_ms: u64,
    /// Serve without the trust middleware (no token check, no audit row),
    /// to tell the audit's share of the latency from the scheduler's.
    no_auth: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: http_spin [--smoke] [--conns N] [--duration-ms N] [--warmup-ms N] \
         [--max-requests N] [--spinners N | --kinds K,K,...] [--threads N] [--serve-threads N] [--handler-ms N] [--no-auth]\n\
         kinds: loop (plain Luau), sort (table.sort comparator), gsub (gsub callback)"
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut o = Opts {
        smoke,
        conns: if smoke { 4 } else { 8 },
        duration: Duration::from_millis(if smoke { 500 } else { 10_000 }),
        warmup: Duration::from_millis(if smoke { 100 } else { 1_000 }),
        max_requests: if smoke { 20_000 } else { 2_000_000 },
        kinds: default_kinds(4),
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        serve_threads: 2,
        handler_ms: SPIN_HANDLER_MS,
        no_auth: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--smoke" => {}
            "--conns" => o.conns = num().clamp(1, 1024) as usize,
            "--duration-ms" => o.duration = Duration::from_millis(num().max(1)),
            "--warmup-ms" => o.warmup = Duration::from_millis(num()),
            "--max-requests" => o.max_requests = num().max(1),
            "--spinners" => o.kinds = default_kinds(num().min(64) as usize),
            "--kinds" => o.kinds = parse_kinds(it.next().map(String::as_str).unwrap_or("")),
            "--threads" => o.threads = num().clamp(1, 256) as usize,
            "--serve-threads" => o.serve_threads = num().clamp(1, 256) as usize,
            "--handler-ms" => o.handler_ms = num().clamp(1, SPIN_HANDLER_MS),
            "--no-auth" => o.no_auth = true,
            _ => usage(),
        }
    }
    o
}

fn default_kinds(n: usize) -> Vec<&'static str> {
    (0..n).map(|i| KINDS[i % KINDS.len()]).collect()
}

fn parse_kinds(list: &str) -> Vec<&'static str> {
    let kinds: Vec<_> = list
        .split(',')
        .map(|k| {
            KINDS
                .into_iter()
                .find(|&known| known == k)
                .unwrap_or_else(|| usage())
        })
        .collect();
    if kinds.len() > 64 {
        usage()
    }
    kinds
}

/// Latencies of one phase, and what went wrong.
#[derive(Default)]
struct PhaseResult {
    latencies_us: Vec<u32>,
    /// Answered calls, warm-up included (each incremented the counter).
    answered: u64,
    elapsed: Duration,
    failures: u64,
    first_failure: Option<String>,
}

/// What every connection of a phase shares.
struct Load {
    addr: SocketAddr,
    measure_from: Instant,
    deadline: Instant,
    max_requests: u64,
    taken: AtomicU64,
}

/// One keep-alive connection sending calls back to back until the phase ends.
async fn connection(load: Arc<Load>) -> PhaseResult {
    let mut out = PhaseResult::default();
    if let Err(e) = drive(&load, &mut out).await {
        out.failures += 1;
        out.first_failure.get_or_insert(e);
    }
    out
}

async fn drive(load: &Load, out: &mut PhaseResult) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(load.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let body = Bytes::from_static(CALL_BODY.as_bytes());
    loop {
        let start = Instant::now();
        if start >= load.deadline {
            return Ok(());
        }
        let measured = start >= load.measure_from;
        if measured && load.taken.fetch_add(1, Ordering::Relaxed) >= load.max_requests {
            return Ok(());
        }
        let req = Request::post(CALL_PATH)
            .header(HOST, "127.0.0.1")
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, BEARER.get().map_or("", String::as_str))
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
        let us = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
        if status != StatusCode::OK || !bytes.starts_with(b"{\"reply\":") {
            out.failures += 1;
            out.first_failure.get_or_insert_with(|| {
                format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                )
            });
        } else {
            out.answered += 1;
            if measured {
                out.latencies_us.push(us);
            }
        }
    }
}

/// Runs one phase on a fresh single-threaded runtime (the load generator).
fn run_phase(addr: SocketAddr, o: &Opts) -> PhaseResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load generator runtime");
    let start = Instant::now();
    let load = Arc::new(Load {
        addr,
        measure_from: start + o.warmup,
        deadline: start + o.warmup + o.duration,
        max_requests: o.max_requests,
        taken: AtomicU64::new(0),
    });
    let parts = rt.block_on(async {
        let tasks: Vec<_> = (0..o.conns)
            .map(|_| tokio::spawn(connection(load.clone())))
            .collect();
        let mut parts = Vec::new();
        for t in tasks {
            parts.push(t.await.expect("connection task"));
        }
        parts
    });
    let measured_start = load.measure_from.max(start);
    let mut all = PhaseResult {
        elapsed: Instant::now().saturating_duration_since(measured_start),
        ..PhaseResult::default()
    };
    for p in parts {
        all.latencies_us.extend(p.latencies_us);
        all.answered += p.answered;
        all.failures += p.failures;
        if all.first_failure.is_none() {
            all.first_failure = p.first_failure;
        }
    }
    all.latencies_us.sort_unstable();
    all
}

/// Nearest-rank percentile of sorted latencies.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn phase_json(name: &str, r: &PhaseResult, o: &Opts, spinners: usize) -> Value {
    let n = r.latencies_us.len();
    let mean = r.latencies_us.iter().map(|&v| f64::from(v)).sum::<f64>() / n.max(1) as f64;
    json!({
        "workload": "http_spin",
        "phase": name,
        "spinners": spinners,
        "conns": o.conns,
        "requests": n,
        "failures": r.failures,
        "seconds": r.elapsed.as_secs_f64(),
        "requests_per_s": n as f64 / r.elapsed.as_secs_f64().max(1e-9),
        "mean_us": mean,
        "p50_us": percentile(&r.latencies_us, 50.0),
        "p90_us": percentile(&r.latencies_us, 90.0),
        "p99_us": percentile(&r.latencies_us, 99.0),
        "p999_us": percentile(&r.latencies_us, 99.9),
        "max_us": r.latencies_us.last().copied().unwrap_or(0),
        "smoke": o.smoke,
    })
}

/// Counts the spinners that started looping (including restarts).
#[derive(Default)]
struct SpinCount(AtomicU64);

fn spinner_sandbox(node: &Node, i: usize, handler_ms: u64, count: &Arc<SpinCount>) -> Sandbox {
    let count = count.clone();
    let host = HostFunctions::default().function("spinning", move |_| {
        count.0.fetch_add(1, Ordering::SeqCst);
        Ok(Value::Null)
    });
    let spec = SandboxSpec::new(format!("spin{i}"))
        .entry(None)
        .module("spin", SPINNER)
        .limits(Limits {
            handler_ms,
            ..Limits::default()
        });
    graft::block_on(node.create_sandbox_with(spec, host))
        .unwrap_or_else(|e| fail(&format!("spinner sandbox {i}: {e}")))
}

/// Whether an error means the sandbox is gone (the run is over).
fn gone(e: &graft::Error) -> bool {
    matches!(
        e.kind(),
        "no_sandbox" | "sandbox_stopped" | "sandbox_failed"
    )
}

/// Keeps one spinner looping: spawn `s` (fails while the previous one still
/// lives), cast it `how`, then wait on a call queued behind the loop, which
/// ends when the loop's callback times out and `s` exits. Returns the casts
/// made when the sandbox is destroyed.
fn keep_spinning(sb: Sandbox, how: &'static str, handler_ms: u64, stop: Arc<AtomicBool>) -> u64 {
    let mut casts = 0;
    while !stop.load(Ordering::Acquire) {
        let round = Instant::now();
        match block_on(sb.spawn("spin", Value::Null, Some("s"))) {
            Ok(_) => match block_on(sb.cast("s", json!(how))) {
                Ok(()) => casts += 1,
                Err(e) if gone(&e) => return casts,
                Err(_) => {}
            },
            Err(e) if gone(&e) => return casts,
            Err(_) => {} // `s` still registered: it still spins
        }
        match block_on(sb.call("s", json!("after"), Some(handler_ms * 2))) {
            Err(e) if gone(&e) => return casts,
            _ => {}
        }
        // Never a hot loop, whatever the call answered.
        if round.elapsed() < Duration::from_millis(100) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    casts
}

fn fail(msg: &str) -> ! {
    eprintln!("http_spin: {msg}");
    std::process::exit(1)
}

fn counter_sandbox(node: &Node) -> Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("bystander")
                .entry(None)
                .module("counter", COUNTER),
        ),
    )
    .unwrap_or_else(|e| fail(&format!("bystander sandbox: {e}")));
    block_on(sb.spawn("counter", Value::Null, Some("c")))
        .unwrap_or_else(|e| fail(&format!("bystander counter: {e}")));
    sb
}

/// Serves the node's API on 127.0.0.1:0 from its own runtime; returns the
/// address and the runtime (dropping it stops the server).
fn serve(node: &Node, threads: usize, no_auth: bool) -> (SocketAddr, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("http")
        .enable_all()
        .build()
        .expect("server runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap_or_else(|e| fail(&format!("bind 127.0.0.1:0: {e}")));
    let addr = listener.local_addr().expect("local address");
    // Authenticated like any client: an operator token (calls are
    // audited, in an ephemeral store).
    let store =
        Arc::new(graft::store::Store::in_memory().unwrap_or_else(|e| fail(&format!("store: {e}"))));
    let trust = Arc::new(
        graft_http::trust::Trust::new(store, Default::default())
            .unwrap_or_else(|e| fail(&format!("trust: {e}"))),
    );
    let token = trust
        .create_token(graft_http::trust::Role::Operator, None, None)
        .unwrap_or_else(|e| fail(&format!("token: {e}")));
    let _ = BEARER.set(format!("Bearer {}", token.secret));
    let router = if no_auth {
        graft_http::router_without_auth(node.clone(), trust)
    } else {
        graft_http::router(node.clone(), trust)
    };
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    rt.spawn(async move { axum::serve(listener, app).await });
    (addr, rt)
}

/// `Bearer <token>` of the served node.
static BEARER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn check_phase(name: &str, r: &PhaseResult) {
    if r.failures > 0 {
        fail(&format!(
            "{name}: {} failed requests; first: {}",
            r.failures,
            r.first_failure.as_deref().unwrap_or("?")
        ));
    }
    if r.latencies_us.is_empty() {
        fail(&format!("{name}: no request completed"));
    }
}

/// Starts the spinners and waits until each reported that it loops.
fn start_spinners(
    node: &Node,
    o: &Opts,
    count: &Arc<SpinCount>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    let keepers: Vec<_> = (o.kinds.iter().enumerate())
        .map(|(i, &how)| {
            let sb = spinner_sandbox(node, i, o.handler_ms, count);
            let handler_ms = o.handler_ms;
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("keeper{i}"))
                .spawn(move || keep_spinning(sb, how, handler_ms, stop))
                .expect("keeper thread")
        })
        .collect();
    let t = Instant::now();
    while count.0.load(Ordering::SeqCst) < o.kinds.len() as u64 {
        if t.elapsed() > SPIN_START_TIMEOUT {
            fail("the spinners did not all start looping within 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    keepers
}

/// How many non-yieldable spinners hold their sandbox right now (`info`
/// answers `busy`): each should, until its `handler_ms`.
fn stuck_now(node: &Node, o: &Opts) -> usize {
    (o.kinds.iter().enumerate())
        .filter(|(_, &how)| how != "loop")
        .filter(|(i, _)| {
            node.sandbox(&format!("spin{i}"))
                .ok()
                .and_then(|sb| block_on(sb.info()).ok())
                .is_some_and(|info| info.status == "busy")
        })
        .count()
}

fn main() {
    let o = parse_opts();
    let node = Node::with_threads(o.threads);
    let bystander = counter_sandbox(&node);
    let (addr, server) = serve(&node, o.serve_threads, o.no_auth);
    println!(
        "{}",
        json!({
            "workload": "meta",
            "bench": "http_spin",
            "graft": env!("CARGO_PKG_VERSION"),
            "threads": o.threads,
            "serve_threads": o.serve_threads,
            "conns": o.conns,
            "duration_ms": o.duration.as_millis() as u64,
            "warmup_ms": o.warmup.as_millis() as u64,
            "spinners": o.kinds.len(),
            "spinner_kinds": o.kinds,
            "handler_ms": o.handler_ms,
            "smoke": o.smoke,
        })
    );

    eprintln!("http_spin: baseline ({} connections, no spinners)", o.conns);
    let base = run_phase(addr, &o);
    let base_json = phase_json("baseline", &base, &o, 0);
    println!("{base_json}");
    check_phase("baseline", &base);

    let count = Arc::new(SpinCount::default());
    let stop = Arc::new(AtomicBool::new(false));
    eprintln!("http_spin: starting spinners {:?}", o.kinds);
    let keepers = start_spinners(&node, &o, &count, &stop);
    let stuck_before = stuck_now(&node, &o);
    eprintln!("http_spin: spin phase");
    let spin = run_phase(addr, &o);
    let stuck_after = stuck_now(&node, &o);
    let mut spin_json = phase_json("spin", &spin, &o, o.kinds.len());
    spin_json["spin_starts"] = json!(count.0.load(Ordering::SeqCst));
    spin_json["stuck_at_start"] = json!(stuck_before);
    spin_json["stuck_at_end"] = json!(stuck_after);
    println!("{spin_json}");
    check_phase("spin", &spin);

    // Every answered `inc` counted once: nothing lost or doubled under load.
    let served = block_on(bystander.call("c", json!("get"), Some(10_000)))
        .unwrap_or_else(|e| fail(&format!("final bystander call: {e}")));
    if served != json!(base.answered + spin.answered) {
        fail(&format!(
            "the bystander counted {served}, the load generator saw {} answers",
            base.answered + spin.answered
        ));
    }
    stop.store(true, Ordering::Release);
    for i in 0..o.kinds.len() {
        // Destroy does not wait for the loop; it ends the keepers' waits.
        let _ = node.destroy(&format!("spin{i}"));
    }
    let casts: u64 = keepers.into_iter().map(|k| k.join().unwrap_or(0)).sum();
    drop(server);

    let p99_base = base_json["p99_us"].as_f64().unwrap_or(f64::NAN);
    let p99_spin = spin_json["p99_us"].as_f64().unwrap_or(f64::NAN);
    println!(
        "{}",
        json!({
            "workload": "http_spin",
            "phase": "summary",
            "p99_ratio": p99_spin / p99_base,
            "p99_spin_us": p99_spin,
            "goal_p99_us": GOAL_P99_US,
            "met": p99_spin <= GOAL_P99_US,
            "spinner_casts": casts,
            "bystander_count": served,
            "smoke": o.smoke,
        })
    );
}
