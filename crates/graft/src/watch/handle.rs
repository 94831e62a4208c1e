//! The handle of a running watcher: starting it (from the sources a sandbox
//! was built from, or from what it runs) and stopping it.
//!
//! # Invariants
//! * At most one scan is pending at any time: the channel to the watcher's
//!   thread holds one "look again", which covers every later event.
//! * Reads (the scan's own included) are not changes and trigger nothing.
//! * No event is delivered after `stop` returns or the handle is dropped,
//!   except from a scan already under way (which `stop` waits for; a drop
//!   does not block).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::JoinHandle;

use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult};

use super::event::WatchEvent;
use super::options::WatchOptions;
use super::sync::Syncer;
use crate::{block_on, Sandbox};

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
