//! The checks behind Graft's fuzz targets (see `fuzz/README.md`). Each module
//! holds one target's harness, so the regression tests in the workspace can
//! replay saved inputs through the very same checks.

pub mod api_body;
pub mod reload_source;

/// libfuzzer-sys's panic hook aborts on every panic, even one that the code
/// under test catches. full_moon 3.0.0 panics on some malformed sources and
/// Graft parses behind `catch_unwind` (those sources become syntax errors,
/// replayed by the `fuzz_regressions` tests), so such a panic is not a
/// finding: this hook lets it unwind to Graft's barrier. Any other panic
/// still goes to libFuzzer's hook and aborts. Call it before the first input.
pub fn tolerate_caught_parser_panics() {
    let abort_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_full_moon = info
            .location()
            .is_some_and(|l| l.file().contains("/full_moon-"));
        if !in_full_moon {
            abort_hook(info);
        }
    }));
}
