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
//!   runs on a thread with a stack of [`PARSER_STACK_BYTES`]. Sources reach
//!   [`analyze`] only after Luau compiled them, and Luau refuses nesting past
//!   its own recursion limit, which bounds the depth full_moon sees; that
//!   stack holds ten times what the deepest such source needs. Small,
//!   shallow sources (up to 16 KiB and 12 levels by [`nesting_exceeds`]) are
//!   parsed on the caller's thread instead: for them, starting a thread
//!   costs more than the parse. A source Luau refused is parsed again only
//!   by [`syntax_error_column`], and only up to its error line and when
//!   [`nesting_exceeds`] finds it shallow.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use full_moon::ast::luau::IfExpression;
use full_moon::ast::{
    Block, Call, Expression, Field, FunctionArgs, FunctionBody, FunctionName, If, Index, LastStmt,
    Parameter, Prefix, Stmt, Suffix, Var, VarExpression,
};
use full_moon::tokenizer::{
    InterpolatedStringKind, Lexer, LexerResult, Symbol, TokenReference, TokenType,
};
use full_moon::LuaVersion;

pub use crate::diagnostic::MAX_PER_MODULE;
use crate::error::{Error, Result};

/// Stack of the thread full_moon parses on (reserved address space: only
/// the pages a parse touches are used). The deepest nesting Luau accepts
/// (about 1000 levels) needs about 24 MiB.
pub const PARSER_STACK_BYTES: usize = 256 << 20;

/// Nesting, as [`nesting_exceeds`] estimates it, up to which a source Luau
/// refused is parsed again to find the column of its error.
const MAX_RECHECK_DEPTH: usize = 1000;

/// The Luau builtins a Graft sandbox exposes to every module, without any
/// grant.
///
/// Deliberately absent:
/// * `os`: in Luau it holds only `time`, `clock`, `date` and `difftime`, i.e.
///   the wall clock, which is a capability (granted as `clock`); it is known
///   only where granted.
/// * `collectgarbage`, `newproxy`, `getfenv`, `setfenv`, `loadstring`,
///   `load`, `dofile`, `loadfile`, `debug`, `_G`, `_ENV`: forbidden
///   constructs, refused by [`analyze`] even if the predicate accepts them.
/// * `gcinfo`: it reports the heap shared by every process of the sandbox,
///   so the sandbox does not install it.
/// * `graft` and `require`: provided by Graft itself, not Luau; [`analyze`]
///   accepts them whatever the caller's predicate says.
///
/// `math` is listed although `math.random` is itself a capability: the
/// analysis works on global names, and the VM removes the field when
/// randomness is not granted.
pub const LUAU_SAFE_GLOBALS: &[&str] = &[
    "assert",
    "error",
    "ipairs",
    "next",
    "pairs",
    "pcall",
    "xpcall",
    "print",
    "rawequal",
    "rawget",
    "rawlen",
    "rawset",
    "select",
    "setmetatable",
    "getmetatable",
    "tonumber",
    "tostring",
    "type",
    "typeof",
    "unpack",
    "bit32",
    "buffer",
    "coroutine",
    "math",
    "string",
    "table",
    "utf8",
    "vector",
];

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
/// [`PARSER_STACK_BYTES`] unless it is small and shallow. The source should
/// be one Luau compiled (see the module documentation: that bounds its
/// nesting).
///
/// `is_known_global(name)` says whether the sandbox provides the global
/// `name` (a Luau builtin such as those of [`LUAU_SAFE_GLOBALS`], or a
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

/// Sources up to this size whose nesting [`nesting_exceeds`] puts at most
/// [`INLINE_PARSE_DEPTH`] are parsed on the caller's thread: starting a
/// thread costs more than parsing them (eval chunks, small modules).
const INLINE_PARSE_BYTES: usize = 16 * 1024;
/// About 20 KiB of stack per level: a few hundred KiB at most, on a caller
/// that has the usual 2 MiB or more.
const INLINE_PARSE_DEPTH: usize = 12;

fn is_shallow(source: &str) -> bool {
    source.len() <= INLINE_PARSE_BYTES && !nesting_exceeds(source, INLINE_PARSE_DEPTH)
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

/// Runs `f` on a scoped thread with a stack of [`PARSER_STACK_BYTES`].
fn on_parser_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T> {
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

/// Locals in scope: a stack for scope ends, and a count per name so a
/// lookup costs one hash, however many locals are in scope.
#[derive(Default)]
struct Scope {
    /// Locals in declaration order, innermost last.
    names: Vec<String>,
    /// `names.len()` at the opening of each open scope.
    marks: Vec<usize>,
    /// How many locals of each name are in scope.
    counts: HashMap<String, u32>,
}

impl Scope {
    fn open(&mut self) {
        self.marks.push(self.names.len());
    }

    fn close(&mut self) {
        let mark = self.marks.pop().unwrap_or(0);
        for name in self.names.drain(mark..) {
            if let Some(n) = self.counts.get_mut(&name) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&name);
                }
            }
        }
    }

    fn declare(&mut self, name: String) {
        *self.counts.entry(name.clone()).or_insert(0) += 1;
        self.names.push(name);
    }

    fn contains(&self, name: &str) -> bool {
        self.counts.contains_key(name)
    }
}

/// The walker: a lexical scope model plus what it found.
struct Walker<'a> {
    is_known_global: &'a (dyn Fn(&str) -> bool + Sync),
    scope: Scope,
    requires: Vec<Require>,
    findings: Kept,
    /// (line, column) of every token already reported on.
    reported: HashSet<(usize, usize)>,
}

/// The text of an identifier token.
fn name_of(token: &TokenReference) -> String {
    match token.token().token_type() {
        TokenType::Identifier { identifier } => identifier.to_string(),
        _ => token.token().to_string(),
    }
}

/// 1-based (line, column) of a token.
fn position_of(token: &TokenReference) -> (usize, usize) {
    let p = token.token().start_position();
    (p.line(), p.character())
}

/// The module name of `require "m"` / `require("m")`, when the arguments
/// are exactly one string literal.
fn literal_module(args: &FunctionArgs) -> Option<String> {
    let token = match args {
        FunctionArgs::String(token) => token,
        FunctionArgs::Parentheses { arguments, .. } if arguments.len() == 1 => {
            match arguments.iter().next() {
                Some(Expression::String(token)) => token,
                _ => return None,
            }
        }
        _ => return None,
    };
    match token.token().token_type() {
        TokenType::StringLiteral { literal, .. } => Some(literal.to_string()),
        _ => None,
    }
}

/// Why a forbidden global is refused.
fn forbidden_message(name: &str) -> String {
    let why = match name {
        "getfenv" | "setfenv" => {
            "reading or replacing function environments breaks the isolation between modules and processes"
        }
        "loadstring" | "load" => {
            "compiling code at run time bypasses the checks of a reload; ship code as modules"
        }
        "dofile" | "loadfile" => {
            "there is no filesystem in a Graft sandbox; load code with `require`"
        }
        "_G" | "_ENV" => {
            "the global table is shared by every module and process of the sandbox; use locals or `require`"
        }
        "debug" => {
            "it can read and alter other functions' locals and upvalues, breaking the isolation between modules and processes"
        }
        "newproxy" => {
            "it is not available in a Graft sandbox: userdata cannot be copied between processes; use tables"
        }
        "collectgarbage" => {
            "it is not available in a Graft sandbox: the collector is shared by every process; memory is bounded by the sandbox's `memory_bytes` limit"
        }
        _ => "it is not available in a Graft sandbox",
    };
    format!("`{name}` is forbidden: {why}")
}

impl Walker<'_> {
    // ----- scopes -----

    fn open(&mut self) {
        self.scope.open();
    }

    fn close(&mut self) {
        self.scope.close();
    }

    fn declare(&mut self, token: &TokenReference) {
        self.scope.declare(name_of(token));
    }

    fn is_local(&self, name: &str) -> bool {
        self.scope.contains(name)
    }

    fn is_known(&self, name: &str) -> bool {
        GRAFT_GLOBALS.contains(&name) || (self.is_known_global)(name)
    }

    // ----- findings -----

    fn report(
        &mut self,
        kind: FindingKind,
        token: &TokenReference,
        message: impl FnOnce() -> String,
    ) {
        let (line, column) = position_of(token);
        if self.reported.insert((line, column)) {
            self.findings.offer(kind, line, column, message);
        }
    }

    /// A read of the name `token`.
    fn read_name(&mut self, token: &TokenReference) {
        let name = name_of(token);
        if self.is_local(&name) {
            return;
        }
        if FORBIDDEN_GLOBALS.contains(&name.as_str()) {
            self.report(FindingKind::ForbiddenConstruct, token, || {
                forbidden_message(&name)
            });
        } else if name == "require" {
            // Not called directly (aliased, passed along): the dependency is
            // invisible to the graph.
            self.report(FindingKind::DynamicRequire, token, || {
                DYNAMIC_REQUIRE.to_owned()
            });
        } else if !self.is_known(&name) {
            self.report(
                FindingKind::UngrantedGlobal,
                token,
                || format!(
                    "unknown global `{name}`: not a Luau builtin, not `graft`, and no capability of that name is granted to this sandbox"
                ),
            );
        }
    }

    /// An assignment to the bare name `token`.
    fn write_name(&mut self, token: &TokenReference) {
        let name = name_of(token);
        if self.is_local(&name) {
            return;
        }
        if FORBIDDEN_GLOBALS.contains(&name.as_str()) {
            self.report(FindingKind::ForbiddenConstruct, token, || {
                forbidden_message(&name)
            });
        } else {
            self.report(
                FindingKind::GlobalAssignment,
                token,
                || format!(
                    "assignment to global `{name}`: module state must live in locals or process state; write `local {name}`"
                ),
            );
        }
    }

    /// The base name of an assignment into a table (`base.x = …`,
    /// `function base.f() end`). Returns true when it was fully handled.
    fn write_into(&mut self, base: &TokenReference) -> bool {
        let name = name_of(base);
        if self.is_local(&name) || FORBIDDEN_GLOBALS.contains(&name.as_str()) {
            return false;
        }
        if self.is_known(&name) {
            self.report(
                FindingKind::ForbiddenConstruct,
                base,
                || format!(
                    "modifying the builtin `{name}`: builtins and capabilities are shared by every module and process of the sandbox; put the value in a local table instead"
                ),
            );
            return true;
        }
        false
    }

    // ----- statements -----

    fn block(&mut self, block: &Block) {
        self.open();
        self.block_body(block);
        self.close();
    }

    /// The statements of a block, in the current scope (so `repeat … until`
    /// can see them from its condition).
    fn block_body(&mut self, block: &Block) {
        for stmt in block.stmts() {
            self.stmt(stmt);
        }
        // `break` and `continue` read nothing.
        if let Some(LastStmt::Return(ret)) = block.last_stmt() {
            for e in ret.returns().iter() {
                self.expr(e);
            }
        }
    }

    fn stmt(&mut self, stmt: &Stmt) {
        match stmt {
            Stmt::Assignment(a) => {
                for var in a.variables().iter() {
                    self.assign_target(var);
                }
                for e in a.expressions().iter() {
                    self.expr(e);
                }
            }
            Stmt::CompoundAssignment(c) => {
                self.assign_target(c.lhs());
                self.expr(c.rhs());
            }
            Stmt::LocalAssignment(l) => {
                for e in l.expressions().iter() {
                    self.expr(e);
                }
                for name in l.names().iter() {
                    self.declare(name);
                }
            }
            Stmt::ConstAssignment(c) => {
                for e in c.expressions().iter() {
                    self.expr(e);
                }
                for name in c.names().iter() {
                    self.declare(name);
                }
            }
            Stmt::LocalFunction(f) => {
                self.declare(f.name());
                self.function_body(f.body(), false);
            }
            Stmt::ConstFunction(f) => {
                self.declare(f.name());
                self.function_body(f.body(), false);
            }
            Stmt::FunctionDeclaration(f) => {
                self.function_name(f.name());
                self.function_body(f.body(), f.name().method_name().is_some());
            }
            Stmt::FunctionCall(call) => {
                let suffixes: Vec<&Suffix> = call.suffixes().collect();
                self.chain(call.prefix(), &suffixes);
            }
            Stmt::Do(d) => self.block(d.block()),
            Stmt::While(w) => {
                self.expr(w.condition());
                self.block(w.block());
            }
            Stmt::Repeat(r) => {
                self.open();
                self.block_body(r.block());
                self.expr(r.until());
                self.close();
            }
            Stmt::If(i) => self.if_stmt(i),
            Stmt::NumericFor(f) => {
                self.expr(f.start());
                self.expr(f.end());
                if let Some(step) = f.step() {
                    self.expr(step);
                }
                self.open();
                self.declare(f.index_variable());
                self.block(f.block());
                self.close();
            }
            Stmt::GenericFor(f) => {
                for e in f.expressions().iter() {
                    self.expr(e);
                }
                self.open();
                for name in f.names().iter() {
                    self.declare(name);
                }
                self.block(f.block());
                self.close();
            }
            // Type declarations and type functions only exist for the type
            // checker: nothing in them runs.
            Stmt::TypeDeclaration(_)
            | Stmt::ExportedTypeDeclaration(_)
            | Stmt::TypeFunction(_)
            | Stmt::ExportedTypeFunction(_) => {}
            _ => {}
        }
    }

    fn if_stmt(&mut self, i: &If) {
        self.open();
        self.expr(i.condition());
        if let Some(binding) = i.binding() {
            self.declare(binding.name());
        }
        self.block(i.block());
        self.close();
        for else_if in i.else_if().into_iter().flatten() {
            self.open();
            self.expr(else_if.condition());
            if let Some(binding) = else_if.binding() {
                self.declare(binding.name());
            }
            self.block(else_if.block());
            self.close();
        }
        if let Some(else_block) = i.else_block() {
            self.block(else_block);
        }
    }

    /// The name of `function a.b.c:m() end`.
    fn function_name(&mut self, name: &FunctionName) {
        let mut names = name.names().iter();
        let Some(base) = names.next() else { return };
        let is_path = names.next().is_some() || name.method_name().is_some();
        if !is_path {
            self.write_name(base);
        } else if !self.write_into(base) {
            self.read_name(base);
        }
    }

    /// A function body: parameters (and `self` for methods) are locals of
    /// the body. Types, generics and the return type are skipped.
    fn function_body(&mut self, body: &FunctionBody, method: bool) {
        self.open();
        if method {
            self.scope.declare("self".to_owned());
        }
        for parameter in body.parameters().iter() {
            match parameter {
                Parameter::Name(token) => self.declare(token),
                // `...` is not a name: nothing to declare.
                Parameter::Ellipsis(_) => {}
                _ => {}
            }
        }
        self.block(body.block());
        self.close();
    }

    /// The target of an assignment.
    fn assign_target(&mut self, var: &Var) {
        match var {
            Var::Name(token) => self.write_name(token),
            Var::Expression(ve) => self.assign_into(ve),
            _ => {}
        }
    }

    /// `base.a.b = …` / `base[k] = …`: a store into a table.
    fn assign_into(&mut self, ve: &VarExpression) {
        let suffixes: Vec<&Suffix> = ve.suffixes().collect();
        if let Prefix::Name(base) = ve.prefix() {
            let only_indexes = suffixes.iter().all(|s| matches!(s, Suffix::Index(_)));
            if only_indexes && self.write_into(base) {
                for s in suffixes {
                    self.suffix(s);
                }
                return;
            }
        }
        self.chain(ve.prefix(), &suffixes);
    }

    // ----- expressions -----

    /// `prefix suffix…`: a variable, a call or an index chain.
    fn chain(&mut self, prefix: &Prefix, suffixes: &[&Suffix]) {
        match prefix {
            Prefix::Name(token) if name_of(token) == "require" && !self.is_local("require") => {
                match suffixes.first() {
                    Some(Suffix::Call(Call::AnonymousCall(args))) => match literal_module(args) {
                        Some(module) => {
                            let (line, column) = position_of(token);
                            self.requires.push(Require {
                                module,
                                line,
                                column,
                            });
                        }
                        None => self.report(FindingKind::DynamicRequire, token, || {
                            DYNAMIC_REQUIRE.to_owned()
                        }),
                    },
                    _ => self.report(FindingKind::DynamicRequire, token, || {
                        DYNAMIC_REQUIRE.to_owned()
                    }),
                }
            }
            Prefix::Name(token) => self.read_name(token),
            Prefix::Expression(e) => self.expr(e),
            _ => {}
        }
        for s in suffixes {
            self.suffix(s);
        }
    }

    fn suffix(&mut self, suffix: &Suffix) {
        match suffix {
            Suffix::Call(Call::AnonymousCall(args)) => self.args(args),
            Suffix::Call(Call::MethodCall(m)) => self.args(m.args()),
            Suffix::Index(Index::Brackets { expression, .. }) => self.expr(expression),
            // `.name`, type instantiations: nothing is read.
            _ => {}
        }
    }

    fn args(&mut self, args: &FunctionArgs) {
        match args {
            FunctionArgs::Parentheses { arguments, .. } => {
                for e in arguments.iter() {
                    self.expr(e);
                }
            }
            FunctionArgs::TableConstructor(t) => self.table(t),
            _ => {} // a string literal
        }
    }

    fn table(&mut self, table: &full_moon::ast::TableConstructor) {
        for field in table.fields().iter() {
            match field {
                Field::ExpressionKey { key, value, .. } => {
                    self.expr(key);
                    self.expr(value);
                }
                Field::NameKey { value, .. } => self.expr(value),
                Field::NoKey(value) => self.expr(value),
                _ => {}
            }
        }
    }

    fn if_expr(&mut self, i: &IfExpression) {
        self.open();
        self.expr(i.condition());
        if let Some(binding) = i.binding() {
            self.declare(binding.name());
        }
        self.expr(i.if_expression());
        self.close();
        for else_if in i.else_if_expressions().into_iter().flatten() {
            self.open();
            self.expr(else_if.condition());
            if let Some(binding) = else_if.binding() {
                self.declare(binding.name());
            }
            self.expr(else_if.expression());
            self.close();
        }
        self.expr(i.else_expression());
    }

    fn expr(&mut self, e: &Expression) {
        match e {
            Expression::BinaryOperator { lhs, rhs, .. } => {
                self.expr(lhs);
                self.expr(rhs);
            }
            Expression::Parentheses { expression, .. } => self.expr(expression),
            Expression::UnaryOperator { expression, .. } => self.expr(expression),
            Expression::Function(f) => self.function_body(f.body(), false),
            Expression::FunctionCall(call) => {
                let suffixes: Vec<&Suffix> = call.suffixes().collect();
                self.chain(call.prefix(), &suffixes);
            }
            Expression::IfExpression(i) => self.if_expr(i),
            Expression::InterpolatedString(s) => {
                for e in s.expressions() {
                    self.expr(e);
                }
            }
            Expression::TableConstructor(t) => self.table(t),
            // `expr :: Type`: only the expression runs.
            Expression::TypeAssertion { expression, .. } => self.expr(expression),
            Expression::Var(Var::Name(token)) => self.read_name(token),
            Expression::Var(Var::Expression(ve)) => {
                let suffixes: Vec<&Suffix> = ve.suffixes().collect();
                self.chain(ve.prefix(), &suffixes);
            }
            // Numbers, strings, `nil`/`true`/`false`/`...`.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sandbox of most tests: Luau builtins plus a granted `kv`.
    fn known(name: &str) -> bool {
        LUAU_SAFE_GLOBALS.contains(&name) || name == "kv"
    }

    fn run(source: &str) -> SourceAnalysis {
        analyze(source, &known).expect("parser thread")
    }

    fn kinds(a: &SourceAnalysis) -> Vec<FindingKind> {
        a.findings.iter().map(|f| f.kind.clone()).collect()
    }

    /// (kind, line, column) of every finding.
    fn at(a: &SourceAnalysis) -> Vec<(FindingKind, usize, usize)> {
        a.findings
            .iter()
            .map(|f| (f.kind.clone(), f.line, f.column))
            .collect()
    }

    fn modules(a: &SourceAnalysis) -> Vec<&str> {
        a.requires.iter().map(|r| r.module.as_str()).collect()
    }

    #[test]
    fn a_clean_server_module_has_no_findings() {
        let a = run(r#"
local counter = {}
function counter.init(args)
  return { count = args.start or 0 }
end
function counter.handle_call(req, from, state)
  if req == "inc" then state.count += 1 end
  graft.log.info("count", state.count)
  return state.count, state
end
return counter
"#);
        assert_eq!(a.findings, vec![]);
        assert_eq!(a.requires, vec![]);
    }

    #[test]
    fn requires_in_all_literal_forms_in_source_order() {
        let a = run("local a = require(\"a\")\nlocal b = require 'b.c'\nlocal c = require [[d]]\n");
        assert_eq!(
            a.requires,
            vec![
                Require {
                    module: "a".into(),
                    line: 1,
                    column: 11
                },
                Require {
                    module: "b.c".into(),
                    line: 2,
                    column: 11
                },
                Require {
                    module: "d".into(),
                    line: 3,
                    column: 11
                },
            ]
        );
        assert_eq!(a.findings, vec![]);
    }

    #[test]
    fn requires_are_deduplicated_keeping_the_first_position() {
        let a = run("local x = require('m')\nlocal y = require('n')\nlocal z = require('m')\n");
        assert_eq!(modules(&a), vec!["m", "n"]);
        assert_eq!((a.requires[0].line, a.requires[0].column), (1, 11));
    }

    #[test]
    fn nested_requires_are_found() {
        let a = run(
            "local M = {}\nfunction M.f()\n  local t = { dep = require('inner').x }\n  return (function() return require('deep') end)()\nend\nreturn M\n",
        );
        assert_eq!(modules(&a), vec!["inner", "deep"]);
        assert_eq!((a.requires[0].line, a.requires[0].column), (3, 21));
        assert_eq!((a.requires[1].line, a.requires[1].column), (4, 29));
        assert_eq!(a.findings, vec![]);
    }

    #[test]
    fn dynamic_require_is_reported() {
        let a = run("local name = 'x'\nlocal m = require(name)\nlocal n = require('a' .. 'b')\nlocal o = require('a', 'b')\nlocal p = require()\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::DynamicRequire, 2, 11),
                (FindingKind::DynamicRequire, 3, 11),
                (FindingKind::DynamicRequire, 4, 11),
                (FindingKind::DynamicRequire, 5, 11),
            ]
        );
        assert!(a.findings[0].message.contains("string literal"));
        assert_eq!(a.requires, vec![]);
    }

    #[test]
    fn aliasing_require_is_a_dynamic_require() {
        let a = run("local r = require\nreturn r('x')\n");
        assert_eq!(at(&a), vec![(FindingKind::DynamicRequire, 1, 11)]);
    }

    #[test]
    fn a_local_named_require_is_not_a_dependency() {
        let a = run("local function require(x) return x end\nlocal m = require('nope')\n");
        assert_eq!(a.requires, vec![]);
        assert_eq!(a.findings, vec![]);
    }

    #[test]
    fn ungranted_global_read_is_reported_at_the_identifier() {
        let a = run("local x = 1\nlocal data = fs.read('/etc/passwd')\n");
        assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 2, 14)]);
        assert_eq!(
            a.findings[0].message,
            "unknown global `fs`: not a Luau builtin, not `graft`, and no capability of that name is granted to this sandbox"
        );
    }

    #[test]
    fn builtins_graft_and_granted_capabilities_are_fine() {
        let a = run("local s = string.format('%d', math.floor(1.5))\nkv.put('k', s)\ngraft.send(graft.self(), s)\nprint(typeof(s), #table.pack(1))\n");
        assert_eq!(a.findings, vec![]);
        // The same module where `kv` is not granted.
        let b = analyze("kv.put('k', 1)\n", &|n| LUAU_SAFE_GLOBALS.contains(&n)).unwrap();
        assert_eq!(at(&b), vec![(FindingKind::UngrantedGlobal, 1, 1)]);
    }

    #[test]
    fn os_is_a_capability_not_a_builtin() {
        assert!(!LUAU_SAFE_GLOBALS.contains(&"os"));
        let a = run("return os.time()\n");
        assert_eq!(kinds(&a), vec![FindingKind::UngrantedGlobal]);
        let b = analyze("return os.time()\n", &|n| n == "os").unwrap();
        assert_eq!(b.findings, vec![]);
    }

    #[test]
    fn every_read_position_is_reported() {
        let a = run("local a = net\nlocal b = net\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::UngrantedGlobal, 1, 11),
                (FindingKind::UngrantedGlobal, 2, 11)
            ]
        );
    }

    #[test]
    fn shadowing_and_scope_end() {
        let a = run("do\n  local fs = {}\n  fs.x = 1\nend\nreturn fs\n");
        assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 5, 8)]);
        // A local shadows a builtin, and an initializer sees the outer name.
        let b = run("local string = string\nlocal x = x\n");
        assert_eq!(at(&b), vec![(FindingKind::UngrantedGlobal, 2, 11)]);
    }

    #[test]
    fn local_function_sees_itself_but_local_assigned_function_does_not() {
        let a = run("local function fact(n)\n  if n <= 1 then return 1 end\n  return n * fact(n - 1)\nend\nlocal fib = function(n) return fib(n - 1) end\n");
        assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 5, 32)]);
    }

    #[test]
    fn later_locals_are_not_visible_earlier() {
        let a = run("local function a() return b() end\nlocal function b() return 1 end\n");
        assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 1, 27)]);
    }

    #[test]
    fn repeat_until_condition_sees_body_locals() {
        let a =
            run("local n = 0\nrepeat\n  local done = n > 3\n  n += 1\nuntil done\nreturn done\n");
        assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 6, 8)]);
    }

    #[test]
    fn for_variables_are_not_visible_after_the_loop() {
        let a = run("for i = 1, 3 do print(i) end\nfor k, v in pairs({}) do print(k, v) end\nreturn i, k, v\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::UngrantedGlobal, 3, 8),
                (FindingKind::UngrantedGlobal, 3, 11),
                (FindingKind::UngrantedGlobal, 3, 14),
            ]
        );
    }

    #[test]
    fn for_loop_bounds_are_evaluated_outside_the_loop_scope() {
        let a = run("for i = 1, i do end\nfor k in next, k do end\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::UngrantedGlobal, 1, 12),
                (FindingKind::UngrantedGlobal, 2, 16)
            ]
        );
    }

    #[test]
    fn parameters_and_varargs_are_locals_of_the_body_only() {
        let a = run("local function f(a, b, ...)\n  local t = { a, b, ... }\n  return select('#', ...)\nend\nreturn a\n");
        assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 5, 8)]);
    }

    #[test]
    fn methods_get_self_and_plain_functions_do_not() {
        let a = run("local M = {}\nfunction M:get() return self.x end\nfunction M.bad() return self end\nreturn M\n");
        assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 3, 25)]);
    }

    #[test]
    fn global_assignment_forms() {
        let a = run(
            "x = 1\nfunction foo() end\nlocal function g()\n  function bar() end\n  y += 1\nend\n",
        );
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::GlobalAssignment, 1, 1),
                (FindingKind::GlobalAssignment, 2, 10),
                (FindingKind::GlobalAssignment, 4, 12),
                (FindingKind::GlobalAssignment, 5, 3),
            ]
        );
        assert_eq!(
            a.findings[0].message,
            "assignment to global `x`: module state must live in locals or process state; write `local x`"
        );
    }

    #[test]
    fn assigning_locals_and_their_fields_is_fine() {
        let a = run("local M, n = {}, 0\nn = 2\nM.count = n\nM['k'] = 1\nfunction M.f() end\nfunction M:g() end\nlocal function h() end\nfunction h() end\n");
        assert_eq!(a.findings, vec![]);
    }

    #[test]
    fn field_of_unknown_global_is_an_ungranted_global() {
        let a = run("cache.x = 1\nfunction store.put() end\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::UngrantedGlobal, 1, 1),
                (FindingKind::UngrantedGlobal, 2, 10)
            ]
        );
    }

    #[test]
    fn modifying_a_builtin_is_forbidden() {
        let a = run("string.foo = 1\nfunction table.bar() end\nfunction string:baz() end\nmath.pi += 1\ngraft.log = nil\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::ForbiddenConstruct, 1, 1),
                (FindingKind::ForbiddenConstruct, 2, 10),
                (FindingKind::ForbiddenConstruct, 3, 10),
                (FindingKind::ForbiddenConstruct, 4, 1),
                (FindingKind::ForbiddenConstruct, 5, 1),
            ]
        );
        assert!(a.findings[0]
            .message
            .contains("modifying the builtin `string`"));
        // Storing into a value returned by a builtin is not modifying it.
        let b = run("local s = setmetatable({}, {})\ngetmetatable(s).x = 1\n");
        assert_eq!(b.findings, vec![]);
    }

    #[test]
    fn forbidden_globals_even_when_the_sandbox_claims_them() {
        let source = "local f = loadstring('x')\nlocal e = getfenv(1)\n_G.x = 1\nlocal t = debug.traceback()\ncollectgarbage()\nlocal p = newproxy()\nload('')\ndofile('a')\nloadfile('b')\nsetfenv(1, {})\nlocal env = _ENV\n";
        let a = analyze(source, &|_| true).unwrap();
        assert_eq!(a.findings.len(), 11, "{a:#?}");
        assert!(a
            .findings
            .iter()
            .all(|f| f.kind == FindingKind::ForbiddenConstruct));
        assert_eq!((a.findings[0].line, a.findings[0].column), (1, 11));
        assert_eq!((a.findings[2].line, a.findings[2].column), (3, 1));
        assert!(a.findings[0].message.contains("`loadstring` is forbidden"));
        assert!(a.findings[2].message.contains("shared by every module"));
        assert!(a.findings[4]
            .message
            .contains("not available in a Graft sandbox"));
    }

    #[test]
    fn forbidden_names_as_locals_or_fields_are_fine() {
        let a = run("local debug = false\nlocal t = { load = 1 }\nt.load = debug\nreturn t.load\n");
        assert_eq!(a.findings, vec![]);
    }

    #[test]
    fn assigning_a_forbidden_global_is_forbidden() {
        let a = run("_G = {}\nfunction setfenv() end\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::ForbiddenConstruct, 1, 1),
                (FindingKind::ForbiddenConstruct, 2, 10)
            ]
        );
    }

    #[test]
    fn syntax_error_is_a_single_finding_with_position() {
        let a = run("local ok = require('a')\nlocal c = = 3\n");
        assert_eq!(a.requires, vec![]);
        assert_eq!(a.findings.len(), 1, "{a:#?}");
        let f = &a.findings[0];
        assert_eq!(f.kind, FindingKind::SyntaxError);
        // full_moon anchors "expected an expression" on the `=` before the gap.
        assert_eq!((f.line, f.column), (2, 9));
        assert_eq!(f.message, "expected an expression");
    }

    #[test]
    fn tokenizer_error_is_a_syntax_error() {
        let a = run("local s = 'unterminated\n");
        assert_eq!(kinds(&a), vec![FindingKind::SyntaxError]);
        assert_eq!(a.findings[0].line, 1);
        assert_eq!(a.findings[0].message, "unclosed string");
    }

    #[test]
    fn type_annotated_module_parses_and_types_are_not_reads() {
        let a = run(r#"
export type Counter = { count: number, owner: Player? }
type Pair<K, V> = { key: K, value: V }
local Dep = require("types.dep")
local M = {}
function M.init<T>(args: { start: number? }, extra: T): Counter
  local c: Counter = { count = args.start or 0, owner = nil }
  local p = ({ key = "k", value = 1 } :: Pair<string, number>)
  local n: SomeUnknownType = 1
  return c
end
function M.view(x: typeof(M), ...: number): (string, ...any)
  return tostring(x), ...
end
return M
"#);
        assert_eq!(a.findings, vec![], "{a:#?}");
        assert_eq!(modules(&a), vec!["types.dep"]);
    }

    #[test]
    fn luau_expressions_and_statements_are_walked() {
        let a = run("local t = {}\nfor i = 1, 10 do\n  if i % 2 == 0 then continue end\n  t[i] = if i > 5 then big else `{i} is {small}`\nend\nt[1] ..= `done`\nreturn t\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::UngrantedGlobal, 4, 24),
                (FindingKind::UngrantedGlobal, 4, 42)
            ]
        );
    }

    #[test]
    fn table_keys_and_call_arguments_are_reads() {
        let a = run("local t = { [k1] = v1, name = v2, v3 }\nt:m(a1)\nt:m{ a2 }\nreturn t[k2]\n");
        let names: Vec<&str> = a
            .findings
            .iter()
            .map(|f| f.message.split('`').nth(1).unwrap_or(""))
            .collect();
        assert_eq!(names, vec!["k1", "v1", "v2", "v3", "a1", "a2", "k2"]);
        assert!(a
            .findings
            .iter()
            .all(|f| f.kind == FindingKind::UngrantedGlobal));
    }

    #[test]
    fn findings_are_ordered_by_position_and_columns_count_characters() {
        let a = run("local s = 'héllo'; local x = zz\nlocal y = aa\n");
        assert_eq!(
            at(&a),
            vec![
                (FindingKind::UngrantedGlobal, 1, 30),
                (FindingKind::UngrantedGlobal, 2, 11)
            ]
        );
    }

    #[test]
    fn safe_globals_list_excludes_forbidden_names() {
        for name in FORBIDDEN_GLOBALS {
            assert!(!LUAU_SAFE_GLOBALS.contains(name), "{name}");
        }
        for name in [
            "pcall",
            "string",
            "buffer",
            "vector",
            "coroutine",
            "utf8",
            "bit32",
        ] {
            assert!(LUAU_SAFE_GLOBALS.contains(&name), "{name}");
        }
    }

    #[test]
    fn findings_keep_the_first_by_position_and_count_the_rest() {
        let source: String = (0..500).map(|i| format!("x{i} = y{i}\n")).collect();
        let a = run(&source);
        assert_eq!(a.findings.len(), MAX_PER_MODULE);
        assert_eq!(a.more, 1000 - MAX_PER_MODULE);
        let positions: Vec<(usize, usize)> =
            a.findings.iter().map(|f| (f.line, f.column)).collect();
        let expected: Vec<(usize, usize)> = (1..=10).flat_map(|l| [(l, 1), (l, 6)]).collect();
        assert_eq!(positions, expected);
        assert_eq!(a.findings[1].kind, FindingKind::UngrantedGlobal);
        assert!(a.findings[1].message.contains("`y0`"));
    }

    #[test]
    fn findings_out_of_source_order_still_keep_the_first() {
        // A local's initializer is walked before its names, assignment targets
        // before values: the kept set is by position, not by walk order.
        let source = format!("{}local a = b\n", "c = 1\n".repeat(30));
        let a = run(&source);
        assert_eq!(a.findings.len(), MAX_PER_MODULE);
        assert_eq!(a.findings.last().map(|f| f.line), Some(MAX_PER_MODULE));
        assert_eq!(a.more, 31 - MAX_PER_MODULE);
    }

    #[test]
    fn a_shadowing_local_leaves_the_outer_one_in_scope() {
        let a = run("local x = 1\ndo local x = 2 end\nreturn x\n");
        assert_eq!(a.findings, vec![]);
        let b = run("do local x = 2; do local x = 3 end end\nreturn x\n");
        assert_eq!(at(&b), vec![(FindingKind::UngrantedGlobal, 2, 8)]);
    }

    #[test]
    fn thousands_of_locals_are_resolved() {
        let mut source: String = (0..5000).map(|i| format!("local v{i} = {i}\n")).collect();
        source.push_str("return v0 + v4999 + v5000\n");
        let a = run(&source);
        assert_eq!(at(&a), vec![(FindingKind::UngrantedGlobal, 5001, 21)]);
    }

    #[test]
    fn the_deepest_nesting_luau_accepts_is_analysed() {
        // Luau compiles 1000 nested blocks; full_moon needs far more than a
        // default thread stack for them.
        let source = format!("{}{}return {{}}\n", "do ".repeat(1000), "end ".repeat(1000));
        assert!(crate::vm::compile("m", "m.luau", &source, 1 << 20).is_ok());
        assert_eq!(run(&source).findings, vec![]);
        let calls = format!(
            "local f = function() end\nlocal x = {}1{}\nreturn x\n",
            "(".repeat(900),
            ")".repeat(900)
        );
        assert!(crate::vm::compile("m", "m.luau", &calls, 1 << 20).is_ok());
        assert_eq!(run(&calls).findings, vec![]);
    }

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

    #[test]
    fn small_sources_parsed_inline_fit_a_small_stack() {
        // Chains the nesting estimate does not count; any such source Luau
        // accepts and small enough to be parsed inline must fit 1 MiB.
        let chains: [(&str, &str, &str); 12] = [
            ("local x = 1", " + 1", ""),
            ("local x = 'a'", " .. 'a'", ""),
            ("local x = 2", " ^ 1", ""),
            ("local x = 1", " < 2 == true", ""),
            ("local t = {} local x = t", ".a", ""),
            ("local f = print local x = f", "()", ""),
            ("local t = {} local x = t", ":m()", ""),
            ("local f = print local x = f", "'a'", ""),
            ("local t = {} local x = t", "[1]", ""),
            ("local x: number", " | number", " = 1"),
            ("local x: number", "?", " = 1"),
            ("local x = 1", " and 1 or 2", ""),
        ];
        for (head, link, tail) in chains {
            for n in [100, 400, 1600, 6400] {
                let source = format!("{head}{}{tail}\nreturn x\n", link.repeat(n));
                if !is_shallow(&source)
                    || crate::vm::compile("m", "m.luau", &source, 1 << 20).is_err()
                {
                    continue;
                }
                let result = std::thread::Builder::new()
                    .stack_size(1 << 20)
                    .spawn(move || analyze_here(&source, &|_| true).findings.len())
                    .unwrap()
                    .join();
                assert!(result.is_ok(), "{link} x{n}");
            }
        }
    }
}
