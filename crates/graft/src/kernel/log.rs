//! Guest log lines (`print`, `graft.log.*`): what reaches the node's log.
//!
//! Invariants:
//! * A sandbox writes at most [`LINES_PER_SECOND`] lines per window of one
//!   second, each at most [`MAX_LINE_BYTES`] bytes of guest text (plus a
//!   `… (N more bytes)` note), with control characters escaped, so one line
//!   of guest text is one line of log and cannot forge others.
//! * Every line refused is counted; the count is reported (a log line and a
//!   `log_dropped` event) by a timer at the end of the window in which lines
//!   were first dropped, so at most once per window and never lost.

/// Lines a sandbox may log per window.
pub(crate) const LINES_PER_SECOND: u32 = 1000;
/// Bytes of guest text kept per line.
pub(crate) const MAX_LINE_BYTES: usize = 4096;
/// The window of the line budget.
const WINDOW_MS: u64 = 1000;

/// The line budget of one sandbox.
#[derive(Default)]
pub(crate) struct LogGate {
    window_start: u64,
    passed: u32,
    dropped: u64,
    flush_armed: bool,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Write it.
    Write,
    /// Count it as dropped; arm the report timer at this time if `Some`.
    Drop(Option<u64>),
}

impl LogGate {
    /// Decides about a line logged at `now_ms`.
    pub fn admit(&mut self, now_ms: u64) -> Admit {
        if self.passed == 0 || now_ms >= self.window_start.saturating_add(WINDOW_MS) {
            self.window_start = now_ms;
            self.passed = 0;
        }
        if self.passed < LINES_PER_SECOND {
            self.passed += 1;
            return Admit::Write;
        }
        self.dropped += 1;
        if self.flush_armed {
            return Admit::Drop(None);
        }
        self.flush_armed = true;
        Admit::Drop(Some(self.window_start.saturating_add(WINDOW_MS)))
    }

    /// The lines dropped since the last report (the report timer fired).
    pub fn take_dropped(&mut self) -> u64 {
        self.flush_armed = false;
        std::mem::take(&mut self.dropped)
    }
}

/// The text written for a line of guest bytes: cut at [`MAX_LINE_BYTES`],
/// control characters escaped.
pub(crate) fn line_text(bytes: &[u8]) -> String {
    let kept = &bytes[..bytes.len().min(MAX_LINE_BYTES)];
    let text = String::from_utf8_lossy(kept);
    let mut out = String::with_capacity(text.len() + 32);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if bytes.len() > kept.len() {
        out.push_str(&format!("… ({} more bytes)", bytes.len() - kept.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_passes_its_budget_and_counts_the_rest() {
        let mut gate = LogGate::default();
        for _ in 0..LINES_PER_SECOND {
            assert_eq!(gate.admit(5), Admit::Write);
        }
        assert_eq!(gate.admit(500), Admit::Drop(Some(1005)));
        for _ in 0..9 {
            assert_eq!(gate.admit(900), Admit::Drop(None));
        }
        // The next window starts with a fresh budget; the timer is still armed.
        assert_eq!(gate.admit(1005), Admit::Write);
        assert_eq!(gate.take_dropped(), 10);
        assert_eq!(gate.take_dropped(), 0);
        for _ in 1..LINES_PER_SECOND {
            assert_eq!(gate.admit(1500), Admit::Write);
        }
        assert_eq!(gate.admit(1999), Admit::Drop(Some(2005)));
        assert_eq!(gate.take_dropped(), 1);
    }

    #[test]
    fn lines_are_cut_and_escaped() {
        assert_eq!(line_text(b"a\tb"), "a\tb");
        assert_eq!(line_text(b"a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let text = line_text(&long);
        assert!(text.ends_with("x… (10 more bytes)"), "{}", &text[4000..]);
        assert_eq!(text.len(), MAX_LINE_BYTES + "… (10 more bytes)".len());
        assert_eq!(line_text(&[0xff, b'a']), "\u{fffd}a");
    }
}
