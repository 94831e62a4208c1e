//! Compilation of guest sources to bytecode: the one place Luau's compiler
//! runs on untrusted text (bounded in size and wall-clock time).
//!
//! Invariant: only bytecode produced here (or by [`super::load_trusted`] from
//! Graft's own constant sources) is ever loaded: Luau does not verify
//! bytecode.

use std::sync::atomic::{AtomicBool, Ordering};

use mlua::chunk::Compiler;

use super::parse::syntax_error_column;
use crate::diagnostic::Diagnostic;
use crate::error::{Error, Result};

static COVERAGE: AtomicBool = AtomicBool::new(false);

/// Compiles every guest source from now on with Luau's statement coverage
/// counters, for the whole process (`graft test --coverage`), and keeps
/// each evaluated module chunk so [`crate::Sandbox::coverage`] can read
/// its counters. It cannot be turned off: a test runner's process sets it
/// once before it creates sandboxes. Production never calls it (the
/// counters cost an instruction per statement).
///
/// ```
/// graft::vm::enable_coverage();
/// assert!(graft::vm::coverage_enabled());
/// ```
pub fn enable_coverage() {
    COVERAGE.store(true, Ordering::Relaxed);
}

/// Whether [`enable_coverage`] was called.
pub fn coverage_enabled() -> bool {
    COVERAGE.load(Ordering::Relaxed)
}

/// Compiler settings shared by every compile: keep line info for tracebacks.
pub(super) fn compiler() -> Compiler {
    // `math.random` is a capability: its table slot may hold a stub, so the
    // compiler must not turn calls to it into the builtin fast call.
    Compiler::new()
        .set_optimization_level(1)
        .set_debug_level(1)
        .set_coverage_level(if coverage_enabled() { 1 } else { 0 })
        .set_disabled_builtins(["math.random", "math.randomseed"])
}

/// Compiler settings of Graft's own Luau (the prelude, `require`, the
/// supervisor): optimization level 2, which inlines the prelude's small
/// local functions into the message path. Guest code keeps level 1, so its
/// tracebacks and coverage name every function it wrote; the prelude's
/// frames are never shown.
pub(super) fn trusted_compiler() -> Compiler {
    compiler().set_optimization_level(2)
}

/// Compiles a module's source to bytecode (pure: no VM involved, so it can run
/// on any thread). Errors carry module, file, line, column and a code frame.
pub fn compile(module: &str, file: &str, source: &str, max_source_bytes: usize) -> Result<Vec<u8>> {
    if source.len() > max_source_bytes {
        return Err(Error::Compile {
            diagnostics: vec![Diagnostic::new(
                "too_large",
                module,
                file,
                "",
                0,
                0,
                format!(
                    "source is {} bytes; the sandbox accepts at most {max_source_bytes} (limits.max_source_bytes)",
                    source.len()
                ),
            )],
        });
    }
    match compile_bounded(source, module, file)? {
        Ok(bytecode) => Ok(bytecode),
        Err(e) => {
            let text = e.to_string();
            let (line, message) = parse_luau_error(&text);
            // Luau reports lines only; full_moon finds the column when it
            // agrees (and the source is shallow enough to parse again).
            let column = syntax_error_column(source, line).unwrap_or(1);
            Err(Error::Compile {
                diagnostics: vec![Diagnostic::new(
                    "syntax", module, file, source, line, column, message,
                )],
            })
        }
    }
}

/// Sources up to this size compile inline (microseconds); bigger ones compile
/// on a helper thread under [`COMPILE_TIMEOUT`].
const INLINE_COMPILE_BYTES: usize = 64 * 1024;
/// Wall-clock limit for compiling one module. Compiler memory is bounded by
/// `max_source_bytes` (it grows linearly with the source).
pub const COMPILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn compile_bounded(source: &str, module: &str, file: &str) -> Result<mlua::Result<Vec<u8>>> {
    if source.len() <= INLINE_COMPILE_BYTES {
        return Ok(compiler().compile(source));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = source.to_owned();
    std::thread::Builder::new()
        .name("graft-compile".into())
        .spawn(move || {
            let _ = tx.send(compiler().compile(&owned));
        })
        .map_err(|e| Error::Luau(format!("cannot start a compile thread: {e}")))?;
    rx.recv_timeout(COMPILE_TIMEOUT)
        .map_err(|_| Error::Compile {
            diagnostics: vec![Diagnostic::new(
                "too_slow",
                module,
                file,
                "",
                0,
                0,
                format!(
                    "compiling took longer than {} s; split the module",
                    COMPILE_TIMEOUT.as_secs()
                ),
            )],
        })
}

/// Splits `...:LINE: message` from a Luau compile error.
fn parse_luau_error(text: &str) -> (usize, String) {
    let text = text.strip_prefix("syntax error: ").unwrap_or(text);
    // Luau's compiler says `LINE: message`; a chunk name may precede it.
    let text = text.strip_prefix(':').unwrap_or(text);
    if let Some((line, msg)) = text.split_once(':') {
        if let Ok(n) = line.trim().parse::<usize>() {
            return (n, msg.trim().to_owned());
        }
    }
    (1, text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_errors_name_the_line_and_keep_a_frame() {
        let err = compile(
            "m",
            "src/m.luau",
            "local a = 1\nlocal b = 2\nlocal c = = 3\n",
            1 << 20,
        )
        .unwrap_err();
        let Error::Compile { diagnostics } = err else {
            panic!("expected a compile error")
        };
        let d = &diagnostics[0];
        assert_eq!(d.line, 3, "{d:?}");
        assert_eq!(d.module, "m");
        assert!(d.frame.contains("local c = = 3"), "{}", d.frame);
    }

    #[test]
    fn large_sources_compile_on_a_helper_thread_with_the_same_diagnostics() {
        let mut src = String::from("local t = {}\n");
        for i in 0..5000 {
            src.push_str(&format!("t[{i}] = {i} * 2 -- padding padding\n"));
        }
        assert!(src.len() > INLINE_COMPILE_BYTES);
        assert!(compile("big", "big.luau", &format!("{src}return t"), 1 << 22).is_ok());
        let err = compile(
            "big",
            "big.luau",
            &format!("{src}local = 1\nreturn t"),
            1 << 22,
        )
        .unwrap_err();
        let Error::Compile { diagnostics } = err else {
            panic!("expected a compile error")
        };
        assert_eq!(diagnostics[0].line, 5002);
    }

    #[test]
    fn oversize_sources_are_refused_before_compiling() {
        let err = compile("m", "m.luau", &"-- x\n".repeat(100), 64).unwrap_err();
        assert!(err.to_string().contains("max_source_bytes"), "{err}");
    }

    #[test]
    fn luau_error_text_is_split_into_line_and_message() {
        assert_eq!(
            parse_luau_error(":3: Expected identifier"),
            (3, "Expected identifier".into())
        );
        assert_eq!(
            parse_luau_error("syntax error: 7: Expected 'end'"),
            (7, "Expected 'end'".into())
        );
        assert_eq!(parse_luau_error("weird"), (1, "weird".into()));
    }
}
