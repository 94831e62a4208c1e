//! How a watcher waits: the debounce of file-system events and the grace a
//! deleted file gets to come back.
//!
//! # Invariants
//! * The defaults keep edit-to-live well under 20 ms while folding an
//!   editor's burst of events into one reload, and let a delete-and-create
//!   save come back before a deletion is reported.

use std::time::Duration;

/// Default quiet time before a burst of events is handled. 10 ms keeps
/// edit-to-live well under 20 ms while still folding an editor's
/// write/rename/chmod burst into one reload (checksums drop repeats).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(10);

/// Default time a deleted file may take to come back (delete-and-create saves).
pub const DEFAULT_RECREATE_GRACE: Duration = Duration::from_millis(300);

/// How a [`Watch`](super::Watch) waits.
///
/// ```
/// use std::time::Duration;
/// let options = graft::watch::WatchOptions::default().debounce(Duration::from_millis(50));
/// assert_eq!(options.recreate_grace, graft::watch::DEFAULT_RECREATE_GRACE);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WatchOptions {
    /// Quiet time after the last file-system event before the folder is scanned.
    pub debounce: Duration,
    /// How long a vanished module file may take to reappear before it is
    /// reported as deleted.
    pub recreate_grace: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            debounce: DEFAULT_DEBOUNCE,
            recreate_grace: DEFAULT_RECREATE_GRACE,
        }
    }
}

impl WatchOptions {
    /// Sets [`WatchOptions::debounce`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = graft::watch::WatchOptions::default().debounce(Duration::from_millis(5));
    /// assert_eq!(o.debounce, Duration::from_millis(5));
    /// ```
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Sets [`WatchOptions::recreate_grace`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = graft::watch::WatchOptions::default().recreate_grace(Duration::ZERO);
    /// assert_eq!(o.recreate_grace, Duration::ZERO);
    /// ```
    pub fn recreate_grace(mut self, grace: Duration) -> Self {
        self.recreate_grace = grace;
        self
    }
}
