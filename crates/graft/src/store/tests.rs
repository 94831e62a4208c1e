//! Unit tests of the store: every table's round trip, the group commit, the
//! schema checks and the failure modes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::schema::{Migration, MIGRATIONS};
use super::*;

/// A fresh directory under the system's temp directory, removed on drop
/// (with its permissions restored first, for the read-only test).
struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "graft-store-test-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn db(&self) -> PathBuf {
        self.0.join("graft.db")
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sandbox(id: &str) -> SandboxRecord {
    SandboxRecord {
        id: id.into(),
        entry: Some("app".into()),
        limits_json: r#"{"memory_bytes":67108864,"handler_ms":1000}"#.into(),
        capabilities: vec!["clock".into(), "random".into()],
        source_root: Some("/srv/demo".into()),
        spec_json: r#"{"files":{"app":"app.luau"}}"#.into(),
        created_ms: 1_700_000_000_123.5,
    }
}

fn version(sb: &str, module: &str, v: u32, status: VersionStatus) -> VersionRecord {
    let source = format!("return {{ v = {v} }}");
    VersionRecord {
        sandbox: sb.into(),
        module: module.into(),
        version: v,
        checksum: hex(&Sha256::digest(source.as_bytes())),
        source,
        dependencies: vec!["util".into()],
        status,
        created_ms: 1_700_000_000_000.0 + f64::from(v),
    }
}

fn event(sb: Option<&str>, kind: &str, n: u64) -> NewEvent {
    NewEvent {
        seq: None,
        sandbox: sb.map(str::to_string),
        kind: kind.into(),
        payload_json: format!(r#"{{"n":{n}}}"#),
        at_ms: 1_700_000_000_000.0 + n as f64,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn file_hash(p: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(p).unwrap()))
}

fn wal(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push("-wal");
    PathBuf::from(s)
}

fn put_sandbox(store: &Store, id: &str) {
    store.write(vec![WriteOp::PutSandbox(sandbox(id))]).unwrap();
}

#[test]
fn application_id_spells_grft() {
    assert_eq!(&schema::APPLICATION_ID.to_be_bytes(), b"GRFT");
    assert!(MIGRATIONS[0]
        .sql
        .contains(&format!("application_id = {}", schema::APPLICATION_ID)));
}

#[test]
fn every_table_round_trips() {
    let dir = TempDir::new("roundtrip");
    let store = Store::open(dir.db()).unwrap();
    put_sandbox(&store, "demo");
    // Updating a sandbox keeps its creation time.
    let mut updated = sandbox("demo");
    updated.limits_json = r#"{"memory_bytes":1}"#.into();
    updated.created_ms = 5.0;
    store
        .write(vec![WriteOp::PutSandbox(updated.clone())])
        .unwrap();

    let v1 = version("demo", "app", 1, VersionStatus::Permanent);
    let v2 = version("demo", "app", 2, VersionStatus::Canary);
    let receipt = store
        .write(vec![
            WriteOp::PutVersion(v1.clone()),
            WriteOp::SetCurrent {
                sandbox: "demo".into(),
                module: "app".into(),
                version: 1,
                file: Some("app.luau".into()),
            },
            WriteOp::PutVersion(v2.clone()),
            WriteOp::SetCurrent {
                sandbox: "demo".into(),
                module: "app".into(),
                version: 2,
                file: None,
            },
            WriteOp::AppendEvent(event(Some("demo"), "reload", 1)),
        ])
        .unwrap();
    assert_eq!(receipt.applied.len(), 5);
    assert_eq!(receipt.event_seqs().collect::<Vec<_>>(), vec![1]);

    let cps = vec![
        CheckpointRecord {
            name: "counter".into(),
            module: "app".into(),
            module_version: 2,
            state_json: r#"{"count":41,"names":["a","b"]}"#.into(),
            at_ms: 10.0,
        },
        CheckpointRecord {
            name: "cache".into(),
            module: "app".into(),
            module_version: 1,
            state_json: "[]".into(),
            at_ms: 11.0,
        },
    ];
    let r = store
        .write(vec![WriteOp::PutCheckpoints {
            sandbox: "demo".into(),
            rows: cps.clone(),
            removed: vec![],
        }])
        .unwrap();
    assert_eq!(r.applied, vec![Applied::Checkpoints { rows: 2 }]);

    let token = TokenRecord {
        id: "tok_1".into(),
        hash: Sha256::digest(b"secret").into(),
        role: "operator".into(),
        sandboxes: Some(vec!["demo".into()]),
        label: Some("ci".into()),
        created_ms: 20.0,
        revoked_ms: None,
    };
    store.write(vec![WriteOp::PutToken(token.clone())]).unwrap();
    store
        .write(vec![WriteOp::RevokeToken {
            id: "tok_1".into(),
            at_ms: 30.0,
        }])
        .unwrap();
    // A second revocation keeps the first time.
    store
        .write(vec![WriteOp::RevokeToken {
            id: "tok_1".into(),
            at_ms: 40.0,
        }])
        .unwrap();
    let audit = AuditRecord {
        id: 0,
        at_ms: 50.0,
        token_id: Some("tok_1".into()),
        role: Some("operator".into()),
        method: "POST".into(),
        route: "/api/v1/sandboxes/{id}/reload".into(),
        sandbox: Some("demo".into()),
        outcome: "ok".into(),
        status: Some(200),
        duration_us: 1234,
    };
    let r = store
        .write(vec![WriteOp::AppendAudit(audit.clone())])
        .unwrap();
    assert_eq!(r.applied, vec![Applied::Audit { id: 1 }]);
    drop(store);

    // Everything comes back after a reopen.
    let store = Store::open(dir.db()).unwrap();
    let snap = store.load_all().unwrap();
    assert_eq!(snap.last_event_seq, 1);
    assert_eq!(snap.sandboxes.len(), 1);
    let sb = &snap.sandboxes[0];
    assert_eq!(
        sb.sandbox,
        SandboxRecord {
            created_ms: sandbox("demo").created_ms,
            ..updated
        }
    );
    assert_eq!(sb.modules.len(), 1);
    let m = &sb.modules[0];
    assert_eq!(
        m.module,
        ModuleRecord {
            sandbox: "demo".into(),
            module: "app".into(),
            current: Some(2),
            stable: Some(1),
            next_version: 3,
            file: Some("app.luau".into()),
        }
    );
    assert_eq!(m.versions, vec![v1.clone(), v2.clone()]);
    assert!(m.canary_open());
    assert_eq!(m.restore_version(), Some(&v1));
    let mut sorted = cps.clone();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(sb.checkpoints, sorted);
    assert_eq!(store.checkpoints("demo").unwrap(), sorted);
    assert_eq!(store.versions("demo", "app").unwrap(), vec![v1.clone(), v2]);
    assert_eq!(
        store
            .version_by_checksum("demo", "app", &v1.checksum)
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store.version_by_checksum("demo", "app", "nope").unwrap(),
        None
    );
    let events = store.events_since(0, None, 10).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0],
        EventRecord {
            seq: 1,
            sandbox: Some("demo".into()),
            kind: "reload".into(),
            payload_json: r#"{"n":1}"#.into(),
            at_ms: 1_700_000_000_001.0,
        }
    );
    let tokens = store.tokens().unwrap();
    assert_eq!(
        tokens,
        vec![TokenRecord {
            revoked_ms: Some(30.0),
            ..token.clone()
        }]
    );
    assert_eq!(
        store.token_by_hash(&token.hash).unwrap().map(|t| t.id),
        Some("tok_1".into())
    );
    assert_eq!(store.token_by_hash(&[0; 32]).unwrap(), None);
    assert_eq!(
        store.audit(None, 10).unwrap(),
        vec![AuditRecord { id: 1, ..audit }]
    );
}

#[test]
fn stable_version_follows_permanent_current() {
    let store = Store::in_memory().unwrap();
    put_sandbox(&store, "s");
    let cur = |v| WriteOp::SetCurrent {
        sandbox: "s".into(),
        module: "m".into(),
        version: v,
        file: None,
    };
    store
        .write(vec![
            WriteOp::PutVersion(version("s", "m", 1, VersionStatus::Permanent)),
            cur(1),
        ])
        .unwrap();
    store
        .write(vec![
            WriteOp::PutVersion(version("s", "m", 2, VersionStatus::Canary)),
            cur(2),
        ])
        .unwrap();
    assert_eq!(
        store
            .module("s", "m")
            .unwrap()
            .map(|m| (m.current, m.stable)),
        Some((Some(2), Some(1)))
    );
    // The canary window closes cleanly: v2 becomes permanent and stable.
    store
        .write(vec![WriteOp::SetVersionStatus {
            sandbox: "s".into(),
            module: "m".into(),
            version: 2,
            status: VersionStatus::Permanent,
        }])
        .unwrap();
    assert_eq!(
        store
            .module("s", "m")
            .unwrap()
            .map(|m| (m.current, m.stable)),
        Some((Some(2), Some(2)))
    );
    // A rollback to v1 makes v1 current and stable.
    store.write(vec![cur(1)]).unwrap();
    assert_eq!(
        store
            .module("s", "m")
            .unwrap()
            .map(|m| (m.current, m.stable)),
        Some((Some(1), Some(1)))
    );
    // The stable version cannot become a canary; the current cannot be dropped.
    let e = store
        .write(vec![WriteOp::SetVersionStatus {
            sandbox: "s".into(),
            module: "m".into(),
            version: 1,
            status: VersionStatus::Canary,
        }])
        .unwrap_err();
    assert_eq!(e.kind(), "storage_constraint", "{e}");
    let drop_v = |v| WriteOp::DropVersion {
        sandbox: "s".into(),
        module: "m".into(),
        version: v,
    };
    let e = store.write(vec![drop_v(1)]).unwrap_err();
    assert!(e.to_string().contains("current or stable"), "{e}");
    // Dropping v2 leaves the next number at 3.
    store.write(vec![drop_v(2)]).unwrap();
    let m = store.module("s", "m").unwrap().unwrap();
    assert_eq!(m.next_version, 3);
    assert_eq!(store.versions("s", "m").unwrap().len(), 1);
    // Setting a version that is not stored fails and names it.
    let e = store.write(vec![cur(7)]).unwrap_err();
    assert_eq!(e.kind(), "storage_not_found");
    assert!(e.to_string().contains("version 7 of module `m`"), "{e}");
    // Storing the same number twice fails.
    let e = store
        .write(vec![WriteOp::PutVersion(version(
            "s",
            "m",
            1,
            VersionStatus::Permanent,
        ))])
        .unwrap_err();
    assert!(e.to_string().contains("stored already"), "{e}");
}

#[test]
fn deleting_a_sandbox_deletes_its_versions_and_checkpoints_but_keeps_events() {
    let store = Store::in_memory().unwrap();
    put_sandbox(&store, "gone");
    store
        .write(vec![
            WriteOp::PutVersion(version("gone", "m", 1, VersionStatus::Permanent)),
            WriteOp::SetCurrent {
                sandbox: "gone".into(),
                module: "m".into(),
                version: 1,
                file: None,
            },
            WriteOp::PutCheckpoints {
                sandbox: "gone".into(),
                rows: vec![CheckpointRecord {
                    name: "p".into(),
                    module: "m".into(),
                    module_version: 1,
                    state_json: "1".into(),
                    at_ms: 1.0,
                }],
                removed: vec![],
            },
            WriteOp::AppendEvent(event(Some("gone"), "created", 1)),
        ])
        .unwrap();
    store
        .write(vec![
            WriteOp::DeleteSandbox { id: "gone".into() },
            WriteOp::AppendEvent(event(Some("gone"), "deleted", 2)),
        ])
        .unwrap();
    assert!(store.load_all().unwrap().sandboxes.is_empty());
    assert!(store.versions("gone", "m").unwrap().is_empty());
    assert!(store.checkpoints("gone").unwrap().is_empty());
    assert_eq!(store.events_since(0, Some("gone"), 10).unwrap().len(), 2);
    // The id can be used again.
    put_sandbox(&store, "gone");
    let e = store
        .write(vec![WriteOp::DeleteSandbox { id: "nope".into() }])
        .unwrap_err();
    assert_eq!(e.kind(), "storage_not_found");
}

#[test]
fn checkpoints_replace_and_remove_by_name() {
    let store = Store::in_memory().unwrap();
    put_sandbox(&store, "s");
    let cp = |name: &str, state: &str| CheckpointRecord {
        name: name.into(),
        module: "m".into(),
        module_version: 1,
        state_json: state.into(),
        at_ms: 1.0,
    };
    let put = |rows, removed| WriteOp::PutCheckpoints {
        sandbox: "s".into(),
        rows,
        removed,
    };
    store
        .write(vec![put(vec![cp("a", "1"), cp("b", "2")], vec![])])
        .unwrap();
    store
        .write(vec![put(vec![cp("a", "3")], vec!["b".into()])])
        .unwrap();
    assert_eq!(store.checkpoints("s").unwrap(), vec![cp("a", "3")]);
    let r = store
        .write(vec![WriteOp::ClearCheckpoints {
            sandbox: "s".into(),
        }])
        .unwrap();
    assert_eq!(r.applied, vec![Applied::Checkpoints { rows: 1 }]);
    assert!(store.checkpoints("s").unwrap().is_empty());
    // A checkpoint of a sandbox that is not stored fails clearly.
    let e = store
        .write(vec![WriteOp::PutCheckpoints {
            sandbox: "ghost".into(),
            rows: vec![cp("a", "1")],
            removed: vec![],
        }])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "put_checkpoints: sandbox `ghost` is not stored"
    );
}

#[test]
fn bad_values_fail_their_write_without_panicking() {
    let store = Store::in_memory().unwrap();
    put_sandbox(&store, "s");
    let mut ev = event(Some("s"), "x", 1);
    ev.at_ms = f64::NAN;
    let e = store.write(vec![WriteOp::AppendEvent(ev)]).unwrap_err();
    assert_eq!(e.kind(), "storage_invalid", "{e}");
    let mut ev = event(Some("s"), "x", 1);
    ev.payload_json = "{not json".into();
    let e = store.write(vec![WriteOp::AppendEvent(ev)]).unwrap_err();
    assert_eq!(e.kind(), "storage_constraint", "{e}");
    let mut t = TokenRecord {
        id: "t".into(),
        hash: [1; 32],
        role: "root".into(),
        sandboxes: None,
        label: None,
        created_ms: 1.0,
        revoked_ms: None,
    };
    let e = store.write(vec![WriteOp::PutToken(t.clone())]).unwrap_err();
    assert_eq!(e.kind(), "storage_constraint", "{e}");
    t.role = "admin".into();
    store.write(vec![WriteOp::PutToken(t.clone())]).unwrap();
    t.id = "t2".into();
    let e = store.write(vec![WriteOp::PutToken(t)]).unwrap_err();
    assert!(e.to_string().contains("same secret"), "{e}");
    let mut a = AuditRecord {
        id: 0,
        at_ms: 1.0,
        token_id: None,
        role: None,
        method: "GET".into(),
        route: "/".into(),
        sandbox: None,
        outcome: "ok".into(),
        status: None,
        duration_us: u64::MAX,
    };
    assert_eq!(
        store
            .write(vec![WriteOp::AppendAudit(a.clone())])
            .unwrap_err()
            .kind(),
        "storage_invalid"
    );
    a.duration_us = 1;
    store.write(vec![WriteOp::AppendAudit(a)]).unwrap();
    // No failed write left a trace: sequence numbers are still consecutive.
    let r = store
        .write(vec![WriteOp::AppendEvent(event(Some("s"), "x", 2))])
        .unwrap();
    assert_eq!(r.event_seqs().collect::<Vec<_>>(), vec![1]);
}

#[test]
fn events_are_pruned_to_the_newest_per_sandbox() {
    let dir = TempDir::new("prune");
    let opts = StoreOptions {
        max_events_per_sandbox: 10,
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir.db(), opts).unwrap();
    for n in 0..25 {
        store
            .write(vec![WriteOp::AppendEvent(event(Some("a"), "tick", n))])
            .unwrap();
        if n % 8 == 0 {
            store
                .write(vec![WriteOp::AppendEvent(event(Some("b"), "tick", n))])
                .unwrap();
            store
                .write(vec![WriteOp::AppendEvent(event(None, "node", n))])
                .unwrap();
        }
    }
    let a = store.events_since(0, Some("a"), 100).unwrap();
    assert_eq!(a.len(), 10);
    assert_eq!(
        a.iter().map(|e| e.payload_json.clone()).collect::<Vec<_>>(),
        (15..25)
            .map(|n| format!(r#"{{"n":{n}}}"#))
            .collect::<Vec<_>>()
    );
    assert_eq!(store.events_since(0, Some("b"), 100).unwrap().len(), 4);
    let all = store.events_since(0, None, 100).unwrap();
    assert_eq!(all.len(), 10 + 4 + 4);
    assert_eq!(all.iter().filter(|e| e.sandbox.is_none()).count(), 4);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(store.last_event_seq().unwrap(), 25 + 4 + 4);
    // Paging with `after` and `limit`.
    let page = store.events_since(all[3].seq, None, 2).unwrap();
    assert_eq!(page, all[4..6].to_vec());
}

#[test]
fn concurrent_submitters_share_commits_and_get_consecutive_sequence_numbers() {
    let dir = TempDir::new("group");
    let opts = StoreOptions {
        max_events_per_sandbox: 1_000_000,
        ..StoreOptions::default()
    };
    let store = Arc::new(Store::open_with(dir.db(), opts).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let sb = format!("s{t}");
                let mut seqs = Vec::new();
                for n in 0..200 {
                    let r = store
                        .write(vec![WriteOp::AppendEvent(event(Some(&sb), "tick", n))])
                        .unwrap();
                    seqs.extend(r.event_seqs());
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(seqs.len(), 1600);
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=1600).collect::<Vec<_>>());
    drop(Arc::try_unwrap(store).unwrap());
    let store = Store::open(dir.db()).unwrap();
    let stored: Vec<u64> = store
        .events_since(0, None, 10_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(stored, (1..=1600).collect::<Vec<_>>());
    for t in 0..8 {
        let evs = store
            .events_since(0, Some(&format!("s{t}")), 10_000)
            .unwrap();
        let ns: Vec<String> = evs.iter().map(|e| e.payload_json.clone()).collect();
        // Each submitter's writes are stored in the order it made them.
        assert_eq!(
            ns,
            (0..200)
                .map(|n| format!(r#"{{"n":{n}}}"#))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_failing_submission_inside_a_group_fails_alone() {
    let store = Store::in_memory().unwrap();
    put_sandbox(&store, "s");
    // A large first submission keeps the writer busy while the others queue
    // behind it, so they share one transaction.
    let big = WriteOp::PutCheckpoints {
        sandbox: "s".into(),
        rows: (0..20_000)
            .map(|i| CheckpointRecord {
                name: format!("p{i}"),
                module: "m".into(),
                module_version: 1,
                state_json: format!("{{\"i\":{i}}}"),
                at_ms: 1.0,
            })
            .collect(),
        removed: vec![],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut futures = vec![store.write_async(vec![big])];
    for n in 0..20u64 {
        let mut ops = vec![WriteOp::AppendEvent(event(Some("s"), "tick", n))];
        if n == 7 {
            // Atomic with the event above: the whole submission must vanish.
            ops.push(WriteOp::PutVersion(version(
                "ghost",
                "m",
                1,
                VersionStatus::Permanent,
            )));
        }
        futures.push(store.write_async(ops));
    }
    let results: Vec<_> = rt.block_on(async {
        let mut out = Vec::new();
        for f in futures {
            out.push(f.await);
        }
        out
    });
    for (i, r) in results.iter().enumerate() {
        if i == 8 {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.to_string(), "put_version: sandbox `ghost` is not stored");
        } else {
            assert!(r.is_ok(), "submission {i}: {r:?}");
        }
    }
    let payloads: Vec<String> = store
        .events_since(0, None, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.payload_json)
        .collect();
    let expected: Vec<String> = (0..20u64)
        .filter(|n| *n != 7)
        .map(|n| format!(r#"{{"n":{n}}}"#))
        .collect();
    assert_eq!(payloads, expected);
    // The rolled-back event did not use up a sequence number.
    let seqs: Vec<u64> = results[1..]
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .flat_map(|r| r.event_seqs().collect::<Vec<_>>())
        .collect();
    assert_eq!(seqs, (1..=19).collect::<Vec<_>>());
    assert_eq!(store.checkpoints("s").unwrap().len(), 20_000);
}

#[test]
fn reads_do_not_wait_for_a_long_write() {
    let store = Arc::new(Store::in_memory().unwrap());
    put_sandbox(&store, "s");
    store
        .write(vec![WriteOp::AppendEvent(event(Some("s"), "first", 0))])
        .unwrap();
    let rows: Vec<_> = (0..200_000)
        .map(|i| CheckpointRecord {
            name: format!("p{i}"),
            module: "m".into(),
            module_version: 1,
            state_json: format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(64)),
            at_ms: 1.0,
        })
        .collect();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            store
                .write(vec![WriteOp::PutCheckpoints {
                    sandbox: "s".into(),
                    rows,
                    removed: vec![],
                }])
                .unwrap();
            t.elapsed()
        })
    };
    let mut reads_during_write = 0;
    let mut slowest = Duration::ZERO;
    while !writer.is_finished() {
        let t = Instant::now();
        let evs = store.events_since(0, None, 10).unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(evs.len(), 1);
        // The write is not visible until it commits, and never half of it.
        let n = store.checkpoints("s").unwrap().len();
        assert!(n == 0 || n == 200_000, "saw {n} checkpoints");
        if !writer.is_finished() {
            reads_during_write += 1;
        }
    }
    let write_time = writer.join().unwrap();
    assert!(
        reads_during_write > 0,
        "the write took {write_time:?}; no read overlapped it"
    );
    assert!(
        slowest < Duration::from_millis(250),
        "a read took {slowest:?} while a {write_time:?} write ran"
    );
}

fn fake_v2() -> Vec<Migration> {
    let mut m = MIGRATIONS.to_vec();
    m.push(Migration {
        version: SCHEMA_VERSION + 1,
        name: "test: a table and a column",
        sql: "CREATE TABLE test_extra (k TEXT PRIMARY KEY, v TEXT) STRICT;
              ALTER TABLE sandboxes ADD COLUMN note TEXT NOT NULL DEFAULT 'none';",
    });
    m
}

#[test]
fn an_older_database_is_migrated_forward_without_a_rewrite() {
    let dir = TempDir::new("migrate");
    {
        let store = Store::open(dir.db()).unwrap();
        put_sandbox(&store, "s");
        store
            .write(vec![WriteOp::AppendEvent(event(Some("s"), "x", 1))])
            .unwrap();
    }
    let before = std::fs::metadata(dir.db()).unwrap().len();
    let v2 = fake_v2();
    let store = Store::open_inner(&dir.db(), StoreOptions::default(), &v2, true, None).unwrap();
    // v1 data is intact and readable through the v1 reads.
    assert_eq!(store.sandboxes().unwrap(), vec![sandbox("s")]);
    assert_eq!(store.events_since(0, None, 10).unwrap().len(), 1);
    put_sandbox(&store, "t");
    drop(store);
    let conn = Connection::open(dir.db()).unwrap();
    let uv: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(uv, i64::from(SCHEMA_VERSION + 1));
    let notes: Vec<String> = conn
        .prepare("SELECT note FROM sandboxes ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(notes, vec!["none", "none"]);
    conn.execute("INSERT INTO test_extra VALUES ('a', 'b')", [])
        .unwrap();
    drop(conn);
    // Adding a table and a column rewrote nothing: the file grew by the new
    // table's pages at most.
    let after = std::fs::metadata(dir.db()).unwrap().len();
    assert!(after <= before + 4 * 4096, "{before} -> {after}");
    // This build (v1) refuses the v2 file, untouched.
    let hash = file_hash(&dir.db());
    let e = Store::open(dir.db()).unwrap_err();
    assert!(
        matches!(e, StoreError::NewerSchema { found, supported, .. } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{e}"
    );
    assert_eq!(file_hash(&dir.db()), hash);
}

#[test]
fn a_newer_schema_is_refused_and_left_untouched() {
    let dir = TempDir::new("newer");
    {
        let store = Store::open(dir.db()).unwrap();
        put_sandbox(&store, "s");
    }
    {
        let conn = Connection::open(dir.db()).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    assert!(!wal(&dir.db()).exists(), "a clean close leaves no log");
    let hash = file_hash(&dir.db());
    let mtime = std::fs::metadata(dir.db()).unwrap().modified().unwrap();
    let e = Store::open(dir.db()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("schema version 99")
            && msg.contains(&format!("versions up to {SCHEMA_VERSION}")),
        "{msg}"
    );
    assert!(msg.contains("left untouched"), "{msg}");
    assert_eq!(file_hash(&dir.db()), hash);
    assert_eq!(
        std::fs::metadata(dir.db()).unwrap().modified().unwrap(),
        mtime
    );
    assert!(!wal(&dir.db()).exists(), "opening created a log");
}

#[test]
fn a_newer_schema_still_in_the_log_is_refused() {
    let dir = TempDir::new("newer-wal");
    drop(Store::open(dir.db()).unwrap());
    // A newer Graft migrated and was killed before folding its log into the
    // file: the header still says v1, the log says 42.
    let conn = Connection::open(dir.db()).unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.pragma_update(None, "user_version", 42).unwrap();
    let hash = file_hash(&dir.db());
    let e = Store::open(dir.db()).unwrap_err();
    assert!(
        matches!(e, StoreError::NewerSchema { found: 42, .. }),
        "{e}"
    );
    assert_eq!(file_hash(&dir.db()), hash);
    std::mem::forget(conn); // as if killed: no checkpoint on close
}

#[test]
fn random_bytes_are_refused_as_corrupt() {
    let dir = TempDir::new("random");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(dir.db(), &bytes).unwrap();
    let e = Store::open(dir.db()).unwrap_err();
    assert_eq!(e.kind(), "storage_corrupt", "{e}");
    assert!(
        e.to_string()
            .contains("does not start with a SQLite header"),
        "{e}"
    );
    assert_eq!(std::fs::read(dir.db()).unwrap(), bytes);
    // A few bytes only.
    std::fs::write(dir.db(), b"hello").unwrap();
    assert_eq!(Store::open(dir.db()).unwrap_err().kind(), "storage_corrupt");
}

#[test]
fn a_truncated_database_is_refused_as_corrupt() {
    let dir = TempDir::new("truncated");
    {
        let store = Store::open(dir.db()).unwrap();
        put_sandbox(&store, "s");
        store
            .write(vec![WriteOp::PutCheckpoints {
                sandbox: "s".into(),
                rows: (0..2000)
                    .map(|i| CheckpointRecord {
                        name: format!("p{i}"),
                        module: "m".into(),
                        module_version: 1,
                        state_json: format!("{{\"i\":{i}}}"),
                        at_ms: 1.0,
                    })
                    .collect(),
                removed: vec![],
            }])
            .unwrap();
    }
    let len = std::fs::metadata(dir.db()).unwrap().len();
    assert!(len > 16 * 4096);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.db())
        .unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let e = Store::open(dir.db()).unwrap_err();
    assert_eq!(e.kind(), "storage_corrupt", "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn another_applications_database_is_refused() {
    let dir = TempDir::new("foreign");
    {
        let conn = Connection::open(dir.db()).unwrap();
        conn.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY)")
            .unwrap();
    }
    let e = Store::open(dir.db()).unwrap_err();
    assert!(e.to_string().contains("no Graft schema version"), "{e}");
    {
        let conn = Connection::open(dir.db()).unwrap();
        conn.pragma_update(None, "application_id", 7).unwrap();
    }
    let e = Store::open(dir.db()).unwrap_err();
    assert!(e.to_string().contains("not Graft's"), "{e}");
}

/// Whether this process can write where permissions say it cannot (root,
/// CAP_DAC_OVERRIDE): then chmod proves nothing.
fn permissions_are_bypassed(dir: &Path) -> bool {
    let probe = dir.join("probe");
    std::fs::write(&probe, b"x").is_ok() && std::fs::remove_file(&probe).is_ok()
}

#[cfg(unix)]
#[test]
fn a_read_only_database_reads_but_refuses_writes_cleanly() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("readonly");
    {
        let store = Store::open(dir.db()).unwrap();
        put_sandbox(&store, "s");
    }
    std::fs::set_permissions(dir.db(), std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o555)).unwrap();
    if permissions_are_bypassed(&dir.0) {
        eprintln!(
            "SKIPPED assertion: this test runs with permission checks bypassed (root); \
             chmod cannot make the database read-only here. The full-disk test covers a refused write."
        );
        return;
    }
    let hash = file_hash(&dir.db());
    match Store::open(dir.db()) {
        // SQLite can read the WAL database (its -shm file is usable): reads
        // work and every write fails whole.
        Ok(store) => {
            assert!(store.read_only_reason().is_some());
            assert_eq!(store.sandboxes().unwrap(), vec![sandbox("s")]);
            let e = store
                .write(vec![
                    WriteOp::PutSandbox(sandbox("t")),
                    WriteOp::AppendEvent(event(Some("t"), "created", 1)),
                ])
                .unwrap_err();
            assert_eq!(e.kind(), "storage_read_only", "{e}");
            assert!(e.to_string().contains("nothing was written"), "{e}");
            assert_eq!(store.sandboxes().unwrap(), vec![sandbox("s")]);
            assert!(store.events_since(0, None, 10).unwrap().is_empty());
        }
        // After a clean close there is no -shm file and none can be created
        // in a read-only directory: SQLite cannot read, and says so.
        Err(e) => {
            assert_eq!(e.kind(), "storage_read_only", "{e}");
            assert!(e.to_string().contains("directory is not writable"), "{e}");
        }
    }
    assert_eq!(file_hash(&dir.db()), hash);
    // A read-only file in a writable directory: reads work, writes fail whole.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = Store::open(dir.db()).unwrap();
    // Said at open (so a node can refuse it), not found out at the first write.
    let why = store
        .read_only_reason()
        .expect("a read-only file is said at open");
    assert!(why.contains("database file"), "{why}");
    assert_eq!(store.sandboxes().unwrap(), vec![sandbox("s")]);
    let e = store
        .write(vec![
            WriteOp::PutSandbox(sandbox("t")),
            WriteOp::AppendEvent(event(Some("t"), "created", 1)),
        ])
        .unwrap_err();
    assert_eq!(e.kind(), "storage_read_only", "{e}");
    assert_eq!(store.sandboxes().unwrap(), vec![sandbox("s")]);
    assert!(store.events_since(0, None, 10).unwrap().is_empty());
    drop(store);
    assert_eq!(file_hash(&dir.db()), hash);
}

#[test]
fn a_full_disk_fails_the_write_and_applies_nothing() {
    let dir = TempDir::new("full");
    let opts = StoreOptions {
        max_size_bytes: Some(256 * 1024),
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir.db(), opts).unwrap();
    put_sandbox(&store, "s");
    let rows: Vec<_> = (0..5000)
        .map(|i| CheckpointRecord {
            name: format!("p{i}"),
            module: "m".into(),
            module_version: 1,
            state_json: format!("{{\"pad\":\"{}\"}}", "x".repeat(200)),
            at_ms: 1.0,
        })
        .collect();
    let e = store
        .write(vec![
            WriteOp::AppendEvent(event(Some("s"), "reload", 1)),
            WriteOp::PutCheckpoints {
                sandbox: "s".into(),
                rows,
                removed: vec![],
            },
        ])
        .unwrap_err();
    assert_eq!(e.kind(), "storage_full", "{e}");
    assert!(store.events_since(0, None, 10).unwrap().is_empty());
    assert!(store.checkpoints("s").unwrap().is_empty());
    // Small writes still fit and go on working.
    let r = store
        .write(vec![WriteOp::AppendEvent(event(Some("s"), "reload", 2))])
        .unwrap();
    assert_eq!(r.event_seqs().collect::<Vec<_>>(), vec![1]);
}

#[test]
fn backup_is_a_complete_copy_and_never_overwrites() {
    let dir = TempDir::new("backup");
    let store = Store::open(dir.db()).unwrap();
    put_sandbox(&store, "s");
    store
        .write(vec![WriteOp::AppendEvent(event(Some("s"), "x", 1))])
        .unwrap();
    let dest = dir.0.join("copy.db");
    store.backup_to(&dest).unwrap();
    let e = store.backup_to(&dest).unwrap_err();
    assert_eq!(e.kind(), "storage_io");
    assert!(e.to_string().contains("exists"), "{e}");
    let copy = Store::open(&dest).unwrap();
    assert_eq!(copy.sandboxes().unwrap(), vec![sandbox("s")]);
    assert_eq!(copy.events_since(0, None, 10).unwrap().len(), 1);
    assert!(!dir.0.join("copy.db.partial").exists());
}

#[test]
fn close_commits_what_was_queued_then_refuses() {
    let dir = TempDir::new("close");
    let store = Store::open(dir.db()).unwrap();
    put_sandbox(&store, "s");
    let pending: Vec<_> = (0..50)
        .map(|n| store.write_async(vec![WriteOp::AppendEvent(event(Some("s"), "x", n))]))
        .collect();
    store.close();
    assert!(matches!(
        store.write(vec![WriteOp::AppendEvent(event(Some("s"), "x", 99))]),
        Err(StoreError::Closed)
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for p in pending {
        rt.block_on(p).unwrap();
    }
    drop(store);
    assert!(
        !wal(&dir.db()).exists(),
        "a clean close folds the log into the file"
    );
    let store = Store::open(dir.db()).unwrap();
    assert_eq!(store.events_since(0, None, 100).unwrap().len(), 50);
}

#[test]
fn an_ephemeral_store_works_the_same_and_leaves_nothing() {
    let store = Store::in_memory().unwrap();
    assert!(store.is_ephemeral());
    let dir = store.path().parent().unwrap().to_path_buf();
    put_sandbox(&store, "s");
    assert_eq!(store.sandboxes().unwrap().len(), 1);
    drop(store);
    assert!(!dir.exists());
}

#[test]
fn audit_rows_are_finished_and_queried_by_filter() {
    let store = Store::in_memory().unwrap();
    let row = |at_ms: f64, token: &str, sandbox: Option<&str>| AuditRecord {
        id: 0,
        at_ms,
        token_id: Some(token.into()),
        role: Some("admin".into()),
        method: "POST".into(),
        route: "/api/v1/sandboxes/{id}/eval".into(),
        sandbox: sandbox.map(Into::into),
        outcome: "pending".into(),
        status: None,
        duration_us: 0,
    };
    let mut ids = Vec::new();
    for (at, token, sb) in [
        (10.0, "a", Some("one")),
        (20.0, "b", Some("two")),
        (30.0, "a", None),
    ] {
        let r = store
            .write(vec![WriteOp::AppendAudit(row(at, token, sb))])
            .unwrap();
        let Applied::Audit { id } = r.applied[0] else {
            panic!("{:?}", r.applied)
        };
        ids.push(id);
    }
    store
        .write(vec![WriteOp::FinishAudit {
            id: ids[0],
            outcome: "ok".into(),
            status: Some(200),
            duration_us: 77,
            token_id: None,
            role: None,
        }])
        .unwrap();
    // A sign-in learns its token while it runs: the finish fills it in.
    store
        .write(vec![WriteOp::FinishAudit {
            id: ids[1],
            outcome: "forbidden".into(),
            status: Some(403),
            duration_us: 5,
            token_id: Some("c".into()),
            role: Some("viewer".into()),
        }])
        .unwrap();
    let err = store
        .write(vec![WriteOp::FinishAudit {
            id: 999,
            outcome: "ok".into(),
            status: None,
            duration_us: 0,
            token_id: None,
            role: None,
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");

    let q = |f: &dyn Fn(&mut AuditQuery)| {
        let mut q = AuditQuery {
            limit: 10,
            ..AuditQuery::default()
        };
        f(&mut q);
        store
            .audit_query(&q)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(q(&|_| {}), vec![ids[2], ids[1], ids[0]]);
    assert_eq!(q(&|q| q.token_id = Some("a".into())), vec![ids[2], ids[0]]);
    assert_eq!(q(&|q| q.token_id = Some("c".into())), vec![ids[1]]);
    assert_eq!(q(&|q| q.sandbox = Some("one".into())), vec![ids[0]]);
    assert_eq!(q(&|q| q.outcome = Some("pending".into())), vec![ids[2]]);
    assert_eq!(q(&|q| q.since_ms = Some(20.0)), vec![ids[2], ids[1]]);
    assert_eq!(q(&|q| q.before = Some(ids[2])), vec![ids[1], ids[0]]);
    assert_eq!(q(&|q| q.limit = 1), vec![ids[2]]);
    let first = store
        .audit_query(&AuditQuery {
            sandbox: Some("one".into()),
            limit: 1,
            ..AuditQuery::default()
        })
        .unwrap();
    assert_eq!(
        (
            first[0].outcome.as_str(),
            first[0].status,
            first[0].duration_us
        ),
        ("ok", Some(200), 77)
    );
}

#[test]
fn replace_history_swaps_every_row_or_nothing() {
    let store = Store::in_memory().unwrap();
    put_sandbox(&store, "s");
    store
        .write(vec![
            WriteOp::PutVersion(version("s", "m", 1, VersionStatus::Permanent)),
            WriteOp::PutVersion(version("s", "m", 2, VersionStatus::Canary)),
            WriteOp::SetCurrent {
                sandbox: "s".into(),
                module: "m".into(),
                version: 2,
                file: None,
            },
        ])
        .unwrap();
    let rows = |store: &Store| -> Vec<(u32, String, VersionStatus)> {
        store
            .versions("s", "m")
            .unwrap()
            .into_iter()
            .map(|v| (v.version, v.source, v.status))
            .collect()
    };
    let before = rows(&store);
    let mut imported = version("s", "m", 2, VersionStatus::Canary);
    imported.source = "return { imported = true }".into();
    let replace = |versions: Vec<VersionRecord>, current| WriteOp::ReplaceHistory {
        sandbox: "s".into(),
        module: "m".into(),
        versions,
        current,
    };
    // Hostile: a current that is not among the versions, a record of
    // another module, a duplicate number. Each fails whole.
    for bad in [
        replace(vec![imported.clone()], 3),
        replace(vec![version("s", "other", 3, VersionStatus::Permanent)], 3),
        replace(vec![imported.clone(), imported.clone()], 2),
    ] {
        assert!(store.write(vec![bad]).is_err());
        assert_eq!(rows(&store), before);
    }
    store
        .write(vec![replace(
            vec![
                version("s", "m", 1, VersionStatus::Permanent),
                imported.clone(),
            ],
            2,
        )])
        .unwrap();
    assert_eq!(
        rows(&store),
        vec![
            (
                1,
                version("s", "m", 1, VersionStatus::Permanent).source,
                VersionStatus::Permanent
            ),
            (2, imported.source.clone(), VersionStatus::Permanent),
        ]
    );
    let m = store.module("s", "m").unwrap().expect("module");
    assert_eq!((m.current, m.stable), (Some(2), Some(2)));
}
