//! The durable half of a reload's commit point (SPEC §8).
//!
//! Just before [`Engine::commit`](super::Engine) swaps anything in the VM,
//! the new versions, the current pointers, the versions the history evicts
//! and the `reload`/`rollback` event are written in one store transaction.
//! If that write fails the reload aborts exactly like any other step (nothing
//! in the VM changed yet); once it succeeded, the in-memory commit cannot
//! fail half-way. So an acknowledged reload is on disk, and a reload on disk
//! was applied (or the node died in between, and a restart applies it).
//!
//! Without a store the same function only records the event.

use std::collections::HashSet;

use super::prepare::PreparedModule;
use super::{Direction, Engine, ModuleChange, ReloadOptions, ReloadReport};
use crate::error::Result;
use crate::kernel::kernel;
use crate::store::{VersionRecord, VersionStatus, WriteOp};
use crate::vm::Vm;

impl Engine {
    /// Writes the reload about to commit (see the module docs).
    pub(super) fn persist(
        &self,
        vm: &Vm,
        changed: &[PreparedModule],
        report: &ReloadReport,
        opts: &ReloadOptions,
        direction: Direction,
    ) -> Result<()> {
        let (log, sandbox) = {
            let k = kernel(&vm.lua);
            (k.events.clone(), k.id.to_string())
        };
        let mut ops = Vec::new();
        if let Some(store) = log.store() {
            for change in &report.modules {
                let Some(p) = changed.iter().find(|p| p.name == change.name) else {
                    continue;
                };
                ops.extend(self.version_ops(&sandbox, p, change, opts, direction));
                let evicted = self.evicted_by(&change.name, change.to);
                if !evicted.is_empty() {
                    // The store keeps a module's stable version (a restart
                    // needs it) even when memory lets it go.
                    let stable = store.module(&sandbox, &change.name)?.and_then(|m| m.stable);
                    ops.extend(
                        evicted
                            .into_iter()
                            .filter(|v| Some(*v) != stable)
                            .map(|version| WriteOp::DropVersion {
                                sandbox: sandbox.clone(),
                                module: change.name.clone(),
                                version,
                            }),
                    );
                }
            }
        }
        let kind = match direction {
            Direction::Up => "reload",
            Direction::Down => "rollback",
        };
        let detail = serde_json::to_value(report).unwrap_or_default();
        log.commit_with(&sandbox, ops, kind, detail, opts.attached.as_ref())?;
        Ok(())
    }

    /// A new version's row (unless it is kept already: a rollback or a
    /// roll-forward) and the current pointer.
    fn version_ops(
        &self,
        sandbox: &str,
        p: &PreparedModule,
        change: &ModuleChange,
        opts: &ReloadOptions,
        direction: Direction,
    ) -> Vec<WriteOp> {
        let kept = self
            .modules
            .get(&change.name)
            .is_some_and(|h| h.get(change.to).is_some());
        // An upgrade of a running module under a canary window is on
        // probation; anything else stands at once.
        let on_probation =
            opts.canary_ms > 0 && change.from > 0 && matches!(direction, Direction::Up);
        let mut ops = Vec::new();
        if !kept {
            let status = if on_probation {
                VersionStatus::Canary
            } else {
                VersionStatus::Permanent
            };
            ops.push(WriteOp::PutVersion(VersionRecord {
                sandbox: sandbox.to_owned(),
                module: change.name.clone(),
                version: change.to,
                checksum: p.checksum.clone(),
                source: p.source.clone(),
                dependencies: p.dependencies.clone(),
                status,
                created_ms: crate::clock::unix_ms(),
            }));
        }
        ops.push(WriteOp::SetCurrent {
            sandbox: sandbox.to_owned(),
            module: change.name.clone(),
            version: change.to,
            file: Some(p.file.clone()),
        });
        if kept && !on_probation {
            // A kept version may still be stored as `canary` (its window was
            // ended by a rollback, or rolled back by a restart). Made current
            // by a plain reload or rollback it stands like any other: without
            // this, `stable` stays behind and the next restart would roll the
            // acknowledged change back as an open canary. Idempotent for a
            // version that is permanent already.
            ops.push(WriteOp::SetVersionStatus {
                sandbox: sandbox.to_owned(),
                module: change.name.clone(),
                version: change.to,
                status: VersionStatus::Permanent,
            });
        }
        ops
    }

    /// The versions of `module` that making `to` current evicts from memory
    /// (the history's own rule: oldest non-current first, past `max_versions`).
    fn evicted_by(&self, module: &str, to: u32) -> Vec<u32> {
        let Some(h) = self.modules.get(module) else {
            return Vec::new();
        };
        if h.get(to).is_some() {
            return Vec::new(); // a kept version: nothing is added
        }
        let mut kept: Vec<u32> = h.versions.iter().map(|v| v.version).collect();
        kept.push(to);
        let mut gone = Vec::new();
        let keep: HashSet<u32> = [to].into();
        while kept.len() > self.max_versions {
            match kept.iter().position(|v| !keep.contains(v)) {
                Some(i) => gone.push(kept.remove(i)),
                None => break,
            }
        }
        gone
    }
}
