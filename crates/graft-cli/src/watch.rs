//! The hot-reload loop of `graft run`: watch `src/` and reload what changed.
//!
//! Editors save in many ways (in place, write-then-rename, delete-and-create,
//! bursts of events), so events only say "look again": each batch of
//! debounced events triggers a scan of `src/`, and the files whose content
//! differs from what is loaded are reloaded together in one transaction.
//! Checksums make every save go live exactly once:
//! * `loaded`: the checksum of each module's live version;
//! * `attempted`: the checksum last seen on disk. Nothing is tried again until
//!   some file differs from it, so a broken save is reported once, and the
//!   fix (which differs) triggers the next reload.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Result};
use graft::{ReloadOptions, Sandbox};
use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult};

use crate::render;

/// Default quiet time before a burst of events is handled. 10 ms keeps
/// edit-to-live well under 20 ms while still folding an editor's
/// write/rename/chmod burst into one reload (checksums drop repeats).
pub const DEFAULT_DEBOUNCE_MS: u64 = 10;
/// How long a deleted file may take to come back (delete-and-create saves).
const RECREATE_GRACE: Duration = Duration::from_millis(300);

/// Watching stops when this is dropped.
pub struct WatchHandle {
    _debouncer: Box<dyn std::any::Any + Send>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct File {
    path: String,
    source: String,
    checksum: String,
}

struct Watcher {
    src: PathBuf,
    sandbox: Sandbox,
    loaded: BTreeMap<String, String>,
    attempted: BTreeMap<String, String>,
    /// Module → file as last seen (for messages about deleted files).
    paths: BTreeMap<String, String>,
    /// Deleted modules already explained.
    explained: BTreeSet<String>,
    /// Files ignored for their names, already reported.
    bad_names: BTreeSet<PathBuf>,
}

/// Starts watching `dir/src`; `initial` are the sources the sandbox was created from.
pub fn start(
    dir: &Path,
    sandbox: Sandbox,
    initial: &BTreeMap<String, String>,
    debounce: Duration,
) -> Result<WatchHandle> {
    let src = dir.join("src");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut debouncer = new_debouncer(debounce, None, move |res: DebounceEventResult| match res {
        Ok(events) => {
            // Reads (ours included) are not changes.
            if events
                .iter()
                .any(|e| !matches!(e.kind, EventKind::Access(_)))
            {
                let _ = tx.send(());
            }
        }
        Err(errors) => {
            for e in errors {
                tracing::warn!("watching src/: {e}");
            }
        }
    })
    .map_err(|e| anyhow!("cannot watch {}: {e}", src.display()))?;
    debouncer
        .watch(&src, RecursiveMode::Recursive)
        .map_err(|e| anyhow!("cannot watch {}: {e}", src.display()))?;

    let sums: BTreeMap<String, String> = initial
        .iter()
        .map(|(m, s)| (m.clone(), graft::upgrade::checksum(s)))
        .collect();
    let mut w = Watcher {
        src,
        sandbox,
        loaded: sums.clone(),
        attempted: sums,
        paths: BTreeMap::new(),
        explained: BTreeSet::new(),
        bad_names: BTreeSet::new(),
    };
    let task = tokio::spawn(async move {
        // Catch saves made between reading the project and watching it.
        w.sync().await;
        while rx.recv().await.is_some() {
            while rx.try_recv().is_ok() {}
            w.sync().await;
        }
    });
    Ok(WatchHandle {
        _debouncer: Box::new(debouncer),
        task,
    })
}

/// A path as the user would type it (`src/counter.luau`, not
/// `./src/counter.luau`), escaped for the terminal (file names may hold
/// control characters too).
pub fn shown(path: &Path) -> String {
    let s = path.display().to_string();
    let s = s.strip_prefix("./").unwrap_or(&s);
    render::escape(s, render::Lines::Escape).into_owned()
}

impl Watcher {
    /// Every module file under `src/` with its content.
    fn scan(&mut self) -> BTreeMap<String, File> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "luau")
                    // editors' lock and swap files (`.#counter.luau`, …)
                    && !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(['.', '#']))
                {
                    out.push(path);
                }
            }
        }
        let mut paths = Vec::new();
        walk(&self.src, &mut paths);
        let mut out = BTreeMap::new();
        for path in paths {
            let Some(name) = graft::config::module_name_for(&self.src, &path) else {
                if self.bad_names.insert(path.clone()) {
                    eprintln!(
                        "warning: ignoring {}: not a module name (use dot-free identifiers for files and folders, like src/chat/room.luau)",
                        shown(&path)
                    );
                }
                continue;
            };
            // A file that vanished between listing and reading is simply absent.
            let Ok(source) = std::fs::read_to_string(&path) else {
                continue;
            };
            let checksum = graft::upgrade::checksum(&source);
            out.insert(
                name,
                File {
                    path: shown(&path),
                    source,
                    checksum,
                },
            );
        }
        out
    }

    async fn sync(&mut self) {
        let mut current = self.scan();
        if self
            .loaded
            .keys()
            .any(|m| !current.contains_key(m) && !self.explained.contains(m))
        {
            // Maybe an editor's delete-and-create: let the file come back.
            tokio::time::sleep(RECREATE_GRACE).await;
            current = self.scan();
        }
        for (m, f) in &current {
            self.paths.insert(m.clone(), f.path.clone());
        }
        self.explained.retain(|m| !current.contains_key(m));

        let triggered = current
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
            self.reload(changed, &current).await;
        }

        let deleted: Vec<String> = self
            .loaded
            .keys()
            .filter(|m| !current.contains_key(*m) && !self.explained.contains(*m))
            .cloned()
            .collect();
        for m in deleted {
            self.explain_deletion(&m).await;
            self.explained.insert(m);
        }
    }

    async fn reload(
        &mut self,
        changed: BTreeMap<String, String>,
        current: &BTreeMap<String, File>,
    ) {
        match self
            .sandbox
            .reload(changed.clone(), ReloadOptions::default())
            .await
        {
            Ok(report) => {
                for (m, source) in &changed {
                    self.loaded
                        .insert(m.clone(), graft::upgrade::checksum(source));
                }
                let report = serde_json::to_value(&report).unwrap_or_default();
                if let Some(line) = render::report_line(&report) {
                    println!("{line}");
                }
            }
            Err(e) => {
                let err = graft_http::ApiError::from(e);
                let file_of = |m: &str| current.get(m).map(|f| f.path.clone());
                eprint!("{}", render::error(&err.body()["error"], &file_of));
                eprintln!("  = note: nothing changed; the old code is still running");
            }
        }
    }

    /// A deleted file's module stays loaded (a running sandbox cannot drop a
    /// module); say why, and refuse outright when it is still in use.
    async fn explain_deletion(&self, module: &str) {
        let path = self
            .paths
            .get(module)
            .cloned()
            .unwrap_or_else(|| format!("src/{}.luau", module.replace('.', "/")));
        let dependents: Vec<String> = match self.sandbox.modules().await {
            Ok(ms) => ms
                .into_iter()
                .filter(|m| m.dependencies.iter().any(|d| d == module))
                .map(|m| format!("`{}`", m.name))
                .collect(),
            Err(_) => Vec::new(),
        };
        let pids: Vec<String> = match self.sandbox.processes().await {
            Ok(ps) => ps
                .into_iter()
                .filter(|p| p.module == module)
                .map(|p| p.pid)
                .collect(),
            Err(_) => Vec::new(),
        };
        if dependents.is_empty() && pids.is_empty() {
            eprintln!(
                "note: {path} was deleted; module `{module}` is no longer used but stays loaded \
                 (a running sandbox cannot unload a module; it goes away when `graft run` restarts)"
            );
            return;
        }
        eprintln!(
            "warning: {path} was deleted, but module `{module}` is in use, so it stays loaded"
        );
        if !dependents.is_empty() {
            eprintln!("  = note: required by {}", dependents.join(", "));
        }
        if !pids.is_empty() {
            let n = pids.len();
            let some: Vec<&str> = pids.iter().take(5).map(String::as_str).collect();
            let more = if n > 5 {
                format!(" and {} more", n - 5)
            } else {
                String::new()
            };
            let s = if n == 1 { " runs" } else { "es run" };
            eprintln!(
                "  = note: {n} live process{s} it: {}{more}",
                some.join(", ")
            );
        }
        eprintln!(
            "  = help: remove the `require`s and stop its processes first, or restore the file"
        );
    }
}
