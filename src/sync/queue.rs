//! `CoQueue`: coroutines waiting for a condition (QEMU's `CoQueue`).

use std::fmt;
use std::sync::Arc;

use super::mutex::{CoMutex, CoMutexGuard};
use super::waitq::{wake_current_coroutine, WaitList, Waiter, WakeList};
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

    fn enqueue(&self) -> Arc<Waiter> {
        let w = Waiter::new(false, wake_current_coroutine("CoQueue::wait"));
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w.clone());
        w
    }

    fn wait_granted(&self, w: Arc<Waiter>) {
        struct Cancel<'a>(&'a CoQueue, Option<Arc<Waiter>>);
        impl Drop for Cancel<'_> {
            fn drop(&mut self) {
                if let Some(w) = self.1.take() {
                    let removed = self
                        .0
                        .waiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&w);
                    if !removed && w.is_granted() {
                        // Woken but unwound before running: pass it on.
                        self.0.next();
                    }
                }
            }
        }
        let mut c = Cancel(self, Some(w));
        while !c.1.as_ref().unwrap().is_granted() {
            crate::coroutine::suspend();
        }
        c.1 = None;
    }

    /// Releases `guard`'s lock, waits until woken by
    /// [`next`](Self::next) or [`restart_all`](Self::restart_all), and
    /// relocks (QEMU's `qemu_co_queue_wait`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "qemu_co_queue_wait")]
    #[track_caller]
    pub fn wait<'a, T: ?Sized>(&self, guard: CoMutexGuard<'a, T>) -> CoMutexGuard<'a, T> {
        let m: &'a CoMutex<T> = CoMutexGuard::mutex(&guard);
        let w = self.enqueue();
        drop(guard);
        self.wait_granted(w);
        m.lock()
    }

    /// Waits until woken, without a lock (QEMU's `qemu_co_queue_wait(q,
    /// NULL)`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[track_caller]
    pub fn wait_unlocked(&self) {
        let w = self.enqueue();
        self.wait_granted(w);
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
