//! The previous version of a module: the node's kept versions when the
//! project has a node data directory, else the project's git history.
//!
//! Invariants:
//! * The database is opened read-only and its lock is not taken: a node
//!   running on the directory is never disturbed.
//! * `git` is run with fixed arguments only (no shell); a missing `git` or
//!   history is a note, not an error.

use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Result};

use super::*;

/// The file at `rev` (`HEAD`, a commit), or `None` if it did not exist there.
pub(super) fn git_show(dir: &Path, rev: &str, rel: &str) -> Result<Option<String>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["show", &format!("{rev}:./{rel}")])
        .output()
        .map_err(|e| anyhow!("`graft test --migrations` needs git: {e}"))?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Why git has no history for `dir`: not a repository (or no `git`), or
/// a repository without a commit; `None` when `HEAD` exists.
pub(super) fn no_git_history(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .map(|o| o.status.success())
    };
    match git(&["rev-parse", "--is-inside-work-tree"]) {
        Err(e) => Some(format!("git cannot run ({e})")),
        Ok(false) => Some(format!("{} is not in a git repository", dir.display())),
        Ok(true) => match git(&["rev-parse", "--verify", "--quiet", "HEAD"]) {
            Ok(true) => None,
            _ => Some("its git repository has no commit yet".to_string()),
        },
    }
}

/// The previous committed version of `rel` (see the module docs).
pub(super) fn git_previous(
    dir: &Path,
    rel: &str,
    current: &str,
) -> Result<Option<(String, String)>> {
    match git_show(dir, "HEAD", rel)? {
        Some(head) if head != current => Ok(Some(("HEAD".into(), head))),
        Some(_) => {
            let out = Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["log", "-n", "2", "--format=%H", "--", &format!("./{rel}")])
                .output()
                .map_err(|e| anyhow!("`graft test --migrations` needs git: {e}"))?;
            let log = String::from_utf8_lossy(&out.stdout).into_owned();
            let Some(before) = log.lines().nth(1) else {
                return Ok(None);
            };
            let short: String = before.chars().take(12).collect();
            Ok(git_show(dir, before, rel)?.map(|s| (short, s)))
        }
        None => Ok(None),
    }
}

/// A version to migrate from: `(label, source)`.
type Labelled = (String, String);

/// What the node's data directory holds for the project's sandbox.
pub(super) struct NodeData {
    pub(super) store: graft::store::Store,
    pub(super) sandbox: String,
}

impl NodeData {
    /// The previous version by the node (see the module docs), as
    /// `(label, source)`, and every kept version by number.
    pub(super) fn previous(
        &self,
        module: &str,
        current: &str,
    ) -> Result<(Option<Labelled>, BTreeMap<u32, String>)> {
        let kept: BTreeMap<u32, String> = self
            .store
            .versions(&self.sandbox, module)
            .map_err(|e| anyhow!("reading the node's kept versions of `{module}`: {e}"))?
            .into_iter()
            .map(|v| (v.version, v.source))
            .collect();
        let pointer = self
            .store
            .module(&self.sandbox, module)
            .map_err(|e| anyhow!("reading the node's module `{module}`: {e}"))?
            .and_then(|m| m.current)
            .or_else(|| kept.keys().next_back().copied());
        let Some(now) = pointer else {
            return Ok((None, kept));
        };
        let prev = kept
            .range(..=now)
            .rev()
            .find(|(_, src)| src.as_str() != current)
            .map(|(v, src)| (format!("node v{v}"), src.clone()));
        Ok((prev, kept))
    }
}

/// Opens `DIR/.graft/graft.db` read-only, if it exists.
pub(super) fn open_node_data(
    dir: &Path,
    sandbox: &str,
    notes: &mut Vec<String>,
) -> Option<NodeData> {
    let db = dir.join(".graft").join(graft::DATABASE_FILE);
    if !db.exists() {
        return None;
    }
    match graft::store::Store::open_read_only(&db) {
        Ok(store) => Some(NodeData {
            store,
            sandbox: sandbox.to_string(),
        }),
        Err(e) => {
            notes.push(format!(
                "note: cannot read the node's data ({}): {e}; using git",
                db.display()
            ));
            None
        }
    }
}
