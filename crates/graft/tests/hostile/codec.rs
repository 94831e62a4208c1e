//! Hostile inputs: codec (filled in by the hardening work).
