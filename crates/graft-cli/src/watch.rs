//! The hot-reload loop of `graft run`: [`graft::watch`] watches `src/` and
//! reloads what changed; this module only says what happened, on the
//! terminal (reload lines on stdout, diagnostics and notes on stderr).
//!
//! It also watches `graft.toml` ([`watch_settings`]): a saved change of the
//! sandbox's settings is applied live through `Node::reconfigure_sandbox`
//! (the app restarts; registered states come back by name), with a ✓/✗
//! line (✗ too when the new app's `init` fails). A file that does not parse
//! or validate, or that renames the sandbox, changes nothing and says why.
//! A save refused for a reason that passes (the storage failed, the
//! sandbox was busy) is tried again until it applies, said once.
//!
//! Invariants: the `src/` watcher always drives the sandbox currently
//! registered under the project's id; it is replaced only when that
//! sandbox was rebuilt, by one resumed from what the rebuilt sandbox runs
//! ([`Watch::resume`]), so no save — applied, refused, or waiting for a
//! retry on the old sandbox — is lost. A graft.toml save that is refused
//! leaves the src/ watcher (and its own pending retries) alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use graft::watch::{RetryCause, Watch, WatchEvent, WatchOptions};
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
                say!("{line}");
            }
        }
        WatchEvent::ReloadFailed { error, files } => {
            let again = graft::watch::retried(&error);
            let err = graft_http::ApiError::from(error);
            let file_of = |m: &str| files.get(m).map(|p| shown(p));
            warn_text!("{}", render::error(&err.body()["error"], &file_of));
            warn_line!("  = note: nothing changed; the old code is still running");
            match again {
                Some(RetryCause::Busy) => warn_line!(
                    "  = note: the reload is sent again once the sandbox is free (after its rebuild)"
                ),
                Some(_) => {
                    warn_line!("  = note: the reload is tried again until the storage takes it")
                }
                None => {}
            }
        }
        WatchEvent::Retried {
            failed_tries,
            waited,
            cause,
        } => say!(
            "✓ {}: the reload that waited applies now (after {failed_tries} refused tries, {:.1}s)",
            match cause {
                RetryCause::Busy => "the sandbox is free again",
                _ => "the storage takes writes again",
            },
            waited.as_secs_f64()
        ),
        WatchEvent::Deleted {
            module,
            path,
            dependents,
            pids,
        } => explain_deletion(&module, &shown(&path), &dependents, &pids),
        WatchEvent::Ignored { path } => warn_line!(
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
        warn_line!(
            "note: {path} was deleted; module `{module}` is no longer used but stays loaded \
             (a running sandbox cannot unload a module; it goes away when `graft run` restarts)"
        );
        return;
    }
    warn_line!("warning: {path} was deleted, but module `{module}` is in use, so it stays loaded");
    if !dependents.is_empty() {
        let names: Vec<String> = dependents.iter().map(|m| format!("`{m}`")).collect();
        warn_line!("  = note: required by {}", names.join(", "));
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
        warn_line!(
            "  = note: {n} live process{s} it: {}{more}",
            some.join(", ")
        );
    }
    warn_line!("  = help: remove the `require`s and stop its processes first, or restore the file");
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
/// with `spec`'s settings); `watcher` (on `src/`) drives `sandbox` and is
/// replaced whenever the sandbox is rebuilt.
pub fn watch_settings(
    node: Node,
    dir: PathBuf,
    spec: SandboxSpec,
    sandbox: Sandbox,
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
            let mut src = Some((sandbox, watcher));
            let mut running = spec;
            // A graft.toml save refused for a reason that passes (storage,
            // busy): tried again until it applies, said once per cause.
            let mut retry: Option<SettingsRetry> = None;
            while !flag.load(Ordering::Acquire) {
                std::thread::sleep(SETTINGS_POLL);
                let now = std::fs::read(&toml).ok();
                let edited = now != seen && now.is_some();
                // A missing file is an editor's save in progress (or a
                // deletion, which changes no setting).
                let due = retry.as_ref().is_some_and(|r| r.next <= Instant::now());
                if !edited && !due {
                    continue;
                }
                if edited {
                    // Let an editor finish writing before reading it whole.
                    std::thread::sleep(debounce.min(Duration::from_millis(500)));
                    let now = std::fs::read(&toml).ok();
                    if now.is_none() || (now == seen && !due) {
                        continue;
                    }
                    if now != seen {
                        seen = now;
                    }
                }
                let outcome = apply_settings(&node, &dir, &mut running, retry.as_mut());
                retry = match outcome {
                    Applied::Retry(cause) => Some(match retry.take() {
                        Some(mut r) => {
                            r.tries += 1;
                            r.cause = cause;
                            r.delay = (r.delay * 2).min(graft::watch::RETRY_MAX);
                            r.next = Instant::now() + r.delay;
                            r
                        }
                        None => SettingsRetry::new(cause),
                    }),
                    _ => None,
                };
                // The src/ watcher must drive the sandbox registered under
                // the id: after a rebuild, the old one drives nothing.
                let replaced = src.as_ref().is_none_or(|(sb, _)| sb.is_destroyed());
                if !replaced {
                    continue;
                }
                drop(src.take());
                let Ok(sb) = node.sandbox(&running.id) else {
                    warn_line!(
                        "warning: src/ is no longer watched: sandbox `{}` is gone",
                        running.id
                    );
                    continue;
                };
                // From what the new sandbox runs: a save made, refused or
                // still retried while it was rebuilt goes live now.
                match resume(&dir, sb.clone(), debounce) {
                    Ok(w) => src = Some((sb, w)),
                    Err(e) => warn_line!("warning: src/ is no longer watched: {e}"),
                }
            }
        });
    Watching {
        stop,
        thread: spawned_or_warn(thread),
    }
}

/// [`start`] for a rebuilt sandbox: from what it runs ([`Watch::resume`]).
fn resume(dir: &Path, sandbox: Sandbox, debounce: Duration) -> Result<Watch> {
    let options = WatchOptions::default().debounce(debounce);
    Ok(Watch::resume(dir.join("src"), sandbox, options, print)?)
}

/// A graft.toml save waiting to be applied again.
struct SettingsRetry {
    tries: u32,
    since: Instant,
    delay: Duration,
    next: Instant,
    cause: RetryCause,
}

impl SettingsRetry {
    fn new(cause: RetryCause) -> SettingsRetry {
        // Like the src/ watcher's: 0.1 s doubled up to RETRY_MAX.
        let delay = Duration::from_millis(100);
        SettingsRetry {
            tries: 1,
            since: Instant::now(),
            delay,
            next: Instant::now() + delay,
            cause,
        }
    }
}

fn spawned_or_warn(
    t: std::io::Result<std::thread::JoinHandle<()>>,
) -> Option<std::thread::JoinHandle<()>> {
    match t {
        Ok(t) => Some(t),
        Err(e) => {
            warn_line!("warning: graft.toml is not watched: {e}");
            None
        }
    }
}

/// What applying graft.toml came to.
enum Applied {
    /// Applied, unchanged, or refused for good (said why).
    Done,
    /// Refused for a reason that passes: to be tried again.
    Retry(RetryCause),
}

/// Applies a saved `graft.toml` and says what happened. `retry`: the
/// pending retry this is a try of (a failure with the same cause is then
/// not said again).
fn apply_settings(
    node: &Node,
    dir: &Path,
    running: &mut SandboxSpec,
    retry: Option<&mut SettingsRetry>,
) -> Applied {
    let id = running.id.clone();
    let toml = shown(&dir.join("graft.toml"));
    let spec = match SandboxSpec::from_dir(dir) {
        Ok(spec) => spec,
        Err(e) => {
            settings_error(&e, &toml);
            return Applied::Done;
        }
    };
    if spec.id != id {
        warn_line!(
            "error: graft.toml renames the sandbox from `{id}` to `{}` while `graft run` runs\n  --> {toml}\n  = note: nothing changed: a running node does not rename a sandbox; `{id}` keeps running\n  = help: set `id = \"{id}\"` back, or restart `graft run` (it says how to move `{id}`'s data)",
            render::escape(&spec.id, render::Lines::Escape)
        );
        return Applied::Done;
    }
    let changed = changed_settings(running, &spec);
    let new = spec.clone();
    match node.reconfigure_sandbox(spec) {
        Ok(None) => {
            if let Some(r) = retry {
                retried_line(r);
            }
            say!("✓ graft.toml saved: no setting changed");
            Applied::Done
        }
        Ok(Some(sb)) => {
            *running = new;
            if let Some(r) = retry {
                retried_line(r);
            }
            // The new app's `init` may fail (a new entry that crashes): the
            // settings are applied, but the app is not running; say so
            // instead of a ✓.
            let started = graft::block_on(graft::with_timeout(
                sb.wait_app_started(),
                Duration::from_secs(10),
            ));
            match started {
                Some(Err(e)) => {
                    let why = e.to_string();
                    warn_line!(
                        "error: graft.toml applied{changed}, but the app did not start: {}\n  --> {toml}\n  = note: the new settings are stored; the API still serves the sandbox, without its app\n  = help: fix the entry module (or graft.toml) and save",
                        render::escape(&why, render::Lines::Keep)
                    );
                    say!("✗ graft.toml applied{changed}: the app did not start");
                }
                _ => say!(
                    "✓ graft.toml applied{changed}: the app restarted, registered states restored by name"
                ),
            }
            // src/ is brought up to date by the watcher resumed on `sb`.
            Applied::Done
        }
        Err(e) => match graft::watch::retried(&e) {
            Some(cause) => {
                let said = retry.as_ref().is_some_and(|r| r.cause == cause);
                if !said {
                    let why = e.to_string();
                    let then = match cause {
                        RetryCause::Busy => "once the sandbox is free",
                        _ => "until the storage takes it",
                    };
                    warn_line!(
                        "error: {}\n  --> {toml}\n  = note: nothing changed yet; the sandbox keeps its running settings\n  = note: graft.toml is applied again {then}",
                        render::escape(&why, render::Lines::Keep)
                    );
                    warn_line!("✗ graft.toml not applied yet");
                }
                Applied::Retry(cause)
            }
            None => {
                settings_error(&e, &toml);
                warn_line!("✗ graft.toml not applied");
                Applied::Done
            }
        },
    }
}

/// The line after a graft.toml save that waited applies.
fn retried_line(r: &SettingsRetry) {
    let what = match r.cause {
        RetryCause::Busy => "the sandbox is free again",
        _ => "the storage takes writes again",
    };
    say!(
        "✓ {what}: the graft.toml save that waited applies now (after {} refused tries, {:.1}s)",
        r.tries,
        r.since.elapsed().as_secs_f64()
    );
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
    warn_line!(
        "error: {}\n  --> {toml}\n  = note: nothing changed; the sandbox keeps its running settings",
        render::escape(&why, render::Lines::Keep)
    );
}
