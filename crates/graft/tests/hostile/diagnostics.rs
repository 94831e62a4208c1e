//! Hostile inputs: diagnostics (filled in by the hardening work).
