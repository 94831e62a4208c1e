//! A kernel driven on the test's own thread, without a node: a VM with
//! modules loaded the way a sandbox's creation loads them (the upgrade
//! engine's first apply), run slice by slice until nothing is left to do.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mlua::Lua;
use serde_json::Value as Json;
use tokio::sync::oneshot;

use super::{
    kernel, kernel_handle, kernel_memory, new_vm, run_slice, HostSlot, Job, KernelGuard, Waiter,
    WatchScope,
};
use crate::clock;
use crate::config::{Limits, NodeLimits};
use crate::error::Error;
use crate::upgrade::{prepare, Applied, Direction, Engine, PrepareContext, ReloadOptions};
use crate::vm::Vm;

/// A test module: a server that does what a request says and keeps every
/// message it gets in `state.inbox`.
pub(super) const PROBE: &str = r#"
local probe = {}
function probe.init(args)
  return { inbox = {} }
end
function probe.handle_call(req, from, state)
  if req.op == "ping" then return "pong", state end
  if req.op == "inbox" then return state.inbox, state end
  if req.op == "crash" then error("boom") end
  if req.op == "link" then return graft.link(graft.whereis(req.target)), state end
  if req.op == "monitor" then return graft.monitor(graft.whereis(req.target)), state end
  if req.op == "trap" then return graft.trap_exit(req.flag), state end
  if req.op == "call" then
    local ok, r = pcall(graft.call, req.target, req.req, req.timeout)
    if ok then return { ok = true, reply = r }, state end
    return { ok = false, err = tostring(r) }, state
  end
  if req.op == "send_after" then
    return graft.send_after(req.ms, graft.self(), req.msg), state
  end
  if req.op == "cancel" then return graft.cancel_timer(req.id), state end
  error("unknown op " .. tostring(req.op))
end
function probe.handle_info(msg, state)
  table.insert(state.inbox, msg)
  return state
end
return probe
"#;

/// A sandbox's VM and kernel, run by the test.
pub(super) struct TestKernel {
    vm: Vm,
    _engine: Engine,
    /// The VM's interrupt reads the coarse clock, which ticks only while a
    /// guard lives; here there is no node to hold one.
    _clock: clock::ClockGuard,
}

impl TestKernel {
    /// A kernel with these modules loaded (as version 1).
    pub fn new(modules: &[(&str, &str)]) -> TestKernel {
        let clock = clock::ClockGuard::acquire();
        let limits = Limits::default();
        let host_fns = BTreeMap::new();
        let vm = new_vm(
            "test",
            &limits,
            &NodeLimits::default(),
            &[],
            &host_fns,
            crate::events::EventLog::in_memory(1000),
        )
        .expect("a VM");
        let mut engine = Engine::new(&vm.lua, limits.max_versions).expect("an engine");
        let sources: BTreeMap<String, String> = modules
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect();
        let globals = crate::vm::globals_for(&[], &host_fns);
        let files = BTreeMap::new();
        let cx = PrepareContext {
            known_globals: &globals,
            max_source_bytes: limits.max_source_bytes,
            files: &files,
        };
        let prepared = prepare(&sources, &cx).expect("modules that compile");
        kernel_memory(&vm.lua, &limits);
        {
            let _scope = WatchScope::enter(&vm.lua);
            let opts = ReloadOptions::default();
            match engine.apply(&vm, prepared, &opts, Direction::Up, None) {
                Ok(Applied::Done(_)) => {}
                _ => panic!("the modules did not load"),
            }
        }
        TestKernel {
            vm,
            _engine: engine,
            _clock: clock,
        }
    }

    pub fn lua(&self) -> &Lua {
        &self.vm.lua
    }

    pub fn k(&self) -> KernelGuard {
        kernel(&self.vm.lua)
    }

    /// Runs time slices until no process is runnable (timers not yet due
    /// stay pending).
    pub fn settle(&self) {
        let _scope = WatchScope::enter(self.lua());
        for _ in 0..10_000 {
            if !run_slice(self.lua(), &kernel_handle(self.lua())) {
                return;
            }
        }
        panic!("the kernel never settled");
    }

    /// Sleeps until the next timer is due (if one is, within a second) and
    /// settles; returns whether there was one.
    fn next_timer(&self) -> bool {
        let next = self.k().next_timer_at();
        match next {
            Some(at) if at <= clock::precise_ms() + 1000 => {
                std::thread::sleep(Duration::from_millis(
                    at.saturating_sub(clock::precise_ms()),
                ));
                self.settle();
                true
            }
            _ => false,
        }
    }

    /// Settles, then fires every timer due within a second.
    pub fn run_timers(&self) {
        self.settle();
        while self.next_timer() {}
    }

    /// Runs the kernel until `rx` is answered (firing timers as they fall due).
    fn answer_of(&self, rx: &mut oneshot::Receiver<Result<Json, Error>>) -> Result<Json, Error> {
        self.settle();
        loop {
            if let Ok(answer) = rx.try_recv() {
                return answer;
            }
            assert!(self.next_timer(), "no answer and nothing left to run");
        }
    }

    fn slot() -> (Arc<HostSlot>, oneshot::Receiver<Result<Json, Error>>) {
        let (tx, rx) = oneshot::channel();
        (HostSlot::new(tx), rx)
    }

    /// Spawns a process of `module` as a host would; returns its serial.
    pub fn spawn(&self, module: &str, name: Option<&str>) -> u64 {
        let (slot, mut rx) = Self::slot();
        let serial = {
            let mut k = self.k();
            let mid = k.module_id(module).expect("a loaded module");
            k.create_process(mid, None, name, None, Waiter::Host(slot))
                .map_err(|(e, _)| e)
                .expect("a process")
        };
        self.answer_of(&mut rx).expect("init succeeded");
        serial
    }

    /// Calls a process as a host would and runs the kernel until it answered.
    pub fn call(&self, serial: u64, request: Json) -> Result<Json, Error> {
        let (slot, mut rx) = Self::slot();
        {
            let lua = self.lua();
            let v = crate::value::json_to_lua(lua, &request).expect("a request");
            let key = lua.create_registry_value(v).expect("a registry key");
            let job = Job::Call {
                request: Some(key),
                from: None,
                waiter: Waiter::Host(slot),
            };
            self.k().deliver(serial, job).map_err(|(e, _)| e)?;
        }
        self.answer_of(&mut rx)
    }

    /// Whether process `serial` is alive.
    pub fn alive(&self, serial: u64) -> bool {
        self.k().procs.contains_key(&serial)
    }
}
