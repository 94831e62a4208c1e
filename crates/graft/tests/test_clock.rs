//! The test clock (`SandboxSpec::test_clock`, `Sandbox::advance_clock`):
//! timers fire only when the clock is advanced, in due order, with the
//! clock at each one's due time; call timeouts and `graft.now()` follow it;
//! sandboxes without one refuse; a timer storm is bounded.

use std::future::Future;
use std::time::Duration;

use graft::{block_on, with_timeout, Error, Node, SandboxSpec};
use serde_json::{json, Value as Json};

fn wait<F: Future>(fut: F) -> F::Output {
    block_on(with_timeout(fut, Duration::from_secs(10)))
        .expect("the request did not complete within 10 s")
}

const LOG: &str = r#"
return {
    init = function()
        return { seen = {} }
    end,
    handle_call = function(req, from, state)
        if req == "seen" then
            return state.seen, state
        elseif req == "now" then
            return graft.now(), state
        elseif type(req) == "table" and req.after then
            graft.send_after(req.after, graft.self(), req.msg)
            return true, state
        elseif req == "storm" then
            graft.send_after(0, graft.self(), "storm")
            return true, state
        elseif req == "call_silent" then
            local ok, err = pcall(graft.call, "silent", "x", 1000)
            return tostring(err), state
        end
        return nil, state
    end,
    handle_info = function(msg, state)
        if msg == "storm" then
            graft.send_after(0, graft.self(), "storm")
            return state
        end
        table.insert(state.seen, msg)
        if msg == "chain" then
            graft.send_after(500, graft.self(), "chained")
        end
        return state
    end,
}
"#;

/// A server that never answers in time: it calls its caller back (deadlock).
const SILENT: &str = r#"
return {
    init = function() return {} end,
    handle_call = function(req, from, state)
        return graft.call("log", "seen", 3600000), state
    end,
}
"#;

fn sandbox(node: &Node, id: &str, clock: bool) -> graft::Sandbox {
    let spec = SandboxSpec::new(id)
        .entry(None)
        .test_clock(clock)
        .module("log", LOG)
        .module("silent", SILENT);
    let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    wait(sb.spawn("log", Json::Null, Some("log"))).unwrap();
    sb
}

fn call(sb: &graft::Sandbox, req: Json) -> Json {
    match wait(sb.call("log", req, None)).unwrap() {
        // An empty Luau table is an empty object in JSON.
        Json::Object(o) if o.is_empty() => json!([]),
        other => other,
    }
}

#[test]
fn timers_fire_only_when_advanced_in_due_order() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "order", true);
    call(&sb, json!({ "after": 60000, "msg": "minute" }));
    call(&sb, json!({ "after": 1000, "msg": "chain" }));
    call(&sb, json!({ "after": 1200, "msg": "second" }));
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        call(&sb, json!("seen")),
        json!([]),
        "real time moves no timer"
    );
    wait(sb.advance_clock(1499)).unwrap();
    // `chained` is set at 1000 for 1500: not yet.
    assert_eq!(call(&sb, json!("seen")), json!(["chain", "second"]));
    wait(sb.advance_clock(1)).unwrap();
    assert_eq!(
        call(&sb, json!("seen")),
        json!(["chain", "second", "chained"])
    );
    wait(sb.advance_clock(58_499)).unwrap();
    assert_eq!(call(&sb, json!("seen")).as_array().unwrap().len(), 3);
    wait(sb.advance_clock(1)).unwrap();
    assert_eq!(
        call(&sb, json!("seen")),
        json!(["chain", "second", "chained", "minute"])
    );
}

#[test]
fn graft_now_and_call_timeouts_follow_the_test_clock() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "now", true);
    wait(sb.spawn("silent", Json::Null, Some("silent"))).unwrap();
    let before = call(&sb, json!("now")).as_f64().unwrap();
    wait(sb.advance_clock(86_400_000)).unwrap();
    let after = call(&sb, json!("now")).as_f64().unwrap();
    let elapsed = after - before;
    assert!((86_400_000.0..86_401_000.0).contains(&elapsed), "{elapsed}");

    // A call's 1 s timeout is a timer too: it fires when the clock passes it.
    let pending = std::thread::spawn({
        let sb = sb.clone();
        move || wait(sb.call("log", json!("call_silent"), Some(60_000)))
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!pending.is_finished(), "the timeout waits for the clock");
    wait(sb.advance_clock(1000)).unwrap();
    let answer = pending.join().unwrap().unwrap();
    assert!(
        answer.as_str().unwrap().contains("timeout after 1000 ms"),
        "{answer}"
    );
}

#[test]
fn without_a_test_clock_advance_is_refused_and_timers_run_in_real_time() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "real", false);
    let err = wait(sb.advance_clock(10)).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("has no test clock"), "{err}");
    call(&sb, json!({ "after": 10, "msg": "soon" }));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while call(&sb, json!("seen")) != json!(["soon"]) {
        assert!(std::time::Instant::now() < deadline, "a real timer fires");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_timer_storm_cannot_hold_advance_forever() {
    let node = Node::with_threads(2);
    let sb = sandbox(&node, "storm", true);
    call(&sb, json!("storm"));
    let err = wait(sb.advance_clock(1)).unwrap_err();
    assert!(err.to_string().contains("did not settle"), "{err}");
    // The sandbox still answers.
    assert_eq!(call(&sb, json!("seen")), json!([]));
}
