//! A sandbox's code: reloads (SPEC §3), rollbacks to kept versions, and
//! export/import of version histories.
//!
//! Invariants:
//! * Sources are compiled and checked on the caller's thread
//!   (`reload_start`): the sandbox keeps running until the prepared
//!   reload is applied as one transaction between slices.
//! * A reload that changed states asks the checkpointer to write this
//!   sandbox's processes soon (`after_commit`), so a restart after it does
//!   not bring back states of the old code.

use std::collections::{BTreeMap, HashMap};

use super::Sandbox;
use crate::error::{Error, Result};
use crate::node::runtime;
use crate::upgrade::{self, Direction, ModuleVersion, ReloadOptions, ReloadReport};

impl Sandbox {
    /// A committed reload changed states: the checkpointer writes this
    /// sandbox's registered processes soon.
    fn after_commit(&self, result: Result<ReloadReport>) -> Result<ReloadReport> {
        if let (Ok(r), Some(node)) = (&result, self.shared.node.upgrade()) {
            if r.status == upgrade::ReloadStatus::Reloaded && node.store.is_some() {
                node.checkpoints.request(&self.shared.id);
            }
        }
        result
    }

    pub(crate) fn reload_start(
        &self,
        sources: BTreeMap<String, String>,
        opts: ReloadOptions,
        direction: Direction,
        targets: Option<HashMap<String, u32>>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<ReloadReport>>> {
        // Compile and check here, on the caller's thread: the sandbox keeps running.
        let cx = upgrade::PrepareContext {
            known_globals: &self.shared.known_globals,
            max_source_bytes: self.shared.spec.limits.max_source_bytes,
            files: &self.shared.spec.files,
        };
        let prepared = match upgrade::prepare(&sources, &cx) {
            Ok(p) => p,
            Err(e) => {
                let detail = match &e {
                    Error::Compile { diagnostics } => {
                        serde_json::json!({ "modules": sources.keys().collect::<Vec<_>>(), "error": e.to_string(), "diagnostics": diagnostics })
                    }
                    _ => serde_json::json!({ "error": e.to_string() }),
                };
                let _ =
                    self.submit(move |rt| crate::kernel::kernel(&rt.vm.lua).event("abort", detail));
                return Err(e);
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| rt.reload(prepared, opts, direction, targets, tx))?;
        Ok(rx)
    }

    /// Reloads modules from sources as one transaction (SPEC §3).
    ///
    /// ```
    /// use graft::{Node, SandboxSpec, ReloadOptions};
    /// let node = Node::new();
    /// let v1 = "return { init = function() return 1 end, handle_call = function(r, f, s) return s, s end }";
    /// let v2 = "return { init = function() return 1 end, handle_call = function(r, f, s) return s * 10, s end }";
    /// let sb = graft::block_on(node.create_sandbox(SandboxSpec::new("up").entry(None).module("m", v1))).unwrap();
    /// graft::block_on(sb.spawn("m", serde_json::json!(null), Some("m"))).unwrap();
    /// let mut sources = std::collections::BTreeMap::new();
    /// sources.insert("m".to_string(), v2.to_string());
    /// let report = graft::block_on(sb.reload(sources, ReloadOptions::default())).unwrap();
    /// assert_eq!(report.modules[0].to, 2);
    /// assert_eq!(graft::block_on(sb.call("m", serde_json::json!(null), None)).unwrap(), 10);
    /// ```
    pub async fn reload(
        &self,
        sources: BTreeMap<String, String>,
        opts: ReloadOptions,
    ) -> Result<ReloadReport> {
        let rx = self.reload_start(sources, opts, Direction::Up, None)?;
        let result = rx.await.map_err(|_| self.gone())?;
        self.after_commit(result)
    }

    /// Rolls `module` back (or forward) to a kept version; `code_change` gets
    /// `{ down = <current version> }`. The target version becomes current.
    pub async fn rollback(
        &self,
        module: &str,
        version: u32,
        opts: ReloadOptions,
    ) -> Result<ReloadReport> {
        let module_name = module.to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move |rt| {
            let h = match rt.engine.modules.get(&module_name) {
                Some(h) => h,
                None => {
                    let _ = tx.send(Err(Error::NoModule(module_name)));
                    return;
                }
            };
            let Some(v) = h.get(version).cloned() else {
                let _ = tx.send(Err(Error::NoVersion {
                    module: module_name,
                    version,
                    kept: h.kept(),
                }));
                return;
            };
            if h.current == version {
                let _ = tx.send(Ok(ReloadReport {
                    status: upgrade::ReloadStatus::Unchanged,
                    modules: Vec::new(),
                    processes_migrated: 0,
                    timings: Default::default(),
                }));
                return;
            }
            // Moving to an older version is a downgrade (`{ down = n }`); to a
            // newer kept version, an ordinary upgrade.
            let direction = if version < h.current {
                Direction::Down
            } else {
                Direction::Up
            };
            let mut one = BTreeMap::new();
            one.insert(module_name.clone(), v);
            let prepared = runtime::prepared_from_versions(&one, &rt.engine);
            let mut targets = HashMap::new();
            targets.insert(module_name, version);
            rt.reload(prepared, opts, direction, Some(targets), tx);
        })?;
        let result = rx.await.map_err(|_| self.gone())?;
        self.after_commit(result)
    }

    /// Every kept version of every module (for export/backup).
    pub async fn export(&self) -> Result<BTreeMap<String, Vec<ModuleVersion>>> {
        self.ask(|rt| rt.export()).await
    }

    /// Imports module histories produced by [`Sandbox::export`] (possibly from
    /// another node). Every version's source is checked against its checksum
    /// and recompiled here; the newest imported version of each module goes
    /// live through an ordinary reload (so live processes are migrated), and
    /// then the imported versions replace the module's kept history, in
    /// memory and (on a durable node) on disk in one transaction, all of them
    /// permanent. The two steps are two commits: a crash between them
    /// restores the state after the reload, before the history was replaced
    /// (the import was not acknowledged).
    ///
    /// ```
    /// use graft::{Node, SandboxSpec, ReloadOptions};
    /// let node = Node::new();
    /// let a = graft::block_on(node.create_sandbox(SandboxSpec::new("a").entry(None).module("m", "return { v = 1 }"))).unwrap();
    /// let mut v2 = std::collections::BTreeMap::new();
    /// v2.insert("m".to_string(), "return { v = 2 }".to_string());
    /// graft::block_on(a.reload(v2, ReloadOptions::default())).unwrap();
    /// let exported = graft::block_on(a.export()).unwrap();
    /// let b = graft::block_on(node.create_sandbox(SandboxSpec::new("b").entry(None).module("m", "return { v = 0 }"))).unwrap();
    /// graft::block_on(b.import(exported, ReloadOptions::default())).unwrap();
    /// let kept: Vec<u32> = graft::block_on(b.versions("m")).unwrap().iter().map(|v| v.version).collect();
    /// assert_eq!(kept, vec![1, 2]);
    /// ```
    pub async fn import(
        &self,
        modules: BTreeMap<String, Vec<ModuleVersion>>,
        opts: ReloadOptions,
    ) -> Result<ReloadReport> {
        let import = upgrade::prepare_import(
            modules,
            self.shared.spec.limits.max_source_bytes,
            &self.shared.spec.files,
        )?;
        let rx = self.reload_start(import.newest, opts, Direction::Up, Some(import.targets))?;
        let report = rx.await.map_err(|_| self.gone())??;
        let histories = import.histories;
        self.ask(move |rt| rt.replace_histories(histories))
            .await??;
        Ok(report)
    }
}
