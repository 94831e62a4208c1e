//! Hostile inputs: node_limits (filled in by the hardening work).
