//! Hostile inputs: what guest code can do to the other processes of its own
//! sandbox and to the node (SPEC §7): poisoning builtins, crash messages of
//! megabytes, print floods, timers with absurd delays, names that read as
//! pids, and host messages into full mailboxes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use graft::{Error, ExitReason, Node, ReloadOptions, SandboxSpec};
use serde_json::{json, Value as Json};

use crate::common::{limits, wait_until};
use crate::support::{answer, assert_node_healthy, counter_sandbox};

/// Each attack writes to a builtin through a path the static analysis cannot
/// see (an alias, `rawset`, a metatable) and returns the error it raised.
const ATTACKER: &str = r#"
local pwn = function() return "pwned" end
local attacks = {
  alias_string = function() local s = string; s.upper = pwn end,
  rawset_string = function() rawset(string, "upper", pwn) end,
  string_meta_index = function() getmetatable("").__index = { upper = pwn } end,
  string_meta_rawset = function() rawset(getmetatable(""), "__index", { upper = pwn }) end,
  string_meta_through_index = function() getmetatable("").__index.upper = pwn end,
  string_meta_setmetatable = function() setmetatable(getmetatable(""), { __index = { upper = pwn } }) end,
  setmetatable_string = function() setmetatable(string, { __index = { shout = pwn } }) end,
  table_clear_string = function() table.clear(string) end,
  table_insert_string = function() table.insert(string, pwn) end,
  alias_table = function() local t = table; t.concat = pwn end,
  alias_math = function() local m = math; m.floor = pwn end,
  alias_bit32 = function() local b = bit32; b.band = pwn end,
  alias_buffer = function() local b = buffer; b.tostring = pwn end,
  alias_utf8 = function() local u = utf8; u.char = pwn end,
  alias_vector = function() local v = vector; v.create = pwn end,
  vector_meta = function() getmetatable(vector.create(1, 2, 3)).__index = pwn end,
  alias_coroutine = function() local c = coroutine; c.wrap = pwn end,
  alias_graft = function() local g = graft; g.self = pwn end,
}
return {
  init = function() return {} end,
  handle_call = function(name, from, state)
    local ok, err = pcall(attacks[name])
    return (if ok then "no error" else tostring(err)), state
  end,
}
"#;

/// What a bystander process of the same sandbox sees of the builtins.
const PROBE: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(req, from, state)
    local b = buffer.fromstring("ab")
    return {
      upper = string.upper("a"),
      method = ("a"):upper(),
      concat = table.concat({ "x", "y" }),
      floor = math.floor(1.5),
      band = bit32.band(3, 1),
      buffer = buffer.tostring(b),
      char = utf8.char(65),
      vector = vector.create(1, 2, 3).x,
      wrap = coroutine.wrap(function() return "co" end)(),
    }, state
  end,
}
"#;

fn real_builtins() -> Json {
    json!({ "upper": "A", "method": "A", "concat": "xy", "floor": 1, "band": 1,
            "buffer": "ab", "char": "A", "vector": 1, "wrap": "co" })
}

const ATTACKS: &[&str] = &[
    "alias_string",
    "rawset_string",
    "string_meta_index",
    "string_meta_rawset",
    "string_meta_through_index",
    "string_meta_setmetatable",
    "setmetatable_string",
    "table_clear_string",
    "table_insert_string",
    "alias_table",
    "alias_math",
    "alias_bit32",
    "alias_buffer",
    "alias_utf8",
    "alias_vector",
    "vector_meta",
    "alias_coroutine",
    "alias_graft",
];

fn builtin_sandbox(node: &Node, id: &str) -> graft::Sandbox {
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new(id)
                .entry(None)
                .module("attacker", ATTACKER)
                .module("probe", PROBE),
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("attacker", json!(null), Some("attacker"))).expect("attacker");
    answer(sb.spawn("probe", json!(null), Some("probe"))).expect("probe");
    sb
}

#[test]
fn builtin_writes_from_a_handler_are_readonly_by_any_alias() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = builtin_sandbox(&node, "poison");
    for attack in ATTACKS {
        let err = answer(sb.call("attacker", json!(attack), None)).expect("attacker answers");
        let err = err.as_str().unwrap_or_default().to_owned();
        assert!(
            err.contains("attempt to modify a readonly table"),
            "{attack}: {err}"
        );
    }
    let seen = answer(sb.call("probe", json!(null), None)).expect("probe");
    assert_eq!(seen, real_builtins());
    assert_node_healthy(&node, &bystander);
}

#[test]
fn builtin_writes_from_eval_are_readonly() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = builtin_sandbox(&node, "poison");
    for code in [
        "local s = string; s.upper = function() return 'pwned' end",
        "rawset(string, 'upper', function() return 'pwned' end)",
        "getmetatable('').__index = { upper = function() return 'pwned' end }",
        "local u = utf8; u.char = function() return 'pwned' end",
        "local b = buffer; b.tostring = function() return 'pwned' end",
    ] {
        let err = answer(sb.eval(code)).expect_err(code);
        assert_eq!(err.kind(), "luau_error", "{code}: {err}");
        assert!(err.to_string().contains("readonly"), "{code}: {err}");
    }
    let reply = answer(sb.eval("return ('a'):upper() .. string.upper('b')")).expect("eval");
    assert_eq!(reply, json!("AB"));
    let seen = answer(sb.call("probe", json!(null), None)).expect("probe");
    assert_eq!(seen, real_builtins());
    assert_node_healthy(&node, &bystander);
}

#[test]
fn builtins_stay_real_across_a_reload() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = builtin_sandbox(&node, "poison");
    for attack in ["alias_string", "string_meta_index", "alias_utf8"] {
        let err = answer(sb.call("attacker", json!(attack), None)).expect("attacker answers");
        assert!(
            err.as_str().unwrap_or_default().contains("readonly"),
            "{err}"
        );
    }
    // A reload whose module body tries it too (through an alias, which the
    // static analysis cannot see) aborts; a clean reload then commits.
    let mut sources = BTreeMap::new();
    sources.insert(
        "probe".to_owned(),
        format!("local s = string\ns.upper = function() return 'pwned' end\n{PROBE}"),
    );
    let err = answer(sb.reload(sources, ReloadOptions::default())).expect_err("poisoned reload");
    assert_eq!(err.kind(), "reload_aborted", "{err}");
    assert!(err.to_string().contains("readonly"), "{err}");
    let mut sources = BTreeMap::new();
    sources.insert("probe".to_owned(), format!("{PROBE}\n-- v2\n"));
    answer(sb.reload(sources, ReloadOptions::default())).expect("reload");
    let seen = answer(sb.call("probe", json!(null), None)).expect("probe");
    assert_eq!(seen, real_builtins());
    assert_node_healthy(&node, &bystander);
}

#[test]
fn supervisors_and_the_prelude_still_work_with_frozen_builtins() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sup = r#"
return { behaviour = "supervisor", init = function()
  return { strategy = "one_for_one", children = {
    { id = "probe", module = "probe", name = "probe" },
    { id = "attacker", module = "attacker", name = "attacker" },
  } }
end }
"#;
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("supervised")
                .entry(Some("app"))
                .module("app", sup)
                .module("attacker", ATTACKER)
                .module("probe", PROBE),
        ),
    )
    .expect("sandbox");
    answer(sb.wait_app_started()).expect("app started");
    let err = answer(sb.call("attacker", json!("alias_string"), None)).expect("attacker");
    assert!(
        err.as_str().unwrap_or_default().contains("readonly"),
        "{err}"
    );
    let seen = answer(sb.call("probe", json!(null), None)).expect("probe");
    assert_eq!(seen, real_builtins());
    assert_node_healthy(&node, &bystander);
}

/// A server whose `handle_call` raises an error of `req` megabytes.
const CRASHER: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(mb, from, state)
    error(string.rep("x", mb * 1024 * 1024), 0)
  end,
}
"#;

/// Monitors or links to a process and keeps the reasons it is told about.
const WATCHER: &str = r#"
return {
  init = function() graft.trap_exit(true); return { seen = {} } end,
  handle_call = function(req, from, state)
    if req.op == "monitor" then graft.monitor(req.target)
    elseif req.op == "link" then graft.link(req.target)
    elseif req.op == "call" then
      local ok, err = pcall(graft.call, req.target, req.mb)
      return tostring(err), state
    end
    return state.seen, state
  end,
  handle_info = function(msg, state)
    table.insert(state.seen, { tag = msg.tag, message = msg.reason.error })
    return state
  end,
}
"#;

const TRUNCATED_AT: usize = 4096;

fn assert_truncated(text: &str, what: &str) {
    assert!(
        text.len() <= TRUNCATED_AT + 128,
        "{what}: {} bytes kept",
        text.len()
    );
    assert!(
        text.contains("… ("),
        "{what}: {}",
        &text[text.len().saturating_sub(80)..]
    );
    assert!(text.ends_with(" more bytes)"), "{what}");
}

#[test]
fn a_crash_message_of_megabytes_is_truncated_everywhere() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("crashes")
                .entry(None)
                .module("crasher", CRASHER)
                .module("watcher", WATCHER),
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("crasher", json!(null), Some("crasher"))).expect("crasher");
    answer(sb.spawn("watcher", json!(null), Some("watcher"))).expect("watcher");
    answer(sb.call(
        "watcher",
        json!({"op": "monitor", "target": "crasher"}),
        None,
    ))
    .expect("mon");
    answer(sb.call("watcher", json!({"op": "link", "target": "crasher"}), None)).expect("link");

    // The host caller's error.
    let err = answer(sb.call("crasher", json!(10), None)).expect_err("crash");
    let Error::Crashed { reason, .. } = &err else {
        panic!("expected crashed, got {err:?}")
    };
    let ExitReason::Error { message, .. } = reason else {
        panic!("expected an error reason, got {reason:?}")
    };
    let suffix = format!("… ({} more bytes)", 10 * 1024 * 1024 - TRUNCATED_AT);
    assert!(message.ends_with(&suffix), "host error");
    assert_eq!(message.len(), TRUNCATED_AT + suffix.len());

    // The crash event.
    let events = answer(sb.events()).expect("events");
    let crash = events
        .iter()
        .rev()
        .find(|e| e.kind == "crash")
        .expect("crash event");
    let msg = crash.detail["reason"]["message"].as_str().expect("message");
    assert_truncated(msg, "event");
    assert!(serde_json::to_string(&crash.detail).unwrap().len() < 3 * TRUNCATED_AT);

    // DOWN and EXIT messages.
    let seen = wait_until("DOWN and EXIT", || {
        let s = answer(sb.call("watcher", json!({"op": "seen"}), None)).ok()?;
        (s.as_array()?.len() == 2).then_some(s)
    });
    for m in seen.as_array().unwrap() {
        assert_truncated(
            m["message"].as_str().expect("message"),
            &m["tag"].to_string(),
        );
    }

    // A guest caller's error.
    answer(sb.spawn("crasher", json!(null), Some("crasher"))).expect("crasher again");
    let err = answer(sb.call(
        "watcher",
        json!({"op": "call", "target": "crasher", "mb": 2}),
        None,
    ))
    .expect("watcher answers");
    assert_truncated(err.as_str().unwrap(), "guest caller");
    assert_node_healthy(&node, &bystander);
}

#[test]
fn events_are_capped_at_max_events_per_sandbox() {
    let node = Node::with_limits(
        2,
        graft::NodeLimits {
            max_events: 5,
            ..graft::NodeLimits::default()
        },
    );
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("crashes")
                .entry(None)
                .module("crasher", CRASHER),
        ),
    )
    .expect("sandbox");
    for _ in 0..12 {
        answer(sb.spawn("crasher", json!(null), Some("crasher"))).expect("crasher");
        let err = answer(sb.call("crasher", json!(1), None)).expect_err("crash");
        assert_eq!(err.kind(), "crashed");
    }
    let events = answer(sb.events()).expect("events");
    assert_eq!(events.len(), 5);
    assert!(events.iter().all(|e| e.kind == "crash"));
    assert_node_healthy(&node, &bystander);
}

/// Prints `req.lines` lines of `req.bytes` bytes each, as fast as it can.
const PRINTER: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(req, from, state)
    local line = string.rep("y", req.bytes)
    for i = 1, req.lines do print(i, line) end
    return true, state
  end,
}
"#;

fn dropped_lines(sb: &graft::Sandbox) -> u64 {
    answer(sb.events())
        .expect("events")
        .iter()
        .filter(|e| e.kind == "log_dropped")
        .map(|e| e.detail["dropped"].as_u64().expect("dropped count"))
        .sum()
}

#[test]
fn a_print_flood_is_capped_and_the_drops_are_counted() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("printer")
                .entry(None)
                .module("printer", PRINTER)
                .limits(limits(|l| l.handler_ms = 10_000)),
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("printer", json!(null), Some("printer"))).expect("printer");
    let lines = 20_000u64;
    let started = Instant::now();
    answer(sb.call(
        "printer",
        json!({"lines": lines, "bytes": 10}),
        Some(10_000),
    ))
    .expect("flood");
    // At most 1000 lines pass per started second; every other one is counted.
    let windows = started.elapsed().as_secs() + 2;
    let dropped = wait_until("log_dropped events", || {
        let d = dropped_lines(&sb);
        (d >= lines.saturating_sub(1000 * windows)).then_some(d)
    });
    assert!(dropped <= lines - 1000, "{dropped} dropped of {lines}");
    // A line of 1 MB is cut, not refused; the sandbox carries on.
    answer(sb.call("printer", json!({"lines": 1, "bytes": 1 << 20}), None)).expect("long line");
    assert!(answer(sb.events()).expect("events").len() <= 1000);
    assert_node_healthy(&node, &bystander);
}

/// Tries `send_after` and `call` with a delay from the request; counts the
/// messages that arrive.
const TIMERS: &str = r#"
return {
  init = function() return { got = {} } end,
  handle_call = function(req, from, state)
    if req.op == "send_after" then
      local ok, r = pcall(graft.send_after, req.ms, graft.self(), "bad")
      if ok then graft.cancel_timer(r) end
      return (if ok then "ok" else r), state
    elseif req.op == "call" then
      local ok, r = pcall(graft.call, "peer", "x", req.ms)
      return (if ok then "ok" else r), state
    elseif req.op == "expr" then
      -- delays only Luau can produce (NaN, 2^64, ±inf, fractions)
      local ms = ({ nan = 0 / 0, two64 = 2 ^ 64, inf = math.huge, ninf = -math.huge,
                    half = 1.5, big = 4294967296, neg = -1, str = "10", tbl = {} })[req.ms]
      local ok, r = pcall(graft.send_after, ms, graft.self(), "bad")
      local ok2, r2 = pcall(graft.call, "peer", "x", ms)
      return { send_after = if ok then "ok" else r, call = if ok2 then "ok" else r2 }, state
    elseif req.op == "sentinel" then
      graft.send_after(20, graft.self(), "sentinel")
      return true, state
    end
    return state.got, state
  end,
  handle_info = function(msg, state)
    table.insert(state.got, msg)
    return state
  end,
}
"#;

#[test]
fn send_after_and_call_refuse_absurd_delays_with_badarg() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("timers")
                .entry(None)
                .module("timers", TIMERS)
                .module("counter", crate::support::COUNTER),
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("timers", json!(null), Some("timers"))).expect("timers");
    answer(sb.spawn("counter", json!(null), Some("peer"))).expect("peer");
    for ms in [
        "nan", "two64", "inf", "ninf", "half", "big", "neg", "str", "tbl",
    ] {
        let r = answer(sb.call("timers", json!({"op": "expr", "ms": ms}), None)).expect("answer");
        for what in ["send_after", "call"] {
            let msg = r[what].as_str().unwrap_or_default();
            assert!(msg.starts_with("badarg: graft."), "{what}({ms}): {msg}");
        }
    }
    // The bounds themselves are fine.
    for ms in [0u64, 4_294_967_295] {
        let r = answer(sb.call("timers", json!({"op": "send_after", "ms": ms}), None));
        assert_eq!(r.expect("answer"), json!("ok"), "send_after({ms})");
        let r = answer(sb.call("timers", json!({"op": "call", "ms": ms}), None));
        assert_eq!(r.expect("answer"), json!("ok"), "call({ms})");
    }
    // Nothing was delivered but the sentinel (a wrapped timer fires at once).
    answer(sb.call("timers", json!({"op": "sentinel"}), None)).expect("sentinel");
    let got = wait_until("the sentinel", || {
        let got = answer(sb.call("timers", json!({"op": "got"}), None)).ok()?;
        (!got.as_array()?.is_empty()).then_some(got)
    });
    std::thread::sleep(Duration::from_millis(50));
    let got_later = answer(sb.call("timers", json!({"op": "got"}), None)).expect("got");
    assert_eq!(got, json!(["sentinel"]));
    assert_eq!(got_later, got);
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_supervisor_shutdown_of_astronomic_ms_does_not_overflow() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sup = r#"
return { behaviour = "supervisor", init = function()
  return { children = { { id = "c", module = "counter", name = "c", shutdown = 2 ^ 70 } } }
end }
"#;
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("sup")
                .entry(Some("app"))
                .module("app", sup)
                .module("counter", crate::support::COUNTER),
        ),
    )
    .expect("sandbox");
    answer(sb.wait_app_started()).expect("app");
    answer(sb.call("c", json!("inc"), None)).expect("child");
    answer(sb.stop_app()).expect("stopped");
    assert_node_healthy(&node, &bystander);
}

/// Registers itself, or spawns a `counter`, under the name in the request.
const NAMER: &str = r#"
return {
  init = function() return {} end,
  handle_call = function(req, from, state)
    local ok, err
    if req.op == "register" then
      ok, err = pcall(graft.register, req.name)
    else
      ok, err = pcall(graft.spawn, "counter", nil, { name = req.name })
    end
    return (if ok then "ok" else tostring(err)), state
  end,
}
"#;

fn bad_names() -> Vec<String> {
    vec![
        String::new(),
        "1".into(),
        "007".into(),
        "<counter.1>".into(),
        "<srv.1>".into(),
        "<".into(),
        "n".repeat(65),
    ]
}

#[test]
fn names_that_read_as_pids_are_refused_with_badarg() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("names")
                .entry(None)
                .module("namer", NAMER)
                .module("counter", crate::support::COUNTER),
        ),
    )
    .expect("sandbox");
    let victim = answer(sb.spawn("counter", json!(null), None)).expect("victim");
    answer(sb.spawn("namer", json!(null), Some("namer"))).expect("namer");
    for name in bad_names() {
        for op in ["register", "spawn"] {
            let r = answer(sb.call("namer", json!({"op": op, "name": name}), None)).expect("namer");
            let r = r.as_str().unwrap_or_default();
            assert!(r.contains("badarg: graft."), "{op}({name:?}): {r}");
        }
        let err = answer(sb.spawn("counter", json!(null), Some(&name))).expect_err("host spawn");
        assert_eq!(err.kind(), "badarg", "{name:?}: {err}");
        assert!(matches!(err, Error::BadArg(_)));
    }
    // 64 bytes and a name with digits and letters are fine.
    for name in ["n".repeat(64), "worker1".into(), "1st".into()] {
        answer(sb.spawn("counter", json!(null), Some(&name))).expect("good name");
    }
    // The victim's pid and serial still reach the victim.
    let serial = victim.serial().to_string();
    answer(sb.call(&victim, json!("inc"), None)).expect("by pid");
    assert_eq!(
        answer(sb.call(&serial, json!("get"), None)).expect("by serial"),
        json!(1)
    );
    let procs = answer(sb.processes()).expect("processes");
    assert!(procs
        .iter()
        .all(|p| p.name.as_deref().is_none_or(|n| n.len() <= 64)));
    assert_node_healthy(&node, &bystander);
}

#[test]
fn a_supervisor_child_name_that_reads_as_a_pid_fails_the_spec() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sup = r#"
return { behaviour = "supervisor", init = function()
  return { children = { { id = "c", module = "counter", name = "<counter.1>" } } }
end }
"#;
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("sup")
                .entry(None)
                .module("app", sup)
                .module("counter", crate::support::COUNTER),
        ),
    )
    .expect("sandbox");
    let err = answer(sb.spawn("app", json!(null), None)).expect_err("bad spec");
    assert_eq!(err.kind(), "spawn_failed", "{err}");
    let text = err.to_string();
    assert!(text.contains("invalid supervisor spec"), "{text}");
    assert!(text.contains("badarg"), "{text}");
    assert!(answer(sb.processes()).expect("processes").is_empty());
    assert_node_healthy(&node, &bystander);
}

/// `p` blocks in a call to `q`, which calls `p` back: both wait (until their
/// timeouts), so `p`'s mailbox only fills.
const BLOCKER: &str = r#"
return {
  init = function() return { n = 0 } end,
  handle_call = function(req, from, state)
    if req == "back" then
      pcall(graft.call, "p", "get", 1500)
      return true, state
    end
    return state.n, state
  end,
  handle_cast = function(msg, state)
    if msg == "block" then
      pcall(graft.call, "q", "back", 1500)
    else
      state.n += 1
    end
    return state
  end,
  handle_info = function(msg, state)
    state.n += 1
    return state
  end,
}
"#;

#[test]
fn host_messages_to_a_full_mailbox_fail_with_mailbox_full() {
    let node = Node::with_threads(2);
    let bystander = counter_sandbox(&node, "bystander");
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("full")
                .entry(None)
                .module("blocker", BLOCKER)
                .limits(limits(|l| l.max_mailbox = 3)),
        ),
    )
    .expect("sandbox");
    answer(sb.spawn("blocker", json!(null), Some("p"))).expect("p");
    answer(sb.spawn("blocker", json!(null), Some("q"))).expect("q");
    answer(sb.cast("p", json!("block"))).expect("block");
    // q's call back to p is the first message in p's mailbox.
    wait_until("p's mailbox holds q's call", || {
        let procs = answer(sb.processes()).ok()?;
        procs
            .iter()
            .any(|p| p.name.as_deref() == Some("p") && p.mailbox_len == 1)
            .then_some(())
    });
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..6 {
        let r = if i % 2 == 0 {
            answer(sb.cast("p", json!("one")))
        } else {
            answer(sb.send("p", json!("one")))
        };
        match r {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert_eq!(e.kind(), "mailbox_full", "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (2, 4));
    let err = answer(sb.call("p", json!("get"), None)).expect_err("call to a full mailbox");
    assert_eq!(err.kind(), "mailbox_full");
    // Once p is free again, every accepted message is handled: none was lost.
    let n = wait_until("p handled its mailbox", || {
        let n = answer(sb.call("p", json!("get"), Some(4000))).ok()?;
        (n == json!(accepted)).then_some(n)
    });
    assert_eq!(n, json!(2));
    assert_node_healthy(&node, &bystander);
}

#[test]
fn send_after_cannot_park_unbounded_names_or_timers_outside_the_heap() {
    let node = graft::Node::with_threads(2);
    let bystander = crate::support::counter_sandbox(&node, "bystander");
    let sb = graft::block_on(node.create_sandbox(
        graft::SandboxSpec::new("timers").entry(None).module(
            "t",
            r#"
            return {
              init = function() return {} end,
              handle_call = function(req, from, state)
                if req == "long" then
                  local ok, err = pcall(graft.send_after, 1000, string.rep("n", 1024 * 1024), 1)
                  return { ok = ok, err = tostring(err) }, state
                end
                local n, last = 0, nil
                for i = 1, 100001 do
                  local ok, err = pcall(graft.send_after, 4294967295, "x", nil)
                  if not ok then last = tostring(err) break end
                  n += 1
                end
                return { n = n, err = last }, state
              end,
            }
            "#,
        ),
    ))
    .expect("sandbox");
    crate::support::answer(sb.spawn("t", serde_json::json!(null), Some("t"))).expect("spawn");
    let r = crate::support::answer(sb.call("t", serde_json::json!("long"), None)).expect("call");
    assert_eq!(r["ok"], serde_json::json!(false), "{r}");
    assert!(
        r["err"].as_str().unwrap_or_default().contains("badarg"),
        "{r}"
    );
    let r = crate::support::answer(sb.call("t", serde_json::json!("many"), Some(60_000)))
        .expect("call");
    // Every pending timer counts (the host call's own timeout timer too).
    let n = r["n"].as_u64().unwrap_or_default();
    assert!((99_990..100_000).contains(&n), "{r}");
    assert!(
        r["err"]
            .as_str()
            .unwrap_or_default()
            .contains("timers pending"),
        "{r}"
    );
    crate::support::assert_node_healthy(&node, &bystander);
}
