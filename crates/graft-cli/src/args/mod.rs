//! The command line's definition (clap's derive): every subcommand, its
//! arguments and their help text, which is the user's manual of `graft -h`.
//!
//! Only parsing and checks that need no node live here: a value clap accepts
//! is well-formed (JSON arguments, byte counts, ranges), so that the commands
//! see only usable values and a bad one is a usage error (exit 2) named by
//! its flag. The flags that configure a node (`run`, `serve`) are in
//! `node_flags`; what each command does is in `dispatch`.

mod node_flags;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::{tester, watch};
use node_flags::{Caps, Listen, Storage};

/// Live-upgradable, supervised Luau sandboxes.
#[derive(Parser)]
#[command(name = "graft", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        #[command(flatten)]
        caps: Caps,
        #[command(flatten)]
        storage: Storage,
        /// Do not watch src/ (no hot reload)
        #[arg(long)]
        no_watch: bool,
        /// Quiet time (ms) after file events before a reload; editors' bursts
        /// within it become one reload. The default comes from the
        /// edit-to-live benchmark (docs/benchmarks.md).
        #[arg(long, default_value_t = watch::DEFAULT_DEBOUNCE_MS)]
        debounce_ms: u64,
        /// Delete the stored sandbox ID before starting (one that failed to
        /// restore, or the project's old id): its kept versions and states
        /// are lost (`graft backup` keeps a copy)
        #[arg(long, value_name = "ID")]
        discard: Vec<String>,
    },
    /// Compile and analyse every module without starting the app; exit 1
    /// on any error (a pre-commit hook)
    Check {
        /// The project directory (with graft.toml)
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Run the project's tests (test/**/*_test.luau), each in a fresh sandbox
    Test {
        /// The project directory (with graft.toml)
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Run only the tests whose `file::name` contains this text
        #[arg(long)]
        filter: Option<String>,
        /// Also write a JUnit XML report to this file
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Print a JSON report instead of lines
        #[arg(long)]
        json: bool,
        /// Each test's time limit (real time), sandbox start included
        #[arg(long, value_name = "MS", default_value_t = tester::DEFAULT_TIMEOUT_MS,
              value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
        timeout_ms: u64,
        /// Instead of the tests: migrate every module whose `code_change`
        /// changed up from its previous version (the node's kept versions,
        /// else git) and back down, on recorded, app, `init` and generated
        /// states; report those that do not round-trip (docs/testing.md)
        #[arg(long, conflicts_with_all = ["filter", "junit", "coverage"])]
        migrations: bool,
        /// With --migrations: generated (perturbed) states per module
        #[arg(long, value_name = "N", requires = "migrations", default_value_t = 100,
              value_parser = clap::value_parser!(u64).range(0..=10_000))]
        cases: u64,
        /// With --migrations: the seed of the perturbations (same seed, same states)
        #[arg(long, value_name = "N", requires = "migrations", default_value_t = 1)]
        seed: u64,
        /// Report statement coverage of each module (lines run by the tests)
        #[arg(long)]
        coverage: bool,
        /// Tests run at once (default: one per core)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=256))]
        jobs: Option<u64>,
    },
    /// Write graft.d.luau: luau-lsp definitions of `graft` and the test library
    Types {
        /// The project directory
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Print the definitions instead of writing the file
        #[arg(long)]
        stdout: bool,
    },
    /// Run a node with no project; sandboxes come through the API
    Serve {
        #[command(flatten)]
        listen: Listen,
        #[command(flatten)]
        caps: Caps,
        #[command(flatten)]
        storage: Storage,
    },
    /// Copy a node's database to a new file, consistently, while it runs
    Backup {
        /// The file to create (must not exist)
        dest: PathBuf,
        /// The node's data directory (default: ./.graft if it holds a
        /// database, else the default data directory of `graft serve`)
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
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
    /// Show the node's recent events; with --follow, every new one live
    Events {
        /// Only this sandbox's events
        #[arg(long)]
        sandbox: Option<String>,
        /// Only events of this kind (repeatable: reload, crash, abort …)
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Keep printing events as they happen (Ctrl-C stops)
        #[arg(long)]
        follow: bool,
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
    /// Create, list and revoke API tokens (admin)
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Read the node's audit log, newest first (admin)
    Audit {
        /// Only requests made with this token id (`tok_…`)
        #[arg(long, value_name = "ID")]
        token_id: Option<String>,
        /// Only requests on this sandbox
        #[arg(long, value_name = "ID")]
        sandbox: Option<String>,
        /// Only this outcome (`ok`, `forbidden`, `unauthorized`, an error kind …)
        #[arg(long)]
        outcome: Option<String>,
        /// Only rows at or after this time (ms since the Unix epoch)
        #[arg(long, value_name = "MS")]
        since_ms: Option<u64>,
        /// Only rows older than this id (the next page)
        #[arg(long, value_name = "ID")]
        before: Option<u64>,
        /// Rows to show (1 to 1000)
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub(crate) enum TokenAction {
    /// Create a token and print it once (only its SHA-256 is kept)
    Create {
        /// viewer (read all but state), operator (also call, cast, spawn,
        /// reload, rollback, restart) or admin (everything)
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Limit the token to this sandbox (repeat for several)
        #[arg(long = "sandbox", value_name = "ID")]
        sandboxes: Vec<String>,
        /// A note shown in `graft token list`
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List tokens (ids, roles, scopes; never secrets)
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a token by id; refused from its next request on
    Revoke {
        /// The token's id (`tok_…`, from `graft token list`)
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// How client verbs reach a node.
#[derive(Args, Clone)]
pub(crate) struct Conn {
    /// URL of the node (http:// or https://)
    #[arg(long, env = "GRAFT_URL", default_value = "http://127.0.0.1:7878")]
    pub(crate) url: String,
    /// API token; default: the token file of the project you are in
    /// (DIR/.graft/admin.token), else of the default data directory
    #[arg(long, env = "GRAFT_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// PEM CA certificate to trust for https (instead of the system's roots)
    #[arg(long, value_name = "PEM")]
    pub(crate) cacert: Option<PathBuf>,
    /// Print the API's JSON instead of a human-readable view
    #[arg(long)]
    pub(crate) json: bool,
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
