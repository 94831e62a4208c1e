//! The upgrade engine: module versions and the reload transaction (SPEC §3).
//!
//! A reload runs in two halves:
//! * `prepare` compiles and checks the sources (`prepare.rs`: the one
//!   compile path). It is pure (no VM), so it
//!   runs on the caller's thread and a huge source never stalls the sandbox.
//! * [`Engine::apply`] runs on the sandbox's scheduler thread, between
//!   callbacks: evaluate the new module tables, migrate every affected
//!   process's state on a copy, then commit (`apply.rs`, in named steps;
//!   migrations in `migrate.rs`).
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
//!
//! Layout: `history` (kept versions and eviction: the only place),
//! `prepare` (compile + check), `apply` (the transaction), `migrate`
//! (state migrations), `graph` (the require graph), `guest` (guest failure
//! text), `analysis` (the static checks). The canary watch itself lives in the kernel
//! (`kernel::watch`), which sees every exit.

pub(crate) mod analysis;
mod apply;
mod graph;
mod guest;
mod history;
mod migrate;
mod persist;
pub(crate) use persist::ends_window;
pub(crate) mod prepare;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use mlua::{Lua, Table, Value};
use serde::Serialize;
use serde_json::Value as Json;

pub(crate) use history::ModuleHistory;
pub use history::ModuleVersion;
pub use prepare::checksum;
pub(crate) use prepare::prepare_import;
pub(crate) use prepare::{prepare, PrepareContext, PreparedModule};

use crate::kernel::kernel;
use crate::vm::Vm;

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

/// A state migration written in Rust: `(old_state, old_vsn, new_vsn, extra) -> new_state`.
pub type RustStateHandler =
    Arc<dyn Fn(Json, Json, u32, &Json) -> std::result::Result<Json, String> + Send + Sync>;

/// A state migration given with a reload request instead of `code_change`.
#[derive(Clone)]
#[non_exhaustive]
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
    /// Operations (an audit row) to commit in the reload's transaction, so
    /// that both or neither are stored ([`crate::store::Attached`]). A reload
    /// that changes nothing (dry run, unchanged) leaves them untaken.
    pub attached: Option<crate::store::Attached>,
}

/// `reloaded`, `unchanged` or `dry_run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
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
    /// Commits are written to the node's log (and store) before they apply.
    /// Off while a sandbox loads its first versions (its creator writes them).
    pub persist: bool,
}

/// The reload's inputs as the steps see them.
struct Request<'a> {
    pub vm: &'a Vm,
    pub opts: &'a ReloadOptions,
    pub direction: Direction,
    pub target_versions: Option<&'a HashMap<String, u32>>,
    /// The changed modules by name.
    pub by_name: HashMap<&'a str, &'a PreparedModule>,
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
            persist: false,
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
}

/// `server`, `supervisor` or `library`, from a module table's shape.
fn module_kind(t: &Table) -> &'static str {
    match t.raw_get::<Value>("behaviour") {
        Ok(Value::String(s)) if s.to_str().is_ok_and(|s| &*s == "supervisor") => "supervisor",
        _ => match t.raw_get::<Value>("init") {
            Ok(Value::Function(_)) => "server",
            _ => "library",
        },
    }
}
