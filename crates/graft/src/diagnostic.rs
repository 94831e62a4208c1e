//! Diagnostics for guest source, rendered like rustc's: what happened, where
//! (`file:line:col`) and a code frame pointing at the spot.

use std::fmt;

use serde::Serialize;

/// One problem in one module's source. Lines and columns are 1-based.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// What kind of problem: `syntax`, `ungranted_global`, `cycle`, …
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
        Diagnostic {
            kind: kind.to_owned(),
            module: module.to_owned(),
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
            frame: code_frame(source, line, column),
        }
    }
}

/// Renders `line` of `source` with its neighbours and a caret under `column`.
pub fn code_frame(source: &str, line: usize, column: usize) -> String {
    if line == 0 {
        return String::new();
    }
    let lines: Vec<&str> = source.lines().collect();
    let width = (line + 1).to_string().len();
    let mut out = String::new();
    let first = line.saturating_sub(1).max(1);
    let last = (line + 1).min(lines.len().max(line));
    for n in first..=last {
        let text = lines.get(n - 1).copied().unwrap_or("");
        if n != line && text.trim().is_empty() {
            continue;
        }
        out.push_str(&format!("{n:>width$} | {text}\n"));
        if n == line {
            let pad: String = text
                .chars()
                .take(column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            out.push_str(&format!("{:>width$} | {pad}^\n", ""));
        }
    }
    out
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
}
