//! Arbitrary bytes as a module source, through compile, analysis, a dry-run
//! reload and a real reload into a sandbox with a live counter.
#![no_main]

use std::sync::{LazyLock, Mutex};

use graft_fuzz::reload_source::Harness;
use libfuzzer_sys::fuzz_target;

// One node per fuzzing process: creating VMs per input would measure setup.
static HARNESS: LazyLock<Mutex<Harness>> = LazyLock::new(|| {
    graft_fuzz::tolerate_caught_parser_panics();
    Mutex::new(Harness::new())
});

fuzz_target!(|data: &[u8]| {
    let mut harness = HARNESS.lock().unwrap_or_else(|p| p.into_inner());
    harness.check(data);
});
