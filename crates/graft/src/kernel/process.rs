//! Process records and the jobs a process runs.
//!
//! A process is a plain Rust record plus one entry in the VM's state table. It
//! holds a Luau thread only while a callback is suspended (waiting for a call
//! reply, a spawned child or a preempted time slice), so an idle process costs
//! a few hundred bytes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use mlua::RegistryKey;
use serde_json::Value as Json;

use crate::error::Error;
use crate::value::{ExitReason, VmPid};

/// The sending half of a host request's answer.
pub(crate) type HostReply = tokio::sync::oneshot::Sender<Result<Json, Error>>;

/// Where a host waits for its answer. The slot is emptied by the first of
/// reply, timeout or failure, so an answer is given exactly once.
pub(crate) struct HostSlot {
    reply: Mutex<Option<HostReply>>,
    /// The id of the timer that times this request out (0: none), cancelled
    /// by the reply so that answered calls leave no timer data behind.
    timer: AtomicU64,
}

impl HostSlot {
    pub fn new(tx: HostReply) -> Arc<HostSlot> {
        Arc::new(HostSlot {
            reply: Mutex::new(Some(tx)),
            timer: AtomicU64::new(0),
        })
    }
    /// Records the id of this request's timeout timer.
    pub fn set_timer(&self, id: u64) {
        self.timer.store(id, Ordering::Relaxed);
    }
    /// The id of this request's timeout timer (0: none).
    pub fn timer(&self) -> u64 {
        self.timer.load(Ordering::Relaxed)
    }
    /// Answers if nobody answered yet; returns whether this call answered.
    pub fn answer(&self, r: Result<Json, Error>) -> bool {
        match self.reply.lock().take() {
            Some(tx) => {
                let _ = tx.send(r);
                true
            }
            None => false,
        }
    }
    pub fn is_answered(&self) -> bool {
        self.reply.lock().is_none()
    }
}

/// Who waits for the outcome of a job.
pub(crate) enum Waiter {
    Host(Arc<HostSlot>),
    /// A process suspended in `graft.call`/`graft.spawn` with this token.
    Process {
        serial: u64,
        token: u64,
    },
}

/// Work a process does, one callback each.
///
/// A payload (`args`, `request`) is `None` when the job runs nested and the
/// prelude hands the value to the callback itself: it never leaves the VM.
pub(crate) enum Job {
    Init {
        args: Option<RegistryKey>,
        waiter: Waiter,
    },
    Call {
        request: Option<RegistryKey>,
        from: Option<VmPid>,
        waiter: Waiter,
    },
    Cast(RegistryKey),
    Info(RegistryKey),
    /// Boxed: a reason is large and rare, and every job in every mailbox
    /// would otherwise be as large.
    Terminate(Box<ExitReason>),
    Eval {
        chunk: RegistryKey,
        waiter: Waiter,
    },
}

/// The prelude's job code of a call (`OP_CALL` in `prelude.luau`).
pub(crate) const OP_CALL: u8 = 2;

/// The prelude's job code of a host's call whose module is given by its
/// index in the prelude's `MODS` mirror (+1), not as the table
/// (`OP_CALL_AT` in `prelude.luau`): handing a table over from Rust costs a
/// reference and its release, each under the VM's lock.
pub(crate) const OP_CALL_AT: u8 = 8;

impl Job {
    /// The prelude's job code (`OP_*` in `prelude.luau`).
    pub fn op(&self) -> u8 {
        match self {
            Job::Init { .. } => 1,
            Job::Call { .. } => OP_CALL,
            Job::Cast(_) => 3,
            Job::Info(_) => 4,
            Job::Terminate(_) => 5,
            Job::Eval { .. } => 6,
        }
    }
}

/// What a process is doing right now.
pub(crate) enum Run {
    /// Between callbacks.
    Idle,
    /// Its callback is on the VM stack.
    Running,
    /// Its callback waits for `token` (a reply, a child's init, a shutdown).
    Suspended { thread: RegistryKey, token: u64 },
    /// Its callback can continue: with `(ok, value)` or, after preemption, with nothing.
    Resumable {
        thread: RegistryKey,
        resume: Option<(bool, RegistryKey)>,
    },
}

pub(crate) struct Process {
    pub pid: VmPid,
    pub name: Option<Box<str>>,
    pub mailbox: VecDeque<Job>,
    /// Init or terminate: runs before anything in the mailbox.
    pub system: Option<Box<Job>>,
    /// The job whose callback is running or suspended.
    pub job: Option<Job>,
    pub run: Run,
    /// Links, monitors and waiters: allocated on first use.
    pub relations: Option<Box<Relations>>,
    pub trap_exit: bool,
    pub queued: bool,
    /// An exit decided while the process's own callback was on the stack.
    pub exit_pending: Option<Box<ExitReason>>,
    /// Set once the process is terminating: the reason it will exit with.
    pub dying: Option<Box<ExitReason>>,
    pub parent: Option<u64>,
    /// The module version this process's state belongs to.
    pub version: u32,
    /// Milliseconds of CPU its current callback used before it was suspended.
    pub used_ms: u32,
    /// Milliseconds that callbacks nested in its current stretch of running
    /// took: not its own time, so not charged to its `handler_ms`.
    pub nested_ms: u32,
    pub messages_handled: u32,
    /// An answer that arrived before the callback suspended on its token (the
    /// callback was preempted between asking and waiting).
    pub parked: Option<Box<(u64, bool, RegistryKey)>>,
}

/// What ties a process to others. Most processes have none of it, so it
/// lives behind one pointer, allocated on first use: the record of an idle
/// process stays small (it is what a spawn allocates and what a million
/// idle processes keep).
#[derive(Default)]
pub(crate) struct Relations {
    pub links: Vec<u64>,
    /// (monitor ref, watcher serial) of the monitors on this process.
    pub monitored_by: Vec<(u64, u64)>,
    /// Processes suspended in a shutdown of this one: (serial, token).
    pub shutdown_waiters: Vec<(u64, u64)>,
    /// Callers whose request crashed this process: answered when it is gone.
    pub crashed_callers: Vec<Waiter>,
}

impl Process {
    pub fn new(pid: VmPid, parent: Option<u64>, version: u32) -> Process {
        Process {
            pid,
            name: None,
            mailbox: VecDeque::new(),
            system: None,
            job: None,
            run: Run::Idle,
            relations: None,
            trap_exit: false,
            queued: false,
            exit_pending: None,
            dying: None,
            parent,
            version,
            used_ms: 0,
            nested_ms: 0,
            messages_handled: 0,
            parked: None,
        }
    }

    /// Its links (none if it never had any).
    pub fn links(&self) -> &[u64] {
        self.relations.as_deref().map_or(&[], |r| &r.links)
    }

    /// Removes its link to `other`, if any.
    pub fn unlink(&mut self, other: u64) {
        if let Some(r) = self.relations.as_mut() {
            r.links.retain(|s| *s != other);
        }
    }

    /// Its relations, allocated now if it had none.
    pub fn relations_mut(&mut self) -> &mut Relations {
        self.relations.get_or_insert_with(Box::default)
    }

    /// Starts `job` now: the process is running it, with a fresh CPU
    /// charge, as a job taken from its mailbox would be.
    pub fn begin_job(&mut self, job: Job) {
        self.job = Some(job);
        self.run = Run::Running;
        self.used_ms = 0;
        self.nested_ms = 0;
        self.messages_handled += 1;
    }

    /// Charges the `elapsed` ms of a stretch it ran, minus what callbacks
    /// nested in it took meanwhile (theirs, not its own).
    pub fn charge(&mut self, elapsed: u32) {
        let own = elapsed.saturating_sub(std::mem::take(&mut self.nested_ms));
        self.used_ms = self.used_ms.saturating_add(own);
    }

    /// Whether a job can start on it at once (nested in its caller): idle,
    /// nothing queued before, not exiting.
    pub fn takes_job_now(&self) -> bool {
        matches!(self.run, Run::Idle)
            && self.job.is_none()
            && self.dying.is_none()
            && self.system.is_none()
            && self.mailbox.is_empty()
    }

    /// Marks it queued when it has work and is not queued yet; returns
    /// whether the caller must put it on the ready queue.
    pub fn mark_queued(&mut self) -> bool {
        let has_work = match self.run {
            Run::Idle => self.system.is_some() || !self.mailbox.is_empty(),
            Run::Resumable { .. } => true,
            Run::Running | Run::Suspended { .. } => false,
        };
        let queue = !self.queued && has_work;
        self.queued |= queue;
        queue
    }

    /// `running`, `waiting`, `runnable`, `idle` or `exiting`, as the API shows it.
    pub fn status(&self) -> &'static str {
        if self.dying.is_some() {
            return "exiting";
        }
        match self.run {
            Run::Running => "running",
            Run::Suspended { .. } => "waiting",
            Run::Resumable { .. } => "runnable",
            Run::Idle if self.system.is_some() || !self.mailbox.is_empty() => "runnable",
            Run::Idle => "idle",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spawn allocates one record and an idle process keeps it: its size is
    /// the kernel's share of memory per process (relations and large exit
    /// reasons are boxed to keep it so).
    #[test]
    fn an_idle_process_record_stays_small() {
        assert!(
            std::mem::size_of::<Process>() <= 240,
            "{}",
            std::mem::size_of::<Process>()
        );
        assert!(
            std::mem::size_of::<Job>() <= 56,
            "{}",
            std::mem::size_of::<Job>()
        );
        let p = Process::new(VmPid::new(0, 1), None, 1);
        assert!(p.relations.is_none() && p.links().is_empty());
    }

    #[test]
    fn relations_are_allocated_on_first_use_and_unlink_removes_one_link() {
        let mut p = Process::new(VmPid::new(0, 1), None, 1);
        p.unlink(7);
        assert!(p.relations.is_none(), "unlinking nothing allocates nothing");
        p.relations_mut().links.extend([7, 8]);
        p.unlink(7);
        assert_eq!(p.links(), &[8]);
    }
}
