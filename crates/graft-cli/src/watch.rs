//! The hot-reload loop of `graft run`: [`graft::watch`] watches `src/` and
//! reloads what changed; this module only says what happened, on the
//! terminal (reload lines on stdout, diagnostics and notes on stderr).
//!
//! It also watches `graft.toml` ([`watch_settings`]): a saved change of the
//! sandbox's settings is applied live through `Node::reconfigure_sandbox`
//! (the app restarts; registered states come back by name), with a ✓/✗
//! line. A file that does not parse or validate, or that renames the
//! sandbox, changes nothing and says why. Invariant: the `src/` watcher
//! always drives the sandbox currently registered under the project's id
//! (a reconfiguration rebuilds the sandbox, so the watcher is restarted on
//! the new one).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use graft::watch::{Watch, WatchEvent, WatchOptions};
use graft::{Node, Sandbox, SandboxSpec};

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
fn explain_deletion(module: &str, path: &str, dependents: &[String], pids: &[graft::Pid]) {
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
        let some: Vec<&str> = pids.iter().take(5).map(graft::Pid::as_str).collect();
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

/// How often `graft.toml` is looked at (a small file: reading it is cheaper
/// than a second file-system watcher, and it is edited by hand).
const SETTINGS_POLL: Duration = Duration::from_millis(200);

/// Watches `src/` (through `watcher`) and `graft.toml` until dropped.
pub struct Watching {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts watching `dir/graft.toml` for the sandbox `spec.id` (running
/// with `spec`'s settings); `watcher` (on `src/`) is restarted whenever the
/// sandbox is rebuilt.
pub fn watch_settings(
    node: Node,
    dir: PathBuf,
    spec: SandboxSpec,
    watcher: Watch,
    debounce: Duration,
) -> Watching {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("graft-settings".into())
        .spawn(move || {
            let toml = dir.join("graft.toml");
            let mut seen = std::fs::read(&toml).ok();
            let mut watcher = Some(watcher);
            let mut running = spec;
            while !flag.load(Ordering::Acquire) {
                std::thread::sleep(SETTINGS_POLL);
                let now = std::fs::read(&toml).ok();
                if now == seen || now.is_none() {
                    // A missing file is an editor's save in progress (or a
                    // deletion, which changes no setting).
                    continue;
                }
                // Let an editor finish writing before reading it whole.
                std::thread::sleep(debounce.min(Duration::from_millis(500)));
                let now = std::fs::read(&toml).ok();
                if now == seen || now.is_none() {
                    continue;
                }
                seen = now;
                if let Some(rebuilt) = apply_settings(&node, &dir, &mut running) {
                    // The old handle drives a sandbox that is gone.
                    drop(watcher.take());
                    match SandboxSpec::from_dir(&dir) {
                        Ok(spec) => match start(&dir, rebuilt, &spec.modules, debounce) {
                            Ok(w) => watcher = Some(w),
                            Err(e) => eprintln!("warning: src/ is no longer watched: {e}"),
                        },
                        Err(e) => eprintln!("warning: src/ is no longer watched: {e}"),
                    }
                }
            }
        });
    Watching {
        stop,
        thread: spawned_or_warn(thread),
    }
}

fn spawned_or_warn(
    t: std::io::Result<std::thread::JoinHandle<()>>,
) -> Option<std::thread::JoinHandle<()>> {
    match t {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("warning: graft.toml is not watched: {e}");
            None
        }
    }
}

/// Applies a saved `graft.toml` and says what happened. Returns the
/// sandbox now registered under `id` when it was rebuilt (applied, or
/// rebuilt on its old settings after the new ones failed to start).
fn apply_settings(node: &Node, dir: &Path, running: &mut SandboxSpec) -> Option<Sandbox> {
    let id = running.id.clone();
    let toml = shown(&dir.join("graft.toml"));
    let spec = match SandboxSpec::from_dir(dir) {
        Ok(spec) => spec,
        Err(e) => {
            settings_error(&e, &toml);
            return None;
        }
    };
    if spec.id != id {
        eprintln!(
            "error: graft.toml renames the sandbox from `{id}` to `{}` while `graft run` runs\n  --> {toml}\n  = note: nothing changed: a running node does not rename a sandbox; `{id}` keeps running\n  = help: set `id = \"{id}\"` back, or restart `graft run` (it says how to move `{id}`'s data)",
            render::escape(&spec.id, render::Lines::Escape)
        );
        return None;
    }
    let sources = spec.modules.clone();
    let changed = changed_settings(running, &spec);
    let new = spec.clone();
    match node.reconfigure_sandbox(spec) {
        Ok(None) => {
            println!("✓ graft.toml saved: no setting changed");
            None
        }
        Ok(Some(sb)) => {
            *running = new;
            println!("✓ graft.toml applied{changed}: the app restarted, registered states restored by name");
            // Modules graft.toml's new entry needs were added from src/;
            // the others run their current version: bring them to src/.
            match graft::block_on(sb.reload(sources, graft::ReloadOptions::default())) {
                Ok(report) => {
                    let report = serde_json::to_value(&report).unwrap_or_default();
                    if let Some(line) = render::report_line(&report) {
                        println!("{line}");
                    }
                }
                Err(e) => settings_error(&e, &toml),
            }
            Some(sb)
        }
        Err(e) => {
            settings_error(&e, &toml);
            eprintln!("✗ graft.toml not applied");
            // A failed start rebuilt the sandbox on its old settings; a
            // refusal left it as it was (restarting the watcher is harmless).
            node.sandbox(&id).ok()
        }
    }
}

/// ` (entry, limits changed)`: the settings `new` changes.
fn changed_settings(old: &SandboxSpec, new: &SandboxSpec) -> String {
    let mut names = Vec::new();
    if old.entry != new.entry {
        names.push("entry");
    }
    if old.entry_args != new.entry_args {
        names.push("entry_args");
    }
    if old.limits != new.limits {
        names.push("limits");
    }
    if old.grants != new.grants {
        names.push("capabilities");
    }
    if names.is_empty() {
        return String::new();
    }
    format!(" ({} changed)", names.join(", "))
}

/// A settings error, rustc style, pointing at graft.toml.
fn settings_error(e: &graft::Error, toml: &str) {
    let why = e.to_string();
    eprintln!(
        "error: {}\n  --> {toml}\n  = note: nothing changed; the sandbox keeps its running settings",
        render::escape(&why, render::Lines::Keep)
    );
}
