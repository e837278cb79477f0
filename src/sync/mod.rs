//! Coroutine synchronisation, as QEMU's `util/qemu-coroutine-lock.c` and
//! `util/qemu-coroutine-sleep.c`.
//!
//! Every wait here is a loop on the waiter's own grant state: a coroutine
//! can be resumed by something it was not waiting for (a stale waker, a
//! remote wake), and such a resumption never hands out a lock or ends a
//! wait. A waiting coroutine that is unwound (its last handle dropped, its
//! context shut down) leaves the queue in `Drop`; if it had just been
//! handed the lock, it passes the lock on.
//!
//! The primitives are `Send + Sync` and hand off to waiters on other
//! threads, which are woken in their home AioContext. Their guards are
//! `!Send`: a coroutine never changes thread while holding one.

mod mutex;
mod queue;
mod rwlock;
mod sleep;
pub(crate) mod waitq;

pub use mutex::{CoMutex, CoMutexGuard, CoMutexLockFuture};
pub use queue::{CoLockable, CoQueue};
pub use rwlock::{CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard};
pub use sleep::CoSleep;
