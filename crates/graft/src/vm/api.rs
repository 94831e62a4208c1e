//! The `graft` global, declared once: its keys, their Luau types and docs.
//!
//! [`GRAFT_API`] is what the guest environment installs (`env.rs` copies
//! exactly these keys from the prelude's table into the frozen `graft`
//! global, and refuses to build a VM when the prelude and this table
//! disagree) and what [`definitions`] turns into `graft.d.luau` for
//! luau-lsp (`graft types`). So the editor's view of `graft` and the VM's
//! cannot drift apart: a key added to one without the other fails every
//! sandbox creation, hence every test.

use std::fmt::Write as _;

/// One key of the `graft` global.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiItem {
    /// The key (`call`).
    pub name: &'static str,
    /// Its Luau type as luau-lsp reads it (`(target: any, request: any, timeout_ms: number?) -> any`).
    pub ty: &'static str,
    /// One or two sentences for the editor's hover.
    pub doc: &'static str,
}

macro_rules! item {
    ($name:literal, $ty:literal, $doc:literal) => {
        ApiItem {
            name: $name,
            ty: $ty,
            doc: $doc,
        }
    };
}

/// Every key of the guests' `graft` table, sorted by name.
///
/// ```
/// let names: Vec<&str> = graft::vm::GRAFT_API.iter().map(|i| i.name).collect();
/// assert!(names.contains(&"call") && names.contains(&"send_after"));
/// ```
pub const GRAFT_API: &[ApiItem] = &[
    item!("call", "(target: Target, request: any, timeout_ms: number?) -> any", "Calls a process (its `handle_call`) and waits for the reply; raises on timeout (default 5000 ms) or when the callee crashes."),
    item!("cancel_timer", "(id: number) -> boolean", "Cancels a `send_after` timer; true if it was pending."),
    item!("cast", "(target: Target, msg: any) -> (boolean?, string?)", "Sends `msg` to the target's `handle_cast`; `nil, reason` when the mailbox is full or there is no such process."),
    item!("demonitor", "(ref: number) -> boolean", "Removes a monitor; true if it existed."),
    item!("exit", "(target_or_reason: any, reason: any?) -> ()", "`graft.exit(reason)` ends the caller; `graft.exit(pid, reason)` sends an exit signal (\"kill\" cannot be trapped)."),
    item!("is_pid", "(v: any) -> boolean", "Whether `v` is a pid."),
    item!("link", "(target: Target) -> boolean", "Links the caller and the target: when one exits abnormally, so does the other (unless it traps exits)."),
    item!("log", "{ info: (...any) -> (), warn: (...any) -> (), error: (...any) -> () }", "The guest log (rate-limited per sandbox); `print` is `graft.log.info`."),
    item!("monitor", "(target: Target) -> number", "Monitors the target: a `{ tag = \"DOWN\", ref, pid, reason }` message arrives when it exits."),
    item!("now", "() -> number", "Wall-clock milliseconds since the Unix epoch (the test clock's under `graft test`)."),
    item!("register", "(name: string) -> boolean", "Registers the caller under `name`."),
    item!("self", "() -> Pid", "The caller's pid (`nil` outside a process)."),
    item!("send", "(target: Target, msg: any) -> (boolean?, string?)", "Sends `msg` to the target's `handle_info`."),
    item!("send_after", "(ms: number, target: Target, msg: any) -> number", "Sends `msg` to the target's `handle_info` after `ms` milliseconds; returns a timer id."),
    item!("spawn", "(module: string, args: any?, opts: SpawnOptions?) -> Pid", "Starts a process of `module` and returns its pid once its `init` returned."),
    item!("spawn_link", "(module: string, args: any?, opts: SpawnOptions?) -> Pid", "As `spawn`, linked to the caller."),
    item!("start_child", "(sup: Target, spec_or_args: any) -> any", "Asks a supervisor to start a child (a child spec, or args for `simple_one_for_one`)."),
    item!("terminate_child", "(sup: Target, id_or_pid: any) -> any", "Asks a supervisor to stop a child."),
    item!("trap_exit", "(flag: boolean) -> boolean", "Turns exit signals into `{ tag = \"EXIT\", from, reason }` messages; returns the previous flag."),
    item!("unlink", "(target: Target) -> boolean", "Removes a link."),
    item!("unregister", "(name: string) -> boolean", "Frees a registered name; true if it existed."),
    item!("whereis", "(name: string) -> Pid?", "The pid registered under `name`, or nil."),
    item!("which_children", "(sup: Target) -> { any }", "A supervisor's children in start order: `{ id, pid (or false), module, restart }`."),
];

/// Types [`GRAFT_API`] refers to, declared before it.
const TYPES: &str = "\
--- A process id (opaque; compare with `==`, send as a message, show with `tostring`).
type Pid = any
--- A pid or a registered name.
type Target = Pid | string
--- `graft.spawn` options.
type SpawnOptions = { name: string?, link: boolean? }
";

/// `graft.d.luau`: luau-lsp definitions of `graft` from [`GRAFT_API`],
/// followed by `extra` (for example the test library's class).
///
/// ```
/// let d = graft::vm::definitions("");
/// assert!(d.contains("declare graft: {"));
/// assert!(d.contains("\tcall: (target: Target, request: any, timeout_ms: number?) -> any,"));
/// ```
pub fn definitions(extra: &str) -> String {
    let mut out = String::from(
        "-- Luau type definitions of Graft's `graft` global, for luau-lsp.\n\
         -- Generated by `graft types` from the table that installs `graft` in\n\
         -- the VM (graft::vm::GRAFT_API); regenerate instead of editing.\n\n",
    );
    out.push_str(TYPES);
    out.push_str("\ndeclare graft: {\n");
    for item in GRAFT_API {
        let _ = writeln!(out, "\t--- {}", item.doc);
        let _ = writeln!(out, "\t{}: {},", item.name, item.ty);
    }
    out.push_str("}\n");
    if !extra.is_empty() {
        out.push('\n');
        out.push_str(extra);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// luau-lsp is not at hand in tests; Luau's own parser is: every
    /// declared type must parse as an annotation under the declared aliases.
    #[test]
    fn every_declared_type_parses_as_luau() {
        for item in GRAFT_API {
            let source = format!("{TYPES}\nlocal _x: {} = nil\nreturn _x", item.ty);
            crate::vm::compile(item.name, "graft.d.luau", &source, 1 << 20)
                .unwrap_or_else(|e| panic!("graft.{}: {e}", item.name));
        }
    }

    #[test]
    fn the_guests_graft_has_exactly_the_declared_keys() {
        let node = crate::Node::with_threads(1);
        let spec = crate::SandboxSpec::new("api").entry(None);
        let sb = crate::block_on(node.create_sandbox(spec)).unwrap();
        let keys = crate::block_on(sb.eval(
            "local ks = {} for k in graft do table.insert(ks, k) end table.sort(ks) return ks",
        ))
        .unwrap();
        let declared: Vec<&str> = GRAFT_API.iter().map(|i| i.name).collect();
        assert_eq!(keys, serde_json::json!(declared));
        let frozen = crate::block_on(sb.eval("graft.extra = 1"));
        assert!(frozen.is_err(), "guests cannot add keys");
    }

    #[test]
    fn the_table_is_sorted_and_unique() {
        let names: Vec<&str> = GRAFT_API.iter().map(|i| i.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
    }
}
