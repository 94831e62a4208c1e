//! The durable node in-process (SPEC §8): what a node opened on a data
//! directory brings back after a graceful stop or after being dropped
//! without one (as a crash would leave it). Kill -9 against the real binary
//! is in `graft-cli/tests/durable.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use graft::{block_on, EventFilter, Node, ReloadOptions, SandboxSpec};
use serde_json::json;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "graft-durable-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(dir: &TempDir) -> Node {
    Node::builder()
        .threads(2)
        .checkpoint_ms(0)
        .data_dir(&dir.0)
        .open()
        .expect("open the node")
}

/// A counter server registered as `c` under an app supervisor; version `v`
/// adds `v` per `inc` and migrates `{ n }` states by keeping `n` and
/// recording the old version it came from.
fn counter(v: u32) -> String {
    format!(
        r#"
local c = {{}}
function c.init(args) return {{ n = 0, from = nil }} end
function c.handle_call(req, from, state)
  if req == "inc" then state.n += {v}; return state.n, state end
  if req == "version" then return {v}, state end
  return state, state
end
function c.code_change(old, state, extra)
  state.from = old
  return state
end
return c
"#
    )
}

const APP: &str = r#"
return {
  behaviour = "supervisor",
  init = function()
    return { strategy = "one_for_one", children = { { id = "c", module = "counter", name = "c" } } }
  end,
}
"#;

fn spec(id: &str) -> SandboxSpec {
    SandboxSpec::new(id)
        .entry(Some("app"))
        .module("app", APP)
        .module("counter", counter(1))
}

fn reload(sb: &graft::Sandbox, src: String, opts: ReloadOptions) -> graft::ReloadReport {
    let mut m = BTreeMap::new();
    m.insert("counter".to_string(), src);
    block_on(sb.reload(m, opts)).expect("reload")
}

fn versions(sb: &graft::Sandbox) -> Vec<(u32, String)> {
    block_on(sb.versions("counter"))
        .expect("versions")
        .into_iter()
        .map(|v| (v.version, v.checksum))
        .collect()
}

fn current(sb: &graft::Sandbox) -> u32 {
    block_on(sb.modules())
        .expect("modules")
        .into_iter()
        .find(|m| m.name == "counter")
        .expect("counter")
        .version
}

fn call(sb: &graft::Sandbox, req: &str) -> serde_json::Value {
    block_on(sb.call("c", json!(req), None)).expect("call")
}

#[test]
fn a_graceful_restart_brings_back_versions_events_and_named_state() {
    let dir = TempDir::new("graceful");
    let (before_versions, before_events) = {
        let node = open(&dir);
        let sb = node.create_sandbox(spec("shop")).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        reload(&sb, counter(2), ReloadOptions::default());
        reload(&sb, counter(3), ReloadOptions::default());
        for _ in 0..4 {
            call(&sb, "inc");
        }
        assert_eq!(call(&sb, "get")["n"], 12);
        let v = versions(&sb);
        let e = block_on(sb.events()).expect("events");
        node.shutdown();
        (v, e)
    };
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(versions(&sb), before_versions);
    assert_eq!(current(&sb), 3);
    assert_eq!(call(&sb, "version"), 3);
    let state = call(&sb, "get");
    assert_eq!(state["n"], 12, "the named state came back: {state}");
    assert_eq!(
        state["from"], 2,
        "migrated once, live, from 2 to 3; not again by the restore: {state}"
    );
    let after = block_on(sb.events()).expect("events");
    assert_eq!(
        &after[..before_events.len()],
        &before_events[..],
        "events are identical, numbers included"
    );
    node.shutdown();
}

#[test]
fn a_crash_restores_the_last_checkpoint_migrated_to_the_current_version() {
    let dir = TempDir::new("migrate");
    {
        let node = open(&dir);
        let sb = node.create_sandbox(spec("shop")).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        call(&sb, "inc");
        call(&sb, "inc");
        let stats = node.checkpoint().expect("checkpoint");
        assert_eq!(stats.written, 1, "only the registered server");
        // Idle: nothing to write.
        assert_eq!(node.checkpoint().expect("again").written, 0);
        reload(&sb, counter(5), ReloadOptions::default());
        call(&sb, "inc"); // lost: after the last checkpoint
                          // Dropped without `shutdown`: no final checkpoint (a crash).
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(call(&sb, "version"), 5, "the committed reload survived");
    let state = call(&sb, "get");
    assert_eq!(state["n"], 2, "the checkpointed state: {state}");
    assert_eq!(
        state["from"], 1,
        "migrated by code_change from the checkpoint's version"
    );
    node.shutdown();
}

#[test]
fn a_canary_open_at_a_crash_comes_back_rolled_back_with_an_event() {
    let dir = TempDir::new("canary");
    {
        let node = open(&dir);
        let sb = node.create_sandbox(spec("shop")).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        let opts = ReloadOptions {
            canary_ms: 60_000,
            ..Default::default()
        };
        reload(&sb, counter(2), opts);
        assert_eq!(call(&sb, "version"), 2);
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(
        call(&sb, "version"),
        1,
        "back on the last permanent version"
    );
    assert_eq!(current(&sb), 1);
    let kept: Vec<u32> = versions(&sb).into_iter().map(|v| v.0).collect();
    assert_eq!(kept, vec![1, 2], "the canary version stays kept");
    let events = block_on(sb.events()).expect("events");
    let rollback = events
        .iter()
        .find(|e| e.kind == "canary_rollback")
        .expect("a canary_rollback event");
    assert_eq!(
        rollback.detail["modules"][0]["to"], 1,
        "{:?}",
        rollback.detail
    );
    node.shutdown();
    // The rollback itself is durable: a second restart does not repeat it.
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored again");
    let again = block_on(sb.events()).expect("events");
    assert_eq!(
        again.iter().filter(|e| e.kind == "canary_rollback").count(),
        1
    );
    node.shutdown();
}

#[test]
fn a_passed_canary_is_permanent_after_a_restart() {
    let dir = TempDir::new("passed");
    {
        let node = open(&dir);
        let sb = node.create_sandbox(spec("shop")).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        let opts = ReloadOptions {
            canary_ms: 50,
            ..Default::default()
        };
        reload(&sb, counter(2), opts);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !block_on(sb.events())
            .expect("events")
            .iter()
            .any(|e| e.kind == "canary_passed")
        {
            assert!(Instant::now() < deadline, "the canary never passed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(call(&sb, "version"), 2);
    node.shutdown();
}

#[test]
fn a_manual_rollback_ends_the_canary_window() {
    let node = Node::builder().ephemeral().open().expect("node");
    let sb = node.create_sandbox(spec("shop")).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    let opts = ReloadOptions {
        canary_ms: 100,
        ..Default::default()
    };
    reload(&sb, counter(2), opts);
    block_on(sb.rollback("counter", 1, ReloadOptions::default())).expect("rollback");
    std::thread::sleep(Duration::from_millis(400));
    let kinds: Vec<String> = block_on(sb.events())
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"canary_ended".to_string()), "{kinds:?}");
    assert!(!kinds.contains(&"canary_passed".to_string()), "{kinds:?}");
    node.shutdown();
}

#[test]
fn the_same_source_again_rolls_forward_to_its_kept_number() {
    let node = Node::builder().ephemeral().open().expect("node");
    let sb = node.create_sandbox(spec("shop")).expect("create");
    reload(&sb, counter(2), ReloadOptions::default());
    let back = reload(&sb, counter(1), ReloadOptions::default());
    assert_eq!(back.modules[0].to, 1, "not a new identical version 3");
    let fwd = reload(&sb, counter(2), ReloadOptions::default());
    assert_eq!((fwd.modules[0].from, fwd.modules[0].to), (1, 2));
    assert_eq!(versions(&sb).len(), 2);
    let next = reload(&sb, counter(9), ReloadOptions::default());
    assert_eq!(next.modules[0].to, 3);
    node.shutdown();
}

#[test]
fn deleted_sandboxes_stay_deleted_and_ids_can_be_reused() {
    let dir = TempDir::new("delete");
    {
        let node = open(&dir);
        node.create_sandbox(spec("a")).expect("a");
        node.create_sandbox(spec("b")).expect("b");
        node.destroy("a").expect("destroy");
        node.shutdown();
    }
    let node = open(&dir);
    assert_eq!(node.sandbox_ids(), vec!["b".to_string()]);
    node.create_sandbox(spec("a"))
        .expect("the id is free again");
    node.shutdown();
}

#[test]
fn node_wide_events_resume_after_a_restart_without_duplicates() {
    let dir = TempDir::new("events");
    let last = {
        let node = open(&dir);
        let sb = node.create_sandbox(spec("a")).expect("a");
        reload(&sb, counter(2), ReloadOptions::default());
        let page = node.events_after(0, &EventFilter::default(), 1000);
        node.shutdown();
        page.events.last().expect("events").seq
    };
    let node = open(&dir);
    let sb = node.sandbox("a").expect("a");
    reload(&sb, counter(3), ReloadOptions::default());
    let newer = node.events_after(last, &EventFilter::default(), 1000);
    assert!(newer.gap.is_none());
    assert!(newer.events.iter().all(|e| e.seq > last));
    assert!(newer.events.iter().any(|e| e.kind == "reload"));
    let all = node.events_after(0, &EventFilter::default(), 1000);
    let seqs: Vec<u64> = all.events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    node.shutdown();
}

#[test]
fn a_full_database_fails_the_reload_and_changes_nothing() {
    let dir = TempDir::new("full");
    let node = Node::builder()
        .threads(2)
        .checkpoint_ms(0)
        .max_database_bytes(256 * 1024)
        .data_dir(&dir.0)
        .open()
        .expect("node");
    let sb = node.create_sandbox(spec("shop")).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    // A module big enough not to fit.
    let huge = format!("{}\n-- {}", counter(2), "x".repeat(400 * 1024));
    let mut m = BTreeMap::new();
    m.insert("counter".to_string(), huge);
    let err = block_on(sb.reload(m, ReloadOptions::default())).expect_err("full");
    assert_eq!(err.kind(), "storage_full", "{err}");
    assert_eq!(call(&sb, "version"), 1, "nothing applied");
    assert_eq!(current(&sb), 1);
    // The node and the sandbox carry on.
    reload(&sb, counter(2), ReloadOptions::default());
    assert_eq!(call(&sb, "version"), 2);
    node.shutdown();
}

#[test]
fn a_database_from_a_newer_graft_is_refused_untouched() {
    let dir = TempDir::new("newer");
    {
        let node = open(&dir);
        node.create_sandbox(spec("a")).expect("a");
        node.shutdown();
    }
    let db = dir.0.join(graft::DATABASE_FILE);
    {
        let conn = rusqlite::Connection::open(&db).expect("sqlite");
        conn.pragma_update(None, "user_version", 999).expect("bump");
    }
    let before = std::fs::read(&db).expect("read");
    let err = Node::builder()
        .data_dir(&dir.0)
        .open()
        .err()
        .expect("refused");
    assert!(err.to_string().contains("newer"), "{err}");
    assert_eq!(std::fs::read(&db).expect("read"), before, "left untouched");
}

#[test]
fn a_corrupt_database_is_refused_with_a_clear_message() {
    let dir = TempDir::new("corrupt");
    std::fs::create_dir_all(&dir.0).expect("dir");
    std::fs::write(
        dir.0.join(graft::DATABASE_FILE),
        b"this is not a database at all, sorry",
    )
    .expect("write");
    let err = Node::builder()
        .data_dir(&dir.0)
        .open()
        .err()
        .expect("refused");
    assert!(err.kind().starts_with("storage_"), "{err}");
}

#[test]
fn a_read_only_store_reads_a_running_nodes_database_and_never_writes() {
    let dir = TempDir::new("readonly");
    let node = open(&dir);
    let sb = node.create_sandbox(spec("shop")).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    reload(&sb, counter(2), ReloadOptions::default());
    call(&sb, "inc");
    node.checkpoint().expect("checkpoint");
    let db = dir.0.join("graft.db");
    let lock = dir.0.join("graft.lock");
    assert!(lock.exists(), "the node holds its lock");
    let bytes = |p: &std::path::Path| std::fs::read(p).unwrap_or_default();
    let (db_before, wal_before) = (bytes(&db), bytes(&dir.0.join("graft.db-wal")));

    // The node is still running and holds the lock: the read-only store
    // neither needs nor takes it.
    let ro = graft::store::Store::open_read_only(&db).expect("open read-only");
    let kept = ro.versions("shop", "counter").expect("versions");
    assert_eq!(
        kept.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(kept[1].source, counter(2));
    let cps = ro.checkpoints("shop").expect("checkpoints");
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert_eq!((cps[0].name.as_str(), cps[0].module_version), ("c", 2));
    let state: serde_json::Value = serde_json::from_str(&cps[0].state_json).expect("json");
    assert_eq!(state["n"], 2);
    let write = ro.write(vec![graft::store::WriteOp::DeleteSandbox {
        id: "shop".into(),
    }]);
    assert!(
        matches!(write, Err(graft::store::StoreError::ReadOnly { .. })),
        "{write:?}"
    );
    drop(ro);
    assert_eq!(bytes(&db), db_before, "graft.db unchanged by the reader");
    assert_eq!(
        bytes(&dir.0.join("graft.db-wal")),
        wal_before,
        "the log unchanged by the reader"
    );
    // The node still works and writes after the reader is gone.
    reload(&sb, counter(3), ReloadOptions::default());
    node.shutdown();

    // And with no node at all, a missing database is a clear error, not a
    // new empty file.
    let missing = dir.0.join("nope.db");
    let err = graft::store::Store::open_read_only(&missing).expect_err("missing");
    assert!(err.to_string().contains("no Graft database"), "{err}");
    assert!(!missing.exists(), "nothing was created");
}
