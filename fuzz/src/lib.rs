//! The checks behind Graft's fuzz targets (see `fuzz/README.md`). Each module
//! holds one target's harness, so the regression tests in the workspace can
//! replay saved inputs through the very same checks.

pub mod api_body;
pub mod reload_source;
