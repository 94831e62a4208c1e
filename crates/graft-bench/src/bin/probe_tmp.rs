use graft::{block_on, Limits, Node, SandboxSpec};
use serde_json::json;
use std::time::{Duration, Instant};
fn main() {
    let spinners: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(4);
    let node = Node::with_threads(2);
    let by = node.create_sandbox(SandboxSpec::new("by").entry(None).module("c", r#"
      return { init = function() return {n=0} end, handle_call = function(r, f, s) s.n += 1 return s.n, s end }"#)).unwrap();
    block_on(by.spawn("c", json!(null), Some("c"))).unwrap();
    let mut keep = vec![];
    for i in 0..spinners {
        let mut l = Limits::default();
        l.handler_ms = 60000;
        let sb = node.create_sandbox(SandboxSpec::new(&format!("s{i}")).entry(None).limits(l).module("s", r#"
          return { init = function() return {} end, handle_cast = function(m, s) while true do end end }"#)).unwrap();
        block_on(sb.spawn("s", json!(null), Some("s"))).unwrap();
        block_on(sb.cast("s", json!(1))).unwrap();
        keep.push(sb);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut lat = vec![];
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        let t = Instant::now();
        block_on(by.call("c", json!(1), None)).unwrap();
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "n={} p50={} p90={} p99={} p999={} max={}",
        lat.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        p(0.999),
        lat[lat.len() - 1]
    );
    std::process::exit(0);
}
