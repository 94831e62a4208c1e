//! Crash safety of the store against a real process: a child appends
//! acknowledged writes in a loop and prints each acknowledgement; it is
//! killed with SIGKILL at random moments; every acknowledged write must be in
//! the database after reopening, with consecutive numbers and no duplicate.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use graft::store::{
    NewEvent, SandboxRecord, Store, StoreOptions, VersionRecord, VersionStatus, WriteOp,
};

const CHILD_ENV: &str = "GRAFT_STORE_CRASH_CHILD_DB";

fn opts() -> StoreOptions {
    let mut o = StoreOptions::default();
    o.max_events_per_sandbox = u64::MAX;
    o
}

/// The child half of `acknowledged_writes_survive_kill_9`: the test binary
/// re-executed with `CHILD_ENV` naming the database runs that same test,
/// which comes here and writes until it is killed.
fn crash_child(path: &str) -> ! {
    let store = Store::open_with(path, opts()).expect("child: open");
    let snap = store.load_all().expect("child: load");
    let mut next = snap
        .sandboxes
        .first()
        .and_then(|s| s.modules.first())
        .map_or(1, |m| m.module.next_version);
    if next == 1 {
        store
            .write(vec![WriteOp::PutSandbox(SandboxRecord {
                id: "crash".into(),
                entry: None,
                limits_json: "{}".into(),
                capabilities: vec![],
                source_root: None,
                spec_json: "{}".into(),
                created_ms: 0.0,
            })])
            .expect("child: sandbox");
    }
    loop {
        // One reload's commit: version + current pointer + event, atomic.
        let source = format!("return {{ v = {next} }}");
        let r = store
            .write(vec![
                WriteOp::PutVersion(VersionRecord {
                    sandbox: "crash".into(),
                    module: "m".into(),
                    version: next,
                    checksum: format!("{next:064x}"),
                    source,
                    dependencies: vec![],
                    status: VersionStatus::Permanent,
                    created_ms: f64::from(next),
                }),
                WriteOp::SetCurrent {
                    sandbox: "crash".into(),
                    module: "m".into(),
                    version: next,
                    file: None,
                },
                WriteOp::AppendEvent(NewEvent {
                    seq: None,
                    sandbox: Some("crash".into()),
                    kind: "reload".into(),
                    payload_json: format!("{{\"version\":{next}}}"),
                    at_ms: f64::from(next),
                }),
            ])
            .expect("child: write");
        let seq = r.event_seqs().next().expect("child: seq");
        println!("ACK {next} {seq}");
        next += 1;
    }
}

#[cfg(unix)]
#[test]
fn acknowledged_writes_survive_kill_9() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        crash_child(&path);
    }
    let dir = std::env::temp_dir().join(format!("graft-store-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db: PathBuf = dir.join("graft.db");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill-9 loop seed {seed}");
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let exe = std::env::current_exe().unwrap();
    let mut acked_total = 0usize;
    let rounds = 24;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args([
                "acknowledged_writes_survive_kill_9",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut it = rest.split(' ').map(|x| x.parse::<u64>().unwrap());
                    acks.push((it.next().unwrap(), it.next().unwrap()));
                }
            }
            acks
        });
        // Kill at a random moment: sometimes during start-up, mostly in the
        // middle of the write stream.
        std::thread::sleep(Duration::from_millis(5 + rand() % 150));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        acked_total += acks.len();

        let t = Instant::now();
        let store = Store::open_with(&db, opts())
            .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
        let versions = store
            .versions("crash", "m")
            .unwrap_or_else(|e| panic!("round {round}: reading versions failed: {e:?}"));
        let events = store
            .events_since(0, Some("crash"), usize::MAX)
            .unwrap_or_else(|e| panic!("round {round}: reading events failed: {e:?}"));
        let module = store
            .module("crash", "m")
            .unwrap_or_else(|e| panic!("round {round}: reading the module failed: {e:?}"));
        drop(store);
        let numbers: Vec<u64> = versions.iter().map(|v| u64::from(v.version)).collect();
        // Consecutive from 1, no duplicate, no hole.
        assert_eq!(
            numbers,
            (1..=numbers.len() as u64).collect::<Vec<_>>(),
            "round {round}"
        );
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "round {round}"
        );
        // Every reload is whole: one event per version, the pointer on the last.
        assert_eq!(seqs.len(), numbers.len(), "round {round}");
        if let Some(m) = module {
            assert_eq!(
                m.current.map(u64::from),
                numbers.last().copied(),
                "round {round}"
            );
        }
        for (version, seq) in &acks {
            assert!(
                numbers.contains(version),
                "round {round}: acknowledged version {version} is lost"
            );
            assert!(
                seqs.contains(seq),
                "round {round}: acknowledged event {seq} is lost"
            );
        }
        eprintln!(
            "round {round}: {} acknowledged, {} stored, reopened in {:?}",
            acks.len(),
            numbers.len(),
            t.elapsed()
        );
    }
    assert!(acked_total > 0, "the child never acknowledged a write");
    let _ = std::fs::remove_dir_all(&dir);
}
