//! Unit tests of the event log: numbering, visibility, gaps, pruning and
//! durability across a reopen.

use std::sync::Arc;

use serde_json::Value as Json;

use super::*;
use crate::store::tests::TempDir;
use crate::store::{Store, WriteOp};

fn kinds(page: &EventPage) -> Vec<(u64, &str)> {
    page.events
        .iter()
        .map(|e| (e.seq, e.kind.as_str()))
        .collect()
}

#[test]
fn a_reserved_event_holds_back_later_ones_until_published() {
    let log = EventLog::in_memory(10);
    log.append("a", "one", Json::Null);
    let held = log.reserve("a", "commit", Json::Null);
    log.append("a", "three", Json::Null);
    let all = EventFilter::default();
    assert_eq!(kinds(&log.read(0, &all, 100)), vec![(1, "one")]);
    assert_eq!(log.visible(), 1);
    log.publish(vec![held]);
    assert_eq!(
        kinds(&log.read(0, &all, 100)),
        vec![(1, "one"), (2, "commit"), (3, "three")]
    );
}

#[test]
fn an_abandoned_number_is_skipped_and_never_shown() {
    let log = EventLog::in_memory(10);
    let held = log.reserve("a", "commit", Json::Null);
    log.append("a", "after", Json::Null);
    assert!(log.read(0, &EventFilter::default(), 10).events.is_empty());
    log.abandon(held.seq);
    assert_eq!(
        kinds(&log.read(0, &EventFilter::default(), 10)),
        vec![(2, "after")]
    );
}

#[test]
fn each_sandbox_keeps_its_newest_events_and_readers_learn_of_the_gap() {
    let log = EventLog::in_memory(2);
    for i in 0..4 {
        log.append("a", &format!("a{i}"), Json::Null);
    }
    log.append("b", "b0", Json::Null);
    let a = EventFilter::default().sandbox("a");
    let page = log.read(0, &a, 10);
    assert_eq!(kinds(&page), vec![(3, "a2"), (4, "a3")]);
    assert_eq!(page.gap, Some(EventGap { after: 0, up_to: 2 }));
    // A reader already past the dropped ones has no gap.
    assert_eq!(log.read(2, &a, 10).gap, None);
    // `b` lost nothing.
    let b = log.read(0, &EventFilter::default().sandbox("b"), 10);
    assert_eq!((kinds(&b), b.gap), (vec![(5, "b0")], None));
    // The node-wide stream reports the gap too.
    assert_eq!(
        log.read(0, &EventFilter::default(), 10).gap,
        Some(EventGap { after: 0, up_to: 2 })
    );
}

#[test]
fn filters_by_kind_and_limits_the_page() {
    let log = EventLog::in_memory(100);
    for kind in ["crash", "reload", "crash", "crash"] {
        log.append("a", kind, Json::Null);
    }
    let crashes = EventFilter::default().kind("crash");
    assert_eq!(
        kinds(&log.read(0, &crashes, 2)),
        vec![(1, "crash"), (3, "crash")]
    );
    assert_eq!(kinds(&log.read(3, &crashes, 2)), vec![(4, "crash")]);
    assert!(log
        .read(0, &EventFilter::default().sandbox("nope"), 10)
        .events
        .is_empty());
}

#[test]
fn deleted_sandboxes_beyond_the_cap_are_forgotten() {
    let log = EventLog::in_memory(10);
    for i in 0..=MAX_DELETED_KEPT {
        let id = format!("s{i}");
        log.append(&id, "x", Json::Null);
        log.sandbox_deleted(&id);
    }
    let first = log.read(0, &EventFilter::default().sandbox("s0"), 10);
    assert!(first.events.is_empty());
    assert_eq!(first.gap, Some(EventGap { after: 0, up_to: 1 }));
    let last = format!("s{MAX_DELETED_KEPT}");
    assert_eq!(
        log.read(0, &EventFilter::default().sandbox(last), 10)
            .events
            .len(),
        1
    );
}

#[test]
fn a_durable_log_survives_reopening_and_continues_the_numbers() {
    let dir = TempDir::new("log");
    let path = dir.db();
    {
        let store = Arc::new(Store::open(&path).expect("open"));
        let log = EventLog::durable(10, store.clone()).expect("log");
        log.append("a", "one", Json::Null);
        let held = log.reserve("a", "commit", serde_json::json!({ "v": 2 }));
        store
            .write(vec![EventLog::write_op(&held)])
            .expect("commit");
        log.publish(vec![held]);
        crate::block_on(log.settle());
        assert_eq!(log.read(0, &EventFilter::default(), 10).events.len(), 2);
        log.close();
        store.close();
    }
    let store = Arc::new(Store::open(&path).expect("reopen"));
    let log = EventLog::durable(10, store.clone()).expect("log");
    let page = log.read(0, &EventFilter::default(), 10);
    assert_eq!(kinds(&page), vec![(1, "one"), (2, "commit")]);
    assert_eq!(page.events[1].detail, serde_json::json!({ "v": 2 }));
    log.append("a", "three", Json::Null);
    crate::block_on(log.settle());
    assert_eq!(log.read(2, &EventFilter::default(), 10).events[0].seq, 3);
    log.close();
    store.close();
}

/// The bug this guards against: an event the store refused was shown
/// from memory with a number the next start gave to another event, and
/// a reader resuming from it missed that one without a gap.
#[test]
fn a_number_the_store_did_not_take_is_never_shown() {
    let dir = TempDir::new("ro");
    let path = dir.db();
    let all = EventFilter::default();
    {
        let store = Arc::new(Store::open(&path).expect("open"));
        let log = EventLog::durable(10, store.clone()).expect("log");
        log.append("a", "one", Json::Null);
        crate::block_on(log.settle());
        log.close();
        store.close();
    }
    {
        // Every write fails, as on a read-only or full disk.
        let store = Arc::new(Store::open_read_only(&path).expect("open read-only"));
        let log = EventLog::durable(10, store.clone()).expect("log");
        log.append("a", "unwritten", Json::Null);
        // Settles (the write was tried) without showing the event.
        crate::block_on(log.settle());
        assert_eq!(kinds(&log.read(0, &all, 10)), vec![(1, "one")]);
        assert_eq!(*log.subscribe().borrow(), 1);
        // A commit point that fails is not shown either, nor passed by
        // the watermark.
        let e = log.commit("a", Vec::new(), "commit", Json::Null);
        assert_eq!(e.map_err(|e| e.kind()), Err("storage_read_only"));
        assert_eq!(*log.subscribe().borrow(), 1);
        let nothing_new = EventPage {
            through: 1,
            ..EventPage::default()
        };
        assert_eq!(log.read(1, &all, 10), nothing_new);
        log.close();
        store.close();
    }
    let store = Arc::new(Store::open(&path).expect("reopen"));
    let log = EventLog::durable(10, store.clone()).expect("log");
    log.append("a", "two", Json::Null);
    crate::block_on(log.settle());
    // Number 2 was never shown, so it may go to this event; the reader
    // that saw 1 gets it.
    assert_eq!(kinds(&log.read(1, &all, 10)), vec![(2, "two")]);
    log.close();
    store.close();
}

#[test]
fn events_given_up_unwritten_are_a_gap_once_later_ones_show() {
    let log = EventLog::in_memory(10);
    let lost = log.reserve("a", "lost", Json::Null);
    let kept = log.reserve("b", "kept", Json::Null);
    log.write_failed([lost.seq, kept.seq].into_iter());
    let all = EventFilter::default();
    // Waiting: nothing shown, no gap yet (its number is not shown).
    assert_eq!(log.read(0, &all, 10), EventPage::default());
    crate::block_on(log.settle());
    log.write_abandoned(std::slice::from_ref(&lost));
    log.publish(vec![kept]);
    let page = log.read(0, &all, 10);
    assert_eq!(kinds(&page), vec![(2, "kept")]);
    assert_eq!(page.gap, Some(EventGap { after: 0, up_to: 1 }));
    // Also for a reader of `a` only, and none for one past it.
    let a = log.read(0, &EventFilter::default().sandbox("a"), 10);
    assert_eq!(a.gap, Some(EventGap { after: 0, up_to: 1 }));
    assert_eq!(log.read(1, &all, 10).gap, None);
}

#[test]
fn a_kind_filter_over_a_long_log_reads_in_bounded_steps_and_misses_nothing() {
    let log = EventLog::in_memory(100_000);
    let total = super::MAX_SCAN * 3 + 10;
    for i in 0..total {
        let kind = if i % 1000 == 999 { "crash" } else { "reload" };
        log.append("a", kind, Json::Null);
    }
    let crashes = EventFilter::default().kind("crash");
    // One read looks at no more than MAX_SCAN rejected events: it stops
    // before the end of the log and says how far it got.
    let first = log.read(0, &crashes, 1000);
    assert!(first.through < total as u64, "through {}", first.through);
    assert!(first.through >= super::MAX_SCAN as u64);
    // Resuming from `through` until the head finds every crash once, in order.
    let mut found = Vec::new();
    let mut pos = 0;
    let mut reads = 0;
    while pos < total as u64 {
        let page = log.read(pos, &crashes, 1000);
        assert!(page.through > pos, "no progress from {pos}");
        found.extend(page.events.iter().map(|e| e.seq));
        pos = page.through;
        reads += 1;
    }
    let expected: Vec<u64> = (1..=total as u64).filter(|s| s % 1000 == 0).collect();
    assert_eq!(found, expected);
    // Each read passes over at most MAX_SCAN rejected events.
    let rejected = total - expected.len();
    assert!(reads >= rejected.div_ceil(super::MAX_SCAN), "{reads} reads");
    // The same through one sandbox's own numbers.
    let in_a = EventFilter::default().sandbox("a").kind("crash");
    let page = log.read(0, &in_a, 1000);
    assert!(page.through < total as u64);
    // A full page resumes after its last event, an empty limit nowhere.
    let two = log.read(0, &crashes, 2);
    assert_eq!(two.through, 2000);
    assert_eq!(log.read(5, &crashes, 0).through, 5);
}

#[test]
fn the_visible_watermark_never_goes_back_when_threads_log_at_once() {
    let log = EventLog::in_memory(1_000_000);
    let mut rx = log.subscribe();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = 0;
            let mut steps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let v = *rx.borrow_and_update();
                assert!(v >= seen, "watermark went from {seen} back to {v}");
                seen = v;
                steps += 1;
            }
            steps
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for _ in 0..5_000 {
                    log.append(&format!("s{t}"), "reload", Json::Null);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(watcher.join().expect("no step back") > 0);
    assert_eq!(*log.subscribe().borrow(), 20_000);
}

/// A real store that refuses every write (another connection holds the
/// database's write lock, as a backup or the `sqlite3` shell can): events
/// wait unseen, at most [`MAX_UNWRITTEN`] of them; the oldest beyond are
/// dropped, and once the store takes writes again readers see the rest
/// and a gap for the dropped ones, in memory and on disk alike.
#[test]
fn more_events_than_may_wait_for_a_refusing_store_are_dropped_as_a_gap() {
    let dir = TempDir::new("unwritten");
    let path = dir.db();
    let opts = crate::store::StoreOptions {
        busy_timeout: std::time::Duration::from_millis(20),
        max_events_per_sandbox: 100_000,
        ..Default::default()
    };
    let store = Arc::new(Store::open_with(&path, opts.clone()).expect("open"));
    let log = EventLog::durable(100_000, store.clone()).expect("log");
    let blocker = rusqlite::Connection::open(&path).expect("second connection");
    blocker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    let total = (MAX_UNWRITTEN + 3_000) as u64;
    for i in 0..total {
        log.append("a", "tick", Json::from(i));
    }
    // Nothing is shown while the store refuses.
    assert!(log.read(0, &EventFilter::default(), 10).events.is_empty());
    // Let the pump fail with the whole backlog at least once (its backoff
    // is at most RETRY_MAX), then give the store back.
    std::thread::sleep(RETRY_MAX * 2 + std::time::Duration::from_millis(500));
    blocker.execute_batch("COMMIT").expect("release the lock");
    drop(blocker);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let dropped = total - MAX_UNWRITTEN as u64;
    loop {
        let page = log.read(0, &EventFilter::default(), 1);
        if page.events.first().is_some_and(|e| e.seq > 0)
            && log.read(total - 1, &EventFilter::default(), 1).events.len() == 1
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting events were never shown"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let page = log.read(0, &EventFilter::default(), MAX_UNWRITTEN + 10);
    assert_eq!(
        page.gap,
        Some(EventGap {
            after: 0,
            up_to: dropped
        })
    );
    assert_eq!(page.events.len(), MAX_UNWRITTEN);
    assert_eq!(page.events.first().map(|e| e.seq), Some(dropped + 1));
    assert_eq!(page.events.last().map(|e| e.seq), Some(total));
    // On disk: the same events, none of the dropped ones.
    let stored = store.events_since(0, None, usize::MAX).expect("read back");
    assert_eq!(stored.len(), MAX_UNWRITTEN);
    assert_eq!(stored.first().map(|r| r.seq), Some(dropped + 1));
    // And the log goes on: a new event is written and shown.
    log.append("a", "after", Json::Null);
    log.append("b", "first", Json::Null);
    crate::block_on(log.settle());
    assert_eq!(
        kinds(&log.read(total, &EventFilter::default(), 10)),
        vec![(total + 1, "after"), (total + 2, "first")]
    );
    log.close();
    store.close();
    // After a restart the dropped events are still `a`'s gap, and only
    // `a`'s: `b`, which lost nothing, is told of no gap.
    let store = Arc::new(Store::open_with(&path, opts).expect("reopen"));
    let log = EventLog::durable(100_000, store.clone()).expect("log");
    let page = log.read(0, &sandbox_filter("a"), 1);
    assert_eq!(
        page.gap,
        Some(EventGap {
            after: 0,
            up_to: dropped
        })
    );
    assert_eq!(page.events.first().map(|e| e.seq), Some(dropped + 1));
    let page = log.read(0, &sandbox_filter("b"), 10);
    assert_eq!(page.gap, None, "b lost nothing");
    assert_eq!(kinds(&page), vec![(total + 2, "first")]);
    log.close();
    store.close();
}

fn sandbox_filter(id: &str) -> EventFilter {
    EventFilter {
        sandbox: Some(id.to_owned()),
        ..EventFilter::default()
    }
}

/// A store that keeps 3 events per sandbox.
fn three_per_sandbox(path: &std::path::Path) -> (Arc<Store>, Arc<EventLog>) {
    let opts = crate::store::StoreOptions {
        max_events_per_sandbox: 3,
        ..Default::default()
    };
    let store = Arc::new(Store::open_with(path, opts).expect("open"));
    let log = EventLog::durable(3, store.clone()).expect("log");
    (store, log)
}

/// Logs `a` ×10 then `b` ×2 into a store that keeps 3 events per sandbox,
/// so `a` loses 1..=7 and `b` nothing; returns the store's directory.
fn log_a_then_b(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let (store, log) = three_per_sandbox(&dir.db());
    for _ in 0..10 {
        log.append("a", "tick", Json::Null);
    }
    log.append("b", "tick", Json::Null);
    log.append("b", "tock", Json::Null);
    crate::block_on(log.settle());
    log.close();
    store.close();
    dir
}

/// The bug this guards against: after a restart, a reader of one sandbox
/// was told of a gap made of another sandbox's pruned events.
#[test]
fn after_a_restart_each_sandbox_is_told_of_its_own_gaps_only() {
    let dir = log_a_then_b("own-gaps");
    let (store, log) = three_per_sandbox(&dir.db());
    let page = log.read(0, &sandbox_filter("b"), 10);
    assert_eq!(page.gap, None, "b lost nothing");
    assert_eq!(kinds(&page), vec![(11, "tick"), (12, "tock")]);
    let page = log.read(0, &sandbox_filter("a"), 10);
    assert_eq!(page.gap, Some(EventGap { after: 0, up_to: 7 }));
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [8, 9, 10]
    );
    // A reader of every sandbox lost `a`'s 1..=7 too; one past them, nothing.
    let all = log.read(0, &EventFilter::default(), 10);
    assert_eq!(all.gap, Some(EventGap { after: 0, up_to: 7 }));
    assert_eq!(log.read(7, &sandbox_filter("a"), 10).gap, None);
    // A deleted sandbox's record goes with its events.
    store
        .write(vec![crate::store::WriteOp::DeleteEvents {
            sandbox: "a".into(),
        }])
        .expect("delete a's events");
    assert!(!store.event_gaps().expect("gaps").through.contains_key("a"));
    log.close();
    store.close();
}

/// The migration: a schema-1 file with events is taken forward, and each
/// sandbox's gap starts where that Graft would have put it (the highest
/// missing number below its oldest kept event); later numbers are exact.
#[test]
fn the_gap_migration_seeds_each_sandbox_as_the_old_graft_told_it() {
    let dir = TempDir::new("v1");
    let path = dir.db();
    let v1 = &crate::store::schema::MIGRATIONS[..1];
    let store = Store::open_inner(&path, Default::default(), v1, true, None).expect("v1");
    store.close();
    {
        // What a schema-1 node left: a kept 5..=6 (1..=4 pruned), b kept 9
        // (7..=8 pruned), c kept 10, the node's own event 11.
        let conn = rusqlite::Connection::open(&path).expect("raw");
        conn.execute_batch(
            "INSERT INTO events (seq, sandbox, kind, payload, at_ms) VALUES
               (5, 'a', 'tick', 'null', 0), (6, 'a', 'tick', 'null', 0),
               (9, 'b', 'tick', 'null', 0), (10, 'c', 'tick', 'null', 0),
               (11, NULL, 'node', 'null', 0);",
        )
        .expect("old events");
    }
    let (store, log) = three_per_sandbox(&path);
    let gaps = store.event_gaps().expect("gaps");
    assert_eq!(gaps.through.get("a"), Some(&4));
    assert_eq!(gaps.through.get("b"), Some(&8));
    assert_eq!(
        gaps.through.get("c"),
        Some(&8),
        "c's oldest is above b's pruned numbers: the old Graft told c of them"
    );
    assert_eq!(gaps.through.len(), 3);
    assert_eq!(
        log.read(0, &sandbox_filter("a"), 10).gap,
        Some(EventGap { after: 0, up_to: 4 })
    );
    // A sandbox that starts after the migration is told of nothing.
    log.append("d", "tick", Json::Null);
    crate::block_on(log.settle());
    log.close();
    store.close();
    let (store, log) = three_per_sandbox(&path);
    assert_eq!(log.read(0, &sandbox_filter("d"), 10).gap, None);
    log.close();
    store.close();
}

/// Events the pump gave up unwritten are a gap of their sandbox on disk
/// before any later event shows, also one a commit point writes itself:
/// a `kill -9` right after the commit leaves the gap recorded. (Before,
/// only the pump's next write carried it: a reader of `a` at 2 was told
/// nothing after a restart, and silently missed 3..=4.)
#[test]
fn a_gap_given_up_unwritten_is_on_disk_before_a_commit_shows_past_it() {
    let dir = TempDir::new("lost-commit");
    let path = dir.db();
    let store = Arc::new(Store::open(&path).expect("open"));
    let log = EventLog::durable(100, store.clone()).expect("log");
    log.append("a", "tick", Json::Null);
    log.append("a", "tick", Json::Null);
    crate::block_on(log.settle());
    // What the pump does when more than MAX_UNWRITTEN wait for a store
    // that refuses them: the oldest are given up.
    let lost = [
        log.reserve("a", "lost", Json::Null),
        log.reserve("a", "lost", Json::Null),
    ];
    log.write_abandoned(&lost);
    let seq = log
        .commit("b", Vec::new(), "created", Json::Null)
        .expect("the store takes the commit");
    assert_eq!(seq, 5);
    let gap = Some(EventGap { after: 2, up_to: 4 });
    assert_eq!(log.read(2, &sandbox_filter("a"), 10).gap, gap);
    assert_eq!(
        store.event_gaps().expect("gaps").through.get("a"),
        Some(&4),
        "on disk with the commit that shows past it"
    );
    log.close();
    store.close();
    let store = Arc::new(Store::open(&path).expect("reopen"));
    let log = EventLog::durable(100, store.clone()).expect("log");
    assert_eq!(log.read(2, &sandbox_filter("a"), 10).gap, gap);
    log.close();
    store.close();
}

/// A sandbox whose only recorded loss is events never written (it has no
/// kept event) keeps its gap after a restart, also once it logs again, as
/// it did before the restart. (Before: restored buckets came only from
/// kept events, so its next event opened a bucket with no gap, and a
/// reader of it from before the lost events skipped them silently.)
#[test]
fn a_recorded_gap_without_kept_events_survives_a_restart() {
    let dir = TempDir::new("bare-gap");
    let path = dir.db();
    let store = Arc::new(Store::open(&path).expect("open"));
    let event = |seq: u64, sandbox: &str| {
        WriteOp::AppendEvent(crate::store::NewEvent {
            seq: Some(seq),
            sandbox: Some(sandbox.into()),
            kind: "tick".into(),
            payload_json: "null".into(),
            at_ms: 0.0,
        })
    };
    // `x`'s event 2 was given up unwritten; the gap rode on `b`'s write.
    store.write(vec![event(1, "b")]).expect("b");
    store
        .write(vec![
            event(3, "b"),
            WriteOp::MarkEventGap {
                sandbox: "x".into(),
                through: 2,
            },
        ])
        .expect("b and x's gap");
    store.close();
    let store = Arc::new(Store::open(&path).expect("reopen"));
    let log = EventLog::durable(100, store.clone()).expect("log");
    let gap = Some(EventGap { after: 1, up_to: 2 });
    assert_eq!(log.read(1, &sandbox_filter("x"), 10).gap, gap);
    log.append("x", "tick", Json::Null);
    crate::block_on(log.settle());
    let page = log.read(1, &sandbox_filter("x"), 10);
    assert_eq!(page.gap, gap, "x's loss is still told");
    assert_eq!(kinds(&page), vec![(4, "tick")]);
    log.close();
    store.close();
}
