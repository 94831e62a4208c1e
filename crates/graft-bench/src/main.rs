//! `graft-bench`: whole-workload benchmarks of Graft, one JSON object per line
//! on stdout (the same shape as `bench/otp/run.sh`), so `bench/compare.py`
//! can put both in one table.
//!
//! Usage: `graft-bench [--smoke] [WORKLOAD…]`. Workloads: spawn_idle,
//! call_host (emits `call_host` for `Sandbox::call` and `call_host_blocking`
//! for `Sandbox::call_blocking`; `call_host_blocking` alone runs only the
//! latter), call_proc, reload, reload_empty, reload_empty_server,
//! sandbox_create, batch_reload, idle_1m, baseline. Memory figures count
//! every allocation (a counting global allocator; mlua allocates the Luau
//! heap through it too, so the Luau heap is a part of the figure, not added
//! to it), so nothing is hidden.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::Instant;

use graft::{block_on, Limits, Node, ReloadOptions, Sandbox, SandboxSpec};
use serde_json::json;

struct Counting;
static ALLOCATED: AtomicIsize = AtomicIsize::new(0);
/// Whether allocations are counted now. Off while a workload is timed: the
/// shared counter is one more contended cache line per allocation (about
/// 0.1 µs per spawn on two threads), a cost of the benchmark, not of Graft.
static COUNTING: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATED.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATED.fetch_sub(l.size() as isize, Ordering::Relaxed);
        }
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATED.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        }
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated (net) while counting was on. Only differences taken
/// inside one [`Counted`] window mean anything.
fn allocated() -> isize {
    ALLOCATED.load(Ordering::Relaxed)
}

/// Counts allocations while alive (a memory measurement, never a timing).
struct Counted;

impl Counted {
    fn start() -> Counted {
        COUNTING.store(true, Ordering::SeqCst);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        COUNTING.store(false, Ordering::SeqCst);
    }
}

pub const COUNTER_V1: &str = r#"
local counter = {}
function counter.init(args) return { count = 0 } end
function counter.handle_call(req, from, state)
  state.count += 1
  return state.count, state
end
function counter.handle_cast(msg, state) return state end
return counter
"#;

pub const COUNTER_V2: &str = r#"
local counter = {}
function counter.init(args) return { count = 0, step = 10 } end
function counter.handle_call(req, from, state)
  state.count += state.step
  return state.count, state
end
function counter.handle_cast(msg, state) return state end
function counter.code_change(old_vsn, state, extra)
  state.step = 10
  return state
end
return counter
"#;

// Calls by pid, as OTP's bench_caller does (the name is resolved once).
const CALLER: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(n, from, state)
    local counter = graft.whereis("counter")
    local t0 = os.clock()
    for i = 1, n do graft.call(counter, "inc") end
    return (os.clock() - t0) * 1e9 / n, state
  end,
}
"#;

fn emit(v: serde_json::Value) {
    println!("{v}");
}

fn spec(id: &str, max_processes: usize) -> SandboxSpec {
    SandboxSpec::new(id)
        .entry(None)
        .grant("clock")
        .module("counter", COUNTER_V1)
        .module("caller", CALLER)
        .limits(Limits {
            max_processes,
            memory_bytes: 4 << 30,
            handler_ms: graft::config::MAX_HANDLER_MS,
            ..Limits::default()
        })
}

fn spawn_many(sb: &Sandbox, n: usize) -> f64 {
    // Spawned from inside the sandbox, like OTP's benchmark spawns from an Erlang process.
    let r = block_on(sb.eval(&format!(
        "local t0 = os.clock() for i = 1, {n} do graft.spawn('counter', nil) end return (os.clock() - t0) * 1e9 / {n}"
    )))
    .expect("spawn loop");
    r.as_f64().unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Spawns `n` processes in each of `runs` fresh sandboxes (destroyed in
/// between, as OTP's harness kills its processes between runs) and reports
/// the median, then measures memory in one more sandbox.
fn spawn_idle(node: &Node, n: usize, runs: usize) {
    // Timed and measured in separate fresh sandboxes: the timing without the
    // allocation counter, the memory with it.
    let id = format!("spawn{n}");
    let mut times = Vec::new();
    for _ in 0..runs {
        let sb = graft::block_on(node.create_sandbox(spec(&id, n + 10))).unwrap();
        times.push(spawn_many(&sb, n));
        node.destroy(&id).unwrap();
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    // The first run touches fresh memory (page faults); later runs reuse
    // what the allocator kept, as OTP's later runs do.
    let first = times.first().copied().unwrap_or(f64::NAN);
    let per_spawn_ns = median(times);
    // `Node::destroy` leaves a VM whose slice is still ending to its
    // scheduler thread, which drops it moments later: let that happen
    // before counting, or its frees would be subtracted from this figure.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let sb = graft::block_on(node.create_sandbox(spec(&id, n + 10))).unwrap();
    let lua_before = block_on(sb.info()).unwrap().memory_bytes as isize;
    let counted = Counted::start();
    let rust_before = allocated();
    spawn_many(&sb, n);
    let rust_after = allocated();
    drop(counted);
    let lua_after = block_on(sb.info()).unwrap().memory_bytes as isize;
    // mlua allocates the Luau heap through Rust's global allocator, so the
    // counter's growth is the whole cost; the Luau heap is a part of it.
    let total = (rust_after - rust_before) as f64 / n as f64;
    let luau = (lua_after - lua_before) as f64 / n as f64;
    emit(json!({
        "workload": "spawn_idle", "n": n, "runs": runs, "per_op_ns": per_spawn_ns,
        "per_op_ns_best": best, "per_op_ns_first": first,
        "memory_per_process_bytes": total,
        "luau_heap_per_process_bytes": luau,
        "rust_heap_per_process_bytes": total - luau,
    }));
    node.destroy(&id).unwrap();
}

fn call_host(node: &Node, m: usize) {
    host_calls(node, m, "call_host", |sb| {
        block_on(sb.call("counter", json!("inc"), None)).unwrap();
    });
}

/// The calls of [`call_host`] through the synchronous API, which runs the
/// handler on this thread while the sandbox is idle.
fn call_host_blocking(node: &Node, m: usize) {
    host_calls(node, m, "call_host_blocking", |sb| {
        sb.call_blocking("counter", json!("inc"), None).unwrap();
    });
}

/// Times `m` host calls (`call`) to a counter process, five times, and
/// emits the median per call: OTP's `call_host` is the median of five runs
/// of as many calls, and one run alone moves with the machine's noise.
fn host_calls(node: &Node, m: usize, workload: &str, call: impl Fn(&Sandbox)) {
    let sb = graft::block_on(node.create_sandbox(spec("callhost", 100))).unwrap();
    block_on(sb.spawn("counter", json!(null), Some("counter"))).unwrap();
    for _ in 0..1000 {
        call(&sb);
    }
    let runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..m {
                call(&sb);
            }
            t.elapsed().as_nanos() as f64 / m as f64
        })
        .collect();
    emit(json!({ "workload": workload, "m": m, "per_op_ns": median(runs), "stat": "median of 5" }));
    node.destroy("callhost").unwrap();
}

fn call_proc(node: &Node, m: usize) {
    let sb = graft::block_on(node.create_sandbox(spec("callproc", 100))).unwrap();
    block_on(sb.spawn("counter", json!(null), Some("counter"))).unwrap();
    block_on(sb.spawn("caller", json!(null), Some("caller"))).unwrap();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let ns = block_on(sb.call("caller", json!(m), Some(600_000))).unwrap();
        runs.push(ns.as_f64().unwrap());
    }
    emit(
        json!({ "workload": "call_proc", "m": m, "per_op_ns": median(runs), "stat": "median of 5" }),
    );
    node.destroy("callproc").unwrap();
}

fn reload(node: &Node, n: usize) {
    let id = format!("reload{n}");
    let sb = graft::block_on(node.create_sandbox(spec(&id, n + 10))).unwrap();
    spawn_many(&sb, n);
    let mut runs = Vec::new();
    let mut swaps = Vec::new();
    for i in 0..5 {
        // alternate v2 variants so every run is a real change with a migration
        let src = format!("{COUNTER_V2}\n-- run {i}");
        let mut sources = BTreeMap::new();
        sources.insert("counter".to_string(), src);
        let t = Instant::now();
        let report = block_on(sb.reload(sources, ReloadOptions::default())).unwrap();
        runs.push(t.elapsed().as_micros() as f64);
        swaps.push(report.timings.swap_us as f64);
        if std::env::var_os("GRAFT_BENCH_VERBOSE").is_some() {
            eprintln!("{:?}", report.timings);
        }
        assert_eq!(report.processes_migrated, n);
    }
    let reply = block_on(sb.call("<counter.1>", json!("inc"), None));
    let _ = reply;
    emit(json!({
        "workload": "reload", "n": n, "total_us": median(runs), "swap_us": median(swaps),
        "stat": "median of 5; total_us includes compile and the request round trip",
    }));
    node.destroy(&id).unwrap();
}

fn reload_empty(node: &Node, iters: usize) {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("reloadempty")
                .entry(None)
                .module("lib", "return { v = 0 }"),
        ),
    )
    .unwrap();
    let mut total = Vec::new();
    let mut compile = Vec::new();
    let mut swap = Vec::new();
    for i in 0..iters {
        let mut sources = BTreeMap::new();
        sources.insert("lib".to_string(), format!("return {{ v = {} }}", i + 1));
        let t = Instant::now();
        let report = block_on(sb.reload(sources, ReloadOptions::default())).unwrap();
        total.push(t.elapsed().as_micros() as f64);
        compile.push(report.timings.compile_us as f64);
        swap.push(report.timings.swap_us as f64);
    }
    emit(json!({
        "workload": "reload_empty", "iters": iters, "total_us": median(total),
        "compile_us": median(compile), "swap_us": median(swap), "stat": "median",
    }));
    node.destroy("reloadempty").unwrap();
}

/// Like `reload_empty`, but the module is a whole counter server (about the size
/// of OTP's `bench_hot`, a small gen_server), still with no process running it.
fn reload_empty_server(node: &Node, iters: usize) {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("reloademptyserver")
                .entry(None)
                .module("counter", COUNTER_V2),
        ),
    )
    .unwrap();
    let mut total = Vec::new();
    let mut compile = Vec::new();
    let mut swap = Vec::new();
    for i in 0..iters {
        let src = COUNTER_V2.replace("step = 10", &format!("step = {}", i + 11));
        let mut sources = BTreeMap::new();
        sources.insert("counter".to_string(), src);
        let t = Instant::now();
        let report = block_on(sb.reload(sources, ReloadOptions::default())).unwrap();
        total.push(t.elapsed().as_micros() as f64);
        compile.push(report.timings.compile_us as f64);
        swap.push(report.timings.swap_us as f64);
        assert_eq!(report.processes_migrated, 0);
    }
    emit(json!({
        "workload": "reload_empty_server", "iters": iters, "total_us": median(total),
        "compile_us": median(compile), "swap_us": median(swap),
        "source_bytes": COUNTER_V2.len(), "stat": "median",
    }));
    node.destroy("reloademptyserver").unwrap();
}

/// Resident set size of this process (Linux), for memory the allocator
/// counts but the OS never backs (untouched parts of Luau's 16 KiB pages).
fn resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn sandbox_create(node: &Node, n: usize) {
    let create = |id: &str| {
        graft::block_on(
            node.create_sandbox(
                SandboxSpec::new(id)
                    .entry(None)
                    .module("counter", COUNTER_V1),
            ),
        )
        .unwrap()
    };
    // Create-and-destroy first: the time of a create that reuses memory.
    let mut times = Vec::new();
    for i in 0..n {
        let id = format!("warm{i}");
        let t = Instant::now();
        drop(create(&id));
        times.push(t.elapsed().as_micros() as f64);
        node.destroy(&id).unwrap();
    }
    let reused_us = median(std::mem::take(&mut times));
    // Then sandboxes that stay alive until the end: fresh memory, and the
    // resident-set growth divided by `n` is what one sandbox costs the OS.
    let mut lua_mem = Vec::new();
    let mut total_mem = Vec::new();
    let mut ids = Vec::new();
    let rss_before = resident_bytes();
    for i in 0..n {
        let id = format!("create{i}");
        // Timed with the counter on (the one workload that is): it costs
        // this figure a little, never helps it.
        let counted = Counted::start();
        let before = allocated();
        let t = Instant::now();
        let sb = create(&id);
        times.push(t.elapsed().as_micros() as f64);
        total_mem.push((allocated() - before) as f64);
        drop(counted);
        lua_mem.push(block_on(sb.info()).unwrap().memory_bytes as f64);
        ids.push(id);
    }
    let resident = match (rss_before, resident_bytes()) {
        (Some(b), Some(a)) => json!(a.saturating_sub(b) as f64 / n as f64),
        _ => json!(null),
    };
    for id in &ids {
        node.destroy(id).unwrap();
    }
    emit(json!({
        "workload": "sandbox_create", "n": n, "per_op_us": reused_us, "fresh_per_op_us": median(times),
        "luau_heap_bytes": median(lua_mem), "memory_bytes": median(total_mem),
        "resident_bytes": resident, "stat": "median",
    }));
}

fn batch_reload(node: &Node, n: usize) {
    let ids: Vec<String> = (0..n).map(|i| format!("batch{i}")).collect();
    for id in &ids {
        let sb = graft::block_on(
            node.create_sandbox(
                SandboxSpec::new(id)
                    .entry(None)
                    .module("counter", COUNTER_V1),
            ),
        )
        .unwrap();
        block_on(sb.spawn("counter", json!(null), None)).unwrap();
    }
    let mut sources = BTreeMap::new();
    sources.insert("counter".to_string(), COUNTER_V2.to_string());
    let t = Instant::now();
    let results = block_on(node.reload_batch(
        &ids,
        &sources,
        &graft::BatchOptions::default().max_concurrency(64),
    ));
    let us = t.elapsed().as_micros();
    assert!(results.iter().all(|(_, r)| r.is_ok()));
    emit(
        json!({ "workload": "batch_reload", "sandboxes": n, "total_us": us, "max_concurrency": 64 }),
    );
    for id in &ids {
        node.destroy(id).unwrap();
    }
}

fn baseline(iters: usize) {
    // A bare mlua call of a Luau function from Rust: the floor under any host call.
    let lua = mlua::Lua::new();
    let f: mlua::Function = lua
        .load("return function(s) s.count += 1 return s.count end")
        .eval()
        .unwrap();
    let t: mlua::Table = lua.load("return { count = 0 }").eval().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        let _: f64 = f.call(t.clone()).unwrap();
    }
    emit(
        json!({ "workload": "baseline_mlua_call", "m": iters, "per_op_ns": start.elapsed().as_nanos() as f64 / iters as f64 }),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(|s| s.as_str())
        .collect();
    let run = |w: &str| wanted.is_empty() || wanted.contains(&w);
    // Big sandboxes on purpose (100k processes): raise the node's memory cap.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let caps = graft::NodeLimits {
        max_sandbox_memory: 4 << 30,
        ..graft::NodeLimits::default()
    };
    let node = Node::with_limits(threads, caps);
    emit(json!({
        "workload": "meta", "graft": env!("CARGO_PKG_VERSION"), "threads": node.threads(),
        "smoke": smoke,
    }));
    let big = |full: usize, small: usize| if smoke { small } else { full };
    if run("baseline") {
        baseline(big(1_000_000, 1000));
    }
    if run("spawn_idle") {
        // As many runs as OTP's harness makes (bench/otp: 5 and 3).
        spawn_idle(&node, big(10_000, 100), 5);
        spawn_idle(&node, big(100_000, 200), 3);
    }
    if run("call_host") {
        call_host(&node, big(100_000, 100));
    }
    if run("call_host") || run("call_host_blocking") {
        call_host_blocking(&node, big(100_000, 100));
    }
    if run("call_proc") {
        call_proc(&node, big(100_000, 100));
    }
    if run("reload") {
        reload(&node, big(10_000, 100));
        reload(&node, big(100_000, 200));
    }
    if run("reload_empty") {
        reload_empty(&node, big(200, 5));
    }
    if run("reload_empty_server") {
        reload_empty_server(&node, big(200, 5));
    }
    if run("sandbox_create") {
        sandbox_create(&node, big(200, 5));
    }
    if run("batch_reload") {
        batch_reload(&node, big(1000, 10));
    }
    if run("idle_1m") {
        spawn_idle(&node, big(1_000_000, 300), 1);
    }
}
