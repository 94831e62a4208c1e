//! `graft`: scaffold a project, run it with hot reload, serve a node, and talk
//! to a running node from the shell (SPEC §5).
//!
//! Exit codes: 0 success, 1 a user error (a clear message on stderr), 2 bad
//! usage (clap's).

mod client;
mod node;
mod render;
mod scaffold;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

/// Live-upgradable, supervised Luau sandboxes.
#[derive(Parser)]
#[command(name = "graft", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Scaffold a project that runs as is (graft.toml, src/, test/, README.md)
    New {
        /// Directory to create (must not exist, or be empty)
        dir: PathBuf,
        /// Sandbox id (default: from the directory name)
        #[arg(long)]
        id: Option<String>,
    },
    /// Start a project's sandbox, serve the HTTP API and hot-reload src/ on save
    Run {
        /// The project directory (with graft.toml)
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        listen: Listen,
        /// Do not watch src/ (no hot reload)
        #[arg(long)]
        no_watch: bool,
        /// Quiet time (ms) after file events before a reload; editors' bursts
        /// within it become one reload. The default comes from the
        /// edit-to-live benchmark (docs/benchmarks.md).
        #[arg(long, default_value_t = watch::DEFAULT_DEBOUNCE_MS)]
        debounce_ms: u64,
    },
    /// Run a node with no project; sandboxes come through the API
    Serve {
        #[command(flatten)]
        listen: Listen,
    },
    /// Call a process and print its reply
    Call {
        sandbox: String,
        /// Registered name or pid (`<counter.3>`)
        target: String,
        /// The request as JSON (a bare word is taken as a string: `inc` = `"inc"`)
        #[arg(value_parser = parse_json)]
        request: Value,
        /// How long to wait for the reply
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cast a message to a process (handle_cast)
    Cast {
        sandbox: String,
        /// Registered name or pid
        target: String,
        /// The message as JSON (a bare word is taken as a string)
        #[arg(value_parser = parse_json)]
        message: Value,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a sandbox's processes
    Ps {
        sandbox: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a process's state
    State {
        sandbox: String,
        /// Registered name or pid
        target: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a Luau chunk inside the sandbox and print its result
    #[command(group = clap::ArgGroup::new("chunk").required(true).args(["code", "file"]))]
    Eval {
        sandbox: String,
        /// Luau source (`-` reads standard input)
        code: Option<String>,
        /// Read the chunk from a file instead
        #[arg(short, long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// How long to wait for the result
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Reload modules from files, as one transaction
    Reload {
        sandbox: String,
        /// `.luau` files; the module name comes from the path under `src/`
        /// (`src/chat/room.luau` is `chat.room`), else from the file name
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Do everything on copies and report; change nothing
        #[arg(long)]
        dry_run: bool,
        /// JSON passed to code_change as `extra`
        #[arg(long, value_parser = parse_json)]
        extra: Option<Value>,
        /// A Luau file evaluating to function(old_state, old_vsn, new_vsn, extra) -> new_state
        #[arg(long, value_name = "FILE")]
        state_handler: Option<PathBuf>,
        /// Watch the upgraded processes this long and roll back if they crash
        #[arg(long, value_name = "MS")]
        canary_ms: Option<u64>,
        /// Crashes within the canary window that trigger the rollback
        #[arg(long, value_name = "N")]
        canary_crashes: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a module's kept versions
    Versions {
        sandbox: String,
        module: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a kept version of a module current again
    Rollback {
        sandbox: String,
        module: String,
        version: u32,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Where `run` and `serve` listen.
#[derive(Args, Clone)]
struct Listen {
    /// Port of the HTTP API (0 picks a free port and prints it)
    #[arg(long, default_value_t = 7878)]
    port: u16,
    /// Address to bind
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
}

/// How client verbs reach a node.
#[derive(Args, Clone)]
struct Conn {
    /// URL of the node
    #[arg(long, env = "GRAFT_URL", default_value = "http://127.0.0.1:7878")]
    url: String,
    /// Print the API's JSON instead of a human-readable view
    #[arg(long)]
    json: bool,
}

/// JSON, or a bare word taken as a string (`inc` is `"inc"`).
fn parse_json(s: &str) -> Result<Value, String> {
    match serde_json::from_str(s) {
        Ok(v) => Ok(v),
        Err(e) => {
            let bare = s
                .chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_' || c == '<')
                && !s
                    .chars()
                    .any(|c| matches!(c, '{' | '}' | '[' | ']' | '"' | ':' | ','));
            if bare {
                Ok(Value::String(s.to_owned()))
            } else {
                Err(format!(
                    "not valid JSON ({e}); quote strings like '\"text\"'"
                ))
            }
        }
    }
}

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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,graft=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::New { dir, id } => scaffold::new_project(&dir, id.as_deref()),
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
            rt.block_on(dispatch(other))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<Reported>().is_none() {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(1)
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    use client::Client;
    match command {
        Command::New { .. } => unreachable!("handled without a runtime"),
        Command::Run {
            dir,
            listen,
            no_watch,
            debounce_ms,
        } => {
            node::run(
                &dir,
                &listen.bind,
                listen.port,
                (!no_watch).then_some(debounce_ms),
            )
            .await
        }
        Command::Serve { listen } => node::serve(&listen.bind, listen.port).await,
        Command::Call {
            sandbox,
            target,
            request,
            timeout_ms,
            conn,
        } => {
            Client::new(&conn)?
                .call(&sandbox, &target, request, timeout_ms)
                .await
        }
        Command::Cast {
            sandbox,
            target,
            message,
            conn,
        } => Client::new(&conn)?.cast(&sandbox, &target, message).await,
        Command::Ps { sandbox, conn } => Client::new(&conn)?.ps(&sandbox).await,
        Command::State {
            sandbox,
            target,
            conn,
        } => Client::new(&conn)?.state(&sandbox, &target).await,
        Command::Eval {
            sandbox,
            code,
            file,
            timeout_ms,
            conn,
        } => {
            let source = match (code, file) {
                (_, Some(path)) => std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
                (Some(code), None) if code == "-" => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .map_err(|e| anyhow::anyhow!("cannot read standard input: {e}"))?;
                    s
                }
                (Some(code), None) => code,
                (None, None) => unreachable!("clap requires one"),
            };
            Client::new(&conn)?
                .eval(&sandbox, &source, timeout_ms)
                .await
        }
        Command::Reload {
            sandbox,
            files,
            dry_run,
            extra,
            state_handler,
            canary_ms,
            canary_crashes,
            conn,
        } => {
            let opts = client::ReloadArgs {
                dry_run,
                extra,
                state_handler,
                canary_ms,
                canary_crashes,
            };
            Client::new(&conn)?.reload(&sandbox, &files, opts).await
        }
        Command::Versions {
            sandbox,
            module,
            conn,
        } => Client::new(&conn)?.versions(&sandbox, &module).await,
        Command::Rollback {
            sandbox,
            module,
            version,
            conn,
        } => {
            Client::new(&conn)?
                .rollback(&sandbox, &module, version)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_arguments() {
        assert_eq!(parse_json("\"inc\"").unwrap(), Value::from("inc"));
        assert_eq!(parse_json("inc").unwrap(), Value::from("inc"));
        assert_eq!(
            parse_json("<counter.3>").unwrap(),
            Value::from("<counter.3>")
        );
        assert_eq!(parse_json("5").unwrap(), Value::from(5));
        assert_eq!(
            parse_json("{\"a\": [1]}").unwrap(),
            serde_json::json!({ "a": [1] })
        );
        assert!(parse_json("{\"a\": ").is_err());
        assert!(parse_json("[1,").is_err());
        assert!(parse_json("a:b").is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
