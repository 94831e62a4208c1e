//! The reload transaction (SPEC §3 steps 3–5), run on the sandbox's
//! scheduler thread between callbacks, in named steps:
//!
//! 1. [`Engine::changed`]: drop sources whose checksum is current.
//! 2. [`Engine::plan`]: the require graph of the would-be module set
//!    (missing modules, cycles), the affected set and its order.
//! 3. [`quiesce`]: processes of affected modules must be between callbacks.
//! 4. [`Engine::evaluate_all`], [`check_supervisor_specs`]: new module tables
//!    beside the old ones.
//! 5. [`Engine::migrate_all`]: state migrations on copies (see `migrate`).
//! 6. [`reserve_module_slots`], then [`Engine::commit`]: the commit point.
//!
//! Invariants (see also the [module docs](super)): nothing observable
//! changes before [`Engine::commit`]; every earlier step only builds side
//! data, so an abort is dropping it (exact and O(1)); the commit only
//! stores into slots that exist and cannot fail half-way.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use mlua::{Table, Value};

use super::graph::{affected_by, find_cycle, require_position, topo_order};
use super::guest::{aborted, chunk_of, failure_in, first_line};
use super::history::ModuleVersion;
use super::migrate::Migration;
use super::prepare::PreparedModule;
use super::{
    module_kind, Applied, Direction, Engine, ModuleChange, ReloadOptions, ReloadReport,
    ReloadStatus, Request, Timings,
};
use crate::diagnostic::Diagnostic;
use crate::error::{Error, ReloadStep, Result};
use crate::kernel::{kernel, remember_chunk, Run};
use crate::vm::Vm;

/// What a reload touches, decided before any guest code runs.
pub(super) struct Plan {
    /// Modules whose source changed.
    pub changed_names: BTreeSet<String>,
    /// Changed modules and, transitively, every module requiring one.
    pub affected: BTreeSet<String>,
    /// `affected` in dependency order (dependencies first).
    pub order: Vec<String>,
}

impl Engine {
    /// Runs the VM half of a reload. `prepared` must come from
    /// [`prepare`](super::prepare).
    pub fn apply(
        &mut self,
        vm: &Vm,
        prepared: Vec<PreparedModule>,
        opts: &ReloadOptions,
        direction: Direction,
        target_versions: Option<&HashMap<String, u32>>,
    ) -> Result<Applied> {
        let started = Instant::now();
        let mut timings = Timings {
            compile_us: prepared.iter().map(|p| p.compile_us).sum(),
            ..Timings::default()
        };
        let changed = self.changed(prepared);
        if changed.is_empty() {
            return Ok(Applied::Done(ReloadReport {
                status: ReloadStatus::Unchanged,
                modules: Vec::new(),
                processes_migrated: 0,
                timings,
            }));
        }
        let plan = self.plan(&changed)?;
        if let Some(busy) = quiesce(vm, &plan.affected) {
            return Ok(Applied::Busy(busy));
        }
        let rq = Request {
            vm,
            opts,
            direction,
            target_versions,
            by_name: changed.iter().map(|p| (p.name.as_str(), p)).collect(),
        };

        let eval_started = Instant::now();
        let new_tables = self.evaluate_all(&rq, &plan.order)?;
        timings.evaluate_us = eval_started.elapsed().as_micros() as u64;
        check_supervisor_specs(&rq, &new_tables, &plan.changed_names)?;

        let migrate_started = Instant::now();
        let migration = self.migrate_all(&rq, &new_tables, &plan.changed_names)?;
        timings.migrate_us = migrate_started.elapsed().as_micros() as u64;

        let modules = self.version_changes(&changed, target_versions);
        let mut report = ReloadReport {
            status: ReloadStatus::DryRun,
            modules,
            processes_migrated: migration.processes,
            timings,
        };
        if !opts.dry_run {
            reserve_module_slots(vm, &new_tables)?;
            report.status = ReloadStatus::Reloaded;
            if self.persist {
                report.timings.swap_us = started.elapsed().as_micros() as u64;
                self.persist(vm, &changed, &report, opts, direction)?;
            }
            let modules = std::mem::take(&mut report.modules);
            // Kept through eviction: a canary's rollback target.
            let pinned: BTreeMap<String, u32> = modules
                .iter()
                .filter_map(|c| super::persist::pinned(c, opts).map(|v| (c.name.clone(), v)))
                .collect();
            self.commit(
                vm,
                changed,
                &new_tables,
                &migration,
                &modules,
                &plan,
                &pinned,
            )?;
            report.modules = modules;
        }
        report.timings.swap_us = started.elapsed().as_micros() as u64;
        Ok(Applied::Done(report))
    }

    /// Step 1: the prepared modules whose source differs from the current one.
    fn changed(&self, prepared: Vec<PreparedModule>) -> Vec<PreparedModule> {
        prepared
            .into_iter()
            .filter(|p| {
                self.modules
                    .get(&p.name)
                    .and_then(|h| h.current())
                    .is_none_or(|c| c.checksum != p.checksum)
            })
            .collect()
    }

    /// Step 2: the require graph with `changed` in place of their current
    /// versions; a missing module or a cycle is a compile error.
    fn plan(&self, changed: &[PreparedModule]) -> Result<Plan> {
        let mut deps: BTreeMap<String, Vec<String>> = self
            .modules
            .iter()
            .filter_map(|(n, h)| h.current().map(|c| (n.clone(), c.dependencies.clone())))
            .collect();
        for p in changed {
            deps.insert(p.name.clone(), p.dependencies.clone());
        }
        for p in changed {
            if let Some(d) = p.dependencies.iter().find(|d| !deps.contains_key(*d)) {
                let (line, column) = require_position(&p.source, d);
                return Err(Error::Compile {
                    diagnostics: vec![Diagnostic::new(
                        "missing_module",
                        &p.name,
                        &p.file,
                        &p.source,
                        line,
                        column,
                        format!(
                            "`require(\"{d}\")`: no module `{d}` in this sandbox or in this reload"
                        ),
                    )],
                });
            }
        }
        if let Some(cycle) = find_cycle(&deps) {
            let first = changed
                .iter()
                .find(|p| cycle.contains(&p.name))
                .unwrap_or(&changed[0]);
            return Err(Error::Compile {
                diagnostics: vec![Diagnostic::new(
                    "cycle",
                    &first.name,
                    &first.file,
                    &first.source,
                    0,
                    0,
                    format!("require cycle: {}", cycle.join(" -> ")),
                )],
            });
        }
        let changed_names: BTreeSet<String> = changed.iter().map(|p| p.name.clone()).collect();
        let affected = affected_by(&deps, &changed_names);
        let order = topo_order(&deps, &affected);
        Ok(Plan {
            changed_names,
            affected,
            order,
        })
    }

    /// Step 4: new tables in dependency order, with `require` seeing the new
    /// tables of this reload and the current ones of the rest. The live
    /// `require` view is restored whatever happens.
    fn evaluate_all(&self, rq: &Request<'_>, order: &[String]) -> Result<Vec<(String, Table)>> {
        let vm = rq.vm;
        let overlay = vm.lua.create_table()?;
        for pair in self.view.pairs::<Value, Value>() {
            let (k, v) = pair?;
            overlay.raw_set(k, v)?;
        }
        let mut new_tables: Vec<(String, Table)> = Vec::new();
        vm.set_view.call::<()>(overlay.clone())?;
        let eval_result = (|| -> Result<()> {
            for name in order {
                let (bytecode, file, checksum) = match rq.by_name.get(name.as_str()) {
                    Some(p) => (p.bytecode.clone(), p.file.clone(), &p.checksum),
                    None => {
                        let h = &self.modules[name];
                        let current = h.current().expect("current");
                        (current.bytecode.clone(), h.file.clone(), &current.checksum)
                    }
                };
                let table = evaluate(vm, name, &file, &bytecode, checksum)?;
                check_behaviour(vm, name, &table)?;
                overlay.raw_set(name.as_str(), table.clone())?;
                new_tables.push((name.clone(), table));
            }
            Ok(())
        })();
        vm.set_view.call::<()>(self.view.clone())?;
        eval_result?;
        Ok(new_tables)
    }

    /// The version number module `p` gets in this reload: the one asked
    /// for, else a kept version with the same source (a roll-forward
    /// re-uses its number), else a new one.
    pub(super) fn target_version(
        &self,
        p: &PreparedModule,
        target_versions: Option<&HashMap<String, u32>>,
    ) -> u32 {
        if let Some(v) = target_versions.and_then(|t| t.get(&p.name)) {
            return *v;
        }
        let Some(h) = self.modules.get(&p.name) else {
            return 1;
        };
        h.versions
            .iter()
            .find(|v| v.checksum == p.checksum)
            .map_or(h.next + 1, |v| v.version)
    }

    /// The version change of each changed module.
    fn version_changes(
        &self,
        changed: &[PreparedModule],
        target_versions: Option<&HashMap<String, u32>>,
    ) -> Vec<ModuleChange> {
        changed
            .iter()
            .map(|p| ModuleChange {
                name: p.name.clone(),
                from: self.modules.get(&p.name).map(|h| h.current).unwrap_or(0),
                to: self.target_version(p, target_versions),
            })
            .collect()
    }

    /// Step 6, the commit point: migrated states, module tables, version
    /// numbers and histories. Nothing here can fail half-way (see the
    /// module docs); supervisors of changed modules re-read their spec after.
    // Each argument is one product of an earlier step; bundling them would
    // only move the list elsewhere.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        vm: &Vm,
        changed: Vec<PreparedModule>,
        new_tables: &[(String, Table)],
        migration: &Migration,
        modules_report: &[ModuleChange],
        plan: &Plan,
        pinned: &BTreeMap<String, u32>,
    ) -> Result<()> {
        migration.commit(vm)?;
        let mut supervisors_changed = Vec::new();
        {
            let mut k = kernel(&vm.lua);
            for (name, table) in new_tables {
                let mid = k.module_id(name).expect("interned");
                k.set_module_table(mid, table.clone());
                let _ = vm.modules.raw_set(mid as usize + 1, table.clone());
                let _ = self.view.raw_set(name.as_str(), table.clone());
                if module_kind(table) == "supervisor" && plan.changed_names.contains(name) {
                    supervisors_changed.push(mid);
                }
            }
            for change in modules_report {
                let mid = k.module_id(&change.name).expect("interned");
                k.module_versions[mid as usize] = change.to;
                for p in k.procs.values_mut().filter(|p| p.pid.module_index() == mid) {
                    p.version = change.to;
                }
            }
        }
        for p in changed {
            let to = modules_report
                .iter()
                .find(|c| c.name == p.name)
                .map(|c| c.to)
                .unwrap_or(1);
            let history_name = p.name.clone();
            let history = self.modules.entry(p.name.clone()).or_default();
            history.file = p.file.clone();
            history.commit(
                ModuleVersion {
                    version: to,
                    checksum: p.checksum,
                    source: p.source,
                    bytecode: p.bytecode,
                    loaded_at_ms: crate::clock::unix_ms(),
                    dependencies: p.dependencies,
                },
                self.max_versions,
                pinned.get(&history_name).copied(),
            );
        }
        if !supervisors_changed.is_empty() {
            notify_supervisors(vm, &supervisors_changed);
        }
        Ok(())
    }
}

/// Step 3: `Some(ids)` of the affected modules when a process of one of
/// them is mid-callback (the reload waits); else interns every affected
/// module and returns `None`.
fn quiesce(vm: &Vm, affected: &BTreeSet<String>) -> Option<Vec<u32>> {
    let mut k = kernel(&vm.lua);
    let ids: Vec<u32> = affected.iter().filter_map(|n| k.module_id(n)).collect();
    let busy = ids.iter().any(|m| {
        k.procs
            .values()
            .any(|p| p.pid.module_index() == *m && (!matches!(p.run, Run::Idle) || p.job.is_some()))
    });
    if busy {
        return Some(ids);
    }
    for n in affected {
        k.intern_module(n);
    }
    None
}

/// Runs a module chunk under the sandbox's CPU budget; it must return a table.
fn evaluate(vm: &Vm, name: &str, file: &str, bytecode: &[u8], checksum: &str) -> Result<Table> {
    let abort = |message: String, line: Option<u32>| {
        aborted(ReloadStep::Evaluate, Some(name), line, message)
    };
    // The chunk is named after its file so errors read `src/counter.luau:8: …`.
    let chunk = if file.is_empty() { name } else { file };
    remember_chunk(&vm.lua, chunk, name);
    let f = vm
        .load_guest(chunk, bytecode)
        .map_err(|e| abort(e.to_string(), None))?;
    if crate::vm::coverage_enabled() {
        let mut k = kernel(&vm.lua);
        if k.coverage_chunks.len() < crate::kernel::MAX_COVERAGE_CHUNKS {
            k.coverage_chunks
                .push((name.into(), checksum.to_owned(), f.clone()));
        }
    }
    let (watch, limits) = {
        let k = kernel(&vm.lua);
        (k.watch.clone(), k.limits.clone())
    };
    // Under the guests' own memory limit (not the kernel's headroom) and a
    // short CPU budget: a candidate's body must not starve live processes.
    watch.arm_for_module_body();
    crate::kernel::guest_memory(&vm.lua, &limits);
    let result = f.call::<Value>(());
    crate::kernel::kernel_memory(&vm.lua, &limits);
    let timed_out = watch.disarm_host_code();
    match result {
        Ok(Value::Table(t)) => {
            t.set_readonly(true);
            Ok(t)
        }
        Ok(other) => Err(abort(
            format!(
                "module `{name}` returned a {} instead of a table (end the module with `return <table>`)",
                other.type_name()
            ),
            None,
        )),
        Err(_) if timed_out => Err(abort(
            format!(
                "module `{name}` did not finish loading within {} ms",
                crate::kernel::MODULE_BODY_MS.min(limits.handler_ms)
            ),
            None,
        )),
        Err(e) => {
            let (message, line) = failure_in(&e, chunk);
            Err(abort(
                format!("module `{name}` failed while loading: {message}"),
                line,
            ))
        }
    }
}

/// Behaviour callbacks present and of the right type.
fn check_behaviour(vm: &Vm, name: &str, t: &Table) -> Result<()> {
    let abort = |message: String| aborted(ReloadStep::Check, Some(name), None, message);
    let kind = module_kind(t);
    if kind == "library" {
        if let Ok(Value::String(b)) = t.raw_get::<Value>("behaviour") {
            return Err(abort(format!(
                "module `{name}` declares behaviour `{}`; the only built-in behaviour is \"supervisor\"",
                b.to_string_lossy()
            )));
        }
        let k = kernel(&vm.lua);
        if let Some(mid) = k.module_id(name) {
            if k.procs.values().any(|p| p.pid.module_index() == mid) {
                return Err(abort(format!(
                    "module `{name}` has live processes but the new version has no `init` function"
                )));
            }
        }
        return Ok(());
    }
    if kind == "supervisor" && !matches!(t.raw_get::<Value>("init"), Ok(Value::Function(_))) {
        return Err(abort(format!(
            "supervisor module `{name}` needs an `init(args)` function returning its spec"
        )));
    }
    for cb in [
        "handle_call",
        "handle_cast",
        "handle_info",
        "code_change",
        "terminate",
    ] {
        match t.raw_get::<Value>(cb) {
            Ok(Value::Nil) | Ok(Value::Function(_)) => {}
            Ok(other) => {
                return Err(abort(format!(
                    "`{name}.{cb}` must be a function, not a {}",
                    other.type_name()
                )))
            }
            Err(e) => return Err(abort(e.to_string())),
        }
    }
    Ok(())
}

/// Supervisor modules: the new spec must be valid for every running
/// supervisor of the module, checked here so a bad spec aborts.
fn check_supervisor_specs(
    rq: &Request<'_>,
    new_tables: &[(String, Table)],
    changed_names: &BTreeSet<String>,
) -> Result<()> {
    let lua = &rq.vm.lua;
    for (name, table) in new_tables {
        if module_kind(table) != "supervisor" || !changed_names.contains(name) {
            continue;
        }
        let supervisors: Vec<(u64, String)> = {
            let k = kernel(lua);
            let mid = k.module_id(name).expect("interned");
            k.procs
                .values()
                .filter(|p| p.pid.module_index() == mid)
                .map(|p| (p.pid.serial(), k.pid_string(p.pid)))
                .collect()
        };
        for (serial, pid) in supervisors {
            let watch = kernel(lua).watch.clone();
            watch.arm_for_host_code();
            let r = rq
                .vm
                .validate_supervisor
                .call::<()>((table.clone(), serial as f64));
            watch.disarm_host_code();
            if let Err(e) = r {
                let (message, line) = failure_in(&e, &chunk_of(name, &rq.by_name));
                return Err(Error::ReloadAborted {
                    step: ReloadStep::Check,
                    module: Some(name.clone()),
                    process: Some(pid.clone()),
                    line,
                    column: None,
                    message: format!(
                        "supervisor {pid} rejects the new spec: {}",
                        first_line(&message)
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The prelude's mirror gets a slot for every module first, so the stores
/// at the commit replace values and cannot allocate.
fn reserve_module_slots(vm: &Vm, new_tables: &[(String, Table)]) -> Result<()> {
    let k = kernel(&vm.lua);
    for (name, _) in new_tables {
        let slot = k.module_id(name).expect("interned") as usize + 1;
        let missing = vm.modules.raw_get::<Value>(slot).map(|v| v.is_nil());
        if missing.unwrap_or(true) {
            vm.modules
                .raw_set(slot, false)
                .map_err(|e| Error::Luau(format!("reload aborted: {e}")))?;
        }
    }
    Ok(())
}

/// Supervisor code_change: each supervisor re-reads its spec (OTP semantics),
/// as a normal message so it can stop and start children.
fn notify_supervisors(vm: &Vm, modules: &[u32]) {
    let lua = &vm.lua;
    let mut k = kernel(lua);
    let targets: Vec<u64> = k
        .procs
        .values()
        .filter(|p| modules.contains(&p.pid.module_index()))
        .map(|p| p.pid.serial())
        .collect();
    for s in targets {
        let Ok(t) = lua.create_table() else { continue };
        let _ = t.raw_set("$sup", "upgrade");
        if let Ok(key) = lua.create_registry_value(t) {
            let _ = k.deliver(s, crate::kernel::Job::Info(key));
        }
    }
}
