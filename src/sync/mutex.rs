//! `CoMutex`: a fair mutex for coroutines (QEMU's `CoMutex`).
//!
//! State word: `LOCKED` (someone owns it) and `WAITERS` (the queue is not
//! empty; only changed under the queue's mutex). Uncontended lock and
//! unlock are one compare-exchange each. Unlock with waiters hands the lock
//! to the first waiter directly (`LOCKED` stays set), so a newcomer can
//! never barge ahead of the queue: FIFO, as QEMU's.

use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use super::waitq::{coroutine_waiter, recycle, wake_task, WaitList, Waiter};
use crate::loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use crate::loom::sync::Mutex;

const LOCKED: usize = 1;
const WAITERS: usize = 2;

/// The lock without data: the protocol core, free of coroutines.
pub(crate) struct RawCoMutex {
    state: AtomicUsize,
    /// The thread serial of the last owner (a hint for spinning).
    owner: AtomicU64,
    waiters: Mutex<WaitList>,
}

/// How long a locker on another thread spins while the lock is held and
/// nobody is queued before it queues and suspends (QEMU spins up to 1000
/// pauses too): a cross-thread hand-off through the target's loop costs
/// far more than a short critical section.
const SPIN_LIMIT: u32 = 1000;

impl RawCoMutex {
    pub(crate) fn new() -> RawCoMutex {
        RawCoMutex {
            state: AtomicUsize::new(0),
            owner: AtomicU64::new(0),
            waiters: Mutex::new(WaitList::default()),
        }
    }

    #[inline]
    pub(crate) fn try_lock(&self) -> bool {
        self.state
            .compare_exchange(0, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Records the calling thread as the owner (after taking the lock).
    #[inline]
    fn set_owner(&self, me: u64) {
        self.owner.store(me, Ordering::Relaxed);
    }

    /// Spins while the owner runs on another thread and nobody is queued,
    /// taking the lock if it is released meanwhile (QEMU's
    /// `qemu_co_mutex_lock` does the same). Returns whether it took it.
    #[cold]
    fn spin_for_other_thread(&self, me: u64) -> bool {
        for _ in 0..SPIN_LIMIT {
            let s = self.state.load(Ordering::Relaxed);
            if s == 0 {
                if self.try_lock() {
                    self.set_owner(me);
                    return true;
                }
            } else if s != LOCKED || self.owner.load(Ordering::Relaxed) == me {
                // Waiters are queued (FIFO: join them), or the owner is a
                // coroutine of this thread, which cannot run while we spin.
                return false;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Takes the lock, or queues `make()`'s waiter and returns it: the
    /// caller then waits until it is granted (it then owns the lock).
    pub(crate) fn lock_or_queue(&self, make: impl FnOnce() -> Arc<Waiter>) -> Option<Arc<Waiter>> {
        if self.try_lock() {
            return None;
        }
        let mut q = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let prev = self.state.fetch_or(WAITERS, Ordering::Acquire);
        if prev & LOCKED == 0 {
            // Released meanwhile, and nobody queued: take it.
            let keep = if q.is_empty() { 0 } else { WAITERS };
            self.state.store(LOCKED | keep, Ordering::Relaxed);
            return None;
        }
        let w = make();
        q.push(w.clone());
        Some(w)
    }

    /// Releases the lock, handing it to the first waiter if any.
    #[inline]
    pub(crate) fn unlock(&self) {
        if self
            .state
            .compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        self.unlock_slow();
    }

    #[cold]
    fn unlock_slow(&self) {
        let next = {
            let mut q = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            match q.pop() {
                Some(w) => {
                    // The grantee owns it from now on, though its thread may
                    // be asleep until the wake below reaches it: a locker of
                    // this thread must spin for it (as for any owner on
                    // another thread), not take the unlocker's serial still
                    // recorded here for a same-thread owner and queue behind
                    // it. That turned every later acquisition into a
                    // sleep-and-wake hand-off across threads (a convoy; QEMU
                    // clears `mutex->ctx` at unlock for the same reason).
                    self.owner.store(w.home_hint(), Ordering::Relaxed);
                    if q.is_empty() {
                        self.state.store(LOCKED, Ordering::Release);
                    }
                    Some(w.grant())
                }
                None => {
                    self.state.store(0, Ordering::Release);
                    None
                }
            }
        };
        if let Some(w) = next {
            w.wake();
        }
    }

    /// A queued waiter gives up (its coroutine is being unwound): leave the
    /// queue, or pass the lock on if it had been granted meanwhile.
    pub(crate) fn cancel(&self, w: &Arc<Waiter>) {
        let mut q = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if q.remove(w) {
            if q.is_empty() {
                self.state.fetch_and(!WAITERS, Ordering::Relaxed);
            }
            return;
        }
        drop(q);
        if w.is_granted() {
            self.unlock();
        }
    }

    pub(crate) fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) & LOCKED != 0
    }
}

/// Cancels a wait if the waiting coroutine unwinds before it is granted.
struct WaitGuard<'a> {
    raw: &'a RawCoMutex,
    w: Option<Arc<Waiter>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.w.take() {
            self.raw.cancel(&w);
        }
    }
}

/// A mutex for coroutines (QEMU's `CoMutex`): `lock` suspends the calling
/// coroutine until the lock is free, instead of blocking the thread.
///
/// Fairness: first come, first served. Unlocking with waiters hands the
/// lock directly to the longest waiter, including one on another thread's
/// AioContext (it is woken there, in its home context). Uncontended lock
/// and unlock are one atomic compare-exchange each.
///
/// Works with bare coroutines too: a waiter on the unlocking thread is
/// appended to the unlocking coroutine's wake-up list (entered when that
/// one suspends or finishes), or entered at once if the unlock happens
/// outside any coroutine.
///
/// `CoMutex<T>` is `Send + Sync` for `T: Send`. Guards are `!Send`: a
/// coroutine never changes thread while holding one.
///
/// # Examples
///
/// ```
/// use coroloop::{coroutine, sync::CoMutex, Coroutine};
/// use std::rc::Rc;
///
/// let m = Rc::new(CoMutex::new(0));
/// let m1 = m.clone();
/// let c1 = Coroutine::new(move || {
///     let mut g = m1.lock();
///     *g += 1;
///     coroutine::suspend(); // holds the lock while suspended
///     *g += 1;
/// });
/// let m2 = m.clone();
/// let c2 = Coroutine::new(move || *m2.lock() *= 10);
/// c1.enter();
/// c2.enter(); // queues behind c1
/// c1.enter(); // c1 unlocks; c2 runs when c1 finishes
/// assert!(c2.is_finished());
/// assert_eq!(*m.try_lock().unwrap(), 20);
/// ```
pub struct CoMutex<T: ?Sized> {
    raw: RawCoMutex,
    data: UnsafeCell<T>,
}

// SAFETY: the lock serialises access to `data`; `T: Send` because the
// owner may be a coroutine on another thread.
unsafe impl<T: ?Sized + Send> Send for CoMutex<T> {}
// SAFETY: as above.
unsafe impl<T: ?Sized + Send> Sync for CoMutex<T> {}

impl<T> CoMutex<T> {
    /// A new unlocked mutex (QEMU's `qemu_co_mutex_init`).
    #[doc(alias = "qemu_co_mutex_init")]
    pub fn new(value: T) -> CoMutex<T> {
        CoMutex {
            raw: RawCoMutex::new(),
            data: UnsafeCell::new(value),
        }
    }

    /// The protected value.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<T: ?Sized> CoMutex<T> {
    /// Locks, suspending the current coroutine while another holds the
    /// lock (QEMU's `qemu_co_mutex_lock`). Wakes that are not the hand-off
    /// (a stale waker, a remote wake) do not end the wait.
    ///
    /// # Panics
    ///
    /// Outside a coroutine (use [`try_lock`](Self::try_lock) there).
    #[doc(alias = "qemu_co_mutex_lock")]
    #[track_caller]
    pub fn lock(&self) -> CoMutexGuard<'_, T> {
        if !crate::coroutine::in_coroutine() {
            panic!("CoMutex::lock called outside a coroutine");
        }
        match self.lock_until(None, "CoMutex::lock") {
            Some(g) => g,
            None => unreachable!("an unbounded lock does not time out"),
        }
    }

    /// [`lock`](Self::lock), giving up after `timeout`: `None` then, and
    /// the queue is left as if this waiter had never come (a hand-over
    /// that raced with the timeout goes to the next waiter). See the
    /// [module docs](crate::sync#timeouts).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or in one without an AioContext (for the
    /// timer).
    #[track_caller]
    pub fn lock_timeout(&self, timeout: Duration) -> Option<CoMutexGuard<'_, T>> {
        if !crate::coroutine::in_coroutine() {
            panic!("CoMutex::lock_timeout called outside a coroutine");
        }
        self.lock_until(Some(timeout), "CoMutex::lock_timeout")
    }

    #[track_caller]
    fn lock_until(
        &self,
        timeout: Option<Duration>,
        api: &'static str,
    ) -> Option<CoMutexGuard<'_, T>> {
        if !crate::coroutine::in_coroutine() {
            panic!("{api} called outside a coroutine");
        }
        let me = crate::aio::thread_serial();
        if self.raw.try_lock() {
            self.raw.set_owner(me);
            return Some(CoMutexGuard {
                m: self,
                _not_send: PhantomData,
            });
        }
        if self.raw.spin_for_other_thread(me) {
            return Some(CoMutexGuard {
                m: self,
                _not_send: PhantomData,
            });
        }
        let deadline = super::Deadline::after(timeout, api);
        if let Some(w) = self.raw.lock_or_queue(|| coroutine_waiter(true, api)) {
            let mut guard = WaitGuard {
                raw: &self.raw,
                w: Some(w),
            };
            while !guard.w.as_ref().unwrap().is_granted() {
                if deadline.expired() {
                    return None; // `guard` leaves the queue, passing on a late grant
                }
                crate::coroutine::suspend();
            }
            if let Some(w) = guard.w.take() {
                recycle(w);
            }
        }
        self.raw.set_owner(me);
        Some(CoMutexGuard {
            m: self,
            _not_send: PhantomData,
        })
    }

    /// Locks from async code: a future that resolves to the guard, queued
    /// in the same FIFO as coroutines (so one `CoMutex` serves coroutines
    /// and tasks alike). Dropping the future before it resolves leaves the
    /// queue, passing the lock on if it had just been handed over.
    ///
    /// The guard is `!Send`: hold it across `.await` only in futures that
    /// stay on one thread (`spawn_local`, a `LocalExecutor`, `block_on`).
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::sync::CoMutex;
    ///
    /// let m = CoMutex::new(1);
    /// smol::block_on(async { *m.lock_async().await += 1 });
    /// assert_eq!(*m.try_lock().unwrap(), 2);
    /// ```
    pub fn lock_async(&self) -> CoMutexLockFuture<'_, T> {
        CoMutexLockFuture { m: self, w: None }
    }

    /// Takes the lock if it is free (anywhere, coroutine or not).
    pub fn try_lock(&self) -> Option<CoMutexGuard<'_, T>> {
        if !self.raw.try_lock() {
            return None;
        }
        self.raw.set_owner(crate::aio::thread_serial());
        Some(CoMutexGuard {
            m: self,
            _not_send: PhantomData,
        })
    }

    /// Whether some coroutine holds the lock (QEMU's
    /// `qemu_co_mutex_assert_locked`, as a query).
    #[doc(alias = "qemu_co_mutex_assert_locked")]
    pub fn is_locked(&self) -> bool {
        self.raw.is_locked()
    }

    /// The value, through exclusive access to the mutex.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

impl<T: Default> Default for CoMutex<T> {
    fn default() -> Self {
        CoMutex::new(T::default())
    }
}

impl<T: ?Sized> fmt::Debug for CoMutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoMutex")
            .field("locked", &self.is_locked())
            .finish_non_exhaustive()
    }
}

/// The future of [`CoMutex::lock_async`].
#[must_use = "futures do nothing unless polled"]
pub struct CoMutexLockFuture<'a, T: ?Sized> {
    m: &'a CoMutex<T>,
    w: Option<Arc<Waiter>>,
}

impl<'a, T: ?Sized> std::future::Future for CoMutexLockFuture<'a, T> {
    type Output = CoMutexGuard<'a, T>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<CoMutexGuard<'a, T>> {
        let this = self.get_mut();
        let ready = |m: &'a CoMutex<T>| {
            m.raw.set_owner(crate::aio::thread_serial());
            std::task::Poll::Ready(CoMutexGuard {
                m,
                _not_send: PhantomData,
            })
        };
        match &this.w {
            None => match this
                .m
                .raw
                .lock_or_queue(|| Waiter::new(true, wake_task(Some(cx.waker()))))
            {
                None => ready(this.m),
                Some(w) => {
                    this.w = Some(w);
                    std::task::Poll::Pending
                }
            },
            Some(w) => {
                if !w.is_granted() {
                    // Register, then check again: a grant in between has
                    // either seen the new waker or is seen here.
                    w.register(cx.waker());
                    if !w.is_granted() {
                        return std::task::Poll::Pending;
                    }
                }
                this.w = None;
                ready(this.m)
            }
        }
    }
}

impl<T: ?Sized> Drop for CoMutexLockFuture<'_, T> {
    fn drop(&mut self) {
        if let Some(w) = self.w.take() {
            self.m.raw.cancel(&w);
        }
    }
}

impl<T: ?Sized> fmt::Debug for CoMutexLockFuture<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoMutexLockFuture")
            .field("queued", &self.w.is_some())
            .finish()
    }
}

/// Access to a [`CoMutex`]'s value; unlocks when dropped (QEMU's
/// `qemu_co_mutex_unlock`). `!Send`: the coroutine holding the lock never
/// changes thread, and neither does its guard.
///
/// ```compile_fail,E0277
/// use coroloop::sync::CoMutex;
///
/// let m = CoMutex::new(0); // `Send + Sync`
/// let g = m.try_lock().unwrap();
/// std::thread::scope(|s| {
///     s.spawn(move || drop(g));
/// });
/// ```
#[must_use = "the lock is released when the guard is dropped"]
pub struct CoMutexGuard<'a, T: ?Sized> {
    m: &'a CoMutex<T>,
    _not_send: PhantomData<*const ()>,
}

impl<'a, T: ?Sized> CoMutexGuard<'a, T> {
    /// The mutex this guard locks.
    pub fn mutex(this: &Self) -> &'a CoMutex<T> {
        this.m
    }
}

impl<T: ?Sized> Deref for CoMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves we hold the lock.
        unsafe { &*self.m.data.get() }
    }
}

impl<T: ?Sized> DerefMut for CoMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves we hold the lock, exclusively.
        unsafe { &mut *self.m.data.get() }
    }
}

impl<T: ?Sized> Drop for CoMutexGuard<'_, T> {
    #[doc(alias = "qemu_co_mutex_unlock")]
    fn drop(&mut self) {
        self.m.raw.unlock();
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for CoMutexGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(all(test, coroloop_loom))]
mod tests_loom {
    use super::*;
    use loom::sync::atomic::AtomicUsize as Counter;

    fn waiter() -> Arc<Waiter> {
        Waiter::new(
            true,
            super::super::waitq::WakeTarget::Custom(Box::new(|| {})),
        )
    }

    /// Lock, spinning (loom yields) while queued; returns after the
    /// critical section, which checks mutual exclusion.
    fn locked_increment(m: &RawCoMutex, c: &Counter, inside: &Counter) {
        if let Some(w) = m.lock_or_queue(waiter) {
            while !w.is_granted() {
                loom::thread::yield_now();
            }
        }
        assert_eq!(inside.fetch_add(1, Ordering::Relaxed), 0, "two owners");
        let v = c.load(Ordering::Relaxed);
        c.store(v + 1, Ordering::Relaxed);
        inside.fetch_sub(1, Ordering::Relaxed);
        m.unlock();
    }

    /// Uncontended path and a waiter enqueueing while the owner unlocks:
    /// no lost hand-off, mutual exclusion, the lock ends free.
    #[test]
    fn loom_handoff_no_lost_wakeup() {
        loom::model(|| {
            let m = Arc::new(RawCoMutex::new());
            let c = Arc::new(Counter::new(0));
            let inside = Arc::new(Counter::new(0));
            let ts: Vec<_> = (0..2)
                .map(|_| {
                    let (m, c, inside) = (m.clone(), c.clone(), inside.clone());
                    loom::thread::spawn(move || locked_increment(&m, &c, &inside))
                })
                .collect();
            locked_increment(&m, &c, &inside);
            for t in ts {
                t.join().unwrap();
            }
            assert_eq!(c.load(Ordering::Relaxed), 3);
            assert!(!m.is_locked());
            assert!(m.try_lock());
        });
    }

    /// FIFO: a locker that queued (or took the lock) before a second one
    /// started always gets the lock first, whenever the owner unlocks.
    #[test]
    fn loom_handoff_is_fifo() {
        loom::model(|| {
            let m = Arc::new(RawCoMutex::new());
            assert!(m.try_lock());
            let order = Arc::new(Mutex::new(Vec::new()));
            let first_in = Arc::new(loom::sync::atomic::AtomicBool::new(false));
            let spawn = |id: u32| {
                let (m, order, first_in) = (m.clone(), order.clone(), first_in.clone());
                loom::thread::spawn(move || {
                    if id == 2 {
                        while !first_in.load(Ordering::Acquire) {
                            loom::thread::yield_now();
                        }
                    }
                    let w = m.lock_or_queue(waiter);
                    if id == 1 {
                        first_in.store(true, Ordering::Release);
                    }
                    if let Some(w) = w {
                        while !w.is_granted() {
                            loom::thread::yield_now();
                        }
                    }
                    order.lock().unwrap().push(id);
                    m.unlock();
                })
            };
            let (t1, t2) = (spawn(1), spawn(2));
            m.unlock();
            t1.join().unwrap();
            t2.join().unwrap();
            assert_eq!(*order.lock().unwrap(), [1, 2]);
            assert!(!m.is_locked());
        });
    }

    /// A queued waiter gives up (unwound) while the owner hands off: the
    /// lock is never lost, whether the waiter was granted or not.
    #[test]
    fn loom_waiter_removal_races_handoff() {
        loom::model(|| {
            let m = Arc::new(RawCoMutex::new());
            assert!(m.try_lock());
            let m2 = m.clone();
            let quitter = loom::thread::spawn(move || {
                if let Some(w) = m2.lock_or_queue(waiter) {
                    m2.cancel(&w); // unwound while queued
                } else {
                    m2.unlock();
                }
            });
            m.unlock();
            quitter.join().unwrap();
            assert!(!m.is_locked(), "the lock was lost with the quitter");
            assert!(m.try_lock());
        });
    }
}
