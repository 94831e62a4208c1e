//! The reload queue: reloads wait their turn, a busy one (processes inside
//! callbacks) keeps its place until quiescence or its deadline; imports of
//! kept histories; and retiring a runtime that is being rebuilt.
//!
//! # Invariants
//! * Reloads apply in the order they were sent: a busy one keeps its place
//!   and later ones wait behind it.
//! * A reload waits at most [`QUIESCE_TIMEOUT_MS`] (in timer time, so a
//!   test clock's deadline fires when advanced) and its frozen modules are
//!   unfrozen whatever the outcome.
//! * A committed reload was recorded by its commit point; only reloads that
//!   did not commit are recorded here, with the storage's reason stripped of
//!   the host's paths.
//! * A retiring runtime refuses reloads and imports (`busy`): they would
//!   commit to a VM about to be dropped.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value as Json;

use super::Runtime;
use crate::clock;
use crate::error::{Error, ReloadStep, Result};
use crate::kernel::{self, Timer};
use crate::upgrade::{
    Applied, Direction, Engine, ModuleVersion, PreparedModule, ReloadOptions, ReloadReport,
    ReloadStatus,
};

/// How long a reload waits for busy processes to finish their callbacks.
pub const QUIESCE_TIMEOUT_MS: u64 = 5000;

pub(super) struct PendingReload {
    prepared: Vec<PreparedModule>,
    opts: ReloadOptions,
    direction: Direction,
    targets: Option<HashMap<String, u32>>,
    frozen: Vec<u32>,
    deadline: u64,
    reply: tokio::sync::oneshot::Sender<Result<ReloadReport>>,
}

impl Runtime {
    /// Takes this runtime out of service for a rebuild: from now on reloads
    /// and imports are refused (`busy`). Refused itself (false) while a
    /// reload waits in the queue, since it may still commit.
    pub(in crate::node) fn begin_retire(&mut self) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        self.retiring = true;
        true
    }

    /// Puts a runtime whose rebuild did not happen back in service.
    pub(in crate::node) fn end_retire(&mut self) {
        self.retiring = false;
    }

    fn retiring_error(&self) -> Error {
        Error::Busy(format!(
            "sandbox `{}` is being rebuilt with new settings (graft.toml changed); send the reload again",
            self.spec.id
        ))
    }

    /// Replaces modules' kept histories (the second step of an import): in
    /// memory, then on disk in one transaction with an `import` event. A
    /// failed write restores the histories as they were.
    pub(in crate::node) fn replace_histories(
        &mut self,
        histories: BTreeMap<String, Vec<ModuleVersion>>,
    ) -> Result<()> {
        if self.retiring {
            return Err(self.retiring_error());
        }
        let max = self.engine.max_versions;
        let before = self.engine.modules.clone();
        let names: Vec<String> = histories.keys().cloned().collect();
        for (name, versions) in histories {
            self.engine
                .modules
                .entry(name)
                .or_default()
                .replace(versions, max);
        }
        let (log, sandbox) = {
            let k = self.kernel.borrow();
            (k.events.clone(), k.id.to_string())
        };
        let mut ops = Vec::new();
        let mut kept = serde_json::Map::new();
        for name in &names {
            let Some(h) = self.engine.modules.get(name) else {
                continue;
            };
            kept.insert(name.clone(), serde_json::json!(h.kept()));
            ops.push(crate::store::WriteOp::ReplaceHistory {
                sandbox: sandbox.clone(),
                module: name.clone(),
                versions: h
                    .versions
                    .iter()
                    .map(|v| v.record(&sandbox, name, crate::store::VersionStatus::Permanent))
                    .collect(),
                current: h.current,
            });
        }
        if let Err(e) = log.commit(&sandbox, ops, "import", Json::Object(kept)) {
            self.engine.modules = before;
            return Err(e.into());
        }
        Ok(())
    }

    /// Takes over what a restarted runtime of the same sandbox must not
    /// lose: the reloads still waiting to apply (its events are in the
    /// node's log already).
    pub fn adopt(&mut self, old: &mut Runtime) {
        self.pending.extend(old.pending.drain(..).map(|mut r| {
            // Its frozen modules belonged to the old kernel.
            r.frozen.clear();
            r
        }));
    }

    /// Starts a reload; the reply comes when it committed, aborted or timed out.
    pub fn reload(
        &mut self,
        prepared: Vec<PreparedModule>,
        opts: ReloadOptions,
        direction: Direction,
        targets: Option<HashMap<String, u32>>,
        reply: tokio::sync::oneshot::Sender<Result<ReloadReport>>,
    ) {
        if self.retiring {
            let _ = reply.send(Err(self.retiring_error()));
            return;
        }
        self.pending.push_back(PendingReload {
            prepared,
            opts,
            direction,
            targets,
            frozen: Vec::new(),
            deadline: clock::precise_ms() + QUIESCE_TIMEOUT_MS,
            reply,
        });
        self.run_pending_reloads();
    }

    /// Tries queued reloads in order; a busy one keeps its place (later ones wait).
    pub fn run_pending_reloads(&mut self) {
        while let Some(mut r) = self.pending.pop_front() {
            kernel::kernel_memory(self.lua(), &self.spec.limits);
            let result = self.engine.apply(
                &self.vm,
                r.prepared.clone(),
                &r.opts,
                r.direction,
                r.targets.as_ref(),
            );
            match result {
                Ok(Applied::Busy(modules)) if clock::precise_ms() < r.deadline => {
                    let mut k = self.kernel.borrow();
                    for m in &modules {
                        k.frozen.insert(*m);
                    }
                    if r.frozen.is_empty() {
                        // Wake at the deadline even if nothing else happens
                        // (in timer time: a test clock moves only when
                        // advanced, and commands still reach this check).
                        let at = k
                            .timer_now()
                            .saturating_add(r.deadline.saturating_sub(clock::precise_ms()));
                        k.add_timer(at, Timer::Wake);
                    }
                    r.frozen = modules;
                    drop(k);
                    self.pending.push_front(r);
                    return;
                }
                Ok(Applied::Busy(_)) => {
                    self.unfreeze(&r.frozen);
                    let e = Error::ReloadAborted {
                        step: ReloadStep::Quiesce,
                        module: None,
                        process: None,
                        line: None,
                        column: None,
                        message: format!(
                            "processes of the changed modules were still inside callbacks after {QUIESCE_TIMEOUT_MS} ms"
                        ),
                    };
                    self.record_abort(&e, &r.prepared);
                    let _ = r.reply.send(Err(e));
                }
                Ok(Applied::Done(report)) => {
                    self.unfreeze(&r.frozen);
                    self.record(&report);
                    if report.status == ReloadStatus::DryRun {
                        // The dry run's module tables and state copies are garbage now.
                        let _ = self.lua().gc_collect();
                    }
                    if report.status == ReloadStatus::Reloaded {
                        self.end_canary_touched_by(&report, &r.opts, r.direction);
                    }
                    if report.status == ReloadStatus::Reloaded && r.opts.canary_ms > 0 {
                        self.arm_canary(&report, &r.opts);
                    }
                    let _ = r.reply.send(Ok(report));
                }
                Err(e) => {
                    self.unfreeze(&r.frozen);
                    self.record_abort(&e, &r.prepared);
                    // What the aborted candidate allocated is garbage now.
                    let _ = self.lua().gc_collect();
                    let _ = r.reply.send(Err(e));
                }
            }
        }
    }

    fn unfreeze(&mut self, modules: &[u32]) {
        if modules.is_empty() {
            return;
        }
        let mut k = self.kernel.borrow();
        for m in modules {
            k.frozen.remove(m);
        }
        let wake: Vec<u64> = k
            .procs
            .values()
            .filter(|p| {
                modules.contains(&p.pid.module_index())
                    && (!p.mailbox.is_empty() || p.system.is_some())
            })
            .map(|p| p.pid.serial())
            .collect();
        for s in wake {
            k.wake(s);
        }
    }

    /// Records a reload that did not commit (a committed one was recorded
    /// by its commit point, in the same transaction).
    fn record(&mut self, report: &ReloadReport) {
        let kind = match report.status {
            ReloadStatus::Unchanged => "unchanged",
            ReloadStatus::DryRun => "dry_run",
            ReloadStatus::Reloaded => return,
        };
        self.kernel
            .borrow()
            .event(kind, serde_json::to_value(report).unwrap_or(Json::Null));
    }

    fn record_abort(&mut self, e: &Error, prepared: &[PreparedModule]) {
        let modules: Vec<&str> = prepared.iter().map(|p| p.name.as_str()).collect();
        let detail = match e {
            Error::Compile { diagnostics } => {
                serde_json::json!({ "modules": modules, "error": e.to_string(), "diagnostics": diagnostics })
            }
            Error::ReloadAborted {
                step,
                module,
                process,
                message,
                line,
                column,
            } => serde_json::json!({
                "modules": modules, "step": step, "module": module, "process": process, "error": message,
                "line": line, "column": column
            }),
            // Events are read by viewers: the storage's reason without the
            // host's paths (the node's log has them).
            Error::Storage(s) => serde_json::json!({
                "modules": modules,
                "error": format!("{}: nothing was applied", s.client_message()),
            }),
            other => serde_json::json!({ "modules": modules, "error": other.to_string() }),
        };
        self.kernel.borrow().event("abort", detail);
    }
}

/// Rebuilds prepared modules from kept versions (our own bytecode; no recompile).
pub(crate) fn prepared_from_versions(
    versions: &BTreeMap<String, ModuleVersion>,
    engine: &Engine,
) -> Vec<PreparedModule> {
    versions
        .iter()
        .map(|(name, v)| PreparedModule {
            name: name.clone(),
            file: engine
                .modules
                .get(name)
                .map(|h| h.file.clone())
                .unwrap_or_default(),
            source: v.source.clone(),
            checksum: v.checksum.clone(),
            bytecode: v.bytecode.clone(),
            dependencies: v.dependencies.clone(),
            compile_us: 0,
        })
        .collect()
}
