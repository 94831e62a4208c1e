//! The write operations: what a submission to the writer may ask for, and
//! what each one reports back. How each is applied is in [`super::apply`].
//!
//! Invariants:
//! * Every operation is plain data (`Clone`, no handle to a connection): a
//!   submission can be queued, logged and retried without side effects.
//! * Each operation has a stable name ([`WriteOp::name`]) that its errors
//!   carry.

use super::records::{
    AuditRecord, CheckpointRecord, NewEvent, SandboxRecord, TokenRecord, VersionRecord,
    VersionStatus,
};

/// One write. A submission is a list of these that commit atomically
/// together (all or none), e.g. a reload's version + current pointer + event +
/// audit row.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum WriteOp {
    /// Creates a sandbox, or updates its entry, limits, capabilities, source
    /// root and spec (its versions and checkpoints are kept).
    PutSandbox(SandboxRecord),
    /// Deletes a sandbox with its modules, versions and checkpoints (its
    /// events and audit rows stay). Fails with `NotFound` if absent.
    DeleteSandbox {
        /// The sandbox id.
        id: String,
    },
    /// Stores a new module version (and raises the module's next number above
    /// it). A version number is stored once: storing it again fails.
    PutVersion(VersionRecord),
    /// Makes a stored version current (a reload, rollback or roll-forward).
    /// If the version is permanent it also becomes the stable one.
    SetCurrent {
        /// The sandbox.
        sandbox: String,
        /// The module.
        module: String,
        /// The version, which must be stored.
        version: u32,
        /// The file the module came from, if known (`None` keeps the old one).
        file: Option<String>,
    },
    /// Marks a version permanent (its canary window closed cleanly) or canary.
    /// Making the current version permanent makes it the stable one too.
    SetVersionStatus {
        /// The sandbox.
        sandbox: String,
        /// The module.
        module: String,
        /// The version.
        version: u32,
        /// The new status.
        status: VersionStatus,
    },
    /// Replaces a module's whole kept history (an import): every stored
    /// version of the module is deleted and `versions` stored instead, all
    /// permanent, with `current` (which must be among them) current and
    /// stable. The module's next number stays above every number it had.
    ReplaceHistory {
        /// The sandbox.
        sandbox: String,
        /// The module.
        module: String,
        /// The new history, each record for this sandbox and module.
        versions: Vec<VersionRecord>,
        /// The version that runs.
        current: u32,
    },
    /// Forgets a kept version (history pruning). The current and the stable
    /// version cannot be dropped.
    DropVersion {
        /// The sandbox.
        sandbox: String,
        /// The module.
        module: String,
        /// The version.
        version: u32,
    },
    /// Appends an event (its node-wide sequence number is in the receipt) and
    /// forgets that sandbox's oldest events beyond `max_events_per_sandbox`.
    AppendEvent(NewEvent),
    /// Forgets every event of a sandbox that no longer exists (a node keeps
    /// the events of its 16 most recently deleted sandboxes only). Bounded: a sandbox holds at most
    /// `max_events_per_sandbox` events. Absent events are no error.
    DeleteEvents {
        /// The deleted sandbox.
        sandbox: String,
    },
    /// Records that a sandbox has lost the event numbers up to `through`
    /// (events dropped unwritten while the store refused writes), so that
    /// a restarted node still tells its readers. Pruning records its own.
    MarkEventGap {
        /// The sandbox whose events were lost.
        sandbox: String,
        /// The highest lost number.
        through: u64,
    },
    /// Writes the last checkpoint of some registered processes of a sandbox
    /// (replacing older ones of the same names) and forgets the checkpoints of
    /// `removed` names (processes gone or unregistered).
    PutCheckpoints {
        /// The sandbox.
        sandbox: String,
        /// Checkpoints to write.
        rows: Vec<CheckpointRecord>,
        /// Registered names whose checkpoint is forgotten.
        removed: Vec<String>,
    },
    /// Forgets every checkpoint of a sandbox (before a full rewrite in the
    /// same submission, or when its app restarts from scratch).
    ClearCheckpoints {
        /// The sandbox.
        sandbox: String,
    },
    /// Stores a new token.
    PutToken(TokenRecord),
    /// Revokes a token (revoking twice keeps the first time). `NotFound` if
    /// absent.
    RevokeToken {
        /// The token id.
        id: String,
        /// Revocation time, ms since the Unix epoch.
        at_ms: f64,
    },
    /// Appends an audit row (its id is in the receipt).
    AppendAudit(AuditRecord),
    /// Completes an audit row appended before its request ran: sets its
    /// outcome, status and duration, and its token and role when given (a
    /// sign-in learns them only while it runs). `NotFound` if absent.
    FinishAudit {
        /// The row id (from the receipt of its `AppendAudit`).
        id: u64,
        /// `ok` or an error kind.
        outcome: String,
        /// The HTTP status.
        status: Option<u16>,
        /// How long the request took, µs.
        duration_us: u64,
        /// The token, if learnt while the request ran (`None` keeps the row's).
        token_id: Option<String>,
        /// Its role, likewise.
        role: Option<String>,
    },
}

impl WriteOp {
    /// The operation's name, used in errors.
    pub fn name(&self) -> &'static str {
        match self {
            WriteOp::PutSandbox(_) => "put_sandbox",
            WriteOp::DeleteSandbox { .. } => "delete_sandbox",
            WriteOp::PutVersion(_) => "put_version",
            WriteOp::SetCurrent { .. } => "set_current",
            WriteOp::SetVersionStatus { .. } => "set_version_status",
            WriteOp::DropVersion { .. } => "drop_version",
            WriteOp::ReplaceHistory { .. } => "replace_history",
            WriteOp::AppendEvent(_) => "append_event",
            WriteOp::DeleteEvents { .. } => "delete_events",
            WriteOp::MarkEventGap { .. } => "mark_event_gap",
            WriteOp::PutCheckpoints { .. } => "put_checkpoints",
            WriteOp::ClearCheckpoints { .. } => "clear_checkpoints",
            WriteOp::PutToken(_) => "put_token",
            WriteOp::RevokeToken { .. } => "revoke_token",
            WriteOp::AppendAudit(_) => "append_audit",
            WriteOp::FinishAudit { .. } => "finish_audit",
        }
    }
}

/// What one applied operation produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// Done; nothing to report.
    Done,
    /// The event's node-wide sequence number.
    Event {
        /// The sequence number.
        seq: u64,
    },
    /// The audit row's id.
    Audit {
        /// The row id.
        id: u64,
    },
    /// Rows written by `PutCheckpoints` / `ClearCheckpoints`.
    Checkpoints {
        /// Rows written or deleted.
        rows: usize,
    },
}

/// Settings the operations need.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ApplyCtx<'a> {
    pub max_events_per_sandbox: u64,
    pub path: &'a std::path::Path,
}
