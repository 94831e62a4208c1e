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
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
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
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
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
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
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
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
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
    let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
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
    let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
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
        graft::block_on(node.create_sandbox(spec("a"))).expect("a");
        graft::block_on(node.create_sandbox(spec("b"))).expect("b");
        node.destroy("a").expect("destroy");
        node.shutdown();
    }
    let node = open(&dir);
    assert_eq!(node.sandbox_ids(), vec!["b".to_string()]);
    graft::block_on(node.create_sandbox(spec("a"))).expect("the id is free again");
    node.shutdown();
}

#[test]
fn node_wide_events_resume_after_a_restart_without_duplicates() {
    let dir = TempDir::new("events");
    let last = {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec("a"))).expect("a");
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
    let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
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
        graft::block_on(node.create_sandbox(spec("a"))).expect("a");
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

/// A version stored as `canary` whose window ended without a verdict (here: a
/// manual rollback) and that is later made current again by a plain reload
/// (a roll-forward to its kept number, no canary) was acknowledged like any
/// reload: a restart must not roll it back as if a canary were still open.
#[test]
fn a_roll_forward_onto_a_former_canary_version_survives_a_restart() {
    let dir = TempDir::new("refwd");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        let canary = ReloadOptions {
            canary_ms: 60_000,
            ..Default::default()
        };
        reload(&sb, counter(2), canary);
        block_on(sb.rollback("counter", 1, ReloadOptions::default())).expect("rollback");
        let fwd = reload(&sb, counter(2), ReloadOptions::default());
        assert_eq!((fwd.modules[0].from, fwd.modules[0].to), (1, 2));
        assert_eq!(call(&sb, "version"), 2);
        node.shutdown();
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(
        call(&sb, "version"),
        2,
        "the acknowledged roll-forward to version 2 was lost on restart"
    );
    let kinds: Vec<String> = block_on(sb.events())
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(!kinds.contains(&"canary_rollback".to_string()), "{kinds:?}");
    node.shutdown();
}

/// The same after a crash during a canary window, as `graft run` meets it:
/// the restart rolls the canary back, then `src/` (still the canary's source)
/// is made live again by a plain reload, which is a roll-forward.
#[test]
fn a_roll_forward_after_a_canary_rollback_on_restart_survives_the_next_restart() {
    let dir = TempDir::new("refwd-crash");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        let canary = ReloadOptions {
            canary_ms: 60_000,
            ..Default::default()
        };
        reload(&sb, counter(2), canary);
        // Dropped without `shutdown`, the canary window open.
    }
    {
        let node = open(&dir);
        let sb = node.sandbox("shop").expect("restored");
        assert_eq!(call(&sb, "version"), 1);
        let fwd = reload(&sb, counter(2), ReloadOptions::default());
        assert_eq!(fwd.modules[0].to, 2);
        node.shutdown();
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored again");
    assert_eq!(call(&sb, "version"), 2, "the acknowledged reload was lost");
    node.shutdown();
}

/// A checkpoint taken on a newer version than the one restored (a canary
/// rolled back at restart) is a downgrade: `code_change` gets
/// `{ down = <checkpoint's version> }`, as a rollback gives it, not the bare
/// number an upgrade gets.
#[test]
fn a_checkpoint_from_a_rolled_back_canary_is_migrated_down() {
    let dir = TempDir::new("down");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        let canary = ReloadOptions {
            canary_ms: 60_000,
            ..Default::default()
        };
        reload(&sb, counter(2), canary);
        call(&sb, "inc");
        assert_eq!(node.checkpoint().expect("checkpoint").written, 1);
        // Dropped without `shutdown`, the canary window open.
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(call(&sb, "version"), 1);
    let state = call(&sb, "get");
    assert_eq!(state["n"], 2, "{state}");
    assert_eq!(state["from"], json!({ "down": 2 }), "{state}");
    node.shutdown();
}

/// Events of deleted sandboxes stay in memory only for the last 16
/// deletions; a restart must not bring every sandbox ever deleted back into
/// memory (create/delete churn would grow a node's memory without bound).
#[test]
fn a_restart_keeps_deleted_sandboxes_events_bounded_in_memory() {
    // `events::MAX_DELETED_KEPT`, documented in docs/persistence.md.
    const DELETED_KEPT: usize = 16;
    let dir = TempDir::new("churn");
    let deleted_in_memory = |node: &Node| {
        let page = node.events_after(0, &EventFilter::default(), usize::MAX);
        let mut ids: Vec<String> = page
            .events
            .into_iter()
            .map(|e| e.sandbox)
            .filter(|s| s.starts_with("tmp-"))
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    {
        let node = open(&dir);
        graft::block_on(node.create_sandbox(spec("kept"))).expect("kept");
        for i in 0..40 {
            let id = format!("tmp-{i}");
            graft::block_on(
                node.create_sandbox(SandboxSpec::new(&id).entry(None).module("m", "return {}")),
            )
            .expect("create");
            node.destroy(&id).expect("destroy");
        }
        assert!(deleted_in_memory(&node) <= DELETED_KEPT);
        node.shutdown();
    }
    let node = open(&dir);
    assert_eq!(node.sandbox_ids(), vec!["kept".to_string()]);
    let n = deleted_in_memory(&node);
    assert!(
        n <= DELETED_KEPT,
        "{n} deleted sandboxes' events came back into memory"
    );
    assert!(n > 0, "the most recent deletions stay readable");
    // The live sandbox's events are all there.
    let page = node.events_after(0, &EventFilter::default().sandbox("kept"), usize::MAX);
    assert!(page.events.iter().any(|e| e.kind == "sandbox_created"));
    node.shutdown();
}

/// A sandbox whose stored rows cannot be restored (here: a version's source
/// altered by hand, so its checksum does not match) is left in the database
/// with a `restore_failed` event and listed by `Node::unrestored`. Creating
/// a sandbox with its id is refused (it would overwrite the kept versions
/// and states), whoever asks; only an explicit `destroy` deletes its rows,
/// after which the id is free (docs/persistence.md).
#[test]
fn a_sandbox_that_failed_to_restore_is_never_created_over() {
    let dir = TempDir::new("unrestorable");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
        reload(&sb, counter(2), ReloadOptions::default());
        node.shutdown();
    }
    let tamper = |db: &rusqlite::Connection| {
        db.execute(
            "UPDATE module_versions SET source = source || '-- edited' WHERE sandbox = 'shop' AND module = 'counter' AND version = 1",
            [],
        )
        .expect("tamper")
    };
    let rows = |dir: &TempDir| -> Vec<(String, u32, String)> {
        let db = rusqlite::Connection::open(dir.0.join(graft::DATABASE_FILE)).expect("sqlite");
        let mut st = db
            .prepare("SELECT module, version, source FROM module_versions WHERE sandbox = 'shop' ORDER BY module, version")
            .expect("query");
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    {
        let db = rusqlite::Connection::open(dir.0.join(graft::DATABASE_FILE)).expect("sqlite");
        assert_eq!(tamper(&db), 1);
    }
    let stored = rows(&dir);
    assert_eq!(stored.len(), 3, "app v1, counter v1 and v2: {stored:?}");
    {
        let node = open(&dir);
        assert!(
            node.sandbox("shop").is_err(),
            "an altered version is refused"
        );
        let unrestored = node.unrestored();
        assert_eq!(unrestored.len(), 1);
        assert_eq!(unrestored[0].0, "shop");
        assert!(unrestored[0].1.contains("checksum"), "{unrestored:?}");
        // Written by the event pump: readable once it is on disk.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node
            .events_after(0, &EventFilter::default().sandbox("shop"), usize::MAX)
            .events
            .iter()
            .any(|e| e.kind == "restore_failed")
        {
            assert!(Instant::now() < deadline, "a restore_failed event");
            std::thread::sleep(Duration::from_millis(20));
        }
        let Err(refused) = graft::block_on(node.create_sandbox(spec("shop"))) else {
            panic!("creating the id again would bury the stored rows");
        };
        let msg = refused.to_string();
        assert!(
            msg.contains("`shop`")
                && msg.contains("could not be restored")
                && msg.contains("delete"),
            "{msg}"
        );
        node.shutdown();
    }
    assert_eq!(rows(&dir), stored, "the refused creation changed no row");
    {
        let node = open(&dir);
        node.destroy("shop")
            .expect("an explicit delete removes the rows");
        assert!(node.unrestored().is_empty());
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("the id is free");
        block_on(sb.wait_app_started()).expect("app");
        assert_eq!(call(&sb, "version"), 1);
        node.shutdown();
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("the new sandbox is restored");
    assert_eq!(versions(&sb).len(), 1, "none of the old rows came back");
    assert_eq!(call(&sb, "version"), 1);
    node.shutdown();
}

/// `graft backup DEST` (`Store::backup_file`): a file of the user's that
/// happens to be named `DEST.partial` is not the backup's to delete, and a
/// destination in a missing directory is named as the problem (not the
/// database being backed up).
#[test]
fn a_backup_leaves_other_files_alone_and_names_a_missing_destination() {
    let dir = TempDir::new("backup");
    {
        let node = open(&dir);
        graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
        node.shutdown();
    }
    let db = dir.0.join(graft::DATABASE_FILE);
    let dest = dir.0.join("copy.db");
    let bystander = dir.0.join("copy.db.partial");
    std::fs::write(&bystander, "the user's own file").expect("write");
    graft::store::Store::backup_file(&db, &dest).expect("backup");
    assert_eq!(
        std::fs::read_to_string(&bystander).expect("the user's file is still there"),
        "the user's own file"
    );
    assert!(graft::store::Store::open(&dest).is_ok(), "the copy opens");

    let nowhere = dir.0.join("no-such-dir").join("copy.db");
    let err = graft::store::Store::backup_file(&db, &nowhere)
        .expect_err("a missing directory fails")
        .to_string();
    assert!(err.contains("no-such-dir"), "names the destination: {err}");
    assert!(
        !dir.0.join("no-such-dir").exists(),
        "nothing is created on failure"
    );
}

/// A registered supervisor's state holds its children's pids. Restored from
/// a checkpoint those pids come back as text (they address nothing), so the
/// supervisor could no longer tell which child exited and would stop
/// restarting them. Its state is rebuilt by its `init`, as OTP's is: it is
/// not checkpointed, and a crashing child is still restarted after a
/// restart.
#[test]
fn a_named_supervisor_still_restarts_its_children_after_a_restart() {
    const ROOT: &str = r#"
return {
  behaviour = "supervisor",
  init = function()
    return { strategy = "one_for_one", children = { { id = "workers", module = "workers", name = "workers" } } }
  end,
}
"#;
    const WORKERS: &str = r#"
return {
  behaviour = "supervisor",
  init = function()
    return { strategy = "one_for_one", intensity = 10, period = 1, children = { { id = "c", module = "worker", name = "c" } } }
  end,
}
"#;
    const WORKER: &str = r#"
local w = {}
function w.init() return { n = 0 } end
function w.handle_call(req, from, state)
  if req == "boom" then error("boom") end
  if req == "inc" then state.n += 1 end
  return state.n, state
end
return w
"#;
    let spec = || {
        SandboxSpec::new("sup")
            .entry(Some("root"))
            .module("root", ROOT)
            .module("workers", WORKERS)
            .module("worker", WORKER)
    };
    let dir = TempDir::new("namedsup");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec())).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        assert_eq!(call(&sb, "inc"), 1);
        node.checkpoint().expect("checkpoint");
        node.shutdown();
    }
    let node = open(&dir);
    let sb = node.sandbox("sup").expect("restored");
    block_on(sb.wait_app_started()).expect("app");
    assert_eq!(call(&sb, "get"), 1, "the worker's state came back");
    let _ = block_on(sb.call("c", json!("boom"), None));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match block_on(sb.call("c", json!("get"), None)) {
            Ok(v) => {
                assert_eq!(v, 0, "a fresh worker from init");
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "the supervisor never restarted its crashed child: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    node.shutdown();
}

#[test]
fn a_read_only_store_reads_a_running_nodes_database_and_never_writes() {
    let dir = TempDir::new("readonly");
    let node = open(&dir);
    let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
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

#[test]
fn a_data_directory_deleted_while_the_node_runs_fails_writes_instead_of_losing_them() {
    let dir = TempDir::new("deleted");
    let node = open(&dir);
    let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    reload(&sb, counter(2), ReloadOptions::default());
    // `git clean -fdx` on a project, or an `rm -r` of the data directory.
    std::fs::remove_dir_all(&dir.0).expect("delete the data directory");
    let mut m = BTreeMap::new();
    m.insert("counter".to_string(), counter(3));
    let err = block_on(sb.reload(m, ReloadOptions::default())).expect_err("refused");
    assert_eq!(err.kind(), "storage_io", "{err}");
    assert!(
        err.to_string().contains("deleted while the node ran"),
        "{err}"
    );
    assert_eq!(call(&sb, "version"), 2, "nothing was applied");
    // The node keeps serving what it runs.
    assert_eq!(call(&sb, "inc"), 2);
}

/// A second module beside `counter`, for windows that cover several.
fn other(v: u32) -> String {
    format!("return {{ v = {v} }}\n")
}

fn spec2(id: &str) -> SandboxSpec {
    spec(id).module("other", other(1))
}

fn version_of(sb: &graft::Sandbox, module: &str) -> u32 {
    block_on(sb.modules())
        .expect("modules")
        .into_iter()
        .find(|m| m.name == module)
        .expect("module")
        .version
}

fn reload_both(sb: &graft::Sandbox, v: u32, opts: ReloadOptions) {
    let mut m = BTreeMap::new();
    m.insert("counter".to_string(), counter(v));
    m.insert("other".to_string(), other(v));
    block_on(sb.reload(m, opts)).expect("reload both");
}

fn canary() -> ReloadOptions {
    ReloadOptions {
        canary_ms: 600_000,
        ..Default::default()
    }
}

fn kinds(sb: &graft::Sandbox) -> Vec<String> {
    block_on(sb.events())
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

/// A window over two modules ended by a reload of one of them: the other
/// stays on its upgrade in memory, so a restart must bring it back there too
/// (the window is over: no `canary_rollback`).
#[test]
fn a_window_over_two_modules_ended_by_reloading_one_keeps_the_other_after_a_crash() {
    let dir = TempDir::new("window-reload");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec2("shop"))).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        reload_both(&sb, 2, canary());
        reload(&sb, counter(3), ReloadOptions::default());
        assert!(kinds(&sb).contains(&"canary_ended".to_string()));
        assert_eq!(
            (version_of(&sb, "counter"), version_of(&sb, "other")),
            (3, 2)
        );
        // Dropped without shutdown, as a crash leaves it.
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(
        (version_of(&sb, "counter"), version_of(&sb, "other")),
        (3, 2),
        "memory and disk agree: the ended window's versions stand"
    );
    assert!(!kinds(&sb).contains(&"canary_rollback".to_string()));
    node.shutdown();
}

/// Ended by a manual rollback of one module: that one is back, the other
/// keeps its upgrade, also after a restart.
#[test]
fn a_window_over_two_modules_ended_by_a_rollback_keeps_the_other_after_a_restart() {
    let dir = TempDir::new("window-rollback");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec2("shop"))).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        reload_both(&sb, 2, canary());
        block_on(sb.rollback("counter", 1, ReloadOptions::default())).expect("rollback");
        let ended = block_on(sb.events())
            .expect("events")
            .into_iter()
            .find(|e| e.kind == "canary_ended")
            .expect("canary_ended");
        assert_eq!(
            ended.detail["permanent"],
            json!([{ "module": "other", "version": 2 }]),
            "{}",
            ended.detail
        );
        node.shutdown();
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(
        (version_of(&sb, "counter"), version_of(&sb, "other")),
        (1, 2)
    );
    assert!(!kinds(&sb).contains(&"canary_rollback".to_string()));
    node.shutdown();
}

/// A new canary window replaces an open one (one per sandbox): the old
/// window's version stands, the new one is still on probation at the crash.
#[test]
fn a_new_window_ends_the_open_one_and_only_the_new_one_rolls_back_at_a_crash() {
    let dir = TempDir::new("window-replaced");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec2("shop"))).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        reload(&sb, counter(2), canary());
        let mut m = BTreeMap::new();
        m.insert("other".to_string(), other(2));
        block_on(sb.reload(m, canary())).expect("reload other");
        assert!(kinds(&sb).contains(&"canary_ended".to_string()));
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(
        (version_of(&sb, "counter"), version_of(&sb, "other")),
        (2, 1),
        "the ended window's version stands; the open one was rolled back"
    );
    node.shutdown();
}

/// The kept versions on disk equal the engine's after every commit, with a
/// history of one version (eviction during a canary window included).
#[test]
fn kept_versions_on_disk_equal_the_engines_with_a_small_history() {
    let dir = TempDir::new("kept-set");
    let db = dir.0.join(graft::DATABASE_FILE);
    let node = open(&dir);
    let mut s = spec("shop");
    s.limits.max_versions = 1;
    let sb = graft::block_on(node.create_sandbox(s)).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    let check = |what: &str| {
        let memory: Vec<u32> = versions(&sb).into_iter().map(|v| v.0).collect();
        let store = graft::store::Store::open_read_only(&db).expect("read the database");
        let disk: Vec<u32> = store
            .versions("shop", "counter")
            .expect("versions")
            .into_iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(disk, memory, "{what}");
        memory
    };
    assert_eq!(check("created"), [1]);
    // On probation: the version it would roll back to stays, in both.
    reload(
        &sb,
        counter(2),
        ReloadOptions {
            canary_ms: 100,
            ..Default::default()
        },
    );
    assert_eq!(check("canary open"), [1, 2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !kinds(&sb).contains(&"canary_passed".to_string()) {
        assert!(Instant::now() < deadline, "the canary never passed");
        std::thread::sleep(Duration::from_millis(20));
    }
    reload(&sb, counter(3), ReloadOptions::default());
    assert_eq!(check("after the window"), [3]);
    reload(&sb, counter(4), canary());
    assert_eq!(check("a second window"), [3, 4]);
    reload(&sb, counter(5), canary());
    assert_eq!(check("a window replacing a window"), [4, 5]);
    drop(sb);
    drop(node);
    // The open window is rolled back at restart, to a version both kept.
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(current(&sb), 4);
    let memory: Vec<u32> = versions(&sb).into_iter().map(|v| v.0).collect();
    assert_eq!(memory, [4, 5]);
    node.shutdown();
}

/// Create/delete churn: the database keeps the events of the 16 most
/// recently deleted sandboxes only, and readers resuming from before the
/// pruned ones are told of the gap, before and after a restart.
#[test]
fn deleted_sandboxes_events_are_pruned_on_disk_and_readers_see_the_gap() {
    const DELETED_KEPT: usize = 16;
    let dir = TempDir::new("prune");
    let db = dir.0.join(graft::DATABASE_FILE);
    let deleted_on_disk = || {
        let store = graft::store::Store::open_read_only(&db).expect("read the database");
        let mut ids: Vec<String> = store
            .events_since(0, None, usize::MAX)
            .expect("events")
            .into_iter()
            .filter_map(|e| e.sandbox)
            .filter(|s| s.starts_with("tmp-"))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    let first_seq;
    {
        let node = open(&dir);
        graft::block_on(node.create_sandbox(spec("kept"))).expect("kept");
        for i in 0..40 {
            let id = format!("tmp-{i:02}");
            graft::block_on(
                node.create_sandbox(SandboxSpec::new(&id).entry(None).module("m", "return {}")),
            )
            .expect("create");
            node.destroy(&id).expect("destroy");
        }
        let on_disk = deleted_on_disk();
        assert_eq!(on_disk.len(), DELETED_KEPT, "{on_disk:?}");
        assert_eq!(on_disk.first().map(String::as_str), Some("tmp-24"));
        let all = node.events_after(0, &EventFilter::default(), usize::MAX);
        first_seq = all.events.first().expect("events").seq;
        let gap = all.gap.expect("a reader from 0 is told of the gap");
        assert!(gap.up_to > first_seq, "{gap:?}");
        let early = node.events_after(0, &EventFilter::default().sandbox("tmp-00"), 10);
        assert!(early.events.is_empty() && early.gap.is_some());
        node.shutdown();
    }
    let node = open(&dir);
    assert_eq!(deleted_on_disk().len(), DELETED_KEPT);
    let all = node.events_after(0, &EventFilter::default(), usize::MAX);
    assert!(all.gap.is_some(), "still told of the gap after a restart");
    let early = node.events_after(0, &EventFilter::default().sandbox("tmp-00"), 10);
    assert!(
        early.events.is_empty() && early.gap.is_some(),
        "{:?}",
        early.gap
    );
    // A reader that saw everything up to now is not told of a gap.
    let last = all.events.last().expect("events").seq;
    assert_eq!(
        node.events_after(last, &EventFilter::default(), 10).gap,
        None
    );
    // The live sandbox's events are intact.
    let kept = node.events_after(0, &EventFilter::default().sandbox("kept"), usize::MAX);
    assert!(kept.events.iter().any(|e| e.kind == "sandbox_created"));
    node.shutdown();
}

const POISONABLE: &str = r#"
local c = {}
function c.init(args) return { n = 0 } end
function c.handle_call(req, from, state)
  if req == "inc" then state.n += 1; return state.n, state end
  if req == "poison" then state.f = function() end; return true, state end
  if req == "cure" then state.f = nil; return true, state end
  return state.n, state
end
return c
"#;

/// A state that stops being plain data cannot be checkpointed: its older
/// checkpoint is deleted (with one event), so a restart starts the process
/// from `init` instead of silently bringing back a stale state.
#[test]
fn a_state_that_stops_being_plain_data_drops_its_stale_checkpoint() {
    let dir = TempDir::new("stale");
    let db = dir.0.join(graft::DATABASE_FILE);
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec("shop").module("counter", POISONABLE)))
            .expect("create");
        block_on(sb.wait_app_started()).expect("app");
        for _ in 0..3 {
            call(&sb, "inc");
        }
        assert_eq!(node.checkpoint().expect("checkpoint").written, 1);
        let store = graft::store::Store::open_read_only(&db).expect("db");
        assert_eq!(store.checkpoints("shop").expect("rows").len(), 1);
        drop(store);
        call(&sb, "poison");
        call(&sb, "inc");
        let stats = node.checkpoint().expect("checkpoint");
        assert_eq!((stats.written, stats.skipped), (0, 1));
        let store = graft::store::Store::open_read_only(&db).expect("db");
        assert!(store.checkpoints("shop").expect("rows").is_empty());
        drop(store);
        let events = block_on(sb.events()).expect("events");
        let skipped: Vec<_> = events
            .iter()
            .filter(|e| e.kind == "checkpoint_skipped")
            .collect();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].detail["processes"][0]["name"], "c");
        // Idle, or skipped again: no new event, no new write.
        call(&sb, "inc");
        node.checkpoint().expect("checkpoint");
        assert_eq!(
            kinds(&sb)
                .iter()
                .filter(|k| *k == "checkpoint_skipped")
                .count(),
            1
        );
        // Dropped without shutdown (the final checkpoint would skip too).
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(
        call(&sb, "get"),
        0,
        "restarted from init, not the stale n = 3"
    );
    // Plain again: checkpointed again.
    call(&sb, "inc");
    call(&sb, "cure");
    assert_eq!(node.checkpoint().expect("checkpoint").written, 1);
    node.shutdown();
}

/// The sweep of ephemeral directories left by killed nodes goes by the lock
/// a live store holds, not by the pid in the name (meaningless across pid
/// namespaces sharing a temp directory, and reused).
#[test]
fn the_ephemeral_sweep_spares_a_locked_directory_whatever_its_pid() {
    // Above any Linux pid_max: no process has this pid in this namespace,
    // like a live node in another container sharing /tmp.
    let dir = std::env::temp_dir().join(format!(
        "graft-ephemeral-4194399-{:x}-test",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("graft.db"), b"").unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("graft.lock"))
        .unwrap();
    lock.try_lock().expect("lock");
    let store = graft::store::Store::in_memory().expect("ephemeral store");
    assert!(
        dir.join("graft.db").is_file(),
        "a locked directory is in use"
    );
    // The store's own directory holds its lock too.
    let own = store.path().parent().unwrap().to_path_buf();
    assert!(own.join("graft.lock").is_file());
    let other = graft::store::Store::in_memory().expect("a second one");
    assert!(
        own.is_dir(),
        "a live store's directory survives another's sweep"
    );
    drop(lock);
    drop(other);
    let again = graft::store::Store::in_memory().expect("a third one");
    assert!(!dir.exists(), "an unlocked directory is swept");
    drop(store);
    assert!(!own.exists(), "removed when its store is dropped");
    drop(again);
}

/// The effective user of this process (the owner of `/proc/self`).
fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
}

const RO_CHILD: &str = "GRAFT_TEST_READ_ONLY_DIR";

/// Where a file-mode test runs.
enum ModeTest {
    /// Root ran the test again as `nobody`, and it passed.
    Delegated,
    /// Run it here, in this directory (removed when dropped).
    Here(TempDir),
}

/// Root ignores file modes, so as root the test binary runs test `name`
/// again as `nobody` on a directory `nobody` owns (and asserts it passed);
/// otherwise the test runs here.
fn mode_test_dir(name: &str) -> ModeTest {
    const NOBODY: u32 = 65534;
    match std::env::var_os(RO_CHILD) {
        Some(d) => ModeTest::Here(TempDir(PathBuf::from(d))),
        None if euid() == 0 => {
            use std::os::unix::process::CommandExt;
            let owned = TempDir::new(&format!("ro-root-{}", name.len()));
            std::fs::create_dir_all(&owned.0).unwrap();
            std::os::unix::fs::chown(&owned.0, Some(NOBODY), Some(NOBODY)).unwrap();
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--test-threads=1"])
                .env(RO_CHILD, &owned.0)
                .uid(NOBODY)
                .gid(NOBODY)
                .output()
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "as nobody: {said}");
            assert!(said.contains("1 passed"), "the test ran as nobody: {said}");
            ModeTest::Delegated
        }
        None => ModeTest::Here(TempDir::new(&format!("ro-{}", name.len()))),
    }
}

/// A data directory that turns read-only under a running node fails the
/// reload with `storage_read_only`, applies nothing, and the node carries
/// on; writable again, reloads work. A node opened on a read-only directory
/// is refused with a clear message. Root ignores file modes, so as root
/// this test runs itself again as `nobody` on a directory `nobody` owns.
#[test]
fn a_data_directory_turning_read_only_fails_the_reload_not_the_node() {
    use std::os::unix::fs::PermissionsExt;
    let owned;
    let dir =
        match mode_test_dir("a_data_directory_turning_read_only_fails_the_reload_not_the_node") {
            ModeTest::Delegated => return,
            ModeTest::Here(d) => {
                owned = d;
                owned.0.clone()
            }
        };
    let set_mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let db = dir.join(graft::DATABASE_FILE);
    let node = Node::builder()
        .threads(2)
        .checkpoint_ms(0)
        .data_dir(&dir)
        .open()
        .expect("open");
    let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    reload(&sb, counter(2), ReloadOptions::default());
    set_mode(&db, 0o444);
    set_mode(&dir, 0o555);
    let mut m = BTreeMap::new();
    m.insert("counter".to_string(), counter(3));
    let err = block_on(sb.reload(m.clone(), ReloadOptions::default())).expect_err("read-only");
    assert_eq!(err.kind(), "storage_read_only", "{err}");
    assert_eq!(current(&sb), 2, "nothing applied");
    assert_eq!(call(&sb, "version"), 2, "the node serves on");
    set_mode(&dir, 0o755);
    set_mode(&db, 0o644);
    block_on(sb.reload(m, ReloadOptions::default())).expect("writable again");
    assert_eq!(current(&sb), 3);
    // The refused reload's `abort` event (viewers read events) says why
    // without the host's path.
    // Written once the storage takes writes again (events the store
    // refused wait, and are retried).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let abort = loop {
        let events = block_on(sb.events()).expect("events");
        if let Some(e) = events.into_iter().rev().find(|e| e.kind == "abort") {
            break e;
        }
        assert!(std::time::Instant::now() < deadline, "no abort event");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let said = abort.detail.to_string();
    assert!(said.contains("read-only"), "{said}");
    assert!(!said.contains(&*dir.to_string_lossy()), "{said}");
    drop(sb);
    node.shutdown();
    drop(node);

    set_mode(&dir, 0o555);
    let refused = Node::builder().data_dir(&dir).open();
    set_mode(&dir, 0o755);
    let err = refused
        .err()
        .expect("a read-only data directory is refused");
    assert_eq!(err.kind(), "storage_read_only");
    assert!(err.to_string().contains("is read-only"), "{err}");
}

/// New settings for a stored sandbox: durable, versions and named states
/// kept; bad settings, a broken new module or an open canary window change
/// nothing.
#[test]
fn reconfigure_applies_new_settings_durably_and_refuses_bad_ones_whole() {
    let dir = TempDir::new("reconfigure");
    {
        let node = open(&dir);
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        reload(&sb, counter(2), ReloadOptions::default());
        call(&sb, "inc");
        call(&sb, "inc");
        let events_before = block_on(sb.events()).expect("events").len();

        // Hostile: no such sandbox; limits out of range; a new entry module
        // that does not compile; an open canary window.
        let missing = node.reconfigure_sandbox(spec("nope")).expect_err("missing");
        assert_eq!(missing.kind(), "no_sandbox", "{missing}");
        let mut huge = spec("shop");
        huge.limits.max_versions = 1_000_000;
        assert!(node.reconfigure_sandbox(huge).is_err());
        let broken = spec("shop")
            .module("main", "return {{{")
            .entry(Some("main"));
        let err = node
            .reconfigure_sandbox(broken)
            .expect_err("does not compile");
        assert_eq!(err.kind(), "compile_error", "{err}");
        reload(&sb, counter(3), canary());
        let mut bigger = spec("shop");
        bigger.limits.max_versions = 4;
        let err = node.reconfigure_sandbox(bigger).expect_err("window open");
        assert!(err.to_string().contains("canary window"), "{err}");
        block_on(sb.rollback("counter", 2, ReloadOptions::default())).expect("rollback");
        // Nothing of the refused ones happened.
        assert_eq!(call(&sb, "get")["n"], 4);
        assert!(!kinds(&sb).contains(&"sandbox_reconfigured".to_string()));
        assert!(block_on(sb.events()).expect("events").len() > events_before);

        // Entry args larger than the new message limit: refused whole,
        // naming the setting and both sizes.
        let mut oversize = spec("shop").entry_args(json!({ "blob": "x".repeat(5_000) }));
        oversize.limits.max_message_bytes = 1_024;
        let err = node
            .reconfigure_sandbox(oversize)
            .expect_err("entry args over the limit");
        let msg = err.to_string();
        assert!(
            msg.contains("`entry_args` is 5011 bytes")
                && msg.contains("`max_message_bytes` of 1024"),
            "{msg}"
        );
        assert!(!kinds(&sb).contains(&"sandbox_reconfigured".to_string()));
        // Settings that validate but cannot start (an entry module with no
        // `init`): the old settings come back, on disk too.
        let unstartable = spec("shop")
            .module("plain", "return {}")
            .entry(Some("plain"));
        let err = node
            .reconfigure_sandbox(unstartable)
            .expect_err("cannot start");
        assert!(err.to_string().contains("no `init`"), "{err}");
        let sb = node.sandbox("shop").expect("still there");
        block_on(sb.wait_app_started()).expect("old app again");
        assert_eq!(call(&sb, "get")["n"], 4, "the state came back");
        // Happy path: a capability and a new entry module that starts the
        // same named counter.
        let mut next = spec("shop").module("main", APP).entry(Some("main"));
        next.grants = vec!["random".to_string()];
        next.limits.max_versions = 4;
        let sb = node
            .reconfigure_sandbox(next.clone())
            .expect("reconfigure")
            .expect("rebuilt");
        assert_eq!(call(&sb, "get")["n"], 4, "the named state came back");
        assert_eq!(current(&sb), 2, "the current version stays");
        assert_eq!(
            block_on(sb.eval("return math.random(1, 1)")).expect("random granted"),
            json!(1)
        );
        assert!(node.reconfigure_sandbox(next).expect("same").is_none());
        drop(sb);
        node.shutdown();
    }
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(
        block_on(sb.eval("return math.random(1, 1)")).expect("still granted"),
        json!(1)
    );
    let kept: Vec<u32> = versions(&sb).into_iter().map(|v| v.0).collect();
    assert_eq!(kept, [1, 2, 3]);
    assert!(kinds(&sb).contains(&"sandbox_reconfigure_failed".to_string()));
    assert_eq!(
        kinds(&sb)
            .iter()
            .filter(|k| *k == "sandbox_reconfigured")
            .count(),
        2,
        "the unstartable one (undone by sandbox_reconfigure_failed) and the good one"
    );
    node.shutdown();
}

#[test]
fn an_import_replaces_the_kept_history_on_disk_too() {
    let dir = TempDir::new("import");
    let db = dir.0.join(graft::DATABASE_FILE);
    // The exported history: versions 1..3 of a counter from another node.
    let elsewhere = Node::new();
    let src = graft::block_on(elsewhere.create_sandbox(spec("src"))).expect("source sandbox");
    block_on(src.wait_app_started()).expect("app");
    reload(&src, counter(20), ReloadOptions::default());
    reload(&src, counter(30), ReloadOptions::default());
    let exported = block_on(src.export()).expect("export");
    let mut only_counter = BTreeMap::new();
    only_counter.insert(
        "counter".to_string(),
        exported.get("counter").cloned().expect("counter exported"),
    );
    let wanted = versions(&src);
    // Here, version 2 exists with other content.
    let node = open(&dir);
    let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    reload(&sb, counter(7), ReloadOptions::default());
    assert_ne!(versions(&sb), wanted);
    block_on(sb.import(only_counter, ReloadOptions::default())).expect("import");
    assert_eq!(versions(&sb), wanted, "memory");
    assert_eq!(call(&sb, "version"), json!(30));
    let disk = |what: &str| {
        let store = graft::store::Store::open_read_only(&db).expect("read the database");
        let rows: Vec<(u32, String)> = store
            .versions("shop", "counter")
            .expect("versions")
            .into_iter()
            .map(|v| (v.version, v.checksum))
            .collect();
        assert_eq!(rows, wanted, "{what}");
    };
    disk("after the import");
    node.shutdown();
    drop(node);
    let node = open(&dir);
    let sb = node.sandbox("shop").expect("restored");
    block_on(sb.wait_app_started()).expect("app");
    assert_eq!(versions(&sb), wanted, "after a restart");
    assert_eq!(call(&sb, "version"), json!(30));
    // Rolling back to the imported version 2 runs its imported source.
    block_on(sb.rollback("counter", 2, ReloadOptions::default())).expect("rollback");
    assert_eq!(call(&sb, "version"), json!(20));
    disk("after a rollback");
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A reload that does not compile: an `abort` event, and no write besides.
fn broken_reload(sb: &graft::Sandbox) {
    let mut m = BTreeMap::new();
    m.insert("counter".to_string(), "return {".to_string());
    let err = block_on(sb.reload(m, ReloadOptions::default())).expect_err("does not compile");
    assert_eq!(err.kind(), "compile_error", "{err}");
}

/// The node-wide events after `after`, as (seq, kind).
fn seen(node: &Node, after: u64) -> Vec<(u64, String)> {
    node.events_after(after, &EventFilter::default(), 1000)
        .events
        .into_iter()
        .map(|e| (e.seq, e.kind))
        .collect()
}

/// An event the store cannot take (its database file turned read-only) is
/// shown to no one — not by number, not by the watermark — until it is on
/// disk; it appears, in order, once the file is writable again. One still
/// unwritten when the node stops is lost unseen, so a restart may give its
/// number to another event without any reader having seen it twice.
#[test]
fn an_event_the_store_cannot_take_is_shown_only_once_on_disk() {
    let owned = match mode_test_dir("an_event_the_store_cannot_take_is_shown_only_once_on_disk") {
        ModeTest::Delegated => return,
        ModeTest::Here(d) => d,
    };
    let db = owned.0.join(graft::DATABASE_FILE);
    let node = Node::builder()
        .threads(2)
        .checkpoint_ms(0)
        .data_dir(&owned.0)
        .open()
        .expect("open");
    let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    let head = *node.subscribe_events().borrow();
    assert!(head > 0);

    set_mode(&db, 0o444);
    broken_reload(&sb);
    // `events()` waits for the write to be tried, then shows nothing new.
    let shown: Vec<u64> = block_on(sb.events())
        .expect("events")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert!(
        shown.iter().all(|s| *s <= head),
        "an event not on disk is shown: {shown:?} (head {head})"
    );
    assert_eq!(seen(&node, head), vec![], "nor node-wide");
    assert_eq!(
        *node.subscribe_events().borrow(),
        head,
        "nor by the watermark"
    );

    // Writable again: the waiting event is written and shown, in order.
    set_mode(&db, 0o644);
    let deadline = Instant::now() + Duration::from_secs(10);
    let written = loop {
        let after = seen(&node, head);
        if !after.is_empty() {
            break after;
        }
        assert!(Instant::now() < deadline, "the waiting event never showed");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(written, vec![(head + 1, "abort".to_string())]);
    let shown_max = head + 1;

    // Unwritable at the stop: the event is lost, never shown.
    set_mode(&db, 0o444);
    broken_reload(&sb);
    assert_eq!(seen(&node, shown_max), vec![]);
    drop(sb);
    node.shutdown();
    drop(node);
    set_mode(&db, 0o644);

    // Every number shown before the restart keeps its event; a reader that
    // resumes from the last one shown gets the new events, none missed.
    let node = Node::builder()
        .threads(2)
        .checkpoint_ms(0)
        .data_dir(&owned.0)
        .open()
        .expect("reopen");
    let sb = node.sandbox("shop").expect("restored");
    broken_reload(&sb);
    // Waits for the `abort` event to be written.
    block_on(sb.events()).expect("events");
    let page = node.events_after(shown_max, &EventFilter::default(), 1000);
    assert!(page.gap.is_none(), "{:?}", page.gap);
    let kinds: Vec<&str> = page.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"abort"), "{kinds:?}");
    assert!(page.events.iter().all(|e| e.seq > shown_max));
    let all = seen(&node, 0);
    assert!(all.contains(&(head + 1, "abort".to_string())), "{all:?}");
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "{all:?}");
    drop(sb);
    node.shutdown();
}

/// A database *file* that is read-only (its directory writable) is refused
/// at start with a clear message, like a read-only directory: SQLite would
/// open it read-only without a word and no write would ever work again.
/// Turning read-only under a running node (the file, or its write-ahead
/// log), it fails the write whole, and writes resume once it is writable.
#[test]
fn a_read_only_database_file_is_refused_at_start_and_fails_writes_until_writable() {
    let owned = match mode_test_dir(
        "a_read_only_database_file_is_refused_at_start_and_fails_writes_until_writable",
    ) {
        ModeTest::Delegated => return,
        ModeTest::Here(d) => d,
    };
    let dir = owned.0.clone();
    let db = dir.join(graft::DATABASE_FILE);
    let builder = || Node::builder().threads(2).checkpoint_ms(0).data_dir(&dir);
    {
        let node = builder().open().expect("open");
        let sb = graft::block_on(node.create_sandbox(spec("shop"))).expect("create");
        block_on(sb.wait_app_started()).expect("app");
        reload(&sb, counter(2), ReloadOptions::default());
        drop(sb);
        node.shutdown();
    }
    set_mode(&db, 0o444);
    let bytes = std::fs::read(&db).unwrap();
    let err = builder()
        .open()
        .err()
        .expect("a read-only database file is refused");
    assert_eq!(err.kind(), "storage_read_only", "{err}");
    let said = err.to_string();
    assert!(
        said.contains("is read-only") && said.contains("database file"),
        "{said}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), bytes, "left untouched");
    set_mode(&db, 0o644);

    let node = builder().open().expect("writable again, it starts");
    let sb = node.sandbox("shop").expect("restored");
    let wal = dir.join(format!("{}-wal", graft::DATABASE_FILE));
    for file in [&db, &wal] {
        let v = current(&sb);
        set_mode(file, 0o444);
        let mut m = BTreeMap::new();
        m.insert("counter".to_string(), counter(v + 1));
        let err =
            block_on(sb.reload(m.clone(), ReloadOptions::default())).expect_err("read-only file");
        assert_eq!(err.kind(), "storage_read_only", "{}: {err}", file.display());
        assert_eq!(current(&sb), v, "nothing applied");
        set_mode(file, 0o644);
        block_on(sb.reload(m, ReloadOptions::default())).expect("writable again");
        assert_eq!(current(&sb), v + 1);
    }
    drop(sb);
    node.shutdown();
}

/// Reloads racing live reconfigurations: every acknowledged reload is in the
/// rebuilt sandbox (before, a reload committed between the reconfigure's
/// snapshot and the rebuild was dropped from memory while on disk, and every
/// later reload failed with "version N is stored already"). A reload that
/// meets the rebuild is refused (`busy`), never lost.
#[test]
fn reloads_racing_a_reconfigure_are_kept_or_refused_never_lost() {
    let dir = TempDir::new("reconfigure-race");
    let node = open(&dir);
    let sb = graft::block_on(node.create_sandbox(spec("race"))).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = {
        let node = node.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut refused) = (0u32, 0u32);
            let mut v = 2;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && v < 400 {
                let Ok(sb) = node.sandbox("race") else {
                    continue;
                };
                let mut m = BTreeMap::new();
                m.insert("counter".to_string(), counter(v));
                match block_on(sb.reload(m, ReloadOptions::default())) {
                    Ok(r) if r.status == graft::ReloadStatus::Reloaded => {
                        ok += 1;
                        v += 1;
                    }
                    Ok(r) => panic!("unexpected {:?}", r.status),
                    Err(e) => {
                        // Never `no_sandbox`: during a rebuild the sandbox
                        // (or a handle of the one replaced) says so.
                        assert!(
                            matches!(e.kind(), "busy" | "sandbox_rebuilding" | "sandbox_stopped"),
                            "{e}"
                        );
                        refused += 1;
                    }
                }
            }
            (ok, refused)
        })
    };
    for i in 0..12 {
        let mut s = spec("race");
        s.limits.max_mailbox = 1_000 + i;
        match node.reconfigure_sandbox(s) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), "busy", "{e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(15));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, _refused) = reloader.join().expect("reloader");
    let sb = node.sandbox("race").expect("sandbox");
    let current = |sb: &graft::Sandbox| {
        block_on(sb.modules())
            .expect("modules")
            .into_iter()
            .find(|m| m.name == "counter")
            .expect("counter")
            .version
    };
    // Every acknowledged reload minted one version, and all are running.
    assert_eq!(current(&sb), 1 + ok);
    // And the next one is not refused as "stored already".
    let r = reload(&sb, counter(1_000), ReloadOptions::default());
    assert_eq!(r.status, graft::ReloadStatus::Reloaded);
    assert_eq!(current(&sb), 2 + ok);
    node.shutdown();
    let node = open(&dir);
    let sb = node.sandbox("race").expect("restored");
    assert_eq!(current(&sb), 2 + ok, "memory and disk agree");
    node.shutdown();
}

/// A counter whose `terminate` spins until `handler_ms` stops it: a rebuild
/// with new settings (which stops the old app first) takes that long.
fn slow_to_stop(id: &str) -> SandboxSpec {
    let mut s = SandboxSpec::new(id)
        .entry(Some("app"))
        .module("app", APP)
        .module(
            "counter",
            counter(1).replace(
                "return c\n",
                "function c.terminate(reason, state) while true do end end\nreturn c\n",
            ),
        );
    s.limits.handler_ms = 400;
    s
}

/// While a sandbox is rebuilt with new settings, it is neither unknown nor
/// free: `Node::sandbox` (what every API request goes through) answers
/// `Rebuilding` (HTTP 503, retryable), never `NoSandbox` (404), and creating
/// the id is `SandboxExists` (409), never a storage error (its rows are
/// stored). Once rebuilt, it answers as before.
#[test]
fn a_sandbox_being_rebuilt_answers_rebuilding_and_its_id_is_taken() {
    let dir = TempDir::new("rebuild-window");
    let node = open(&dir);
    let sb = block_on(node.create_sandbox(slow_to_stop("shop"))).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    call(&sb, "inc");
    let mut bigger = slow_to_stop("shop");
    bigger.limits.max_versions = 7;
    let rebuilder = {
        let node = node.clone();
        std::thread::spawn(move || node.reconfigure_sandbox(bigger))
    };
    let (mut rebuilding, mut creates) = (0, 0);
    while !rebuilder.is_finished() {
        match node.sandbox("shop") {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind(), "sandbox_rebuilding", "{e}");
                assert!(e.to_string().contains("try again"), "{e}");
                rebuilding += 1;
                let Err(created) = block_on(node.create_sandbox(spec("shop"))) else {
                    panic!("created over a sandbox being rebuilt");
                };
                assert_eq!(created.kind(), "sandbox_exists", "{created}");
                creates += 1;
                // A request on a handle of the old sandbox is told the same
                // (or, sent just before the mark closed it, is answered by
                // the app before it stops): never `no_process` nor `busy`.
                if let Err(e) = block_on(sb.call("c", json!("get"), None)) {
                    assert_eq!(e.kind(), "sandbox_rebuilding", "{e}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rebuilt = rebuilder
        .join()
        .expect("no panic")
        .expect("reconfigured")
        .expect("rebuilt");
    assert!(rebuilding > 0 && creates > 0, "the window was seen");
    assert_eq!(call(&rebuilt, "get")["n"], 1, "the state came back");
    assert!(node.sandbox("shop").is_ok());
    let err = block_on(sb.call("c", json!("get"), None)).expect_err("the old handle is gone");
    assert_eq!(err.kind(), "sandbox_rebuilding", "{err}");
    node.shutdown();
}

/// A host function the test holds: `gate.hold(phase)` (blocking) tells the
/// test which callback reached it, then waits until the test lets it go and
/// returns `"released"`; `gate.seen(text)` records what the callback got
/// back. So a callback stops exactly where the test wants, for as long as
/// it wants, without a sleep.
struct Gate {
    entered: std::sync::mpsc::Receiver<String>,
    release: std::sync::mpsc::Sender<()>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    host: graft::HostFunctions,
}

impl Gate {
    fn new() -> Gate {
        let (entered_tx, entered) = std::sync::mpsc::channel::<String>();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let entered_tx = std::sync::Mutex::new(entered_tx);
        let release_rx = std::sync::Mutex::new(release_rx);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let host = graft::HostFunctions::default()
            .blocking("gate.hold", move |call| {
                let phase = call.args.first().and_then(|a| a.as_str()).unwrap_or("?");
                let _ = entered_tx.lock().unwrap().send(phase.to_owned());
                // An error (the test ended) lets the callback go on too.
                match release_rx.lock().unwrap().recv() {
                    Ok(()) => Ok(json!("released")),
                    Err(_) => Err("the test is over".into()),
                }
            })
            .function("gate.seen", move |args| {
                let text = args.first().and_then(|a| a.as_str()).unwrap_or("?");
                seen2.lock().unwrap().push(text.to_owned());
                Ok(json!(null))
            });
        Gate {
            entered,
            release,
            seen,
            host,
        }
    }

    /// Waits until a callback holds in `phase` (the deadline only fails a
    /// broken test; it is never how long the test waits).
    fn held(&self, phase: &str) {
        let got = self
            .entered
            .recv_timeout(Duration::from_secs(60))
            .expect("a callback reached gate.hold");
        assert_eq!(got, phase);
    }

    fn release(&self) {
        self.release.send(()).expect("the callback waits");
    }
}

/// Counters `c` and `d` with the `holder` between them: it holds in `init`
/// and in `terminate`, so the app starts up to `c` and stops down to the
/// holder (`d`, started last, stopped first) and waits there for the test.
/// `handler_ms` at its maximum and `shutdown = "infinity"`: nothing but the
/// test ends the hold.
fn held_app(id: &str) -> SandboxSpec {
    let app = r#"
return {
  behaviour = "supervisor",
  init = function()
    return { strategy = "one_for_one", children = {
      { id = "c", module = "counter", name = "c" },
      { id = "h", module = "holder", name = "h", shutdown = "infinity" },
      { id = "d", module = "counter", name = "d" },
    } }
  end,
}
"#;
    let holder = r#"
local h = {}
function h.init(args)
  local r, err = gate.hold("init")
  gate.seen("init: " .. tostring(r or err))
  return {}
end
function h.terminate(reason, state)
  local r, err = gate.hold("terminate")
  gate.seen("terminate: " .. tostring(r or err))
end
return h
"#;
    let mut s = SandboxSpec::new(id)
        .entry(Some("app"))
        .module("app", app)
        .module("counter", counter(1))
        .module("holder", holder);
    s.limits.handler_ms = 60_000;
    s
}

/// Creates `held_app(id)` with the gate's host functions, lets its holder
/// start, and counts `c` and `d` to 1.
fn create_held(node: &Node, gate: &Gate, id: &str) -> graft::Sandbox {
    let sb = block_on(node.create_sandbox_with(held_app(id), gate.host.clone())).expect("create");
    gate.held("init");
    gate.release();
    block_on(sb.wait_app_started()).expect("app");
    assert_eq!(call(&sb, "inc"), json!(1));
    assert_eq!(
        block_on(sb.call("d", json!("inc"), None)).expect("d"),
        json!(1)
    );
    sb
}

/// Starts rebuilding `id` with new limits on a thread of its own.
fn rebuild_held(
    node: &Node,
    id: &str,
) -> std::thread::JoinHandle<graft::Result<Option<graft::Sandbox>>> {
    let mut bigger = held_app(id);
    bigger.limits.max_versions = 7;
    let node = node.clone();
    std::thread::spawn(move || node.reconfigure_sandbox(bigger))
}

/// A handle taken before a rebuild (an HTTP request that looked the sandbox
/// up just before, an embedder keeping one) is told `Rebuilding` from the
/// moment the old app starts stopping — for every request, while the app
/// is held in a `terminate` — never an answer of the app being stopped
/// (before: `c`, still running, answered; `d`, already stopped, was
/// `no_process`; a reload was `busy`). The stop itself goes on: the
/// holder's blocking host call gets its result. Afterwards the rebuilt
/// sandbox answers with the states kept.
#[test]
fn a_handle_held_across_a_rebuild_says_rebuilding_from_the_old_apps_stop() {
    let dir = TempDir::new("held-handle");
    let node = open(&dir);
    let gate = Gate::new();
    let sb = create_held(&node, &gate, "shop");
    let rebuilder = rebuild_held(&node, "shop");
    gate.held("terminate");

    let rebuilding = |what: &str, r: graft::Result<serde_json::Value>| match r {
        Err(e) => {
            assert_eq!(e.kind(), "sandbox_rebuilding", "{what}: {e}");
            assert!(e.to_string().contains("try again"), "{what}: {e}");
        }
        Ok(v) => panic!("{what} answered {v} while the old app stops"),
    };
    let to_json = |r: graft::Result<()>| r.map(|()| json!(null));
    rebuilding("call c", block_on(sb.call("c", json!("get"), None)));
    rebuilding("call d", block_on(sb.call("d", json!("get"), None)));
    rebuilding("call_blocking", sb.call_blocking("c", json!("get"), None));
    rebuilding("cast", to_json(block_on(sb.cast("c", json!("inc")))));
    rebuilding("send", to_json(block_on(sb.send("c", json!("hi")))));
    rebuilding("state", block_on(sb.state("c")));
    rebuilding("eval", block_on(sb.eval("return 1")));
    rebuilding(
        "spawn",
        block_on(sb.spawn("counter", json!(null), None)).map(|p| json!(p.to_string())),
    );
    rebuilding(
        "processes",
        block_on(sb.processes()).map(|p| json!(p.len())),
    );
    rebuilding("modules", block_on(sb.modules()).map(|m| json!(m.len())));
    rebuilding("info", block_on(sb.info()).map(|i| json!(i.status)));
    let mut src = BTreeMap::new();
    src.insert("counter".to_string(), counter(2));
    rebuilding(
        "reload",
        block_on(sb.reload(src, ReloadOptions::default()))
            .map(|r| json!(format!("{:?}", r.status))),
    );
    let err = node.sandbox("shop").expect_err("being rebuilt");
    assert_eq!(err.kind(), "sandbox_rebuilding", "{err}");
    // The events are the node's log, not the app: they still read, and
    // say why.
    assert!(kinds(&sb).contains(&"sandbox_reconfigured".to_string()));

    gate.release();
    gate.held("init");
    gate.release();
    let rebuilt = rebuilder
        .join()
        .expect("no panic")
        .expect("reconfigured")
        .expect("rebuilt");
    assert_eq!(
        gate.seen.lock().unwrap().clone(),
        ["init: released", "terminate: released", "init: released"],
        "the stopping holder got its host call's result"
    );
    assert_eq!(call(&rebuilt, "get")["n"], 1, "c's state came back");
    let d = block_on(rebuilt.call("d", json!("get"), None)).expect("d");
    assert_eq!(d["n"], 1, "d's state came back");
    assert_eq!(
        block_on(rebuilt.info()).expect("info").limits.max_versions,
        7
    );
    let err = block_on(sb.call("c", json!("get"), None)).expect_err("replaced");
    assert_eq!(err.kind(), "sandbox_rebuilding", "{err}");
    node.shutdown();
}

/// A checkpoint taken while a sandbox is rebuilt leaves its stored states
/// alone: the rebuild took its own before the old app stopped, and the new
/// app gets those back. (Before, one taken while the old app stopped
/// deleted the state of `d`, already stopped, and one taken while the new
/// app started wrote `c`'s fresh `init` state over the checkpoint the
/// rebuild was about to restore.)
#[test]
fn checkpoints_during_a_rebuild_leave_the_stored_states_alone() {
    let dir = TempDir::new("rebuild-checkpoint");
    let node = open(&dir);
    let gate = Gate::new();
    let _sb = create_held(&node, &gate, "shop");
    let rebuilder = rebuild_held(&node, "shop");
    gate.held("terminate");
    node.checkpoint()
        .expect("checkpoint while the old app stops");
    gate.release();
    gate.held("init");
    node.checkpoint()
        .expect("checkpoint while the new app starts");
    gate.release();
    let rebuilt = rebuilder
        .join()
        .expect("no panic")
        .expect("reconfigured")
        .expect("rebuilt");
    // Read without a message: a call would make the states dirty, and the
    // final checkpoint would write them again over what is to be checked.
    let state =
        |sb: &graft::Sandbox, name: &str| block_on(sb.state(name)).expect("state")["n"].clone();
    assert_eq!(state(&rebuilt, "c"), 1, "c's state came back");
    assert_eq!(state(&rebuilt, "d"), 1, "d's state came back");
    drop((rebuilt, _sb));
    node.shutdown();
    drop(node);
    // And on disk: a restart brings back the same states.
    let passing = graft::HostFunctions::default()
        .function("gate.hold", |_| Ok(json!("open")))
        .function("gate.seen", |_| Ok(json!(null)));
    let node = Node::builder()
        .threads(2)
        .checkpoint_ms(0)
        .data_dir(&dir.0)
        .host_functions(passing)
        .open()
        .expect("reopen");
    let sb = node.sandbox("shop").expect("restored");
    assert_eq!(state(&sb, "c"), 1, "c's stored state");
    assert_eq!(state(&sb, "d"), 1, "d's stored state");
    node.shutdown();
}

/// A rebuild refused before the old app stops (here: an added module that
/// does not compile) leaves the old sandbox as it was, and a handle of it
/// answers everything again — calls, info, and reloads (not `busy`: it
/// takes reloads again).
#[test]
fn a_refused_rebuild_leaves_the_old_handle_working() {
    let dir = TempDir::new("refused-rebuild");
    let node = open(&dir);
    let gate = Gate::new();
    let sb = create_held(&node, &gate, "shop");
    let mut broken = held_app("shop").module("extra", "return {{{");
    broken.limits.max_versions = 7;
    let err = node
        .reconfigure_sandbox(broken)
        .expect_err("does not compile");
    assert_eq!(err.kind(), "compile_error", "{err}");
    assert_eq!(call(&sb, "inc"), json!(2));
    block_on(sb.info()).expect("info");
    let report = reload(&sb, counter(2), ReloadOptions::default());
    assert_eq!(report.status, graft::ReloadStatus::Reloaded);
    assert_eq!(call(&sb, "inc"), json!(4));
    assert!(node.sandbox("shop").is_ok());
    node.shutdown();
}

/// A kept version that no longer compiles at a restore leaves the sandbox
/// unrestored, with a reason naming the module and the version (not the
/// file path it was saved from, which API clients must not see); creating
/// its id is a conflict (`sandbox_unrestored`, HTTP 409) that names the way
/// out, not invalid input.
#[test]
fn a_version_that_no_longer_compiles_is_named_by_module_and_version() {
    let dir = TempDir::new("no-longer-compiles");
    {
        let node = open(&dir);
        let mut spec = spec("shop");
        spec.files.insert(
            "counter".into(),
            PathBuf::from("/home/secret/project/src/counter.luau"),
        );
        let sb = block_on(node.create_sandbox(spec)).expect("create");
        reload(&sb, counter(2), ReloadOptions::default());
        node.shutdown();
    }
    {
        let db = rusqlite::Connection::open(dir.0.join(graft::DATABASE_FILE)).expect("sqlite");
        let broken = "return {{{";
        let n = db
            .execute(
                "UPDATE module_versions SET source = ?1, checksum = ?2 WHERE sandbox = 'shop' AND module = 'counter' AND version = 1",
                rusqlite::params![broken, graft::upgrade::checksum(broken)],
            )
            .expect("tamper");
        assert_eq!(n, 1);
    }
    let node = open(&dir);
    let unrestored = node.unrestored();
    assert_eq!(unrestored.len(), 1, "{unrestored:?}");
    let why = &unrestored[0].1;
    assert!(
        why.contains("version 1 of module `counter` does not compile") && why.contains("line 1"),
        "{why}"
    );
    assert!(!why.contains("/home/secret"), "no host path: {why}");
    let Err(err) = block_on(node.create_sandbox(spec("shop"))) else {
        panic!("created over an unrestored sandbox");
    };
    assert_eq!(err.kind(), "sandbox_unrestored", "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("--discard shop") && msg.contains("DELETE"),
        "{msg}"
    );
    assert!(!msg.contains("/home/secret"), "{msg}");
    node.shutdown();
}

/// Requests racing a rebuild through a handle of the old sandbox: every
/// `inc` that was answered is in the state the rebuilt sandbox gets back,
/// and every other is told `sandbox_rebuilding`. (Before, the rebuild read
/// the states it restores before closing the old sandbox, and calls
/// answered between that read and the close — while the checkpoint and the
/// `sandbox_reconfigured` event were written — were lost without any
/// crash; a call still in `c`'s mailbox when the stop ended it was
/// `crashed` with reason `shutdown`. Each of the two failed most runs.)
#[test]
fn every_call_answered_before_a_rebuild_closes_is_in_the_rebuilt_state() {
    let dir = TempDir::new("rebuild-race");
    let node = open(&dir);
    let sb = block_on(node.create_sandbox(spec("shop"))).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    let started = std::sync::Arc::new(std::sync::Barrier::new(5));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (sb, started) = (sb.clone(), started.clone());
            std::thread::spawn(move || {
                // One answered before the rebuild starts, at least.
                sb.call_blocking("c", json!("inc"), None).expect("inc");
                let mut answered = 1u64;
                started.wait();
                loop {
                    match sb.call_blocking("c", json!("inc"), None) {
                        Ok(_) => answered += 1,
                        Err(e) => {
                            assert_eq!(e.kind(), "sandbox_rebuilding", "{e}");
                            return answered;
                        }
                    }
                }
            })
        })
        .collect();
    started.wait();
    let mut bigger = spec("shop");
    bigger.limits.max_versions = 7;
    let rebuilt = node
        .reconfigure_sandbox(bigger)
        .expect("reconfigured")
        .expect("rebuilt");
    let answered: u64 = callers.into_iter().map(|c| c.join().expect("caller")).sum();
    assert_eq!(
        call(&rebuilt, "get")["n"],
        answered,
        "every answered inc is in the rebuilt state"
    );
    node.shutdown();
}

/// A call sent before a rebuild closes the sandbox but answered after the
/// rebuild read the states it restores: answered `Rebuilding` (its effect
/// is not in the rebuilt sandbox), never a success that the rebuild then
/// takes back. Here `c` is busy in a held call when `inc` arrives, and
/// handles it while the old app stops (held in `h`'s `terminate`), after
/// the rebuild's read. (Before: `inc` answered 1 and the rebuilt `c` was
/// back at 0.)
#[test]
fn a_call_answered_after_the_rebuilds_read_is_told_rebuilding() {
    let dir = TempDir::new("rebuild-late-answer");
    let node = open(&dir);
    let gate = Gate::new();
    let (handled_tx, handled) = std::sync::mpsc::channel::<()>();
    let handled_tx = std::sync::Mutex::new(handled_tx);
    let host = gate.host.clone().function("probe.handled", move |_| {
        let _ = handled_tx.lock().unwrap().send(());
        Ok(json!(null))
    });
    let app = r#"
return {
  behaviour = "supervisor",
  init = function()
    return { strategy = "one_for_one", children = {
      { id = "c", module = "counter", name = "c" },
      { id = "h", module = "holder", name = "h", shutdown = "infinity" },
    } }
  end,
}
"#;
    let counter = r#"
local c = {}
function c.init() return { n = 0 } end
function c.handle_call(req, from, state)
  if req == "hold" then gate.hold("call"); return "held", state end
  if req == "inc" then state.n += 1; probe.handled(); return state.n, state end
  return state, state
end
return c
"#;
    let holder = r#"
return {
  init = function() return {} end,
  terminate = function() gate.hold("terminate") end,
}
"#;
    let mut spec = SandboxSpec::new("shop")
        .entry(Some("app"))
        .module("app", app)
        .module("counter", counter)
        .module("holder", holder);
    spec.limits.handler_ms = 60_000;
    let sb = block_on(node.create_sandbox_with(spec.clone(), host)).expect("create");
    block_on(sb.wait_app_started()).expect("app");
    // `c` holds in a call; `inc` waits in its mailbox behind it.
    let holding = {
        let sb = sb.clone();
        std::thread::spawn(move || sb.call_blocking("c", json!("hold"), None))
    };
    gate.held("call");
    let inc = {
        let sb = sb.clone();
        std::thread::spawn(move || sb.call_blocking("c", json!("inc"), None))
    };
    // Until `inc` waits in `c`'s mailbox.
    let queued = || {
        block_on(sb.processes())
            .expect("processes")
            .iter()
            .any(|p| p.name.as_deref() == Some("c") && p.mailbox_len > 0)
    };
    while !queued() {
        std::thread::yield_now();
    }
    let mut bigger = spec;
    bigger.limits.max_versions = 7;
    let rebuilder = {
        let node = node.clone();
        std::thread::spawn(move || node.reconfigure_sandbox(bigger))
    };
    // The old app stops: the rebuild's read is done.
    gate.held("terminate");
    gate.release(); // `c`'s held call returns; `c` handles `inc`.
    handled.recv().expect("inc handled");
    gate.release(); // `h` stops, then `c`.
    let rebuilt = rebuilder
        .join()
        .expect("no panic")
        .expect("reconfigured")
        .expect("rebuilt");
    let n = block_on(rebuilt.state("c")).expect("state")["n"].clone();
    match inc.join().expect("inc") {
        Ok(v) => panic!("inc answered {v} after the rebuild's read; the rebuilt c has n = {n}"),
        Err(e) => assert_eq!(e.kind(), "sandbox_rebuilding", "{e}"),
    }
    assert_eq!(n, 0, "the rebuilt c has its state as read");
    let held = holding
        .join()
        .expect("hold")
        .expect_err("answered after the read");
    assert_eq!(held.kind(), "sandbox_rebuilding", "{held}");
    node.shutdown();
}
