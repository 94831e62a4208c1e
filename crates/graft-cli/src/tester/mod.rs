//! `graft test [DIR]`: runs every `test/**/*_test.luau` of a project
//! (SPEC §11). The guide is docs/testing.md.
//!
//! A test file returns a table of named test functions. Each test gets:
//! * a fresh sandbox built from the project exactly as `graft run` builds
//!   it (the same [`crate::check::load`]: `graft.toml` limits, capabilities,
//!   entry module and its app, prelude, supervision), whose timers run on
//!   a test clock ([`graft::SandboxSpec::test_clock`]);
//! * a fresh driver VM running the test file, with the test library as the
//!   function's argument ([`library`]).
//!
//! Invariants:
//! * A test never outlives its time limit (`--timeout-ms`, real time): its
//!   driver's interrupt raises and every wait on its sandbox is bounded;
//!   the sandbox is destroyed whatever happened. A driver's heap is
//!   bounded by the sandbox's `memory_bytes`.
//! * One test's failure, timeout, memory blow-up or crash never stops the
//!   run: every selected test gets exactly one [`Outcome`].
//! * Discovery is bounded: at most [`MAX_FILES`] files, [`MAX_DEPTH`]
//!   directory levels, [`MAX_TESTS`] tests in all; files are read up to
//!   the sandbox's `max_source_bytes`.

pub mod library;
pub mod migrations;
pub mod report;
pub mod values;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use graft::{Node, NodeLimits, SandboxSpec};
use mlua::chunk::ChunkMode;
use mlua::{Lua, Table, Value};

use crate::check::{self, Checked};
use crate::{render, Reported};
use report::{Kind, Outcome};

/// Test files discovered at most.
pub const MAX_FILES: usize = 10_000;
/// Directory levels under `test/` searched.
pub const MAX_DEPTH: usize = 16;
/// Tests run at most (all files together).
pub const MAX_TESTS: usize = 100_000;
/// How long reading a sandbox's coverage may take.
const COVERAGE_WAIT: Duration = Duration::from_secs(5);
/// A test's default time limit (`--timeout-ms`).
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// What `graft test` was asked.
pub struct Options {
    /// The project directory.
    pub dir: PathBuf,
    /// Run only tests whose `file::name` contains this.
    pub filter: Option<String>,
    /// Write JUnit XML here.
    pub junit: Option<PathBuf>,
    /// Print the JSON report instead of lines.
    pub json: bool,
    /// Each test's time limit.
    pub timeout: Duration,
    /// Tests run at once (default: the number of cores).
    pub jobs: usize,
    /// Collect statement coverage of the project's modules.
    pub coverage: bool,
}

/// Line hits per module, summed over every test's sandbox; only the
/// project's own sources count (versions a test reloaded are other text).
#[derive(Default)]
pub struct Coverage {
    /// Module → line → hits.
    pub modules: BTreeMap<String, BTreeMap<u32, u64>>,
}

impl Coverage {
    fn add(&mut self, spec: &SandboxSpec, found: Vec<graft::ModuleCoverage>) {
        for m in found {
            let Some(source) = spec.modules.get(&m.module) else {
                continue;
            };
            if graft::upgrade::checksum(source) != m.checksum {
                continue;
            }
            let lines = self.modules.entry(m.module).or_default();
            for (line, hits) in m.lines {
                *lines.entry(line).or_insert(0) += hits;
            }
        }
    }
}

/// One test to run.
#[derive(Clone)]
struct Case {
    file: String,
    name: String,
    /// The key's bytes as the file wrote them: a name that is not UTF-8
    /// is shown lossily but looked up exactly.
    key: Vec<u8>,
    /// The file compiled once, here (see [`compile`]).
    bytecode: Arc<Vec<u8>>,
}

/// `graft test`: runs the tests, prints, writes `--junit`; `Err(Reported)`
/// (exit 1) when any test failed.
pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let jobs = opts.jobs.max(1);
    if opts.coverage {
        // Before any module is compiled: every sandbox of this run counts.
        graft::vm::enable_coverage();
    }
    // A report path that cannot be written is refused before the run, not
    // after minutes of tests.
    let junit = match &opts.junit {
        Some(p) => Some(report::output_path(p, "--junit")?),
        None => None,
    };
    let coverage = opts.coverage.then(|| Mutex::new(Coverage::default()));
    let node = Node::with_limits(jobs, NodeLimits::default());
    let spec = match check::load(&opts.dir, &node)? {
        Checked::Ok(spec) => spec,
        Checked::Failed { error, files } => {
            eprint!("{}", render::error(&error, &|m| files.get(m).cloned()));
            eprintln!(
                "error: the project does not load, so no test ran; `graft check` shows the same"
            );
            return Err(Reported.into());
        }
    };
    let (cases, mut outcomes) = discover(&opts.dir, &spec, opts.timeout)?;
    let cases: Vec<Case> = match &opts.filter {
        Some(f) => cases
            .into_iter()
            .filter(|c| format!("{}::{}", c.file, c.name).contains(f.as_str()))
            .collect(),
        None => cases,
    };
    outcomes.retain(|o| {
        opts.filter
            .as_ref()
            .is_none_or(|f| o.id().contains(f.as_str()))
    });
    if !opts.json {
        let n = cases.len() + outcomes.len();
        println!("running {n} test{}", if n == 1 { "" } else { "s" });
        for o in &outcomes {
            println!("{}", report::line(o));
        }
    }
    let run = Run {
        node: &node,
        spec: &spec,
        root: &opts.dir,
        timeout: opts.timeout,
        coverage: coverage.as_ref(),
    };
    let results = run_all(&run, cases, jobs, |o| {
        if !opts.json {
            println!("{}", report::line(o));
        }
    });
    outcomes.extend(results);
    let elapsed = started.elapsed();
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed()).collect();
    let coverage = coverage.map(|c| c.into_inner().unwrap_or_else(|e| e.into_inner()));
    let files: BTreeMap<String, String> = spec
        .files
        .iter()
        .map(|(m, p)| (m.clone(), shown_file(&opts.dir, p)))
        .collect();
    if opts.json {
        let mut doc = report::json_report(&outcomes, elapsed);
        if let Some(c) = &coverage {
            doc["coverage"] = report::coverage_json(&c.modules, &files);
        }
        println!("{}", render::json(&doc, true));
    } else {
        if !failures.is_empty() {
            println!("\nfailures:\n");
            for o in &failures {
                println!(
                    "---- {} ----",
                    render::escape(&o.id(), render::Lines::Escape)
                );
                println!("{}", report::failure_block(o));
            }
        }
        if let Some(c) = &coverage {
            print!("{}", report::coverage_table(&c.modules, &files));
        }
        println!("{}", report::summary(&outcomes, elapsed));
    }
    if let Some(path) = &junit {
        report::write_atomically(path, &report::junit(&outcomes, elapsed))
            .map_err(|e| anyhow!("cannot write the JUnit report {}: {e}", path.display()))?;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Reported.into())
    }
}

/// Every `*_test.luau` under `dir/test`, sorted, at most [`MAX_FILES`].
fn test_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let root = dir.join("test");
    if !root.is_dir() {
        return Ok(out);
    }
    let mut stack = vec![(root, 0usize)];
    while let Some((d, depth)) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| anyhow!("cannot read {}: {e}", d.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| anyhow!("cannot read {}: {e}", d.display()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
            if kind.is_dir() && depth + 1 < MAX_DEPTH {
                stack.push((path, depth + 1));
            } else if kind.is_file()
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("_test.luau"))
            {
                if out.len() >= MAX_FILES {
                    return Err(anyhow!(
                        "more than {MAX_FILES} test files under {}",
                        dir.join("test").display()
                    ));
                }
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The file as tests name it: relative to the project, `/`-separated.
fn shown_file(dir: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(dir).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// The tests of every file, and a failed [`Outcome`] for each file that
/// does not load or holds something other than test functions.
fn discover(
    dir: &Path,
    spec: &SandboxSpec,
    timeout: Duration,
) -> Result<(Vec<Case>, Vec<Outcome>)> {
    let mut cases = Vec::new();
    let mut problems = Vec::new();
    for path in test_files(dir)? {
        let file = shown_file(dir, &path);
        let source = match read_bounded(&path, spec.limits.max_source_bytes) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                problems.push(Outcome::failed(&file, "<load>", Kind::Load, e));
                continue;
            }
        };
        let bytecode = match compile(&file, &source) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                let o = classify(&file, "<load>", &e, &AtomicBool::new(false), Kind::Load);
                problems.push(o);
                continue;
            }
        };
        match test_names(&file, &bytecode, spec, timeout) {
            Ok((names, bad)) => {
                for (name, why) in bad {
                    problems.push(Outcome::failed(&file, &name, Kind::Load, why));
                }
                for (name, key) in names {
                    if cases.len() >= MAX_TESTS {
                        return Err(anyhow!(
                            "more than {MAX_TESTS} tests; split the suite or use --filter"
                        ));
                    }
                    cases.push(Case {
                        file: file.clone(),
                        name,
                        key,
                        bytecode: bytecode.clone(),
                    });
                }
            }
            Err(o) => problems.push(*o),
        }
    }
    Ok((cases, problems))
}

fn read_bounded(path: &Path, max: usize) -> std::result::Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > max as u64 {
        return Err(format!(
            "{} is larger than max_source_bytes ({max} bytes)",
            path.display()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Loads a test file into a driver VM and returns the table it returns.
/// Compiles a test file once for all its tests (a file of 1,000 tests
/// would otherwise be compiled 1,000 times). The bytecode is this
/// process's own, made from the file's text just now.
fn compile(file: &str, source: &str) -> mlua::Result<Vec<u8>> {
    mlua::chunk::Compiler::new()
        .set_debug_level(1)
        .compile(source)
        .map_err(|e| match e {
            // Luau names the chunk `[string "..."]`; say which file.
            mlua::Error::SyntaxError { message, .. } => mlua::Error::runtime(format!(
                "syntax error: {file}:{}",
                message
                    .split_once("]:")
                    .map_or(message.as_str(), |(_, rest)| rest)
            )),
            other => other,
        })
}

fn load_file(lua: &Lua, file: &str, bytecode: &[u8]) -> mlua::Result<Value> {
    lua.load(bytecode)
        .set_name(format!("@{file}"))
        .set_mode(ChunkMode::Binary)
        .eval::<Value>()
}

/// The test names of a file, sorted, and the entries that are not tests.
#[allow(clippy::type_complexity)]
fn test_names(
    file: &str,
    bytecode: &[u8],
    spec: &SandboxSpec,
    timeout: Duration,
) -> std::result::Result<(Vec<(String, Vec<u8>)>, Vec<(String, String)>), Box<Outcome>> {
    let flag = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + timeout;
    let lua = library::driver_vm(spec.limits.memory_bytes, deadline, flag.clone())
        .map_err(|e| Box::new(Outcome::failed(file, "<load>", Kind::Error, e.to_string())))?;
    let value = load_file(&lua, file, bytecode)
        .map_err(|e| Box::new(classify(file, "<load>", &e, &flag, Kind::Load)))?;
    let Value::Table(table) = value else {
        return Err(Box::new(Outcome::failed(
            file,
            "<load>",
            Kind::Load,
            format!(
                "a test file returns a table of test functions, but this one returned {}",
                values::show(&value)
            ),
        )));
    };
    let mut names = Vec::new();
    let mut bad = Vec::new();
    for pair in table.pairs::<Value, Value>() {
        let (k, v) =
            pair.map_err(|e| Box::new(Outcome::failed(file, "<load>", Kind::Load, e.to_string())))?;
        let (name, key) = match &k {
            Value::String(s) => (s.to_string_lossy(), s.as_bytes().to_vec()),
            other => {
                bad.push((
                    format!("[{}]", values::show(other)),
                    "test names must be strings (`name = function(t) … end`)".to_string(),
                ));
                continue;
            }
        };
        if !matches!(v, Value::Function(_)) {
            bad.push((name, format!("is {}, not a test function", a_type(&v))));
            continue;
        }
        if names.len() >= MAX_TESTS {
            return Err(Box::new(Outcome::failed(
                file,
                "<load>",
                Kind::Load,
                format!("more than {MAX_TESTS} tests in one file"),
            )));
        }
        names.push((name, key));
    }
    names.sort();
    bad.sort();
    Ok((names, bad))
}

/// `a number`, `an integer`, `a table`…
fn a_type(v: &Value) -> String {
    let t = v.type_name();
    if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {t}")
    } else {
        format!("a {t}")
    }
}

/// What every test of a run shares.
struct Run<'a> {
    node: &'a Node,
    spec: &'a SandboxSpec,
    root: &'a Path,
    timeout: Duration,
    coverage: Option<&'a Mutex<Coverage>>,
}

/// Runs `cases` on `jobs` threads; `on_done` sees each outcome as it
/// arrives; the outcomes come back in the cases' order.
fn run_all(
    run: &Run<'_>,
    cases: Vec<Case>,
    jobs: usize,
    mut on_done: impl FnMut(&Outcome),
) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let total = cases.len();
    let mut results: Vec<Option<Outcome>> = vec![None; total];
    let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
    std::thread::scope(|s| {
        for _ in 0..jobs.min(total.max(1)) {
            let tx = tx.clone();
            let (next, cases) = (&next, &cases);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_one(run, case, i)
                }))
                .unwrap_or_else(|p| {
                    let why = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Outcome::failed(
                        &case.file,
                        &case.name,
                        Kind::Error,
                        format!("internal error in the test runner: {why}"),
                    )
                });
                if tx.send((i, outcome)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (i, o) in rx {
            on_done(&o);
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(o);
            }
        }
    });
    results
        .into_iter()
        .zip(cases)
        .map(|(r, c)| {
            r.unwrap_or_else(|| {
                Outcome::failed(
                    &c.file,
                    &c.name,
                    Kind::Error,
                    "the test did not report".into(),
                )
            })
        })
        .collect()
}

/// A sandbox id unique on the runner's node.
fn sandbox_id(i: usize, project: &str) -> String {
    let mut s = format!("t{i}-{project}");
    s.truncate(64);
    s
}

/// One test in its own sandbox and driver VM.
fn run_one(run: &Run<'_>, case: &Case, i: usize) -> Outcome {
    let (node, spec, root) = (run.node, run.spec, run.root);
    let started = Instant::now();
    let deadline = started + run.timeout;
    let mut sandbox_spec = spec.clone().test_clock(true);
    sandbox_spec.id = sandbox_id(i, &spec.id);
    let mut outcome = match graft::block_on(node.create_sandbox(sandbox_spec)) {
        Ok(sb) => {
            let o = drive(spec, root, case, &sb, deadline);
            if let Some(c) = run.coverage {
                // Read before the VM goes; a sandbox that no longer answers
                // (it failed) adds nothing.
                let found = graft::block_on(graft::with_timeout(sb.coverage(), COVERAGE_WAIT));
                if let Some(Ok(found)) = found {
                    c.lock().unwrap_or_else(|e| e.into_inner()).add(spec, found);
                }
            }
            let _ = node.destroy(sb.id());
            o
        }
        Err(e) => Outcome::failed(
            &case.file,
            &case.name,
            Kind::Error,
            format!("the sandbox did not start: {e}"),
        ),
    };
    outcome.duration = started.elapsed();
    outcome
}

/// Waits for the app, then runs the test function with the library.
fn drive(
    spec: &SandboxSpec,
    root: &Path,
    case: &Case,
    sb: &graft::Sandbox,
    deadline: Instant,
) -> Outcome {
    let fail = |kind: Kind, message: String| Outcome::failed(&case.file, &case.name, kind, message);
    if spec.entry.is_some() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match graft::block_on(graft::with_timeout(sb.wait_app_started(), remaining)) {
            None => {
                return fail(
                    Kind::Timeout,
                    format!(
                        "{} (waiting for the app to start)",
                        library::TIMEOUT_MESSAGE
                    ),
                )
            }
            Some(Err(e)) => return fail(Kind::Error, format!("the app did not start: {e}")),
            Some(Ok(_)) => {}
        }
    }
    let flag = Arc::new(AtomicBool::new(false));
    let lua = match library::driver_vm(spec.limits.memory_bytes, deadline, flag.clone()) {
        Ok(l) => l,
        Err(e) => return fail(Kind::Error, e.to_string()),
    };
    let cx = library::Context {
        sandbox: sb.clone(),
        deadline,
        root: root.to_path_buf(),
        timed_out: flag.clone(),
    };
    let result = (|| -> mlua::Result<()> {
        let t = library::install(&lua, cx)?;
        let table: Table = match load_file(&lua, &case.file, &case.bytecode)? {
            Value::Table(t) => t,
            other => {
                return Err(mlua::Error::runtime(format!(
                    "the test file returned {} this time",
                    other.type_name()
                )))
            }
        };
        let f: mlua::Function = table.get(lua.create_string(&case.key)?)?;
        f.call::<()>(t)
    })();
    match result {
        Ok(()) => fail(Kind::Passed, String::new()),
        Err(e) => classify(&case.file, &case.name, &e, &flag, Kind::Error),
    }
}

/// An error of a test (or of loading its file) as an [`Outcome`]:
/// assertion, out of memory, timeout, else `otherwise`.
fn classify(
    file: &str,
    name: &str,
    e: &mlua::Error,
    timed_out: &AtomicBool,
    otherwise: Kind,
) -> Outcome {
    if let Some(a) = library::assertion_of(e) {
        return Outcome {
            location: a.location.clone(),
            expected: a.expected.clone(),
            actual: a.actual.clone(),
            diff: a.diff.clone(),
            ..Outcome::failed(file, name, Kind::Assertion, a.message.clone())
        };
    }
    let text = library::error_text(e);
    let kind = if has_memory_error(e) {
        Kind::OutOfMemory
    } else if timed_out.load(Ordering::Relaxed) {
        Kind::Timeout
    } else {
        otherwise
    };
    let message = text
        .split("\nstack traceback:")
        .next()
        .unwrap_or(&text)
        .trim_end()
        .to_string();
    let message = match kind {
        Kind::OutOfMemory if !message.starts_with("out_of_memory") => {
            format!("out_of_memory: {message}")
        }
        // Luau's answer when the message handler itself fails: the value
        // raised has a `__tostring` that loops, raises or returns no string.
        _ if message == "error in error handling" => format!(
            "{message}: the value raised could not be turned into text (its `__tostring` loops, raises or returns a non-string)"
        ),
        _ => message,
    };
    Outcome {
        location: location_in(file, &e.to_string()),
        ..Outcome::failed(file, name, kind, message)
    }
}

fn has_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            has_memory_error(cause)
        }
        _ => false,
    }
}

/// The first `file:LINE` in an error's text (its message or traceback).
fn location_in(file: &str, text: &str) -> Option<String> {
    let needle = format!("{file}:");
    let mut rest = text;
    while let Some(at) = rest.find(&needle) {
        let after = &rest[at + needle.len()..];
        let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !digits.is_empty() {
            return Some(format!("{file}:{digits}"));
        }
        rest = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_come_from_the_test_file_only() {
        assert_eq!(
            location_in(
                "test/a_test.luau",
                "test/a_test.luau:12: boom\nstack traceback:\n"
            ),
            Some("test/a_test.luau:12".into())
        );
        assert_eq!(location_in("test/a_test.luau", "src/x.luau:3: no"), None);
        assert_eq!(
            location_in(
                "test/a_test.luau",
                "test/a_test.luau: x; test/a_test.luau:7: y"
            ),
            Some("test/a_test.luau:7".into())
        );
    }

    #[test]
    fn sandbox_ids_stay_valid() {
        let id = sandbox_id(123_456, &"p".repeat(64));
        assert!(id.len() <= 64);
        graft::config::validate_sandbox_id(&id).unwrap();
    }
}
