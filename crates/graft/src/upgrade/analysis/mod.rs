//! Static analysis of one Luau module source, run in the *check* step of a
//! reload (SPEC §3, step 2) before any new code is evaluated.
//!
//! The source is parsed with [`full_moon`] (Luau syntax: type annotations,
//! `type`/`export type`, generics, if-expressions, compound assignment,
//! string interpolation, `continue`) and walked once with a lexical scope
//! model (`local`, `local function`, parameters, `for` variables,
//! `repeat … until`, blocks, the implicit `self` of methods). The walk
//! reports:
//!
//! * **Requires** ([`SourceAnalysis::requires`]): every `require("name")`
//!   with a string literal argument, so the engine can check that the
//!   dependency graph is acyclic and swap dependants together. A `require`
//!   with any other argument, or a `require` that is not called directly,
//!   is a [`FindingKind::DynamicRequire`]: the graph could not be checked.
//! * **Ungranted globals** ([`FindingKind::UngrantedGlobal`]): a read of a
//!   name that is neither a local in scope nor a global the sandbox provides.
//!   Capabilities that are not granted do not exist in the VM (SPEC §2), so
//!   such a read would only fail at run time, in a live process; the check
//!   moves the failure to the reload, with a line number.
//! * **Global assignments** ([`FindingKind::GlobalAssignment`]): `x = 1` or
//!   `function foo() end` where `x`/`foo` is not a local. Globals are shared
//!   by every module and process of a sandbox and survive no upgrade, so
//!   module state must live in locals or in process state.
//! * **Forbidden constructs** ([`FindingKind::ForbiddenConstruct`]): any use
//!   of `getfenv`, `setfenv`, `_G`, `_ENV` (environments shared across
//!   modules), `loadstring`, `load`, `dofile`, `loadfile` (code that escapes
//!   the reload checks), `debug` (reaches into other functions' locals),
//!   `newproxy` and `collectgarbage` (not available in a Graft sandbox),
//!   and assignments into a builtin or capability table (`string.foo = 1`),
//!   which would leak into every other module.
//! * **Syntax errors** ([`FindingKind::SyntaxError`]): the first parse error;
//!   nothing else is reported for that source.
//!
//! Names that appear only in type positions (annotations, `type`
//! declarations, `typeof(...)` inside a type, type functions) are not reads:
//! they have no effect at run time.
//!
//! Positions are 1-based; columns count characters, not bytes. A finding
//! about a name is placed on that name's token.
//!
//! Bounds, whatever the source (SPEC §7):
//! * At most [`MAX_PER_MODULE`] findings are kept, the first by position;
//!   the rest are only counted ([`SourceAnalysis::more`]), and their messages
//!   are never built.
//! * Time is linear in the source: one parse, one walk, and scope lookups in
//!   a hash map (not a scan of every local in scope).
//! * full_moon parses recursively and has no depth limit of its own, so it
//!   runs on a thread with a stack of [`PARSER_STACK_BYTES`](crate::vm::parse::PARSER_STACK_BYTES). Sources reach
//!   [`analyze`] only after Luau compiled them, and Luau refuses nesting past
//!   its own recursion limit, which bounds the depth full_moon sees; that
//!   stack holds ten times what the deepest such source needs. Small,
//!   shallow sources (up to 16 KiB and 12 levels by [`nesting_exceeds`](crate::vm::parse::nesting_exceeds)) are
//!   parsed on the caller's thread instead: for them, starting a thread
//!   costs more than the parse. A source Luau refused is parsed again only
//!   by [`syntax_error_column`](crate::vm::parse::syntax_error_column), and only up to its error line and when
//!   [`nesting_exceeds`](crate::vm::parse::nesting_exceeds) finds it shallow.

//!
//! Layout: this file holds the result types and [`analyze`]; `walk` holds
//! the scope model and the walk over the syntax tree. The bounded parsing
//! (thread stack, nesting estimate) lives in [`crate::vm::parse`], shared
//! with compilation.

mod walk;

#[cfg(test)]
mod tests;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};

use full_moon::LuaVersion;

pub use crate::diagnostic::MAX_PER_MODULE;
use crate::error::Result;
use crate::vm::parse::{is_shallow, on_parser_stack};
use walk::{Scope, Walker};

/// Global names a module may never use, whatever the sandbox grants: each
/// use (read or write) is a [`FindingKind::ForbiddenConstruct`], unless the
/// name is a local in scope.
const FORBIDDEN_GLOBALS: &[&str] = &[
    "getfenv",
    "setfenv",
    "loadstring",
    "load",
    "dofile",
    "loadfile",
    "_G",
    "_ENV",
    "debug",
    "newproxy",
    "collectgarbage",
];

/// Globals that Graft provides in every sandbox, accepted without asking the
/// caller's predicate.
const GRAFT_GLOBALS: &[&str] = &["graft", "require"];

const DYNAMIC_REQUIRE: &str =
    "`require` needs a module name as a string literal so the dependency graph can be checked";

/// The result of [`analyze`]: the module's static dependencies and every
/// problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceAnalysis {
    /// Modules named by `require` with a string literal, in source order,
    /// each once (at its first position). Empty when the source does not
    /// parse.
    pub requires: Vec<Require>,
    /// The first [`MAX_PER_MODULE`] problems by position, in that order.
    /// Empty for a clean module.
    pub findings: Vec<Finding>,
    /// Problems found past those in `findings`, counted only.
    pub more: usize,
}

/// One static dependency: `require("module")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Require {
    /// The module name, exactly as written in the string literal (e.g.
    /// `chat.room`).
    pub module: String,
    /// 1-based line of the `require` token.
    pub line: usize,
    /// 1-based column (in characters) of the `require` token.
    pub column: usize,
}

/// One problem found by [`analyze`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind of problem this is.
    pub kind: FindingKind,
    /// A human readable explanation, naming the offending name and saying
    /// why it is refused.
    pub message: String,
    /// 1-based line of the offending token.
    pub line: usize,
    /// 1-based column (in characters) of the offending token.
    pub column: usize,
}

/// The kinds of problem [`analyze`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FindingKind {
    /// The source is not valid Luau; the message is the parser's.
    SyntaxError,
    /// A read of a global that is not a Luau builtin, not `graft`, and not a
    /// capability granted to the sandbox.
    UngrantedGlobal,
    /// An assignment to a global name (including `function foo() end`).
    GlobalAssignment,
    /// A use of a forbidden global (`getfenv`, `_G`, `debug`, `load`, …), or
    /// an assignment into a builtin or capability table.
    ForbiddenConstruct,
    /// A `require` whose argument is not a single string literal, or a
    /// `require` that is not called directly.
    DynamicRequire,
}

/// Analyzes one Luau module source, on a thread with a stack of
/// [`PARSER_STACK_BYTES`](crate::vm::parse::PARSER_STACK_BYTES) unless it is small and shallow. The source should
/// be one Luau compiled (see the module documentation: that bounds its
/// nesting).
///
/// `is_known_global(name)` says whether the sandbox provides the global
/// `name` (a Luau builtin such as those of [`LUAU_SAFE_GLOBALS`](crate::vm::LUAU_SAFE_GLOBALS), or a
/// granted capability). `graft` and `require` are always known; the
/// forbidden names (`getfenv`, `_G`, `debug`, `load`, …; see the module
/// documentation) are refused even when the predicate accepts them.
///
/// A source that does not parse yields exactly one
/// [`FindingKind::SyntaxError`] and no requires. Fails only if the parser
/// thread cannot start or panics.
pub fn analyze(
    source: &str,
    is_known_global: &(dyn Fn(&str) -> bool + Sync),
) -> Result<SourceAnalysis> {
    if is_shallow(source) {
        return Ok(analyze_here(source, is_known_global));
    }
    on_parser_stack(|| analyze_here(source, is_known_global))
}

/// full_moon panics on some malformed sources (found by fuzzing: `@`
/// without a name, a NUL byte before a type): behind this barrier such a
/// source is a syntax error, never a panic in the caller.
fn analyze_here(source: &str, is_known_global: &(dyn Fn(&str) -> bool + Sync)) -> SourceAnalysis {
    let analysed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        analyze_unguarded(source, is_known_global)
    }));
    analysed.unwrap_or_else(|_| SourceAnalysis {
        requires: Vec::new(),
        findings: vec![Finding {
            kind: FindingKind::SyntaxError,
            message: "the syntax checker cannot read this source (look for stray characters such as NUL bytes or a lone `@`)".into(),
            line: 1,
            column: 1,
        }],
        more: 0,
    })
}

fn analyze_unguarded(
    source: &str,
    is_known_global: &(dyn Fn(&str) -> bool + Sync),
) -> SourceAnalysis {
    let parsed = full_moon::parse_fallible(source, LuaVersion::luau());
    if let Some(error) = parsed.errors().first() {
        let (start, _) = error.range();
        let message = match error {
            full_moon::Error::TokenizerError(e) => e.error().to_string(),
            other => other.error_message().into_owned(),
        };
        return SourceAnalysis {
            requires: Vec::new(),
            findings: vec![Finding {
                kind: FindingKind::SyntaxError,
                message,
                line: start.line().max(1),
                column: start.character().max(1),
            }],
            more: 0,
        };
    }

    let mut walker = Walker {
        is_known_global,
        scope: Scope::default(),
        requires: Vec::new(),
        findings: Kept::default(),
        reported: HashSet::new(),
    };
    walker.block(parsed.ast().nodes());

    let mut requires = walker.requires;
    requires.sort_by_key(|r| (r.line, r.column));
    let mut seen = HashSet::new();
    requires.retain(|r| seen.insert(r.module.clone()));

    SourceAnalysis {
        requires,
        more: walker.findings.more,
        findings: walker.findings.into_sorted(),
    }
}

/// The first [`MAX_PER_MODULE`] findings by position, and a count of the
/// others.
#[derive(Default)]
struct Kept {
    /// A max-heap by position: its top is the last finding kept.
    heap: BinaryHeap<ByPosition>,
    more: usize,
}

struct ByPosition(Finding);

impl ByPosition {
    fn key(&self) -> (usize, usize) {
        (self.0.line, self.0.column)
    }
}

impl PartialEq for ByPosition {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for ByPosition {}
impl PartialOrd for ByPosition {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByPosition {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl Kept {
    /// Offers a finding at (line, column); its message is built only if it
    /// is kept.
    fn offer(
        &mut self,
        kind: FindingKind,
        line: usize,
        column: usize,
        message: impl FnOnce() -> String,
    ) {
        if self.heap.len() >= MAX_PER_MODULE {
            match self.heap.peek() {
                Some(last) if (line, column) < last.key() => {
                    self.heap.pop();
                }
                _ => {
                    self.more += 1;
                    return;
                }
            }
            self.more += 1;
        }
        self.heap.push(ByPosition(Finding {
            kind,
            message: message(),
            line,
            column,
        }));
    }

    fn into_sorted(self) -> Vec<Finding> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|f| f.0)
            .collect()
    }
}
