//! The hostile corpus (SPEC §7): one test per way a guest or a caller tried
//! to kill, hang or wedge a node. Each asserts the exact error kind and that
//! the node, a bystander sandbox and the listings still answer afterwards.

#[path = "../common/mod.rs"]
mod common;

mod support;

mod codec;
mod diagnostics;
mod guest;
mod memory;
mod node_limits;
mod reentry;
mod scheduler;
