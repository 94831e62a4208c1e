//! The checks of the `reload_source` fuzz target: arbitrary bytes as a module
//! source go through everything a reload does, into a sandbox whose live
//! counter must keep answering (SPEC §7).
//!
//! This file uses only `graft` and `serde_json`, so the regression test
//! `crates/graft/tests/fuzz_regressions.rs` includes it with `#[path]` and
//! replays saved inputs through exactly these checks.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use graft::internals::{prepare, PrepareContext};
use graft::{block_on, with_timeout, Error, Limits, Node, ReloadOptions, Sandbox, SandboxSpec};
use serde_json::{json, Value};

/// A counter server; the fuzzed source replaces it (dry run and for real).
pub const COUNTER: &str = r#"
local counter = {}
function counter.init(args) return { count = 0 } end
function counter.handle_call(req, from, state)
  if req == "inc" then state.count += 1 end
  return state.count, state
end
function counter.code_change(old, state, extra) return state end
return counter
"#;

/// The module every fuzzed source is loaded as (the live process runs it).
pub const MODULE: &str = "counter";
/// The registered name of the live counter process.
pub const PROCESS: &str = "c";
/// Any single operation taking longer than this is a hang.
pub const BOUND: Duration = Duration::from_secs(10);
/// SPEC §7: an error response is at most 64 KiB.
pub const MAX_ERROR_JSON: usize = 64 * 1024;

/// The limits of the fuzzed sandbox: small heap, 50 ms callbacks.
pub fn limits() -> Limits {
    Limits {
        memory_bytes: 8 * 1024 * 1024,
        handler_ms: 50,
        max_processes: 64,
        max_versions: 3,
        ..Limits::default()
    }
}

/// One node, the fuzzed sandbox and a bystander sandbox, created once per
/// process and rebuilt only after a fuzzed source was committed.
pub struct Harness {
    node: Node,
    target: Sandbox,
    bystander: Sandbox,
    /// What the live counter answers to the next `"inc"`.
    next_count: i64,
    known_globals: Vec<String>,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    /// A node with the target sandbox `fuzz` and the bystander `bystander`,
    /// each running a registered counter `c`.
    pub fn new() -> Harness {
        let node = Node::with_threads(2);
        let bystander = counter_sandbox(&node, "bystander");
        let target = counter_sandbox(&node, "fuzz");
        Harness {
            node,
            target,
            bystander,
            next_count: 1,
            known_globals: graft::internals::known_globals(&[], &BTreeMap::new()),
        }
    }

    /// Runs one input through compile, analysis, a dry-run reload and a real
    /// reload, then checks both counters. Panics on any violation.
    pub fn check(&mut self, data: &[u8]) {
        let source = String::from_utf8_lossy(data).into_owned();
        self.compile_and_prepare(&source);
        let mut sources = BTreeMap::new();
        sources.insert(MODULE.to_owned(), source);

        let dry = ReloadOptions {
            dry_run: true,
            ..ReloadOptions::default()
        };
        let dry_result = bounded("dry-run reload", self.target.reload(sources.clone(), dry));
        if let Err(e) = &dry_result {
            assert_error_small("dry-run reload", e);
        }
        // A dry run changes nothing: the counter runs the old code and state.
        self.assert_counter_counts("after a dry-run reload");

        let real = bounded(
            "reload",
            self.target.reload(sources, ReloadOptions::default()),
        );
        match real {
            Err(e) => {
                assert_error_small("reload", &e);
                // A failed reload is a transaction that changed nothing.
                self.assert_counter_counts("after a failed reload");
            }
            Ok(_) => {
                // The guest's code now runs the counter: any answer (or
                // error) is fine, as long as it comes in time.
                if let Err(e) = bounded(
                    "call after a committed reload",
                    self.target.call(PROCESS, json!("inc"), Some(5_000)),
                ) {
                    assert_error_small("call after a committed reload", &e);
                }
                self.rebuild_target();
            }
        }
        self.assert_bystander_counts();
    }

    fn compile_and_prepare(&self, source: &str) {
        let max = limits().max_source_bytes;
        if let Err(e) = graft::internals::compile(MODULE, "counter.luau", source, max) {
            assert_error_small("compile", &e);
        }
        let files = BTreeMap::new();
        let cx = PrepareContext {
            known_globals: &self.known_globals,
            max_source_bytes: max,
            files: &files,
        };
        let mut sources = BTreeMap::new();
        sources.insert(MODULE.to_owned(), source.to_owned());
        if let Err(e) = prepare(&sources, &cx) {
            assert_error_small("prepare", &e);
        }
    }

    fn assert_counter_counts(&mut self, when: &str) {
        let reply = bounded(when, self.target.call(PROCESS, json!("inc"), Some(5_000)))
            .unwrap_or_else(|e| panic!("live counter {when}: {} ({e})", e.kind()));
        assert_eq!(reply, json!(self.next_count), "live counter {when}");
        self.next_count += 1;
    }

    fn assert_bystander_counts(&self) {
        let before = bounded(
            "bystander call",
            self.bystander.call(PROCESS, json!(0), None),
        )
        .unwrap_or_else(|e| panic!("bystander call: {} ({e})", e.kind()));
        let after = bounded(
            "bystander inc",
            self.bystander.call(PROCESS, json!("inc"), None),
        )
        .unwrap_or_else(|e| panic!("bystander inc: {} ({e})", e.kind()));
        assert_eq!(after, json!(before.as_i64().unwrap_or(-1) + 1), "bystander");
        let ids = self.node.sandbox_ids();
        assert!(
            ids.iter().any(|i| i == "fuzz"),
            "fuzz sandbox listed: {ids:?}"
        );
    }

    fn rebuild_target(&mut self) {
        self.node
            .destroy("fuzz")
            .unwrap_or_else(|e| panic!("destroy after a committed reload: {e}"));
        self.target = counter_sandbox(&self.node, "fuzz");
        self.next_count = 1;
    }
}

/// A sandbox `id` (small limits) with a registered counter `c`.
fn counter_sandbox(node: &Node, id: &str) -> Sandbox {
    let spec = SandboxSpec::new(id)
        .entry(None)
        .limits(limits())
        .module(MODULE, COUNTER);
    let sb = graft::block_on(node.create_sandbox(spec))
        .unwrap_or_else(|e| panic!("create sandbox {id}: {e}"));
    bounded(
        "spawn counter",
        sb.spawn(MODULE, json!(null), Some(PROCESS)),
    )
    .unwrap_or_else(|e| panic!("spawn counter in {id}: {e}"));
    sb
}

/// Waits for `fut` at most [`BOUND`]; not answering is a hang.
pub fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    block_on(with_timeout(fut, BOUND))
        .unwrap_or_else(|| panic!("hang: {what} did not answer within {BOUND:?}"))
}

/// The JSON form of an error as a client sees it: kind, message and every
/// diagnostic.
pub fn error_json(e: &Error) -> Value {
    let mut v = json!({ "kind": e.kind(), "message": e.to_string() });
    if let Error::Compile { diagnostics } = e {
        v["diagnostics"] = serde_json::to_value(diagnostics).unwrap_or(Value::Null);
    }
    v
}

/// The error's JSON form is under [`MAX_ERROR_JSON`] bytes.
pub fn assert_error_small(what: &str, e: &Error) {
    let bytes = serde_json::to_vec(&error_json(e)).unwrap_or_default();
    assert!(
        bytes.len() < MAX_ERROR_JSON,
        "{what}: error `{}` is {} bytes of JSON (limit {MAX_ERROR_JSON})",
        e.kind(),
        bytes.len()
    );
}
