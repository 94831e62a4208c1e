//! The upgrade engine: module versions and the reload transaction (SPEC §3).
//!
//! A reload runs in two halves:
//! * [`prepare`] compiles and checks the sources. It is pure (no VM), so it
//!   runs on the caller's thread and a huge source never stalls the sandbox.
//! * [`Engine::apply`] runs on the sandbox's scheduler thread, between
//!   callbacks: evaluate the new module tables, migrate every affected
//!   process's state on a copy, then commit.
//!
//! Invariants:
//! * Nothing observable changes before the commit point. Evaluation builds
//!   new tables beside the old ones; migrations run on copies of the states
//!   and collect results in a side table. Abort is therefore "drop the side
//!   data": exact and O(1).
//! * The commit cannot fail half-way: it only stores into keys that exist
//!   (state slots, module slots) and bumps version numbers.
//! * No process is mid-callback in a module being swapped: the sandbox defers
//!   the reload until those processes are between messages (their mailboxes
//!   are frozen meanwhile), so no process ever runs a mix of old and new code.
//! * The engine is the only writer of module tables and version numbers.

pub mod analysis;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use mlua::{Function, Lua, Table, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::diagnostic::{Diagnostic, Report};
use crate::error::{Error, Result};
use crate::kernel::{kernel, remember_chunk, Run};
use crate::vm::Vm;

/// One kept version of a module. Serialized without bytecode: an import
/// recompiles the source (only bytecode this process compiled is loaded).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleVersion {
    /// 1, 2, 3 … per (sandbox, module).
    pub version: u32,
    /// SHA-256 of the source, hex.
    pub checksum: String,
    /// The Luau source.
    pub source: String,
    /// Bytecode compiled by this process from `source` (never imported).
    #[serde(skip, default)]
    pub bytecode: Arc<Vec<u8>>,
    /// Wall-clock load time, ms since the Unix epoch.
    pub loaded_at_ms: f64,
    /// Modules this one `require`s.
    pub dependencies: Vec<String>,
}

/// The kept versions of one module and which one is current.
#[derive(Clone, Debug, Default)]
pub(crate) struct ModuleHistory {
    pub versions: VecDeque<ModuleVersion>,
    pub current: u32,
    pub next: u32,
    pub file: String,
}

impl ModuleHistory {
    pub fn current(&self) -> Option<&ModuleVersion> {
        self.versions.iter().find(|v| v.version == self.current)
    }
    pub fn get(&self, version: u32) -> Option<&ModuleVersion> {
        self.versions.iter().find(|v| v.version == version)
    }
    /// Adds a version and evicts the oldest non-current ones past `max`.
    fn push(&mut self, v: ModuleVersion, max: usize) {
        self.current = v.version;
        self.next = self.next.max(v.version);
        self.versions.push_back(v);
        while self.versions.len() > max {
            match self.versions.iter().position(|v| v.version != self.current) {
                Some(i) => {
                    self.versions.remove(i);
                }
                None => break,
            }
        }
    }
}

/// A module summary for listings.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleInfo {
    /// Module name.
    pub name: String,
    /// Current version.
    pub version: u32,
    /// SHA-256 of the current source.
    pub checksum: String,
    /// Modules it requires.
    pub dependencies: Vec<String>,
    /// Versions kept.
    pub kept: Vec<u32>,
    /// `server`, `supervisor` or `library`.
    pub kind: String,
}

/// A compiled and checked source, ready for [`Engine::apply`].
#[derive(Clone, Debug)]
pub struct PreparedModule {
    /// Module name.
    pub name: String,
    /// File name used in diagnostics.
    pub file: String,
    /// The source.
    pub source: String,
    /// SHA-256, hex.
    pub checksum: String,
    /// Our bytecode.
    pub bytecode: Arc<Vec<u8>>,
    /// `require`d modules.
    pub dependencies: Vec<String>,
    /// Microseconds spent compiling and checking.
    pub compile_us: u64,
}

/// What compile/check needs to know about the target sandbox.
pub struct PrepareContext<'a> {
    /// Globals a module may read.
    pub known_globals: &'a [String],
    /// `limits.max_source_bytes`.
    pub max_source_bytes: usize,
    /// Module name → file for diagnostics (default `<name>.luau`).
    pub files: &'a BTreeMap<String, std::path::PathBuf>,
}

/// Compiles and checks sources (SPEC §3 steps 1–2, the part that needs no VM).
/// All problems of all modules are reported, first module first, within the
/// bounds of [`crate::diagnostic`]: at most 20 per module, 56 KiB in all.
pub fn prepare(
    sources: &BTreeMap<String, String>,
    cx: &PrepareContext<'_>,
) -> Result<Vec<PreparedModule>> {
    let known: HashSet<&str> = cx.known_globals.iter().map(String::as_str).collect();
    let is_known = |g: &str| known.contains(g);
    let mut out = Vec::new();
    let mut report = Report::default();
    for (name, source) in sources {
        crate::config::validate_module_name(name)?;
        let started = Instant::now();
        let file = cx
            .files
            .get(name)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("{}.luau", name.replace('.', "/")));
        let mut problems = report.module(name, &file, source);
        let bytecode = match crate::vm::compile(name, &file, source, cx.max_source_bytes) {
            Ok(b) => b,
            Err(Error::Compile { diagnostics }) => {
                for d in diagnostics {
                    problems.push_diagnostic(d);
                }
                problems.finish();
                continue;
            }
            Err(e) => return Err(e),
        };
        let analysis = analysis::analyze(source, &is_known)?;
        for f in &analysis.findings {
            problems.push(finding_kind(&f.kind), f.line, f.column, &f.message);
        }
        problems.count_more(analysis.more);
        problems.finish();
        out.push(PreparedModule {
            name: name.clone(),
            file,
            checksum: checksum(source),
            source: source.clone(),
            bytecode: Arc::new(bytecode),
            dependencies: analysis.requires.iter().map(|r| r.module.clone()).collect(),
            compile_us: started.elapsed().as_micros() as u64,
        });
    }
    if report.is_empty() {
        Ok(out)
    } else {
        Err(Error::Compile {
            diagnostics: report.into_diagnostics(),
        })
    }
}

fn finding_kind(k: &analysis::FindingKind) -> &'static str {
    use analysis::FindingKind::*;
    match k {
        SyntaxError => "syntax",
        UngrantedGlobal => "ungranted_global",
        GlobalAssignment => "global_assignment",
        ForbiddenConstruct => "forbidden_construct",
        DynamicRequire => "dynamic_require",
    }
}

/// SHA-256 of a source, hex.
pub fn checksum(source: &str) -> String {
    let digest = Sha256::digest(source.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A state migration written in Rust: `(old_state, old_vsn, new_vsn, extra) -> new_state`.
pub type RustStateHandler =
    Arc<dyn Fn(Json, Json, u32, &Json) -> std::result::Result<Json, String> + Send + Sync>;

/// A state migration given with a reload request instead of `code_change`.
#[derive(Clone)]
pub enum StateHandler {
    /// Luau source evaluating to `function(old_state, old_vsn, new_vsn, extra) -> new_state`.
    Luau(String),
    /// A Rust closure `(old_state, old_vsn, new_vsn, extra) -> new_state`, all as JSON.
    Rust(RustStateHandler),
}

impl std::fmt::Debug for StateHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateHandler::Luau(s) => f.debug_tuple("Luau").field(s).finish(),
            StateHandler::Rust(_) => f.write_str("Rust(..)"),
        }
    }
}

/// Options of one reload.
#[derive(Clone, Debug, Default)]
pub struct ReloadOptions {
    /// Passed to `code_change` as `extra`.
    pub extra: Json,
    /// Used instead of `code_change` for every migrated process.
    pub state_handler: Option<StateHandler>,
    /// Do every step on copies and change nothing.
    pub dry_run: bool,
    /// Watch upgraded processes this long after the commit (0: no canary).
    pub canary_ms: u64,
    /// Crashes within the window that trigger an automatic rollback (default 1).
    pub canary_crashes: u32,
}

/// `reloaded`, `unchanged` or `dry_run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadStatus {
    /// The new code is live.
    Reloaded,
    /// Every source matched its current checksum: nothing to do.
    Unchanged,
    /// Everything succeeded on copies; nothing changed.
    DryRun,
}

/// One module's version change.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModuleChange {
    /// Module name.
    pub name: String,
    /// Version before (0: the module is new).
    pub from: u32,
    /// Version after.
    pub to: u32,
}

/// Microsecond timings of a reload.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Compile + static checks.
    pub compile_us: u64,
    /// Evaluating new module tables.
    pub evaluate_us: u64,
    /// Running migrations (on copies).
    pub migrate_us: u64,
    /// Evaluate + migrate + commit: the time the sandbox's processes waited.
    pub swap_us: u64,
}

/// The result of a reload.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    /// What happened.
    pub status: ReloadStatus,
    /// Version changes (for a dry run: those that would happen).
    pub modules: Vec<ModuleChange>,
    /// Processes whose state was migrated (or would be).
    pub processes_migrated: usize,
    /// Timings.
    pub timings: Timings,
}

/// How the old version is described to `code_change`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Direction {
    Up,
    /// A rollback: `code_change` gets `{ down = <current version> }`.
    Down,
}

/// The upgrade engine of one sandbox.
pub(crate) struct Engine {
    pub modules: BTreeMap<String, ModuleHistory>,
    pub max_versions: usize,
    /// `require` view: module name → current table (a Lua table).
    pub view: Table,
}

/// A reload that could not run yet because processes were mid-callback.
pub(crate) enum Applied {
    Done(ReloadReport),
    /// These modules' processes must finish their callbacks first.
    Busy(Vec<u32>),
}

impl Engine {
    pub fn new(lua: &Lua, max_versions: usize) -> mlua::Result<Engine> {
        Ok(Engine {
            modules: BTreeMap::new(),
            max_versions,
            view: lua.create_table()?,
        })
    }

    pub fn list(&self, vm: &Vm) -> Vec<ModuleInfo> {
        let k = kernel(&vm.lua);
        self.modules
            .iter()
            .filter_map(|(name, h)| {
                let cur = h.current()?;
                let kind = k
                    .module_id(name)
                    .and_then(|m| k.module_tables[m as usize].as_ref())
                    .map(module_kind)
                    .unwrap_or("library");
                Some(ModuleInfo {
                    name: name.clone(),
                    version: cur.version,
                    checksum: cur.checksum.clone(),
                    dependencies: cur.dependencies.clone(),
                    kept: h.versions.iter().map(|v| v.version).collect(),
                    kind: kind.into(),
                })
            })
            .collect()
    }

    /// Runs the VM half of a reload. `prepared` must come from [`prepare`].
    pub fn apply(
        &mut self,
        vm: &Vm,
        prepared: Vec<PreparedModule>,
        opts: &ReloadOptions,
        direction: Direction,
        target_versions: Option<&HashMap<String, u32>>,
    ) -> Result<Applied> {
        let started = Instant::now();
        let compile_us: u64 = prepared.iter().map(|p| p.compile_us).sum();
        // 1. What changed.
        let changed: Vec<PreparedModule> = prepared
            .into_iter()
            .filter(|p| {
                self.modules
                    .get(&p.name)
                    .and_then(|h| h.current())
                    .is_none_or(|c| c.checksum != p.checksum)
            })
            .collect();
        if changed.is_empty() {
            return Ok(Applied::Done(ReloadReport {
                status: ReloadStatus::Unchanged,
                modules: Vec::new(),
                processes_migrated: 0,
                timings: Timings {
                    compile_us,
                    ..Timings::default()
                },
            }));
        }
        // 2. The require graph of the would-be module set.
        let mut deps: BTreeMap<String, Vec<String>> = self
            .modules
            .iter()
            .filter_map(|(n, h)| h.current().map(|c| (n.clone(), c.dependencies.clone())))
            .collect();
        for p in &changed {
            deps.insert(p.name.clone(), p.dependencies.clone());
        }
        for p in &changed {
            for d in &p.dependencies {
                if !deps.contains_key(d) {
                    let (line, column) = require_position(&p.source, d);
                    return Err(Error::Compile {
                        diagnostics: vec![Diagnostic::new(
                            "missing_module",
                            &p.name,
                            &p.file,
                            &p.source,
                            line,
                            column,
                            format!("`require(\"{d}\")`: no module `{d}` in this sandbox or in this reload"),
                        )],
                    });
                }
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
        // Changed modules and, transitively, every module requiring one.
        let changed_names: BTreeSet<String> = changed.iter().map(|p| p.name.clone()).collect();
        let mut affected = changed_names.clone();
        loop {
            let more: Vec<String> = deps
                .iter()
                .filter(|(n, ds)| !affected.contains(*n) && ds.iter().any(|d| affected.contains(d)))
                .map(|(n, _)| n.clone())
                .collect();
            if more.is_empty() {
                break;
            }
            affected.extend(more);
        }
        let order = topo_order(&deps, &affected);

        // Quiescence: processes of affected modules must be between callbacks.
        {
            let mut k = kernel(&vm.lua);
            let ids: Vec<u32> = affected.iter().filter_map(|n| k.module_id(n)).collect();
            let busy: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|m| {
                    k.procs.values().any(|p| {
                        p.pid.module_index() == *m
                            && (!matches!(p.run, Run::Idle) || p.job.is_some())
                    })
                })
                .collect();
            if !busy.is_empty() {
                return Ok(Applied::Busy(ids));
            }
            for n in &affected {
                k.intern_module(n);
            }
        }

        // 3. Evaluate new tables in dependency order, with `require` seeing
        // the new tables of this reload and the current ones of the rest.
        let eval_started = Instant::now();
        let lua = &vm.lua;
        let overlay = lua.create_table().map_err(luau)?;
        for pair in self.view.pairs::<Value, Value>() {
            let (k, v) = pair.map_err(luau)?;
            overlay.raw_set(k, v).map_err(luau)?;
        }
        let by_name: HashMap<&str, &PreparedModule> =
            changed.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut new_tables: Vec<(String, Table)> = Vec::new();
        vm.set_view.call::<()>(overlay.clone()).map_err(luau)?;
        let eval_result = (|| -> Result<()> {
            for name in &order {
                let (bytecode, file) = match by_name.get(name.as_str()) {
                    Some(p) => (p.bytecode.clone(), p.file.clone()),
                    None => {
                        let h = &self.modules[name];
                        (
                            h.current().expect("current").bytecode.clone(),
                            h.file.clone(),
                        )
                    }
                };
                let table = evaluate(vm, name, &file, &bytecode)?;
                check_behaviour(vm, name, &table)?;
                overlay
                    .raw_set(name.as_str(), table.clone())
                    .map_err(luau)?;
                new_tables.push((name.clone(), table));
            }
            Ok(())
        })();
        vm.set_view.call::<()>(self.view.clone()).map_err(luau)?;
        eval_result?;
        let evaluate_us = eval_started.elapsed().as_micros() as u64;

        // Supervisor modules: the new spec must be valid for every running
        // supervisor of the module, checked here so a bad spec aborts.
        for (name, table) in &new_tables {
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
                let r = vm
                    .validate_supervisor
                    .call::<()>((table.clone(), serial as f64));
                watch.disarm_host_code();
                if let Err(e) = r {
                    let (message, line) = failure_in(&e, &chunk_of(name, &by_name));
                    return Err(Error::ReloadAborted {
                        step: "check".into(),
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

        // 4. Migrate states of processes whose module source changed, on copies.
        let migrate_started = Instant::now();
        let handler_fn = match &opts.state_handler {
            Some(StateHandler::Luau(src)) => Some(load_state_handler(vm, src)?),
            _ => None,
        };
        let mut migrations: Vec<(Table, Table)> = Vec::new();
        let mut migrated = 0usize;
        for (name, table) in &new_tables {
            if !changed_names.contains(name) {
                continue;
            }
            let (serials, old_vsn) = {
                let k = kernel(lua);
                let mid = k.module_id(name).expect("interned");
                let mut serials: Vec<u64> = k
                    .procs
                    .values()
                    .filter(|p| p.pid.module_index() == mid)
                    .map(|p| p.pid.serial())
                    .collect();
                serials.sort_unstable();
                (serials, k.module_versions[mid as usize])
            };
            if serials.is_empty() || old_vsn == 0 {
                continue;
            }
            let new_vsn = match target_versions.and_then(|t| t.get(name)) {
                Some(v) => *v,
                None => self.modules.get(name).map(|h| h.next + 1).unwrap_or(1),
            };
            let old_vsn_value = match direction {
                Direction::Up => Value::Number(old_vsn as f64),
                Direction::Down => {
                    let t = lua.create_table().map_err(luau)?;
                    t.raw_set("down", old_vsn).map_err(luau)?;
                    Value::Table(t)
                }
            };
            let out = lua
                .create_table_with_capacity(serials.len() + 1, 0)
                .map_err(luau)?;
            // Built before the commit point, so the commit allocates nothing.
            let serial_table = lua
                .create_sequence_from(serials.iter().map(|s| *s as f64))
                .map_err(luau)?;
            let is_supervisor = module_kind(table) == "supervisor";
            let code_change: Option<Function> = table.raw_get("code_change").ok().flatten();
            let result = match (&opts.state_handler, &handler_fn, code_change) {
                (Some(StateHandler::Rust(f)), _, _) if !is_supervisor => {
                    migrate_with_rust(vm, f, &serials, &old_vsn_value, new_vsn, &opts.extra, &out)
                }
                (_, Some(f), _) if !is_supervisor => migrate_with_luau(
                    vm,
                    f,
                    &serial_table,
                    &old_vsn_value,
                    new_vsn,
                    &opts.extra,
                    true,
                    &out,
                ),
                (_, _, Some(f)) if !is_supervisor => migrate_with_luau(
                    vm,
                    &f,
                    &serial_table,
                    &old_vsn_value,
                    new_vsn,
                    &opts.extra,
                    false,
                    &out,
                ),
                _ => continue, // no migration: states are kept as they are
            };
            if let Err((index, message)) = result {
                let k = kernel(lua);
                let process = serials
                    .get(index)
                    .and_then(|s| k.procs.get(s))
                    .map(|p| k.pid_string(p.pid));
                // A state handler's errors are in its own source, not the module's.
                let line = line_in(&chunk_of(name, &by_name), &message, "");
                let message = guest_text(&message);
                return Err(Error::ReloadAborted {
                    step: "migrate".into(),
                    module: Some(name.clone()),
                    process: process.clone(),
                    line,
                    column: None,
                    message: format!(
                        "state migration of {} ({} of {}) failed: {message}",
                        process.unwrap_or_default(),
                        index + 1,
                        serials.len()
                    ),
                });
            }
            migrated += serials.len();
            migrations.push((serial_table, out));
        }
        let migrate_us = migrate_started.elapsed().as_micros() as u64;

        // The version each changed module gets.
        let mut modules_report = Vec::new();
        for p in &changed {
            let from = self.modules.get(&p.name).map(|h| h.current).unwrap_or(0);
            let to = match target_versions.and_then(|t| t.get(&p.name)) {
                Some(v) => *v,
                None => self.modules.get(&p.name).map(|h| h.next + 1).unwrap_or(1),
            };
            modules_report.push(ModuleChange {
                name: p.name.clone(),
                from,
                to,
            });
        }
        if opts.dry_run {
            return Ok(Applied::Done(ReloadReport {
                status: ReloadStatus::DryRun,
                modules: modules_report,
                processes_migrated: migrated,
                timings: Timings {
                    compile_us,
                    evaluate_us,
                    migrate_us,
                    swap_us: started.elapsed().as_micros() as u64,
                },
            }));
        }

        // The prelude's mirror gets a slot for every module first, so the
        // stores at the commit replace values and cannot allocate.
        {
            let k = kernel(lua);
            for (name, _) in &new_tables {
                let slot = k.module_id(name).expect("interned") as usize + 1;
                let missing = vm.modules.raw_get::<Value>(slot).map(|v| v.is_nil());
                if missing.unwrap_or(true) {
                    vm.modules
                        .raw_set(slot, false)
                        .map_err(|e| Error::Luau(format!("reload aborted: {e}")))?;
                }
            }
        }

        // 5. Commit. Nothing below can fail half-way (see module docs).
        for (serial_table, out) in &migrations {
            vm_commit_states(vm, serial_table, out)?;
        }
        let mut supervisors_changed = Vec::new();
        {
            let mut k = kernel(lua);
            for (name, table) in &new_tables {
                let mid = k.module_id(name).expect("interned");
                k.set_module_table(mid, table.clone());
                let _ = vm.modules.raw_set(mid as usize + 1, table.clone());
                let _ = self.view.raw_set(name.as_str(), table.clone());
                if module_kind(table) == "supervisor" && changed_names.contains(name) {
                    supervisors_changed.push(mid);
                }
            }
            for change in &modules_report {
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
            let history = self.modules.entry(p.name.clone()).or_default();
            history.file = p.file.clone();
            if history.get(to).is_some() {
                history.current = to; // rollback: the kept version becomes current
            } else {
                history.push(
                    ModuleVersion {
                        version: to,
                        checksum: p.checksum,
                        source: p.source,
                        bytecode: p.bytecode,
                        loaded_at_ms: crate::clock::unix_ms(),
                        dependencies: p.dependencies,
                    },
                    self.max_versions,
                );
            }
        }
        if !supervisors_changed.is_empty() {
            notify_supervisors(vm, &supervisors_changed);
        }
        Ok(Applied::Done(ReloadReport {
            status: ReloadStatus::Reloaded,
            modules: modules_report,
            processes_migrated: migrated,
            timings: Timings {
                compile_us,
                evaluate_us,
                migrate_us,
                swap_us: started.elapsed().as_micros() as u64,
            },
        }))
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// The chunk name module `name`'s code in this reload was loaded under.
fn chunk_of(name: &str, by_name: &HashMap<&str, &PreparedModule>) -> String {
    match by_name.get(name) {
        Some(p) if !p.file.is_empty() => p.file.clone(),
        _ => name.to_owned(),
    }
}

/// A Luau error raised while the engine ran guest code: its message without
/// mlua's wrapping and traceback (cut to [`MAX_GUEST_MESSAGE_BYTES`]), and
/// the line in `chunk` where it was raised (from the message's position,
/// else from the traceback's frames).
fn failure_in(e: &mlua::Error, chunk: &str) -> (String, Option<u32>) {
    let text = match e {
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { cause, .. } => cause.to_string(),
        other => other.to_string(),
    };
    let (message, traceback) = text
        .split_once("\nstack traceback:")
        .unwrap_or((text.as_str(), ""));
    (guest_text(message), line_in(chunk, message, traceback))
}

/// Bytes of a guest's error text kept in a `reload_aborted` message.
const MAX_GUEST_MESSAGE_BYTES: usize = 4096;

/// A guest's error text, cut to [`MAX_GUEST_MESSAGE_BYTES`] with
/// `… (N more bytes)`: a guest can raise megabytes.
fn guest_text(text: &str) -> String {
    if text.len() <= MAX_GUEST_MESSAGE_BYTES {
        return text.to_owned();
    }
    let mut cut = MAX_GUEST_MESSAGE_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more bytes)", &text[..cut], text.len() - cut)
}

/// The line in `chunk` of an error with this message and traceback.
fn line_in(chunk: &str, message: &str, traceback: &str) -> Option<u32> {
    let at_message = crate::diagnostic::error_position(message);
    let frames = crate::diagnostic::guest_frames(traceback)
        .into_iter()
        .filter_map(crate::diagnostic::frame_position);
    at_message
        .into_iter()
        .chain(frames)
        .find(|(c, _)| *c == chunk)
        .map(|(_, line)| line)
}

fn luau(e: mlua::Error) -> Error {
    Error::Luau(e.to_string())
}

fn module_kind(t: &Table) -> &'static str {
    match t.raw_get::<Value>("behaviour") {
        Ok(Value::String(s)) if s.to_str().is_ok_and(|s| &*s == "supervisor") => "supervisor",
        _ => match t.raw_get::<Value>("init") {
            Ok(Value::Function(_)) => "server",
            _ => "library",
        },
    }
}

/// Runs a module chunk under the sandbox's CPU budget; it must return a table.
fn evaluate(vm: &Vm, name: &str, file: &str, bytecode: &[u8]) -> Result<Table> {
    let abort = |message: String, line: Option<u32>| Error::ReloadAborted {
        step: "evaluate".into(),
        module: Some(name.to_owned()),
        process: None,
        line,
        column: None,
        message,
    };
    // The chunk is named after its file so errors read `src/counter.luau:8: …`.
    let chunk = if file.is_empty() { name } else { file };
    remember_chunk(&vm.lua, chunk, name);
    let f = vm
        .load_guest(chunk, bytecode)
        .map_err(|e| abort(e.to_string(), None))?;
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
    let abort = |message: String| Error::ReloadAborted {
        step: "check".into(),
        module: Some(name.to_owned()),
        process: None,
        line: None,
        column: None,
        message,
    };
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

fn load_state_handler(vm: &Vm, src: &str) -> Result<Function> {
    const CHUNK: &str = "state_handler";
    let bytecode = crate::vm::compile(CHUNK, "state_handler.luau", src, 1 << 20)?;
    // Lines are in the handler's source: there is no module.
    let abort = |message: String, line: Option<u32>| Error::ReloadAborted {
        step: "state_handler".into(),
        module: None,
        process: None,
        line,
        column: None,
        message,
    };
    let chunk = vm
        .load_guest(CHUNK, &bytecode)
        .map_err(|e| abort(e.to_string(), None))?;
    let watch = kernel(&vm.lua).watch.clone();
    watch.arm_for_host_code();
    let r = chunk.call::<Value>(());
    watch.disarm_host_code();
    match r {
        Ok(Value::Function(f)) => Ok(f),
        Ok(other) => Err(abort(
            format!(
                "state_handler must evaluate to a function(old_state, old_vsn, new_vsn, extra), got a {}",
                other.type_name()
            ),
            None,
        )),
        Err(e) => {
            let (message, line) = failure_in(&e, CHUNK);
            Err(abort(message, line))
        }
    }
}

/// Runs `f` over every process in the VM (prelude's `migrate_all`), under the
/// sandbox's CPU budget. `Err((index, message))` names the first failure.
#[allow(clippy::too_many_arguments)]
fn migrate_with_luau(
    vm: &Vm,
    f: &Function,
    serial_table: &Table,
    old_vsn: &Value,
    new_vsn: u32,
    extra: &Json,
    is_handler: bool,
    out: &Table,
) -> std::result::Result<(), (usize, String)> {
    let lua = &vm.lua;
    let extra = crate::value::json_to_lua(lua, extra).map_err(|e| (0, e.to_string()))?;
    let watch = kernel(lua).watch.clone();
    watch.arm_for_host_code();
    let r = vm.migrate_all.call::<f64>((
        f.clone(),
        serial_table.clone(),
        old_vsn.clone(),
        new_vsn,
        extra,
        is_handler,
        out.clone(),
    ));
    let timed_out = watch.disarm_host_code();
    match r {
        Ok(0.0) => Ok(()),
        Ok(i) => {
            let msg: Value = out.raw_get(1).unwrap_or(Value::Nil);
            let text = match msg {
                Value::String(s) => s.to_string_lossy(),
                other => other.to_string().unwrap_or_default(),
            };
            let text = if timed_out {
                format!("timeout ({text})")
            } else {
                text
            };
            Err((i as usize - 1, text))
        }
        Err(e) if timed_out => Err((0, format!("migration ran past handler_ms: {e}"))),
        Err(e) => Err((0, e.to_string())),
    }
}

fn migrate_with_rust(
    vm: &Vm,
    f: &RustStateHandler,
    serials: &[u64],
    old_vsn: &Value,
    new_vsn: u32,
    extra: &Json,
    out: &Table,
) -> std::result::Result<(), (usize, String)> {
    let lua = &vm.lua;
    let cap = kernel(lua).max_value_bytes;
    let old_vsn_json =
        crate::value::lua_to_json(old_vsn, "old_vsn", cap, &|p| format!("<{}>", p.serial()))
            .map_err(|e| (0, e.to_string()))?;
    for (i, serial) in serials.iter().enumerate() {
        let state: Value = vm.states.raw_get(*serial).map_err(|e| (i, e.to_string()))?;
        let json = {
            let k = kernel(lua);
            crate::value::lua_to_json(&state, "state", cap, &|p| k.pid_string(p))
                .map_err(|e| (i, e.to_string()))?
        };
        let new_state = f(json, old_vsn_json.clone(), new_vsn, extra).map_err(|e| (i, e))?;
        if new_state.is_null() {
            return Err((i, "returned no state".into()));
        }
        let v = crate::value::json_to_lua(lua, &new_state).map_err(|e| (i, e.to_string()))?;
        out.raw_set(i + 2, v).map_err(|e| (i, e.to_string()))?;
    }
    Ok(())
}

fn vm_commit_states(vm: &Vm, serials: &Table, states: &Table) -> Result<()> {
    vm.commit_states
        .call::<()>((serials.clone(), states.clone()))
        .map_err(luau)
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

/// The first `require(...)` of `module` in `source`: (line, column), 1-based.
fn require_position(source: &str, module: &str) -> (usize, usize) {
    let known = |_: &str| true;
    analysis::analyze(source, &known)
        .ok()
        .and_then(|a| a.requires.into_iter().find(|r| r.module == module))
        .map(|r| (r.line, r.column))
        .unwrap_or((0, 0))
}

/// A cycle in the require graph as a path `a -> b -> a`, if any.
pub fn find_cycle(deps: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        n: &str,
        deps: &BTreeMap<String, Vec<String>>,
        marks: &mut HashMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n).copied().unwrap_or(Mark::New) {
            Mark::Done => return None,
            Mark::Active => {
                let start = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            Mark::New => {}
        }
        marks.insert(n.to_owned(), Mark::Active);
        path.push(n.to_owned());
        for d in deps.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, deps, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(n.to_owned(), Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for n in deps.keys() {
        if let Some(c) = visit(n, deps, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// `subset` in dependency order (dependencies first). Assumes no cycle.
fn topo_order(deps: &BTreeMap<String, Vec<String>>, subset: &BTreeSet<String>) -> Vec<String> {
    fn visit(
        n: &str,
        deps: &BTreeMap<String, Vec<String>>,
        subset: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(n.to_owned()) {
            return;
        }
        for d in deps.get(n).into_iter().flatten() {
            visit(d, deps, subset, seen, out);
        }
        if subset.contains(n) {
            out.push(n.to_owned());
        }
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for n in subset {
        visit(n, deps, subset, &mut seen, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, ds)| (n.to_string(), ds.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    #[test]
    fn cycles_are_reported_as_a_path() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]);
        assert_eq!(find_cycle(&g).unwrap(), vec!["a", "b", "c", "a"]);
        let g = graph(&[("a", &["b"]), ("b", &[]), ("c", &["a", "b"])]);
        assert_eq!(find_cycle(&g), None);
        let g = graph(&[("a", &["a"])]);
        assert_eq!(find_cycle(&g).unwrap(), vec!["a", "a"]);
    }

    #[test]
    fn topo_order_puts_dependencies_first() {
        let g = graph(&[
            ("app", &["counter", "util"]),
            ("counter", &["util"]),
            ("util", &[]),
        ]);
        let all: BTreeSet<String> = ["app", "counter", "util"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(topo_order(&g, &all), vec!["util", "counter", "app"]);
        let some: BTreeSet<String> = ["app", "util"].iter().map(|s| s.to_string()).collect();
        assert_eq!(topo_order(&g, &some), vec!["util", "app"]);
    }

    #[test]
    fn history_keeps_max_versions_and_never_evicts_current() {
        let mut h = ModuleHistory::default();
        for v in 1..=12 {
            h.push(
                ModuleVersion {
                    version: v,
                    checksum: v.to_string(),
                    source: String::new(),
                    bytecode: Arc::new(Vec::new()),
                    loaded_at_ms: 0.0,
                    dependencies: vec![],
                },
                10,
            );
        }
        let kept: Vec<u32> = h.versions.iter().map(|v| v.version).collect();
        assert_eq!(kept, (3..=12).collect::<Vec<_>>());
        h.current = 3;
        h.push(
            ModuleVersion {
                version: 13,
                checksum: "13".into(),
                source: String::new(),
                bytecode: Arc::new(Vec::new()),
                loaded_at_ms: 0.0,
                dependencies: vec![],
            },
            10,
        );
        assert_eq!(h.current, 13);
        assert!(h.get(3).is_none() && h.get(4).is_some());
    }

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(checksum("").len(), 64);
        assert_eq!(&checksum("abc")[..8], "ba7816bf");
    }
}
