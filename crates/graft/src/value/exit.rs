//! Exit reasons: why a process stopped, as the host and linked processes see it.

use std::fmt;

use mlua::{Lua, Value};
use serde_json::Value as Json;

use super::json_to_lua;

/// Why a process exited. Atoms travel into Luau as strings; errors as
/// `{ error = message, traceback = text }`.
///
/// `OutOfMemory`, `Timeout` and `StackOverflow` are only ever the runtime's
/// word, read from typed signals (the CPU watch, the status and depth of the
/// thread Luau ended): an error whose text says `not enough memory` is an
/// `Error`, and `graft.exit("timeout")` is `Other`. `Other` is the open arm
/// for any reason a guest gives.
///
/// ```
/// use graft::ExitReason;
/// assert_eq!(ExitReason::StackOverflow.kind(), "stack_overflow");
/// assert!(ExitReason::Normal.is_normal());
/// let given = ExitReason::Other { value: serde_json::json!("timeout") };
/// assert_eq!(given.kind(), "other");
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum ExitReason {
    /// Finished normally: links are not affected.
    Normal,
    /// Stopped by its supervisor or the sandbox.
    Shutdown,
    /// Killed unconditionally (`kill` signal, or a shutdown timeout).
    Killed,
    /// An allocation failed against the sandbox's `memory_bytes`.
    OutOfMemory,
    /// A callback ran past the sandbox's `handler_ms`.
    Timeout,
    /// The Luau stack overflowed (runaway recursion).
    StackOverflow,
    /// A Luau error inside a callback.
    Error {
        /// The error message.
        message: String,
        /// The Luau traceback at the error site (guest frames only).
        traceback: String,
        /// The module whose code raised, where known.
        #[serde(skip_serializing_if = "Option::is_none")]
        module: Option<String>,
        /// The line that raised, where known.
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u32>,
    },
    /// A reason given by `graft.exit(reason)` that is none of the above.
    Other {
        /// The reason as plain data.
        value: Json,
    },
}

impl ExitReason {
    /// True for the reasons that do not take linked processes down.
    pub fn is_normal(&self) -> bool {
        matches!(self, ExitReason::Normal)
    }

    /// The short machine name: `normal`, `error`, `timeout`, …
    pub fn kind(&self) -> &'static str {
        match self {
            ExitReason::Normal => "normal",
            ExitReason::Shutdown => "shutdown",
            ExitReason::Killed => "killed",
            ExitReason::OutOfMemory => "out_of_memory",
            ExitReason::Timeout => "timeout",
            ExitReason::StackOverflow => "stack_overflow",
            ExitReason::Error { .. } => "error",
            ExitReason::Other { .. } => "other",
        }
    }

    /// Reads a reason given by guest code (`graft.exit(reason)`, an exit
    /// signal). The OTP atoms `normal`, `shutdown` and `killed` are theirs to
    /// give; the limits (`out_of_memory`, `timeout`, `stack_overflow`) are
    /// only ever the kernel's word, so a guest naming one gives an `Other`
    /// reason with that value: no guest can pass its exit off as a limit.
    pub(crate) fn from_json(v: Json) -> ExitReason {
        match v.as_str() {
            Some("normal") => ExitReason::Normal,
            Some("shutdown") => ExitReason::Shutdown,
            Some("killed") => ExitReason::Killed,
            _ => ExitReason::Other { value: v },
        }
    }

    /// The reason as a Luau value, as `handle_info` sees it in EXIT/DOWN messages.
    pub(crate) fn to_lua(&self, lua: &Lua) -> mlua::Result<Value> {
        Ok(match self {
            ExitReason::Error {
                message, traceback, ..
            } => {
                let t = lua.create_table()?;
                t.raw_set("error", message.as_str())?;
                t.raw_set("traceback", traceback.as_str())?;
                Value::Table(t)
            }
            ExitReason::Other { value } => json_to_lua(lua, value)?,
            other => Value::String(lua.create_string(other.kind())?),
        })
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Error { message, .. } => write!(f, "error: {message}"),
            ExitReason::Other { value } => write!(f, "{value}"),
            other => f.write_str(other.kind()),
        }
    }
}
