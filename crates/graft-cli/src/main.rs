//! `graft`: scaffold a project, run it with hot reload, serve a node, and talk
//! to a running node from the shell (SPEC §5).
//!
//! Exit codes: 0 success, 1 a user error (a clear message on stderr), 2 bad
//! usage (clap's, and node caps out of range). A command other than `run`
//! and `serve` whose output goes to a reader that stopped (`graft events |
//! head`) ends by SIGPIPE, quietly (141 in a shell), like any Unix filter.
//! `run` and `serve` keep serving instead, their lines dropped (`say!`).
//!
//! This file is the entry: it parses the command line (`args/`), sets up
//! the log, runs the commands that need no async runtime, hands the others
//! to `dispatch`, and prints the error that ends a command.

/// `println!` for the long-running node commands (`run`, `serve`): a
/// stdout that went away (`graft run | head`, a closed terminal) drops the
/// line instead of panicking, and the node keeps serving (its API and the
/// hot reload matter more than its log). Defined before the modules that
/// use it.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that never panics (see [`say!`]).
macro_rules! warn_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprint!` that never panics (see [`say!`]).
macro_rules! warn_text {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod args;
mod check;
mod client;
mod datadir;
mod dispatch;
mod node;
mod render;
mod scaffold;
mod tester;
mod types;
mod watch;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

/// A failure already explained to the user on stderr: exit 1 without more output.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(reported)")
    }
}

impl std::error::Error for Reported {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The client verbs print to stdout; piped into a reader that stopped
    // (`graft events | head`), they end quietly, killed by SIGPIPE like any
    // Unix filter (exit 141 in a shell), instead of panicking on EPIPE.
    // The node commands keep the runtime's "ignore": their sockets must
    // not kill them.
    #[cfg(unix)]
    if !matches!(cli.command, Command::Run { .. } | Command::Serve { .. }) {
        // SAFETY: called first thing, before any thread is spawned; restores
        // the default disposition of one signal.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // `test` and `check` crash processes on purpose and print their own
    // report: the library's warnings would only interleave with it.
    let quiet = matches!(cli.command, Command::Test { .. } | Command::Check { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if quiet { "error" } else { "warn,graft=info" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Guest logs are guest text: escaped like everything else printed.
        .fmt_fields(render::log_fields())
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::New { dir, id } => scaffold::new_project(&dir, id.as_deref()),
        Command::Check { dir, json } => check::run(&dir, json),
        Command::Types { dir, stdout } => types::run(&dir, stdout),
        Command::Test {
            dir,
            json,
            migrations: true,
            cases,
            seed,
            ..
        } => tester::migrations::run(&dir, json, cases as usize, seed),
        Command::Test {
            dir,
            filter,
            junit,
            json,
            timeout_ms,
            coverage,
            jobs,
            migrations: false,
            ..
        } => tester::run(&tester::Options {
            coverage,
            dir,
            filter,
            junit,
            json,
            timeout: std::time::Duration::from_millis(timeout_ms),
            jobs: jobs.map(|n| n as usize).unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            }),
        }),
        other => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(dispatch::dispatch(other))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<Reported>().is_none() {
                // May quote a node's answer.
                let text = format!("{e:#}");
                eprintln!("error: {}", render::escape(&text, render::Lines::Keep));
            }
            ExitCode::from(1)
        }
    }
}
