//! `edit_to_live`: how long from saving a source file to the new code being
//! served, through the real `graft` binary, the way a developer sees it.
//!
//! It copies `examples/counter` into a temp dir, starts
//! `graft run DIR --port 0`, then saves a changed `src/counter.luau` many
//! times (like an editor: write `counter.luau.tmp`, rename it over
//! `counter.luau`), each save making `handle_call` answer `count + i*1000`.
//! After each save it polls `POST /api/v1/sandboxes/{id}/call
//! {"to":"counter","request":"get"}` over one keep-alive HTTP/1.1 connection
//! until the reply is the new value; the latency is save start → first new
//! reply. Between saves it sleeps a random 20–50 ms (after the previous save
//! is live), like the OTP side (`bench/otp`, workload `edit_to_live`).
//!
//! Usage: `edit_to_live [--smoke] [--graft PATH] [--example DIR] [--saves N]
//! [--poll-us N] [--seed N] [--keep]`. The `graft` binary comes from
//! `--graft`, else `$GRAFT_BIN`, else `graft` next to this executable
//! (`target/release/graft` when both are built with `--release`).
//! Prints one JSON object on stdout (`workload: "edit_to_live"`, fields as the
//! OTP side: saves, p50_us, p99_us, max_us, min_us, mean_us, plus Graft's
//! own); progress and the child's output on stderr.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one save may take to go live before the run fails.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

struct Opts {
    smoke: bool,
    graft: PathBuf,
    example: PathBuf,
    saves: usize,
    poll_us: u64,
    seed: u64,
    keep: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: edit_to_live [--smoke] [--graft PATH] [--example DIR] [--saves N] [--poll-us N] [--seed N] [--keep]"
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut args = std::env::args().skip(1);
    let mut smoke = false;
    let mut graft = std::env::var_os("GRAFT_BIN").map(PathBuf::from);
    let mut example = None;
    let mut saves = None;
    let mut poll_us = 0;
    let mut seed = None;
    let mut keep = false;
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("edit_to_live: {name} needs a value");
                usage()
            })
        };
        match a.as_str() {
            "--smoke" => smoke = true,
            "--keep" => keep = true,
            "--graft" => graft = Some(PathBuf::from(val("--graft"))),
            "--example" => example = Some(PathBuf::from(val("--example"))),
            "--saves" => saves = Some(val("--saves").parse().unwrap_or_else(|_| usage())),
            "--poll-us" => poll_us = val("--poll-us").parse().unwrap_or_else(|_| usage()),
            "--seed" => seed = Some(val("--seed").parse().unwrap_or_else(|_| usage())),
            "-h" | "--help" => usage(),
            other => {
                eprintln!("edit_to_live: unknown argument {other}");
                usage()
            }
        }
    }
    let graft = graft.unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current_exe");
        exe.with_file_name(format!("graft{}", std::env::consts::EXE_SUFFIX))
    });
    let example = example
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/counter"));
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    Opts {
        smoke,
        graft,
        example,
        saves: saves.unwrap_or(if smoke { 5 } else { 50 }),
        poll_us,
        seed,
        keep,
    }
}

/// xorshift64*: enough randomness for save gaps, no extra dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The sandbox id from `graft.toml` (`id = "..."` under `[sandbox]`).
fn sandbox_id(dir: &Path) -> String {
    let toml = std::fs::read_to_string(dir.join("graft.toml")).expect("read graft.toml");
    let mut in_sandbox = false;
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_sandbox = line == "[sandbox]";
        } else if in_sandbox {
            if let Some(rest) = line.strip_prefix("id") {
                if let Some(v) = rest.trim_start().strip_prefix('=') {
                    return v.trim().trim_matches('"').to_owned();
                }
            }
        }
    }
    panic!("no [sandbox] id in graft.toml")
}

/// What is searched for in the example's counter to make the reply depend on the save.
const REPLY_LINE: &str = "return state.count, state";

/// Version `i` of the counter module: `handle_call` answers `count + i*1000`.
fn counter_source(original: &str, i: usize) -> String {
    let new = format!("return state.count + {}, state -- save {i}", i * 1000);
    original.replacen(REPLY_LINE, &new, 1)
}

/// Like an editor's atomic save: write a temp file, rename it over the source.
fn save(path: &Path, source: &str) {
    let tmp = path.with_extension("luau.tmp");
    std::fs::write(&tmp, source).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over the source");
}

/// A minimal HTTP/1.1 client over one keep-alive connection (reconnects on error).
struct Http {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
    /// The node's admin token (`DIR/.graft/admin.token`, SPEC §9).
    token: String,
}

impl Http {
    fn post(&mut self, path: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
        for attempt in 0..2 {
            if self.conn.is_none() {
                let s = TcpStream::connect(&self.addr)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(15)))?;
                self.conn = Some(BufReader::new(s));
            }
            match self.try_post(path, body) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.conn = None;
                    if attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!()
    }

    fn try_post(&mut self, path: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let conn = self.conn.as_mut().unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        conn.get_mut().write_all(req.as_bytes())?;
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(bad("connection closed"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut len = None;
        let mut close = false;
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(bad("connection closed in headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = v.trim().parse::<usize>().ok();
                } else if k == "connection" && v.trim().eq_ignore_ascii_case("close") {
                    close = true;
                } else if k == "transfer-encoding" {
                    return Err(bad("chunked responses are not supported"));
                }
            }
        }
        let len = len.ok_or_else(|| bad("no content-length"))?;
        let mut body = vec![0; len];
        conn.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

/// Kills the child when dropped (also on panic).
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Nearest-rank percentile, like the OTP side.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p * n as f64).ceil() as usize).max(1);
    sorted[rank - 1]
}

/// `✓ counter v3 → v4  1.2 ms  1 process migrated` → 1200.0
fn reload_line_us(line: &str) -> Option<f64> {
    if !line.starts_with('✓') {
        return None;
    }
    let (num, rest) = line.split("  ").nth(1)?.split_once(' ')?;
    let v: f64 = num.parse().ok()?;
    (rest == "ms").then_some(v * 1000.0)
}

/// Starts `graft run DIR --port 0`; returns it (killed on drop), the address
/// it printed, and the reload times its `✓ …` lines report, collected by a
/// thread (other lines are echoed to our stderr).
fn start_graft(o: &Opts, dir: &Path) -> (Guard, String, Arc<Mutex<Vec<f64>>>) {
    let child = Command::new(&o.graft)
        .arg("run")
        .arg(dir)
        .args(["--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", o.graft.display()));
    let mut child = Guard(child);

    // stdout: the port, then one line per reload; stderr: echoed to ours.
    let (port_tx, port_rx) = mpsc::channel::<String>();
    let reloads: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stdout = child.0.stdout.take().unwrap();
    let r = reloads.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                let _ = port_tx.send(addr);
            } else if let Some(us) = reload_line_us(&line) {
                r.lock().unwrap().push(us);
            } else {
                eprintln!("[graft] {line}");
            }
        }
    });
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[graft] {line}");
        }
    });
    let addr = port_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("graft run did not print `listening on http://…` within 30 s");
    (child, addr, reloads)
}

/// Polls `POST path` until the reply is `want`; the time it was first served.
/// Panics after [`SAVE_TIMEOUT`] with the last answer.
fn wait_for(
    http: &mut Http,
    path: &str,
    body: &str,
    want: i64,
    polls: &mut u64,
    poll_us: u64,
) -> Instant {
    let deadline = Instant::now() + SAVE_TIMEOUT;
    let mut last: Value;
    loop {
        *polls += 1;
        match http.post(path, body) {
            Ok((200, b)) => {
                let now = Instant::now();
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                if v["reply"].as_i64() == Some(want) {
                    return now;
                }
                last = v;
            }
            // The app may still be starting (404 before the name is registered).
            Ok((_, b)) => last = Value::String(String::from_utf8_lossy(&b).into_owned()),
            Err(e) => last = Value::String(e.to_string()),
        }
        if Instant::now() > deadline {
            panic!("edit_to_live: reply {want} not served within {SAVE_TIMEOUT:?}; last: {last}");
        }
        if poll_us > 0 {
            std::thread::sleep(Duration::from_micros(poll_us));
        }
    }
}

/// Prints the run's figures as one JSON line: save-to-served latencies
/// (`lat_us`), the reload times graft reported (`reload_us`), and how the
/// harness ran.
fn report(
    o: &Opts,
    lat_us: &[f64],
    reload_us: &[f64],
    measured_polls: u64,
    debounce_flag: Option<String>,
) {
    let mut sorted = lat_us.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut rsorted = reload_us.to_vec();
    rsorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = lat_us.iter().sum::<f64>() / lat_us.len() as f64;
    let round = |x: f64| (x * 10.0).round() / 10.0;
    println!(
        "{}",
        json!({
            "workload": "edit_to_live",
            "saves": o.saves,
            "p50_us": round(percentile(&sorted, 0.50)),
            "p99_us": round(percentile(&sorted, 0.99)),
            "max_us": round(*sorted.last().unwrap()),
            "min_us": round(sorted[0]),
            "mean_us": round(mean),
            "smoke": o.smoke,
            "poll_us": o.poll_us,
            "polls": measured_polls,
            "poll": "keep-alive HTTP/1.1 POST /call {\"request\":\"get\"}",
            "debounce_flag": debounce_flag,
            "debounce_ms": Value::Null,
            "debounce_note": if debounce_flag.is_some() { "the CLI has a debounce option; this harness uses its default" } else { "not exposed by the graft CLI (no flag in `graft run --help`)" },
            "reloads_seen": reload_us.len(),
            "reload_line_us_p50": if rsorted.is_empty() { Value::Null } else { json!(percentile(&rsorted, 0.5)) },
            "reload_line_us_max": rsorted.last().copied(),
            "reload_line": "compile+swap from graft run's `✓ …` line (0.1 ms resolution)",
            "gap_ms": "random 20-50 after the previous save is live",
            "seed": o.seed,
        })
    );
}

fn main() {
    let o = parse_opts();
    if !o.graft.is_file() {
        eprintln!(
            "edit_to_live: no graft binary at {} (build it with `cargo build --release -p graft-cli`, or pass --graft / GRAFT_BIN)",
            o.graft.display()
        );
        std::process::exit(1);
    }
    // Does the CLI expose a debounce setting? (Not as of writing: a constant in graft-cli.)
    let help = Command::new(&o.graft)
        .args(["run", "--help"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let debounce_flag = help
        .split_whitespace()
        .find(|w| w.starts_with("--") && w.contains("debounce"))
        .map(|w| w.trim_end_matches(',').to_owned());

    let dir = std::env::temp_dir().join(format!(
        "graft-edit-to-live-{}-{}",
        std::process::id(),
        o.seed % 1_000_000
    ));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&o.example, &dir).expect("copy the example");
    let id = sandbox_id(&dir);
    let file = dir.join("src/counter.luau");
    let original = std::fs::read_to_string(&file).expect("read src/counter.luau");
    assert!(
        original.contains(REPLY_LINE),
        "{} has no `{REPLY_LINE}` to change",
        file.display()
    );
    // Version 0 is in place before the node starts.
    std::fs::write(&file, counter_source(&original, 0)).unwrap();

    let (child, addr, reloads) = start_graft(&o, &dir);
    let graft_pid = child.0.id();
    eprintln!(
        "[edit_to_live] graft pid {graft_pid} on {addr}, project {}, {} saves, seed {}",
        dir.display(),
        o.saves,
        o.seed
    );

    // The node wrote its admin token file before it listened.
    let token = std::fs::read_to_string(dir.join(".graft/admin.token"))
        .expect("graft run writes DIR/.graft/admin.token")
        .trim()
        .to_string();
    let mut http = Http {
        addr: addr.clone(),
        conn: None,
        token,
    };
    let path = format!("/api/v1/sandboxes/{id}/call");
    let body = json!({ "to": "counter", "request": "get" }).to_string();
    let mut polls: u64 = 0;
    wait_for(&mut http, &path, &body, 0, &mut polls, o.poll_us);
    // Let the watcher settle (its start-up scan) before the first measured save.
    std::thread::sleep(Duration::from_millis(300));
    let startup_reloads = reloads.lock().unwrap().len();

    let mut rng = Rng(o.seed);
    let mut lat_us = Vec::with_capacity(o.saves);
    let polls_before = polls;
    for i in 1..=o.saves {
        std::thread::sleep(Duration::from_millis(rng.range(20, 50)));
        let src = counter_source(&original, i);
        let t0 = Instant::now();
        save(&file, &src);
        let served = wait_for(
            &mut http,
            &path,
            &body,
            (i * 1000) as i64,
            &mut polls,
            o.poll_us,
        );
        lat_us.push((served - t0).as_nanos() as f64 / 1000.0);
    }
    let measured_polls = polls - polls_before;
    // The reload line may be printed just after the first new reply.
    std::thread::sleep(Duration::from_millis(200));
    drop(child); // kill graft
    if !o.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }

    let reload_us: Vec<f64> = reloads.lock().unwrap()[startup_reloads..].to_vec();
    report(&o, &lat_us, &reload_us, measured_polls, debounce_flag);
}
