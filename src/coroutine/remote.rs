//! Who frees a header: its home thread or the last remote reference.
//!
//! A header is used by its home thread (strong handles, weak list entries,
//! all non-atomic) and by *remote references* (wakers and remote handles,
//! possibly on other threads), counted in one atomic word:
//!
//! ```text
//!   bit 63           bits 0..63
//!   HOME_GONE        number of remote references
//! ```
//!
//! * A remote reference is made only by cloning one (any thread) or from a
//!   strong handle on the home thread. So once the home thread has let go
//!   and sees a count of 0, no remote reference can appear any more.
//! * When the home thread lets go ([`RemoteCount::home_release`]) it
//!   recycles the header itself if the count is 0; otherwise it sets
//!   `HOME_GONE` and the remote reference that brings the count to 0
//!   ([`RemoteCount::release`]) frees the header.
//!
//! Exactly one party frees, after every other party's last access: the
//! loom model below checks both races (remote drop before and after the
//! home thread lets go).

use super::super::loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const HOME_GONE: usize = 1 << (usize::BITS - 1);
/// Far below `HOME_GONE`: reaching it means references are leaked in a
/// loop; abort rather than overflow into the flag.
const MAX_REFS: usize = HOME_GONE >> 1;

pub(crate) struct RemoteCount(AtomicUsize);

impl RemoteCount {
    #[cfg(not(all(test, coroloop_loom)))]
    pub(crate) const fn new() -> RemoteCount {
        RemoteCount(AtomicUsize::new(0))
    }

    #[cfg(all(test, coroloop_loom))]
    pub(crate) fn new() -> RemoteCount {
        RemoteCount(AtomicUsize::new(0))
    }

    /// Takes a reference. The caller holds one already, or is the home
    /// thread holding a strong handle.
    pub(crate) fn acquire(&self) {
        // Relaxed: the caller's existing reference keeps the header alive;
        // no data is published by taking another.
        let prev = self.0.fetch_add(1, Ordering::Relaxed);
        if prev & !HOME_GONE >= MAX_REFS {
            std::process::abort();
        }
    }

    /// Drops a reference; `true` if the caller must now free the header.
    #[must_use]
    pub(crate) fn release(&self) -> bool {
        // AcqRel: Release publishes this thread's last accesses to whoever
        // frees; Acquire, if we free, sees everyone else's.
        self.0.fetch_sub(1, Ordering::AcqRel) == HOME_GONE | 1
    }

    /// The home thread let go (no strong handle, no weak entry is left);
    /// `true` if it must recycle the header now, `false` if the last remote
    /// reference will free it.
    #[must_use]
    pub(crate) fn home_release(&self) -> bool {
        // Acquire pairs with `release`'s Release: the remote threads' last
        // accesses happen before the recycle.
        if self.0.load(Ordering::Acquire) == 0 {
            return true;
        }
        if self.0.fetch_or(HOME_GONE, Ordering::AcqRel) == 0 {
            // The last remote reference went away in between; clear the flag
            // for the header's next life.
            self.0.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// A "queued" flag for cross-thread wakes (and schedules): a waker queues
/// the coroutine only if it sets the flag; the driver clears it right
/// before entering the coroutine.
///
/// Both sides are read-modify-writes on purpose. A waker that finds the
/// flag set does not queue again and relies on the pending request; the
/// driver's clearing swap reads that waker's swap and acquires from it, so
/// what the waker wrote before waking (the condition the coroutine waits
/// for) is visible to the coroutine entered next. With a plain store the
/// driver's later loads could pass the store and miss the wake (seen as a
/// hung ping-pong between two threads before this was a swap).
pub(crate) struct WakeFlag(AtomicBool);

impl WakeFlag {
    #[cfg(not(all(test, coroloop_loom)))]
    pub(crate) const fn new() -> WakeFlag {
        WakeFlag(AtomicBool::new(false))
    }

    #[cfg(all(test, coroloop_loom))]
    pub(crate) fn new() -> WakeFlag {
        WakeFlag(AtomicBool::new(false))
    }

    /// Waker side: `true` if the caller must queue the coroutine.
    #[inline]
    #[must_use]
    pub(crate) fn claim(&self) -> bool {
        !self.0.swap(true, Ordering::AcqRel)
    }

    /// Driver side, right before entering the coroutine.
    #[inline]
    pub(crate) fn release(&self) {
        self.0.swap(false, Ordering::AcqRel);
    }

    /// Forget a pending claim (the header is being reset).
    pub(crate) fn reset(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[cfg(all(test, coroloop_loom))]
mod tests_loom {
    use super::*;
    use loom::sync::atomic::AtomicUsize as Counter;
    use loom::sync::Arc;

    /// Stands for a header: `frees` counts how many parties freed it,
    /// `uses` is data the remote side writes before dropping.
    struct Model {
        count: RemoteCount,
        frees: Counter,
        uses: Counter,
    }

    #[test]
    fn loom_exactly_one_party_frees() {
        loom::model(|| {
            let m = Arc::new(Model {
                count: RemoteCount::new(),
                frees: Counter::new(0),
                uses: Counter::new(0),
            });
            // The home thread makes two remote references (a waker and its
            // clone) and sends them away.
            m.count.acquire();
            m.count.acquire();
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let m = m.clone();
                    loom::thread::spawn(move || {
                        m.uses.fetch_add(1, Ordering::Relaxed);
                        if m.count.release() {
                            assert_eq!(m.uses.load(Ordering::Relaxed), 2);
                            m.frees.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            if m.count.home_release() {
                // Whoever frees sees every use.
                assert_eq!(m.uses.load(Ordering::Relaxed), 2);
                m.frees.fetch_add(1, Ordering::Relaxed);
            }
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(m.frees.load(Ordering::Relaxed), 1);
        });
    }

    /// A request is in flight (flag claimed). The waker publishes its
    /// condition and wakes again while the driver dequeues: either the
    /// waker queues a new request, or the coroutine entered by the driver
    /// sees the condition. No lost wake.
    #[test]
    fn loom_wake_flag_no_lost_wake() {
        loom::model(|| {
            let flag = Arc::new(WakeFlag::new());
            assert!(flag.claim()); // the request already queued
            let cond = Arc::new(AtomicBool::new(false));
            let requeued = Arc::new(AtomicBool::new(false));
            let w = {
                let (flag, cond, requeued) = (flag.clone(), cond.clone(), requeued.clone());
                loom::thread::spawn(move || {
                    cond.store(true, Ordering::Relaxed);
                    if flag.claim() {
                        requeued.store(true, Ordering::Relaxed);
                    }
                })
            };
            // The driver dequeues the in-flight request and enters the
            // coroutine, which checks its condition.
            flag.release();
            let seen = cond.load(Ordering::Relaxed);
            w.join().unwrap();
            assert!(
                seen || requeued.load(Ordering::Relaxed),
                "the coroutine missed the condition and no new request was queued"
            );
        });
    }
}
