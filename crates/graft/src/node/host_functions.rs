//! Host functions: what a Rust host grants a sandbox's guests, by name.

use std::sync::Arc;

use serde_json::Value as Json;

use crate::vm::{HostCall, HostEntry, HostTable};

/// Host functions granted to a sandbox, by dotted name (`"kv.get"` becomes
/// `kv.get` in Luau). Each takes JSON arguments and returns JSON or an error
/// message, which the guest sees as `nil, message`.
///
/// Three shapes:
/// * [`function`](Self::function): arguments only, run on the scheduler
///   thread inside the calling handler. The fast path, for quick functions.
/// * [`function_with_context`](Self::function_with_context): the same, but
///   the function also learns its caller ([`HostCall`]: sandbox id, pid).
/// * [`blocking`](Self::blocking): for functions that wait (I/O, locks,
///   sleeps). The calling process suspends; the function runs on the
///   node's blocking pool, so other processes and sandboxes keep running.
///
/// A panic in any of them is an error for the guest that called it.
///
/// ```
/// let host = graft::HostFunctions::default()
///     .function("kv.get", |args| Ok(serde_json::json!(format!("value of {}", args[0]))))
///     .function_with_context("whoami", |call| {
///         Ok(serde_json::json!({ "sandbox": call.sandbox, "pid": call.pid }))
///     });
/// assert!(host.names().any(|n| n == "kv.get"));
/// assert!(host.names().any(|n| n == "whoami"));
/// ```
#[derive(Clone, Default)]
pub struct HostFunctions(pub(super) HostTable);

impl HostFunctions {
    /// Adds a quick host function: it runs on the scheduler thread, inside
    /// the calling handler, so it must not wait (see [`blocking`](Self::blocking)).
    pub fn function(
        mut self,
        name: &str,
        f: impl Fn(Vec<Json>) -> std::result::Result<Json, String> + Send + Sync + 'static,
    ) -> Self {
        self.0
            .insert(name.to_owned(), HostEntry::Quick(Arc::new(f)));
        self
    }

    /// Adds a quick host function that receives its caller: the sandbox id
    /// and the calling process's pid (`"<counter.1>"`), with the arguments.
    /// Called outside a process (a module body), the guest gets `nil, message`.
    ///
    /// ```
    /// use graft::{HostFunctions, Node, SandboxSpec};
    /// use serde_json::json;
    /// let host = HostFunctions::default().function_with_context("who.am_i", |call| {
    ///     Ok(json!(format!("{} in {}", call.pid, call.sandbox)))
    /// });
    /// let spec = SandboxSpec::new("ctx").entry(None).module("m", r#"
    ///     local m = {}
    ///     function m.init(_) return {} end
    ///     function m.handle_call(_, _, s) return who.am_i(), s end
    ///     return m
    /// "#);
    /// let node = Node::new();
    /// let sandbox = graft::block_on(node.create_sandbox_with(spec, host)).unwrap();
    /// let pid = graft::block_on(sandbox.spawn("m", json!(null), None)).unwrap();
    /// let reply = graft::block_on(sandbox.call(&pid, json!(null), None)).unwrap();
    /// assert_eq!(reply, json!(format!("{pid} in ctx")));
    /// ```
    pub fn function_with_context(
        mut self,
        name: &str,
        f: impl for<'a> Fn(HostCall<'a>) -> std::result::Result<Json, String> + Send + Sync + 'static,
    ) -> Self {
        self.0
            .insert(name.to_owned(), HostEntry::WithContext(Arc::new(f)));
        self
    }

    /// Adds a blocking host function. When a guest calls it, the calling
    /// process suspends (as in a `graft.call` that waits) and the function
    /// runs on the node's blocking pool; its result resumes the process.
    /// Other processes of the sandbox, and other sandboxes, keep running.
    ///
    /// Bounds:
    /// * At most [`NodeLimits::max_blocking_host_calls`](crate::NodeLimits::max_blocking_host_calls)
    ///   run at once per node; more calls wait in a queue.
    /// * The caller waits at most its sandbox's `handler_ms` (wall clock),
    ///   then gets `nil, "<name>: timeout after …"`; a late result is
    ///   dropped. A function that never returns keeps its pool thread.
    /// * Arguments and the result are capped at the node's `max_value_bytes`.
    /// * A panic is an error (`nil, "<name>: panicked: …"`) for the caller.
    /// * If the sandbox is destroyed meanwhile, the result is dropped.
    /// * Only a process's callback may call it (a module body gets `nil, message`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use graft::{HostFunctions, Node, SandboxSpec};
    /// use serde_json::json;
    /// let host = HostFunctions::default().blocking("db.fetch", |call| {
    ///     std::thread::sleep(Duration::from_millis(20)); // stands for real I/O
    ///     Ok(json!({ "key": call.args[0], "asked_by": call.pid }))
    /// });
    /// let spec = SandboxSpec::new("db").entry(None).module("m", r#"
    ///     local m = {}
    ///     function m.init(_) return {} end
    ///     function m.handle_call(key, _, s)
    ///         local row, err = db.fetch(key)
    ///         assert(row, err)
    ///         return row.key, s
    ///     end
    ///     return m
    /// "#);
    /// let node = Node::new();
    /// let sandbox = graft::block_on(node.create_sandbox_with(spec, host)).unwrap();
    /// let pid = graft::block_on(sandbox.spawn("m", json!(null), None)).unwrap();
    /// let reply = graft::block_on(sandbox.call(&pid, json!("k1"), None)).unwrap();
    /// assert_eq!(reply, json!("k1"));
    /// ```
    pub fn blocking(
        mut self,
        name: &str,
        f: impl for<'a> Fn(HostCall<'a>) -> std::result::Result<Json, String> + Send + Sync + 'static,
    ) -> Self {
        self.0
            .insert(name.to_owned(), HostEntry::Blocking(Arc::new(f)));
        self
    }

    /// The registered names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(|s| s.as_str())
    }
}
