//! Hostile inputs: scheduler (filled in by the hardening work).
