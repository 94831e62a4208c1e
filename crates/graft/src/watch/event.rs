//! What a watcher reports to its callback.
//!
//! # Invariants
//! * Each event is reported once: a failed reload once per content (or per
//!   new cause of a retry), a deletion once per deletion, an ignored file
//!   once per path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::retry::RetryCause;
use crate::{Error, ReloadReport};

/// What a [`Watch`](super::Watch) did, delivered to its callback on the watcher's thread.
///
/// ```
/// use graft::watch::WatchEvent;
/// fn describe(event: &WatchEvent) -> String {
///     match event {
///         WatchEvent::Reloaded { changed, .. } => format!("{} module(s) live", changed.len()),
///         WatchEvent::ReloadFailed { error, .. } => format!("kept the old code: {error}"),
///         WatchEvent::Deleted { module, .. } => format!("{module} stays loaded"),
///         WatchEvent::Ignored { path } => format!("{} is not a module", path.display()),
///         _ => String::new(),
///     }
/// }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum WatchEvent {
    /// Changed files went live together.
    Reloaded {
        /// The reload's report.
        report: ReloadReport,
        /// The reloaded modules and their files.
        changed: BTreeMap<String, PathBuf>,
    },
    /// A reload failed; nothing changed and the old code keeps running. The
    /// same content is not tried again, unless the storage refused it
    /// ([`retried`](super::retried)): then it is tried again until it applies.
    ReloadFailed {
        /// Why (a compile error carries diagnostics with module names).
        error: Error,
        /// Every module file found on disk, to place the error's diagnostics.
        files: BTreeMap<String, PathBuf>,
    },
    /// A loaded module's file is gone (and did not come back within the
    /// grace); the module stays loaded. Reported once per deletion.
    Deleted {
        /// The module.
        module: String,
        /// Its file, as last seen.
        path: PathBuf,
        /// Loaded modules that `require` it.
        dependents: Vec<String>,
        /// Live processes running it.
        pids: Vec<crate::Pid>,
    },
    /// A `.luau` file without a valid module name; reported once per path.
    Ignored {
        /// The file.
        path: PathBuf,
    },
    /// A reload refused for a reason that passes ([`retried`](super::retried)) was tried
    /// again and applied: its `Reloaded` follows.
    Retried {
        /// Tries that failed before this one.
        failed_tries: u32,
        /// Time since the first refusal.
        waited: Duration,
        /// Why the last refused try was refused.
        cause: RetryCause,
    },
}
