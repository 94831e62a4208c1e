//! Inputs the `api_body` fuzz target found or was seeded with, replayed
//! through the target's own checks (`fuzz/src/api_body.rs`) without a fuzzer:
//! each is the body of a POST to one endpoint (its first byte picks which);
//! the answer must be a documented status with a JSON error, and the node
//! must still list its sandboxes.

#[allow(dead_code)]
#[path = "../../../fuzz/src/api_body.rs"]
mod api_body;

use std::path::{Path, PathBuf};

use api_body::Harness;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Every file of `fuzz/<dir>`, sorted, so a failure names the same input each run.
fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Replays one saved input (relative to `fuzz/`) through a fresh harness.
fn replay(file: &str) {
    let data = std::fs::read(fuzz_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    Harness::new().check(&data);
}

#[test]
fn seed_bodies_get_documented_answers() {
    let seeds = inputs("seeds/api_body");
    assert!(seeds.len() >= 9, "seed corpus: {seeds:?}");
    let harness = Harness::new();
    for seed in seeds {
        let data = std::fs::read(&seed).expect("seed");
        harness.check(&data);
    }
}

// The `reload_source` finding `attribute_without_name` through the API: a
// reload whose source is `@\x06`. `prepare` runs in the request's task, and
// full_moon's panic (`parse_attributes`, parsers.rs:3785) unwinds out of the
// handler: the client gets no answer at all instead of a 422 compile_error.
#[test]

fn reload_of_attribute_without_name_is_422() {
    replay("regressions/api_body/reload_attribute_without_name");
}

// Found by `api_body` in a 32-minute run (2026-12-03): an `eval` source that
// makes full_moon 3.0.0 panic in another parser path (parsers.rs:3193)
// while Graft looks for a syntax error's column. The parse runs behind
// `catch_unwind`, so the harness's checks (a documented JSON answer, the
// node still serving) must hold.
#[test]
fn eval_that_panics_full_moon_elsewhere_gets_a_documented_answer() {
    replay("regressions/api_body/eval_full_moon_panic_parsers_3193");
}
