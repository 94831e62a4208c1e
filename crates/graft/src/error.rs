//! The library's error type. Every variant says what happened; the HTTP layer
//! maps [`Error::kind`] to a status code and the CLI prints [`Error`]'s
//! `Display` (plus diagnostics' code frames).

use crate::diagnostic::Diagnostic;
use crate::value::{ExitReason, ValueError};

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a call into Graft.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No sandbox with this id on the node.
    #[error("no sandbox `{0}` on this node")]
    NoSandbox(String),
    /// A sandbox with this id exists already.
    #[error("a sandbox `{0}` exists already")]
    SandboxExists(String),
    /// No live process with this pid or registered name.
    #[error("no process `{0}` in this sandbox")]
    NoProcess(String),
    /// No module of this name in the sandbox.
    #[error("no module `{0}` in this sandbox")]
    NoModule(String),
    /// The module has no kept version with this number.
    #[error(
        "module `{module}` has no kept version {version} (kept: {})",
        kept_text(kept)
    )]
    NoVersion {
        /// Module name.
        module: String,
        /// The version asked for.
        version: u32,
        /// The versions kept, oldest first.
        kept: Vec<u32>,
    },
    /// Malformed input: a bad id, limit, JSON shape …
    #[error("{0}")]
    InvalidInput(String),
    /// A source failed to compile or check; one diagnostic per problem.
    #[error("{}", diagnostics.first().map(|d| d.to_string()).unwrap_or_default())]
    Compile {
        /// The problems found, first one first.
        diagnostics: Vec<Diagnostic>,
    },
    /// A reload step failed after compile/check; nothing was changed.
    #[error("reload aborted, nothing changed: {message}")]
    ReloadAborted {
        /// The step that failed.
        step: ReloadStep,
        /// The module involved.
        module: Option<String>,
        /// The process involved (migrations).
        process: Option<String>,
        /// Line of the failing code in `module`'s source, where known.
        line: Option<u32>,
        /// Column of the failing code, where known.
        column: Option<u32>,
        /// What went wrong.
        message: String,
    },
    /// A call got no reply in time.
    #[error("call to `{target}` timed out after {timeout_ms} ms")]
    CallTimeout {
        /// The target as given.
        target: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The process handling a call crashed (or exited) before replying.
    #[error("`{target}` exited before replying: {reason}")]
    Crashed {
        /// The target as given.
        target: String,
        /// Why it exited.
        reason: ExitReason,
    },
    /// The target's mailbox holds `max_mailbox` messages already.
    #[error("mailbox of `{0}` is full (max_mailbox reached); the message was not delivered")]
    MailboxFull(String),
    /// `max_processes` reached.
    #[error("the sandbox has reached max_processes ({0})")]
    TooManyProcesses(usize),
    /// A process's `init` failed.
    #[error("{module}: init failed: {reason}")]
    SpawnFailed {
        /// The module spawned.
        module: String,
        /// Why init failed.
        reason: ExitReason,
    },
    /// A value is not plain data (a function, a cycle …).
    #[error("not plain data: {0}")]
    NotPlainData(String),
    /// The sandbox was destroyed or its runtime stopped while the request waited.
    #[error("sandbox `{0}` stopped before answering")]
    SandboxStopped(String),
    /// A Luau error outside any process (e.g. in `eval`), as text: the
    /// guest's message, or a VM failure described in words.
    #[error("{0}")]
    Luau(String),
    /// The VM failed while the host drove it (building a table, calling the
    /// prelude …). Same `kind` and text as [`Error::Luau`]; the mlua error is
    /// kept as the source.
    #[error("{0}")]
    Vm(#[source] mlua::Error),
    /// A value refers to itself (a reply, state or message with a cycle).
    #[error("cyclic value: {0}")]
    CyclicValue(String),
    /// A value's JSON form is larger than the node's `max_value_bytes`.
    #[error("value too large: its JSON form passed {limit} bytes (max_value_bytes); {what}")]
    ValueTooLarge {
        /// The cap it passed.
        limit: usize,
        /// Where the value came from.
        what: String,
    },
    /// A limit outside the range the node accepts.
    #[error("limit `{field}` = {value} is out of range: it must be between {min} and {max}")]
    LimitOutOfRange {
        /// The limit's name (`memory_bytes`, `handler_ms`, …).
        field: String,
        /// The value given.
        value: String,
        /// The smallest accepted value.
        min: u64,
        /// The largest accepted value.
        max: u64,
    },
    /// A node-wide cap was reached (`--max-sandboxes` …).
    #[error("node limit reached: {0}")]
    NodeLimit(String),
    /// The sandbox cannot take this request now (e.g. it is restarting).
    #[error("sandbox is busy: {0}")]
    Busy(String),
    /// The sandbox is being rebuilt with new settings
    /// (`Node::reconfigure_sandbox`, a `graft.toml` edit under `graft run`):
    /// for that moment it takes no request; try again shortly.
    #[error("sandbox `{0}` is being rebuilt with new settings (graft.toml changed); try again in a moment")]
    Rebuilding(String),
    /// The store holds a sandbox with this id that could not be restored
    /// (`Node::unrestored`): creating it would overwrite its kept versions
    /// and states.
    #[error("sandbox `{id}` is stored on this node but could not be restored ({reason}); its kept versions and states are still in the database: fix the cause and restart the node, or delete it first (`DELETE /api/v1/sandboxes/{id}`, or `graft run DIR --discard {id}`), which loses its data")]
    Unrestored {
        /// The sandbox id.
        id: String,
        /// Why it could not be restored.
        reason: String,
    },
    /// The sandbox was stopped by an internal error; restart or delete it.
    #[error("sandbox `{id}` failed: {message}; restart or delete it")]
    SandboxFailed {
        /// The sandbox id.
        id: String,
        /// What went wrong (an internal panic's message).
        message: String,
    },
    /// The sandbox's heap is full (`memory_bytes`) and a full collection did not help.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A bad argument: a name that looks like a pid, a negative delay …
    #[error("bad argument: {0}")]
    BadArg(String),
    /// The node's storage failed (disk full, read-only, corrupt file …); the
    /// write that met it was not applied. Its kind is the storage error's
    /// (`storage_full`, `storage_read_only` …).
    #[error(transparent)]
    Storage(#[from] crate::store::StoreError),
}

impl Error {
    /// A stable machine-readable name, used as `error.kind` in the HTTP API.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoSandbox(_) => "no_sandbox",
            Error::SandboxExists(_) => "sandbox_exists",
            Error::NoProcess(_) => "no_process",
            Error::NoModule(_) => "no_module",
            Error::NoVersion { .. } => "no_version",
            Error::InvalidInput(_) => "invalid_input",
            Error::Compile { .. } => "compile_error",
            Error::ReloadAborted { .. } => "reload_aborted",
            Error::CallTimeout { .. } => "timeout",
            Error::Crashed { .. } => "crashed",
            Error::MailboxFull(_) => "mailbox_full",
            Error::TooManyProcesses(_) => "max_processes",
            Error::SpawnFailed { .. } => "spawn_failed",
            Error::NotPlainData(_) => "not_plain_data",
            Error::SandboxStopped(_) => "sandbox_stopped",
            Error::Luau(_) | Error::Vm(_) => "luau_error",
            Error::CyclicValue(_) => "cyclic_value",
            Error::ValueTooLarge { .. } => "value_too_large",
            Error::LimitOutOfRange { .. } => "limit_out_of_range",
            Error::NodeLimit(_) => "node_limit",
            Error::Busy(_) => "busy",
            Error::Rebuilding(_) => "sandbox_rebuilding",
            Error::Unrestored { .. } => "sandbox_unrestored",
            Error::SandboxFailed { .. } => "sandbox_failed",
            Error::OutOfMemory(_) => "out_of_memory",
            Error::BadArg(_) => "badarg",
            Error::Storage(e) => e.kind(),
        }
    }
}

impl From<mlua::Error> for Error {
    fn from(e: mlua::Error) -> Self {
        Error::Vm(e)
    }
}

/// The step of a reload that failed ([`Error::ReloadAborted`]). Serialised
/// (and displayed) as its snake_case name: `evaluate`, `check` …
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReloadStep {
    /// A module body raised, ran too long or returned no table.
    Evaluate,
    /// A behaviour check failed: missing callbacks, a supervisor spec its
    /// running supervisors reject …
    Check,
    /// The state handler given with the request did not load.
    StateHandler,
    /// A state migration (`code_change` or the state handler) failed.
    Migrate,
    /// Processes of the affected modules stayed inside callbacks too long.
    Quiesce,
    /// Not attempted: an earlier sandbox of a rolling batch failed.
    Rolling,
}

impl ReloadStep {
    /// The step's name, as in JSON: `evaluate`, `check`, `state_handler`,
    /// `migrate`, `quiesce`, `rolling`.
    ///
    /// ```
    /// assert_eq!(graft::error::ReloadStep::StateHandler.as_str(), "state_handler");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadStep::Evaluate => "evaluate",
            ReloadStep::Check => "check",
            ReloadStep::StateHandler => "state_handler",
            ReloadStep::Migrate => "migrate",
            ReloadStep::Quiesce => "quiesce",
            ReloadStep::Rolling => "rolling",
        }
    }
}

impl std::fmt::Display for ReloadStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `3, 4, 5`: kept versions as the `no_version` message lists them.
fn kept_text(kept: &[u32]) -> String {
    kept.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A text that is not a pid, where one was required: `invalid_input`.
///
/// ```
/// fn parse(text: &str) -> graft::Result<graft::Pid> {
///     Ok(text.parse::<graft::Pid>()?)
/// }
/// assert_eq!(parse("<m.0>").unwrap_err().kind(), "invalid_input");
/// ```
impl From<crate::pid::ParsePidError> for Error {
    fn from(e: crate::pid::ParsePidError) -> Self {
        Error::InvalidInput(format!("invalid pid: {e}"))
    }
}

impl From<ValueError> for Error {
    fn from(e: ValueError) -> Self {
        match e {
            ValueError::NotPlainData(m) => Error::NotPlainData(m),
            ValueError::Cyclic(m) => Error::CyclicValue(m),
            ValueError::TooLarge { limit, what } => Error::ValueTooLarge { limit, what },
            ValueError::Luau(m) => Error::Luau(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: [(ReloadStep, &str); 6] = [
        (ReloadStep::Evaluate, "evaluate"),
        (ReloadStep::Check, "check"),
        (ReloadStep::StateHandler, "state_handler"),
        (ReloadStep::Migrate, "migrate"),
        (ReloadStep::Quiesce, "quiesce"),
        (ReloadStep::Rolling, "rolling"),
    ];

    #[test]
    fn reload_steps_serialise_to_their_historic_names() {
        for (step, name) in STEPS {
            assert_eq!(serde_json::to_value(step).unwrap(), serde_json::json!(name));
            assert_eq!(step.as_str(), name);
            assert_eq!(step.to_string(), name);
        }
    }

    #[test]
    fn no_version_lists_the_kept_versions_in_its_message() {
        let e = Error::NoVersion {
            module: "m".into(),
            version: 9,
            kept: vec![3, 4, 5],
        };
        assert_eq!(
            e.to_string(),
            "module `m` has no kept version 9 (kept: 3, 4, 5)"
        );
        let none = Error::NoVersion {
            module: "m".into(),
            version: 1,
            kept: vec![],
        };
        assert_eq!(
            none.to_string(),
            "module `m` has no kept version 1 (kept: )"
        );
    }

    #[test]
    fn vm_errors_keep_their_source_and_read_like_luau_errors() {
        let source = mlua::Error::runtime("boom");
        let e = Error::from(source.clone());
        assert_eq!(e.kind(), "luau_error");
        // The text `Error::Luau(e.to_string())` had before the source was kept.
        assert_eq!(e.to_string(), source.to_string());
        assert!(std::error::Error::source(&e).is_some());
    }
}
