//! `graft`: scaffold a project, run it with hot reload, serve a node, and talk
//! to a running node from the shell (SPEC §5).
//!
//! Exit codes: 0 success, 1 a user error (a clear message on stderr), 2 bad
//! usage (clap's, and node caps out of range). A command other than `run`
//! and `serve` whose output goes to a reader that stopped (`graft events |
//! head`) ends by SIGPIPE, quietly (141 in a shell), like any Unix filter.
//! `run` and `serve` keep serving instead, their lines dropped (`say!`).

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

mod check;
mod client;
mod datadir;
mod node;
mod render;
mod scaffold;
mod tester;
mod types;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use graft::NodeLimits;
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
enum TokenAction {
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

/// Where `run` and `serve` listen, and how they face the network (SPEC §9).
#[derive(Args, Clone)]
struct Listen {
    /// Port of the HTTP API (0 picks a free port and prints it)
    #[arg(long, default_value_t = 7878)]
    port: u16,
    /// Address to bind; anything but loopback needs --tls-cert/--tls-key
    /// or --insecure-http
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// A host name browsers may use to reach the node besides loopback
    /// names (repeat for several); other Host headers are refused
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_hosts: Vec<String>,
    /// PEM certificate chain: serve https
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain http on a non-loopback --bind (tokens travel in clear)
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_http: bool,
    /// Directory under which sandboxes may be created from a path (repeat
    /// for several; `graft run DIR` allows DIR)
    #[arg(long = "projects-root", value_name = "DIR")]
    projects_roots: Vec<PathBuf>,
    /// Also serve GET /metrics (only, viewer token) on this address, for
    /// scrapers, e.g. 127.0.0.1:9464 (the API's own /metrics stays)
    #[arg(long, value_name = "HOST:PORT")]
    metrics_bind: Option<String>,
    /// Also write an audit row for every allowed call, cast and send, ahead
    /// of it (failing closed; costs one commit per message). Refused
    /// messages are always recorded
    #[arg(long)]
    audit_messages: bool,
}

impl Listen {
    /// The serving settings, or a usage error (exit 2): a non-loopback
    /// address needs TLS or an explicit --insecure-http.
    fn checked(self, subcommand: &str) -> node::Serving {
        let loopback = self.bind == "localhost"
            || self
                .bind
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback && self.tls_cert.is_none() && !self.insecure_http {
            usage_error(
                subcommand,
                format!(
                    "--bind {} is not a loopback address: serve TLS with --tls-cert and --tls-key, \
                     or pass --insecure-http to send tokens in clear",
                    self.bind
                ),
            );
        }
        node::Serving {
            metrics_bind: self.metrics_bind,
            bind: self.bind,
            port: self.port,
            allow_hosts: self.allow_hosts,
            tls: self.tls_cert.zip(self.tls_key),
            projects_roots: self.projects_roots,
            audit_messages: self.audit_messages,
        }
    }
}

/// Exits with clap's usage error (exit 2) for `subcommand`.
fn usage_error(subcommand: &str, message: String) -> ! {
    let mut cli = Cli::command();
    cli.build();
    match cli.find_subcommand_mut(subcommand) {
        Some(sub) => sub.error(clap::error::ErrorKind::ArgumentConflict, message),
        None => cli.error(clap::error::ErrorKind::ArgumentConflict, message),
    }
    .exit()
}

/// Node-wide caps of `run` and `serve` (SPEC §7); out of range is bad usage.
#[derive(Args, Clone)]
struct Caps {
    /// The largest `memory_bytes` a sandbox may ask for (at least 2 MiB;
    /// `KiB`, `MiB`, `GiB` suffixes allowed)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes,
          default_value_t = NodeLimits::default().max_sandbox_memory)]
    max_sandbox_memory: usize,
    /// Sandboxes on the node at most; creating one more is refused with
    /// 429 `node_limit` (1 to 1048576)
    #[arg(long, value_name = "N", default_value_t = NodeLimits::default().max_sandboxes)]
    max_sandboxes: usize,
    /// The largest JSON form of a reply, state, message or event; past it
    /// 422 `value_too_large` (1 KiB to 4 GiB; suffixes allowed)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes,
          default_value_t = NodeLimits::default().max_value_bytes)]
    max_value_bytes: usize,
    /// Events each sandbox keeps, oldest dropped first (1 to 1000000)
    #[arg(long, value_name = "N", default_value_t = NodeLimits::default().max_events)]
    max_events: usize,
}

impl Caps {
    fn limits(&self) -> NodeLimits {
        NodeLimits {
            max_sandbox_memory: self.max_sandbox_memory,
            max_sandboxes: self.max_sandboxes,
            max_value_bytes: self.max_value_bytes,
            max_events: self.max_events,
            ..NodeLimits::default()
        }
    }

    /// The caps, or a usage error (exit 2) naming the flag and its range.
    fn checked(&self, subcommand: &str) -> NodeLimits {
        let limits = self.limits();
        let Err(e) = limits.validate() else {
            return limits;
        };
        let message = match e {
            graft::Error::LimitOutOfRange {
                field,
                value,
                min,
                max,
            } => {
                let flag = field.replace('_', "-");
                let range = if max == u64::MAX {
                    format!("at least {min}")
                } else {
                    format!("between {min} and {max}")
                };
                format!("invalid value '{value}' for '--{flag}': it must be {range}")
            }
            other => other.to_string(),
        };
        let mut cli = Cli::command();
        cli.build();
        match cli.find_subcommand_mut(subcommand) {
            Some(sub) => sub.error(clap::error::ErrorKind::ValueValidation, message),
            None => cli.error(clap::error::ErrorKind::ValueValidation, message),
        }
        .exit()
    }
}

/// Where `run` and `serve` keep the node's data (SPEC §8).
#[derive(Args, Clone)]
struct Storage {
    /// The data directory (default: DIR/.graft for `run`, $XDG_DATA_HOME/graft
    /// or ~/.local/share/graft for `serve`)
    #[arg(long, value_name = "DIR", conflicts_with = "ephemeral")]
    data: Option<PathBuf>,
    /// Keep everything in memory: nothing survives a restart
    #[arg(long)]
    ephemeral: bool,
    /// How often the changed states of registered processes are checkpointed
    /// (also after every reload and at shutdown; 0: only then)
    #[arg(long, value_name = "MS", default_value_t = graft::DEFAULT_CHECKPOINT_MS)]
    checkpoint_ms: u64,
}

/// A byte count: digits, optionally followed by `KiB`, `MiB` or `GiB`.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        other => return Err(format!("unknown unit `{other}`; use B, KiB, MiB or GiB")),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("expected a number of bytes like 512MiB, not `{s}`"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// How client verbs reach a node.
#[derive(Args, Clone)]
struct Conn {
    /// URL of the node (http:// or https://)
    #[arg(long, env = "GRAFT_URL", default_value = "http://127.0.0.1:7878")]
    url: String,
    /// API token; default: the token file of the project you are in
    /// (DIR/.graft/admin.token), else of the default data directory
    #[arg(long, env = "GRAFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificate to trust for https (instead of the system's roots)
    #[arg(long, value_name = "PEM")]
    cacert: Option<PathBuf>,
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
            rt.block_on(dispatch(other))
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

async fn dispatch(command: Command) -> anyhow::Result<()> {
    use client::Client;
    match command {
        Command::New { .. }
        | Command::Check { .. }
        | Command::Test { .. }
        | Command::Types { .. } => {
            unreachable!("handled without a runtime")
        }
        Command::Run {
            dir,
            listen,
            caps,
            storage,
            no_watch,
            debounce_ms,
            discard,
        } => {
            let data = node::DataChoice::from_flags(
                storage.data,
                storage.ephemeral,
                dir.join(".graft"),
                storage.checkpoint_ms,
            );
            node::run(
                &dir,
                listen.checked("run"),
                caps.checked("run"),
                data,
                (!no_watch).then_some(debounce_ms),
                &discard,
            )
            .await
        }
        Command::Serve {
            listen,
            caps,
            storage,
        } => {
            let data = node::DataChoice::from_flags(
                storage.data,
                storage.ephemeral,
                datadir::default_data_dir().ok_or_else(|| {
                    anyhow::anyhow!("cannot find the default data directory: set HOME or XDG_DATA_HOME, or pass --data DIR")
                })?,
                storage.checkpoint_ms,
            );
            node::serve(listen.checked("serve"), caps.checked("serve"), data).await
        }
        Command::Token { action } => match action {
            TokenAction::Create {
                role,
                sandboxes,
                label,
                conn,
            } => {
                Client::new(&conn)?
                    .token_create(&role, sandboxes, label)
                    .await
            }
            TokenAction::List { conn } => Client::new(&conn)?.token_list().await,
            TokenAction::Revoke { id, conn } => Client::new(&conn)?.token_revoke(&id).await,
        },
        Command::Audit {
            token_id,
            sandbox,
            outcome,
            since_ms,
            before,
            limit,
            conn,
        } => {
            let filters = client::AuditFilters {
                token: token_id,
                sandbox,
                outcome,
                since_ms,
                before,
                limit,
            };
            Client::new(&conn)?.audit(filters).await
        }
        Command::Backup { dest, data } => node::backup(data, &dest),
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
        Command::Events {
            sandbox,
            kinds,
            follow,
            conn,
        } => {
            Client::new(&conn)?
                .events(sandbox.as_deref(), &kinds, follow)
                .await
        }
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
    fn byte_counts() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_bytes("1 GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("3KiB").unwrap(), 3 << 10);
        assert!(parse_bytes("2MB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes(&format!("{}GiB", usize::MAX)).is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
