//! Human-readable output: reload lines, rustc-style diagnostics, tables.
//! Everything works on the API's JSON, so `run` (library errors converted by
//! `graft_http`) and the client verbs print the same thing.
//!
//! Replies, states, names, crash messages, diagnostics and logs come from
//! guests; a terminal would act on the control characters in them (clear
//! the screen, move the cursor, retitle the window, reorder text). Every
//! function here that returns text for the terminal passes it through
//! [`escape`], and JSON output through [`json`], so none reaches it raw.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::Value;

/// Whether [`escape`] keeps line breaks and tabs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lines {
    /// Multi-line text (diagnostics, tracebacks): `\n` and `\t` stay.
    Keep,
    /// One line (a table cell, a log line, a reload line): `\n` and `\t`
    /// are escaped too, so a value cannot fake another line.
    Escape,
}

/// `s` with every control character (C0, DEL, C1) and bidirectional
/// formatting character written visibly as `\u{1b}`; with [`Lines::Keep`],
/// `\n` and `\t` stay as they are. Borrows when there is nothing to escape.
pub fn escape(s: &str, lines: Lines) -> Cow<'_, str> {
    if !s.chars().any(|c| unsafe_char(c, lines)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if unsafe_char(c, lines) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn unsafe_char(c: char, lines: Lines) -> bool {
    match c {
        '\n' | '\t' => lines == Lines::Escape,
        // Cc (C0, DEL, C1), then the bidi marks, embeddings, overrides and isolates.
        _ => {
            c.is_control()
                || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        }
    }
}

/// JSON for the terminal (`pretty`: indented). serde escapes C0 controls in
/// strings but leaves DEL, C1 and bidi characters raw; they are written as
/// `\uXXXX` escapes here, so the text is still exactly the same JSON value.
pub fn json(v: &Value, pretty: bool) -> String {
    let text = if pretty {
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    };
    if !text.chars().any(|c| unsafe_char(c, Lines::Keep)) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        // Outside strings JSON has only spaces and newlines, so every such
        // character is inside a string, and all are below U+FFFF.
        if unsafe_char(c, Lines::Keep) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// `✓ counter v3 → v4  1.2 ms  10000 processes migrated`, or `None` for an
/// `unchanged` report.
pub fn report_line(report: &Value) -> Option<String> {
    let status = report["status"].as_str().unwrap_or("");
    if status == "unchanged" {
        return None;
    }
    let modules: Vec<String> = report["modules"]
        .as_array()
        .map(|ms| ms.iter().map(module_change).collect())
        .unwrap_or_default();
    let t = &report["timings"];
    let us = t["compile_us"].as_u64().unwrap_or(0) + t["swap_us"].as_u64().unwrap_or(0);
    let n = report["processes_migrated"].as_u64().unwrap_or(0);
    let procs = if n == 1 {
        "1 process migrated".to_owned()
    } else {
        format!("{n} processes migrated")
    };
    let what = if modules.is_empty() {
        "nothing to change".to_owned()
    } else {
        modules.join(", ")
    };
    let line = format!("{what}  {}  {procs}", ms(us));
    let line = if status == "dry_run" {
        format!("✓ dry run: {line} (would be; nothing changed)")
    } else {
        format!("✓ {line}")
    };
    Some(escape(&line, Lines::Escape).into_owned())
}

fn module_change(m: &Value) -> String {
    let name = m["name"].as_str().unwrap_or("?");
    let to = m["to"].as_u64().unwrap_or(0);
    match m["from"].as_u64().unwrap_or(0) {
        0 => format!("{name} new → v{to}"),
        from => format!("{name} v{from} → v{to}"),
    }
}

fn ms(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

/// One diagnostic, rustc style:
///
/// ```text
/// error: Expected identifier when parsing expression, got '='
///   --> src/counter.luau:8:3
/// 7 | ...
/// 8 | local x = = 1
///   |           ^
/// ```
pub fn diagnostic(d: &Value, file: Option<&str>) -> String {
    let file = file.or(d["file"].as_str()).unwrap_or("?");
    let line = d["line"].as_u64().unwrap_or(0);
    let column = d["column"].as_u64().unwrap_or(0);
    let mut out = format!("error: {}\n", d["message"].as_str().unwrap_or(""));
    if line > 0 {
        out.push_str(&format!("  --> {file}:{line}:{column}\n"));
    } else {
        out.push_str(&format!("  --> {file}\n"));
    }
    if let Some(frame) = d["frame"].as_str().filter(|f| !f.is_empty()) {
        out.push_str(frame);
        if !frame.ends_with('\n') {
            out.push('\n');
        }
    }
    escape(&out, Lines::Keep).into_owned()
}

/// An API error object (`{ kind, message, ... }`) for stderr. `file_of` maps a
/// module name to the file to show in diagnostics.
pub fn error(err: &Value, file_of: &dyn Fn(&str) -> Option<String>) -> String {
    escape(&error_text(err, file_of), Lines::Keep).into_owned()
}

fn error_text(err: &Value, file_of: &dyn Fn(&str) -> Option<String>) -> String {
    let kind = err["kind"].as_str().unwrap_or("");
    let message = err["message"].as_str().unwrap_or("unknown error");
    match kind {
        "compile_error" => {
            let diags = err["diagnostics"].as_array().cloned().unwrap_or_default();
            if diags.is_empty() {
                return format!("error: {message}\n");
            }
            diags
                .iter()
                .map(|d| diagnostic(d, file_of(d["module"].as_str().unwrap_or("")).as_deref()))
                .collect::<Vec<_>>()
                .join("\n")
        }
        "reload_aborted" => {
            let mut out = format!("error: {message}\n");
            let mut at = Vec::new();
            if let Some(step) = err["step"].as_str() {
                at.push(format!("step `{step}`"));
            }
            if let Some(module) = err["module"].as_str() {
                match file_of(module) {
                    Some(f) => at.push(format!("module `{module}` ({f})")),
                    None => at.push(format!("module `{module}`")),
                }
            }
            if let Some(process) = err["process"].as_str() {
                at.push(format!("process {process}"));
            }
            if !at.is_empty() {
                out.push_str(&format!("  --> {}\n", at.join(", ")));
            }
            out
        }
        "crashed" => {
            let mut out = format!("error: {message}\n");
            if let Some(tb) = err["reason"]["traceback"]
                .as_str()
                .filter(|t| !t.trim().is_empty())
            {
                for line in tb.lines() {
                    out.push_str(&format!("  | {line}\n"));
                }
            }
            out
        }
        _ => format!("error: {message}\n"),
    }
}

/// A plain-text table: a header row and left-aligned columns (cells escaped
/// as single lines).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| escape(c, Lines::Escape).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `512 B`, `1.5 KiB`, `3.2 MiB`.
pub fn bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn timestamp(ms: f64) -> String {
    let secs = (ms / 1000.0).floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Pretty JSON for the terminal ([`json`]).
pub fn pretty(v: &Value) -> String {
    json(v, true)
}

/// Formats the fields of log events (guest `print` and `graft.log` lines,
/// crash warnings) with every value escaped as one line.
pub fn log_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let text = escape(&text, Lines::Escape);
        if field.name() == "message" {
            write!(w, "{text}")
        } else {
            write!(w, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reload_lines() {
        let r = json!({ "status": "reloaded", "modules": [{ "name": "counter", "from": 3, "to": 4 }],
                        "processes_migrated": 10000, "timings": { "compile_us": 700, "swap_us": 500 } });
        assert_eq!(
            report_line(&r).unwrap(),
            "✓ counter v3 → v4  1.2 ms  10000 processes migrated"
        );
        let r = json!({ "status": "reloaded", "modules": [{ "name": "util", "from": 0, "to": 1 }],
                        "processes_migrated": 1, "timings": { "compile_us": 20000, "swap_us": 0 } });
        assert_eq!(
            report_line(&r).unwrap(),
            "✓ util new → v1  20 ms  1 process migrated"
        );
        assert_eq!(
            report_line(&json!({ "status": "unchanged", "modules": [] })),
            None
        );
        let r = json!({ "status": "dry_run", "modules": [{ "name": "c", "from": 1, "to": 2 }], "processes_migrated": 0, "timings": {} });
        assert!(report_line(&r).unwrap().starts_with("✓ dry run: c v1 → v2"));
    }

    #[test]
    fn diagnostics_are_rustc_style() {
        let d = json!({ "module": "counter", "file": "counter.luau", "line": 8, "column": 3, "message": "boom",
                        "frame": "8 | x = = 1\n  |   ^\n" });
        assert_eq!(
            diagnostic(&d, Some("src/counter.luau")),
            "error: boom\n  --> src/counter.luau:8:3\n8 | x = = 1\n  |   ^\n"
        );
        let e = json!({ "kind": "compile_error", "message": "m", "diagnostics": [d] });
        assert!(error(&e, &|_| None).contains("--> counter.luau:8:3"));
    }

    #[test]
    fn guest_text_is_escaped_for_the_terminal() {
        assert_eq!(escape("\x1b[2J", Lines::Keep), "\\u{1b}[2J");
        assert_eq!(
            escape("a\rb\u{9b}c\u{7f}\u{202e}", Lines::Keep),
            "a\\u{d}b\\u{9b}c\\u{7f}\\u{202e}"
        );
        assert_eq!(escape("two\nlines\tok", Lines::Keep), "two\nlines\tok");
        assert_eq!(escape("one\nline", Lines::Escape), "one\\u{a}line");
        assert!(matches!(
            escape("plain ✓ text", Lines::Escape),
            Cow::Borrowed(_)
        ));

        // a crash message and a diagnostic cannot clear the screen
        let e = json!({ "kind": "crashed", "message": "\x1b[2Jboom", "reason": { "traceback": "x.luau:1\x1b]0;t\x07" } });
        let out = error(&e, &|_| None);
        assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
        assert!(
            out.contains("\\u{1b}[2Jboom") && out.contains("  | x.luau:1\\u{1b}]0;t\\u{7}"),
            "{out}"
        );
        let d = json!({ "message": "bad\x1b[A", "line": 1, "column": 1, "frame": "1 | x\r\n" });
        assert_eq!(
            diagnostic(&d, Some("f.luau")),
            "error: bad\\u{1b}[A\n  --> f.luau:1:1\n1 | x\\u{d}\n"
        );
        // table cells are single lines
        let t = table(&["NAME"], &[vec!["a\nb\x1b".into()]]);
        assert_eq!(t, "NAME\na\\u{a}b\\u{1b}\n");
    }

    #[test]
    fn json_output_stays_the_same_json_value() {
        let v = json!({ "reply": "\x1b[2J\u{9b}1m\u{202e}\u{7f}ok" });
        for pretty in [true, false] {
            let text = json(&v, pretty);
            assert!(
                !text.chars().any(|c| c.is_control() && c != '\n'),
                "{text:?}"
            );
            assert!(!text.contains('\u{202e}'));
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v, "{text}");
        }
        assert!(json(&v, false).contains(r"\u001b[2J\u009b1m\u202e\u007fok"));
    }

    #[test]
    fn tables_and_units() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
        assert_eq!(bytes(100), "100 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(timestamp(0.0), "1970-01-01 00:00:00");
        assert_eq!(timestamp(1_700_000_000_000.0), "2023-11-14 22:13:20");
    }
}
