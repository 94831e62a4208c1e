//! One sandbox's runtime: its VM, kernel and upgrade engine, driven by the
//! node's scheduler threads. Every method runs on the scheduler thread that
//! holds the sandbox, between time slices, so it has the VM to itself.
//!
//! This file holds the `Runtime` type and its construction; its methods
//! are grouped by concern in the files beside it: `app.rs` (the app's
//! start and stop), `host.rs` (calls, sends, spawns and evals from the
//! host), `inspect.rs` (process and sandbox listings, states, coverage),
//! `reload.rs` (the reload queue, quiescence, imports and retiring),
//! `canary.rs` (canary windows and their rollback) and `test_clock.rs`.

mod app;
mod canary;
mod host;
mod inspect;
mod reload;
mod test_clock;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use mlua::Lua;
use serde_json::Value as Json;

use crate::config::{NodeLimits, SandboxSpec};
use crate::error::{Error, Result};
use crate::events::EventLog;
use crate::kernel::{self, HostSlot};
use crate::upgrade::{Applied, Direction, Engine, ReloadOptions};
use crate::vm::{HostTable, Vm};
use reload::PendingReload;

pub use inspect::{ProcessInfo, SandboxInfo};
pub(crate) use reload::prepared_from_versions;
pub use reload::QUIESCE_TIMEOUT_MS;

pub(crate) struct Runtime {
    pub vm: Vm,
    /// The handle on `vm`'s kernel (the same one the VM's app data holds),
    /// so the runtime borrows it without an app-data lookup.
    pub kernel: kernel::KernelHandle,
    pub engine: Engine,
    pub spec: SandboxSpec,
    pub host_fns: HostTable,
    pending: VecDeque<PendingReload>,
    app_waiters: Vec<Arc<HostSlot>>,
    app_start: Option<tokio::sync::oneshot::Receiver<Result<Json>>>,
    /// Set while `Node::reconfigure_sandbox` rebuilds this sandbox from a
    /// snapshot of its histories: a reload or import after the snapshot
    /// would commit to a VM about to be dropped, so it is refused instead.
    retiring: bool,
    /// Set by the slice runner when a blocking caller's own command runs on
    /// its own thread with nothing queued before it (`run_claimed`), taken
    /// by that command: only then may a host call run its handler at once
    /// (`host_call_now`), since nothing queued before it can be overtaken
    /// and no scheduler thread is held.
    pub first_inline: bool,
    /// Short request strings already in the VM (see `host::ShortStrings`).
    short_strings: host::ShortStrings,
}

impl Runtime {
    /// Builds the VM, loads every module (as version 1) and queues the app start.
    pub fn new(
        spec: SandboxSpec,
        host_fns: HostTable,
        history: Option<BTreeMap<String, crate::upgrade::ModuleHistory>>,
        node: &NodeLimits,
        events: Arc<EventLog>,
    ) -> Result<Runtime> {
        spec.validate(node)?;
        let vm = kernel::new_vm(
            &spec.id,
            &spec.limits,
            node,
            &spec.grants,
            &host_fns,
            events,
        )
        .map_err(|e| Error::Luau(e.to_string()))?;
        let engine = Engine::new(&vm.lua, spec.limits.max_versions)
            .map_err(|e| Error::Luau(e.to_string()))?;
        let kernel = kernel::kernel_handle(&vm.lua);
        if spec.test_clock {
            kernel.borrow().test_clock = Some(kernel::TestClock::starting_now());
        }
        let mut rt = Runtime {
            vm,
            kernel,
            engine,
            spec,
            host_fns,
            pending: VecDeque::new(),
            app_waiters: Vec::new(),
            app_start: None,
            retiring: false,
            first_inline: false,
            short_strings: host::ShortStrings::default(),
        };
        let globals = crate::vm::globals_for(&rt.spec.grants, &rt.host_fns);
        let cx = crate::upgrade::PrepareContext {
            known_globals: &globals,
            max_source_bytes: rt.spec.limits.max_source_bytes,
            files: &rt.spec.files,
        };
        let prepared = crate::upgrade::prepare(&rt.spec.modules, &cx)?;
        let targets = history
            .as_ref()
            .map(|h| h.iter().map(|(n, m)| (n.clone(), m.current)).collect());
        kernel::kernel_memory(&rt.vm.lua, &rt.spec.limits);
        let _scope = kernel::WatchScope::enter(&rt.vm.lua);
        match rt.engine.apply(
            &rt.vm,
            prepared,
            &ReloadOptions::default(),
            Direction::Up,
            targets.as_ref(),
        )? {
            Applied::Done(_) => {}
            Applied::Busy(_) => unreachable!("a new sandbox has no processes"),
        }
        if let Some(h) = history {
            // A restart keeps the version history.
            rt.engine.modules = h;
        }
        rt.engine.persist = true;
        if let Some(entry) = rt.spec.entry.clone() {
            rt.start_app(&entry)?;
        }
        Ok(rt)
    }

    fn lua(&self) -> &Lua {
        &self.vm.lua
    }
}
