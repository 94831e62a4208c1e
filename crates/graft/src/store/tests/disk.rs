//! The file system: a read-only database, a full disk, and backups.

use super::*;

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
