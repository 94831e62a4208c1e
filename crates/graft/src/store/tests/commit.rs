//! The writer: group commit, a failing submission alone rolled back, reads
//! that never wait for it, closing, and ephemeral stores.

use super::*;

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
    let big = checkpoint_rows(0, 20_000);
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
