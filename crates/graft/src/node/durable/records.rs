//! The rows a sandbox is written as: its record (settings) and, at
//! creation, its first versions with their current pointers.
//!
//! # Invariants
//! * One place builds a sandbox's record, so a creation, a settings change
//!   and a settings change written back after a failure store the same
//!   fields the restore reads (`restore.rs`).

use std::collections::BTreeMap;

use serde_json::json;

use crate::config::SandboxSpec;
use crate::store::{SandboxRecord, VersionStatus, WriteOp};
use crate::upgrade::ModuleHistory;

/// The rows of a new sandbox: its record, its first versions (permanent)
/// and their current pointers.
pub(in crate::node) fn creation_ops(
    spec: &SandboxSpec,
    modules: &BTreeMap<String, ModuleHistory>,
) -> Vec<WriteOp> {
    let mut ops = vec![WriteOp::PutSandbox(sandbox_record(spec))];
    for (name, h) in modules {
        for v in &h.versions {
            ops.push(WriteOp::PutVersion(v.record(
                &spec.id,
                name,
                VersionStatus::Permanent,
            )));
        }
        ops.push(WriteOp::SetCurrent {
            sandbox: spec.id.clone(),
            module: name.clone(),
            version: h.current,
            file: Some(h.file.clone()),
        });
    }
    ops
}

/// A sandbox's stored record (entry, limits, capabilities, entry args, files).
pub(super) fn sandbox_record(spec: &SandboxSpec) -> SandboxRecord {
    let files: serde_json::Map<String, serde_json::Value> = spec
        .files
        .iter()
        .map(|(m, p)| (m.clone(), json!(p.to_string_lossy())))
        .collect();
    SandboxRecord {
        id: spec.id.clone(),
        entry: spec.entry.clone(),
        limits_json: serde_json::to_string(&spec.limits).unwrap_or_else(|_| "{}".into()),
        capabilities: spec.grants.clone(),
        source_root: None,
        spec_json: json!({ "entry_args": spec.entry_args, "files": files }).to_string(),
        created_ms: crate::clock::unix_ms(),
    }
}
