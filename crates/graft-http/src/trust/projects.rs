//! Sandboxes from a path (`modules: "<dir>"`) only under a projects root.
//!
//! Invariants:
//! * Every path is resolved (symlinks, `..`) before it is compared with the
//!   canonical roots, and so is every file the sandbox would read
//!   (`graft.toml`, each module file): a symlink inside a project that
//!   points out of the root is refused like a path outside it.
//! * Every refusal is the same answer ([`forbidden`]), whether the path
//!   exists, is a file, or is unreadable, so the API cannot probe the disk.

use std::path::{Path, PathBuf};

use axum::http::StatusCode;

use crate::errors::ApiError;

/// The one message of every refusal.
pub(crate) const MESSAGE: &str =
    "sandboxes from a path are allowed only under the node's --projects-root";

/// The one answer of every refusal.
pub(crate) fn forbidden() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "path_forbidden", MESSAGE)
}

/// Whether `path` resolves to a place under one of `roots` (canonical).
pub(crate) fn is_under(roots: &[PathBuf], path: &Path) -> bool {
    match std::fs::canonicalize(path) {
        Ok(real) => roots.iter().any(|r| real.starts_with(r)),
        Err(_) => false,
    }
}

/// Checks a path sandbox before anything of it is read: the directory, its
/// `graft.toml` and every module file it would load must resolve under a
/// root.
pub(crate) fn check_project(roots: &[PathBuf], dir: &Path) -> Result<(), ApiError> {
    if !is_under(roots, dir) || !dir.is_dir() {
        return Err(forbidden());
    }
    let toml = dir.join("graft.toml");
    if toml.symlink_metadata().is_ok() && !is_under(roots, &toml) {
        return Err(forbidden());
    }
    let src = if dir.join("src").is_dir() {
        dir.join("src")
    } else {
        dir.to_owned()
    };
    if !is_under(roots, &src) {
        return Err(forbidden());
    }
    // The listing reads names, not contents; each file is resolved before
    // the sandbox reads it.
    if let Ok(files) = graft::config::module_files(&src) {
        for (_, file) in files {
            if !is_under(roots, &file) {
                return Err(forbidden());
            }
        }
    }
    Ok(())
}
