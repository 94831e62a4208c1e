//! Process identifiers as the VM holds them: a module index and a serial
//! packed in 64 bits, below [`MARKER_BASE`](super::MARKER_BASE) so a pid
//! never reads as a job marker.
//!
//! This is the kernel's own form (a Luau light userdata). Hosts never see
//! it: the API speaks [`crate::Pid`], the text `"<module.serial>"`.

use std::fmt;

use mlua::{LightUserData, Value};

use super::MARKER_BASE;

pub(crate) const SERIAL_BITS: u32 = 40;
pub(crate) const SERIAL_MASK: u64 = (1 << SERIAL_BITS) - 1;

/// A process identifier inside a VM (`pub` only because the hidden
/// `internals::lua_to_json` names it; unreachable otherwise), unique within its sandbox for the
/// sandbox's lifetime (serials are never reused).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmPid(u64);

impl VmPid {
    /// Builds a pid from the interned module index and the process serial.
    pub(crate) fn new(module_index: u32, serial: u64) -> VmPid {
        debug_assert!(serial > 0 && serial <= SERIAL_MASK);
        VmPid(((module_index as u64) << SERIAL_BITS) | (serial & SERIAL_MASK))
    }
    /// The process serial: 1, 2, 3 … in spawn order.
    pub(crate) fn serial(self) -> u64 {
        self.0 & SERIAL_MASK
    }
    /// The index of the pid's module in its sandbox's module-name table.
    pub(crate) fn module_index(self) -> u32 {
        (self.0 >> SERIAL_BITS) as u32
    }
    pub(crate) fn to_lua(self) -> Value {
        Value::LightUserData(LightUserData(self.0 as usize as *mut std::ffi::c_void))
    }
    pub(crate) fn from_lua(v: &Value) -> Option<VmPid> {
        match v {
            Value::LightUserData(ud) => VmPid::from_raw(ud.0 as usize as u64),
            _ => None,
        }
    }
    /// The pid a light userdata's bits stand for, if they are one.
    pub(crate) fn from_raw(raw: u64) -> Option<VmPid> {
        // Job markers live above the pid range.
        (raw & SERIAL_MASK != 0 && raw < MARKER_BASE).then_some(VmPid(raw))
    }
    /// The bits of its light userdata.
    pub(crate) fn raw(self) -> u64 {
        self.0
    }
    /// Parses the serial out of `"<module.serial>"` (the module part is informative).
    pub(crate) fn parse_serial(s: &str) -> Option<u64> {
        let inner = s.strip_prefix('<')?.strip_suffix('>')?;
        let (_, serial) = inner.rsplit_once('.')?;
        serial.parse().ok().filter(|n| *n > 0 && *n <= SERIAL_MASK)
    }
}

impl fmt::Debug for VmPid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmPid({}.{})", self.module_index(), self.serial())
    }
}
