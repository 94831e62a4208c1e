//! `graft check [DIR]`: compile and analyse every module of a project
//! without starting its app (SPEC §11), printing diagnostics exactly as
//! `graft run` does. Suitable for a pre-commit hook: exit 1 on any error.
//!
//! There is no second analyser here: the project is loaded the way `graft
//! run` loads it ([`graft::SandboxSpec::from_dir`]) and built into a sandbox
//! with no entry module, which runs the library's one load path: compile
//! and static analysis (`upgrade::prepare`: syntax, ungranted capabilities,
//! global assignments, forbidden constructs, dynamic `require`), the
//! require graph (missing modules, cycles), then every module body is
//! evaluated under `MODULE_BODY_MS` and its behaviour callbacks checked.
//! Module bodies are the only guest code that runs; no process starts.
//!
//! Invariant: what `graft check` accepts, `graft run` loads, and the other
//! way round (the entry module is checked to exist, as `graft run` does).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Result};
use graft::{Node, NodeLimits, SandboxSpec};
use serde_json::{json, Value};

use crate::{render, watch, Reported};

/// What [`load`] found: the project's spec, or the error `graft run` would
/// print for it, as the API's JSON error body.
pub enum Checked {
    /// Every module compiled, analysed and loaded.
    Ok(SandboxSpec),
    /// The error body (`kind`, `message`, `diagnostics`…) and the files of
    /// the modules, for rendering.
    Failed {
        error: Value,
        files: BTreeMap<String, String>,
    },
}

/// Loads and checks the project in `dir` on `node`; the sandbox it builds
/// is destroyed before this returns.
pub fn load(dir: &Path, node: &Node) -> Result<Checked> {
    if !dir.join("graft.toml").is_file() {
        return Err(anyhow!(
            "{} is not a Graft project (no graft.toml); create one with `graft new {}`",
            dir.display(),
            dir.display()
        ));
    }
    let spec = match SandboxSpec::from_dir(dir) {
        Ok(s) => s,
        Err(e) => {
            return Ok(Checked::Failed {
                error: graft_http::ApiError::from(e).body()["error"].clone(),
                files: BTreeMap::new(),
            })
        }
    };
    let files: BTreeMap<String, String> = spec
        .files
        .iter()
        .map(|(m, p)| (m.clone(), watch::shown(p)))
        .collect();
    let failed = |e: graft::Error, files: BTreeMap<String, String>| Checked::Failed {
        error: graft_http::ApiError::from(e).body()["error"].clone(),
        files,
    };
    // The entry module's existence is part of the spec's own checks.
    if let Err(e) = spec.validate(node.limits()) {
        return Ok(failed(e, files));
    }
    let mut probe = spec.clone().entry(None);
    probe.id = check_id(&spec.id);
    match graft::block_on(node.create_sandbox(probe)) {
        Ok(sb) => {
            let _ = node.destroy(sb.id());
            Ok(Checked::Ok(spec))
        }
        Err(e) => Ok(failed(e, files)),
    }
}

/// A sandbox id for the check that no other sandbox of the node uses.
fn check_id(id: &str) -> String {
    let mut s = format!("check-{id}");
    s.truncate(64);
    s
}

/// `graft check`: prints `✓ …` or the diagnostics; `Err(Reported)` (exit 1)
/// on any error.
pub fn run(dir: &Path, json_out: bool) -> Result<()> {
    let node = Node::with_limits(1, NodeLimits::default());
    let loaded = match load(dir, &node) {
        Ok(l) => l,
        // `--json` promises one JSON document on stdout, also when there is
        // no project to check.
        Err(e) if json_out => {
            let error = json!({ "kind": "not_a_project", "message": format!("{e:#}") });
            println!(
                "{}",
                render::json(&json!({ "ok": false, "error": error }), true)
            );
            return Err(Reported.into());
        }
        Err(e) => return Err(e),
    };
    match loaded {
        Checked::Ok(spec) => {
            let modules: Vec<&str> = spec.modules.keys().map(String::as_str).collect();
            if json_out {
                println!(
                    "{}",
                    render::json(&json!({ "ok": true, "modules": modules }), true)
                );
            } else {
                println!(
                    "✓ {} module{} checked: {}",
                    modules.len(),
                    if modules.len() == 1 { "" } else { "s" },
                    render::escape(&modules.join(", "), render::Lines::Escape)
                );
            }
            Ok(())
        }
        Checked::Failed { error, files } => {
            if json_out {
                println!(
                    "{}",
                    render::json(&json!({ "ok": false, "error": error }), true)
                );
            } else {
                eprint!("{}", render::error(&error, &|m| files.get(m).cloned()));
                eprintln!("error: could not check `{}`", dir.display());
            }
            Err(Reported.into())
        }
    }
}
