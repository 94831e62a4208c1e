//! Process ids and call targets as the API speaks them: [`Pid`] and [`Target`].
//!
//! Why these types exist: the API used to take every target as `&str` and
//! hand every pid back as a `String`, so nothing told a pid from a name, a
//! pid copied from a listing could not be checked before it was used, and
//! each embedder re-parsed `"<module.N>"` by hand. A [`Pid`] is checked once,
//! when it is made; a [`Target`] says which of the two it holds. Both keep
//! the text form the HTTP API and the CLI have always used, so no JSON
//! changes.
//!
//! Invariants:
//! * A [`Pid`] is always valid. Its text is `<module.serial>`, where
//!   `module` is a module name (dot-separated identifiers, each
//!   `[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes) or `$eval` (the
//!   pseudo-module of [`Sandbox::eval`](crate::Sandbox::eval) processes),
//!   and `serial` is a decimal number in `1..=`[`MAX_SERIAL`] written without
//!   sign or leading zeros. A pid is therefore at most [`MAX_PID_BYTES`]
//!   bytes, parsing reads at most that many bytes of any input, and
//!   `pid.to_string()` is exactly the text it was parsed from (which is also
//!   its serde form).
//! * A pid addresses a process of one sandbox by its serial; the module part
//!   is informative (the runtime has always read it so: `<a.7>` and `<b.7>`
//!   address the same process). Serials are never reused within a sandbox's
//!   life, but restart at 1 in a sandbox restored from disk, so a pid is not
//!   a durable address; a registered name is.
//! * A [`Target`] is a pid or a text. From text it is classified as the
//!   runtime has always read a target: a pid's text becomes a pid; any other
//!   text is kept as given and resolved at the call, first as a registered
//!   name, then as a lax pid text (`<m.007>`) or a bare serial (`7`), which
//!   the HTTP API documents. Registered names can never read as a pid or a
//!   serial ([`validate_process_name`](crate::config::validate_process_name)),
//!   so the order decides only for texts like `+7`. A text that addresses no
//!   process (an invalid name, hostile bytes) is refused at the call with
//!   [`Error::NoProcess`](crate::Error::NoProcess), as it always was.
//!
//! This module imports only [`crate::value`], so `config` and `error` can
//! build on it without an import circle.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use crate::value::SERIAL_MASK;

/// The largest serial a pid can carry (2^40 − 1): serials are packed in 40
/// bits inside the VM.
///
/// ```
/// use graft::{pid::MAX_SERIAL, Pid};
/// assert!(format!("<m.{MAX_SERIAL}>").parse::<Pid>().is_ok());
/// assert!(format!("<m.{}>", MAX_SERIAL + 1).parse::<Pid>().is_err());
/// ```
pub const MAX_SERIAL: u64 = SERIAL_MASK;

/// The longest module name, in bytes (as [`crate::config::validate_module_name`]).
const MAX_MODULE_BYTES: usize = 128;

/// The longest pid text, in bytes: `<`, a 128-byte module name, `.`, the 13
/// digits of [`MAX_SERIAL`], `>`. Longer text is refused before it is read.
///
/// ```
/// use graft::{pid::MAX_PID_BYTES, ParsePidError, Pid};
/// let huge = format!("<{}.1>", "m".repeat(1 << 20));
/// assert_eq!(huge.parse::<Pid>(), Err(ParsePidError::TooLong(huge.len())));
/// assert_eq!(MAX_PID_BYTES, 144);
/// ```
pub const MAX_PID_BYTES: usize = 1 + MAX_MODULE_BYTES + 1 + 13 + 1;

/// The pseudo-module of eval processes (`kernel::EVAL_MODULE`).
const EVAL_MODULE: &str = "$eval";

/// Whether `name` is a module name: dot-separated identifiers, at most 128
/// bytes. The one rule, shared with [`crate::config::validate_module_name`].
pub(crate) fn is_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MODULE_BYTES
        && name.split('.').all(|part| {
            let mut bytes = part.bytes();
            matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// A process id: `<module.serial>`, checked when it is made (see the
/// [module docs](self) for what a valid pid is).
///
/// Pids come from [`Sandbox::spawn`](crate::Sandbox::spawn) and
/// [`Sandbox::processes`](crate::Sandbox::processes), or from text with
/// [`str::parse`]. They display, and serialize, as the same text.
///
/// ```
/// use graft::Pid;
/// let pid: Pid = "<chat.room.7>".parse().unwrap();
/// assert_eq!(pid.module(), "chat.room");
/// assert_eq!(pid.serial(), 7);
/// assert_eq!(pid.to_string(), "<chat.room.7>");
/// assert_eq!(serde_json::to_string(&pid).unwrap(), r#""<chat.room.7>""#);
/// assert!("<chat.room.07>".parse::<Pid>().is_err());
/// assert!("chat.room".parse::<Pid>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pid {
    /// The canonical text, `<module.serial>`.
    text: Box<str>,
    /// The serial the text ends with.
    serial: u64,
}

impl Pid {
    /// The pid of a live process, from the kernel's own module name and
    /// serial (trusted: module names are checked when modules load).
    pub(crate) fn from_parts(module: &str, serial: u64) -> Pid {
        Pid {
            text: format!("<{module}.{serial}>").into_boxed_str(),
            serial,
        }
    }

    /// The module the process was spawned from (informative: the serial
    /// alone addresses the process).
    ///
    /// ```
    /// let pid: graft::Pid = "<counter.3>".parse().unwrap();
    /// assert_eq!(pid.module(), "counter");
    /// ```
    pub fn module(&self) -> &str {
        // `<` + module + `.` + digits + `>`: the last `.` precedes the serial.
        let inner = &self.text[1..self.text.len() - 1];
        inner.rsplit_once('.').map_or(inner, |(module, _)| module)
    }

    /// The serial: 1, 2, 3 … in spawn order within the sandbox.
    ///
    /// ```
    /// let pid: graft::Pid = "<counter.3>".parse().unwrap();
    /// assert_eq!(pid.serial(), 3);
    /// ```
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The text, `<module.serial>`, as on the wire.
    ///
    /// ```
    /// let pid: graft::Pid = "<counter.3>".parse().unwrap();
    /// assert_eq!(pid.as_str(), "<counter.3>");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Why a text is not a [`Pid`]. The text itself is not repeated (it may be
/// huge or hold control characters); the caller has it.
///
/// ```
/// use graft::{ParsePidError, Pid};
/// assert_eq!("<counter.0>".parse::<Pid>(), Err(ParsePidError::Serial));
/// assert_eq!("counter".parse::<Pid>(), Err(ParsePidError::Shape));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParsePidError {
    /// Longer than [`MAX_PID_BYTES`]; the length in bytes.
    #[error("a pid is at most {MAX_PID_BYTES} bytes, this text is {0}")]
    TooLong(usize),
    /// Not `<…>` around a module and a serial separated by a `.`.
    #[error("a pid reads `<module.serial>`, like `<counter.7>`")]
    Shape,
    /// The module part is not a module name (nor `$eval`).
    #[error("the module part of a pid is a module name (dot-separated identifiers) or `$eval`")]
    Module,
    /// The serial is not a number in `1..=MAX_SERIAL` without sign or
    /// leading zeros.
    #[error(
        "the serial of a pid is a number from 1 to {MAX_SERIAL}, without sign or leading zeros"
    )]
    Serial,
}

impl FromStr for Pid {
    type Err = ParsePidError;

    /// Parses `<module.serial>`; see the [module docs](self) for the rules.
    fn from_str(s: &str) -> Result<Pid, ParsePidError> {
        // Bounded first: nothing below reads more than MAX_PID_BYTES.
        if s.len() > MAX_PID_BYTES {
            return Err(ParsePidError::TooLong(s.len()));
        }
        let inner = s
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .ok_or(ParsePidError::Shape)?;
        let (module, digits) = inner.rsplit_once('.').ok_or(ParsePidError::Shape)?;
        if module != EVAL_MODULE && !is_module_name(module) {
            return Err(ParsePidError::Module);
        }
        // Canonical digits only, so the text is the one the runtime writes
        // and two texts of one pid compare equal.
        let canonical = !digits.is_empty()
            && digits.len() <= 13
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        let serial = canonical
            .then(|| digits.parse::<u64>().ok())
            .flatten()
            .filter(|n| (1..=MAX_SERIAL).contains(n))
            .ok_or(ParsePidError::Serial)?;
        Ok(Pid {
            text: s.into(),
            serial,
        })
    }
}

impl TryFrom<&str> for Pid {
    type Error = ParsePidError;
    fn try_from(s: &str) -> Result<Pid, ParsePidError> {
        s.parse()
    }
}

impl TryFrom<String> for Pid {
    type Error = ParsePidError;
    fn try_from(s: String) -> Result<Pid, ParsePidError> {
        s.parse()
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pid({})", self.text)
    }
}

/// Spawn order: by serial (then by text, to agree with `Eq`).
impl Ord for Pid {
    fn cmp(&self, other: &Pid) -> Ordering {
        self.serial
            .cmp(&other.serial)
            .then_with(|| self.text.cmp(&other.text))
    }
}

impl PartialOrd for Pid {
    fn partial_cmp(&self, other: &Pid) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl AsRef<str> for Pid {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl Borrow<str> for Pid {
    fn borrow(&self) -> &str {
        &self.text
    }
}

impl PartialEq<str> for Pid {
    fn eq(&self, other: &str) -> bool {
        &*self.text == other
    }
}

impl PartialEq<&str> for Pid {
    fn eq(&self, other: &&str) -> bool {
        &*self.text == *other
    }
}

impl PartialEq<String> for Pid {
    fn eq(&self, other: &String) -> bool {
        *self.text == **other
    }
}

impl PartialEq<Pid> for str {
    fn eq(&self, other: &Pid) -> bool {
        *self == *other.text
    }
}

impl PartialEq<Pid> for &str {
    fn eq(&self, other: &Pid) -> bool {
        **self == *other.text
    }
}

impl PartialEq<Pid> for String {
    fn eq(&self, other: &Pid) -> bool {
        **self == *other.text
    }
}

impl serde::Serialize for Pid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Pid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Pid, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Pid;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a pid string `<module.serial>`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Pid, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// What a call, cast, send or state request addresses: a [`Pid`] or a text
/// (a registered name, as a rule). Every [`Sandbox`](crate::Sandbox) method
/// that addresses a process takes `impl Into<Target>`, so a `&str`, a
/// `String`, a `Pid` or a `&Pid` all work.
///
/// From text, a pid's text becomes a pid and anything else stays text,
/// resolved at the call as the [module docs](self) say; text that addresses
/// nothing is refused there with [`Error::NoProcess`](crate::Error::NoProcess).
///
/// ```
/// use graft::{Pid, Target};
/// let pid: Pid = "<counter.7>".parse().unwrap();
/// assert_eq!(Target::from(&pid).as_pid(), Some(&pid));
/// assert_eq!(Target::from("<counter.7>").as_pid(), Some(&pid));
/// assert_eq!(Target::from("counter").as_name(), Some("counter"));
/// // Not a pid's text: kept as given, resolved (or refused) at the call.
/// assert_eq!(Target::from("<counter.07>").as_name(), Some("<counter.07>"));
/// assert_eq!(Target::from("counter").to_string(), "counter");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Target(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Pid(Pid),
    Text(Box<str>),
}

impl Target {
    /// The pid, if this target is one.
    ///
    /// ```
    /// assert!(graft::Target::from("<m.1>").as_pid().is_some());
    /// assert!(graft::Target::from("worker").as_pid().is_none());
    /// ```
    pub fn as_pid(&self) -> Option<&Pid> {
        match &self.0 {
            Repr::Pid(p) => Some(p),
            Repr::Text(_) => None,
        }
    }

    /// The text, if this target is not a pid: a registered name, or a lax
    /// form the runtime also reads (a bare serial `7`, `<m.007>`).
    ///
    /// ```
    /// assert_eq!(graft::Target::from("worker").as_name(), Some("worker"));
    /// assert_eq!(graft::Target::from("<m.1>").as_name(), None);
    /// ```
    pub fn as_name(&self) -> Option<&str> {
        match &self.0 {
            Repr::Pid(_) => None,
            Repr::Text(t) => Some(t),
        }
    }

    /// The target as text, as error messages and the wire show it.
    ///
    /// ```
    /// assert_eq!(graft::Target::from("<m.1>").as_str(), "<m.1>");
    /// ```
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Pid(p) => p.as_str(),
            Repr::Text(t) => t,
        }
    }
}

impl From<Pid> for Target {
    fn from(pid: Pid) -> Target {
        Target(Repr::Pid(pid))
    }
}

impl From<&Pid> for Target {
    fn from(pid: &Pid) -> Target {
        Target(Repr::Pid(pid.clone()))
    }
}

impl From<&Target> for Target {
    fn from(t: &Target) -> Target {
        t.clone()
    }
}

impl From<&str> for Target {
    fn from(s: &str) -> Target {
        match s.parse::<Pid>() {
            Ok(pid) => Target(Repr::Pid(pid)),
            Err(_) => Target(Repr::Text(s.into())),
        }
    }
}

impl From<String> for Target {
    fn from(s: String) -> Target {
        match s.parse::<Pid>() {
            Ok(pid) => Target(Repr::Pid(pid)),
            Err(_) => Target(Repr::Text(s.into_boxed_str())),
        }
    }
}

impl From<&String> for Target {
    fn from(s: &String) -> Target {
        Target::from(s.as_str())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Pid(p) => write!(f, "Target({p:?})"),
            Repr::Text(t) => write!(f, "Target({t:?})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_pids_round_trip_as_the_same_text() {
        let long_module = format!("m{}", "x".repeat(127));
        let longest = format!("<{long_module}.{MAX_SERIAL}>");
        assert_eq!(longest.len(), MAX_PID_BYTES);
        for (text, module, serial) in [
            ("<counter.7>", "counter", 7),
            ("<chat.room.9>", "chat.room", 9),
            ("<_a1.B_2.1>", "_a1.B_2", 1),
            ("<$eval.3>", "$eval", 3),
            (longest.as_str(), long_module.as_str(), MAX_SERIAL),
        ] {
            let pid: Pid = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(pid.to_string(), text);
            assert_eq!(pid.as_str(), text);
            assert_eq!(pid.module(), module);
            assert_eq!(pid.serial(), serial);
            let json = serde_json::to_string(&pid).expect("serialize");
            assert_eq!(json, serde_json::to_string(text).expect("a string"));
            assert_eq!(serde_json::from_str::<Pid>(&json).expect("back"), pid);
            assert_eq!(Pid::from_parts(module, serial), pid);
        }
    }

    #[test]
    fn invalid_pids_are_refused_with_the_reason() {
        use ParsePidError::*;
        for (text, why) in [
            ("", Shape),
            ("counter", Shape),
            ("counter.7", Shape),
            ("<counter.7", Shape),
            ("counter.7>", Shape),
            ("<counter7>", Shape),
            (" <counter.7>", Shape),
            ("<counter.7> ", Shape),
            ("<counter.7>\n", Shape),
            ("<>", Shape),
            ("<.7>", Module),
            ("<a..b.7>", Module),
            ("<1a.7>", Module),
            ("<a-b.7>", Module),
            ("<coun\u{1b}[2Jter.7>", Module),
            ("<cou\0nter.7>", Module),
            ("<çà.7>", Module),
            ("<$evil.7>", Module),
            ("<$eval.x.7>", Module),
            ("<counter.0>", Serial),
            ("<counter.007>", Serial),
            ("<counter.+7>", Serial),
            ("<counter.-7>", Serial),
            ("<counter. 7>", Serial),
            ("<counter.>", Serial),
            ("<counter.x>", Serial),
            ("<counter.7\n>", Serial),
            ("<counter.1099511627776>", Serial),
            ("<counter.9999999999999>", Serial),
        ] {
            assert_eq!(text.parse::<Pid>(), Err(why), "{text:?}");
            assert!(serde_json::from_value::<Pid>(serde_json::json!(text)).is_err());
        }
        // Not a string at all.
        assert!(serde_json::from_value::<Pid>(serde_json::json!(7)).is_err());
        assert!(serde_json::from_value::<Pid>(serde_json::json!(null)).is_err());
    }

    #[test]
    fn hostile_text_is_refused_before_it_is_read() {
        let huge = format!("<{}.1>", "a".repeat(1 << 20));
        assert_eq!(huge.parse::<Pid>(), Err(ParsePidError::TooLong(huge.len())));
        let digits = format!("<m.{}>", "9".repeat(1 << 16));
        assert!(matches!(
            digits.parse::<Pid>(),
            Err(ParsePidError::TooLong(_))
        ));
        // Just over the bound, otherwise well formed.
        let over = format!("<m{}.1>", "x".repeat(MAX_PID_BYTES));
        assert!(matches!(
            over.parse::<Pid>(),
            Err(ParsePidError::TooLong(_))
        ));
        // The message never repeats the text.
        let msg = ParsePidError::TooLong(huge.len()).to_string();
        assert!(msg.len() < 100, "{msg}");
        // As a target it is text, kept whole and refused at the call.
        let t = Target::from(huge.as_str());
        assert_eq!(t.as_name(), Some(huge.as_str()));
    }

    #[test]
    fn targets_classify_text_as_the_runtime_reads_it() {
        let pid: Pid = "<counter.7>".parse().expect("pid");
        // A pid's text is a pid, from every source.
        for t in [
            Target::from(pid.clone()),
            Target::from(&pid),
            Target::from("<counter.7>"),
            Target::from("<counter.7>".to_owned()),
            Target::from(&"<counter.7>".to_owned()),
        ] {
            assert_eq!(t.as_pid(), Some(&pid));
            assert_eq!(t.as_name(), None);
            assert_eq!(t.to_string(), "<counter.7>");
        }
        // Everything else stays text, exactly as given: names, the lax forms
        // the runtime still resolves (bare serial, `<m.007>`), and text that
        // addresses nothing (refused at the call).
        for text in [
            "counter",
            "worker1",
            "7",
            "+7",
            "<counter.007>",
            "<counter.0>",
            "<?.7>",
            "",
            "<",
            "nl\n",
            "esc\u{1b}[2J",
        ] {
            let t = Target::from(text);
            assert_eq!(t.as_pid(), None, "{text:?}");
            assert_eq!(t.as_name(), Some(text));
            assert_eq!(t.as_str(), text);
            assert_eq!(Target::from(text.to_owned()), t);
        }
    }

    #[test]
    fn pids_sort_in_spawn_order() {
        let mut pids: Vec<Pid> = ["<b.10>", "<a.2>", "<c.1>"]
            .iter()
            .map(|s| s.parse().expect("pid"))
            .collect();
        pids.sort();
        let texts: Vec<&str> = pids.iter().map(Pid::as_str).collect();
        assert_eq!(texts, ["<c.1>", "<a.2>", "<b.10>"]);
    }
}
