//! Waking a sleeping loop: QEMU's `notify_me` / `notified` protocol, and
//! the eventfd-backed [`EventNotifier`].
//!
//! ```text
//!   producer (any thread)                 loop (home thread)
//!   ---------------------                 ------------------
//!   publish work (BH push, ...)           notify_me += 2          (prepare)
//!   notified = true                       fence(SeqCst)
//!   fence(SeqCst)                         if notified: don't sleep
//!   if notify_me != 0                     sleep in the fd monitor
//!       and !kicked.swap(true):           notify_me -= 2          (finish)
//!       write the eventfd                 kicked = false if the monitor
//!                                           reported the notifier (drained)
//!                                         notified = false; fence (accept)
//!                                         process work
//! ```
//!
//! The eventfd is registered edge-triggered: the epoll monitor never reads
//! it (an edge is reported once per write), the io_uring monitor reads its
//! own duplicate back when it harvests the poll completion.
//!
//! The two fences are a Dekker pair: either the loop sees `notified` before
//! it sleeps, or the producer sees `notify_me` and kicks the eventfd. A
//! notify while the loop is awake costs a fence and a load, no syscall;
//! `kicked` keeps a burst of notifies against a sleeping loop to one write.
//! The core below is free of file descriptors so that loom can check it
//! (`tests_loom`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::loom::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};

/// The atomic part of the notify protocol.
pub(crate) struct NotifyCore {
    /// 2 per `poll` that is about to sleep (nested polls add up).
    notify_me: AtomicU32,
    /// A notify happened since the last accept.
    notified: AtomicBool,
    /// The eventfd was written since it was last drained.
    kicked: AtomicBool,
}

impl NotifyCore {
    pub(crate) fn new() -> NotifyCore {
        NotifyCore {
            notify_me: AtomicU32::new(0),
            notified: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
        }
    }

    /// Producer side. Returns `true` if the caller must write the eventfd.
    #[inline]
    #[must_use]
    pub(crate) fn notify(&self) -> bool {
        // Release: the work published before this call is visible to the
        // loop once it sees `notified` (pairs with the fence in `accept`).
        self.notified.store(true, Ordering::Release);
        // Dekker point with `prepare_block`.
        fence(Ordering::SeqCst);
        self.notify_me.load(Ordering::Relaxed) != 0 && !self.kicked.swap(true, Ordering::AcqRel)
    }

    /// Loop side, before sleeping: returns `false` if a notify already
    /// arrived and the loop must not sleep. Call `finish_block` afterwards
    /// either way.
    #[inline]
    #[must_use]
    pub(crate) fn prepare_block(&self) -> bool {
        let v = self.notify_me.load(Ordering::Relaxed);
        self.notify_me.store(v + 2, Ordering::Relaxed);
        // Dekker point with `notify`.
        fence(Ordering::SeqCst);
        !self.notified.load(Ordering::Relaxed)
    }

    /// Loop side, after sleeping (or deciding not to).
    #[inline]
    pub(crate) fn finish_block(&self) {
        let v = self.notify_me.load(Ordering::Relaxed);
        // Release: the wait is over before producers stop kicking.
        self.notify_me.store(v - 2, Ordering::Release);
    }

    /// Loop side, after draining the eventfd: later notifies kick again.
    #[inline]
    pub(crate) fn drained(&self) {
        self.kicked.store(false, Ordering::Release);
    }

    /// Loop side: consume notifies before processing work.
    #[inline]
    pub(crate) fn accept(&self) {
        if self.notified.load(Ordering::Relaxed) {
            self.notified.store(false, Ordering::Relaxed);
        }
        // Order the clear before the reads of work (BH lists, flags).
        fence(Ordering::SeqCst);
    }

    /// Whether a notify is pending (the notifier's busy-poll handler).
    #[inline]
    pub(crate) fn is_notified(&self) -> bool {
        self.notified.load(Ordering::Relaxed)
    }

    /// Home thread only: whether a loop of this thread prepared to sleep
    /// and has not finished (an outer loop that drives the context through
    /// `prepare`, such as `run_in_smol`, runs other code meanwhile). Only
    /// the home thread writes `notify_me`, so a plain load sees its own
    /// writes: no fence is needed.
    #[inline]
    pub(crate) fn armed_here(&self) -> bool {
        self.notify_me.load(Ordering::Relaxed) != 0
    }
}

/// An eventfd: a counter other threads (or the kernel) can set, that an
/// [`AioContext`](super::AioContext) watches like any fd (QEMU's
/// `EventNotifier`).
///
/// # Examples
///
/// ```
/// use coroloop::aio::EventNotifier;
/// let e = EventNotifier::new()?;
/// assert!(!e.test_and_clear());
/// e.set()?;
/// e.set()?;
/// assert!(e.test_and_clear());
/// assert!(!e.test_and_clear());
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug)]
pub struct EventNotifier {
    fd: OwnedFd,
}

impl EventNotifier {
    /// Creates a cleared notifier (non-blocking, close-on-exec eventfd).
    ///
    /// # Errors
    ///
    /// The `eventfd(2)` error, e.g. `EMFILE` when out of file descriptors.
    #[doc(alias = "event_notifier_init")]
    pub fn new() -> io::Result<EventNotifier> {
        use rustix::event::{eventfd, EventfdFlags};
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| io::Error::new(e.kind(), format!("EventNotifier::new: eventfd: {e}")))?;
        Ok(EventNotifier { fd })
    }

    /// Sets the notifier: its fd becomes readable. Thread-safe
    /// (`EventNotifier` is `Sync`).
    ///
    /// # Errors
    ///
    /// Only if the counter would overflow, which takes 2^64 sets.
    #[doc(alias = "event_notifier_set")]
    pub fn set(&self) -> io::Result<()> {
        match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Clears the notifier; returns whether it was set.
    #[doc(alias = "event_notifier_test_and_clear")]
    pub fn test_and_clear(&self) -> bool {
        let mut buf = [0u8; 8];
        matches!(rustix::io::read(&self.fd, &mut buf), Ok(8))
    }
}

impl AsFd for EventNotifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(all(test, coroloop_loom))]
mod tests_loom {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;

    /// A producer publishes work and notifies while the loop checks for
    /// work and decides whether to sleep. No lost wake-up: if the loop
    /// sleeps without having seen the work, the eventfd was kicked.
    #[test]
    fn loom_notify_no_lost_wakeup() {
        loom::model(|| {
            let core = Arc::new(NotifyCore::new());
            let work = Arc::new(AtomicBool::new(false));
            let kicks = Arc::new(AtomicUsize::new(0));
            let p = {
                let (core, work, kicks) = (core.clone(), work.clone(), kicks.clone());
                loom::thread::spawn(move || {
                    work.store(true, Ordering::Relaxed);
                    if core.notify() {
                        kicks.fetch_add(1, Ordering::Relaxed);
                    }
                })
            };
            // One loop iteration: compute the timeout from the work, then
            // prepare to block.
            let saw_work = work.load(Ordering::Relaxed);
            if !saw_work {
                if core.prepare_block() {
                    // Asleep in epoll_wait, with notify_me raised, until the
                    // eventfd is written: the producer must have kicked it
                    // by the time it is done.
                    p.join().unwrap();
                    assert_eq!(kicks.load(Ordering::Relaxed), 1, "lost wake-up");
                    core.finish_block();
                    core.accept();
                    assert!(work.load(Ordering::Relaxed));
                    return;
                }
                core.finish_block();
            }
            p.join().unwrap();
            core.accept();
        });
    }

    /// Two notifies against one sleeping loop write the eventfd once; after
    /// the loop drained it, the next notify writes it again.
    #[test]
    fn loom_kick_once_then_again_after_drain() {
        loom::model(|| {
            let core = Arc::new(NotifyCore::new());
            assert!(core.prepare_block());
            let kicks = Arc::new(AtomicUsize::new(0));
            let ts: Vec<_> = (0..2)
                .map(|_| {
                    let (core, kicks) = (core.clone(), kicks.clone());
                    loom::thread::spawn(move || {
                        if core.notify() {
                            kicks.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for t in ts {
                t.join().unwrap();
            }
            assert_eq!(kicks.load(Ordering::Relaxed), 1);
            core.drained();
            core.finish_block();
            core.accept();
            assert!(core.prepare_block(), "nothing pending after accept");
            assert!(core.notify(), "a sleeping loop is kicked again");
        });
    }
}
