//! Canary watch: after a reload with `canary_ms`, crashes of upgraded
//! processes inside the window roll the reload back automatically.
//!
//! The kernel counts crashes (it sees every exit); the node runtime, which
//! owns the engine, performs the rollback after the current time slice.

use mlua::Lua;

use crate::sandbox::kernel;
use crate::value::ExitReason;

/// What a canary watches and what it would roll back to.
#[derive(Clone, Debug)]
pub(crate) struct CanaryWatch {
    /// (module index, upgraded version, version to roll back to, module name)
    pub modules: Vec<(u32, u32, u32, String)>,
    pub crashes_allowed: u32,
    pub crashes: u32,
    pub last_reason: Option<String>,
    pub timer: u64,
}

impl CanaryWatch {
    /// Counts an abnormal exit of a process running an upgraded version.
    pub fn note_exit(&mut self, module: u32, version: u32, reason: &ExitReason) {
        if self
            .modules
            .iter()
            .any(|(m, v, _, _)| *m == module && *v == version)
        {
            self.crashes += 1;
            self.last_reason = Some(reason.to_string());
        }
    }
    /// Whether enough crashes happened to roll back.
    pub fn tripped(&self) -> bool {
        self.crashes >= self.crashes_allowed.max(1)
    }
}

/// The window closed without enough crashes: the upgrade stands.
pub(crate) fn canary_expired(lua: &Lua) {
    let mut k = kernel(lua);
    if let Some(c) = k.canary.take() {
        let modules: Vec<&String> = c.modules.iter().map(|m| &m.3).collect();
        let detail = serde_json::json!({ "modules": modules, "crashes": c.crashes });
        k.event("canary_passed", detail);
    }
}
