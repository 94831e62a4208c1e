//! The durable node (SPEC §8): opening a node on a database, writing a
//! sandbox's creation and deletion, restoring everything on start, and the
//! checkpointer.
//!
//! # Invariants
//! * Every change the API acknowledges is in the store first: a sandbox's
//!   creation (its record, its first versions, their current pointers and a
//!   `sandbox_created` event) and deletion are one transaction each, written
//!   before the call returns; reloads write theirs at their commit point
//!   (`upgrade::persist`). A failed write changes nothing, in memory either.
//! * A restart brings back each module's last *permanent* version: a canary
//!   still open when the node stopped is rolled back, durably, with a
//!   `canary_rollback` event, before the sandbox runs.
//! * Registered processes get their last checkpointed state; anonymous ones
//!   start from `init`. Pids inside a restored state come back as their text
//!   (`"<module.N>"`), which addresses nothing: serials restart at 1.
//! * The checkpointer only writes processes whose state may have changed
//!   (see `checkpoint`), never from a sandbox's thread. A state it cannot
//!   checkpoint (not plain data) deletes that name's older checkpoint, with
//!   a `checkpoint_skipped` event, in one transaction.
//! * A sandbox's settings change (`reconfigure_sandbox`, used by `graft run`
//!   for an edited graft.toml) only through one transaction holding the new
//!   record, the modules it adds and a `sandbox_reconfigured` event, written
//!   before the sandbox is rebuilt; never while a canary window is open.
//! * A stored sandbox that fails to restore keeps its rows untouched
//!   (`Node::unrestored`): no creation writes over them; only an explicit
//!   `destroy` deletes them.
//! * `NodeBuilder::apply_settings` restores one sandbox with new settings
//!   through the same one transaction as `reconfigure_sandbox`, before its
//!   app first starts: the app never runs under the settings it replaces.
//! * The events of deleted sandboxes beyond the 16 kept are deleted from
//!   the store too, by the deletion that pushes them out (same transaction).
//! * A node refuses to start on a data directory it cannot write. The data
//!   directory's lock is released only once the store is closed (by
//!   `shutdown`, or when the last handle goes), so a node opened on the same
//!   directory never shares it with a previous node's writers.
//!
//! # Files
//! * `open.rs`: [`NodeBuilder`] and `open` (the data directory, the store,
//!   the event log, then the restore);
//! * `data_dir.rs`: the data directory's lock and the cleanup of a refused
//!   start;
//! * `records.rs`: the rows a sandbox's creation and settings are written as;
//! * `restore.rs`: rebuilding every stored sandbox on start;
//! * `settings.rs`: giving a sandbox new settings (`reconfigure_sandbox`,
//!   `NodeBuilder::apply_settings`);
//! * `checkpointer.rs`: checkpoints of registered processes, the periodic
//!   checkpointer and `shutdown`.

mod checkpointer;
mod data_dir;
mod open;
mod records;
mod restore;
mod settings;

pub(super) use checkpointer::Checkpoints;
pub use checkpointer::{CheckpointStats, DEFAULT_CHECKPOINT_MS};
pub use data_dir::DATABASE_FILE;
pub use open::NodeBuilder;
pub(super) use records::creation_ops;
pub use settings::SettingsOutcome;
