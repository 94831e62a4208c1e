//! # Graft
//!
//! Live-upgradable, supervised Luau sandboxes for Rust applications.
//!
//! A [`Node`] hosts many sandboxes. Each [`Sandbox`] has its own Luau VM,
//! modules, supervision tree, limits and capabilities. Processes inside run
//! server or supervisor behaviours (OTP's `gen_server` and `supervisor`
//! semantics) and exchange copied, plain-data messages. Modules are upgraded
//! while they run: a reload is one transaction that migrates every affected
//! process's state or changes nothing at all.
//!
//! The crate is layered; each folder is one layer:
//! * [`vm`]: the Luau VM of a sandbox, the guest environment, compilation;
//! * `kernel`: the kernel of a sandbox: processes, mailboxes, links, monitors, timers and
//!   the scheduler of callbacks (internal);
//! * `supervision`: the built-in supervisor behaviour (Luau, trusted);
//! * [`upgrade`]: module versions and the reload transaction;
//! * `node`: sandboxes scheduled in parallel on a thread pool, and the
//!   [`Sandbox`] handle an embedding app uses;
//! * [`store`]: the node's durable storage (one SQLite database).
//! * [`pid`]: [`Pid`] and [`Target`], how the API names processes (checked
//!   pids; text targets read as the runtime always read them).
//!
//! Everything else is internal (`pub(crate)`). Graft's own benchmarks and
//! fuzz targets reach a few internals (the compiler, `prepare`, the value
//! conversion) through the hidden `internals` module, compiled only with the
//! `internals` feature; an embedder needs neither.
//!
//! ```
//! use graft::{Node, SandboxSpec, HostFunctions};
//! let node = Node::new();
//! let host = HostFunctions::default().function("host.greet", |args| {
//!     Ok(serde_json::json!(format!("hello, {}", args[0].as_str().unwrap_or("?"))))
//! });
//! let spec = SandboxSpec::new("hello").entry(None).module("greeter", r#"
//!     return {
//!         init = function() return {} end,
//!         handle_call = function(name, from, state) return host.greet(name), state end,
//!     }
//! "#);
//! let sb = graft::block_on(node.create_sandbox_with(spec, host)).unwrap();
//! graft::block_on(sb.spawn("greeter", serde_json::json!(null), Some("greeter"))).unwrap();
//! let reply = graft::block_on(sb.call("greeter", serde_json::json!("ada"), None)).unwrap();
//! assert_eq!(reply, "hello, ada");
//! ```

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub(crate) mod clock;
pub mod config;
pub mod diagnostic;
pub mod error;
mod events;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals;
mod kernel;
mod node;
pub mod pid;
pub mod store;
pub mod upgrade;
pub mod value;
pub mod vm;
pub mod watch;

pub use config::{Limits, NodeLimits, SandboxSpec};
pub use diagnostic::Diagnostic;
pub use error::{Error, ReloadStep, Result};
pub use events::{EventCount, EventFilter, EventGap, EventPage, NodeEvent, MAX_SCAN};
pub use kernel::{AppStatus, Event};
pub use node::{
    block_on, with_timeout, BatchOptions, CheckpointStats, HostFunctions, ModuleCoverage, Node,
    NodeBuilder, ProcessInfo, Sandbox, SandboxInfo, SettingsOutcome, DATABASE_FILE,
    DEFAULT_CHECKPOINT_MS, MAX_CLOCK_STEPS, QUIESCE_TIMEOUT_MS,
};
pub use pid::{ParsePidError, Pid, Target};
pub use upgrade::{
    ModuleChange, ModuleInfo, ModuleVersion, ReloadOptions, ReloadReport, ReloadStatus,
    StateHandler, Timings,
};
pub use value::ExitReason;
