//! Commands from the host (the embedding API, HTTP): calls, sends, spawns
//! and evals, each turned into a job for the kernel.
//!
//! # Invariants
//! * Host messages obey `max_message_bytes` like guest messages (measured
//!   as JSON), and a value the heap cannot hold is `out_of_memory`, after
//!   one collection, not the input's fault.
//! * An error answers the host's slot: no host command is left waiting.
//! * A pid addresses its serial; text resolves as it always has, and both
//!   agree on a pid's text.

use std::sync::Arc;

use mlua::Lua;
use serde_json::Value as Json;

use super::Runtime;
use crate::error::{Error, Result};
use crate::kernel::{self, CallNow, HostSlot, Job, Timer, Waiter, EVAL_MODULE};
use crate::pid::Target;
use crate::value::{json_to_lua, VmPid};

impl Runtime {
    /// The serial a host-side target addresses. A pid addresses its serial
    /// (its module part is informative); text resolves as it always has
    /// (`Kernel::resolve_str`). For a pid's text both agree: names never
    /// start with `<`, so the name lookup could not have found it.
    pub(super) fn resolve(&self, target: &Target) -> Result<u64> {
        resolve_in(&self.kernel.borrow(), target)
    }

    /// Host messages obey `max_message_bytes` like guest messages (measured as JSON).
    fn check_size(&self, v: &Json) -> Result<()> {
        let max = self.spec.limits.max_message_bytes;
        let size = crate::value::json_len(v);
        if size > max {
            return Err(Error::InvalidInput(format!(
                "message is {size} bytes as JSON; this sandbox's max_message_bytes is {max}"
            )));
        }
        Ok(())
    }

    /// Queues a host's call to `target`, answered through `slot` (or by its
    /// timeout after `timeout_ms`).
    pub fn host_call(
        &mut self,
        target: Target,
        request: Json,
        timeout_ms: u64,
        slot: Arc<HostSlot>,
    ) {
        self.host_call_with(target, request, timeout_ms, slot, false)
    }

    /// [`Runtime::host_call`], but when the runtime runs this command first
    /// in a slice on the caller's own thread (`Sandbox::call_blocking` on
    /// an idle sandbox) and the target is idle, its handler runs now
    /// ([`kernel::call_now`]): no registry slot for the request, no run
    /// queue, and a timeout timer only if the callback did not finish.
    pub fn host_call_now(
        &mut self,
        target: Target,
        request: Json,
        timeout_ms: u64,
        slot: Arc<HostSlot>,
    ) {
        let now = std::mem::take(&mut self.first_inline);
        self.host_call_with(target, request, timeout_ms, slot, now)
    }

    fn host_call_with(
        &mut self,
        target: Target,
        request: Json,
        timeout_ms: u64,
        slot: Arc<HostSlot>,
        now: bool,
    ) {
        let r = (|| -> Result<()> {
            self.check_size(&request)?;
            let (serial, started) = {
                let k = self.kernel.borrow();
                (resolve_in(&k, &target)?, k.timer_now())
            };
            // Converted once: handed to the callback now, or kept in the
            // registry while the call waits in the mailbox.
            let mut value = self.request_value(&request)?;
            if now {
                match kernel::call_now(self.lua(), &self.kernel, serial, value, &slot) {
                    Ok(CallNow::Finished) => return Ok(()),
                    // Its timeout runs from the call's start, not from
                    // the end of its first stretch.
                    Ok(CallNow::Pending) => {
                        self.arm_call_timeout(&target, started, timeout_ms, &slot);
                        return Ok(());
                    }
                    Err(handed_back) => value = handed_back,
                }
            }
            let key = registry_value(self.lua(), value)?;
            let job = Job::Call {
                request: Some(key),
                from: None,
                waiter: Waiter::Host(slot.clone()),
            };
            self.kernel
                .borrow()
                .deliver(serial, job)
                .map_err(|(e, _)| e)?;
            self.arm_call_timeout(&target, started, timeout_ms, &slot);
            Ok(())
        })();
        if let Err(e) = r {
            slot.answer(Err(e));
        }
    }

    /// A host's request as a Luau value ([`host_lua_value`]), a short
    /// string from [`ShortStrings`].
    fn request_value(&mut self, request: &Json) -> Result<mlua::Value> {
        match request {
            Json::String(text) if text.len() <= ShortStrings::MAX_LEN => {
                let lua = &self.vm.lua;
                let cache = &mut self.short_strings;
                with_memory_retry(lua, || cache.get(lua, text)).map(mlua::Value::String)
            }
            other => host_lua_value(self.lua(), other),
        }
    }

    /// Times out `slot`'s call to `target`, which started at `started`
    /// (`Kernel::timer_now`), after `timeout_ms`.
    fn arm_call_timeout(
        &self,
        target: &Target,
        started: u64,
        timeout_ms: u64,
        slot: &Arc<HostSlot>,
    ) {
        let mut k = self.kernel.borrow();
        let at = started.saturating_add(timeout_ms);
        let timer = k.add_timer(
            at,
            Timer::HostCallTimeout {
                slot: slot.clone(),
                target: target.as_str().to_owned(),
                ms: timeout_ms,
            },
        );
        slot.set_timer(timer);
    }

    pub fn host_send(&mut self, target: &Target, message: &Json, cast: bool) -> Result<()> {
        self.check_size(message)?;
        let serial = self.resolve(target)?;
        let value = self.request_value(message)?;
        let key = registry_value(self.lua(), value)?;
        let job = if cast { Job::Cast(key) } else { Job::Info(key) };
        self.kernel
            .borrow()
            .deliver(serial, job)
            .map_err(|(e, _)| e)
    }

    pub fn host_spawn(
        &mut self,
        module: &str,
        args: &Json,
        name: Option<&str>,
        slot: Arc<HostSlot>,
    ) {
        let r = (|| -> Result<()> {
            if let Some(n) = name {
                crate::config::validate_process_name(n)?;
            }
            let lua = self.lua();
            let k = self.kernel.borrow();
            let mid = k
                .module_id(module)
                .filter(|m| k.module_tables[*m as usize].is_some() && *m != 0)
                .ok_or_else(|| Error::NoModule(module.to_owned()))?;
            if !k.is_server_module(mid) {
                return Err(Error::InvalidInput(format!(
                    "module `{module}` has no `init` function, so it cannot run as a process"
                )));
            }
            drop(k);
            let key = host_value(lua, args)?;
            self.kernel
                .borrow()
                .create_process(mid, None, name, Some(key), Waiter::Host(slot.clone()))
                .map_err(|(e, _)| e)?;
            Ok(())
        })();
        if let Err(e) = r {
            slot.answer(Err(e));
        }
    }

    pub fn host_eval(&mut self, bytecode: &[u8], slot: Arc<HostSlot>) {
        let r = (|| -> Result<()> {
            let f = self
                .vm
                .load_guest("eval", bytecode)
                .map_err(|e| Error::Luau(e.to_string()))?;
            let lua = self.lua();
            let chunk = lua
                .create_registry_value(f)
                .map_err(|e| Error::Luau(e.to_string()))?;
            let mut k = self.kernel.borrow();
            if k.procs.len() >= k.limits.max_processes {
                return Err(Error::TooManyProcesses(k.limits.max_processes));
            }
            let serial = k.new_serial();
            let mid = k.module_id(EVAL_MODULE).expect("interned at start");
            let mut p = crate::kernel::Process::new(VmPid::new(mid, serial), None, 0);
            p.system = Some(Box::new(Job::Eval {
                chunk,
                waiter: Waiter::Host(slot.clone()),
            }));
            k.procs.insert(serial, Box::new(p));
            // eval processes have no init, so their state slot is a placeholder
            let _ = k.states.raw_set(serial, false);
            k.wake(serial);
            Ok(())
        })();
        if let Err(e) = r {
            slot.answer(Err(e));
        }
    }
}

/// The Luau strings of the short string requests a sandbox got lately
/// (`"inc"`, `"get"`), so a repeated one costs a hash lookup instead of
/// mlua's protected string creation (~130 ns, a tenth of a blocking host
/// call): what Erlang's atoms give a `gen_server:call` for free.
///
/// Bounded: at most [`ShortStrings::MAX_ENTRIES`] strings of at most
/// [`ShortStrings::MAX_LEN`] bytes (cleared when full), so at most a few
/// KB of the sandbox's heap stay referenced. Luau strings are immutable, so
/// handing the same one to many callbacks is the same as fresh copies.
#[derive(Default)]
pub(crate) struct ShortStrings(std::collections::HashMap<Box<str>, mlua::LuaString>);

impl ShortStrings {
    /// The longest request string kept.
    pub const MAX_LEN: usize = 32;
    /// How many are kept at most.
    pub const MAX_ENTRIES: usize = 64;

    fn get(&mut self, lua: &Lua, text: &str) -> mlua::Result<mlua::LuaString> {
        if let Some(s) = self.0.get(text) {
            return Ok(s.clone());
        }
        let s = lua.create_string(text)?;
        if text.len() <= Self::MAX_LEN {
            if self.0.len() >= Self::MAX_ENTRIES {
                self.0.clear();
            }
            self.0.insert(text.into(), s.clone());
        }
        Ok(s)
    }
}

/// The serial `target` addresses in `k` (see [`Runtime::resolve`]).
fn resolve_in(k: &kernel::Kernel, target: &Target) -> Result<u64> {
    let serial = match target.as_pid() {
        Some(pid) => Some(pid.serial()).filter(|s| k.procs.contains_key(s)),
        None => k.resolve_str(target.as_str()),
    };
    serial.ok_or_else(|| Error::NoProcess(target.as_str().to_owned()))
}

/// A host's JSON value as a Luau value. A full heap is collected once
/// before the conversion is refused, and a refusal for memory is
/// `out_of_memory`, not the input's fault.
pub(super) fn host_lua_value(lua: &Lua, v: &Json) -> Result<mlua::Value> {
    with_memory_retry(lua, || json_to_lua(lua, v))
}

/// A host's JSON value as a Luau value held in the registry (for a job
/// that waits in a mailbox), with [`host_lua_value`]'s handling of memory.
pub(super) fn host_value(lua: &Lua, v: &Json) -> Result<mlua::RegistryKey> {
    registry_value(lua, host_lua_value(lua, v)?)
}

/// `value` held in the registry, with [`host_lua_value`]'s handling of
/// memory.
fn registry_value(lua: &Lua, value: mlua::Value) -> Result<mlua::RegistryKey> {
    with_memory_retry(lua, || lua.create_registry_value(&value))
}

fn with_memory_retry<T>(lua: &Lua, mut convert: impl FnMut() -> mlua::Result<T>) -> Result<T> {
    let first = match convert() {
        Err(mlua::Error::MemoryError(_)) => {
            let _ = lua.gc_collect();
            convert()
        }
        other => other,
    };
    first.map_err(|e| match e {
        mlua::Error::MemoryError(_) => Error::OutOfMemory(format!(
            "the sandbox's heap ({} bytes used) cannot hold this value",
            lua.used_memory()
        )),
        other => Error::InvalidInput(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::ShortStrings;

    #[test]
    fn short_strings_stay_bounded_and_keep_only_short_requests() {
        let lua = mlua::Lua::new();
        let mut cache = ShortStrings::default();
        for i in 0..1000 {
            let text = format!("op{i}");
            assert_eq!(cache.get(&lua, &text).unwrap().to_str().unwrap(), text);
            assert!(cache.0.len() <= ShortStrings::MAX_ENTRIES);
        }
        let again = cache.get(&lua, "op999").unwrap();
        assert_eq!(again.to_str().unwrap(), "op999");
        let long = "x".repeat(ShortStrings::MAX_LEN + 1);
        assert_eq!(cache.get(&lua, &long).unwrap().to_str().unwrap(), long);
        assert!(
            !cache.0.contains_key(long.as_str()),
            "long strings are not kept"
        );
    }
}
