//! Rows that commit in the same transaction as an operation's effect.
//!
//! A caller that must record an operation (the HTTP API's audit log) hands
//! the operation an [`Attached`] holding write operations for one store. The
//! operation's durable commit (a sandbox's creation or deletion, a reload's
//! or rollback's commit point) takes them into its own submission, so the
//! rows and the effect commit together or not at all: a crash can never
//! leave an effect without its row, nor a row for an effect that did not
//! commit. The library knows nothing of HTTP: the operations are plain
//! [`WriteOp`]s.
//!
//! Invariants:
//! * The operations are taken at most once, and only by a commit to the
//!   store they were made for (another store's commit leaves them).
//! * [`Attached::applied`] is `Some` only after the transaction that held
//!   them committed; a failed commit leaves it `None` (the operations are
//!   gone with the transaction, so the caller knows nothing of them reached
//!   the disk).

use std::sync::Arc;

use parking_lot::Mutex;

use super::{Applied, Store, WriteOp};

/// Write operations to commit with an operation's effect (see the module
/// doc). Cheap to clone: clones share one slot.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use graft::store::{Attached, AuditRecord, WriteOp};
/// let node = graft::Node::builder().ephemeral().open()?;
/// let store = node.store().expect("an ephemeral node has a store").clone();
/// let row = AuditRecord {
///     id: 0, at_ms: 1.7e12, token_id: None, role: None, method: "cli".into(),
///     route: "create".into(), sandbox: Some("s".into()), outcome: "ok".into(),
///     status: None, duration_us: 0,
/// };
/// let attached = Attached::new(&store, vec![WriteOp::AppendAudit(row)]);
/// let spec = graft::SandboxSpec::new("s").entry(None).module("m", "return {}");
/// graft::block_on(node.create_sandbox_attached(spec, Default::default(), &attached))?;
/// // The row committed in the creation's transaction.
/// assert!(matches!(attached.applied().as_deref(), Some([graft::store::Applied::Audit { .. }])));
/// # node.shutdown();
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Attached {
    inner: Arc<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The store the operations belong to (its address; never dereferenced).
    store: usize,
    ops: Mutex<Option<Vec<WriteOp>>>,
    applied: Mutex<Option<Vec<Applied>>>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("taken", &self.inner.ops.lock().is_none())
            .field("committed", &self.inner.applied.lock().is_some())
            .finish()
    }
}

impl Attached {
    /// Operations to commit with an effect written to `store`.
    pub fn new(store: &Arc<Store>, ops: Vec<WriteOp>) -> Attached {
        Attached {
            inner: Arc::new(Slot {
                store: Arc::as_ptr(store) as usize,
                ops: Mutex::new(Some(ops)),
                applied: Mutex::new(None),
            }),
        }
    }

    /// Takes the operations for a commit to `store`, if they are for it and
    /// not taken yet. The committer must call [`Attached::committed`] once
    /// its transaction committed.
    pub fn take_for(&self, store: &Arc<Store>) -> Option<Vec<WriteOp>> {
        if self.inner.store != Arc::as_ptr(store) as usize {
            return None;
        }
        self.inner.ops.lock().take()
    }

    /// Records what the taken operations produced, after their commit.
    pub fn committed(&self, applied: Vec<Applied>) {
        *self.inner.applied.lock() = Some(applied);
    }

    /// What the operations produced, once committed with an effect
    /// (`None`: no effect took them, or its commit failed).
    pub fn applied(&self) -> Option<Vec<Applied>> {
        self.inner.applied.lock().clone()
    }

    /// Whether a commit took the operations (whether or not it succeeded).
    pub fn is_taken(&self) -> bool {
        self.inner.ops.lock().is_none()
    }
}

/// Commits `ops` with the operations of `attached` (if any, and for this
/// store) in one submission, and records what those produced.
pub(crate) fn write_with(
    store: &Arc<Store>,
    mut ops: Vec<WriteOp>,
    attached: Option<&Attached>,
) -> super::StoreResult<super::Receipt> {
    let extra = attached.and_then(|a| a.take_for(store));
    let at = ops.len();
    let n = extra.as_ref().map_or(0, Vec::len);
    if let Some(x) = extra {
        ops.extend(x);
    }
    let receipt = store.write(ops)?;
    if let (Some(a), true) = (attached, n > 0) {
        a.committed(receipt.applied.get(at..at + n).unwrap_or_default().to_vec());
    }
    Ok(receipt)
}

impl Store {
    /// [`Store::write`] with the operations of `attached` (when they are for
    /// this store) in the same transaction; see [`Attached`].
    pub fn write_attached(
        self: &Arc<Self>,
        ops: Vec<WriteOp>,
        attached: Option<&Attached>,
    ) -> super::StoreResult<super::Receipt> {
        write_with(self, ops, attached)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditRecord;

    fn row(outcome: &str) -> WriteOp {
        WriteOp::AppendAudit(AuditRecord {
            id: 0,
            at_ms: 1.7e12,
            token_id: None,
            role: None,
            method: "POST".into(),
            route: "/test".into(),
            sandbox: None,
            outcome: outcome.into(),
            status: Some(200),
            duration_us: 0,
        })
    }

    #[test]
    fn attached_rows_commit_with_the_effect_or_not_at_all() {
        let store = Arc::new(Store::in_memory().unwrap());
        let other = Arc::new(Store::in_memory().unwrap());
        // Made for another store: left untaken.
        let elsewhere = Attached::new(&other, vec![row("elsewhere")]);
        store
            .write_attached(vec![row("effect")], Some(&elsewhere))
            .unwrap();
        assert!(!elsewhere.is_taken() && elsewhere.applied().is_none());
        // Committed together: the receipt of the attached part is kept.
        let together = Attached::new(&store, vec![row("attached")]);
        store
            .write_attached(vec![row("effect")], Some(&together))
            .unwrap();
        assert!(matches!(
            together.applied().as_deref(),
            Some([Applied::Audit { .. }])
        ));
        // An effect that fails takes its attached rows down with it.
        let failing = Attached::new(&store, vec![row("must not stay")]);
        let err = store.write_attached(
            vec![WriteOp::FinishAudit {
                id: 999_999,
                outcome: "ok".into(),
                status: None,
                duration_us: 0,
                token_id: None,
                role: None,
            }],
            Some(&failing),
        );
        assert!(err.is_err());
        assert!(failing.is_taken() && failing.applied().is_none());
        let outcomes: Vec<String> = store
            .audit(None, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        assert_eq!(outcomes, ["attached", "effect", "effect"]);
        // Taken once only.
        assert!(together.take_for(&store).is_none());
    }

    #[test]
    fn lazy_writes_commit_alone_after_a_while_or_with_the_next_write() {
        let store = Store::in_memory().unwrap();
        let lazy = store.write_lazy(vec![row("lazy")]);
        // Alone, it still commits (within LAZY_WAIT).
        crate::block_on(lazy).unwrap();
        // With a waited-on write right behind it, both commit.
        let lazy = store.write_lazy(vec![row("lazy 2")]);
        store.write(vec![row("waited")]).unwrap();
        crate::block_on(lazy).unwrap();
        let outcomes: Vec<String> = store
            .audit(None, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        assert_eq!(outcomes, ["waited", "lazy 2", "lazy"]);
    }
}
