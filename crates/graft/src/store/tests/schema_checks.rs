//! The schema: its application id, migrations forward, and databases refused
//! (newer, corrupt, truncated, another application's).

use super::*;

#[test]
fn application_id_spells_grft() {
    assert_eq!(&schema::APPLICATION_ID.to_be_bytes(), b"GRFT");
    assert!(MIGRATIONS[0]
        .sql
        .contains(&format!("application_id = {}", schema::APPLICATION_ID)));
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
        store.write(vec![checkpoint_rows(0, 2000)]).unwrap();
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
fn a_file_short_of_its_header_with_the_log_beside_it_opens_whole() {
    // What a kill during a checkpoint leaves (seen by the kill -9 test):
    // page 1 already says the database grew, the file has not grown yet,
    // and the write-ahead log still holds the new pages.
    let dir = TempDir::new("checkpoint-cut");
    {
        let store = Store::open(dir.db()).unwrap();
        put_sandbox(&store, "s");
        store.write(vec![checkpoint_rows(0, 500)]).unwrap();
    }
    let len = std::fs::metadata(dir.db()).unwrap().len();
    // More rows, in the log only (too few pages for an automatic
    // checkpoint), copied while the store is open (closing checkpoints).
    let cut = TempDir::new("checkpoint-cut-copy");
    {
        let store = Store::open(dir.db()).unwrap();
        store.write(vec![checkpoint_rows(500, 3000)]).unwrap();
        let wal = |p: &std::path::Path| {
            let mut w = p.as_os_str().to_owned();
            w.push("-wal");
            std::path::PathBuf::from(w)
        };
        std::fs::copy(dir.db(), cut.db()).unwrap();
        std::fs::copy(wal(&dir.db()), wal(&cut.db())).unwrap();
        assert!(std::fs::metadata(wal(&cut.db())).unwrap().len() > 0);
    }
    // Page 1 as the interrupted checkpoint wrote it: a count past the end.
    let mut bytes = std::fs::read(cut.db()).unwrap();
    assert_eq!(bytes.len() as u64, len, "the rows went to the log only");
    let pages = u32::from_be_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]);
    bytes[28..32].copy_from_slice(&(pages + 40).to_be_bytes());
    std::fs::write(cut.db(), &bytes).unwrap();
    let store = Store::open(cut.db()).unwrap();
    assert_eq!(store.checkpoints("s").unwrap().len(), 3000);
    drop(store);
    // The same file without its log is refused as truncated.
    let alone = TempDir::new("checkpoint-cut-alone");
    std::fs::write(alone.db(), &bytes).unwrap();
    let e = Store::open(alone.db()).unwrap_err();
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

/// Version 2 seeds `event_gaps` from the events an older Graft kept; its
/// cost grows with the events, not with events × sandboxes. Measured in
/// SQLite VM steps (deterministic, unlike a clock): 1,000 sandboxes of 10
/// events each, every other number missing, as pruning at different rates
/// leaves them. (Before: a correlated scan of every gap edge per sandbox,
/// ~ 1e8 steps here; 27 s for 2,000 sandboxes × 100 events.)
#[test]
fn the_gap_migration_costs_steps_in_proportion_to_the_events() {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(MIGRATIONS[0].sql).unwrap();
    let (sandboxes, each) = (1_000u32, 10u32);
    {
        let tx = conn.unchecked_transaction().unwrap();
        let mut st = tx
            .prepare("INSERT INTO events (seq, sandbox, kind, payload, at_ms) VALUES (?1, ?2, 'tick', 'null', 0)")
            .unwrap();
        for i in 0..sandboxes * each {
            let seq = 2 * i64::from(i) + 2;
            st.execute(rusqlite::params![seq, format!("s{}", i % sandboxes)])
                .unwrap();
        }
        drop(st);
        tx.commit().unwrap();
    }
    let sql = MIGRATIONS[1].sql;
    let seed = sql
        .find("INSERT INTO event_gaps")
        .expect("the seeding statement");
    conn.execute_batch(&sql[..seed]).unwrap();
    let mut st = conn.prepare(&sql[seed..]).unwrap();
    let seeded = st.raw_execute().unwrap();
    assert_eq!(seeded, sandboxes as usize);
    let steps = st.get_status(rusqlite::StatementStatus::VmStep);
    let events = i32::try_from(sandboxes * each).unwrap();
    assert!(
        steps > 0 && steps < 200 * events,
        "{steps} VM steps for {events} events"
    );
    drop(st);
    // Each sandbox's oldest kept event is 2·k + 2 (k < 1,000): its gap is
    // the missing number just below.
    let through: i64 = conn
        .query_row(
            "SELECT through FROM event_gaps WHERE sandbox = 's7'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(through, 2 * 7 + 1);
}

/// Version 2's seeding on odd schema-1 data: numbers missing before the
/// first event, a node event with no sandbox (NULL: no row of its own, but
/// its number is no gap), the node's own events (`''`), the largest number.
#[test]
fn the_gap_migration_seeds_odd_old_data() {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(MIGRATIONS[0].sql).unwrap();
    conn.execute_batch(
        "INSERT INTO events (seq, sandbox, kind, payload, at_ms) VALUES
           (3, 'a', 'k', 'null', 0), (4, NULL, 'k', 'null', 0),
           (6, 'b', 'k', 'null', 0), (7, '', 'k', 'null', 0),
           (9223372036854775807, 'c', 'k', 'null', 0);",
    )
    .unwrap();
    conn.execute_batch(MIGRATIONS[1].sql).unwrap();
    let rows: Vec<(String, i64)> = conn
        .prepare("SELECT sandbox, through FROM event_gaps ORDER BY sandbox")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        vec![
            ("".to_owned(), 5),
            ("a".to_owned(), 2),
            ("b".to_owned(), 5),
            ("c".to_owned(), i64::MAX - 1),
        ]
    );
}
