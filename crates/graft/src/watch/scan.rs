//! Finding the module files under the watched folder and reading them.
//!
//! # Invariants
//! * Bounded work: a scan reads at most `MAX_PROJECT_ENTRIES` entries
//!   nested at most `MAX_PROJECT_DEPTH` folders deep (the limits of
//!   `SandboxSpec::from_dir`); a folder over them is not synced.
//! * Editors' lock and swap files (names starting with `.` or `#`) are
//!   skipped silently; other files without a module name are reported once.
//! * A file that vanished between listing and reading is simply absent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::event::WatchEvent;
use super::sync::Syncer;
use crate::config::{MAX_PROJECT_DEPTH, MAX_PROJECT_ENTRIES};

/// A module file as found by a scan.
pub(super) struct File {
    pub(super) path: PathBuf,
    pub(super) source: String,
    pub(super) checksum: String,
}

impl Syncer {
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
    pub(super) fn scan(&mut self) -> Option<BTreeMap<String, File>> {
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
}
