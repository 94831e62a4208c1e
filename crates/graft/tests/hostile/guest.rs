//! Hostile inputs: guest (filled in by the hardening work).
