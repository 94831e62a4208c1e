//! Storage-layer figures (SPEC §8 targets): the commit latency of one small
//! durable write (what a durable reload adds; target p50 ≤ 2 ms), group
//! commit throughput with 8 concurrent writers, and the write time of a
//! 10,000-row checkpoint batch (target ≤ 100 ms). The database lives under
//! the target directory (a real disk: fsync is real, unlike tmpfs).
//!
//! `cargo bench -p graft-bench --bench store`

use std::sync::Arc;
use std::time::{Duration, Instant};

use graft::store::{CheckpointRecord, NewEvent, SandboxRecord, Store, WriteOp};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn event(n: u64) -> WriteOp {
    WriteOp::AppendEvent(NewEvent {
        seq: None,
        sandbox: Some("bench".into()),
        kind: "reload".into(),
        payload_json: format!(r#"{{"module":"app","from":{n},"to":{}}}"#, n + 1),
        at_ms: n as f64,
    })
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then
    // only a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("store-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(Store::open(dir.join("graft.db")).expect("open"));
    store
        .write(vec![WriteOp::PutSandbox(SandboxRecord {
            id: "bench".into(),
            entry: None,
            limits_json: "{}".into(),
            capabilities: vec![],
            source_root: None,
            spec_json: "{}".into(),
            created_ms: 0.0,
        })])
        .expect("sandbox");
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average: {}", load.trim());
    }

    // 1. One small write at a time: commit latency.
    let n = if full { 2000 } else { 20 };
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        store.write(vec![event(i as u64)]).expect("write");
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    println!(
        "single small write, commit latency over {n}: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat[lat.len() - 1]
    );

    // 2. Eight concurrent writers: group commit throughput.
    let per = if full { 500 } else { 10 };
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    store
                        .write(vec![event((w * per + i) as u64)])
                        .expect("write");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("writer"))
        .collect();
    let elapsed = t.elapsed();
    lat.sort_unstable();
    println!(
        "8 concurrent writers × {per}: {:.0} commits/s acknowledged, latency p50 {:?}  p99 {:?}",
        (8 * per) as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );

    // 3. A checkpoint of 10,000 registered processes in one write.
    let rounds = if full { 10 } else { 1 };
    let mut times = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let rows: Vec<CheckpointRecord> = (0..10_000)
            .map(|i| CheckpointRecord {
                name: format!("worker_{i}"),
                module: "worker".into(),
                module_version: r as u32 + 1,
                state_json: format!(
                    r#"{{"count":{},"name":"worker_{i}","items":[1,2,3]}}"#,
                    i * r
                ),
                at_ms: r as f64,
            })
            .collect();
        let t = Instant::now();
        store
            .write(vec![WriteOp::PutCheckpoints {
                sandbox: "bench".into(),
                rows,
                removed: vec![],
            }])
            .expect("checkpoint");
        times.push(t.elapsed());
    }
    times.sort_unstable();
    println!(
        "10,000-row checkpoint batch over {rounds}: p50 {:?}  max {:?}",
        percentile(&times, 0.5),
        times[times.len() - 1]
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
