//! `graft::watch` against a real folder: saves of every kind go live once,
//! deletions keep the module loaded, bursts fold into one reload.
#![cfg(feature = "watch")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use graft::watch::{Watch, WatchEvent, WatchOptions};
use graft::{block_on, Node, Sandbox, SandboxSpec};
use serde_json::json;

/// A server whose calls answer `step`.
fn server(step: u32) -> String {
    format!(
        "return {{\n  init = function() return {{}} end,\n  handle_call = function(request, from, state) return {step}, state end,\n}}\n"
    )
}

struct Fixture {
    dir: PathBuf,
    sandbox: Sandbox,
    events: Receiver<WatchEvent>,
    watch: Option<Watch>,
    _node: Node,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fixture {
    /// A sandbox `id` created from `src/m.luau` (a server answering 1) with
    /// one live process `m`, watched with `options`.
    fn new(id: &str, options: WatchOptions) -> Fixture {
        let dir = std::env::temp_dir().join(format!("graft-watch-{id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/m.luau"), server(1)).unwrap();
        let node = Node::new();
        let mut initial = BTreeMap::new();
        initial.insert("m".to_owned(), server(1));
        let spec = SandboxSpec::new(id).entry(None).module("m", server(1));
        let sandbox = graft::block_on(node.create_sandbox(spec)).unwrap();
        block_on(sandbox.spawn("m", json!(null), Some("m"))).unwrap();
        let (tx, events) = channel();
        let watch = Watch::start(
            dir.join("src"),
            sandbox.clone(),
            &initial,
            options,
            move |e| {
                let _ = tx.send(e);
            },
        )
        .unwrap();
        // The watcher's first scan runs at once: a save racing it could be
        // read half-written (a failed reload, then the real one), which is
        // correct but not what these tests look at.
        std::thread::sleep(Duration::from_millis(100));
        Fixture {
            dir,
            sandbox,
            events,
            watch: Some(watch),
            _node: node,
        }
    }

    fn src(&self, file: &str) -> PathBuf {
        self.dir.join("src").join(file)
    }

    fn next(&self, within: Duration) -> Option<WatchEvent> {
        self.events.recv_timeout(within).ok()
    }

    /// The next event, which must come within 10 s.
    fn expect(&self) -> WatchEvent {
        self.next(Duration::from_secs(10))
            .expect("no watch event within 10 s")
    }

    /// No event for `quiet`.
    fn expect_none(&self, quiet: Duration) {
        if let Some(e) = self.next(quiet) {
            panic!("unexpected event: {e:?}");
        }
    }

    fn call(&self) -> u64 {
        block_on(self.sandbox.call("m", json!(null), None))
            .unwrap()
            .as_u64()
            .unwrap()
    }

    fn version(&self) -> u32 {
        block_on(self.sandbox.modules())
            .unwrap()
            .into_iter()
            .find(|m| m.name == "m")
            .unwrap()
            .version
    }
}

fn quick() -> WatchOptions {
    WatchOptions::default()
        .debounce(Duration::from_millis(20))
        .recreate_grace(Duration::from_millis(100))
}

fn reloaded(e: WatchEvent) -> BTreeMap<String, PathBuf> {
    match e {
        WatchEvent::Reloaded { changed, .. } => changed,
        other => panic!("expected a reload, got {other:?}"),
    }
}

#[test]
fn an_in_place_save_goes_live_once() {
    let f = Fixture::new("watch-in-place", quick());
    std::fs::write(f.src("m.luau"), server(10)).unwrap();
    let changed = reloaded(f.expect());
    assert_eq!(changed.keys().collect::<Vec<_>>(), ["m"]);
    assert_eq!(changed["m"], f.src("m.luau"));
    assert_eq!(f.call(), 10);
    assert_eq!(f.version(), 2);
    f.expect_none(Duration::from_millis(300));
}

#[test]
fn an_atomic_rename_save_goes_live_and_its_temp_file_is_not_a_module() {
    let f = Fixture::new("watch-rename", quick());
    let tmp = f.src(".m.luau.tmp");
    std::fs::write(&tmp, server(100)).unwrap();
    std::fs::rename(&tmp, f.src("m.luau")).unwrap();
    reloaded(f.expect());
    assert_eq!(f.call(), 100);
    assert_eq!(f.version(), 2);
    f.expect_none(Duration::from_millis(300));
}

#[test]
fn a_delete_and_create_within_the_grace_is_a_save() {
    let f = Fixture::new(
        "watch-recreate",
        quick().recreate_grace(Duration::from_millis(500)),
    );
    std::fs::remove_file(f.src("m.luau")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(f.src("m.luau"), server(7)).unwrap();
    reloaded(f.expect());
    assert_eq!(f.call(), 7);
    f.expect_none(Duration::from_millis(700));
}

#[test]
fn a_deleted_file_keeps_its_module_and_says_who_uses_it() {
    let f = Fixture::new("watch-delete", quick());
    std::fs::remove_file(f.src("m.luau")).unwrap();
    match f.expect() {
        WatchEvent::Deleted {
            module,
            path,
            dependents,
            pids,
        } => {
            assert_eq!(module, "m");
            assert_eq!(path, f.src("m.luau"));
            assert!(dependents.is_empty(), "{dependents:?}");
            assert_eq!(pids.len(), 1, "{pids:?}");
            assert_eq!(pids[0].module(), "m", "{pids:?}");
        }
        other => panic!("expected a deletion, got {other:?}"),
    }
    // Still loaded and running; the deletion is reported once.
    assert_eq!(f.call(), 1);
    f.expect_none(Duration::from_millis(300));
    // The file coming back is a save like any other.
    std::fs::write(f.src("m.luau"), server(3)).unwrap();
    reloaded(f.expect());
    assert_eq!(f.call(), 3);
}

#[test]
fn a_burst_of_saves_is_one_reload() {
    let f = Fixture::new("watch-burst", quick().debounce(Duration::from_millis(300)));
    for step in 2..=30 {
        std::fs::write(f.src("m.luau"), server(step)).unwrap();
    }
    reloaded(f.expect());
    assert_eq!(f.call(), 30);
    assert_eq!(f.version(), 2, "the burst was reloaded more than once");
    f.expect_none(Duration::from_millis(800));
}

#[test]
fn a_broken_save_is_reported_once_and_the_fix_goes_live() {
    let f = Fixture::new("watch-broken", quick());
    std::fs::write(f.src("m.luau"), "return {").unwrap();
    match f.expect() {
        WatchEvent::ReloadFailed { error, files } => {
            assert_eq!(error.kind(), "compile_error", "{error}");
            assert_eq!(files["m"], f.src("m.luau"));
        }
        other => panic!("expected a failed reload, got {other:?}"),
    }
    assert_eq!(f.call(), 1);
    // Touching the folder again does not retry the same broken content.
    std::fs::write(f.src("other.txt"), "not a module").unwrap();
    f.expect_none(Duration::from_millis(300));
    std::fs::write(f.src("m.luau"), server(5)).unwrap();
    reloaded(f.expect());
    assert_eq!(f.call(), 5);
}

#[test]
fn new_modules_in_folders_are_loaded_and_bad_names_reported_once() {
    let f = Fixture::new("watch-new", quick());
    std::fs::create_dir_all(f.src("lib")).unwrap();
    std::fs::write(f.src("lib/steps.luau"), "return { size = 3 }\n").unwrap();
    let changed = reloaded(f.expect());
    assert_eq!(changed.keys().collect::<Vec<_>>(), ["lib.steps"]);
    std::fs::write(f.src("bad name.luau"), "return {}").unwrap();
    match f.expect() {
        WatchEvent::Ignored { path } => assert_eq!(path, f.src("bad name.luau")),
        other => panic!("expected an ignored file, got {other:?}"),
    }
    std::fs::write(f.src("bad name.luau"), "return { again = true }").unwrap();
    f.expect_none(Duration::from_millis(300));
}

#[test]
fn nothing_is_reported_after_stop() {
    let mut f = Fixture::new("watch-stop", quick());
    f.watch.take().unwrap().stop();
    std::fs::write(f.src("m.luau"), server(2)).unwrap();
    f.expect_none(Duration::from_millis(300));
    assert_eq!(f.call(), 1);
}

#[test]
fn a_missing_folder_cannot_be_watched() {
    let node = Node::new();
    let spec = SandboxSpec::new("watch-missing")
        .entry(None)
        .module("m", server(1));
    let sandbox = graft::block_on(node.create_sandbox(spec)).unwrap();
    let missing = Path::new("/nonexistent/graft-watch/src");
    let err = Watch::start(
        missing,
        sandbox,
        &BTreeMap::new(),
        WatchOptions::default(),
        |_| {},
    )
    .unwrap_err();
    assert_eq!(err.path(), missing);
    assert!(
        err.to_string().starts_with("cannot watch /nonexistent"),
        "{err}"
    );
    assert!(std::error::Error::source(&err).is_some());
}
