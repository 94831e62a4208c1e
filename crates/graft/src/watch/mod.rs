//! Hot reload from disk: watch a sandbox's source folder and reload what
//! changed, the loop behind `graft run`, usable by any embedder.
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use graft::watch::{Watch, WatchEvent, WatchOptions};
//! use graft::{Node, SandboxSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::new();
//! let spec = SandboxSpec::from_dir("myapp".as_ref())?;
//! let initial: BTreeMap<String, String> = spec.modules.clone();
//! let sandbox = graft::block_on(node.create_sandbox(spec))?;
//! let watch = Watch::start("myapp/src", sandbox, &initial, WatchOptions::default(), |event| {
//!     match event {
//!         WatchEvent::Reloaded { report, .. } => println!("reloaded: {:?}", report.status),
//!         WatchEvent::ReloadFailed { error, .. } => eprintln!("still on the old code: {error}"),
//!         other => eprintln!("{other:?}"),
//!     }
//! })?;
//! // … serve; dropping `watch` (or `watch.stop()`) ends the watching.
//! # drop(watch);
//! # Ok(())
//! # }
//! ```
//!
//! Invariants:
//! * **Events only say "look again".** Editors save in many ways: in place,
//!   write-then-rename (atomic saves), delete-and-create, bursts of
//!   write/chmod/rename events. File-system events are debounced
//!   ([`WatchOptions::debounce`], default [`DEFAULT_DEBOUNCE`]); each quiet
//!   batch that is not only reads triggers one scan of the folder, and the
//!   modules whose content differs from what is loaded are reloaded together
//!   as **one** transaction ([`Sandbox::reload`](crate::Sandbox::reload) with default options). The
//!   kind of event or the path it names never matters, so every way of
//!   saving ends in the same scan.
//! * **Every save goes live exactly once.** Two checksums per module: the
//!   *loaded* one (its live version) and the *attempted* one (as last seen
//!   on disk). Nothing is tried again until some file differs from what was
//!   attempted, so a broken save is reported once ([`WatchEvent::ReloadFailed`],
//!   the old code keeps running) and the fix, which differs, triggers the
//!   next reload. The exceptions are reloads refused for a reason that
//!   passes ([`retried`]): the node's storage failed (read-only, full, an
//!   I/O error), or the sandbox was `busy` (restarting, or being rebuilt
//!   with new settings). The files are fine, so the reload is tried again
//!   with a backoff (up to [`RETRY_MAX`]) until it applies
//!   ([`WatchEvent::Retried`], then `Reloaded`) or fails for another
//!   reason; the file on disk and the running code never disagree
//!   silently. Each failure is reported once, not at each try (a new
//!   report only when the cause changes).
//! * **A replaced sandbox ends the retry quietly.** A retry whose sandbox
//!   is then destroyed, or a reload refused because the sandbox was just
//!   replaced (`Rebuilding`: rebuilt under new settings by
//!   `Node::reconfigure_sandbox`), stops without a report: whoever
//!   replaced it drives the new sandbox, e.g. with [`Watch::resume`], which
//!   reloads every file that differs from what the new sandbox runs.
//! * **Deleting never unloads.** A running sandbox cannot drop a module. When
//!   a module's file disappears the watcher first waits
//!   [`WatchOptions::recreate_grace`] (default [`DEFAULT_RECREATE_GRACE`]) for
//!   it to come back (a delete-and-create save), then reports
//!   [`WatchEvent::Deleted`] once, with who still uses it; the module stays
//!   loaded. A file that comes back is watched again as usual.
//! * **Which files are modules.** `*.luau` files under the folder, named as
//!   [`crate::config::module_name_for`] says (`chat/room.luau` is
//!   `chat.room`); editors' lock and swap files (names starting with `.` or
//!   `#`) are skipped silently, other files without a module name are
//!   reported once each ([`WatchEvent::Ignored`]).
//! * **Bounded work.** At most one scan is pending at any time (further
//!   events while one is pending fold into it); a scan reads at most 10,000
//!   entries nested at most 16 folders deep (the limits of
//!   [`crate::SandboxSpec::from_dir`]); a folder over those limits is not
//!   synced and a warning is logged. Scans and reloads run one at a time on
//!   the watcher's own thread, never on a scheduler thread or an async
//!   runtime, so the watcher needs no runtime.
//! * **Stopping.** Dropping the [`Watch`] stops watching at once and no event
//!   is delivered after it returns, except from a scan already under way,
//!   which still completes (`stop` waits for it).

// Without the (default) `watch` feature there is no watcher and no notify dependency.
#![cfg(feature = "watch")]

// The files (not part of the public docs): `options.rs` (`WatchOptions`),
// `event.rs` (`WatchEvent`), `retry.rs` (which failures are tried again, and
// the backoff), `handle.rs` (`Watch`: starting and stopping), `scan.rs`
// (finding the module files) and `sync.rs` (the watcher's thread: scan,
// reload, report).

mod event;
mod handle;
mod options;
mod retry;
mod scan;
mod sync;

pub use event::WatchEvent;
pub use handle::{Watch, WatchError};
pub use options::{WatchOptions, DEFAULT_DEBOUNCE, DEFAULT_RECREATE_GRACE};
pub use retry::{retried, RetryCause, RETRY_MAX};
