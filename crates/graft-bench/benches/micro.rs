//! Criterion micro-benchmarks: host→process call, process→process call,
//! spawn, and a bare mlua call as the baseline measured in the same run.

use criterion::{criterion_group, criterion_main, Criterion};
use graft::{block_on, Node, SandboxSpec};
use serde_json::json;

const COUNTER: &str = r#"
return {
  init = function() return { count = 0 } end,
  handle_call = function(req, from, state) state.count += 1 return state.count, state end,
}
"#;

const CALLER: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(n, from, state)
    for i = 1, n do graft.call("counter", "inc") end
    return n, state
  end,
}
"#;

fn benches(c: &mut Criterion) {
    let node = Node::new();
    let sb = node
        .create_sandbox(
            SandboxSpec::new("micro")
                .entry(None)
                .module("counter", COUNTER)
                .module("caller", CALLER),
        )
        .unwrap();
    block_on(sb.spawn("counter", json!(null), Some("counter"))).unwrap();
    block_on(sb.spawn("caller", json!(null), Some("caller"))).unwrap();

    let lua = mlua::Lua::new();
    let f: mlua::Function = lua
        .load("return function(s) s.count += 1 return s.count end")
        .eval()
        .unwrap();
    let t: mlua::Table = lua.load("return { count = 0 }").eval().unwrap();
    c.bench_function("baseline: mlua function call", |b| {
        b.iter(|| f.call::<f64>(t.clone()).unwrap())
    });

    c.bench_function("call host->process", |b| {
        b.iter(|| block_on(sb.call("counter", json!("inc"), None)).unwrap())
    });
    c.bench_function("call process->process (x100 per iter)", |b| {
        b.iter(|| block_on(sb.call("caller", json!(100), None)).unwrap())
    });
    c.bench_function("spawn (x100 per iter, from Luau)", |b| {
        b.iter(|| {
            block_on(sb.eval("for i = 1, 100 do local p = graft.spawn('counter', nil) graft.exit(p, 'kill') end return 1"))
                .unwrap()
        })
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
