//! Bounded parsing of Luau sources with full_moon, shared by compilation
//! (the column of a syntax error) and the static analysis of a reload.
//!
//! Invariants:
//! * full_moon parses recursively and has no depth limit of its own, so a
//!   parse runs on a thread with a stack of [`PARSER_STACK_BYTES`], unless
//!   the source is small and shallow by [`nesting_exceeds`] (then on the
//!   caller's thread: starting a thread costs more than the parse).
//! * A source Luau refused is parsed again only by [`syntax_error_column`],
//!   and only up to its error line and when [`nesting_exceeds`] finds it
//!   shallow.
//! * full_moon may panic on malformed input; every parse here is behind
//!   `catch_unwind` (its panics become "no answer", never an unwind into
//!   the caller).

use full_moon::tokenizer::{InterpolatedStringKind, Lexer, LexerResult, Symbol, TokenType};
use full_moon::LuaVersion;

use crate::error::{Error, Result};

/// Stack of the thread full_moon parses on (reserved address space: only
/// the pages a parse touches are used). The deepest nesting Luau accepts
/// (about 1000 levels) needs about 24 MiB.
pub const PARSER_STACK_BYTES: usize = 256 << 20;

/// Nesting, as [`nesting_exceeds`] estimates it, up to which a source Luau
/// refused is parsed again to find the column of its error.
const MAX_RECHECK_DEPTH: usize = 1000;

/// Sources up to this size whose nesting [`nesting_exceeds`] puts at most
/// [`INLINE_PARSE_DEPTH`] are parsed on the caller's thread: starting a
/// thread costs more than parsing them (eval chunks, small modules).
pub(crate) const INLINE_PARSE_BYTES: usize = 16 * 1024;
/// About 20 KiB of stack per level: a few hundred KiB at most, on a caller
/// that has the usual 2 MiB or more.
const INLINE_PARSE_DEPTH: usize = 12;

pub(crate) fn is_shallow(source: &str) -> bool {
    source.len() <= INLINE_PARSE_BYTES && !nesting_exceeds(source, INLINE_PARSE_DEPTH)
}

/// Runs `f` on a scoped thread with a stack of [`PARSER_STACK_BYTES`].
pub(crate) fn on_parser_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("graft-parse".into())
            .stack_size(PARSER_STACK_BYTES)
            .spawn_scoped(scope, f)
            .map_err(|e| Error::Luau(format!("cannot start a parser thread: {e}")))?;
        handle
            .join()
            .map_err(|_| Error::Luau("the source analysis failed unexpectedly".into()))
    })
}

/// The column full_moon gives to a syntax error Luau reported on `line`,
/// when it finds its first error on that same line. The source is parsed
/// only up to the end of `line` (Luau parsed that far within its recursion
/// limit), and not at all when [`nesting_exceeds`] finds that part too deep.
pub fn syntax_error_column(source: &str, line: usize) -> Option<usize> {
    let end = source
        .match_indices('\n')
        .nth(line.checked_sub(1)?)
        .map_or(source.len(), |(i, _)| i + 1);
    let prefix = source.get(..end)?;
    if nesting_exceeds(prefix, MAX_RECHECK_DEPTH) {
        return None;
    }
    let truncated = end < source.len();
    let column = || {
        // full_moon may panic on malformed input: no column then.
        let parsed =
            std::panic::catch_unwind(|| full_moon::parse_fallible(prefix, LuaVersion::luau()))
                .ok()?;
        let (start, _) = parsed.errors().first()?.range();
        // An error at the cut is about the cut, not the source.
        if truncated && start.bytes() >= prefix.trim_end().len() {
            return None;
        }
        (start.line() == line).then_some(start.character().max(1))
    };
    if is_shallow(prefix) {
        return column();
    }
    on_parser_stack(column).ok().flatten()
}

/// Whether the nesting of `source` may pass `limit` levels of full_moon's
/// recursive descent, estimated in one pass over its tokens (no parse).
///
/// The estimate errs high: brackets, block keywords (`function`, `do`, `if`,
/// `repeat`), interpolated strings, `<` and `->` open a level that only a
/// closing bracket, `end`, `until` or string end closes, so an `if`
/// expression or a comparison keeps its level until the enclosing block or
/// bracket ends. A run of unary operators counts one level per operator.
pub fn nesting_exceeds(source: &str, limit: usize) -> bool {
    #[derive(PartialEq)]
    enum Open {
        Bracket,
        Block,
        Interpolation,
        Loose,
    }
    let mut open: Vec<Open> = Vec::new();
    let mut unary_run = 0usize;
    // Whether the previous token ends an operand (then `-` is binary).
    let mut after_operand = false;
    let mut lexer = Lexer::new(source, LuaVersion::luau());
    while let Some(result) = lexer.consume() {
        let token = match result {
            LexerResult::Ok(t) | LexerResult::Recovered(t, _) => t,
            LexerResult::Fatal(_) => continue,
        };
        let kind = token.token().token_type();
        let mut operand = false;
        let mut unary = false;
        match kind {
            TokenType::Symbol { symbol } => match symbol {
                Symbol::LeftParen | Symbol::LeftBrace | Symbol::LeftBracket => {
                    open.push(Open::Bracket)
                }
                Symbol::RightParen | Symbol::RightBrace | Symbol::RightBracket => {
                    close(&mut open, |o| *o == Open::Bracket);
                    operand = true;
                }
                Symbol::Function | Symbol::Do | Symbol::If | Symbol::Repeat => {
                    open.push(Open::Block)
                }
                Symbol::End | Symbol::Until => {
                    close(&mut open, |o| *o == Open::Block);
                    operand = true;
                }
                Symbol::LessThan | Symbol::ThinArrow => open.push(Open::Loose),
                Symbol::Not | Symbol::Hash => unary = true,
                Symbol::Minus => unary = !after_operand,
                Symbol::True | Symbol::False | Symbol::Nil | Symbol::Ellipsis => operand = true,
                _ => {}
            },
            TokenType::InterpolatedString { kind, .. } => match kind {
                InterpolatedStringKind::Begin => open.push(Open::Interpolation),
                InterpolatedStringKind::End => {
                    close(&mut open, |o| *o == Open::Interpolation);
                    operand = true;
                }
                InterpolatedStringKind::Middle => {}
                _ => operand = true,
            },
            TokenType::Identifier { .. }
            | TokenType::Number { .. }
            | TokenType::StringLiteral { .. } => operand = true,
            _ => {}
        }
        unary_run = if unary { unary_run + 1 } else { 0 };
        after_operand = operand;
        if open.len() + unary_run > limit {
            return true;
        }
    }
    false
}

/// Pops levels up to and including the innermost one `is_match` accepts;
/// a closer with no such level pops nothing.
fn close<T>(open: &mut Vec<T>, is_match: impl Fn(&T) -> bool) {
    if let Some(at) = open.iter().rposition(is_match) {
        open.truncate(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_estimate_counts_open_levels() {
        assert!(!nesting_exceeds(
            "local t = { a = (1 + 2) * 3 }\nreturn t\n",
            2
        ));
        assert!(nesting_exceeds("local t = { a = ((1 + 2)) }\n", 2));
        let blocks = "function f() if x then do end end end\n".repeat(1000);
        assert!(!nesting_exceeds(&blocks, 3));
        assert!(nesting_exceeds(&format!("{}1", "- ".repeat(11)), 10));
        assert!(!nesting_exceeds(&"x = a - b - c - d\n".repeat(100), 1));
        assert!(nesting_exceeds(&format!("{}1", "not ".repeat(11)), 10));
        assert!(nesting_exceeds(&"`{".repeat(11), 10));
        assert!(nesting_exceeds(
            &format!("local x = {}", "if a then b else ".repeat(11)),
            10
        ));
        // Closers without openers do not underflow.
        assert!(!nesting_exceeds(") ] } end until", 0));
    }

    #[test]
    fn a_syntax_error_before_deep_nesting_gets_no_reparse() {
        // Luau stops at the first error; the rest of its line is 100 000
        // levels deep and must never reach full_moon's recursion.
        let source = format!("local = 1 {}\n", "(".repeat(100_000));
        assert_eq!(syntax_error_column(&source, 1), None);
        for deep in [
            "{",
            "x[",
            "do ",
            "function() ",
            "- ",
            "not ",
            "if a then b else ",
            "`{",
        ] {
            let source = format!("local = 1 {}\n", deep.repeat(50_000));
            assert_eq!(syntax_error_column(&source, 1), None, "{deep}");
        }
    }

    #[test]
    fn a_syntax_error_column_is_found_on_its_line_only() {
        assert_eq!(
            syntax_error_column("local a = 1\nlocal c = = 3\nreturn a\n", 2),
            Some(9)
        );
        // full_moon's first error is on another line: no column.
        assert_eq!(syntax_error_column("local a = 1\nlocal c = = 3\n", 1), None);
        // Only the lines up to the error are parsed again.
        let source = format!("local t = {{\n  x = = 1 }}\n{}", "(".repeat(100_000));
        assert_eq!(syntax_error_column(&source, 2), Some(5));
        assert_eq!(syntax_error_column("x", 0), None);
        assert_eq!(syntax_error_column("x", 9), None);
    }
}
