//! Arbitrary bytes as the body of a POST to one HTTP API endpoint (first byte
//! picks it), answered in-process by `graft_http::router`.
#![no_main]

use std::sync::LazyLock;

use graft_fuzz::api_body::Harness;
use libfuzzer_sys::fuzz_target;

// One node per fuzzing process: creating it per input would measure setup.
static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    graft_fuzz::tolerate_caught_parser_panics();
    Harness::new()
});

fuzz_target!(|data: &[u8]| {
    HARNESS.check(data);
});
