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
//!
//! # Timeouts
//!
//! Each wait has a bounded form, in the spirit of
//! `tokio::time::timeout` but built into the wait so that giving up is
//! exact: [`CoMutex::lock_timeout`], [`CoRwLock::read_timeout`],
//! [`CoRwLock::write_timeout`], [`CoQueue::wait_timeout`],
//! [`CoQueue::wait_unlocked_timeout`] and [`CoSleep::sleep_for`]. The
//! timeout is a timer of the coroutine's AioContext that wakes the waiter;
//! the wait loop then checks its grant first, so a grant that came in the
//! same pass is taken, never lost. A waiter that gives up leaves the queue
//! under the queue's lock, and if it was granted after its check (the
//! grant and the timer raced), it passes the grant to the next waiter, as
//! an unwound waiter does. Stray wakes do not end a bounded wait early.

mod mutex;
mod queue;
mod rwlock;
mod sleep;
pub(crate) mod waitq;

pub use mutex::{CoMutex, CoMutexGuard, CoMutexLockFuture};
pub use queue::{CoLockable, CoQueue};
pub use rwlock::{CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard};
pub use sleep::CoSleep;

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use crate::aio::{ClockType, Timer};

/// The timeout of a bounded wait: a timer of the current coroutine's
/// context that marks it expired and wakes the coroutine (a stray wake as
/// far as the wait's grant is concerned). No timer for `None`.
pub(crate) struct Deadline {
    /// `None` for an unbounded wait (no allocation, no timer).
    expired: Option<(Rc<Cell<bool>>, Timer)>,
}

impl Deadline {
    /// # Panics
    ///
    /// Outside a coroutine, or in one without an AioContext (`api` named).
    #[track_caller]
    pub(crate) fn after(d: Option<Duration>, api: &str) -> Deadline {
        let Some(d) = d else {
            return Deadline { expired: None };
        };
        let Some(me) = crate::Coroutine::current() else {
            panic!("{api} called outside a coroutine");
        };
        let Some(ctx) = me.aio_context().map(|c| c.internal()) else {
            panic!("{api}: the coroutine has no AioContext for its timer");
        };
        // A shut-down context arms no timer: the wait would never be
        // bounded (found by the API fuzzer: a `block_on` of a shut-down
        // context hung in a bounded wait). Nothing can time it: it has
        // timed out.
        let expired = Rc::new(Cell::new(ctx.inner.is_dead()));
        let (e, r) = (expired.clone(), me.remote());
        let timer = ctx.timer_new(ClockType::Realtime, move || {
            e.set(true);
            r.wake();
        });
        timer.mod_after(d);
        Deadline {
            expired: Some((expired, timer)),
        }
    }

    pub(crate) fn expired(&self) -> bool {
        self.expired.as_ref().is_some_and(|(e, _)| e.get())
    }
}
