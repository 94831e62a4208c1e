//! Supervision behaviour, ported from the behaviour (not the names) of
//! Erlang/OTP's `supervisor_SUITE`: restart types × exit reasons, the four
//! strategies, start/stop order, restart intensity, shutdown timeouts,
//! nested supervisors and failing starts.
//!
//! Children are `worker` processes that report `start:<id>` from `init` and
//! `stop:<id>:<reason kind>` from `terminate` through a host function
//! (`rec.log`) into a Rust-side recorder, so the tests see the exact order in
//! which the runtime started and stopped them.

mod common;
use common::{run, wait_until};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graft::{AppStatus, Error, HostFunctions, Node, Sandbox, SandboxSpec};
use serde_json::{json, Value as Json};

// ---------------------------------------------------------------------------
// helpers

/// The Rust side of `rec.log(...)`: every line guest code reported, in order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn host(&self) -> HostFunctions {
        let log = self.0.clone();
        let starts = self.0.clone();
        HostFunctions::default()
            .function("rec.log", move |args| {
                let line = args
                    .first()
                    .and_then(|a| a.as_str())
                    .unwrap_or("?")
                    .to_owned();
                log.lock().unwrap().push(line);
                Ok(Json::Null)
            })
            .function("rec.starts", move |args| {
                let id = args.first().and_then(|a| a.as_str()).unwrap_or("?");
                let want = format!("start:{id}");
                let n = starts
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|l| **l == want)
                    .count();
                Ok(json!(n))
            })
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn since(&self, mark: usize) -> Vec<String> {
        self.0.lock().unwrap()[mark..].to_vec()
    }
}

/// A generic child. args: `id`, `fail` (init raises), `fail_after` (init
/// raises once it has been started more than that many times), `spin_ms`
/// (terminate busy-waits that long, then logs `stopped:<id>`).
const WORKER: &str = r#"
local w = {}

local function kind(reason)
  if type(reason) == "table" then return "error" end
  return tostring(reason)
end

function w.init(args)
  rec.log("start:" .. args.id)
  if args.fail then error("init refused: " .. args.id) end
  if args.fail_after ~= nil and rec.starts(args.id) > args.fail_after then
    error("restart refused: " .. args.id)
  end
  return { id = args.id, spin_ms = args.spin_ms }
end

function w.handle_call(req, from, state)
  if req == "id" then return state.id, state end
  if req == "self" then return graft.self(), state end
  return nil, state
end

function w.handle_cast(msg, state)
  if msg == "crash" then error("crash requested for " .. state.id) end
  if msg == "normal" or msg == "shutdown" then graft.exit(msg) end
  return state
end

function w.terminate(reason, state)
  rec.log("stop:" .. state.id .. ":" .. kind(reason))
  if state.spin_ms ~= nil then
    local t = graft.now()
    while graft.now() - t < state.spin_ms do end
    rec.log("stopped:" .. state.id)
  end
end

return w
"#;

/// A nested supervisor with children `b` and `c`; `args.intensity` bounds its restarts.
const SUB: &str = r#"
return {
  behaviour = "supervisor",
  init = function(args)
    return {
      strategy = "one_for_one", intensity = args.intensity, period = 5,
      children = {
        { id = "b", module = "worker", args = { id = "b" }, name = "b" },
        { id = "c", module = "worker", args = { id = "c" }, name = "c" },
      },
    }
  end,
}
"#;

/// The root supervisor (registered as `root`).
fn sup_src(strategy: &str, intensity: u32, period: f64, children: &[String]) -> String {
    format!(
        r#"
return {{
  behaviour = "supervisor",
  init = function(args)
    graft.register("root")
    return {{
      strategy = "{strategy}", intensity = {intensity}, period = {period},
      children = {{ {} }},
    }}
  end,
}}
"#,
        children.join(",\n        ")
    )
}

/// A worker child spec registered under its id; `extra` adds spec fields, `args` worker args.
fn child(id: &str, restart: &str, extra: &str, args: &str) -> String {
    format!(
        r#"{{ id = "{id}", module = "worker", name = "{id}", restart = "{restart}", args = {{ id = "{id}"{args} }}{extra} }}"#
    )
}

fn sandbox(node: &Node, id: &str, app: &str, rec: &Recorder) -> Sandbox {
    let spec = SandboxSpec::new(id)
        .module("app", app)
        .module("worker", WORKER)
        .module("sub", SUB);
    graft::block_on(node.create_sandbox_with(spec, rec.host())).expect("sandbox starts")
}

/// Waits for the app; returns the root supervisor's pid string.
fn started(sb: &Sandbox) -> String {
    let pid = run(sb.wait_app_started()).expect("app starts");
    pid.as_str().expect("pid string").to_owned()
}

/// `(id, pid or None when not running)` in the supervisor's child order.
type Children = Vec<(String, Option<String>)>;

/// Lists the children of `sup` through `which_children`.
fn children(sb: &Sandbox, sup: &str) -> Children {
    let reply =
        run(sb.call(sup, json!({"$sup": "which_children"}), Some(2000))).expect("which_children");
    let rows = match reply {
        Json::Array(rows) => rows,
        Json::Object(m) if m.is_empty() => Vec::new(),
        other => panic!("which_children returned {other}"),
    };
    rows.into_iter()
        .map(|r| {
            let id = match &r["id"] {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            };
            let pid = r["pid"].as_str().map(str::to_owned);
            (id, pid)
        })
        .collect()
}

/// `None`: not listed; `Some(None)`: listed, not running; `Some(Some(pid))`: running.
fn entry(children: &[(String, Option<String>)], id: &str) -> Option<Option<String>> {
    children
        .iter()
        .find(|(i, _)| i == id)
        .map(|(_, p)| p.clone())
}

fn running_pid(children: &[(String, Option<String>)], id: &str) -> String {
    match entry(children, id) {
        Some(Some(pid)) => pid,
        other => panic!("child {id} is not running: {other:?} in {children:?}"),
    }
}

/// Waits until child `id` is no longer `old` (restarted, stopped or removed).
fn wait_child_changed(sb: &Sandbox, sup: &str, id: &str, old: &str) -> Children {
    wait_until(&format!("child {id} (was {old}) to change"), || {
        let ch = children(sb, sup);
        (entry(&ch, id) != Some(Some(old.to_owned()))).then_some(ch)
    })
}

fn process_names(sb: &Sandbox) -> Vec<String> {
    run(sb.processes())
        .unwrap()
        .into_iter()
        .filter_map(|p| p.name)
        .collect()
}

fn crash(sb: &Sandbox, name: &str) {
    run(sb.cast(name, json!("crash"))).expect("cast crash");
}

/// Makes child `name` exit with `reason`: normal | shutdown | error | kill.
fn make_exit(sb: &Sandbox, name: &str, reason: &str) {
    match reason {
        "normal" | "shutdown" => run(sb.cast(name, json!(reason))).expect("cast exit"),
        "error" => crash(sb, name),
        "kill" => {
            let r = run(sb.eval(&format!(
                r#"return graft.exit(graft.whereis("{name}"), "kill")"#
            )))
            .expect("eval kill");
            assert_eq!(
                r,
                json!(true),
                "exit(pid, \"kill\") reports the signal was sent"
            );
        }
        other => unreachable!("{other}"),
    }
}

fn event_kinds(sb: &Sandbox) -> Vec<String> {
    run(sb.events())
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

// ---------------------------------------------------------------------------
// restart types × exit reasons

/// One cell of the matrix: child `c` of `restart` type exits with `reason`;
/// sibling `s` must be untouched in every case.
fn restart_case(restart: &str, reason: &str, expect_restart: bool) {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let app = sup_src(
        "one_for_one",
        10,
        5.0,
        &[child("c", restart, "", ""), child("s", "permanent", "", "")],
    );
    let sb = sandbox(&node, &format!("m-{restart}-{reason}"), &app, &rec);
    let root = started(&sb);
    let before = children(&sb, &root);
    let old_c = running_pid(&before, "c");
    let old_s = running_pid(&before, "s");
    let mark = rec.len();

    make_exit(&sb, "c", reason);
    let after = wait_child_changed(&sb, &root, "c", &old_c);
    let case = format!("{restart} child exiting with {reason}");

    // terminate runs for every exit but kill
    let mut expected_log = Vec::new();
    if reason != "kill" {
        let kind = if reason == "error" { "error" } else { reason };
        expected_log.push(format!("stop:c:{kind}"));
    }
    if expect_restart {
        expected_log.push("start:c".to_owned());
    }
    assert_eq!(rec.since(mark), expected_log, "{case}: start/stop log");

    if expect_restart {
        let new_c = running_pid(&after, "c");
        assert_ne!(new_c, old_c, "{case}: restarted under a new pid");
        assert_eq!(
            run(sb.call("c", json!("id"), None)).unwrap(),
            json!("c"),
            "{case}: the new c answers"
        );
        assert_eq!(
            run(sb.call("c", json!("self"), None)).unwrap(),
            json!(new_c),
            "{case}: name points at the new pid"
        );
    } else {
        match restart {
            // OTP: a transient child that is not restarted keeps its spec
            "transient" => assert_eq!(
                entry(&after, "c"),
                Some(None),
                "{case}: kept, not running: {after:?}"
            ),
            // OTP: a temporary child is forgotten once it exits
            _ => assert_eq!(
                entry(&after, "c"),
                None,
                "{case}: removed from the children: {after:?}"
            ),
        }
        let err = run(sb.call("c", json!("id"), None)).unwrap_err();
        assert!(
            matches!(err, Error::NoProcess(_)),
            "{case}: c is gone, got {err:?}"
        );
        assert!(!process_names(&sb).contains(&"c".to_owned()), "{case}");
    }
    assert_eq!(running_pid(&after, "s"), old_s, "{case}: sibling untouched");
    assert_eq!(
        run(sb.info()).unwrap().app,
        AppStatus::Running,
        "{case}: app still running"
    );
}

#[test]
fn permanent_child_is_restarted_whatever_the_exit_reason() {
    for reason in ["normal", "shutdown", "error", "kill"] {
        restart_case("permanent", reason, true);
    }
}

#[test]
fn transient_child_is_restarted_only_after_an_abnormal_exit() {
    for (reason, restarted) in [
        ("normal", false),
        ("shutdown", false),
        ("error", true),
        ("kill", true),
    ] {
        restart_case("transient", reason, restarted);
    }
}

#[test]
fn temporary_child_is_never_restarted() {
    for reason in ["normal", "shutdown", "error", "kill"] {
        restart_case("temporary", reason, false);
    }
}

// ---------------------------------------------------------------------------
// strategies

fn three_children() -> Vec<String> {
    ["a", "b", "c"]
        .iter()
        .map(|id| child(id, "permanent", ", shutdown = 1000", ""))
        .collect()
}

/// Crashes `victim` under `strategy`; returns (pids before, pids after, log since the crash).
fn strategy_case(
    strategy: &str,
    victim: &str,
    restarted: &[&str],
) -> (Children, Children, Vec<String>) {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let app = sup_src(strategy, 10, 5.0, &three_children());
    let sb = sandbox(&node, "strategy", &app, &rec);
    let root = started(&sb);
    let before = children(&sb, &root);
    let mark = rec.len();
    crash(&sb, victim);
    let after = wait_until("every restarted child to run under a new pid", || {
        let ch = children(&sb, &root);
        let done = restarted.iter().all(|id| {
            let old = entry(&before, id).flatten();
            matches!(entry(&ch, id), Some(Some(p)) if Some(&p) != old.as_ref())
        });
        done.then_some(ch)
    });
    // nothing else happens afterwards
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(children(&sb, &root), after, "{strategy}: children settled");
    for (id, pid) in &after {
        let old = entry(&before, id).flatten();
        if restarted.contains(&id.as_str()) {
            assert_ne!(pid, &old, "{strategy}: {id} restarted");
        } else {
            assert_eq!(pid, &old, "{strategy}: {id} untouched");
        }
    }
    assert_eq!(
        after.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"],
        "{strategy}: order kept"
    );
    // The supervisor counts restarts per child: the restarted ones once.
    for (id, restarts) in restart_counts(&sb, &root) {
        let expected = u64::from(restarted.contains(&id.as_str()));
        assert_eq!(restarts, expected, "{strategy}: restarts of {id}");
    }
    (before, after, rec.since(mark))
}

/// `(id, restarts)` of each child of `sup`, from `which_children`.
fn restart_counts(sb: &Sandbox, sup: &str) -> Vec<(String, u64)> {
    let reply =
        run(sb.call(sup, json!({"$sup": "which_children"}), Some(2000))).expect("which_children");
    reply
        .as_array()
        .expect("children")
        .iter()
        .map(|r| {
            let id = r["id"].as_str().expect("id").to_owned();
            (id, r["restarts"].as_u64().expect("restarts count"))
        })
        .collect()
}

#[test]
fn one_for_one_restarts_only_the_failed_child() {
    let (_, _, log) = strategy_case("one_for_one", "b", &["b"]);
    assert_eq!(log, ["stop:b:error", "start:b"]);
    let (_, _, log) = strategy_case("one_for_one", "a", &["a"]);
    assert_eq!(log, ["stop:a:error", "start:a"]);
}

#[test]
fn one_for_all_stops_the_others_in_reverse_order_and_restarts_all_in_order() {
    let (_, _, log) = strategy_case("one_for_all", "b", &["a", "b", "c"]);
    assert_eq!(
        log,
        [
            "stop:b:error",
            "stop:c:shutdown",
            "stop:a:shutdown",
            "start:a",
            "start:b",
            "start:c"
        ]
    );
    let (_, _, log) = strategy_case("one_for_all", "c", &["a", "b", "c"]);
    assert_eq!(
        log,
        [
            "stop:c:error",
            "stop:b:shutdown",
            "stop:a:shutdown",
            "start:a",
            "start:b",
            "start:c"
        ]
    );
}

#[test]
fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
    let (_, _, log) = strategy_case("rest_for_one", "b", &["b", "c"]);
    assert_eq!(
        log,
        ["stop:b:error", "stop:c:shutdown", "start:b", "start:c"]
    );
    let (_, _, log) = strategy_case("rest_for_one", "c", &["c"]);
    assert_eq!(log, ["stop:c:error", "start:c"]);
    let (_, _, log) = strategy_case("rest_for_one", "a", &["a", "b", "c"]);
    assert_eq!(
        log,
        [
            "stop:a:error",
            "stop:c:shutdown",
            "stop:b:shutdown",
            "start:a",
            "start:b",
            "start:c"
        ]
    );
}

/// OTP: "a temporary child process is never restarted (even when the
/// supervisor's restart strategy is rest_for_one or one_for_all and a
/// sibling's death causes the temporary process to be terminated)".
#[test]
fn temporary_sibling_stopped_by_one_for_all_is_not_restarted() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let kids = [
        child("a", "permanent", "", ""),
        child("t", "temporary", "", ""),
        child("b", "permanent", "", ""),
    ];
    let sb = sandbox(
        &node,
        "ofa-temp",
        &sup_src("one_for_all", 10, 5.0, &kids),
        &rec,
    );
    let root = started(&sb);
    let before = children(&sb, &root);
    let old_a = running_pid(&before, "a");
    let old_b = running_pid(&before, "b");
    let mark = rec.len();
    crash(&sb, "b");
    let after = wait_until("a and b restarted", || {
        let ch = children(&sb, &root);
        let ok = matches!(entry(&ch, "a"), Some(Some(p)) if p != old_a)
            && matches!(entry(&ch, "b"), Some(Some(p)) if p != old_b);
        ok.then_some(ch)
    });
    let log = rec.since(mark);
    assert_eq!(
        &log[..3],
        ["stop:b:error", "stop:t:shutdown", "stop:a:shutdown"],
        "{log:?}"
    );
    assert!(
        !log.contains(&"start:t".to_owned()),
        "the temporary child t was restarted: {log:?}"
    );
    assert_eq!(
        entry(&after, "t"),
        None,
        "the temporary child is removed from the children: {after:?}"
    );
    assert!(!process_names(&sb).contains(&"t".to_owned()));
}

#[test]
fn simple_one_for_one_starts_and_terminates_dynamic_children() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let template =
        r#"{ id = "dyn", module = "worker", restart = "transient", shutdown = 1000 }"#.to_owned();
    let sb = sandbox(
        &node,
        "simple",
        &sup_src("simple_one_for_one", 10, 5.0, &[template]),
        &rec,
    );
    let root = started(&sb);
    assert!(
        children(&sb, &root).is_empty(),
        "no child starts with the supervisor"
    );
    assert!(rec.all().is_empty(), "{:?}", rec.all());

    let pids = run(sb.eval(
        r#"
        local out = {}
        for _, id in { "d1", "d2", "d3" } do
          out[#out + 1] = graft.start_child("root", { id = id })
        end
        return out
        "#,
    ))
    .expect("start_child");
    let pids: Vec<String> = pids
        .as_array()
        .expect("pids")
        .iter()
        .map(|p| p.as_str().expect("a pid").to_owned())
        .collect();
    assert_eq!(pids.len(), 3);
    assert_eq!(
        rec.all(),
        ["start:d1", "start:d2", "start:d3"],
        "started with the given args, in order"
    );
    let listed = children(&sb, &root);
    assert_eq!(
        listed
            .iter()
            .map(|(_, p)| p.clone().unwrap())
            .collect::<Vec<_>>(),
        pids,
        "which_children in start order"
    );

    // a transient dynamic child that crashes is restarted with the same args
    let mark = rec.len();
    let id2 = listed[1].0.clone();
    crash(&sb, &pids[1]);
    let after = wait_child_changed(&sb, &root, &id2, &pids[1]);
    assert!(matches!(entry(&after, &id2), Some(Some(_))), "{after:?}");
    assert_eq!(rec.since(mark), ["stop:d2:error", "start:d2"]);

    // terminate_child by pid: stopped with terminate and removed from the list
    let mark = rec.len();
    let r = run(sb.eval(
        r#"
        local kids = graft.which_children("root")
        local first = kids[1].pid
        local ok = graft.terminate_child("root", first)
        local again = graft.terminate_child("root", first)
        return { ok = ok, again = again, n = #graft.which_children("root") }
        "#,
    ))
    .expect("terminate_child");
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(r["again"], json!({"error": "not_found"}), "{r}");
    assert_eq!(r["n"], json!(2), "{r}");
    assert_eq!(rec.since(mark), ["stop:d1:shutdown"]);
    assert!(
        run(sb.call(&pids[0], json!("id"), None)).is_err(),
        "d1 is gone"
    );

    // a transient dynamic child that exits normally is not restarted and is removed
    let mark = rec.len();
    run(sb.cast(&pids[2], json!("normal"))).unwrap();
    let after = wait_until("d3 to be removed", || {
        let ch = children(&sb, &root);
        (ch.len() == 1).then_some(ch)
    });
    assert_eq!(rec.since(mark), ["stop:d3:normal"]);
    assert_eq!(after[0].0, id2);

    // a child whose init fails: start_child reports the error, the supervisor lives on
    let r =
        run(sb.eval(r#"return graft.start_child("root", { id = "bad", fail = true })"#)).unwrap();
    let msg = r["error"]
        .as_str()
        .unwrap_or_else(|| panic!("start_child of a failing child returned {r}"));
    assert!(msg.contains("init refused: bad"), "{msg}");
    assert_eq!(children(&sb, &root).len(), 1);
    assert_eq!(run(sb.info()).unwrap().app, AppStatus::Running);
}

#[test]
fn start_child_and_terminate_child_in_a_one_for_one_supervisor() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let sb = sandbox(
        &node,
        "dyn-ofo",
        &sup_src("one_for_one", 10, 5.0, &[child("a", "permanent", "", "")]),
        &rec,
    );
    let root = started(&sb);
    let r = run(sb.eval(
        r#"
        local spec = { id = "x", module = "worker", name = "x", args = { id = "x" } }
        local pid = graft.start_child("root", spec)
        local dup = graft.start_child("root", spec)
        return { pid = pid, dup = dup, is_pid = graft.is_pid(pid) }
        "#,
    ))
    .unwrap();
    assert_eq!(r["is_pid"], json!(true), "{r}");
    assert_eq!(r["dup"], json!({"error": "already_present"}), "{r}");
    let ch = children(&sb, &root);
    assert_eq!(
        ch.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
        ["a", "x"]
    );
    assert_eq!(running_pid(&ch, "x"), r["pid"].as_str().unwrap());

    // the added child is supervised like the static ones
    let old_x = running_pid(&ch, "x");
    crash(&sb, "x");
    let ch = wait_child_changed(&sb, &root, "x", &old_x);
    assert!(
        matches!(entry(&ch, "x"), Some(Some(_))),
        "permanent dynamic child restarted: {ch:?}"
    );

    // terminate_child by id: stopped (terminate runs), spec kept, not restarted
    let mark = rec.len();
    let r = run(sb.eval(
        r#"return { graft.terminate_child("root", "x"), graft.terminate_child("root", "nope") }"#,
    ))
    .unwrap();
    assert_eq!(r, json!([true, {"error": "not_found"}]));
    assert_eq!(rec.since(mark), ["stop:x:shutdown"]);
    std::thread::sleep(Duration::from_millis(20));
    let ch = children(&sb, &root);
    assert_eq!(
        entry(&ch, "x"),
        Some(None),
        "terminated permanent child keeps its spec, not running: {ch:?}"
    );
    assert!(!process_names(&sb).contains(&"x".to_owned()));
}

// ---------------------------------------------------------------------------
// order, intensity, shutdown

#[test]
fn children_start_in_order_and_stop_in_reverse_order() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let sb = sandbox(
        &node,
        "order",
        &sup_src("one_for_one", 3, 5.0, &three_children()),
        &rec,
    );
    let root = started(&sb);
    assert_eq!(rec.all(), ["start:a", "start:b", "start:c"]);
    let ch = children(&sb, &root);
    assert_eq!(
        ch.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    // each child is linked to its supervisor
    let procs = run(sb.processes()).unwrap();
    let sup = procs.iter().find(|p| p.pid == root).expect("root listed");
    for (id, pid) in &ch {
        let pid = pid.as_ref().unwrap();
        assert!(
            sup.links.iter().any(|l| l == pid),
            "supervisor linked to {id}: {:?}",
            sup.links
        );
    }
    assert!(sup.trap_exit, "a supervisor traps exits");

    let reason = run(sb.stop_app()).unwrap();
    assert_eq!(reason, json!("shutdown"));
    assert_eq!(
        rec.since(3),
        ["stop:c:shutdown", "stop:b:shutdown", "stop:a:shutdown"]
    );
    let info = run(sb.info()).unwrap();
    assert_eq!(
        info.app,
        AppStatus::Stopped {
            reason: "shutdown".into()
        }
    );
    assert_eq!(info.process_count, 0);
    assert!(run(sb.processes()).unwrap().is_empty());
}

#[test]
fn exceeding_the_restart_intensity_stops_every_child_and_the_app() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let kids = [
        child("c", "permanent", "", ""),
        child("b", "permanent", "", ""),
    ];
    let sb = sandbox(
        &node,
        "intensity",
        &sup_src("one_for_one", 2, 5.0, &kids),
        &rec,
    );
    let root = started(&sb);

    // intensity = 2: two restarts within the period are fine
    for _ in 0..2 {
        let old = running_pid(&children(&sb, &root), "c");
        crash(&sb, "c");
        let ch = wait_child_changed(&sb, &root, "c", &old);
        assert!(matches!(entry(&ch, "c"), Some(Some(_))), "{ch:?}");
    }
    assert_eq!(run(sb.info()).unwrap().app, AppStatus::Running);
    assert!(!event_kinds(&sb)
        .iter()
        .any(|k| k == "reached_max_restart_intensity"));

    // the third restart within the period is one too many
    let mark = rec.len();
    crash(&sb, "c");
    let info = wait_until("the app to stop", || {
        let info = run(sb.info()).unwrap();
        (info.app != AppStatus::Running).then_some(info)
    });
    assert_eq!(
        info.app,
        AppStatus::Stopped {
            reason: "shutdown".into()
        }
    );
    assert_eq!(info.status, "app_stopped");
    assert_eq!(
        rec.since(mark),
        ["stop:c:error", "stop:b:shutdown"],
        "no restart; the sibling is stopped"
    );
    wait_until("every process to be gone", || {
        run(sb.processes()).unwrap().is_empty().then_some(())
    });

    let events = run(sb.events()).unwrap();
    let max = events
        .iter()
        .find(|e| e.kind == "reached_max_restart_intensity")
        .expect("reached_max_restart_intensity event");
    assert_eq!(max.detail["supervisor"], json!(root), "{:?}", max.detail);
    let stopped = events
        .iter()
        .find(|e| e.kind == "app_stopped")
        .expect("app_stopped event");
    assert!(
        stopped.seq > max.seq,
        "app_stopped comes after reached_max_restart_intensity"
    );
    assert!(
        stopped.detail.to_string().contains("shutdown"),
        "{:?}",
        stopped.detail
    );
    assert_eq!(
        events.iter().filter(|e| e.kind == "crash").count(),
        3,
        "three crashes recorded"
    );

    let err = run(sb.wait_app_started()).unwrap_err();
    assert!(err.to_string().contains("shutdown"), "{err}");
    assert!(matches!(
        run(sb.call("b", json!("id"), None)),
        Err(Error::NoProcess(_))
    ));
}

#[test]
fn restarts_older_than_the_period_do_not_count() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    // at most 1 restart per 150 ms
    let sb = sandbox(
        &node,
        "period",
        &sup_src("one_for_one", 1, 0.15, &[child("c", "permanent", "", "")]),
        &rec,
    );
    let root = started(&sb);
    let crash_and_wait = || {
        let old = running_pid(&children(&sb, &root), "c");
        crash(&sb, "c");
        wait_until("c to be restarted", || {
            let ch = children(&sb, &root);
            matches!(entry(&ch, "c"), Some(Some(p)) if p != old).then_some(())
        });
    };
    for _ in 0..3 {
        crash_and_wait();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        run(sb.info()).unwrap().app,
        AppStatus::Running,
        "spaced restarts never exceed the intensity"
    );

    // two restarts inside one period do
    crash_and_wait();
    crash(&sb, "c");
    wait_until("the app to stop", || {
        (run(sb.info()).unwrap().app != AppStatus::Running).then_some(())
    });
    assert!(event_kinds(&sb)
        .iter()
        .any(|k| k == "reached_max_restart_intensity"));
}

#[test]
fn a_failing_restart_counts_toward_the_intensity() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    // c starts once, then every restart attempt fails in init
    let kids = [child("c", "permanent", "", ", fail_after = 1")];
    let sb = sandbox(
        &node,
        "failing-restart",
        &sup_src("one_for_one", 3, 5.0, &kids),
        &rec,
    );
    started(&sb);
    assert_eq!(rec.all(), ["start:c"]);
    crash(&sb, "c");
    let info = wait_until("the app to stop", || {
        let info = run(sb.info()).unwrap();
        (info.app != AppStatus::Running).then_some(info)
    });
    assert_eq!(
        info.app,
        AppStatus::Stopped {
            reason: "shutdown".into()
        }
    );
    let log = rec.since(1);
    assert_eq!(log[0], "stop:c:error");
    // restart 1 (after the crash), 2 and 3 (after failed attempts) are tried; the 4th exceeds
    assert_eq!(log[1..], ["start:c", "start:c", "start:c"], "{log:?}");
    assert!(event_kinds(&sb)
        .iter()
        .any(|k| k == "reached_max_restart_intensity"));
}

#[test]
fn shutdown_timeout_kills_a_slow_terminate_and_brutal_kill_skips_terminate() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let kids = [
        child("fast", "permanent", ", shutdown = 1000", ""),
        child("slow", "permanent", ", shutdown = 50", ", spin_ms = 400"),
        child("brutal", "permanent", r#", shutdown = "brutal_kill""#, ""),
    ];
    let sb = sandbox(
        &node,
        "shutdown",
        &sup_src("one_for_one", 3, 5.0, &kids),
        &rec,
    );
    started(&sb);
    let mark = rec.len();
    let t = Instant::now();
    let reason = run(sb.stop_app()).unwrap();
    let took = t.elapsed();
    assert_eq!(reason, json!("shutdown"));
    // reverse order: brutal is killed (no terminate), slow's terminate starts and is cut
    // after 50 ms (it never logs `stopped:slow`), then fast stops normally
    assert_eq!(
        rec.since(mark),
        ["stop:slow:shutdown", "stop:fast:shutdown"]
    );
    assert!(
        took < Duration::from_millis(350),
        "the slow child was killed after its shutdown time, stop took {took:?}"
    );
    assert!(
        took >= Duration::from_millis(45),
        "the slow child had its 50 ms to stop, stop took {took:?}"
    );
    assert!(run(sb.processes()).unwrap().is_empty());
}

#[test]
fn terminate_within_the_shutdown_time_or_infinity_completes() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let kids = [
        child(
            "patient",
            "permanent",
            ", shutdown = 2000",
            ", spin_ms = 60",
        ),
        child(
            "forever",
            "permanent",
            r#", shutdown = "infinity""#,
            ", spin_ms = 60",
        ),
    ];
    let sb = sandbox(
        &node,
        "shutdown-ok",
        &sup_src("one_for_one", 3, 5.0, &kids),
        &rec,
    );
    started(&sb);
    let mark = rec.len();
    let t = Instant::now();
    run(sb.stop_app()).unwrap();
    assert_eq!(
        rec.since(mark),
        [
            "stop:forever:shutdown",
            "stopped:forever",
            "stop:patient:shutdown",
            "stopped:patient"
        ]
    );
    assert!(
        t.elapsed() >= Duration::from_millis(110),
        "both terminates ran to the end"
    );
}

#[test]
fn terminate_child_with_brutal_kill_skips_terminate() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let kids = [
        child("k", "permanent", r#", shutdown = "brutal_kill""#, ""),
        child("g", "permanent", ", shutdown = 500", ""),
    ];
    let sb = sandbox(
        &node,
        "brutal",
        &sup_src("one_for_one", 3, 5.0, &kids),
        &rec,
    );
    started(&sb);
    let mark = rec.len();
    let r = run(sb.eval(
        r#"return { graft.terminate_child("root", "k"), graft.terminate_child("root", "g") }"#,
    ))
    .unwrap();
    assert_eq!(r, json!([true, true]));
    assert_eq!(
        rec.since(mark),
        ["stop:g:shutdown"],
        "brutal_kill: no terminate for k"
    );
    let names = process_names(&sb);
    assert!(
        !names.contains(&"k".to_owned()) && !names.contains(&"g".to_owned()),
        "{names:?}"
    );
}

// ---------------------------------------------------------------------------
// nesting and failing starts

fn nested_app(sub_intensity: u32) -> String {
    let sub = format!(
        r#"{{ id = "sub", module = "sub", name = "sub", args = {{ intensity = {sub_intensity} }}, shutdown = "infinity" }}"#
    );
    sup_src(
        "one_for_one",
        3,
        5.0,
        &[
            child("a", "permanent", "", ""),
            sub,
            child("d", "permanent", "", ""),
        ],
    )
}

#[test]
fn nested_supervisor_restarts_its_own_children_and_stops_in_reverse_order() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "nested", &nested_app(3), &rec);
    let root = started(&sb);
    assert_eq!(
        rec.all(),
        ["start:a", "start:b", "start:c", "start:d"],
        "depth-first start order"
    );
    let top = children(&sb, &root);
    let inner = children(&sb, "sub");
    assert_eq!(
        inner.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
        ["b", "c"]
    );

    let mark = rec.len();
    let old_b = running_pid(&inner, "b");
    crash(&sb, "b");
    let inner_after = wait_child_changed(&sb, "sub", "b", &old_b);
    assert!(matches!(entry(&inner_after, "b"), Some(Some(_))));
    assert_eq!(
        entry(&inner_after, "c"),
        entry(&inner, "c"),
        "sibling c untouched"
    );
    assert_eq!(children(&sb, &root), top, "the root saw nothing");
    assert_eq!(rec.since(mark), ["stop:b:error", "start:b"]);

    let mark = rec.len();
    assert_eq!(run(sb.stop_app()).unwrap(), json!("shutdown"));
    assert_eq!(
        rec.since(mark),
        [
            "stop:d:shutdown",
            "stop:c:shutdown",
            "stop:b:shutdown",
            "stop:a:shutdown"
        ]
    );
    assert!(run(sb.processes()).unwrap().is_empty());
}

#[test]
fn nested_supervisor_that_gives_up_is_restarted_by_its_parent() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "nested-giveup", &nested_app(0), &rec);
    let root = started(&sb);
    let top = children(&sb, &root);
    let old_sub = running_pid(&top, "sub");
    let mark = rec.len();
    crash(&sb, "b");
    let top_after = wait_child_changed(&sb, &root, "sub", &old_sub);
    assert!(
        matches!(entry(&top_after, "sub"), Some(Some(_))),
        "sub restarted: {top_after:?}"
    );
    assert_eq!(entry(&top_after, "a"), entry(&top, "a"));
    assert_eq!(entry(&top_after, "d"), entry(&top, "d"));
    assert_eq!(
        rec.since(mark),
        ["stop:b:error", "stop:c:shutdown", "start:b", "start:c"]
    );
    let inner = children(&sb, "sub");
    assert!(inner.iter().all(|(_, p)| p.is_some()), "{inner:?}");
    let events = run(sb.events()).unwrap();
    let max = events
        .iter()
        .find(|e| e.kind == "reached_max_restart_intensity")
        .expect("event");
    assert_eq!(max.detail["supervisor"], json!(old_sub));
    assert_eq!(
        run(sb.info()).unwrap().app,
        AppStatus::Running,
        "the root is within its own intensity"
    );
}

#[test]
fn a_child_init_failure_fails_the_supervisor_start() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let kids = [
        child("a", "permanent", "", ""),
        child("b", "permanent", "", ", fail = true"),
        child("c", "permanent", "", ""),
    ];
    let sb = sandbox(
        &node,
        "init-fail",
        &sup_src("one_for_one", 3, 5.0, &kids),
        &rec,
    );
    let err = run(sb.wait_app_started()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("failed to start child `b`") && msg.contains("init refused: b"),
        "{msg}"
    );
    // a was started and stopped again; c was never started
    assert_eq!(rec.all(), ["start:a", "start:b", "stop:a:shutdown"]);
    let info = run(sb.info()).unwrap();
    match &info.app {
        AppStatus::Stopped { reason } => {
            assert!(
                reason.contains("failed to start child `b`") && reason.contains("init refused: b"),
                "{reason}"
            )
        }
        other => panic!("app should be stopped, is {other:?}"),
    }
    assert_eq!(info.status, "app_stopped");
    wait_until("every process to be gone", || {
        run(sb.processes()).unwrap().is_empty().then_some(())
    });
    let kinds = event_kinds(&sb);
    assert_eq!(
        kinds.iter().filter(|k| *k == "app_stopped").count(),
        1,
        "one app_stopped event: {kinds:?}"
    );
}

#[test]
fn an_invalid_supervisor_spec_fails_the_app_start_with_a_clear_reason() {
    let rec = Recorder::default();
    let node = Node::with_threads(2);
    let sb = sandbox(
        &node,
        "bad-spec",
        &sup_src("one_for_none", 3, 5.0, &[]),
        &rec,
    );
    let err = run(sb.wait_app_started()).unwrap_err();
    assert!(
        err.to_string().contains("unknown strategy `one_for_none`"),
        "{err}"
    );
    assert!(matches!(
        run(sb.info()).unwrap().app,
        AppStatus::Stopped { .. }
    ));

    let node = Node::with_threads(1);
    let dup = [
        child("a", "permanent", "", ""),
        child("a", "permanent", "", ""),
    ];
    let sb = sandbox(
        &node,
        "dup-spec",
        &sup_src("one_for_one", 3, 5.0, &dup),
        &rec,
    );
    let err = run(sb.wait_app_started()).unwrap_err();
    assert!(err.to_string().contains("duplicate child id `a`"), "{err}");
    assert!(
        rec.all().is_empty(),
        "no child starts from an invalid spec: {:?}",
        rec.all()
    );
}
