//! The waiter records and FIFO queue the coroutine locks share.
//!
//! A waiter is an `Arc<Waiter>` with its own grant state: whoever hands a
//! waiter the lock (or a queue wake-up) sets `granted` *under the queue's
//! mutex* and wakes it *after* releasing the mutex. The waiting side loops
//! until `granted` is set, so a stray wake-up (stale waker, remote wake)
//! only makes it check again. A waiter that goes away while queued (its
//! coroutine is unwound) removes itself under the mutex; one that was
//! already granted passes what it was granted on ([`WaitGuard`]).
//!
//! This file knows nothing about coroutines: the wake-up action is a
//! closure, so loom can drive the queue with plain threads.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::loom::sync::atomic::{AtomicBool, Ordering};

/// How to wake a waiter.
pub(crate) enum WakeTarget {
    /// A coroutine: QEMU's `aio_co_wake` on its home thread (wake-up list
    /// or enter now), a queued wake on its context from other threads.
    Coroutine {
        home: u64,
        remote: crate::coroutine::RemoteCoroutine,
    },
    /// An async task: its latest waker (registered at every poll).
    Task(atomic_waker::AtomicWaker),
    /// Anything else (the loom models).
    #[allow(dead_code)]
    Custom(Box<dyn Fn() + Send + Sync>),
    /// A spare record kept for reuse: wakes nobody.
    #[allow(dead_code)]
    Spent,
}

/// One waiting party.
pub(crate) struct Waiter {
    granted: AtomicBool,
    /// What the waiter waits for (locks with modes use it: true = writer).
    pub(crate) exclusive: bool,
    wake: WakeTarget,
}

impl Waiter {
    pub(crate) fn new(exclusive: bool, wake: WakeTarget) -> Arc<Waiter> {
        Arc::new(Waiter {
            granted: AtomicBool::new(false),
            exclusive,
            wake,
        })
    }

    /// Whether it was granted. Acquire: pairs with `grant`'s release, so
    /// the previous owner's writes to the protected data are visible.
    #[inline]
    pub(crate) fn is_granted(&self) -> bool {
        self.granted.load(Ordering::Acquire)
    }

    /// Grants the waiter (call under the queue's mutex), returning it so
    /// the caller can wake it after the mutex is released.
    pub(crate) fn grant(self: &Arc<Self>) -> Arc<Waiter> {
        self.granted.store(true, Ordering::Release);
        self.clone()
    }

    /// The thread serial of the coroutine waiting, or 0 if unknown (an
    /// async task, a model): a hint for spinning lockers.
    #[inline]
    pub(crate) fn home_hint(&self) -> u64 {
        match &self.wake {
            WakeTarget::Coroutine { home, .. } => *home,
            _ => 0,
        }
    }

    /// Runs the wake-up action (outside the queue's mutex).
    pub(crate) fn wake(&self) {
        match &self.wake {
            WakeTarget::Coroutine { home, remote } => {
                if crate::aio::thread_serial() == *home {
                    // SAFETY: `home` is the serial of the thread that made
                    // this target from its running coroutine, and we are on
                    // that thread.
                    if let Some(co) = unsafe { remote.upgrade_home() } {
                        co.wake();
                    }
                } else {
                    remote.wake();
                }
            }
            WakeTarget::Task(w) => w.wake(),
            WakeTarget::Custom(f) => f(),
            WakeTarget::Spent => {}
        }
    }

    /// Registers the polling task's waker (task waiters only).
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        if let WakeTarget::Task(w) = &self.wake {
            w.register(waker);
        }
    }
}

/// FIFO of waiters; always used under its owner's mutex.
#[derive(Default)]
pub(crate) struct WaitList {
    q: VecDeque<Arc<Waiter>>,
}

impl WaitList {
    pub(crate) fn push(&mut self, w: Arc<Waiter>) {
        self.q.push_back(w);
    }

    pub(crate) fn pop(&mut self) -> Option<Arc<Waiter>> {
        self.q.pop_front()
    }

    pub(crate) fn front(&self) -> Option<&Arc<Waiter>> {
        self.q.front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Removes `w` if still queued; returns whether it was.
    pub(crate) fn remove(&mut self, w: &Arc<Waiter>) -> bool {
        match self.q.iter().position(|x| Arc::ptr_eq(x, w)) {
            Some(i) => {
                self.q.remove(i);
                true
            }
            None => false,
        }
    }
}

/// Wakes the waiters collected under a mutex once it is released.
#[derive(Default)]
pub(crate) struct WakeList(Vec<Arc<Waiter>>);

impl WakeList {
    pub(crate) fn push(&mut self, w: Arc<Waiter>) {
        self.0.push(w);
    }

    pub(crate) fn wake_all(self) {
        for w in self.0 {
            w.wake();
        }
    }
}

/// The coroutine wake-up action: on the coroutine's home thread it is
/// QEMU's `aio_co_wake` (append to the current coroutine's wake-up list,
/// or enter at once outside coroutines); from another thread it queues the
/// coroutine on its AioContext.
pub(crate) fn wake_current_coroutine(api: &'static str) -> WakeTarget {
    let Some(co) = crate::Coroutine::current() else {
        panic!("{api} called outside a coroutine");
    };
    WakeTarget::Coroutine {
        home: crate::aio::thread_serial(),
        remote: co.remote(),
    }
}

#[cfg(not(coroloop_loom))]
thread_local! {
    /// One spare waiter record per thread: a coroutine's contended lock
    /// reuses the record of its thread's previous wait instead of
    /// allocating (QEMU keeps the record on the waiting coroutine's stack
    /// and allocates nothing per wait; this gets the same effect without
    /// raw pointers into coroutine stacks).
    static SPARE: std::cell::Cell<Option<Arc<Waiter>>> = const { std::cell::Cell::new(None) };
}

/// A waiter for the current coroutine (`wake_current_coroutine(api)`),
/// reusing this thread's spare record when there is one.
#[track_caller]
pub(crate) fn coroutine_waiter(exclusive: bool, api: &'static str) -> Arc<Waiter> {
    let wake = wake_current_coroutine(api);
    #[cfg(not(coroloop_loom))]
    if let Some(mut w) = SPARE.try_with(|s| s.take()).ok().flatten() {
        // Only records nobody else holds are kept (see `recycle`), and a
        // kept record is reachable from this thread's slot alone.
        if let Some(x) = Arc::get_mut(&mut w) {
            *x.granted.get_mut() = false;
            x.exclusive = exclusive;
            x.wake = wake;
            return w;
        }
    }
    Waiter::new(exclusive, wake)
}

/// Keeps a finished waiter as this thread's spare record if nobody else
/// holds it any more (an unlocker on another thread may still hold its
/// clone for a moment: then it is simply dropped). The wake target is
/// dropped now, so a spare keeps no coroutine alive.
pub(crate) fn recycle(mut w: Arc<Waiter>) {
    #[cfg(not(coroloop_loom))]
    if let Some(x) = Arc::get_mut(&mut w) {
        x.wake = WakeTarget::Spent;
        let _ = SPARE.try_with(|s| s.set(Some(w)));
    }
    #[cfg(coroloop_loom)]
    drop(w);
}

/// The wake-up action of an async task: its waker (`None`: registered at
/// its first poll), updated at every poll.
pub(crate) fn wake_task(waker: Option<&std::task::Waker>) -> WakeTarget {
    let w = atomic_waker::AtomicWaker::new();
    if let Some(waker) = waker {
        w.register(waker);
    }
    WakeTarget::Task(w)
}
