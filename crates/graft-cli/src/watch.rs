//! The hot-reload loop of `graft run`: [`graft::watch`] watches `src/` and
//! reloads what changed; this module only says what happened, on the
//! terminal (reload lines on stdout, diagnostics and notes on stderr).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use graft::watch::{Watch, WatchEvent, WatchOptions};
use graft::Sandbox;

use crate::render;

/// Default quiet time before a burst of events is handled (see
/// [`graft::watch::DEFAULT_DEBOUNCE`]).
pub const DEFAULT_DEBOUNCE_MS: u64 = graft::watch::DEFAULT_DEBOUNCE.as_millis() as u64;

/// Starts watching `dir/src`; `initial` are the sources the sandbox was
/// created from. Watching stops when the handle is dropped.
pub fn start(
    dir: &Path,
    sandbox: Sandbox,
    initial: &BTreeMap<String, String>,
    debounce: Duration,
) -> Result<Watch> {
    let options = WatchOptions::default().debounce(debounce);
    Ok(Watch::start(
        dir.join("src"),
        sandbox,
        initial,
        options,
        print,
    )?)
}

/// A path as the user would type it (`src/counter.luau`, not
/// `./src/counter.luau`), escaped for the terminal (file names may hold
/// control characters too).
pub fn shown(path: &Path) -> String {
    let s = path.display().to_string();
    let s = s.strip_prefix("./").unwrap_or(&s);
    render::escape(s, render::Lines::Escape).into_owned()
}

fn print(event: WatchEvent) {
    match event {
        WatchEvent::Reloaded { report, .. } => {
            let report = serde_json::to_value(&report).unwrap_or_default();
            if let Some(line) = render::report_line(&report) {
                println!("{line}");
            }
        }
        WatchEvent::ReloadFailed { error, files } => {
            let again = graft::watch::retried(&error);
            let err = graft_http::ApiError::from(error);
            let file_of = |m: &str| files.get(m).map(|p| shown(p));
            eprint!("{}", render::error(&err.body()["error"], &file_of));
            eprintln!("  = note: nothing changed; the old code is still running");
            if again {
                eprintln!("  = note: the reload is tried again until the storage takes it");
            }
        }
        WatchEvent::Retried {
            failed_tries,
            waited,
        } => println!(
            "✓ the storage takes writes again: the reload that waited applies now (after {failed_tries} refused tries, {:.1}s)",
            waited.as_secs_f64()
        ),
        WatchEvent::Deleted {
            module,
            path,
            dependents,
            pids,
        } => explain_deletion(&module, &shown(&path), &dependents, &pids),
        WatchEvent::Ignored { path } => eprintln!(
            "warning: ignoring {}: not a module name (use dot-free identifiers for files and folders, like src/chat/room.luau)",
            shown(&path)
        ),
        // Kinds added to the library later are not shown until rendered here.
        _ => {}
    }
}

/// A deleted file's module stays loaded (a running sandbox cannot drop a
/// module); say why, and refuse outright when it is still in use.
fn explain_deletion(module: &str, path: &str, dependents: &[String], pids: &[String]) {
    if dependents.is_empty() && pids.is_empty() {
        eprintln!(
            "note: {path} was deleted; module `{module}` is no longer used but stays loaded \
             (a running sandbox cannot unload a module; it goes away when `graft run` restarts)"
        );
        return;
    }
    eprintln!("warning: {path} was deleted, but module `{module}` is in use, so it stays loaded");
    if !dependents.is_empty() {
        let names: Vec<String> = dependents.iter().map(|m| format!("`{m}`")).collect();
        eprintln!("  = note: required by {}", names.join(", "));
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
    eprintln!("  = help: remove the `require`s and stop its processes first, or restore the file");
}
