//! The walk over a parsed module: a lexical scope model and the findings
//! it reports (see the [module docs](super)).

use std::collections::{HashMap, HashSet};

use full_moon::ast::luau::IfExpression;
use full_moon::ast::{
    Block, Call, Expression, Field, FunctionArgs, FunctionBody, FunctionName, If, Index, LastStmt,
    Parameter, Prefix, Stmt, Suffix, Var, VarExpression,
};
use full_moon::tokenizer::{TokenReference, TokenType};

use super::{FindingKind, Kept, Require, DYNAMIC_REQUIRE, FORBIDDEN_GLOBALS, GRAFT_GLOBALS};

/// Locals in scope: a stack for scope ends, and a count per name so a
/// lookup costs one hash, however many locals are in scope.
#[derive(Default)]
pub(super) struct Scope {
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
pub(super) struct Walker<'a> {
    pub(super) is_known_global: &'a (dyn Fn(&str) -> bool + Sync),
    pub(super) scope: Scope,
    pub(super) requires: Vec<Require>,
    pub(super) findings: Kept,
    /// (line, column) of every token already reported on.
    pub(super) reported: HashSet<(usize, usize)>,
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

    pub(super) fn block(&mut self, block: &Block) {
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
