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
//! Kept versions: the store drops exactly the versions the engine's history
//! evicts ([`ModuleHistory::evictions`](super::history::ModuleHistory)),
//! with the same pinned version (a canary's rollback target), so the kept
//! set on disk equals the engine's after every commit.
//!
//! Canary windows: the store's `stable` version of a module is what a
//! restart restores. An upgrade on probation first makes the version it
//! replaces permanent (that version is what the window rolls back to), and
//! a commit that ends an open window early (a reload or rollback of one of
//! its modules, or a new canary window) makes the watched versions that
//! stay running permanent in the same transaction: the window is over, in
//! memory as on disk, so a restart must not roll them back.
//!
//! Without a store the same function only records the event.

use super::prepare::PreparedModule;
use super::{Direction, Engine, ModuleChange, ReloadOptions, ReloadReport};
use crate::error::Result;
use crate::kernel::{kernel, CanaryWatch};
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
        let (log, sandbox, window) = {
            let k = kernel(&vm.lua);
            let window = k
                .canary
                .as_ref()
                .filter(|c| ends_window(c, report, opts))
                .cloned();
            (k.events.clone(), k.id.to_string(), window)
        };
        let mut ops = Vec::new();
        if log.store().is_some() {
            if let Some(window) = &window {
                ops.extend(self.window_end_ops(&sandbox, window, report, direction));
            }
            for change in &report.modules {
                let Some(p) = changed.iter().find(|p| p.name == change.name) else {
                    continue;
                };
                ops.extend(self.version_ops(&sandbox, p, change, opts));
                let pinned = pinned(change, opts);
                let evicted = self
                    .modules
                    .get(&change.name)
                    .map(|h| h.evictions(change.to, self.max_versions, pinned))
                    .unwrap_or_default();
                ops.extend(evicted.into_iter().map(|version| WriteOp::DropVersion {
                    sandbox: sandbox.clone(),
                    module: change.name.clone(),
                    version,
                }));
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
    ) -> Vec<WriteOp> {
        let kept = self
            .modules
            .get(&change.name)
            .is_some_and(|h| h.get(change.to).is_some());
        // An upgrade of a running module under a canary window is on
        // probation; anything else stands at once.
        let on_probation = pinned(change, opts).is_some();
        let mut ops = Vec::new();
        if on_probation {
            // The version the window would roll back to is the one a
            // restart must restore: it stands (the store's `stable` moves
            // to it while it is still current).
            ops.push(WriteOp::SetVersionStatus {
                sandbox: sandbox.to_owned(),
                module: change.name.clone(),
                version: change.from,
                status: VersionStatus::Permanent,
            });
        }
        if kept && on_probation {
            // A kept version made current under a window is on probation
            // like a new one (`stable` stays at `from`, set just above).
            ops.push(WriteOp::SetVersionStatus {
                sandbox: sandbox.to_owned(),
                module: change.name.clone(),
                version: change.to,
                status: VersionStatus::Canary,
            });
        }
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

    /// The rows of an open window that this commit ends early: every
    /// version it watched that stays running becomes permanent (those this
    /// commit rolls back stay `canary`: they never passed).
    fn window_end_ops(
        &self,
        sandbox: &str,
        window: &CanaryWatch,
        report: &ReloadReport,
        direction: Direction,
    ) -> Vec<WriteOp> {
        window
            .modules
            .iter()
            .filter(|(_, to, _, name)| {
                let rolled_back = matches!(direction, Direction::Down)
                    && report.modules.iter().any(|m| m.name == *name);
                let running = self.modules.get(name).is_some_and(|h| h.current == *to);
                running && !rolled_back
            })
            .map(|(_, to, _, name)| WriteOp::SetVersionStatus {
                sandbox: sandbox.to_owned(),
                module: name.clone(),
                version: *to,
                status: VersionStatus::Permanent,
            })
            .collect()
    }
}

/// The version an upgrade keeps through eviction: the version it replaces
/// when it is on probation (a canary window rolls back to it), else none.
/// Whatever the direction: the window the runtime arms rolls back to `from`.
pub(super) fn pinned(change: &ModuleChange, opts: &ReloadOptions) -> Option<u32> {
    (opts.canary_ms > 0 && change.from > 0).then_some(change.from)
}

/// Whether a committed reload ends the open canary window `watch`: it
/// reloads or rolls back one of the watched modules, or opens a window of
/// its own (one window per sandbox). The runtime ends the window in memory
/// by the same rule once the commit is done.
pub(crate) fn ends_window(
    watch: &CanaryWatch,
    report: &ReloadReport,
    opts: &ReloadOptions,
) -> bool {
    let touched = watch
        .modules
        .iter()
        .any(|(_, _, _, name)| report.modules.iter().any(|m| m.name == *name));
    touched || opens_window(report, opts)
}

/// Whether a committed reload opens a canary window (it upgrades a running
/// module with `canary_ms`).
pub(crate) fn opens_window(report: &ReloadReport, opts: &ReloadOptions) -> bool {
    opts.canary_ms > 0 && report.modules.iter().any(|m| m.from > 0)
}
