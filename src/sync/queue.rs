//! `CoQueue`: coroutines waiting for a condition (QEMU's `CoQueue`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::mutex::{CoMutex, CoMutexGuard};
use super::rwlock::{CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard};
use super::waitq::{coroutine_waiter, recycle, WaitList, Waiter, WakeList};
use crate::loom::sync::Mutex;

/// A queue of coroutines waiting for something, usually guarded by a
/// [`CoMutex`] (QEMU's `CoQueue`, a condition variable for coroutines).
/// Wakes are FIFO. A woken coroutine runs after the waking coroutine
/// suspends (or at once, if woken from outside any coroutine); stray wakes
/// never end a wait early.
///
/// # Examples
///
/// ```
/// use coroloop::{sync::{CoMutex, CoQueue}, Coroutine};
/// use std::rc::Rc;
///
/// let state = Rc::new((CoMutex::new(false), CoQueue::new()));
/// let s = state.clone();
/// let waiter = Coroutine::new(move || {
///     let (m, q) = &*s;
///     let mut ready = m.lock();
///     while !*ready {
///         ready = q.wait(ready); // unlocks while waiting
///     }
///     "done"
/// });
/// waiter.enter();
/// *state.0.try_lock().unwrap() = true;
/// assert!(state.1.next()); // outside a coroutine: enters it now
/// assert_eq!(waiter.take_result(), Some("done"));
/// ```
#[derive(Default)]
pub struct CoQueue {
    waiters: Mutex<WaitList>,
}

impl CoQueue {
    /// An empty queue (QEMU's `qemu_co_queue_init`).
    #[doc(alias = "qemu_co_queue_init")]
    pub fn new() -> CoQueue {
        CoQueue {
            waiters: Mutex::new(WaitList::default()),
        }
    }

    fn enqueue(&self, api: &'static str) -> Arc<Waiter> {
        let w = coroutine_waiter(false, api);
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w.clone());
        w
    }

    /// Leaves the queue (an unwound coroutine, a dropped future); a waiter
    /// that had been woken already passes the wake-up on.
    fn cancel(&self, w: &Arc<Waiter>) {
        let removed = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(w);
        if !removed && w.is_granted() {
            self.next();
        }
    }

    fn wait_granted(&self, w: Arc<Waiter>, deadline: &super::Deadline) -> bool {
        struct Cancel<'a>(&'a CoQueue, Option<Arc<Waiter>>);
        impl Drop for Cancel<'_> {
            fn drop(&mut self) {
                if let Some(w) = self.1.take() {
                    self.0.cancel(&w);
                }
            }
        }
        let mut c = Cancel(self, Some(w));
        while !c.1.as_ref().unwrap().is_granted() {
            if deadline.expired() {
                return false; // `c` leaves the queue, passing on a late wake-up
            }
            crate::coroutine::suspend();
        }
        if let Some(w) = c.1.take() {
            recycle(w);
        }
        true
    }

    /// Releases `guard`'s lock, waits until woken by
    /// [`next`](Self::next) or [`restart_all`](Self::restart_all), and
    /// takes the lock again in the same mode (QEMU's `qemu_co_queue_wait`).
    /// `guard` may be any coroutine lock guard ([`CoLockable`]: a
    /// [`CoMutex`] guard, or a [`CoRwLock`] read or write guard).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "qemu_co_queue_wait")]
    #[track_caller]
    pub fn wait<'a, G: CoLockable<'a>>(&self, guard: G) -> G {
        let w = self.enqueue("CoQueue::wait");
        let lock = guard.release();
        self.wait_granted(w, &super::Deadline::after(None, "CoQueue::wait"));
        G::reacquire(lock)
    }

    /// [`wait`](Self::wait), giving up after `timeout`: returns the guard
    /// (the lock is always taken again, as `std::sync::Condvar::wait_timeout`
    /// does) and whether the wait timed out. A wake-up that raced with the
    /// timeout goes to the next waiter (see the
    /// [module docs](crate::sync#timeouts)).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or in one without an AioContext.
    #[track_caller]
    pub fn wait_timeout<'a, G: CoLockable<'a>>(&self, guard: G, timeout: Duration) -> (G, bool) {
        let deadline = super::Deadline::after(Some(timeout), "CoQueue::wait_timeout");
        let w = self.enqueue("CoQueue::wait_timeout");
        let lock = guard.release();
        let woken = self.wait_granted(w, &deadline);
        (G::reacquire(lock), !woken)
    }

    /// Waits until woken, without a lock (QEMU's `qemu_co_queue_wait(q,
    /// NULL)`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[track_caller]
    pub fn wait_unlocked(&self) {
        let w = self.enqueue("CoQueue::wait_unlocked");
        self.wait_granted(w, &super::Deadline::after(None, "CoQueue::wait_unlocked"));
    }

    /// [`wait_unlocked`](Self::wait_unlocked), giving up after `timeout`;
    /// returns whether it was woken (`false`: timed out).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or in one without an AioContext.
    #[track_caller]
    pub fn wait_unlocked_timeout(&self, timeout: Duration) -> bool {
        let deadline = super::Deadline::after(Some(timeout), "CoQueue::wait_unlocked_timeout");
        let w = self.enqueue("CoQueue::wait_unlocked_timeout");
        self.wait_granted(w, &deadline)
    }

    /// Async form of [`wait`](Self::wait) for a [`CoMutex`] guard, for
    /// async tasks: the task joins the same FIFO as coroutines. The lock
    /// is released at once (the task is queued first, so no wake-up is
    /// missed) and retaken with [`CoMutex::lock_async`] after the wake.
    /// Dropping the future leaves the queue (passing on a wake-up it had
    /// already received).
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::{aio::AioContext, sync::{CoMutex, CoQueue}};
    /// use std::rc::Rc;
    ///
    /// let ctx = AioContext::new()?;
    /// let st = Rc::new((CoMutex::new(false), CoQueue::new()));
    /// let s = st.clone();
    /// let waiter = ctx.spawn_local(async move {
    ///     let mut ready = s.0.lock_async().await;
    ///     while !*ready {
    ///         ready = s.1.wait_async(ready).await;
    ///     }
    /// });
    /// ctx.poll(false); // the task waits
    /// *st.0.try_lock().unwrap() = true;
    /// st.1.next();
    /// ctx.block_on(waiter);
    /// # std::io::Result::Ok(())
    /// ```
    pub fn wait_async<'a, T: ?Sized>(
        &'a self,
        guard: CoMutexGuard<'a, T>,
    ) -> impl std::future::Future<Output = CoMutexGuard<'a, T>> + 'a {
        let m: &'a CoMutex<T> = CoMutexGuard::mutex(&guard);
        let wait = QueueWait {
            q: self,
            w: Some(self.enqueue_task()),
        };
        drop(guard);
        async move {
            wait.await;
            m.lock_async().await
        }
    }

    /// Async form of [`wait_unlocked`](Self::wait_unlocked).
    pub fn wait_unlocked_async(&self) -> impl std::future::Future<Output = ()> + '_ {
        QueueWait {
            q: self,
            w: Some(self.enqueue_task()),
        }
    }

    fn enqueue_task(&self) -> Arc<Waiter> {
        let w = Waiter::new(false, super::waitq::wake_task(None));
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w.clone());
        w
    }

    /// Wakes the first waiter; returns whether there was one (QEMU's
    /// `qemu_co_queue_next`). From a coroutine on the waiter's thread it
    /// runs after the caller suspends; outside coroutines it runs at once;
    /// from another thread it is queued on its context.
    #[doc(alias = "qemu_co_queue_next")]
    pub fn next(&self) -> bool {
        let w = {
            let mut q = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            q.pop().map(|w| w.grant())
        };
        match w {
            Some(w) => {
                w.wake();
                true
            }
            None => false,
        }
    }

    /// Wakes every waiter (QEMU's `qemu_co_queue_restart_all`).
    #[doc(alias = "qemu_co_queue_restart_all")]
    pub fn restart_all(&self) {
        let mut wake = WakeList::default();
        {
            let mut q = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(w) = q.pop() {
                wake.push(w.grant());
            }
        }
        wake.wake_all();
    }

    /// QEMU's `qemu_co_enter_next`: as [`next`](Self::next) (outside a
    /// coroutine the waiter is entered before this returns).
    #[doc(alias = "qemu_co_enter_next")]
    pub fn enter_next(&self) -> bool {
        self.next()
    }

    /// QEMU's `qemu_co_enter_all`: as [`restart_all`](Self::restart_all).
    #[doc(alias = "qemu_co_enter_all")]
    pub fn enter_all(&self) {
        self.restart_all()
    }

    /// Whether no coroutine waits (QEMU's `qemu_co_queue_empty`).
    #[doc(alias = "qemu_co_queue_empty")]
    pub fn is_empty(&self) -> bool {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

impl fmt::Debug for CoQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoQueue")
            .field("empty", &self.is_empty())
            .finish()
    }
}

mod private {
    /// The operations behind [`CoLockable`](super::CoLockable), out of
    /// reach of other crates.
    pub trait Relock<'a>: Sized {
        type Lock: ?Sized + 'a;
        fn release(self) -> &'a Self::Lock;
        fn reacquire(lock: &'a Self::Lock) -> Self;
    }
}

/// A guard of a coroutine lock that [`CoQueue::wait`] can release while
/// waiting and take again afterwards (QEMU's `QemuCoLockable`). Implemented
/// by [`CoMutexGuard`], [`CoRwLockReadGuard`] and [`CoRwLockWriteGuard`];
/// sealed.
#[doc(alias = "QemuCoLockable")]
pub trait CoLockable<'a>: private::Relock<'a> {}

impl<'a, T: ?Sized> private::Relock<'a> for CoMutexGuard<'a, T> {
    type Lock = CoMutex<T>;
    fn release(self) -> &'a CoMutex<T> {
        CoMutexGuard::mutex(&self)
    }
    fn reacquire(lock: &'a CoMutex<T>) -> Self {
        lock.lock()
    }
}
impl<'a, T: ?Sized> CoLockable<'a> for CoMutexGuard<'a, T> {}

impl<'a, T: ?Sized> private::Relock<'a> for CoRwLockReadGuard<'a, T> {
    type Lock = CoRwLock<T>;
    fn release(self) -> &'a CoRwLock<T> {
        CoRwLockReadGuard::rwlock(&self)
    }
    fn reacquire(lock: &'a CoRwLock<T>) -> Self {
        lock.read()
    }
}
impl<'a, T: ?Sized> CoLockable<'a> for CoRwLockReadGuard<'a, T> {}

impl<'a, T: ?Sized> private::Relock<'a> for CoRwLockWriteGuard<'a, T> {
    type Lock = CoRwLock<T>;
    fn release(self) -> &'a CoRwLock<T> {
        CoRwLockWriteGuard::rwlock(&self)
    }
    fn reacquire(lock: &'a CoRwLock<T>) -> Self {
        lock.write()
    }
}
impl<'a, T: ?Sized> CoLockable<'a> for CoRwLockWriteGuard<'a, T> {}

/// A task's place in a `CoQueue`.
struct QueueWait<'a> {
    q: &'a CoQueue,
    w: Option<Arc<Waiter>>,
}

impl std::future::Future for QueueWait<'_> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.get_mut();
        let Some(w) = &this.w else {
            return std::task::Poll::Ready(());
        };
        if !w.is_granted() {
            // Register, then check again (see `CoMutexLockFuture`).
            w.register(cx.waker());
            if !w.is_granted() {
                return std::task::Poll::Pending;
            }
        }
        this.w = None;
        std::task::Poll::Ready(())
    }
}

impl Drop for QueueWait<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.w.take() {
            self.q.cancel(&w);
        }
    }
}
