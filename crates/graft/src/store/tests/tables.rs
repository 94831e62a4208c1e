//! Round trips of every table, and the rules each write enforces on its rows
//! (cascades, replacement by name, bad values refused, event pruning, the
//! audit log's queries).

use super::*;

/// One row of every table, as [`write_one_of_each`] wrote them.
struct Written {
    updated: SandboxRecord,
    v1: VersionRecord,
    v2: VersionRecord,
    cps: Vec<CheckpointRecord>,
    token: TokenRecord,
    audit: AuditRecord,
}

/// Writes a sandbox (then updates it), two versions with their pointers, an
/// event, two checkpoints, a token (revoked twice) and an audit row,
/// checking each receipt.
fn write_one_of_each(store: &Store) -> Written {
    put_sandbox(store, "demo");
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
    Written {
        updated,
        v1,
        v2,
        cps,
        token,
        audit,
    }
}

#[test]
fn every_table_round_trips() {
    let dir = TempDir::new("roundtrip");
    let store = Store::open(dir.db()).unwrap();
    let written = write_one_of_each(&store);
    drop(store);
    let store = Store::open(dir.db()).unwrap();
    sandbox_rows_come_back(&store, &written);
    token_and_audit_rows_come_back(&store, written);
}

fn sandbox_rows_come_back(store: &Store, w: &Written) {
    let Written {
        updated,
        v1,
        v2,
        cps,
        ..
    } = w;
    let (updated, v1, v2, cps) = (updated.clone(), v1.clone(), v2.clone(), cps.clone());
    // Everything comes back after a reopen.
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
}

fn token_and_audit_rows_come_back(store: &Store, w: Written) {
    let Written { token, audit, .. } = w;
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
