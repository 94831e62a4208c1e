//! Embedding Graft in a Rust application: a sandbox whose Luau code calls a
//! (blocking) host function the app registers, then a live upgrade of that code.
//!
//! Run with `cargo run -p graft --example embed`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use graft::{block_on, HostFunctions, Node, ReloadOptions, SandboxSpec};
use serde_json::json;

const SCORER_V1: &str = r#"
local scorer = {}
function scorer.init(args) return { total = 0 } end
function scorer.handle_call(points, from, state)
  state.total += points
  audit.record("scored " .. points)      -- a blocking host function granted by the app
  return state.total, state
end
return scorer
"#;

// v2 doubles every score and keeps the running total through code_change.
const SCORER_V2: &str = r#"
local scorer = {}
function scorer.init(args) return { total = 0, factor = 2 } end
function scorer.handle_call(points, from, state)
  state.total += points * state.factor
  audit.record("scored " .. points .. " x" .. state.factor)
  return state.total, state
end
function scorer.code_change(old_vsn, state, extra)
  state.factor = extra.factor
  return state
end
return scorer
"#;

fn main() -> graft::Result<()> {
    let audit_log = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = audit_log.clone();
    // A blocking host function: it may wait (here on a lock; in an app, on a
    // database or a socket). The calling process suspends while it runs on
    // the node's blocking pool, so other processes and sandboxes keep
    // running. It also learns who called it.
    let host = HostFunctions::default().blocking("audit.record", move |call| {
        let line = call
            .args
            .first()
            .and_then(|a| a.as_str())
            .unwrap_or("?")
            .to_owned();
        log.lock().unwrap().push(format!("{} {line}", call.pid));
        Ok(json!(true))
    });

    let node = Node::new();
    let spec = SandboxSpec::new("game")
        .entry(None)
        .module("scorer", SCORER_V1);
    let sandbox = block_on(node.create_sandbox_with(spec, host))?;
    block_on(sandbox.spawn("scorer", json!(null), Some("scorer")))?;
    println!(
        "score: {}",
        block_on(sandbox.call("scorer", json!(10), None))?
    );
    println!(
        "score: {}",
        block_on(sandbox.call("scorer", json!(5), None))?
    );

    let mut sources = BTreeMap::new();
    sources.insert("scorer".to_string(), SCORER_V2.to_string());
    let opts = ReloadOptions {
        extra: json!({ "factor": 2 }),
        ..Default::default()
    };
    let report = block_on(sandbox.reload(sources, opts))?;
    println!(
        "reloaded {} v{} -> v{}: {} process(es) migrated in {} us",
        report.modules[0].name,
        report.modules[0].from,
        report.modules[0].to,
        report.processes_migrated,
        report.timings.swap_us
    );
    println!(
        "score: {}",
        block_on(sandbox.call("scorer", json!(10), None))?
    );
    println!("audit log: {:?}", audit_log.lock().unwrap());
    Ok(())
}
