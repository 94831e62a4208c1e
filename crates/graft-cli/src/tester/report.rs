//! What `graft test` prints and writes: cargo-test-like lines, JUnit XML
//! and JSON. Guest text (messages, values, names) is escaped for the
//! terminal by [`crate::render`] and for XML here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
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

impl Outcome {
    /// A failure with only a message.
    pub fn failed(file: &str, name: &str, kind: Kind, message: String) -> Outcome {
        Outcome {
            file: file.into(),
            name: name.into(),
            kind,
            message,
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
    let _ = writeln!(
        out,
        "{}: {}: {}",
        render::escape(&at, Lines::Escape),
        render::escape(&o.name, Lines::Escape),
        render::escape(&o.message, Lines::Keep)
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

fn percent(total: usize, run: usize) -> f64 {
    if total == 0 {
        100.0
    } else {
        run as f64 * 100.0 / total as f64
    }
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
        let _ = writeln!(
            out,
            "  {:<width$}  {run:>5}/{total:<5}  {:>5.1}%",
            render::escape(file, Lines::Escape),
            percent(total, run)
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
