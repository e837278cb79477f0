//! What the native engines share: the table of in-flight requests, each
//! with the coroutine waiting for it, and the guard that keeps a request's
//! memory borrowed until the kernel is done with it.
//!
//! ```text
//!  coroutine                          loop (same thread)
//!  ---------                          ------------------
//!  slot = insert(waiter)
//!  push SQE / iocb (user_data = slot)
//!  loop { take(slot)? else suspend }  reap: complete(slot, res) -> waiter
//!                                     wake the waiter
//!  unwound while waiting:
//!    guard.drop: cancel + block until the kernel reaped `slot`
//!    (never suspends: corosensei re-raises a forced unwind there)
//! ```

use std::io;

use slab::Slab;

use crate::coroutine::RemoteCoroutine;
use crate::Coroutine;

/// One request from submission until its waiter took the result.
pub(crate) struct Slot {
    waiter: RemoteCoroutine,
    result: Option<i64>,
}

/// The in-flight requests of one engine (home thread only).
#[derive(Default)]
pub(crate) struct Requests {
    slab: Slab<Slot>,
}

impl Requests {
    pub(crate) fn insert(&mut self, waiter: RemoteCoroutine) -> usize {
        self.slab.insert(Slot {
            waiter,
            result: None,
        })
    }

    /// Records the kernel's result; returns the coroutine to wake.
    pub(crate) fn complete(&mut self, idx: usize, res: i64) -> Option<RemoteCoroutine> {
        let slot = self.slab.get_mut(idx)?;
        debug_assert!(slot.result.is_none(), "request {idx} completed twice");
        // Engine assertion: a request's owner waits until the kernel let go
        // of its buffers (`wait`'s guard), so it cannot have finished.
        assert!(
            !slot.waiter.is_finished(),
            "coroloop: file engine: request {idx} completed after its coroutine finished \
             (its buffers may be gone)"
        );
        slot.result = Some(res);
        Some(slot.waiter.clone())
    }

    /// Engine assertion, before request `idx` goes to the kernel: its
    /// owner (the coroutine that lent the buffers) has not finished.
    pub(crate) fn assert_owner_alive(&self, idx: usize, engine: &str) {
        if let Some(slot) = self.slab.get(idx) {
            assert!(
                !slot.waiter.is_finished(),
                "coroloop: {engine}: request {idx} submitted after its coroutine finished \
                 (its buffers may be gone)"
            );
        }
    }

    /// The result, if the request completed; the slot is freed then.
    pub(crate) fn take(&mut self, idx: usize) -> Option<i64> {
        let r = self.slab.get(idx)?.result?;
        self.slab.remove(idx);
        Some(r)
    }

    /// Whether the request already completed (its result waits in the slot).
    pub(crate) fn is_done(&self, idx: usize) -> bool {
        self.slab.get(idx).is_some_and(|s| s.result.is_some())
    }

    /// The requests without a result yet.
    pub(crate) fn unfinished(&self) -> Vec<usize> {
        self.slab
            .iter()
            .filter(|(_, s)| s.result.is_none())
            .map(|(i, _)| i)
            .collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub(crate) fn remove(&mut self, idx: usize) {
        self.slab.try_remove(idx);
    }
}

/// An engine whose requests the guard can cancel.
pub(crate) trait Cancel {
    /// Cancels request `idx` and blocks the thread until the kernel has
    /// reaped it (other completions meanwhile are recorded and their
    /// waiters woken through their resumer). Frees the slot. Must never
    /// suspend.
    fn cancel_and_reap(&self, idx: usize);
    /// The result of `idx` if it completed (frees the slot).
    fn take(&self, idx: usize) -> Option<i64>;
}

/// The current coroutine's handle for a request, or a panic naming `api`.
#[track_caller]
pub(crate) fn waiter(api: &str) -> RemoteCoroutine {
    let Some(me) = Coroutine::current() else {
        panic!("{api} called outside a coroutine");
    };
    me.remote()
}

/// Waits in the current coroutine until request `idx` completed and returns
/// its raw result. If the coroutine is unwound meanwhile, the request is
/// cancelled and reaped before the unwind goes on, so the buffers it
/// borrows stay valid until the kernel let go of them.
pub(crate) fn wait<E: Cancel + ?Sized>(engine: &E, idx: usize) -> i64 {
    struct Guard<'a, E: Cancel + ?Sized> {
        engine: &'a E,
        idx: usize,
    }
    impl<E: Cancel + ?Sized> Drop for Guard<'_, E> {
        fn drop(&mut self) {
            self.engine.cancel_and_reap(self.idx);
        }
    }
    let guard = Guard { engine, idx };
    loop {
        if let Some(r) = engine.take(idx) {
            std::mem::forget(guard);
            return r;
        }
        crate::coroutine::suspend();
    }
}

/// A kernel result (`-errno` or a count) as `io::Result<usize>`.
pub(crate) fn to_result(res: i64) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error((-res) as i32))
    } else {
        Ok(res as usize)
    }
}

/// Wakes the coroutines of completed requests (in the loop: direct entry
/// on the home thread, as QEMU's `aio_co_wake` in the same context). If
/// one of them panics out of its entry, the others are still woken
/// (queued on their resumer) before the panic goes on.
pub(crate) fn wake_all(waiters: &mut Vec<RemoteCoroutine>) {
    struct Rest<'a>(std::vec::Drain<'a, RemoteCoroutine>);
    impl Drop for Rest<'_> {
        fn drop(&mut self) {
            for w in self.0.by_ref() {
                w.wake();
            }
        }
    }
    let mut rest = Rest(waiters.drain(..));
    for w in rest.0.by_ref() {
        // SAFETY: completions are reaped on the engine's home thread, which
        // is the home thread of the coroutines that submitted to it.
        if let Some(co) = unsafe { w.upgrade_home() } {
            co.wake();
        }
    }
}
