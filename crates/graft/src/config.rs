//! Sandbox configuration: limits, capabilities and the `graft.toml` project file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Per-sandbox limits (SPEC §4). Every field has a default; `graft.toml`'s
/// `[limits]` and the HTTP API override them field by field.
///
/// ```
/// let limits = graft::Limits { handler_ms: 50, ..graft::Limits::default() };
/// assert_eq!(limits.max_versions, 10);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Bytes the sandbox's Luau heap may use; an allocation past it fails and
    /// the process that made it crashes with `out_of_memory`.
    pub memory_bytes: usize,
    /// CPU milliseconds one callback may run before it is interrupted and its
    /// process crashes with `timeout`.
    pub handler_ms: u64,
    /// Live processes at most; `spawn` fails past it.
    pub max_processes: usize,
    /// Messages waiting in one mailbox at most; sends past it fail with `mailbox_full`.
    pub max_mailbox: usize,
    /// Module versions kept per module (the current one is never evicted).
    pub max_versions: usize,
    /// Approximate size of one message (strings plus 16 bytes per table entry).
    pub max_message_bytes: usize,
    /// Bytes of Luau source accepted for one module.
    pub max_source_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 * 1024 * 1024,
            handler_ms: 1000,
            max_processes: 100_000,
            max_mailbox: 10_000,
            max_versions: 10,
            max_message_bytes: 1024 * 1024,
            max_source_bytes: 1024 * 1024,
        }
    }
}

impl Limits {
    /// Checks every limit against its range (SPEC §7) under the node's caps;
    /// the first one out of range is named in a `limit_out_of_range` error.
    ///
    /// ```
    /// let node = graft::NodeLimits::default();
    /// let bad = graft::Limits { handler_ms: 0, ..graft::Limits::default() };
    /// let err = bad.validate(&node).unwrap_err();
    /// assert_eq!(err.kind(), "limit_out_of_range");
    /// assert!(graft::Limits::default().validate(&node).is_ok());
    /// ```
    pub fn validate(&self, node: &NodeLimits) -> Result<()> {
        let max_memory = node.max_sandbox_memory.max(MIN_SANDBOX_MEMORY);
        check_range(
            "memory_bytes",
            self.memory_bytes as u64,
            MIN_SANDBOX_MEMORY as u64,
            max_memory as u64,
        )?;
        check_range("handler_ms", self.handler_ms, 1, MAX_HANDLER_MS)?;
        check_range("max_processes", self.max_processes as u64, 1, MAX_PROCESSES)?;
        check_range("max_mailbox", self.max_mailbox as u64, 1, MAX_MAILBOX)?;
        check_range("max_versions", self.max_versions as u64, 1, MAX_VERSIONS)?;
        check_range(
            "max_message_bytes",
            self.max_message_bytes as u64,
            64,
            node.max_value_bytes.max(64) as u64,
        )?;
        check_range(
            "max_source_bytes",
            self.max_source_bytes as u64,
            64,
            MAX_SOURCE_BYTES,
        )?;
        Ok(())
    }
}

/// The smallest `memory_bytes`: an empty sandbox (VM, prelude, supervisor)
/// takes about 1 MiB, so less could not run a single process.
pub const MIN_SANDBOX_MEMORY: usize = 2 * 1024 * 1024;
/// The largest `handler_ms` (one minute).
pub const MAX_HANDLER_MS: u64 = 60_000;
/// The largest `max_processes`.
pub const MAX_PROCESSES: u64 = 1_048_576;
/// The largest `max_mailbox`.
pub const MAX_MAILBOX: u64 = 1_000_000;
/// The largest `max_versions`.
pub const MAX_VERSIONS: u64 = 1_000;
/// The largest `max_source_bytes` (per module).
pub const MAX_SOURCE_BYTES: u64 = 16 * 1024 * 1024;
/// The largest call `timeout_ms` (five minutes).
pub const MAX_TIMEOUT_MS: u64 = 300_000;
/// The largest `canary_ms` (one hour).
pub const MAX_CANARY_MS: u64 = 3_600_000;

/// Fails with `limit_out_of_range` unless `min <= value <= max`.
pub fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(Error::LimitOutOfRange {
            field: field.to_owned(),
            value: value.to_string(),
            min,
            max,
        })
    }
}

/// Node-wide caps (SPEC §7), set once when the node starts (`graft run` and
/// `graft serve` flags of the same names). They bound what any request or
/// guest can make the node hold.
///
/// ```
/// let caps = graft::NodeLimits { max_sandboxes: 8, ..graft::NodeLimits::default() };
/// let node = graft::Node::with_limits(2, caps);
/// assert_eq!(node.limits().max_sandboxes, 8);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeLimits {
    /// The largest `memory_bytes` a sandbox may ask for.
    pub max_sandbox_memory: usize,
    /// Sandboxes on the node at most; creating one more fails with `node_limit`.
    pub max_sandboxes: usize,
    /// The largest JSON form of a value crossing a boundary (reply, state,
    /// message, event); past it the conversion stops with `value_too_large`.
    pub max_value_bytes: usize,
    /// Events each sandbox keeps (oldest dropped first).
    pub max_events: usize,
    /// Blocking host functions ([`HostFunctions::blocking`](crate::HostFunctions::blocking))
    /// running at once on the node; further calls queue (FIFO) until one
    /// returns. Each running call holds a thread of the node's blocking pool.
    pub max_blocking_host_calls: usize,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            max_sandbox_memory: 1024 * 1024 * 1024,
            max_sandboxes: 1024,
            max_value_bytes: 8 * 1024 * 1024,
            max_events: 1000,
            max_blocking_host_calls: 16,
        }
    }
}

impl NodeLimits {
    /// Checks the caps themselves (each at least 1; memory at least the
    /// smallest sandbox).
    pub fn validate(&self) -> Result<()> {
        check_range(
            "max_sandbox_memory",
            self.max_sandbox_memory as u64,
            MIN_SANDBOX_MEMORY as u64,
            u64::MAX,
        )?;
        check_range("max_sandboxes", self.max_sandboxes as u64, 1, 1 << 20)?;
        check_range(
            "max_value_bytes",
            self.max_value_bytes as u64,
            1024,
            1 << 32,
        )?;
        check_range("max_events", self.max_events as u64, 1, 1_000_000)?;
        check_range(
            "max_blocking_host_calls",
            self.max_blocking_host_calls as u64,
            1,
            4096,
        )?;
        Ok(())
    }
}

/// Built-in capabilities a `graft.toml` can grant by name (`[capabilities]
/// grant = ["clock", "random"]`). Host functions registered by an embedding
/// app are capabilities too.
pub const BUILTIN_CAPABILITIES: &[&str] = &["clock", "random"];

/// What a sandbox is made of: id, entry module, limits, capabilities and sources.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// The sandbox id: `[a-z0-9][a-z0-9_-]{0,63}`.
    pub id: String,
    /// The module whose supervisor is the app (`None`: no app is started).
    pub entry: Option<String>,
    /// What the entry module's `init` receives (plain data; `null` by
    /// default). Bounded by `limits.max_message_bytes` like any message.
    pub entry_args: serde_json::Value,
    /// Limits.
    pub limits: Limits,
    /// Built-in capabilities granted (`clock`, `random`).
    pub grants: Vec<String>,
    /// Module name → Luau source.
    pub modules: BTreeMap<String, String>,
    /// Module name → file it came from (for diagnostics).
    pub files: BTreeMap<String, PathBuf>,
    /// Run the sandbox's timers on a manual clock that only
    /// [`crate::Sandbox::advance_clock`] moves (`graft test`). Off in
    /// production; `graft.toml` cannot set it.
    pub test_clock: bool,
}

impl SandboxSpec {
    /// A spec from in-memory sources.
    ///
    /// ```
    /// let spec = graft::SandboxSpec::new("demo")
    ///     .module("counter", "return { init = function() return 0 end }")
    ///     .entry(None);
    /// assert_eq!(spec.modules.len(), 1);
    /// ```
    pub fn new(id: impl Into<String>) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            entry: Some("app".into()),
            entry_args: serde_json::Value::Null,
            limits: Limits::default(),
            grants: Vec::new(),
            modules: BTreeMap::new(),
            files: BTreeMap::new(),
            test_clock: false,
        }
    }
    /// Adds (or replaces) a module source.
    pub fn module(mut self, name: impl Into<String>, source: impl Into<String>) -> Self {
        self.modules.insert(name.into(), source.into());
        self
    }
    /// Sets the entry module (`None`: start no app).
    pub fn entry(mut self, entry: Option<&str>) -> Self {
        self.entry = entry.map(str::to_owned);
        self
    }
    /// Sets what the entry module's `init` receives.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let spec = SandboxSpec::new("cfg")
    ///     .module("app", r#"return {
    ///         init = function(args) return { port = args.port } end,
    ///         handle_call = function(_, _, s) return s.port, s end,
    ///     }"#)
    ///     .entry_args(serde_json::json!({ "port": 8080 }));
    /// let node = Node::new();
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// graft::block_on(sb.wait_app_started()).unwrap();
    /// ```
    pub fn entry_args(mut self, args: serde_json::Value) -> Self {
        self.entry_args = args;
        self
    }
    /// Sets the limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
    /// Puts the sandbox's timers (`send_after`, call timeouts, canary
    /// windows) and `graft.now()` on a manual clock, moved only by
    /// [`crate::Sandbox::advance_clock`]. For tests: a 60 s timer fires
    /// as soon as the test advances the clock by 60 s.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let spec = SandboxSpec::new("clocked").entry(None).test_clock(true);
    /// let node = Node::new();
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// graft::block_on(sb.advance_clock(60_000)).unwrap();
    /// ```
    pub fn test_clock(mut self, on: bool) -> Self {
        self.test_clock = on;
        self
    }
    /// Grants a built-in capability.
    pub fn grant(mut self, capability: &str) -> Self {
        self.grants.push(capability.to_owned());
        self
    }

    /// Reads a project directory: `graft.toml` plus every `src/**/*.luau`.
    pub fn from_dir(dir: &Path) -> Result<SandboxSpec> {
        let toml_path = dir.join("graft.toml");
        let text = read_bounded(&toml_path, 1024 * 1024)?;
        let file: ProjectFile = toml::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", toml_path.display())))?;
        let mut spec = SandboxSpec::new(file.sandbox.id);
        spec.entry = Some(file.sandbox.entry.unwrap_or_else(|| "app".into()));
        spec.entry_args = file.sandbox.entry_args.unwrap_or(serde_json::Value::Null);
        spec.limits = file.limits;
        spec.grants = file.capabilities.grant;
        let src = dir.join("src");
        for (name, path) in module_files(&src)? {
            let source = read_bounded(&path, MAX_SOURCE_BYTES)?;
            spec.modules.insert(name.clone(), source);
            spec.files.insert(name, path);
        }
        Ok(spec)
    }

    /// Checks id, entry, limits (under the node's caps) and grants.
    pub fn validate(&self, node: &NodeLimits) -> Result<()> {
        validate_sandbox_id(&self.id)?;
        self.limits.validate(node)?;
        for g in &self.grants {
            if !BUILTIN_CAPABILITIES.contains(&g.as_str()) {
                return Err(Error::InvalidInput(format!(
                    "unknown capability `{g}` (built-in capabilities: {})",
                    BUILTIN_CAPABILITIES.join(", ")
                )));
            }
        }
        for name in self.modules.keys() {
            validate_module_name(name)?;
        }
        if let Some(entry) = &self.entry {
            if !self.modules.contains_key(entry) {
                return Err(Error::InvalidInput(format!(
                    "entry module `{entry}` is not among the sandbox's modules"
                )));
            }
        }
        check_entry_args(&self.entry_args, self.limits.max_message_bytes)
    }
}

/// `entry_args` travel to the app's `init` as a message, so they must fit
/// in `max_message_bytes`: an error naming both settings, with the sizes.
pub(crate) fn check_entry_args(args: &serde_json::Value, max: usize) -> Result<()> {
    let size = crate::value::json_len(args);
    if size > max {
        return Err(Error::InvalidInput(format!(
            "`entry_args` is {size} bytes as JSON, over this sandbox's `max_message_bytes` of {max} \
             (they are the app's first message): make `entry_args` smaller, or raise \
             `max_message_bytes` under [limits]"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectFile {
    sandbox: ProjectSandbox,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    capabilities: ProjectCapabilities,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectSandbox {
    id: String,
    entry: Option<String>,
    /// The entry module's `init` argument (any TOML value).
    entry_args: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProjectCapabilities {
    #[serde(default)]
    grant: Vec<String>,
}

/// Lists `src/**/*.luau` as (module name, path): `src/chat/room.luau` is `chat.room`.
pub fn module_files(src: &Path) -> Result<Vec<(String, PathBuf)>> {
    // A project is a handful of files: the walk does not follow symbolic
    // links (no loops such as /proc/self/root) and stops at bounded depth
    // and size, so a path given through the API cannot keep a thread busy.
    fn walk(
        base: &Path,
        dir: &Path,
        depth: usize,
        seen: &mut usize,
        out: &mut Vec<(String, PathBuf)>,
    ) -> std::io::Result<()> {
        if depth > MAX_PROJECT_DEPTH {
            return Err(std::io::Error::other(format!(
                "folders nest deeper than {MAX_PROJECT_DEPTH} levels"
            )));
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            *seen += 1;
            if *seen > MAX_PROJECT_ENTRIES {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_PROJECT_ENTRIES} entries under src/"
                )));
            }
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                walk(base, &path, depth + 1, seen, out)?;
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "luau") {
                if let Some(name) = module_name_for(base, &path) {
                    out.push((name, path));
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(src, src, 0, &mut 0, &mut out)
        .map_err(|e| Error::InvalidInput(format!("cannot list {}: {e}", src.display())))?;
    out.sort();
    Ok(out)
}

/// Folder levels under `src/` a project may have.
pub(crate) const MAX_PROJECT_DEPTH: usize = 16;
/// Files and folders under `src/` a project may have.
pub(crate) const MAX_PROJECT_ENTRIES: usize = 10_000;

/// Reads a project file of at most `max` bytes (regular files only: a FIFO
/// or a device would block or never end).
fn read_bounded(path: &Path, max: u64) -> Result<String> {
    use std::io::Read;
    let cannot = |e: &dyn std::fmt::Display| {
        Error::InvalidInput(format!("cannot read {}: {e}", path.display()))
    };
    let meta = std::fs::metadata(path).map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        return Err(cannot(&"not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_string(&mut text))
        .map_err(|e| cannot(&e))?;
    if text.len() as u64 > max {
        return Err(cannot(&format_args!("larger than {max} bytes")));
    }
    Ok(text)
}

/// The module name of a file under `src/`, or `None` for files that are not modules.
pub fn module_name_for(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let stem = rel.with_extension("");
    let parts: Vec<&str> = stem.iter().map(|p| p.to_str()).collect::<Option<_>>()?;
    let name = parts.join(".");
    validate_module_name(&name).ok()?;
    Some(name)
}

/// Checks a sandbox id against `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn validate_sandbox_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && (b == b'_' || b == b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "invalid sandbox id `{}`: use 1-64 characters of [a-z0-9_-], starting with a letter or digit",
            id.escape_debug()
        )))
    }
}

/// Checks a module name: dot-separated identifiers (`chat.room`).
pub fn validate_module_name(name: &str) -> Result<()> {
    // The same rule a pid's module part obeys (one definition, in `pid`).
    if crate::pid::is_module_name(name) {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "invalid module name `{}`: use dot-separated identifiers like `chat.room`",
            name.escape_debug()
        )))
    }
}

/// The longest registered process name, in bytes.
pub const MAX_PROCESS_NAME_BYTES: usize = 64;

/// Checks a registered process name (`graft.register`, `graft.spawn`'s
/// `opts.name`, a supervisor child's `name`, the API's spawn): 1–64 bytes,
/// not all digits and not starting with `<`. Host-side targets resolve names
/// first, then `"<module.N>"`, then bare serials, so a name that reads as a
/// pid or a serial would capture another process's address.
pub fn validate_process_name(name: &str) -> Result<()> {
    let problem = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_PROCESS_NAME_BYTES {
        "it is longer than 64 bytes"
    } else if name.bytes().all(|b| b.is_ascii_digit()) {
        "it is all digits, so it would read as a pid's serial"
    } else if name.starts_with('<') {
        "it starts with `<`, so it would read as a pid"
    } else if name.chars().any(char::is_control) {
        "it contains a control character (names are shown in terminals and logs)"
    } else {
        return Ok(());
    };
    let shown: String = name.chars().take(MAX_PROCESS_NAME_BYTES).collect();
    let more = if shown.len() < name.len() { "…" } else { "" };
    Err(Error::BadArg(format!(
        "invalid process name `{}{more}`: {problem}",
        shown.escape_debug()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_names_cannot_read_as_pids_or_serials() {
        for good in ["counter", "worker1", "1st", "a<b>", &"n".repeat(64)] {
            assert!(validate_process_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1",
            "007",
            "<srv.1>",
            "<",
            &"n".repeat(65),
            "a\u{1b}[2J",
            "tab\there",
            "nl\n",
        ] {
            let err = validate_process_name(bad).unwrap_err();
            assert_eq!(err.kind(), "badarg", "{bad}");
        }
        let err = validate_process_name(&"9".repeat(1 << 20)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn graft_toml_entry_args_become_the_apps_init_argument() {
        let dir = std::env::temp_dir().join(format!("graft-entry-args-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(
            dir.join("graft.toml"),
            "[sandbox]\nid = \"x\"\nentry_args = { port = 8080, tags = [\"a\"] }\n",
        )
        .unwrap();
        std::fs::write(dir.join("src/app.luau"), "return {}").unwrap();
        let spec = SandboxSpec::from_dir(&dir).unwrap();
        assert_eq!(
            spec.entry_args,
            serde_json::json!({ "port": 8080, "tags": ["a"] })
        );
        std::fs::write(dir.join("graft.toml"), "[sandbox]\nid = \"x\"\n").unwrap();
        assert_eq!(
            SandboxSpec::from_dir(&dir).unwrap().entry_args,
            serde_json::Value::Null
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sandbox_ids_follow_the_spec_pattern() {
        assert!(validate_sandbox_id("myapp").is_ok());
        assert!(validate_sandbox_id("a-b_c9").is_ok());
        assert!(validate_sandbox_id(&"a".repeat(64)).is_ok());
        assert!(validate_sandbox_id(&"a".repeat(65)).is_err());
        assert!(validate_sandbox_id("-a").is_err());
        assert!(validate_sandbox_id("A").is_err());
        assert!(validate_sandbox_id("").is_err());
        assert!(validate_sandbox_id("a/b").is_err());
    }

    #[test]
    fn the_module_walk_skips_symlinks_and_special_files() {
        let dir = std::env::temp_dir().join(format!("graft-walk-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src/a")).unwrap();
        std::fs::write(dir.join("src/a/m.luau"), "return {}").unwrap();
        // A loop back to the root: followed, it would never end.
        std::os::unix::fs::symlink(dir.join("src"), dir.join("src/a/loop")).unwrap();
        let found = module_files(&dir.join("src")).unwrap();
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.m"]);
        // /proc/self links back to / many times over: the walk returns
        // (an error past its bounds, or nothing found) instead of looping.
        if let Ok(found) = module_files(Path::new("/proc/self")) {
            assert!(found.is_empty(), "{found:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn module_names_map_from_paths() {
        let src = Path::new("/p/src");
        assert_eq!(
            module_name_for(src, Path::new("/p/src/counter.luau")).as_deref(),
            Some("counter")
        );
        assert_eq!(
            module_name_for(src, Path::new("/p/src/chat/room.luau")).as_deref(),
            Some("chat.room")
        );
        assert_eq!(
            module_name_for(src, Path::new("/p/src/bad name.luau")),
            None
        );
        assert!(validate_module_name("chat..room").is_err());
    }

    #[test]
    fn project_file_rejects_unknown_keys_and_reads_limits() {
        let dir = std::env::temp_dir().join(format!("graft-cfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src/chat")).unwrap();
        std::fs::write(
            dir.join("graft.toml"),
            "[sandbox]\nid = \"x\"\n[limits]\nhandler_ms = 5\n",
        )
        .unwrap();
        std::fs::write(dir.join("src/app.luau"), "return {}").unwrap();
        std::fs::write(dir.join("src/chat/room.luau"), "return {}").unwrap();
        let spec = SandboxSpec::from_dir(&dir).unwrap();
        assert_eq!(spec.limits.handler_ms, 5);
        assert_eq!(spec.limits.max_mailbox, Limits::default().max_mailbox);
        assert!(spec.modules.contains_key("chat.room"));
        std::fs::write(
            dir.join("graft.toml"),
            "[sandbox]\nid = \"x\"\n[limits]\nhandler = 5\n",
        )
        .unwrap();
        let err = SandboxSpec::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("unknown field `handler`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
