//! [`KernelCell`]: the kernel's home, with a checked exclusive borrow that
//! costs no atomic read-modify-write.
//!
//! Why not a mutex: a host call borrows the kernel about ten times and a
//! nested call three or four; a `parking_lot` mutex pays two locked
//! instructions per borrow (lock and unlock), which measured at several
//! percent of a call. What the mutex bought was only the check that a
//! borrow is exclusive, never waiting: a VM is driven by one thread at a
//! time. This cell keeps that check with plain loads and stores.
//!
//! Invariants:
//! * **One driver.** The kernel is only touched by the thread driving its
//!   VM. Every handle on a kernel lives in that VM's app data, in the
//!   runtime that owns the VM, or, for the length of a slice, in the
//!   driving thread's `SLICE_KERNEL` (`fast`); a handle never leaves the
//!   runtime on its own. The runtime is driven under `Shared::runtime`'s
//!   lock (or owned outright, while it is built or torn down), whose
//!   release and acquire order one driver's accesses before the next's.
//! * **One borrow.** On the driving thread, a second borrow while one is
//!   live is refused ([`KernelCell::try_borrow`] gives `None`), as a
//!   `RefCell` would.
//! * In debug builds (the test suite) the flag is taken with an atomic swap,
//!   so a borrow overlapping one on another thread, which the first
//!   invariant rules out, is caught as a refusal (a panic in `borrow`)
//!   instead of going unnoticed.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::Kernel;

/// The kernel, its borrow flag, and the identity of its VM.
pub(crate) struct KernelCell {
    borrowed: AtomicBool,
    kernel: UnsafeCell<Kernel>,
    /// `fast::vm_identity` of the kernel's VM: what the raw natives compare
    /// a Luau thread against before they use a slice's cached handle.
    vm: usize,
}

// SAFETY: the kernel is reached only through `try_borrow`, whose flag makes
// borrows exclusive on the driving thread, and only by the one thread
// driving the VM at a time, with the runtime lock's happens-before between
// successive drivers (the module's "one driver" invariant). So no two
// threads ever access the `UnsafeCell` concurrently, and `Kernel: Send`
// lets it be used from whichever thread drives it.
unsafe impl Sync for KernelCell {}

impl KernelCell {
    pub(super) fn new(kernel: Kernel, vm: usize) -> KernelCell {
        KernelCell {
            borrowed: AtomicBool::new(false),
            kernel: UnsafeCell::new(kernel),
            vm,
        }
    }

    /// The identity of the kernel's VM (`fast::vm_identity`).
    #[inline]
    pub(super) fn vm(&self) -> usize {
        self.vm
    }

    /// Marks the kernel borrowed; false if it was already.
    #[inline]
    fn take_flag(&self) -> bool {
        if cfg!(debug_assertions) {
            !self.borrowed.swap(true, Ordering::Acquire)
        } else if self.borrowed.load(Ordering::Relaxed) {
            false
        } else {
            // A plain store: only the driving thread ever reaches here (the
            // module's invariant), so there is no other writer to race.
            self.borrowed.store(true, Ordering::Relaxed);
            true
        }
    }

    /// Borrows the kernel, or `None` if it is borrowed already.
    #[inline]
    pub(super) fn try_borrow(&self) -> Option<KernelRef<'_>> {
        self.take_flag().then_some(KernelRef { cell: self })
    }

    /// Like [`KernelCell::try_borrow`], keeping its own handle.
    #[inline]
    pub(super) fn try_borrow_arc(this: &Arc<KernelCell>) -> Option<KernelGuard> {
        this.take_flag().then(|| KernelGuard { cell: this.clone() })
    }

    #[inline]
    fn release(&self) {
        self.borrowed.store(false, Ordering::Release);
    }
}

/// A borrow of the kernel through a handle held elsewhere.
pub(crate) struct KernelRef<'a> {
    cell: &'a KernelCell,
}

/// A borrow of the kernel that keeps its own handle (what `kernel(lua)` gives).
pub(crate) struct KernelGuard {
    cell: Arc<KernelCell>,
}

macro_rules! kernel_borrow {
    ($guard:ty) => {
        impl Deref for $guard {
            type Target = Kernel;
            #[inline]
            fn deref(&self) -> &Kernel {
                // SAFETY: this guard holds the cell's flag, so it is the only
                // borrow (module invariants), and it lives no longer than the
                // cell (a reference or a handle on it).
                unsafe { &*self.cell.kernel.get() }
            }
        }

        impl DerefMut for $guard {
            #[inline]
            fn deref_mut(&mut self) -> &mut Kernel {
                // SAFETY: as in `deref`; `&mut self` makes this the only use
                // of the guard.
                unsafe { &mut *self.cell.kernel.get() }
            }
        }

        impl Drop for $guard {
            #[inline]
            fn drop(&mut self) {
                self.cell.release();
            }
        }
    };
}

kernel_borrow!(KernelRef<'_>);
kernel_borrow!(KernelGuard);
