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

use std::collections::HashSet;
use std::fmt;

use mlua::{LightUserData, Lua, Table, Value};
use serde_json::{Map, Number, Value as Json};

/// Maximum nesting accepted at the JSON boundary (and inside the VM for
/// messages). Deeper values are rejected rather than risking the native stack.
pub const MAX_DEPTH: usize = 64;

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
        // Job markers live above the pid range (see `vm::MARKER_BASE`).
        (raw & SERIAL_MASK != 0 && raw < crate::vm::MARKER_BASE).then_some(Pid(raw))
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

/// Why a process exited. Atoms travel into Luau as strings; errors as
/// `{ error = message, traceback = text }`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
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

    /// Reads a reason given by guest code (`graft.exit(reason)`).
    pub(crate) fn from_json(v: Json) -> ExitReason {
        match v.as_str() {
            Some("normal") => ExitReason::Normal,
            Some("shutdown") => ExitReason::Shutdown,
            Some("killed") => ExitReason::Killed,
            Some("out_of_memory") => ExitReason::OutOfMemory,
            Some("timeout") => ExitReason::Timeout,
            Some("stack_overflow") => ExitReason::StackOverflow,
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

/// Converts JSON into a fresh Luau value (strings that look like pids stay strings).
pub(crate) fn json_to_lua(lua: &Lua, v: &Json) -> mlua::Result<Value> {
    json_to_lua_at(lua, v, 0)
}

fn json_to_lua_at(lua: &Lua, v: &Json, depth: usize) -> mlua::Result<Value> {
    if depth > MAX_DEPTH {
        return Err(mlua::Error::runtime(format!(
            "JSON is nested more than {MAX_DEPTH} levels deep"
        )));
    }
    Ok(match v {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) if i.unsigned_abs() <= (1 << 53) => Value::Number(i as f64),
            _ => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, json_to_lua_at(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
        Json::Object(map) => {
            let t = lua.create_table_with_capacity(0, map.len())?;
            for (k, item) in map {
                t.raw_set(k.as_str(), json_to_lua_at(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
    })
}

/// Why a Luau value could not become JSON.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ValueError {
    /// Not plain data: a function, a NaN, a key two ways, nesting past
    /// [`MAX_DEPTH`] … The message names where.
    NotPlainData(String),
    /// A table is its own ancestor; the message is the path, e.g.
    /// `reply.k1 → reply`.
    Cyclic(String),
    /// The JSON form passed `limit` bytes; `what` says where it stopped.
    TooLarge {
        /// The cap passed.
        limit: usize,
        /// The value and the path where the conversion stopped.
        what: String,
    },
    /// Luau could not read the table (e.g. out of memory).
    Luau(String),
}

impl From<ValueError> for crate::Error {
    fn from(e: ValueError) -> Self {
        match e {
            ValueError::NotPlainData(m) => crate::Error::NotPlainData(m),
            ValueError::Cyclic(m) => crate::Error::CyclicValue(m),
            ValueError::TooLarge { limit, what } => crate::Error::ValueTooLarge { limit, what },
            ValueError::Luau(m) => crate::Error::Luau(m),
        }
    }
}

impl fmt::Display for ValueError {
    /// The same text as the [`crate::Error`] it becomes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&crate::Error::from(self.clone()), f)
    }
}

impl std::error::Error for ValueError {}

/// Converts a Luau value to JSON; `what` names it in errors (`reply`,
/// `state` …), `limit` caps its JSON form in bytes, `pid_name` renders pids.
///
/// The conversion counts the bytes of the compact JSON text (as
/// `serde_json::to_vec` writes it) while it builds the value and stops as
/// soon as they pass `limit`. Every step writes at least one byte, so its
/// work is linear in the bytes produced so far, even for a DAG of shared
/// subtables (which JSON writes out once per reference). A table that is its
/// own ancestor is [`ValueError::Cyclic`]. The first problem met is reported.
///
/// ```
/// let lua = mlua::Lua::new();
/// let v: mlua::Value = lua.load("local t = {} t.me = t return t").eval().unwrap();
/// let err = graft::value::lua_to_json(&v, "reply", 1 << 20, &|_| String::new()).unwrap_err();
/// assert_eq!(err, graft::value::ValueError::Cyclic("reply.me → reply".into()));
/// ```
pub fn lua_to_json(
    v: &Value,
    what: &str,
    limit: usize,
    pid_name: &dyn Fn(Pid) -> String,
) -> Result<Json, ValueError> {
    Writer::new(what, limit, pid_name).value(v, ROOT)
}

/// Where a value sits: its parent table's frame and its key there.
#[derive(Clone, Copy)]
struct Loc<'a> {
    parent: Option<&'a Frame<'a>>,
    key: Option<&'a Value>,
}

const ROOT: Loc<'static> = Loc {
    parent: None,
    key: None,
};

/// A table on the current path of the conversion.
struct Frame<'a> {
    loc: Loc<'a>,
    table: *const std::ffi::c_void,
    depth: usize,
}

/// The conversion in progress: the bytes of JSON text produced so far.
struct Writer<'a> {
    what: &'a str,
    limit: usize,
    used: usize,
    /// Values visited: each charges at least one byte, so this stays
    /// within `limit + 1` (the work bound the tests check).
    steps: usize,
    pid_name: &'a dyn Fn(Pid) -> String,
}

/// A key as it is written: integers stay numbers until the table's form
/// (array or object) is known.
enum Key {
    Int(i64),
    Text(String),
}

impl<'a> Writer<'a> {
    fn new(what: &'a str, limit: usize, pid_name: &'a dyn Fn(Pid) -> String) -> Self {
        Writer {
            what,
            limit,
            used: 0,
            steps: 0,
            pid_name,
        }
    }

    /// Counts `n` more bytes of output; fails once past the cap.
    fn charge(&mut self, n: usize, at: Loc) -> Result<(), ValueError> {
        self.used = self.used.saturating_add(n);
        if self.used > self.limit {
            return Err(ValueError::TooLarge {
                limit: self.limit,
                what: format!("{} (stopped at {})", self.what, self.path(at)),
            });
        }
        Ok(())
    }

    fn value(&mut self, v: &Value, at: Loc) -> Result<Json, ValueError> {
        self.steps += 1;
        Ok(match v {
            Value::Nil => self.fixed(Json::Null, 4, at)?,
            Value::Boolean(b) => self.fixed(Json::Bool(*b), if *b { 4 } else { 5 }, at)?,
            Value::Integer(i) => self.number(Number::from(*i), at)?,
            Value::Number(n) => match number_to_json(*n) {
                Some(num) => self.number(num, at)?,
                None => return Err(self.not_plain(at, format!("the number {n} has no JSON form"))),
            },
            Value::String(s) => Json::String(self.lua_string(s, 0, at)?),
            Value::Table(t) => self.table(t, at)?,
            Value::LightUserData(_) => match Pid::from_lua(v) {
                Some(pid) => Json::String(self.text((self.pid_name)(pid), 0, at)?),
                None => return Err(self.not_plain(at, "an internal marker is not plain data")),
            },
            other => {
                return Err(self.not_plain(
                    at,
                    format!(
                        "a {} is not plain data (only nil, booleans, numbers, strings, pids and tables of those)",
                        other.type_name()
                    ),
                ))
            }
        })
    }

    fn fixed(&mut self, j: Json, len: usize, at: Loc) -> Result<Json, ValueError> {
        self.charge(len, at)?;
        Ok(j)
    }

    fn number(&mut self, n: Number, at: Loc) -> Result<Json, ValueError> {
        let len = match n.as_i64() {
            Some(i) => int_len(i),
            None => display_len(&n),
        };
        self.charge(len, at)?;
        Ok(Json::Number(n))
    }

    /// Charges a Luau string's JSON text plus `extra` bytes: its raw length
    /// before it is copied, so a string past the cap costs O(1); then what
    /// UTF-8 repair and escapes add.
    fn lua_string(
        &mut self,
        s: &mlua::LuaString,
        extra: usize,
        at: Loc,
    ) -> Result<String, ValueError> {
        // One borrow of the bytes: each costs mlua a reference and a lock.
        let bytes = s.as_bytes();
        self.charge(bytes.len() + 2 + extra, at)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        self.charge(
            text.len().saturating_sub(bytes.len()) + escape_extra(&text),
            at,
        )?;
        Ok(text)
    }

    /// Charges a string made on this side (a pid, a number key) plus `extra`.
    fn text(&mut self, s: String, extra: usize, at: Loc) -> Result<String, ValueError> {
        self.charge(s.len() + 2 + extra + escape_extra(&s), at)?;
        Ok(s)
    }

    fn table(&mut self, t: &Table, at: Loc) -> Result<Json, ValueError> {
        let me = t.to_pointer();
        let depth = at.parent.map_or(1, |f| f.depth + 1);
        if let Some(ancestor) = self.ancestor(me, at) {
            return Err(ValueError::Cyclic(format!(
                "{} → {}",
                self.path(at),
                self.path(ancestor)
            )));
        }
        if depth > MAX_DEPTH {
            return Err(self.not_plain(
                at,
                format!("the value is nested more than {MAX_DEPTH} levels deep"),
            ));
        }
        let frame = Frame {
            loc: at,
            table: me,
            depth,
        };
        self.charge(2, at)?; // the brackets
        let mut entries: Vec<(Key, Json)> = Vec::new();
        let mut failure = None;
        let read = t.for_each(|k: Value, v: Value| {
            match self.entry(&frame, &k, &v, entries.len()) {
                Ok(e) => entries.push(e),
                Err(e) => failure = Some(e),
            }
            match failure {
                // Stops the iteration; the real error is `failure`.
                Some(_) => Err(mlua::Error::runtime("stopped")),
                None => Ok(()),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        read.map_err(|e| ValueError::Luau(e.to_string()))?;
        self.finish(entries, at)
    }

    /// One table entry: its key (charged now unless it is an integer) and
    /// its value, after a comma for every entry but the first.
    fn entry(
        &mut self,
        frame: &Frame,
        k: &Value,
        v: &Value,
        index: usize,
    ) -> Result<(Key, Json), ValueError> {
        let at = Loc {
            parent: Some(frame),
            key: Some(k),
        };
        if index > 0 {
            self.charge(1, at)?;
        }
        let key = self.key(k, at)?;
        Ok((key, self.value(v, at)?))
    }

    /// A key; all but integers are charged now, as `"key":`.
    fn key(&mut self, k: &Value, at: Loc) -> Result<Key, ValueError> {
        Ok(match k {
            Value::String(s) => Key::Text(self.lua_string(s, 1, at)?),
            Value::Integer(i) => Key::Int(*i),
            Value::Number(n) if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INT => Key::Int(*n as i64),
            Value::Number(n) => match Number::from_f64(*n) {
                Some(num) => Key::Text(self.text(num.to_string(), 1, at)?),
                None => return Err(self.not_plain(at, format!("the key {n} has no JSON form"))),
            },
            Value::Boolean(b) => Key::Text(self.text(b.to_string(), 1, at)?),
            Value::LightUserData(_) => match Pid::from_lua(k) {
                Some(pid) => Key::Text(self.text((self.pid_name)(pid), 1, at)?),
                None => return Err(self.not_plain(at, "an internal marker is not plain data")),
            },
            other => {
                return Err(self.not_plain(
                    at,
                    format!(
                        "a table key of type {} is not plain data",
                        other.type_name()
                    ),
                ))
            }
        })
    }

    /// Keys exactly `1..n` make an array; anything else an object whose
    /// integer keys are now charged as decimal strings.
    fn finish(&mut self, entries: Vec<(Key, Json)>, at: Loc) -> Result<Json, ValueError> {
        let n = entries.len();
        let is_array = n > 0
            && entries.iter().all(|(k, _)| match k {
                Key::Int(i) => *i >= 1 && (*i as u64) <= n as u64,
                Key::Text(_) => false,
            });
        if is_array {
            // Keys are distinct, so 1..=n are each filled exactly once.
            let mut items = vec![Json::Null; n];
            for (k, v) in entries {
                if let Key::Int(i) = k {
                    if let Some(slot) = items.get_mut(i as usize - 1) {
                        *slot = v;
                    }
                }
            }
            return Ok(Json::Array(items));
        }
        let mut map = Map::new();
        for (k, v) in entries {
            let key = match k {
                Key::Int(i) => {
                    let text = i.to_string();
                    self.charge(text.len() + 3, at)?;
                    text
                }
                Key::Text(s) => s,
            };
            match map.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(v);
                }
                serde_json::map::Entry::Occupied(slot) => {
                    let msg = format!(
                        "two keys are both written as \"{}\" in JSON",
                        clip(slot.key())
                    );
                    return Err(self.not_plain(at, msg));
                }
            }
        }
        Ok(Json::Object(map))
    }

    /// The frame on the current path that holds table `me`, if any.
    fn ancestor<'f>(&self, me: *const std::ffi::c_void, at: Loc<'f>) -> Option<Loc<'f>> {
        let mut frame = at.parent;
        while let Some(f) = frame {
            if f.table == me {
                return Some(f.loc);
            }
            frame = f.loc.parent;
        }
        None
    }

    fn not_plain(&self, at: Loc, msg: impl fmt::Display) -> ValueError {
        ValueError::NotPlainData(format!("{}: {msg}", self.path(at)))
    }

    /// `reply.items[3].owner`: the root's name and the keys down to `at`.
    fn path(&self, at: Loc) -> String {
        let mut keys = Vec::new();
        let mut loc = at;
        while let (Some(parent), Some(key)) = (loc.parent, loc.key) {
            keys.push(key);
            loc = parent.loc;
        }
        let mut out = self.what.to_owned();
        for key in keys.iter().rev() {
            out.push_str(&self.key_text(key));
        }
        out
    }

    fn key_text(&self, k: &Value) -> String {
        match k {
            Value::String(s) => {
                // Only the head of a long key is shown: never copy all of it.
                let bytes = s.as_bytes();
                let s = String::from_utf8_lossy(&bytes[..bytes.len().min(4 * CLIP)]);
                let ident = !s.is_empty()
                    && !s.starts_with(|c: char| c.is_ascii_digit())
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if ident && s.len() <= CLIP {
                    format!(".{s}")
                } else {
                    format!("[{:?}]", clip(&s))
                }
            }
            Value::Integer(i) => format!("[{i}]"),
            Value::Number(n) => format!("[{n}]"),
            Value::Boolean(b) => format!("[{b}]"),
            Value::LightUserData(_) => match Pid::from_lua(k) {
                Some(pid) => format!("[{}]", (self.pid_name)(pid)),
                None => "[?]".into(),
            },
            other => format!("[{}]", other.type_name()),
        }
    }
}

/// Rough bytes of a Luau value for the process list: 56 per table, 32 per
/// entry, 24 plus the length per string. Each table is counted once however
/// often it is referenced (so sharing and cycles cost nothing extra), and at
/// most `max_entries` entries are read: past that the figure is a lower
/// bound. Returns the bytes and the entries read.
pub(crate) fn estimate_size(v: &Value, max_entries: usize) -> (usize, usize) {
    let mut walk = SizeWalk {
        seen: HashSet::new(),
        todo: Vec::new(),
        bytes: 0,
        entries: 0,
    };
    walk.visit(v);
    while let Some(t) = walk.todo.pop() {
        let _ = t.for_each(|k: Value, v: Value| {
            if walk.entries >= max_entries {
                // Ends the walk: the figure so far is a lower bound.
                return Err(mlua::Error::runtime("budget"));
            }
            walk.entries += 1;
            walk.bytes += 32;
            walk.visit(&k);
            walk.visit(&v);
            Ok(())
        });
        if walk.entries >= max_entries {
            break;
        }
    }
    (walk.bytes, walk.entries)
}

/// The state of [`estimate_size`]: tables seen, tables still to read.
struct SizeWalk {
    seen: HashSet<*const std::ffi::c_void>,
    todo: Vec<Table>,
    bytes: usize,
    entries: usize,
}

impl SizeWalk {
    fn visit(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.bytes += 24 + s.as_bytes().len(),
            Value::Table(t) if self.seen.insert(t.to_pointer()) => {
                self.bytes += 56;
                self.todo.push(t.clone());
            }
            _ => {}
        }
    }
}

/// Keys longer than this are cut in error messages.
const CLIP: usize = 40;

fn clip(s: &str) -> String {
    match s.char_indices().nth(CLIP) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// 2^53: integral numbers up to this magnitude are written as integers.
const MAX_SAFE_INT: f64 = (1u64 << 53) as f64;

/// Integral numbers within ±2^53 as integers, others in shortest form;
/// `None` for NaN and ±inf.
fn number_to_json(n: f64) -> Option<Number> {
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INT {
        Some(Number::from(n as i64))
    } else {
        Number::from_f64(n)
    }
}

/// The length of `i` in decimal.
fn int_len(i: i64) -> usize {
    let sign = usize::from(i < 0);
    let digits = i
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d as usize + 1);
    sign + digits
}

/// The length of `n` as serde_json writes it, without allocating.
fn display_len(n: &Number) -> usize {
    struct Count(usize);
    impl fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = fmt::Write::write_fmt(&mut c, format_args!("{n}"));
    c.0
}

/// Bytes serde_json's escapes add to `s`: `\"`, `\\`, `\n` … add one, other
/// control characters (`\u001f`) five.
fn escape_extra(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum()
}

/// Checks JSON nesting before it reaches a sandbox: `Err(depth)` when deeper than `max`.
pub fn check_json_depth(v: &Json, max: usize) -> Result<(), usize> {
    fn walk(v: &Json, depth: usize, max: usize) -> Result<(), usize> {
        if depth > max {
            return Err(depth);
        }
        match v {
            Json::Array(a) => a.iter().try_for_each(|x| walk(x, depth + 1, max)),
            Json::Object(o) => o.values().try_for_each(|x| walk(x, depth + 1, max)),
            _ => Ok(()),
        }
    }
    walk(v, 0, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn names(p: Pid) -> String {
        format!("<m.{}>", p.serial())
    }

    #[test]
    fn pid_round_trips_through_lua_value_and_string() {
        let pid = Pid::new(5, 1234);
        assert_eq!(Pid::from_lua(&pid.to_lua()), Some(pid));
        assert_eq!(Pid::parse_serial("<counter.1234>"), Some(1234));
        assert_eq!(Pid::parse_serial("<chat.room.9>"), Some(9));
        assert_eq!(Pid::parse_serial("counter.9"), None);
        assert_eq!(Pid::parse_serial("<counter.0>"), None);
        assert_eq!(Pid::parse_serial("<counter.x>"), None);
    }

    const CAP: usize = 1 << 20;

    fn eval(lua: &Lua, src: &str) -> Value {
        lua.load(src).eval().unwrap()
    }

    fn convert(v: &Value) -> Result<Json, ValueError> {
        lua_to_json(v, "reply", CAP, &names)
    }

    fn not_plain(r: Result<Json, ValueError>) -> String {
        match r {
            Err(ValueError::NotPlainData(m)) => m,
            other => panic!("expected NotPlainData, got {other:?}"),
        }
    }

    #[test]
    fn json_round_trip_keeps_arrays_objects_and_numbers() {
        let lua = Lua::new();
        let v = serde_json::json!({"a": [1, 2.5, "x", true], "b": {"c": null}, "e": {}});
        let lv = json_to_lua(&lua, &v).unwrap();
        let back = convert(&lv).unwrap();
        // null values vanish inside tables (Luau has no null), everything else survives
        assert_eq!(
            back,
            serde_json::json!({"a": [1, 2.5, "x", true], "b": {}, "e": {}})
        );
    }

    #[test]
    fn functions_are_not_plain_data_named_by_path() {
        let lua = Lua::new();
        let f = eval(&lua, "return { list = { 1, function() end } }");
        let msg = not_plain(convert(&f));
        assert!(
            msg.starts_with("reply.list[2]: a function is not plain data"),
            "{msg}"
        );
        let k = eval(&lua, "return { [{}] = 1 }");
        let msg = not_plain(convert(&k));
        assert!(msg.contains("a table key of type table"), "{msg}");
    }

    #[test]
    fn a_table_that_holds_itself_is_cyclic_with_its_path() {
        let lua = Lua::new();
        let state = eval(
            &lua,
            "local s = {} for i = 1, 8 do s['k'..i] = s end return s",
        );
        match lua_to_json(&state, "state", CAP, &names) {
            Err(ValueError::Cyclic(path)) => {
                assert!(
                    path.starts_with("state.k") && path.ends_with(" → state"),
                    "{path}"
                )
            }
            other => panic!("expected Cyclic, got {other:?}"),
        }
        let deeper = eval(
            &lua,
            "local a = {} local t = { a = { b = { ['odd key'] = a } } } a.up = t.a return t",
        );
        // The cycle is a → t.a.b["odd key"] → a.up = t.a: found where it closes.
        assert_eq!(
            convert(&deeper),
            Err(ValueError::Cyclic(
                r#"reply.a.b["odd key"].up → reply.a"#.into()
            ))
        );
    }

    #[test]
    fn shared_subtables_are_written_once_per_reference() {
        let lua = Lua::new();
        let v = eval(
            &lua,
            "local leaf = { 1, 2 } return { a = leaf, b = { c = leaf } }",
        );
        assert_eq!(
            convert(&v).unwrap(),
            serde_json::json!({"a": [1, 2], "b": {"c": [1, 2]}})
        );
    }

    #[test]
    fn a_dag_30_levels_deep_stops_at_the_cap_after_linear_work() {
        let lua = Lua::new();
        let dag = eval(
            &lua,
            "local t = {} for i = 1, 30 do t = { a = t, b = t } end return t",
        );
        let cap = 64 * 1024;
        let mut w = Writer::new("reply", cap, &names);
        match w.value(&dag, ROOT) {
            Err(ValueError::TooLarge { limit, what }) => {
                assert_eq!(limit, cap);
                assert!(what.starts_with("reply (stopped at reply."), "{what}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(w.steps <= cap + 1, "{} steps for a cap of {cap}", w.steps);
    }

    #[test]
    fn table_pack_with_a_hole_is_an_object_with_string_keys() {
        let lua = Lua::new();
        let v = eval(&lua, "return table.pack(1, nil, 3)");
        assert_eq!(
            convert(&v).unwrap(),
            serde_json::json!({"1": 1, "3": 3, "n": 3})
        );
        let holes = eval(&lua, "return { 1, nil, 3 }");
        assert_eq!(
            convert(&holes).unwrap(),
            serde_json::json!({"1": 1, "3": 3})
        );
    }

    #[test]
    fn odd_keys_are_written_as_strings() {
        let lua = Lua::new();
        let v = eval(
            &lua,
            "return { [true] = 1, [2.5] = 2, [1e300] = 3, [-7] = 4 }",
        );
        assert_eq!(
            convert(&v).unwrap(),
            serde_json::json!({"true": 1, "2.5": 2, "1e+300": 3, "-7": 4})
        );
        let pid = Pid::new(1, 7);
        let t = lua.create_table().unwrap();
        t.raw_set(pid.to_lua(), "x").unwrap();
        assert_eq!(
            convert(&Value::Table(t)).unwrap(),
            serde_json::json!({"<m.7>": "x"})
        );
        // keys 1..n in any order are an array
        let shuffled = eval(
            &lua,
            "local t = {} t[3] = 'c' t[1] = 'a' t[2] = 'b' return t",
        );
        assert_eq!(
            convert(&shuffled).unwrap(),
            serde_json::json!(["a", "b", "c"])
        );
    }

    #[test]
    fn two_keys_with_one_json_name_are_not_plain_data() {
        let lua = Lua::new();
        let v = eval(&lua, "return { x = { [1] = 'a', ['1'] = 'b', [3] = 'c' } }");
        let msg = not_plain(convert(&v));
        assert!(
            msg.starts_with("reply.x: two keys are both written as \"1\""),
            "{msg}"
        );
    }

    #[test]
    fn nan_and_infinities_are_not_plain_data() {
        let lua = Lua::new();
        let nan = eval(&lua, "return { x = 0/0 }");
        assert!(not_plain(convert(&nan)).starts_with("reply.x: the number NaN has no JSON form"));
        let inf = eval(&lua, "return { math.huge }");
        assert!(not_plain(convert(&inf)).contains("the number inf has no JSON form"));
        let key = eval(&lua, "return { [-math.huge] = 1 }");
        assert!(not_plain(convert(&key)).contains("the key -inf has no JSON form"));
    }

    #[test]
    fn nesting_past_64_levels_is_not_plain_data() {
        let lua = Lua::new();
        let nest = |n: usize| {
            eval(
                &lua,
                &format!("local t = 1 for i = 1, {n} do t = {{ t }} end return t"),
            )
        };
        assert!(convert(&nest(MAX_DEPTH)).is_ok());
        let msg = not_plain(convert(&nest(MAX_DEPTH + 1)));
        assert!(msg.ends_with("nested more than 64 levels deep"), "{msg}");
        let mut deep = serde_json::json!(1);
        for _ in 0..100 {
            deep = serde_json::json!([deep]);
        }
        assert!(json_to_lua(&lua, &deep).is_err());
        assert_eq!(check_json_depth(&deep, 64), Err(65));
    }

    #[test]
    fn counted_bytes_are_the_compact_json_length() {
        let lua = Lua::new();
        let v = eval(
            &lua,
            r#"return { s = "q\"\\\n\1é", n = { 1, -2.5, 1e-7, 2^60 }, b = false, [4] = true }"#,
        );
        let json = convert(&v).unwrap();
        let len = serde_json::to_vec(&json).unwrap().len();
        assert!(lua_to_json(&v, "reply", len, &names).is_ok());
        assert!(matches!(
            lua_to_json(&v, "reply", len - 1, &names),
            Err(ValueError::TooLarge { .. })
        ));
        for i in [0, 7, -1, 10, -10, 99, i64::MAX, i64::MIN] {
            assert_eq!(int_len(i), i.to_string().len(), "{i}");
        }
        // a string past the cap is refused before it is copied
        let big = eval(&lua, "return string.rep('x', 100000)");
        assert!(matches!(
            lua_to_json(&big, "reply", 1000, &names),
            Err(ValueError::TooLarge { limit: 1000, .. })
        ));
    }

    #[test]
    fn errors_become_their_graft_kinds() {
        let kinds = [
            (ValueError::NotPlainData("x".into()), "not_plain_data"),
            (ValueError::Cyclic("x".into()), "cyclic_value"),
            (
                ValueError::TooLarge {
                    limit: 1,
                    what: "x".into(),
                },
                "value_too_large",
            ),
        ];
        for (e, kind) in kinds {
            let text = e.to_string();
            let err = crate::Error::from(e);
            assert_eq!(err.kind(), kind);
            assert_eq!(err.to_string(), text);
        }
    }

    #[test]
    fn memory_estimate_counts_each_table_once() {
        let lua = Lua::new();
        let selfish = eval(
            &lua,
            "local s = {} for i = 1, 8 do s['k'..i] = s end return s",
        );
        assert_eq!(estimate_size(&selfish, 1000), (56 + 8 * (32 + 24 + 2), 8));
        let dag = eval(
            &lua,
            "local t = {} for i = 1, 30 do t = { a = t, b = t } end return t",
        );
        let (bytes, read) = estimate_size(&dag, 1000);
        assert_eq!(read, 60, "two entries per level, each level once");
        assert_eq!(bytes, 31 * 56 + 60 * (32 + 25));
        // past the budget the figure is a lower bound
        let wide = eval(
            &lua,
            "local t = {} for i = 1, 5000 do t[i] = { i } end return t",
        );
        let (partial, read) = estimate_size(&wide, 100);
        assert_eq!(read, 100);
        assert!(partial < estimate_size(&wide, usize::MAX).0);
    }

    #[test]
    fn exit_reasons_read_from_guest_values() {
        assert_eq!(
            ExitReason::from_json(serde_json::json!("normal")),
            ExitReason::Normal
        );
        assert_eq!(
            ExitReason::from_json(serde_json::json!("shutdown")),
            ExitReason::Shutdown
        );
        let other = ExitReason::from_json(serde_json::json!({"why": "bored"}));
        assert_eq!(other.kind(), "other");
        assert!(!other.is_normal());
    }
}

/// Property tests: any Luau-shaped graph (cycles, sharing, holes, odd keys,
/// NaN, deep chains, pids, functions) converts exactly as a plain recursive
/// model says, or fails with a typed error; never panics; and the work stays
/// within the byte cap.
#[cfg(test)]
mod props {
    use super::tests::names;
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum K {
        Int(i64),
        Str(&'static str),
        Float(f64),
        Bool(bool),
        Pid(u64),
    }

    #[derive(Clone, Debug)]
    enum V {
        Table(usize),
        Num(f64),
        Str(String),
        Bool(bool),
        Pid(u64),
        Func,
    }

    /// Tables by index (entries may point at any table: sharing and
    /// cycles), a chain of nested tables hung under table 0, and whether
    /// only forward references are kept (a DAG).
    #[derive(Clone, Debug)]
    struct Graph {
        tables: Vec<Vec<(K, V)>>,
        chain: usize,
        acyclic: bool,
    }

    fn key() -> impl Strategy<Value = K> {
        prop_oneof![
            4 => (1i64..5).prop_map(K::Int),
            3 => prop::sample::select(vec!["a", "b", "1", "2", "q\"\\\n", "é", "", "true"])
                .prop_map(K::Str),
            1 => prop::sample::select(vec![0.5, -0.0, 1e300, f64::INFINITY, -3.0])
                .prop_map(K::Float),
            1 => any::<bool>().prop_map(K::Bool),
            1 => (1u64..4).prop_map(K::Pid),
        ]
    }

    fn value(tables: usize) -> impl Strategy<Value = V> {
        let chars = prop::sample::select(vec!['a', '"', '\\', '\n', '\u{1}', 'é']);
        prop_oneof![
            5 => (0..tables).prop_map(V::Table),
            2 => prop::sample::select(vec![0.0, 1.0, -2.5, 1e-7, 2f64.powi(60), f64::NAN, f64::INFINITY])
                .prop_map(V::Num),
            2 => prop::collection::vec(chars, 0..6).prop_map(|c| V::Str(c.into_iter().collect())),
            1 => any::<bool>().prop_map(V::Bool),
            1 => (1u64..4).prop_map(V::Pid),
            1 => Just(V::Func),
        ]
    }

    fn graph() -> impl Strategy<Value = Graph> {
        (1usize..7).prop_flat_map(|n| {
            let entries = prop::collection::vec((key(), value(n)), 0..5);
            (
                prop::collection::vec(entries, n),
                prop_oneof![4 => Just(0usize), 1 => 55usize..70],
                prop_oneof![1 => Just(false), 2 => Just(true)],
            )
                .prop_map(|(tables, chain, acyclic)| Graph {
                    tables,
                    chain,
                    acyclic,
                })
        })
    }

    fn build(lua: &Lua, g: &Graph) -> Value {
        let tables: Vec<Table> = g
            .tables
            .iter()
            .map(|_| lua.create_table().unwrap())
            .collect();
        for (i, entries) in g.tables.iter().enumerate() {
            for (k, v) in entries {
                let key = match k {
                    K::Int(n) => Value::Number(*n as f64),
                    K::Str(s) => Value::String(lua.create_string(s).unwrap()),
                    K::Float(f) => Value::Number(*f),
                    K::Bool(b) => Value::Boolean(*b),
                    K::Pid(n) => Pid::new(1, *n).to_lua(),
                };
                let val = match v {
                    V::Table(j) if g.acyclic && *j <= i => Value::Boolean(true),
                    V::Table(j) => Value::Table(tables[*j].clone()),
                    V::Num(n) => Value::Number(*n),
                    V::Str(s) => Value::String(lua.create_string(s).unwrap()),
                    V::Bool(b) => Value::Boolean(*b),
                    V::Pid(n) => Pid::new(1, *n).to_lua(),
                    V::Func => Value::Function(lua.create_function(|_, ()| Ok(())).unwrap()),
                };
                tables[i].raw_set(key, val).unwrap();
            }
        }
        if g.chain > 0 {
            let mut inner = lua.create_table().unwrap();
            for _ in 1..g.chain {
                let outer = lua.create_table().unwrap();
                outer.raw_set(1, inner).unwrap();
                inner = outer;
            }
            tables[0].raw_set("deep", inner).unwrap();
        }
        Value::Table(tables[0].clone())
    }

    #[derive(Debug, PartialEq)]
    enum Kind {
        NotPlain,
        Cyclic,
    }

    fn model_number(n: f64) -> Result<Json, Kind> {
        if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INT {
            Ok(Json::from(n as i64))
        } else {
            Number::from_f64(n).map(Json::Number).ok_or(Kind::NotPlain)
        }
    }

    fn model_key(k: &Value) -> Result<(Option<i64>, String), Kind> {
        Ok(match k {
            Value::String(s) => (None, s.to_string_lossy()),
            Value::Number(n) if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INT => {
                (Some(*n as i64), (*n as i64).to_string())
            }
            Value::Integer(i) => (Some(*i), i.to_string()),
            Value::Number(n) => (
                None,
                Number::from_f64(*n).ok_or(Kind::NotPlain)?.to_string(),
            ),
            Value::Boolean(b) => (None, b.to_string()),
            Value::LightUserData(_) => (None, names(Pid::from_lua(k).ok_or(Kind::NotPlain)?)),
            _ => return Err(Kind::NotPlain),
        })
    }

    /// The mapping of docs/guest-api.md as a plain recursion: no cap, no
    /// byte counting, exponential on DAGs (the graphs here are small).
    fn model(v: &Value, path: &mut Vec<*const std::ffi::c_void>) -> Result<Json, Kind> {
        let t = match v {
            Value::Nil => return Ok(Json::Null),
            Value::Boolean(b) => return Ok(Json::Bool(*b)),
            Value::Integer(i) => return Ok(Json::from(*i)),
            Value::Number(n) => return model_number(*n),
            Value::String(s) => return Ok(Json::String(s.to_string_lossy())),
            Value::LightUserData(_) => {
                return Pid::from_lua(v)
                    .map(|p| Json::String(names(p)))
                    .ok_or(Kind::NotPlain)
            }
            Value::Table(t) => t,
            _ => return Err(Kind::NotPlain),
        };
        if path.contains(&t.to_pointer()) {
            return Err(Kind::Cyclic);
        }
        if path.len() >= MAX_DEPTH {
            return Err(Kind::NotPlain);
        }
        path.push(t.to_pointer());
        let mut entries = Vec::new();
        for pair in t.pairs::<Value, Value>() {
            let (k, v) = pair.unwrap();
            let key = model_key(&k)?;
            entries.push((key, model(&v, path)?));
        }
        path.pop();
        let n = entries.len() as i64;
        if n > 0
            && entries
                .iter()
                .all(|((i, _), _)| matches!(i, Some(i) if (1..=n).contains(i)))
        {
            entries.sort_by_key(|((i, _), _)| *i);
            return Ok(Json::Array(entries.into_iter().map(|(_, v)| v).collect()));
        }
        let mut map = Map::new();
        for ((_, key), v) in entries {
            if map.insert(key, v).is_some() {
                return Err(Kind::NotPlain);
            }
        }
        Ok(Json::Object(map))
    }

    fn kind_of(e: &ValueError) -> Option<Kind> {
        match e {
            ValueError::NotPlainData(_) => Some(Kind::NotPlain),
            ValueError::Cyclic(_) => Some(Kind::Cyclic),
            _ => None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn any_graph_converts_as_the_model_or_fails_typed(g in graph(), cap in 8usize..3000) {
            let lua = Lua::new();
            let v = build(&lua, &g);
            let expected = model(&v, &mut Vec::new());

            // Room for every graph here: exactly the model's answer.
            let mut w = Writer::new("v", 1 << 24, &names);
            let got = w.value(&v, ROOT);
            match (&expected, &got) {
                (Ok(json), Ok(out)) => {
                    prop_assert_eq!(json, out);
                    prop_assert_eq!(w.used, serde_json::to_vec(json).unwrap().len());
                }
                (Err(kind), Err(e)) => {
                    let k = kind_of(e);
                    prop_assert_eq!(Some(kind), k.as_ref());
                }
                _ => prop_assert!(false, "model {:?}, codec {:?}", expected, got),
            }

            // A small cap: the same answer while it fits, else value_too_large,
            // and never more steps than bytes allowed.
            let mut w = Writer::new("v", cap, &names);
            let small = w.value(&v, ROOT);
            prop_assert!(w.steps <= cap + 1, "{} steps, cap {}", w.steps, cap);
            match (&got, &small) {
                (_, Err(ValueError::TooLarge { limit, .. })) => prop_assert_eq!(*limit, cap),
                (Ok(json), Ok(out)) => {
                    prop_assert_eq!(json, out);
                    prop_assert!(w.used <= cap);
                }
                (Err(a), Err(b)) => prop_assert_eq!(kind_of(a), kind_of(b)),
                _ => prop_assert!(false, "full {:?}, capped {:?}", got, small),
            }
            if let Ok(json) = &got {
                let len = serde_json::to_vec(json).unwrap().len();
                let fits = lua_to_json(&v, "v", len, &names);
                prop_assert!(fits.is_ok(), "cap = its length: {:?}", fits);
                let over = lua_to_json(&v, "v", len - 1, &names);
                prop_assert!(matches!(over, Err(ValueError::TooLarge { .. })), "{:?}", over);
            }
        }

        #[test]
        fn memory_estimate_reads_each_table_once_within_its_budget(g in graph(), budget in 1usize..40) {
            let lua = Lua::new();
            let v = build(&lua, &g);
            // every entry of every distinct reachable table, once
            let mut seen = HashSet::new();
            let mut todo = vec![v.clone()];
            let mut entries = 0;
            while let Some(Value::Table(t)) = todo.pop() {
                if !seen.insert(t.to_pointer()) {
                    continue;
                }
                for pair in t.pairs::<Value, Value>() {
                    let (k, x) = pair.unwrap();
                    entries += 1;
                    todo.extend([k, x].into_iter().filter(|x| x.is_table()));
                }
            }
            prop_assert_eq!(estimate_size(&v, usize::MAX).1, entries);
            let (partial, read) = estimate_size(&v, budget);
            prop_assert_eq!(read, entries.min(budget));
            prop_assert!(partial <= estimate_size(&v, usize::MAX).0);
        }
    }
}
