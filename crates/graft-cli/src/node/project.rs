//! `graft run DIR`: a node serving one project, whose sandbox is restored
//! from the data directory (brought up to the files in `src/`) or created
//! from `graft.toml`, and hot-reloaded on save.
//!
//! `run` is a sequence of named steps, in this order because each relies on
//! the one before: read the project, open the node (deleting what
//! `--discard` names, then refusing to start over stored data it would
//! bury), open its trust, start the project's sandbox, wait for its app,
//! and only then listen, watch and serve. A refusal comes before the port is
//! bound, so a failed start leaves nothing listening and the database as it
//! was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Result};
use graft::{Node, NodeLimits, SandboxSpec};

use super::{
    listen, open_node, open_trust, serve_until_signal, tls_config, token_banner, DataChoice,
    Serving,
};
use crate::{render, watch, Reported};

pub async fn run(
    dir: &Path,
    mut serving: Serving,
    caps: NodeLimits,
    data: DataChoice,
    debounce_ms: Option<u64>,
    discard: &[String],
) -> Result<()> {
    let spec = project_spec(dir)?;
    // `graft run DIR` may create sandboxes from DIR through the API.
    serving.projects_roots.push(dir.to_owned());
    let tls = tls_config(&serving)?;
    let node = open_project_node(dir, &spec, caps, &data, discard).await?;
    let id = spec.id.clone();
    // The settings the sandbox runs with (the graft.toml watcher compares).
    let spec_now = spec.clone();
    let (trust, file) = open_trust(&node, data.token_dir(), serving.trust_config())?;
    let sources = spec.modules.clone();
    let sandbox = start_sandbox(&node, dir, spec, &sources).await?;
    wait_app_started(&sandbox).await;
    let listener = listen(&serving.bind, serving.port).await?;
    let addr = listener.local_addr()?;
    let scheme = serving.scheme();
    let modules: Vec<&str> = sources.keys().map(String::as_str).collect();
    say!(
        "✓ sandbox `{id}` started: {}  ({})",
        modules.join(", "),
        data.describe()
    );
    let watcher = if let Some(ms) = debounce_ms {
        let settings = start_watching(dir, &node, spec_now, &sandbox, &sources, ms)?;
        say!(
            "listening on {scheme}://{addr}  (API: {scheme}://{addr}/api/v1, watching {} and graft.toml)",
            dir.join("src").display()
        );
        Some(settings)
    } else {
        say!("listening on {scheme}://{addr}  (API: {scheme}://{addr}/api/v1)");
        None
    };
    say!("{}", token_banner(&file));
    let result =
        serve_until_signal(node, trust, listener, tls, serving.metrics_bind.as_deref()).await;
    drop(watcher);
    result
}

/// The project's settings (`graft.toml` and `src/`); a directory without
/// `graft.toml` is refused with the command that makes one.
fn project_spec(dir: &Path) -> Result<SandboxSpec> {
    if !dir.join("graft.toml").is_file() {
        return Err(anyhow!(
            "{} is not a Graft project (no graft.toml); create one with `graft new {}`",
            dir.display(),
            dir.display()
        ));
    }
    Ok(SandboxSpec::from_dir(dir)?)
}

/// Opens the node, deletes the sandboxes `--discard` names, and refuses to
/// start over stored data it would bury ([`check_restored`]).
async fn open_project_node(
    dir: &Path,
    spec: &SandboxSpec,
    caps: NodeLimits,
    data: &DataChoice,
    discard: &[String],
) -> Result<Node> {
    // The project's sandbox is restored with graft.toml's settings: an app
    // whose entry changed while the node was down never runs the old one.
    let node = open_node(caps, data, Some(spec.clone())).await?;
    discard_sandboxes(&node, discard).await?;
    check_restored(&node, dir, &spec.id, data)?;
    Ok(node)
}

/// The project's sandbox, running: the restored one brought up to the
/// files in `src/`, else a new one from `spec`. One that cannot start is
/// reported here, at the user's files (exit 1).
async fn start_sandbox(
    node: &Node,
    dir: &Path,
    spec: SandboxSpec,
    sources: &BTreeMap<String, String>,
) -> Result<graft::Sandbox> {
    let id = spec.id.clone();
    let files: BTreeMap<String, String> = spec
        .files
        .iter()
        .map(|(m, p)| (m.clone(), watch::shown(p)))
        .collect();
    let restored = node.sandbox(&id).ok();
    let n = node.clone();
    let mut settings_refused = false;
    let created = match restored {
        // The project's sandbox came back from the data directory; then
        // what src/ holds goes live, as the watcher would have done: a
        // reload that is `unchanged` when the files match the running
        // version, re-uses a kept version's number when they match it, and
        // is a new version when they were edited while the node was down.
        Some(sb) => match node.take_settings_outcome() {
            Some(graft::SettingsOutcome::Refused(e)) => {
                settings_refused = true;
                Err(e)
            }
            Some(graft::SettingsOutcome::Applied(changed)) => {
                say!(
                    "✓ sandbox `{id}` restored with the settings of graft.toml, which changed since the last run: {}",
                    changed.join(", ")
                );
                restore_sources(sb, sources.clone()).await
            }
            _ => restore_sources(sb, sources.clone()).await,
        },
        None => n.create_sandbox(spec).await,
    };
    match created {
        Ok(sb) => Ok(sb),
        Err(e) => {
            let err = graft_http::ApiError::from(e);
            warn_text!(
                "{}",
                render::error(&err.body()["error"], &|m| files.get(m).cloned())
            );
            if settings_refused {
                warn_line!(
                    "  --> {}\n  = note: graft.toml's settings were not applied; the stored sandbox is intact, with its previous settings",
                    watch::shown(&dir.join("graft.toml"))
                );
            }
            warn_line!("error: sandbox `{id}` could not start; fix the error and run again");
            Err(Reported.into())
        }
    }
}

/// Gives the app up to 10 s to start; one that failed is a warning, since
/// the API still serves and a save reloads it.
async fn wait_app_started(sandbox: &graft::Sandbox) {
    match tokio::time::timeout(Duration::from_secs(10), sandbox.wait_app_started()).await {
        Ok(Ok(_)) | Err(_) => {}
        Ok(Err(e)) => {
            let why = e.to_string();
            warn_line!(
                "warning: the app did not start: {}\n  = note: the API still serves; fix and save to reload",
                render::escape(&why, render::Lines::Keep)
            );
        }
    }
}

/// Hot reload: `src/` reloaded on save, and `graft.toml`'s settings applied
/// when it changes; watching stops when the returned value is dropped.
fn start_watching(
    dir: &Path,
    node: &Node,
    spec_now: SandboxSpec,
    sandbox: &graft::Sandbox,
    sources: &BTreeMap<String, String>,
    ms: u64,
) -> Result<watch::Watching> {
    let debounce = std::time::Duration::from_millis(ms);
    let w = watch::start(dir, sandbox.clone(), sources, debounce)?;
    Ok(watch::watch_settings(
        node.clone(),
        dir.to_owned(),
        spec_now,
        sandbox.clone(),
        w,
        debounce,
    ))
}

/// `--discard ID`: deletes stored sandboxes the user gave up on (restored
/// or not), before anything else happens.
async fn discard_sandboxes(node: &Node, ids: &[String]) -> Result<()> {
    for id in ids {
        let n = node.clone();
        let target = id.clone();
        let done = tokio::task::spawn_blocking(move || n.destroy(&target)).await?;
        match done {
            Ok(()) => {
                say!("✓ sandbox `{id}` deleted (--discard): its kept versions and states are gone")
            }
            Err(graft::Error::NoSandbox(_)) => {
                return Err(anyhow!(
                "--discard {id}: the data directory holds no sandbox `{id}`; nothing was deleted"
            ))
            }
            Err(e) => return Err(anyhow!("--discard {id}: {e}; nothing was deleted")),
        }
    }
    Ok(())
}

/// Refuses to start over data `graft run` would otherwise bury: the
/// project's sandbox stored but not restorable (creating it anew would
/// overwrite its versions and states), or stored under an id graft.toml no
/// longer names (it would keep running, unseen, next to the new one).
fn check_restored(node: &Node, dir: &Path, id: &str, data: &DataChoice) -> Result<()> {
    let data_dir = match data {
        DataChoice::Dir { dir, .. } => dir.clone(),
        DataChoice::Ephemeral { .. } => return Ok(()),
    };
    let unrestored = node.unrestored();
    let toml = dir.join("graft.toml");
    for (other, why) in &unrestored {
        if other == id {
            continue;
        }
        warn_line!(
            "warning: sandbox `{other}` in {} could not be restored: {}\n  = note: its data stays in the database, untouched; `--discard {other}` deletes it",
            data_dir.display(),
            render::escape(why, render::Lines::Keep)
        );
    }
    if let Some((_, why)) = unrestored.iter().find(|(u, _)| u == id) {
        warn_line!(
            "error[restore_failed]: sandbox `{id}` is stored in {} but could not be restored\n  --> {}\n  = note: {}\n  = note: its kept versions and checkpointed states are still in the database; `graft run` does not start a new sandbox over them\n  = help: fix what the note names (graft.toml's [limits] or entry_args, a module), then run again\n  = help: or keep a copy (`graft backup {id}.db --data {}`) and start afresh with `graft run {} --discard {id}`, which deletes the stored sandbox",
            data_dir.display(),
            watch::shown(&toml),
            render::escape(why, render::Lines::Keep),
            data_dir.display(),
            dir.display(),
        );
        return Err(Reported.into());
    }
    if node.sandbox(id).is_ok() {
        return Ok(());
    }
    // The project's sandbox is new: one stored from this project's src/
    // under another id is the same project renamed.
    let Some(store) = node.store() else {
        return Ok(());
    };
    if node.sandbox_ids().is_empty() {
        return Ok(());
    }
    let snapshot = store
        .load_all()
        .map_err(|e| anyhow!("reading {}: {e}", data_dir.display()))?;
    let src = dir.join("src");
    let old: Vec<String> = snapshot
        .sandboxes
        .iter()
        .filter(|s| s.sandbox.id != id && record_is_under(&s.sandbox.spec_json, &src))
        .map(|s| s.sandbox.id.clone())
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = old.iter().map(|o| format!("`{o}`")).collect();
    let first = &old[0];
    warn_line!(
        "error: graft.toml names sandbox `{id}`, but {} holds this project's sandbox as {}\n  --> {}\n  = note: `graft run` does not rename a sandbox: the old one would keep running next to a new, empty `{id}`\n  = help: to keep its versions and states, set `id = \"{first}\"` in graft.toml again\n  = help: to start `{id}` afresh, delete the old one: `graft run {} --discard {first}` (keep a copy first with `graft backup {first}.db --data {}`)",
        data_dir.display(),
        names.join(", "),
        watch::shown(&toml),
        dir.display(),
        data_dir.display(),
    );
    Err(Reported.into())
}

/// Whether a stored sandbox record's module files lie under `src` (paths
/// are stored as `graft run` was given them: relative ones are taken from
/// the current directory).
fn record_is_under(spec_json: &str, src: &Path) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(spec_json) else {
        return false;
    };
    let Some(files) = v.get("files").and_then(|f| f.as_object()) else {
        return false;
    };
    let roots: Vec<PathBuf> = [Some(absolute(src)), std::fs::canonicalize(src).ok()]
        .into_iter()
        .flatten()
        .collect();
    files.values().filter_map(|p| p.as_str()).any(|p| {
        let path = absolute(Path::new(p));
        let real = path
            .parent()
            .and_then(|d| std::fs::canonicalize(d).ok())
            .and_then(|d| path.file_name().map(|f| d.join(f)));
        [Some(path), real]
            .into_iter()
            .flatten()
            .any(|p| roots.iter().any(|r| p.starts_with(r)))
    })
}

/// `p` made absolute against the current directory, `.` and `..` folded.
fn absolute(p: &Path) -> PathBuf {
    let joined = std::env::current_dir()
        .map(|cwd| cwd.join(p))
        .unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Brings a restored sandbox up to the sources on disk.
async fn restore_sources(
    sb: graft::Sandbox,
    sources: std::collections::BTreeMap<String, String>,
) -> graft::Result<graft::Sandbox> {
    let report = match sb.reload(sources, graft::ReloadOptions::default()).await {
        Ok(r) => r,
        Err(e) => {
            let why = e.to_string();
            warn_line!(
                "warning: the files in src/ do not load: {}\n  = note: the restored version keeps running; fix and save to reload",
                crate::render::escape(&why, crate::render::Lines::Keep)
            );
            return Ok(sb);
        }
    };
    let changed: Vec<String> = report
        .modules
        .iter()
        .map(|m| format!("{} v{} → v{}", m.name, m.from, m.to))
        .collect();
    if changed.is_empty() {
        say!("✓ sandbox `{}` restored; its files did not change", sb.id());
    } else {
        say!(
            "✓ sandbox `{}` restored and reloaded from its files: {}",
            sb.id(),
            changed.join(", ")
        );
    }
    Ok(sb)
}
