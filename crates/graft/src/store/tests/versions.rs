//! Module versions: the current and stable pointers, and replacing a whole
//! history atomically.

use super::*;

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
