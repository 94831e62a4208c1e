//! End-to-end tests of the `graft` binary: scaffold, run, every client verb,
//! failures and exit codes, and the hot-reload watcher.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(30);

fn graft() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graft"));
    cmd.env_remove("GRAFT_URL")
        .env_remove("RUST_LOG")
        .env_remove("GRAFT_TOKEN")
        // `graft serve` keeps its data (and admin token) in the default data
        // directory: a private one per test process, never the user's.
        .env("XDG_DATA_HOME", xdg_dir("shared"));
    cmd
}

/// A data home of its own for one node (or the clients of this process).
/// Emptied the first time this process names it: a directory left by an
/// earlier run whose pid was the same would hand a new node old sandboxes
/// and a stale token.
fn xdg_dir(name: &str) -> PathBuf {
    static FRESH: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join(format!("graft-cli-{}-xdg-{name}", std::process::id()));
    let mut fresh = FRESH.lock().unwrap_or_else(|e| e.into_inner());
    if !fresh.iter().any(|n| n == name) {
        let _ = std::fs::remove_dir_all(&dir);
        fresh.push(name.to_owned());
    }
    dir
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes what `temp_dir(name)` made (left in place when a test fails, for a look).
fn cleanup(name: &str) {
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("graft-cli-{}-{name}", std::process::id())),
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `graft run` / `graft serve` child with its output collected.
struct Node {
    child: Child,
    port: u16,
    /// The admin token from the file the banner names.
    token: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

impl Node {
    fn start(args: &[&str]) -> Node {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Node::start_in(&xdg_dir(&format!("node{n}")), args)
    }

    /// [`Node::start`] with `data_home` as `XDG_DATA_HOME` (its default data
    /// directory is `data_home/graft`), for nodes that share one.
    fn start_in(data_home: &Path, args: &[&str]) -> Node {
        let mut child = graft()
            .env("XDG_DATA_HOME", data_home)
            .args(args)
            .args(["--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().unwrap(), stdout.clone());
        collect(child.stderr.take().unwrap(), stderr.clone());
        let mut node = Node {
            child,
            port: 0,
            token: String::new(),
            stdout,
            stderr,
        };
        node.wait_until("the listening line", |out, _| {
            out.contains("listening on http://127.0.0.1:")
                || out.contains("listening on https://127.0.0.1:")
        });
        let out = node.out();
        let rest = out.split("://127.0.0.1:").nth(1).unwrap();
        node.port = rest
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap();
        assert_ne!(node.port, 0);
        node.wait_until("the token line", |out, _| out.contains("admin token: "));
        let out = node.out();
        let line = out.split("admin token: ").nth(1).unwrap();
        let path = line.split("  (").next().unwrap().trim_end_matches(" (new)");
        node.token = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_owned();
        node
    }

    fn out(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn err(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    #[track_caller]
    fn wait_until(&mut self, what: &str, cond: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if cond(&self.out(), &self.err()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // the process ended: its last output may still be in the pipes
                let drained = Instant::now() + Duration::from_secs(2);
                while Instant::now() < drained {
                    if cond(&self.out(), &self.err()) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                panic!(
                    "graft exited ({status}) before {what}\nstdout:\n{}\nstderr:\n{}",
                    self.out(),
                    self.err()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs a client verb against this node.
    fn client(&self, args: &[&str]) -> Output {
        graft()
            .env("GRAFT_TOKEN", &self.token)
            .args(args)
            .args(["--url", &self.url()])
            .output()
            .unwrap()
    }

    /// A client verb that must succeed; its stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.client(args);
        assert!(
            out.status.success(),
            "graft {args:?} failed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// A client verb that must fail with exit code 1; its stderr.
    #[track_caller]
    fn fails(&self, args: &[&str]) -> String {
        let out = self.client(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "graft {args:?}:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stderr)
    }

    /// Ctrl-C: the node must stop its apps (terminate callbacks) and exit 0.
    fn interrupt(mut self) -> (String, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "graft did not stop on SIGINT\n{}",
                self.err()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // the reader threads see EOF right after the exit
        self.wait_until("the final output", |_, err| err.contains("graft: stopped"));
        assert_eq!(status.code(), Some(0), "stderr:\n{}", self.err());
        (self.out(), self.err())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `graft new DIR/myapp`, returning the project directory.
fn scaffold(name: &str) -> PathBuf {
    let dir = temp_dir(name).join("myapp");
    let out = graft().arg("new").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    dir
}

fn run(dir: &Path) -> Node {
    Node::start(&["run", dir.to_str().unwrap()])
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn new_scaffolds_a_project_and_refuses_a_non_empty_dir() {
    let dir = scaffold("new");
    for f in [
        "graft.toml",
        "src/app.luau",
        "src/counter.luau",
        "test/counter_test.luau",
        "README.md",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let toml = std::fs::read_to_string(dir.join("graft.toml")).unwrap();
    assert!(toml.contains("id = \"myapp\""), "{toml}");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(
        readme.contains("graft run") && readme.contains("save"),
        "{readme}"
    );

    let out = graft().arg("new").arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );
    let out = graft()
        .args(["new", "--id", "Bad Id"])
        .arg(dir.join("x"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid sandbox id"),
        "{}",
        text(&out.stderr)
    );
    cleanup("new");
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        &["frobnicate"][..],
        &["call", "myapp"],
        &["call", "myapp", "counter", "{\"a\": "],
        &["rollback", "myapp", "counter", "one"],
        &["eval", "myapp"],
        &["reload", "myapp"],
        &["run", "--port", "high"],
    ] {
        let out = graft().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "graft {args:?}: {}",
            text(&out.stderr)
        );
        assert!(!out.stderr.is_empty());
    }
    let out = graft().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    for verb in [
        "new", "run", "serve", "call", "cast", "ps", "state", "eval", "reload", "versions",
        "rollback",
    ] {
        assert!(text(&out.stdout).contains(verb), "--help lacks {verb}");
    }
}

#[test]
fn node_caps_out_of_range_are_usage_errors() {
    for (args, flag, range) in [
        (
            &["serve", "--max-sandboxes", "0"][..],
            "--max-sandboxes",
            "between 1 and 1048576",
        ),
        (
            &["serve", "--max-events", "2000000"],
            "--max-events",
            "between 1 and 1000000",
        ),
        (
            &["serve", "--max-value-bytes", "1000"],
            "--max-value-bytes",
            "between 1024 and 4294967296",
        ),
        (
            &["run", "--max-sandbox-memory", "1MiB"],
            "--max-sandbox-memory",
            "at least 2097152",
        ),
    ] {
        let out = graft().args(args).args(["--port", "0"]).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "graft {args:?}: {err}");
        assert!(
            err.contains(flag) && err.contains(range),
            "graft {args:?}: {err}"
        );
        assert!(err.contains("Usage: graft"), "{err}");
    }
    // not a number at all: clap's own usage error
    let out = graft()
        .args(["serve", "--max-sandbox-memory", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn max_sandboxes_caps_the_node() {
    let node = Node::start(&[
        "serve",
        "--max-sandboxes",
        "1",
        "--max-sandbox-memory",
        "64MiB",
    ]);
    let body =
        |id: &str| json!({ "id": id, "modules": { "m": "return {}" }, "entry": null }).to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &body("one"));
    assert_eq!(status, 201, "{resp}");
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &body("two"));
    assert_eq!(status, 429, "{resp}");
    assert!(resp.contains("node_limit"), "{resp}");
    // the memory cap bounds what a sandbox may ask for
    let (status, _) = http(&node, "DELETE", "/api/v1/sandboxes/one", "");
    assert_eq!(status, 204);
    let big = json!({ "id": "big", "modules": { "m": "return {}" }, "limits": { "memory_bytes": 128 << 20 } });
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &big.to_string());
    assert_eq!(status, 422, "{resp}");
    let v: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["error"]["kind"], "limit_out_of_range");
    assert_eq!(v["error"]["max"], 64 << 20);
    node.interrupt();
}

/// A guest that answers, crashes and logs with terminal control sequences.
const EVIL: &str = r#"
local evil = {}
function evil.init() return 0 end
function evil.handle_call(req, from, state)
  if req == "crash" then error("\27[2Jboom\r") end
  if req == "log" then print("\27]0;pwned\7 and \27[31mred") return "logged", state end
  return "\27[2J\u{9b}31m\u{202e}text", state
end
return evil
"#;

#[test]
fn guest_text_reaches_the_terminal_escaped() {
    let mut node = Node::start(&["serve"]);
    let body = json!({ "id": "esc", "modules": { "evil": EVIL } }).to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &body);
    assert_eq!(status, 201, "{resp}");
    let spawn = json!({ "module": "evil", "name": "evil" }).to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes/esc/spawn", &spawn);
    assert_eq!(status, 201, "{resp}");
    // a name with control characters never gets into a table or a log
    let spawn = json!({ "module": "evil", "name": "x\u{1b}[2Jy" }).to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes/esc/spawn", &spawn);
    assert_eq!(status, 422, "{resp}");
    assert_eq!(
        serde_json::from_str::<Value>(&resp).unwrap()["error"]["kind"],
        "badarg"
    );
    let raw = |s: &str| {
        s.chars()
            .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}')
    };
    let reply = "\u{1b}[2J\u{9b}31m\u{202e}text";

    // a reply: escaped, and still exactly the same JSON
    let out = node.ok(&["call", "esc", "evil", "hi"]);
    assert!(!raw(&out), "{out:?}");
    assert!(out.contains(r"\u001b[2J\u009b31m\u202etext"), "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!(reply));
    let out = node.ok(&["call", "esc", "evil", "hi", "--json"]);
    assert!(!raw(&out), "{out:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({ "reply": reply })
    );

    // the process table
    let out = node.ok(&["ps", "esc"]);
    assert!(!raw(&out), "{out:?}");
    assert!(out.contains("evil"), "{out}");

    // a guest's log line on the node's stderr (not a terminal: no colours of its own)
    node.ok(&["call", "esc", "evil", "log"]);
    node.wait_until("the guest's log line", |_, err| err.contains("pwned"));
    let err = node.err();
    assert!(!raw(&err), "{err:?}");
    assert!(
        err.contains(r"\u{1b}]0;pwned\u{7} and \u{1b}[31mred"),
        "{err}"
    );

    // a crash message
    let err = node.fails(&["call", "esc", "evil", "crash"]);
    assert!(!raw(&err), "{err:?}");
    assert!(err.contains(r"\u{1b}[2Jboom\u{d}"), "{err}");
    // and its warning on the node's stderr
    node.wait_until("the crash warning", |_, err| {
        err.contains("process crashed")
    });
    let err = node.err();
    assert!(!raw(&err), "{err:?}");
    assert!(err.contains(r"\u{1b}[2Jboom"), "{err}");
    node.interrupt();
}

#[test]
fn server_down_is_a_clear_user_error() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    for args in [
        &["ps", "myapp"][..],
        &["call", "myapp", "counter", "inc"],
        &["versions", "myapp", "counter"],
    ] {
        let out = graft().args(args).args(["--url", &url]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("cannot reach the Graft node at {url}")),
            "{err}"
        );
        assert!(
            err.contains("is `graft run` or `graft serve` running?"),
            "{err}"
        );
    }
    // GRAFT_URL is the default --url
    let out = graft()
        .args(["ps", "myapp"])
        .env("GRAFT_URL", &url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&url), "{}", text(&out.stderr));
    let out = graft()
        .args(["ps", "myapp", "--url", "ftp://x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid --url"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_refuses_what_cannot_start() {
    let empty = temp_dir("noproject");
    let out = graft()
        .arg("run")
        .arg(&empty)
        .args(["--port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not a Graft project"),
        "{}",
        text(&out.stderr)
    );

    let dir = scaffold("broken-start");
    std::fs::write(
        dir.join("src/counter.luau"),
        "local counter = {}\n\nlocal x = = 1\nreturn counter\n",
    )
    .unwrap();
    let out = graft()
        .arg("run")
        .arg(&dir)
        .args(["--port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("src/counter.luau:3:"), "{err}");
    assert!(err.contains("3 | local x = = 1"), "{err}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = graft().args(["serve", "--port", &port]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot listen on 127.0.0.1"),
        "{}",
        text(&out.stderr)
    );
    cleanup("noproject");
    cleanup("broken-start");
}

#[test]
fn run_serves_every_client_verb() {
    let dir = scaffold("verbs");
    let node = run(&dir);

    // call, in both output modes
    assert_eq!(node.ok(&["call", "myapp", "counter", "inc"]).trim(), "1");
    let out: Value =
        serde_json::from_str(&node.ok(&["call", "myapp", "counter", "\"inc\"", "--json"])).unwrap();
    assert_eq!(out, json!({ "reply": 2 }));
    assert_eq!(
        node.ok(&["call", "myapp", "counter", "get", "--timeout-ms", "2000"])
            .trim(),
        "2"
    );

    // cast
    assert!(node
        .ok(&["cast", "myapp", "counter", "10"])
        .contains("queued"));
    assert_eq!(node.ok(&["call", "myapp", "counter", "get"]).trim(), "12");

    // ps
    let ps = node.ok(&["ps", "myapp"]);
    assert!(ps.starts_with("PID"), "{ps}");
    for word in [
        "NAME",
        "MODULE",
        "VERSION",
        "STATUS",
        "MAILBOX",
        "MEMORY",
        "<app.1>",
        "counter",
        "idle",
        "2 processes",
    ] {
        assert!(ps.contains(word), "{word} not in\n{ps}");
    }
    let ps: Value = serde_json::from_str(&node.ok(&["ps", "myapp", "--json"])).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 2);
    let pid = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "counter")
        .unwrap()["pid"]
        .as_str()
        .unwrap()
        .to_owned();

    // state, by name and by pid
    let st: Value = serde_json::from_str(&node.ok(&["state", "myapp", "counter"])).unwrap();
    assert_eq!(st, json!({ "count": 12 }));
    let st: Value = serde_json::from_str(&node.ok(&["state", "myapp", &pid, "--json"])).unwrap();
    assert_eq!(st, json!({ "count": 12 }));

    // eval: inline, from a file, from stdin
    assert_eq!(node.ok(&["eval", "myapp", "return 6 * 7"]).trim(), "42");
    let test_file = dir.join("check.luau");
    std::fs::write(
        &test_file,
        "local n = graft.call(\"counter\", \"get\")\nassert(n >= 0)\nreturn \"ok\"\n",
    )
    .unwrap();
    assert_eq!(
        node.ok(&["eval", "myapp", "--file", test_file.to_str().unwrap()])
            .trim(),
        "\"ok\""
    );
    let mut child = graft()
        .args(["eval", "myapp", "-", "--json", "--url", &node.url()])
        .env("GRAFT_TOKEN", &node.token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"return { sum = 1 + 2 }")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!({ "result": { "sum": 3 } })
    );

    // reload from a file outside the project (module name from the file name)
    let elsewhere = temp_dir("verbs-reload").join("counter.luau");
    let v2 = std::fs::read_to_string(dir.join("src/counter.luau"))
        .unwrap()
        .replace("local STEP = 1", "local STEP = 100");
    std::fs::write(&elsewhere, &v2).unwrap();
    let out = node.ok(&["reload", "myapp", elsewhere.to_str().unwrap()]);
    assert!(out.starts_with("✓ counter v1 → v2 "), "{out}");
    assert!(out.contains("1 process migrated"), "{out}");
    let count = node
        .ok(&["call", "myapp", "counter", "get"])
        .trim()
        .parse::<i64>()
        .unwrap();
    assert_eq!(
        node.ok(&["call", "myapp", "counter", "inc"])
            .trim()
            .parse::<i64>()
            .unwrap(),
        count + 100
    );
    assert!(node
        .ok(&["reload", "myapp", elsewhere.to_str().unwrap()])
        .starts_with("= unchanged"));
    let dry: Value = serde_json::from_str(&node.ok(&[
        "reload",
        "myapp",
        dir.join("src/counter.luau").to_str().unwrap(),
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(dry["status"], "dry_run");
    // The file is version 1's source again: a roll-forward re-uses number 1.
    assert_eq!(
        dry["modules"],
        json!([{ "name": "counter", "from": 2, "to": 1 }])
    );

    // versions
    let versions = node.ok(&["versions", "myapp", "counter"]);
    assert!(versions.starts_with("VERSION"), "{versions}");
    let lines: Vec<&str> = versions.lines().collect();
    assert_eq!(lines.len(), 3, "{versions}");
    assert!(
        lines[1].starts_with("v1 ") && !lines[1].contains('*'),
        "{versions}"
    );
    assert!(
        lines[2].starts_with("v2 ") && lines[2].contains('*'),
        "{versions}"
    );
    let vs: Value =
        serde_json::from_str(&node.ok(&["versions", "myapp", "counter", "--json"])).unwrap();
    assert_eq!(vs.as_array().unwrap().len(), 2);

    // rollback
    let out = node.ok(&["rollback", "myapp", "counter", "1"]);
    assert!(out.starts_with("✓ counter v2 → v1 "), "{out}");
    let count = node
        .ok(&["call", "myapp", "counter", "get"])
        .trim()
        .parse::<i64>()
        .unwrap();
    assert_eq!(
        node.ok(&["call", "myapp", "counter", "inc"])
            .trim()
            .parse::<i64>()
            .unwrap(),
        count + 1
    );

    // user errors: exit 1 with a clear message
    assert!(node
        .fails(&["call", "ghost", "counter", "inc"])
        .contains("no sandbox `ghost`"));
    assert!(node.fails(&["ps", "ghost"]).contains("no sandbox `ghost`"));
    assert!(node
        .fails(&["call", "myapp", "nobody", "inc"])
        .contains("no process `nobody`"));
    assert!(node
        .fails(&["cast", "myapp", "nobody", "1"])
        .contains("no process `nobody`"));
    assert!(node
        .fails(&["state", "myapp", "nobody"])
        .contains("no process `nobody`"));
    assert!(node
        .fails(&["versions", "myapp", "nope"])
        .contains("no module `nope`"));
    assert!(node
        .fails(&["rollback", "myapp", "counter", "99"])
        .contains("no kept version 99"));
    assert!(node
        .fails(&["eval", "myapp", "error(\"kaputt\")"])
        .contains("kaputt"));
    let err = node.fails(&["eval", "myapp", "return = 1"]);
    assert!(err.contains("error: ") && err.contains(":1:"), "{err}");
    let broken = temp_dir("verbs-broken").join("counter.luau");
    std::fs::write(
        &broken,
        "local counter = {}\n\nlocal x = = 1\nreturn counter\n",
    )
    .unwrap();
    let err = node.fails(&["reload", "myapp", broken.to_str().unwrap()]);
    assert!(
        err.contains(&format!("--> {}:3:", broken.display())),
        "{err}"
    );
    assert!(err.contains("3 | local x = = 1"), "{err}");
    let out = node.client(&["reload", "myapp", broken.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"]["kind"], "compile_error");
    assert_eq!(body["error"]["line"], 3);
    assert!(node
        .fails(&["reload", "myapp", "/no/such/file.luau"])
        .contains("cannot read"));

    // Ctrl-C: terminate callbacks run, exit 0
    let (_, err) = node.interrupt();
    assert!(
        err.contains("counter stopping at"),
        "terminate did not run:\n{err}"
    );
    cleanup("verbs");
    cleanup("verbs-reload");
    cleanup("verbs-broken");
}

#[test]
fn serve_takes_sandboxes_through_the_api() {
    let node = Node::start(&["serve"]);
    let app = "return { init = function() return 0 end, handle_call = function(r, f, s) return r * 2, s end }";
    let body = json!({ "id": "api", "modules": { "doubler": app } }).to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &body);
    assert_eq!(status, 201, "{resp}");
    let (status, resp) = http(
        &node,
        "POST",
        "/api/v1/sandboxes/api/spawn",
        "{\"module\": \"doubler\", \"name\": \"d\"}",
    );
    assert_eq!(status, 201, "{resp}");
    assert_eq!(node.ok(&["call", "api", "d", "21"]).trim(), "42");
    let (status, _) = http(&node, "GET", "/api/v1/health", "");
    assert_eq!(status, 200);
    node.interrupt();
}

/// `graft serve` on a data directory holding a sandbox it cannot restore
/// (its stored `memory_bytes` is over the new `--max-sandbox-memory`) keeps
/// serving, warns, and never creates over the stored sandbox: creating its
/// id is refused until an explicit DELETE removes its rows.
#[test]
fn serve_keeps_an_unrestorable_sandbox_until_it_is_deleted() {
    let data = temp_dir("serve-unrestorable");
    let data_arg = data.to_str().unwrap().to_owned();
    let app = "return { init = function() return 0 end, handle_call = function(r, f, s) return r * 2, s end }";
    let body = json!({ "id": "kept", "modules": { "doubler": app } }).to_string();
    let node = Node::start(&["serve", "--data", &data_arg]);
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &body);
    assert_eq!(status, 201, "{resp}");
    node.interrupt();

    let mut node = Node::start(&[
        "serve",
        "--data",
        &data_arg,
        "--max-sandbox-memory",
        "32MiB",
    ]);
    node.wait_until("the warning", |_, err| {
        err.contains("warning: sandbox `kept` could not be restored")
            && err.contains("memory_bytes")
    });
    let (status, _) = http(&node, "GET", "/api/v1/health", "");
    assert_eq!(status, 200, "the node serves");
    let small = json!({
        "id": "kept",
        "modules": { "doubler": app },
        "limits": { "memory_bytes": 16777216 },
    })
    .to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &small);
    // A conflict with what is stored (not bad input), naming the way out.
    assert_eq!(status, 409, "{resp}");
    assert!(
        resp.contains("sandbox_unrestored")
            && resp.contains("could not be restored")
            && resp.contains("--discard kept")
            && resp.contains("DELETE /api/v1/sandboxes/kept"),
        "{resp}"
    );
    let (status, resp) = http(&node, "DELETE", "/api/v1/sandboxes/kept", "");
    assert_eq!(status, 204, "an explicit delete removes it: {resp}");
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &small);
    assert_eq!(status, 201, "{resp}");
    node.interrupt();
    cleanup("serve-unrestorable");
}

/// A minimal HTTP/1.1 exchange with the node's admin token (the test
/// needs no client library).
fn http(node: &Node, method: &str, path: &str, body: &str) -> (u16, String) {
    http_port(node, node.port, method, path, body)
}

/// [`http`] to another port of the same node (`--metrics-bind`).
fn http_port(node: &Node, port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        node.token,
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).unwrap().parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The counter's increment, measured with two calls.
fn step(node: &Node) -> i64 {
    let a: i64 = node
        .ok(&["call", "myapp", "counter", "inc"])
        .trim()
        .parse()
        .unwrap();
    let b: i64 = node
        .ok(&["call", "myapp", "counter", "inc"])
        .trim()
        .parse()
        .unwrap();
    b - a
}

#[track_caller]
fn wait_for_step(node: &Node, expected: i64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = step(node);
        if s == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "STEP stayed {s}, expected {expected}\nstdout:\n{}\nstderr:\n{}",
            node.out(),
            node.err()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reload_lines(out: &str, module: &str) -> usize {
    out.lines()
        .filter(|l| l.starts_with("✓ ") && l.contains(&format!("{module} v")))
        .count()
}

#[test]
fn watch_hot_reloads_every_kind_of_save() {
    let dir = scaffold("watch");
    let file = dir.join("src/counter.luau");
    let original = std::fs::read_to_string(&file).unwrap();
    let step_line = original
        .lines()
        .position(|l| l.starts_with("local STEP"))
        .unwrap()
        + 1;
    let with_step = |s: &str| original.replace("local STEP = 1", &format!("local STEP = {s}"));
    let mut node = run(&dir);
    assert_eq!(step(&node), 1);
    let count_before: i64 = node
        .ok(&["call", "myapp", "counter", "get"])
        .trim()
        .parse()
        .unwrap();

    // 1. in place
    std::fs::write(&file, with_step("10")).unwrap();
    wait_for_step(&node, 10);
    node.wait_until("the v2 line", |out, _| out.contains("✓ counter v1 → v2 "));
    assert!(node.out().contains("1 process migrated"), "{}", node.out());

    // 2. write-then-rename
    let tmp = dir.join("src/.counter.luau.tmp");
    std::fs::write(&tmp, with_step("100")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_for_step(&node, 100);

    // 3. delete-and-create, with a pause longer than the debounce between them
    std::fs::remove_file(&file).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    std::fs::write(&file, with_step("1000")).unwrap();
    wait_for_step(&node, 1000);

    // 4. a broken save: diagnostics with file:line, the old code keeps running
    std::fs::write(&file, with_step("= 5")).unwrap();
    let location = format!("src/counter.luau:{step_line}:");
    node.wait_until("the diagnostic", |_, err| {
        err.contains(&location) && err.contains("the old code is still running")
    });
    let err = node.err();
    assert!(err.contains("error: "), "{err}");
    assert!(
        err.contains(&format!("{step_line} | local STEP = = 5")),
        "no code frame:\n{err}"
    );
    assert!(err.contains("the old code is still running"), "{err}");
    assert_eq!(step(&node), 1000);

    // 5. the fix goes live
    std::fs::write(&file, with_step("7")).unwrap();
    wait_for_step(&node, 7);

    // state survived every reload; every save went live exactly once
    let count_now: i64 = node
        .ok(&["call", "myapp", "counter", "get"])
        .trim()
        .parse()
        .unwrap();
    assert!(
        count_now >= count_before + 10 + 100 + 1000 + 1000 + 7,
        "the count was reset: {count_now}"
    );
    node.wait_until("four reload lines", |out, _| {
        reload_lines(out, "counter") >= 4
    });
    assert_eq!(reload_lines(&node.out(), "counter"), 4, "{}", node.out());
    assert_eq!(
        node.err().matches("error: ").count(),
        1,
        "the broken save was reported once:\n{}",
        node.err()
    );
    let vs: Value =
        serde_json::from_str(&node.ok(&["versions", "myapp", "counter", "--json"])).unwrap();
    assert_eq!(vs.as_array().unwrap().len(), 5, "{vs}");

    // 6. a new module and a module requiring it, saved together
    std::fs::create_dir_all(dir.join("src/lib")).unwrap();
    std::fs::write(dir.join("src/lib/steps.luau"), "return { size = 3 }\n").unwrap();
    let requiring = with_step("require(\"lib.steps\").size");
    std::fs::write(&file, &requiring).unwrap();
    wait_for_step(&node, 3);
    node.wait_until("the lib.steps line", |out, _| {
        out.contains("lib.steps new → v1")
    });

    // 7. deleting a module in use is refused: it stays loaded, and why is said
    std::fs::remove_file(dir.join("src/lib/steps.luau")).unwrap();
    node.wait_until("the refusal", |_, err| {
        err.contains("src/lib/steps.luau was deleted") && err.contains("required by `counter`")
    });
    let err = node.err();
    assert!(
        err.contains("module `lib.steps` is in use, so it stays loaded"),
        "{err}"
    );
    assert!(err.contains("required by `counter`"), "{err}");
    assert_eq!(step(&node), 3);

    // 8. a file that is not a module is ignored, with a warning
    std::fs::write(dir.join("src/bad name.luau"), "return {}").unwrap();
    node.wait_until("the warning", |_, err| {
        err.contains("ignoring") && err.contains("bad name.luau")
    });

    // 9. an unused module can go, but stays loaded until the next start
    std::fs::write(dir.join("src/extra.luau"), "return { unused = true }\n").unwrap();
    node.wait_until("the extra line", |out, _| out.contains("✓ extra new → v1"));
    std::fs::remove_file(dir.join("src/extra.luau")).unwrap();
    node.wait_until("the note", |_, err| {
        err.contains(
            "src/extra.luau was deleted; module `extra` is no longer used but stays loaded",
        )
    });

    // 10. deleting a module with live processes is refused too
    std::fs::remove_file(&file).unwrap();
    // The refusal is printed over several lines: wait for its last one.
    node.wait_until("the refusal", |_, err| {
        err.contains("src/counter.luau was deleted") && err.contains("1 live process runs it")
    });
    let err = node.err();
    assert!(
        err.contains("module `counter` is in use, so it stays loaded"),
        "{err}"
    );
    assert!(err.contains("1 live process runs it: <counter."), "{err}");
    assert_eq!(step(&node), 3);

    let (out, _) = node.interrupt();
    assert_eq!(reload_lines(&out, "counter"), 5, "{out}");
    cleanup("watch");
}

/// A node over TLS with a certificate made here, for `localhost`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn tokens_roles_and_the_audit_log_from_the_command_line() {
    let node = Node::start(&["serve"]);
    let body = json!({ "id": "t", "modules": { "counter": "return { init = function() return 0 end, handle_call = function(r, f, s) return s + 1, s + 1 end }" } }).to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &body);
    assert_eq!(status, 201, "{resp}");
    let (status, resp) = http(
        &node,
        "POST",
        "/api/v1/sandboxes/t/spawn",
        "{\"module\": \"counter\", \"name\": \"c\"}",
    );
    assert_eq!(status, 201, "{resp}");

    let out = node.client(&[
        "token",
        "create",
        "--role",
        "viewer",
        "--label",
        "read only",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let viewer = text(&out.stdout).trim().to_owned();
    assert!(
        viewer.starts_with("graft_") && viewer.len() == 70,
        "{viewer}"
    );
    assert!(
        text(&out.stderr).contains("shown once"),
        "{}",
        text(&out.stderr)
    );
    let as_viewer = |args: &[&str]| {
        graft()
            .args(args)
            .args(["--url", &node.url(), "--token", &viewer])
            .output()
            .unwrap()
    };
    let ps = as_viewer(&["ps", "t"]);
    assert!(ps.status.success(), "{}", text(&ps.stderr));
    let call = as_viewer(&["call", "t", "c", "1"]);
    assert_eq!(call.status.code(), Some(1));
    assert!(
        text(&call.stderr).contains("needs the operator role"),
        "{}",
        text(&call.stderr)
    );

    let list = node.ok(&["token", "list"]);
    assert!(
        list.contains("viewer") && list.contains("read only"),
        "{list}"
    );
    assert!(
        !list.contains(&viewer[6..]) && !list.contains(&node.token[6..]),
        "{list}"
    );
    let id = list
        .lines()
        .find(|l| l.contains("viewer"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert!(node.ok(&["token", "revoke", &id]).contains("revoked"));
    let refused = as_viewer(&["ps", "t"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = text(&refused.stderr);
    assert!(
        err.contains("not valid") && err.contains("GRAFT_TOKEN"),
        "{err}"
    );
    assert!(!err.contains(&viewer[6..]), "the token was echoed: {err}");

    let audit = node.ok(&["audit", "--outcome", "forbidden"]);
    assert!(
        audit.contains("/api/v1/sandboxes/{id}/call") && audit.contains("viewer"),
        "{audit}"
    );
    // An allowed call is the application's traffic: no row by default.
    node.ok(&["call", "t", "c", "1"]);
    let all = node.ok(&["audit", "--json", "--limit", "1000"]);
    let v: Value = serde_json::from_str(&all).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() >= 4, "{v}");
    assert!(
        !rows
            .iter()
            .any(|r| r["route"] == "/api/v1/sandboxes/{id}/call" && r["outcome"] == "ok"),
        "{v}"
    );
    assert!(!all.contains(&viewer[6..]) && !all.contains(&node.token[6..]));
    node.interrupt();

    // `--audit-messages`: every allowed call has its row too.
    let node = Node::start(&["serve", "--audit-messages"]);
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &body);
    assert_eq!(status, 201, "{resp}");
    let (status, resp) = http(
        &node,
        "POST",
        "/api/v1/sandboxes/t/spawn",
        "{\"module\": \"counter\", \"name\": \"c\"}",
    );
    assert_eq!(status, 201, "{resp}");
    node.ok(&["call", "t", "c", "1"]);
    let all = node.ok(&["audit", "--json", "--limit", "1000"]);
    let v: Value = serde_json::from_str(&all).unwrap();
    assert!(
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            // Written ahead; its completion follows lazily.
            .any(|r| r["route"] == "/api/v1/sandboxes/{id}/call" && r["role"] == "admin"),
        "{v}"
    );
    node.interrupt();
}

#[test]
fn run_names_its_token_file_and_clients_in_the_project_find_it() {
    let dir = scaffold("token-file");
    let node = run(&dir);
    let out = node.out();
    let file = dir.join(".graft").join("admin.token");
    assert!(
        out.contains(&format!("admin token: {}", file.display())),
        "{out}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    // Inside the project (a subdirectory too) no token is typed.
    let inside = graft()
        .current_dir(dir.join("src"))
        .args(["call", "myapp", "counter", "inc", "--url", &node.url()])
        .output()
        .unwrap();
    assert!(inside.status.success(), "{}", text(&inside.stderr));
    // Elsewhere, with no token: 401 and where the client looked.
    let elsewhere = graft()
        .current_dir(std::env::temp_dir())
        .args(["call", "myapp", "counter", "inc", "--url", &node.url()])
        .output()
        .unwrap();
    assert_eq!(elsewhere.status.code(), Some(1));
    let err = text(&elsewhere.stderr);
    assert!(
        err.contains("needs a token") && err.contains("GRAFT_TOKEN"),
        "{err}"
    );
    // A restart keeps the same token file.
    let token = node.token.clone();
    node.interrupt();
    let again = run(&dir);
    assert_eq!(again.token, token);
    again.interrupt();
    cleanup("token-file");
}

/// `graft serve --ephemeral` and `graft serve` on one (the default) data
/// directory: the ephemeral node adopts the persistent node's token file
/// instead of writing its own over it (which left the persistent node's
/// clients with a token it did not know), and a restart leaves it alone;
/// revoking the file's token and restarting still rotates it.
#[test]
fn an_ephemeral_node_and_a_persistent_one_share_the_token_file() {
    // The nodes' and the clients' default data directory is `home/graft`:
    // clients find the token file themselves, as a user's commands do.
    let home = temp_dir("shared-token");
    let file = home.join("graft").join("admin.token");
    let read = || std::fs::read_to_string(&file).unwrap();
    let with_file = |node: &Node, who: &str, args: &[&str]| {
        let out = graft()
            .env("XDG_DATA_HOME", &home)
            .current_dir(std::env::temp_dir())
            .args(args)
            .args(["--url", &node.url()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "graft {args:?} with the token file against the {who} node: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    };
    let list = ["token", "list"];

    let persistent = Node::start_in(&home, &["serve"]);
    assert!(persistent.out().contains("admin.token (new)"));
    let token = read();
    let ephemeral = Node::start_in(&home, &["serve", "--ephemeral"]);
    assert_eq!(read(), token, "the ephemeral node rewrote the token file");
    assert!(!ephemeral.out().contains("(new)"), "{}", ephemeral.out());
    with_file(&persistent, "persistent", &list);
    let listed = with_file(&ephemeral, "ephemeral", &list);
    assert!(listed.contains("admin token file (adopted)"), "{listed}");

    // The persistent node restarts: it knows the token, keeps the file,
    // and the ephemeral node still accepts it.
    persistent.interrupt();
    let persistent = Node::start_in(&home, &["serve"]);
    assert!(!persistent.out().contains("(new)"), "{}", persistent.out());
    assert_eq!(read(), token);
    let listed = with_file(&persistent, "restarted persistent", &list);
    with_file(&ephemeral, "ephemeral", &list);

    // Rotating is unchanged: revoke the file's token, restart, and the
    // node writes a new file and refuses the old token.
    let id = listed
        .lines()
        .find(|l| l.contains("admin token file"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no file token in {listed}"))
        .to_owned();
    with_file(
        &persistent,
        "restarted persistent",
        &["token", "revoke", &id],
    );
    persistent.interrupt();
    let persistent = Node::start_in(&home, &["serve"]);
    assert!(persistent.out().contains("admin.token (new)"));
    assert_ne!(read(), token);
    let old = graft()
        .args(["token", "list", "--url", &persistent.url(), "--token"])
        .arg(token.trim())
        .output()
        .unwrap();
    assert_eq!(old.status.code(), Some(1), "{}", text(&old.stdout));
    assert!(
        text(&old.stderr).contains("the token came from --token"),
        "{}",
        text(&old.stderr)
    );
    with_file(&persistent, "rotated persistent", &list);
    // The ephemeral node takes the new file at its next start.
    ephemeral.interrupt();
    let ephemeral = Node::start_in(&home, &["serve", "--ephemeral"]);
    assert!(!ephemeral.out().contains("(new)"), "{}", ephemeral.out());
    assert_eq!(ephemeral.token, persistent.token);
    with_file(&ephemeral, "restarted ephemeral", &list);
    ephemeral.interrupt();
    persistent.interrupt();
    cleanup("shared-token");
}

#[test]
fn a_non_loopback_bind_needs_tls_or_insecure_http() {
    let out = graft()
        .args(["serve", "--bind", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("--tls-cert") && err.contains("--insecure-http"),
        "{err}"
    );
    let out = graft()
        .args(["serve", "--tls-cert", "x.pem", "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn https_with_a_pinned_ca_and_refused_without_it() {
    let dir = temp_dir("tls");
    let (cert, key) = self_signed(&dir);
    let node = Node::start(&[
        "serve",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        node.out().contains("listening on https://"),
        "{}",
        node.out()
    );
    let url = format!("https://localhost:{}", node.port);
    let pinned = graft()
        .env("GRAFT_TOKEN", &node.token)
        .args([
            "token",
            "list",
            "--url",
            &url,
            "--cacert",
            cert.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(pinned.status.success(), "{}", text(&pinned.stderr));
    assert!(text(&pinned.stdout).contains("admin"));
    let unpinned = graft()
        .env("GRAFT_TOKEN", &node.token)
        .args(["token", "list", "--url", &url])
        .output()
        .unwrap();
    assert_eq!(unpinned.status.code(), Some(1));
    assert!(
        text(&unpinned.stderr).contains("cannot reach"),
        "{}",
        text(&unpinned.stderr)
    );
    node.interrupt();
    cleanup("tls");
}

#[test]
fn events_lists_and_follows_and_metrics_bind_serves_metrics() {
    let mut node = Node::start(&["serve", "--metrics-bind", "127.0.0.1:0"]);
    node.wait_until("the metrics line", |out, _| {
        out.contains("metrics on http://")
    });
    let out = node.out();
    let metrics_port: u16 = out
        .split("metrics on http://127.0.0.1:")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap();
    let app = "return { init = function() return 0 end, handle_call = function(r, f, s) return r, s end }";
    let body = json!({ "id": "ev", "modules": { "echo": app } }).to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes", &body);
    assert_eq!(status, 201, "{resp}");
    // Listed: the creation, with its sandbox and kind.
    let listed = node.ok(&["events", "--sandbox", "ev"]);
    assert!(
        listed.contains("sandbox_created") && listed.contains("ev"),
        "{listed}"
    );
    // Followed: a reload made after the follower started shows up.
    let mut follower = graft()
        .args([
            "events",
            "--follow",
            "--kind",
            "reload",
            "--url",
            &node.url(),
        ])
        .env("GRAFT_TOKEN", &node.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    collect(follower.stdout.take().unwrap(), seen.clone());
    std::thread::sleep(Duration::from_millis(300));
    let v2 = app.replace("return r, s", "return r + 1, s");
    let body = json!({ "modules": { "echo": v2 } }).to_string();
    let (status, resp) = http(&node, "POST", "/api/v1/sandboxes/ev/reload", &body);
    assert_eq!(status, 200, "{resp}");
    let deadline = Instant::now() + DEADLINE;
    while !seen.lock().unwrap().contains("reload") {
        assert!(
            Instant::now() < deadline,
            "the follower printed: {}",
            seen.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !seen.lock().unwrap().contains("sandbox_created"),
        "the kind filter holds"
    );
    let _ = follower.kill();
    let _ = follower.wait();
    // The scrape-only listener serves the metrics and nothing else.
    let (status, scraped) = http_port(&node, metrics_port, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        scraped.contains("graft_reloads_total{sandbox=\"ev\",result=\"reload\"} 1"),
        "{scraped}"
    );
    let (status, _) = http_port(&node, metrics_port, "GET", "/api/v1/sandboxes", "");
    assert_eq!(status, 404);
    // Hostile: a bad kind is refused with the API's message, exit 1.
    let err = node.fails(&["events", "--kind", "NOT A KIND"]);
    assert!(err.contains("kind"), "{err}");
    // A follower whose token is revoked stops (its stream ends, the
    // reconnect is refused) with exit 1, instead of retrying forever.
    let out = node.client(&["token", "create", "--role", "viewer", "--label", "follower"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let viewer = text(&out.stdout).trim().to_owned();
    let mut follower = graft()
        .args([
            "events",
            "--follow",
            "--url",
            &node.url(),
            "--token",
            &viewer,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let said = Arc::new(Mutex::new(String::new()));
    collect(follower.stderr.take().unwrap(), said.clone());
    std::thread::sleep(Duration::from_millis(300));
    let list = node.ok(&["token", "list"]);
    let id = list
        .lines()
        .find(|l| l.contains("follower"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert!(node.ok(&["token", "revoke", &id]).contains("revoked"));
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = follower.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the revoked follower still runs: {}",
            said.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    std::thread::sleep(Duration::from_millis(100));
    let said = said.lock().unwrap().clone();
    assert!(said.contains("401"), "{said}");
    node.interrupt();
}
