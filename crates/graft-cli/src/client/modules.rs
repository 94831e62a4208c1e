//! The verbs on a sandbox's modules: `reload`, `versions` and `rollback`.
//!
//! `reload` sends every file as one transaction (the node applies all or
//! none), so two files that name the same module are refused before
//! sending. It keeps each module's file name, so that a compile error is
//! shown at the user's file, not at a module name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use hyper::Method;
use serde_json::{json, Value};

use super::{seg, Client, DEFAULT_WAIT};
use crate::render;

/// Options of `graft reload`.
pub struct ReloadArgs {
    pub dry_run: bool,
    pub extra: Option<Value>,
    pub state_handler: Option<PathBuf>,
    pub canary_ms: Option<u64>,
    pub canary_crashes: Option<u32>,
}

impl Client {
    pub async fn reload(&self, sandbox: &str, files: &[PathBuf], args: ReloadArgs) -> Result<()> {
        let mut modules = BTreeMap::new();
        let mut file_names = BTreeMap::new();
        for file in files {
            let name = module_name_of(file)?;
            let source = std::fs::read_to_string(file)
                .map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
            if modules
                .insert(name.clone(), Value::String(source))
                .is_some()
            {
                bail!("two files give module `{name}`; name each module once");
            }
            file_names.insert(name, file.display().to_string());
        }
        let mut body = json!({ "modules": modules, "dry_run": args.dry_run });
        if let Some(extra) = args.extra {
            body["extra"] = extra;
        }
        if let Some(path) = &args.state_handler {
            let src = std::fs::read_to_string(path)
                .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
            body["state_handler"] = json!(src);
        }
        if let Some(ms) = args.canary_ms {
            body["canary_ms"] = json!(ms);
        }
        if let Some(n) = args.canary_crashes {
            body["canary_crashes"] = json!(n);
        }
        let file_of = |m: &str| file_names.get(m).cloned();
        let wait = DEFAULT_WAIT;
        let v = self
            .send_with_files(
                Method::POST,
                &format!("/sandboxes/{}/reload", seg(sandbox)),
                Some(body),
                wait,
                &file_of,
            )
            .await?;
        self.print_report(
            &v,
            &format!(
                "unchanged: {} already current",
                modules.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        );
        Ok(())
    }

    fn print_report(&self, v: &Value, unchanged: &str) {
        if !self.printed_json(v) {
            let unchanged = render::escape(unchanged, render::Lines::Escape);
            println!(
                "{}",
                render::report_line(v).unwrap_or_else(|| format!("= {unchanged}"))
            );
        }
    }

    pub async fn versions(&self, sandbox: &str, module: &str) -> Result<()> {
        let path = format!(
            "/sandboxes/{}/modules/{}/versions",
            seg(sandbox),
            seg(module)
        );
        let v = self.send(Method::GET, &path, None, DEFAULT_WAIT).await?;
        if self.printed_json(&v) {
            return Ok(());
        }
        let rows: Vec<Vec<String>> = v
            .as_array()
            .map(|vs| {
                vs.iter()
                    .map(|v| {
                        let deps: Vec<&str> = v["dependencies"]
                            .as_array()
                            .map(|d| d.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        vec![
                            format!("v{}", v["version"].as_u64().unwrap_or(0)),
                            if v["current"] == json!(true) {
                                "*".into()
                            } else {
                                String::new()
                            },
                            v["checksum"]
                                .as_str()
                                .unwrap_or("")
                                .chars()
                                .take(12)
                                .collect(),
                            render::timestamp(v["loaded_at_ms"].as_f64().unwrap_or(0.0)),
                            if deps.is_empty() {
                                "-".into()
                            } else {
                                deps.join(", ")
                            },
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print!(
            "{}",
            render::table(
                &["VERSION", "CURRENT", "CHECKSUM", "LOADED (UTC)", "REQUIRES"],
                &rows
            )
        );
        Ok(())
    }

    pub async fn rollback(&self, sandbox: &str, module: &str, version: u32) -> Result<()> {
        let path = format!(
            "/sandboxes/{}/modules/{}/rollback",
            seg(sandbox),
            seg(module)
        );
        let v = self
            .send(
                Method::POST,
                &path,
                Some(json!({ "version": version })),
                DEFAULT_WAIT,
            )
            .await?;
        self.print_report(
            &v,
            &format!("unchanged: {module} v{version} is already current"),
        );
        Ok(())
    }
}

/// The module name of a file: its path under the nearest `src/` directory
/// (`src/chat/room.luau` is `chat.room`), else its file name.
pub fn module_name_of(file: &Path) -> Result<String> {
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
    for dir in abs.ancestors().skip(1) {
        if dir.file_name().is_some_and(|n| n == "src") {
            if let Some(name) = graft::config::module_name_for(dir, &abs) {
                return Ok(name);
            }
        }
    }
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    graft::config::validate_module_name(stem)
        .map_err(|e| anyhow!("cannot name a module after {}: {e}", file.display()))?;
    Ok(stem.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_from_paths() {
        assert_eq!(
            module_name_of(Path::new("/p/src/chat/room.luau")).unwrap(),
            "chat.room"
        );
        assert_eq!(
            module_name_of(Path::new("/p/src/counter.luau")).unwrap(),
            "counter"
        );
        assert_eq!(
            module_name_of(Path::new("/tmp/x/counter.luau")).unwrap(),
            "counter"
        );
        assert!(module_name_of(Path::new("/tmp/bad name.luau")).is_err());
    }
}
