//! Unit tests of the store, one file per topic: the tables' rows
//! (`tables`), module versions (`versions`), the writer's commits
//! (`commit`), the schema (`schema_checks`) and the file system (`disk`). This file
//! holds what they share: a temporary directory and record builders.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::schema::{Migration, MIGRATIONS};
use super::*;

mod commit;
mod disk;
mod schema_checks;
mod tables;
mod versions;

/// A fresh directory under the system's temp directory, removed on drop
/// (with its permissions restored first, for the read-only test).
/// A fresh directory for a test's database, removed when dropped (also
/// when the test fails).
pub(crate) struct TempDir(PathBuf);
impl TempDir {
    pub(crate) fn new(name: &str) -> TempDir {
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
    pub(crate) fn db(&self) -> PathBuf {
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

/// Checkpoint rows `from..to` of sandbox `s`, as one write.
pub(crate) fn checkpoint_rows(from: u32, to: u32) -> WriteOp {
    WriteOp::PutCheckpoints {
        sandbox: "s".into(),
        rows: (from..to)
            .map(|i| CheckpointRecord {
                name: format!("p{i}"),
                module: "m".into(),
                module_version: 1,
                state_json: format!("{{\"i\":{i}}}"),
                at_ms: 1.0,
            })
            .collect(),
        removed: vec![],
    }
}

fn put_sandbox(store: &Store, id: &str) {
    store.write(vec![WriteOp::PutSandbox(sandbox(id))]).unwrap();
}
