//! `CoRwLock`: QEMU's ticket-fair reader/writer lock for coroutines.

use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use super::waitq::{coroutine_waiter, recycle, WaitList, Waiter, WakeList};
use crate::loom::sync::Mutex;

struct State {
    /// > 0: that many readers; -1: a writer; 0: free.
    owners: isize,
    tickets: WaitList,
}

impl State {
    /// Grants the head of the queue (and the readers right behind a
    /// granted reader) what they wait for, if compatible (QEMU's
    /// `qemu_co_rwlock_maybe_wake_one`, extended to consecutive readers).
    fn wake_ready(&mut self, wake: &mut WakeList) {
        while let Some(w) = self.tickets.front() {
            if w.exclusive {
                if self.owners == 0 {
                    self.owners = -1;
                    let w = self.tickets.pop().unwrap();
                    wake.push(w.grant());
                }
                return;
            }
            if self.owners < 0 {
                return;
            }
            self.owners += 1;
            let w = self.tickets.pop().unwrap();
            wake.push(w.grant());
        }
    }
}

/// A reader/writer lock for coroutines (QEMU's `CoRwlock`).
///
/// Fairness is by ticket: requests are served in arrival order, so a
/// waiting writer blocks readers that arrive after it, and a run of
/// readers at the head of the queue is admitted together.
/// [`upgrade`](Self::upgrade) turns a read lock into a write lock: at once
/// if the caller is the only reader and nobody waits, otherwise it gives
/// up its read lock and queues behind the waiters (even as the sole
/// reader, as QEMU does). [`downgrade`](Self::downgrade) keeps a read
/// lock and admits waiting readers.
///
/// Guards are `!Send`.
#[doc(alias = "CoRwlock")]
pub struct CoRwLock<T: ?Sized> {
    state: Mutex<State>,
    data: UnsafeCell<T>,
}

// SAFETY: readers share `&T` across coroutines that may live on different
// threads (T: Sync); a writer gets `&mut T` (T: Send).
unsafe impl<T: ?Sized + Send + Sync> Sync for CoRwLock<T> {}
// SAFETY: as above.
unsafe impl<T: ?Sized + Send> Send for CoRwLock<T> {}

impl<T> CoRwLock<T> {
    /// A free lock (QEMU's `qemu_co_rwlock_init`).
    #[doc(alias = "qemu_co_rwlock_init")]
    pub fn new(value: T) -> CoRwLock<T> {
        CoRwLock {
            state: Mutex::new(State {
                owners: 0,
                tickets: WaitList::default(),
            }),
            data: UnsafeCell::new(value),
        }
    }
}

impl<T: ?Sized> CoRwLock<T> {
    /// Takes the lock in the mode asked; `false` if `timeout` ran out.
    #[track_caller]
    fn acquire(&self, exclusive: bool, api: &'static str, timeout: Option<Duration>) -> bool {
        if !crate::coroutine::in_coroutine() {
            panic!("{api} called outside a coroutine");
        }
        let w = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let free = st.tickets.is_empty()
                && if exclusive {
                    st.owners == 0
                } else {
                    st.owners >= 0
                };
            if free {
                st.owners = if exclusive { -1 } else { st.owners + 1 };
                return true;
            }
            let w = coroutine_waiter(exclusive, api);
            st.tickets.push(w.clone());
            w
        };
        let deadline = super::Deadline::after(timeout, api);
        self.wait_granted(w, &deadline)
    }

    fn wait_granted(&self, w: Arc<Waiter>, deadline: &super::Deadline) -> bool {
        struct Cancel<'a, T: ?Sized>(&'a CoRwLock<T>, Option<Arc<Waiter>>);
        impl<T: ?Sized> Drop for Cancel<'_, T> {
            fn drop(&mut self) {
                if let Some(w) = self.1.take() {
                    let mut wake = WakeList::default();
                    {
                        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
                        if !st.tickets.remove(&w) && w.is_granted() {
                            // Granted but unwound before running: release.
                            if w.exclusive {
                                st.owners = 0;
                            } else {
                                st.owners -= 1;
                            }
                        }
                        st.wake_ready(&mut wake);
                    }
                    wake.wake_all();
                }
            }
        }
        let mut c = Cancel(self, Some(w));
        while !c.1.as_ref().unwrap().is_granted() {
            if deadline.expired() {
                return false; // `c` leaves the queue, releasing a late grant
            }
            crate::coroutine::suspend();
        }
        if let Some(w) = c.1.take() {
            recycle(w);
        }
        true
    }

    fn release(&self, exclusive: bool) {
        let mut wake = WakeList::default();
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if exclusive {
                debug_assert_eq!(st.owners, -1);
                st.owners = 0;
            } else {
                debug_assert!(st.owners > 0);
                st.owners -= 1;
            }
            st.wake_ready(&mut wake);
        }
        wake.wake_all();
    }

    /// Takes a read lock, waiting behind earlier writers (QEMU's
    /// `qemu_co_rwlock_rdlock`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "qemu_co_rwlock_rdlock")]
    #[track_caller]
    pub fn read(&self) -> CoRwLockReadGuard<'_, T> {
        self.acquire(false, "CoRwLock::read", None);
        CoRwLockReadGuard {
            l: self,
            _not_send: PhantomData,
        }
    }

    /// [`read`](Self::read), giving up after `timeout` (`None`; the queue
    /// is left consistent: see the [module docs](crate::sync#timeouts)).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or in one without an AioContext.
    #[track_caller]
    pub fn read_timeout(&self, timeout: Duration) -> Option<CoRwLockReadGuard<'_, T>> {
        // `then`, not `then_some`: a guard built and dropped on a timeout
        // would release a lock it does not hold.
        self.acquire(false, "CoRwLock::read_timeout", Some(timeout))
            .then(|| CoRwLockReadGuard {
                l: self,
                _not_send: PhantomData,
            })
    }

    /// [`write`](Self::write), giving up after `timeout` (`None`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or in one without an AioContext.
    #[track_caller]
    pub fn write_timeout(&self, timeout: Duration) -> Option<CoRwLockWriteGuard<'_, T>> {
        self.acquire(true, "CoRwLock::write_timeout", Some(timeout))
            .then(|| CoRwLockWriteGuard {
                l: self,
                _not_send: PhantomData,
            })
    }

    /// Takes the write lock (QEMU's `qemu_co_rwlock_wrlock`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "qemu_co_rwlock_wrlock")]
    #[track_caller]
    pub fn write(&self) -> CoRwLockWriteGuard<'_, T> {
        self.acquire(true, "CoRwLock::write", None);
        CoRwLockWriteGuard {
            l: self,
            _not_send: PhantomData,
        }
    }

    /// Takes a read lock if that needs no wait (no writer holds or waits),
    /// anywhere, coroutine or not.
    pub fn try_read(&self) -> Option<CoRwLockReadGuard<'_, T>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.tickets.is_empty() || st.owners < 0 {
            return None;
        }
        st.owners += 1;
        Some(CoRwLockReadGuard {
            l: self,
            _not_send: PhantomData,
        })
    }

    /// Takes the write lock if it is free and nobody waits, anywhere.
    pub fn try_write(&self) -> Option<CoRwLockWriteGuard<'_, T>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.tickets.is_empty() || st.owners != 0 {
            return None;
        }
        st.owners = -1;
        Some(CoRwLockWriteGuard {
            l: self,
            _not_send: PhantomData,
        })
    }

    /// Turns a read lock into the write lock (QEMU's
    /// `qemu_co_rwlock_upgrade`): see the type's docs for the queueing.
    #[doc(alias = "qemu_co_rwlock_upgrade")]
    #[track_caller]
    pub fn upgrade(guard: CoRwLockReadGuard<'_, T>) -> CoRwLockWriteGuard<'_, T> {
        let l = guard.l;
        std::mem::forget(guard);
        let w = {
            let mut st = l.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.owners == 1 && st.tickets.is_empty() {
                st.owners = -1;
                None
            } else {
                st.owners -= 1;
                let w = coroutine_waiter(true, "CoRwLock::upgrade");
                st.tickets.push(w.clone());
                let mut wake = WakeList::default();
                st.wake_ready(&mut wake);
                drop(st);
                wake.wake_all();
                Some(w)
            }
        };
        if let Some(w) = w {
            l.wait_granted(w, &super::Deadline::after(None, "CoRwLock::upgrade"));
        }
        CoRwLockWriteGuard {
            l,
            _not_send: PhantomData,
        }
    }

    /// Turns the write lock into a read lock and admits waiting readers
    /// (QEMU's `qemu_co_rwlock_downgrade`).
    #[doc(alias = "qemu_co_rwlock_downgrade")]
    pub fn downgrade(guard: CoRwLockWriteGuard<'_, T>) -> CoRwLockReadGuard<'_, T> {
        let l = guard.l;
        std::mem::forget(guard);
        let mut wake = WakeList::default();
        {
            let mut st = l.state.lock().unwrap_or_else(|e| e.into_inner());
            st.owners = 1;
            st.wake_ready(&mut wake);
        }
        wake.wake_all();
        CoRwLockReadGuard {
            l,
            _not_send: PhantomData,
        }
    }
}

impl<T: ?Sized> fmt::Debug for CoRwLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let owners = self.state.lock().unwrap_or_else(|e| e.into_inner()).owners;
        f.debug_struct("CoRwLock")
            .field("owners", &owners)
            .finish_non_exhaustive()
    }
}

/// Shared access to a [`CoRwLock`]'s value. `!Send`, as the coroutine
/// holding it:
///
/// ```compile_fail,E0277
/// use coroloop::sync::CoRwLock;
///
/// let l = CoRwLock::new(0); // `Send + Sync`
/// let r = l.try_read().unwrap();
/// std::thread::scope(|s| {
///     s.spawn(move || drop(r));
/// });
/// ```
#[must_use = "the lock is released when the guard is dropped"]
pub struct CoRwLockReadGuard<'a, T: ?Sized> {
    l: &'a CoRwLock<T>,
    _not_send: PhantomData<*const ()>,
}

/// Exclusive access to a [`CoRwLock`]'s value. `!Send`, as the coroutine
/// holding it:
///
/// ```compile_fail,E0277
/// use coroloop::sync::CoRwLock;
///
/// let l = CoRwLock::new(0); // `Send + Sync`
/// let w = l.try_write().unwrap();
/// std::thread::scope(|s| {
///     s.spawn(move || drop(w));
/// });
/// ```
#[must_use = "the lock is released when the guard is dropped"]
pub struct CoRwLockWriteGuard<'a, T: ?Sized> {
    l: &'a CoRwLock<T>,
    _not_send: PhantomData<*const ()>,
}

impl<'a, T: ?Sized> CoRwLockReadGuard<'a, T> {
    /// The lock this guard holds.
    pub fn rwlock(this: &Self) -> &'a CoRwLock<T> {
        this.l
    }
}

impl<'a, T: ?Sized> CoRwLockWriteGuard<'a, T> {
    /// The lock this guard holds.
    pub fn rwlock(this: &Self) -> &'a CoRwLock<T> {
        this.l
    }
}

impl<T: ?Sized> Deref for CoRwLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a read guard means no writer holds the lock.
        unsafe { &*self.l.data.get() }
    }
}

impl<T: ?Sized> Deref for CoRwLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the write guard is the only owner.
        unsafe { &*self.l.data.get() }
    }
}

impl<T: ?Sized> DerefMut for CoRwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the write guard is the only owner.
        unsafe { &mut *self.l.data.get() }
    }
}

impl<T: ?Sized> Drop for CoRwLockReadGuard<'_, T> {
    #[doc(alias = "qemu_co_rwlock_unlock")]
    fn drop(&mut self) {
        self.l.release(false);
    }
}

impl<T: ?Sized> Drop for CoRwLockWriteGuard<'_, T> {
    fn drop(&mut self) {
        self.l.release(true);
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for CoRwLockReadGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for CoRwLockWriteGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
