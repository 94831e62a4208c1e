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
//!   as **one** transaction ([`Sandbox::reload`] with default options). The
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult};

use crate::config::{MAX_PROJECT_DEPTH, MAX_PROJECT_ENTRIES};
use crate::{block_on, Error, ReloadOptions, ReloadReport, Sandbox};

/// Default quiet time before a burst of events is handled. 10 ms keeps
/// edit-to-live well under 20 ms while still folding an editor's
/// write/rename/chmod burst into one reload (checksums drop repeats).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(10);

/// The longest wait between two tries of a reload the storage refused.
pub const RETRY_MAX: Duration = Duration::from_secs(1);

/// The first wait after a reload the storage refused (doubled up to
/// [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_millis(100);

/// Whether a reload that failed with `error` is tried again by a [`Watch`],
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

/// Why a [`Watch`] tries a reload again ([`retried`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryCause {
    /// The node's storage refused the write (read-only, full, I/O error).
    Storage,
    /// The sandbox could not take a reload then (`busy`: restarting, or
    /// being rebuilt with new settings).
    Busy,
}

/// Default time a deleted file may take to come back (delete-and-create saves).
pub const DEFAULT_RECREATE_GRACE: Duration = Duration::from_millis(300);

/// How a [`Watch`] waits.
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

/// What a [`Watch`] did, delivered to its callback on the watcher's thread.
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
    /// ([`retried`]): then it is tried again until it applies.
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
    /// A reload refused for a reason that passes ([`retried`]) was tried
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

/// The watcher could not be started.
///
/// ```no_run
/// # let node = graft::Node::new();
/// # let sandbox = graft::block_on(node.create_sandbox(graft::SandboxSpec::new("x").module("app", "return {}"))).unwrap();
/// let err = graft::watch::Watch::start("no/such/dir", sandbox, &Default::default(),
///     Default::default(), |_| {}).unwrap_err();
/// assert!(err.to_string().starts_with("cannot watch no/such/dir"));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}", path.display())]
pub struct WatchError {
    path: PathBuf,
    #[source]
    source: notify_debouncer_full::notify::Error,
}

impl WatchError {
    /// The folder that could not be watched.
    ///
    /// ```no_run
    /// # fn f(e: graft::watch::WatchError) {
    /// eprintln!("{}", e.path().display());
    /// # }
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A running watcher; watching stops when it is dropped (see [`Watch::stop`]).
///
/// ```no_run
/// # let node = graft::Node::new();
/// # let sandbox = graft::block_on(node.create_sandbox(graft::SandboxSpec::new("x").module("app", "return {}"))).unwrap();
/// let watch = graft::watch::Watch::start("src", sandbox, &Default::default(),
///     Default::default(), |event| println!("{event:?}"))?;
/// watch.stop();
/// # Ok::<(), graft::watch::WatchError>(())
/// ```
pub struct Watch {
    /// Declared first: dropping it ends the file-system events, which ends
    /// the watcher's loop.
    debouncer: Option<Box<dyn std::any::Any + Send>>,
    stopped: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("stopped", &self.stopped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Starts watching `src` (recursively) for `sandbox`, which was created
    /// from the sources `initial` (module → source). Saves made since those
    /// sources were read are picked up by a first scan right away.
    /// `on_event` runs on the watcher's thread: a slow callback delays the
    /// next scan, never the sandbox.
    ///
    /// ```no_run
    /// # let node = graft::Node::new();
    /// # let spec = graft::SandboxSpec::from_dir("app".as_ref()).unwrap();
    /// # let initial = spec.modules.clone();
    /// # let sandbox = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let watch = graft::watch::Watch::start("app/src", sandbox, &initial,
    ///     Default::default(), |event| eprintln!("{event:?}"))?;
    /// # Ok::<(), graft::watch::WatchError>(())
    /// ```
    pub fn start(
        src: impl AsRef<Path>,
        sandbox: Sandbox,
        initial: &BTreeMap<String, String>,
        options: WatchOptions,
        on_event: impl FnMut(WatchEvent) + Send + 'static,
    ) -> Result<Watch, WatchError> {
        let sums: BTreeMap<String, String> = initial
            .iter()
            .map(|(m, s)| (m.clone(), crate::upgrade::checksum(s)))
            .collect();
        Watch::start_from(src.as_ref(), sandbox, sums, options, Box::new(on_event))
    }

    /// Starts watching `src` for `sandbox` from what the sandbox **runs**
    /// (each module's current checksum), not from what the files held
    /// when it was built: the first scan reloads every file that differs.
    /// For a sandbox that was rebuilt (`Node::reconfigure_sandbox`) while
    /// saves may have been refused or were still being retried on the old
    /// one: none of them is lost.
    ///
    /// ```no_run
    /// # let node = graft::Node::new();
    /// # let sandbox = graft::block_on(node.create_sandbox(graft::SandboxSpec::new("x").module("app", "return {}"))).unwrap();
    /// let watch = graft::watch::Watch::resume("app/src", sandbox,
    ///     Default::default(), |event| eprintln!("{event:?}"))?;
    /// # Ok::<(), graft::watch::WatchError>(())
    /// ```
    pub fn resume(
        src: impl AsRef<Path>,
        sandbox: Sandbox,
        options: WatchOptions,
        on_event: impl FnMut(WatchEvent) + Send + 'static,
    ) -> Result<Watch, WatchError> {
        // A sandbox that cannot answer (stopped meanwhile) runs nothing we
        // know of: every file counts as changed, and the reload says why.
        let sums: BTreeMap<String, String> = block_on(sandbox.modules())
            .map(|ms| ms.into_iter().map(|m| (m.name, m.checksum)).collect())
            .unwrap_or_default();
        Watch::start_from(src.as_ref(), sandbox, sums, options, Box::new(on_event))
    }

    /// Starts watching with `sums` (module → checksum) as what is loaded.
    fn start_from(
        src: &Path,
        sandbox: Sandbox,
        sums: BTreeMap<String, String>,
        options: WatchOptions,
        on_event: Box<dyn FnMut(WatchEvent) + Send>,
    ) -> Result<Watch, WatchError> {
        let src = src.to_owned();
        // Capacity 1: a pending "look again" covers every later event.
        let (tx, rx) = sync_channel::<()>(1);
        let mut debouncer =
            new_debouncer(options.debounce, None, move |res: DebounceEventResult| {
                match res {
                    // Reads (the scan's own included) are not changes.
                    Ok(events)
                        if events
                            .iter()
                            .any(|e| !matches!(e.kind, EventKind::Access(_))) =>
                    {
                        // Full: the pending scan will see this change too;
                        // disconnected: the watcher is stopping.
                        let _ = tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(errors) => {
                        for e in errors {
                            tracing::warn!("watching src/: {e}");
                        }
                    }
                }
            })
            .map_err(|source| WatchError {
                path: src.clone(),
                source,
            })?;
        debouncer
            .watch(&src, RecursiveMode::Recursive)
            .map_err(|source| WatchError {
                path: src.clone(),
                source,
            })?;
        let stopped = Arc::new(AtomicBool::new(false));
        let syncer = Syncer {
            src,
            sandbox,
            grace: options.recreate_grace,
            loaded: sums.clone(),
            attempted: sums,
            paths: BTreeMap::new(),
            explained: BTreeSet::new(),
            bad_names: BTreeSet::new(),
            stopped: stopped.clone(),
            on_event,
            retry: None,
        };
        let thread = std::thread::Builder::new()
            .name("graft-watch".into())
            .spawn(move || syncer.run(rx))
            .map_err(|e| WatchError {
                path: PathBuf::new(),
                source: notify_debouncer_full::notify::Error::io(e),
            })?;
        Ok(Watch {
            debouncer: Some(Box::new(debouncer)),
            stopped,
            thread: Some(thread),
        })
    }

    /// Stops watching and waits for a scan or reload under way to finish;
    /// no event is delivered after it returns.
    ///
    /// ```no_run
    /// # fn f(watch: graft::watch::Watch) {
    /// watch.stop();
    /// # }
    /// ```
    pub fn stop(mut self) {
        self.halt();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn halt(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Ends the event stream: the watcher's thread sees the channel close.
        self.debouncer.take();
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Not joined: a drop must not block on a reload under way (it ends
        // soon and, with `stopped` set, reports nothing).
        self.halt();
    }
}

/// A module file as found by a scan.
struct File {
    path: PathBuf,
    source: String,
    checksum: String,
}

/// The state of the watcher's thread.
struct Syncer {
    src: PathBuf,
    sandbox: Sandbox,
    grace: Duration,
    /// Module → checksum of its live version.
    loaded: BTreeMap<String, String>,
    /// Module → checksum last seen on disk.
    attempted: BTreeMap<String, String>,
    /// Module → file as last seen (for deleted files).
    paths: BTreeMap<String, PathBuf>,
    /// Deleted modules already reported.
    explained: BTreeSet<String>,
    /// Files ignored for their names, already reported.
    bad_names: BTreeSet<PathBuf>,
    stopped: Arc<AtomicBool>,
    on_event: Box<dyn FnMut(WatchEvent) + Send>,
    /// A reload the storage refused, to try again.
    retry: Option<Retry>,
}

/// A pending retry of a reload refused for a reason that passes.
struct Retry {
    delay: Duration,
    failed_tries: u32,
    since: std::time::Instant,
    /// Why the last try was refused (a new cause is reported once more).
    cause: RetryCause,
}

impl Syncer {
    fn run(mut self, rx: Receiver<()>) {
        // Catch saves made between reading the sources and watching them.
        self.sync(false);
        loop {
            let retry_due = match &self.retry {
                Some(r) => match rx.recv_timeout(r.delay) {
                    Ok(()) => false,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => true,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                },
                None => {
                    if rx.recv().is_err() {
                        return;
                    }
                    false
                }
            };
            if self.stopped() {
                return;
            }
            self.sync(retry_due);
        }
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn emit(&mut self, event: WatchEvent) {
        if !self.stopped() {
            (self.on_event)(event);
        }
    }

    /// Every `.luau` file under `src`, or `None` when the folder is over the
    /// bounds of the module docs.
    fn list(&self) -> Option<Vec<PathBuf>> {
        fn walk(dir: &Path, depth: usize, seen: &mut usize, out: &mut Vec<PathBuf>) -> bool {
            if depth > MAX_PROJECT_DEPTH {
                return false;
            }
            let Ok(entries) = std::fs::read_dir(dir) else {
                return true;
            };
            for entry in entries.flatten() {
                *seen += 1;
                if *seen > MAX_PROJECT_ENTRIES {
                    return false;
                }
                let path = entry.path();
                if path.is_dir() {
                    if !walk(&path, depth + 1, seen, out) {
                        return false;
                    }
                } else if path.extension().is_some_and(|e| e == "luau")
                    // editors' lock and swap files (`.#counter.luau`, …)
                    && !path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(['.', '#']))
                {
                    out.push(path);
                }
            }
            true
        }
        let mut out = Vec::new();
        if walk(&self.src, 0, &mut 0, &mut out) {
            Some(out)
        } else {
            tracing::warn!(
                "not syncing {}: more than {MAX_PROJECT_ENTRIES} entries or deeper than {MAX_PROJECT_DEPTH} folders",
                self.src.display()
            );
            None
        }
    }

    /// Every module file under `src` with its content.
    fn scan(&mut self) -> Option<BTreeMap<String, File>> {
        let mut out = BTreeMap::new();
        for path in self.list()? {
            let Some(name) = crate::config::module_name_for(&self.src, &path) else {
                if self.bad_names.insert(path.clone()) {
                    self.emit(WatchEvent::Ignored { path });
                }
                continue;
            };
            // A file that vanished between listing and reading is simply absent.
            let Ok(source) = std::fs::read_to_string(&path) else {
                continue;
            };
            let checksum = crate::upgrade::checksum(&source);
            out.insert(
                name,
                File {
                    path,
                    source,
                    checksum,
                },
            );
        }
        Some(out)
    }

    /// Scans and reloads what changed; `retry_due`: also when nothing
    /// changed since the last try (a reload the storage refused).
    fn sync(&mut self, retry_due: bool) {
        let Some(mut current) = self.scan() else {
            return;
        };
        if self
            .loaded
            .keys()
            .any(|m| !current.contains_key(m) && !self.explained.contains(m))
        {
            // Maybe an editor's delete-and-create: let the file come back.
            std::thread::sleep(self.grace);
            let Some(again) = self.scan() else {
                return;
            };
            current = again;
        }
        for (m, f) in &current {
            self.paths.insert(m.clone(), f.path.clone());
        }
        self.explained.retain(|m| !current.contains_key(m));

        let triggered = retry_due
            || current
                .iter()
                .any(|(m, f)| self.attempted.get(m) != Some(&f.checksum));
        for (m, f) in &current {
            self.attempted.insert(m.clone(), f.checksum.clone());
        }
        let changed: BTreeMap<String, String> = current
            .iter()
            .filter(|(m, f)| self.loaded.get(*m) != Some(&f.checksum))
            .map(|(m, f)| (m.clone(), f.source.clone()))
            .collect();
        if triggered && !changed.is_empty() {
            self.reload(changed, &current);
        } else if changed.is_empty() {
            // The files went back to what runs: nothing waits any more.
            self.retry = None;
        }

        let deleted: Vec<String> = self
            .loaded
            .keys()
            .filter(|m| !current.contains_key(*m) && !self.explained.contains(*m))
            .cloned()
            .collect();
        for m in deleted {
            self.report_deletion(&m);
            self.explained.insert(m);
        }
    }

    fn reload(&mut self, changed: BTreeMap<String, String>, current: &BTreeMap<String, File>) {
        let files = |only: Option<&BTreeMap<String, String>>| -> BTreeMap<String, PathBuf> {
            current
                .iter()
                .filter(|(m, _)| only.is_none_or(|o| o.contains_key(*m)))
                .map(|(m, f)| (m.clone(), f.path.clone()))
                .collect()
        };
        match block_on(
            self.sandbox
                .reload(changed.clone(), ReloadOptions::default()),
        ) {
            Ok(report) => {
                for (m, source) in &changed {
                    self.loaded
                        .insert(m.clone(), crate::upgrade::checksum(source));
                }
                if let Some(r) = self.retry.take() {
                    self.emit(WatchEvent::Retried {
                        failed_tries: r.failed_tries,
                        waited: r.since.elapsed(),
                        cause: r.cause,
                    });
                }
                let changed = files(Some(&changed));
                self.emit(WatchEvent::Reloaded { report, changed });
            }
            // The sandbox was replaced (rebuilt with new settings) while a
            // retry waited, or under this reload: its new driver reloads
            // what differs (module docs), so this watcher has nothing to
            // send, nor to report.
            Err(error)
                if self.sandbox.is_destroyed()
                    && (self.retry.is_some() || matches!(error, Error::Rebuilding(_))) =>
            {
                tracing::debug!(error = %error, "watch: the sandbox was replaced; nothing more is sent to it");
                self.retry = None;
            }
            Err(error) if retried(&error).is_some() => {
                let cause = retried(&error).unwrap_or(RetryCause::Storage);
                match &mut self.retry {
                    // Said once; the next tries are quiet until one applies.
                    Some(r) if r.cause == cause => {
                        r.failed_tries += 1;
                        r.delay = (r.delay * 2).min(RETRY_MAX);
                        tracing::debug!(error = %error, tries = r.failed_tries, "watch: the reload is still refused");
                    }
                    // A new reason is a new failure: said once too.
                    Some(r) => {
                        r.failed_tries += 1;
                        r.delay = (r.delay * 2).min(RETRY_MAX);
                        r.cause = cause;
                        let files = files(None);
                        self.emit(WatchEvent::ReloadFailed { error, files });
                    }
                    None => {
                        self.retry = Some(Retry {
                            delay: RETRY_MIN,
                            failed_tries: 1,
                            since: std::time::Instant::now(),
                            cause,
                        });
                        let files = files(None);
                        self.emit(WatchEvent::ReloadFailed { error, files });
                    }
                }
            }
            Err(error) => {
                self.retry = None;
                let files = files(None);
                self.emit(WatchEvent::ReloadFailed { error, files });
            }
        }
    }

    /// A deleted file's module stays loaded: report who still uses it.
    fn report_deletion(&mut self, module: &str) {
        let path = self.paths.get(module).cloned().unwrap_or_else(|| {
            self.src
                .join(module.replace('.', "/"))
                .with_extension("luau")
        });
        let dependents = match block_on(self.sandbox.modules()) {
            Ok(ms) => ms
                .into_iter()
                .filter(|m| m.dependencies.iter().any(|d| d == module))
                .map(|m| m.name)
                .collect(),
            Err(_) => Vec::new(),
        };
        let pids = match block_on(self.sandbox.processes()) {
            Ok(ps) => ps
                .into_iter()
                .filter(|p| p.module == module)
                .map(|p| p.pid)
                .collect(),
            Err(_) => Vec::new(),
        };
        self.emit(WatchEvent::Deleted {
            module: module.to_owned(),
            path,
            dependents,
            pids,
        });
    }
}
