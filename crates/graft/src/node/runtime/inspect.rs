//! What the host reads from a sandbox without changing it: the process
//! list, a process's state, the sandbox summary, coverage, modules and
//! their kept versions.
//!
//! # Invariants
//! * A listing's memory estimates read a bounded number of table entries
//!   (per process and per listing); past either the figure is a lower
//!   bound, so a huge state cannot stall the sandbox's thread.

use std::collections::BTreeMap;

use mlua::Value;
use serde::Serialize;
use serde_json::Value as Json;

use super::Runtime;
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::kernel::AppStatus;
use crate::pid::{Pid, Target};
use crate::upgrade::{ModuleInfo, ModuleVersion};
use crate::value::{estimate_size, lua_to_json};

/// Table entries the memory estimate of one process reads at most.
const ESTIMATE_ENTRIES: usize = 100_000;
/// Table entries the memory estimates of one process listing read at most
/// (later processes get lower bounds once it is spent).
const ESTIMATE_LISTING_ENTRIES: usize = 4_000_000;

/// One row of the process list (SPEC §6).
#[derive(Clone, Debug, Serialize)]
pub struct ProcessInfo {
    /// Its pid; serialized as `"<module.serial>"`.
    pub pid: Pid,
    /// Registered name, if any.
    pub name: Option<String>,
    /// The behaviour module.
    pub module: String,
    /// The module version its state belongs to.
    pub version: u32,
    /// `idle`, `runnable`, `running`, `waiting` or `exiting`.
    pub status: String,
    /// Messages waiting.
    pub mailbox_len: usize,
    /// Estimated bytes: the process record plus its state's tables and
    /// strings, each table counted once however often it is referenced.
    /// The estimate reads at most 100,000 table entries per process and
    /// 4,000,000 per listing; past either the figure is a lower bound.
    pub memory_bytes: usize,
    /// Linked pids.
    pub links: Vec<Pid>,
    /// Whether it traps exits.
    pub trap_exit: bool,
    /// Callbacks run so far.
    pub messages_handled: u64,
}

/// A sandbox summary.
#[derive(Clone, Debug, Serialize)]
pub struct SandboxInfo {
    /// Sandbox id.
    pub id: String,
    /// `running`, or `app_stopped` once the root supervisor exited.
    pub status: String,
    /// The app (root supervisor) state.
    pub app: AppStatus,
    /// Entry module.
    pub entry: Option<String>,
    /// Live processes.
    pub process_count: usize,
    /// Bytes used by the sandbox's Luau heap.
    pub memory_bytes: usize,
    /// Its limits.
    pub limits: Limits,
    /// Number of modules.
    pub module_count: usize,
    /// Capabilities granted (built-in and host functions).
    pub capabilities: Vec<String>,
    /// Messages refused so far because the target's mailbox was full (since
    /// the sandbox's VM was built; a restart starts again at 0).
    pub mailbox_full_total: u64,
}

impl Runtime {
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let k = self.kernel.borrow();
        let mut budget = ESTIMATE_LISTING_ENTRIES;
        let mut out: Vec<ProcessInfo> = k
            .procs
            .values()
            .map(|p| {
                let state: Value = k.states.raw_get(p.pid.serial()).unwrap_or(Value::Nil);
                let (state_bytes, read) = estimate_size(&state, budget.min(ESTIMATE_ENTRIES));
                budget = budget.saturating_sub(read);
                ProcessInfo {
                    pid: k.api_pid(p.pid),
                    name: p.name.as_ref().map(|n| n.to_string()),
                    module: k.module_names[p.pid.module_index() as usize].to_string(),
                    version: p.version,
                    status: p.status().into(),
                    mailbox_len: p.mailbox.len(),
                    memory_bytes: std::mem::size_of::<crate::kernel::Process>() + state_bytes,
                    links: p
                        .links()
                        .iter()
                        .filter_map(|s| k.procs.get(s))
                        .map(|l| k.api_pid(l.pid))
                        .collect(),
                    trap_exit: p.trap_exit,
                    messages_handled: p.messages_handled as u64,
                }
            })
            .collect();
        out.sort_by_key(|p| p.pid.serial());
        out
    }

    pub fn state(&self, target: &Target) -> Result<Json> {
        let serial = self.resolve(target)?;
        let k = self.kernel.borrow();
        let state: Value = k
            .states
            .raw_get(serial)
            .map_err(|e| Error::Luau(e.to_string()))?;
        Ok(lua_to_json(&state, "state", k.max_value_bytes, &|p| {
            k.pid_string(p)
        })?)
    }

    pub fn info(&self) -> SandboxInfo {
        let k = self.kernel.borrow();
        let status = match k.app_status {
            AppStatus::Stopped { .. } => "app_stopped",
            _ => "running",
        };
        let mut capabilities = self.spec.grants.clone();
        capabilities.extend(self.host_fns.keys().cloned());
        SandboxInfo {
            id: self.spec.id.clone(),
            status: status.into(),
            app: k.app_status.clone(),
            entry: self.spec.entry.clone(),
            process_count: k.procs.len(),
            memory_bytes: self.lua().used_memory(),
            limits: self.spec.limits.clone(),
            module_count: self.engine.modules.len(),
            capabilities,
            mailbox_full_total: k.mailbox_full,
        }
    }

    /// Line hits of every module chunk evaluated in this VM (empty unless
    /// [`crate::vm::enable_coverage`] was called).
    pub fn coverage(&self) -> Vec<crate::node::ModuleCoverage> {
        let chunks = self.kernel.borrow().coverage_chunks.clone();
        chunks
            .into_iter()
            .map(|(module, checksum, f)| {
                let mut lines = BTreeMap::new();
                f.coverage(|info| {
                    for (line, &hits) in info.hits.iter().enumerate() {
                        // -1: no statement starts on this line.
                        if hits >= 0 {
                            *lines.entry(line as u32).or_insert(0u64) += hits as u64;
                        }
                    }
                });
                crate::node::ModuleCoverage {
                    module: module.to_string(),
                    checksum,
                    lines,
                }
            })
            .collect()
    }

    pub fn modules(&self) -> Vec<ModuleInfo> {
        self.engine.list(&self.vm)
    }

    pub fn versions(&self, module: &str) -> Result<Vec<ModuleVersion>> {
        let h = self
            .engine
            .modules
            .get(module)
            .ok_or_else(|| Error::NoModule(module.into()))?;
        Ok(h.versions.iter().cloned().collect())
    }

    pub fn export(&self) -> BTreeMap<String, Vec<ModuleVersion>> {
        self.engine
            .modules
            .iter()
            .map(|(n, h)| (n.clone(), h.versions.iter().cloned().collect()))
            .collect()
    }
}
