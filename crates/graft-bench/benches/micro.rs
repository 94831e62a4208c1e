//! Criterion micro-benchmarks: host→process call, process→process call,
//! spawn, and a bare mlua call as the baseline measured in the same run;
//! the Luau→JSON codec on a 1 MB reply, with `serde_json::to_vec` of the
//! same JSON as its baseline.

use criterion::{criterion_group, criterion_main, Criterion};
use graft::{block_on, Node, SandboxSpec};
use mlua::LuaSerdeExt;
use serde_json::json;

const COUNTER: &str = r#"
return {
  init = function() return { count = 0 } end,
  handle_call = function(req, from, state) state.count += 1 return state.count, state end,
}
"#;

// Echoes its request: a call to it copies the request and the reply.
const ECHO: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(req, from, state) return req, state end,
}
"#;

// Sends a record (strings, numbers, a nested list) through `echo` n times:
// the plain-data copier's hot path, twice per call.
const RECORD_CALLER: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(n, from, state)
    for i = 1, n do
      graft.call("echo", { id = i, name = "alice", score = 1.5, tags = { "a", "b", "c" }, active = true })
    end
    return n, state
  end,
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
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("micro")
                .entry(None)
                .module("counter", COUNTER)
                .module("caller", CALLER)
                .module("echo", ECHO)
                .module("record_caller", RECORD_CALLER),
        ),
    )
    .unwrap();
    block_on(sb.spawn("counter", json!(null), Some("counter"))).unwrap();
    block_on(sb.spawn("caller", json!(null), Some("caller"))).unwrap();
    block_on(sb.spawn("echo", json!(null), Some("echo"))).unwrap();
    block_on(sb.spawn("record_caller", json!(null), Some("record_caller"))).unwrap();

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
    c.bench_function(
        "call process->process, record copied (x100 per iter)",
        |b| b.iter(|| block_on(sb.call("record_caller", json!(100), None)).unwrap()),
    );
    c.bench_function("spawn (x100 per iter, from Luau)", |b| {
        b.iter(|| {
            block_on(sb.eval("for i = 1, 100 do local p = graft.spawn('counter', nil) graft.exit(p, 'kill') end return 1"))
                .unwrap()
        })
    });
}

/// A module source of about `bytes`: lines that each assign a global and
/// read an unknown one (two problems per line), or the same lines as locals.
fn module_source(bytes: usize, errors: bool) -> String {
    let mut src = String::new();
    let mut i = 0;
    while src.len() < bytes {
        if errors {
            src.push_str(&format!("x{i} = y{i}\n"));
        } else {
            src.push_str(&format!("local x{i} = {i}\n"));
        }
        i += 1;
    }
    src.push_str("return {}\n");
    src
}

/// Compile and check (`prepare`) of 160 KB with thousands of problems,
/// against the same size of clean source: diagnostics must cost about as
/// much as the analysis itself (SPEC §7: linear, bounded).
fn diagnostics(c: &mut Criterion) {
    let known: Vec<String> = graft::internals::safe_globals()
        .map(str::to_owned)
        .collect();
    let files = std::collections::BTreeMap::new();
    let cx = graft::internals::PrepareContext {
        known_globals: &known,
        max_source_bytes: 1 << 20,
        files: &files,
    };
    // Clean: locals in blocks of 100, within Luau's limit of 200 live locals.
    let clean: String = module_source(160 * 1024, false)
        .lines()
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|c| format!("do\n{}\nend\n", c.join("\n")))
        .collect();
    let errors = module_source(160 * 1024, true);
    let one = |src: &str| {
        let mut m = std::collections::BTreeMap::new();
        m.insert("m".to_string(), src.to_string());
        m
    };
    let (clean, errors) = (one(&clean), one(&errors));
    assert!(graft::internals::prepare(&clean, &cx).is_ok());
    assert!(graft::internals::prepare(&errors, &cx).is_err());
    c.bench_function("baseline: analyse 160 KB clean source", |b| {
        b.iter(|| graft::internals::prepare(&clean, &cx).unwrap())
    });
    c.bench_function("analyse 160 KB of errors", |b| {
        b.iter(|| graft::internals::prepare(&errors, &cx).unwrap_err())
    });
}

/// About 1 MB of JSON: 6000 user records, as a handler would reply them.
const RECORDS: &str = r#"
local out = table.create(6000)
for i = 1, 6000 do
  out[i] = {
    id = i, name = "user" .. i, email = "user" .. i .. "@example.com",
    score = i * 1.25, active = i % 3 == 0, tags = { "alpha", "beta", "gamma" },
    address = { city = "Springfield", zip = tostring(10000 + i) },
  }
end
return out
"#;

fn codec_benches(c: &mut Criterion) {
    let lua = mlua::Lua::new();
    let reply: mlua::Value = lua.load(RECORDS).eval().unwrap();
    let convert = || graft::internals::lua_to_json(&reply, "reply", 8 << 20, &|_| String::new());
    let json = convert().unwrap();
    let bytes = serde_json::to_vec(&json).unwrap().len();
    assert!((900_000..1_300_000).contains(&bytes), "{bytes} bytes");
    let mut group = c.benchmark_group(format!("json reply of {bytes} bytes"));
    group.throughput(criterion::Throughput::Bytes(bytes as u64));
    group.bench_function("baseline: serde_json::to_vec of the JSON value", |b| {
        b.iter(|| serde_json::to_vec(&json).unwrap())
    });
    group.bench_function("graft lua_to_json (capped, cycle-checked)", |b| {
        b.iter(|| convert().unwrap())
    });
    // For scale: mlua's own serde conversion (no cap, no cycle check).
    group.bench_function("reference: mlua from_value", |b| {
        b.iter(|| lua.from_value::<serde_json::Value>(reply.clone()).unwrap())
    });
    group.finish();
}

criterion_group!(micro, benches, diagnostics, codec_benches);
criterion_main!(micro);
