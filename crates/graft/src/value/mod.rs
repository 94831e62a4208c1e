//! Plain data at the boundaries: pids, exit reasons and the JSON ↔ Luau mapping.
//!
//! Messages and states are plain data: nil, booleans, numbers, strings, pids
//! and tables of those. Inside a sandbox a pid is a Luau light userdata (an
//! immediate value: no allocation, compares by value, usable as a table key,
//! and impossible for guest code to forge). At the JSON boundary a pid is a
//! string `"<module.serial>"`.
//!
//! Mapping rules (documented in `docs/guest-api.md` §7):
//! * JSON objects become tables with string keys; arrays become sequences 1..n.
//! * A table whose keys are exactly `1..n` (n ≥ 1) becomes an array; any other
//!   table becomes an object whose keys are written as strings (integers in
//!   decimal, other numbers in shortest form, `true`/`false`, pids); two keys
//!   written alike are an error; an empty table becomes `{}`.
//! * Integral numbers within ±2^53 are written as JSON integers; NaN and
//!   infinities are an error.
//! * A shared table is written once per reference; a table that is its own
//!   ancestor is [`ValueError::Cyclic`]; the JSON text is counted as it is
//!   produced and capped ([`ValueError::TooLarge`]), so the work is linear in
//!   the output however the input shares its tables.
//!
//! Invariant: no guest value reaches a panic here (no indexing that can fail,
//! no unwrap), and every step of [`lua_to_json`] charges output bytes.

//!
//! Layout: `pid` (process identifiers as the VM holds them; the API's
//! [`Pid`](crate::Pid) is their text form), [`exit`](ExitReason) (exit
//! reasons), `to_json` ([`lua_to_json`]), `from_json` (JSON → Luau),
//! `estimate` (memory estimates). This module imports no other module of
//! the crate: `error`, `vm` and the kernel build on it, never the reverse.

mod estimate;
mod exit;
mod from_json;
mod pid;
pub(crate) mod to_json;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use mlua::{LightUserData, Value};

pub(crate) use estimate::{estimate_size, json_len};
pub use exit::ExitReason;
pub use from_json::check_json_depth;
pub(crate) use from_json::json_to_lua;
pub(crate) use pid::{VmPid, SERIAL_MASK};
pub(crate) use to_json::lua_to_json;
pub use to_json::ValueError;

/// Maximum nesting accepted at the JSON boundary (and inside the VM for
/// messages). Deeper values are rejected rather than risking the native stack.
pub const MAX_DEPTH: usize = 64;

/// Job markers and other internal light userdata live at and above this
/// value; pids stay below it. Both pids and markers are light userdata, so
/// they share one number space, and this boundary is what tells them apart.
pub(crate) const MARKER_BASE: u64 = 1 << 62;
/// The marker a finished callback yields to the kernel.
pub(crate) const MARK_DONE: u64 = MARKER_BASE + 1;
/// The marker a callback yields to wait for a reply.
pub(crate) const MARK_AWAIT: u64 = MARKER_BASE + 3;
/// The marker a finished nested callback yields when its worker already
/// closed its nested frame (see `kernel::fast::yield_done`); only the
/// prelude, which resumes nested jobs, ever sees it.
pub(crate) const MARK_CLOSED: u64 = MARKER_BASE + 5;

/// The light userdata standing for marker `v`.
pub(crate) fn marker(v: u64) -> Value {
    Value::LightUserData(LightUserData(v as usize as *mut std::ffi::c_void))
}

/// The marker a value stands for, if it is one (pids are not).
pub(crate) fn marker_of(v: &Value) -> Option<u64> {
    match v {
        Value::LightUserData(ud) if (ud.0 as usize as u64) >= MARKER_BASE => {
            Some(ud.0 as usize as u64)
        }
        _ => None,
    }
}
