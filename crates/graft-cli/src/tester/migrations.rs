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
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use full_moon::visitors::Visitor;
use graft::{Node, NodeLimits, ReloadOptions, SandboxSpec};
use serde_json::{json, Map, Value};

use crate::check::{self, Checked};
use crate::{render, Reported};

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

/// Why git has no history for `dir`: not a repository (or no `git`), or
/// a repository without a commit; `None` when `HEAD` exists.
fn no_git_history(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .map(|o| o.status.success())
    };
    match git(&["rev-parse", "--is-inside-work-tree"]) {
        Err(e) => Some(format!("git cannot run ({e})")),
        Ok(false) => Some(format!("{} is not in a git repository", dir.display())),
        Ok(true) => match git(&["rev-parse", "--verify", "--quiet", "HEAD"]) {
            Ok(true) => None,
            _ => Some("its git repository has no commit yet".to_string()),
        },
    }
}

/// The previous committed version of `rel` (see the module docs).
fn git_previous(dir: &Path, rel: &str, current: &str) -> Result<Option<(String, String)>> {
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

/// A version to migrate from: `(label, source)`.
type Labelled = (String, String);

/// What the node's data directory holds for the project's sandbox.
struct NodeData {
    store: graft::store::Store,
    sandbox: String,
}

impl NodeData {
    /// The previous version by the node (see the module docs), as
    /// `(label, source)`, and every kept version by number.
    fn previous(
        &self,
        module: &str,
        current: &str,
    ) -> Result<(Option<Labelled>, BTreeMap<u32, String>)> {
        let kept: BTreeMap<u32, String> = self
            .store
            .versions(&self.sandbox, module)
            .map_err(|e| anyhow!("reading the node's kept versions of `{module}`: {e}"))?
            .into_iter()
            .map(|v| (v.version, v.source))
            .collect();
        let pointer = self
            .store
            .module(&self.sandbox, module)
            .map_err(|e| anyhow!("reading the node's module `{module}`: {e}"))?
            .and_then(|m| m.current)
            .or_else(|| kept.keys().next_back().copied());
        let Some(now) = pointer else {
            return Ok((None, kept));
        };
        let prev = kept
            .range(..=now)
            .rev()
            .find(|(_, src)| src.as_str() != current)
            .map(|(v, src)| (format!("node v{v}"), src.clone()));
        Ok((prev, kept))
    }
}

/// Opens `DIR/.graft/graft.db` read-only, if it exists.
fn open_node_data(dir: &Path, sandbox: &str, notes: &mut Vec<String>) -> Option<NodeData> {
    let db = dir.join(".graft").join(graft::DATABASE_FILE);
    if !db.exists() {
        return None;
    }
    match graft::store::Store::open_read_only(&db) {
        Ok(store) => Some(NodeData {
            store,
            sandbox: sandbox.to_string(),
        }),
        Err(e) => {
            notes.push(format!(
                "note: cannot read the node's data ({}): {e}; using git",
                db.display()
            ));
            None
        }
    }
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

/// Runs the module's sandbox for one purpose and destroys it.
struct Lab<'a> {
    node: &'a Node,
    spec: &'a SandboxSpec,
    module: &'a str,
    next: std::cell::Cell<usize>,
}

impl Lab<'_> {
    fn sandbox(&self, old: &str, app: bool) -> Result<graft::Sandbox> {
        let n = self.next.get();
        self.next.set(n + 1);
        let mut s = self.spec.clone().test_clock(true);
        s.id = format!("mig{n}-{}", self.spec.id);
        s.id.truncate(64);
        if !app {
            s.entry = None;
        }
        s.modules.insert(self.module.to_string(), old.to_string());
        graft::block_on(self.node.create_sandbox(s))
            .map_err(|e| anyhow!("the previous version does not load: {e}"))
    }

    /// States of the module's processes the app starts under `old`.
    fn app_states(&self, old: &str) -> Result<Vec<(String, Value)>> {
        let sb = self.sandbox(old, true)?;
        let out = (|| {
            if self.spec.entry.is_some() {
                wait("the app start", sb.wait_app_started())?;
            }
            let mut out = Vec::new();
            for p in wait("the process list", sb.processes())? {
                if p.module == self.module {
                    out.push((p.pid.to_string(), wait("a state", sb.state(&p.pid))?));
                }
            }
            Ok(out)
        })();
        let _ = self.node.destroy(sb.id());
        out
    }

    /// The state `init(entry_args)` builds under `old`.
    fn init_state(&self, old: &str) -> Result<Value> {
        let sb = self.sandbox(old, false)?;
        let out = (|| {
            let pid = wait(
                "init",
                sb.spawn(self.module, self.spec.entry_args.clone(), None),
            )?;
            wait("the state", sb.state(&pid))
        })();
        let _ = self.node.destroy(sb.id());
        out
    }

    /// Migrates `state` up from `old` to the working tree and back down.
    /// `Ok(None)`: it round-trips. The state compared is the one the
    /// process holds (after the JSON → Luau conversion), not the input.
    fn round_trip(&self, old: &str, state: &Value) -> Result<Option<Failure>> {
        let sb = self.sandbox(&wrap_init(old), false)?;
        let out = self.round_trip_in(&sb, state);
        let _ = self.node.destroy(sb.id());
        out
    }

    fn round_trip_in(&self, sb: &graft::Sandbox, state: &Value) -> Result<Option<Failure>> {
        let fail =
            |kind: Kind, detail: String, before: &Value, up: &Value| -> Result<Option<Failure>> {
                Ok(Some(Failure {
                    kind,
                    detail,
                    before: before.clone(),
                    up: up.clone(),
                    down: Value::Null,
                }))
            };
        let mut arg = Map::new();
        arg.insert(STATE_KEY.into(), state.clone());
        let pid = match wait("spawning", sb.spawn(self.module, Value::Object(arg), None)) {
            Ok(p) => p,
            Err(e) => return fail(Kind::Load, e.to_string(), state, &Value::Null),
        };
        let before = wait("a state", sb.state(&pid))?;
        let current = self
            .spec
            .modules
            .get(self.module)
            .cloned()
            .unwrap_or_default();
        let sources = std::iter::once((self.module.to_string(), current)).collect();
        if let Err(e) = wait(
            "the up migration",
            sb.reload(sources, ReloadOptions::default()),
        ) {
            return fail(Kind::Up, e.to_string(), &before, &Value::Null);
        }
        let up = wait("a migrated state", sb.state(&pid))?;
        if let Err(e) = wait(
            "the rollback",
            sb.rollback(self.module, 1, ReloadOptions::default()),
        ) {
            return fail(Kind::Down, e.to_string(), &before, &up);
        }
        let down = wait("a state after the rollback", sb.state(&pid))?;
        if down == before {
            return Ok(None);
        }
        let (kind, detail) = if json_type(&down) != json_type(&before) {
            (
                Kind::TypeChanged,
                format!(
                    "changed type ({} → {})",
                    json_type(&before),
                    json_type(&down)
                ),
            )
        } else {
            (Kind::RoundTrip, "does not round-trip".to_string())
        };
        Ok(Some(Failure {
            kind,
            detail,
            before,
            up,
            down,
        }))
    }
}

/// A small deterministic generator (SplitMix64): the same seed gives the
/// same states on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn random_scalar(rng: &mut Rng) -> Value {
    match rng.below(3) {
        0 => json!(rng.below(2001) as i64 - 1000),
        1 => Value::String(format!("s{}", rng.below(1000))),
        _ => Value::Bool(rng.below(2) == 0),
    }
}

/// Every node of `v`, as paths of keys/indices (pre-order, bounded).
fn paths(v: &Value, at: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    if out.len() >= 10_000 {
        return;
    }
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                at.push(PathStep::Key(k.clone()));
                paths(c, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                at.push(PathStep::Index(i));
                paths(c, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at_mut<'a>(v: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    let mut cur = v;
    for step in path {
        cur = match (step, cur) {
            (PathStep::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (PathStep::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// One random change somewhere in `v`.
fn perturb(v: &mut Value, rng: &mut Rng) {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = all.swap_remove(rng.below(all.len()));
    let Some(node) = at_mut(v, &path) else {
        return;
    };
    match node {
        Value::Number(n) => {
            let delta = rng.below(201) as i64 - 100;
            *node = match n.as_i64() {
                Some(i) if rng.below(4) == 0 => json!(-i),
                Some(i) => json!(i.saturating_add(if delta == 0 { 1 } else { delta })),
                None => json!(n.as_f64().unwrap_or(0.0) + delta as f64 / 7.0),
            };
        }
        Value::String(s) => {
            *node = match rng.below(3) {
                0 => Value::String(String::new()),
                1 => Value::String(format!("{s}{}", rng.below(100))),
                _ => Value::String(s.chars().rev().collect()),
            };
        }
        Value::Bool(b) => *node = Value::Bool(!*b),
        Value::Null => *node = random_scalar(rng),
        Value::Object(m) => {
            if !m.is_empty() && rng.below(2) == 0 {
                let k = m
                    .keys()
                    .nth(rng.below(m.len()))
                    .cloned()
                    .unwrap_or_default();
                m.remove(&k);
            } else {
                m.insert(format!("x_{}", rng.below(1000)), random_scalar(rng));
            }
        }
        Value::Array(a) => match rng.below(3) {
            0 if !a.is_empty() => {
                a.pop();
            }
            1 if !a.is_empty() => {
                let i = rng.below(a.len());
                let copy = a[i].clone();
                a.push(copy);
            }
            _ => {
                let s = a.first().cloned().unwrap_or_else(|| random_scalar(rng));
                a.push(s);
            }
        },
    }
}

/// Candidates one shrink round considers at most.
const MAX_CANDIDATES: usize = 200;
/// JSON bytes the candidates of one round may hold together: each is a
/// whole copy of the state, so a large state gets fewer of them.
const CANDIDATE_BYTES: usize = 64 << 20;

/// States one step smaller than `v`: a half of a table or array kept, a
/// field or element dropped, a number or string made smaller. At most
/// [`MAX_CANDIDATES`] (fewer for a large state), halves first: without
/// the bound a failing state of 10,000 elements made 10,000 copies of
/// itself (10^8 values) before the first migration ran.
fn smaller(v: &Value) -> Vec<Value> {
    let room = (CANDIDATE_BYTES / v.to_string().len().max(1)).clamp(4, MAX_CANDIDATES);
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let mut out = Vec::new();
    for path in all {
        if out.len() >= room {
            break;
        }
        let Some(node) = at(v, &path) else {
            continue;
        };
        for e in edits(node, room - out.len()) {
            let mut c = v.clone();
            if let Some(slot) = at_mut(&mut c, &path) {
                *slot = e;
                out.push(c);
            }
        }
    }
    out
}

fn at<'a>(v: &'a Value, path: &[PathStep]) -> Option<&'a Value> {
    let mut cur = v;
    for step in path {
        cur = match (step, cur) {
            (PathStep::Key(k), Value::Object(m)) => m.get(k)?,
            (PathStep::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// At most `room` smaller replacements for one node of a state.
fn edits(node: &Value, room: usize) -> Vec<Value> {
    let mut edits: Vec<Value> = Vec::new();
    match node {
        Value::Object(m) => {
            if m.len() > 3 {
                let half = m.len() / 2;
                let part = |skip: usize, take: usize| -> Value {
                    Value::Object(
                        m.iter()
                            .skip(skip)
                            .take(take)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    )
                };
                edits.push(part(0, half));
                edits.push(part(half, m.len()));
            }
            for k in m.keys() {
                if edits.len() >= room {
                    break;
                }
                let mut c = m.clone();
                c.remove(k);
                edits.push(Value::Object(c));
            }
        }
        Value::Array(a) => {
            if a.len() > 3 {
                let half = a.len() / 2;
                edits.push(Value::Array(a[..half].to_vec()));
                edits.push(Value::Array(a[half..].to_vec()));
            }
            for i in (0..a.len()).rev() {
                if edits.len() >= room {
                    break;
                }
                let mut c = a.clone();
                c.remove(i);
                edits.push(Value::Array(c));
            }
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if i != 0 {
                    edits.push(json!(0));
                    edits.push(json!(i / 2));
                }
            } else if n.as_f64().is_some_and(|f| f != f.trunc()) {
                edits.push(json!(n.as_f64().unwrap_or(0.0).trunc()));
            }
        }
        Value::String(s) if !s.is_empty() => {
            edits.push(Value::String(String::new()));
            let half: String = s.chars().take(s.chars().count() / 2).collect();
            edits.push(Value::String(half));
        }
        _ => {}
    }
    edits.truncate(room);
    edits
}

/// How big a state is, for shrinking: its JSON length, then the sum of its
/// numbers' magnitudes (so `{"n":0}` is smaller than `{"n":5}`).
fn size(v: &Value) -> (usize, u64) {
    fn magnitude(v: &Value) -> u64 {
        match v {
            Value::Number(n) => n.as_f64().map_or(0, |f| f.abs().min(1e18) as u64),
            Value::Array(a) => a.iter().map(magnitude).fold(0, u64::saturating_add),
            Value::Object(m) => m.values().map(magnitude).fold(0, u64::saturating_add),
            _ => 0,
        }
    }
    (v.to_string().len(), magnitude(v))
}

/// Greedy shrinking: the smallest state found that fails the same way.
fn shrink(lab: &Lab<'_>, old: &str, first: Failure) -> Result<(Failure, usize)> {
    let mut best = first;
    let mut runs = 0;
    'outer: loop {
        let mut candidates = smaller(&best.before);
        candidates.sort_by_key(size);
        for c in candidates {
            if runs >= MAX_SHRINK_RUNS {
                break 'outer;
            }
            if size(&c) >= size(&best.before) {
                continue;
            }
            runs += 1;
            if let Some(f) = lab.round_trip(old, &c)? {
                if f.kind == best.kind && size(&f.before) < size(&best.before) {
                    best = f;
                    continue 'outer;
                }
            }
        }
        break;
    }
    Ok((best, runs))
}

/// What the module check is given.
struct Sources<'a> {
    /// `(label, source)` of the previous version.
    previous: (String, String),
    /// Kept versions by the node, for checkpoints of other versions.
    kept: BTreeMap<u32, String>,
    node: Option<&'a NodeData>,
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
            if *old == current {
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
            finding.lines.push(format!(
                "{skipped} checkpoint{} already of the working version (or of a version no longer kept): not migrated",
                if skipped == 1 { " is" } else { "s are" }
            ));
        }
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
    if node_data.is_none() {
        if let Some(why) = no_git_history(dir) {
            // Otherwise "0 modules checked" reads as "all is well".
            notes.push(format!(
                "note: no previous version to compare with: no node data ({}) and {why}; nothing was checked",
                dir.join(".graft").join(graft::DATABASE_FILE).display()
            ));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_change_is_compared_by_tokens_not_text() {
        let a = "local m = {}\nfunction m.code_change(o, s) return s end\nreturn m\n";
        let b = "local m = {}\n-- a comment\nfunction m.code_change(o, s)\n  return s -- same\nend\nfunction m.other() end\nreturn m\n";
        let c = "local m = {}\nfunction m.code_change(o, s) s.n = 1 return s end\nreturn m\n";
        let d = "local m = {}\nm.code_change = function(o, s) return s end\nreturn m\n";
        let e =
            "return { init = function() return 1 end, code_change = function(o, s) return s end }";
        assert!(code_change_tokens(a).is_some());
        assert_eq!(code_change_tokens(a), code_change_tokens(b));
        assert_ne!(code_change_tokens(a), code_change_tokens(c));
        assert!(code_change_tokens(d).is_some());
        assert!(code_change_tokens(e).is_some());
        assert_eq!(code_change_tokens("return {}"), None);
        // Unparseable: compared as raw text, never a panic.
        assert_eq!(
            code_change_tokens("function ("),
            Some(vec!["function (".to_string()])
        );
    }

    #[test]
    fn perturbations_are_deterministic_and_change_the_state() {
        let base = json!({ "n": 3, "items": ["a", "b"], "name": "x", "on": true });
        let run = |seed| {
            let mut rng = Rng(seed);
            (0..20)
                .map(|_| {
                    let mut s = base.clone();
                    perturb(&mut s, &mut rng);
                    s
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().any(|s| s != &base));
    }

    #[test]
    fn smaller_states_are_smaller() {
        let v = json!({ "n": 10, "items": ["ab", "c"] });
        let all = smaller(&v);
        assert!(!all.is_empty());
        assert!(all.iter().all(|c| size(c) < size(&v)), "{all:?}");
        assert!(all.contains(&json!({ "items": ["ab", "c"] })));
        assert!(all.contains(&json!({ "n": 5, "items": ["ab", "c"] })));
        assert!(all.contains(&json!({ "n": 10, "items": ["c"] })));
        assert!(smaller(&json!({})).is_empty());
    }

    #[test]
    fn shrinking_a_large_state_stays_bounded() {
        // 3,000 elements: unbounded, one round made 6,000+ full copies.
        let big = Value::Array((0..3000).map(|i| json!({ "n": i })).collect());
        let all = smaller(&big);
        assert!(!all.is_empty());
        assert!(all.len() <= MAX_CANDIDATES, "{} candidates", all.len());
        assert!(all.iter().all(|c| size(c) < size(&big)));
        // Halves come first, so a shrink needs log2(n) steps, not n.
        assert!(all.contains(&Value::Array(big.as_array().unwrap()[..1500].to_vec())));
        let wide = Value::Object((0..3000).map(|i| (format!("k{i}"), json!(i))).collect());
        assert!(smaller(&wide).len() <= MAX_CANDIDATES);
    }
}
