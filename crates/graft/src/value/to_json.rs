//! Luau → JSON: the byte-counted conversion of [`lua_to_json`] (see the
//! mapping rules and the linear-work invariant in the [module docs](super)).

use std::fmt;

use mlua::{Table, Value};
use serde_json::{Map, Number, Value as Json};

use super::{VmPid, MAX_DEPTH};

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

impl fmt::Display for ValueError {
    /// The same text as the [`crate::Error`] it becomes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueError::NotPlainData(m) => write!(f, "not plain data: {m}"),
            ValueError::Cyclic(m) => write!(f, "cyclic value: {m}"),
            ValueError::TooLarge { limit, what } => write!(
                f,
                "value too large: its JSON form passed {limit} bytes (max_value_bytes); {what}"
            ),
            ValueError::Luau(m) => f.write_str(m),
        }
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
/// own ancestor is [`ValueError::Cyclic`] (see `value::tests`). The first
/// problem met is reported. Internal (its argument is an mlua value); the
/// benchmarks reach it through `graft::internals`.
pub fn lua_to_json(
    v: &Value,
    what: &str,
    limit: usize,
    pid_name: &dyn Fn(VmPid) -> String,
) -> Result<Json, ValueError> {
    Writer::new(what, limit, pid_name).value(v, ROOT)
}

/// Where a value sits: its parent table's frame and its key there.
#[derive(Clone, Copy)]
pub(super) struct Loc<'a> {
    parent: Option<&'a Frame<'a>>,
    key: Option<&'a Value>,
}

pub(super) const ROOT: Loc<'static> = Loc {
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
pub(super) struct Writer<'a> {
    what: &'a str,
    limit: usize,
    pub(super) used: usize,
    /// Values visited: each charges at least one byte, so this stays
    /// within `limit + 1` (the work bound the tests check).
    pub(super) steps: usize,
    pid_name: &'a dyn Fn(VmPid) -> String,
}

/// A key as it is written: integers stay numbers until the table's form
/// (array or object) is known.
enum Key {
    Int(i64),
    Text(String),
}

impl<'a> Writer<'a> {
    pub(super) fn new(what: &'a str, limit: usize, pid_name: &'a dyn Fn(VmPid) -> String) -> Self {
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

    pub(super) fn value(&mut self, v: &Value, at: Loc) -> Result<Json, ValueError> {
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
            Value::LightUserData(_) => match VmPid::from_lua(v) {
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
            Value::LightUserData(_) => match VmPid::from_lua(k) {
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
            Value::LightUserData(_) => match VmPid::from_lua(k) {
                Some(pid) => format!("[{}]", (self.pid_name)(pid)),
                None => "[?]".into(),
            },
            other => format!("[{}]", other.type_name()),
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
pub(super) const MAX_SAFE_INT: f64 = (1u64 << 53) as f64;

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
pub(super) fn int_len(i: i64) -> usize {
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
