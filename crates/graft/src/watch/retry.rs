//! Which failed reloads a watcher tries again, and the state of a retry.
//!
//! # Invariants
//! * Only reloads refused for a reason that passes are tried again (the
//!   node's storage could not take them, or the sandbox was busy); nothing
//!   was applied, so the files on disk and the running code never disagree
//!   silently.
//! * Tries back off from `RETRY_MIN`, doubling up to [`RETRY_MAX`].

use std::time::Duration;

use crate::Error;

/// The longest wait between two tries of a reload the storage refused.
pub const RETRY_MAX: Duration = Duration::from_secs(1);

/// The first wait after a reload the storage refused (doubled up to
/// [`RETRY_MAX`]).
pub(super) const RETRY_MIN: Duration = Duration::from_millis(100);

/// Whether a reload that failed with `error` is tried again by a [`Watch`](super::Watch),
/// and why: the node's storage could not take it for a reason that may
/// pass (read-only, full, an I/O error), or the sandbox was `busy`
/// (restarting, or being rebuilt with new settings); nothing was applied.
///
/// ```
/// use graft::store::StoreError;
/// use graft::watch::{retried, RetryCause};
/// let ro = graft::Error::Storage(StoreError::ReadOnly { detail: "chmod".into() });
/// assert_eq!(retried(&ro), Some(RetryCause::Storage));
/// assert_eq!(retried(&graft::Error::Busy("rebuilt".into())), Some(RetryCause::Busy));
/// assert_eq!(retried(&graft::Error::InvalidInput("bad".into())), None);
/// ```
pub fn retried(error: &Error) -> Option<RetryCause> {
    match error {
        Error::Storage(
            crate::store::StoreError::ReadOnly { .. }
            | crate::store::StoreError::Full { .. }
            | crate::store::StoreError::Io { .. },
        ) => Some(RetryCause::Storage),
        Error::Busy(_) | Error::Rebuilding(_) => Some(RetryCause::Busy),
        _ => None,
    }
}

/// Why a [`Watch`](super::Watch) tries a reload again ([`retried`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryCause {
    /// The node's storage refused the write (read-only, full, I/O error).
    Storage,
    /// The sandbox could not take a reload then (`busy`: restarting, or
    /// being rebuilt with new settings).
    Busy,
}

/// A pending retry of a reload refused for a reason that passes.
pub(super) struct Retry {
    pub(super) delay: Duration,
    pub(super) failed_tries: u32,
    pub(super) since: std::time::Instant,
    /// Why the last try was refused (a new cause is reported once more).
    pub(super) cause: RetryCause,
}
