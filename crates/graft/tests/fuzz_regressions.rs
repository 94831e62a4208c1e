//! Inputs the `reload_source` fuzz target found or was seeded with, replayed
//! through the target's own checks (`fuzz/src/reload_source.rs`) without a
//! fuzzer: every source goes through compile, analysis, a dry-run reload and a
//! real reload, and the sandbox's live counter and a bystander keep counting.

#[allow(dead_code)]
#[path = "../../../fuzz/src/reload_source.rs"]
mod reload_source;

use std::path::{Path, PathBuf};

use reload_source::Harness;

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
fn seed_modules_pass_every_reload_check() {
    let seeds = inputs("seeds/reload_source");
    assert!(seeds.len() >= 5, "seed corpus: {seeds:?}");
    let mut harness = Harness::new();
    for seed in seeds {
        let data = std::fs::read(&seed).expect("seed");
        harness.check(&data);
    }
}

// `@` followed by anything but a name (here `@\x06`): Luau rejects it, then
// `graft::vm::compile` asks full_moon 3.0.0 for the error's column and
// full_moon panics (`parse_attributes`, parsers.rs:3785, `unwrap()` on
// `Err(())`). Nothing catches the panic, so it unwinds through every caller
// of `compile` and `upgrade::prepare` (reload, create, eval).
#[test]

fn attribute_without_name_is_a_compile_error() {
    replay("regressions/reload_source/attribute_without_name");
}

// `local x: a\xe4\xaab` (lossy UTF-8: `local x: a\u{FFFD}b`): Luau rejects
// it, then full_moon 3.0.0 hits `unreachable!()` in `parse_type_suffix`
// (parsers.rs:3193) while `graft::vm::compile` looks for the error's column.
#[test]

fn type_with_unknown_character_is_a_compile_error() {
    replay("regressions/reload_source/type_with_unknown_character");
}

// `return 1\0local x: a\xe4\xaab`: Luau stops reading at the NUL byte and
// compiles `return 1`, so the source passes `vm::compile`; then
// `upgrade::analysis::analyze` parses the whole text with full_moon, which
// hits the same `unreachable!()` (parsers.rs:3193). A second call site: a
// source Luau accepts still panics in `upgrade::prepare`.
#[test]

fn nul_then_type_with_unknown_character_is_a_compile_error() {
    replay("regressions/reload_source/nul_then_type_with_unknown_character");
}
