//! Diagnostics for guest source, rendered like rustc's: what happened, where
//! (`file:line:col`) and a code frame pointing at the spot.
//!
//! Whatever the source, what one error carries is bounded (SPEC §7, "a source
//! with thousands of errors"):
//! * a module reports at most [`MAX_PER_MODULE`] problems, then one
//!   [`TRUNCATED`] note saying how many more it has;
//! * a frame has at most [`MAX_FRAME_LINES`] lines, each cut to a window of
//!   [`MAX_FRAME_WIDTH`] characters around the column;
//! * a message has at most [`MAX_MESSAGE_BYTES`] bytes, control characters
//!   replaced;
//! * the diagnostics of one error serialize to at most [`MAX_REPORT_BYTES`]
//!   of JSON; past that, one final [`TRUNCATED`] note counts what was left
//!   out. An HTTP error body, which repeats the first diagnostic's message
//!   and frame, therefore stays under 64 KiB.
//!
//! Building them is linear in the source: [`SourceLines`] indexes a source's
//! lines once, and only the diagnostics that are kept get a frame.

use std::fmt;

use serde::Serialize;

/// Problems one module reports; the rest are counted in a [`TRUNCATED`] note.
pub const MAX_PER_MODULE: usize = 20;
/// Lines of a code frame: the line before, the line, the caret, the line after.
pub const MAX_FRAME_LINES: usize = 5;
/// Characters of source shown per frame line; longer lines show a window
/// around the column, with `…` where text was cut.
pub const MAX_FRAME_WIDTH: usize = 120;
/// Bytes of a diagnostic's message (and file name); longer ones end in
/// `… (N more bytes)`.
pub const MAX_MESSAGE_BYTES: usize = 512;
/// JSON bytes of all diagnostics of one error, notes included.
pub const MAX_REPORT_BYTES: usize = 56 * 1024;
/// The kind of the notes that count problems left out.
pub const TRUNCATED: &str = "truncated";

/// Room kept for the final note: a fixed text plus a module and a file name
/// of at most [`MAX_MESSAGE_BYTES`] each, which JSON escaping may double.
const FINAL_NOTE_BYTES: usize = 4 * MAX_MESSAGE_BYTES + 512;

/// One problem in one module's source. Lines and columns are 1-based.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// What kind of problem: `syntax`, `ungranted_global`, `cycle`, …, or
    /// [`TRUNCATED`] for a note counting problems left out.
    pub kind: String,
    /// The module the problem is in.
    pub module: String,
    /// The file the module came from (or `<module>.luau` when it came from memory).
    pub file: String,
    /// 1-based line (0 when the problem has no position, e.g. a cycle).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
    /// What is wrong, and where it helps, what to do.
    pub message: String,
    /// The offending source line with a caret under the column.
    pub frame: String,
}

impl Diagnostic {
    /// Builds a diagnostic and its code frame from the module's source.
    ///
    /// ```
    /// let d = graft::Diagnostic::new("syntax", "m", "src/m.luau", "local x =\n", 1, 10, "expected an expression");
    /// assert!(d.to_string().starts_with("src/m.luau:1:10: expected an expression"));
    /// assert!(d.frame.contains('^'));
    /// ```
    pub fn new(
        kind: &str,
        module: &str,
        file: &str,
        source: &str,
        line: usize,
        column: usize,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::at(
            kind,
            module,
            file,
            &SourceLines::new(source),
            line,
            column,
            message,
        )
    }

    /// Like [`Diagnostic::new`], with the source already indexed.
    pub fn at(
        kind: &str,
        module: &str,
        file: &str,
        lines: &SourceLines<'_>,
        line: usize,
        column: usize,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            kind: kind.to_owned(),
            module: clip(module),
            file: clip(file),
            line,
            column,
            message: clip(&message.into()),
            frame: lines.frame(line, column),
        }
    }

    /// Bytes of this diagnostic's JSON form.
    fn json_len(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |v| v.len())
    }
}

/// The start of every line of a source, found once, so each frame costs only
/// the lines it shows.
pub struct SourceLines<'a> {
    source: &'a str,
    /// Byte offset where each line starts.
    starts: Vec<usize>,
}

impl<'a> SourceLines<'a> {
    /// Indexes `source` (lines end at `\n`; a `\r` before it is dropped).
    pub fn new(source: &'a str) -> SourceLines<'a> {
        let mut starts = vec![0];
        starts.extend(
            source
                .bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1)
                .filter(|start| *start < source.len()),
        );
        SourceLines { source, starts }
    }

    /// Number of lines.
    pub fn len(&self) -> usize {
        if self.source.is_empty() {
            0
        } else {
            self.starts.len()
        }
    }

    /// True when the source is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text of 1-based line `n`, without its line break.
    pub fn line(&self, n: usize) -> Option<&'a str> {
        if n > self.len() {
            return None;
        }
        let start = *self.starts.get(n.checked_sub(1)?)?;
        let end = self.starts.get(n).copied().unwrap_or(self.source.len());
        let text = self.source.get(start..end)?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        Some(text.strip_suffix('\r').unwrap_or(text))
    }

    /// Renders `line` with its neighbours and a caret under `column`: at most
    /// [`MAX_FRAME_LINES`] lines of at most [`MAX_FRAME_WIDTH`] characters.
    pub fn frame(&self, line: usize, column: usize) -> String {
        if line == 0 {
            return String::new();
        }
        let width = (line + 1).to_string().len();
        let (from, to) = window(self.line(line).unwrap_or(""), column);
        let mut out = String::new();
        let first = line.saturating_sub(1).max(1);
        let last = (line + 1).min(self.len().max(line));
        for n in first..=last {
            let text = self.line(n).unwrap_or("");
            if n != line && text.trim().is_empty() {
                continue;
            }
            out.push_str(&format!("{n:>width$} | {}\n", excerpt(text, from, to)));
            if n == line {
                let lead = if from > 0 { " " } else { "" };
                let pad: String = text
                    .chars()
                    .skip(from)
                    .take(column.saturating_sub(1).saturating_sub(from))
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                out.push_str(&format!("{:>width$} | {lead}{pad}^\n", ""));
            }
        }
        out
    }
}

/// Renders `line` of `source` with its neighbours and a caret under `column`.
/// Indexes the source first; to render many frames of one source, use
/// [`SourceLines::frame`].
pub fn code_frame(source: &str, line: usize, column: usize) -> String {
    SourceLines::new(source).frame(line, column)
}

/// The characters `[from, to)` of a line to show so that `column` is in view.
fn window(text: &str, column: usize) -> (usize, usize) {
    let len = text.chars().count();
    if len <= MAX_FRAME_WIDTH {
        return (0, len);
    }
    let at = column.saturating_sub(1).min(len);
    let from = at.saturating_sub(MAX_FRAME_WIDTH / 2);
    let from = from.min(len.saturating_sub(MAX_FRAME_WIDTH));
    (from, from + MAX_FRAME_WIDTH)
}

/// Characters `[from, to)` of `text`, control characters replaced, with `…`
/// on each side where text was cut.
fn excerpt(text: &str, from: usize, to: usize) -> String {
    let mut out = String::new();
    if from > 0 {
        out.push('…');
    }
    let mut chars = text.chars().skip(from);
    out.extend(chars.by_ref().take(to - from).map(printable));
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// Tabs stay (frames align with them); other control characters would break
/// the frame or a terminal.
fn printable(c: char) -> char {
    if c.is_control() && c != '\t' {
        '\u{FFFD}'
    } else {
        c
    }
}

/// `text` on one line, control characters replaced, cut to
/// [`MAX_MESSAGE_BYTES`] with `… (N more bytes)`.
pub fn clip(text: &str) -> String {
    let text: String = text
        .chars()
        .map(|c| match c {
            '\n' | '\t' => ' ',
            c => printable(c),
        })
        .collect();
    if text.len() <= MAX_MESSAGE_BYTES {
        return text;
    }
    let mut cut = MAX_MESSAGE_BYTES - 32;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more bytes)", &text[..cut], text.len() - cut)
}

/// The diagnostics of one error, collected within the bounds of the module
/// documentation.
///
/// ```
/// use graft::diagnostic::{Report, MAX_PER_MODULE, TRUNCATED};
/// let source = "x = 1\n".repeat(100);
/// let mut report = Report::default();
/// let mut m = report.module("m", "m.luau", &source);
/// for line in 1..=100 {
///     m.push("global_assignment", line, 1, "assignment to global `x`");
/// }
/// m.finish();
/// let diagnostics = report.into_diagnostics();
/// assert_eq!(diagnostics.len(), MAX_PER_MODULE + 1);
/// assert_eq!(diagnostics[MAX_PER_MODULE].kind, TRUNCATED);
/// assert!(diagnostics[MAX_PER_MODULE].message.contains("80 more problems"));
/// ```
#[derive(Debug, Default)]
pub struct Report {
    diagnostics: Vec<Diagnostic>,
    /// JSON bytes of `diagnostics` as an array.
    bytes: usize,
    /// Set once a diagnostic did not fit: everything after is counted only.
    full: bool,
    /// Problems left out for lack of room, and the first module they are in.
    dropped: usize,
    dropped_from: Option<(String, String)>,
}

impl Report {
    /// Starts the diagnostics of one module; `source` is indexed once here.
    pub fn module<'r, 's>(
        &'r mut self,
        module: &'s str,
        file: &'s str,
        source: &'s str,
    ) -> ModuleReport<'r, 's> {
        ModuleReport {
            report: self,
            module,
            file,
            lines: SourceLines::new(source),
            shown: 0,
            more: 0,
        }
    }

    /// True when no problem was reported.
    pub fn is_empty(&self) -> bool {
        self.diagnostics.is_empty() && self.dropped == 0
    }

    /// The diagnostics, with a final [`TRUNCATED`] note if problems were
    /// left out for lack of room.
    pub fn into_diagnostics(mut self) -> Vec<Diagnostic> {
        if self.dropped > 0 {
            let (module, file) = self.dropped_from.take().unwrap_or_default();
            self.diagnostics.push(Diagnostic {
                kind: TRUNCATED.to_owned(),
                module: clip(&module),
                file: clip(&file),
                line: 0,
                column: 0,
                message: format!(
                    "… and {} more problems not shown: the diagnostics of one error are capped at {} KiB",
                    self.dropped,
                    MAX_REPORT_BYTES / 1024
                ),
                frame: String::new(),
            });
        }
        self.diagnostics
    }

    /// Keeps `d` if it fits, leaving room for the final note.
    fn admit(&mut self, d: Diagnostic) -> bool {
        // A comma or the array's brackets.
        let size = d.json_len().saturating_add(1);
        if self.full || self.bytes + size + FINAL_NOTE_BYTES > MAX_REPORT_BYTES {
            self.full = true;
            return false;
        }
        self.bytes += size;
        self.diagnostics.push(d);
        true
    }

    fn drop_problems(&mut self, n: usize, module: &str, file: &str) {
        self.dropped += n;
        if self.dropped_from.is_none() {
            self.dropped_from = Some((module.to_owned(), file.to_owned()));
        }
    }
}

/// The diagnostics of one module inside a [`Report`]; end with
/// [`ModuleReport::finish`].
pub struct ModuleReport<'r, 's> {
    report: &'r mut Report,
    module: &'s str,
    file: &'s str,
    lines: SourceLines<'s>,
    shown: usize,
    more: usize,
}

impl ModuleReport<'_, '_> {
    /// Reports a problem at 1-based `line`/`column` (0: no position). Past
    /// [`MAX_PER_MODULE`] or the byte cap it is only counted, and its frame
    /// is never built.
    pub fn push(&mut self, kind: &str, line: usize, column: usize, message: &str) {
        if self.shown >= MAX_PER_MODULE || self.report.full {
            self.more += 1;
            return;
        }
        let d = Diagnostic::at(
            kind,
            self.module,
            self.file,
            &self.lines,
            line,
            column,
            message,
        );
        self.keep(d);
    }

    /// Reports a diagnostic built elsewhere (e.g. by the compiler).
    pub fn push_diagnostic(&mut self, d: Diagnostic) {
        if self.shown >= MAX_PER_MODULE || self.report.full {
            self.more += 1;
            return;
        }
        self.keep(d);
    }

    /// Counts `n` problems found but not given one by one.
    pub fn count_more(&mut self, n: usize) {
        self.more += n;
    }

    /// Closes the module: a [`TRUNCATED`] note if problems were left out.
    pub fn finish(self) {
        if self.more == 0 {
            return;
        }
        let note = Diagnostic {
            kind: TRUNCATED.to_owned(),
            module: clip(self.module),
            file: clip(self.file),
            line: 0,
            column: 0,
            message: format!(
                "… and {} more problems in this module (a module reports at most {MAX_PER_MODULE})",
                self.more
            ),
            frame: String::new(),
        };
        if !self.report.admit(note) {
            self.report.drop_problems(self.more, self.module, self.file);
        }
    }

    fn keep(&mut self, d: Diagnostic) {
        if self.report.admit(d) {
            self.shown += 1;
        } else {
            self.more += 1;
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

/// `chunk:LINE:` at the start of a Luau error message (`src/m.luau:3: boom`):
/// the chunk and the line. A message raised at level 0 has no position; its
/// text may still hold a `x:1:` further on, which names no chunk the caller
/// knows, so callers check the chunk.
pub(crate) fn error_position(message: &str) -> Option<(&str, u32)> {
    chunk_line(message, |rest| rest.starts_with(':'))
}

/// `chunk:LINE` at the start of a traceback frame, in Luau's form
/// (`src/m.luau:3 function f`) or Lua's (`\tsrc/m.luau:3: in function <…>`).
pub(crate) fn frame_position(frame: &str) -> Option<(&str, u32)> {
    chunk_line(frame.trim_start(), |rest| {
        rest.is_empty() || rest.starts_with(':') || rest.starts_with(' ')
    })
}

/// The first `chunk:DIGITS` followed by what `ends` accepts.
fn chunk_line(text: &str, ends: impl Fn(&str) -> bool) -> Option<(&str, u32)> {
    for (at, _) in text.match_indices(':') {
        let rest = &text[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if at == 0 || digits == 0 || !ends(&rest[digits..]) {
            continue;
        }
        let line = rest[..digits].parse().ok()?;
        return Some((&text[..at], line));
    }
    None
}

/// Frames a crash's traceback keeps, innermost first; deeper ones are counted.
pub const MAX_TRACEBACK_FRAMES: usize = 20;

/// `frames` as a traceback text: the first [`MAX_TRACEBACK_FRAMES`], then
/// `… N more frames` (a recursion thousands deep would be thousands of lines).
pub(crate) fn traceback_text(frames: &[&str]) -> String {
    let mut text = frames
        .iter()
        .take(MAX_TRACEBACK_FRAMES)
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    if frames.len() > MAX_TRACEBACK_FRAMES {
        text.push_str(&format!(
            "\n… {} more frames",
            frames.len() - MAX_TRACEBACK_FRAMES
        ));
    }
    text
}

/// Frames of a Luau traceback a guest's author can act on: no C functions
/// (`[C]`), no frames of Graft's own trusted chunks, no blank lines.
pub(crate) fn guest_frames(traceback: &str) -> Vec<&str> {
    const TRUSTED: [&str; 3] = ["graft.prelude", "graft.require", "graft.supervisor"];
    traceback
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty()
                && !l.starts_with("[C]")
                && l != "stack traceback:"
                && !TRUSTED
                    .iter()
                    .any(|c| l.strip_prefix(c).is_some_and(|r| r.starts_with(':')))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_points_at_the_column_with_context() {
        let src = "local a = 1\nlocal b = = 2\nreturn a";
        let frame = code_frame(src, 2, 11);
        assert_eq!(
            frame,
            "1 | local a = 1\n2 | local b = = 2\n  |           ^\n3 | return a\n"
        );
    }

    #[test]
    fn display_is_file_line_col_message() {
        let d = Diagnostic::new("syntax", "counter", "src/counter.luau", "x", 1, 1, "boom");
        assert_eq!(d.to_string(), "src/counter.luau:1:1: boom");
    }

    #[test]
    fn line_index_matches_str_lines() {
        for src in ["", "a", "a\n", "a\r\nb", "\n\nc\n", "x\n\ny"] {
            let lines = SourceLines::new(src);
            let expected: Vec<&str> = src.lines().collect();
            assert_eq!(lines.len(), expected.len(), "{src:?}");
            for (i, text) in expected.iter().enumerate() {
                assert_eq!(lines.line(i + 1), Some(*text), "{src:?} line {}", i + 1);
            }
            assert_eq!(lines.line(0), None);
            assert_eq!(lines.line(expected.len() + 1), None);
        }
    }

    #[test]
    fn long_lines_show_a_window_around_the_column() {
        let long = format!("{}BAD{}", "a".repeat(5000), "b".repeat(5000));
        let src = format!("{long}\n{long}\n");
        let frame = code_frame(&src, 2, 5001);
        assert!(frame.lines().count() <= MAX_FRAME_LINES, "{frame}");
        for line in frame.lines() {
            assert!(
                line.chars().count() <= MAX_FRAME_WIDTH + 10,
                "{}",
                line.len()
            );
        }
        let lines: Vec<&str> = frame.lines().collect();
        let text = lines[1];
        let caret = lines[2];
        // The caret sits under the `B` of `BAD`.
        let at = caret.chars().position(|c| c == '^').unwrap();
        assert_eq!(text.chars().nth(at), Some('B'), "{frame}");
        assert!(text.contains('…'));
    }

    #[test]
    fn control_characters_never_reach_a_frame_or_message() {
        let d = Diagnostic::new(
            "syntax",
            "m",
            "m.luau",
            "a\u{1b}[2Jb = 1\n",
            1,
            1,
            "bad\u{7}\nthing",
        );
        assert!(!d.frame.chars().any(|c| c.is_control() && c != '\n'));
        assert_eq!(d.message, "bad\u{FFFD} thing");
    }

    #[test]
    fn long_messages_are_clipped_with_the_byte_count() {
        let name = "é".repeat(1000);
        let d = Diagnostic::new("missing_module", "m", "m.luau", "", 0, 0, name);
        assert!(d.message.len() <= MAX_MESSAGE_BYTES, "{}", d.message.len());
        assert!(d.message.ends_with("more bytes)"), "{}", d.message);
    }

    #[test]
    fn a_report_stays_under_its_byte_cap_and_counts_the_rest() {
        // Many modules, each with long lines and long messages.
        let source = format!("{}\n", "x".repeat(400)).repeat(50);
        let message = "m".repeat(400);
        let names: Vec<String> = (0..100).map(|i| format!("mod{i}")).collect();
        let mut report = Report::default();
        for name in &names {
            let mut m = report.module(name, name, &source);
            for line in 1..=50 {
                m.push("ungranted_global", line, 200, &message);
            }
            m.finish();
        }
        let diagnostics = report.into_diagnostics();
        let bytes = serde_json::to_vec(&diagnostics).unwrap().len();
        assert!(bytes <= MAX_REPORT_BYTES, "{bytes}");
        let last = diagnostics.last().unwrap();
        assert_eq!(last.kind, TRUNCATED);
        let shown = diagnostics.iter().filter(|d| d.kind != TRUNCATED).count();
        let noted: usize = diagnostics
            .iter()
            .filter(|d| d.kind == TRUNCATED)
            .map(|d| {
                d.message
                    .split_whitespace()
                    .nth(2)
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap()
            })
            .sum();
        assert_eq!(shown + noted, 100 * 50, "every problem shown or counted");
    }

    #[test]
    fn positions_are_read_from_messages_and_frames() {
        assert_eq!(
            error_position("src/counter.luau:4: attempt to index nil"),
            Some(("src/counter.luau", 4))
        );
        assert_eq!(
            error_position("C:\\dir\\m.luau:12: boom"),
            Some(("C:\\dir\\m.luau", 12))
        );
        assert_eq!(error_position("boom"), None);
        assert_eq!(error_position(":3: boom"), None);
        assert_eq!(error_position("m.luau:x: boom"), None);
        assert_eq!(
            frame_position("c.luau:4 function handle_call"),
            Some(("c.luau", 4))
        );
        assert_eq!(
            frame_position("\tc.luau:3: in function <c.luau:1>"),
            Some(("c.luau", 3))
        );
        assert_eq!(frame_position("[C] function error"), None);
    }

    #[test]
    fn guest_frames_drop_c_and_trusted_frames() {
        let tb = "[C] function error\nsrc/c.luau:4 function handle_call\ngraft.prelude:120 function run_job\n\n\t[C]: in ?\ngraft.luau:2 function f\n";
        assert_eq!(
            guest_frames(tb),
            vec![
                "src/c.luau:4 function handle_call",
                "graft.luau:2 function f"
            ]
        );
    }
}
