//! `durable`: what durability costs (SPEC §8), each figure against a
//! baseline measured in the same run.
//!
//! Workloads (JSON lines on stdout):
//! * `reload_durable`: reload latency of an empty sandbox and of one with
//!   `--procs` (10,000) server processes, on three nodes: no store
//!   (`Node::new`, the baseline), `ephemeral` (a temporary database) and
//!   `durable` (a data directory, fsync on every commit). Reports p50/p99 and
//!   `added_p50_ms` = durable p50 − baseline p50 (goal ≤ 2 ms).
//! * `checkpoint`: a checkpoint of `--procs` registered processes whose
//!   states all changed: time on the sandbox's thread, in all and as the
//!   longest single hold (goal ≤ 10 ms; the conversion runs in chunks), and
//!   in total (goal ≤ 100 ms); then an idle checkpoint (nothing dirty) as
//!   the baseline.
//! * `restore`: opening a node holding `--sandboxes` (100) sandboxes × 10
//!   versions × `--named` (1,000) registered processes with checkpoints
//!   (goal ≤ 2 s), against opening an empty data directory.
//!
//! Usage: `durable [--smoke] [--procs N] [--reloads N] [--sandboxes N]
//! [--named N]`. `--smoke` uses tiny sizes: it proves the workloads run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use graft::{block_on, Node, ReloadOptions, SandboxSpec};
use serde_json::json;

const SERVER: &str = r#"
local s = {}
function s.init(args) return { n = args and args.n or 0, tag = "x" } end
function s.handle_call(req, from, state) state.n += 1; return state.n, state end
function s.handle_cast(msg, state) state.n += 1; return state end
return s
"#;

struct Opts {
    smoke: bool,
    procs: usize,
    reloads: usize,
    sandboxes: usize,
    named: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        smoke: false,
        procs: 10_000,
        reloads: 200,
        sandboxes: 100,
        named: 1_000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let num = |i: usize| -> usize {
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{} needs a number", args[i]))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--smoke" => o.smoke = true,
            "--procs" => {
                o.procs = num(i);
                i += 1;
            }
            "--reloads" => {
                o.reloads = num(i);
                i += 1;
            }
            "--sandboxes" => {
                o.sandboxes = num(i);
                i += 1;
            }
            "--named" => {
                o.named = num(i);
                i += 1;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    if o.smoke {
        o.procs = 200;
        o.reloads = 10;
        o.sandboxes = 3;
        o.named = 20;
    }
    o
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("graft-bench-durable-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn source(rev: usize) -> String {
    format!("{SERVER}\n-- revision {rev}\n")
}

/// p50 and p99 (ms) of `reloads` reloads of a sandbox with `procs` processes.
fn reload_latency(node: &Node, id: &str, procs: usize, reloads: usize) -> (f64, f64) {
    let sb = graft::block_on(
        node.create_sandbox(SandboxSpec::new(id).entry(None).module("s", source(0))),
    )
    .expect("create");
    for _ in 0..procs {
        block_on(sb.spawn("s", json!(null), None)).expect("spawn");
    }
    let mut ms = Vec::with_capacity(reloads);
    for rev in 1..=reloads {
        let mut m = BTreeMap::new();
        m.insert("s".to_string(), source(rev));
        let t = Instant::now();
        block_on(sb.reload(m, ReloadOptions::default())).expect("reload");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

fn reload_durable(o: &Opts) {
    for (label, procs) in [("empty", 0usize), ("procs", o.procs)] {
        let reloads = if procs > 0 {
            o.reloads / 4 + 1
        } else {
            o.reloads
        };
        let base = Node::with_threads(2);
        let (b50, b99) = reload_latency(&base, "base", procs, reloads);
        drop(base);
        let eph = Node::builder()
            .threads(2)
            .ephemeral()
            .open()
            .expect("ephemeral");
        let (e50, e99) = reload_latency(&eph, "eph", procs, reloads);
        eph.shutdown();
        drop(eph);
        let dir = temp_dir("reload");
        let dur = Node::builder()
            .threads(2)
            .checkpoint_ms(0)
            .data_dir(&dir)
            .open()
            .expect("durable");
        let (d50, d99) = reload_latency(&dur, "dur", procs, reloads);
        dur.shutdown();
        drop(dur);
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "{}",
            json!({
                "workload": "reload_durable", "case": label, "processes": procs, "reloads": reloads,
                "baseline_p50_ms": b50, "baseline_p99_ms": b99,
                "ephemeral_p50_ms": e50, "ephemeral_p99_ms": e99,
                "durable_p50_ms": d50, "durable_p99_ms": d99,
                "added_p50_ms": d50 - b50,
                "ratio_p50": if b50 > 0.0 { d50 / b50 } else { 0.0 },
                "goal_added_p50_ms": 2.0, "met": d50 - b50 <= 2.0,
            })
        );
    }
}

/// An app supervising `args.n` registered servers named `p1` … `pN`, so
/// that a restart brings them back (and their checkpoints with them).
const APP: &str = r#"
return {
  behaviour = "supervisor",
  init = function(args)
    local children = {}
    for i = 1, args.n do
      children[i] = { id = "p" .. i, module = "s", name = "p" .. i, args = { n = i } }
    end
    return { strategy = "one_for_one", children = children }
  end,
}
"#;

/// A sandbox whose app supervises `n` registered servers `p1` … `pN`.
fn named_sandbox(node: &Node, id: &str, n: usize) -> graft::Sandbox {
    let mut spec = SandboxSpec::new(id)
        .entry(Some("app"))
        .module("app", APP)
        .module("s", source(0));
    spec.entry_args = json!({ "n": n });
    let sb = graft::block_on(node.create_sandbox(spec)).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    sb
}

fn checkpoint(o: &Opts) {
    let dir = temp_dir("checkpoint");
    let node = Node::builder()
        .threads(2)
        .checkpoint_ms(0)
        .data_dir(&dir)
        .open()
        .expect("node");
    let sb = named_sandbox(&node, "cp", o.procs);
    node.checkpoint().expect("first checkpoint");
    for i in 1..=o.procs {
        block_on(sb.cast(&format!("p{i}"), json!(1))).expect("cast");
    }
    // Every cast handled: a call to the last one is answered after them.
    block_on(sb.call(&format!("p{}", o.procs), json!(0), None)).expect("settle");
    let t = Instant::now();
    let dirty = node.checkpoint().expect("checkpoint");
    let total_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let idle = node.checkpoint().expect("idle checkpoint");
    let idle_ms = t.elapsed().as_secs_f64() * 1e3;
    node.shutdown();
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    let on_thread_ms = dirty.sandbox_thread_us as f64 / 1e3;
    let longest_ms = dirty.longest_pause_us as f64 / 1e3;
    println!(
        "{}",
        json!({
            "workload": "checkpoint", "dirty_processes": dirty.written,
            "sandbox_thread_ms": on_thread_ms, "longest_pause_ms": longest_ms, "total_ms": total_ms,
            "idle_written": idle.written, "idle_ms": idle_ms,
            "ratio_total_to_idle": if idle_ms > 0.0 { total_ms / idle_ms } else { 0.0 },
            "goal_sandbox_thread_ms": 10.0, "goal_total_ms": 100.0,
            "met": longest_ms <= 10.0 && total_ms <= 100.0,
        })
    );
}

fn restore(o: &Opts) {
    let empty_dir = temp_dir("restore-empty");
    let t = Instant::now();
    let empty = Node::builder()
        .threads(2)
        .data_dir(&empty_dir)
        .open()
        .expect("empty");
    let empty_ms = t.elapsed().as_secs_f64() * 1e3;
    empty.shutdown();
    drop(empty);
    let _ = std::fs::remove_dir_all(&empty_dir);

    let dir = temp_dir("restore");
    {
        let limits = graft::NodeLimits {
            max_sandboxes: o.sandboxes.max(1),
            ..Default::default()
        };
        let node = Node::builder()
            .threads(2)
            .checkpoint_ms(0)
            .limits(limits)
            .data_dir(&dir)
            .open()
            .expect("node");
        for s in 0..o.sandboxes {
            let sb = named_sandbox(&node, &format!("sb{s}"), o.named);
            for rev in 1..10 {
                let mut m = BTreeMap::new();
                m.insert("s".to_string(), source(rev));
                block_on(sb.reload(m, ReloadOptions::default())).expect("reload");
            }
        }
        node.checkpoint().expect("checkpoint");
        node.shutdown();
    }
    let limits = graft::NodeLimits {
        max_sandboxes: o.sandboxes.max(1),
        ..Default::default()
    };
    let t = Instant::now();
    let node = Node::builder()
        .threads(2)
        .limits(limits)
        .data_dir(&dir)
        .open()
        .expect("restore");
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        node.sandbox_ids().len(),
        o.sandboxes,
        "every sandbox restored"
    );
    // `open` returned after every app started and every checkpoint was put
    // back (and migrated where the version moved).
    let sb = node.sandbox("sb0").expect("sb0");
    let n = block_on(sb.call("p1", json!(0), None)).expect("p1 answers");
    assert!(
        n.as_i64().unwrap_or(0) >= 2,
        "p1 kept its checkpointed state: {n}"
    );
    node.shutdown();
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({
            "workload": "restore", "sandboxes": o.sandboxes, "versions": 10,
            "named_per_sandbox": o.named, "restore_ms": restore_ms,
            "empty_open_ms": empty_ms,
            "goal_ms": 2000.0, "met": restore_ms <= 2000.0,
        })
    );
}

fn main() {
    let o = opts();
    eprintln!("durable: reload latency");
    reload_durable(&o);
    eprintln!("durable: checkpoint");
    checkpoint(&o);
    eprintln!("durable: restore");
    restore(&o);
}
