//! The watcher's thread: waits for "look again" (or a retry's delay),
//! scans, reloads what changed as one transaction, and reports.
//!
//! # Invariants
//! * Every save goes live exactly once: nothing is tried again until some
//!   file differs from what was attempted, except a reload refused for a
//!   reason that passes, which is retried until it applies or fails for
//!   another reason.
//! * Deleting never unloads: a vanished module file gets the recreate grace,
//!   then one `Deleted` report; the module stays loaded.
//! * A replaced sandbox ends a retry quietly: whoever replaced it drives the
//!   new one.
//! * Scans and reloads run one at a time on this thread, never on a
//!   scheduler thread or an async runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use super::event::WatchEvent;
use super::retry::{retried, Retry, RetryCause, RETRY_MAX, RETRY_MIN};
use super::scan::File;
use crate::{block_on, Error, ReloadOptions, Sandbox};

/// The state of the watcher's thread.
pub(super) struct Syncer {
    pub(super) src: PathBuf,
    pub(super) sandbox: Sandbox,
    pub(super) grace: Duration,
    /// Module → checksum of its live version.
    pub(super) loaded: BTreeMap<String, String>,
    /// Module → checksum last seen on disk.
    pub(super) attempted: BTreeMap<String, String>,
    /// Module → file as last seen (for deleted files).
    pub(super) paths: BTreeMap<String, PathBuf>,
    /// Deleted modules already reported.
    pub(super) explained: BTreeSet<String>,
    /// Files ignored for their names, already reported.
    pub(super) bad_names: BTreeSet<PathBuf>,
    pub(super) stopped: Arc<AtomicBool>,
    pub(super) on_event: Box<dyn FnMut(WatchEvent) + Send>,
    /// A reload the storage refused, to try again.
    pub(super) retry: Option<Retry>,
}

impl Syncer {
    pub(super) fn run(mut self, rx: Receiver<()>) {
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

    pub(super) fn emit(&mut self, event: WatchEvent) {
        if !self.stopped() {
            (self.on_event)(event);
        }
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
