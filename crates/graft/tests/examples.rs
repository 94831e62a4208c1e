//! The bundled examples load and serve as documented.

use std::path::Path;

use graft::{block_on, Node, SandboxSpec};
use serde_json::json;

fn example(name: &str) -> SandboxSpec {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    SandboxSpec::from_dir(&dir).unwrap()
}

#[test]
fn counter_example_counts_and_its_test_passes() {
    let node = Node::with_threads(1);
    let sb = graft::block_on(node.create_sandbox(example("counter"))).unwrap();
    block_on(sb.wait_app_started()).unwrap();
    assert_eq!(
        block_on(sb.call("counter", json!("inc"), None)).unwrap(),
        json!(1)
    );
    block_on(sb.cast("counter", json!({"add": 41}))).unwrap();
    assert_eq!(
        block_on(sb.call("counter", json!("get"), None)).unwrap(),
        json!(42)
    );
    let test = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/counter/test/smoke.luau"),
    )
    .unwrap();
    assert_eq!(
        block_on(sb.eval(&test)).unwrap(),
        json!({"before": 42, "after": 43})
    );
}

fn example_file(name: &str, file: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name)
            .join(file),
    )
    .unwrap()
}

fn is_empty(v: &serde_json::Value) -> bool {
    v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty())
}

/// Polls `f` until it returns `Some`, for up to 5 s.
fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached in 5 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn chat_example_delivers_messages_between_processes() {
    let node = Node::with_threads(2);
    let sb = graft::block_on(node.create_sandbox(example("chat"))).unwrap();
    block_on(sb.wait_app_started()).unwrap();
    let call = |target: &str, req: serde_json::Value| block_on(sb.call(target, req, None)).unwrap();

    for user in ["alice", "bob"] {
        let pid = call("registry", json!({"op": "connect", "user": user}));
        assert!(pid.as_str().unwrap().starts_with("<chat.member."), "{pid}");
    }
    // A second connect under the same name is refused.
    let again = call("registry", json!({"op": "connect", "user": "alice"}));
    assert!(again["error"].as_str().is_some(), "{again}");

    let joined = call("alice", json!({"op": "join", "room": "lobby"}));
    assert_eq!(joined, json!({"room": "lobby", "members": ["alice"]}));
    let joined = call("bob", json!({"op": "join", "room": "lobby"}));
    assert_eq!(
        joined,
        json!({"room": "lobby", "members": ["alice", "bob"]})
    );

    assert_eq!(
        call(
            "alice",
            json!({"op": "say", "room": "lobby", "text": "hi bob"})
        ),
        json!({"seq": 1, "delivered": 2})
    );
    assert_eq!(
        call("bob", json!("inbox")),
        json!([{"room": "lobby", "seq": 1, "from": "alice", "text": "hi bob"}])
    );
    assert_eq!(call("alice", json!("inbox")).as_array().unwrap().len(), 1);

    // A host-only member (no process) can talk; process members get it.
    call(
        "registry",
        json!({"op": "join", "room": "lobby", "user": "host"}),
    );
    assert_eq!(
        call(
            "registry",
            json!({"op": "say", "room": "lobby", "user": "host", "text": "hello"})
        ),
        json!({"seq": 2, "delivered": 2})
    );
    assert_eq!(
        call(
            "registry",
            json!({"op": "say", "room": "lobby", "user": "nobody", "text": "x"})
        ),
        json!({"error": "not_a_member"})
    );
    let history = call("registry", json!({"op": "history", "room": "lobby"}));
    let texts: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hi bob", "hello"]);
    assert_eq!(call("bob", json!("inbox")).as_array().unwrap().len(), 2);

    // leave: bob no longer receives
    assert_eq!(
        call("bob", json!({"op": "leave", "room": "lobby"})),
        json!(true)
    );
    assert_eq!(
        call(
            "alice",
            json!({"op": "say", "room": "lobby", "text": "bye"})
        ),
        json!({"seq": 3, "delivered": 1})
    );
    assert_eq!(call("bob", json!("inbox")).as_array().unwrap().len(), 2);
    assert_eq!(call("registry", json!("rooms")), json!(["lobby"]));
    // (an empty Luau table comes out as `{}` or `[]`)
    assert!(is_empty(&call(
        "registry",
        json!({"op": "history", "room": "nowhere"})
    )));

    // The bundled test passes (it uses its own members and room).
    assert_eq!(
        block_on(sb.eval(&example_file("chat", "test/smoke.luau"))).unwrap(),
        json!({"delivered": 2, "ben_got": "hello ben", "members": ["ann"]})
    );
    assert_eq!(call("registry", json!("rooms")), json!(["lobby", "test"]));
}

#[test]
fn chat_example_restarts_a_crashed_room_and_the_registry_follows() {
    let node = Node::with_threads(2);
    let sb = graft::block_on(node.create_sandbox(example("chat"))).unwrap();
    block_on(sb.wait_app_started()).unwrap();
    let call = |target: &str, req: serde_json::Value| block_on(sb.call(target, req, None)).unwrap();

    for user in ["alice", "bob"] {
        call("registry", json!({"op": "connect", "user": user}));
        call(user, json!({"op": "join", "room": "lobby"}));
    }
    call(
        "alice",
        json!({"op": "say", "room": "lobby", "text": "before"}),
    );
    let old = call("registry", json!({"op": "lookup", "room": "lobby"}));
    let old = old.as_str().unwrap().to_owned();
    assert!(old.starts_with("<chat.room."), "{old}");

    block_on(sb.cast(&old, json!("crash"))).unwrap();

    // The rooms supervisor restarts the room; the registry drops the old pid
    // (DOWN) and learns the new one (the room's `room_up`).
    let new = eventually(|| {
        let pid = call("registry", json!({"op": "lookup", "room": "lobby"}));
        pid.as_str().filter(|p| *p != old).map(str::to_owned)
    });
    assert!(new.starts_with("<chat.room."), "{new}");
    let procs = block_on(sb.processes()).unwrap();
    let rooms = serde_json::to_value(&procs).unwrap();
    let live_rooms = rooms
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["pid"]
                .as_str()
                .is_some_and(|s| s.starts_with("<chat.room."))
        })
        .count();
    assert_eq!(live_rooms, 1, "exactly one lobby room: {rooms}");
    assert_eq!(
        block_on(sb.eval(r#"return #graft.which_children("rooms")"#)).unwrap(),
        json!(1)
    );

    // The restarted room is empty but usable, through the same name.
    assert!(is_empty(&call(
        "registry",
        json!({"op": "members", "room": "lobby"})
    )));
    assert!(is_empty(&call(
        "registry",
        json!({"op": "history", "room": "lobby"})
    )));
    call("alice", json!({"op": "join", "room": "lobby"}));
    call("bob", json!({"op": "join", "room": "lobby"}));
    assert_eq!(
        call(
            "bob",
            json!({"op": "say", "room": "lobby", "text": "after"})
        ),
        json!({"seq": 1, "delivered": 2})
    );
    let inbox = call("alice", json!("inbox"));
    let texts: Vec<&str> = inbox
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["before", "after"]);
    assert_eq!(call("registry", json!("rooms")), json!(["lobby"]));
}

#[test]
fn ratelimit_example_limits_and_upgrades_live_to_v2_and_back() {
    let node = Node::with_threads(1);
    let sb = graft::block_on(node.create_sandbox(example("ratelimit"))).unwrap();
    block_on(sb.wait_app_started()).unwrap();
    let call = |req: serde_json::Value| block_on(sb.call("limiter", req, None)).unwrap();

    // v1: a fresh key holds 10 tokens.
    assert_eq!(call(json!("version")), json!(1));
    assert_eq!(
        call(json!({"op": "take", "key": "alice", "n": 10})),
        json!({"allowed": true, "remaining": 0})
    );
    assert_eq!(
        call(json!({"op": "take", "key": "alice", "n": 10}))["allowed"],
        json!(false)
    );
    assert_eq!(
        call(json!({"op": "take", "key": "bob", "n": 8})),
        json!({"allowed": true, "remaining": 2})
    );
    assert_eq!(call(json!({"op": "peek", "key": "nobody"})), json!(10));
    let state = block_on(sb.state("limiter")).unwrap();
    let buckets = state["buckets"].as_object().unwrap();
    assert!(buckets.contains_key("alice"), "{state}");
    assert!(buckets.values().all(|v| v.is_number()), "v1 shape: {state}");
    assert_eq!(
        block_on(sb.eval(&example_file("ratelimit", "test/smoke.luau"))).unwrap(),
        json!({"version": 1, "taken": 10, "denied": true})
    );

    // Upgrade to v2 (the .next file): buckets become { tokens, last }.
    let v2 = example_file("ratelimit", "src/ratelimit_v2.luau.next");
    let mut sources = std::collections::BTreeMap::new();
    sources.insert("ratelimit".to_owned(), v2);
    let report = block_on(sb.reload(sources, graft::ReloadOptions::default())).unwrap();
    assert_eq!(report.status, graft::ReloadStatus::Reloaded);
    assert_eq!(
        report.modules,
        vec![graft::ModuleChange {
            name: "ratelimit".into(),
            from: 1,
            to: 2
        }]
    );
    assert_eq!(report.processes_migrated, 1);
    assert_eq!(call(json!("version")), json!(2));
    let state = block_on(sb.state("limiter")).unwrap();
    let alice = &state["buckets"]["alice"];
    assert!(
        alice["tokens"].as_f64().unwrap() <= 5.0 && alice["last"].as_f64().unwrap() > 0.0,
        "v2 shape: {state}"
    );
    for (key, b) in state["buckets"].as_object().unwrap() {
        assert!(
            b.is_object() && b["tokens"].is_number() && b["last"].is_number(),
            "{key}: {b}"
        );
    }
    // Same behaviour on v2.
    assert_eq!(
        call(json!({"op": "take", "key": "alice", "n": 10}))["allowed"],
        json!(false)
    );
    assert_eq!(
        call(json!({"op": "take", "key": "carol", "n": 4})),
        json!({"allowed": true, "remaining": 6})
    );
    assert_eq!(
        block_on(sb.eval(&example_file("ratelimit", "test/smoke.luau"))).unwrap(),
        json!({"version": 2, "taken": 10, "denied": true})
    );

    // Roll back to v1: v1's code_change gets { down = 2 } and makes numbers again.
    let report = block_on(sb.rollback("ratelimit", 1, graft::ReloadOptions::default())).unwrap();
    assert_eq!(report.status, graft::ReloadStatus::Reloaded);
    assert_eq!(report.processes_migrated, 1);
    assert_eq!(call(json!("version")), json!(1));
    let state = block_on(sb.state("limiter")).unwrap();
    let buckets = state["buckets"].as_object().unwrap();
    assert!(buckets.values().all(|v| v.is_number()), "v1 shape: {state}");
    assert_eq!(state["buckets"]["carol"], json!(6), "{state}");
    assert_eq!(
        call(json!({"op": "take", "key": "carol", "n": 6})),
        json!({"allowed": true, "remaining": 0})
    );
    assert_eq!(
        block_on(sb.eval(&example_file("ratelimit", "test/smoke.luau"))).unwrap(),
        json!({"version": 1, "taken": 10, "denied": true})
    );
    let versions = block_on(sb.versions("ratelimit")).unwrap();
    assert_eq!(versions.len(), 2);
}
