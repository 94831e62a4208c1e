//! `graft test --migrations`: every module whose `code_change` differs from
//! its previous version's is migrated up (previous → working tree) and back
//! down (a rollback: the previous version's `code_change` with
//! `{ down = n }`) on many states, and each state must come back equal.
//!
//! **Which previous version.** When the project has a node data directory
//! (`DIR/.graft/graft.db`, what `graft run DIR` writes) and the node kept
//! versions of the module (sandbox id from `graft.toml`), the node wins:
//! that is the code that runs. The node's current version is the previous
//! one if it differs from the working file, else the newest kept version
//! before it that differs. Otherwise the project's git history (the `git`
//! command): `HEAD`'s version if the working file differs from it, else the
//! version before the last commit that changed the file. The database is
//! read through [`graft::store::Store::open_read_only`]: a node may be
//! running on the directory; its lock is not taken and nothing is written.
//!
//! **Which modules.** Those whose `code_change` function differs between
//! the two versions, compared token by token with full_moon (comments and
//! whitespace do not count; a `code_change` added or removed counts). The
//! helpers it calls are not compared.
//!
//! **The states**, each migrated in a fresh sandbox built as production
//! builds it (limits, capabilities, prelude) with the old version of the
//! module, no app, a test clock:
//! * recorded: the node's checkpoints of the module's registered processes,
//!   each with the kept version its state belongs to;
//! * the app's: every process of the module the app starts (with the
//!   project's `entry_args`) under the previous version;
//! * `init`: the module's `init` with the project's `entry_args`;
//! * generated: `cases` random perturbations of the above (numbers moved,
//!   strings changed, fields dropped and added, arrays shortened and
//!   lengthened), from a deterministic seed.
//!
//! A state is put in a process by a wrapper around the old version's
//! `init` that returns the state it is given; the rest of the module is
//! untouched, so `code_change` runs exactly as in a reload.
//!
//! A state fails when the up migration fails, the rollback fails, or after
//! both it differs from the original or its type changed. A generated state
//! whose *up* migration raises is only counted (perturbations can build
//! states the module never holds); every other failure of any state fails
//! the module. The first failure is shrunk greedily (fields and elements
//! dropped, numbers and strings made smaller while the same kind of failure
//! remains) and the smallest example is reported.
//!
//! Bounds: `cases` ≤ 10 000 (the CLI checks), shrinking tries at most
//! [`MAX_SHRINK_RUNS`] states, a perturbation never nests deeper than the
//! state it starts from plus one level.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use full_moon::visitors::Visitor;
use graft::{Node, NodeLimits};
use serde_json::{json, Map, Value};

use crate::check::{self, Checked};
use crate::{render, Reported};

mod lab;
mod previous;
mod states;
#[cfg(test)]
mod tests;

use lab::{shrink, Lab};
use previous::{git_previous, no_git_history, open_node_data, NodeData};
use states::{perturb, Rng};

/// The most migrations one shrink runs before it reports what it has.
pub const MAX_SHRINK_RUNS: usize = 300;

/// The key of the spawn argument that carries a state into the wrapper.
const STATE_KEY: &str = "__graft_migration_state";

/// One module's check result.
struct Finding {
    module: String,
    ok: bool,
    lines: Vec<String>,
}

/// Where a state came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Recorded,
    App,
    Init,
    Generated,
}

/// One state to migrate, with the old version it belongs to.
struct Case {
    origin: Origin,
    /// Index into the module's old versions.
    old: usize,
    label: String,
    state: Value,
}

/// How a state failed (shrinking keeps the kind).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Load,
    Up,
    Down,
    RoundTrip,
    TypeChanged,
}

struct Failure {
    kind: Kind,
    detail: String,
    before: Value,
    up: Value,
    down: Value,
}

/// The tokens of the module's `code_change` function (the last definition
/// wins, as at run time), trivia excluded; `None` if it defines none.
pub(crate) fn code_change_tokens(source: &str) -> Option<Vec<String>> {
    #[derive(Default)]
    struct Find {
        found: Option<Vec<String>>,
    }
    fn texts<N: full_moon::node::Node>(n: &N) -> Vec<String> {
        n.tokens().map(|t| t.token().to_string()).collect()
    }
    fn is_code_change(var_text: &str) -> bool {
        var_text == "code_change"
            || var_text.ends_with(".code_change")
            || var_text.ends_with(":code_change")
    }
    impl Visitor for Find {
        fn visit_function_declaration(&mut self, f: &full_moon::ast::FunctionDeclaration) {
            let name = f.name();
            let last = match name.method_name() {
                Some(m) => m.token().to_string(),
                None => name
                    .names()
                    .iter()
                    .last()
                    .map(|t| t.token().to_string())
                    .unwrap_or_default(),
            };
            if last == "code_change" {
                self.found = Some(texts(f));
            }
        }
        fn visit_local_function(&mut self, f: &full_moon::ast::LocalFunction) {
            if f.name().token().to_string() == "code_change" {
                self.found = Some(texts(f));
            }
        }
        fn visit_assignment(&mut self, a: &full_moon::ast::Assignment) {
            for (var, expr) in a.variables().iter().zip(a.expressions().iter()) {
                if is_code_change(&texts(var).concat()) {
                    self.found = Some(texts(expr));
                }
            }
        }
        fn visit_field(&mut self, f: &full_moon::ast::Field) {
            if let full_moon::ast::Field::NameKey { key, value, .. } = f {
                if key.token().to_string() == "code_change" {
                    self.found = Some(texts(value.as_ref()));
                }
            }
        }
    }
    // full_moon recurses without a depth limit of its own: parse on a
    // thread with a large stack, behind a panic barrier (a source it cannot
    // parse compares as its raw text instead).
    let src = source.to_string();
    let parsed = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || {
            std::panic::catch_unwind(move || {
                let r = full_moon::parse_fallible(&src, full_moon::LuaVersion::luau());
                if !r.errors().is_empty() {
                    return Err(());
                }
                let mut f = Find::default();
                f.visit_ast(r.ast());
                Ok(f.found)
            })
        })
        .ok()
        .and_then(|h| h.join().ok())
        .and_then(|r| r.ok());
    match parsed {
        Some(Ok(found)) => found,
        _ => Some(vec![source.to_string()]),
    }
}

/// The old version with its `init` wrapped: a spawn argument
/// `{ [STATE_KEY] = s }` makes `s` the process's state. The source keeps its
/// line numbers (the prefix shares its first line).
fn wrap_init(source: &str) -> String {
    format!(
        "local __graft_m = (function(...) {source}\nend)(...)\n\
         local __graft_w = {{}}\n\
         for k, v in __graft_m do __graft_w[k] = v end\n\
         local __graft_init = __graft_m.init\n\
         __graft_w.init = function(args, ...)\n\
         \x20 if type(args) == \"table\" and args.{STATE_KEY} ~= nil then return args.{STATE_KEY} end\n\
         \x20 return __graft_init(args, ...)\n\
         end\n\
         return __graft_w\n"
    )
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

/// What the module check is given.
struct Sources<'a> {
    /// `(label, source)` of the previous version.
    previous: (String, String),
    /// Kept versions by the node, for checkpoints of other versions.
    kept: BTreeMap<u32, String>,
    node: Option<&'a NodeData>,
}

/// The node's checkpoints of the module's registered processes, each with
/// the kept version its state belongs to (added to `olds` when new).
/// Checkpoints already of the working version, or of a version no longer
/// kept, are counted in a note instead.
fn recorded_cases(
    nd: &NodeData,
    src: &Sources<'_>,
    module: &str,
    current: &str,
    olds: &mut Vec<(String, String)>,
    cases: &mut Vec<Case>,
    lines: &mut Vec<String>,
) -> Result<()> {
    let cps = nd
        .store
        .checkpoints(&nd.sandbox)
        .map_err(|e| anyhow!("reading the node's checkpoints: {e}"))?;
    let mut skipped = 0;
    for cp in cps.into_iter().filter(|c| c.module == module) {
        let Some(old) = src.kept.get(&cp.module_version) else {
            skipped += 1;
            continue;
        };
        if old == current {
            skipped += 1;
            continue;
        }
        let idx = match olds.iter().position(|(_, s)| s == old) {
            Some(i) => i,
            None => {
                olds.push((format!("node v{}", cp.module_version), old.clone()));
                olds.len() - 1
            }
        };
        let state: Value = serde_json::from_str(&cp.state_json)
            .map_err(|e| anyhow!("checkpoint `{}` is not JSON: {e}", cp.name))?;
        cases.push(Case {
            origin: Origin::Recorded,
            old: idx,
            label: format!("checkpoint `{}` (node v{})", cp.name, cp.module_version),
            state,
        });
    }
    if skipped > 0 {
        lines.push(format!(
            "{skipped} checkpoint{} already of the working version (or of a version no longer kept): not migrated",
            if skipped == 1 { " is" } else { "s are" }
        ));
    }

    Ok(())
}

/// The report of a module whose states fail: how many, and the first
/// failure shrunk to the smallest state found.
fn describe_failures(
    lab: &Lab<'_>,
    cases: &[Case],
    olds: &[(String, String)],
    mut failures: Vec<(usize, Failure)>,
    rejected: usize,
    mix: &str,
) -> Result<String> {
    let n = failures.len();
    let (i, first) = failures.swap_remove(0);
    let case = &cases[i];
    let old = &olds[case.old];
    let (f, runs) = shrink(lab, &old.1, first)?;
    let what = match f.kind {
        Kind::Up => format!(
            "migrating up ({} → working tree) failed: {}",
            old.0, f.detail
        ),
        Kind::Down => format!("migrating back down failed: {}", f.detail),
        Kind::Load => format!("the state cannot be given to a process: {}", f.detail),
        Kind::RoundTrip | Kind::TypeChanged => f.detail.clone(),
    };
    let mut shown = format!(
        "{n} of {} states fail ({} → working tree → {}; {mix}); first: {}; smallest found ({runs} shrink runs):\n    {what}\n      before: {}",
        cases.len() - rejected,
        old.0,
        old.0,
        case.label,
        f.before
    );
    if !f.up.is_null() {
        shown.push_str(&format!("\n      up:     {}", f.up));
    }
    if !f.down.is_null() {
        shown.push_str(&format!("\n      down:   {}", f.down));
    }
    Ok(shown)
}

fn check_module(
    lab: &Lab<'_>,
    src: &Sources<'_>,
    cases_wanted: usize,
    seed: u64,
) -> Result<Finding> {
    let module = lab.module;
    let mut finding = Finding {
        module: module.to_string(),
        ok: true,
        lines: Vec::new(),
    };
    let current = lab.spec.modules.get(module).cloned().unwrap_or_default();
    let from = src.previous.0.clone();
    let mut olds: Vec<(String, String)> = vec![src.previous.clone()];
    let mut cases: Vec<Case> = Vec::new();

    if let Some(nd) = src.node {
        recorded_cases(
            nd,
            src,
            module,
            &current,
            &mut olds,
            &mut cases,
            &mut finding.lines,
        )?;
    }
    let previous = &olds[0].1;
    for (pid, state) in lab
        .app_states(previous)
        .map_err(|e| anyhow!("module `{module}` ({from}): {e}"))?
    {
        cases.push(Case {
            origin: Origin::App,
            old: 0,
            label: format!("app process {pid}"),
            state,
        });
    }
    match lab.init_state(previous) {
        Ok(state) => cases.push(Case {
            origin: Origin::Init,
            old: 0,
            label: "init(entry_args)".into(),
            state,
        }),
        Err(e) => finding
            .lines
            .push(format!("init(entry_args) gave no state under {from}: {e}")),
    }
    let seeds = cases.len();
    let mut rng = Rng(seed ^ fnv(module));
    if seeds > 0 {
        for n in 0..cases_wanted {
            let base = &cases[n % seeds];
            let mut state = base.state.clone();
            for _ in 0..=rng.below(3) {
                perturb(&mut state, &mut rng);
            }
            let old = base.old;
            cases.push(Case {
                origin: Origin::Generated,
                old,
                label: format!("generated #{}", n + 1),
                state,
            });
        }
    }
    if cases.is_empty() {
        finding.lines.push(format!(
            "no state to migrate: no checkpoint, no process of `{module}` in the app, and `init` gave none"
        ));
        return Ok(finding);
    }

    let mut failures: Vec<(usize, Failure)> = Vec::new();
    let mut rejected = 0;
    for (i, case) in cases.iter().enumerate() {
        if let Some(f) = lab.round_trip(&olds[case.old].1, &case.state)? {
            if case.origin == Origin::Generated && matches!(f.kind, Kind::Up | Kind::Load) {
                rejected += 1;
            } else {
                failures.push((i, f));
            }
        }
    }
    let count = |o: Origin| cases.iter().filter(|c| c.origin == o).count();
    let mix = format!(
        "{} recorded, {} from the app, {} from init, {} generated",
        count(Origin::Recorded),
        count(Origin::App),
        count(Origin::Init),
        count(Origin::Generated)
    );
    if failures.is_empty() {
        finding.lines.push(format!(
            "{} state{} round-trip{} ({from} → working tree → {from}; {mix})",
            cases.len() - rejected,
            if cases.len() - rejected == 1 { "" } else { "s" },
            if cases.len() - rejected == 1 { "s" } else { "" },
        ));
    } else {
        finding.ok = false;
        let shown = describe_failures(lab, &cases, &olds, failures, rejected, &mix)?;
        finding.lines.push(shown);
    }
    if rejected > 0 {
        finding.lines.push(format!(
            "{rejected} generated state{} rejected by the up migration (not counted)",
            if rejected == 1 { " was" } else { "s were" }
        ));
    }
    Ok(finding)
}

/// FNV-1a, so each module gets its own stream from one seed.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The note when there is nothing to compare with (no node data and no git
/// history): otherwise "0 modules checked" reads as "all is well".
fn no_history_note(dir: &Path, node_data: Option<&NodeData>) -> Option<String> {
    if node_data.is_some() {
        return None;
    }
    let why = no_git_history(dir)?;
    Some(format!(
        "note: no previous version to compare with: no node data ({}) and {why}; nothing was checked",
        dir.join(".graft").join(graft::DATABASE_FILE).display()
    ))
}

/// `graft test --migrations`.
pub fn run(dir: &Path, json_out: bool, cases: usize, seed: u64) -> Result<()> {
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
    let mut notes = Vec::new();
    let node_data = open_node_data(dir, &spec.id, &mut notes);
    notes.extend(no_history_note(dir, node_data.as_ref()));
    let mut findings = Vec::new();
    let mut unchanged = 0;
    for (module, path) in &spec.files {
        let rel = path
            .strip_prefix(dir)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let Some(current) = spec.modules.get(module) else {
            continue;
        };
        let (by_node, kept) = match &node_data {
            Some(nd) => nd.previous(module, current)?,
            None => (None, BTreeMap::new()),
        };
        let previous = match by_node {
            Some(p) => Some(p),
            None if kept.is_empty() => git_previous(dir, &rel, current)?,
            // The node keeps this module but no other version of it: it
            // runs the working tree already; nothing to migrate.
            None => None,
        };
        let Some(previous) = previous else {
            continue;
        };
        if code_change_tokens(current) == code_change_tokens(&previous.1) {
            unchanged += 1;
            continue;
        }
        let lab = Lab {
            node: &node,
            spec: &spec,
            module,
            next: std::cell::Cell::new(0),
        };
        let sources = Sources {
            previous,
            kept,
            node: node_data.as_ref(),
        };
        findings.push(match check_module(&lab, &sources, cases, seed) {
            Ok(f) => f,
            Err(e) => Finding {
                module: module.clone(),
                ok: false,
                lines: vec![e.to_string()],
            },
        });
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    if json_out {
        let list: Vec<Value> = findings
            .iter()
            .map(|f| json!({ "module": f.module, "ok": f.ok, "report": f.lines }))
            .collect();
        println!(
            "{}",
            render::json(
                &json!({
                    "checked": findings.len(),
                    "failed": failed,
                    "code_change_unchanged": unchanged,
                    "seed": seed,
                    "cases": cases,
                    "notes": notes,
                    "modules": list,
                }),
                true
            )
        );
    } else {
        for n in &notes {
            println!("{}", render::escape(n, render::Lines::Escape));
        }
        println!(
            "checking migrations of {} module{} (seed {seed}, {cases} generated states each)",
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
            "migrations: {} passed, {failed} failed, {unchanged} changed module{} with the same code_change skipped; finished in {:.2}s",
            findings.len() - failed,
            if unchanged == 1 { "" } else { "s" },
            started.elapsed().as_secs_f64()
        );
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Reported.into())
    }
}
