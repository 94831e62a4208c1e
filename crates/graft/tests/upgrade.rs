//! The upgrade engine (SPEC §3): every step's failure path restores exactly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use graft::{
    block_on, BatchOptions, Error, Node, ReloadOptions, ReloadStatus, ReloadStep, Sandbox,
    SandboxSpec, StateHandler,
};
use serde_json::{json, Value};

const COUNTER_V1: &str = r#"
local counter = {}
function counter.init(args) return { count = args.start or 0 } end
function counter.handle_call(req, from, state)
  if req == "inc" then state.count += 1 end
  return state.count, state
end
function counter.handle_cast(msg, state) state.count = msg return state end
return counter
"#;

// v2: "inc" adds 10, and the state gains a `step` field through code_change.
const COUNTER_V2: &str = r#"
local counter = {}
function counter.init(args) return { count = args.start or 0, step = 10 } end
function counter.handle_call(req, from, state)
  if req == "inc" then state.count += state.step end
  return state.count, state
end
function counter.handle_cast(msg, state) state.count = msg return state end
function counter.code_change(old_vsn, state, extra)
  if type(old_vsn) == "table" then
    state.step = nil
    return state
  end
  state.step = (extra and extra.step) or 10
  return state
end
return counter
"#;

fn sources(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect()
}

fn sandbox(node: &Node, id: &str, modules: &[(&str, &str)]) -> Sandbox {
    let mut spec = SandboxSpec::new(id).entry(None);
    for (n, s) in modules {
        spec = spec.module(*n, *s);
    }
    graft::block_on(node.create_sandbox(spec)).unwrap()
}

fn call(sb: &Sandbox, target: impl Into<graft::Target>, req: Value) -> Value {
    block_on(sb.call(target, req, Some(2000))).unwrap()
}

fn reload(
    sb: &Sandbox,
    modules: &[(&str, &str)],
    opts: ReloadOptions,
) -> graft::Result<graft::ReloadReport> {
    block_on(sb.reload(sources(modules), opts))
}

#[test]
fn counter_at_42_upgraded_to_plus_10_answers_52_with_state_kept() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "up42", &[("counter", COUNTER_V1)]);
    block_on(sb.spawn("counter", json!({"start": 41}), Some("counter"))).unwrap();
    assert_eq!(call(&sb, "counter", json!("inc")), json!(42));
    let report = reload(&sb, &[("counter", COUNTER_V2)], ReloadOptions::default()).unwrap();
    assert_eq!(report.status, ReloadStatus::Reloaded);
    assert_eq!(
        report.modules,
        vec![graft::ModuleChange {
            name: "counter".into(),
            from: 1,
            to: 2
        }]
    );
    assert_eq!(report.processes_migrated, 1);
    assert_eq!(call(&sb, "counter", json!("inc")), json!(52));
    assert_eq!(
        block_on(sb.state("counter")).unwrap(),
        json!({"count": 52, "step": 10})
    );
    let events = block_on(sb.events()).unwrap();
    let ev = events
        .iter()
        .rev()
        .find(|e| e.kind == "reload")
        .expect("reload event");
    assert_eq!(ev.detail["processes_migrated"], json!(1));
    assert!(ev.detail["timings"]["swap_us"].is_u64());
}

#[test]
fn same_checksum_is_unchanged_and_makes_no_version() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "same", &[("counter", COUNTER_V1)]);
    let report = reload(&sb, &[("counter", COUNTER_V1)], ReloadOptions::default()).unwrap();
    assert_eq!(report.status, ReloadStatus::Unchanged);
    assert_eq!(block_on(sb.versions("counter")).unwrap().len(), 1);
    assert!(block_on(sb.events())
        .unwrap()
        .iter()
        .any(|e| e.kind == "unchanged"));
}

#[test]
fn compile_error_on_line_3_names_line_3_and_old_code_keeps_serving() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "cerr", &[("counter", COUNTER_V1)]);
    block_on(sb.spawn("counter", json!({"start": 1}), Some("counter"))).unwrap();
    let broken = "local counter = {}\nfunction counter.init() return {} end\nfunction counter.handle_call(req, from, state return 1, state end\nreturn counter\n";
    let err = reload(&sb, &[("counter", broken)], ReloadOptions::default()).unwrap_err();
    let Error::Compile { diagnostics } = &err else {
        panic!("expected a compile error, got {err:?}")
    };
    assert_eq!(diagnostics[0].line, 3, "{diagnostics:?}");
    assert_eq!(diagnostics[0].module, "counter");
    assert!(diagnostics[0]
        .frame
        .contains("function counter.handle_call(req, from, state return"));
    assert_eq!(call(&sb, "counter", json!("inc")), json!(2));
    assert_eq!(block_on(sb.versions("counter")).unwrap().len(), 1);
    let events = block_on(sb.events()).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "abort" && e.detail["diagnostics"][0]["line"] == json!(3)),
        "{events:?}"
    );
}

#[test]
fn twelve_versions_keep_ten_and_the_current_one() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "twelve", &[("m", "return { v = 1 }")]);
    for v in 2..=12 {
        let src = format!("return {{ v = {v} }}");
        let r = reload(&sb, &[("m", &src)], ReloadOptions::default()).unwrap();
        assert_eq!(r.modules[0].to, v);
    }
    let kept: Vec<u32> = block_on(sb.versions("m"))
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(kept, (3..=12).collect::<Vec<_>>());
    let modules = block_on(sb.modules()).unwrap();
    assert_eq!(modules[0].version, 12);
    assert_eq!(
        modules[0].checksum,
        graft::upgrade::checksum("return { v = 12 }")
    );
}

#[test]
fn rollback_runs_code_change_down_and_makes_the_target_current() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "rb", &[("counter", COUNTER_V1)]);
    block_on(sb.spawn("counter", json!({"start": 5}), Some("counter"))).unwrap();
    reload(&sb, &[("counter", COUNTER_V2)], ReloadOptions::default()).unwrap();
    assert_eq!(call(&sb, "counter", json!("inc")), json!(15));
    // roll back to 1 with a handler that shows it saw { down = 2 }
    let report = block_on(sb.rollback("counter", 1, ReloadOptions::default())).unwrap();
    assert_eq!(report.modules[0].from, 2);
    assert_eq!(report.modules[0].to, 1);
    // v1's code_change does not exist, so the state is kept as v2 left it
    assert_eq!(
        block_on(sb.state("counter")).unwrap(),
        json!({"count": 15, "step": 10})
    );
    assert_eq!(call(&sb, "counter", json!("inc")), json!(16));
    assert_eq!(block_on(sb.modules()).unwrap()[0].version, 1);
    // roll forward again: v2's code_change gets the number 1
    block_on(sb.rollback("counter", 2, ReloadOptions::default())).unwrap();
    assert_eq!(call(&sb, "counter", json!("inc")), json!(26));
    let err = block_on(sb.rollback("counter", 9, ReloadOptions::default())).unwrap_err();
    assert!(
        matches!(err, Error::NoVersion { version: 9, .. }),
        "{err:?}"
    );
    assert!(block_on(sb.events())
        .unwrap()
        .iter()
        .any(|e| e.kind == "rollback"));
}

#[test]
fn rollback_code_change_receives_down_table() {
    let node = Node::with_threads(1);
    let v2 = r#"
      return {
        init = function() return { seen = "none" } end,
        handle_call = function(r, f, s) return s.seen, s end,
        code_change = function(old, s, extra)
          if type(old) == "table" then s.seen = "down " .. old.down else s.seen = "up " .. old end
          return s
        end,
      }"#;
    let sb = sandbox(&node, "rbdown", &[("m", v2)]);
    block_on(sb.spawn("m", json!(null), Some("m"))).unwrap();
    let v3 = v2.replace("return s.seen, s", "return s.seen .. '!', s");
    reload(&sb, &[("m", &v3)], ReloadOptions::default()).unwrap();
    assert_eq!(call(&sb, "m", json!(null)), json!("up 1!"));
    block_on(sb.rollback("m", 1, ReloadOptions::default())).unwrap();
    // v1 is the original source: its code_change sees { down = 2 }
    assert_eq!(call(&sb, "m", json!(null)), json!("down 2"));
}

#[test]
fn require_cycle_is_reported_as_a_path_and_nothing_changes() {
    let node = Node::with_threads(1);
    let sb = sandbox(
        &node,
        "cyc",
        &[
            ("a", "return { x = 1 }"),
            ("b", "local a = require(\"a\")\nreturn { y = a.x }"),
        ],
    );
    let err = reload(
        &sb,
        &[("a", "local b = require(\"b\")\nreturn { x = 2 }")],
        ReloadOptions::default(),
    )
    .unwrap_err();
    let Error::Compile { diagnostics } = &err else {
        panic!("{err:?}")
    };
    assert!(
        diagnostics[0].message.contains("a -> b -> a"),
        "{}",
        diagnostics[0].message
    );
    assert_eq!(
        block_on(sb.modules())
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect::<Vec<_>>(),
        vec![1, 1]
    );
}

#[test]
fn dependents_switch_together_with_the_module_they_require() {
    let node = Node::with_threads(1);
    let util_v1 = "return { bump = function(n) return n + 1 end }";
    let util_v2 = "return { bump = function(n) return n + 100 end }";
    let user = r#"
      local util = require("util")
      return {
        init = function() return { n = 0 } end,
        handle_call = function(r, f, s) s.n = util.bump(s.n) return s.n, s end,
      }"#;
    let sb = sandbox(&node, "deps", &[("util", util_v1), ("user", user)]);
    block_on(sb.spawn("user", json!(null), Some("u"))).unwrap();
    assert_eq!(call(&sb, "u", json!(null)), json!(1));
    let report = reload(&sb, &[("util", util_v2)], ReloadOptions::default()).unwrap();
    assert_eq!(report.modules.len(), 1, "only util gets a new version");
    assert_eq!(
        call(&sb, "u", json!(null)),
        json!(101),
        "user re-evaluated against the new util"
    );
    let user_info = block_on(sb.modules())
        .unwrap()
        .into_iter()
        .find(|m| m.name == "user")
        .unwrap();
    assert_eq!(user_info.dependencies, vec!["util".to_string()]);
}

#[test]
fn missing_require_is_a_diagnostic_with_a_line() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "miss", &[("a", "return {}")]);
    let err = reload(
        &sb,
        &[("a", "local x = 1\nlocal n = require(\"nope\")\nreturn {}")],
        ReloadOptions::default(),
    )
    .unwrap_err();
    let Error::Compile { diagnostics } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(diagnostics[0].line, 2);
    assert!(diagnostics[0].message.contains("nope"));
}

#[test]
fn dry_run_migrates_on_copies_and_changes_nothing() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "dry", &[("counter", COUNTER_V1)]);
    for i in 0..3 {
        block_on(sb.spawn("counter", json!({"start": i}), Some(&format!("c{i}")))).unwrap();
    }
    let opts = ReloadOptions {
        dry_run: true,
        ..Default::default()
    };
    let report = reload(&sb, &[("counter", COUNTER_V2)], opts).unwrap();
    assert_eq!(report.status, ReloadStatus::DryRun);
    assert_eq!(report.processes_migrated, 3);
    assert_eq!(report.modules[0].to, 2);
    assert_eq!(block_on(sb.state("c2")).unwrap(), json!({"count": 2}));
    assert_eq!(call(&sb, "c2", json!("inc")), json!(3));
    assert_eq!(block_on(sb.versions("counter")).unwrap().len(), 1);
}

#[test]
fn failing_migration_in_the_5000th_of_10000_processes_leaves_all_untouched() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "m10k", &[("counter", COUNTER_V1)]);
    block_on(sb.eval("for i = 1, 10000 do graft.spawn('counter', { start = i }) end return true"))
        .unwrap();
    let bad = COUNTER_V2.replace(
        "state.step = (extra and extra.step) or 10",
        "if state.count == 5000 then error('cannot migrate 5000') end\n  state.step = 10",
    );
    let err = reload(&sb, &[("counter", &bad)], ReloadOptions::default()).unwrap_err();
    let Error::ReloadAborted {
        step,
        module,
        process,
        message,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*step, ReloadStep::Migrate);
    assert_eq!(module.as_deref(), Some("counter"));
    assert!(
        message.contains("cannot migrate 5000") && message.contains("5000 of 10000"),
        "{message}"
    );
    assert!(process.as_deref().unwrap().starts_with("<counter."));
    // every state untouched, every version still 1, the old code serving
    let ps = block_on(sb.processes()).unwrap();
    let counters: Vec<_> = ps.iter().filter(|p| p.module == "counter").collect();
    assert_eq!(counters.len(), 10000);
    assert!(counters.iter().all(|p| p.version == 1));
    for p in counters.iter().step_by(997) {
        let s = block_on(sb.state(&p.pid)).unwrap();
        assert!(s.get("step").is_none(), "{s}");
    }
    let first = &counters[0].pid;
    let before = block_on(sb.state(first)).unwrap()["count"]
        .as_i64()
        .unwrap();
    assert_eq!(call(&sb, first, json!("inc")), json!(before + 1));
    assert_eq!(block_on(sb.modules()).unwrap()[0].version, 1);
    let events = block_on(sb.events()).unwrap();
    let abort = events
        .iter()
        .rev()
        .find(|e| e.kind == "abort")
        .expect("abort event");
    assert_eq!(abort.detail["step"], json!("migrate"));
}

#[test]
fn migration_that_returns_bad_state_or_loops_aborts_exactly() {
    let node = Node::with_threads(1);
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("badmig")
                .entry(None)
                .module("counter", COUNTER_V1)
                .limits(graft::Limits {
                    handler_ms: 100,
                    ..Default::default()
                }),
        ),
    )
    .unwrap();
    block_on(sb.spawn("counter", json!({"start": 7}), Some("c"))).unwrap();
    for (what, body) in [
        ("function", "state.f = function() end return state"),
        ("nothing", "return nil"),
        ("timeout", "while true do end"),
    ] {
        let src = COUNTER_V2.replace(
            "state.step = (extra and extra.step) or 10\n  return state",
            body,
        );
        let err = reload(&sb, &[("counter", &src)], ReloadOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::ReloadAborted { .. }),
            "{what}: {err:?}"
        );
        assert_eq!(
            block_on(sb.state("c")).unwrap(),
            json!({"count": 7}),
            "{what}"
        );
        assert_eq!(call(&sb, "c", json!("get")), json!(7), "{what}");
    }
    assert_eq!(block_on(sb.versions("counter")).unwrap().len(), 1);
}

#[test]
fn evaluation_failures_abort_before_anything_changes() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "evalfail", &[("counter", COUNTER_V1)]);
    block_on(sb.spawn("counter", json!({}), Some("c"))).unwrap();
    let cases = [
        ("return 42", "instead of a table"),
        ("error('boom at load')", "boom at load"),
        ("return { init = 5 }", "no `init`"),
        (
            "return { init = function() return {} end, handle_call = 3 }",
            "handle_call",
        ),
    ];
    for (src, needle) in cases {
        let err = reload(&sb, &[("counter", src)], ReloadOptions::default()).unwrap_err();
        assert!(err.to_string().contains(needle), "{src}: {err}");
        assert_eq!(
            call(&sb, "c", json!("inc")),
            json!(1 + cases.iter().position(|c| c.0 == src).unwrap())
        );
    }
}

#[test]
fn luau_and_rust_state_handlers_replace_code_change() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "handlers", &[("counter", COUNTER_V1)]);
    block_on(sb.spawn("counter", json!({"start": 3}), Some("c"))).unwrap();
    let opts = ReloadOptions {
        state_handler: Some(StateHandler::Luau(
            "return function(old, old_vsn, new_vsn, extra) return { count = old.count * 2, step = extra.step, from = old_vsn, to = new_vsn } end".into(),
        )),
        extra: json!({"step": 1}),
        ..Default::default()
    };
    reload(&sb, &[("counter", COUNTER_V2)], opts).unwrap();
    assert_eq!(
        block_on(sb.state("c")).unwrap(),
        json!({"count": 6, "step": 1, "from": 1, "to": 2})
    );
    let v3 = COUNTER_V2.replace("state.count += state.step", "state.count += state.step * 2");
    let opts = ReloadOptions {
        state_handler: Some(StateHandler::Rust(Arc::new(
            |old, _old_vsn, new_vsn, _extra| {
                let count = old["count"].as_i64().ok_or("no count")?;
                Ok(json!({"count": count + 1000, "step": 1, "vsn": new_vsn}))
            },
        ))),
        ..Default::default()
    };
    reload(&sb, &[("counter", &v3)], opts).unwrap();
    assert_eq!(call(&sb, "c", json!("inc")), json!(1008));
    let bad = ReloadOptions {
        state_handler: Some(StateHandler::Luau("return 1".into())),
        ..Default::default()
    };
    let v4 = v3.replace("* 2", "* 3");
    let err = reload(&sb, &[("counter", &v4)], bad).unwrap_err();
    assert!(
        err.to_string().contains("must evaluate to a function"),
        "{err}"
    );
}

#[test]
fn canary_rolls_back_automatically_when_upgraded_processes_crash() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "canary", &[("counter", COUNTER_V1)]);
    block_on(sb.spawn("counter", json!({"start": 1}), Some("c"))).unwrap();
    let crashing = COUNTER_V1.replace(
        "if req == \"inc\" then",
        "if req == \"inc\" then error('v2 is broken') end\n  if false then",
    );
    let opts = ReloadOptions {
        canary_ms: 2000,
        canary_crashes: 1,
        ..Default::default()
    };
    let report = reload(&sb, &[("counter", &crashing)], opts).unwrap();
    assert_eq!(report.modules[0].to, 2);
    // a spare process keeps the module alive; the crash of `c` trips the canary
    block_on(sb.spawn("counter", json!({"start": 100}), Some("spare"))).unwrap();
    let err = block_on(sb.call("c", json!("inc"), Some(1000))).unwrap_err();
    assert!(err.to_string().contains("v2 is broken"), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let events = block_on(sb.events()).unwrap();
        if let Some(e) = events.iter().find(|e| e.kind == "canary_rollback") {
            assert!(
                e.detail["why"].as_str().unwrap().contains("v2 is broken"),
                "{e:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no canary rollback: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(block_on(sb.modules()).unwrap()[0].version, 1);
    assert_eq!(call(&sb, "spare", json!("inc")), json!(101));
}

#[test]
fn canary_window_passes_without_crashes() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "canaryok", &[("counter", COUNTER_V1)]);
    block_on(sb.spawn("counter", json!({"start": 1}), Some("c"))).unwrap();
    let opts = ReloadOptions {
        canary_ms: 50,
        ..Default::default()
    };
    reload(&sb, &[("counter", COUNTER_V2)], opts).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !block_on(sb.events())
        .unwrap()
        .iter()
        .any(|e| e.kind == "canary_passed")
    {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(block_on(sb.modules()).unwrap()[0].version, 2);
}

#[test]
fn batch_reload_reports_in_input_order_and_rolling_stops_at_first_failure() {
    let node = Node::with_threads(2);
    for id in ["b1", "b2", "b3"] {
        sandbox(&node, id, &[("counter", COUNTER_V1)]);
    }
    let ids: Vec<String> = ["b1", "missing", "b2", "b3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let results = block_on(node.reload_batch(
        &ids,
        &sources(&[("counter", COUNTER_V2)]),
        &BatchOptions::default().max_concurrency(2),
    ));
    let names: Vec<&str> = results.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(names, vec!["b1", "missing", "b2", "b3"]);
    assert!(results[0].1.is_ok() && results[2].1.is_ok() && results[3].1.is_ok());
    assert!(matches!(results[1].1, Err(Error::NoSandbox(_))));
    let v3 = COUNTER_V2.replace("+= state.step", "+= state.step + 1");
    let results = block_on(node.reload_batch(
        &ids,
        &sources(&[("counter", &v3)]),
        &BatchOptions::default().max_concurrency(4).rolling(true),
    ));
    assert!(results[0].1.is_ok());
    assert!(matches!(results[1].1, Err(Error::NoSandbox(_))));
    assert!(results[2]
        .1
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("skipped"));
    assert!(results[3]
        .1
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("skipped"));
    assert_eq!(
        block_on(node.sandbox("b2").unwrap().modules()).unwrap()[0].version,
        2
    );
}

#[test]
fn messages_sent_during_a_reload_all_arrive_in_order() {
    let node = Node::with_threads(2);
    let log = r#"
      return {
        init = function() return { seen = {} } end,
        handle_cast = function(n, s) table.insert(s.seen, n) return s end,
        handle_call = function(r, f, s) return #s.seen, s end,
      }"#;
    let sb = sandbox(&node, "order", &[("log", log)]);
    block_on(sb.spawn("log", json!(null), Some("log"))).unwrap();
    let sender = {
        let sb = sb.clone();
        std::thread::spawn(move || {
            for i in 1..=2000 {
                block_on(sb.cast("log", json!(i))).unwrap();
            }
        })
    };
    let mut versions = 0;
    for i in 0..20 {
        let src = format!("{log}\n-- revision {i}");
        if reload(&sb, &[("log", &src)], ReloadOptions::default())
            .unwrap()
            .status
            == ReloadStatus::Reloaded
        {
            versions += 1;
        }
    }
    sender.join().unwrap();
    assert_eq!(versions, 20);
    assert_eq!(call(&sb, "log", json!(null)), json!(2000));
    let state = block_on(sb.state("log")).unwrap();
    let seen: Vec<i64> = state["seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(seen, (1..=2000).collect::<Vec<_>>());
}

#[test]
fn reload_waits_for_a_process_suspended_in_a_call() {
    let node = Node::with_threads(2);
    let slow = r#"
      return {
        init = function() return 0 end,
        handle_call = function(r, f, s)
          local t = graft.now() while graft.now() - t < 150 do end
          return "slow", s
        end,
      }"#;
    let caller = r#"
      return {
        init = function() return { v = 1 } end,
        handle_call = function(r, f, s) local x = graft.call("slow", r) return { x, s.v }, s end,
        code_change = function(old, s) s.v = 2 return s end,
      }"#;
    let sb = sandbox(&node, "quiesce", &[("slow", slow), ("caller", caller)]);
    block_on(sb.spawn("slow", json!(null), Some("slow"))).unwrap();
    block_on(sb.spawn("caller", json!(null), Some("caller"))).unwrap();
    let in_flight = {
        let sb = sb.clone();
        std::thread::spawn(move || block_on(sb.call("caller", json!("go"), Some(3000))))
    };
    std::thread::sleep(Duration::from_millis(30));
    let v2 = caller.replace("s.v = 2", "s.v = 3");
    let report = reload(&sb, &[("caller", &v2)], ReloadOptions::default()).unwrap();
    assert_eq!(report.processes_migrated, 1);
    // the in-flight call finished on the old code with the old state
    assert_eq!(in_flight.join().unwrap().unwrap(), json!(["slow", 1]));
    assert_eq!(block_on(sb.state("caller")).unwrap(), json!({"v": 3}));
}

#[test]
fn supervisor_upgrade_adds_removes_and_restarts_changed_children() {
    let node = Node::with_threads(1);
    let app_v1 = r#"
      return { behaviour = "supervisor", init = function()
        return { strategy = "one_for_one", children = {
          { id = "a", module = "counter", args = { start = 1 }, name = "a" },
          { id = "b", module = "counter", args = { start = 2 }, name = "b" },
        } }
      end }"#;
    let app_v2 = r#"
      return { behaviour = "supervisor", init = function()
        return { strategy = "one_for_one", children = {
          { id = "a", module = "counter", args = { start = 1 }, name = "a" },
          { id = "b", module = "counter", args = { start = 20 }, name = "b" },
          { id = "c", module = "counter", args = { start = 3 }, name = "c" },
        } }
      end }"#;
    let app_v3 = app_v2.replace(
        "{ id = \"a\", module = \"counter\", args = { start = 1 }, name = \"a\" },",
        "",
    );
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("supup")
                .module("app", app_v1)
                .module("counter", COUNTER_V1),
        ),
    )
    .unwrap();
    block_on(sb.wait_app_started()).unwrap();
    call(&sb, "a", json!("inc"));
    reload(&sb, &[("app", app_v2)], ReloadOptions::default()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while block_on(sb.processes()).unwrap().len() != 4 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        call(&sb, "a", json!("get")),
        json!(2),
        "unchanged child keeps running"
    );
    assert_eq!(
        call(&sb, "b", json!("get")),
        json!(20),
        "changed child restarted with new args"
    );
    assert_eq!(
        call(&sb, "c", json!("get")),
        json!(3),
        "added child started"
    );
    reload(&sb, &[("app", &app_v3)], ReloadOptions::default()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while block_on(sb.processes()).unwrap().len() != 3 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(
        block_on(sb.call("a", json!("get"), None)),
        Err(Error::NoProcess(_))
    ));
}

#[test]
fn export_then_import_recreates_history_and_behaviour_elsewhere() {
    let node = Node::with_threads(1);
    let a = sandbox(&node, "exp", &[("counter", COUNTER_V1)]);
    reload(&a, &[("counter", COUNTER_V2)], ReloadOptions::default()).unwrap();
    let exported = block_on(a.export()).unwrap();
    // round trip through JSON, as a backup file would
    let text = serde_json::to_string(&exported).unwrap();
    let back: BTreeMap<String, Vec<graft::ModuleVersion>> = serde_json::from_str(&text).unwrap();

    let b = sandbox(&node, "imp", &[("counter", COUNTER_V1)]);
    block_on(b.spawn("counter", json!({"start": 1}), Some("c"))).unwrap();
    let report = block_on(b.import(back.clone(), ReloadOptions::default())).unwrap();
    assert_eq!(report.processes_migrated, 1);
    assert_eq!(
        call(&b, "c", json!("inc")),
        json!(11),
        "v2 is live and migrated"
    );
    let kept: Vec<u32> = block_on(b.versions("counter"))
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(kept, vec![1, 2]);
    block_on(b.rollback("counter", 1, ReloadOptions::default())).unwrap();
    assert_eq!(call(&b, "c", json!("inc")), json!(12));

    // a tampered source is refused and nothing changes
    let mut bad = back;
    bad.get_mut("counter").unwrap()[1]
        .source
        .push_str("\n-- tampered");
    let err = block_on(b.import(bad, ReloadOptions::default())).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_eq!(block_on(b.modules()).unwrap()[0].version, 1);
}

#[test]
fn a_bad_supervisor_spec_aborts_the_reload_and_the_app_keeps_running() {
    let node = Node::with_threads(1);
    let app = r#"
      return { behaviour = "supervisor", init = function()
        return { strategy = "one_for_one", children = { { id = "c", module = "counter", args = {}, name = "c" } } }
      end }"#;
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("badsup")
                .module("app", app)
                .module("counter", COUNTER_V1),
        ),
    )
    .unwrap();
    block_on(sb.wait_app_started()).unwrap();
    let bad = app.replace("one_for_one", "bogus");
    let err = reload(&sb, &[("app", &bad)], ReloadOptions::default()).unwrap_err();
    let Error::ReloadAborted { step, message, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*step, ReloadStep::Check);
    assert!(message.contains("unknown strategy"), "{message}");
    assert_eq!(
        block_on(sb.modules())
            .unwrap()
            .iter()
            .find(|m| m.name == "app")
            .unwrap()
            .version,
        1
    );
    assert_eq!(call(&sb, "c", json!("inc")), json!(1));
    assert_eq!(block_on(sb.info()).unwrap().app, graft::AppStatus::Running);
}

#[test]
fn a_dry_run_sends_no_messages_from_module_bodies_or_migrations() {
    let node = Node::with_threads(1);
    let sb = sandbox(&node, "drysend", &[("counter", COUNTER_V1)]);
    block_on(sb.spawn("counter", json!({"start": 1}), Some("c"))).unwrap();
    let leaky = COUNTER_V2.replace(
        "state.step = (extra and extra.step) or 10",
        "graft.cast(\"c\", 99)\n  state.step = 10",
    );
    let opts = ReloadOptions {
        dry_run: true,
        ..Default::default()
    };
    let err = reload(&sb, &[("counter", &leaky)], opts).unwrap_err();
    assert!(
        err.to_string()
            .contains("only be used inside a process callback"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(block_on(sb.state("c")).unwrap(), json!({"count": 1}));
}

/// Flat states take a shortcut through the migration's copy and check
/// (`clone_root`, `check_root` in the prelude); these are the shapes that
/// must not: shared and nested tables, pids, and results that are not
/// plain data, each against both kinds of state.
#[test]
fn migrations_keep_sharing_and_refuse_what_is_not_plain_data_flat_or_nested() {
    const V1: &str = r#"
local m = {}
function m.init(args)
  if args.flat then return { count = 0 } end
  local t = { n = 1 }
  return { a = t, b = t, count = 0 }
end
function m.handle_call(req, from, state)
  if req == "same" then return state.a == state.b, state end
  if req == "n" then return state.b.n, state end
  if req == "who" then return state.who == graft.whereis("flat"), state end
  return state.count, state
end
return m
"#;
    let with = |body: &str| {
        format!(
            "{}\nfunction m.code_change(old, state, extra)\n  {body}\nend\nreturn m\n",
            V1.trim_end().trim_end_matches("return m")
        )
    };
    let node = Node::with_threads(1);
    // One sandbox per shape: a reload aborts when any of its processes
    // fails, so a shape that wrongly passed would hide behind the other.
    for flat in [true, false] {
        let sb = sandbox(&node, &format!("shapes{flat}"), &[("m", V1)]);
        block_on(sb.spawn("m", json!({ "flat": flat }), Some("p"))).unwrap();
        for (what, body) in [
            ("a cycle", "state.me = state return state"),
            ("a metatable", "return setmetatable(state, {})"),
            ("a function", "state.f = print return state"),
            (
                "a coroutine key",
                "state[coroutine.create(print)] = 1 return state",
            ),
        ] {
            let err = reload(&sb, &[("m", &with(body))], ReloadOptions::default()).unwrap_err();
            assert!(
                matches!(err, Error::ReloadAborted { .. }),
                "{what} (flat: {flat}): {err:?}"
            );
            assert_eq!(call(&sb, "p", json!("count")), json!(0), "{what}");
        }
        assert_eq!(block_on(sb.versions("m")).unwrap().len(), 1);
    }
    let sb = sandbox(&node, "shapes", &[("m", V1)]);
    block_on(sb.spawn("m", json!({"flat": true}), Some("flat"))).unwrap();
    block_on(sb.spawn("m", json!({"flat": false}), Some("nested"))).unwrap();

    // Sharing inside a state survives the copy; a pid is plain data.
    let ok =
        with("if state.a then state.a.n += 1 end state.who = graft.whereis(\"flat\") return state");
    reload(&sb, &[("m", &ok)], ReloadOptions::default()).unwrap();
    assert_eq!(call(&sb, "nested", json!("same")), json!(true));
    assert_eq!(call(&sb, "nested", json!("n")), json!(2));
    assert_eq!(call(&sb, "flat", json!("who")), json!(true));
    assert_eq!(call(&sb, "nested", json!("who")), json!(true));
}
