//! The rows of the store, as plain Rust values. They hold no graft types
//! (no `SandboxSpec`, no `Value`): the node converts, so the storage layer
//! does not move when the runtime's types do. JSON columns travel as JSON
//! text (`*_json` fields): the caller serialises where it likes (off the
//! sandbox's thread), the writer only checks it with SQLite's `json_valid`.

use serde::{Deserialize, Serialize};

/// A sandbox as stored: what is needed to create it again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// The sandbox id.
    pub id: String,
    /// The entry module (`None`: no app).
    pub entry: Option<String>,
    /// The limits, as JSON text.
    pub limits_json: String,
    /// Capabilities granted (`clock`, `random` …).
    pub capabilities: Vec<String>,
    /// The directory its modules came from, if any.
    pub source_root: Option<String>,
    /// Anything else of the spec, as JSON text (`{}` if nothing).
    pub spec_json: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: f64,
}

/// Whether a version is still in its canary window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionStatus {
    /// Committed for good: restored after a restart.
    Permanent,
    /// In a canary window: rolled back if the node restarts before it closes.
    Canary,
}

impl VersionStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Permanent => "permanent",
            VersionStatus::Canary => "canary",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<VersionStatus> {
        match s {
            "permanent" => Some(VersionStatus::Permanent),
            "canary" => Some(VersionStatus::Canary),
            _ => None,
        }
    }
}

/// One kept version of a module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The sandbox.
    pub sandbox: String,
    /// The module.
    pub module: String,
    /// 1, 2, 3 … per (sandbox, module).
    pub version: u32,
    /// SHA-256 of the source, hex.
    pub checksum: String,
    /// The Luau source.
    pub source: String,
    /// Modules this one `require`s.
    pub dependencies: Vec<String>,
    /// Permanent or canary.
    pub status: VersionStatus,
    /// Load time, ms since the Unix epoch.
    pub created_ms: f64,
}

/// A module's pointers: which version is current, which is stable, and which
/// number comes next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// The sandbox.
    pub sandbox: String,
    /// The module.
    pub module: String,
    /// The current version (`None` until one is set).
    pub current: Option<u32>,
    /// The last current version that was permanent: what a restart restores
    /// (a canary open at a crash is rolled back to it). Kept by the store:
    /// setting a permanent version current, or making the current version
    /// permanent, moves it.
    pub stable: Option<u32>,
    /// The next version number to mint: above every version ever stored.
    pub next_version: u32,
    /// The file the module came from (diagnostics), if any.
    pub file: Option<String>,
}

/// An event to append: with the sequence number its node gave it, or none
/// for the store to give the next one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// The node-wide sequence number, if the node numbered the event itself
    /// (it must not be stored already); `None`: the next free one.
    #[serde(default)]
    pub seq: Option<u64>,
    /// The sandbox (`None`: an event of the node).
    pub sandbox: Option<String>,
    /// `reload`, `rollback`, `crash` …
    pub kind: String,
    /// Details, as JSON text.
    pub payload_json: String,
    /// Time, ms since the Unix epoch.
    pub at_ms: f64,
}

/// A stored event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Node-wide sequence number (1, 2, 3 …, never reused): the SSE id.
    pub seq: u64,
    /// The sandbox (`None`: an event of the node).
    pub sandbox: Option<String>,
    /// The kind.
    pub kind: String,
    /// Details, as JSON text.
    pub payload_json: String,
    /// Time, ms since the Unix epoch.
    pub at_ms: f64,
}

/// What the event log has lost, per sandbox, as the database remembers it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventGaps {
    /// The highest event number each sandbox has lost (pruned, or dropped
    /// unwritten); a sandbox that lost none has no entry.
    pub through: std::collections::HashMap<String, u64>,
}

/// The last checkpoint of one registered process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The registered name.
    pub name: String,
    /// The module the process runs.
    pub module: String,
    /// The version of that module the state belongs to.
    pub module_version: u32,
    /// The state, as JSON text.
    pub state_json: String,
    /// When it was taken, ms since the Unix epoch.
    pub at_ms: f64,
}

/// An API token. Only the SHA-256 of its secret is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's public id (shown in lists and audit rows).
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// The sandboxes it is limited to (`None`: all).
    pub sandboxes: Option<Vec<String>>,
    /// A note given at creation.
    pub label: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: f64,
    /// Revocation time, if revoked.
    pub revoked_ms: Option<f64>,
}

/// One audited request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Row id (node-wide, increasing); ignored when appending.
    pub id: u64,
    /// Time, ms since the Unix epoch.
    pub at_ms: f64,
    /// The token used, if any.
    pub token_id: Option<String>,
    /// Its role, if any.
    pub role: Option<String>,
    /// HTTP method (or `cli`).
    pub method: String,
    /// The route (a pattern, not the raw path).
    pub route: String,
    /// The sandbox concerned, if any.
    pub sandbox: Option<String>,
    /// `ok` or an error kind.
    pub outcome: String,
    /// The HTTP status, if any.
    pub status: Option<u16>,
    /// How long it took, µs.
    pub duration_us: u64,
}

/// A filtered, paged read of the audit log ([`crate::store::Store::audit_query`]):
/// rows matching every filter that is set, newest first.
///
/// ```
/// let q = graft::store::AuditQuery { sandbox: Some("demo".into()), limit: 50, ..Default::default() };
/// assert!(q.token_id.is_none());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditQuery {
    /// Only rows of this token.
    pub token_id: Option<String>,
    /// Only rows concerning this sandbox.
    pub sandbox: Option<String>,
    /// Only rows with this outcome (`ok`, `pending`, an error kind).
    pub outcome: Option<String>,
    /// Only rows at or after this time, ms since the Unix epoch.
    pub since_ms: Option<f64>,
    /// Only rows with an id below this one (the next page).
    pub before: Option<u64>,
    /// At most this many rows.
    pub limit: usize,
}

/// Everything needed to bring a node back: every stored sandbox with its
/// modules, versions and checkpoints, read in one consistent snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestoreSnapshot {
    /// The sandboxes, by id.
    pub sandboxes: Vec<SandboxSnapshot>,
    /// The highest event sequence number ever given (0: none).
    pub last_event_seq: u64,
}

/// One sandbox of a [`RestoreSnapshot`].
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxSnapshot {
    /// The sandbox.
    pub sandbox: SandboxRecord,
    /// Its modules, by name.
    pub modules: Vec<ModuleSnapshot>,
    /// Its checkpoints, by registered name.
    pub checkpoints: Vec<CheckpointRecord>,
}

/// One module of a [`SandboxSnapshot`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleSnapshot {
    /// Current version and next number.
    pub module: ModuleRecord,
    /// Its kept versions, oldest first.
    pub versions: Vec<VersionRecord>,
}

impl ModuleSnapshot {
    /// The version a restart restores: the stable one (the last current
    /// version that was permanent; a canary open at a crash is rolled back).
    pub fn restore_version(&self) -> Option<&VersionRecord> {
        let stable = self.module.stable?;
        self.versions.iter().find(|v| v.version == stable)
    }

    /// Whether a canary was open when the snapshot was taken (current is not
    /// the stable version): a restart rolls it back and should say so.
    pub fn canary_open(&self) -> bool {
        self.module.current.is_some() && self.module.current != self.module.stable
    }
}
