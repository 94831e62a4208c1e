//! What `graft test` prints and writes: cargo-test-like lines, JUnit XML
//! and JSON. Guest text (messages, values, names) is escaped for the
//! terminal by [`crate::render`] and for XML here.
//!
//! Invariants: every message and name an [`Outcome`] holds is bounded
//! ([`MAX_MESSAGE`], [`MAX_NAME`]); a message's later lines are indented on
//! the terminal, so guest text never prints a line of the runner's own
//! shape; the JUnit file is written whole or not at all
//! ([`write_atomically`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::render::{self, Lines};

/// How a test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// It returned.
    Passed,
    /// An assertion of the test library did not hold.
    Assertion,
    /// It raised an error (or a sandbox operation failed).
    Error,
    /// It ran past its time limit.
    Timeout,
    /// It ran out of memory (the driver's limit is the sandbox's `memory_bytes`).
    OutOfMemory,
    /// Its file did not load or was not a table of test functions.
    Load,
}

impl Kind {
    /// The name used in JSON and JUnit.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Passed => "passed",
            Kind::Assertion => "assertion",
            Kind::Error => "error",
            Kind::Timeout => "timeout",
            Kind::OutOfMemory => "out_of_memory",
            Kind::Load => "load",
        }
    }
}

/// One test's result.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The test file, relative to the project (`test/counter_test.luau`).
    pub file: String,
    /// The test's key in the file's table (`<load>` for a file that did not load).
    pub name: String,
    /// How it ended.
    pub kind: Kind,
    /// Why it failed (empty when it passed).
    pub message: String,
    /// `file:line` of the failure, when known.
    pub location: Option<String>,
    /// Shown expected value (assertions).
    pub expected: Option<String>,
    /// Shown actual value (assertions).
    pub actual: Option<String>,
    /// Table differences (`deep_eq`).
    pub diff: Vec<String>,
    /// Wall time, sandbox creation included.
    pub duration: Duration,
}

/// Bytes of a failure message kept (a test may raise a 5 MB string; every
/// report would repeat it).
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Bytes of a test name kept (names can be built at run time).
pub const MAX_NAME: usize = 512;

/// `s` cut to at most `max` bytes on a character boundary, saying so.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} … ({} more bytes)", &s[..cut], s.len() - cut)
}

impl Outcome {
    /// A failure with only a message (message and name bounded by
    /// [`MAX_MESSAGE`] and [`MAX_NAME`]).
    pub fn failed(file: &str, name: &str, kind: Kind, message: String) -> Outcome {
        Outcome {
            file: file.into(),
            name: clip(name, MAX_NAME),
            kind,
            message: if message.len() > MAX_MESSAGE {
                clip(&message, MAX_MESSAGE)
            } else {
                message
            },
            location: None,
            expected: None,
            actual: None,
            diff: Vec::new(),
            duration: Duration::ZERO,
        }
    }

    /// Whether the test passed.
    pub fn passed(&self) -> bool {
        self.kind == Kind::Passed
    }

    /// `file::name`, the id `--filter` matches.
    pub fn id(&self) -> String {
        format!("{}::{}", self.file, self.name)
    }
}

/// `test test/a_test.luau::name ... ok`.
pub fn line(o: &Outcome) -> String {
    let status = if o.passed() {
        "ok".to_string()
    } else {
        format!("FAILED ({})", o.kind.name())
    };
    format!(
        "test {} ... {status}",
        render::escape(&o.id(), Lines::Escape)
    )
}

/// The block shown for one failure: the frame line first
/// (`test/a_test.luau:12: name: eq`), then expected, actual and the diff.
pub fn failure_block(o: &Outcome) -> String {
    let mut out = String::new();
    let at = o.location.clone().unwrap_or_else(|| o.file.clone());
    // A message's later lines are indented: guest text must not be able
    // to print a line that reads as the runner's own (`test x ... ok`,
    // `test result: ok. …`).
    let message = render::escape(&o.message, Lines::Keep).replace('\n', "\n    ");
    let _ = writeln!(
        out,
        "{}: {}: {message}",
        render::escape(&at, Lines::Escape),
        render::escape(&o.name, Lines::Escape),
    );
    if let Some(e) = &o.expected {
        let _ = writeln!(out, "  expected: {}", render::escape(e, Lines::Escape));
    }
    if let Some(a) = &o.actual {
        let _ = writeln!(out, "    actual: {}", render::escape(a, Lines::Escape));
    }
    if !o.diff.is_empty() {
        let _ = writeln!(out, "      diff:");
        for d in &o.diff {
            let _ = writeln!(out, "        {}", render::escape(d, Lines::Escape));
        }
    }
    out
}

/// `test result: ok. 10 passed, 0 failed; finished in 0.05s`.
pub fn summary(outcomes: &[Outcome], elapsed: Duration) -> String {
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    let passed = outcomes.len() - failed;
    format!(
        "test result: {}. {passed} passed, {failed} failed; finished in {:.2}s",
        if failed == 0 { "ok" } else { "FAILED" },
        elapsed.as_secs_f64()
    )
}

/// The JSON document of `--json`.
pub fn json_report(outcomes: &[Outcome], elapsed: Duration) -> Value {
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    let tests: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            json!({
                "file": o.file,
                "name": o.name,
                "status": if o.passed() { "passed" } else { "failed" },
                "kind": o.kind.name(),
                "message": o.message,
                "location": o.location,
                "expected": o.expected,
                "actual": o.actual,
                "diff": o.diff,
                "duration_ms": o.duration.as_secs_f64() * 1000.0,
            })
        })
        .collect();
    json!({
        "passed": outcomes.len() - failed,
        "failed": failed,
        "duration_ms": elapsed.as_secs_f64() * 1000.0,
        "tests": tests,
    })
}

/// `(statement lines, lines run)` of one module's hits.
fn covered(lines: &BTreeMap<u32, u64>) -> (usize, usize) {
    (lines.len(), lines.values().filter(|h| **h > 0).count())
}

/// The share of statement lines run; `None` when no line was measured
/// (no test ran, or none built a sandbox): every module has at least its
/// `return`, so zero lines means "unknown", never "all covered".
fn percent(total: usize, run: usize) -> Option<f64> {
    (total > 0).then(|| run as f64 * 100.0 / total as f64)
}

/// The `--coverage` table: per module, its file, statement lines run of
/// all, and the percentage.
pub fn coverage_table(
    modules: &BTreeMap<String, BTreeMap<u32, u64>>,
    files: &BTreeMap<String, String>,
) -> String {
    let mut out = String::from("\ncoverage (lines with a statement, run by at least one test):\n");
    let width = files.values().map(|f| f.chars().count()).max().unwrap_or(0);
    for (module, file) in files {
        let (total, run) = modules.get(module).map(covered).unwrap_or((0, 0));
        let shown = match percent(total, run) {
            Some(p) => format!("{p:>5.1}%"),
            None => "not measured".to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<width$}  {run:>5}/{total:<5}  {shown}",
            render::escape(file, Lines::Escape),
        );
    }
    out.push('\n');
    out
}

/// The `coverage` member of the `--json` report.
pub fn coverage_json(
    modules: &BTreeMap<String, BTreeMap<u32, u64>>,
    files: &BTreeMap<String, String>,
) -> Value {
    let list: Vec<Value> = files
        .iter()
        .map(|(module, file)| {
            let lines = modules.get(module).cloned().unwrap_or_default();
            let (total, run) = covered(&lines);
            let missed: Vec<u32> = lines
                .iter()
                .filter(|(_, h)| **h == 0)
                .map(|(l, _)| *l)
                .collect();
            json!({
                "module": module,
                "file": file,
                "lines": total,
                "covered": run,
                "percent": percent(total, run),
                "missed": missed,
                "hits": lines,
            })
        })
        .collect();
    Value::Array(list)
}

/// Text for XML 1.0: markup escaped; characters XML cannot hold at all
/// (C0 controls but tab and newlines, U+FFFE, U+FFFF) written as `\u{..}`.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one `<testsuite>` per test file, failures with their type
/// (the [`Kind`] name), message and the failure block as text.
pub fn junit(outcomes: &[Outcome], elapsed: Duration) -> String {
    let mut files: Vec<&str> = outcomes.iter().map(|o| o.file.as_str()).collect();
    files.dedup();
    files.sort_unstable();
    files.dedup();
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"graft test\" tests=\"{}\" failures=\"{failed}\" time=\"{:.3}\">",
        outcomes.len(),
        elapsed.as_secs_f64()
    );
    for file in files {
        let cases: Vec<&Outcome> = outcomes.iter().filter(|o| o.file == file).collect();
        let fails = cases.iter().filter(|o| !o.passed()).count();
        let time: f64 = cases.iter().map(|o| o.duration.as_secs_f64()).sum();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{fails}\" time=\"{time:.3}\">",
            xml_escape(file),
            cases.len()
        );
        for o in cases {
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(file),
                xml_escape(&o.name),
                o.duration.as_secs_f64()
            );
            if o.passed() {
                out.push_str("/>\n");
            } else {
                let _ = writeln!(
                    out,
                    ">\n      <failure type=\"{}\" message=\"{}\">{}</failure>\n    </testcase>",
                    o.kind.name(),
                    xml_escape(&o.message),
                    xml_escape(&failure_block(o))
                );
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// Where a report file given on the command line (`--junit FILE`,
/// `graft types`) will be written, checked before any work: not a
/// directory, its folder exists; a symbolic link is followed to the file
/// it names (as a shell's `>` would), a dangling or looping one refused.
pub fn output_path(path: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    let shown = path.display();
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).map_err(|e| {
            anyhow::anyhow!(
                "{flag} {shown}: a symbolic link that leads nowhere ({e}); give a file path"
            )
        })?,
        _ => path.to_path_buf(),
    };
    if target.is_dir() {
        return Err(anyhow::anyhow!(
            "{flag} {shown}: is a directory; give a file path"
        ));
    }
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(anyhow::anyhow!(
            "{flag} {shown}: the folder {} does not exist; create it first",
            parent.display()
        ));
    }
    Ok(target)
}

/// Writes `text` to `path` whole or not at all: into a temporary file
/// beside it, then renamed over it, so a failed write (disk full, killed
/// run) never leaves a truncated report or definitions file behind.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_escapes_markup_and_characters_xml_cannot_hold() {
        assert_eq!(
            xml_escape("a<b & \"c\"\u{1b}"),
            "a&lt;b &amp; &quot;c&quot;\\u{1b}"
        );
        assert_eq!(xml_escape("line\nnext\ttab"), "line\nnext\ttab");
    }

    #[test]
    fn guest_text_cannot_forge_runner_lines_or_grow_without_bound() {
        let forged = "boom\ntest result: ok. 99 passed, 0 failed; finished in 0.00s\ntest x ... ok";
        let o = Outcome::failed("test/a_test.luau", "n\nm", Kind::Error, forged.into());
        let block = failure_block(&o);
        for line in block.lines().skip(1) {
            assert!(
                line.starts_with("    "),
                "unindented line {line:?} in {block}"
            );
        }
        assert_eq!(
            line(&o),
            "test test/a_test.luau::n\\u{a}m ... FAILED (error)"
        );
        let huge = Outcome::failed(
            "test/a_test.luau",
            &"é".repeat(100_000),
            Kind::Error,
            "x".repeat(5_000_000),
        );
        assert!(
            huge.message.len() < MAX_MESSAGE + 64,
            "{}",
            huge.message.len()
        );
        assert!(huge.name.len() < MAX_NAME + 64);
        assert!(
            huge.message.ends_with("(4983616 more bytes)"),
            "{}",
            &huge.message[huge.message.len() - 40..]
        );
    }

    #[test]
    fn coverage_never_reports_unmeasured_modules_as_covered() {
        let files: BTreeMap<String, String> =
            [("app".to_string(), "src/app.luau".to_string())].into();
        // No test ran: no line of `app` was measured.
        let table = coverage_table(&BTreeMap::new(), &files);
        assert!(!table.contains("100.0%"), "{table}");
        assert!(table.contains("not measured"), "{table}");
        let doc = coverage_json(&BTreeMap::new(), &files);
        assert_eq!(doc[0]["percent"], Value::Null);
        let measured: BTreeMap<String, BTreeMap<u32, u64>> =
            [("app".to_string(), [(1, 2), (2, 0)].into())].into();
        assert!(coverage_table(&measured, &files).contains(" 50.0%"));
        assert_eq!(coverage_json(&measured, &files)[0]["percent"], 50.0);
    }

    #[test]
    fn summary_counts_passed_and_failed() {
        let mut ok = Outcome::failed("test/a_test.luau", "x", Kind::Passed, String::new());
        ok.duration = Duration::from_millis(1);
        let bad = Outcome::failed("test/a_test.luau", "y", Kind::Timeout, "timeout".into());
        let s = summary(&[ok, bad], Duration::from_millis(20));
        assert!(
            s.starts_with("test result: FAILED. 1 passed, 1 failed;"),
            "{s}"
        );
    }
}
