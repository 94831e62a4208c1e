//! What a sandbox tells about itself: its info, modules and versions,
//! statement coverage and events.
//!
//! Invariants:
//! * `info` answers even while a long callback holds the VM: it waits at
//!   most `INFO_WAIT_MS`, then answers the last figures seen with status
//!   `busy`; a failed sandbox answers `failed` from what was saved.
//! * Events come from the node-wide log, after the commands queued before
//!   the request ran, so a reader sees what those commands logged.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{stopped, Sandbox};
use crate::error::{Error, Result};
use crate::kernel::{AppStatus, Event};
use crate::node::SandboxInfo;
use crate::upgrade::{ModuleInfo, ModuleVersion};

/// How long `info` waits for a running slice before answering `busy`
/// (a slice that yields ends within `SLICE_MS`).
const INFO_WAIT_MS: u64 = crate::kernel::SLICE_MS * 2;

/// Statement coverage of one evaluated module version ([`Sandbox::coverage`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModuleCoverage {
    /// Module name.
    pub module: String,
    /// SHA-256 of the version's source ([`crate::upgrade::checksum`]).
    pub checksum: String,
    /// Line (1-based) → times a statement on it ran, for every line where
    /// a statement starts.
    pub lines: std::collections::BTreeMap<u32, u64>,
}

impl Sandbox {
    /// Status, process count and memory. A failed sandbox answers with
    /// status `failed` (and no processes) until it is restarted or deleted.
    pub async fn info(&self) -> Result<SandboxInfo> {
        // Not queued, so asked here what `enqueue` decides for requests: a
        // sandbox closed for a rebuild answers `Rebuilding`.
        if self.is_closed() {
            return Err(Error::Rebuilding(self.shared.id.clone()));
        }
        if let Some(info) = self.failed_info() {
            return Ok(info);
        }
        if self.shared.destroyed.load(Ordering::Acquire) {
            return Err(self.destroyed_error());
        }
        // Read between slices, without queueing: a listing must answer even
        // while this sandbox is stuck in a long callback.
        let guard = self
            .shared
            .runtime
            .try_lock_for(Duration::from_millis(INFO_WAIT_MS));
        match guard {
            Some(guard) => {
                let info = guard.as_ref().map(|rt| rt.info());
                drop(guard);
                let info = info.ok_or_else(|| self.gone())?;
                *self.shared.last_info.lock() = Some(info.clone());
                Ok(info)
            }
            None => Ok(self.busy_info()),
        }
    }

    /// What `info` says while a callback holds the sandbox: the figures of
    /// the last look, with status `busy`.
    fn busy_info(&self) -> SandboxInfo {
        let last = self.shared.last_info.lock().clone();
        let mut info = last.unwrap_or_else(|| {
            let spec = &self.shared.spec;
            SandboxInfo {
                id: self.shared.id.clone(),
                status: String::new(),
                app: AppStatus::None,
                entry: spec.entry.clone(),
                process_count: 0,
                memory_bytes: 0,
                limits: spec.limits.clone(),
                module_count: spec.modules.len(),
                capabilities: Vec::new(),
                mailbox_full_total: 0,
            }
        });
        info.status = "busy".into();
        info
    }

    fn failed_info(&self) -> Option<SandboxInfo> {
        let failed = self.shared.failed.lock();
        let f = failed.as_ref()?;
        let spec = &self.shared.spec;
        let mut capabilities = spec.grants.clone();
        capabilities.extend(self.shared.host_fns.keys().cloned());
        Some(SandboxInfo {
            id: self.shared.id.clone(),
            status: "failed".into(),
            app: AppStatus::Stopped {
                reason: f.message.clone(),
            },
            entry: spec.entry.clone(),
            process_count: 0,
            memory_bytes: 0,
            limits: spec.limits.clone(),
            module_count: f.history.len(),
            capabilities,
            mailbox_full_total: 0,
        })
    }

    /// Statement coverage of every module version evaluated in this
    /// sandbox: line → hits, for lines where a statement starts. Empty
    /// unless [`crate::vm::enable_coverage`] was called before the
    /// sandbox's modules were compiled (`graft test --coverage`).
    ///
    /// ```
    /// graft::vm::enable_coverage();
    /// let node = graft::Node::new();
    /// let spec = graft::SandboxSpec::new("cov").entry(None)
    ///     .module("m", "local m = {}\nfunction m.f()\n  return 1\nend\nreturn m");
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let cov = graft::block_on(sb.coverage()).unwrap();
    /// assert_eq!(cov[0].module, "m");
    /// assert_eq!(cov[0].lines.get(&1), Some(&1), "the body ran line 1 once");
    /// assert_eq!(cov[0].lines.get(&3).copied(), Some(0), "m.f never ran");
    /// ```
    pub async fn coverage(&self) -> Result<Vec<ModuleCoverage>> {
        self.ask(|rt| rt.coverage()).await
    }

    /// Modules with their current version.
    pub async fn modules(&self) -> Result<Vec<ModuleInfo>> {
        self.ask(|rt| rt.modules()).await
    }

    /// Kept versions of a module, oldest first.
    pub async fn versions(&self, module: &str) -> Result<Vec<ModuleVersion>> {
        let module = module.to_owned();
        self.ask(move |rt| rt.versions(&module)).await?
    }

    /// Events, newest last. A failed sandbox keeps the events it had, and
    /// a `failed` event with the internal error.
    pub async fn events(&self) -> Result<Vec<Event>> {
        self.events_since(0).await
    }

    /// The events with `seq > since`, newest last: what happened after the
    /// last event a reader saw (sequence numbers start at 1, so `0` is every
    /// kept event). Events pruned by the node's `max_events` are not
    /// returned, so a reader that fell behind sees a gap in `seq`.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("ev").entry(None).module("m", "return {}");
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let all = graft::block_on(sb.events()).unwrap();
    /// let seen = all.last().map_or(0, |e| e.seq);
    /// let src = [("m".to_string(), "return { v = 2 }".to_string())].into();
    /// graft::block_on(sb.reload(src, Default::default())).unwrap();
    /// let newer = graft::block_on(sb.events_since(seen)).unwrap();
    /// assert!(!newer.is_empty() && newer.iter().all(|e| e.seq > seen));
    /// ```
    pub async fn events_since(&self, since: u64) -> Result<Vec<Event>> {
        let node = self
            .shared
            .node
            .upgrade()
            .ok_or_else(|| stopped(&self.shared.id))?;
        // Commands queued before this call (an `abort` event of a reload
        // that failed to compile) run first, as they did before the log
        // moved out of the sandbox. A failed sandbox answers nothing here.
        let _ = self.ask(|_| ()).await;
        node.events.settle().await;
        let filter = crate::EventFilter::default().sandbox(self.shared.id.clone());
        let page = node.events.read(since, &filter, usize::MAX);
        Ok(page
            .events
            .into_iter()
            .map(|e| Event {
                seq: e.seq,
                at_ms: e.at_ms,
                kind: e.kind,
                detail: e.detail,
            })
            .collect())
    }
}
