//! The durable node through the real binary (SPEC §8): graceful restarts
//! and `kill -9` at random moments during a stream of reloads. Every
//! acknowledged version must come back, numbers consecutive and unique, the
//! database must open cleanly, and named state may lose at most what changed
//! since the last checkpoint.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

fn graft() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graft"));
    cmd.env_remove("GRAFT_URL")
        .env_remove("RUST_LOG")
        .env_remove("GRAFT_TOKEN");
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A scaffolded project in a fresh temporary directory.
fn project(name: &str) -> PathBuf {
    let root =
        std::env::temp_dir().join(format!("graft-durable-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = root.join("myapp");
    let out = graft().arg("new").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read_to_string(dir.join(".gitignore"))
            .unwrap()
            .lines()
            .any(|l| l == ".graft/"),
        "graft new keeps the data directory out of git"
    );
    dir
}

/// `graft run DIR` in the background, with its port and admin token.
struct Running {
    child: Child,
    port: u16,
    token: String,
    /// Everything it printed on stdout so far.
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    /// What the node printed after its listening line (stdout, then stderr
    /// as it comes), for tests that read it.
    said: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Running {
    fn start(dir: &Path, extra: &[&str]) -> Running {
        Running::spawn(dir, extra, None, &dir.join(".graft"))
    }

    /// `graft run DIR` as user `uid` (when given), with its data in `data`.
    fn spawn(dir: &Path, extra: &[&str], uid: Option<u32>, data: &Path) -> Running {
        Running::spawn_with(dir, extra, uid, data, false)
    }

    /// [`Running::spawn`], watching `src/` when `watch`.
    fn spawn_with(
        dir: &Path,
        extra: &[&str],
        uid: Option<u32>,
        data: &Path,
        watch: bool,
    ) -> Running {
        let mut cmd = graft();
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid).env("HOME", data);
        }
        cmd.arg("run")
            .arg(dir)
            .args(["--port", "0"])
            .args(if watch { &[][..] } else { &["--no-watch"][..] })
            .args(extra)
            .stderr(Stdio::piped());
        Running::launch(cmd, data)
    }

    /// `graft run DIR` watching src/ and graft.toml, its stderr in `log`.
    fn watching(dir: &Path, log: &Path) -> Running {
        let mut cmd = graft();
        cmd.arg("run")
            .arg(dir)
            .args(["--port", "0", "--debounce-ms", "50"])
            .stderr(std::fs::File::create(log).unwrap());
        Running::launch(cmd, &dir.join(".graft"))
    }

    /// `graft run DIR` with `extra` flags, its stderr in `log`.
    fn logged(dir: &Path, extra: &[&str], log: &Path) -> Running {
        let mut cmd = graft();
        cmd.arg("run")
            .arg(dir)
            .args(["--port", "0", "--no-watch"])
            .args(extra)
            .stderr(std::fs::File::create(log).unwrap());
        Running::launch(cmd, &dir.join(".graft"))
    }

    fn launch(mut cmd: Command, data: &Path) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = String::new();
        let deadline = Instant::now() + DEADLINE;
        let port = loop {
            let mut buf = [0u8; 256];
            let n = stdout.read(&mut buf).unwrap_or(0);
            if n == 0 {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("graft run ended before listening:\n{seen}\n{err}");
            }
            seen.push_str(&text(&buf[..n]));
            if let Some(rest) = seen.split("listening on http://127.0.0.1:").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if rest.len() > digits.len() {
                    break digits.parse().unwrap();
                }
            }
            assert!(Instant::now() < deadline, "no listening line: {seen}");
        };
        // Keep draining stdout and stderr so the node never blocks on a
        // full pipe; keep what they say (`stdout`: all of stdout; `said`:
        // stdout after the listening line, and stderr, as they come).
        let printed = std::sync::Arc::new(std::sync::Mutex::new(seen));
        let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let drain = |mut from: Box<dyn Read + Send>,
                     also: Option<std::sync::Arc<std::sync::Mutex<String>>>| {
            let said = said.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let t = text(&buf[..n]);
                    if let Some(also) = &also {
                        also.lock().unwrap().push_str(&t);
                    }
                    said.lock().unwrap().push_str(&t);
                }
            });
        };
        drain(Box::new(stdout), Some(printed.clone()));
        if let Some(stderr) = child.stderr.take() {
            drain(Box::new(stderr), None);
        }
        // The node wrote its admin token file before listening (SPEC §9).
        let token = std::fs::read_to_string(data.join("admin.token"))
            .expect("the admin token file")
            .trim()
            .to_string();
        Running {
            child,
            port,
            token,
            stdout: printed,
            said,
        }
    }

    /// Waits until its stdout holds `what` (at least `n` times).
    #[track_caller]
    fn await_stdout(&self, what: &str, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let out = self.stdout.lock().unwrap().clone();
            if out.matches(what).count() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} (x{n}) on stdout:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self, args: &[&str]) -> Output {
        graft()
            .args(args)
            .args(["--url", &format!("http://127.0.0.1:{}", self.port)])
            .env("GRAFT_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.client(args);
        assert!(
            out.status.success(),
            "graft {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Waits until the node has printed `what` (after its listening line).
    #[track_caller]
    fn wait_for_output(&self, what: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let said = self.said.lock().unwrap().clone();
            if said.contains(what) {
                return said;
            }
            assert!(Instant::now() < deadline, "`{what}` never printed:\n{said}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&self) -> i64 {
        self.ok(&["call", "myapp", "counter", "get"])
            .trim()
            .parse()
            .unwrap()
    }

    /// (version, checksum, current) of the counter module.
    fn versions(&self) -> Vec<(u64, String, bool)> {
        let v: Value =
            serde_json::from_str(&self.ok(&["versions", "myapp", "counter", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["version"].as_u64().unwrap(),
                    v["checksum"].as_str().unwrap().to_string(),
                    v["current"] == Value::Bool(true),
                )
            })
            .collect()
    }

    fn kill9(mut self) {
        // `Child::kill` is SIGKILL on Unix.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(st.success());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "graceful stop exits 0: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "graft did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Writes a counter source that differs from the scaffold's only by a
/// comment into src/ (as an editor would; `graft run` makes src/ live on
/// start) and returns its path.
fn revision(dir: &Path, n: u32) -> PathBuf {
    let path = dir.join("src/counter.luau");
    let original = std::fs::read_to_string(&path).unwrap();
    let base = original.split("\n-- revision ").next().unwrap_or(&original);
    std::fs::write(&path, format!("{base}\n-- revision {n}\n")).unwrap();
    path
}

/// The version number a `graft reload --json` acknowledged.
fn acknowledged(out: &Output) -> Option<u64> {
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["modules"][0]["to"].as_u64()
}

/// Cheap randomness for kill timing (no RNG crate needed).
fn jitter_ms(round: u32, max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (nanos ^ (u64::from(round) * 2_654_435_761)) % max
}

#[test]
fn a_graceful_restart_keeps_versions_current_and_named_state() {
    let dir = project("graceful");
    let node = Running::start(&dir, &[]);
    for _ in 0..5 {
        node.ok(&["call", "myapp", "counter", "inc"]);
    }
    for n in 1..=3 {
        let f = revision(&dir, n);
        node.ok(&["reload", "myapp", f.to_str().unwrap()]);
    }
    let before = node.versions();
    assert_eq!(before.len(), 4);
    node.terminate();

    let node = Running::start(&dir, &[]);
    assert_eq!(node.versions(), before, "versions, checksums, current");
    assert_eq!(node.count(), 5, "the named state came back");
    node.terminate();
    assert!(dir.join(".graft").join(graft::DATABASE_FILE).is_file());

    // A file edited while the node was down goes live when it starts.
    let src = dir.join("src/counter.luau");
    let edited = std::fs::read_to_string(&src).unwrap() + "\n-- edited offline\n";
    std::fs::write(&src, &edited).unwrap();
    let node = Running::start(&dir, &[]);
    let kept = node.versions();
    assert_eq!(kept.len(), 5, "{kept:?}");
    assert_eq!(kept.iter().find(|v| v.2).map(|v| v.0), Some(5));
    assert_eq!(
        kept.last().map(|v| v.1.clone()),
        Some(graft::upgrade::checksum(&edited))
    );
    assert_eq!(node.count(), 5, "state migrated, not reset");
    node.terminate();
}

#[test]
fn kill_9_never_loses_an_acknowledged_version() {
    let dir = project("kill9");
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut count_at_checkpoint: Option<i64> = None;
    let mut rev = 0;
    for round in 0..20 {
        let node = Running::start(&dir, &["--checkpoint-ms", "50"]);
        // Everything acknowledged before the kill is here.
        let kept = node.versions();
        let numbers: Vec<u64> = kept.iter().map(|v| v.0).collect();
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "round {round}: numbers unique and ordered: {numbers:?}"
        );
        let newest_acked = acked.keys().next_back().copied().unwrap_or(1);
        for (version, checksum) in &acked {
            // Only the newest `max_versions` (10) are kept.
            if version + 8 < newest_acked {
                continue;
            }
            let found = kept.iter().find(|v| v.0 == *version);
            assert_eq!(
                found.map(|v| &v.1),
                Some(checksum),
                "round {round}: acknowledged v{version} is missing: {kept:?}"
            );
        }
        let current = kept.iter().find(|v| v.2).expect("a current version").0;
        assert!(
            current >= newest_acked,
            "round {round}: current v{current} is older than acknowledged v{newest_acked}"
        );
        let newest = numbers.last().copied().unwrap_or(0);
        assert!(
            newest <= newest_acked + 1,
            "round {round}: at most the one in-flight reload beyond the acknowledged: {numbers:?}"
        );
        // State lost is bounded by the checkpoint interval: the count
        // checkpointed before the last kill is back.
        if let Some(c) = count_at_checkpoint {
            assert_eq!(node.count(), c, "round {round}: checkpointed state");
        }
        node.ok(&["call", "myapp", "counter", "inc"]);
        std::thread::sleep(Duration::from_millis(250)); // > 4 checkpoint intervals
        count_at_checkpoint = Some(node.count());

        for _ in 0..2 {
            rev += 1;
            let f = revision(&dir, rev);
            let out = node.client(&["reload", "myapp", f.to_str().unwrap(), "--json"]);
            let v = acknowledged(&out).expect("a reload on a live node is acknowledged");
            acked.insert(
                v,
                graft::upgrade::checksum(&std::fs::read_to_string(&f).unwrap()),
            );
        }
        // One more reload in flight while the node is killed.
        rev += 1;
        let f = revision(&dir, rev);
        let source = std::fs::read_to_string(&f).unwrap();
        let in_flight = graft()
            .args(["reload", "myapp", f.to_str().unwrap(), "--json"])
            .args(["--url", &format!("http://127.0.0.1:{}", node.port)])
            .env("GRAFT_TOKEN", &node.token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(jitter_ms(round, 40)));
        node.kill9();
        let out = in_flight.wait_with_output().unwrap();
        if let Some(v) = acknowledged(&out) {
            acked.insert(v, graft::upgrade::checksum(&source));
        }
    }
    // The database opens cleanly one last time.
    let node = Running::start(&dir, &[]);
    assert!(!node.versions().is_empty());
    node.terminate();
}

#[test]
fn a_canary_open_at_kill_9_comes_back_on_the_previous_version() {
    let dir = project("canary");
    let node = Running::start(&dir, &[]);
    // From outside src/: on start `graft run` makes src/ (still version 1)
    // live, which must not mask the rollback.
    let f = dir.join("canary/counter.luau");
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    let src = std::fs::read_to_string(dir.join("src/counter.luau")).unwrap();
    std::fs::write(&f, src + "\n-- canary\n").unwrap();
    let out = node.client(&[
        "reload",
        "myapp",
        f.to_str().unwrap(),
        "--canary-ms",
        "600000",
        "--json",
    ]);
    assert_eq!(acknowledged(&out), Some(2));
    node.kill9();
    let node = Running::start(&dir, &[]);
    let kept = node.versions();
    assert_eq!(
        kept.iter().find(|v| v.2).map(|v| v.0),
        Some(1),
        "rolled back to the last permanent version: {kept:?}"
    );
    assert!(kept.iter().any(|v| v.0 == 2), "the canary version is kept");
    node.terminate();
}

#[test]
fn a_second_node_on_the_same_data_directory_is_refused() {
    let dir = project("locked");
    let node = Running::start(&dir, &[]);
    let out = graft()
        .arg("run")
        .arg(&dir)
        .args(["--port", "0", "--no-watch"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("another graft node uses this data directory"),
        "{err}"
    );
    node.terminate();
}

#[test]
fn backup_copies_a_live_database() {
    let dir = project("backup");
    let node = Running::start(&dir, &[]);
    let f = revision(&dir, 1);
    node.ok(&["reload", "myapp", f.to_str().unwrap()]);
    let dest = dir.join("copy.db");
    let out = graft()
        .args(["backup", dest.to_str().unwrap(), "--data"])
        .arg(dir.join(".graft"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The copy is a database a node can open.
    let copy_dir = dir.join("restored");
    std::fs::create_dir_all(&copy_dir).unwrap();
    std::fs::rename(&dest, copy_dir.join(graft::DATABASE_FILE)).unwrap();
    let restored = graft::Node::builder().data_dir(&copy_dir).open().unwrap();
    let sb = restored.sandbox("myapp").unwrap();
    let kept: Vec<u32> = graft::block_on(sb.versions("counter"))
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(kept, vec![1, 2]);
    restored.shutdown();
    // A backup never overwrites.
    let again = graft()
        .args([
            "backup",
            copy_dir.join(graft::DATABASE_FILE).to_str().unwrap(),
            "--data",
        ])
        .arg(dir.join(".graft"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    node.terminate();
}

/// `graft run DIR` after a restart applies the project's current graft.toml
/// (limits, capabilities, entry), durably; registered states come back by
/// name when the entry changes.
#[test]
fn graft_run_applies_an_edited_graft_toml_after_a_restart() {
    let dir = project("respec");
    let node = Running::start(&dir, &[]);
    for _ in 0..3 {
        node.ok(&["call", "myapp", "counter", "inc"]);
    }
    let denied = node.client(&["eval", "myapp", "return math.random(1, 1)"]);
    assert!(!denied.status.success(), "random is not granted yet");
    node.terminate();

    // Edited while the node was down: fewer kept versions, a capability,
    // and a new entry module that registers the counter under the same name.
    let toml = dir.join("graft.toml");
    let edited = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("max_versions = 10", "max_versions = 2")
        .replace("entry = \"app\"", "entry = \"main\"")
        .replace(
            "# [capabilities]\n# grant = [\"clock\", \"random\"]",
            "[capabilities]\ngrant = [\"random\"]",
        );
    assert!(edited.contains("grant = [\"random\"]") && edited.contains("entry = \"main\""));
    std::fs::write(&toml, edited).unwrap();
    std::fs::copy(dir.join("src/app.luau"), dir.join("src/main.luau")).unwrap();

    let node = Running::start(&dir, &[]);
    assert_eq!(
        node.ok(&["eval", "myapp", "return math.random(1, 1)"])
            .trim(),
        "1",
        "the new capability applies"
    );
    assert_eq!(
        node.count(),
        3,
        "the named state came back under the new entry"
    );
    for n in 1..=3 {
        let f = revision(&dir, n);
        node.ok(&["reload", "myapp", f.to_str().unwrap()]);
    }
    assert_eq!(node.versions().len(), 2, "the new max_versions applies");
    let events = node.ok(&[
        "events",
        "--sandbox",
        "myapp",
        "--kind",
        "sandbox_reconfigured",
    ]);
    assert_eq!(
        events.matches("sandbox_reconfigured").count(),
        1,
        "{events}"
    );
    node.terminate();

    // Durable: the next start has nothing to change, and keeps all of it.
    let node = Running::start(&dir, &[]);
    assert_eq!(
        node.ok(&["eval", "myapp", "return math.random(1, 1)"])
            .trim(),
        "1"
    );
    assert_eq!(node.versions().len(), 2);
    let events = node.ok(&[
        "events",
        "--sandbox",
        "myapp",
        "--kind",
        "sandbox_reconfigured",
    ]);
    assert_eq!(
        events.matches("sandbox_reconfigured").count(),
        1,
        "{events}"
    );
    node.terminate();
}

/// The effective user of this process (the owner of `/proc/self`).
fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
}

/// A data directory that turns read-only while the node runs fails the
/// mutating request (503 storage_read_only, nothing applied), not the node;
/// writable again, writes resume. A node started on a read-only data
/// directory refuses to start and leaves it untouched. Root ignores file
/// modes, so as root the node runs as `nobody` on a directory it owns.
#[test]
fn a_read_only_data_directory_fails_the_request_not_the_node() {
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    let dir = project("readonly");
    let data = dir.parent().unwrap().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let uid = (euid() == 0).then_some(NOBODY);
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&data, Some(uid), Some(uid)).unwrap();
    }
    let data_arg = data.to_str().unwrap().to_string();
    let node = Running::spawn(&dir, &["--data", &data_arg], uid, &data);
    let first = revision(&dir, 1);
    node.ok(&["reload", "myapp", first.to_str().unwrap()]);
    node.ok(&["call", "myapp", "counter", "inc"]);
    let before = node.versions();
    assert_eq!(before.len(), 2);

    let set_mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let db = data.join(graft::DATABASE_FILE);
    set_mode(&db, 0o444);
    set_mode(&data, 0o555);
    let second = revision(&dir, 2);
    let out = node.client(&["reload", "myapp", second.to_str().unwrap(), "--json"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "the reload must fail: {said}");
    // The request's audit row is its first write (the audit log is written
    // before a mutating request runs, and a request that cannot be audited
    // does nothing): that is what meets the read-only directory first.
    assert!(
        said.contains("storage_read_only") || said.contains("audit_unavailable"),
        "{said}"
    );
    // Nothing applied, and the node serves on (a plain read needs no write;
    // audited requests fail like the reload).
    assert_eq!(node.versions(), before);

    set_mode(&data, 0o755);
    set_mode(&db, 0o644);
    let out = node.client(&["reload", "myapp", second.to_str().unwrap(), "--json"]);
    assert_eq!(acknowledged(&out), Some(3), "writable again, writes resume");
    assert_eq!(node.count(), 1, "the same node, state intact");
    node.terminate();

    // Started on a read-only data directory: refused, the file untouched.
    set_mode(&db, 0o444);
    set_mode(&data, 0o555);
    let bytes = std::fs::read(&db).unwrap();
    let mut cmd = graft();
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid).env("HOME", &data);
    }
    let out = cmd
        .arg("run")
        .arg(&dir)
        .args(["--port", "0", "--no-watch", "--data", &data_arg])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("read-only"), "a clear message: {err}");
    assert_eq!(std::fs::read(&db).unwrap(), bytes, "left untouched");
    set_mode(&data, 0o755);
    set_mode(&db, 0o644);
}

/// `graft run DIR` that is expected to stop by itself (a refused start):
/// its output, or a panic if it starts serving instead.
fn run_refused(dir: &Path, extra: &[&str]) -> Output {
    let mut child = graft()
        .arg("run")
        .arg(dir)
        .args(["--port", "0", "--no-watch"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "graft run {extra:?} did not stop by itself:\n{}\n{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The database file's bytes (read after a graceful stop, which folds the
/// log into it).
fn database(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(".graft").join("graft.db")).unwrap()
}

/// A stored sandbox that no longer restores (here: its stored
/// `memory_bytes` is over the node's new `--max-sandbox-memory`) stops
/// `graft run` with a rustc-style error naming the sandbox, why, and what
/// to do; the database is left byte for byte as it was. Fixing graft.toml
/// brings everything back: kept versions and the named state (before the
/// fix, `graft run` created a new empty sandbox over it).
#[test]
fn a_sandbox_that_fails_to_restore_stops_graft_run_and_keeps_its_data() {
    let dir = project("unrestorable");
    let node = Running::start(&dir, &[]);
    for _ in 0..3 {
        node.ok(&["call", "myapp", "counter", "inc"]);
    }
    let f = revision(&dir, 1);
    node.ok(&["reload", "myapp", f.to_str().unwrap()]);
    assert_eq!(node.versions().len(), 2);
    node.terminate();
    let before = database(&dir);

    let out = run_refused(&dir, &["--max-sandbox-memory", "32MiB"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a refused start fails: {err}");
    assert!(
        err.contains("error[restore_failed]: sandbox `myapp`")
            && err.contains("could not be restored")
            && err.contains("memory_bytes")
            && err.contains("graft.toml")
            && err.contains("--discard myapp")
            && err.contains("graft backup"),
        "which sandbox, why, what to do: {err}"
    );
    assert!(!text(&out.stdout).contains('✓'), "{}", text(&out.stdout));
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        database(&dir) == before,
        "the refused start wrote nothing to the database"
    );

    // The fix the error points at: graft.toml's memory_bytes under the cap.
    let toml = dir.join("graft.toml");
    let edited = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("memory_bytes = 67108864", "memory_bytes = 16777216");
    std::fs::write(&toml, edited).unwrap();
    let node = Running::start(&dir, &["--max-sandbox-memory", "32MiB"]);
    assert_eq!(node.count(), 3, "the checkpointed state came back");
    assert_eq!(node.versions().len(), 2, "the kept versions came back");
    node.terminate();
}

/// Changing `id` in graft.toml does not leave the old sandbox running
/// unseen next to a new empty one: `graft run` refuses, naming the old id
/// and both ways on. Renaming back keeps everything; `--discard OLD`
/// deletes the old sandbox and starts the new one.
#[test]
fn changing_the_id_in_graft_toml_names_the_old_sandbox_and_how_to_go_on() {
    let dir = project("rename");
    let node = Running::start(&dir, &[]);
    node.ok(&["call", "myapp", "counter", "inc"]);
    node.ok(&["call", "myapp", "counter", "inc"]);
    node.terminate();

    let toml = dir.join("graft.toml");
    let original = std::fs::read_to_string(&toml).unwrap();
    let renamed = original.replace("id = \"myapp\"", "id = \"renamed\"");
    assert_ne!(renamed, original);
    std::fs::write(&toml, &renamed).unwrap();
    let out = run_refused(&dir, &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("`renamed`")
            && err.contains("`myapp`")
            && err.contains("id = \"myapp\"")
            && err.contains("--discard myapp"),
        "names the old id and the ways on: {err}"
    );

    // Renamed back: nothing was lost.
    std::fs::write(&toml, &original).unwrap();
    let node = Running::start(&dir, &[]);
    assert_eq!(node.count(), 2);
    node.terminate();

    // Or the old one is deleted explicitly, and the new id starts afresh.
    std::fs::write(&toml, &renamed).unwrap();
    let node = Running::start(&dir, &["--discard", "myapp"]);
    assert_eq!(node.ok(&["call", "renamed", "counter", "get"]).trim(), "0");
    let gone = node.client(&["call", "myapp", "counter", "get"]);
    assert!(!gone.status.success(), "the old sandbox is gone");
    node.terminate();
    let node = Running::start(&dir, &[]);
    assert_eq!(node.ok(&["call", "renamed", "counter", "get"]).trim(), "0");
    node.terminate();

    // A --discard of an id the data directory does not hold changes nothing.
    let out = run_refused(&dir, &["--discard", "nosuch"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no sandbox `nosuch`"),
        "{}",
        text(&out.stderr)
    );
}

/// A new `entry` in graft.toml starts the new app directly at restore: the
/// old app never runs (its counter's `terminate` would log while starting),
/// and the events say what happened (a `sandbox_reconfigured` at restore,
/// no `checkpoint_not_restored`).
#[test]
fn a_new_entry_starts_directly_without_running_the_old_app() {
    let dir = project("entry");
    let node = Running::start(&dir, &[]);
    for _ in 0..2 {
        node.ok(&["call", "myapp", "counter", "inc"]);
    }
    node.terminate();
    let toml = dir.join("graft.toml");
    let edited = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("entry = \"app\"", "entry = \"main\"");
    std::fs::write(&toml, edited).unwrap();
    std::fs::copy(dir.join("src/app.luau"), dir.join("src/main.luau")).unwrap();

    let log = dir.join("run.log");
    let node = Running::logged(&dir, &[], &log);
    assert_eq!(node.count(), 2, "the named state came back under `main`");
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        !err.contains("counter stopping"),
        "the old app ran (and was stopped) at start: {err}"
    );
    node.await_stdout("restored with the settings of graft.toml", 1);
    let events = node.ok(&["events", "--sandbox", "myapp", "--json"]);
    assert!(
        !events.contains("checkpoint_not_restored"),
        "no misleading event: {events}"
    );
    let reconfigured: Vec<Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .flat_map(|v| match v {
            Value::Array(a) => a,
            other => vec![other],
        })
        .filter(|e| e["kind"] == "sandbox_reconfigured")
        .collect();
    assert_eq!(reconfigured.len(), 1, "{events}");
    let detail = reconfigured[0].to_string();
    assert!(
        detail.contains("restore") && detail.contains("main") && detail.contains("app"),
        "{detail}"
    );
    node.terminate();
}

/// Waits until the file holds `what` (at least `n` times).
#[track_caller]
fn await_file(path: &Path, what: &str, n: usize) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let t = std::fs::read_to_string(path).unwrap_or_default();
        if t.matches(what).count() >= n {
            return t;
        }
        assert!(Instant::now() < deadline, "no {what:?} (x{n}) in:\n{t}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// graft.toml saved while `graft run` runs is applied live: the app
/// restarts with the new settings, registered states come back, and the
/// src/ watcher follows the rebuilt sandbox. A file that does not parse or
/// validate, or renames the sandbox, changes nothing and says why.
#[test]
fn graft_toml_edits_apply_live_or_say_why_not() {
    let dir = project("live-toml");
    let log = dir.join("run.log");
    let node = Running::watching(&dir, &log);
    for _ in 0..2 {
        node.ok(&["call", "myapp", "counter", "inc"]);
    }
    let denied = node.client(&["eval", "myapp", "return math.random(1, 1)"]);
    assert!(!denied.status.success(), "random is not granted yet");

    let toml = dir.join("graft.toml");
    let original = std::fs::read_to_string(&toml).unwrap();
    let granted = original.replace(
        "# [capabilities]\n# grant = [\"clock\", \"random\"]",
        "[capabilities]\ngrant = [\"random\"]",
    );
    assert_ne!(granted, original);
    std::fs::write(&toml, &granted).unwrap();
    node.await_stdout("✓ graft.toml applied (capabilities changed)", 1);
    assert_eq!(
        node.ok(&["eval", "myapp", "return math.random(1, 1)"])
            .trim(),
        "1",
        "the new capability applies"
    );
    assert_eq!(node.count(), 2, "the named state came back");

    // The src/ watcher drives the rebuilt sandbox.
    let src = dir.join("src/counter.luau");
    let stepped = std::fs::read_to_string(&src)
        .unwrap()
        .replace("local STEP = 1\n", "local STEP = 10\n");
    std::fs::write(&src, stepped).unwrap();
    node.await_stdout("counter v1 → v2", 1);
    assert_eq!(
        node.ok(&["call", "myapp", "counter", "inc"]).trim(),
        "12",
        "the reload reached the rebuilt sandbox"
    );

    // Does not parse: an error pointing at graft.toml, nothing changed.
    std::fs::write(&toml, granted.replace("[limits]", "[limits")).unwrap();
    let err = await_file(&log, "nothing changed", 1);
    assert!(err.contains("graft.toml") && err.contains("line"), "{err}");
    // Out of range: the limit named, nothing changed.
    std::fs::write(
        &toml,
        granted.replace("handler_ms = 1000", "handler_ms = 0"),
    )
    .unwrap();
    let err = await_file(&log, "nothing changed", 2);
    assert!(err.contains("handler_ms"), "{err}");
    // A new id: refused live, the old sandbox keeps running.
    std::fs::write(&toml, granted.replace("id = \"myapp\"", "id = \"other\"")).unwrap();
    let err = await_file(&log, "nothing changed", 3);
    assert!(err.contains("`other`") && err.contains("restart"), "{err}");
    assert_eq!(node.count(), 12, "still the same sandbox and state");
    assert_eq!(
        node.ok(&["eval", "myapp", "return math.random(1, 1)"])
            .trim(),
        "1"
    );
    node.terminate();
}

/// Entry arguments over `max_message_bytes` are refused with an error that
/// names `entry_args`, the limit and the actual size.
#[test]
fn oversize_entry_args_name_the_setting_and_the_sizes() {
    let dir = project("entry-args");
    let toml = dir.join("graft.toml");
    let blob = "x".repeat(2000);
    let edited = std::fs::read_to_string(&toml)
        .unwrap()
        .replace(
            "entry = \"app\"",
            &format!("entry = \"app\"\nentry_args = {{ blob = \"{blob}\" }}"),
        )
        .replace("[limits]", "[limits]\nmax_message_bytes = 1024");
    std::fs::write(&toml, edited).unwrap();
    let out = run_refused(&dir, &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("`entry_args` is 2011 bytes") && err.contains("`max_message_bytes` of 1024"),
        "{err}"
    );
}

/// Output piped into a reader that already went away (`graft events |
/// head`) ends the command quietly, as SIGPIPE ends any Unix filter: no
/// panic, no message.
#[test]
fn a_closed_pipe_ends_client_commands_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = project("pipe");
    let node = Running::start(&dir, &[]);
    node.ok(&["call", "myapp", "counter", "inc"]);
    let url = format!("http://127.0.0.1:{}", node.port);
    let runs: [&[&str]; 2] = [
        &["events", "--url", &url],
        &["types", dir.to_str().unwrap(), "--stdout"],
    ];
    for args in runs {
        let mut child = graft()
            .args(args)
            .env("GRAFT_TOKEN", &node.token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the first write.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert!(
            out.status.success() || out.status.signal() == Some(13),
            "graft {args:?}: {:?}\n{err}",
            out.status
        );
        assert!(!err.contains("panicked"), "graft {args:?}: {err}");
    }
    node.terminate();
}

/// graft.toml settings refused at a restart (a limit out of range) stop
/// `graft run` with the limit named; the stored sandbox stays intact on its
/// previous settings, and the next start with a fixed file has it all.
#[test]
fn refused_settings_at_restart_stop_graft_run_and_lose_nothing() {
    let dir = project("refused-settings");
    let node = Running::start(&dir, &[]);
    node.ok(&["call", "myapp", "counter", "inc"]);
    node.terminate();
    let toml = dir.join("graft.toml");
    let original = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        original.replace("handler_ms = 1000", "handler_ms = 0"),
    )
    .unwrap();
    let out = run_refused(&dir, &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("handler_ms")
            && err.contains("graft.toml")
            && err.contains("settings were not applied"),
        "{err}"
    );
    std::fs::write(&toml, &original).unwrap();
    let node = Running::start(&dir, &[]);
    assert_eq!(node.count(), 1);
    node.terminate();
}
/// The user storage tests run the node as, and the data directory it owns:
/// root ignores file modes, so as root the node runs as `nobody`.
fn owned_data_dir(dir: &Path) -> (Option<u32>, PathBuf) {
    const NOBODY: u32 = 65534;
    let data = dir.parent().unwrap().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let uid = (euid() == 0).then_some(NOBODY);
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&data, Some(uid), Some(uid)).unwrap();
    }
    (uid, data)
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A database *file* turned read-only (its directory writable): a request
/// fails whole and the client is told why — the node's storage is
/// read-only — without the host's paths; writable again, writes resume.
/// Started on a read-only database file, the node refuses with a clear
/// message and leaves the file alone.
#[test]
fn a_read_only_database_file_fails_requests_clearly_and_is_refused_at_start() {
    let dir = project("readonly-file");
    let (uid, data) = owned_data_dir(&dir);
    let data_arg = data.to_str().unwrap().to_string();
    let node = Running::spawn(&dir, &["--data", &data_arg], uid, &data);
    let first = revision(&dir, 1);
    node.ok(&["reload", "myapp", first.to_str().unwrap()]);
    let before = node.versions();

    let db = data.join(graft::DATABASE_FILE);
    set_mode(&db, 0o444);
    let second = revision(&dir, 2);
    let out = node.client(&["reload", "myapp", second.to_str().unwrap()]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "the reload must fail: {said}");
    assert!(
        said.contains("the node's storage is read-only (")
            && said.contains("…/graft.db is not writable")
            && said.contains("nothing was applied"),
        "the client is told why: {said}"
    );
    assert!(!said.contains(&data_arg), "no host path: {said}");
    assert!(!said.contains(&node.token), "no token: {said}");
    // The JSON body names the store's kind for programs.
    let out = node.client(&["state", "myapp", "counter", "--json"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !out.status.success(),
        "an audited read fails closed: {said}"
    );
    assert!(said.contains("storage is read-only"), "{said}");
    assert_eq!(node.versions(), before, "nothing applied");

    set_mode(&db, 0o644);
    let out = node.client(&["reload", "myapp", second.to_str().unwrap(), "--json"]);
    assert_eq!(acknowledged(&out), Some(3), "writable again, writes resume");
    node.terminate();

    set_mode(&db, 0o444);
    let bytes = std::fs::read(&db).unwrap();
    let mut cmd = graft();
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid).env("HOME", &data);
    }
    let out = cmd
        .arg("run")
        .arg(&dir)
        .args(["--port", "0", "--no-watch", "--data", &data_arg])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("read-only") && err.contains("database file"),
        "a clear message: {err}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), bytes, "left untouched");
    set_mode(&db, 0o644);
}

/// A save `graft run` could not apply because the storage refused it is
/// not forgotten: the watcher tries it again, and once the storage takes
/// writes the running code matches the file, with a line saying so.
#[test]
fn graft_run_applies_a_save_the_storage_refused_once_it_is_writable() {
    let dir = project("retry-reload");
    let (uid, data) = owned_data_dir(&dir);
    let data_arg = data.to_str().unwrap().to_string();
    let node = Running::spawn_with(&dir, &["--data", &data_arg], uid, &data, true);
    let before = node.versions();
    assert_eq!(before.len(), 1);

    let db = data.join(graft::DATABASE_FILE);
    set_mode(&db, 0o444);
    revision(&dir, 1);
    node.wait_for_output("the reload is tried again until the storage takes it");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(node.versions(), before, "refused: nothing applied yet");

    set_mode(&db, 0o644);
    let said = node.wait_for_output("the reload that waited applies now");
    assert!(said.contains("storage is read-only"), "{said}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = node.versions();
        if now.len() == 2 {
            assert!(now[1].2, "the saved file is the running version: {now:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never applied: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    node.terminate();
}

/// Sets graft.toml's `max_versions` (a live, restart-free edit of the limits).
fn set_max_versions(dir: &Path, n: u32) {
    let toml = dir.join("graft.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let start = text.find("max_versions = ").unwrap();
    let end = start + text[start..].find(' ').unwrap() + 3;
    let end = end + text[end..].find(' ').unwrap();
    let edited = format!("{}max_versions = {n}{}", &text[..start], &text[end..]);
    assert_ne!(edited, text);
    std::fs::write(&toml, edited).unwrap();
}

/// A graft.toml save the storage refused does not cancel a src/ save that
/// waits for the storage, and is itself tried again: once the storage
/// takes writes, both apply — the settings and the saved source — and each
/// refusal was said once, not at every try. (Before, the refused graft.toml
/// restarted the src/ watcher as if the saved file were live: the edit was
/// dropped, and graft.toml was never applied.)
#[test]
fn graft_run_retries_a_refused_graft_toml_and_keeps_the_waiting_src_save() {
    let dir = project("retry-toml");
    let (uid, data) = owned_data_dir(&dir);
    let data_arg = data.to_str().unwrap().to_string();
    let node = Running::spawn_with(&dir, &["--data", &data_arg], uid, &data, true);
    assert_eq!(node.versions().len(), 1);

    let db = data.join(graft::DATABASE_FILE);
    set_mode(&db, 0o444);
    revision(&dir, 1);
    node.wait_for_output("the reload is tried again until the storage takes it");
    set_max_versions(&dir, 11);
    node.wait_for_output("graft.toml is applied again until the storage takes it");
    // Several tries go by, quietly.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(node.versions().len(), 1, "refused: nothing applied yet");

    set_mode(&db, 0o644);
    node.await_stdout("the graft.toml save that waited applies now", 1);
    node.await_stdout("✓ graft.toml applied (limits changed)", 1);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = node.versions();
        if now.len() == 2 && now[1].2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiting src/ save was dropped: {now:?}\n{}",
            node.said.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = node.said.lock().unwrap().clone();
    assert_eq!(
        said.matches("graft.toml is applied again until the storage takes it")
            .count(),
        1,
        "said once, not per try: {said}"
    );
    assert_eq!(
        said.matches("the reload is tried again until the storage takes it")
            .count(),
        1,
        "said once, not per try: {said}"
    );
    node.terminate();
}

/// A save of src/ while graft.toml's rebuild runs (here: the old app's
/// `terminate` takes a second) is refused `busy` by the sandbox being
/// replaced; `graft run` sends it again to the rebuilt sandbox, so the
/// user's edit goes live. (Before, it was reported and dropped: the file
/// said STEP = 10, the sandbox ran STEP = 1.)
#[test]
fn a_src_save_during_a_graft_toml_rebuild_is_sent_again_not_dropped() {
    let dir = project("busy-reload");
    let src = dir.join("src/counter.luau");
    let slow = std::fs::read_to_string(&src).unwrap().replace(
        "  graft.log.info(\"counter stopping at \" .. tostring(state.count))\n",
        "  graft.log.info(\"counter stopping at \" .. tostring(state.count))\n  while true do end -- interrupted at handler_ms\n",
    );
    std::fs::write(&src, &slow).unwrap();
    let log = dir.join("run.log");
    let node = Running::watching(&dir, &log);
    node.ok(&["call", "myapp", "counter", "inc"]);

    set_max_versions(&dir, 12);
    await_file(&log, "counter stopping at 1", 1);
    // The rebuild is under way: the old app's terminate spins.
    std::fs::write(&src, slow.replace("local STEP = 1\n", "local STEP = 10\n")).unwrap();
    node.await_stdout("✓ graft.toml applied (limits changed)", 1);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let n: i64 = node
            .ok(&["call", "myapp", "counter", "get"])
            .trim()
            .parse()
            .unwrap();
        let after = node
            .ok(&["call", "myapp", "counter", "inc"])
            .trim()
            .parse::<i64>()
            .unwrap();
        if after == n + 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the save made during the rebuild never went live:\n{}\n{}",
            node.said.lock().unwrap(),
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    node.terminate();
}

/// A graft.toml edit whose new entry's `init` fails prints the failure,
/// not a ✓ line: the settings are applied but the app is not running.
#[test]
fn a_new_entry_whose_init_fails_is_reported_not_ticked() {
    let dir = project("bad-entry");
    let log = dir.join("run.log");
    let node = Running::watching(&dir, &log);
    std::fs::write(
        dir.join("src/broken.luau"),
        "return { behaviour = \"supervisor\", init = function(args) error(\"boom at init\") end }\n",
    )
    .unwrap();
    node.await_stdout("broken", 1);
    let toml = dir.join("graft.toml");
    let edited = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("entry = \"app\"", "entry = \"broken\"");
    std::fs::write(&toml, edited).unwrap();
    node.await_stdout(
        "✗ graft.toml applied (entry changed): the app did not start",
        1,
    );
    let err = await_file(&log, "the app did not start", 1);
    assert!(err.contains("boom at init"), "says why: {err}");
    let out = node.stdout.lock().unwrap().clone();
    assert!(!out.contains("✓ graft.toml applied"), "no ✓ line: {out}");
    node.terminate();
}

/// A minimal HTTP/1.1 exchange with a node (the test needs no client
/// library): the status and the body.
fn http(node: &Running, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.port)).unwrap();
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

/// While a graft.toml edit rebuilds the sandbox (here the old app's
/// `terminate` spins until `handler_ms`, a second), requests to it get a
/// retryable 503 `sandbox_rebuilding` with a clear message — not a 404, nor
/// a call into the app being stopped — and creating its id is a 409
/// conflict, not a 500. Afterwards it answers as before, its state kept.
///
/// The window is the old app's `terminate`, and `graft run` grants no
/// capability a test could hold it with, so on a loaded machine a probe
/// may land after it closed. Each probe is therefore either the window's
/// answer or shown to come from the rebuilt sandbox (its new
/// `max_versions`), never anything else; a rebuild whose window the probes
/// missed is followed by another, until one was probed inside its window
/// (at most [`REBUILD_ATTEMPTS`]).
#[test]
fn requests_during_a_graft_toml_rebuild_are_told_to_retry() {
    let dir = project("rebuild-window");
    let src = dir.join("src/counter.luau");
    let slow = std::fs::read_to_string(&src).unwrap().replace(
        "  graft.log.info(\"counter stopping at \" .. tostring(state.count))\n",
        "  graft.log.info(\"counter stopping at \" .. tostring(state.count))\n  while true do end -- interrupted at handler_ms\n",
    );
    std::fs::write(&src, &slow).unwrap();
    let log = dir.join("run.log");
    let node = Running::watching(&dir, &log);
    node.ok(&["call", "myapp", "counter", "inc"]);

    let mut probed = false;
    for attempt in 1..=REBUILD_ATTEMPTS {
        let max_versions = 12 + attempt;
        set_max_versions(&dir, max_versions);
        // The old app is stopping: the rebuild window is open.
        await_file(&log, "counter stopping at 1", attempt as usize);
        probed = probe_rebuild_window(&node, max_versions);
        node.await_stdout("✓ graft.toml applied (limits changed)", attempt as usize);
        assert_eq!(node.count(), 1, "the state came back");
        if probed {
            break;
        }
    }
    assert!(
        probed,
        "no probe landed in the window of {REBUILD_ATTEMPTS} rebuilds:\n{}",
        node.said.lock().unwrap()
    );
    node.terminate();
}

/// Rebuilds [`requests_during_a_graft_toml_rebuild_are_told_to_retry`]
/// tries before it gives up on probing a window.
const REBUILD_ATTEMPTS: u32 = 10;

/// Probes the sandbox `myapp` while it is rebuilt towards `max_versions`:
/// a call, its info, a create of its id and a call through the CLI. Every
/// answer must be the window's (503 `sandbox_rebuilding`, "try again"; 409
/// for the create; "being rebuilt" from the CLI) or the rebuilt sandbox's.
/// True when the call and the info both landed in the window.
fn probe_rebuild_window(node: &Running, max_versions: u32) -> bool {
    let rebuilt = |info: &str| {
        let v: Value = serde_json::from_str(info).unwrap_or(Value::Null);
        v["limits"]["max_versions"] == max_versions
    };
    let info = || http(node, "GET", "/api/v1/sandboxes/myapp", "");
    let in_window = |what: &str, (status, body): (u16, String)| {
        if status == 503 {
            assert!(
                body.contains("sandbox_rebuilding") && body.contains("try again"),
                "{what}: {body}"
            );
            return true;
        }
        // Too late: the rebuilt sandbox answers (the info says so itself;
        // after a call, one is asked).
        assert_eq!(status, 200, "{what}: {body}");
        let (status, shown) = if what == "info" {
            (status, body.clone())
        } else {
            info()
        };
        assert!(
            status == 200 && rebuilt(&shown),
            "{what} answered {body} neither in the window nor from the rebuilt sandbox ({status} {shown})"
        );
        false
    };
    let call = http(
        node,
        "POST",
        "/api/v1/sandboxes/myapp/call",
        r#"{"to":"counter","request":"get"}"#,
    );
    let called = in_window("call", call);
    let informed = in_window("info", info());
    let (status, body) = http(
        node,
        "POST",
        "/api/v1/sandboxes",
        r#"{"id":"myapp","modules":{"m":"return {}"}}"#,
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("sandbox_exists"), "{body}");
    let out = node.client(&["call", "myapp", "counter", "get"]);
    if out.status.success() {
        let (status, shown) = info();
        assert!(status == 200 && rebuilt(&shown), "{status} {shown}");
    } else {
        let err = text(&out.stderr);
        assert!(err.contains("being rebuilt"), "{err}");
    }
    called && informed
}

/// Every entry of a directory: name, size and mode.
fn listing(dir: &Path) -> Vec<(String, u64, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out: Vec<(String, u64, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.permissions().mode(),
            )
        })
        .collect();
    out.sort();
    out
}

/// `graft run` as `uid` (when given) on `--data data`, expected to be
/// refused at start: its stderr.
fn refused_as(dir: &Path, uid: Option<u32>, data: &Path) -> String {
    let mut cmd = graft();
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid).env("HOME", data);
    }
    let out = cmd
        .arg("run")
        .arg(dir)
        .args(["--port", "0", "--no-watch", "--data"])
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the start must be refused: {err}");
    err
}

/// A refused start — a read-only database file, a database from a newer
/// Graft — leaves the data directory exactly as it found it: no empty
/// `-wal`/`-shm` beside the database, no lock file it did not find.
#[test]
fn a_refused_start_leaves_the_data_directory_as_found() {
    let dir = project("as-found");
    let (uid, data) = owned_data_dir(&dir);
    let node = Running::spawn(&dir, &["--data", data.to_str().unwrap()], uid, &data);
    node.ok(&["call", "myapp", "counter", "inc"]);
    node.terminate();
    // A database as a copy or a restored backup leaves it: the file alone.
    for extra in ["graft.db-wal", "graft.db-shm", "graft.lock"] {
        let _ = std::fs::remove_file(data.join(extra));
    }
    let db = data.join(graft::DATABASE_FILE);

    set_mode(&db, 0o444);
    let before = listing(&data);
    let err = refused_as(&dir, uid, &data);
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(listing(&data), before, "read-only file: left as found");
    set_mode(&db, 0o644);

    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
    }
    for extra in ["graft.db-wal", "graft.db-shm"] {
        let _ = std::fs::remove_file(data.join(extra));
    }
    let before = listing(&data);
    let bytes = std::fs::read(&db).unwrap();
    let err = refused_as(&dir, uid, &data);
    assert!(err.contains("newer Graft"), "{err}");
    assert_eq!(listing(&data), before, "newer schema: left as found");
    assert_eq!(std::fs::read(&db).unwrap(), bytes);
}

/// A free TCP port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`, or panics with
/// the child's stderr if it exits first.
fn await_listening(child: &mut Child, port: u16, log: &Path) {
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the node exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "never listened on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `graft run DIR | head -0` and `graft serve | head -0`: a stdout whose
/// reader went away does not panic the node. It keeps serving and hot
/// reloading with its lines dropped (a long-running node's API matters
/// more than its log), until stopped as usual.
#[test]
fn a_closed_stdout_does_not_stop_a_node() {
    let dir = project("closed-stdout");
    let log = dir.join("run.log");
    let port = free_port();
    let mut child = graft()
        .arg("run")
        .arg(&dir)
        .args(["--port", &port.to_string(), "--debounce-ms", "50"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The reader is gone before the node's first line.
    drop(child.stdout.take());
    await_listening(&mut child, port, &log);
    let token = std::fs::read_to_string(dir.join(".graft/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let client = |args: &[&str]| {
        graft()
            .args(args)
            .args(["--url", &format!("http://127.0.0.1:{port}")])
            .env("GRAFT_TOKEN", &token)
            .output()
            .unwrap()
    };
    // Two saves: each prints a ✓ line into the closed pipe.
    for n in 1..=2u64 {
        revision(&dir, n as u32);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let out = client(&["versions", "myapp", "counter", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if v.as_array().is_some_and(|a| a.len() as u64 == n + 1) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "save {n} never went live:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let out = client(&["call", "myapp", "counter", "inc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("panicked"), "{err}");

    // `graft serve` likewise.
    let data = dir.parent().unwrap().join("serve-data");
    let port = free_port();
    let log = dir.join("serve.log");
    let mut child = graft()
        .args(["serve", "--port", &port.to_string(), "--data"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    await_listening(&mut child, port, &log);
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "still serving");
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let out = graft()
        .args(["events", "--url", &format!("http://127.0.0.1:{port}")])
        .env("GRAFT_TOKEN", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A kept version that no longer compiles at a restart (here: its stored
/// source edited, checksum updated) stops `graft run` with the sandbox
/// reported unrestored — named by module and version, not by a host path —
/// and its data kept byte for byte.
#[test]
fn a_version_that_fails_to_compile_at_restore_stops_graft_run_and_keeps_its_data() {
    let dir = project("no-compile");
    let node = Running::start(&dir, &[]);
    node.ok(&["call", "myapp", "counter", "inc"]);
    let f = revision(&dir, 1);
    node.ok(&["reload", "myapp", f.to_str().unwrap()]);
    node.terminate();
    {
        let conn =
            rusqlite::Connection::open(dir.join(".graft").join(graft::DATABASE_FILE)).unwrap();
        let broken = "return {{{";
        let n = conn
            .execute(
                "UPDATE module_versions SET source = ?1, checksum = ?2 WHERE sandbox = 'myapp' AND module = 'counter' AND version = 1",
                rusqlite::params![broken, graft::upgrade::checksum(broken)],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    let before = database(&dir);
    let out = run_refused(&dir, &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("error[restore_failed]: sandbox `myapp`")
            && err.contains("version 1 of module `counter` does not compile")
            && err.contains("--discard myapp"),
        "{err}"
    );
    let src = dir.join("src").display().to_string();
    assert!(
        !err.contains(&format!("{src}/counter.luau:")),
        "named by version, not by path: {err}"
    );
    assert!(!text(&out.stdout).contains('✓'), "{}", text(&out.stdout));
    assert!(database(&dir) == before, "its data is kept, untouched");
}

/// A graft.toml edit while a canary window is open is refused, not
/// deferred: `✗ graft.toml not applied`, saying why (change settings after
/// the verdict); nothing changes, and a save after the verdict applies.
#[test]
fn a_graft_toml_edit_during_a_canary_window_is_refused_with_why() {
    let dir = project("canary-toml");
    let log = dir.join("run.log");
    let node = Running::watching(&dir, &log);
    revision(&dir, 1);
    node.await_stdout("counter v1 → v2", 1);
    revision(&dir, 2);
    node.await_stdout("counter v2 → v3", 1);
    let out = node.client(&["rollback", "myapp", "counter", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _ = node.client(&[
        "reload",
        "myapp",
        dir.join("src/counter.luau").to_str().unwrap(),
        "--canary-ms",
        "1500",
    ]);
    set_max_versions(&dir, 14);
    let err = await_file(&log, "✗ graft.toml not applied", 1);
    assert!(
        err.contains("canary window") && err.contains("after the verdict"),
        "{err}"
    );
    assert!(!node.stdout.lock().unwrap().contains("graft.toml applied"));
    // After the verdict, the next save applies.
    std::thread::sleep(Duration::from_millis(2000));
    set_max_versions(&dir, 15);
    node.await_stdout("✓ graft.toml applied (limits changed)", 1);
    node.terminate();
}

/// `GET path` on 127.0.0.1:`port` with `token`: the JSON body of a 200,
/// `None` for anything else (the node is gone, or not yet listening).
fn get_json(port: u16, token: &str, path: &str) -> Option<Value> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    if resp.split(' ').nth(1) != Some("200") {
        return None;
    }
    serde_json::from_str(resp.split_once("\r\n\r\n")?.1).ok()
}

/// `kill -9` while a sandbox logs events fast (processes crashing in a
/// loop, each a `crash` event written by the event writer) and its events
/// are pruned (`--max-events 20`), with a reader following the sandbox's
/// events: after each restart, no number the reader was shown comes back
/// as another event, a number it was shown that the database no longer
/// holds is a gap for a reader from just before it, and new events number
/// on above everything shown.
#[test]
fn kill_9_while_events_are_written_reuses_no_shown_number_and_hides_no_gap() {
    let dir = project("kill9-events");
    std::fs::write(
        dir.join("src/app.luau"),
        r#"return {
  behaviour = "supervisor",
  init = function()
    return { strategy = "one_for_one", children = {
      { id = "spammer", module = "spammer", name = "spammer" },
    } }
  end,
}
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("src/spammer.luau"),
        r#"local s = {}
function s.init() graft.send_after(1, graft.self(), "tick"); return {} end
function s.handle_info(msg, st)
  for _ = 1, 5 do graft.spawn("boom") end
  graft.send_after(1, graft.self(), "tick")
  return st
end
return s
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("src/boom.luau"),
        r#"local b = {}
function b.init() graft.send(graft.self(), "die"); return {} end
function b.handle_info(msg, st) error("boom") end
return b
"#,
    )
    .unwrap();
    let mut shown: BTreeMap<u64, Value> = BTreeMap::new();
    for round in 0..5u32 {
        let node = Running::start(&dir, &["--max-events", "20"]);
        let (port, token) = (node.port, node.token.clone());
        let page = |after: u64| {
            get_json(
                port,
                &token,
                &format!("/api/v1/events?after={after}&sandbox=myapp"),
            )
        };
        // What the last node showed: still the same event, or a gap for a
        // reader from just before it.
        let newest_shown = shown.keys().next_back().copied().unwrap_or(0);
        for (&seq, event) in &shown {
            let p = page(seq - 1).expect("a page");
            match p["events"].as_array().and_then(|e| e.first()) {
                Some(e) if e["seq"] == seq => {
                    assert_eq!(e, event, "round {round}: #{seq} is another event now")
                }
                _ => {
                    let up_to = p["gap"]["up_to"].as_u64().unwrap_or(0);
                    assert!(
                        up_to >= seq,
                        "round {round}: #{seq} was shown, is gone, and a reader after {} is told no gap: {p}",
                        seq - 1
                    );
                }
            }
        }
        // Follow the sandbox's events until the kill.
        let mut after = newest_shown;
        let mut new = 0;
        let deadline = Instant::now() + Duration::from_millis(300 + jitter_ms(round, 700));
        while Instant::now() < deadline || new == 0 {
            let p = page(after).expect("a page while the node runs");
            for e in p["events"].as_array().expect("events") {
                let seq = e["seq"].as_u64().expect("seq");
                assert!(
                    seq > newest_shown,
                    "round {round}: #{seq} numbered at or below #{newest_shown}, shown before the restart"
                );
                shown.insert(seq, e.clone());
                new += 1;
            }
            after = p["last_seq"].as_u64().expect("last_seq").max(after);
        }
        node.kill9();
        // Keep the check bounded: the newest few hundred shown.
        while shown.len() > 300 {
            shown.pop_first();
        }
    }
}
