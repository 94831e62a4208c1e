//! `graft test --migrations`: every module whose source changed against
//! its previous committed version and that has a `code_change` is migrated
//! up (previous → current) and back down (a rollback, `code_change` with
//! `{ down = n }`) on real states, and each state must come back equal.
//!
//! Where the previous version comes from: the project's git history (the
//! `git` command). If the working file differs from `HEAD`, the previous
//! version is `HEAD`'s; if it equals `HEAD`'s, it is the version before the
//! last commit that changed the file. Kept versions in a node's data
//! directory are not read by this build (there is no durable node data
//! directory to read yet); git is the only source, so it always wins.
//!
//! The states: every process of the module that the project's app starts
//! (its supervisors' `init` with the project's `entry_args`), in a sandbox
//! built as production builds it but with the previous version of the
//! module. Recorded checkpoints and random perturbations are not generated
//! by this build.
//!
//! A module fails when the up migration fails, the rollback fails, or a
//! state does not round-trip (after up and down it differs from the
//! original, or its JSON type changed); the smallest failing state (by
//! JSON length) is shown.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use graft::{Node, NodeLimits, ReloadOptions, SandboxSpec};
use serde_json::Value;

use crate::check::{self, Checked};
use crate::{render, Reported};

/// One module's check result.
struct Finding {
    module: String,
    ok: bool,
    lines: Vec<String>,
}

/// The file at `rev` (`HEAD`, a commit), or `None` if it did not exist there.
fn git_show(dir: &Path, rev: &str, rel: &str) -> Result<Option<String>> {
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

/// The previous committed version of `rel` (see the module docs).
fn previous_version(dir: &Path, rel: &str, current: &str) -> Result<Option<(String, String)>> {
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

fn wait<T>(what: &str, fut: impl std::future::Future<Output = graft::Result<T>>) -> Result<T> {
    match graft::block_on(graft::with_timeout(fut, Duration::from_secs(30))) {
        None => Err(anyhow!("{what}: no answer within 30 s")),
        Some(r) => r.map_err(|e| anyhow!("{what}: {e}")),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nil",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) | Value::Object(_) => "table",
    }
}

/// Up and down for one module on the app's processes of it.
fn check_module(
    node: &Node,
    spec: &SandboxSpec,
    module: &str,
    previous: &str,
    from: &str,
    i: usize,
) -> Result<Finding> {
    let mut finding = Finding {
        module: module.to_string(),
        ok: true,
        lines: Vec::new(),
    };
    let mut old = spec.clone().test_clock(true);
    old.id = format!("mig{i}-{}", spec.id);
    old.id.truncate(64);
    old.modules.insert(module.to_string(), previous.to_string());
    let sb = node.create_sandbox(old).map_err(|e| {
        anyhow!("module `{module}`: the previous version ({from}) does not load: {e}")
    })?;
    let result = (|| -> Result<()> {
        if spec.entry.is_some() {
            wait("the app start", sb.wait_app_started())?;
        }
        let procs: Vec<String> = wait("the process list", sb.processes())?
            .into_iter()
            .filter(|p| p.module == module)
            .map(|p| p.pid)
            .collect();
        if procs.is_empty() {
            finding.lines.push(format!(
                "no process of `{module}` runs in the app: no state to migrate (start one from the app to check it)"
            ));
            return Ok(());
        }
        let mut before = Vec::new();
        for p in &procs {
            before.push(wait("a state", sb.state(p))?);
        }
        let current = spec.modules.get(module).cloned().unwrap_or_default();
        let sources = std::iter::once((module.to_string(), current)).collect();
        if let Err(e) = wait(
            "the up migration",
            sb.reload(sources, ReloadOptions::default()),
        ) {
            finding.ok = false;
            finding
                .lines
                .push(format!("migrating up ({from} → working tree) failed: {e}"));
            return Ok(());
        }
        let mut up = Vec::new();
        for p in &procs {
            up.push(wait("a migrated state", sb.state(p))?);
        }
        if let Err(e) = wait(
            "the rollback",
            sb.rollback(module, 1, ReloadOptions::default()),
        ) {
            finding.ok = false;
            finding
                .lines
                .push(format!("migrating back down failed: {e}"));
            return Ok(());
        }
        let mut failing: Vec<(usize, String)> = Vec::new();
        for (k, p) in procs.iter().enumerate() {
            let after = wait("a state after the rollback", sb.state(p))?;
            if after != before[k] {
                let why = if json_type(&after) != json_type(&before[k]) {
                    format!(
                        "changed type ({} → {})",
                        json_type(&before[k]),
                        json_type(&after)
                    )
                } else {
                    "does not round-trip".to_string()
                };
                let shown = format!(
                    "{p}: {why}\n      before: {}\n      up:     {}\n      down:   {}",
                    before[k], up[k], after
                );
                failing.push((before[k].to_string().len(), shown));
            }
        }
        if failing.is_empty() {
            finding.lines.push(format!(
                "{} state{} round-trip{} ({from} → working tree → {from})",
                procs.len(),
                if procs.len() == 1 { "" } else { "s" },
                if procs.len() == 1 { "s" } else { "" }
            ));
        } else {
            finding.ok = false;
            let n = failing.len();
            failing.sort_by_key(|(len, _)| *len);
            finding.lines.push(format!(
                "{n} of {} states do not round-trip ({from} → working tree → {from}); the smallest:\n    {}",
                procs.len(),
                failing[0].1
            ));
        }
        Ok(())
    })();
    let _ = node.destroy(sb.id());
    result.map(|()| finding)
}

/// `graft test --migrations`.
pub fn run(dir: &Path, json_out: bool) -> Result<()> {
    let started = Instant::now();
    let node = Node::with_limits(2, NodeLimits::default());
    let spec = match check::load(dir, &node)? {
        Checked::Ok(spec) => spec,
        Checked::Failed { error, files } => {
            eprint!("{}", render::error(&error, &|m| files.get(m).cloned()));
            eprintln!("error: the project does not load, so no migration was checked");
            return Err(Reported.into());
        }
    };
    let mut findings = Vec::new();
    for (i, (module, path)) in spec.files.iter().enumerate() {
        let rel = path
            .strip_prefix(dir)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let Some(current) = spec.modules.get(module) else {
            continue;
        };
        let Some((from, previous)) = previous_version(dir, &rel, current)? else {
            continue;
        };
        if !current.contains("code_change") && !previous.contains("code_change") {
            continue;
        }
        findings.push(check_module(&node, &spec, module, &previous, &from, i)?);
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    if json_out {
        let list: Vec<Value> = findings
            .iter()
            .map(|f| serde_json::json!({ "module": f.module, "ok": f.ok, "report": f.lines }))
            .collect();
        println!(
            "{}",
            render::json(
                &serde_json::json!({ "checked": findings.len(), "failed": failed, "modules": list }),
                true
            )
        );
    } else {
        println!(
            "checking migrations of {} module{}",
            findings.len(),
            if findings.len() == 1 { "" } else { "s" }
        );
        for f in &findings {
            let mark = if f.ok { "✓" } else { "✗" };
            for line in &f.lines {
                println!(
                    "{mark} {}: {}",
                    render::escape(&f.module, render::Lines::Escape),
                    render::escape(line, render::Lines::Keep)
                );
            }
        }
        println!(
            "migrations: {} passed, {failed} failed; finished in {:.2}s",
            findings.len() - failed,
            started.elapsed().as_secs_f64()
        );
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Reported.into())
    }
}
