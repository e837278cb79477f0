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
    inner: Option<(Rc<DeadlineState>, Timer)>,
}

struct DeadlineState {
    expired: Cell<bool>,
    /// The wait is over: a late drop of the timer's callback wakes nobody.
    done: Cell<bool>,
}

/// Moved into the timer's callback: expires the wait when the callback
/// runs, and also when it is dropped unrun (the context shut down and
/// dropped its timers' callbacks), so the waiter always learns.
struct Expire {
    st: Rc<DeadlineState>,
    waiter: crate::coroutine::RemoteCoroutine,
}

impl Expire {
    fn fire(&self) {
        if !self.st.done.get() && !self.st.expired.replace(true) {
            self.waiter.wake();
        }
    }
}

impl Drop for Expire {
    fn drop(&mut self) {
        self.fire();
    }
}

impl Deadline {
    /// # Panics
    ///
    /// Outside a coroutine, or in one without an AioContext (`api` named).
    #[track_caller]
    #[inline]
    pub(crate) fn after(d: Option<Duration>, api: &str) -> Deadline {
        match d {
            None => Deadline { inner: None },
            Some(d) => Deadline::timed(d, api),
        }
    }

    #[track_caller]
    #[cold]
    fn timed(d: Duration, api: &str) -> Deadline {
        let Some(me) = crate::Coroutine::current() else {
            panic!("{api} called outside a coroutine");
        };
        let Some(ctx) = me.aio_context().map(|c| c.internal()) else {
            panic!("{api}: the coroutine has no AioContext for its timer");
        };
        // A shut-down context arms no timer: nothing can time the wait, so
        // it has timed out (found by the API fuzzer: a `block_on` of a
        // shut-down context hung in a bounded wait).
        let st = Rc::new(DeadlineState {
            expired: Cell::new(ctx.inner.is_dead()),
            done: Cell::new(false),
        });
        let expire = Expire {
            st: st.clone(),
            waiter: me.remote(),
        };
        let timer = ctx.timer_new(ClockType::Realtime, move || expire.fire());
        timer.mod_after(d);
        Deadline {
            inner: Some((st, timer)),
        }
    }

    #[inline]
    pub(crate) fn expired(&self) -> bool {
        self.inner.as_ref().is_some_and(|(st, _)| st.expired.get())
    }
}

impl Drop for Deadline {
    #[inline]
    fn drop(&mut self) {
        if self.inner.is_some() {
            self.disarm();
        }
    }
}

impl Deadline {
    #[cold]
    fn disarm(&mut self) {
        if let Some((st, timer)) = self.inner.take() {
            st.done.set(true);
            drop(timer);
        }
    }
}
