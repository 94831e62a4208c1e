//! Ephemeral stores' directories (`Store::in_memory`): their names, the lock
//! that marks one in use, and the sweep that removes those whose store is
//! gone (a killed node).
//!
//! Invariants:
//! * A directory whose `graft.lock` is locked is never removed: the lock, not
//!   the pid in its name, says whether its store lives.
//! * The sweep takes the lock before removing, so two sweeps (or a sweep and
//!   a starting store) never race.

use std::path::Path;
use std::time::Duration;

/// The name prefix of ephemeral stores' directories.
pub(super) const EPHEMERAL_PREFIX: &str = "graft-ephemeral-";

/// The lock file a live ephemeral store holds in its directory.
pub(super) const EPHEMERAL_LOCK: &str = "graft.lock";

/// A directory without a lock file (made by an older Graft) is removed only
/// when its pid is gone and it is at least this old.
const UNLOCKED_GRACE: Duration = Duration::from_secs(60);

/// Removes `graft-ephemeral-…` directories left by ephemeral stores that are
/// gone (a killed node). A directory is in use while its `graft.lock` is
/// locked: the lock, not the pid in its name, decides, since a pid means
/// nothing across pid namespaces (containers sharing `/tmp`) and pids are
/// reused. The lock is taken before the directory is removed, so two
/// sweeps never race a starting store.
pub(super) fn sweep_dead_ephemeral_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(EPHEMERAL_PREFIX)) else {
            continue;
        };
        let dir = entry.path();
        match std::fs::File::open(dir.join(EPHEMERAL_LOCK)) {
            Ok(lock) => {
                // Held by a live store (in any process or pid namespace):
                // leave it. Free: its store is gone.
                if lock.try_lock().is_ok() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if unlocked_and_dead(&dir, rest) {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            Err(_) => {}
        }
    }
}

/// For a directory without a lock file (an older Graft's): its pid is gone
/// from `/proc` (Linux only) and it is older than [`UNLOCKED_GRACE`].
fn unlocked_and_dead(dir: &Path, rest: &str) -> bool {
    if !Path::new("/proc/self").exists() {
        return false;
    }
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    let old = std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= UNLOCKED_GRACE);
    old && !Path::new(&format!("/proc/{pid}")).exists()
}
