//! Where a node keeps its data, and where the client verbs find a token.
//!
//! `graft run DIR` keeps its data in `DIR/.graft/`; `graft serve` in the
//! default data directory (`$XDG_DATA_HOME/graft`, else
//! `~/.local/share/graft`). Each writes its admin token file there at first
//! start (SPEC §9). The client verbs take `--token`, else `GRAFT_TOKEN`
//! (clap reads both into one flag), else the token file of the project they
//! run in (the nearest `graft.toml` upwards), else the default data
//! directory's, so a local user types no token.

use std::path::{Path, PathBuf};

use graft_http::trust::TOKEN_FILE;

/// The data directory of a project: `DIR/.graft`.
pub fn project_data_dir(project: &Path) -> PathBuf {
    project.join(".graft")
}

/// `$XDG_DATA_HOME/graft`, else `~/.local/share/graft` (`None` without a home).
pub fn default_data_dir() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").map(PathBuf::from) {
        // The XDG spec: a relative value is invalid and ignored.
        if xdg.is_absolute() {
            return Some(xdg.join("graft"));
        }
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_absolute())
        .map(|h| h.join(".local/share/graft"))
}

/// The nearest directory with a `graft.toml`, from `start` upwards.
pub fn project_of(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join("graft.toml").is_file())
        .map(Path::to_path_buf)
}

/// Where a token came from, to say so when it is refused.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenSource {
    /// `--token` or `GRAFT_TOKEN`.
    Given,
    /// A token file.
    File(PathBuf),
}

/// The token the client verbs send, and where it came from; `None` when
/// there is none (the node will answer 401).
pub fn resolve_token(given: Option<&str>, cwd: &Path) -> Option<(String, TokenSource)> {
    if let Some(t) = given.map(str::trim).filter(|t| !t.is_empty()) {
        return Some((t.to_owned(), TokenSource::Given));
    }
    let candidates = project_of(cwd)
        .map(|p| project_data_dir(&p))
        .into_iter()
        .chain(default_data_dir());
    for dir in candidates {
        let file = dir.join(TOKEN_FILE);
        if let Ok(text) = std::fs::read_to_string(&file) {
            let t = text.trim();
            if !t.is_empty() {
                return Some((t.to_owned(), TokenSource::File(file)));
            }
        }
    }
    None
}

/// Where `resolve_token` looks, for the hint after a 401.
pub fn token_places(cwd: &Path) -> Vec<PathBuf> {
    project_of(cwd)
        .map(|p| project_data_dir(&p))
        .into_iter()
        .chain(default_data_dir())
        .map(|d| d.join(TOKEN_FILE))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_token_wins_and_the_project_file_comes_before_the_default() {
        let root = std::env::temp_dir().join(format!("graft-datadir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let project = root.join("p");
        std::fs::create_dir_all(project.join("src/deep")).unwrap();
        std::fs::write(project.join("graft.toml"), "[sandbox]\nid = \"p\"\n").unwrap();
        assert_eq!(
            resolve_token(Some(" graft_given "), &project),
            Some(("graft_given".into(), TokenSource::Given))
        );
        std::fs::create_dir_all(project.join(".graft")).unwrap();
        let file = project.join(".graft").join(TOKEN_FILE);
        std::fs::write(&file, "graft_project\n").unwrap();
        assert_eq!(
            resolve_token(None, &project.join("src/deep")),
            Some(("graft_project".into(), TokenSource::File(file)))
        );
        assert_eq!(project_of(&project.join("src/deep")), Some(project.clone()));
        let _ = std::fs::remove_dir_all(&root);
    }
}
