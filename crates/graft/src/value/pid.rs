//! Process identifiers: a module index and a serial packed in 64 bits, below
//! [`MARKER_BASE`](super::MARKER_BASE) so a pid never reads as a job marker.

use std::fmt;

use mlua::{LightUserData, Value};

use super::MARKER_BASE;

const SERIAL_BITS: u32 = 40;
const SERIAL_MASK: u64 = (1 << SERIAL_BITS) - 1;

/// A process identifier, unique within its sandbox for the sandbox's lifetime
/// (serials are never reused).
///
/// ```
/// let pid = graft::Pid::new(3, 7);
/// assert_eq!(pid.serial(), 7);
/// assert_eq!(pid.module_index(), 3);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(u64);

impl Pid {
    /// Builds a pid from the interned module index and the process serial.
    pub fn new(module_index: u32, serial: u64) -> Pid {
        debug_assert!(serial > 0 && serial <= SERIAL_MASK);
        Pid(((module_index as u64) << SERIAL_BITS) | (serial & SERIAL_MASK))
    }
    /// The process serial: 1, 2, 3 … in spawn order.
    pub fn serial(self) -> u64 {
        self.0 & SERIAL_MASK
    }
    /// The index of the pid's module in its sandbox's module-name table.
    pub fn module_index(self) -> u32 {
        (self.0 >> SERIAL_BITS) as u32
    }
    pub(crate) fn to_lua(self) -> Value {
        Value::LightUserData(LightUserData(self.0 as usize as *mut std::ffi::c_void))
    }
    pub(crate) fn from_lua(v: &Value) -> Option<Pid> {
        match v {
            Value::LightUserData(ud) => Pid::from_raw(ud.0 as usize as u64),
            _ => None,
        }
    }
    /// The pid a light userdata's bits stand for, if they are one.
    pub(crate) fn from_raw(raw: u64) -> Option<Pid> {
        // Job markers live above the pid range.
        (raw & SERIAL_MASK != 0 && raw < MARKER_BASE).then_some(Pid(raw))
    }
    /// The bits of its light userdata.
    pub(crate) fn raw(self) -> u64 {
        self.0
    }
    /// Parses the serial out of `"<module.serial>"` (the module part is informative).
    pub fn parse_serial(s: &str) -> Option<u64> {
        let inner = s.strip_prefix('<')?.strip_suffix('>')?;
        let (_, serial) = inner.rsplit_once('.')?;
        serial.parse().ok().filter(|n| *n > 0 && *n <= SERIAL_MASK)
    }
}

impl fmt::Debug for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pid({}.{})", self.module_index(), self.serial())
    }
}
