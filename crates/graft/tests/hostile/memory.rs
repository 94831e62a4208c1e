//! Hostile inputs: memory (filled in by the hardening work).
