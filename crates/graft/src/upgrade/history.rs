//! Module versions and their eviction: the one place that decides which
//! versions of a module are kept.
//!
//! Invariants:
//! * The current version is never evicted, whatever `max_versions` says.
//! * Neither is a *pinned* version: the version an upgrade on probation (a
//!   canary window) would roll back to, which is also the version a restart
//!   restores (the store's `stable`). During the window a module may keep
//!   `max_versions + 1` versions.
//! * Eviction removes the oldest versions other than those, until at most
//!   `max_versions` are kept (or only the protected ones are left).
//! * [`ModuleHistory::evictions`] is the one rule: the store drops exactly
//!   the versions it names (`upgrade::persist`), so the kept versions on
//!   disk equal the engine's after every commit.
//! * `next` is the highest version number ever recorded: a new version is
//!   numbered `next + 1`, so numbers are never reused after a rollback.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One kept version of a module. Serialized without bytecode: an import
/// recompiles the source (only bytecode this process compiled is loaded).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleVersion {
    /// 1, 2, 3 … per (sandbox, module).
    pub version: u32,
    /// SHA-256 of the source, hex.
    pub checksum: String,
    /// The Luau source.
    pub source: String,
    /// Bytecode compiled by this process from `source` (never imported).
    #[serde(skip, default)]
    pub bytecode: Arc<Vec<u8>>,
    /// Wall-clock load time, ms since the Unix epoch.
    pub loaded_at_ms: f64,
    /// Modules this one `require`s.
    pub dependencies: Vec<String>,
}

impl ModuleVersion {
    /// Its database row, for module `module` of sandbox `sandbox`.
    pub(crate) fn record(
        &self,
        sandbox: &str,
        module: &str,
        status: crate::store::VersionStatus,
    ) -> crate::store::VersionRecord {
        crate::store::VersionRecord {
            sandbox: sandbox.to_owned(),
            module: module.to_owned(),
            version: self.version,
            checksum: self.checksum.clone(),
            source: self.source.clone(),
            dependencies: self.dependencies.clone(),
            status,
            created_ms: self.loaded_at_ms,
        }
    }
}

/// The kept versions of one module and which one is current.
#[derive(Clone, Debug, Default)]
pub(crate) struct ModuleHistory {
    /// Kept versions, oldest first.
    pub versions: VecDeque<ModuleVersion>,
    /// The live version's number (0: none yet).
    pub current: u32,
    /// The highest version number recorded.
    pub next: u32,
    /// The file diagnostics name for this module.
    pub file: String,
}

impl ModuleHistory {
    /// The live version, if any.
    pub fn current(&self) -> Option<&ModuleVersion> {
        self.versions.iter().find(|v| v.version == self.current)
    }

    /// A kept version by number.
    pub fn get(&self, version: u32) -> Option<&ModuleVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The kept version numbers, oldest first.
    pub fn kept(&self) -> Vec<u32> {
        self.versions.iter().map(|v| v.version).collect()
    }

    /// Makes `version` current: a kept one becomes current again (a
    /// rollback), a new one is added. Then evicts past `max`, never the
    /// `pinned` version (a canary's rollback target).
    pub fn commit(&mut self, version: ModuleVersion, max: usize, pinned: Option<u32>) {
        if self.get(version.version).is_some() {
            self.current = version.version;
        } else {
            self.current = version.version;
            self.next = self.next.max(version.version);
            self.versions.push_back(version);
            self.evict_keeping(max, pinned);
        }
    }

    /// Adds a version, makes it current and evicts past `max`.
    #[cfg(test)]
    pub fn push(&mut self, v: ModuleVersion, max: usize) {
        self.commit(v, max, None);
    }

    /// The versions that [`commit`](Self::commit)ting version `to` with
    /// `pinned` would evict, oldest first (none when `to` is kept already:
    /// a rollback or roll-forward adds nothing).
    pub fn evictions(&self, to: u32, max: usize, pinned: Option<u32>) -> Vec<u32> {
        if self.get(to).is_some() {
            return Vec::new();
        }
        let mut kept = self.kept();
        kept.push(to);
        let mut gone = Vec::new();
        while kept.len() > max {
            match kept.iter().position(|v| *v != to && Some(*v) != pinned) {
                Some(i) => gone.push(kept.remove(i)),
                None => break,
            }
        }
        gone
    }

    /// Replaces the whole history with imported `versions` (sorted oldest
    /// first, numbers unique); the newest becomes current. Then evicts past
    /// `max`.
    pub fn replace(&mut self, versions: Vec<ModuleVersion>, max: usize) {
        let newest = versions.last().map(|v| v.version).unwrap_or(self.current);
        self.versions = versions.into_iter().collect();
        self.current = newest;
        self.next = self
            .versions
            .iter()
            .map(|v| v.version)
            .max()
            .unwrap_or(newest);
        self.evict(max);
    }

    /// Drops the oldest non-current versions until at most `max` are kept.
    fn evict(&mut self, max: usize) {
        self.evict_keeping(max, None);
    }

    /// Drops the oldest versions other than the current and `pinned` ones
    /// until at most `max` are kept.
    fn evict_keeping(&mut self, max: usize, pinned: Option<u32>) {
        while self.versions.len() > max {
            let current = self.current;
            match self
                .versions
                .iter()
                .position(|v| v.version != current && Some(v.version) != pinned)
            {
                Some(i) => {
                    self.versions.remove(i);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: u32) -> ModuleVersion {
        ModuleVersion {
            version: v,
            checksum: v.to_string(),
            source: String::new(),
            bytecode: Arc::new(Vec::new()),
            loaded_at_ms: 0.0,
            dependencies: vec![],
        }
    }

    #[test]
    fn history_keeps_max_versions_and_never_evicts_current() {
        let mut h = ModuleHistory::default();
        for v in 1..=12 {
            h.push(version(v), 10);
        }
        assert_eq!(h.kept(), (3..=12).collect::<Vec<_>>());
        h.current = 3;
        h.push(version(13), 10);
        assert_eq!(h.current, 13);
        assert!(h.get(3).is_none() && h.get(4).is_some());
    }

    #[test]
    fn a_rollback_target_becomes_current_without_renumbering() {
        let mut h = ModuleHistory::default();
        for v in 1..=3 {
            h.push(version(v), 3);
        }
        // Roll back to the oldest kept version: it is current again, and
        // nothing is added or evicted.
        h.commit(version(1), 3, None);
        assert_eq!((h.current, h.next), (1, 3));
        assert_eq!(h.kept(), [1, 2, 3]);
        assert_eq!(h.current().map(|v| v.version), Some(1));
        // The next upgrade is numbered past every version ever recorded,
        // so a number is never reused; the oldest version then goes.
        h.commit(version(h.next + 1), 3, None);
        assert_eq!((h.current, h.next), (4, 4));
        assert_eq!(h.kept(), [2, 3, 4]);
    }

    #[test]
    fn eviction_never_removes_the_current_version() {
        let mut h = ModuleHistory::default();
        h.push(version(1), 5);
        h.push(version(2), 5);
        // Even a cap below one keeps the live version.
        h.push(version(3), 0);
        assert_eq!(h.kept(), [3]);
        h.replace(vec![version(7)], 0);
        assert_eq!((h.current, h.kept()), (7, vec![7]));
    }

    #[test]
    fn max_one_keeps_only_the_current_version() {
        let mut h = ModuleHistory::default();
        h.push(version(1), 1);
        h.push(version(2), 1);
        assert_eq!(h.kept(), [2]);
        h.commit(version(2), 1, None);
        assert_eq!((h.current, h.kept()), (2, vec![2]));
    }

    #[test]
    fn a_pinned_version_survives_eviction_and_evictions_names_what_commit_drops() {
        let mut h = ModuleHistory::default();
        for v in 1..=3 {
            h.push(version(v), 3);
        }
        // Version 3 is the rollback target of an upgrade on probation.
        assert_eq!(h.evictions(4, 2, Some(3)), [1, 2]);
        assert_eq!(h.evictions(4, 1, Some(3)), [1, 2]);
        assert_eq!(h.evictions(1, 1, Some(3)), Vec::<u32>::new());
        let predicted = h.evictions(4, 1, Some(3));
        let before = h.kept();
        h.commit(version(4), 1, Some(3));
        let gone: Vec<u32> = before.into_iter().filter(|v| h.get(*v).is_none()).collect();
        assert_eq!(gone, predicted);
        assert_eq!((h.current, h.kept()), (4, vec![3, 4]));
        // Unpinned, the next upgrade brings it back under the cap.
        assert_eq!(h.evictions(5, 1, None), [3, 4]);
        h.commit(version(5), 1, None);
        assert_eq!(h.kept(), [5]);
    }

    #[test]
    fn an_import_replaces_history_and_evicts_the_oldest() {
        let mut h = ModuleHistory::default();
        h.push(version(1), 10);
        h.replace((3..=8).map(version).collect(), 4);
        assert_eq!(h.kept(), [5, 6, 7, 8]);
        assert_eq!((h.current, h.next), (8, 8));
    }
}
