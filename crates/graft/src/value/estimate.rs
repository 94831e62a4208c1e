//! Memory estimates of Luau values for the process list.

use std::collections::HashSet;

use mlua::{Table, Value};

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

/// The length of a value's JSON form, without building it.
pub(crate) fn json_len(v: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    // Writing JSON into a counter cannot fail except on a non-string map
    // key, which a `serde_json::Value` never has.
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}
